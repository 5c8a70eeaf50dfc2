"""Frozen NF4 linear layers for QLoRA / QDoRA.

``NF4Linear`` holds the packed 4-bit weight (``W_q``), the double-quantized
absmax and nothing else. Its forward pass dequantizes with
``edgetune.kernels`` inside a custom autograd function and drops the fp32
copy at once; backward dequantizes again (recompute, never keep a dequantized
weight alive between passes). It subclasses ``nn.Linear`` and exposes
``W_q`` / ``dequantize()`` so PEFT's LoRA and DoRA layers wrap it unchanged.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import kernels
from ..kernels import NF4Tensor, reference


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

    def __init__(self, linear: nn.Linear):
        self._setup(linear.weight, linear.bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "NF4Linear":
        """Quantize an (out, in) weight straight from a checkpoint, with no nn.Linear first."""
        module = cls.__new__(cls)
        module._setup(weight, bias)
        return module

    def _setup(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        t = kernels.nf4_quantize(weight.detach().float().cpu().numpy())
        device = weight.device
        # packed codes as the module's "weight" (uint8), as bitsandbytes' Params4bit does,
        # so PEFT moves adapters to its device but never treats it as a float weight
        self.weight = nn.Parameter(torch.from_numpy(t.packed).to(device), requires_grad=False)
        self.register_buffer("absmax_q", torch.from_numpy(t.absmax_q).to(device))
        self.register_buffer("absmax_scale", torch.from_numpy(t.absmax_scale).to(device))
        self.register_buffer("absmax_offset", torch.tensor(t.absmax_offset, dtype=torch.float32,
                                                           device=device))
        self.bias = None
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype = weight.dtype

    @property
    def W_q(self) -> torch.Tensor:  # noqa: N802 - the name PEFT looks for
        return self.weight

    def absmax(self) -> torch.Tensor:
        code = torch.as_tensor(reference.DYNAMIC_MAP, device=self.absmax_q.device)
        idx = torch.arange(self.absmax_q.numel(), device=self.absmax_q.device) // reference.ABSMAX_BLOCK
        return code[self.absmax_q.long()] * self.absmax_scale[idx] + self.absmax_offset

    def dequantize(self) -> torch.Tensor:
        """The fp32 (out, in) weight exactly as training sees it."""
        if self.weight.device.type == "cpu":
            return torch.from_numpy(kernels.nf4_dequantize(_nf4_tensor(self)))
        return dequantize_nf4_torch(self.weight, self.absmax(), (self.out_features, self.in_features))

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
    def dora_weight_norm(self, lora_a: torch.Tensor, lora_b: torch.Tensor,
                         scaling: float) -> torch.Tensor:
        """||W + scaling · B @ A|| per output row (DoRA's column norm in PEFT's terms), from
        the cached ||W||² and r-sized products; see ``edgetune.train.dora``. Detached."""
        w = self.transient_weight()
        a, b = lora_a.detach().to(w.dtype), lora_b.detach().to(w.dtype)
        if getattr(self, "_row_norm2", None) is None or self._row_norm2.device != w.device:
            # W is frozen: once, in float64, a few rows at a time (no full-size temporaries)
            self._row_norm2 = torch.cat([rows.double().square().sum(dim=1).to(w.dtype)
                                         for rows in w.split(256)])
        cross = (b * (w @ a.T)).sum(dim=1)
        ba2 = ((b @ (a @ a.T)) * b).sum(dim=1)
        return (self._row_norm2 + 2 * scaling * cross + scaling**2 * ba2).clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def linear_targets(model: nn.Module) -> list[str]:
    """Names of the decoder's linear projections (attention and MLP), not the LM head."""
    out_emb = model.get_output_embeddings()
    return [name for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and mod is not out_emb]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model_nf4(model: nn.Module) -> nn.Module:
    """Replace every decoder linear projection by a frozen NF4Linear, in place (layers that
    already are NF4, e.g. from :func:`load_model_nf4`, stay as they are)."""
    for name in linear_targets(model):
        mod = model.get_submodule(name)
        if not isinstance(mod, NF4Linear):
            _set_module(model, name, NF4Linear(mod))
    return model


def load_model_nf4(model_dir, dtype=None, device: str = "cpu") -> nn.Module:
    """Load a causal LM with its decoder projections quantized to NF4 tensor by tensor.

    ``from_pretrained`` followed by quantization holds the whole fp32 model at once; here
    the model is built without storage (accelerate's ``init_empty_weights``), each projection
    is read from the safetensors files and quantized on its own, and only the other
    parameters (embeddings, norms, LM head) are materialized in ``dtype``. Peak memory is the
    NF4 model plus one fp32 projection. Checkpoints whose tensor names do not match the
    model's modules fall back to loading in full and quantizing after.
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import check_model_dir, load_model

    check_model_dir(model_dir)
    dtype = dtype or torch.float32
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    targets = set(linear_targets(model))
    expected = {n for n, _ in model.named_parameters()}
    rest: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        for key in keys:
            # one mapping per tensor: pages of a file mapped for the whole loop would stay
            # resident (and count in RSS) until the end, i.e. the full fp checkpoint
            with safe_open(str(path), framework="pt") as f:
                tensor = f.get_tensor(key).to(dtype)
            module, _, kind = key.rpartition(".")
            if module in targets and kind == "weight":
                _set_module(model, module, NF4Linear.from_weight(tensor))
            elif module in targets and kind == "bias":
                biases[module] = tensor
            elif key in expected:
                rest[key] = tensor
            del tensor
    if any(not isinstance(model.get_submodule(t), NF4Linear) for t in targets):
        return quantize_model_nf4(load_model(model_dir, dtype=dtype, device=device))
    for module, b in biases.items():
        model.get_submodule(module).bias = nn.Parameter(b, requires_grad=False)
    model.load_state_dict(rest, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if any(p.is_meta for p in model.parameters()):
        return quantize_model_nf4(load_model(model_dir, dtype=dtype, device=device))
    return model.to(device)


def nf4_roundtrip_weights(model: nn.Module) -> nn.Module:
    """Set each decoder linear weight to dequant(quant(W)) in place: the fp model that
    an NF4 base stands for, used to merge exactly as training saw the base."""
    with torch.no_grad():
        for name in linear_targets(model):
            mod = model.get_submodule(name)
            t = kernels.nf4_quantize(mod.weight.detach().float().cpu().numpy())
            mod.weight.copy_(torch.from_numpy(kernels.nf4_dequantize(t)))
    return model
