"""Where one step of our GPT-2 runner spends its time: the numbers behind docs/performance.md.

    python -m bench.profile_step --size medium --threads 1 --batches 1,8,32,64
    python -m bench.profile_step --size small --threads 2 --dtype bfloat16 --batches 32,64

For each batch size: a decode step with contexts drawn like `bench.engine`'s workload (prompt
16-256 plus 0-127 generated tokens), the same step with every row at the mean context (what
attending up to the longest row costs), with --chunk the same step with a prompt chunk in the
pass, and at batches 8 and 64 the top ops of `torch.profiler` (of the pass with the chunk, if
one is asked for). Then one-prompt prefills, and with --kernels the model's weight matmuls run by
MKL's `addmm` (Conv1D's layout, and nn.Linear's) against oneDNN with weights packed once
(`serve_app/engine/linear.py`). The kernels are timed over every layer's weights in turn, as a
step reads them, not on one matrix that stays in cache.
Random weights: the time per step does not depend on what the weights say.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from serve_app.config import set_torch_env


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
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the weights' dtype (the KV cache's: serve_app/engine/gpt2.py cache_dtype)")
    p.add_argument("--profile-at", default="8,64", help="batch sizes that also get a torch.profiler table")
    p.add_argument("--chunk", type=int, default=0,
                   help="also time each batch's step with a prompt chunk of this many tokens in the same pass")
    p.add_argument("--kernels", action="store_true",
                   help="also time a whole stack of layer matmuls, and the LM head, with each CPU kernel")
    args = p.parse_args(argv)
    set_torch_env()  # before torch loads, and inherited by the children: as `quill serve` runs

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
    model = model.to(getattr(torch, args.dtype))
    batches = [int(b) for b in args.batches.split(",")]
    runner = GPT2Runner(model, max(batches) + 1, 512)
    rng = random.Random(0)
    profile_at = {int(b) for b in args.profile_at.split(",") if b}
    print(f"{args.size}, {args.dtype}, {args.threads} thread(s), torch {torch.__version__}")

    for B in batches:
        pos = [rng.randint(16, 256) + rng.randint(0, 127) for _ in range(B)]
        mean = [sum(pos) // B] * B
        ragged = _median_ms(lambda: runner.forward([5] * B, pos))
        uniform = _median_ms(lambda: runner.forward([5] * B, mean))
        print(f"decode B={B:2d}: {ragged:7.1f} ms (contexts mean {sum(pos) / B:.0f}, max {max(pos)}); "
              f"{uniform:7.1f} ms with every row at the mean context")
        chunks = [PromptChunk(B, 0, list(range(args.chunk)))] if args.chunk else []
        if chunks:
            mixed = _median_ms(lambda: runner.forward([5] * B, pos, chunks), reps=3)
            print(f"    with a {args.chunk}-token prompt chunk in the same pass: {mixed:7.1f} ms")
        if B in profile_at:
            steps = 3
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    runner.forward([5] * B, pos, chunks)
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]:
                print(f"    {e.key:28s} {e.self_cpu_time_total / steps / 1e3:8.1f} ms/step "
                      f"({e.count // steps} calls/step)")

    E, n_layer = shape["n_embd"], shape["n_layer"]
    for T in (64, 256, 512):
        ms = _median_ms(lambda: runner.forward([], [], [PromptChunk(0, 0, list(range(T)))]), reps=3)
        flops = T * 2 * 12 * E * E * n_layer + 2 * VOCAB * E  # logits of the last position only
        print(f"prefill of one {T}-token prompt: {ms:7.1f} ms ({flops / ms / 1e6:.1f} GFLOP/s)")

    if args.kernels:
        _compare_kernels(shape, VOCAB, torch, F)
    return 0


def _compare_kernels(shape: dict, vocab: int, torch, F) -> None:
    from serve_app.engine.linear import linear

    E, n_layer = shape["n_embd"], shape["n_layer"]
    fans = [(E, 3 * E), (E, E), (E, 4 * E), (4 * E, E)]
    weights = [[(torch.randn(i, o) * 0.02, torch.zeros(o)) for i, o in fans] for _ in range(n_layer)]
    kernels = {
        "addmm x @ W[in,out]": [[(lambda x, w=w, b=b: torch.addmm(b, x, w)) for w, b in layer] for layer in weights],
        "F.linear W[out,in]": [[(lambda x, w=w.t().contiguous(), b=b: F.linear(x, w, b)) for w, b in layer]
                               for layer in weights],
        "oneDNN packed": [[linear(w.t().contiguous(), b) for w, b in layer] for layer in weights],
    }
    head = torch.randn(vocab, E) * 0.02
    heads = {"addmm x @ W[in,out]": lambda x, w=head.t().contiguous(): x @ w,
             "F.linear W[out,in]": lambda x: F.linear(x, head), "oneDNN packed": linear(head)}
    print("layer matmuls of every layer, in turn | LM head (ms, median)")
    for rows in (1, 8, 16, 32, 64, 256):
        xs = {n: torch.randn(rows, n) for n in (E, 4 * E)}
        cells = []
        for name, layers in kernels.items():
            def stack(layers=layers):
                for layer in layers:
                    for (fan_in, _), f in zip(fans, layer):
                        f(xs[fan_in])
            cells.append(f"{name} {_median_ms(stack):6.1f} | {_median_ms(lambda: heads[name](xs[E])):5.1f}")
        print(f"rows {rows:3d}: " + "; ".join(cells))


if __name__ == "__main__":
    raise SystemExit(main())
