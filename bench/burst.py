"""`quill serve` at saturation and below it, against the engine in-process and transformers.

    quill bench serve --workload burst [--model small] [--writers 32] [--max-tokens 64] [--dtype auto] [--bursts 3] [--quick]

One run, one random-weight checkpoint, one workload (N prompts of random token ids, greedy,
each asking for the same number of tokens):
1. `quill serve` started as a user starts it, on a registry entry that says nothing about CPUs,
   threads or dtype (the replica gets what `quill serve` gives it), driven by a light client
   (bench/stream_client.py) in this process:
   - burst over SSE, then over the WebSocket: all N requests at once, so the server is saturated;
   - two Poisson arrival rates below the capacity the SSE burst measured (30% and 60% of it),
     for TTFT and time per output token when the server keeps up;
2. with the server still up and idle, the same burst replayed by the engine in-process in a fresh
   process beside it: what Ray's processes cost an engine on this machine without any traffic
   (their timers wake ~1,600 times a second on an idle one-model server), apart from what the
   request path costs;
3. the server stopped, the same burst replayed in a fresh process each by the engine in-process
   (an `Engine.step` loop, the same engine settings and threads the replica had), transformers'
   `generate` on one static batch, and transformers' continuous batching (bench/systems.py), all
   in the dtype the replica served; where that is not float32, transformers' static batch also
   in float32, what a plain `from_pretrained` gives.

The burst runs in `--bursts` rounds (default 3). A round starts a fresh `quill serve`, sends it
the burst over SSE and over the WebSocket, stops it, and replays the burst through each peer in a
fresh process, so a round's systems run within a minute or two of each other. This box's speed
drifts by 10-25% over minutes (seen for every bfloat16 system at once, docs/performance.md):
run in blocks, a system measured in a slow spell would carry the drift into the ratios. Each
round's ratios therefore pair systems measured side by side, and the ratios reported are the
median over rounds (the lower middle of an even count); each system's row is its median round,
with every round's tokens/s beside it. The two rates below capacity run in the first round.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench.engine import RESULTS_DIR, make_checkpoint, make_workload, percentile, run_one, write_section
from bench.machine import machine_info
from bench.serve import Server
from bench.stream_client import sse_request, ws_request

MODEL = "burst"
RATE_SHARES = (0.3, 0.6)  # of the measured capacity
# The systems of a round, by the phase names their rows carry.
SSE = "quill serve, burst, SSE"
WEBSOCKET = "quill serve, burst, WebSocket"
BESIDE_IDLE = "engine in-process beside an idle quill serve"
ENGINE = "engine in-process (Engine.step loop)"
STATIC_BATCH = "transformers generate, one static batch"
STATIC_FLOAT32 = "transformers generate, one static batch, float32 (from_pretrained's default)"


def registry_entry(checkpoint: Path, args) -> dict:
    # No cpus_per_replica, no engine.threads (and with --dtype auto no dtype): what a user who
    # writes none of them gets.
    return {
        "name": MODEL, "source": str(checkpoint), **({} if args.dtype == "auto" else {"dtype": args.dtype}),
        "engine": {"max_batch_size": args.writers, "max_seq_len": 1024, "prefix_cache_tokens": 0},
        "defaults": {"max_tokens": args.max_tokens, "temperature": 0},
        "limits": {"max_prompt_tokens": 512, "max_tokens": args.max_tokens, "max_n": 1},
    }


def replica_settings(registry_path: Path) -> dict:
    """The engine settings the replica runs with, as `quill serve` derives them on this machine."""
    from serve_app.config import load_registry, share_cpus
    from serve_app.engine.loader import resolve_device, resolve_dtype

    entry = share_cpus(load_registry(registry_path), float(os.cpu_count() or 1)).models[0]
    e = entry.engine
    dtype = str(resolve_dtype(entry.dtype, resolve_device(entry.device))).removeprefix("torch.")
    return {"threads": entry.threads, "max_batch_size": e.max_batch_size, "max_seq_len": e.max_seq_len,
            "max_prompt_tokens": entry.limits.max_prompt_tokens, "max_tokens": entry.limits.max_tokens,
            "max_prefill_tokens": e.max_prefill_tokens, "cpus_per_replica": entry.cpus, "dtype": dtype,
            "registry_dtype": entry.dtype,
            "stream_messages_per_s": e.stream_messages_per_s}


# ---- driving the server -----------------------------------------------------------------------


async def drive(url: str, workload: list[dict], channel: str) -> list[dict]:
    """Each request sent at its arrival time; one record per request (times from the run's t0)."""
    t0 = time.perf_counter()

    async def one(w: dict) -> dict:
        await asyncio.sleep(max(0.0, t0 + w["arrival_s"] - time.perf_counter()))
        sent = time.perf_counter() - t0
        body = {"model": MODEL, "prompt": w["prompt"], "max_tokens": w["max_tokens"], "temperature": 0}
        try:
            if channel == "ws":
                rec = await ws_request(url, body)
            else:
                rec = await sse_request(url, "/v1/completions",
                                        {**body, "stream": True, "stream_options": {"include_usage": True}})
        except Exception as exc:  # counted as an error of its kind, the run goes on
            rec = {"error": f"{type(exc).__name__}: {exc}", "times": [], "tokens": 0}
        return {"id": w["id"], "sent": sent, **rec}

    return await asyncio.gather(*(one(w) for w in workload))


def summarize(name: str, records: list[dict]) -> dict:
    ok = [r for r in records if "error" not in r and r["times"]]
    errors: dict[str, int] = {}
    for r in records:
        if "error" in r:
            kind = r["error"].split(":")[0][:60]
            errors[kind] = errors.get(kind, 0) + 1
    tokens = sum(r["tokens"] for r in ok)
    wall = max(r["sent"] + r["times"][-1] for r in ok) - min(r["sent"] for r in records) if ok else 0.0
    # Per token, from the usage: a WebSocket message (or an SSE chunk) may carry several.
    tpot = [(r["times"][-1] - r["times"][0]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1 and len(r["times"]) > 1]
    return {
        "phase": name, "requests": len(records), "errors": errors, "output_tokens": tokens,
        "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1) if wall else 0.0,
        "ttft_p50_s": _r(percentile([r["ttft_s"] for r in ok], 50)),
        "ttft_p99_s": _r(percentile([r["ttft_s"] for r in ok], 99)),
        "tpot_p50_ms": _r(percentile(tpot, 50), 1000), "tpot_p99_ms": _r(percentile(tpot, 99), 1000),
    }


def median_of(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle of an even count; a failed run counts
    as 0), with every run's tokens/s under `bursts_tok_s`."""
    ranked = sorted(runs, key=lambda r: r.get("tok_s") or 0.0)
    return {**ranked[(len(ranked) - 1) // 2], "bursts_tok_s": [r.get("tok_s") for r in runs]}


def peer_row(name: str, result: dict) -> dict:
    from bench.engine import summarize as summarize_engine

    row = summarize_engine(result)
    return {"phase": name, **{k: row.get(k) for k in ("requests", "output_tokens", "wall_s", "tok_s", "ttft_p50_s",
                                                      "ttft_p99_s", "tpot_p50_ms", "tpot_p99_ms", "error")}}


def _r(x, scale: float = 1.0):
    return None if x is None else round(x * scale, 3 if scale == 1.0 else 1)


def poisson(workload: list[dict], rate: float, seed: int) -> list[dict]:
    rng, t, out = random.Random(seed), 0.0, []
    for w in workload:
        out.append({**w, "arrival_s": round(t, 4)})
        t += rng.expovariate(rate)
    return out


# ---- the run --------------------------------------------------------------------------------


def run(args, argv: list[str] | None) -> int:
    from bench.engine import engine_version
    from bench.systems import CB, OURS, STATIC

    burst = make_workload(args.writers, 1.0, (args.prompt_tokens, args.prompt_tokens),
                          (args.max_tokens, args.max_tokens), args.seed)
    for w in burst:
        w["arrival_s"] = 0.0
    report = {"command": "quill bench serve " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
              "machine": machine_info(), "engine": engine_version(),
              "args": {k: getattr(args, k) for k in ("model", "writers", "prompt_tokens", "max_tokens", "rate_requests", "seed",
                                                     "dtype", "bursts")},
              "rows": [], "rounds": []}

    def show(row: dict) -> dict:
        print(f"[bench] {json.dumps(row)}", flush=True)
        return row

    with tempfile.TemporaryDirectory(prefix="quill-bench-burst-") as tmp:
        workdir = Path(tmp)
        checkpoint = make_checkpoint(args.model, workdir / "model", args.seed)
        registry = workdir / "registry.json"
        registry.write_text(json.dumps({"models": [registry_entry(checkpoint, args)]}))  # JSON is YAML
        settings = report["replica"] = replica_settings(registry)
        peers = [(OURS, ENGINE, settings),
                 (STATIC, STATIC_BATCH, settings),
                 (CB, "transformers continuous batching", settings)]
        if settings["dtype"] != "float32":
            peers.append((STATIC, STATIC_FLOAT32, {**settings, "dtype": "float32"}))

        def peer(system: str, name: str, peer_settings: dict) -> dict:
            print(f"[bench] {name} ...", flush=True)
            return show(peer_row(name, run_one(system, checkpoint, burst, peer_settings, "process", args.system_timeout)))

        rates: list[dict] = []
        for number in range(args.bursts):
            print(f"[bench] round {number + 1} of {args.bursts}", flush=True)
            server = Server(registry, workdir / f"serve-{number}.log")
            try:
                report.setdefault("startup_s", round(server.wait_ready(), 1))
                asyncio.run(drive(server.url, burst[:2], "sse"))  # first-call paths, not measured
                runs = [show(summarize(SSE, asyncio.run(drive(server.url, burst, "sse")))),
                        show(summarize(WEBSOCKET, asyncio.run(drive(server.url, burst, "ws"))))]
                if number == 0:
                    capacity = runs[0]["tok_s"] / args.max_tokens  # requests/s the server can finish
                    rates = [show(rate_row(server.url, args, capacity, share)) for share in RATE_SHARES]
                runs.append(peer(OURS, BESIDE_IDLE, settings))
            finally:
                server.stop()
            runs += [peer(*p) for p in peers]
            report["rounds"].append(runs)

    report.update(fold_rounds(report["rounds"], rates))
    print(render(report))
    if args.out:
        key = args.section or f"serve-burst-{args.model}-{settings['dtype']}"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / f"{key}.json").write_text(json.dumps(report, indent=1))
        write_section(Path(args.out), key, render(report))
    return 0 if all(not r.get("errors") and not r.get("error") for r in report["rows"]) else 1


def fold_rounds(rounds: list[list[dict]], rates: list[dict]) -> dict:
    """The report's `rows` (each system's median round, the rates below capacity after the
    server's two rows), `round_ratios` (each ratio within each round) and `ratios` (their
    medians), from the rounds' rows, each round's systems in the same order."""
    rows = [median_of([runs[i] for runs in rounds]) for i in range(len(rounds[0]))]
    phases = [r["phase"] for r in rounds[0]]
    round_ratios = {name: [_ratio(runs[phases.index(a)], runs[phases.index(b)]) for runs in rounds]
                    for name, (a, b) in RATIOS.items() if b in phases}
    return {"rows": rows[:2] + rates + rows[2:], "round_ratios": round_ratios,
            "ratios": {name: _median(each) for name, each in round_ratios.items()}}


# Each ratio: the phases of a round it divides. The last two split serve ÷ engine in two: what
# the request path costs, and what an idle server's mere presence costs the engine beside it.
RATIOS = {"serve_over_static": (SSE, STATIC_BATCH), "serve_over_engine": (SSE, ENGINE),
          "engine_over_static": (ENGINE, STATIC_BATCH), "serve_over_static_float32": (SSE, STATIC_FLOAT32),
          "serve_over_engine_beside_idle_server": (SSE, BESIDE_IDLE),
          "engine_beside_idle_server_over_engine": (BESIDE_IDLE, ENGINE)}


def rate_row(url: str, args, capacity: float, share: float) -> dict:
    rate = round(capacity * share, 3)
    trace = poisson(make_workload(args.rate_requests, 1.0, (args.prompt_tokens, args.prompt_tokens),
                                  (args.max_tokens, args.max_tokens), args.seed + 1), rate, args.seed)
    row = summarize(f"quill serve, {rate:g} req/s ({share:.0%} of capacity), SSE", asyncio.run(drive(url, trace, "sse")))
    return {**row, "rate_per_s": rate}


def _median(values: list[float | None]) -> float | None:
    """The lower middle, as `median_of`; a round with a failed system makes it None."""
    if not values or any(v is None for v in values):
        return None
    return sorted(values)[(len(values) - 1) // 2]


def _ratio(a: dict, b: dict) -> float | None:
    return round(a["tok_s"] / b["tok_s"], 2) if a.get("tok_s") and b.get("tok_s") else None


def render(report: dict) -> str:
    m, a, s, q = report["machine"], report["args"], report["replica"], report["ratios"]
    lines = [
        f"### `quill serve` at saturation: a burst of {a['writers']} writers ({a['model']} shape)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, torch "
        f"{m['torch']}, transformers {m['transformers']}; {m['date_utc']}; engine {report['engine']}.",
        "",
        f"{a['writers']} requests of {a['prompt_tokens']} random prompt tokens, {a['max_tokens']} greedy tokens each. "
        f"The replica, from a registry entry that sets no CPUs or threads: {s['cpus_per_replica']} CPUs, "
        f"{s['threads']} torch threads, batch {s['max_batch_size']}, {s['stream_messages_per_s']:g} stream messages/s; "
        f"weights in {s['dtype']} (registry dtype: {s.get('registry_dtype', s['dtype'])}), and every system in the same dtype "
        f"{'' if s['dtype'] == 'float32' else '(transformers also in float32) '}with the same threads. "
        f"Saturation: {a.get('bursts', 1)} rounds, each a fresh server's burst, the engine in-process beside that server "
        "while it idles, then each peer's in a fresh process with the server stopped; "
        "a row is the system's median round, and each ratio the median of the rounds' own ratios. "
        f"Rates below capacity: {a['rate_requests']} requests arriving as a Poisson "
        "process. TPOT is per request, (last token - first token) / (tokens - 1).",
        "",
        f"**`quill serve` / static batch: {q['serve_over_static']}x"
        + (f" (/ float32 static batch: {q['serve_over_static_float32']}x)" if "serve_over_static_float32" in q else "")
        + f"; `quill serve` / engine in-process: "
        f"{q['serve_over_engine']}x; engine in-process / static batch: {q['engine_over_static']}x.**"
        + (f" Split: `quill serve` / the engine beside an idle server {q['serve_over_engine_beside_idle_server']}x "
           f"(the request path), the engine beside an idle server / alone {q['engine_beside_idle_server_over_engine']}x "
           "(the server's presence)." if "engine_beside_idle_server_over_engine" in q else "")
        + "".join(f" Round by round, {label}: {' / '.join(f'{x}x' for x in report['round_ratios'][key])}."
                  for key, label in (("serve_over_static", "`quill serve` / static batch"),
                                     ("serve_over_engine", "`quill serve` / engine in-process"),
                                     ("serve_over_engine_beside_idle_server", "`quill serve` / engine beside an idle server"),
                                     ("engine_beside_idle_server_over_engine", "engine beside an idle server / alone"))
                  if key in report.get("round_ratios", {})),
        "",
        "| what | tokens/s (median round) | each round | output tokens | wall s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["rows"]:
        errors = r.get("error") or ", ".join(f"{k}: {v}" for k, v in (r.get("errors") or {}).items()) or "0"
        each = " / ".join(str(x) for x in r.get("bursts_tok_s") or []) or "-"
        lines.append(f"| {r['phase']} | {r.get('tok_s')} | {each} | {r.get('output_tokens')} | {r.get('wall_s')} | "
                     f"{r.get('ttft_p50_s')} s | {r.get('ttft_p99_s')} s | {r.get('tpot_p50_ms')} ms | "
                     f"{r.get('tpot_p99_ms')} ms | {errors} |")
    return "\n".join(lines)
