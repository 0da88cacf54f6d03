"""GPT-2's forward pass over a KV cache that is allocated once.

The weights are a checkpoint's (loader.py reads them); the forward pass is ours, because a
continuous batch needs what `generate` does not offer: every row at its own position, keys and
values written straight into a fixed slot of a preallocated cache, decode rows and prompt
chunks in one pass, and logits for the last position of a prompt only. The arithmetic is
transformers' (the same operations in the same order; the matmuls by the fastest kernel at hand,
the GELU and the residual adds inside them, see `linear.py`), so greedy decoding matches
`generate` token for token in float32; in bfloat16 within the tolerance a test holds it to.

The cache is `[layer, slot, position, head, head_dim]`: a slot's keys for every head at a
position sit together, so a decode step reads each sequence's cache as one run of memory
(attention.py). Running sequences occupy slots `0..B-1` with no holes (the engine keeps them
packed), so a decode step reads the cache through views `k[l, :B, :L]` and copies nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from serve_app.engine.attention import decode_attention, fused_decode_serves
from serve_app.engine.linear import Linear, cpu_has_amx, linear, warm_up
from serve_app.engine.loader import CheckpointError, GPT2Weights, as_weights

# config.json's `activation_function`, as transformers computes each. GPT-2's own is
# "gelu_new", the tanh formula, here one fused kernel instead of transformers' seven
# elementwise passes (within 3e-7; 2 ms against 18 on a [320, 3072] activation here).
ACTIVATIONS = {
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def cache_dtype(weights: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype: the weights', but float32 for bfloat16 weights on a CPU where
    neither attention.py's loop (numba) nor AMX runs bfloat16 attention fast.

    PyTorch's CPU attention in bfloat16 is fast where AMX computes it and slow where only
    AVX512-BF16 does. 2 threads, 12 heads of 64, one query per sequence, 32 sequences: on a Xeon
    with AMX a bf16 cache took 1.9 ms a layer against 3.4 for float32 (64 sequences, 200
    positions); on an EPYC with AVX512-BF16, 2.1 ms against 0.4 at 80 positions and 4.9 against
    1.9 at 200 (`bench/profile_step.py`, docs/engine.md). attention.py's loop reads a bf16 cache
    as it comes, and there half the bytes pay: 0.36 ms a layer against 0.56 for float32 at
    contexts of 16-80, 1.10 against 1.75 at 16-383 (the EPYC, 32 sequences, 2 threads)."""
    if (device.type == "cpu" and weights == torch.bfloat16 and not cpu_has_amx()
            and not fused_decode_serves(device, torch.bfloat16)):
        return torch.float32
    return weights


@dataclass
class PromptChunk:
    """Prompt tokens to run into `slot` at positions `start..start+len(token_ids)-1` (a later
    chunk of a prompt attends to the chunks before it)."""

    slot: int
    start: int
    token_ids: list[int]
    every_position: bool = False  # logits for each of its positions (scoring a prompt), not the last alone


@dataclass
class _Layer:
    ln_1: tuple[torch.Tensor, torch.Tensor]
    attn: Linear  # E -> 3E: queries, keys, values
    proj: Linear  # (a, x) -> x + a @ W + b: E -> E, the residual added inside the matmul
    ln_2: tuple[torch.Tensor, torch.Tensor]
    fc: Linear  # E -> 4E (and GPT-2's GELU, where `fused_gelu`)
    out: Linear  # (h, x) -> x + h @ W + b: 4E -> E


def _conv1d(w: GPT2Weights, name: str, **fused) -> Linear:
    """transformers' Conv1D stores its weight [in, out]: `x @ W + b` (`fused`: linear's options)."""
    return linear(w.tensors[name + ".weight"].t(), w.tensors[name + ".bias"], **fused)


class GPT2Runner:
    def __init__(self, model: GPT2Weights, max_batch_size: int, max_seq_len: int,
                 max_rows: int | None = None):
        """`model`: a checkpoint's weights (loader.load_weights), or a transformers
        `GPT2LMHeadModel`. `max_rows`: the most rows one pass carries (decode rows plus
        prompt-chunk tokens); the matmul kernels for every row count up to it are built here
        (engine/linear.py)."""
        w = as_weights(model)
        cfg = w.config
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("cross-attention GPT-2 variants are not supported")
        if cfg.activation_function not in ACTIVATIONS:
            raise CheckpointError(f"activation_function {cfg.activation_function!r} (config.json) is not one of "
                                  f"{sorted(ACTIVATIONS)}")
        self.n_head = cfg.n_head
        self.embed = cfg.n_embd
        self.head_dim = cfg.n_embd // cfg.n_head
        self.eps = cfg.layer_norm_epsilon
        self.act = ACTIVATIONS[cfg.activation_function]
        # GPT-2's own GELU runs inside the c_fc matmul (linear.py); any other activation after it.
        self.fused_gelu = cfg.activation_function in ("gelu_new", "gelu_pytorch_tanh")
        self.vocab_size = cfg.vocab_size
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        self.scales = [
            scale / (i + 1) if cfg.scale_attn_by_inverse_layer_idx else scale
            for i in range(cfg.n_layer)
        ]

        t = w.tensors
        self.wte = t["transformer.wte.weight"]
        self.wpe = t["transformer.wpe.weight"]
        self.ln_f = (t["transformer.ln_f.weight"], t["transformer.ln_f.bias"])
        self.lm_head = linear(t["lm_head.weight"])  # [V, E], tied to wte in GPT-2
        self.layers = [
            _Layer(
                ln_1=(t[f"{h}.ln_1.weight"], t[f"{h}.ln_1.bias"]),
                attn=_conv1d(w, f"{h}.attn.c_attn"),
                proj=_conv1d(w, f"{h}.attn.c_proj", residual=True),
                ln_2=(t[f"{h}.ln_2.weight"], t[f"{h}.ln_2.bias"]),
                fc=_conv1d(w, f"{h}.mlp.c_fc", gelu_tanh=self.fused_gelu),
                out=_conv1d(w, f"{h}.mlp.c_proj", residual=True),
            )
            for h in (f"transformer.h.{i}" for i in range(cfg.n_layer))
        ]
        self.device = self.wte.device
        self.dtype = self.wte.dtype
        # The cache is in the weights' dtype, except bfloat16 weights on a CPU without AMX
        # (`cache_dtype`). A bf16 cache halves what attention reads; where SDPA's bf16 kernel is
        # fast (AMX) that is what pays.
        self.cache_dtype = cache_dtype(self.dtype, self.device)
        shape = (cfg.n_layer, max_batch_size, max_seq_len, cfg.n_head, self.head_dim)
        # Allocated and zeroed once, at start. Masked positions are still multiplied (by a
        # probability of 0), so every position a pass reads must hold a finite number; zeroing
        # it all up front also means a replica holds every byte it will use from its first
        # second. The cache used to be zeroed lazily, 64 positions at a time: resident memory
        # then crept up under load for minutes (+72 MiB of the +250 MiB a 24-writer load run
        # gained in its first 4 minutes, docs/performance.md), looked like a leak, and would
        # meet a container's memory limit at the busiest moment instead of at start. On a CPU
        # zeroing gpt2-small's 16 x 1024 positions (1.2 GB) adds well under a second to a start.
        self.k_cache = torch.zeros(shape, device=self.device, dtype=self.cache_dtype)
        self.v_cache = torch.zeros(shape, device=self.device, dtype=self.cache_dtype)
        # Decode rows attend through attention.py's loop where it serves this cache (on a CPU),
        # else through SDPA; compiled here, at start, not on the first request.
        self.fused_decode = fused_decode_serves(self.device, self.cache_dtype)
        # Prompt chunks attend by SDPA, whose bf16 kernel is slow on CPUs without AMX: there a
        # chunk's queries, keys and values go in as float32 (a 256-token chunk 2.3 ms a layer
        # against 3.1 on the EPYC; the copies are a few hundred positions each).
        slow_bf16 = self.device.type == "cpu" and self.cache_dtype == torch.bfloat16 and not cpu_has_amx()
        self.chunk_dtype = torch.float32 if slow_bf16 else self.cache_dtype
        # Every layer's matmuls have the same shapes: warming the first layer's builds them all.
        max_rows = max_rows or max_batch_size
        first = self.layers[0]
        for fn in (first.attn, first.proj, first.fc, first.out):
            warm_up(fn, max_rows)
        warm_up(self.lm_head, max_batch_size)  # logits: a row per sequence or chunk, each in a slot

    def _layer_norm(self, x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.layer_norm(x, (self.embed,), wb[0], wb[1], self.eps)

    def _mlp(self, x: torch.Tensor, layer: _Layer) -> torch.Tensor:
        h = layer.fc(self._layer_norm(x, layer.ln_2))
        return layer.out(h if self.fused_gelu else self.act(h), x)  # + x, inside the matmul

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self._layer_norm(x, self.ln_f)).float()

    @torch.inference_mode()
    def forward(self, decode_tokens: list[int], decode_positions: list[int],
                chunks: list[PromptChunk] = ()) -> torch.Tensor:
        """One pass over the whole batch: a new token for each sequence in slots 0..B-1 (its
        position is `decode_positions[b]`, the sequence's length so far) and any prompt chunks.

        Returns logits [rows, V]: the B decode rows, then each chunk's last position (every
        position of a chunk with `every_position`). All rows go through every weight matmul
        together (why: engine.py's docstring); only attention is per part.
        """
        B = len(decode_tokens)
        token_ids = list(decode_tokens)
        positions = list(decode_positions)
        for c in chunks:
            token_ids += c.token_ids
            positions += range(c.start, c.start + len(c.token_ids))
        tokens = torch.tensor(token_ids, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        x = self.wte[tokens] + self.wpe[pos]  # [rows, E]
        attend = [self._decode_attention(B, pos[:B])] if B else []
        last, offset = list(range(B)), B  # the rows that get logits
        for c in chunks:
            attend.append(self._chunk_attention(c, offset))
            last += range(offset, offset + len(c.token_ids)) if c.every_position else [offset + len(c.token_ids) - 1]
            offset += len(c.token_ids)
        for i, layer in enumerate(self.layers):
            qkv = layer.attn(self._layer_norm(x, layer.ln_1))
            a = attend[0](i, qkv) if len(attend) == 1 else torch.cat([f(i, qkv) for f in attend])
            x = layer.proj(a, x)  # x + a @ W + b
            x = self._mlp(x, layer)
        return self._logits(x[last])

    def _decode_attention(self, B: int, pos: torch.Tensor):
        """Attention of rows 0..B-1 (one query each, sequence b in slot b) over their caches."""
        if self.fused_decode:
            positions = pos.numpy()

            def attend_fused(i: int, qkv: torch.Tensor) -> torch.Tensor:
                a = decode_attention(qkv[:B], self.k_cache[i], self.v_cache[i], positions, self.scales[i])
                return a.to(self.dtype)

            return attend_fused
        L = int(pos.max()) + 1  # row b reads positions 0..L-1 of slot b, its own and beyond
        H, D = self.n_head, self.head_dim
        # Where row b's new keys go, as a row of the layer's cache seen as [slot * position, H,
        # D]: one `index_copy_` writes them all (the advanced-index assignment
        # `k_cache[i, rows, pos] = k` took 0.4 ms a layer at B=32, in the earlier layout).
        flat = torch.arange(B, device=self.device) * self.max_seq_len + pos
        # Each row attends to its own positions 0..pos[b]; the rest of the first L is masked
        # (an additive mask: 5-10% faster in SDPA than a boolean one).
        beyond = torch.arange(L, device=self.device)[None, :] > pos[:, None]
        mask = torch.zeros(B, 1, 1, L, device=self.device, dtype=self.cache_dtype)
        mask.masked_fill_(beyond[:, None, None, :], float("-inf"))

        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:
            q, k, v = (t.view(B, H, D).to(self.cache_dtype) for t in qkv[:B].split(self.embed, 1))
            self.k_cache[i].view(-1, H, D).index_copy_(0, flat, k)
            self.v_cache[i].view(-1, H, D).index_copy_(0, flat, v)
            # SDPA over the cache views (one query per sequence). On a 2-thread AMX Xeon, per
            # layer: float32 as fast as the two 4-d matmuls before it or faster (3.4 vs 3.4 ms at
            # B=64, L=200; 0.7 vs 1.1 at B=32, L=81); with a bf16 cache 1.9 ms at B=64, L=200.
            a = F.scaled_dot_product_attention(
                q[:, :, None], self.k_cache[i, :B, :L].transpose(1, 2), self.v_cache[i, :B, :L].transpose(1, 2),
                attn_mask=mask, scale=self.scales[i],
            )
            return a.view(B, self.embed).to(self.dtype)

        return attend

    def _chunk_attention(self, c: PromptChunk, offset: int):
        """Attention of a prompt chunk (rows offset..offset+T-1) over its slot's cache."""
        T, start, slot = len(c.token_ids), c.start, c.slot
        # Query j (position start+j) sees cached positions 0..start+j; for a first chunk that is
        # plain causal attention, which SDPA runs without a mask.
        mask = None
        if start:
            seen = torch.arange(start + T, device=self.device)[None, :]
            mask = seen <= start + torch.arange(T, device=self.device)[:, None]

        def attend(i: int, qkv: torch.Tensor) -> torch.Tensor:
            rows = qkv[offset : offset + T]
            q, k, v = (t.view(T, self.n_head, self.head_dim) for t in rows.split(self.embed, 1))
            self.k_cache[i, slot, start : start + T] = k
            self.v_cache[i, slot, start : start + T] = v
            # 4-d, [1, H, T, D]: PyTorch's CPU flash kernel takes only 4-d inputs and runs the
            # rest by its math path (a bmm, a softmax and masking passes over [H, T, T]).
            keys = self.k_cache[i, slot : slot + 1, : start + T].transpose(1, 2).to(self.chunk_dtype)
            values = self.v_cache[i, slot : slot + 1, : start + T].transpose(1, 2).to(self.chunk_dtype)
            a = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None].to(self.chunk_dtype), keys, values,
                attn_mask=mask, is_causal=mask is None, scale=self.scales[i],
            )
            return a[0].transpose(0, 1).reshape(T, self.embed).to(self.dtype)

        return attend

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` cached positions of one slot to another (n choices, packing,
        moving a half-prefilled prompt)."""
        self.k_cache[:, dst, :length] = self.k_cache[:, src, :length]
        self.v_cache[:, dst, :length] = self.v_cache[:, src, :length]

    def kv_cache_bytes(self) -> int:
        """Bytes of the KV cache: all of it resident from the start (zeroed at allocation)."""
        return 2 * self.k_cache.numel() * self.k_cache.element_size()
