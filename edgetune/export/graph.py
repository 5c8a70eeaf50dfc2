"""The decoder graph of the four families, built op by op (no tracing, no torch model).

Inputs and outputs are those of Optimum's ``text-generation-with-past`` export, which
ONNX Runtime, onnxruntime-genai and edgetune's runtime already read:
``input_ids`` (B, S), ``attention_mask`` (B, P+S), ``position_ids`` (B, S),
``past_key_values.{i}.key|value`` (B, kv_heads, P, head_dim) ->
``logits`` (B, S, V), ``present.{i}.key|value`` (B, kv_heads, P+S, head_dim).

The builder asks for each weight in graph order through two callbacks — ``linear`` (a
projection: the caller reads, quantizes and writes it, and emits MatMulNBits or MatMul) and
``tensor`` (norm weights, biases, the embedding) — so weights flow from the checkpoint to
the data file one at a time and the graph proto never holds their bytes. Node names follow
Optimum's (``/model/layers.0/self_attn/qkv_proj/MatMul``): the native runtime and the
quantizer find projections by them. Ops are plain ONNX (opset 18); ONNX Runtime's graph
optimizer fuses RMSNorm and the attention pattern itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
import onnx
from onnx import TensorProto, helper

from .families import Dims, Proj, attention_projs, mlp_projs

F32_MIN = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class Rope:
    """Rotary frequencies as transformers computes them (``ROPE_INIT_FUNCTIONS``):
    ``inv_freq`` (rot_dim/2,), and for longrope the long factors used once the sequence
    (max position + 1) exceeds ``original``; ``scale`` multiplies cos and sin."""

    inv_freq: np.ndarray
    scale: float
    long_inv_freq: np.ndarray | None = None
    original: int = 0

    @staticmethod
    def of(hf_config) -> Rope:
        """From a transformers PretrainedConfig (the one the model dir's config.json gives)."""
        import torch
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaling = getattr(hf_config, "rope_scaling", None) or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "dynamic":
            from ..errors import ModelError

            raise ModelError(
                "dynamic NTK rope scaling recomputes frequencies per length and "
                "cannot be exported as a static graph"
            )
        init = ROPE_INIT_FUNCTIONS[kind]
        cpu = torch.device("cpu")
        inv, scale = init(hf_config, cpu)
        if kind != "longrope":
            return Rope(inv.float().numpy(), float(scale))
        original = int(
            getattr(hf_config, "original_max_position_embeddings", None)
            or hf_config.max_position_embeddings
        )
        long_inv, _ = init(hf_config, cpu, seq_len=original + 1)
        return Rope(inv.float().numpy(), float(scale), long_inv.float().numpy(), original)


LinearFn = Callable[["GraphBuilder", Proj, str], str]  # (builder, projection, input) -> output
TensorFn = Callable[[str], np.ndarray]  # HF tensor name -> array


class GraphBuilder:
    """Collects nodes and initializers; ``build`` emits the whole decoder."""

    def __init__(self, d: Dims, rope: Rope, add_init: Callable[[str, np.ndarray], str]):
        self.d, self.rope = d, rope
        self.add_init = add_init  # (name, array) -> name; writes the array out
        self.nodes: list[onnx.NodeProto] = []
        self._consts: dict[tuple, str] = {}
        self._count: dict[str, int] = {}

    # -- plumbing ------------------------------------------------------------------------

    # One output gives its name, n_out > 1 (every caller passes a literal) the list of names.
    @overload
    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        scope: str,
        n_out: Literal[1] = 1,
        domain: str | None = None,
        **attrs,
    ) -> str: ...

    @overload
    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        scope: str,
        n_out: int,
        domain: str | None = None,
        **attrs,
    ) -> list[str]: ...

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        scope: str,
        n_out: int = 1,
        domain: str | None = None,
        **attrs,
    ) -> str | list[str]:
        """Append a node named ``{scope}/{op_type}[_k]``; returns its output name(s)."""
        base = f"{scope}/{op_type}"
        k = self._count.get(base, 0)
        self._count[base] = k + 1
        name = base if k == 0 else f"{base}_{k}"
        outs = [f"{name}_output_{j}" for j in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs)
        )
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        """A small shared constant initializer."""
        arr = np.asarray(value, dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.add_init(f"/const_{len(self._consts)}", arr)
        return self._consts[key]

    # -- pieces ----------------------------------------------------------------------------

    def rms_norm(self, x: str, weight: str, scope: str) -> str:
        sq = self.op("Mul", [x, x], scope)
        mean = self.op("ReduceMean", [sq, self.const([-1])], scope, keepdims=1)
        var = self.op("Add", [mean, self.const(self.d.eps, np.float32)], scope)
        inv = self.op("Reciprocal", [self.op("Sqrt", [var], scope)], scope)
        return self.op("Mul", [self.op("Mul", [x, inv], scope), weight], scope)

    def rope_tables(self, position_ids: str) -> tuple[str, str]:
        """cos, sin (B, 1, S, rot_dim) for the positions, as HF computes them in fp32."""
        s = "/model/rotary_emb"
        inv = self.add_init("model.rotary_emb.inv_freq", self.rope.inv_freq.astype(np.float32))
        if self.rope.long_inv_freq is not None:
            long_inv = self.add_init(
                "model.rotary_emb.long_inv_freq", self.rope.long_inv_freq.astype(np.float32)
            )
            longest = self.op(
                "Add", [self.op("ReduceMax", [position_ids], s, keepdims=0), self.const(1)], s
            )
            use_long = self.op("Greater", [longest, self.const(self.rope.original)], s)
            inv = self.op("Where", [use_long, long_inv, inv], s)
        pos = self.op(
            "Unsqueeze",
            [self.op("Cast", [position_ids], s, to=TensorProto.FLOAT), self.const([-1])],
            s,
        )  # (B, S, 1)
        freqs = self.op("Mul", [pos, inv], s)  # (B, S, rot/2)
        emb = self.op("Concat", [freqs, freqs], s, axis=-1)
        out = []
        for fn in ("Cos", "Sin"):
            t = self.op(fn, [emb], s)
            if self.rope.scale != 1.0:
                t = self.op("Mul", [t, self.const(self.rope.scale, np.float32)], s)
            out.append(self.op("Unsqueeze", [t, self.const([1])], s))
        return out[0], out[1]

    def rotate(self, x: str, cos: str, sin: str, scope: str) -> str:
        """x (B, heads, S, head_dim) rotated in its first rot_dim features (rotate-half)."""
        rot = 2 * self.rope.inv_freq.size
        rest = None
        if rot < self.d.head_dim:
            x, rest = self.op(
                "Split", [x, self.const([rot, self.d.head_dim - rot])], scope, n_out=2, axis=-1
            )
        x1, x2 = self.op("Split", [x, self.const([rot // 2, rot // 2])], scope, n_out=2, axis=-1)
        half = self.op("Concat", [self.op("Neg", [x2], scope), x1], scope, axis=-1)
        out = self.op(
            "Add", [self.op("Mul", [x, cos], scope), self.op("Mul", [half, sin], scope)], scope
        )
        return self.op("Concat", [out, rest], scope, axis=-1) if rest else out

    def mask(self, attention_mask: str, input_ids: str) -> str:
        """Additive mask (B, 1, S, P+S): 0 where a query may see a key, fp32 min elsewhere
        (causal, padding, and Mistral's sliding window)."""
        s = "/model/attn_mask"
        total = self.op("Gather", [self.op("Shape", [attention_mask], s), self.const(1)], s, axis=0)
        new = self.op("Gather", [self.op("Shape", [input_ids], s), self.const(1)], s, axis=0)
        past = self.op("Sub", [total, new], s)
        keys = self.op("Range", [self.const(0), total, self.const(1)], s)  # (T,)
        queries = self.op(
            "Unsqueeze", [self.op("Range", [past, total, self.const(1)], s), self.const([1])], s
        )  # (S, 1)
        ok = self.op("LessOrEqual", [keys, queries], s)  # (S, T)
        if self.d.window:
            recent = self.op(
                "Greater", [keys, self.op("Sub", [queries, self.const(self.d.window)], s)], s
            )
            ok = self.op("And", [ok, recent], s)
        pad = self.op(
            "Cast",
            [self.op("Unsqueeze", [attention_mask, self.const([1, 2])], s)],
            s,
            to=TensorProto.BOOL,
        )  # (B, 1, 1, T)
        ok = self.op("And", [ok, pad], s)  # (B, 1, S, T)
        return self.op(
            "Where", [ok, self.const(0.0, np.float32), self.const(F32_MIN, np.float32)], s
        )

    def heads(self, x: str, n: int, scope: str) -> str:
        """(B, S, n*head_dim) -> (B, n, S, head_dim)."""
        x = self.op("Reshape", [x, self.const([0, 0, n, self.d.head_dim])], scope)
        return self.op("Transpose", [x], scope, perm=[0, 2, 1, 3])

    def attention(
        self, i: int, x: str, mask: str, rope: tuple[str, str], linear: LinearFn, tensor: TensorFn
    ) -> str:
        d, s = self.d, f"/model/layers.{i}/self_attn"
        projs = attention_projs(d, i)
        if d.fused:
            qkv = linear(self, projs[0], x)
            q, k, v = self.op(
                "Split",
                [
                    qkv,
                    self.const(
                        [d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim]
                    ),
                ],
                s,
                n_out=3,
                axis=-1,
            )
        else:
            q, k, v = (linear(self, p, x) for p in projs[:3])
        q = self.rotate(self.heads(q, d.heads, s), *rope, s)
        k = self.rotate(self.heads(k, d.kv_heads, s), *rope, s)
        v = self.heads(v, d.kv_heads, s)
        keys = self.op("Concat", [f"past_key_values.{i}.key", k], s, axis=2)
        vals = self.op("Concat", [f"past_key_values.{i}.value", v], s, axis=2)
        self.nodes.append(
            helper.make_node("Identity", [keys], [f"present.{i}.key"], name=f"{s}/present_key")
        )
        self.nodes.append(
            helper.make_node("Identity", [vals], [f"present.{i}.value"], name=f"{s}/present_value")
        )
        group = d.heads // d.kv_heads
        qg = self.op(
            "Reshape", [q, self.const([0, d.kv_heads, -1, d.head_dim])], s
        )  # (B, kv, g*S, d)
        scores = self.op("MatMul", [qg, self.op("Transpose", [keys], s, perm=[0, 1, 3, 2])], s)
        scores = self.op("Mul", [scores, self.const(d.head_dim**-0.5, np.float32)], s)
        if group > 1:
            mask = self.op("Tile", [mask, self.const([1, 1, group, 1])], s)
        probs = self.op("Softmax", [self.op("Add", [scores, mask], s)], s, axis=-1)
        out = self.op("MatMul", [probs, vals], s)  # (B, kv, g*S, d)
        out = self.op("Reshape", [out, self.const([0, d.heads, -1, d.head_dim])], s)
        out = self.op("Transpose", [out], s, perm=[0, 2, 1, 3])
        out = self.op("Reshape", [out, self.const([0, 0, d.heads * d.head_dim])], s)
        return linear(self, projs[-1], out)

    def mlp(self, i: int, x: str, linear: LinearFn) -> str:
        s = f"/model/layers.{i}/mlp"
        projs = mlp_projs(self.d, i)
        if self.d.fused:
            gate, up = self.op(
                "Split",
                [linear(self, projs[0], x), self.const([self.d.intermediate] * 2)],
                s,
                n_out=2,
                axis=-1,
            )
        else:
            gate, up = linear(self, projs[0], x), linear(self, projs[1], x)
        act = self.op("Mul", [gate, self.op("Sigmoid", [gate], s)], s)
        return linear(self, projs[-1], self.op("Mul", [act, up], s))

    # -- the decoder -----------------------------------------------------------------------

    def build(
        self,
        embed: Callable[["GraphBuilder", str], str],
        linear: LinearFn,
        tensor: TensorFn,
        lm_head: Callable[["GraphBuilder", str], str],
    ) -> onnx.GraphProto:
        """The whole decoder; ``embed(builder, input_ids) -> (B, S, H)`` emits the embedding
        lookup, ``lm_head(builder, x) -> logits`` the head."""
        d = self.d
        x = embed(self, "input_ids")
        rope = self.rope_tables("position_ids")
        mask = self.mask("attention_mask", "input_ids")
        for i in range(d.layers):
            p = f"/model/layers.{i}"
            n1 = self.add_init(
                f"model.layers.{i}.input_layernorm.weight",
                tensor(f"model.layers.{i}.input_layernorm.weight"),
            )
            h = self.attention(
                i, self.rms_norm(x, n1, f"{p}/input_layernorm"), mask, rope, linear, tensor
            )
            x = self.op("Add", [x, h], p)
            n2 = self.add_init(
                f"model.layers.{i}.post_attention_layernorm.weight",
                tensor(f"model.layers.{i}.post_attention_layernorm.weight"),
            )
            h = self.mlp(i, self.rms_norm(x, n2, f"{p}/post_attention_layernorm"), linear)
            x = self.op("Add", [x, h], p)
        norm = self.add_init("model.norm.weight", tensor("model.norm.weight"))
        logits = lm_head(self, self.rms_norm(x, norm, "/model/norm"))
        self.nodes.append(
            helper.make_node("Identity", [logits], ["logits"], name="/lm_head/output")
        )
        return self.graph()

    def graph(self) -> onnx.GraphProto:
        d, f = self.d, TensorProto.FLOAT
        ints = TensorProto.INT64
        inputs = [
            helper.make_tensor_value_info("input_ids", ints, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info(
                "attention_mask", ints, ["batch_size", "total_sequence_length"]
            ),
            helper.make_tensor_value_info("position_ids", ints, ["batch_size", "sequence_length"]),
        ]
        outputs = [
            helper.make_tensor_value_info("logits", f, ["batch_size", "sequence_length", d.vocab])
        ]
        for i in range(d.layers):
            for kind in ("key", "value"):
                inputs.append(
                    helper.make_tensor_value_info(
                        f"past_key_values.{i}.{kind}",
                        f,
                        ["batch_size", d.kv_heads, "past_sequence_length", d.head_dim],
                    )
                )
                outputs.append(
                    helper.make_tensor_value_info(
                        f"present.{i}.{kind}",
                        f,
                        ["batch_size", d.kv_heads, "total_sequence_length", d.head_dim],
                    )
                )
        return helper.make_graph(self.nodes, "edgetune_decoder", inputs, outputs)
