"""What an idle `quill serve` costs the machine: CPU and wake-ups a second, by process.

    quill bench idle [--model small | --registry FILE] [--seconds 20] [--settle 10] [--quick] [--out FILE] [--section KEY]

Starts `quill serve` as a user starts it, on the one-model registry of `bench serve --workload
burst` (bench/burst.py) or on `--registry` (yours: what your deployment costs idle), waits until
it serves and `--settle` seconds more, then reads `/proc` twice, `--seconds` apart, for every
process in the server's session (the server and the Ray it starts: GCS, raylet, agents, log
monitor, Serve's actors, HAProxy): each thread's CPU time and context switches (voluntary and
involuntary), and reports them a second, per process.

Why wake-ups and not only CPU: on a small box each one lands on a core that an engine thread is
using, and the engine's threads wait for each other at the end of every op. On the 2-core build
VM, 1,000 wake-ups a second of processes that did nothing else cost the engine beside them about
9% of its speed, and an idle server's ~1,600 about 8% (docs/performance.md).

Linux only (`/proc`).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench.engine import DEFAULT_OUT, RESULTS_DIR, make_checkpoint, write_section
from bench.machine import machine_info
from bench.serve import Server

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="quill bench idle", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["tiny", "small", "medium"], default="small")
    p.add_argument("--registry", type=Path, default=None, help="serve this registry instead of one random-weight --model")
    p.add_argument("--seconds", type=float, default=20.0, help="how long to count")
    p.add_argument("--settle", type=float, default=10.0, help="seconds after the server is ready before counting")
    p.add_argument("--threads", type=int, default=15, help="how many of the busiest threads to list")
    p.add_argument("--quick", action="store_true", help="tiny model, 3 s settle, 3 s count (a smoke run)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file to write the section into ('' = none)")
    p.add_argument("--section", default=None, help="section key in --out (default serve-idle-<model>)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.settle, args.seconds = "tiny", 3.0, 3.0
    if args.seconds <= 0:
        p.error("--seconds must be above 0")
    if args.registry is not None and not args.registry.is_file():
        p.error(f"--registry {args.registry}: no such file")
    return args


def process_name(cmdline: list[str]) -> str:
    """Ray's workers by their title (`ray::ServeReplica:quill:m`); the rest by program and script."""
    if not cmdline:
        return "?"
    if cmdline[0].startswith("ray::"):
        return cmdline[0].split(" ")[0]
    args = cmdline[1:]
    script = next((os.path.basename(a) for a in args if a.endswith(".py")), None)
    if script is None and "-m" in args[:-1]:
        script = args[args.index("-m") + 1]
    if script is None and args and not args[0].startswith("-"):
        script = os.path.basename(args[0])  # an entry point: `python3 .../quill serve`
    return " ".join(filter(None, (os.path.basename(cmdline[0]), script)))


def _thread(pid: str, tid: str) -> tuple[str, float, int]:
    stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat.rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
    switches = sum(int(line.split()[1]) for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
                   if "ctxt_switches:" in line)  # voluntary_ and nonvoluntary_
    return comm, cpu_s, switches


def snapshot(session: int) -> dict[tuple[str, str], tuple[str, str, float, int]]:
    """(pid, tid) -> (process name, thread name, CPU seconds, context switches) for the session."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getsid(int(pid)) != session:
                continue
            name = process_name(Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1] or [])
            for tid in os.listdir(f"/proc/{pid}/task"):
                comm, cpu_s, switches = _thread(pid, tid)
                out[(pid, tid)] = (name, comm, cpu_s, switches)
        except (OSError, ValueError, IndexError):  # a process or thread that ended meanwhile
            continue
    return out


def measure(before: dict, after: dict, seconds: float) -> dict:
    """Per process and per thread: % of one core and wake-ups a second, over the threads seen both times."""
    processes: dict[str, dict] = {}
    threads = []
    for key, (name, comm, cpu_s, switches) in after.items():
        if key not in before:
            continue
        cpu = (cpu_s - before[key][2]) / seconds * 100
        wakeups = (switches - before[key][3]) / seconds
        row = processes.setdefault(name, {"process": name, "cpu_pct": 0.0, "wakeups_per_s": 0.0, "threads": 0})
        row["cpu_pct"] += cpu
        row["wakeups_per_s"] += wakeups
        row["threads"] += 1
        threads.append({"process": name, "thread": comm, "cpu_pct": round(cpu, 2), "wakeups_per_s": round(wakeups, 1)})
    rows = sorted(processes.values(), key=lambda r: -r["wakeups_per_s"])
    for r in rows:
        r["cpu_pct"], r["wakeups_per_s"] = round(r["cpu_pct"], 2), round(r["wakeups_per_s"], 1)
    return {"processes": rows, "threads": sorted(threads, key=lambda t: -t["wakeups_per_s"]),
            "total": {"cpu_pct": round(sum(r["cpu_pct"] for r in rows), 2),
                      "wakeups_per_s": round(sum(r["wakeups_per_s"] for r in rows), 1),
                      "processes": len(rows)}}


def run(args, argv: list[str] | None) -> int:
    from bench import burst

    if not Path("/proc/self/task").is_dir():
        print("quill bench idle: needs Linux's /proc", file=sys.stderr)
        return 2
    entry_args = argparse.Namespace(dtype="auto", writers=32, max_tokens=64)
    report = {"command": "quill bench idle " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
              "machine": machine_info(), "args": {k: getattr(args, k) for k in ("model", "seconds", "settle")}}
    if args.registry:
        report["args"]["model"] = f"registry {args.registry}"
    with tempfile.TemporaryDirectory(prefix="quill-bench-idle-") as tmp:
        workdir = Path(tmp)
        registry = args.registry
        if registry is None:
            checkpoint = make_checkpoint(args.model, workdir / "model", args.seed)
            registry = workdir / "registry.json"
            registry.write_text(json.dumps({"models": [burst.registry_entry(checkpoint, entry_args)]}))  # JSON is YAML
        server = Server(registry, workdir / "serve.log")
        try:
            report["startup_s"] = round(server.wait_ready(), 1)
            time.sleep(args.settle)
            before = snapshot(server.proc.pid)
            time.sleep(args.seconds)
            report.update(measure(before, snapshot(server.proc.pid), args.seconds))
        finally:
            server.stop()
    text = render(report, args.threads)
    print(text)
    if args.out:
        key = args.section or ("serve-idle-registry" if args.registry else f"serve-idle-{args.model}")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / f"{key}.json").write_text(json.dumps(report, indent=1))
        write_section(Path(args.out), key, text)
    return 0


def render(report: dict, top_threads: int = 15) -> str:
    m, a, t = report["machine"], report["args"], report["total"]
    lines = [
        f"### An idle `quill serve`: CPU and wake-ups by process ({a['model']}"
        f"{'' if a['model'].startswith('registry') else ' shape, one model'})",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, torch "
        f"{m['torch']}, transformers {m['transformers']}; {m['date_utc']}.",
        "",
        f"Counted over {a['seconds']:g} s, {a['settle']:g} s after the server was ready ({report['startup_s']} s to start), "
        "no traffic. CPU is % of one core; a wake-up is a context switch of one of the process's threads "
        "(voluntary or not).",
        "",
        f"**Total: {t['cpu_pct']}% of a core, {t['wakeups_per_s']:g} wake-ups a second, {t['processes']} processes.**",
        "",
        "| process | % of a core | wake-ups/s | threads |",
        "| --- | --- | --- | --- |",
        *(f"| {r['process']} | {r['cpu_pct']} | {r['wakeups_per_s']:g} | {r['threads']} |" for r in report["processes"]),
        "",
        f"The {top_threads} threads that wake most:",
        "",
        "| process | thread | % of a core | wake-ups/s |",
        "| --- | --- | --- | --- |",
        *(f"| {r['process']} | {r['thread']} | {r['cpu_pct']} | {r['wakeups_per_s']:g} |"
          for r in report["threads"][:top_threads]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
