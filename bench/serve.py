"""`quill serve` end to end, driven as writers drive it.

    quill bench serve --workload writers [--model small] [--writers 6] [--replicas 1] [--quick]
    quill bench serve --workload burst [--model small] [--writers 32] [--max-tokens 64] [--bursts 3] [--quick]

The burst workload (bench/burst.py) measures `quill serve` saturated and below capacity against
the engine in-process and transformers; the writers workload is described here.

The writers workload is what a writing assistant sees: each simulated writer grows a document
from the project's held-out text (training/data.py's split, never trained on) by a few words per
turn, and after each turn, as the browser page does, sends the whole document for a streamed
suggestion; then thinks for a moment and types on. One run starts `quill serve` twice on the
same random-weight checkpoint, the prefix cache off (`engine.prefix_cache_tokens: 0`) and on,
replays the identical turns against each, and reports time to first token by document length,
overall tokens/s, and the prompt tokens the cache served (from the app's /metrics).

With `--replicas 2` the model runs two replicas, so the numbers include prefix-aware routing
(serve_app/routing.py): a writer's resends must reach the replica that holds their document.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.engine import DEFAULT_OUT, RESULTS_DIR, make_checkpoint, percentile, write_section
from bench.machine import machine_info
from serve_app import local_ray
from serve_app.config import set_torch_env

BUCKETS = ((0, 200), (200, 400), (400, 550), (550, 700), (700, 10_000))  # prompt tokens
MODEL = "writer"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="quill bench serve", description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=["writers", "burst"], default="writers")
    p.add_argument("--model", choices=["tiny", "small", "medium"], default="small")
    p.add_argument("--writers", type=int, default=None, help="concurrent writers (default 6; burst: 32)")
    p.add_argument("--start-tokens", type=int, default=300, help="document length at the first request")
    p.add_argument("--end-tokens", type=int, default=650, help="a writer stops once the document is this long")
    p.add_argument("--words-per-turn", type=int, default=12, help="words typed between two requests")
    p.add_argument("--think", default="0.5-1.5", help="seconds between a suggestion and the next request (min-max)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per suggestion (default 8; burst: 64)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="burst: prompt tokens per request")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="burst: the registry entry's dtype (auto: the entry names none), and every peer's "
                        "(auto: what the server chose; transformers also runs in float32, its own default)")
    p.add_argument("--rate-requests", type=int, default=32, help="burst: requests per rate below capacity")
    p.add_argument("--system-timeout", type=float, default=900.0, help="burst: seconds before a peer is given up")
    p.add_argument("--bursts", type=int, default=3,
                   help="burst: rounds, each a burst of every system side by side; the medians reported "
                        "(one burst varies by ~10%%, the box drifts more)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--cache-tokens", type=int, default=8192, help="engine.prefix_cache_tokens when the cache is on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model, 2 writers, short documents (a smoke run)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file to write the section into ('' = none)")
    p.add_argument("--section", default=None, help="section key in --out (default serve-writers-<model>)")
    args = p.parse_args(argv)
    burst = args.workload == "burst"
    args.writers = args.writers or (32 if burst else 6)
    args.max_tokens = args.max_tokens or (64 if burst else 8)
    if args.quick:
        args.model, args.writers, args.start_tokens, args.end_tokens = "tiny", (4 if burst else 2), 40, 90
        args.max_tokens, args.rate_requests = (8, 4) if burst else (args.max_tokens, args.rate_requests)
        args.bursts = min(args.bursts, 2)
    args.think_range = tuple(float(x) for x in args.think.split("-"))
    return args


# ---- the workload ---------------------------------------------------------------------------


def make_writers(args, tokenizer) -> list[list[str]]:
    """Each writer's requests: the document as it stands at each pause, longer every time."""
    from training.data import read_documents, split_documents

    rng = random.Random(args.seed)
    pieces = [p for genre in ("fantasy", "legal", "copywriting", "abstracts")
              for p in split_documents(read_documents(genre))[1]]
    rng.shuffle(pieces)
    writers = []
    for piece in pieces:
        words = piece.split()
        start = _words_for(words, args.start_tokens, tokenizer)
        end = _words_for(words, args.end_tokens, tokenizer)
        if end - start < args.words_per_turn or len(tokenizer.encode(" ".join(words[:end]))) < args.end_tokens:
            continue  # too short a piece for a whole session
        writers.append([" ".join(words[:n]) for n in range(start, end + 1, args.words_per_turn)])
        if len(writers) == args.writers:
            return writers
    raise SystemExit("not enough held-out text for that many writers")


def _words_for(words: list[str], tokens: int, tokenizer) -> int:
    """The fewest leading words that make at least `tokens` tokens (or all of them)."""
    lo, hi = 1, len(words)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.encode(" ".join(words[:mid]))) >= tokens:
            hi = mid
        else:
            lo = mid + 1
    return lo


# ---- one server -----------------------------------------------------------------------------


def write_registry(path: Path, checkpoint: Path, args, cache_tokens: int) -> Path:
    # No cpus_per_replica: `quill serve` shares the machine among the replicas, as a user gets it.
    entry = {
        "name": MODEL, "source": str(checkpoint),
        "autoscaling": {"min_replicas": args.replicas, "max_replicas": args.replicas},
        "engine": {"max_batch_size": 16, "max_seq_len": 1024, "prefix_cache_tokens": cache_tokens},
        "defaults": {"max_tokens": args.max_tokens, "temperature": 0},
        "limits": {"max_prompt_tokens": 900, "max_tokens": 64, "max_n": 1},
    }
    path.write_text(json.dumps({"models": [entry]}))  # JSON is YAML
    return path


class Server:
    """`quill serve` as a user starts it, in its own session (its Ray goes down with it)."""

    def __init__(self, registry: Path, log: Path):
        self.port = local_ray.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        quill = Path(sys.executable).with_name("quill")
        cmd = [str(quill) if quill.exists() else sys.executable, *([] if quill.exists() else ["-m", "serve_app.cli"]),
               "serve", "--registry", str(registry), "--port", str(self.port)]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> float:
        t0 = time.monotonic()
        while "Quill is serving" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                self.stop()
                raise SystemExit(f"quill serve did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        return time.monotonic() - t0

    def stop(self) -> None:
        # At once, not with SIGTERM: the server and its Ray are the bench's own, and nothing is
        # measured after its last phase, so its drain and Serve's shutdown (6.6 s on a one-model
        # registry here) would only be waited for.
        kill_session(self.proc)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL for `proc` and every process in its session (it was started in a session of its
    own). Not just its process group: each Ray worker leads a group of its own, and an HAProxy
    whose manager was killed outlives the raylet, holding its port."""
    for pid in [proc.pid, *_session_members(proc.pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def _session_members(session: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != session:
            with contextlib.suppress(OSError):
                if os.getsid(int(entry)) == session:
                    members.append(int(entry))
    return members


def metric_sum(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf'^{name}{{[^}}]*model="{MODEL}"[^}}]*}} (\S+)$', text, re.M))


# ---- driving it -----------------------------------------------------------------------------


async def one_request(client, url: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    first, usage = None, {}
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"error": event["error"].get("message", "error event")}
            if event.get("choices") and first is None:
                first = time.perf_counter()
            usage = event.get("usage") or usage
    done = time.perf_counter()
    return {"ttft_s": (first or done) - t0, "tokens": usage.get("completion_tokens", 0), "start": t0, "finish": done}


async def drive(url: str, writers: list[list[str]], args, token_counts: dict[str, int]) -> list[dict]:
    import httpx

    rng = random.Random(args.seed + 1)
    thinks = [[rng.uniform(*args.think_range) for _ in turns] for turns in writers]
    records: list[dict] = []

    async def writer(w: int, turns: list[str]) -> None:
        for t, doc in enumerate(turns):
            rec = await one_request(client, url, doc, args.max_tokens)
            records.append({"writer": w, "turn": t, "prompt_tokens": token_counts[doc], **rec})
            await asyncio.sleep(thinks[w][t])

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        await one_request(client, url, "warm up", 2)  # first-call paths, not part of the run
        await asyncio.gather(*(writer(w, turns) for w, turns in enumerate(writers)))
    return records


def run_phase(name: str, checkpoint: Path, args, writers, token_counts, workdir: Path) -> dict:
    import httpx

    cache_tokens = args.cache_tokens if name == "cache on" else 0
    registry = write_registry(workdir / f"registry-{cache_tokens}.json", checkpoint, args, cache_tokens)
    server = Server(registry, workdir / f"serve-{cache_tokens}.log")
    try:
        startup = server.wait_ready()
        records = asyncio.run(drive(server.url, writers, args, token_counts))
        time.sleep(3)  # replicas export their counters every 2 s
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    finally:
        server.stop()
    ok = [r for r in records if "error" not in r]
    wall = max(r["finish"] for r in ok) - min(r["start"] for r in ok) if ok else 0.0
    resent = sum(r["prompt_tokens"] for r in ok if r["turn"] > 0)
    hits = metric_sum(metrics, "quill_prefix_cache_hit_tokens_total")
    return {
        "phase": name, "startup_s": round(startup, 1), "requests": len(records), "errors": len(records) - len(ok),
        "tok_s": round(sum(r["tokens"] for r in ok) / wall, 2) if wall else 0.0,
        "prompt_tokens": int(metric_sum(metrics, "quill_prompt_tokens_total")),
        "cache_hit_tokens": int(hits),
        # Of the prompt tokens of every resend (turn 2 on), the share the cache served.
        "resent_hit_ratio": round(hits / resent, 3) if resent else None,
        "ttft_by_length": {f"{lo}-{hi}": _ttfts([r for r in ok if lo <= r["prompt_tokens"] < hi and r["turn"] > 0])
                           for lo, hi in BUCKETS},
        "ttft_first_turn": _ttfts([r for r in ok if r["turn"] == 0]),
        "records": records,
    }


def _ttfts(records: list[dict]) -> dict:
    xs = [r["ttft_s"] for r in records]
    return {"n": len(xs), "p50_s": _r(percentile(xs, 50)), "p99_s": _r(percentile(xs, 99))}


def _r(x):
    return None if x is None else round(x, 3)


# ---- the report -----------------------------------------------------------------------------


def render(report: dict) -> str:
    m, a = report["machine"], report["args"]
    off, on = report["phases"]
    lines = [
        f"### `quill serve`, writers growing documents ({a['model']} shape, {a['replicas']} replica(s))",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, torch "
        f"{m['torch']}, transformers {m['transformers']}; {m['date_utc']}; engine {report['engine']}.",
        "",
        f"{a['writers']} writers, each growing a held-out document from {a['start_tokens']} to "
        f"{a['end_tokens']} tokens, {a['words_per_turn']} words per turn, {a['think']} s of thought between "
        f"a suggestion and the next request, {a['max_tokens']} greedy tokens per suggestion; the same turns "
        "against the cache off and on. TTFT over resends (turn 2 on), by the document's length in tokens.",
        "",
        "| prompt tokens | resends | TTFT p50 off | TTFT p50 on | on / off | TTFT p99 off | TTFT p99 on |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key in off["ttft_by_length"]:
        o, n = off["ttft_by_length"][key], on["ttft_by_length"][key]
        if not o["n"]:
            continue
        ratio = f"{n['p50_s'] / o['p50_s']:.2f}" if o["p50_s"] and n["p50_s"] is not None else "-"
        lines.append(f"| {key} | {o['n']} | {o['p50_s']} s | {n['p50_s']} s | {ratio} | {o['p99_s']} s | {n['p99_s']} s |")
    lines += [
        "",
        "| cache | requests | errors | tokens/s | prompt tokens | from the cache | share of resent prompt tokens |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in (off, on):
        lines.append(f"| {p['phase']} | {p['requests']} | {p['errors']} | {p['tok_s']} | {p['prompt_tokens']} | "
                     f"{p['cache_hit_tokens']} | {p['resent_hit_ratio']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    set_torch_env()  # before torch loads, and inherited by the children: as `quill serve` runs
    args = parse_args(argv)
    if args.workload == "burst":
        from bench.burst import run

        return run(args, argv)
    from bench.engine import engine_version
    from training.data import load_tokenizer

    tokenizer = load_tokenizer()
    writers = make_writers(args, tokenizer)
    token_counts = {doc: len(tokenizer.encode(doc)) for turns in writers for doc in turns}
    print(f"{len(writers)} writers, {sum(map(len, writers))} requests", flush=True)
    with tempfile.TemporaryDirectory(prefix="quill-bench-serve-") as tmp:
        workdir = Path(tmp)
        checkpoint = make_checkpoint(args.model, workdir / "model", args.seed)
        phases = []
        for name in ("cache off", "cache on"):
            phases.append(run_phase(name, checkpoint, args, writers, token_counts, workdir))
            print(f"{name}: {json.dumps({k: v for k, v in phases[-1].items() if k != 'records'})}", flush=True)
    report = {
        "command": "quill bench serve " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": machine_info(), "engine": engine_version(), "args": {k: v for k, v in vars(args).items() if k != "think_range"},
        "phases": phases,
    }
    print(render(report))
    key = args.section or f"serve-writers-{args.model}-{args.replicas}r"
    if args.out:  # the table and its raw numbers, kept together
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / f"{key}.json").write_text(json.dumps(report, indent=1))
        write_section(Path(args.out), key, render(report))
    return 0 if all(p["errors"] == 0 for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
