"""`quill bench load`: simulated writers against a running Quill for a set time (#12).

    quill bench load --url http://127.0.0.1:8000 [--api-key KEY] [--model NAME]
                     [--writers 12] [--duration 60] [--mix sse=1,native=1,ws=1] [--think 1-3]
                     [--abandon 0.1] [--retype 0.2] [--over-limit 0.02] [--max-tokens 16]
                     [--out docs/performance.md --section load-...]
    quill bench load --start [--start-model tiny|small] [--replicas 1] ...   (its own quill serve)

Each writer grows a document from the project's held-out text a few words at a time and, after
each pause, asks for a suggestion over its channel: SSE on /v1/completions, the native route's
events (n suggestions), or the WebSocket (one socket kept open, a push per token), as the
writing page does, with `truncate_prompt_tokens` at the model's limit. Some turns misbehave as
real writers do: they walk away mid-stream (abandon), type again while a WebSocket suggestion
is still coming (retype: a new `generate` replaces the running one), or ask for more
suggestions than the model allows (a clear 400 expected).

It reports requests/s, time to first token and time per token (p50/p99), every request's
outcome by channel (bench/load_writers.py says what each outcome means), the server's own
request counts, and the model replicas' resident memory over time: RSS read from /proc when
the server runs on this machine (Serve replicas found under the Ray node that owns the port),
and the replicas' KV-cache and weight gauges from /metrics wherever it runs (Quill exports no
RSS series of its own). The run fails (exit status 1) when any request was lost, that is ended
without done, cancelled or a clear error, or when nothing at all was done.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from bench.engine import RESULTS_DIR, percentile, write_section
from bench.load_writers import Document, Record, Target, Turn, WsWriter, held_out_pieces, http_stream
from serve_app.config import set_torch_env

CHANNELS = ("sse", "native", "ws")
CHANNEL_NAMES = {"sse": "SSE /v1/completions", "native": "native /generate", "ws": "WebSocket /v1/stream"}
MiB = 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="quill bench load", description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server (default with --start: the one it starts)")
    p.add_argument("--api-key", default=os.environ.get("QUILL_API_KEY"), help="sent as Authorization: Bearer")
    p.add_argument("--model", help="default: the first model of GET /v1/models")
    p.add_argument("--writers", type=int, default=12)
    p.add_argument("--duration", type=float, default=60.0, help="seconds during which writers start requests")
    p.add_argument("--mix", default="sse=1,native=1,ws=1", help="writers per channel, as weights")
    p.add_argument("--think", default="1-3", help="seconds between the end of one request and the next (min-max)")
    p.add_argument("--abandon", type=float, default=0.1, help="share of requests left mid-stream")
    p.add_argument("--retype", type=float, default=0.2, help="share of WebSocket turns replaced while running")
    p.add_argument("--over-limit", type=float, default=0.02, help="share of requests over the model's n limit")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--n", type=int, default=2, help="suggestions per native and WebSocket request")
    p.add_argument("--stall", type=float, default=60.0, help="seconds without an event before a request is lost")
    p.add_argument("--memory-every", type=float, default=5.0, help="seconds between memory samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", action="store_true", help="start a quill serve on a random-weight checkpoint")
    p.add_argument("--start-model", choices=["tiny", "small", "medium"], default="tiny")
    p.add_argument("--replicas", type=int, default=1, help="with --start")
    p.add_argument("--out", default="", help="markdown file for the table, e.g. docs/performance.md")
    p.add_argument("--section", help="section key in --out (default load-<model>-<writers>w-<duration>s)")
    p.add_argument("--raw", help="JSON file for the raw records (default with --out: bench/results/<section>.json)")
    args = p.parse_args(argv)
    if not args.url and not args.start:
        p.error("give --url of a running server, or --start")
    args.think_range = tuple(float(x) for x in args.think.split("-"))
    weights = dict(part.split("=") for part in args.mix.split(","))
    unknown = set(weights) - set(CHANNELS)
    if unknown:
        p.error(f"--mix: unknown channel(s) {', '.join(sorted(unknown))} (sse, native, ws)")
    args.channels = [c for c in CHANNELS for _ in range(int(weights.get(c, 0)))]
    if not args.channels:
        p.error("--mix: no channel has a weight")
    return args


# ---- the server -----------------------------------------------------------------------------


def start_server(args, workdir: Path):
    """`quill serve` on a random-weight checkpoint of the named shape (bench/serve.py's Server)."""
    from bench.engine import make_checkpoint
    from bench.serve import Server

    checkpoint = make_checkpoint(args.start_model, workdir / "model", args.seed)
    entry = {
        "name": f"load-{args.start_model}", "source": str(checkpoint),
        "autoscaling": {"min_replicas": args.replicas, "max_replicas": args.replicas},
        "engine": {"max_batch_size": 16, "max_seq_len": 512},
        "defaults": {"max_tokens": 16, "temperature": 0.8},
        "limits": {"max_prompt_tokens": 256, "max_tokens": 64, "max_n": 4},
    }
    registry = workdir / "registry.json"
    registry.write_text(json.dumps({"models": [entry]}))  # JSON is YAML
    server = _with_env(Server, registry, workdir / "serve.log",
                       env={"QUILL_API_KEYS": args.api_key} if args.api_key else {})
    print(f"quill serve ready in {server.wait_ready():.0f} s at {server.url}", flush=True)
    return server


def _with_env(start, *args, env: dict[str, str]):
    """`start(*args)` with `env` added to this process's environment for the child it spawns
    (the server reads its keys from its environment), then the environment as it was."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return start(*args)
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


async def find_target(client, args) -> Target:
    """The model to load and its limits, from GET /v1/models."""
    response = await client.get(f"{args.url}/v1/models", headers=args.headers)
    if response.status_code != 200:
        raise SystemExit(f"GET /v1/models answered {response.status_code}: {response.text[:300]}")
    cards = {m["id"]: m for m in response.json()["data"]}
    model = args.model or next(iter(cards))
    if model not in cards:
        raise SystemExit(f"model {model!r} is not served ({', '.join(cards)})")
    limits = cards[model]["limits"]
    return Target(
        url=args.url, model=model, headers=args.headers, max_tokens=min(args.max_tokens, limits["max_tokens"]),
        n_native=min(args.n, limits["max_n"]), truncate_prompt_tokens=limits["max_prompt_tokens"],
        over_limit_n=limits["max_n"] + 1, stall_s=args.stall,
    )


# ---- memory over time -----------------------------------------------------------------------


def local_replicas(url: str) -> dict[str, int]:
    """{deployment title: pid} of the Serve replicas behind `url` when it listens on this
    machine: the port's owner is HAProxy (started by a worker of the Ray node) or Ray's proxy
    (a worker itself), and the node's other workers include the replicas (so another Quill on
    the same machine is never counted)."""
    import psutil

    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        return {}
    try:
        owner = next(c.pid for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == (parts.port or 80) and c.pid)
        replicas = {}
        node = psutil.Process(owner)
        for _ in range(2):  # HAProxy -> its manager actor -> the raylet; Ray's proxy -> the raylet
            node = node.parent()
            for proc in node.children() if node is not None else ():
                title = " ".join(proc.cmdline())
                # Ray titles a replica's process "ray::ServeReplica:<app>:<deployment>"; the
                # ingress is a replica too, the models' deployments are the others.
                if "ServeReplica" in title and "Ingress" not in title:
                    # Ray appends the task running at the moment (".check_health", ...): not part
                    # of the replica's name, or one replica would show as several columns.
                    deployment = title.split(":")[-1].split()[0].split(".")[0]
                    replicas[f"{deployment} (pid {proc.pid})"] = proc.pid
            if replicas or node is None:
                break
        return replicas
    except (StopIteration, psutil.Error):
        return {}


def _sum_by(text: str, name: str, label: str) -> dict[str, float]:
    """A series of the /metrics page summed by one label."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                key = s.labels.get(label, "?")
                out[key] = out.get(key, 0.0) + s.value
    return out


async def sample_memory(client, args, t0: float) -> dict:
    """One sample: RSS of the local replicas, and the replicas' gauges from /metrics."""
    import psutil

    sample: dict = {"t_s": round(time.monotonic() - t0, 1), "rss": {}}
    for label, pid in local_replicas(args.url).items():
        try:
            sample["rss"][label] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    try:
        text = (await client.get(f"{args.url}/metrics", headers=args.headers, timeout=10)).text
        sample["kv_cache"] = _sum_by(text, "quill_model_kv_cache_bytes", "replica")
        sample["weights"] = _sum_by(text, "quill_model_weights_bytes", "replica")
        sample["requests"] = _sum_by(text, "quill_requests_total", "status")  # how the engines ended them
    except Exception as exc:  # noqa: BLE001 - a sample missed is reported, not fatal
        sample["metrics_error"] = repr(exc)[:200]
    return sample


# ---- the writers ----------------------------------------------------------------------------


def next_turn(rng: random.Random, doc: Document, channel: str, args) -> Turn:
    turn = Turn(doc.type_more())
    if rng.random() < args.over_limit:
        turn.over_limit = True
        return turn
    if channel == "ws" and rng.random() < args.retype:
        turn.retype = doc.type_more(1, 3)  # typed on while the suggestion was coming
    if rng.random() < args.abandon:
        turn.abandon_after = rng.randint(1, max(1, args.max_tokens // 2))
    return turn


async def run_load(args, target: Target, pieces: list[str]) -> tuple[list[Record], list[dict], float]:
    import httpx

    records: list[Record] = []
    samples: list[dict] = []
    limits = httpx.Limits(max_connections=args.writers * 2 + 4, max_keepalive_connections=args.writers * 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.stall, connect=10.0), limits=limits) as client:
        await http_stream(client, target, Turn("Warm up"), "sse")  # first-call paths, not part of the run
        t0 = time.monotonic()
        deadline = t0 + args.duration

        async def writer(i: int) -> None:
            channel = args.channels[i % len(args.channels)]
            rng = random.Random(args.seed * 1000 + i)
            doc = Document(pieces, rng)
            ws = WsWriter(target) if channel == "ws" else None
            await asyncio.sleep(rng.uniform(0, args.think_range[1]))  # writers do not start in step
            try:
                while time.monotonic() < deadline:
                    turn = next_turn(rng, doc, channel, args)
                    try:
                        if ws is not None:
                            records.extend(await ws.turn(turn))
                        else:
                            records.append(await http_stream(client, target, turn, channel))
                    except Exception as exc:  # noqa: BLE001 - a long run keeps going, and fails with the reason
                        records.append(Record(channel, time.perf_counter()).end("lost", f"the load client failed: {exc!r}"))
                    await asyncio.sleep(min(rng.uniform(*args.think_range), max(0.0, deadline - time.monotonic())))
            finally:
                if ws is not None:
                    await ws.close()

        async def sampler() -> None:
            while True:
                samples.append(await sample_memory(client, args, t0))
                print(f"[{samples[-1]['t_s']:>6.0f} s] {len(records)} requests ended, "
                      f"{sum(r.outcome == 'lost' for r in records)} lost", flush=True)
                await asyncio.sleep(args.memory_every)

        sampling = asyncio.create_task(sampler())
        try:
            await asyncio.gather(*(writer(i) for i in range(args.writers)))
        finally:
            sampling.cancel()
        wall = time.monotonic() - t0
        await asyncio.sleep(3)  # replicas export their counters every 2 s
        samples.append(await sample_memory(client, args, t0))
    return records, samples, wall


# ---- the report -----------------------------------------------------------------------------


def _ms(values: list[float], q: float) -> float | None:
    p = percentile(values, q)
    return None if p is None else round(p * 1000, 1)


def summarize(records: list[Record], wall: float) -> dict:
    def stats(rs: list[Record]) -> dict:
        ttft = [r.ttft_s for r in rs if r.ttft_s is not None]
        per_token = [r.per_token_s for r in rs if r.per_token_s is not None]
        outcomes = Counter(r.outcome for r in rs)
        return {
            "requests": len(rs), "done": outcomes["done"], "cancelled": outcomes["cancelled"],
            "abandoned": outcomes["abandoned"], "lost": outcomes["lost"],
            "errors": dict(sorted((k.split(":", 1)[1], v) for k, v in outcomes.items() if k.startswith("error:"))),
            "ttft_ms": {"p50": _ms(ttft, 50), "p99": _ms(ttft, 99)},
            "per_token_ms": {"p50": _ms(per_token, 50), "p99": _ms(per_token, 99)},
        }

    by_channel = {c: stats([r for r in records if r.channel == c]) for c in CHANNELS if any(r.channel == c for r in records)}
    total = stats(records)
    total["requests_per_s"] = round(len(records) / wall, 2) if wall else 0.0
    total["done_per_s"] = round(total["done"] / wall, 2) if wall else 0.0
    total["tokens_per_s"] = round(sum(r.tokens for r in records) / wall, 1) if wall else 0.0
    lost = [{"channel": r.channel, "detail": r.detail} for r in records if r.outcome == "lost"][:20]
    return {"channels": by_channel, "total": total, "lost_examples": lost}


def memory_summary(samples: list[dict], warmup_s: float) -> dict:
    """RSS after warm-up: first, last, max and growth, summed over the replicas of each sample."""
    rss = [(s["t_s"], sum(s["rss"].values())) for s in samples if s.get("rss")]
    after = [v for t, v in rss if t >= warmup_s] or [v for _, v in rss]
    if not after:
        return {}
    return {"first_mib": round(after[0] / MiB, 1), "last_mib": round(after[-1] / MiB, 1),
            "max_mib": round(max(after) / MiB, 1), "growth_mib": round((after[-1] - after[0]) / MiB, 1)}


def _cell(x) -> str:
    return "-" if x is None else f"{x}"


def render(report: dict) -> str:
    m, a, s = report["machine"], report["args"], report["summary"]
    mix = Counter(a["channels"][i % len(a["channels"])] for i in range(a["writers"]))
    lines = [
        f"### `quill bench load`: {a['writers']} writers for {a['duration']:.0f} s ({report['model']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, load average {m['load_average_at_start']} "
        f"at start; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, ray {report['ray']}; "
        f"{m['date_utc']}; engine {report['engine']}.",
        "",
        f"Writers: {', '.join(f'{mix[c]} {CHANNEL_NAMES[c]}' for c in CHANNELS if mix[c])}; {a['think']} s of thought "
        f"between requests; {a['max_tokens']} tokens per suggestion, n={a['n']} on the native route and the WebSocket "
        f"(a push per token); documents of held-out text growing 3-12 words a turn, sent whole with "
        f"truncate_prompt_tokens at the model's limit. {a['abandon']:.0%} of requests abandoned mid-stream, "
        f"{a['retype']:.0%} of WebSocket turns retyped (a new generate replaces the running one), "
        f"{a['over_limit']:.0%} over the model's n limit (a 400 expected).",
        "",
        "| channel | requests | done | cancelled by us | abandoned | errors | lost | TTFT p50 | TTFT p99 | per token p50 | per token p99 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in [*((CHANNEL_NAMES[k], v) for k, v in s["channels"].items()), ("all", s["total"])]:
        errors = ", ".join(f"{k} {v}" for k, v in c["errors"].items()) or "0"
        lines.append(f"| {name} | {c['requests']} | {c['done']} | {c['cancelled']} | {c['abandoned']} | {errors} | "
                     f"{c['lost']} | {_cell(c['ttft_ms']['p50'])} ms | {_cell(c['ttft_ms']['p99'])} ms | "
                     f"{_cell(c['per_token_ms']['p50'])} ms | {_cell(c['per_token_ms']['p99'])} ms |")
    t = s["total"]
    server = report.get("server_requests") or {}
    lines += [
        "",
        f"{t['requests_per_s']} requests/s ended ({t['done_per_s']} done/s), {t['tokens_per_s']} generated tokens/s. "
        "The engines counted: " + (", ".join(f"{k} {v:.0f}" for k, v in sorted(server.items())) or "(no /metrics)") + ".",
        "",
        ("**Nothing lost**: every request ended with done, cancelled or a clear error." if not t["lost"] else
         f"**{t['lost']} lost** (ended without done, cancelled or an error), e.g. {s['lost_examples'][0]['detail']!r}."),
    ]
    lines += _memory_lines(report)
    return "\n".join(lines)


def _memory_lines(report: dict) -> list[str]:
    samples, mem = report["samples"], report["memory"]
    labels = sorted({k for s in samples for k in s.get("rss", {})})
    if not labels and not any(s.get("kv_cache") for s in samples):
        return []
    # about a dozen rows, whatever the duration
    step = max(1, len(samples) // 12)
    rows = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    lines = ["", "| time | " + " | ".join(f"RSS {k} (MiB)" for k in labels) + " | KV cache (MiB) | weights (MiB) |",
             "| --- | " + "--- | " * len(labels) + "--- | --- |"]
    for s in rows:
        rss = " | ".join(_cell(round(s["rss"][k] / MiB, 1) if k in s.get("rss", {}) else None) for k in labels)
        kv, w = sum((s.get("kv_cache") or {}).values()), sum((s.get("weights") or {}).values())
        lines.append(f"| {s['t_s']:.0f} s | {rss}{' | ' if labels else ''}{round(kv / MiB, 1)} | {round(w / MiB, 1)} |")
    if mem:
        lines += ["", f"Replica RSS after warm-up ({report['warmup_s']:.0f} s): {mem['first_mib']} MiB first, "
                      f"{mem['last_mib']} MiB last, {mem['max_mib']} MiB at most ({mem['growth_mib']:+} MiB)."]
    else:
        lines += ["", "Replica RSS: not readable here (the server is not on this machine); the gauges are the replicas' own."]
    return lines


def main(argv: list[str] | None = None) -> int:
    set_torch_env()  # before torch loads, and inherited by the children: as `quill serve` runs
    args = parse_args(argv)
    args.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with tempfile.TemporaryDirectory(prefix="quill-bench-load-") as tmp:
        server = start_server(args, Path(tmp)) if args.start else None
        args.url = (args.url or server.url).rstrip("/")
        try:
            return _run(args, argv)
        finally:
            if server is not None:
                server.stop()


def _command(argv: list[str]) -> str:
    """The command line as the report shows it, with the API key left out."""
    shown, hide_next = [], False
    for a in argv:
        shown.append("KEY" if hide_next else "--api-key=KEY" if a.startswith("--api-key=") else a)
        hide_next = a == "--api-key"
    return "quill bench load " + " ".join(shlex.quote(a) for a in shown)


def _run(args, argv) -> int:
    import httpx
    import ray

    from bench.engine import engine_version
    from bench.machine import machine_info

    async def target() -> Target:
        async with httpx.AsyncClient(timeout=30) as client:
            return await find_target(client, args)

    tgt = asyncio.run(target())
    print(f"{args.writers} writers on {tgt.model} at {args.url} for {args.duration:.0f} s", flush=True)
    records, samples, wall = asyncio.run(run_load(args, tgt, held_out_pieces()))
    summary = summarize(records, wall)
    warmup_s = min(60.0, args.duration * 0.2)
    first, last = samples[0].get("requests", {}), samples[-1].get("requests", {})
    report = {
        "command": _command(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(), "engine": engine_version(), "ray": ray.__version__, "model": tgt.model,
        "args": {k: v for k, v in vars(args).items() if k not in ("headers", "api_key", "think_range")},
        "summary": summary, "server_requests": {k: v - first.get(k, 0.0) for k, v in last.items()},
        "samples": samples, "memory": memory_summary(samples, warmup_s), "warmup_s": warmup_s,
    }
    text = render(report)
    print(text)
    key = args.section or f"load-{tgt.model}-{args.writers}w-{args.duration:.0f}s"
    raw = args.raw if args.raw is not None else (str(RESULTS_DIR / f"{key}.json") if args.out else "")
    if raw:
        Path(raw).parent.mkdir(parents=True, exist_ok=True)
        records_json = [vars(r) | {"ttft_s": r.ttft_s, "per_token_s": r.per_token_s} for r in records]
        Path(raw).write_text(json.dumps(report | {"records": records_json}, indent=1))
    if args.out:
        write_section(Path(args.out), key, text)
    lost, done = summary["total"]["lost"], summary["total"]["done"]
    if lost or not done:
        print(f"FAILED: {lost} lost, {done} done", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
