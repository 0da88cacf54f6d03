"""Request and response schemas of the HTTP and WebSocket API (docs/api.md).

Requests are pydantic models that forbid unknown keys: a misspelt parameter is a 400, never a
silently ignored setting. `to_sampling()` merges a request with its model's registry defaults
and limits into the engine's `SamplingParams`, so every route applies them the same way.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.config import ModelEntry
from serve_app.engine.types import RequestRejected, SamplingParams

MAX_STOP = 4  # as OpenAI


class _Request(BaseModel):
    # allow_inf_nan=False: JSON's `Infinity`, `NaN` and `1e999` parse to floats that would
    # otherwise pass `ge=0` and sample from a uniform distribution.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _valid_prompt(cls, v: str | list):
        """One rule on every channel (completions, generate, WebSocket): a prompt is text a
        tokenizer can take, or a non-empty list."""
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        for text in [v] if isinstance(v, str) else [p for p in v if isinstance(p, str)]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("prompt contains a lone surrogate (an unpaired \\ud800-\\udfff escape); "
                                 "send valid UTF-8 text") from None
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def to_sampling(self, entry: ModelEntry) -> SamplingParams:
        """Fill unset values from the model's defaults and enforce its limits."""
        d, lim = entry.defaults, entry.limits
        max_tokens = self.max_tokens if self.max_tokens is not None else d.max_tokens
        if max_tokens > lim.max_tokens:
            raise RequestRejected(f"max_tokens {max_tokens} exceeds this model's limit of {lim.max_tokens}")
        if self.n > lim.max_n:
            raise RequestRejected(f"n {self.n} exceeds this model's limit of {lim.max_n}")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature if self.temperature is not None else d.temperature,
            top_k=self.top_k if self.top_k is not None else d.top_k,
            top_p=self.top_p if self.top_p is not None else d.top_p,
            n=self.n,
            stop=tuple(self.stop or ()),
            seed=self.seed,
        )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(_Request):
    """POST /v1/completions, the OpenAI legacy completions body.

    Parameters OpenAI defines but Quill does not implement are accepted only at their neutral
    value, so clients that always send them (as some SDKs do) keep working, and clients that
    rely on them get a clear 400 instead of a quietly different answer.
    """

    model: str
    prompt: str | list[str] | list[int]
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    echo: Literal[False] = False
    logprobs: None = None
    best_of: int | None = None
    suffix: None = None
    presence_penalty: Literal[0, 0.0] = 0
    frequency_penalty: Literal[0, 0.0] = 0
    logit_bias: dict[str, float] | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("send one prompt per request (batched prompts are not supported)")
            return v[0]
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict | None) -> None:
        if v:
            raise ValueError("logit_bias is not supported")
        return None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> None:
        if v not in (None, 1):
            raise ValueError("best_of is not supported (use n)")
        return None


class GenerateRequest(_Request):
    """POST /v1/models/{name}/generate: several suggestions for one prompt."""

    prompt: str | list[int]
    stream: bool = False


class WsGenerate(_Request):
    """The `generate` message of WS /v1/stream."""

    type: Literal["generate"]
    id: str = Field(min_length=1, max_length=128)
    model: str
    prompt: str | list[int]
    every: int = Field(5, ge=1, le=1000)  # push the growing suggestions every this many tokens


class WsCancel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["cancel"]
    id: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
