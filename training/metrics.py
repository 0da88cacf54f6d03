"""Held-out scores, shared by training (quick evals, model cards) and evaluate.py (docs).

One scoring loop (`score_stream`) gives both numbers:

- perplexity, exp(mean next-token loss): depends on the tokenizer (a smaller vocabulary cuts the
  same text into more, easier tokens), so it only compares models that share one;
- bits per byte, the total next-token loss in bits over the UTF-8 bytes of the text those
  predicted tokens stand for: the text is the same whatever cuts it, so this compares models
  with different tokenizers (GPT-2's 50,257 tokens against a smaller byte-level BPE).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class StreamScore:
    """What one held-out token stream cost a model."""

    nll: float  # total next-token negative log-likelihood, in nats
    tokens: int  # tokens predicted (the first token of each block is context only)
    bytes: int | None  # UTF-8 bytes of the predicted tokens' text; None when no tokenizer was given

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float | None:
        if self.bytes is None:
            return None
        return self.nll / math.log(2) / self.bytes if self.bytes else math.nan


# Text whose every character a byte-level BPE has to split into single-byte tokens somewhere.
_PROBE = "Hello, world: café, naïve ½ £5, 日本語の文, emoji 🙂🐉 and\n\ttabs."


@functools.lru_cache(maxsize=8)
def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes of every token id's text, as an int64 lookup table (built once per tokenizer).

    Special tokens (<|endoftext|>) count 0 bytes: they are markup, not text, though predicting
    them still costs the model loss. For a byte-level BPE (GPT-2's, or one trained in its
    format) a token's bytes are read from its byte-level spelling, so a character split over
    several tokens counts its bytes once in all (decoding such a token alone would give U+FFFD,
    three bytes); other tokenizers count the bytes of each token decoded on its own.
    """
    from serve_app.engine.detokenize import token_bytes_table  # the engine's own byte view

    table = token_bytes_table(tokenizer)
    ids = tokenizer.encode(_PROBE, add_special_tokens=False)
    if b"".join(table[i] for i in ids) == _PROBE.encode():
        lengths = np.array([len(b) for b in table], dtype=np.int64)
    else:
        lengths = np.array([len(tokenizer.decode([i], clean_up_tokenization_spaces=False).encode())
                            for i in range(len(tokenizer))], dtype=np.int64)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items()
                                                if t.special}
    lengths[[i for i in special if i < len(lengths)]] = 0
    return lengths


@torch.no_grad()
def score_stream(model, stream: np.ndarray, block_size: int, max_tokens: int | None = None,
                 batch_size: int = 4, *, tokenizer) -> StreamScore:
    """Next-token loss over non-overlapping blocks of a held-out token stream (and, given the
    stream's `tokenizer`, the bytes of text it predicted; tokenizer=None skips bits per byte).

    Every block is scored from its own start (no context carried over), the same way for every
    model, so numbers are comparable across models; max_tokens takes the first tokens of the
    stream (the held-out split is already a hash-spread sample of the whole genre).
    """
    if max_tokens:
        stream = stream[:max_tokens]
    n = len(stream) // block_size
    if n == 0:  # a stream shorter than one block is scored as one short block
        blocks = stream.astype(np.int64)[None]
    else:
        blocks = stream[: n * block_size].astype(np.int64).reshape(n, block_size)
    if blocks.shape[1] < 2:
        raise ValueError(f"a stream of {len(stream)} token(s) has nothing to predict")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    for i in range(0, len(blocks), batch_size):
        x = torch.from_numpy(blocks[i:i + batch_size]).to(device)
        logits = model(input_ids=x).logits.float()
        total_nll += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum").item()
    model.train(was_training)
    predicted = blocks[:, 1:]
    n_bytes = None if tokenizer is None else int(token_byte_lengths(tokenizer)[predicted].sum())
    return StreamScore(total_nll, predicted.size, n_bytes)


def perplexity(model, stream: np.ndarray, block_size: int, max_tokens: int | None = None,
               batch_size: int = 4) -> float:
    """exp(mean next-token loss) over a held-out token stream, scored as in `score_stream`."""
    return score_stream(model, stream, block_size, max_tokens, batch_size, tokenizer=None).perplexity
