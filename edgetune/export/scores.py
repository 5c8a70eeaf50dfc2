"""How close a quantized model's next-token predictions are to the fp32 model's.

``Scores`` sums, one sequence's two (T-1, V) logit arrays at a time, what the export
report's ``quant_vs_fp32`` states: top-1 next-token agreement, the perplexity of each
model on the text, their relative change, and the mean KL(fp32 || quant) per token. The
log-softmax runs in fp64 over ``SCORE_ROWS`` positions at a time ((rows, V), not (T, V)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import DataError

SCORE_ROWS = 64  # positions per chunk when scoring logits (fp64 log-softmax of (rows, V))


def log_softmax(x: np.ndarray) -> np.ndarray:
    """fp64 log-softmax over the last axis."""
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class Scores:
    """Sums behind ``quant_vs_fp32``'s numbers, fed one sequence's logits at a time."""

    def __init__(self):
        self.agree = self.total = 0
        self.nll_f = self.nll_q = self.kl = 0.0

    def add(self, lf: np.ndarray, lq: np.ndarray, ids: Sequence[int]) -> None:
        """``lf``, ``lq``: (T-1, V) logits of the positions that predict ``ids[1:]``."""
        tgt = np.asarray(ids[1:], np.int64)
        for a in range(0, len(tgt), SCORE_ROWS):
            b = min(a + SCORE_ROWS, len(tgt))
            f, q, t = lf[a:b], lq[a:b], tgt[a:b]
            self.agree += int((f.argmax(-1) == q.argmax(-1)).sum())
            pf, pq = log_softmax(f), log_softmax(q)
            rows = np.arange(b - a)
            self.nll_f -= float(pf[rows, t].sum())
            self.nll_q -= float(pq[rows, t].sum())
            self.kl += float((np.exp(pf) * (pf - pq)).sum())
        self.total += len(tgt)

    def result(self) -> dict:
        if not self.total:
            raise DataError("parity needs at least one sequence of two or more tokens")
        ppl_f, ppl_q = math.exp(self.nll_f / self.total), math.exp(self.nll_q / self.total)
        return {
            "top1_agreement": self.agree / self.total,
            "ppl_fp32": ppl_f,
            "ppl_quant": ppl_q,
            "ppl_change": ppl_q / ppl_f - 1.0,
            "kl_mean": self.kl / self.total,
            "tokens": self.total,
        }
