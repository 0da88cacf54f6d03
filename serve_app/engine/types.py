"""The small typed objects that travel between the API and the engine.

One `GenerationRequest` is built at the ingress and reaches the engine unchanged; the engine
answers with a stream of `Delta`s, one per choice per step that produced text or finished.
They are plain dataclasses so that Ray can pickle them between deployments.
"""
from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]

# The repetition guards' ranges: OpenAI's for its two penalties; for repetition_penalty (HF's and
# vLLM's, which take any positive number) a bound far past any useful value (1.1-1.5 is usual),
# so that a typo such as 120 for 1.2 is refused rather than served as a wall against every seen token.
MAX_OPENAI_PENALTY = 2.0
MAX_REPETITION_PENALTY = 10.0
MAX_LOGPROBS = 5  # alternatives per token, as OpenAI's completions allow
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 bans a token, 100 all but forces it


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0  # 1 means no nucleus cut
    min_p: float = 0.0  # 0 means no min-p cut (tokens under min_p x the likeliest one's probability)
    n: int = 1  # choices; they share one prefill
    stop: tuple[str, ...] = ()  # the stop text itself is never returned
    seed: int | None = None  # same seed, same text, whatever else is in the batch
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last K tokens (vLLM's name)
    # Repetition guards (serve_app/engine/penalties.py). OpenAI's, over the tokens generated so
    # far: a token's logit loses frequency_penalty per time it was generated, and
    # presence_penalty once it has been.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # HF's and vLLM's, over the prompt's tokens and the generated ones: a seen token's logit is
    # divided by it when positive, multiplied by it when negative. 1 turns it off.
    repetition_penalty: float = 1.0
    # With each token, its log-probability and those of the `logprobs` likeliest tokens (0: the
    # chosen token's alone); None: none. From the distribution sampling starts from: the model's,
    # after the repetition guards, before temperature, top-k and top-p (docs/api.md).
    logprobs: int | None = None
    # max_tokens is the model's default, not the client's: where the prompt leaves less room
    # in the context, generate what fits (finish_reason "length") instead of refusing, as a
    # client that never asked for a length expects.
    fit_max_tokens: bool = False
    # Each choice's text starts with the prompt (OpenAI's `echo`), as the model read it: after
    # truncate_prompt_tokens, decoded from its tokens. With logprobs, the prompt's tokens are
    # scored too (`scores_prompt`); with max_tokens 0, the prompt is all there is.
    echo: bool = False
    # OpenAI's logit_bias: (token id, value) pairs added to those tokens' logits at every step,
    # after the repetition guards (so logprobs, too, are of the biased distribution).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's: no end-of-text and no stop string before min_tokens tokens; ignore_eos: never
    # end-of-text (its logit is masked: what load generators ask for to get fixed lengths).
    min_tokens: int = 0
    ignore_eos: bool = False
    # vLLM's too: tokens that end a choice as end-of-text does (finish_reason "stop"; a
    # non-special one's text is kept, as vLLM keeps it), and stop strings kept in the text.
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        # Values the engine cannot act on are refused here, so every caller gets the same
        # message whichever API it came through.
        if self.max_tokens < 1 and not (self.max_tokens == 0 and self.echo):
            raise RequestRejected("max_tokens must be at least 1 (0 only with echo: the prompt alone)", param="max_tokens")
        if not (math.isfinite(self.temperature) and math.isfinite(self.top_p)):
            raise RequestRejected("temperature and top_p must be finite numbers")
        if self.temperature < 0:
            raise RequestRejected("temperature must be >= 0", param="temperature")
        if self.top_k < 0:
            raise RequestRejected("top_k must be >= 0 (0 turns it off)", param="top_k")
        if not 0 < self.top_p <= 1:
            raise RequestRejected("top_p must be in (0, 1]", param="top_p")
        if not 0 <= self.min_p <= 1:  # NaN fails too
            raise RequestRejected("min_p must be in [0, 1] (0 turns it off)", param="min_p")
        if self.n < 1:
            raise RequestRejected("n must be at least 1", param="n")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            # The sampler hashes a 64-bit seed: a larger one would wrap onto another's text.
            raise RequestRejected("seed must be a 64-bit integer (from -2**63 to 2**64 - 1)", param="seed")
        if any(not s for s in self.stop):
            raise RequestRejected("stop strings must not be empty", param="stop")
        if self.truncate_prompt_tokens is not None and self.truncate_prompt_tokens < 1:
            raise RequestRejected("truncate_prompt_tokens must be at least 1", param="truncate_prompt_tokens")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -MAX_OPENAI_PENALTY <= getattr(self, name) <= MAX_OPENAI_PENALTY:  # NaN fails too
                raise RequestRejected(f"{name} must be in [-{MAX_OPENAI_PENALTY:g}, {MAX_OPENAI_PENALTY:g}]", param=name)
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise RequestRejected(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] (1 turns it off)", param="repetition_penalty")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestRejected(f"min_tokens must be from 0 to max_tokens ({self.max_tokens}); got {self.min_tokens}", param="min_tokens")
        if any(not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS or t < 0 for t, b in self.logit_bias):  # NaN fails too
            raise RequestRejected(f"logit_bias maps token ids (>= 0) to values in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", param="logit_bias")
        if any(t < 0 for t in self.stop_token_ids):
            raise RequestRejected("stop_token_ids must be token ids (>= 0)", param="stop_token_ids")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestRejected(f"logprobs must be in [0, {MAX_LOGPROBS}]", param="logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def scores_prompt(self) -> bool:
        """Whether each prompt token's log-probability is returned (OpenAI's echo with logprobs:
        what evaluation harnesses read to score a text)."""
        return self.echo and self.logprobs is not None

    @property
    def penalised(self) -> bool:
        """Whether a repetition guard is on (the engine counts tokens only for such requests)."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1)


@dataclass(frozen=True)
class GenerationRequest:
    """A prompt (text or token ids) and how to continue it."""

    prompt: str | list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass(frozen=True)
class TokenLogprob:
    """A token as text, its log-probability, and the likeliest tokens at its step (a request's
    `logprobs` of them, likeliest first). A token that is not whole UTF-8 on its own is written
    as OpenAI writes it: `bytes:\\xe2\\x80`. A prompt's first token has no log-probability
    (nothing before it predicts it): None."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """What one choice of one request produced in one engine step.

    `text` is new text only, never a split UTF-8 character. The last delta of a choice has a
    `finish_reason`; `error` carries the message when that reason is "error".
    """

    request_id: str
    index: int  # choice index, 0..n-1
    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far for this choice
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    # One per token in token_ids, if the request asked; a first delta that echoes a scored
    # prompt has the prompt's tokens' first.
    logprobs: tuple[TokenLogprob, ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# OpenAI's code for a prompt (with its completion) longer than the model takes.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class RequestRejected(ValueError):
    """The request breaks a limit or is malformed; nothing was generated. Maps to HTTP 400.

    `param` names the parameter to change and `code` a machine-readable reason, as OpenAI's
    errors carry them: clients act on them (LiteLLM's context-window fallbacks look for
    code "context_length_exceeded")."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; try again later. Maps to HTTP 503 / 429."""
