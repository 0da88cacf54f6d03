"""Decode attention on a CPU: one query per sequence, over exactly its own cached positions.

A decode step gives each running sequence one new token. Per layer and head, its query is a
vector, and attention is two matrix-vector products over that sequence's cache. PyTorch's CPU
SDPA runs each (sequence, head) pair as a block with two small GEMM calls and their set-up,
and for one query that overhead costs more than reading the keys and values does. This loop
reads each key and value once, straight from the cache, and writes the step's new key and value
into it in the same pass (what two `index_copy_` calls and three casts did).

Measured on the 2-core AMD EPYC (AVX512-BF16, no AMX; 2 threads, 32 sequences, 12 heads of 64,
float32 cache, a different layer each call so that the cache is cold, as in a step): 0.65 ms a
layer against SDPA's 1.54 with contexts 16-80, 1.02 against 2.18 with 16-196 and 1.60 against
3.90 with 16-383 (docs/performance.md has the whole-step numbers). Each row reads its own length
only, so a short sequence beside a long one costs what it is, and a row's output does not depend
on the other rows.

A bfloat16 cache is read as stored (a bf16 number is the top half of a float32), so it reads
half the bytes: 0.69 ms a layer against 0.94 for float32 at contexts 16-80, 1.45 against 1.83 at
16-383.

numba compiles the loop with LLVM when a runner is built (about a second; no C compiler
involved). It serves float32 and bfloat16 caches on a CPU; GPUs keep SDPA, and so does any
machine where numba is missing or fails to compile (docs/engine.md).
"""
from __future__ import annotations

import logging
import threading
from functools import lru_cache

import numpy as np
import torch

log = logging.getLogger(__name__)
# numba runs a parallel loop on OpenMP (the system's libgomp) where it finds it, else on its own
# "workqueue" threads, which must not be entered by two threads at once: several engines in one
# process (tests, benchmarks) take turns here. A replica has one engine, so it never waits.
_LAUNCH = threading.Lock()


@lru_cache(maxsize=1)
def _kernel():
    """The loop (numba compiles it on first call, per cache dtype: `_compiles`), or None where
    numba is missing."""
    try:
        import numba
        from numba import njit, prange
    except ImportError:
        return None

    @njit(inline="always")
    def read_row(cached, widen, bits, row):
        """One cached key or value into `row` (float32), which `bits` (uint32) shares."""
        if widen:
            for d in range(bits.shape[0]):
                bits[d] = np.uint32(cached[d]) << 16
        else:
            for d in range(row.shape[0]):
                row[d] = cached[d]

    # fastmath lets LLVM vectorise the dot products over the head dimension (it reorders the
    # sums: within 1e-6 of SDPA on unit-scale values); nogil lets the replica's event loop run
    # while a step is in here.
    @njit(parallel=True, fastmath=True, nogil=True, cache=False)
    def decode_attention(q, kv, k_cache, v_cache, widen, positions, scale, out):
        # q [B, H*D] float32, head-major; kv [B, 2*H*D] the new keys then values, in the cache's
        # element type. k_cache, v_cache [slots, H, max_len, D]: float32, or bfloat16 seen as
        # uint16 (`widen`: a bfloat16 is the top half of a float32). Sequence b is in slot b, its
        # new token at positions[b]. out [B, H*D] float32.
        B = q.shape[0]
        H, D = k_cache.shape[1], k_cache.shape[3]
        E = H * D
        for bh in prange(B * H):
            b = bh // H
            h = bh - b * H
            p = positions[b]
            qh = q[b, h * D : (h + 1) * D]
            keys = k_cache[b, h]
            values = v_cache[b, h]
            keys[p, :] = kv[b, h * D : (h + 1) * D]
            values[p, :] = kv[b, E + h * D : E + (h + 1) * D]
            bits = np.empty(D, np.uint32)
            row = bits.view(np.float32)  # one cached key or value, as float32
            scores = np.empty(p + 1, np.float32)
            top = -np.inf
            for t in range(p + 1):
                read_row(keys[t], widen, bits, row)
                s = np.float32(0.0)
                for d in range(D):
                    s += qh[d] * row[d]
                s *= scale
                scores[t] = s
                top = max(top, s)
            total = np.float32(0.0)
            for t in range(p + 1):
                w = np.exp(scores[t] - top)
                scores[t] = w
                total += w
            o = out[b, h * D : (h + 1) * D]
            o[:] = 0.0
            for t in range(p + 1):
                read_row(values[t], widen, bits, row)
                w = scores[t]
                for d in range(D):
                    o[d] += w * row[d]
            o *= np.float32(1.0) / total

    return decode_attention, numba


@lru_cache(maxsize=2)
def _compiles(dtype: torch.dtype) -> bool:
    """Compile the loop for a cache of `dtype` now, on a toy case: a failure falls back to SDPA
    when the runner is built, not in the middle of a step."""
    if _kernel() is None:
        return False
    try:
        cache = torch.zeros(1, 1, 2, 2, dtype=dtype)
        decode_attention(torch.ones(1, 6), cache, cache.clone(), np.zeros(1, np.int64), 1.0)
    except Exception:  # noqa: BLE001 (numba's errors have no common base worth naming)
        log.warning("numba could not compile the CPU decode attention for %s; using SDPA", dtype, exc_info=True)
        return False
    return True


def fused_decode_serves(device: torch.device, cache_dtype: torch.dtype) -> bool:
    """Whether `decode_attention` serves a cache of `cache_dtype` on `device`: float32 or
    bfloat16 on a CPU, numba working."""
    return device.type == "cpu" and cache_dtype in (torch.float32, torch.bfloat16) and _compiles(cache_dtype)


def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     positions: np.ndarray, scale: float) -> torch.Tensor:
    """Write row b's new key and value at `positions[b]` of slot b, and return its attention over
    positions 0..positions[b]: [B, H*D] float32.

    `qkv` [B, 3*H*D] in any float dtype, `k_cache` / `v_cache` one layer's [slots, H, max_len, D]
    in float32 or bfloat16, `positions` int64 [B]. Uses as many threads as torch does."""
    kernel, numba = _kernel()
    E = qkv.shape[1] // 3
    q = qkv[:, :E].float().contiguous()
    kv = qkv[:, E:].to(k_cache.dtype).contiguous()
    out = torch.empty(qkv.shape[0], E)
    with _LAUNCH:
        numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
        kernel(q.numpy(), _as_numpy(kv), _as_numpy(k_cache), _as_numpy(v_cache),
               k_cache.dtype == torch.bfloat16, positions, np.float32(scale), out.numpy())
    return out


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A view of `t` for numba (numpy has no bfloat16: its bits, as uint16)."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
