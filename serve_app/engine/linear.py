"""`x @ W.T + b` for the runner's weights, in the fastest form the device offers.

On a CPU, PyTorch's `addmm` calls MKL's sgemm, which packs the weight into its blocked layout on
every call. For the skinny inputs of a decode step that repacking dominates: a stack of
gpt2-small's 48 layer matmuls took 66 ms at 16 rows and 150 ms at 64, against 37 and 104 ms with
the weights packed once for oneDNN (2 threads on this 2-core EPYC; `bench/profile_step.py`).
oneDNN's packed matmul also gives a row the same bits whatever the other rows are, which keeps
a seeded request's text independent of the batch it shares.

The same packing serves bfloat16 weights, where oneDNN runs them on the CPU's bf16 units (AMX
or AVX512-BF16): on a Xeon with AMX (2 threads), gpt2-small's layer matmuls at 32 rows took
31 ms against 74 in float32, and the LM head 9 against 31 (docs/performance.md has the runs).

The oneDNN ops are the ones PyTorch's own compiler uses for frozen CPU linears
(`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`). They are internal, so they
are probed once against `F.linear`; anywhere they are missing or disagree, and on GPUs (where
cuBLAS needs no help), the plain `F.linear` is used.

oneDNN builds (JIT-compiles) a kernel for each input shape it meets and keeps it in its primitive
cache (1024 entries): about 0.8 MiB and a compile per new row count. A replica's row count is
its decode rows plus the prompt tokens of the step, nearly every number up to a few hundred, so
under varied traffic its memory crept up for minutes (+430 MiB in the first 4 minutes of a
24-writer load run, docs/performance.md). So rows are padded up to one of a few sizes (8 per
doubling, multiples of 8: at most 7 rows or 12.5% more, which cost little on a skinny matmul), and
`warm_up` builds every size a runner can meet when it starts.

oneDNN also applies a tanh GELU or a residual add to a matmul's output while it is still in
registers (`gelu_tanh=True`, `residual=True`), instead of a pass of its own over the result.
2 threads on a Xeon with AMX, 32 rows, bf16: gpt2-small's `c_fc` with its GELU 156 us against 254,
`c_proj` with the residual add 126 against 139. The GELU and the add then happen in float32
before the output is rounded to bf16: closer to float32's answer, not bit for bit the unfused one.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

Linear = Callable[..., torch.Tensor]  # x -> y, or (x, residual) -> y


def linear(weight: torch.Tensor, bias: torch.Tensor | None = None, *, gelu_tanh: bool = False,
           residual: bool = False) -> Linear:
    """A function `x -> x @ weight.T + bias` for `weight` [out, in] (nn.Linear's layout); with
    `gelu_tanh`, `x -> gelu(x @ weight.T + bias, approximate="tanh")`; with `residual`, a function
    `(x, r) -> x @ weight.T + bias + r`."""
    if gelu_tanh and residual:
        raise ValueError("one post-op at a time: oneDNN's residual add takes no activation here")
    if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and onednn_works(weight.dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
        op, act = torch.ops.mkldnn._linear_pointwise, ("gelu", [], "tanh") if gelu_tanh else ("none", [], "")

        def packed_linear(x: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
            rows = x.shape[0]
            padded = padded_rows(rows)
            if padded != rows and x.dim() == 2:
                x = F.pad(x, (0, 0, 0, padded - rows))
                r = None if r is None else F.pad(r, (0, 0, 0, padded - rows))
            if r is None:
                return op(x, packed, bias, *act)[:rows]
            return op.binary(x, r, packed, bias, "add")[:rows]

        packed_linear.input_like = weight.new_zeros(1, weight.shape[1])  # for warm_up
        packed_linear.residual_like = weight.new_zeros(1, weight.shape[0]) if residual else None
        return packed_linear

    def plain_linear(x: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        y = F.linear(x, weight, bias)
        if gelu_tanh:
            y = F.gelu(y, approximate="tanh")
        return y if r is None else y + r

    return plain_linear


def padded_rows(rows: int) -> int:
    """`rows` rounded up to a multiple of max(8, an eighth of the power of two below it)."""
    step = max(8, (1 << (max(rows, 1).bit_length() - 1)) // 8)
    return -(-rows // step) * step


def warm_up(fn: Linear, max_rows: int) -> None:
    """Build oneDNN's kernel for every padded row count up to `max_rows` now, so that neither the
    compile time nor the memory arrives later with traffic (no-op for the plain `F.linear`)."""
    like = getattr(fn, "input_like", None)
    if like is None:
        return
    residual = getattr(fn, "residual_like", None)
    rows = 1
    while rows <= max_rows:
        n = padded_rows(rows)
        fn(like.new_zeros(n, like.shape[1]), None if residual is None else residual.new_zeros(n, residual.shape[1]))
        rows = n + 1


def cpu_has_amx() -> bool:
    return _cpu_probe("_is_amx_tile_supported")


def cpu_has_bf16_units() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matmuls in hardware; elsewhere they are emulated, slower than float32."""
    return _cpu_probe("_is_avx512_bf16_supported") or cpu_has_amx()


def _cpu_probe(name: str) -> bool:
    return bool(getattr(torch.cpu, name, lambda: False)())  # private probes: absent in some builds


@lru_cache(maxsize=2)
def onednn_works(dtype: torch.dtype = torch.float32) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w, b, x = (torch.randn(*s, generator=g).to(dtype) for s in ((96, 64), (96,), (5, 64)))
        r = torch.randn(5, 96, generator=g).to(dtype)
        packed, op = torch.ops.mkldnn._reorder_linear_weight(w, None), torch.ops.mkldnn._linear_pointwise
        want = F.linear(x, w, b).float()
        tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16 keeps 8 bits of mantissa
        # The post-ops too (`linear`'s gelu_tanh and residual): a step must not be the first
        # to find that this build or CPU lacks one.
        pairs = [(op(x, packed, b, "none", [], ""), want),
                 (op(x, packed, b, "gelu", [], "tanh"), F.gelu(want, approximate="tanh")),
                 (op.binary(x, r, packed, b, "add"), want + r.float())]
        return all(torch.allclose(got.float(), ref, rtol=tol, atol=2 * tol) for got, ref in pairs)
    except Exception:  # an op renamed or missing in this build of torch
        return False
