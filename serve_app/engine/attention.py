"""Decode attention on a CPU: one query per sequence, over exactly its own cached positions.

A decode step gives each running sequence one new token. Per layer and head, its query is a
vector, and attention is two matrix-vector products over that sequence's cache. PyTorch's CPU
SDPA runs each (sequence, head) pair as a block with two small GEMM calls and their set-up,
and for one query that overhead costs more than reading the keys and values does. This loop
takes one sequence at a time, reads its keys and then its values once, front to back (the
cache is [slot, position, head, head_dim]: a sequence's cache is one run of memory), and writes
the step's new key and value into it in the same pass.

Measured on the 2-core AMD EPYC (AVX512-BF16, no AMX; 2 threads, 32 sequences, 12 heads of 64,
a different layer each call so that the cache is cold, as in a step), ms a layer: a bfloat16
cache 0.36 at contexts 16-80 and 1.10 at 16-383; float32 0.56 and 1.75. SDPA took 1.54 and 3.90
on float32 (and the loop before this one, per (sequence, head) over a [slot, head, position,
head_dim] cache, 0.62 and 1.45 on bf16: docs/engine.md). Each row reads its own length only, so
a short sequence beside a long one costs what it is, and a row's output does not depend on the
other rows. A bfloat16 cache is read as stored (a bf16 number is the top half of a float32), so
it reads half the bytes.

Since then the loop widens a bfloat16 in a register instead of writing each cached row to a
buffer and reading it back, and computes its softmax's exponentials in arithmetic LLVM
vectorises (`_exp`) instead of a libm call per score. On a 2-core Xeon with AMX (gpt2-small's
shape, bf16, 2 threads), per step inside the runner: 6.3-6.4 ms against 7.2-7.8 at 32 sequences
of 16-80 positions, 16.3-17.1 against 20.1 at 32 of 16-383, 32.5-33.5 against 38.4-40.4 at 64 of
16-383 (the whole step 71-72 ms against 80-83). Outputs moved by at most 2.4e-7.

numba compiles the loop with LLVM when a runner is built (no C compiler involved): 7-10 s on
a 2-core box, once per CPU and version of this file, after which every process that builds a
runner loads the machine code numba cached on disk (`_kernel`). It serves float32 and bfloat16
caches on a CPU; GPUs keep SDPA, and so does any machine where numba is missing or fails to
compile (docs/engine.md).
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
# torch keeps its own copy of libgomp. Binding both to one copy (loading the system's before
# torch) gave one pool of workers and about 3% on a decode burst, but numba turns nested
# parallelism on when it launches, and torch's regions then nested too: SDPA over a prompt chunk
# after 480 cached positions took 9 ms a layer instead of 0.6 (docs/performance.md).
_LAUNCH = threading.Lock()


try:
    import numba
    from numba import prange, types
    from numba.extending import intrinsic, overload
except ImportError:  # the runner keeps SDPA (fused_decode_serves)
    numba = None


def _float(x):
    """One cached element as float32. numba compiles one of `_float_for`'s bodies in its place,
    by the cache's element type."""
    raise NotImplementedError("compiled by numba only")


def _exp(x):
    """e**x for x <= 0, float32, in arithmetic LLVM can vectorise (compiled by numba only)."""
    raise NotImplementedError("compiled by numba only")


if numba is not None:

    @intrinsic
    def _bits_as_float32(typingctx, bits):
        """A 32-bit integer's bits read as a float32 (an LLVM bitcast: no instruction at all)."""
        if bits not in (types.int32, types.uint32):
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))

        return types.float32(bits), codegen

    @overload(_float, inline="always")
    def _float_for(x):
        if x == types.uint16:
            # A bfloat16 (seen as its bits) is the top half of a float32: widened in a register,
            # where the loop before this one wrote each row to a buffer and read it back.
            return lambda x: _bits_as_float32(np.uint32(np.uint32(x) << np.uint32(16)))
        return lambda x: x

    @overload(_exp, inline="always")
    def _exp_for(x):
        # x = n ln2 + r with |r| <= ln2/2; e**r by its Taylor series to r**6 (relative error
        # under 5e-7), 2**n by writing n into a float's exponent bits. np.exp is a call to libm
        # per score here (numba has no vector maths library without SVML), and it took a third
        # of this loop's time at 64 sequences of 16-383 positions.
        def exp(x):
            x = max(x, np.float32(-87.0))  # 2**n stays a normal float
            n = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
            r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)  # ln2 in two parts
            p = np.float32(1.0 / 720)
            p = p * r + np.float32(1.0 / 120)
            p = p * r + np.float32(1.0 / 24)
            p = p * r + np.float32(1.0 / 6)
            p = p * r + np.float32(0.5)
            p = p * r + np.float32(1.0)
            p = p * r + np.float32(1.0)
            return p * _bits_as_float32(np.int32(np.int32(n + np.float32(127.0)) << np.int32(23)))

        return exp


def _decode_attention(qkv, k_cache, v_cache, positions, scale, out):
    # qkv [B, 3*H*D]: queries, new keys, new values, head-major, in the cache's element type.
    # k_cache, v_cache [slots, max_len, H, D]. Sequence b is in slot b, its new token at
    # positions[b]. out [B, H*D] float32.
    B = qkv.shape[0]
    H, D = k_cache.shape[2], k_cache.shape[3]
    E = H * D
    for b in prange(B):
        p = positions[b]
        n = p + 1
        keys = k_cache[b]
        values = v_cache[b]
        for h in range(H):
            keys[p, h, :] = qkv[b, E + h * D : E + (h + 1) * D]
            values[p, h, :] = qkv[b, 2 * E + h * D : 2 * E + (h + 1) * D]
        q = np.empty(E, np.float32)
        for i in range(E):
            q[i] = _float(qkv[b, i]) * scale
        scores = np.empty((H, n), np.float32)
        for t in range(n):
            k = keys[t].ravel()  # every head's key at one position
            for h in range(H):
                s = np.float32(0.0)
                for d in range(D):
                    s += q[h * D + d] * _float(k[h * D + d])
                scores[h, t] = s
        for h in range(H):
            top = np.float32(-np.inf)
            for t in range(n):
                top = max(top, scores[h, t])
            total = np.float32(0.0)
            for t in range(n):
                w = _exp(scores[h, t] - top)
                scores[h, t] = w
                total += w
            inv = np.float32(1.0) / total
            for t in range(n):
                scores[h, t] *= inv
        acc = np.zeros(E, np.float32)
        for t in range(n):
            v = values[t].ravel()
            for h in range(H):
                w = scores[h, t]
                for d in range(D):
                    acc[h * D + d] += w * _float(v[h * D + d])
        out[b, :] = acc


@lru_cache(maxsize=1)
def _kernel():
    """The compiled loop (numba compiles it on first call, once per cache dtype: `_compiles`),
    or None where numba is missing."""
    if numba is None:
        return None
    # fastmath lets LLVM vectorise the dot products over the head dimension (it reorders the
    # sums: within 1e-6 of SDPA on unit-scale values); nogil lets the replica's event loop run
    # while a step is in here. cache: compiling takes 7-10 s on a 2-core box, in every replica
    # that starts, and numba keeps the machine code on disk (beside this file, or in the user's
    # cache where that is read-only), keyed by this file and the CPU it was compiled for.
    options = dict(parallel=True, fastmath=True, nogil=True)
    try:
        return numba.njit(cache=True, **options)(_decode_attention)
    except RuntimeError:  # no writable place for the cache: compile in every process
        log.info("numba has nowhere to cache the CPU decode attention; it compiles at each start")
        return numba.njit(**options)(_decode_attention)


@lru_cache(maxsize=2)
def _compiles(dtype: torch.dtype) -> bool:
    """Compile the loop for a cache of `dtype` now, on a toy case: a failure falls back to SDPA
    when the runner is built, not in the middle of a step."""
    if _kernel() is None:
        return False
    try:
        cache = torch.zeros(1, 2, 1, 2, dtype=dtype)  # [slots, max_len, H, D]
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

    `qkv` [B, 3*H*D] in any float dtype (read in the cache's: a float32 `qkv` over a bfloat16
    cache has its query rounded too), `k_cache` / `v_cache` one layer's [slots, max_len, H, D] in
    float32 or bfloat16, `positions` int64 [B]. Uses as many threads as torch does."""
    kernel = _kernel()
    qkv = qkv.to(k_cache.dtype).contiguous()  # as the step's matmul left it: no copy
    out = torch.empty(qkv.shape[0], qkv.shape[1] // 3)
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    with _LAUNCH:
        if numba.get_num_threads() != threads:
            numba.set_num_threads(threads)
        kernel(_as_numpy(qkv), _as_numpy(k_cache), _as_numpy(v_cache), positions, np.float32(scale), out.numpy())
    return out


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    """A view of `t` for numba (numpy has no bfloat16: its bits, as uint16)."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
