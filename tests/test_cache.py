"""The duplicate-request cache and single-flight, in process and against a real redis-server."""
from __future__ import annotations

import asyncio
import uuid

from serve_app.cache import MemoryStore, RedisStore, Result, SingleFlight, cache_key
from serve_app.engine.types import Delta, SamplingParams
from serve_app.errors import ApiError


class FakeModel:
    """Counts generations; each yields `tokens` steps (a list with a delta per choice, as the
    model server does), slowly enough to overlap."""

    def __init__(self, tokens: int = 5, delay: float = 0.02, fail_at: int | None = None):
        self.generations = 0
        self.cancelled = 0
        self.tokens, self.delay, self.fail_at = tokens, delay, fail_at

    def start(self, rid: str = "r", n: int = 1):
        async def gen():
            self.generations += 1
            try:
                for t in range(self.tokens):
                    await asyncio.sleep(self.delay)
                    if self.fail_at == t:
                        raise RuntimeError("boom")
                    last = t == self.tokens - 1
                    yield [Delta(rid, i, f"<{i}:{t}>", (t,), "length" if last else None, 3, t + 1) for i in range(n)]
            except (asyncio.CancelledError, GeneratorExit):
                self.cancelled += 1
                raise

        return gen


def text_of(deltas, index=0):
    return "".join(d.text for d in deltas if d.index == index)


def test_key_only_for_seeded_requests():
    seeded = SamplingParams(max_tokens=5, seed=1)
    assert cache_key("m", "p", seeded) == cache_key("m", "p", SamplingParams(max_tokens=5, seed=1))
    assert cache_key("m", "p", seeded) != cache_key("m", "p", SamplingParams(max_tokens=5, seed=2))
    assert cache_key("m", "p", seeded) != cache_key("other", "p", seeded)
    assert cache_key("m", "p", seeded) != cache_key("m", "q", seeded)
    assert cache_key("m", "p", SamplingParams(max_tokens=5, seed=1, stop=("x",))) != cache_key("m", "p", seeded)
    assert cache_key("m", "p", SamplingParams(max_tokens=5)) is None  # unseeded: never cached


async def test_concurrent_identical_requests_generate_once():
    model, outcomes = FakeModel(), []
    flights = SingleFlight(MemoryStore(), on_outcome=lambda m, o: outcomes.append(o))
    results = await asyncio.gather(*(
        _collect(flights, "k", model.start()) for _ in range(10)
    ))
    assert model.generations == 1
    assert all(text_of(r) == text_of(results[0]) for r in results)
    assert text_of(results[0]) == "".join(f"<0:{t}>" for t in range(5))
    assert outcomes.count("miss") == 1 and outcomes.count("joined") == 9
    # Finished: answered from the store, one delta per choice, no generation.
    again = await _collect(flights, "k", model.start())
    assert model.generations == 1 and outcomes[-1] == "hit"
    assert text_of(again) == text_of(results[0]) and again[-1].finish_reason == "length"
    assert again[-1].completion_tokens == 5 and again[-1].prompt_tokens == 3


async def _collect(flights, key, start, model="m"):
    return [d async for batch in flights.stream(key, model, "rid", start) for d in batch]


async def test_unseeded_requests_are_never_shared():
    model = FakeModel()
    flights = SingleFlight(MemoryStore())
    await asyncio.gather(*(_collect(flights, None, model.start()) for _ in range(3)))
    assert model.generations == 3


async def test_late_joiner_gets_the_whole_stream_from_the_start():
    model = FakeModel(tokens=6, delay=0.03)
    flights = SingleFlight(MemoryStore())
    first = asyncio.create_task(_collect(flights, "k", model.start(n=2)))
    await asyncio.sleep(0.1)  # a few tokens in
    late = await _collect(flights, "k", model.start(n=2))
    early = await first
    assert model.generations == 1
    for i in (0, 1):
        assert text_of(late, i) == text_of(early, i) == "".join(f"<{i}:{t}>" for t in range(6))


async def test_leader_leaving_does_not_stop_the_others_but_the_last_one_does():
    model = FakeModel(tokens=20, delay=0.02)
    flights = SingleFlight(MemoryStore())
    leader = flights.stream("k", "m", "r1", model.start())
    follower = asyncio.create_task(_collect(flights, "k", model.start()))
    await anext(leader)
    await leader.aclose()  # the first client went away
    got = await follower
    assert model.generations == 1 and model.cancelled == 0
    assert len(text_of(got).split(">")) - 1 == 20
    # Now a flight whose only listener leaves: the generation is cancelled, nothing stored.
    lone = flights.stream("k2", "m", "r", model.start())
    await anext(lone)
    await lone.aclose()
    await asyncio.sleep(0.05)
    assert model.cancelled == 1
    assert await flights.store.get("k2") is None


async def test_failures_reach_every_listener_and_are_not_cached():
    model = FakeModel(tokens=5, fail_at=2)
    flights = SingleFlight(MemoryStore())
    results = await asyncio.gather(*(_collect(flights, "k", model.start()) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    assert await flights.store.get("k") is None
    ok = FakeModel()
    assert text_of(await _collect(flights, "k", ok.start())) and ok.generations == 1


async def test_memory_store_ttl_and_size_bound():
    store = MemoryStore(ttl=0.1, max_entries=2)
    r = Result(["a"], ["stop"], [1], 2)
    await store.put("1", r)
    await store.put("2", r)
    await store.get("1")  # recently used
    await store.put("3", r)
    assert await store.get("2") is None and await store.get("1") == r and await store.get("3") == r
    await asyncio.sleep(0.15)
    assert await store.get("1") is None


def test_incomplete_results_are_not_cacheable():
    deltas = [Delta("r", 0, "a", (), "cancelled", 1, 1)]
    assert Result.from_deltas(deltas) is None
    assert Result.from_deltas([Delta("r", 0, "a", (), None, 1, 1)]) is None


# --- against a real redis-server ---

async def test_redis_store_ttl_and_size_bound(redis_url):
    import redis.asyncio as aioredis

    prefix = uuid.uuid4().hex
    store = RedisStore(redis_url, ttl=5, max_entries=3)
    r = Result(["hello", "there"], ["stop", "length"], [2, 4], 7)
    try:
        for i in range(5):
            await store.put(f"{prefix}{i}", r)
        raw = aioredis.from_url(redis_url)
        assert 0 < await raw.pttl(f"quill:cache:{prefix}4") <= 5000
        assert await store.get(f"{prefix}4") == r
        # Only the newest `max_entries` survive (the index is shared; ours are the newest).
        assert await store.get(f"{prefix}0") is None and await store.get(f"{prefix}1") is None
        assert await raw.zcard("quill:cache:index") <= 3
        await raw.aclose()
    finally:
        await store.close()


async def test_ten_identical_requests_one_generation_with_redis(redis_url):
    model, outcomes = FakeModel(), []
    store = RedisStore(redis_url, ttl=30)
    try:
        flights = SingleFlight(store, on_outcome=lambda m, o: outcomes.append(o))
        key = uuid.uuid4().hex
        results = await asyncio.gather(*(_collect(flights, key, model.start()) for _ in range(10)))
        assert model.generations == 1 and outcomes.count("miss") == 1
        assert len({text_of(r) for r in results}) == 1
        # A second ingress (another process, same Redis) answers from the shared store.
        other = SingleFlight(RedisStore(redis_url, ttl=30))
        again = await _collect(other, key, model.start())
        assert model.generations == 1 and text_of(again) == text_of(results[0])
        await other.close()
    finally:
        await store.close()


async def test_redis_outage_degrades_to_generating(tmp_path):
    model = FakeModel()
    flights = SingleFlight(RedisStore("redis://127.0.0.1:1/0"))  # nothing listens on port 1
    got = await _collect(flights, "k", model.start())
    assert text_of(got) and model.generations == 1
    await flights.close()


async def test_single_flight_across_ingress_replicas_through_redis(redis_url):
    """Two SingleFlights with their own Redis connections stand for two ingress replicas."""
    model = FakeModel(tokens=8, delay=0.03)
    outcomes = []
    a = SingleFlight(RedisStore(redis_url, ttl=30), on_outcome=lambda m, o: outcomes.append(("a", o)))
    b = SingleFlight(RedisStore(redis_url, ttl=30), on_outcome=lambda m, o: outcomes.append(("b", o)))
    key = uuid.uuid4().hex
    try:
        first = asyncio.create_task(_collect(a, key, model.start(n=2)))
        await asyncio.sleep(0.1)  # a is generating
        results = await asyncio.gather(first, *(_collect(x, key, model.start(n=2)) for x in (a, b, b, a)))
        assert model.generations == 1
        for i in (0, 1):
            assert len({text_of(r, i) for r in results}) == 1
        assert ("a", "miss") in outcomes and ("b", "joined") in outcomes
        assert all(r[-1].finish_reason == "length" for r in results)
    finally:
        await a.close()
        await b.close()


async def test_a_follower_generates_itself_when_the_leader_vanishes(redis_url):
    import redis.asyncio as aioredis

    key = uuid.uuid4().hex
    raw = aioredis.from_url(redis_url)
    await raw.set(f"quill:flight:{key}", "1", px=1200)  # a "leader" that dies before sending anything
    await raw.aclose()
    model = FakeModel()
    flights = SingleFlight(RedisStore(redis_url, ttl=30))
    try:
        got = await asyncio.wait_for(_collect(flights, key, model.start()), 20)
        assert model.generations == 1 and text_of(got) == "".join(f"<0:{t}>" for t in range(5))
    finally:
        await flights.close()


async def test_a_leader_failure_reaches_followers_on_other_replicas(redis_url):
    model = FakeModel(tokens=6, delay=0.03, fail_at=3)
    a, b = SingleFlight(RedisStore(redis_url)), SingleFlight(RedisStore(redis_url))
    key = uuid.uuid4().hex
    try:
        leader = asyncio.create_task(_collect(a, key, model.start()))
        await asyncio.sleep(0.05)
        follower = asyncio.create_task(_collect(b, key, model.start()))
        results = await asyncio.gather(leader, follower, return_exceptions=True)
        assert model.generations == 1
        assert isinstance(results[0], RuntimeError) and "boom" in str(results[0]), results
        # What crosses Redis is the client-facing error: a generic 500, the details left in the log.
        assert isinstance(results[1], ApiError) and results[1].status == 500 and "boom" not in str(results[1])
    finally:
        await a.close()
        await b.close()
