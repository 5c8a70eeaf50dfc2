"""The plain versions the runtime's per-token code is checked against and benchmarked with
(``edgetune bench tokens``): token selection over the whole vocabulary with a full sort,
and streaming text that decodes the whole sequence at every token. Same results as
``sampling.select`` and ``text.TextStream``; the work grows with V and with the length."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .sampling import SamplingConfig, penalized


def probs_reference(logits: np.ndarray, context: list[int], cfg: SamplingConfig) -> np.ndarray:
    """(V,) float64 probabilities ``select`` draws from (temperature > 0): the whole
    vocabulary, top-k by a partition, top-p by a full sort."""
    x = penalized(logits, context, cfg) / cfg.temperature
    if cfg.top_k and cfg.top_k < x.size:
        kth = np.partition(x, -cfg.top_k)[-cfg.top_k]
        x[x < kth] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        p[order[np.searchsorted(cum, cfg.top_p) + 1 :]] = 0.0
        p /= p.sum()
    return p


def select_reference(
    logits: np.ndarray, context: list[int], cfg: SamplingConfig, rng: np.random.Generator
) -> int:
    """``sampling.select``'s spec: the same token for the same ``rng`` state."""
    if cfg.temperature == 0:
        return int(penalized(logits, context, cfg).argmax())
    return int(rng.choice(logits.size, p=probs_reference(logits, context, cfg)))


class WholeDecodeStream:
    """``TextStream``'s spec: the whole sequence decoded again at every token; nothing is
    released while the text ends in an incomplete UTF-8 sequence, and a tail that could
    start a stop string is held back until the next token decides."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = ""
        self.text = ""
        self.stopped = False
        self._hold = max((len(s) - 1 for s in self.stop), default=0)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(text[:cut])
        return self._release(text[: max(0, len(text) - self._hold)])

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._release(self.decode(self.ids))

    def _release(self, upto: str) -> str:
        if len(upto) <= len(self.emitted):
            return ""
        piece = upto[len(self.emitted) :]
        self.emitted = upto
        return piece
