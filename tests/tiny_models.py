"""Tiny random GPT-2 checkpoints for tests, made with `save_pretrained` (no downloads)."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "models" / "gpt2-tokenizer"


def make_tiny_checkpoint(path: Path, seed: int = 0, n_positions: int = 256) -> Path:
    """A 2-layer GPT-2 with GPT-2's real tokenizer, saved as safetensors.

    A wide initialiser gives peaked, varied logits, so greedy decoding is not one token
    repeated and sampling tests have distributions worth checking.
    """
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=n_positions, initializer_range=0.3
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(path)
    return path
