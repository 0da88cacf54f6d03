"""ModelServer: one registry entry's engine behind an async streaming call.

A thin adapter, usable without Ray (tests build it directly). `app.py` wraps it in a Ray Serve
deployment, one per registry entry; the engine is loaded in the constructor, so Serve sends a
replica no traffic until its model is in memory.

`generate()` yields the engine's `Delta`s. A request the engine refuses yields one `ApiError`
instead of raising, because an exception crossing a Ray boundary arrives wrapped in a
traceback-laden RayTaskError; the ingress raises it again. The tokenizer calls (`tokenize`,
`detokenize`, `tokenizer_info`) answer with what the model reads; `detokenize` returns its
`ApiError` the same way.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sys
import threading
import time
from typing import Any, AsyncIterator, Callable

from serve_app.config import ModelEntry
from serve_app.deltas import Accumulator
from serve_app.errors import ApiError, to_api_error
from serve_app.engine.types import Delta, EngineOverloaded, GenerationRequest, RequestRejected
from serve_app.metrics import MemoryMetrics, Metrics

log = logging.getLogger("quill.model_server")
SWITCH_INTERVAL_S = 0.0005


def _default_engine(entry: ModelEntry):
    from serve_app.engine import AsyncEngine, Engine
    from serve_app.weights import local_entry

    # The engine reads folders: an s3:// or gs:// checkpoint is synced to this node's cache first.
    config = local_entry(entry).engine_config()
    return AsyncEngine(lambda: Engine(config))  # built on the thread that steps it


def _fingerprint(tokenizer) -> str:
    """What tells two models' tokenizers apart: its whole definition (vocabulary, merges,
    normalisation), as the tokenizers library writes it, and its special tokens (the same
    vocabulary with no end-of-text token encodes an empty prompt differently)."""
    spec = (tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer")
            else repr(sorted(tokenizer.get_vocab().items())))
    special = repr(sorted((name, str(value)) for name, value in tokenizer.special_tokens_map.items()))
    return hashlib.sha256((spec + special).encode()).hexdigest()


class ModelServer:
    def __init__(self, entry: ModelEntry | dict[str, Any], engine_factory: Callable[[ModelEntry], Any] | None = None):
        self.entry = entry if isinstance(entry, ModelEntry) else ModelEntry.model_validate(entry)
        self.name = self.entry.name
        # The engine thread lets go of the GIL inside every torch op and must take it back
        # after each, a few hundred times a step; while the replica's event loop and Ray's
        # threads hold it, Python's default 5 ms switch interval is how long it may wait.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.metrics = Metrics()
        self.memory = MemoryMetrics()
        t0 = time.perf_counter()
        self.engine = (engine_factory or _default_engine)(self.entry)
        self.load_seconds = time.perf_counter() - t0
        self._gauges_at = 0.0
        self._tokenizer_sha256: str | None = None  # computed at the first tokenizer_info call
        # Ray exports a gauge only while it is being set, so an idle replica would vanish from
        # /metrics; a small thread re-reads the engine's queue lengths every second.
        self._stop = threading.Event()
        self._gauge_thread = threading.Thread(target=self._refresh_gauges, name="quill-gauges", daemon=True)
        self._gauge_thread.start()
        # `dtype: auto` decides by hardware, so say what it chose.
        runner = getattr(self._core, "runner", None)
        self.weights = f"{str(runner.dtype).removeprefix('torch.')} on {runner.device}" if runner else "unknown"
        log.info("model %s loaded in %.1f s (%s)", self.name, self.load_seconds, self.weights)

    @property
    def _core(self):
        """The engine itself (inside the AsyncEngine that steps it, or a test's bare engine)."""
        return getattr(self.engine, "engine", self.engine)

    async def ready(self) -> dict:
        return {"model": self.name, "load_seconds": round(self.load_seconds, 3), "weights": self.weights,
                "warnings": list(getattr(self._core, "load_warnings", ()))}

    def _refresh_gauges(self) -> None:
        while not self._stop.wait(1.0):
            with contextlib.suppress(Exception):
                self._update_gauges(force=True)
                self.memory.record(self.engine, self.name)

    def _update_gauges(self, force: bool = False) -> None:
        # Read from the engine's counters; at most a few times a second, it is per delta.
        now = time.monotonic()
        if not force and now - self._gauges_at < 0.25:
            return
        self._gauges_at = now
        core = self._core
        self.metrics.running.set(getattr(core, "num_running", 0), model=self.name)
        self.metrics.waiting.set(getattr(core, "num_waiting", 0), model=self.name)
        prefix_cache = getattr(core, "prefix_cache", None)
        if prefix_cache is not None:
            self.metrics.prefix_cached.set(prefix_cache.cached_tokens, model=self.name)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[Delta] | ApiError]:
        """The request's deltas, in lists: all that one engine step produced for it (its `n`
        choices advance together), so a Ray stream carries one message per step, not per choice."""
        m, name = self.metrics, self.name
        started = time.perf_counter()
        first_at: float | None = None
        last_at = started
        status = "ok"
        acc = Accumulator()
        self._update_gauges(force=True)
        try:
            # Closing the stream (also when Ray cancels this call because the client went away)
            # cancels the request inside the engine: its batch slot frees at the next step.
            async with contextlib.aclosing(self.engine.generate_steps(request)) as batches:
                async for batch in batches:
                    now = time.perf_counter()
                    if first_at is None:
                        first_at = now
                        m.ttft.observe(now - started, model=name)
                    last_at = now
                    acc.add_all(batch)
                    self._update_gauges()
                    yield batch
            status = acc.status
        except (RequestRejected, EngineOverloaded) as exc:
            status = "rejected" if isinstance(exc, RequestRejected) else "overloaded"
            yield to_api_error(exc)
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"
            raise
        except Exception:
            status = "error"
            raise
        finally:
            m.requests.inc(1, model=name, status=status)
            m.prompt_tokens.inc(acc.prompt_tokens, model=name)
            m.prefix_hits.inc(acc.cached_tokens, model=name)
            m.generated_tokens.inc(sum(acc.completion.values()), model=name)
            if first_at is not None and acc.longest > 1:
                m.tpot.observe((last_at - first_at) / (acc.longest - 1), model=name)
            self._update_gauges(force=True)

    # ---- the model's tokenizer: POST /tokenize, POST /detokenize, GET /tokenizer_info ----------

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> dict:
        core = self._core
        # On a thread, as the engine tokenizes prompts: a long text must not stall the streams.
        ids = await asyncio.to_thread(core.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": core.max_seq_len}

    async def detokenize(self, tokens: list[int]) -> str | ApiError:
        core = self._core
        bad = [t for t in tokens if not 0 <= t < core.vocab_size]
        if bad:
            return ApiError(400, "invalid_request_error",
                            f"tokens must be token ids in [0, {core.vocab_size}); got {bad[:5]}", param="tokens")
        return await asyncio.to_thread(core.tokenizer.decode, tokens)

    async def tokenizer_info(self) -> dict:
        tok, core = self._core.tokenizer, self._core
        if self._tokenizer_sha256 is None:
            self._tokenizer_sha256 = await asyncio.to_thread(_fingerprint, tok)
        return {"model": self.name, "tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token,
                "bos_token": tok.bos_token, "pad_token": tok.pad_token, "model_max_length": core.max_seq_len,
                "vocab_size": core.vocab_size, "tokenizer_sha256": self._tokenizer_sha256}

    def shutdown(self) -> None:
        self._stop.set()
        stop = getattr(self.engine, "shutdown", None)
        if stop is not None:
            stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.shutdown()
