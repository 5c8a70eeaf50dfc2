"""``TextStream``: generated token ids -> text pieces, safe to show as they come.

Decoding token by token is wrong for byte-fallback and multi-byte characters (one emoji is
several tokens) and for tokenizers that merge spaces across tokens, so each new token is
decoded together with the tokens before it, and only what is new and final is released:
nothing while the text ends in an incomplete UTF-8 sequence, and a tail that could be the
start of a stop string is held back until the next token decides. ``Model.stream`` and the
server's sequences both use it, so a stop string ends the text at the same place in both.

The work per token is bounded (the scheme of ``tokenizers.decoders.DecodeStream``, TGI and
vLLM): a token is decoded with the tokens of the last released chunk as context, and the
text past the context's own decoding is its text. ``DecodeStream`` itself is not used: it
keeps no bounded window (a run of invalid bytes grows it without end), cannot hand back
its pending text for ``finish``, and raises when a byte-fallback group turns invalid after
part of it was released. Known limit, shared with every incremental decoder: byte-fallback
tokens forming invalid UTF-8 next to valid ones decode differently as a whole (the whole
group becomes U+FFFD), which a stream that already showed the valid part cannot follow.
"""

from __future__ import annotations

from typing import Any

MAX_PENDING = 8  # undecided tokens (text ending in U+FFFD) before part of them is settled
_KEEP = 4  # ... of which the last 4 stay undecided: a UTF-8 sequence is at most 4 bytes


class TextStream:
    """Feed token ids with ``push``; each call returns the newly released text.

    ``tokenizer`` is a ``tokenizers.Tokenizer``; special tokens are skipped, as in
    ``tokenizer.decode(ids, skip_special_tokens=True)``, which the released pieces plus
    ``finish()`` add up to."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.stopped = False  # a stop string appeared: the text ended before it
        self.added: str | None = ""  # what the last push added to .text (None: it changed)
        self.decoded_ids = 0  # ids handed to tokenizer.decode, all pushes together
        self.max_window = 0  # the most ids one decode call was given
        added = tokenizer.get_added_tokens_decoder()
        self._special = {i for i, t in added.items() if t.special}
        self._hold = max((len(s) - 1 for s in self.stop), default=0)
        self._win: list[int] = []  # ids decoded together: the context, then the undecided
        self._nctx = 0  # how many of _win are context (already in _done)
        self._ctx_text = ""  # decode(_win[: _nctx])
        self._tail = ""  # the undecided ids' text
        self._done: list[str] = []  # settled text, in chunks
        self._unreleased = ""  # settled text not yet released
        self._released: list[str] = []
        self._released_len = 0
        self._scan_from = 0  # where in the whole text a stop string could still begin

    @property
    def text(self) -> str:
        """The whole sequence as decoded so far (released or not)."""
        return "".join(self._done) + self._tail

    @property
    def emitted(self) -> str:
        """The text released so far."""
        return "".join(self._released)

    def push(self, token: int) -> str:
        """The text this token releases ('' while held back or after a stop string)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.added = ""
        if token not in self._special:  # skipped specials change no decoding
            self._step(token)
        if self._tail or not self._unreleased or self._unreleased.endswith("\ufffd"):
            return ""  # nothing new, or an incomplete UTF-8 sequence: wait for more bytes
        text, base = self._unreleased, self._released_len
        start = max(0, self._scan_from - base)
        cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(cut)
        self._scan_from = base + len(text) - self._hold
        return self._release(len(text) - self._hold)

    def finish(self) -> str:
        """What was held back, once generation has ended without a stop string."""
        if self.stopped:
            return ""
        self._settle(len(self._win), self._tail)
        return self._release(len(self._unreleased))

    # -- decoding ---------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        self.decoded_ids += len(ids)
        self.max_window = max(self.max_window, len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _step(self, token: int) -> None:
        self._win.append(token)
        new = self._decode(self._win)
        tail = new[len(self._ctx_text) :]
        grew = new.startswith(self._ctx_text) and tail.startswith(self._tail)
        self.added = tail[len(self._tail) :] if grew else None
        self._tail = tail
        if tail and not tail.endswith("\ufffd"):
            self._settle(len(self._win), tail)
        elif len(self._win) - self._nctx > MAX_PENDING:
            self._settle_part(new)

    def _settle_part(self, new: str) -> None:
        """A long undecided run (invalid bytes): settle all but its last ``_KEEP`` ids if the
        text splits there (decoding either side alone gives the whole), so the window and
        the work per token stay bounded."""
        cut = len(self._win) - _KEEP
        head = self._decode(self._win[:cut])
        rest = self._decode(self._win[cut:])
        if head + rest == new and head.startswith(self._ctx_text):
            self._settle(cut, head[len(self._ctx_text) :])
            self._tail = rest

    def _settle(self, upto: int, text: str) -> None:
        """``_win[_nctx:upto]`` decode to ``text``, final: it becomes the next context."""
        self._done.append(text)
        self._unreleased += text
        self._win = self._win[self._nctx :]
        upto -= self._nctx
        self._nctx = upto
        self._ctx_text = self._decode(self._win[:upto]) if upto else ""
        self._tail = ""

    def _release(self, n: int) -> str:
        if n <= 0:
            return ""
        piece, self._unreleased = self._unreleased[:n], self._unreleased[n:]
        self._released.append(piece)
        self._released_len += len(piece)
        return piece
