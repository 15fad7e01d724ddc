"""Model tokens to text, piece by piece: incremental UTF-8 decoding, so that a multi-byte character
is never split across pieces, and stop strings matched on the decoded text, so that a stop string
may span tokens. Text that could still be the start of a stop string is held back until it can't.

The engine (`gptkit.generate`) feeds each row's new token bytes through a `TextStream` when it has
a tokenizer; nothing here knows about models or tensors.
"""

from __future__ import annotations

import codecs
from typing import Sequence


def token_bytes_fn(tokenizer):
    """id -> the bytes of that token, for either tokenizer kind."""
    if hasattr(tokenizer, "token_bytes"):
        return tokenizer.token_bytes
    cache: dict[int, bytes] = {}

    def tb(i: int) -> bytes:
        b = cache.get(i)
        if b is None:
            b = cache[i] = tokenizer.decode([i]).encode("utf-8")
        return b
    return tb


class TextStream:
    """Turns token bytes into text pieces that never split a UTF-8 character, and finds stop
    strings in the decoded text, including ones that span several tokens."""

    def __init__(self, stops: Sequence[str] = ()):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # all complete characters so far
        self.sent = 0  # how much of self.text was handed out
        self.stopped = False

    def push(self, data: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to hand out."""
        if self.stopped:
            return ""
        self.text += self.decoder.decode(data)
        if not self.stops:
            return self._emit(len(self.text))
        # every stop occurrence starts at or after `sent`: text before it was released only when
        # no stop string could begin there
        hits = [p for p in (self.text.find(s, self.sent) for s in self.stops) if p >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
            self.text = self.text[:end]
            return self._emit(end)
        return self._emit(len(self.text) - self._pending_prefix())

    def finish(self) -> str:
        """End of generation: release what was held back (an incomplete character becomes U+FFFD)."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._emit(len(self.text))

    def _pending_prefix(self) -> int:
        """Length of the longest suffix of the unsent text that is a proper prefix of a stop string."""
        tail = self.text[self.sent:]
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:n]):
                    best = n
                    break
        return best

    def _emit(self, end: int) -> str:
        piece = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece
