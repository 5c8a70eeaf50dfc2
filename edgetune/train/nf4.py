"""Frozen NF4 linear layers for QLoRA / QDoRA.

``NF4Linear`` holds the packed 4-bit weight (``W_q``), the double-quantized
absmax and nothing else. Its forward pass dequantizes with
``edgetune.kernels`` inside a custom autograd function and drops the fp32
copy at once; backward dequantizes again (recompute, never keep a dequantized
weight alive between passes). It subclasses ``nn.Linear`` and exposes
``W_q`` / ``dequantize()`` so PEFT's LoRA and DoRA layers wrap it unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import kernels
from ..kernels import NF4Tensor, reference


def _nf4_tensor(module: "NF4Linear") -> NF4Tensor:
    return NF4Tensor(
        module.weight.detach().cpu().numpy(),
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


class _NF4Matmul(torch.autograd.Function):
    """y = x @ dequant(W).T; backward gives dx only (W is frozen) and recomputes dequant(W)."""

    @staticmethod
    def forward(ctx, x, module):  # x (..., in) -> (..., out)
        ctx.module = module
        return torch.nn.functional.linear(x, module.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.module.dequantize().to(grad_out.dtype)
        return grad_out @ w, None


class NF4Linear(nn.Linear):
    """A frozen ``nn.Linear`` stored as NF4 (blocks of 64, double-quantized absmax)."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        t = kernels.nf4_quantize(linear.weight.detach().float().cpu().numpy())
        device = linear.weight.device
        # packed codes as the module's "weight" (uint8), as bitsandbytes' Params4bit does,
        # so PEFT moves adapters to its device but never treats it as a float weight
        self.weight = nn.Parameter(torch.from_numpy(t.packed).to(device), requires_grad=False)
        self.register_buffer("absmax_q", torch.from_numpy(t.absmax_q).to(device))
        self.register_buffer("absmax_scale", torch.from_numpy(t.absmax_scale).to(device))
        self.register_buffer("absmax_offset", torch.tensor(t.absmax_offset, dtype=torch.float32,
                                                           device=device))
        self.bias = None
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.compute_dtype = linear.weight.dtype

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


def quantize_model_nf4(model: nn.Module) -> nn.Module:
    """Replace every decoder linear projection by a frozen NF4Linear, in place."""
    for name in linear_targets(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, NF4Linear(getattr(parent, child)))
    return model


def nf4_roundtrip_weights(model: nn.Module) -> nn.Module:
    """Set each decoder linear weight to dequant(quant(W)) in place: the fp model that
    an NF4 base stands for, used to merge exactly as training saw the base."""
    with torch.no_grad():
        for name in linear_targets(model):
            mod = model.get_submodule(name)
            t = kernels.nf4_quantize(mod.weight.detach().float().cpu().numpy())
            mod.weight.copy_(torch.from_numpy(kernels.nf4_dequantize(t)))
    return model
