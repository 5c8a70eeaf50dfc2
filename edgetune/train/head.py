"""The vocabulary-sized tensors of training: frozen embedding and LM head, and the logits.

At Phi-3-mini's size the embedding table and the LM head are 32064 x 3072 each: 394 MB
apiece in fp32, as much as seven decoder layers in NF4. They are frozen in QLoRA / QDoRA, so
``StoredEmbedding`` and ``StoredLinear`` keep them in the checkpoint's 16-bit dtype (bf16 or
fp16, exact) and compute in fp32: the embedding widens the rows it looks up, the LM head
widens a few thousand of its rows at a time. Widening a 16-bit float is exact, so the
numbers are those of an fp32 copy of the stored weights, without the copy.

``logits_only_at`` makes the LM head run only at the positions that carry a loss: (N, V)
logits instead of (B, T, V), where N counts labelled tokens (the answer, not the prompt).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Rows of the LM head widened to fp32 at a time: ~32 MB at Phi-3-mini's width.
CHUNK_VALUES = 8 << 20


class StoredEmbedding(nn.Embedding):
    """A frozen ``nn.Embedding`` whose table stays in its stored (16-bit) dtype; looked-up
    rows come out in ``compute_dtype``."""

    def __init__(self, embedding: nn.Embedding, weight: nn.Parameter, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = weight.shape
        for attr in ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"):
            setattr(self, attr, getattr(embedding, attr))
        self.weight = weight  # the same Parameter as a tied LM head's
        self.compute_dtype = compute_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return super().forward(ids).to(self.compute_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stored={self.weight.dtype}, compute={self.compute_dtype}"


class StoredLinear(nn.Linear):
    """A frozen ``nn.Linear`` (the LM head) whose weight stays in its stored dtype; x @ W.T is
    computed in ``compute_dtype`` a block of output rows at a time, forward and backward, so
    no full-size widened copy of W exists."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = weight  # the same Parameter as a tied embedding's
        # torch infers Linear.bias as Parameter from its __init__, yet it is None there too
        # without a bias (register_parameter("bias", None)): a gap in torch's types
        self.bias = bias  # type: ignore[assignment]
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., V)
        y = _BlockwiseMatmul.apply(x.to(self.compute_dtype), self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stored={self.weight.dtype}, compute={self.compute_dtype}"


def _blocks(weight: torch.Tensor):
    rows = max(1, CHUNK_VALUES // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        yield start, min(start + rows, weight.shape[0])


class _BlockwiseMatmul(torch.autograd.Function):
    """y = x @ W.T with W frozen and widened to x's dtype one block of rows at a time."""

    @staticmethod
    def forward(ctx, x, weight):  # x (..., C), weight (V, C) -> (..., V)
        ctx.save_for_backward(weight)  # the stored tensor itself, not a copy
        x2 = x.reshape(-1, x.shape[-1])
        y = x2.new_empty(x2.shape[0], weight.shape[0])
        for a, b in _blocks(weight):
            y[:, a:b] = x2 @ weight[a:b].to(x.dtype).T
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        g2 = grad_y.reshape(-1, grad_y.shape[-1])
        dx = g2.new_zeros(g2.shape[0], weight.shape[1])
        for a, b in _blocks(weight):
            dx.addmm_(g2[:, a:b], weight[a:b].to(g2.dtype))
        return dx.reshape(*grad_y.shape[:-1], weight.shape[1]), None


def keep_stored_vocab(
    model: PreTrainedModel, compute_dtype: torch.dtype, adapter_targets: tuple[str, ...] = ()
) -> None:
    """Swap the embedding and LM head whose weights are narrower than ``compute_dtype`` for
    ``StoredEmbedding`` / ``StoredLinear``, in place (tied, they keep one Parameter). Modules
    matched by ``adapter_targets`` (PEFT's rule: the name or its last components) are left
    as they are: an adapter over them trains in the base weight's dtype."""
    names = {id(m): n for n, m in model.named_modules()}

    def frozen_narrow(m: nn.Embedding | nn.Linear | None) -> bool:
        if m is None or not m.weight.is_floating_point():
            return False
        name = names[id(m)]
        return m.weight.element_size() < compute_dtype.itemsize and not any(
            name == t or name.endswith("." + t) for t in adapter_targets
        )

    # torch declares Embedding.weight and Linear.weight as Tensor; they are the Parameters
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is nn.Embedding and frozen_narrow(emb):
        model.set_input_embeddings(
            StoredEmbedding(emb, cast(nn.Parameter, emb.weight), compute_dtype)
        )
    if type(head) is nn.Linear and frozen_narrow(head):
        model.set_output_embeddings(
            StoredLinear(cast(nn.Parameter, head.weight), head.bias, compute_dtype)
        )


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP / DeepSpeed wrapper (FSDP2 and PEFT models are the model)."""
    inner = getattr(model, "module", None)
    while isinstance(inner, nn.Module):
        model, inner = inner, getattr(inner, "module", None)
    return model


@contextmanager
def logits_only_at(model: nn.Module, keep: torch.Tensor):
    """Within the block, the model's LM head sees only the hidden states where ``keep``
    (B, T') is true, the first T' positions of each row: ``.logits`` is (N, V), N = keep.sum(),
    in row-major order. Done in the head's forward, so wrappers that gather or shard its
    weight (FSDP2, ZeRO-3) see an ordinary call."""

    def select(_module, args):
        hidden, *rest = args  # (B, T, C)
        return (hidden[:, : keep.shape[1]][keep], *rest)  # (N, C)

    # unwrapped, it is a transformers causal LM (or a PEFT model forwarding to one), whose
    # methods nn.Module's types cannot see
    lm = cast("PreTrainedModel", _unwrap(model))
    handle = lm.get_output_embeddings().register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()
