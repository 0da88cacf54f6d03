"""The engine's prefix cache: a writer's growing document prefills only what is new, and no
output changes because of what was cached before."""
from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.engine import GenerationRequest, SamplingParams
from serve_app.engine.prefix_cache import BLOCK_TOKENS
from tests.test_engine import greedy, make_engine, run

TEXT = (Path(__file__).resolve().parents[1] / "training" / "corpora" / "fantasy" / "carroll_alice_books.txt").read_text()


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints):
    return tiny_checkpoints["tiny-a"]


@pytest.fixture(scope="module")
def document(checkpoint):
    """About 150 tokens of real prose, and the writer's versions of it: each resend is the same
    text plus a few more words."""
    tok = make_engine(checkpoint, prefix_cache_tokens=0).tokenizer
    ids = tok.encode(TEXT[5000:9000])[:150]
    return tok.decode(ids[:100]), [tok.decode(ids[:n]) for n in (100, 107, 121, 150)]


def cached_tokens(engine, request):
    got = {}
    engine.add(request)
    while engine.has_work:
        for d in engine.step():
            got.setdefault("tokens", []).extend(d.token_ids)
            got["cached"] = d.cached_tokens
    return got


def test_a_growing_document_prefills_only_what_is_new_with_the_same_greedy_text(checkpoint, document):
    _, versions = document
    with_cache = make_engine(checkpoint, prefix_cache_tokens=1024)
    without = make_engine(checkpoint)
    for i, text in enumerate(versions):
        got = cached_tokens(with_cache, GenerationRequest(text, greedy(12), f"w{i}"))
        want, _, _ = run(without, [GenerationRequest(text, greedy(12), f"w{i}")])
        assert got["tokens"] == want[(f"w{i}", 0)], f"version {i} changed with the cache"
        if i == 0:
            assert got["cached"] == 0
        else:
            # Every full block of the previous version is reused (it is a prefix of this one).
            previous = len(with_cache.tokenizer.encode(versions[i - 1]))
            assert got["cached"] >= (previous // BLOCK_TOKENS - 1) * BLOCK_TOKENS > 0


def test_a_prefix_that_ends_mid_block_reuses_only_whole_blocks(checkpoint):
    engine = make_engine(checkpoint, prefix_cache_tokens=1024)
    tok = engine.tokenizer
    shared = tok.encode(TEXT[20000:24000])[: 2 * BLOCK_TOKENS + 5]  # two blocks and a bit
    first = shared + tok.encode(" The Queen said nothing at all to anybody that day.")
    second = shared + tok.encode(" Alice ran down the long hall to the little door.")
    cached_tokens(engine, GenerationRequest(first, greedy(4), "first"))
    got = cached_tokens(engine, GenerationRequest(second, greedy(10), "second"))
    assert got["cached"] == 2 * BLOCK_TOKENS
    want, _, _ = run(make_engine(checkpoint), [GenerationRequest(second, greedy(10), "x")])
    assert got["tokens"] == want[("x", 0)]


def test_seeded_text_is_the_same_whatever_was_cached_before(checkpoint, document):
    prefix, versions = document
    params = SamplingParams(max_tokens=16, temperature=1.0, top_k=40, top_p=0.9, seed=7)
    cold, _, _ = run(make_engine(checkpoint, prefix_cache_tokens=1024), [GenerationRequest(versions[2], params, "s")])
    warm_engine = make_engine(checkpoint, prefix_cache_tokens=1024)
    run(warm_engine, [GenerationRequest(prefix, SamplingParams(max_tokens=3, seed=1), "warm")])
    warm, _, _ = run(warm_engine, [GenerationRequest(versions[2], params, "s")])
    assert warm[("s", 0)] == cold[("s", 0)]
    assert warm_engine.prefix_cache.hit_tokens > 0


def test_n_choices_and_small_prefill_chunks_across_the_cached_boundary(checkpoint, document):
    """A 5-token budget prefills the uncached rest in chunks that start inside the document; the
    n choices share that prefill and each equals the greedy text without a cache."""
    prefix, versions = document
    engine = make_engine(checkpoint, prefix_cache_tokens=1024, max_prefill_tokens=5)
    run(engine, [GenerationRequest(prefix, greedy(2), "warm")])
    tokens, _, _ = run(engine, [GenerationRequest(versions[2], greedy(10, n=3), "many")])
    want, _, _ = run(make_engine(checkpoint), [GenerationRequest(versions[2], greedy(10), "one")])
    for i in range(3):
        assert tokens[("many", i)] == want[("one", 0)]
    assert engine.prefix_cache.hit_tokens >= 6 * BLOCK_TOKENS


def test_a_tiny_budget_evicts_without_changing_running_requests(checkpoint):
    """Two blocks of budget against eight concurrent documents: blocks are evicted all the
    time, and every request still decodes exactly as without a cache."""
    engine = make_engine(checkpoint, prefix_cache_tokens=2 * BLOCK_TOKENS)
    tok = engine.tokenizer
    prompts = [tok.decode(tok.encode(TEXT[30000 + 3000 * i : 33000 + 3000 * i])[:60]) for i in range(8)]
    requests = lambda: [GenerationRequest(p, greedy(12), f"r{i}") for i, p in enumerate(prompts)]  # noqa: E731
    got, _, _ = run(engine, requests()[:4], add_later={2: requests()[4:]})
    again, _, _ = run(engine, requests())  # now with whatever survived eviction
    want, _, _ = run(make_engine(checkpoint), requests())
    assert got == want and again == want
    assert engine.prefix_cache.cached_tokens <= 2 * BLOCK_TOKENS


def test_a_cancelled_requests_prompt_is_reusable(checkpoint, document):
    prefix, versions = document
    engine = make_engine(checkpoint, prefix_cache_tokens=1024)
    engine.add(GenerationRequest(versions[1], greedy(50), "gone"))
    engine.step()  # prefilled, first token out
    engine.cancel("gone")
    while engine.has_work:
        engine.step()
    got = cached_tokens(engine, GenerationRequest(versions[2], greedy(8), "next"))
    assert got["cached"] >= 6 * BLOCK_TOKENS
    want, _, _ = run(make_engine(checkpoint), [GenerationRequest(versions[2], greedy(8), "x")])
    assert got["tokens"] == want[("x", 0)]


def test_the_cache_is_off_at_zero(checkpoint, document):
    prefix, _ = document
    engine = make_engine(checkpoint, prefix_cache_tokens=0)
    assert engine.prefix_cache is None
    run(engine, [GenerationRequest(prefix, greedy(2), "a")])
    assert cached_tokens(engine, GenerationRequest(prefix + " and so on", greedy(2), "b"))["cached"] == 0


def test_repetition_guards_see_the_whole_prompt_when_part_of_it_came_from_the_cache(checkpoint, document):
    prefix, versions = document
    guarded = greedy(16, repetition_penalty=1.5, frequency_penalty=0.5)
    engine = make_engine(checkpoint, prefix_cache_tokens=1024)
    run(engine, [GenerationRequest(prefix, greedy(2), "warm")])
    warm, _, _ = run(engine, [GenerationRequest(versions[2], guarded, "g")])
    cold, _, _ = run(make_engine(checkpoint), [GenerationRequest(versions[2], guarded, "g")])
    assert warm == cold and engine.prefix_cache.hit_tokens > 0
    unguarded, _, _ = run(make_engine(checkpoint), [GenerationRequest(versions[2], greedy(16), "g")])
    assert unguarded != cold
