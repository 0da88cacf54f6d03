"""Duplicate-request cache with single-flight, in front of the model servers.

A seeded request is deterministic (the engine promises the same text for the same seed whatever
else is in the batch), so identical seeded requests need to be generated only once:

- in flight: the first one (the leader) runs; identical ones that arrive while it runs join it
  and receive the same deltas, from the start, as they come;
- finished: the whole result is kept for `ttl` seconds (at most `max_entries` of them) and later
  identical requests are answered from it at once.

The finished results live in Redis when REDIS_URL is set (shared by every ingress replica),
in this process otherwise. With Redis, single-flight spans ingress replicas too: the replica
that claims a request first generates it and appends its deltas to a Redis stream, and an
identical request on another replica reads that stream (if the leader dies before sending
anything, the follower generates instead). Unseeded sampling is never cached: two unseeded requests are meant
to differ. Results that did not finish normally (cancelled, error) are never stored.

The generation belongs to the flight, not to the first client: if the leader's client goes
away the others keep receiving; it is cancelled only when the last listener leaves.
"""
from __future__ import annotations

import asyncio
import contextvars
import contextlib
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from serve_app.breaker import CircuitBreaker
from serve_app.deltas import Accumulator
from serve_app.engine.types import Delta, SamplingParams
from serve_app.errors import ApiError, to_api_error

log = logging.getLogger("quill.cache")

DEFAULT_TTL = 600.0
DEFAULT_MAX_ENTRIES = 1024
KEY_PREFIX = "quill:cache:"
FLIGHT_PREFIX = "quill:flight:"
STREAM_PREFIX = "quill:stream:"
T = TypeVar("T")


class LeaderGone(Exception):
    """The replica generating a shared request stopped without finishing it."""


def cache_key(model: str, prompt: str | list[int], params: SamplingParams) -> str | None:
    """A stable key for a deterministic request, or None when the request must not be cached."""
    if params.seed is None or params.logprobs is not None:
        return None  # unseeded: not deterministic; logprobs: a Result keeps text, not logprobs
    blob = json.dumps({"model": model, "prompt": prompt, "params": asdict(params)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Result:
    """A finished generation, enough to replay it: one entry per choice."""

    texts: list[str]
    finish_reasons: list[str]
    completion_tokens: list[int]
    prompt_tokens: int

    @classmethod
    def from_deltas(cls, deltas: list[Delta]) -> Result | None:
        """The result of a generation that finished normally, else None (nothing to replay)."""
        if not deltas:
            return None
        acc = Accumulator().add_all(deltas)
        n = max(acc.texts) + 1
        texts, reasons = acc.ordered(n)
        if any(r not in ("stop", "length") for r in reasons):
            return None
        return cls(texts, reasons, [acc.completion.get(i, 0) for i in range(n)], acc.prompt_tokens)

    def deltas(self, request_id: str) -> list[Delta]:
        return [
            Delta(request_id, i, t, (), r, self.prompt_tokens, c)
            for i, (t, r, c) in enumerate(zip(self.texts, self.finish_reasons, self.completion_tokens))
        ]


class MemoryStore:
    """In-process LRU with a TTL: the default, and enough for one ingress replica."""

    def __init__(self, ttl: float = DEFAULT_TTL, max_entries: int = DEFAULT_MAX_ENTRIES):
        self.ttl, self.max_entries = ttl, max_entries
        self._items: OrderedDict[str, tuple[float, Result]] = OrderedDict()

    async def get(self, key: str) -> Result | None:
        item = self._items.get(key)
        if item is None:
            return None
        expires, result = item
        if expires < time.monotonic():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return result

    async def put(self, key: str, result: Result) -> None:
        self._items[key] = (time.monotonic() + self.ttl, result)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    async def close(self) -> None:
        pass


class Bypassed(Exception):
    """Redis was not asked (its breaker is open) or did not answer: take the fallback."""


# A timeout or a lost connection means Redis is unreachable or frozen: open the breaker. Any
# other error (a command Redis refused) is that call's problem alone.
_OUTAGE = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)


class RedisStore:
    """Results in Redis, shared by all ingress replicas. Each entry expires after `ttl`; an
    index sorted by insertion time bounds their number (the oldest are evicted).

    The cache is an optimisation, so Redis failing must never fail or slow a request: every call
    goes through a circuit breaker. A call that times out (Redis frozen, or a network that drops
    packets) or loses its connection opens it; for `cooldown` seconds no call is made at all
    (get finds nothing, put and publish do nothing, claim says "generate it yourself", follow
    gives up as if the leader had gone), then one call probes. Without it a frozen Redis cost
    every seeded request one `timeout` per token (each delta is published)."""

    def __init__(self, url: str, ttl: float = DEFAULT_TTL, max_entries: int = DEFAULT_MAX_ENTRIES,
                 timeout: float = 1.0, cooldown: float = 30.0):
        import redis.asyncio as aioredis

        self.ttl, self.max_entries = ttl, max_entries
        # A healthy Redis answers in milliseconds; `timeout` bounds what the first request of an
        # outage pays before the breaker opens. It must exceed FOLLOW_BLOCK_MS.
        self._r = aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._index = KEY_PREFIX + "index"
        self.breaker = CircuitBreaker("redis (result cache)", cooldown)

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        """One Redis call through the breaker; Bypassed instead of its result when Redis is
        skipped or fails."""
        if not self.breaker.allow():
            raise Bypassed()
        try:
            result = await op()
        except _OUTAGE as exc:
            self.breaker.failed(exc)
            raise Bypassed() from exc
        except Exception as exc:
            self.breaker.succeeded()  # Redis answered, with an error
            log.warning("redis call failed: %s: %s", type(exc).__name__, exc)
            raise Bypassed() from exc
        except BaseException:  # cancelled: the client left before Redis answered
            self.breaker.abandoned()
            raise
        self.breaker.succeeded()
        return result

    async def get(self, key: str) -> Result | None:
        try:
            raw = await self._call(lambda: self._r.get(KEY_PREFIX + key))
        except Bypassed:
            return None
        return Result(**json.loads(raw)) if raw else None

    async def put(self, key: str, result: Result) -> None:
        async def store() -> None:
            now = time.time()
            async with self._r.pipeline(transaction=True) as p:
                p.set(KEY_PREFIX + key, json.dumps(asdict(result)), px=int(self.ttl * 1000))
                p.zadd(self._index, {key: now})
                p.zremrangebyscore(self._index, "-inf", now - self.ttl)  # already expired
                p.zcard(self._index)
                *_, size = await p.execute()
            if size > self.max_entries:
                old = await self._r.zrange(self._index, 0, size - self.max_entries - 1)
                if old:
                    await self._r.delete(*(KEY_PREFIX + k.decode() for k in old))
                    await self._r.zrem(self._index, *old)

        with contextlib.suppress(Bypassed):
            await self._call(store)

    # --- single-flight across ingress replicas ---------------------------------------------
    # The leader holds `quill:flight:<key>` (SET NX with a lease) and appends its deltas to the
    # Redis stream `quill:stream:<key>`; another replica's identical request reads that stream
    # from the start instead of generating. The stream ends with "end", "err" or "gone".

    shared = True
    LEASE_MS = 60_000
    FOLLOW_BLOCK_MS = 500  # how long one XREAD waits for the leader's next deltas

    async def claim(self, key: str) -> bool:
        """True when this process should generate (it holds the lease, or Redis is bypassed)."""
        try:
            return bool(await self._call(lambda: self._r.set(FLIGHT_PREFIX + key, "1", nx=True, px=self.LEASE_MS)))
        except Bypassed:
            return True

    async def publish(self, key: str, kind: str, value: str = "") -> None:
        async def append() -> None:
            stream = STREAM_PREFIX + key
            async with self._r.pipeline(transaction=False) as p:
                p.xadd(stream, {"k": kind, "v": value})
                p.pexpire(stream, self.LEASE_MS)
                if kind == "d":
                    p.pexpire(FLIGHT_PREFIX + key, self.LEASE_MS)  # still alive: renew the lease
                else:
                    p.delete(FLIGHT_PREFIX + key)
                await p.execute()

        with contextlib.suppress(Bypassed):
            await self._call(append)

    async def follow(self, key: str) -> AsyncIterator[Delta]:
        """The leader's deltas from the start; LeaderGone if it vanished without finishing, or
        if Redis stops answering (the follower cannot tell the two apart)."""
        stream, last = STREAM_PREFIX + key, "0-0"

        async def read(block: int | None):
            return await self._call(lambda: self._r.xread({stream: last}, block=block, count=256))

        try:
            while True:
                resp = await read(self.FOLLOW_BLOCK_MS)
                if not resp:
                    if await self._call(lambda: self._r.exists(FLIGHT_PREFIX + key)):
                        continue
                    resp = await read(None)  # it may have just ended
                    if not resp:
                        raise LeaderGone()
                for _, entries in resp:
                    for entry_id, fields in entries:
                        last = entry_id
                        kind, value = fields[b"k"].decode(), fields[b"v"].decode()
                        if kind == "d":
                            for d in json.loads(value):
                                yield Delta(**{**d, "token_ids": tuple(d["token_ids"])})
                        elif kind == "end":
                            return
                        elif kind == "err":
                            raise ApiError.from_dict(json.loads(value))
                        else:
                            raise LeaderGone()
        except Bypassed:
            raise LeaderGone() from None

    async def close(self) -> None:
        await self._r.aclose()


def make_store(redis_url: str | None, ttl: float = DEFAULT_TTL, max_entries: int = DEFAULT_MAX_ENTRIES):
    return RedisStore(redis_url, ttl, max_entries) if redis_url else MemoryStore(ttl, max_entries)


class _Flight:
    """One generation in progress and the deltas it has produced so far."""

    def __init__(self) -> None:
        self.deltas: list[Delta] = []
        self.done = False
        self.error: BaseException | None = None
        self.listeners = 0
        self.changed = asyncio.Event()
        self.task: asyncio.Task | None = None

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


class SingleFlight:
    """Runs each distinct seeded request once and shares it; see the module docstring.

    `on_outcome(model, outcome)` is told "hit", "joined" or "miss" for every seeded request.
    """

    def __init__(self, store=None, on_outcome: Callable[[str, str], None] | None = None):
        self.store = store if store is not None else MemoryStore()
        self.on_outcome = on_outcome or (lambda model, outcome: None)
        self._flights: dict[str, _Flight] = {}

    async def stream(
        self, key: str | None, model: str, request_id: str, start: Callable[[], AsyncIterator[list[Delta]]]
    ) -> AsyncIterator[list[Delta]]:
        """Deltas for this request, in lists (whatever arrived together goes on together):
        generated, joined, or replayed from the cache."""
        if key is None:
            async for batch in start():
                yield batch
            return
        cached = await self.store.get(key)
        if cached is not None:
            self.on_outcome(model, "hit")
            yield cached.deltas(request_id)
            return
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()  # its producer reports "miss" or "joined"
            # In a context of its own: created in this request's, its calls to the model were
            # this request's children, and Ray Serve cancels a request's children when its
            # client disconnects: every request that had joined it then failed.
            flight.task = asyncio.create_task(self._produce(key, model, flight, start), context=contextvars.Context())
        else:
            self.on_outcome(model, "joined")
        flight.listeners += 1
        try:
            seen = 0
            while True:
                if seen < len(flight.deltas):
                    batch, seen = flight.deltas[seen:], len(flight.deltas)
                    yield batch
                if flight.error is not None:
                    raise flight.error
                if flight.done:
                    return
                await flight.changed.wait()
        finally:
            flight.listeners -= 1
            if flight.listeners == 0 and not flight.done and flight.task is not None:
                # The last listener left: nobody wants this generation any more.
                flight.task.cancel()
                if self._flights.get(key) is flight:
                    del self._flights[key]

    async def _produce(
        self, key: str, model: str, flight: _Flight, start: Callable[[], AsyncIterator[list[Delta]]]
    ) -> None:
        shared = getattr(self.store, "shared", False)
        leader = True
        try:
            if shared and not await self.store.claim(key):
                # Another ingress replica is generating this: read its stream instead.
                leader = False
                self.on_outcome(model, "joined")
                try:
                    async for d in self.store.follow(key):
                        flight.deltas.append(d)
                        flight.notify()
                    return
                except LeaderGone:
                    if flight.deltas:
                        # Part of the answer has been sent: it cannot be restarted here. A
                        # retry is answered from the cache or generated afresh.
                        raise ApiError(503, "model_unavailable", "the generation this request shared with "
                                       "an identical one was interrupted; retry") from None
                    leader = await self.store.claim(key)  # nothing sent yet: generate here
            else:
                self.on_outcome(model, "miss")
            publish = shared and leader
            gen = start()
            try:
                async for batch in gen:
                    flight.deltas.extend(batch)
                    flight.notify()
                    if publish:
                        await self.store.publish(key, "d", json.dumps([asdict(d) for d in batch]))
            finally:
                if hasattr(gen, "aclose"):
                    await gen.aclose()  # cancels the generation downstream if we stopped early
            result = Result.from_deltas(flight.deltas)
            if result is not None:
                await self.store.put(key, result)
            if publish:
                await self.store.publish(key, "end")
        except asyncio.CancelledError:
            flight.error = RuntimeError("generation cancelled")
            if shared and leader:
                await self.store.publish(key, "gone")
            raise
        except BaseException as exc:  # shared with every listener, who re-raise it
            flight.error = exc
            if shared and leader:
                await self.store.publish(key, "err", json.dumps(to_api_error(exc).to_dict()))
        finally:
            flight.done = True
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.notify()

    async def close(self) -> None:
        for f in list(self._flights.values()):
            if f.task:
                f.task.cancel()
        await self.store.close()
