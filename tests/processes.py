"""Start and stop the real processes integration tests talk to: `quill serve` as a user runs it,
and any other server (prometheus, moto, `ray start`) in its own session so nothing leaks.

One place for this, so every integration test starts Quill the same way:

    with quill_serve(registry_path, tmp_path) as server:
        httpx.get(server.url + "/readyz")
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from bench.serve import kill_session
from serve_app import local_ray

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 240  # a loaded 2-core box has needed ~70 s


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """`n` different free ports, for servers that bind them seconds from now: below the kernel's
    ephemeral range (`local_ray.free_port`), where no connection takes one meanwhile. Asked one
    at a time, the same port could come twice (a worker node once got it for two of its agents,
    and `ray start` refused to run): each is new."""
    ports: list[int] = []
    while len(ports) < n:
        port = local_ray.free_port()
        if port not in ports:
            ports.append(port)
    return ports


def kill_group(proc: subprocess.Popen, grace: float = 45) -> None:
    """SIGTERM to the process itself (`quill serve` drains and takes its own Ray down: 7.7 s
    here, against about 40 s when every Ray process got the signal at once and the server could
    no longer reach them), then SIGKILL for everything in its session (`kill_session`: Ray's
    processes, and the HAProxy a Serve actor starts, inherit it).

    grace=0: SIGKILL at once, for a fixture's teardown where the stop is not what is tested
    (test_api_serve, test_faults and test_cluster test `quill serve`'s own stop)."""
    if proc.poll() is None and grace > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    kill_session(proc)


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


# Runs its arguments as a command in a process group of its own and exits with its status: a
# shell's job, or a service a supervisor stops by its group (the session stays the caller's).
IN_A_GROUP = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.Popen(sys.argv[1:], process_group=0).wait())"]


def start_quill_serve(registry: Path, workdir: Path, *args: str, env: dict | None = None,
                      timeout: float = STARTUP_TIMEOUT, launcher: list[str] = ()) -> QuillServer:
    """`quill serve --registry REGISTRY --port <free>` in its own session; returns once it prints
    that it is serving (every model loaded). Fails the test with the log tail otherwise.
    `launcher` (IN_A_GROUP) starts it under another process of the session instead of leading it."""
    port = free_port()
    full_env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    full_env.pop("RAY_ADDRESS", None)
    full_env.update(env or {})
    log_path = workdir / f"serve-{port}.log"
    quill = Path(sys.executable).with_name("quill")  # the installed entry point, as a user runs it
    cmd = [str(quill)] if quill.exists() else [sys.executable, "-m", "serve_app.cli"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*launcher, *cmd, "serve", "--registry", str(registry), "--port", str(port), *args],
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
        kill_group(server.proc, grace=0)


def wait_until(what: str, check, timeout: float, every: float = 0.5):
    """Poll `check()` until it returns something truthy, and return that; fail the test naming
    `what` (and the last error `check` raised, if any) when `timeout` seconds pass first."""
    deadline, last_error = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - a service still starting; reported on timeout
            last_error = exc
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_error!r})" if last_error else ""))



class Completion(threading.Thread):
    """One POST /v1/completions (streamed or not) read in the background, as a client would:
    its status, headers, body text and SSE events (event, data); `error` if the connection was
    cut instead of answered."""

    def __init__(self, url: str, body: dict, timeout: float = 180):
        super().__init__(daemon=True)
        self.url, self.body, self.timeout = url, body, timeout
        self.status, self.headers, self.events, self.text, self.error = None, {}, [], "", None
        self.start()

    def run(self):
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=self.timeout) as r:
                self.status, self.headers = r.status_code, r.headers
                event = None
                for line in r.iter_lines():
                    self.text += line + "\n"
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        self.events.append((event, line[6:]))
                        event = None
        except Exception as exc:  # noqa: BLE001 - a cut connection: the caller asserts on it
            self.error = exc

@dataclass
class RayCluster:
    """Ray nodes started with `ray start` on this machine; see `ray_cluster`."""

    address: str  # the GCS address: `ray.init(address=...)`, `quill serve --address`
    dashboard: str  # the head's dashboard URL, where Ray's state API answers
    workdir: Path
    temp_dir: Path
    nodes: list[subprocess.Popen]
    env: dict[str, str] = field(default_factory=dict)  # set on every node, over os.environ

    def start_node(self, *args: str) -> subprocess.Popen:
        """`ray start --block ARGS` in its own session. Every node gets its own agent ports: the
        nodes share this machine, and other people's Rays may hold Ray's default ports."""
        ports = ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                 "--metrics-export-port")
        cmd = [str(Path(sys.executable).with_name("ray")), "start", "--block", "--disable-usage-stats",
               "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.temp_dir),
               "--object-store-memory", str(200 << 20),
               *(a for p, port in zip(ports, free_ports(len(ports))) for a in (p, str(port))), *args]
        env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_WAIT_POLICY="PASSIVE", **self.env)
        env.pop("RAY_ADDRESS", None)
        with open(self.workdir / f"ray-node-{len(self.nodes)}.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.nodes.append(proc)
        return proc

    def add_worker(self, num_cpus: int, resources: dict[str, float] | None = None) -> subprocess.Popen:
        """A worker node joining the head; returns once the head counts it alive."""
        before = {n.node_id for n in self.alive_nodes()}
        proc = self.start_node("--address", self.address, "--num-cpus", str(num_cpus),
                               *(("--resources", json.dumps(resources)) if resources else ()))
        wait_until("the new Ray worker node to join", lambda: {n.node_id for n in self.alive_nodes()} - before, 90)
        return proc

    # Filtered here, not with the state API's `filters`: Ray 2.60 reports the dead entries a
    # filter drops as "data truncation" and raises.
    def alive_nodes(self) -> list:
        from ray.util.state import list_nodes

        return [n for n in list_nodes(address=self.dashboard, limit=1000) if n.state == "ALIVE"]

    def alive_actors(self) -> list:
        from ray.util.state import list_actors

        return [a for a in list_actors(address=self.dashboard, limit=1000) if a.state == "ALIVE"]


@contextlib.contextmanager
def ray_cluster(workdir: Path, num_cpus: int = 1, env: dict[str, str] | None = None):
    """A head node (`ray start --head`, with its dashboard for the state API) on private ports;
    add workers with `add_worker`; `env` is set on every node. Every node is stopped after by
    killing every process in its session (`kill_group`), never with `ray stop`, which would stop
    every Ray on the machine."""
    # Ray's socket paths must stay under 108 bytes: a short temp dir, not pytest's tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    gcs_port, dashboard_port, client_port = free_ports(3)
    cluster = RayCluster(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", workdir, temp_dir, [], env or {})
    try:
        cluster.start_node("--head", "--port", str(gcs_port), "--num-cpus", str(num_cpus),
                           "--ray-client-server-port", str(client_port), "--include-dashboard", "true",
                           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port))
        wait_until("the Ray head node to answer", cluster.alive_nodes, 90)
        yield cluster
    finally:
        for proc in reversed(cluster.nodes):
            kill_group(proc, grace=0)
        shutil.rmtree(temp_dir, ignore_errors=True)
