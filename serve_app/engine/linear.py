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
"""
from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F

Linear = Callable[[torch.Tensor], torch.Tensor]


def linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
    """A function `x -> x @ weight.T + bias` for `weight` [out, in] (nn.Linear's layout)."""
    if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and _onednn_works(weight.dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return lambda x: F.linear(x, weight, bias)


@lru_cache(maxsize=2)
def _onednn_works(dtype: torch.dtype = torch.float32) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w, b, x = (torch.randn(*s, generator=g).to(dtype) for s in ((96, 64), (96,), (5, 64)))
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16 keeps 8 bits of mantissa
        return bool(torch.allclose(y.float(), F.linear(x, w, b).float(), rtol=tol, atol=tol))
    except Exception:  # an op renamed or missing in this build of torch
        return False
