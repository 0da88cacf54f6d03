"""Faults a server meets in production, done for real: a frozen Redis (SIGSTOP, not down: the
worst case, every call waits for its timeout), and under one real `quill serve` for the module
(the tests run in order): what its local Ray listens on, and a model replica killed with -9
while requests are running and queued on it.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
from starlette.testclient import TestClient

from serve_app.breaker import CircuitBreaker
from serve_app.cache import LeaderGone, RedisStore, Result
from serve_app.config import parse_registry
from serve_app.ingress import LocalBackend, Service, create_app
from serve_app.model_server import ModelServer
from tests.conftest import save_tiny_gpt2
from bench.serve import _session_members, kill_session
from tests.processes import (IN_A_GROUP, Completion, free_port, quill_serve, registry_entry, start_quill_serve,
                             wait_until, write_registry)


# --- the circuit breaker alone ---------------------------------------------------------------

def test_breaker_opens_on_failure_lets_one_probe_through_after_the_cooldown_and_warns_once(caplog):
    now = [0.0]
    b = CircuitBreaker("thing", cooldown=30, clock=lambda: now[0])
    assert b.allow() and not b.is_open
    with caplog.at_level(logging.DEBUG, logger="quill.breaker"):
        b.failed(TimeoutError("slow"))
        b.failed(TimeoutError("slow"))  # a call that started before it opened
        assert not b.allow()
        now[0] = 29.9
        assert not b.allow()
        now[0] = 30.1
        assert b.allow()  # the probe
        assert not b.allow()  # only one at a time
        b.failed(TimeoutError("still slow"))
        assert not b.allow()
        now[0] = 60.2
        assert b.allow()
        b.abandoned()  # the probe's client left before an answer: someone else may probe
        assert b.allow()
        b.succeeded()
        assert b.allow() and b.allow() and not b.is_open
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "bypassing it for 30 s" in warnings[0].getMessage()
    assert any("answers again" in r.getMessage() for r in caplog.records)


# --- a frozen Redis --------------------------------------------------------------------------

@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test's own (freezing a shared one would stall other tests)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        wait_until("redis-server to answer", lambda: redis.Redis.from_url(url, socket_timeout=1).ping(), 10, every=0.1)
        yield url, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def frozen(proc: subprocess.Popen):
    proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGCONT)


async def test_a_frozen_redis_is_bypassed_by_every_cache_call_after_the_first_timeout(private_redis):
    url, proc = private_redis
    store = RedisStore(url, timeout=1.0, cooldown=30)
    result = Result(["text"], ["length"], [1], 2)
    await store.put("k", result)
    assert await store.get("k") == result
    try:
        with frozen(proc):
            t0 = time.monotonic()
            assert await store.get("k") is None  # pays the timeout once, opens the breaker
            first = time.monotonic() - t0
            t0 = time.monotonic()
            assert await store.get("k") is None
            await store.put("k2", result)
            assert await store.claim("k3") is True  # "generate it yourself"
            await store.publish("k3", "d", "[]")
            with pytest.raises(LeaderGone):
                [d async for d in store.follow("k3")]
            bypassed = time.monotonic() - t0
        assert 0.9 < first < 3 and bypassed < 0.1, (first, bypassed)
    finally:
        await store.close()


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoints):
    registry = parse_registry({"models": [{
        "name": "tiny", "source": str(tiny_checkpoints["tiny-a"]), "cpus_per_replica": 0.5,
        "engine": {"max_batch_size": 8, "max_seq_len": 256}, "limits": {"max_prompt_tokens": 64, "max_tokens": 64},
    }]}, None)
    server = ModelServer(registry.models[0])
    yield registry, server
    server.shutdown()


def test_a_seeded_request_is_served_in_normal_time_while_redis_is_frozen_and_cached_again_after(
        private_redis, tiny_model, caplog):
    """Before the breaker a frozen Redis cost every seeded request one timeout per token (the
    leader publishes each delta): 32 tokens took 72 s."""
    import redis

    url, proc = private_redis
    registry, server = tiny_model
    store = RedisStore(url, timeout=1.0, cooldown=2)
    service = Service(registry, {"tiny": LocalBackend(server)}, store)
    outcomes = []
    service.flights.on_outcome = lambda model, outcome: outcomes.append(outcome)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 32, "stream": True}

    with TestClient(create_app(service)) as client, caplog.at_level(logging.INFO, logger="quill.breaker"):
        def timed(seed: int, **headers) -> float:
            t0 = time.monotonic()
            r = client.post("/v1/completions", json={**body, "seed": seed}, headers=headers)
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]") and "event: error" not in r.text
            return time.monotonic() - t0

        timed(0, **{"Cache-Control": "no-cache"})  # warm-up
        normal = min(timed(1, **{"Cache-Control": "no-cache"}) for _ in range(2))  # no Redis involved
        with frozen(proc):
            first = timed(2)  # pays one timeout (the cache lookup), then Redis is bypassed
            later = timed(3)
        # Generous bounds (a shared 2-core box), far below one timeout per token (32 s).
        assert first < 3 * normal + 1.0 + 2.0, (normal, first)
        assert later < 3 * normal + 2.0, (normal, later)
        assert redis.Redis.from_url(url).keys("quill:cache:*") == []  # nothing stored meanwhile

        time.sleep(2.1)  # the cooldown: the next call probes Redis, which answers again
        timed(4)
        hit = timed(4)
    assert outcomes == ["miss", "miss", "miss", "hit"], outcomes
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "quill.breaker"]
    assert len(warnings) == 1, warnings
    assert any("answers again" in r.getMessage() for r in caplog.records)
    print(f"\nseeded 32-token stream: {normal:.2f} s without Redis; Redis frozen: first {first:.2f} s, "
          f"next {later:.2f} s; after recovery a cache hit in {hit:.2f} s", file=sys.stderr)



# --- one real `quill serve` ------------------------------------------------------------------

REPLICA = "ray::ServeReplica:quill:model-tiny"
DRAIN_S = 3
LONG = 4000  # max_tokens of a stream that must outlive the test's events


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    # n_positions 4096: streams long enough (~20 s here) to be running when the replica dies or
    # the drain ends them.
    ckpt = save_tiny_gpt2(root / "tiny", n_positions=4096)
    registry = write_registry(root / "registry.yaml", [registry_entry(
        "tiny", ckpt, engine="{max_batch_size: 4, max_seq_len: 4096}",
        limits=f"{{max_prompt_tokens: 64, max_tokens: {LONG}, max_n: 4}}")])
    # A short drain, so that the SIGTERM test (the module's last) sees streams outlive it.
    # --host 0.0.0.0, as on a LAN: the listening-socket test checks only HAProxy's frontend takes it.
    with quill_serve(registry, root, "--host", "0.0.0.0", env={"QUILL_DRAIN_SECONDS": str(DRAIN_S)}) as server:
        yield server


def _session_processes(server) -> list[psutil.Process]:
    """`quill serve` and every process it started (Ray's included): they share its session."""
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(p.pid) == server.proc.pid:
                out.append(p)
    return out


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
# What Ray's ActorDiedError text carries: actor ids, pids, addresses, a traceback.
RAY_INTERNALS = re.compile(r"Actor|actor_id|pid|\d+\.\d+\.\d+\.\d+|Traceback|[0-9a-f]{16}")


def test_the_local_ray_listens_on_loopback_only_and_only_the_frontend_on_host(served):
    """`--host 0.0.0.0` is for the HTTP frontend (HAProxy): the replica's own HTTP server and
    Serve's fallback proxy behind it took --host too, open beside HAProxy (and, with ::1, out of
    HAProxy's sight: it forwarded to another local server's replica)."""
    listening = []
    for p in _session_processes(served):
        with contextlib.suppress(psutil.Error):
            name = " ".join(p.cmdline()[:1]) or p.name()
            listening += [(name, c.laddr.ip, c.laddr.port) for c in p.net_connections("inet")
                          if c.status == psutil.CONN_LISTEN]
    names = {n for n, _, _ in listening}
    # Everything of Ray's was looked at: the servers, the agents, Serve's actors and replicas.
    assert {"ray::ServeController", "ray::ProxyActor", "ray::DashboardAgent", REPLICA} <= names, names
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), names
    # HAProxy in front (Serve's throughput-optimized data plane): its HTTP frontend, and the
    # stats page and exporter that Ray's template binds to every interface (local_ray.py).
    assert "ray::HAProxyManager" in names and any(n.endswith("/haproxy") for n in names), names
    port = int(served.url.rsplit(":", 1)[1])
    frontend = [x for x in listening if x[1] not in LOOPBACK and x[2] == port]
    assert frontend and all(n.endswith("/haproxy") for n, _, _ in frontend), listening
    exposed = [x for x in listening if x[1] not in LOOPBACK and x not in frontend]
    assert not exposed, f"listening beyond loopback: {exposed}"
    # Not on Serve's fixed ports (the fallback proxy's 8500 and 9500, replicas from 30000 and
    # 40000): an HAProxy left behind by one local server forwarded there, to the next server.
    fixed = [x for x in listening if x[2] in (8500, 9500, 30000, 40000)]
    assert not fixed, f"on Serve's default ports, shared by every local server: {fixed}"
    print(f"\n{len(listening)} listening sockets in {len(names)} processes, all on loopback", file=sys.stderr)


def test_haproxy_of_a_local_ray_binds_everything_but_its_frontend_to_loopback(monkeypatch):
    """Ray's template binds HAProxy's stats page and exporter to every interface; a local Ray's
    setup hook rewrites them, and leaves a cluster's HAProxy (no QUILL_RAY_LOOPBACK) alone."""
    from ray.serve._private import haproxy, proxy, replica

    from serve_app import local_ray

    original = haproxy.HAPROXY_CONFIG_TEMPLATE
    monkeypatch.setattr(haproxy, "HAPROXY_CONFIG_TEMPLATE", original)
    monkeypatch.setattr(replica, "add_port_to_grpc_server", replica.add_port_to_grpc_server)
    monkeypatch.setattr(replica, "start_asgi_http_server", replica.start_asgi_http_server)
    monkeypatch.setattr(proxy, "start_asgi_http_server", proxy.start_asgi_http_server)
    monkeypatch.delenv(local_ray.ENV, raising=False)
    local_ray.setup_worker()
    assert haproxy.HAPROXY_CONFIG_TEMPLATE == original

    monkeypatch.setenv(local_ray.ENV, "1")
    local_ray.setup_worker()
    binds = [line.strip() for line in haproxy.HAPROXY_CONFIG_TEMPLATE.splitlines() if line.strip().startswith("bind ")]
    # The HTTP (and gRPC) frontends bind to --host; nothing else may bind beyond loopback.
    elsewhere = [b for b in binds if not b.startswith("bind 127.0.0.1:") and "frontend_host }}:" not in b]
    assert len(binds) >= 4 and not elsewhere, binds


def test_quill_serve_stops_its_own_haproxy_and_no_other(tmp_path):
    """HAProxy outlived a `quill serve` whose Serve shutdown timed out (SIGTERM while loading)
    or that a second Ctrl-C ended, holding --port and answering 500s. At exit, `quill serve`
    kills the HAProxy of its node (Serve keeps its files under the node id), not another's."""
    from serve_app import local_ray

    fake = tmp_path / "bin" / "haproxy"  # `tail -f` named haproxy: runs until killed
    fake.parent.mkdir()
    fake.symlink_to(shutil.which("tail"))
    procs = {}
    for node in ("a" * 56, "b" * 56):
        cfg = tmp_path / "haproxy-serve" / node / "haproxy.cfg"
        cfg.parent.mkdir(parents=True)
        cfg.touch()
        procs[node] = subprocess.Popen([str(fake), "-f", str(cfg)])
    try:
        wait_until("both started", lambda: all(p.poll() is None for p in procs.values()), 5)
        assert local_ray.stop_haproxy("a" * 56) == 1
        assert procs["a" * 56].wait(10) == -signal.SIGKILL
        assert procs["b" * 56].poll() is None
        # Its files go with it (every run left its folder behind); the other's stay.
        assert not (tmp_path / "haproxy-serve" / ("a" * 56)).exists()
        assert (tmp_path / "haproxy-serve" / ("b" * 56) / "haproxy.cfg").exists()
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def _readyz(server, reasons: set | None = None) -> tuple[int, dict]:
    r = httpx.get(server.url + "/readyz", timeout=10)
    body = r.json()
    if reasons is not None and r.status_code == 503:
        reasons.add(json.dumps(body["error"].get("reasons")))
    return r.status_code, body.get("models") or body["error"].get("models") or body["error"]


class _ReadyzProbes(threading.Thread):
    """/readyz every 0.25 s in the background, as a readiness probe would: (time, answer)."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.answers, self.reasons, self.stopped = server, [], set(), threading.Event()
        self.start()

    def run(self):
        while not self.stopped.wait(0.25):
            try:
                self.answers.append((time.monotonic(), _readyz(self.server, self.reasons)))
            except Exception as exc:  # noqa: BLE001 - kept, for the failure message
                self.answers.append((time.monotonic(), repr(exc)))

    def __repr__(self) -> str:
        return repr(sorted({str(a) for _, a in list(self.answers)}))

    def first(self, answer, after: float = 0.0) -> float | None:
        return next((t for t, a in list(self.answers) if a == answer and t > after), None)

    def stop(self):
        self.stopped.set()
        self.join(15)


def _gauge(server, name: str) -> float:
    """The sum of a gauge's series on the server's /metrics (reported by the replicas every 2 s)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def _replica_process(server) -> psutil.Process:
    replicas = [p for p in _session_processes(server) if _cmd(p).startswith(REPLICA)]
    assert len(replicas) == 1, replicas
    return replicas[0]


def _cmd(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(p.cmdline())
    return ""


def test_a_killed_replica_fails_its_requests_with_503_and_readyz_names_the_model_until_replaced(served):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": LONG}
    # 4 streams fill the batch; a fifth and 2 non-streaming requests then wait in the engine's
    # queue on the same replica (its gauge says so), not in Serve's router.
    streams = [Completion(served.url, {**body, "stream": True}) for _ in range(4)]
    wait_until("the batch's first tokens", lambda: all(len(s.events) >= 3 for s in streams), 60, every=0.05)
    streams.append(Completion(served.url, {**body, "stream": True}))
    whole = [Completion(served.url, body) for _ in range(2)]
    wait_until("3 requests queued on the replica", lambda: _gauge(served, "quill_requests_waiting") >= 3, 60)
    replica = _replica_process(served)
    probes = _ReadyzProbes(served)
    replica.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    # Sent before Serve knows: it is routed to the dead replica, or held for the new one.
    late = Completion(served.url, {**body, "max_tokens": 5})

    for r in streams + whole + [late]:
        r.join(120)
        assert not r.is_alive(), "a request neither finished nor failed 120 s after its replica died"
        assert r.error is None, f"the connection was cut instead of ending with an error: {r.error!r}"
        if r is whole[-1]:
            ended = time.monotonic() - killed  # every request the dead replica held has its answer
    outcomes = []
    for r in streams + whole + [late]:
        if r.status == 200 and r.body.get("stream"):
            assert r.events[-1] == (None, "[DONE]"), r.events[-3:]
            event, data = r.events[-2]
            if event != "error":
                outcomes.append("completed")
                continue
            error = json.loads(data)["error"]
            outcomes.append("error event")
        elif r.status == 200:
            outcomes.append("completed")
            continue
        else:
            error = json.loads(r.text)["error"]
            assert r.status == 503 and r.headers.get("retry-after"), (r.status, r.headers)
            outcomes.append("503")
        assert error["type"] == "model_unavailable" and "'tiny'" in error["message"], error
        assert not RAY_INTERNALS.search(error["message"]), error  # the details are in the log only
    # Running streams: the error event; queued or non-streaming: the 503.
    assert outcomes[:4] == ["error event"] * 4 and outcomes[4:7] == ["503"] * 3, outcomes

    unready = wait_until(f"/readyz to name the model as down (it said {probes}, since the kill)",
                         lambda: probes.first((503, {"tiny": False})), 60)
    recovered = wait_until("/readyz to be ready once Serve has replaced the replica",
                           lambda: probes.first((200, {"tiny": True}), after=unready), 180)
    probes.stop()
    unready, recovered = unready - killed, recovered - killed
    # Why: the replica states Serve reports, e.g. {"tiny": "no replica running: 1 starting"}.
    assert all(json.loads(r)["tiny"].startswith("no replica running") for r in probes.reasons), probes.reasons
    r = httpx.post(served.url + "/v1/completions", json={**body, "max_tokens": 5}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    print(f"\n/readyz answers after the kill: {probes}; reasons: {sorted(probes.reasons)}", file=sys.stderr)
    print(f"\nreplica killed: {outcomes}; all ended {ended:.1f} s after, /readyz 503 after {unready:.1f} s, "
          f"200 again after {recovered:.1f} s", file=sys.stderr)


def _draining(server) -> httpx.Response | None:
    r = httpx.get(server.url + "/readyz", timeout=10)
    return r if r.status_code == 503 and r.json()["error"]["type"] == "shutting_down" else None


async def _websocket(url: str, generate: dict | None, log: list) -> None:
    """A WebSocket that asks for one generation (or none) and records everything until closed."""
    import websockets

    async with websockets.connect(url.replace("http://", "ws://") + "/v1/stream") as ws:
        if generate:
            await ws.send(json.dumps(generate))
        try:
            async for raw in ws:
                log.append(json.loads(raw))
        except websockets.ConnectionClosed:
            pass
        log.append(("closed", ws.close_code))


def test_sigterm_drains_new_requests_get_503_open_ones_finish_or_end_readably(served):
    """Runs last: it stops the module's server. Before the drain, SIGTERM cut every stream at the
    TCP level within 0.4 s (no error event, no [DONE]; WebSockets closed with 1006)."""
    body = {"model": "tiny", "prompt": "Once upon a time", "stream": True}
    long_streams = [Completion(served.url, {**body, "max_tokens": LONG}) for _ in range(2)]
    ws_logs: list[list] = [[], []]
    generate = {"type": "generate", "id": "w", "model": "tiny", "prompt": "Once", "max_tokens": LONG, "every": 1}

    async def two_sockets():
        await asyncio.gather(_websocket(served.url, generate, ws_logs[0]), _websocket(served.url, None, ws_logs[1]))

    sockets = threading.Thread(target=asyncio.run, args=(two_sockets(),), daemon=True)
    sockets.start()
    wait_until("the streams' first tokens", lambda: all(len(s.events) >= 3 for s in long_streams) and ws_logs[0], 60,
               every=0.05)
    short = Completion(served.url, {**body, "max_tokens": 40})  # finishes within the grace period
    wait_until("the short stream's first token", lambda: short.events, 30, every=0.02)

    served.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    # A load balancer's view: /readyz turns 503 once the ingress drains.
    readyz = wait_until("the ingress to drain", lambda: _draining(served), 20, every=0.05)
    refused = httpx.post(served.url + "/v1/completions", json={**body, "max_tokens": 5}, timeout=30)

    for s in long_streams + [short]:
        s.join(DRAIN_S + 30)
        assert s.error is None, f"cut at the TCP level: {s.error!r}"
    sockets.join(DRAIN_S + 30)
    assert served.proc.wait(60) == 0, served.log_text()[-3000:]
    took = time.monotonic() - sent

    assert refused.status_code == 503 and refused.json()["error"]["type"] == "shutting_down", refused.text
    assert refused.headers.get("retry-after") and readyz.headers.get("retry-after")
    assert short.events[-1] == (None, "[DONE]") and '"finish_reason":"length"' in short.events[-2][1], short.events[-3:]
    for s in long_streams:
        assert s.events[-1] == (None, "[DONE]"), s.events[-3:]
        event, data = s.events[-2]
        assert event == "error" and json.loads(data)["error"]["type"] == "shutting_down", s.events[-3:]
    running, idle = ws_logs
    assert running[-1] == ("closed", 1001) and idle == [("closed", 1001)], (running[-3:], idle)
    assert running[-2]["type"] == "error" and running[-2]["error"]["type"] == "shutting_down", running[-3:]
    assert DRAIN_S <= took < DRAIN_S + 30, took
    print(f"\nSIGTERM with 3 streams and 2 WebSockets open: drained and exited in {took:.1f} s "
          f"(grace {DRAIN_S} s); the long streams had {[len(s.events) for s in long_streams]} events", file=sys.stderr)


def test_a_readiness_probe_asks_serve_once_for_all_models():
    from types import SimpleNamespace

    from serve_app.app import HandleBackend, ServeStatus

    calls = []

    def fetch():
        calls.append(1)
        time.sleep(0.05)  # a round trip to Serve's controller: the askers overlap
        # Keyed by the state's name, as serve.status() gives them.
        deployments = {"model-a": SimpleNamespace(replica_states={"RUNNING": 1}),
                       "model-b": SimpleNamespace(replica_states={"STARTING": 1, "RUNNING": 0})}
        return SimpleNamespace(applications={"quill": SimpleNamespace(deployments=deployments)})

    registry = parse_registry({"models": [{"name": n, "source": "hf://gpt2"} for n in ("a", "b")]}, None)
    status = ServeStatus(fetch)
    backends = {m.name: HandleBackend(SimpleNamespace(app_name="quill", deployment_name=f"model-{m.name}"), m, status)
                for m in registry.models}
    service = Service(registry, backends)

    assert asyncio.run(service.readiness()) == {"a": True, "b": False}
    assert len(calls) == 1
    with TestClient(create_app(service)) as client:
        r = client.get("/readyz")
    assert len(calls) == 2  # asked afresh on the next probe
    error = r.json()["error"]
    assert r.status_code == 503 and error["models"] == {"a": True, "b": False}, r.text
    assert error["reasons"] == {"b": "no replica running: 1 starting"}
    assert error["message"] == "models not ready: b (no replica running: 1 starting)"

    def broken():
        raise ConnectionError("controller restarting")

    service.backends = {n: HandleBackend(b.handle, b.entry, ServeStatus(broken)) for n, b in backends.items()}
    assert asyncio.run(service.readiness()) == {"a": False, "b": False}
    assert service.backends["a"].not_ready_reason == "Serve's controller did not answer"


async def test_the_drain_lets_short_streams_finish_and_ends_the_rest_without_cancelling_their_consumers():
    from serve_app.drain import Drain
    from serve_app.errors import ApiError

    drain = Drain()

    async def endless():  # a generation the grace period cannot wait for
        yield 1
        await asyncio.sleep(3600)

    async def short():
        yield 1
        await asyncio.sleep(0.05)
        yield 2

    got: dict[str, list] = {"endless": [], "short": [], "busy": []}

    async def consume(name, stream, pause=0.0):
        try:
            async for x in drain.track(stream):
                got[name].append(x)
                await asyncio.sleep(pause)  # `busy`: writing to a slow client when the drain ends it
            got[name].append("done")
        except ApiError as exc:
            got[name].append(exc.type)
        got[name].append("went on")  # the task itself was not cancelled: it can still answer

    tasks = [asyncio.create_task(consume("endless", endless())), asyncio.create_task(consume("short", short())),
             asyncio.create_task(consume("busy", endless(), pause=0.6))]
    await asyncio.sleep(0.01)
    done = await drain.drain(0.3)
    await asyncio.gather(*tasks)
    assert got == {"endless": [1, "shutting_down", "went on"], "short": [1, 2, "done", "went on"],
                   "busy": [1, "shutting_down", "went on"]}
    assert (done["open"], done["finished"], done["ended"]) == (3, 1, 2)
    with pytest.raises(ApiError, match="shutting down"):
        drain.refuse_if_draining()
    assert not drain.add_socket(object())  # a WebSocket handshake is refused too


def test_a_sigterm_to_the_servers_process_group_drains_and_leaves_nothing_behind(tmp_path):
    """`kill -TERM -PGID` (supervisord's stopasgroup, `tini -g`) reached Ray's GCS and raylet
    too: the drain could not reach Ray, new requests were served for a minute, and the server
    died of its lost GCS, leaving its HAProxy on --port. Ray's processes now live in a group of
    their own; the signal reaches the server alone, which drains and takes them down."""
    checkpoint = save_tiny_gpt2(tmp_path / "tiny")
    registry = write_registry(tmp_path / "registry.yaml", [registry_entry("tiny", checkpoint)])
    server = start_quill_serve(registry, tmp_path, launcher=IN_A_GROUP)
    try:
        (quill,) = psutil.Process(server.proc.pid).children()
        assert os.getpgid(quill.pid) == quill.pid != os.getsid(quill.pid)  # a job's leader, not its session's
        ray_processes = [p for p in quill.children(recursive=True) if "gcs_server" in p.name() or "raylet" in p.name()]
        assert len(ray_processes) == 2, quill.children(recursive=True)
        assert all(os.getpgid(p.pid) != quill.pid for p in ray_processes)
        os.killpg(quill.pid, signal.SIGTERM)
        refused = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "Hi"}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "shutting_down", refused.text
        assert server.proc.wait(90) == 0, server.log_text()[-3000:]
        log = server.log_text()
        assert "quill serve: drained:" in log and "drain failed" not in log, log[-3000:]
        wait_until("every process of the server gone", lambda: not _session_members(server.proc.pid), 30)
    finally:
        kill_session(server.proc)
