"""Held-out perplexity, shared by training (quick evals, model cards) and evaluate.py (docs)."""
from __future__ import annotations

import math

import numpy as np
import torch


@torch.no_grad()
def perplexity(model, stream: np.ndarray, block_size: int, max_tokens: int | None = None,
               batch_size: int = 4) -> float:
    """exp(mean next-token loss) over non-overlapping blocks of a held-out token stream.

    Every block is scored from its own start (no context carried over), the same way for every
    model, so numbers are comparable across models; max_tokens takes the first tokens of the
    stream (the held-out split is already a hash-spread sample of the whole genre).
    """
    if max_tokens:
        stream = stream[:max_tokens]
    n = len(stream) // block_size
    if n == 0:  # a stream shorter than one block is scored as one short block
        blocks = torch.from_numpy(stream.astype(np.int64))[None]
    else:
        blocks = torch.from_numpy(stream[: n * block_size].astype(np.int64)).view(n, block_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i:i + batch_size].to(device)
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
        total_loss += loss.item()
        total_tokens += x[:, 1:].numel()
    model.train(was_training)
    return math.exp(total_loss / total_tokens)
