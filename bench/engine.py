"""Quill's engine against transformers, on the same model and the same workload, in one run.

    quill bench engine [--models small,medium] [--requests 64] [--threads 2] [--quick]
                       [--peers generate-serial,generate-static,hf-continuous] [--out docs/performance.md]
    python -m bench.engine --quick

What one run does:
1. measures the machine's limits (fp32 matmul rate, copy bandwidth) with the thread count used;
2. for each model size, saves one random-weight GPT-2 checkpoint and draws one seeded workload:
   requests arriving as a Poisson process, prompts of random token ids (uniform lengths),
   max_tokens uniform, greedy decoding;
3. replays that workload on each system in turn (bench/systems.py), each in a fresh child
   process (multiprocessing "spawn") so that its peak memory (VmHWM) is its own;
4. writes a section of docs/performance.md (between markers, so a re-run replaces it) and the
   raw numbers as JSON under bench/results/.

Metrics per system, all latencies from the request's scheduled arrival:
- tokens/s: output tokens of all requests / (last completion - first arrival);
- TTFT: first token - arrival (p50, p99 over requests);
- TPOT: (finish - first token) / (tokens - 1), per request (p50, p99 over requests);
- peak RSS: the child's VmHWM, reset just before the replay (so: model + serving working set).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

from serve_app.config import TORCH_ENV, set_torch_env

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "models" / "gpt2-tokenizer"
DEFAULT_OUT = REPO / "docs" / "performance.md"
RESULTS_DIR = REPO / "bench" / "results"

# Random weights are enough to measure speed: the arithmetic per token does not depend on
# what the weights say. "tiny" exists for the smoke test.
MODELS = {
    "tiny": dict(n_layer=2, n_embd=64, n_head=4),
    "small": dict(n_layer=12, n_embd=768, n_head=12),  # gpt2 (124M)
    "medium": dict(n_layer=24, n_embd=1024, n_head=16),  # gpt2-medium (355M)
}
VOCAB, N_POSITIONS, EOS = 50257, 1024, 50256

# Mean arrival rates (requests/s). Fast enough that every system is loaded the whole time
# (the prompts alone are ~2x the output tokens, so even our engine needs minutes on this box
# while the arrivals span ~30 s for small and ~85 s for medium), and slow enough that requests
# really do arrive while others decode. Note tokens/s can never exceed what arrives
# (~145 tok/s for small, ~55 for medium): keep the rate above what the systems can serve.
# The same seeded gaps are scaled by 1/rate for every model.
DEFAULT_RATES = {"tiny": 40.0, "small": 2.0, "medium": 0.75}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from bench.systems import OURS, SYSTEMS

    p = argparse.ArgumentParser(prog="quill bench engine", description=__doc__.split("\n")[0])
    p.add_argument("--models", default=None, help="comma list of tiny,small,medium (default small,medium; "
                   "--quick: small)")
    p.add_argument("--requests", type=int, default=None, help="requests per model (default 64; --quick: 8)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, the same for every system")
    p.add_argument("--peers", default=",".join(s for s in SYSTEMS if s != OURS),
                   help=f"comma list of peers to measure beside {OURS}: {', '.join(SYSTEMS[1:])}")
    p.add_argument("--rate", type=float, default=None, help="mean arrivals per second (default per model: "
                   + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_RATES.items()) + ")")
    p.add_argument("--prompt-tokens", default=None, help="min-max prompt length (default 16-256; --quick: 16-32)")
    p.add_argument("--max-tokens", default=None, help="min-max of max_tokens (default 16-128; --quick: 4-16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the workload and of the random weights")
    p.add_argument("--burst", action="store_true",
                   help="every request arrives at once: the systems are saturated, so tokens/s measures them "
                   "and not the trace (the Poisson trace, the default, is for latency); section suffix :burst")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the weights' dtype in every system (bfloat16: fast on CPUs with AMX or AVX512-BF16)")
    p.add_argument("--serial-cap", default="", help="run the one-at-a-time peer on the first K requests only: "
                   "'K' for every model or 'medium=K,small=K'")
    p.add_argument("--max-batch-size", type=int, default=64, help="our engine's batch, the static batch and "
                   "transformers' requests per step")
    p.add_argument("--prefill-budget", type=int, default=256,
                   help="our engine's max_prefill_tokens: prompt tokens prefilled per step (long prompts are chunked)")
    p.add_argument("--hf-max-batch-tokens", type=int, default=None,
                   help="tokens per step of transformers' continuous batching (default: its own)")
    p.add_argument("--isolation", choices=("process", "inline"), default="process",
                   help="process: each system in a fresh spawned child (own peak memory); inline: all in "
                   "this process (faster, for tests; the peak memory column is then process-wide)")
    p.add_argument("--system-timeout", type=float, default=1800.0, help="seconds before a system is given up")
    p.add_argument("--conditions", default="shared machine; other processes may run beside the benchmark "
                   "(see the load average).", help="what else ran on the machine, written into the report")
    p.add_argument("--section", default="", help="name of this run's section in --out (a run of another "
                   "model set can sit beside the main one): markers bench:engine:cpu[:SECTION]")
    p.add_argument("--note", default="", help="a remark printed under the section's title")
    p.add_argument("--render-only", default=None, metavar="JSON",
                   help="measure nothing: rewrite the --out section from a results file of an earlier run")
    p.add_argument("--quick", action="store_true", help="a small workload for a smoke check (< 2 minutes)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file whose section is (re)written")
    p.add_argument("--json", default=None, help="raw results (default bench/results/engine-cpu[-quick].json)")
    args = p.parse_args(argv)

    args.models = [m for m in (args.models or ("small" if args.quick else "small,medium")).split(",") if m]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    args.peers = [s for s in args.peers.split(",") if s]
    for s in args.peers:
        if s not in SYSTEMS or s == OURS:
            p.error(f"unknown peer {s!r}; choose from {', '.join(SYSTEMS[1:])}")
    args.requests = args.requests or (8 if args.quick else 64)
    args.prompt_tokens = _range(args.prompt_tokens or ("16-32" if args.quick else "16-256"), p)
    args.max_tokens = _range(args.max_tokens or ("4-16" if args.quick else "16-128"), p)
    args.serial_cap = _caps(args.serial_cap, p)
    if args.burst and not args.section:
        args.section = "burst" + ("" if args.dtype == "float32" else f"-{args.dtype}")
    suffix = ("-quick" if args.quick else "") + (f"-{args.section}" if args.section else "")
    args.json = args.json or str(RESULTS_DIR / f"engine-cpu{suffix}.json")
    return args


def _range(text: str, p: argparse.ArgumentParser) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        p.error(f"expected MIN-MAX, got {text!r}")
    if not 1 <= lo <= hi:
        p.error(f"expected 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def _caps(text: str, p: argparse.ArgumentParser) -> dict[str, int]:
    if not text:
        return {}
    if text.isdigit():
        return {m: int(text) for m in MODELS}
    try:
        return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        p.error(f"--serial-cap: expected K or model=K,..., got {text!r}")


# ---- workload -------------------------------------------------------------------------------


def make_workload(n: int, rate: float, prompt_tokens: tuple[int, int], max_tokens: tuple[int, int],
                  seed: int) -> list[dict]:
    """n requests: Poisson arrivals (the first at t=0), random prompts, uniform max_tokens.

    The draws depend only on the seed; the rate only scales the gaps, so every model sees the
    same prompts and lengths, and every system of a model sees the identical list.
    """
    rng = random.Random(seed)
    gaps = [0.0] + [rng.expovariate(1.0) for _ in range(n - 1)]
    workload, t = [], 0.0
    for i in range(n):
        t += gaps[i] / rate
        length = rng.randint(*prompt_tokens)
        workload.append({
            "id": f"r{i:03d}",
            "arrival_s": round(t, 4),
            # Any id but EOS, so no prompt carries a document break in the middle.
            "prompt": [rng.randrange(EOS) for _ in range(length)],
            "max_tokens": rng.randint(*max_tokens),
        })
    return workload


def make_checkpoint(size: str, folder: Path, seed: int) -> Path:
    """A random-weight GPT-2 of the named shape with GPT-2's real tokenizer, as safetensors."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=N_POSITIONS, **MODELS[size])
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(folder)
    del model
    return folder


# ---- running the systems --------------------------------------------------------------------


def engine_version() -> str:
    """The commit of serve_app/engine, and whether the working tree differs from it: the engine
    is loaded from disk when its child starts, so a run beside ongoing work must say which."""
    import subprocess

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("log", "-1", "--format=%h", "--", "serve_app/engine") or "unknown"
    dirty = git("status", "--porcelain", "--", "serve_app/engine")
    return f"{commit}{' + uncommitted changes' if dirty else ''}"


def run_one(system: str, checkpoint: Path, workload: list[dict], settings: dict, isolation: str,
            timeout: float) -> dict:
    from bench.systems import child_main, run_system

    if isolation == "inline":
        import torch

        threads = torch.get_num_threads()  # put back afterwards: the caller may be a test run
        try:
            return run_system(system, str(checkpoint), workload, settings)
        except Exception as exc:  # one broken peer must not lose the others' numbers
            return {"system": system, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            torch.set_num_threads(threads)

    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter: no torch state or memory carried over
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=child_main, args=(system, str(checkpoint), workload, settings, send),
                        name=f"bench-{system}")
    child.start()
    send.close()
    try:
        if receive.poll(timeout):
            result = receive.recv()
        else:
            result = {"system": system, "error": f"gave up after {timeout:.0f} s"}
    except EOFError:
        result = {"system": system, "error": f"the child process died (exit code {child.exitcode})"}
    finally:
        child.join(10)
        if child.is_alive():
            child.terminate()
            child.join()
    return result


# ---- statistics -----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(result: dict) -> dict:
    """One table row from a system's per-request records."""
    if "error" in result:
        return {"system": result["system"], "error": result["error"]}
    recs = result["records"]
    done = [r for r in recs if r.get("finish") is not None and r.get("first") is not None]
    tokens = sum(r["tokens"] for r in done)
    prompt_tokens = sum(r["prompt_tokens"] for r in done)
    wall = max(r["finish"] for r in done) - min(r["arrival"] for r in recs) if done else 0.0
    ttft = [r["first"] - r["arrival"] for r in done]
    tpot = [(r["finish"] - r["first"]) / (r["tokens"] - 1) for r in done if r["tokens"] >= 2]
    return {
        "system": result["system"],
        "requests": len(recs),
        "completed": len(done),
        "output_tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "eos_stops": sum(1 for r in done if r.get("finish_reason") == "stop"),
        "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 2) if wall > 0 else 0.0,
        "ttft_p50_s": _round(percentile(ttft, 50)),
        "ttft_p99_s": _round(percentile(ttft, 99)),
        "tpot_p50_ms": _round(percentile(tpot, 50), 1000),
        "tpot_p99_ms": _round(percentile(tpot, 99), 1000),
        "peak_rss_mib": result.get("peak_rss_mib"),
        "threads": result.get("threads"),
        "phase_s": result.get("phase_s"),
        **_steps(result, done, tokens + prompt_tokens - len(done)),
    }


def _steps(result: dict, done: list[dict], rows: int) -> dict:
    """Our engine's steps: how many, their mean time, the rows a pass carried on average
    (decode rows and prompt tokens: a request's first token comes from its prompt's pass), and
    the keys and values its decode rows read on average: a request of P prompt and T output
    tokens attends over P + 1, ..., P + T - 1 cached positions in its T - 1 decode steps."""
    if not result.get("steps"):
        return {}
    positions = sum((r["tokens"] - 1) * r["prompt_tokens"] + r["tokens"] * (r["tokens"] - 1) // 2
                    for r in done if r["tokens"] >= 1)
    return {"steps": result["steps"], "mean_step_ms": round(result["step_s"] / result["steps"] * 1e3, 2),
            "rows_per_step": round(rows / result["steps"], 1),
            "kv_bytes_per_step": round(positions * result["kv_bytes_per_position"] / result["steps"])}


def _round(x: float | None, scale: float = 1.0) -> float | None:
    return None if x is None else round(x * scale, 4 if scale == 1.0 else 1)


def add_ratios(rows: list[dict], ours: str) -> None:
    """Quill's tokens/s over each row's, and each row's p50 TTFT over Quill's (> 1: Quill better)."""
    base = next((r for r in rows if r["system"] == ours and "error" not in r), None)
    for r in rows:
        if base is None or "error" in r:
            continue
        r["quill_speedup"] = round(base["tok_s"] / r["tok_s"], 2) if r["tok_s"] else None
        r["ttft_p50_vs_quill"] = (round(r["ttft_p50_s"] / base["ttft_p50_s"], 2)
                                  if r["ttft_p50_s"] is not None and base["ttft_p50_s"] else None)


# ---- the report -----------------------------------------------------------------------------


def render(report: dict) -> str:
    from bench.systems import DESCRIPTIONS, OURS, SERIAL

    m, lim, wl = report["machine"], report["limits"], report["workload"]
    lines = [
        f"### Engine vs transformers, CPU ({report['mode']}: {', '.join(report['models']) or 'no model yet'})",
        "",
        *([f"*{report['note']}*", ""] if report.get("note") else []),
        f"Command: `{_short_command(report['command'])}`  ",
        f"Date: {m['date_utc']}; run took {report.get('run_minutes', '?')} min.  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, no GPU; load average at start "
        f"{', '.join(str(x) for x in m['load_average_at_start'])}.  ",
        f"Versions: Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}.  ",
        f"Threads: {report['settings']['threads']} torch thread(s) in every system; "
        f"{_env_settings(report['env'])}.  ",
        f"Conditions: {report['conditions']}",
        "",
        f"Workload (seed {wl['seed']}, identical for every system of a model): {wl['requests']} requests, "
        f"{'all arriving at once (a burst: every system saturated)' if wl.get('burst') else 'Poisson arrivals'}, "
        f"weights in {report['settings'].get('dtype', 'float32')}, prompts of {wl['prompt_tokens'][0]}-{wl['prompt_tokens'][1]} random token ids "
        f"(uniform), max_tokens {wl['max_tokens'][0]}-{wl['max_tokens'][1]} (uniform), greedy. "
        f"Our engine: max_batch_size {report['settings']['max_batch_size']}, max_seq_len "
        f"{report['settings']['max_seq_len']}, max_prefill_tokens {report['settings'].get('max_prefill_tokens', 512)}; the static batch takes up to the same number of arrived requests; "
        f"transformers' continuous batching gets a paged cache of the same size.",
        "",
        f"Machine limits ({lim['threads']} thread(s)): {lim.get('matmul_dtype', 'float32')} matmul {lim['matmul_gflops']} GFLOP/s "
        f"({lim['matmul_n']}x{lim['matmul_n']} @ {lim['matmul_n']}x{lim['matmul_n']}, median); copy "
        f"{lim['copy_gbs_read_plus_write']} GB/s ({lim['copy_bytes'] / 2**20:.0f} MiB, read + write counted).",
        "",
        "Systems: " + "; ".join(f"`{k}` = {v}" for k, v in DESCRIPTIONS.items()) + ".",
        "",
    ]
    for name, mr in report["models"].items():
        w, c, f = mr["workload"], mr["costs"], mr["floors"]
        lines += [
            f"#### {name} ({c['params'] / 1e6:.0f}M parameters, random weights)",
            "",
            (f"Arrivals: all at t=0; " if report["workload"].get("burst") else
             f"Arrivals: {w['rate_per_s']:g} requests/s on average, spanning {w['arrival_span_s']:.1f} s; ") +
            f"{w['output_tokens_asked']} output tokens asked for, {w['prompt_tokens']} prompt tokens.",
        ]
        if mr.get("serial_cap"):
            lines.append(
                f"`{SERIAL}` ran the first {mr['serial_cap']} requests only (to keep the run short); its "
                "numbers are over those requests, whose arrivals span less time, so its TTFT is optimistic "
                "(less queueing than the full workload would build)."
            )
        lines += [
            "",
            "| system | requests done | output tokens | tokens/s | TTFT p50 (s) | TTFT p99 (s) | TPOT p50 (ms) "
            "| TPOT p99 (ms) | peak RSS (MiB) | Quill tokens/s ÷ this | this TTFT p50 ÷ Quill's |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in mr["rows"]:
            if "error" in r:
                lines.append(f"| `{r['system']}` | failed: {r['error'][:120]} |" + " |" * 9)
                continue
            lines.append(
                f"| `{r['system']}` | {r['completed']}/{r['requests']} | {r['output_tokens']} | {r['tok_s']:.1f} "
                f"| {_fmt(r['ttft_p50_s'], 2)} | {_fmt(r['ttft_p99_s'], 2)} | {_fmt(r['tpot_p50_ms'], 1)} "
                f"| {_fmt(r['tpot_p99_ms'], 1)} | {_fmt(r['peak_rss_mib'], 0)} | {_fmt(r.get('quill_speedup'), 2)} "
                f"| {_fmt(r.get('ttft_p50_vs_quill'), 2)} |"
            )
        ours = next((r for r in mr["rows"] if r["system"] == OURS and "error" not in r), None)
        lines += [
            "",
            f"Limits for this model: {c['bytes_per_decode_step'] / 1e6:.0f} MB of weights read per decode step "
            f"→ at least {f['batch1_floor_ms']} ms per step, at most {f['batch1_max_tok_s']} tokens/s at batch 1; "
            f"{c['flops_per_token'] / 1e9:.2f} GFLOP per token → at most {f['compute_max_tok_s']} tokens/s "
            "at any batch (output and prompt tokens cost the same).",
        ]
        if mr.get("engine_version"):
            lines.append(f"Quill engine as measured: serve_app/engine at {mr['engine_version']}.")
        if ours:
            lines.append(
                f"Quill reached {mr['quill_fraction_of_compute']:.0%} of the compute limit counting output tokens "
                f"only, {mr['quill_fraction_of_compute_with_prompts']:.0%} counting the prompt tokens it "
                "prefilled too."
            )
        if ours and mr.get("roofline_step_ms"):
            lines.append(
                f"Quill's steps: {ours['steps']}, {ours['rows_per_step']} rows a pass on average (decode rows "
                f"and prompt tokens), {ours['mean_step_ms']} ms each. A pass that size can take no less than "
                f"{mr['roofline_step_ms']} ms, the longer of reading the weights and its decode rows' cached keys "
                f"and values ({ours['kv_bytes_per_step'] / 1e6:.0f} MB a step on average) at the copy rate "
                f"and its arithmetic at the matmul rate: Quill's steps ran at "
                f"{mr['quill_fraction_of_roofline']:.0%} of that."
            )
        lines.append("")
    lines.append(f"Raw numbers: `{report['json_path']}`.")
    return "\n".join(lines)


def _env_settings(env: dict) -> str:
    return ", ".join(f"{k}={v or 'unset'}" for k, v in env.items())


def _short_command(command: str) -> str:
    """The exact command, except that the free text of --conditions/--note (printed in full
    beside it) is shown as '...'."""
    words, out, skip = shlex.split(command), [], False
    for w in words:
        out.append("'...'" if skip else shlex.quote(w))
        skip = w in ("--conditions", "--note")
    return " ".join(out)


def _fmt(x, digits: int) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


DOC_HEADER = """# Performance

Measured claims only: every table below comes from a command in `bench/`, run on the machine it
names, with the peers measured in the same run on the same workload. Ratios travel between
machines better than seconds do; the limits say how far from the machine's best we are.
"""


def write_section(path: Path, key: str, body: str) -> None:
    """Replace the text between this section's markers (or append the section)."""
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    block = f"{start}\n{body}\n{end}"
    text = path.read_text() if path.exists() else DOC_HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    set_torch_env()  # before torch loads, and inherited by the children: as `quill serve` runs
    args = parse_args(argv)
    if args.render_only:
        report = json.loads(Path(args.render_only).read_text())
        if args.note:  # kept in the results file too, so the next re-render shows it
            report["note"] = args.note
            Path(args.render_only).write_text(json.dumps(report, indent=1))
        key = report.get("section_key") or ("engine:cpu:quick" if report["mode"].startswith("quick") else "engine:cpu")
        write_section(Path(args.out), key, render(report))
        print(f"[bench] rewrote the {key} section of {args.out} from {args.render_only}")
        return 0

    from bench.machine import limits_for, machine_info, measure_limits, model_costs
    from bench.systems import OURS, SERIAL

    started = time.time()
    shown = list(sys.argv[1:]) if argv is None else list(argv)
    report = {
        "mode": "quick smoke check" if args.quick else "full",
        "command": "quill bench engine " + " ".join(shlex.quote(a) for a in shown),
        "machine": machine_info(),
        "env": {k: os.environ.get(k) for k in TORCH_ENV},
        "conditions": args.conditions,
        "settings": {
            "threads": args.threads, "max_batch_size": args.max_batch_size, "max_seq_len": 512,
            "max_prompt_tokens": 256, "max_tokens": 128, "hf_max_batch_tokens": args.hf_max_batch_tokens,
            "max_prefill_tokens": args.prefill_budget, "dtype": args.dtype,
        },
        "workload": {"requests": args.requests, "prompt_tokens": args.prompt_tokens, "burst": args.burst,
                     "max_tokens": args.max_tokens, "seed": args.seed, "greedy": True},
        "json_path": os.path.relpath(args.json, REPO) if args.json.startswith(str(REPO)) else args.json,
        "models": {},
    }
    print(f"[bench] measuring the machine's limits with {args.threads} threads", flush=True)
    report["limits"] = _limits(args, measure_limits)
    print(f"[bench] {report['limits']}", flush=True)
    out_path, json_path = Path(args.out), Path(args.json)
    key = "engine:cpu" + (":quick" if args.quick else "") + (f":{args.section}" if args.section else "")
    report["section_key"] = key
    if args.note:
        report["note"] = args.note

    def save() -> None:
        report["run_minutes"] = round((time.time() - started) / 60, 1)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1))
        write_section(out_path, key, render(report))

    with tempfile.TemporaryDirectory(prefix="quill-bench-") as tmp:
        for size in args.models:
            rate = args.rate or DEFAULT_RATES[size]
            workload = make_workload(args.requests, rate, args.prompt_tokens, args.max_tokens, args.seed)
            if args.burst:  # saturated: all at once, so nothing waits for an arrival
                for w in workload:
                    w["arrival_s"] = 0.0
            checkpoint = make_checkpoint(size, Path(tmp) / size, args.seed)
            costs = model_costs(vocab_size=VOCAB, n_positions=N_POSITIONS, dtype=args.dtype, **{
                k: v for k, v in MODELS[size].items() if k != "n_head"})
            mr = report["models"][size] = {
                "workload": {
                    "rate_per_s": rate,
                    "arrival_span_s": workload[-1]["arrival_s"],
                    "output_tokens_asked": sum(w["max_tokens"] for w in workload),
                    "prompt_tokens": sum(len(w["prompt"]) for w in workload),
                },
                "costs": costs,
                "floors": limits_for(costs, report["limits"]),
                "serial_cap": args.serial_cap.get(size),
                "rows": [],
                "raw": {},
            }
            for system in [OURS, *args.peers]:
                wl = workload[: mr["serial_cap"]] if system == SERIAL and mr["serial_cap"] else workload
                print(f"[bench] {size}: {system} on {len(wl)} requests ...", flush=True)
                t = time.time()
                if system == OURS:
                    mr["engine_version"] = engine_version()
                result = run_one(system, checkpoint, wl, report["settings"], args.isolation, args.system_timeout)
                row = summarize(result)
                print(f"[bench] {size}: {system} done in {time.time() - t:.0f} s: {row}", flush=True)
                mr["rows"].append(row)
                mr["raw"][system] = {k: v for k, v in result.items() if k not in ("traceback",)}
                if "traceback" in result:
                    print(result["traceback"], file=sys.stderr, flush=True)
                add_ratios(mr["rows"], OURS)
                _fractions(mr, report["limits"])
                save()
    save()
    print(f"[bench] wrote {out_path} and {json_path} in {report['run_minutes']} min", flush=True)
    failed = [r["system"] for mr in report["models"].values() for r in mr["rows"] if "error" in r]
    return 1 if failed else 0


def _limits(args, measure_limits) -> dict:
    """In a child too, so the parent's threads and memory do not colour the numbers."""
    if args.isolation == "inline":
        return measure_limits(args.threads, args.quick, args.dtype)
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure_limits, (args.threads, args.quick, args.dtype))


def _fractions(mr: dict, limits: dict) -> None:
    """Quill's tokens/s x FLOPs per token / measured FLOP/s: how much of the machine it used."""
    from bench.systems import OURS

    ours = next((r for r in mr["rows"] if r["system"] == OURS and "error" not in r), None)
    if not ours or not ours["wall_s"]:
        return
    flops = mr["costs"]["flops_per_token"]
    rate = limits["matmul_gflops"] * 1e9
    mr["quill_fraction_of_compute"] = round(ours["tok_s"] * flops / rate, 3)
    with_prompts = (ours["output_tokens"] + ours["prompt_tokens"]) / ours["wall_s"]
    mr["quill_fraction_of_compute_with_prompts"] = round(with_prompts * flops / rate, 3)
    if ours.get("steps"):
        # What a pass of the mean size could take at best: it reads every weight once and its
        # decode rows' cached keys and values (at the copy rate), and does its rows' arithmetic
        # (at the matmul rate), whichever takes longer. Attention's arithmetic is left out.
        arithmetic_ms = ours["rows_per_step"] * flops / rate * 1e3
        kv_ms = ours["kv_bytes_per_step"] / (limits["copy_gbs_read_plus_write"] * 1e9) * 1e3
        best_ms = max(mr["floors"]["batch1_floor_ms"] + kv_ms, arithmetic_ms)
        mr["roofline_step_ms"] = round(best_ms, 2)
        mr["quill_fraction_of_roofline"] = round(mr["roofline_step_ms"] / ours["mean_step_ms"], 3)  # as printed


if __name__ == "__main__":
    sys.exit(main())
