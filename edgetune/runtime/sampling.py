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


def select(
    logits: np.ndarray, context: list[int], cfg: SamplingConfig, rng: np.random.Generator
) -> int:
    """Pick the next token from a (V,) logit row."""
    x = logits.astype(np.float64).copy()
    if cfg.repetition_penalty != 1.0 and context:
        seen = np.unique(np.asarray(context))
        vals = x[seen]
        x[seen] = np.where(vals > 0, vals / cfg.repetition_penalty, vals * cfg.repetition_penalty)
    if cfg.temperature == 0:
        return int(x.argmax())
    x /= cfg.temperature
    if cfg.top_k and cfg.top_k < x.size:
        kth = np.partition(x, -cfg.top_k)[-cfg.top_k]
        x[x < kth] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        cut = order[np.searchsorted(cum, cfg.top_p) + 1 :]
        p[cut] = 0.0
        p /= p.sum()
    return int(rng.choice(p.size, p=p))
