"""What the machine can do at best, and what a model costs per token.

The limits are measured, not taken from a datasheet: on a shared 2-core VM the datasheet is
fiction, and a ratio to a measured limit says how much is left to win.

- matmul rate: fp32 `A @ B` on square matrices with the benchmark's thread count.
- memory bandwidth: a large tensor copy, counting the bytes read plus the bytes written.

A model's costs, per token, counting only the weight matmuls (attention over the context adds
4 * n_layer * context * n_embd FLOPs, about 3% for gpt2-small at 200 tokens of context):
- FLOPs per token = 2 * (weights used in matmuls, the tied embedding as the LM head included);
- bytes per decode step = every weight read once, whatever the batch size.
So a decode step cannot beat `bytes / bandwidth` (the batch-1 floor), and no schedule can
produce more than `matmul rate / FLOPs per token` tokens per second (the compute limit).
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import time


def machine_info() -> dict:
    """The facts a reader needs to compare a table with their own machine."""
    import torch
    import transformers

    model_name = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    mem_gib = 0.0
    try:
        with open("/proc/meminfo") as f:
            mem_gib = int(f.readline().split()[1]) / 2**20
    except OSError:
        pass
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model_name,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def measure_limits(threads: int, quick: bool = False, dtype: str = "float32") -> dict:
    """Median of a few repetitions of a matmul (in `dtype`, the weights' dtype of the run: a
    bf16 run is held to the bf16 rate) and of a big copy, with `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    n = 1024 if quick else 2048
    reps = 3 if quick else 7
    a, b = torch.randn(n, n).to(getattr(torch, dtype)), torch.randn(n, n).to(getattr(torch, dtype))
    a @ b  # first call pays for thread start-up and page faults
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    gflops = 2 * n**3 / statistics.median(times) / 1e9

    # Larger than any cache by far (L3 is 32 MiB here); written once first so the timed copies
    # do not pay for page faults.
    numel = (2**26 if quick else 2**28)  # 256 MiB or 1 GiB of fp32
    src = torch.ones(numel)
    dst = torch.empty(numel)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    copy_gbs = 2 * numel * 4 / statistics.median(times) / 1e9
    return {
        "threads": threads,
        "matmul_dtype": dtype,
        "matmul_n": n,
        "matmul_gflops": round(gflops, 1),
        "copy_bytes": numel * 4,
        "copy_gbs_read_plus_write": round(copy_gbs, 2),
    }


def model_costs(n_layer: int, n_embd: int, vocab_size: int, n_positions: int, dtype: str = "float32") -> dict:
    """Parameters, bytes read per decode step (weights in `dtype`) and FLOPs per token of a GPT-2 shape."""
    per_layer_matmul = 12 * n_embd * n_embd  # qkv 3E^2, proj E^2, fc 4E^2, out 4E^2
    per_layer_small = 13 * n_embd  # biases (3E + E + 4E + E) and two layer norms (4E)
    matmul_params = n_layer * per_layer_matmul + vocab_size * n_embd  # + the tied LM head
    params = matmul_params + n_layer * per_layer_small + n_positions * n_embd + 2 * n_embd
    return {
        "params": params,
        # A decode step reads every weight once; of the position table only a few rows.
        "bytes_per_decode_step": (2 if dtype in ("bfloat16", "float16") else 4) * (params - n_positions * n_embd),
        "flops_per_token": 2 * matmul_params,
    }


def limits_for(costs: dict, limits: dict) -> dict:
    """The two ceilings for one model on this machine, in tokens per second."""
    return {
        "batch1_floor_ms": round(costs["bytes_per_decode_step"] / (limits["copy_gbs_read_plus_write"] * 1e9) * 1e3, 1),
        "batch1_max_tok_s": round(limits["copy_gbs_read_plus_write"] * 1e9 / costs["bytes_per_decode_step"], 1),
        "compute_max_tok_s": round(limits["matmul_gflops"] * 1e9 / costs["flops_per_token"], 1),
    }
