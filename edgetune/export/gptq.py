"""GPTQ: 4-bit blocks chosen with second-order error compensation (Frantar et al., 2022).

Sequential, one decoder layer at a time, as in the paper: ``GptqCalibration`` embeds the
calibration sequences and, for layer i, runs them through the checkpoint's layer i (read
from the safetensors by ``layerwise.Layerwise``) with a hook on each ``nn.Linear`` that sums
``X^T X`` of its inputs (in, in), the layer-wise Hessian; the projections are quantized;
then the sequences go through layer i again with the *quantized* weights, so layer i+1 is
calibrated on what the quantized model really feeds it. One layer's weights and Hessians
are in memory at a time. The LM head is not GPTQ'd (it is 8-bit RTN by default).

``gptq_quantize`` quantizes one weight column by column along K; the rounding error of each
column is spread over the columns not yet quantized through the Cholesky factor of the
damped inverse Hessian (lazy batches of 128 columns). Scales and zero points are per
MatMulNBits block: chosen by round-to-nearest from the already-compensated weights when
the block starts, or, with act-order, from the original weights before the columns are
reordered by decreasing Hessian diagonal (static groups), so blocks stay contiguous in K
whatever the order. ``gptq_factor`` does the (K, K) algebra once per Hessian, so a
projection quantized in chunks of output rows, or q/k/v sharing one input, factor it once.

Layouts: HF stores a projection as (out, in) = (N, K); the ONNX MatMul weight (and
``gptq_quantize``'s ``w``, and ``Q4Weight``) is its transpose (K, N) = (in, out). Each
function's docstring says which it takes.

Memory at Phi-3-mini size (hidden 3072, intermediate 8192): the layer's fp32 weights
(453 MB) while its Hessians are summed, in fp32 (3 x 38 MB for the qkv / o / gate_up inputs,
268 MB for down_proj's); a factor takes 2 x K^2 fp32 while it is made (537 MB for
down_proj), then K^2.

Why not ONNX Runtime's ``GPTQWeightOnlyQuantConfig``: it delegates to Intel Neural
Compressor (not a dependency here), calibrates by re-running the ONNX graph, and writes
its own initializer names and a 4-bit head; edgetune's native runtime finds weights by
readable names and keeps the head at 8 bits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError, ModelError
from ..kernels import Q4Weight
from ..kernels.reference import q4_weight, rtn_params

if TYPE_CHECKING:
    import torch

    from .layerwise import States

LAZY_BATCH = 128


def calibration_texts(tokenizer, calib_data: str | None, limit: int = 512) -> list[str]:
    """Calibration text: the given JSONL/.txt file, else the bundled task's *training*
    combinations (the parity report scores held-out ones, which calibration must not see)."""
    from .report import task_texts

    return task_texts(tokenizer, calib_data, limit, heldout=False, seed=2, what="calibration data")


def calibration_rows(
    tokenizer, texts: list[str], tokens: int, max_len: int = 512
) -> tuple[list[list[int]], int]:
    """Token rows to calibrate on: texts packed into rows of up to ``max_len`` tokens until
    about ``tokens`` are reached; (rows, tokens used)."""
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
    if not seen:
        raise ConfigError("calibration data holds no text to calibrate GPTQ on")
    return rows, seen


def collect_hessians(
    model, tokenizer, texts: list[str], modules: set[str], tokens: int, max_len: int = 512
) -> tuple[dict[str, np.ndarray], int]:
    """``X^T X`` (K, K) of the inputs of each named ``nn.Linear`` over about ``tokens``
    calibration tokens, texts packed into rows of up to ``max_len``; returns (hessians,
    tokens used).

    DEPRECATED: holds the whole PyTorch model and every Hessian at once, and calibrates
    each layer on the fp32 model's activations. Use ``GptqCalibration`` (layer by layer,
    sequential). Kept while ``export/__init__.py`` still calls it; the tests use it as
    the reference for layer 0's Hessians."""
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
    rows, seen = calibration_rows(tokenizer, texts, tokens, max_len)
    try:
        with torch.no_grad():
            for ids in rows:
                model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return {k: v.float().numpy() for k, v in hess.items()}, seen


# -- sequential calibration, one layer at a time -------------------------------------------


class GptqCalibration:
    """Sequential GPTQ's activations, driven in layer order by the exporter::

        g = GptqCalibration(model_dir, token_lists)
        for i in range(g.n_layers):
            H = g.hessians(i)   # {HF weight name: X^T X (in, in)} of layer i's Linears
            deq = {name: <quantized with gptq_quantize(w.T, H[name], ...), dequantized,
                          HF layout (out, in)> for name in H}
            g.advance(i, deq)   # layer i with the quantized weights -> layer i+1's inputs

    ``token_lists``: the calibration rows (see ``calibration_rows``), each run on its own
    (no padding). Projections ``advance`` is not given keep the checkpoint's weights (e.g.
    one the bundle keeps fp32)."""

    def __init__(self, model_dir: str | os.PathLike, token_lists: Sequence[Sequence[int]]):
        import torch

        from .layerwise import Layerwise, torch_threads

        self.tokens = sum(len(t) for t in token_lists)
        if not self.tokens:
            raise ConfigError("calibration data holds no text to calibrate GPTQ on")
        self.lw = Layerwise(model_dir)
        self.n_layers = self.lw.n_layers
        with torch_threads(), torch.inference_mode():
            self.states: States | None = self.lw.embed(token_lists)  # None once finished
        self.layer = 0  # the layer whose Hessians come next
        self._summed = False

    def _expect(self, i: int, summed: bool | None, what: str) -> None:
        if i != self.layer or summed not in (None, self._summed) or i >= self.n_layers:
            step = "advance" if self._summed else "hessians"
            raise ValueError(
                f"GptqCalibration.{what}({i}) out of order: next is {step}({self.layer})"
            )

    def hessians(self, i: int) -> dict[str, np.ndarray]:
        """{HF weight name of each ``nn.Linear`` of layer ``i``: X^T X (in, in) fp32} summed
        over the calibration tokens, from layer ``i``'s inputs as the quantized layers
        before it produce them (the checkpoint's layer ``i`` makes its inner activations).
        Projections fed the same tensor (q/k/v, gate/up) share one array: do not modify it.
        Layer ``i`` is freed again before this returns."""
        import torch

        from .layerwise import torch_threads

        self._expect(i, False, "hessians")
        with torch_threads(), torch.inference_mode():
            layer = self.lw.load_layer(i)
            try:
                sums = self._sum_xtx(layer, i)
            finally:
                self.lw.free_layer(i)
        self._summed = True
        arrays: dict[int, np.ndarray] = {}  # one array per sum, so sharing survives
        return {name: arrays.setdefault(id(h), h.numpy()) for name, h in sums.items()}

    def _sum_xtx(self, layer, i: int) -> dict:
        import torch

        sums: dict[str, torch.Tensor] = {}
        seen: list[tuple] = []  # (input tensor, its sum) of the sequence being run

        def hook(name: str):
            def fn(_mod, inputs, _out):
                x = inputs[0]
                for t, acc in seen:
                    if t is x:  # the same input as an earlier projection: the same X^T X
                        sums.setdefault(name, acc)
                        return
                x = x.reshape(-1, x.shape[-1])
                acc = sums.get(name)
                if acc is None:
                    acc = sums[name] = torch.zeros((x.shape[1], x.shape[1]))
                acc.addmm_(x.T, x)  # fp32: 4 bytes x K^2 per distinct input
                seen.append((inputs[0], acc))

            return fn

        prefix = self.lw.layer_prefix(i)
        hooks = [
            m.register_forward_hook(hook(f"{prefix}{n}.weight"))
            for n, m in layer.named_modules()
            if isinstance(m, torch.nn.Linear)
        ]
        states = self.states
        assert states is not None  # freed by GptqDriver.finish() only, after the last layer
        try:
            for r in range(len(states.rows)):  # the outputs are not kept: advance makes them
                seen.clear()
                self.lw.run_row(i, states, r)
        finally:
            seen.clear()
            for hk in hooks:
                hk.remove()
        return sums

    def advance(self, i: int, weights) -> None:
        """Run the calibration states through layer ``i`` with its quantized weights:
        ``weights`` is {HF weight name: dequantized fp32 (out, in)} or a ``WeightFn``
        (name -> array or None); what it lacks comes from the checkpoint (None: all of it,
        for a layer left unquantized, with or without ``hessians(i)`` before)."""
        import torch

        from .layerwise import as_weight_fn, torch_threads

        self._expect(i, None, "advance")
        assert self.states is not None  # freed by GptqDriver.finish() only, after the last layer
        with torch_threads(), torch.inference_mode():
            self.lw.load_layer(i, as_weight_fn(weights))
            try:
                self.lw.run_layer(i, self.states)
            finally:
                self.lw.free_layer(i)
        self.layer, self._summed = i + 1, False


class GptqDriver:
    """GPTQ for the streaming exporter (``stream.DecoderWriter``), which calls, per
    projection in graph order: ``enter(module)``, ``hessian(module)`` (what to pass
    ``gptq_quantize`` as its hessian: a ``GptqFactor``), then ``quantized(module, weight)``,
    and ``finish()`` at the end. Crossing into a new layer runs the previous one with its
    quantized weights (``GptqCalibration.advance``) and sums the new one's Hessians.
    Each Hessian is factored once, on first use, and freed once all its projections are
    quantized, so at down_proj only its own factor is left."""

    def __init__(self, calib: GptqCalibration, damp: float, act_order: bool, calibration: dict):
        self.calib, self.damp, self.act_order = calib, damp, act_order
        self.calibration = calibration  # what the manifest records
        self.current: int | None = None
        self._hessians: dict[str, np.ndarray] = {}
        self._factors: dict[str, GptqFactor] = {}
        self._done: dict[str, np.ndarray | Q4Weight] = {}

    @classmethod
    def start(cls, model_dir, cfg, log=print) -> GptqDriver:
        """Tokenize and embed the calibration text per ``cfg`` (an ``ExportConfig``):
        ``calib_data``, else ``eval_data`` (noted: the report then scores text GPTQ saw),
        else the bundled task's training split; about ``calib_tokens`` tokens."""
        from ..models import load_tokenizer

        tokenizer = load_tokenizer(model_dir)
        source = cfg.calib_data or cfg.eval_data
        rows, used = calibration_rows(
            tokenizer, calibration_texts(tokenizer, source), cfg.calib_tokens
        )
        calibration = {
            "source": str(source) if source else "bundled task, training split",
            "tokens": used,
            "damp": cfg.gptq_damp,
            "act_order": cfg.act_order,
            "sequential": True,
            "overlaps_report_text": bool(source) and source == cfg.eval_data,
        }
        if calibration["overlaps_report_text"]:
            log(
                f"note: GPTQ calibrated on {source}, the text the parity report scores; "
                "pass --calib-data for an independent report"
            )
        return cls(GptqCalibration(model_dir, rows), cfg.gptq_damp, cfg.act_order, calibration)

    @staticmethod
    def _layer(module: str) -> int | None:
        parts = module.split(".")
        if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
            return int(parts[2])
        return None

    def enter(self, module: str) -> None:
        """The exporter is about to quantize ``module`` (``model.layers.3.mlp.down_proj``)."""
        i = self._layer(module)
        if i is None or i == self.current:
            return
        if self.current is not None:
            self._advance()
        while self.calib.layer < i:  # layers with no GPTQ'd projection: run them as stored
            self.calib.advance(self.calib.layer, None)
        self._hessians = self.calib.hessians(i)
        self.current = i

    def hessian(self, module: str) -> GptqFactor:
        """The factored Hessian of ``module``'s inputs (shared by projections with one input)."""
        name = f"{module}.weight"
        if name not in self._factors:
            if name not in self._hessians:
                raise ModelError(
                    f"GPTQ: no calibration inputs for {module} (layer "
                    f"{self.current}'s nn.Linear modules: {sorted(self._hessians)})"
                )
            h = self._hessians.pop(name)
            sharers = [n for n, v in self._hessians.items() if v is h]
            for n in sharers:
                del self._hessians[n]
            f = gptq_factor(h, self.damp, self.act_order, overwrite=True)
            del h
            for n in (name, *sharers):
                self._factors[n] = f
        return self._factors[name]

    def quantized(self, module: str, weight: np.ndarray | Q4Weight) -> None:
        """``module``'s weight as written: its ``Q4Weight`` (smallest to keep) or the
        dequantized (K, N) = (in, out) array, the ONNX layout ``q4_dequantize`` returns."""
        name = f"{module}.weight"
        self._done[name] = weight
        self._factors.pop(name, None)

    def _weight(self, name: str) -> np.ndarray | None:
        from .. import kernels

        w = self._done.get(name)
        if w is None:
            return None
        if isinstance(w, Q4Weight):
            w = kernels.q4_dequantize(w)
        return np.ascontiguousarray(w.T)  # (K, N) -> HF (out, in); a view for q4_dequantize's

    def _advance(self) -> None:
        assert self.current is not None  # enter() advances only out of a layer it entered
        self.calib.advance(self.current, self._weight)
        self._done.clear()
        self._hessians.clear()
        self._factors.clear()

    def finish(self) -> None:
        """The last layer needs no outputs: free everything."""
        self._done.clear()
        self._hessians.clear()
        self._factors.clear()
        self.calib.states = None


# -- the per-weight algorithm ---------------------------------------------------------------


@dataclass(frozen=True)
class GptqFactor:
    """A Hessian made ready for GPTQ: dead inputs, column order, and the upper Cholesky
    factor of the damped inverse, (K, K) fp32 in the permuted order."""

    hinv: torch.Tensor  # (K, K)
    perm: torch.Tensor  # (K,) int64: the column order (identity without act-order)
    dead: torch.Tensor  # (K,) bool: inputs that never fired (their weight columns are zeroed)
    damp: float
    act_order: bool


def gptq_factor(
    hessian, damp: float = 0.01, act_order: bool = False, overwrite: bool = False
) -> GptqFactor:
    """Factor the (K, K) ``X^T X`` of a projection's inputs for ``gptq_quantize``. Works on
    a fp32 copy, or with ``overwrite`` in ``hessian``'s own memory (a writable fp32 array;
    the caller must not use it afterwards). Peak on top of ``hessian``: one K^2 fp32 with
    ``overwrite``, two without (one more with act-order, whose permutation copies)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # MKL's threaded cholesky_inverse runs 10-20x slower on 2 cores
    try:
        H = torch.from_numpy(
            hessian
            if overwrite
            and isinstance(hessian, np.ndarray)
            and hessian.dtype == np.float32
            and hessian.flags.writeable
            else np.array(hessian, dtype=np.float32)
        )
        k = H.shape[0]
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        if act_order:
            perm = torch.argsort(torch.diag(H), descending=True)
            H = H[perm]
            H = H[:, perm]
        else:
            perm = torch.arange(k)
        H.diagonal().add_(damp * torch.mean(torch.diag(H)))
        torch.linalg.cholesky(H, out=H)  # in place: the three steps need one more K^2 inside
        torch.cholesky_inverse(H, out=H)
        hinv = torch.linalg.cholesky(H, upper=True, out=H)
    finally:
        torch.set_num_threads(threads)
    return GptqFactor(hinv, perm, dead, damp, act_order)


def gptq_quantize(
    w: np.ndarray,
    hessian: np.ndarray | GptqFactor,
    block: int,
    symmetric: bool,
    damp: float = 0.01,
    act_order: bool = False,
) -> Q4Weight:
    """GPTQ 4-bit blocks of a (K, N) = (in, out) MatMul weight — the *transpose* of HF's
    (out, in) — given its inputs' ``X^T X`` (K, K), or that Hessian already factored by
    ``gptq_factor`` (with the same ``damp`` and ``act_order``)."""
    import torch

    if not isinstance(hessian, GptqFactor):
        hessian = gptq_factor(hessian, damp, act_order)
    elif (hessian.damp, hessian.act_order) != (damp, act_order):
        raise ValueError(
            f"GPTQ factor made with damp {hessian.damp}, act_order "
            f"{hessian.act_order}; asked for {damp}, {act_order}"
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny column updates: threads only add sync cost
    try:
        return _gptq(torch, w, hessian, block, symmetric, act_order)
    finally:
        torch.set_num_threads(threads)


def _gptq(torch, w, f: GptqFactor, block, symmetric, act_order) -> Q4Weight:
    k, n = w.shape
    nb = k // block
    W = torch.from_numpy(np.array(w.T, dtype=np.float32, order="C"))  # (N, K), our own copy
    perm, hinv = f.perm, f.hinv
    W[:, f.dead] = 0.0
    scales = np.zeros((n, nb), np.float32)
    zeros = np.zeros((n, nb), np.float32)
    if act_order:  # static groups: every block's scale from the original weights
        scales, zeros = rtn_params(W.T.numpy(), block, symmetric)
        W = W[:, perm]
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
                s, z = rtn_params(W1[:, i : i + block].T.numpy(), block, symmetric)
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


def dequantized(weights: Mapping[str, Q4Weight]) -> dict[str, np.ndarray]:
    """{HF name: fp32 (out, in)} of {HF name: Q4Weight (K, N)}: what ``advance`` takes."""
    from .. import kernels

    return {name: np.ascontiguousarray(kernels.q4_dequantize(q).T) for name, q in weights.items()}
