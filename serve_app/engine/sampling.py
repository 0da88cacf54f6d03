"""Choosing the next token for every row of a batch at once, on the model's device.

Reproducibility: a seeded request must give the same text whatever else shares its batch. So
no row draws from a shared random stream: each row's random number is a hash of (its own seed,
how many tokens it has generated), and the token is picked by inverse-CDF sampling with that
number. Batch order, batch size and other requests change nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """A well-mixed 64-bit hash (Steele et al., SplitMix64's finaliser)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def choice_seed(seed: int, index: int) -> int:
    """Each choice of an `n`-choice request gets its own stream, fixed by the request's seed."""
    return splitmix64((seed & _MASK64) ^ splitmix64(index))


def uniform(seed: int, counter: int) -> float:
    """A number in [0, 1) that depends only on the row's seed and its token counter."""
    return (splitmix64(seed ^ splitmix64(counter)) >> 11) / float(1 << 53)


@dataclass
class RowParams:
    temperature: float
    top_k: int
    top_p: float
    seed: int
    counter: int
    min_p: float = 0.0


def sample(logits: torch.Tensor, rows: list[RowParams]) -> list[int]:
    """Pick one token per row of `logits` [B, V] (float32)."""
    B, V = logits.shape
    device = logits.device
    # `max`'s indices are argmax's (the first of tied maxima), at 0.43 ms against 1.09 for
    # `argmax` on [32, 50257] float32 (2 threads, a Xeon): a greedy decode step pays it per step.
    greedy = logits.max(dim=-1).indices
    if all(r.temperature == 0 for r in rows):
        return greedy.tolist()

    temperature = torch.tensor([max(r.temperature, 1e-5) for r in rows], device=device)
    top_p = torch.tensor([r.top_p for r in rows], device=device)
    min_p = torch.tensor([r.min_p for r in rows], device=device)
    top_k = torch.tensor([r.top_k if 0 < r.top_k < V else V for r in rows], device=device)
    u = torch.tensor([uniform(r.seed, r.counter) for r in rows], device=device, dtype=torch.float64)

    k_max = int(top_k.max())
    if k_max < V:
        values, index = logits.topk(k_max, dim=-1)  # sorted, largest first
    elif bool((top_k < V).any() | (top_p < 1).any()):
        # A row without a top-k cut keeps the whole vocabulary, but the rows beside it with
        # a cut (or a nucleus) still need the ranks.
        values, index = logits.sort(dim=-1, descending=True)
    else:
        # Plain sampling: inverse-CDF sampling needs no particular order, so skip the sort.
        values, index = logits, None
    if index is not None:
        rank = torch.arange(values.shape[1], device=device)
        values = values.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(values / temperature[:, None], dim=-1)
    if index is not None:
        # Nucleus: keep the smallest prefix whose mass reaches top_p (the first token always).
        mass_before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    if bool((min_p > 0).any()):
        # min-p (HF's and vLLM's): drop tokens less likely than min_p times the likeliest one. A
        # ratio to the top token, which every cut above keeps, so it needs no renormalising.
        probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)

    cdf = probs.double().cumsum(dim=-1)
    target = (u * cdf[:, -1])[:, None]
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[1] - 1)
    tokens = pick[:, 0] if index is None else index.gather(1, pick)[:, 0]
    is_greedy = torch.tensor([r.temperature == 0 for r in rows], device=device)
    return torch.where(is_greedy, greedy, tokens).tolist()
