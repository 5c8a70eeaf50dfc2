"""Frozen NF4 linear layers for QLoRA / QDoRA.

``NF4Linear`` holds the packed 4-bit weight (``W_q``), the double-quantized
absmax and nothing else. Its forward pass dequantizes with
``edgetune.kernels`` inside a custom autograd function and drops the fp32
copy at once; backward dequantizes again (recompute, never keep a dequantized
weight alive between passes). It subclasses ``nn.Linear`` and exposes
``W_q`` / ``dequantize()`` so PEFT's LoRA and DoRA layers wrap it unchanged.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .. import kernels
from ..kernels import NF4Tensor, reference

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _nf4_tensor(module: "NF4Linear") -> NF4Tensor:
    packed = module.weight.detach().cpu()
    if not module.share_weight_with_numpy:
        packed = packed.clone()
    return NF4Tensor(
        packed.numpy(),
        module.absmax_q.cpu().numpy(),
        module.absmax_scale.cpu().numpy(),
        float(module.absmax_offset.item()),
        (module.out_features, module.in_features),
    )


def dequantize_nf4_torch(packed: torch.Tensor, absmax: torch.Tensor, shape) -> torch.Tensor:
    """Device-side NF4 dequantization (CUDA path); same arithmetic as the reference."""
    code = torch.as_tensor(reference.NF4_CODE, device=packed.device)
    idx = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1).long()
    n = int(np.prod(shape))
    am = absmax.repeat_interleave(kernels.NF4_BLOCK)[:n]
    return (code[idx[:n]] * am).reshape(shape)


_SCRATCH = threading.local()


def _scratch(numel: int, owner: "NF4Linear") -> tuple[np.ndarray, bool]:
    """This thread's reusable fp32 buffer for the one dequantized weight a matmul uses while it
    runs. Allocating a fresh tensor per layer and step costs more than the dequantization: the
    allocator hands large blocks back to the OS on free, so each new one faults in (and zeroes)
    every page again. One buffer the size of the largest layer is what the transient copy
    costs anyway; no layer's weight outlives its matmul."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < numel:
        _SCRATCH.buf = buf = np.empty(numel, np.float32)
        _SCRATCH.owner = None
    # the buffer still holds this module's weight when nothing dequantized into it since
    # (frozen weights: e.g. DoRA's norm right after the base matmul of the same layer)
    holds = getattr(_SCRATCH, "owner", None) is owner
    _SCRATCH.owner = owner
    return buf[:numel], holds


#: Values of a weight quantized at a time (a whole number of NF4 blocks): ~4 MB of fp32.
QUANT_CHUNK = 1 << 20


def _rows_per_block(shape: tuple[int, ...]) -> int:
    """Rows per chunk of an (out, in) weight: about QUANT_CHUNK values, and a multiple of
    the rows that make whole NF4 blocks, so chunks never split a block."""
    cols = math.prod(shape[1:]) or 1
    step = kernels.NF4_BLOCK // math.gcd(cols, kernels.NF4_BLOCK)
    return max(step, QUANT_CHUNK // cols // step * step)


def _row_blocks(w: np.ndarray):
    rows = _rows_per_block(w.shape)
    for start in range(0, w.shape[0], rows):
        yield w[start : start + rows]


def nf4_quantize_blocks(chunks: Iterable[np.ndarray], shape: tuple[int, ...]) -> NF4Tensor:
    """``kernels.nf4_quantize`` of a weight given as consecutive blocks of rows (each a whole
    number of NF4 blocks but the last), bit for bit: NF4 codes depend only on their block's
    absmax, and the double quantization of the absmax runs once over all of them at the end.
    The reference quantizer's temporaries are ~20 bytes a value, 1 GB for a Phi-3-mini MLP
    projection at once; here they are those of one chunk."""
    n = math.prod(shape)
    packed = np.empty(-(-n // 2), np.uint8)
    absmax, done = [], 0
    for chunk in chunks:
        if not np.isfinite(chunk).all():
            raise ValueError("nf4_quantize: weight has NaN or infinite values")
        blocks, am = reference.blockwise_absmax(chunk, kernels.NF4_BLOCK)
        safe = np.where(am == 0, 1.0, am)
        codes = reference.nearest_code(blocks / safe[:, None], kernels.NF4_CODE)
        part = reference.pack_nibbles(codes.reshape(-1)[: chunk.size])
        packed[done // 2 : done // 2 + part.size] = part
        absmax.append(am)
        done += chunk.size
    if done != n:
        raise ValueError(f"nf4_quantize_blocks: got {done} values for shape {list(shape)}")
    absmax_q, absmax_scale, offset = reference.quantize_absmax(np.concatenate(absmax))
    return NF4Tensor(packed, absmax_q, absmax_scale, offset, tuple(shape))


def nf4_matmul(x: torch.Tensor, module: "NF4Linear") -> torch.Tensor:
    """x @ dequant(W).T without the bias, differentiable in x."""
    return _NF4Matmul.apply(x, module)


class _NF4Matmul(torch.autograd.Function):
    """y = x @ dequant(W).T; backward gives dx only (W is frozen) and recomputes dequant(W)."""

    @staticmethod
    def forward(ctx, x, module):  # x (..., in) -> (..., out)
        ctx.module = module
        return torch.nn.functional.linear(x, module.transient_weight().to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.module.transient_weight().to(grad_out.dtype)
        return grad_out @ w, None


class NF4Linear(nn.Linear):
    """A frozen ``nn.Linear`` stored as NF4 (blocks of 64, double-quantized absmax)."""

    #: The CPU kernels read the packed weight through a numpy view, which pins its storage.
    #: FSDP2 frees each gathered weight after use, so under it the kernels get a copy.
    share_weight_with_numpy = True
    absmax_q: torch.Tensor  # buffers (register_buffer), declared for the type checker
    absmax_scale: torch.Tensor
    absmax_offset: torch.Tensor
    bias: nn.Parameter | None  # type: ignore[assignment]  # nn.Linear's stub says Parameter
    _row_norm2: torch.Tensor | None = None  # ||W||² per row, cached by dora_weight_norm

    def __init__(self, linear: nn.Linear):
        self._setup(linear.weight, linear.bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "NF4Linear":
        """Quantize an (out, in) weight straight from a checkpoint, with no nn.Linear first."""
        module = cls.__new__(cls)
        module._setup(weight, bias)
        return module

    @classmethod
    def from_nf4(
        cls,
        t: NF4Tensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> "NF4Linear":
        """An NF4Linear over an already quantized weight (see :func:`load_model_nf4`)."""
        module = cls.__new__(cls)
        module._setup_nf4(t, bias, compute_dtype, torch.device("cpu"))
        return module

    def _setup(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        w = weight.detach().float().cpu().numpy()
        self._setup_nf4(
            nf4_quantize_blocks(_row_blocks(w), w.shape), bias, weight.dtype, weight.device
        )

    def _setup_nf4(
        self,
        t: NF4Tensor,
        bias: torch.Tensor | None,
        compute_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = t.shape
        # packed codes as the module's "weight" (uint8), as bitsandbytes' Params4bit does,
        # so PEFT moves adapters to its device but never treats it as a float weight
        self.weight = nn.Parameter(torch.from_numpy(t.packed).to(device), requires_grad=False)
        self.register_buffer("absmax_q", torch.from_numpy(t.absmax_q).to(device))
        self.register_buffer("absmax_scale", torch.from_numpy(t.absmax_scale).to(device))
        self.register_buffer(
            "absmax_offset", torch.tensor(t.absmax_offset, dtype=torch.float32, device=device)
        )
        self.bias = None
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = compute_dtype

    @property
    def W_q(self) -> torch.Tensor:  # noqa: N802 - the name PEFT looks for
        return self.weight

    def absmax(self) -> torch.Tensor:
        code = torch.as_tensor(reference.DYNAMIC_MAP, device=self.absmax_q.device)
        idx = (
            torch.arange(self.absmax_q.numel(), device=self.absmax_q.device)
            // reference.ABSMAX_BLOCK
        )
        return code[self.absmax_q.long()] * self.absmax_scale[idx] + self.absmax_offset

    def dequantize(self) -> torch.Tensor:
        """The fp32 (out, in) weight exactly as training sees it."""
        if self.weight.device.type == "cpu":
            return torch.from_numpy(kernels.nf4_dequantize(_nf4_tensor(self)))
        return dequantize_nf4_torch(
            self.weight, self.absmax(), (self.out_features, self.in_features)
        )

    def transient_weight(self) -> torch.Tensor:
        """``dequantize()`` for the duration of one matmul only: on the CPU it lands in a
        buffer that the next NF4 matmul overwrites, so callers must not keep it."""
        if self.weight.device.type != "cpu":
            return self.dequantize()
        buf, holds = _scratch(self.out_features * self.in_features, self)
        out = buf.reshape(self.out_features, self.in_features)
        if not holds:
            kernels.nf4_dequantize(_nf4_tensor(self), out)
        return torch.from_numpy(out)

    @torch.no_grad()
    def dora_weight_norm(
        self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
    ) -> torch.Tensor:
        """||W + scaling · B @ A|| per output row (DoRA's column norm in PEFT's terms), from
        the cached ||W||² and r-sized products; see ``edgetune.train.dora``. Detached."""
        w = self.transient_weight()
        a, b = lora_a.detach().to(w.dtype), lora_b.detach().to(w.dtype)
        if self._row_norm2 is None or self._row_norm2.device != w.device:
            # W is frozen: once, in float64, a few rows at a time (no full-size temporaries)
            self._row_norm2 = torch.cat(
                [rows.double().square().sum(dim=1).to(w.dtype) for rows in w.split(256)]
            )
        cross = (b * (w @ a.T)).sum(dim=1)
        ba2 = ((b @ (a @ a.T)) * b).sum(dim=1)
        return (self._row_norm2 + 2 * scaling * cross + scaling**2 * ba2).clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def linear_targets(model: PreTrainedModel) -> list[str]:
    """Names of the decoder's linear projections (attention and MLP), not the LM head."""
    out_emb = model.get_output_embeddings()
    return [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and mod is not out_emb
    ]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model_nf4(model: PreTrainedModel) -> PreTrainedModel:
    """Replace every decoder linear projection by a frozen NF4Linear, in place (layers that
    already are NF4, e.g. from :func:`load_model_nf4`, stay as they are)."""
    for name in linear_targets(model):
        mod = model.get_submodule(name)
        assert isinstance(mod, nn.Linear)  # linear_targets names only nn.Linear modules
        if not isinstance(mod, NF4Linear):
            _set_module(model, name, NF4Linear(mod))
    return model


def _read(
    src, key: str, shape: tuple[int, ...], dtype: torch.dtype, keep_narrow: bool
) -> torch.Tensor:
    """One checkpoint tensor as torch, in ``dtype`` or, with ``keep_narrow``, as stored when
    that is a narrower float (bf16 / fp16 under fp32 compute)."""
    info = src.expect(key, shape)
    raw = src.raw(key)
    t = (
        torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        if info.dtype == "BF16"
        else torch.from_numpy(raw)
    )
    if keep_narrow and t.is_floating_point() and t.element_size() < dtype.itemsize:
        return t
    return t.to(dtype)


def _set_param(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module, _, name = key.rpartition(".")
    setattr(
        model.get_submodule(module) if module else model,
        name,
        nn.Parameter(value, requires_grad=False),
    )


def load_model_nf4(
    model_dir,
    dtype=None,
    device: str = "cpu",
    keep_stored: bool = True,
    adapter_targets: tuple[str, ...] = (),
) -> nn.Module:
    """Load a causal LM with its decoder projections quantized to NF4 while reading.

    The model is built without storage (accelerate's ``init_empty_weights``); each
    projection is read from the safetensors a few rows at a time (``SafetensorsSource``) and
    quantized, so no projection, let alone the model, exists in fp32. Norms and biases are
    read in ``dtype``. The frozen embedding and LM head stay in the checkpoint's 16-bit dtype
    (``edgetune.train.head``; ``keep_stored=False``: in ``dtype``), except those named in
    ``adapter_targets``, which an adapter will wrap. Peak memory: the NF4 model, the stored
    vocabulary tables and one chunk of one projection. A tensor the model needs and the
    checkpoint lacks (or has in another shape) is a ModelError naming it: nothing falls back
    to loading the full model.
    """
    from accelerate import init_empty_weights
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..errors import ModelError
    from ..models import check_model_dir
    from ..tensors import SafetensorsSource
    from .head import keep_stored_vocab

    check_model_dir(model_dir)
    src = SafetensorsSource(model_dir)
    dtype = dtype or torch.float32
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.tie_weights()  # a tied LM head is the embedding's Parameter, read once
    for name in tqdm(
        linear_targets(model), desc="load nf4", unit="proj", leave=False, disable=None
    ):
        mod = model.get_submodule(name)
        shape = (mod.out_features, mod.in_features)
        key = f"{name}.weight"
        src.expect(key, shape)
        rows = _rows_per_block(shape)
        chunks = (
            src.array(key, rows=(a, min(a + rows, shape[0]))) for a in range(0, shape[0], rows)
        )
        try:
            t = nf4_quantize_blocks(chunks, shape)
        except ValueError as e:
            raise ModelError(f"{src.info(key).file}: tensor {key!r}: {e}") from None
        bias = None if mod.bias is None else _read(src, f"{name}.bias", (shape[0],), dtype, False)
        _set_module(model, name, NF4Linear.from_nf4(t, bias, dtype))
    vocab = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        vocab.add(id(model.get_output_embeddings().weight))
    for key, p in list(model.named_parameters()):
        if p.is_meta:  # tied weights are listed once, under the embedding's name
            _set_param(
                model, key, _read(src, key, tuple(p.shape), dtype, keep_stored and id(p) in vocab)
            )
    model.tie_weights()  # again, to the loaded Parameter (only where config.json ties)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ModelError(f"{model_dir}: no weights for {', '.join(missing[:5])}")
    keep_stored_vocab(model, dtype, adapter_targets)
    return model.to(device)


def nf4_roundtrip_weights(model: PreTrainedModel) -> PreTrainedModel:
    """Set each decoder linear weight to dequant(quant(W)) in place: the fp model that
    an NF4 base stands for, used to merge exactly as training saw the base."""
    with torch.no_grad():
        for name in linear_targets(model):
            mod = model.get_submodule(name)
            assert isinstance(mod, nn.Linear)  # linear_targets names only nn.Linear modules
            w = mod.weight.detach().float().cpu().numpy()
            t = nf4_quantize_blocks(_row_blocks(w), w.shape)  # = kernels.nf4_quantize(w)
            mod.weight.copy_(torch.from_numpy(kernels.nf4_dequantize(t)))
    return model
