"""Turning generated tokens into text deltas that are always safe to show.

GPT-2's tokens are byte sequences: one emoji or CJK character can span several tokens, and a
token can end in the middle of a character. We keep each token's bytes and run them through an
incremental UTF-8 decoder, which only ever releases whole characters.

Stop strings can also span tokens. Text that could still turn out to be the start of a stop
string is held back until it is clear either way, so the stop text is never sent.
"""
from __future__ import annotations

import codecs
from functools import lru_cache

from transformers import PreTrainedTokenizerBase


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE writes every byte as a printable character; this undoes that."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def token_bytes_table(tokenizer: PreTrainedTokenizerBase) -> list[bytes]:
    """The bytes each token id stands for."""
    decoder = _byte_decoder()
    table = []
    for piece in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        piece = piece or ""
        if all(ch in decoder for ch in piece):
            table.append(bytes(decoder[ch] for ch in piece))
        else:  # special or added tokens are stored as plain text
            table.append(piece.encode("utf-8"))
    return table


class TextStream:
    """One choice's text: push token bytes in, get displayable new text out."""

    def __init__(self, stop: tuple[str, ...] = (), keep_stop: bool = False):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = stop
        self._keep_stop = keep_stop  # the stop string ends the text instead of being cut
        self._held = ""  # decoded, not yet sent: could be the start of a stop string
        self.stopped = False

    def push(self, data: bytes, find_stops: bool = True) -> str:
        """Add one token's bytes; return the text that can be sent now. Stop strings are looked
        for only in the text pushed with `find_stops` (min_tokens keeps them off at first)."""
        new = self._utf8.decode(data)
        if not find_stops:
            text, self._held = self._held + new, ""
            return text
        return self._release(new)

    def finish(self) -> str:
        """The sequence ended for another reason: send what was held back."""
        text = self._release(self._utf8.decode(b"", final=True))
        if not self.stopped:
            text, self._held = text + self._held, ""
        return text

    def _release(self, new: str) -> str:
        if self.stopped:
            return ""
        text = self._held + new
        if not self._stop:
            self._held = ""
            return text
        hits = [(i, -len(s)) for s in self._stop if (i := text.find(s)) >= 0]
        if hits:  # the earliest stop string; of those starting there, the longest
            self.stopped, self._held = True, ""
            at, minus_len = min(hits)
            return text[: at - minus_len] if self._keep_stop else text[:at]
        keep = _longest_stop_prefix_suffix(text, self._stop)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
