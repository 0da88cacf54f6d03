"""Faults a server meets in production, done for real: a frozen Redis (SIGSTOP, not down: the
worst case, every call waits for its timeout).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from starlette.testclient import TestClient

from serve_app.breaker import CircuitBreaker
from serve_app.cache import LeaderGone, RedisStore, Result
from serve_app.config import parse_registry
from serve_app.ingress import LocalBackend, Service, create_app
from serve_app.model_server import ModelServer
from tests.processes import free_port, wait_until


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

