"""The front door: API keys, request limits, rate limits and browser origins (docs/security.md).

`FrontDoor` is one pure-ASGI middleware in front of every route, HTTP and WebSocket alike. It
checks, in this order, and answers with an `ApiError` (a WebSocket handshake is closed with 1008,
which the server sends as HTTP 403):

    headers    more than QUILL_MAX_HEADERS, or more than QUILL_MAX_HEADER_BYTES     -> 431
    origin     a browser's Origin that is neither the Host's nor in QUILL_ALLOWED_ORIGINS -> 403
    API key    `Authorization: Bearer <key>` (or, on a WebSocket, the subprotocols
               `quill` + `quill-key.<key>`) when QUILL_API_KEYS[_FILE] is set          -> 401
    rate       QUILL_RATE_LIMIT per key (per client address without keys)            -> 429
    body       compressed (Content-Encoding), refused before it is read               -> 415
               more than QUILL_MAX_BODY_BYTES, refused before it is read whole        -> 413

/healthz, /readyz and the page (/ and /static/) pass without a key or a rate limit: probes and
the page that asks for the key must load. On an accepted WebSocket it also bounds each message
(QUILL_MAX_BODY_BYTES) and the message rate (QUILL_WS_MESSAGE_RATE); a message over either gets
an error message and is dropped, and the socket stays open.

Settings are read once from the environment into `SecuritySettings`; a malformed value is refused
with the variable's name. Keys never reach a log line, a response, or Redis (only their digests).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping
from urllib.parse import urlsplit

import limits
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator
from starlette.responses import JSONResponse

from serve_app.breaker import CircuitBreaker
from serve_app.errors import ApiError, rate_limited
from serve_app.protocol import shown, ws_message_id
from serve_app.websocket import error_message

log = logging.getLogger("quill.security")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/"})
PUBLIC_PREFIXES = ("/static/",)
# The WebSocket subprotocols a browser offers, since it cannot set headers on a handshake:
# new WebSocket(url, ["quill", "quill-key." + key]). The server accepts with "quill".
WS_SUBPROTOCOL = "quill"
WS_KEY_PREFIX = "quill-key."
# Policy violation: the close code for a refused handshake (sent as HTTP 403 before accept).
WS_POLICY_VIOLATION = 1008

# Settings field -> the environment variable it comes from (the names errors and docs use).
ENV = {
    "api_keys": "QUILL_API_KEYS",
    "max_body_bytes": "QUILL_MAX_BODY_BYTES",
    "max_headers": "QUILL_MAX_HEADERS",
    "max_header_bytes": "QUILL_MAX_HEADER_BYTES",
    "rate_limit": "QUILL_RATE_LIMIT",
    "ws_message_rate": "QUILL_WS_MESSAGE_RATE",
    "allowed_origins": "QUILL_ALLOWED_ORIGINS",
    "keep_alive_timeout_s": "QUILL_KEEP_ALIVE_TIMEOUT_S",
    "redis_url": "REDIS_URL",
}
KEYS_FILE_ENV = "QUILL_API_KEYS_FILE"
# Printable ASCII without spaces: what fits in `Authorization: Bearer <key>`.
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")
# RFC 7230 token characters: what a browser accepts in a WebSocket subprotocol.
_TOKEN_CHARS = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_OFF = {"", "off", "none", "0"}


class SettingsError(ValueError):
    """A security setting in the environment is malformed; the message names the variable."""


def _rate(value: str) -> str | None:
    if value.strip().lower() in _OFF:
        return None
    limits.parse(value)  # ValueError: "couldn't parse rate limit string ..."
    return value.strip()


_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_origin(origin: str) -> str:
    """`scheme://host[:port]`, lowercase, without a default port: how origins are compared."""
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"{origin!r} is not an origin like https://example.com or http://127.0.0.1:8000")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    port = parts.port if parts.port not in (None, _DEFAULT_PORTS[parts.scheme]) else None
    return f"{parts.scheme}://{host}" + (f":{port}" if port else "")


class SecuritySettings(BaseModel):
    """What the front door enforces. `from_env()` reads it from the environment once."""

    model_config = ConfigDict(frozen=True)

    # repr=False: a settings object that ends up in a log line or a traceback shows no key.
    api_keys: frozenset[str] = Field(default=frozenset(), repr=False)
    max_body_bytes: PositiveInt = 1 << 20
    max_headers: PositiveInt = 100
    max_header_bytes: PositiveInt = 32 << 10
    rate_limit: str | None = None  # e.g. "120/minute"; None: no rate limit
    # A writer's page sends a `generate` per pause in typing; twenty a second is a flood.
    ws_message_rate: str | None = "20/second"
    allowed_origins: frozenset[str] | None = None  # None: same origin as the Host only
    keep_alive_timeout_s: PositiveInt = 15  # Ray Serve proxy's idle keep-alive (quill serve)
    redis_url: str | None = None  # shared rate-limit counters across ingress replicas

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        keys = value.split(",") if isinstance(value, str) else list(value)
        keys = [k.strip() for k in keys if k.strip()]
        for i, key in enumerate(keys, 1):
            if not _KEY_CHARS.fullmatch(key):  # never echo the key itself
                raise ValueError(f"key #{i} has a space or a character outside printable ASCII")
        return frozenset(keys)

    @field_validator("rate_limit", "ws_message_rate", mode="before")
    @classmethod
    def _rates(cls, value: Any) -> Any:
        return _rate(value) if isinstance(value, str) else value

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [o for o in value.split(",") if o.strip()]
        if not value:  # unset or empty: the same-origin rule, not "no origin at all"
            return None
        return frozenset("*" if o.strip() == "*" else normalise_origin(o) for o in value)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SecuritySettings:
        env = os.environ if environ is None else environ
        raw: dict[str, Any] = {field: env[name] for field, name in ENV.items() if field != "api_keys" and name in env}
        keys = _keys_from_env(env)
        if keys is not None:
            raw["api_keys"] = keys
        if not env.get("REDIS_URL"):
            raw.pop("redis_url", None)
        try:
            settings = cls.model_validate(raw)
        except ValidationError as exc:
            # Only the variable and what is wrong: pydantic's own text would echo the value,
            # and for QUILL_API_KEYS the value is a secret.
            problems = "; ".join(f"{ENV[str(e['loc'][0])]}: {e['msg'].removeprefix('Value error, ')}"
                                 for e in exc.errors())
            raise SettingsError(problems) from None
        settings._warn_about_browser_keys()
        return settings

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    def summary(self) -> str:
        """One log line of what is enforced (never the keys)."""
        origins = "same origin" if self.allowed_origins is None else ", ".join(sorted(self.allowed_origins))
        return (f"API keys: {len(self.api_keys) or 'off'}; body limit {self.max_body_bytes} bytes; "
                f"headers {self.max_headers} / {self.max_header_bytes} bytes; "
                f"rate limit {self.rate_limit or 'off'}{' (Redis)' if self.rate_limit and self.redis_url else ''}; "
                f"WebSocket messages {self.ws_message_rate or 'unlimited'}; origins: {origins}")

    def _warn_about_browser_keys(self) -> None:
        unusable = sum(1 for k in self.api_keys if not _TOKEN_CHARS.fullmatch(k))
        if unusable:
            log.warning("%d API key(s) contain characters a browser refuses in a WebSocket subprotocol "
                        "(such as / or =): they work over HTTP, not from the page's WebSocket", unusable)


def _keys_from_env(env: Mapping[str, str]) -> list[str] | None:
    """The keys of QUILL_API_KEYS and QUILL_API_KEYS_FILE together; None when neither is set.
    A variable that is set but holds no key is an error, not "no auth": an empty Secret or an
    unset shell variable must not quietly open the server."""
    keys: list[str] | None = None
    if "QUILL_API_KEYS" in env:
        keys = [k.strip() for k in env["QUILL_API_KEYS"].split(",") if k.strip()]
        if not keys:
            raise SettingsError("QUILL_API_KEYS is set but holds no key (unset it to serve without keys)")
    if env.get(KEYS_FILE_ENV):
        path = Path(env[KEYS_FILE_ENV])
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{KEYS_FILE_ENV}: cannot read {path}: {exc.__class__.__name__}") from None
        from_file = [line.split("#", 1)[0].strip() for line in lines]
        from_file = [k for k in from_file if k]
        if not from_file:
            raise SettingsError(f"{KEYS_FILE_ENV}: {path} holds no key (one per line, # comments)")
        keys = (keys or []) + from_file
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RateLimiter:
    """QUILL_RATE_LIMIT per caller with the `limits` library's moving window: in this process's
    memory, or in Redis when REDIS_URL is set, so every ingress replica counts against the same
    window. While Redis does not answer, requests are served unlimited (one warning per outage)
    rather than refused: losing the limiter must not take the API down with it."""

    def __init__(self, rate: str, redis_url: str | None = None, redis_timeout: float = 0.5):
        self.item = limits.parse(rate)
        if redis_url:
            storage = RedisStorage("async+" + redis_url, implementation="redispy", key_prefix="quill:rate",
                                   socket_timeout=redis_timeout, socket_connect_timeout=redis_timeout)
            self.breaker: CircuitBreaker | None = CircuitBreaker("Redis (rate limits)", cooldown=10.0)
        else:
            storage, self.breaker = MemoryStorage(), None
        self.limiter = MovingWindowRateLimiter(storage)

    async def retry_after(self, caller: str) -> int | None:
        """Counts one request for `caller`; None when it may go on, else the whole seconds until
        its window frees a slot (the Retry-After)."""
        if self.breaker is not None and not self.breaker.allow():
            return None
        try:
            if await self.limiter.hit(self.item, caller):
                wait = None
            else:
                stats = await self.limiter.get_window_stats(self.item, caller)
                wait = max(1, math.ceil(stats.reset_time - time.time()))
        except asyncio.CancelledError:
            if self.breaker is not None:
                self.breaker.abandoned()
            raise
        except Exception as exc:  # Redis down or frozen: serve without a limit for a while
            if self.breaker is None:
                raise
            self.breaker.failed(exc)
            return None
        if self.breaker is not None:
            self.breaker.succeeded()
        return wait


async def send_error(err: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer an HTTP request with `err`, or refuse a WebSocket handshake (1008: HTTP 403)."""
    if scope["type"] == "websocket":
        # A close reason is at most 123 bytes; before accept the server drops it anyway.
        await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION,
                    "reason": f"{err.type}: {err.message}"[:120]})
        return
    await JSONResponse(err.body(), status_code=err.status, headers=err.headers())(scope, receive, send)


class FrontDoor:
    """The ASGI middleware; `create_app` installs it with the settings it read."""

    def __init__(self, app: Callable, settings: SecuritySettings):
        self.app, self.settings = app, settings
        self.key_digests = {_digest(k) for k in settings.api_keys}
        self.rate = RateLimiter(settings.rate_limit, settings.redis_url) if settings.rate_limit else None
        self.ws_rate = MovingWindowRateLimiter(MemoryStorage()) if settings.ws_message_rate else None
        self.ws_rate_item = limits.parse(settings.ws_message_rate) if settings.ws_message_rate else None
        log.info("front door: %s", settings.summary())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            self.check_headers(scope)
            self.check_origin(scope)
            if not self.is_public(scope):
                caller = self.authenticate(scope)
                await self.check_rate(caller)
        except ApiError as err:
            log.debug("refused %s %s: %s", scope["type"], scope.get("path"), err.type)
            await send_error(err, scope, receive, send)
            return
        if scope["type"] == "websocket":
            await SocketGuard(self, scope, receive, send).run()
        else:
            await self.bounded_body(scope, receive, send)

    # -- checks: each raises ApiError ---------------------------------------------------------

    def check_headers(self, scope: Scope) -> None:
        # Not counted: the x-request-id that Serve's HAProxy adds to a request without one, so a
        # client's QUILL_MAX_HEADERS headers pass (with it, 100 were refused as 101).
        headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"x-request-id"]
        size = sum(len(k) + len(v) for k, v in headers)
        if len(headers) > self.settings.max_headers or size > self.settings.max_header_bytes:
            raise ApiError(431, "request_headers_too_large",
                           f"request headers exceed the limit ({self.settings.max_headers} headers, "
                           f"{self.settings.max_header_bytes} bytes; this request: {len(headers)}, {size})")

    def check_origin(self, scope: Scope) -> None:
        """A browser names the page that opened the socket or sent the request in `Origin`; a
        page of another site must not drive this server with the user's browser. Clients that
        are not browsers send no Origin and pass."""
        origin = _header(scope, b"origin")
        if origin is None:
            return
        allowed = self.settings.allowed_origins
        try:
            normal = normalise_origin(origin)
        except ValueError:
            normal = None  # "null" (a sandboxed page, a file://) is no allowed origin
        if allowed is not None:
            ok = "*" in allowed or normal in allowed
        else:
            ok = normal is not None and self.same_origin(scope, normal)
        if not ok:
            raise ApiError(403, "permission_error", f"origin {origin[:100]!r} is not allowed to use this server "
                           "(QUILL_ALLOWED_ORIGINS lists the allowed ones; default: this server's own)")

    @staticmethod
    def same_origin(scope: Scope, origin: str) -> bool:
        host = (_header(scope, b"host") or "").lower()
        scheme, _, netloc = origin.partition("://")
        default = _DEFAULT_PORTS[scheme]
        if host.endswith(f":{default}"):
            host = host.removesuffix(f":{default}")
        if netloc != host:
            return False
        # DNS rebinding: a hostile page's name resolved to 127.0.0.1 is its own origin and its
        # own Host. A server reached on loopback is only ever opened as a loopback address.
        server = scope.get("server") or (None, None)
        return not _is_loopback(server[0]) or _is_loopback(urlsplit(origin).hostname)

    def is_public(self, scope: Scope) -> bool:
        path = scope.get("path", "")
        return scope["type"] == "http" and (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES))

    def authenticate(self, scope: Scope) -> str:
        """The caller, as the rate limit counts it: the key's digest, or the client address when
        the server has no keys. Raises 401 without saying which keys exist."""
        if not self.key_digests:
            client = scope.get("client") or ("unknown", 0)
            return f"addr:{client[0]}"
        key = None
        auth = _header(scope, b"authorization")
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer":
                key = value.strip()
        if key is None and scope["type"] == "websocket":
            key = next((p.removeprefix(WS_KEY_PREFIX) for p in scope.get("subprotocols", ())
                        if p.startswith(WS_KEY_PREFIX)), None)
        if key is None:
            raise ApiError(401, "authentication_error",
                           "this server needs an API key: send the header 'Authorization: Bearer <key>'")
        digest = _digest(key)
        # Compare against every key, in constant time each, so timing tells nothing of the keys.
        matches = [hmac.compare_digest(digest, d) for d in self.key_digests]
        if not any(matches):
            raise ApiError(401, "authentication_error", "the API key is not valid")
        return "key:" + digest.hex()[:32]

    async def check_rate(self, caller: str) -> None:
        if self.rate is None:
            return
        wait = await self.rate.retry_after(caller)
        if wait is not None:
            raise rate_limited(f"rate limit of {self.settings.rate_limit} exceeded; retry in {wait} s", wait)

    # -- the body ---------------------------------------------------------------------------

    async def bounded_body(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Read the body up to the limit, then hand it to the app. A declared Content-Length over
        the limit is refused before a byte is read; a chunked body is refused at the chunk that
        crosses it, without reading the rest. Every route reads its body whole anyway, so
        holding up to the limit here costs no more memory than the route would."""
        encoding = (_header(scope, b"content-encoding") or "identity").strip().lower()
        if encoding != "identity":  # read as it is, a gzip body was "not valid UTF-8" (RFC 9110: 415)
            await send_error(ApiError(415, "unsupported_media_type", f"the body is sent with Content-Encoding "
                                      f"{shown(encoding)}; send it uncompressed, without Content-Encoding"),
                             scope, receive, send)
            return
        limit = self.settings.max_body_bytes
        too_large = ApiError(413, "request_too_large", f"the request body exceeds the limit of {limit} bytes")
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            await send_error(too_large, scope, receive, send)
            return
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await send_error(too_large, scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # later calls: the disconnect a streaming response waits for

        await self.app(scope, replay, send)


class SocketGuard:
    """One accepted WebSocket: accepts with the `quill` subprotocol when the client offered it,
    hides the key subprotocol from the app, and drops messages over the size or rate limit with
    an error message (the socket stays open). Messages arrive here already whole, so a message
    over the limit is skipped rather than the socket closed; only one over the server's own
    frame limit (uvicorn: 16 MiB) is closed by the server, with 1009."""

    def __init__(self, door: FrontDoor, scope: Scope, receive: Receive, send: Send):
        self.door, self.receive_, self.send_ = door, receive, send
        offered = list(scope.get("subprotocols", ()))
        self.offered_quill = WS_SUBPROTOCOL in offered
        self.scope = {**scope, "subprotocols": [p for p in offered if not p.startswith(WS_KEY_PREFIX)]}
        self.socket_id = uuid.uuid4().hex
        # The app sends from its own tasks; an error message from here must not interleave.
        self.send_lock = asyncio.Lock()

    async def run(self) -> None:
        await self.door.app(self.scope, self.receive, self.send)

    async def send(self, message: Message) -> None:
        if message["type"] == "websocket.accept" and self.offered_quill and not message.get("subprotocol"):
            message = {**message, "subprotocol": WS_SUBPROTOCOL}
        async with self.send_lock:
            await self.send_(message)

    async def receive(self) -> Message:
        while True:
            message = await self.receive_()
            if message["type"] != "websocket.receive":
                return message
            refusal = await self.refusal(message)
            if refusal is None:
                return message
            # A message over the rate is small enough to read its id; one over the size is not read.
            text = message.get("text")
            id_ = ws_message_id(text) if refusal.status == 429 and text is not None else None
            await self.send({"type": "websocket.send", "text": error_message(id_, refusal)})

    async def refusal(self, message: Message) -> ApiError | None:
        settings = self.door.settings
        text, data = message.get("text"), message.get("bytes")
        size = len(text.encode()) if text is not None else len(data or b"")
        if size > settings.max_body_bytes:
            return ApiError(413, "request_too_large", f"message of {size} bytes exceeds the limit of "
                            f"{settings.max_body_bytes} bytes; it was dropped")
        if self.door.ws_rate is not None and not await self.door.ws_rate.hit(self.door.ws_rate_item, self.socket_id):
            return ApiError(429, "rate_limit_error", f"more than {settings.ws_message_rate} messages on this "
                            "socket; this one was dropped, send it again later")
        return None


def proxy_http_options(settings: SecuritySettings | None = None) -> dict[str, Any]:
    """What Ray Serve's proxy lets us bound (`serve.start(http_options=...)`): the keep-alive of
    an idle connection. Header sizes, a header-read timeout and slow bodies are not configurable
    there (docs/security.md). Reading the settings here also refuses a malformed one before the
    application is deployed."""
    settings = settings or SecuritySettings.from_env()
    return {"keep_alive_timeout_s": settings.keep_alive_timeout_s}
