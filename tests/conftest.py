"""Shared fixtures. Several people add fixtures here: append, keep each one self-contained."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GPT2_TOKENIZER_DIR = REPO_ROOT / "models" / "gpt2-tokenizer"


def save_tiny_gpt2(path: Path, seed: int = 0) -> Path:
    """Save a tiny random GPT-2 (2 layers, 64 wide) with GPT-2's real tokenizer (safetensors).

    The tokenizer is loaded with `from_pretrained` on the folder: constructing GPT2TokenizerFast
    from vocab/merges files in transformers 5 silently encodes everything to [].
    """
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    # A wide initialiser gives peaked, varied logits: greedy text is not one token repeated.
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=256, vocab_size=50257, initializer_range=0.3)
    GPT2LMHeadModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(GPT2_TOKENIZER_DIR).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Two different tiny random checkpoints, {"tiny-a": path, "tiny-b": path}, made once per session."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {name: save_tiny_gpt2(root / name, seed=i) for i, name in enumerate(("tiny-a", "tiny-b"))}
