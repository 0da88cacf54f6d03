"""Writers resending a growing document to a model with two replicas, through `quill serve`:
prefix-aware routing sends each resend to the replica that cached the document, so the cache
serves most of every resent prompt (counted by the replicas' own metric)."""
from __future__ import annotations

import argparse

import pytest

from bench.engine import make_checkpoint
from bench.serve import make_writers, run_phase
from training.data import load_tokenizer

pytestmark = pytest.mark.integration


def test_two_replicas_serve_most_of_every_resend_from_the_cache(tmp_path):
    args = argparse.Namespace(writers=4, start_tokens=100, end_tokens=260, words_per_turn=20, think_range=(0.1, 0.3),
                              max_tokens=4, replicas=2, cache_tokens=4096, seed=3)
    tokenizer = load_tokenizer()
    writers = make_writers(args, tokenizer)
    counts = {doc: len(tokenizer.encode(doc)) for turns in writers for doc in turns}
    checkpoint = make_checkpoint("tiny", tmp_path / "model", seed=0)
    phase = run_phase("cache on", checkpoint, args, writers, counts, tmp_path)
    assert phase["errors"] == 0, [r for r in phase["records"] if "error" in r][:3]
    assert phase["requests"] == sum(map(len, writers))
    # Whole 16-token blocks only: a resent 100-260 token document can at best reuse ~90-95%.
    assert phase["resent_hit_ratio"] >= 0.8, phase["resent_hit_ratio"]
