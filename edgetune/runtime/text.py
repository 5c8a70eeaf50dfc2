"""``TextStream``: generated token ids -> text pieces, safe to show as they come.

Decoding token by token is wrong for byte-fallback and multi-byte characters (one emoji is
several tokens) and for tokenizers that merge spaces across tokens, so the whole generated
sequence is decoded again at every token and only what is new and final is released:
nothing while the text ends in an incomplete UTF-8 sequence, and a tail that could be the
start of a stop string is held back until the next token decides. ``Model.stream`` and the
server's sequences both use it, so a stop string ends the text at the same place in both.
"""

from __future__ import annotations

from typing import Callable


class TextStream:
    """Feed token ids with ``push``; each call returns the newly released text."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = ""  # text released so far
        self.text = ""  # the whole sequence as last decoded (released or not)
        self.stopped = False  # a stop string appeared: the text ended before it
        self._hold = max((len(s) - 1 for s in self.stop), default=0)

    def push(self, token: int) -> str:
        """The text this token releases ('' while held back or after a stop string)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return ""
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(text[:cut])
        return self._release(text[: len(text) - self._hold] if self._hold else text)

    def finish(self) -> str:
        """What was held back, once generation has ended without a stop string."""
        if self.stopped:
            return ""
        return self._release(self.decode(self.ids))

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.emitted):
            return ""
        piece = upto[len(self.emitted) :]
        self.emitted = upto
        return piece
