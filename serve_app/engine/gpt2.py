"""GPT-2's forward pass over a KV cache that is allocated once.

transformers' `GPT2LMHeadModel` gives us the weights; the forward pass is ours, because a
continuous batch needs what `generate` does not offer: every row at its own position, keys and
values written straight into a fixed slot of a preallocated cache, and logits for the last
position only. The arithmetic is the same as transformers' (Conv1D is `x @ W + b` with `W`
stored input-major), so greedy decoding matches `generate` token for token.

The cache is `[layer, slot, head, position, head_dim]`. Running sequences occupy slots
`0..B-1` with no holes (the engine keeps them packed), so a decode step reads the cache through
views `k[l, :B, :, :L]` and copies nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel
from transformers.activations import ACT2FN


@dataclass
class _Layer:
    ln_1: tuple[torch.Tensor, torch.Tensor]
    attn_w: torch.Tensor  # [E, 3E], input-major as Conv1D stores it
    attn_b: torch.Tensor
    proj_w: torch.Tensor  # [E, E]
    proj_b: torch.Tensor
    ln_2: tuple[torch.Tensor, torch.Tensor]
    fc_w: torch.Tensor  # [E, 4E]
    fc_b: torch.Tensor
    out_w: torch.Tensor  # [4E, E]
    out_b: torch.Tensor


class GPT2Runner:
    def __init__(self, model: GPT2LMHeadModel, max_batch_size: int, max_seq_len: int):
        cfg = model.config
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("cross-attention GPT-2 variants are not supported")
        self.n_head = cfg.n_head
        self.embed = cfg.n_embd
        self.head_dim = cfg.n_embd // cfg.n_head
        self.eps = cfg.layer_norm_epsilon
        self.act = ACT2FN[cfg.activation_function]
        self.vocab_size = cfg.vocab_size
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        self.scales = [
            scale / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else scale
            for i in range(cfg.n_layer)
        ]

        t = model.transformer
        self.wte = t.wte.weight.detach()
        self.wpe = t.wpe.weight.detach()
        self.ln_f = (t.ln_f.weight.detach(), t.ln_f.bias.detach())
        # Logits as `x @ W` with W [E, V] contiguous: a skinny batch against the transposed
        # embedding ran 30-50% faster here than nn.Linear's `x @ W.T` (see MEASURED.md).
        self.lm_head_t = model.lm_head.weight.detach().t().contiguous()
        self.layers = [
            _Layer(
                ln_1=(b.ln_1.weight.detach(), b.ln_1.bias.detach()),
                attn_w=b.attn.c_attn.weight.detach(),
                attn_b=b.attn.c_attn.bias.detach(),
                proj_w=b.attn.c_proj.weight.detach(),
                proj_b=b.attn.c_proj.bias.detach(),
                ln_2=(b.ln_2.weight.detach(), b.ln_2.bias.detach()),
                fc_w=b.mlp.c_fc.weight.detach(),
                fc_b=b.mlp.c_fc.bias.detach(),
                out_w=b.mlp.c_proj.weight.detach(),
                out_b=b.mlp.c_proj.bias.detach(),
            )
            for b in t.h
        ]
        self.device = self.wte.device
        self.dtype = self.wte.dtype
        shape = (cfg.n_layer, max_batch_size, cfg.n_head, max_seq_len, self.head_dim)
        # Allocated once. Masked positions are still multiplied (by a probability of 0), so every
        # position a slot may read must hold a finite number: a slot is zeroed the first time it
        # is used. On a CPU that also means untouched slots cost no resident memory.
        self.k_cache = torch.empty(shape, device=self.device, dtype=self.dtype)
        self.v_cache = torch.empty(shape, device=self.device, dtype=self.dtype)
        self._zeroed = [False] * max_batch_size

    def _layer_norm(self, x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.layer_norm(x, (self.embed,), wb[0], wb[1], self.eps)

    def _mlp(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        h = self.act(torch.addmm(layer.fc_b, self._layer_norm(x, layer.ln_2), layer.fc_w))
        return x + torch.addmm(layer.out_b, h, layer.out_w)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return (self._layer_norm(x, self.ln_f) @ self.lm_head_t).float()

    @torch.inference_mode()
    def prefill(self, token_ids: list[int], slot: int, start: int = 0) -> torch.Tensor:
        """Run prompt tokens for one sequence into `slot`, at positions `start..start+T-1` (a
        later chunk of a prompt attends to the chunks before it); return the last position's
        logits [V]."""
        T = len(token_ids)
        if start == 0:
            self._zero_once(slot)
        tokens = torch.tensor(token_ids, device=self.device)
        x = self.wte[tokens] + self.wpe[start : start + T]  # [T, E]
        # Query i (position start+i) sees cached positions 0..start+i; for a first chunk that is
        # plain causal attention, which SDPA runs without a mask.
        mask = None
        if start:
            seen = torch.arange(start + T, device=self.device)[None, :]
            mask = seen <= start + torch.arange(T, device=self.device)[:, None]
        for i, layer in enumerate(self.layers):
            qkv = torch.addmm(layer.attn_b, self._layer_norm(x, layer.ln_1), layer.attn_w)
            q, k, v = (t.view(T, self.n_head, self.head_dim).transpose(0, 1) for t in qkv.split(self.embed, 1))
            self.k_cache[i, slot, :, start : start + T] = k
            self.v_cache[i, slot, :, start : start + T] = v
            a = F.scaled_dot_product_attention(
                q, self.k_cache[i, slot, :, : start + T], self.v_cache[i, slot, :, : start + T],
                attn_mask=mask, is_causal=mask is None, scale=self.scales[i],
            )
            x = x + torch.addmm(layer.proj_b, a.transpose(0, 1).reshape(T, self.embed), layer.proj_w)
            x = self._mlp(x, layer)
        return self._logits(x[-1:])[0]

    @torch.inference_mode()
    def decode(self, token_ids: list[int], positions: list[int]) -> torch.Tensor:
        """One new token for each of the sequences in slots 0..B-1; return logits [B, V].

        `positions[b]` is where the token lands (the sequence's length so far).
        """
        B = len(token_ids)
        tokens = torch.tensor(token_ids, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        L = max(positions) + 1
        rows = torch.arange(B, device=self.device)
        # Each row attends to its own positions 0..pos[b]; the rest of the first L is masked.
        mask = (torch.arange(L, device=self.device)[None, :] <= pos[:, None])[:, None, :]
        x = self.wte[tokens] + self.wpe[pos]  # [B, E]
        for i, layer in enumerate(self.layers):
            qkv = torch.addmm(layer.attn_b, self._layer_norm(x, layer.ln_1), layer.attn_w)
            q, k, v = (t.view(B, self.n_head, self.head_dim) for t in qkv.split(self.embed, 1))
            self.k_cache[i, rows, :, pos] = k
            self.v_cache[i, rows, :, pos] = v
            # Plain batched matmuls: for one query row per sequence, SDPA's CPU kernel was
            # ~10x slower than this (22 ms vs ~2 ms per layer at B=64, L=200).
            keys = self.k_cache[i, :B, :, :L].reshape(B * self.n_head, L, self.head_dim)
            values = self.v_cache[i, :B, :, :L].reshape(B * self.n_head, L, self.head_dim)
            scores = torch.bmm(q.reshape(B * self.n_head, 1, self.head_dim), keys.transpose(1, 2))
            scores = (scores.view(B, self.n_head, L) * self.scales[i]).masked_fill_(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1).view(B * self.n_head, 1, L)
            a = torch.bmm(probs, values).view(B, self.embed)
            x = x + torch.addmm(layer.proj_b, a, layer.proj_w)
            x = self._mlp(x, layer)
        return self._logits(x)

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of one slot to another (n choices, packing,
        moving a half-prefilled prompt)."""
        self._zero_once(dst)
        self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
        self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    def _zero_once(self, slot: int) -> None:
        if not self._zeroed[slot]:
            self.k_cache[:, slot].zero_()
            self.v_cache[:, slot].zero_()
            self._zeroed[slot] = True
