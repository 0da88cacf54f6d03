"""The HTTP API (docs/api.md) as an ASGI app, independent of Ray.

`create_app(service)` builds the FastAPI app. A `Service` holds what the routes need: the
registry, one backend per served model (anything with `stream(request)` and `ready()`: an
in-process ModelServer in tests, a Ray DeploymentHandle in `app.py`), the single-flight cache
and a metrics renderer. Every route goes through `Service.open_stream`, so validation, limits,
caching and error mapping are the same for OpenAI, native and WebSocket clients.

Errors are always JSON `{"error": {"type", "message"}}`: 400 for bad input (including the
request-validation errors FastAPI would answer with its own 422 shape), 404 for a model that is
not served (with the served names), 503 when a model is overloaded or not ready yet.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.cache import SingleFlight, cache_key
from serve_app.config import ModelEntry, Registry
from serve_app.metrics import Metrics
from serve_app.engine.types import Delta, GenerationRequest, RequestRejected, SamplingParams, TokenLogprob
from serve_app.deltas import Accumulator
from serve_app.drain import Drain
from serve_app.errors import ApiError, error_body, to_api_error
from serve_app.model_server import ModelServer
from serve_app.security import FrontDoor, SecuritySettings
from serve_app.protocol import (CompletionRequest, DetokenizeRequest, GenerateRequest, TokenizeRequest, invalid_body,
                               new_id, no_route, now, shown, unparsable_body)

log = logging.getLogger("quill.ingress")
STATIC = Path(__file__).parent / "static"


class Backend(Protocol):
    entry: ModelEntry

    def stream(self, request: GenerationRequest) -> AsyncIterator[list[Delta]]: ...

    async def call(self, method: str, *args: Any) -> Any: ...

    async def ready(self, timeout: float) -> bool: ...


class LocalBackend:
    """A ModelServer in this process (tests; no Ray)."""

    def __init__(self, server: ModelServer):
        self.server, self.entry = server, server.entry

    async def stream(self, request: GenerationRequest) -> AsyncIterator[list[Delta]]:
        async with contextlib.aclosing(self.server.generate(request)) as items:
            async for item in items:
                if isinstance(item, ApiError):
                    raise item
                yield item

    async def call(self, method: str, *args: Any) -> Any:
        result = await getattr(self.server, method)(*args)
        if isinstance(result, ApiError):
            raise result
        return result

    async def ready(self, timeout: float) -> bool:
        return True


class Service:
    def __init__(
        self,
        registry: Registry,
        backends: dict[str, Backend],
        store=None,
        render_metrics: Callable[[], Awaitable[bytes]] | None = None,
        ready_timeout: float = 2.0,
    ):
        self.registry = registry
        self.backends = backends
        metrics = Metrics()
        # Counted here, not in the cache: the outcome is per model, as the dashboards show it.
        self.flights = SingleFlight(store, on_outcome=lambda model, outcome: metrics.cache.inc(1, model=model, outcome=outcome))
        self.render_metrics = render_metrics
        self.ready_timeout = ready_timeout
        self.drain = Drain()  # graceful shutdown (serve_app/drain.py)
        self._tokenizers: dict[str, dict] = {}  # tokenizer_info by model, asked once
        self.started = int(time.time())  # a model card's `created`: when this server began serving it

    async def tokenizer_info(self, model: str) -> dict:
        if model not in self._tokenizers:
            self._tokenizers[model] = await self.backend(model).call("tokenizer_info")
        return self._tokenizers[model]

    async def context_length(self, model: str) -> int | None:
        """The context the model's replicas serve: engine.max_seq_len, or fewer where the
        checkpoint has fewer positions (which only a replica that loaded it knows). None while
        no replica answers in time (loading, or lost): a model list must not wait on it."""
        try:
            info = await asyncio.wait_for(self.tokenizer_info(model), self.ready_timeout)
        except Exception:  # noqa: BLE001 - not there yet, timed out: the card goes without it
            return None
        return info["model_max_length"]

    async def tokenizer_of(self, model: str | None) -> Backend:
        """Whose tokenizer a /tokenize call uses: the model named, or, with none named (as
        vLLM's single-model server allows), any served model's when they all share one."""
        if model is not None:
            return self.backend(model)
        names = sorted(self.backends)
        if len(names) > 1:
            infos = await asyncio.gather(*(self.tokenizer_info(n) for n in names))
            if len({i["tokenizer_sha256"] for i in infos}) > 1:
                raise ApiError(400, "invalid_request_error", "the served models use different tokenizers; name one "
                               f"in \"model\" (served models: {', '.join(names)})")
        return self.backends[names[0]]

    def backend(self, name: str) -> Backend:
        b = self.backends.get(name)
        if b is None:
            served = sorted(self.backends)
            raise ApiError(
                404, "model_not_found",
                f"model {shown(name)} is not served; served models: {', '.join(served)}", served=served,
                code="model_not_found",  # OpenAI's SDKs read `code`: err.code == "model_not_found"
            )
        return b

    async def open_stream(
        self, model: str, prompt: str | list[int], body: Any, use_cache: bool = True
    ) -> AsyncIterator[list[Delta]]:
        """Validate, then start (or join, or replay) the generation. Errors that happen before
        the first delta are raised here as ApiError, so routes can still answer with a status.

        The stream yields lists of deltas: what one message from the replica carried (a step's
        deltas, or several steps' when the replica coalesced them), framed and sent together."""
        self.drain.refuse_if_draining()
        backend = self.backend(model)
        try:
            params: SamplingParams = body.to_sampling(backend.entry)
        except RequestRejected as exc:
            raise to_api_error(exc) from None
        request = GenerationRequest(prompt=prompt, params=params)
        key = cache_key(model, prompt, params) if use_cache else None
        stream = self.flights.stream(key, model, request.request_id, lambda: backend.stream(request))
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise ApiError(500, "internal_error", "the model returned nothing") from None
        except Exception as exc:
            await stream.aclose()
            raise to_api_error(exc) from None

        async def chained() -> AsyncIterator[list[Delta]]:
            async with contextlib.aclosing(stream):
                yield first
                async for batch in stream:
                    yield batch

        return self.drain.track(chained())

    async def open_streams(
        self, model: str, prompts: list[str | list[int]], body: Any, use_cache: bool = True
    ) -> AsyncIterator[list[Delta]]:
        """`open_stream` for a batch of prompts, as one stream: prompt p's choice i is choice
        p * n + i. If any prompt is refused (too long, the model overloaded), the others are
        cancelled and that error is raised, so a batch is answered whole or not at all."""
        if len(prompts) == 1:
            return await self.open_stream(model, prompts[0], body, use_cache)
        opening = [asyncio.ensure_future(self.open_stream(model, p, body, use_cache)) for p in prompts]
        try:
            await asyncio.gather(*opening, return_exceptions=True)
            failed = [(p, t.exception()) for p, t in enumerate(opening) if t.exception() is not None]
            if failed:
                raise _naming_the_prompt(*failed[0]) if len(failed) < len(opening) else failed[0][1]
        except BaseException:  # a refused prompt, or this request cancelled (its client gone)
            for task in opening:
                task.cancel()
            await asyncio.gather(*opening, return_exceptions=True)
            for task in opening:
                if not task.cancelled() and task.exception() is None:
                    await task.result().aclose()
            raise
        return _merged([t.result() for t in opening], body.n)

    async def readiness(self) -> dict[str, bool]:
        # Asked afresh each time, so a model whose replicas are lost (a dead node) turns unready
        # and ready again once Serve has replaced them. A backend must answer this without
        # queueing behind its model's batch: a probe that fails under load would take a busy
        # server out of rotation (HandleBackend asks Serve's controller, not a replica).
        oks = await asyncio.gather(*(b.ready(self.ready_timeout) for b in self.backends.values()))
        return dict(zip(self.backends, oks))

    async def model_card(self, entry: ModelEntry) -> dict:
        card = {"id": entry.name, "object": "model", "created": self.started, "owned_by": "quill"}
        # max_model_len as vLLM's card names it: what a client needs to fit a prompt plus its
        # completion into the context without a trial 400.
        length = await self.context_length(entry.name)
        if length is not None:
            card["max_model_len"] = length
        return {**card, "defaults": entry.defaults.model_dump(), "limits": entry.limits.model_dump()}


def _naming_the_prompt(index: int, exc: BaseException) -> BaseException:
    """A batch's error that only some of its prompts met (too long, say) says which prompt."""
    if isinstance(exc, ApiError) and exc.status == 400:
        return ApiError(exc.status, exc.type, f"prompt {index} of the batch: {exc.message}", **exc.extra)
    return exc


def _sse(data: Any, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def _sse_error(exc: BaseException | str) -> str:
    if isinstance(exc, str):
        body = error_body("generation_error", exc)
    else:
        body = to_api_error(exc).body()
    # `event: error` with an {"error": ...} payload: the OpenAI SDK raises it as an APIError.
    return _sse(body, "error")


def _use_cache(request: Request) -> bool:
    # `Cache-Control: no-cache` asks for a fresh generation even when an identical seeded
    # request was answered before (it still goes through the engine, seed and all).
    cc = request.headers.get("cache-control", "").lower()
    return "no-cache" not in cc and "no-store" not in cc


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _openai_logprobs(tokens: list[tuple[int, TokenLogprob]] | None) -> dict | None:
    """A choice's `logprobs` in OpenAI's completions shape, from (text offset, logprob) pairs."""
    if tokens is None:
        return None
    return {
        "tokens": [lp.token for _, lp in tokens],
        "token_logprobs": [lp.logprob for _, lp in tokens],
        # OpenAI's: the k likeliest and, if not among them, the chosen token (k + 1 at most);
        # null for a prompt's first token, as its log-probability
        "top_logprobs": [None if lp.logprob is None else {**dict(lp.top), lp.token: lp.logprob} for _, lp in tokens],
        "text_offset": [at for at, _ in tokens],
    }


async def _merged(streams: list[AsyncIterator[list[Delta]]], n: int) -> AsyncIterator[list[Delta]]:
    """Several prompts' streams as one, each message passed on as it arrives, renumbered: prompt
    p's choice i becomes choice p * n + i. Closing it (a client gone) cancels every prompt."""
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))
    done = object()

    async def pump(p: int, stream: AsyncIterator[list[Delta]]) -> None:
        try:
            async for batch in stream:
                await queue.put([dataclasses.replace(d, index=p * n + d.index) for d in batch])
        except Exception as exc:  # passed on: the route ends the answer with this error
            await queue.put(exc)
        await queue.put(done)

    pumps = [asyncio.create_task(pump(p, s)) for p, s in enumerate(streams)]
    try:
        open_ = len(pumps)
        while open_:
            item = await queue.get()
            if item is done:
                open_ -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        for stream in streams:
            await stream.aclose()


async def _collect(stream: AsyncIterator[list[Delta]], choices_per_prompt: int = 0) -> Accumulator:
    """The whole answer, for a non-streaming request; a failed generation is a 500."""
    acc = Accumulator(choices_per_prompt=choices_per_prompt)
    async with contextlib.aclosing(stream):
        async for batch in stream:
            acc.add_all(batch)
    if acc.error:
        raise ApiError(500, "generation_error", acc.error)
    return acc


def _sse_response(
    stream: AsyncIterator[list[Delta]],
    frame_delta: Callable[[Delta, Accumulator], str],
    frame_end: Callable[[Accumulator], str | None],
    choices_per_prompt: int = 0,
) -> StreamingResponse:
    """Server-sent events: one frame per delta with text (or logprobs), framed once the delta
    is folded into the answer so far, an end frame, then [DONE]. A failure mid-stream becomes
    an error event before [DONE], so the client always learns how it ended.

    The frames of deltas that arrived together are written as one body chunk: each chunk is an
    ASGI message that Ray Serve carries from this replica to its proxy, so fewer, larger chunks
    cost the server less CPU per token (why the framing is ours and not sse-starlette's, which
    sends each event on its own)."""

    async def events() -> AsyncIterator[str]:
        acc = Accumulator(choices_per_prompt=choices_per_prompt)
        failed = False
        async with contextlib.aclosing(stream):
            try:
                async for batch in stream:
                    frames = []
                    for d in batch:
                        acc.add(d)
                        if acc.error:
                            frames.append(_sse_error(acc.error))
                            failed = True
                            break
                        if d.text or d.finish_reason or d.logprobs:
                            frames.append(frame_delta(d, acc))
                    if frames:
                        yield "".join(frames)
                    if failed:
                        break
                else:
                    end = frame_end(acc)
                    if end:
                        yield end
            except Exception as exc:
                yield _sse_error(exc)
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)


def create_app(service: Service, security: SecuritySettings | None = None) -> FastAPI:
    """`security` defaults to the settings in this process's environment (docs/security.md)."""
    # No redirect for a trailing slash (Starlette's 307 names an http:// URL, wrong behind TLS,
    # with an empty body): such a path gets the JSON 404 that lists the routes.
    app = FastAPI(title="Quill", docs_url="/docs", redoc_url=None, redirect_slashes=False)
    app.state.service = service
    # Keys, origins, header/body/rate limits before any route runs (serve_app/security.py).
    app.add_middleware(FrontDoor, settings=security or SecuritySettings.from_env())

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        err = invalid_body(exc.errors(), request.headers.get("content-type"))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not read the JSON body
            err = unparsable_body(exc.__cause__)
            return JSONResponse(err.body(), status_code=err.status)
        if exc.status_code == 404:  # a path no route takes: say which ones there are
            return JSONResponse(error_body("not_found", no_route(request.method, request.url.path)), 404)
        if exc.status_code == 405:  # Starlette names the route's methods in Allow (RFC 9110 asks for it)
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {shown(request.url.path)}; this route takes {allowed}"
            return JSONResponse(error_body("method_not_allowed", message), 405, headers=exc.headers)
        return JSONResponse(error_body("http_error", str(exc.detail)), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        err = to_api_error(exc)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers())

    # HEAD too, wherever GET works (RFC 9110): some load balancers' health checks send it, and
    # clients ask it for a route's headers (out of the schema: one operation id per path and method).
    @app.get("/healthz")
    @app.head("/healthz", include_in_schema=False)
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    @app.head("/readyz", include_in_schema=False)
    async def readyz():
        service.drain.refuse_if_draining()  # a load balancer stops sending here
        models = await service.readiness()
        if all(models.values()):
            return {"status": "ready", "models": models}
        loading = [n for n, ok in models.items() if not ok]
        # Why, where the backend knows (HandleBackend: the replica states Serve reports).
        reasons = {n: getattr(service.backends[n], "not_ready_reason", None) or "loading" for n in loading}
        raise ApiError(503, "not_ready", "models not ready: " + "; ".join(f"{n} ({r})" for n, r in reasons.items()),
                       models=models, reasons=reasons)

    @app.get("/metrics")
    @app.head("/metrics", include_in_schema=False)
    async def metrics():
        if service.render_metrics is None:
            from serve_app.metrics import render_local

            body = render_local()
        else:
            body = await service.render_metrics()
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    @app.head("/v1/models", include_in_schema=False)
    async def list_models():
        cards = await asyncio.gather(*(service.model_card(b.entry) for b in service.backends.values()))
        return {"object": "list", "data": list(cards)}

    @app.get("/v1/models/{name}")
    @app.head("/v1/models/{name}", include_in_schema=False)
    async def get_model(name: str):
        return await service.model_card(service.backend(name).entry)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = body.prompts
        stream = await service.open_streams(body.model, prompts, body, _use_cache(request))
        cid, created = new_id("cmpl"), now()

        def chunk(choices: list[dict], **extra: Any) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": choices, **extra}

        if not body.stream:
            acc = await _collect(stream, body.n)
            texts, reasons = acc.ordered(len(prompts) * body.n)
            wanted = body.logprobs is not None
            choices = [{"text": t, "index": i, "finish_reason": r,
                        "logprobs": _openai_logprobs(acc.logprobs.get(i, []) if wanted else None)}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
            return chunk(choices, usage=acc.usage())

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse_response(
            stream,
            lambda d, acc: _sse(chunk([{
                "text": d.text, "index": d.index, "finish_reason": d.finish_reason,
                "logprobs": _openai_logprobs(acc.logprobs_of(d) if body.logprobs is not None else None),
            }])),
            # as OpenAI: with include_usage, a last chunk with no choices
            lambda acc: _sse(chunk([], usage=acc.usage())) if include_usage else None,
            body.n,
        )

    # vLLM's tokenizer routes: a client counts or scores tokens without the tokenizer's files
    # (lm-evaluation-harness looks for them before it falls back to loading a tokenizer itself).
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        backend = await service.tokenizer_of(body.model)
        return {"model": backend.entry.name, **await backend.call("tokenize", body.prompt, body.add_special_tokens)}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        backend = await service.tokenizer_of(body.model)
        return {"model": backend.entry.name, "prompt": await backend.call("detokenize", body.tokens)}

    @app.get("/tokenizer_info")
    @app.head("/tokenizer_info", include_in_schema=False)
    async def tokenizer_info(model: str | None = None):
        backend = await service.tokenizer_of(model)
        return await service.tokenizer_info(backend.entry.name)

    @app.post("/v1/models/{name}/generate")
    async def generate(name: str, body: GenerateRequest, request: Request):
        stream = await service.open_stream(name, body.prompt, body, _use_cache(request))
        rid = new_id("gen")

        def final(acc: Accumulator) -> dict:
            texts, reasons = acc.ordered(body.n)
            return {"id": rid, "model": name, "texts": texts, "finish_reasons": reasons, "usage": acc.usage()}

        if not body.stream:
            return final(await _collect(stream))
        return _sse_response(
            stream,
            lambda d, _: _sse({"index": d.index, "text": d.text, "finish_reason": d.finish_reason}, "delta"),
            lambda acc: _sse(final(acc), "done"),
        )

    @app.websocket("/v1/stream")
    async def ws_stream(ws: WebSocket):
        from serve_app.websocket import serve_socket

        await serve_socket(ws, service)

    @app.get("/", include_in_schema=False)
    @app.head("/", include_in_schema=False)
    async def index():
        page = STATIC / "index.html"
        if page.is_file():
            return FileResponse(page)
        return {"name": "quill", "models": list(service.backends), "docs": "/docs"}

    return app
