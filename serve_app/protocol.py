"""Request and response schemas of the HTTP and WebSocket API (docs/api.md).

Requests are pydantic models that forbid unknown keys and take values only of their own JSON
type: a misspelt parameter, `"stream": "yes"` or `"max_tokens": true` is a 400, never a silently
ignored or reinterpreted setting. `to_sampling()` merges a request with its model's registry
defaults and limits into the engine's `SamplingParams`, so every route applies them the same way.

A request that cannot be read at all (not JSON, not an object, nested too deep, the wrong content
type) or that fails validation is described here too (`invalid_body`, `invalid_fields`,
`parse_ws_message`), so HTTP and the WebSocket word the same problem the same way, name the
field, and echo at most a short piece of what the client sent.
"""
from __future__ import annotations

import difflib
import json
import sys
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve_app.config import ModelEntry
from serve_app.engine.types import (MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_OPENAI_PENALTY, MAX_REPETITION_PENALTY,
                                    RequestRejected, SamplingParams)
from serve_app.errors import ApiError

# OpenAI allows 4 stop sequences, vLLM any number. Evaluation harnesses send a task's own (five
# for lm-evaluation-harness's humaneval) plus end-of-text; matching costs a few string compares
# a token each.
MAX_STOP = 16
MAX_STOP_TOKEN_IDS = 64  # each is a masked logit before min_tokens and a set lookup a token
SHOWN_CHARS = 60  # of a client's value quoted back in an error message


class _Body(BaseModel):
    """A JSON object of the API. A `null` value is the parameter left out, as in OpenAI's API,
    where every optional parameter is nullable: clients that serialise every field they know
    (`"n": null, "stream": null`) get the defaults, not a 400."""

    # allow_inf_nan=False: JSON's `Infinity`, `NaN` and `1e999` parse to floats that would
    # otherwise pass `ge=0` and sample from a uniform distribution. strict: no coercion between
    # JSON types (pydantic's lax mode reads "yes" as true and true as 1).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class _Prompted(_Body):
    """A body with a prompt, and the prompt's rule."""

    @field_validator("prompt", check_fields=False)
    @classmethod
    def _valid_prompt(cls, v: str | list):
        """One rule on every channel (completions, generate, WebSocket, tokenize): a prompt is
        text a tokenizer can take, or a non-empty list."""
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        for text in [v] if isinstance(v, str) else [p for p in v if isinstance(p, str)]:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("prompt contains a lone surrogate (an unpaired \\ud800-\\udfff escape); "
                                 "send valid UTF-8 text") from None
        return v


class _Request(_Prompted):
    """What every generation request shares: the sampling parameters."""

    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = None  # checked in _top_k: -1 is vLLM's "off", as 0 is Quill's

    top_p: float | None = Field(None, gt=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    # vLLM's name: keep only the last K prompt tokens (the engine cuts after tokenizing), so a
    # client that sends a whole document need not count tokens to stay within the model's limit.
    truncate_prompt_tokens: int | None = Field(None, ge=1)
    # vLLM's too: no end-of-text or stop string before min_tokens; ignore_eos, never end-of-text
    # (load generators such as vLLM's benchmark and genai-perf send them for fixed lengths).
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    # vLLM's: token ids that end a choice as end-of-text does, and stop strings kept in the text.
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: bool = False
    # Repetition guards (docs/api.md): OpenAI's two penalties, over the tokens generated so far,
    # and HF's / vLLM's repetition_penalty, over the prompt's tokens and the generated ones.
    frequency_penalty: float | None = Field(None, ge=-MAX_OPENAI_PENALTY, le=MAX_OPENAI_PENALTY)
    presence_penalty: float | None = Field(None, ge=-MAX_OPENAI_PENALTY, le=MAX_OPENAI_PENALTY)
    repetition_penalty: float | None = Field(None, gt=0, le=MAX_REPETITION_PENALTY)
    # vLLM's switches, accepted at what Quill always does, for clients that send vLLM's defaults:
    # special tokens (GPT-2's end-of-text) are left out of the text; no beam search.
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    use_beam_search: bool | None = None

    @field_validator("skip_special_tokens", "spaces_between_special_tokens")
    @classmethod
    def _special_tokens_skipped(cls, v: bool | None) -> None:
        if v is False:
            raise ValueError("only true is supported: Quill leaves special tokens out of the text")
        return None

    @field_validator("use_beam_search")
    @classmethod
    def _no_beam_search(cls, v: bool | None) -> None:
        if v:
            raise ValueError("beam search is not supported by Quill (use n, or temperature 0 for greedy)")
        return None

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v is not None and v < -1:
            raise ValueError("top_k must be at least 1, or 0 (or vLLM's -1) for no top-k cut")
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

    def to_sampling(self, entry: ModelEntry, **route_params) -> SamplingParams:
        """Fill unset values from the model's defaults and enforce its limits (`route_params`:
        what only one route's body has)."""
        lim = entry.limits
        # Every registry default is a parameter of the same name that the request may set.
        chosen = {name: default if getattr(self, name) is None else getattr(self, name)
                  for name, default in entry.defaults.model_dump().items()}
        chosen["top_k"] = max(chosen["top_k"], 0)  # vLLM's -1, off
        max_tokens = chosen["max_tokens"]
        if max_tokens > lim.max_tokens:
            raise RequestRejected(f"max_tokens {shown(max_tokens)} exceeds this model's limit of {lim.max_tokens} "
                                  f"(limits.max_tokens of its registry entry): send at most {lim.max_tokens}",
                                  param="max_tokens")
        if self.n > lim.max_n:
            raise RequestRejected(f"n {shown(self.n)} exceeds this model's limit of {lim.max_n}", param="n")
        truncate = self.truncate_prompt_tokens
        if truncate is not None and truncate > lim.max_prompt_tokens:
            raise RequestRejected(f"truncate_prompt_tokens {shown(truncate)} exceeds this model's "
                                  f"max_prompt_tokens of {lim.max_prompt_tokens}", param="truncate_prompt_tokens")
        return SamplingParams(
            **chosen,
            n=self.n,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            truncate_prompt_tokens=truncate,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output,
            fit_max_tokens=self.max_tokens is None,
            **route_params,
        )


class StreamOptions(_Body):
    include_usage: bool = False


class CompletionRequest(_Request):
    """POST /v1/completions, the OpenAI legacy completions body.

    `logprobs` (0-5) adds each token's log-probability and its likeliest alternatives to the
    choices, `echo` puts the prompt before each choice's text; both together score the prompt's
    tokens too, and `max_tokens` 0 with `echo` returns the prompt alone (OpenAI's shapes, what
    evaluation harnesses send; docs/api.md).
    Parameters OpenAI defines but Quill does not implement are accepted only at their neutral
    value, so clients that always send them (as some SDKs do) keep working, and clients that
    rely on them get a clear 400 instead of a quietly different answer.
    """

    model: str
    max_tokens: int | None = Field(None, ge=0)  # 0: only with echo (SamplingParams says so)
    # OpenAI's four shapes: text, a list of texts, token ids, a list of token-id lists. A list of
    # several texts or token-id lists is a batch: each prompt is its own engine request, and
    # prompt p's choice i is choice p * n + i of the answer (OpenAI's and vLLM's numbering).
    prompt: str | list[str] | list[int] | list[list[int]]
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: Literal[""] | None = None  # no text after the completion: "" (what clients send) or null
    # OpenAI's shape: token ids as JSON object keys (strings), each with a bias in [-100, 100].
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = None

    @field_validator("prompt")
    @classmethod
    def _each_prompt(cls, v: str | list[str] | list[int] | list[list[int]]):
        if _is_batch(v) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("prompt must not be empty (a batch holds an empty token-id list)")
        return v

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request, one or more."""
        return list(self.prompt) if _is_batch(self.prompt) else [self.prompt]

    def to_sampling(self, entry: ModelEntry) -> SamplingParams:
        if len(self.prompts) > entry.limits.max_prompts:
            raise RequestRejected(f"{len(self.prompts)} prompts exceed this model's limit of "
                                  f"{entry.limits.max_prompts} prompts per request (limits.max_prompts)", param="prompt")
        bias = tuple((int(token), value) for token, value in (self.logit_bias or {}).items())
        return super().to_sampling(entry, logprobs=self.logprobs, echo=self.echo, logit_bias=bias)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        bad = [key for key in v or {} if not (key.isascii() and key.isdigit())]
        if bad:
            raise ValueError(f"logit_bias keys are token ids written as strings, such as \"198\"; got {shown(bad[0])}")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> None:
        if v not in (None, 1):
            raise ValueError("best_of is not supported by Quill (use n)")
        return None


def _is_batch(prompt: str | list) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))


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


class WsCancel(_Body):
    type: Literal["cancel"]
    id: str | None = None


WS_MESSAGES = {"generate": WsGenerate, "cancel": WsCancel}


class TokenizeRequest(_Prompted):
    """POST /tokenize (vLLM's shape): a text's token ids under a model's tokenizer. Without
    `model`, the tokenizer every served model shares (lm-evaluation-harness sends none)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    """POST /detokenize (vLLM's shape): token ids back to text."""

    model: str | None = None
    tokens: list[int]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


# ---- describing a bad request ---------------------------------------------------------------


def shown(value: Any) -> str:
    """A client's value as an error message quotes it: at most SHOWN_CHARS characters."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}… ({len(text)} characters)"


API_ROUTES = ("GET /v1/models, GET /v1/models/{name}, POST /v1/completions, "
              "POST /v1/models/{name}/generate, WS /v1/stream, POST /tokenize, POST /detokenize")


def no_route(method: str, path: str) -> str:
    """The 404 message for a path that no route takes: what there is instead (docs/api.md)."""
    hint = ""
    if path.rstrip("/").endswith("/chat/completions"):
        # What an OpenAI client calls first: GPT-2-family models have no chat template.
        hint = ("Quill serves text-completion models, which have no chat format: send the text "
                "as `prompt` to POST /v1/completions (client.completions.create). ")
    elif len(path) > 1 and path.endswith("/"):
        hint = f"Without the trailing slash: {shown(path.rstrip('/'))}? "
    return f"no route {method} {shown(path)}. {hint}Quill's API: {API_ROUTES} (docs/api.md)"


def invalid(message: str, **extra: Any) -> ApiError:
    return ApiError(400, "invalid_request_error", message, **extra)


# What a field takes, said once for the fields whose type is a union (pydantic reports one error
# per member of the union, which reads as a riddle).
_EXPECTED = {
    "prompt": ("a string or a list of token ids (on /v1/completions also a list of strings or "
               "of token-id lists: one prompt each)"),
    "stop": f"a string or a list of up to {MAX_STOP} strings",
}


def invalid_fields(errors: list[dict]) -> str:
    """One line naming each bad field, from pydantic's errors (request validation on HTTP, a
    message's validation on the WebSocket)."""
    by_field: dict[str, list[dict]] = {}
    for e in errors:
        loc = [p for p in e.get("loc", ()) if p != "body"]
        by_field.setdefault(".".join(str(p) for p in loc[:1]), []).append({**e, "loc": loc})
    parts = []
    for name, errs in by_field.items():
        if len(errs) > 1 and name in _EXPECTED:
            parts.append(f"{name}: must be {_EXPECTED[name]}")
            continue
        for e in errs:
            field = ".".join(str(p) for p in e["loc"] if not _is_union_tag(p))
            if e.get("type") == "extra_forbidden":
                name, known = str(e["loc"][-1]), _known_parameters()
                close = difflib.get_close_matches(name, known, n=1)
                if name in known:  # e.g. `model` on the native route, which has it in the URL
                    message = "unknown parameter here"
                else:
                    message = "unknown parameter" + (f" (did you mean {close[0]}?)" if close else "")
            elif field in _UNSUPPORTED:
                message = "not supported by Quill (leave it out, or send its neutral value)"
            else:
                message = e.get("msg", "invalid value").removeprefix("Value error, ")
            # "prompt must not be empty" names its field already: no "prompt: " before it
            parts.append(f"{field}: {message}" if field and not message.startswith(f"{field} ") else message)
    return "; ".join(dict.fromkeys(parts))


# OpenAI parameters accepted only at their neutral value (see CompletionRequest).
_UNSUPPORTED = {"suffix"}


def _known_parameters() -> set[str]:
    """Every parameter of every request shape: what a misspelt one is compared with."""
    shapes = (CompletionRequest, GenerateRequest, WsGenerate, WsCancel, StreamOptions, TokenizeRequest, DetokenizeRequest)
    return {name for shape in shapes for name in shape.model_fields}


def _is_union_tag(part: Any) -> bool:
    # pydantic names the union member in the location: prompt.list[int].0, stop.str
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def invalid_body(errors: list[dict], content_type: str | None) -> ApiError:
    """A 400 for a request body that failed validation: the whole body (empty, not JSON, not an
    object, the wrong content type) or some of its fields."""
    whole = [e for e in errors if [p for p in e.get("loc", ()) if p != "body"] in ([], [None])]
    json_errors = [e for e in errors if e.get("type") == "json_invalid"]
    if json_errors:
        e = json_errors[0]
        where = e["loc"][-1] if isinstance(e.get("loc", [None])[-1], int) else None
        reason = (e.get("ctx") or {}).get("error", "")
        return invalid(f"the body is not valid JSON ({reason}{f' at character {where}' if where is not None else ''})")
    if whole:
        if whole[0].get("type") == "missing":
            return invalid("the request body is empty: send a JSON object")
        if not _is_json(content_type):
            return invalid("send the body as a JSON object with Content-Type: application/json "
                           f"(got {shown(content_type) if content_type else 'no Content-Type'})")
        return invalid("the body must be a JSON object")
    return invalid_fields_error(errors)


def invalid_fields_error(errors: list[dict], **extra: Any) -> ApiError:
    """A 400 naming each bad field; with OpenAI's `param` when only one field is bad."""
    fields = {str(loc[0]) for e in errors if (loc := [p for p in e.get("loc", ()) if p != "body"])}
    return invalid(invalid_fields(errors), **({"param": fields.pop()} if len(fields) == 1 else {}), **extra)


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def unreadable_json(exc: BaseException | None) -> str:
    """Why a body or message that JSON could not be read was refused, in the client's terms."""
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return "it is not valid UTF-8"
    if isinstance(exc, ValueError) and "digits" in str(exc):
        # Python refuses to read integers this long (a denial-of-service guard)
        return f"a number has more than {sys.get_int_max_str_digits()} digits"
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at character {exc.pos}"
    return "it could not be parsed"


def unparsable_body(exc: BaseException | None) -> ApiError:
    """The body was JSON by its content type but could not be read as JSON."""
    return invalid(f"the body is not valid JSON ({unreadable_json(exc)})")


def _usable_id(data: Any) -> str | None:
    id_ = data.get("id") if isinstance(data, dict) else None
    return id_ if isinstance(id_, str) and 0 < len(id_) <= 128 else None


def ws_message_id(raw: str) -> str | None:
    """The id of a WebSocket message refused before it is read (over the rate), so the client
    can match the error to the request it dropped; None when it has no usable one."""
    try:
        return _usable_id(json.loads(raw))
    except (ValueError, RecursionError):
        return None


def parse_ws_message(raw: str) -> WsGenerate | WsCancel:
    """A WebSocket text message as a `generate` or `cancel`; otherwise an ApiError whose `id`
    is the message's own id when it has a usable one (so the client can match the error)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise invalid(f"message is not valid JSON ({unreadable_json(exc)})") from None
    if not isinstance(data, dict):
        raise invalid("message must be a JSON object")
    id_ = _usable_id(data)
    kind = data.get("type")
    model = WS_MESSAGES.get(kind) if isinstance(kind, str) else None
    if model is None:
        got = "no type" if kind is None else f"unknown message type {shown(kind)}"
        raise invalid(f"{got} (send type generate or cancel)", id=id_)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_fields_error(exc.errors(), id=id_) from None
