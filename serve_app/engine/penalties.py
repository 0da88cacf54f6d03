"""Repetition guards, applied to a batch's logits before sampling (greedy included).

- OpenAI's `frequency_penalty` and `presence_penalty`: a token's logit loses
  `count × frequency_penalty + (count > 0) × presence_penalty`, `count` being how often this
  choice has generated it so far (the prompt does not count, as at OpenAI).
- HF's and vLLM's `repetition_penalty`: the logit of a token seen in the prompt or generated so
  far is divided by it when positive and multiplied by it when negative, so a penalty above 1
  makes a seen token less likely whatever the logit's sign. Applied first, as vLLM does.

Only tokens a choice has seen are touched, so a step works on them alone: each guarded row's
seen tokens are gathered from the logits, penalised and scattered back into a copy of the
logits, which costs (rows × tokens seen) plus one copy rather than a dozen passes over
(rows × vocabulary). On this shared 2-core CPU (one thread), 16 guarded rows with 600 tokens
seen each took about 1 ms a step, 64 rows 5 ms; penalising whole rows of GPT-2's vocabulary had
taken 12 and 59 ms. What a choice has seen is kept per KV-cache slot on the model's device,
allocated when the first guarded request starts: a server whose clients never ask for a guard
pays nothing. Penalties depend on token ids alone, never on where
a prompt's keys and values came from, so the prefix cache cannot change them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from serve_app.engine.types import SamplingParams

# Dividing a float32 logit by a repetition penalty this small or smaller can overflow once
# sample() divides again by a small temperature; seen tokens already take all the probability
# long before it, so smaller penalties are treated as this one.
MIN_REPETITION_PENALTY = 1e-4


def penalise(seen: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor,
             repetition: torch.Tensor) -> torch.Tensor:
    """The logits `seen` [R, K] of tokens each row has seen, after the row's penalties [R];
    `counts` [R, K]: how often the row generated each of those tokens (0: only in its prompt)."""
    repetition = repetition.clamp(min=MIN_REPETITION_PENALTY)[:, None]
    seen = torch.where(seen > 0, seen / repetition, seen * repetition)
    return seen - frequency[:, None] * counts - presence[:, None] * (counts > 0)


class TokenHistory:
    """What each slot's choice has seen: its tokens in order (prompt, then generated), and how
    often it generated each vocabulary token."""

    def __init__(self, slots: int, max_seq_len: int, vocab_size: int, device: torch.device):
        self.slots, self.max_seq_len, self.vocab_size, self.device = slots, max_seq_len, vocab_size, device
        # [slots, max_seq_len] int64. Past a slot's length the row repeats its first token, so
        # that rows of different lengths gather together: a token gathered twice is penalised
        # once, as both copies are scattered back with the same value.
        self._tokens: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None  # [slots, vocab] float32
        self._lengths = [0] * slots

    @property
    def allocated(self) -> bool:
        return self._tokens is not None

    def start(self, first_slot: int, n: int, prompt_ids: list[int]) -> None:
        """Slots first_slot..first_slot+n-1 begin the n choices of this prompt."""
        if self._tokens is None:
            self._tokens = torch.zeros(self.slots, self.max_seq_len, dtype=torch.long, device=self.device)
            self._counts = torch.zeros(self.slots, self.vocab_size, device=self.device)
        rows = slice(first_slot, first_slot + n)
        self._tokens[rows] = prompt_ids[0]
        self._tokens[rows, : len(prompt_ids)] = torch.tensor(prompt_ids, device=self.device)
        self._counts[rows] = 0
        self._lengths[rows] = [len(prompt_ids)] * n

    def record(self, slots: Sequence[int], tokens: Sequence[int]) -> None:
        """Each slot generated its token (one write and one scatter for the whole batch)."""
        rows = torch.tensor(slots, device=self.device)
        new = torch.tensor(tokens, device=self.device)
        self._tokens[rows, torch.tensor([self._lengths[s] for s in slots], device=self.device)] = new
        self._counts.index_put_((rows, new), torch.ones(len(slots), device=self.device), accumulate=True)
        for s in slots:
            self._lengths[s] += 1

    def move(self, src: int, dst: int) -> None:
        """A choice moved to another slot (the batch was re-packed)."""
        self._tokens[dst] = self._tokens[src]
        self._counts[dst] = self._counts[src]
        self._lengths[dst] = self._lengths[src]

    def apply(self, logits: torch.Tensor, rows: Sequence[int], slots: Sequence[int],
              params: Sequence[SamplingParams]) -> torch.Tensor:
        """A copy of `logits` [B, V] with the penalties of `params[i]` applied to row `rows[i]`,
        whose choice sits in `slots[i]`; the other rows as they were."""
        device = self.device
        slot_index = torch.tensor(slots, device=device)
        row_index = torch.tensor(rows, device=device)[:, None]
        seen_ids = self._tokens[slot_index, : max(self._lengths[s] for s in slots)]  # [R, K]
        penalised = penalise(
            logits[row_index, seen_ids], self._counts[slot_index[:, None], seen_ids],
            torch.tensor([p.frequency_penalty for p in params], device=device),
            torch.tensor([p.presence_penalty for p in params], device=device),
            torch.tensor([p.repetition_penalty for p in params], device=device),
        )
        # A copy: the caller's logits may be a row expanded to n choices, or be sampled again
        # row by row after running out of memory.
        out = logits.clone(memory_format=torch.contiguous_format)
        out[row_index, seen_ids] = penalised
        return out
