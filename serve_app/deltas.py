"""The one place a request's stream of `Delta`s is folded into whole choices.

The HTTP routes, the WebSocket, the result cache and the model server's metrics all read a
stream the same way, through an `Accumulator`.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field

from serve_app.engine.types import Delta, TokenLogprob


@dataclass
class Accumulator:
    texts: dict[int, str] = field(default_factory=dict)
    finish: dict[int, str | None] = field(default_factory=dict)
    completion: dict[int, int] = field(default_factory=dict)
    error: str | None = None  # the first choice that ended in error or cancelled says why
    # A batched /v1/completions request numbers prompt p's choices p * n .. p * n + n - 1: with
    # n here, usage counts each prompt's tokens once. 0: every choice continues one prompt.
    choices_per_prompt: int = 0
    prompts: dict[int, int] = field(default_factory=dict)  # prompt tokens, by prompt
    cached: dict[int, int] = field(default_factory=dict)  # of those, served by the engine's prefix cache
    # By choice: each token's logprobs and where in the choice's text its delta's text starts.
    logprobs: dict[int, list[tuple[int, TokenLogprob]]] = field(default_factory=dict)

    def add(self, d: Delta) -> None:
        if d.logprobs:
            at = len(self.texts.get(d.index, ""))
            offsets = _offsets(at, d.text, d.logprobs)
            self.logprobs.setdefault(d.index, []).extend(zip(offsets, d.logprobs))
        self.texts[d.index] = self.texts.get(d.index, "") + d.text
        self.completion[d.index] = max(self.completion.get(d.index, 0), d.completion_tokens)
        p = d.index // self.choices_per_prompt if self.choices_per_prompt else 0
        self.prompts[p] = max(self.prompts.get(p, 0), d.prompt_tokens)
        self.cached[p] = max(self.cached.get(p, 0), d.cached_tokens)
        if d.finish_reason is not None:
            self.finish[d.index] = d.finish_reason
            if d.finish_reason in ("error", "cancelled") and self.error is None:
                self.error = d.error or f"generation {d.finish_reason}"

    def add_all(self, deltas) -> Accumulator:
        for d in deltas:
            self.add(d)
        return self

    def logprobs_of(self, d: Delta) -> list[tuple[int, TokenLogprob]]:
        """The (text offset, logprob) entries of a delta already added: its own tokens'."""
        return self.logprobs[d.index][-len(d.logprobs):] if d.logprobs else []

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompts.values())

    @property
    def cached_tokens(self) -> int:
        return sum(self.cached.values())

    @property
    def status(self) -> str:
        """"ok", or how the stream ended badly ("error" before "cancelled")."""
        reasons = set(self.finish.values())
        return "error" if "error" in reasons else "cancelled" if "cancelled" in reasons else "ok"

    @property
    def longest(self) -> int:
        return max(self.completion.values(), default=0)

    def ordered(self, n: int) -> tuple[list[str], list[str | None]]:
        return [self.texts.get(i, "") for i in range(n)], [self.finish.get(i) for i in range(n)]

    def usage(self) -> dict:
        done = sum(self.completion.values())
        # prompt_tokens_details.cached_tokens is OpenAI's own field for prompt-cache hits.
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done, "total_tokens": self.prompt_tokens + done,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


_BYTES = re.compile(r"bytes:((?:\\x[0-9a-f]{2})+)")


def _offsets(at: int, text: str, logprobs: tuple[TokenLogprob, ...]) -> list[int]:
    """Where each token of a delta (its `text`, starting at `at` in the choice's text) starts.

    One generated token: at the end of the delta, its own text's length back, where the delta's
    text ends with it. Before it may come text held back from earlier tokens: the U+FFFD of a
    byte that never finished a character, written out once the next token showed it would not.
    Otherwise (a token of a character split across tokens, a token cut by a stop string) at the
    delta's start. Several tokens (an echoed prompt, with the first generated one): one after the
    other as their bytes decode; a token whose text is not there takes no room (an empty prompt
    is echoed as "", though the model read it as end-of-text); the tokens of a split character
    all start where it does."""
    end = at + len(text)
    if len(logprobs) == 1:
        token = logprobs[0].token
        return [end - len(token) if token and text.endswith(token) else at]
    decoder, offsets, pos = codecs.getincrementaldecoder("utf-8")("replace"), [], at
    for lp in logprobs:
        pending = bool(decoder.getstate()[0])
        split = _BYTES.fullmatch(lp.token)
        piece = decoder.decode(bytes.fromhex(split[1].replace("\\x", "")) if split else lp.token.encode("utf-8"))
        held = 1 if pending and piece.startswith("\ufffd") else 0  # the earlier fragment's
        offsets.append(min(pos + held, end))
        if text.startswith(piece, pos - at):
            pos += len(piece)
    return offsets
