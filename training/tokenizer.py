"""Fit Quill's own byte-level BPE on the training split of the corpora (never the held-out text).

    python -m training.tokenizer                     # -> models/quill-tokenizer/
    python -m training.tokenizer --vocab-size 8192 --out models/quill-tokenizer

Why a tokenizer of our own for the shipped models: with GPT-2's 50,257-token vocabulary, a
small model spends most of its parameters and most of its training FLOPs on the embedding and
the LM head (at n_embd 256: 12.9M of 16M parameters, and the head's matmul is ~4x the four
blocks' together). An 8,192-token BPE fitted to our five genres cuts that six-fold while a text
needs only ~20% more tokens, so the same CPU hours train a model that sees far more text.

The result is GPT-2's tokenizer format exactly (byte-level BPE, `<|endoftext|>` as bos/eos/unk,
no prefix space): `AutoTokenizer` / `GPT2TokenizerFast` load it as they load GPT-2's, and the
models stay `GPT2LMHeadModel` checkpoints. Hub checkpoints keep their own tokenizer. Quality is
compared across tokenizers in bits per byte (training/metrics.py), never in perplexity.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from training.data import GENRES, REPO_ROOT, SplitSettings, read_documents, split_documents

EOS = "<|endoftext|>"
DEFAULT_DIR = REPO_ROOT / "models" / "quill-tokenizer"


def training_texts(corpora_dir: Path, genres=GENRES, settings: SplitSettings = SplitSettings()):
    """Every genre's train split, piece by piece (the same split the models train on)."""
    for genre in genres:
        train, _ = split_documents(read_documents(genre, corpora_dir), settings.val_fraction,
                                   settings.chunk_chars)
        yield from train


def fit(corpora_dir: Path, vocab_size: int, genres=GENRES):
    """A GPT2TokenizerFast whose BPE was fitted on the corpora's train split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        # All 256 bytes are in the vocabulary, so any text (any language, emoji) still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_texts(corpora_dir, genres), trainer=trainer)
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS,
                             add_prefix_space=False, model_max_length=512)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.tokenizer", description=__doc__.split("\n")[0])
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--corpora", type=Path, default=REPO_ROOT / "training" / "corpora")
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args(argv)
    t0 = time.time()
    tokenizer = fit(args.corpora, args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(args.out))
    sample = "The Secretary shall, within thirty days, publish the order."
    print(f"fitted {len(tokenizer)} tokens in {time.time() - t0:.0f} s -> {args.out}; "
          f"{sample!r} -> {len(tokenizer(sample)['input_ids'])} tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
