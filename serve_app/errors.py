"""The one error type of the serving path, and the one place exceptions become responses.

Every failure a client can see is an `ApiError`: an HTTP status, an OpenAI-style `type` and a
message written for the client. HTTP routes answer with it, SSE streams end with it as an
`error` event, WebSocket clients get it as an `error` message, a model replica sends it across
Ray as a value (an exception raised there would arrive wrapped in a traceback-laden
RayTaskError), and the Redis single-flight stream carries it to other ingress replicas.

`to_api_error` maps anything else. An exception nobody expected becomes a generic 500 with an
error id; the traceback goes to the log under the same id, and nothing internal (paths, actor
ids, addresses) reaches the client.
"""
from __future__ import annotations

import logging
import traceback
import uuid
from typing import Any

from serve_app.engine.types import EngineOverloaded, RequestRejected

log = logging.getLogger("quill.errors")


class ApiError(Exception):
    """An error with its HTTP status and OpenAI-style type; rendered as {"error": {...}}."""

    def __init__(self, status: int, type_: str, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.type, self.message, self.extra = status, type_, message, extra

    def body(self) -> dict:
        return {"error": {"type": self.type, "message": self.message, **self.extra}}

    # Seconds for the Retry-After of a 429/503; a rate limit sets the time its window frees.
    retry_after: int = 1

    def headers(self) -> dict[str, str] | None:
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}  # RFC 6750: the scheme the server expects
        return {"Retry-After": str(self.retry_after)} if self.status in (429, 503) else None

    def to_dict(self) -> dict:
        return {"status": self.status, "type": self.type, "message": self.message, **self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> ApiError:
        d = dict(d)
        return cls(d.pop("status"), d.pop("type"), d.pop("message"), **d)

    def __reduce__(self):  # pickled across Ray as a value: rebuild from the fields, not args
        return ApiError.from_dict, (self.to_dict(),)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ApiError) and self.to_dict() == other.to_dict()

    __hash__ = Exception.__hash__


def error_body(type_: str, message: str) -> dict:
    return {"error": {"type": type_, "message": message}}


def overloaded(message: str = "") -> ApiError:
    return ApiError(503, "overloaded", message or "model is overloaded, retry later")


def rate_limited(message: str, retry_after: int) -> ApiError:
    err = ApiError(429, "rate_limit_error", message)
    err.retry_after = retry_after
    return err


def to_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestRejected):
        labels = {"param": exc.param, "code": exc.code}
        return ApiError(400, "invalid_request_error", str(exc), **{k: v for k, v in labels.items() if v})
    if isinstance(exc, EngineOverloaded):
        return overloaded(str(exc))
    error_id = uuid.uuid4().hex[:12]
    # The traceback in the message: Serve's log formatter writes exc_info as a tuple's repr.
    log.error("unexpected error %s: %s", error_id, "".join(traceback.format_exception(exc)).rstrip())
    return ApiError(500, "internal_error", f"the server failed to handle this request (error id {error_id}; "
                    "the server log has the details)", error_id=error_id)
