"""Next-token selection: greedy, temperature, top-k, top-p, repetition penalty (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    """Tokens to generate at most."""
    temperature: float = 0.0
    """0 = greedy; otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches p."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the context (as in CTRL / transformers)."""
    stop: tuple[str, ...] = ()
    """Stop when the generated text contains any of these strings (not included)."""
    seed: int | None = None
    """Seed for reproducible sampling."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature and top_k must be >= 0 and top_p in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ConfigError("repetition_penalty must be > 0")


_FIRST_NUCLEUS = 64  # candidates tried first for top-p (then more, see _kept)


def penalized(logits: np.ndarray, context: list[int], cfg: SamplingConfig) -> np.ndarray:
    """(V,) float64 copy of ``logits`` with the repetition penalty applied to ``context``'s
    tokens (as in CTRL / transformers: positive logits divided, negative multiplied)."""
    x = logits.astype(np.float64)
    if cfg.repetition_penalty != 1.0 and context:
        seen = np.unique(np.asarray(context))
        vals = x[seen]
        r = cfg.repetition_penalty
        x[seen] = np.where(vals > 0, vals / r, vals * r)
    return x


def select(
    logits: np.ndarray, context: list[int], cfg: SamplingConfig, rng: np.random.Generator
) -> int:
    """Pick the next token from a (V,) logit row.

    The distribution is the textbook one (repetition penalty, temperature, top-k keeping
    every token tied with the k-th, then the smallest most-likely set reaching top-p, ties
    by lower id, renormalized), found without sorting the vocabulary: top-k takes its k
    candidates with ``argpartition``; top-p takes the top 64 and, while their mass falls
    short of p, at least 4x more, and sorts only those. The draw is the one
    ``rng.choice(V, p=probs)`` made before: one ``rng.random()`` against the cumulative
    probabilities in id order, so a seed picks the same tokens as before."""
    x = penalized(logits, context, cfg)  # O(V) passes are cheap, sorts are not
    if cfg.temperature == 0:
        return int(x.argmax())
    x /= cfg.temperature
    ids, probs = _kept(x, cfg.top_k, cfg.top_p)
    cdf = np.cumsum(probs)
    cdf /= cdf[-1]
    return int(ids[min(int(np.searchsorted(cdf, rng.random(), side="right")), ids.size - 1)])


def _top(x: np.ndarray, n: int) -> np.ndarray:
    """Ids (ascending) of the n largest of ``x`` and of every id tied with the n-th."""
    if n >= x.size:
        return np.arange(x.size)
    kth = x[np.argpartition(x, -n)[-n:]].min()
    return np.flatnonzero(x >= kth)


def _kept(x: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """(ids in ascending order, their renormalized probabilities) of the tokens sampled from."""
    m = x.max()
    if top_k and top_k < x.size:  # only the k candidates (and ties) get a probability
        ids = _top(x, top_k)
        p = np.exp(x[ids] - m)
        p /= p.sum()
        kept = _nucleus(ids, p, top_p) if top_p < 1.0 else None
        return kept if kept is not None else (ids, p)  # None: rounding kept the mass < p
    p = np.exp(x - m)  # (V,)
    p /= p.sum()
    if top_p >= 1.0:
        return np.arange(x.size), p
    n = _FIRST_NUCLEUS
    while True:  # the top n by probability; more until they hold the nucleus
        cand = _top(p, n)
        kept = _nucleus(cand, p[cand], top_p)
        if kept is not None or cand.size == x.size:
            return kept if kept is not None else (cand, p[cand] / p[cand].sum())
        # every other token has p <= the smallest candidate's: at least this many more
        mass, smallest = p[cand].sum(), p[cand].min()
        need = (top_p - mass) / smallest if smallest > 0 else x.size
        n = int(min(x.size, max(4 * n, cand.size + need + 1)))


def _nucleus(ids: np.ndarray, p: np.ndarray, top_p: float):
    """The smallest most-likely subset of ``ids`` (ascending) whose mass reaches ``top_p``,
    ties by lower id, renormalized; None when all of ``ids`` together fall short."""
    order = np.argsort(-p, kind="stable")  # ids ascending: ties keep the lower id first
    cum = np.cumsum(p[order])
    cut = int(np.searchsorted(cum, top_p))
    if cut == cum.size:
        return None
    pos = np.sort(order[: cut + 1])
    q = p[pos]
    return ids[pos], q / q.sum()
