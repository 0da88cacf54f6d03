"""Start and stop the real processes integration tests talk to: `quill serve` as a user runs it,
and any other server (prometheus, moto, `ray start`) in its own session so nothing leaks.

One place for this, so every integration test starts Quill the same way:

    with quill_serve(registry_path, tmp_path) as server:
        httpx.get(server.url + "/readyz")
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 240  # a loaded 2-core box has needed ~70 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen, grace: float = 45) -> None:
    """SIGTERM to the process itself (`quill serve` drains and takes its own Ray down: 7.7 s
    here, against about 40 s when every Ray process got the signal at once and the server could
    no longer reach them), then SIGKILL for the whole process group: Ray's own processes (gcs,
    raylet, workers) were started in the server's session, so none leaks."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


def registry_entry(name: str, source: str | Path, **fields: str) -> str:
    """One registry entry for a tiny checkpoint, sized for this 2-core box; `fields` add or
    replace top-level keys with raw YAML values (e.g. autoscaling="{min_replicas: 0, ...}")."""
    values = {
        "source": str(source),
        "cpus_per_replica": "0.5",
        "autoscaling": "{min_replicas: 1, max_replicas: 1, target_ongoing_requests: 8}",
        "engine": "{max_batch_size: 8, max_seq_len: 256}",
        "defaults": "{max_tokens: 16, temperature: 0.8}",
        "limits": "{max_prompt_tokens: 128, max_tokens: 96, max_n: 4}",
        **fields,
    }
    return f"  - name: {name}\n" + "".join(f"    {k}: {v}\n" for k, v in values.items())


def write_registry(path: Path, entries: list[str]) -> Path:
    path.write_text("models:\n" + "".join(entries))
    return path


@dataclass
class QuillServer:
    url: str
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_quill_serve(registry: Path, workdir: Path, *args: str, env: dict | None = None,
                      timeout: float = STARTUP_TIMEOUT) -> QuillServer:
    """`quill serve --registry REGISTRY --port <free>` in its own session; returns once it prints
    that it is serving (every model loaded). Fails the test with the log tail otherwise."""
    port = free_port()
    full_env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    full_env.pop("RAY_ADDRESS", None)
    full_env.update(env or {})
    log_path = workdir / f"serve-{port}.log"
    quill = Path(sys.executable).with_name("quill")  # the installed entry point, as a user runs it
    cmd = [str(quill)] if quill.exists() else [sys.executable, "-m", "serve_app.cli"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd + ["serve", "--registry", str(registry), "--port", str(port), *args],
            stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True, cwd=REPO,
        )
    server = QuillServer(f"http://127.0.0.1:{port}", proc, log_path)
    t0 = time.monotonic()
    while "Quill is serving" not in server.log_text():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            kill_group(proc)
            pytest.fail(f"quill serve did not start (rc={proc.poll()}):\n{server.log_text()[-4000:]}")
        time.sleep(0.5)
    print(f"\nquill serve ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return server


@contextlib.contextmanager
def quill_serve(registry: Path, workdir: Path, *args: str, env: dict | None = None):
    server = start_quill_serve(registry, workdir, *args, env=env)
    try:
        yield server
    finally:
        kill_group(server.proc)
