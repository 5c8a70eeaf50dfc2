"""GPTQ: 4-bit blocks chosen with second-order error compensation (Frantar et al., 2022).

1. ``collect_hessians``: the merged PyTorch model reads a few thousand calibration tokens;
   a hook on each ``nn.Linear`` sums ``X^T X`` of its inputs (K x K, the layer-wise Hessian).
2. ``gptq_quantize``: quantize one (K, N) weight column by column along K; the rounding error
   of each column is spread over the columns not yet quantized through the Cholesky factor
   of the damped inverse Hessian (lazy batches of 128 columns). Scales and zero points are
   per MatMulNBits block: chosen by round-to-nearest from the already-compensated weights
   when the block starts, or, with act-order, from the original weights before the
   columns are reordered by decreasing Hessian diagonal (static groups), so blocks stay
   contiguous in K whatever the order.

Why not ONNX Runtime's ``GPTQWeightOnlyQuantConfig``: it delegates to Intel Neural
Compressor (not a dependency here), calibrates by re-running the ONNX graph, and writes
its own initializer names and a 4-bit head; edgetune's native runtime finds weights by
readable names and keeps the head at 8 bits.

All Hessians of one model are held at once (fp32, K^2 each): fine for small models; a
multi-billion-parameter model would want the layer-by-layer pass of the paper, where each
layer also sees the outputs of the already-quantized layers before it. Here every layer
is calibrated on the fp32 model's activations.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from ..kernels import Q4Weight
from ..kernels.reference import q4_weight, rtn_params

LAZY_BATCH = 128


def calibration_texts(tokenizer, calib_data: str | None, limit: int = 512) -> list[str]:
    """Calibration text: the given JSONL/.txt file, else the bundled task's *training*
    combinations (the parity report scores held-out ones, which calibration must not see)."""
    from .report import task_texts

    return task_texts(tokenizer, calib_data, limit, heldout=False, seed=2,
                      what="calibration data")


def collect_hessians(model, tokenizer, texts: list[str], modules: set[str], tokens: int,
                     max_len: int = 512) -> tuple[dict[str, np.ndarray], int]:
    """``X^T X`` (K, K) of the inputs of each named ``nn.Linear`` over about ``tokens``
    calibration tokens, texts packed into rows of up to ``max_len``; returns (hessians,
    tokens used)."""
    import torch

    hess: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            hess[name] = hess.get(name, 0) + x.T @ x
        return fn

    for name, mod in model.named_modules():
        if name in modules and isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(hook(name)))
    rows: list[list[int]] = [[]]
    seen = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_len]
        if len(rows[-1]) + len(ids) > max_len:
            rows.append([])
        rows[-1].extend(ids)
        seen += len(ids)
        if seen >= tokens:
            break
    rows = [r for r in rows if r]
    try:
        with torch.no_grad():
            for ids in rows:
                model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise ConfigError("calibration data holds no text to calibrate GPTQ on")
    return {k: v.float().numpy() for k, v in hess.items()}, seen


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, block: int, symmetric: bool,
                  damp: float = 0.01, act_order: bool = False) -> Q4Weight:
    """GPTQ 4-bit blocks of a (K, N) MatMul weight given its inputs' ``X^T X`` (K, K)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny column updates: threads only add sync cost
    try:
        return _gptq(torch, w, hessian, block, symmetric, damp, act_order)
    finally:
        torch.set_num_threads(threads)


def _gptq(torch, w, hessian, block, symmetric, damp, act_order) -> Q4Weight:
    k, n = w.shape
    nb = k // block
    W = torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32)).clone()  # (N, K)
    H = torch.from_numpy(np.array(hessian, dtype=np.float32))
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    scales = np.zeros((n, nb), np.float32)
    zeros = np.zeros((n, nb), np.float32)
    if act_order:  # static groups: every block's scale from the original weights
        scales, zeros = rtn_params(W.T.numpy(), block, symmetric)
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros((n, k), dtype=torch.uint8)
    step = max(LAZY_BATCH // block, 1) * block
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // block
            if not act_order and col % block == 0:  # the block starts: its RTN params, now
                s, z = rtn_params(W1[:, i:i + block].T.numpy(), block, symmetric)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            s = torch.from_numpy(scales[:, g])
            z = torch.from_numpy(zeros[:, g])
            wcol = W1[:, i]
            safe = torch.where(s == 0, torch.ones_like(s), s)
            q = torch.where(s == 0, z, torch.clamp(torch.round(wcol / safe) + z, 0, 15))
            codes[:, col] = q.to(torch.uint8)
            e = (wcol - (q - z) * s) / h1[i, i]
            W1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q4_weight(codes.numpy(), scales, None if symmetric else zeros, block)
