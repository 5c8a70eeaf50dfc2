"""DoRA over an NF4 base without a full-size weight temporary per forward.

PEFT's DoRA computes the per-row norm ||W + s·BA|| every forward by building ``B @ A``
(through an identity matrix as large as the input dimension), adding it to a freshly
dequantized copy of ``W`` and taking the norm: three or four full-size fp32 temporaries per
layer and step. With ``W`` frozen the same norm expands into small pieces:

    ||W + s·BA||²_row = ||W||²_row + 2s·Σ_k B_rk (W Aᵀ)_rk + s²·(B (A Aᵀ) Bᵀ)_rr

``||W||²`` is computed once; ``W Aᵀ`` is one (out, in) x (in, r) product over the weight the
base matmul just dequantized (``NF4Linear.transient_weight`` reuses it); the rest is r-sized.
The norm stays detached from the graph, as the DoRA paper and PEFT do. Everything else —
parameters, their names, the saved adapter, merging — is PEFT's DoRA unchanged, so the
adapter loads with plain ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn

from .nf4 import NF4Linear, nf4_matmul


class NF4DoraLinearVariant(DoraLinearVariant):
    """PEFT's DoRA forward with the weight norm from :meth:`NF4Linear.dora_weight_norm`."""

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs) -> torch.Tensor:
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        scaling = module.scaling[active_adapter]
        base: NF4Linear = module.get_base_layer()
        if isinstance(dropout, nn.Identity) or not module.training:
            base_result = result if base.bias is None else result - base.bias
        else:  # DoRA scales the base output of the dropped-out input
            x = dropout(x)
            base_result = nf4_matmul(x, base)
        norm = base.dora_weight_norm(lora_A.weight, lora_B.weight, scaling).to(x.dtype)
        magnitude = module.lora_magnitude_vector[active_adapter].weight
        mag_norm_scale = (magnitude / norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        return result + (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling


class NF4LoraLinear(LoraLinear):
    """PEFT's LoRA layer for an ``NF4Linear`` base: LoRA as is, DoRA through the variant above."""

    @property
    def lora_variants(self):
        return {**super().lora_variants, ("use_dora",): NF4DoraLinearVariant}
