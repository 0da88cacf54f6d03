"""Where one step of our GPT-2 runner spends its time: the numbers behind docs/performance.md.

    python -m bench.profile_step --size medium --threads 1 --batches 1,8,32,64

For each batch size: a decode step with contexts drawn like `bench.engine`'s workload (prompt
16-256 plus 0-127 generated tokens), the same step with every row at the mean context (what
attending up to the longest row costs), and at batches 8 and 64 the top ops of
`torch.profiler`. Then one-prompt prefills, and with --layouts the two weight layouts of a
skinny matmul (Conv1D's `x @ W[in, out]` against nn.Linear's `x @ W[out, in].T`).
Random weights: the time per step does not depend on what the weights say.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time


def _median_ms(fn, reps: int = 5) -> float:
    fn()  # warm: allocator, thread pool
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("tiny", "small", "medium"), default="small")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--profile-at", default="8,64", help="batch sizes that also get a torch.profiler table")
    p.add_argument("--layouts", action="store_true", help="also time the two weight layouts of each matmul")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile
    from transformers import GPT2Config, GPT2LMHeadModel

    from bench.engine import MODELS, N_POSITIONS, VOCAB
    from serve_app.engine.gpt2 import GPT2Runner, PromptChunk

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = MODELS[args.size]
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=N_POSITIONS, **shape)).eval()
    batches = [int(b) for b in args.batches.split(",")]
    runner = GPT2Runner(model, max(batches), 512)
    rng = random.Random(0)
    profile_at = {int(b) for b in args.profile_at.split(",") if b}
    print(f"{args.size}, {args.threads} thread(s), torch {torch.__version__}")

    for B in batches:
        pos = [rng.randint(16, 256) + rng.randint(0, 127) for _ in range(B)]
        mean = [sum(pos) // B] * B
        ragged = _median_ms(lambda: runner.forward([5] * B, pos))
        uniform = _median_ms(lambda: runner.forward([5] * B, mean))
        print(f"decode B={B:2d}: {ragged:7.1f} ms (contexts mean {sum(pos) / B:.0f}, max {max(pos)}); "
              f"{uniform:7.1f} ms with every row at the mean context")
        if B in profile_at:
            steps = 3
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    runner.forward([5] * B, pos)
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]:
                print(f"    {e.key:28s} {e.self_cpu_time_total / steps / 1e3:8.1f} ms/step "
                      f"({e.count // steps} calls/step)")

    E, n_layer = shape["n_embd"], shape["n_layer"]
    for T in (64, 256, 512):
        ms = _median_ms(lambda: runner.forward([], [], [PromptChunk(0, 0, list(range(T)))]), reps=3)
        flops = T * 2 * 12 * E * E * n_layer + 2 * VOCAB * E  # logits of the last position only
        print(f"prefill of one {T}-token prompt: {ms:7.1f} ms ({flops / ms / 1e6:.1f} GFLOP/s)")

    if args.layouts:
        for fan_in, fan_out in ((E, 3 * E), (E, E), (E, 4 * E), (4 * E, E), (E, VOCAB)):
            w_in_out = torch.randn(fan_in, fan_out) * 0.02
            w_out_in = w_in_out.t().contiguous()
            bias = torch.zeros(fan_out)
            for B in (1, 8, 64):
                x = torch.randn(B, fan_in)
                a = _median_ms(lambda: torch.addmm(bias, x, w_in_out), reps=9)
                b = _median_ms(lambda: F.linear(x, w_out_in, bias), reps=9)
                print(f"[{fan_in}x{fan_out}] B={B:2d}: x @ W[in,out] {a:6.2f} ms | F.linear W[out,in] {b:6.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
