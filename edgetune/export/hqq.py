"""HQQ: half-quadratic quantization of one (K, N) weight into MatMulNBits 4-bit blocks.

Calibration-free (Badri & Shaji, 2023): starting from round-to-nearest, alternate
(1) codes ``q = clamp(round(w / s) + z)``, (2) the sparse error ``e = shrink_p(w - (q - z) s)``
(generalised soft threshold of an l_p norm, p < 1, so a few outlier weights may stay
badly quantized instead of dragging every scale), (3) closed-form zero point and scale
of the least-squares fit of ``(q - z) s`` to ``w - e``. Per block the iterate with the
smallest squared error is kept, so a block is never worse than round-to-nearest.

Why not ONNX Runtime's ``HQQWeightOnlyQuantizer`` (matmul_nbits_quantizer): it stores fp32
zero points (our native kernels and 4-bit zero-point layout need integers 0..15), fixes
the scale and updates only the zero point, and names and quantizes every MatMul itself
(the LM head too); edgetune keeps its readable initializer names and an 8-bit head.
So the solver is here, ~30 lines of numpy, with the zero point projected onto 0..15
at every step.

Asymmetric (the default for ``--algo hqq``) is HQQ proper: zero point and scale per block.
With ``--symmetric`` every zero point stays 8, as the format's default requires, and the
same iteration runs on the scale alone (on the quickstart model that is no better than
round-to-nearest; the zero point is where HQQ gains).
"""

from __future__ import annotations

import numpy as np

from ..kernels import Q4Weight
from ..kernels.reference import codes_for, q4_weight, rtn_params


def _shrink(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Proximal step of the l_p norm (generalised soft thresholding)."""
    return np.sign(x) * np.maximum(np.abs(x) - (1.0 / beta) * np.power(np.abs(x) + 1e-8, p - 1), 0)


def hqq_quantize(
    w: np.ndarray,
    block: int,
    symmetric: bool,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> Q4Weight:
    """HQQ 4-bit blocks of a (K, N) MatMul weight, in MatMulNBits layout."""
    k, n = w.shape
    x = np.ascontiguousarray(w.T, dtype=np.float64).reshape(n, k // block, block)  # (N, nb, block)
    s, z = (a.astype(np.float64) for a in rtn_params(w, block, symmetric))

    def codes_and_error(s, z):
        """The codes (s, z) give, and each block's squared error with them (the codes are
        reused by the next iteration's update, which starts from the same s and z)."""
        q = codes_for(x, s, z).astype(np.float64)
        return q, (((q - z[..., None]) * s[..., None] - x) ** 2).sum(-1)

    q, best_err = codes_and_error(s, z)
    best_s, best_z = s.copy(), z.copy()
    for _ in range(iters):
        target = x - _shrink(x - (q - z[..., None]) * s[..., None], beta, p)  # w minus outliers
        if not symmetric:
            safe = np.where(s == 0, 1.0, s)
            z = np.clip(np.round((q - target / safe[..., None]).mean(-1)), 0, 15)
        d = q - z[..., None]
        dd = (d * d).sum(-1)
        s = np.where(dd > 0, (d * target).sum(-1) / np.where(dd > 0, dd, 1.0), s)
        beta *= kappa
        q, err = codes_and_error(s, z)
        better = err < best_err
        best_s, best_z, best_err = (
            np.where(better, s, best_s),
            np.where(better, z, best_z),
            np.minimum(err, best_err),
        )
    scales = best_s.astype(np.float32)
    codes = codes_for(x, scales.astype(np.float64), best_z)
    return q4_weight(codes, scales, None if symmetric else best_z, block)
