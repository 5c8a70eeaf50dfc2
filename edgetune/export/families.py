"""What a decoder of each supported family holds: its dimensions and, per layer, its
projections with the shapes config.json implies.

One table for the four families (Llama, Phi-3, Mistral, Qwen2): they differ only in
whether q/k/v and gate/up are fused (Phi-3), whether q/k/v carry biases (Qwen2), sliding
windows (Mistral) and rope variants, which the graph builder reads from ``Dims``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError
from ..models import SUPPORTED


@dataclass(frozen=True)
class Dims:
    """A decoder's hyper-parameters, as config.json gives them."""

    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    tied: bool
    window: int | None  # Mistral's sliding window, when set

    @property
    def fused(self) -> bool:
        """Phi-3 stores qkv_proj and gate_up_proj as single fused projections."""
        return self.family == "phi3"

    @property
    def qkv_bias(self) -> bool:
        return self.family == "qwen2"

    @staticmethod
    def of(cfg: dict) -> Dims:
        family = cfg.get("model_type")
        if family not in SUPPORTED:
            raise ModelError(
                f"model_type {family!r} is not supported; supported: {', '.join(SUPPORTED)}"
            )
        heads = int(cfg["num_attention_heads"])
        window = cfg.get("sliding_window")
        if family == "qwen2" and not cfg.get("use_sliding_window", False):
            window = None
        if window is not None and family not in ("mistral", "qwen2"):
            window = None  # Phi-3 / Llama configs carry the field but their models ignore it
        return Dims(
            family,
            int(cfg["hidden_size"]),
            int(cfg["intermediate_size"]),
            int(cfg["num_hidden_layers"]),
            heads,
            int(cfg.get("num_key_value_heads") or heads),
            int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            int(cfg["vocab_size"]),
            float(cfg.get("rms_norm_eps", 1e-6)),
            bool(cfg.get("tie_word_embeddings", False)),
            int(window) if window else None,
        )


@dataclass(frozen=True)
class Proj:
    """One projection of a layer: its HF module path and (in, out) sizes."""

    module: str  # model.layers.3.self_attn.qkv_proj
    k: int  # in features
    n: int  # out features
    bias: bool = False

    @property
    def weight(self) -> str:
        return f"{self.module}.weight"


def attention_projs(d: Dims, i: int) -> list[Proj]:
    p = f"model.layers.{i}.self_attn"
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    qkv = (
        [Proj(f"{p}.qkv_proj", d.hidden, q + 2 * kv)]
        if d.fused
        else [
            Proj(f"{p}.q_proj", d.hidden, q, d.qkv_bias),
            Proj(f"{p}.k_proj", d.hidden, kv, d.qkv_bias),
            Proj(f"{p}.v_proj", d.hidden, kv, d.qkv_bias),
        ]
    )
    return qkv + [Proj(f"{p}.o_proj", q, d.hidden)]


def mlp_projs(d: Dims, i: int) -> list[Proj]:
    p = f"model.layers.{i}.mlp"
    up = (
        [Proj(f"{p}.gate_up_proj", d.hidden, 2 * d.intermediate)]
        if d.fused
        else [
            Proj(f"{p}.gate_proj", d.hidden, d.intermediate),
            Proj(f"{p}.up_proj", d.hidden, d.intermediate),
        ]
    )
    return up + [Proj(f"{p}.down_proj", d.intermediate, d.hidden)]


def expected_shapes(d: Dims) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder reads, with the shape config.json implies (HF layout)."""
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (d.vocab, d.hidden),
        "model.norm.weight": (d.hidden,),
    }
    if not d.tied:
        shapes["lm_head.weight"] = (d.vocab, d.hidden)
    for i in range(d.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"model.layers.{i}.{norm}.weight"] = (d.hidden,)
        for p in attention_projs(d, i) + mlp_projs(d, i):
            shapes[p.weight] = (p.n, p.k)
            if p.bias:
                shapes[f"{p.module}.bias"] = (p.n,)
    return shapes
