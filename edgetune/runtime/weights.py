"""Read a bundle's decoder weights straight from its ONNX file, memory-mapped.

The native backend runs on the very bytes ONNX Runtime reads: every initializer
stored as external data becomes a zero-copy numpy view into a read-only memory
map of ``model.onnx.data``; nothing is written twice to disk or copied in RAM.
Projections are found by the names the exporter gives them
(``model.layers.{i}.self_attn.qkv_proj.weight_Q4`` …) and the MatMulNBits node
attributes (K, N, bits, block size).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import BundleError
from ..kernels import Q4Weight, q4_dequantize
from ..kernels.reference import q8_weight_dequantize

T = TypeVar("T")


def held(x: T | None) -> T:
    """A field that the weight's ``kind`` says is set (f32 for "f32", q4 for "q4", the q8
    pair for "q8"); the loaders set exactly those."""
    assert x is not None, "a weight's kind names a field it does not hold"
    return x


_NP = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.FLOAT16: np.float16,
}


def _stored(w) -> tuple[np.ndarray, ...]:
    """The weight arrays a Linear or Embedding reads: packed codes, scales (and zero points),
    or the fp32 matrix."""
    if w.kind == "q4":
        return tuple(a for a in (w.q4.packed, w.q4.scales, w.q4.zero_points) if a is not None)
    if w.kind == "q8":
        return w.q8_codes, w.q8_scales
    return (w.f32,)


def _stored_bytes(w) -> int:
    """Bytes a Linear or Embedding holds: packed codes and scales, or the fp32 table."""
    return sum(a.nbytes for a in _stored(w))


def unique_nbytes(weights) -> int:
    """Bytes of the Linears / Embeddings ``weights`` with storage they share counted once (a
    tied LM head reads the embedding's own bytes)."""
    seen: dict[tuple[int, int], int] = {}
    for w in weights:
        for a in _stored(w):
            seen[(a.__array_interface__["data"][0], a.nbytes)] = a.nbytes
    return sum(seen.values())


@dataclass(frozen=True)
class Linear:
    """One projection y = x @ W (+ bias): 4-bit, 8-bit (MatMulNBits) or fp32 (K, N)."""

    kind: str  # "q4" | "q8" | "f32"
    k: int
    n: int
    q4: Q4Weight | None = None
    q8_codes: np.ndarray | None = None  # uint8 (N, K/block, block), zero point 128
    q8_scales: np.ndarray | None = None  # fp32 (N, K/block)
    f32: np.ndarray | None = None  # (K, N)
    bias: np.ndarray | None = None
    int8_activations: bool = False  # MatMulNBits accuracy_level 4: x rounded to Q8 blocks

    @property
    def nbytes(self) -> int:
        return _stored_bytes(self)


@dataclass(frozen=True)
class Embedding:
    """The token-embedding table: fp32 (V, H), or 4/8-bit blocks along H as written for
    com.microsoft GatherBlockQuantized. ``table[ids]`` dequantizes only the rows looked up."""

    kind: str  # "f32" | "q4" | "q8"
    f32: np.ndarray | None = None  # (V, H)
    q4: Q4Weight | None = None  # the table as a (K=H, N=V) MatMulNBits weight: row v = column v
    q8_codes: np.ndarray | None = None  # uint8 (V, H/block, block), zero point 128
    q8_scales: np.ndarray | None = None  # fp32 (V, H/block)

    def __getitem__(self, ids: np.ndarray) -> np.ndarray:
        """fp32 rows (T, H) of the token ids (T,)."""
        if self.kind == "f32":
            return held(self.f32)[ids]
        if self.kind == "q8":
            return q8_weight_dequantize(held(self.q8_codes)[ids], held(self.q8_scales)[ids]).T
        q = held(self.q4)
        zp = q.zero_points
        rows = Q4Weight(
            np.ascontiguousarray(q.packed[ids]),
            np.ascontiguousarray(q.scales[ids]),
            None if zp is None else np.ascontiguousarray(zp[ids]),
            q.k,
            len(ids),
            q.block,
        )
        return q4_dequantize(rows).T

    @property
    def nbytes(self) -> int:
        return _stored_bytes(self)

    @property
    def shape(self) -> tuple[int, int]:
        """(vocab, hidden) of the fp32 table this one stands for."""
        if self.kind == "f32":
            v, h = held(self.f32).shape
            return v, h
        if self.kind == "q8":
            codes = held(self.q8_codes)
            return codes.shape[0], codes.shape[1] * codes.shape[2]
        q = held(self.q4)
        return q.n, q.k

    def as_head(self) -> Linear:
        """The table as a tied LM head, logits = x @ table.T, on the same bytes: fp32 (V, H)
        as its transposed (K=H, N=V) view; 8-bit blocks (V, H/block, block) are byte for
        byte a MatMulNBits weight with N=V, K=H, and so are the 4-bit ones."""
        vocab, hidden = self.shape
        if self.kind == "f32":
            return Linear("f32", hidden, vocab, f32=held(self.f32).T)
        if self.kind == "q8":
            return Linear("q8", hidden, vocab, q8_codes=self.q8_codes, q8_scales=self.q8_scales)
        return Linear("q4", hidden, vocab, q4=self.q4)


class OnnxWeights:
    """Initializers of an ONNX model by name, external data memory-mapped."""

    def __init__(self, onnx_path: Path):
        self.path = Path(onnx_path)
        self.model = onnx.load(str(self.path), load_external_data=False)
        self.inits = {t.name: t for t in self.model.graph.initializer}
        self._maps: dict[str, np.memmap] = {}
        self.nodes = list(self.model.graph.node)
        # exporters share equal constants (e.g. freshly initialised norms) through Identity
        self.alias = {n.output[0]: n.input[0] for n in self.nodes if n.op_type == "Identity"}

    def _resolve(self, name: str) -> str:
        """The initializer ``name`` stands for, through Identity aliases."""
        while name not in self.inits and name in self.alias:
            name = self.alias[name]
        return name

    def array(self, name: str) -> np.ndarray:
        name = self._resolve(name)
        if name not in self.inits:
            raise BundleError(f"{self.path}: initializer {name!r} not found")
        t = self.inits[name]
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        loc = self.path.parent / info["location"]
        if info["location"] not in self._maps:
            self._maps[info["location"]] = np.memmap(loc, dtype=np.uint8, mode="r")
        raw = self._maps[info["location"]]
        off, length = int(info.get("offset", 0)), int(info["length"])
        if off + length > raw.size:
            raise BundleError(f"{loc}: shorter than the data of {name!r} needs")
        return raw[off : off + length].view(_NP[t.data_type]).reshape(tuple(t.dims))

    def has(self, name: str) -> bool:
        return self._resolve(name) in self.inits

    def _is_matrix(self, name: str) -> bool:
        return self.has(name) and len(self.inits[self._resolve(name)].dims) == 2

    def module_vector(self, module: str, size: int) -> np.ndarray:
        """The 1-D weight of ``module`` (e.g. 'model.layers.0.input_layernorm'): by its own
        initializer name, else the 1-D initializer its nodes read (exporters merge equal
        constants, e.g. freshly initialised norms, into one shared initializer)."""
        if self.has(f"{module}.weight"):
            return self.array(f"{module}.weight")
        prefix = "/" + module.replace(".", "/") + "/"
        for node in self.nodes:
            if node.name.startswith(prefix):
                for i in node.input:
                    t = self.inits.get(i)
                    if t is not None and list(t.dims) == [size]:
                        return self.array(i)
        raise BundleError(f"{self.path}: weight of {module} not found")

    def embedding(self, name: str = "model.embed_tokens.weight") -> Embedding:
        """The embedding table: a GatherBlockQuantized node's blocks, else fp32 ``name``."""
        node = next((n for n in self.nodes if n.op_type == "GatherBlockQuantized"), None)
        if node is None:
            return Embedding("f32", f32=self.array(name))
        a = {x.name: x.i for x in node.attribute if x.type == onnx.AttributeProto.INT}
        bits, block = a.get("bits", 4), a["block_size"]
        if (
            a.get("gather_axis", 0) != 0
            or a.get("quantize_axis", 1) not in (1, -1)
            or bits not in (4, 8)
        ):
            raise BundleError(
                f"{self.path}: {node.name}: only 4/8-bit embedding blocks along "
                "the hidden size are supported by the native backend"
            )
        data, scales = self.array(node.input[0]), self.array(node.input[2])
        vocab, nb = scales.shape
        if bits == 8:
            return Embedding("q8", q8_codes=data.reshape(vocab, nb, block), q8_scales=scales)
        zp = self.array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        return Embedding(
            "q4",
            q4=Q4Weight(data.reshape(vocab, nb, block // 2), scales, zp, nb * block, vocab, block),
        )

    @staticmethod
    def _perm(node) -> list[int] | None:
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)

    def linears(self) -> dict[str, Linear]:
        """Every MatMul / MatMulNBits over an initializer, keyed by module path
        ('model.layers.0.self_attn.qkv_proj', 'lm_head')."""
        out: dict[str, Linear] = {}
        consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        # a tied LM head as torch.onnx writes it: MatMul(x, Transpose(embed_tokens.weight))
        transposed = {
            n.output[0]: n.input[0]
            for n in self.nodes
            if n.op_type == "Transpose"
            and self._is_matrix(n.input[0])
            and self._perm(n) in (None, [1, 0])
        }
        for node in self.nodes:
            path = ".".join(p for p in node.name.split("/") if p and not p.startswith("MatMul"))
            if node.op_type == "MatMulNBits":
                a = {
                    x.name: (x.i if x.type == onnx.AttributeProto.INT else x.f)
                    for x in node.attribute
                }
                k, n, bits, block = int(a["K"]), int(a["N"]), int(a["bits"]), int(a["block_size"])
                codes = self.array(node.input[1])
                scales = self.array(node.input[2]).reshape(n, k // block)
                if bits == 4:
                    zp = None
                    if len(node.input) > 3 and node.input[3]:
                        zp = self.array(node.input[3]).reshape(n, -1)
                    lin = Linear(
                        "q4",
                        k,
                        n,
                        q4=Q4Weight(
                            codes.reshape(n, k // block, block // 2),
                            np.ascontiguousarray(scales),
                            zp,
                            k,
                            n,
                            block,
                        ),
                    )
                elif bits == 8:
                    lin = Linear(
                        "q8",
                        k,
                        n,
                        q8_codes=codes.reshape(n, k // block, block),
                        q8_scales=np.ascontiguousarray(scales),
                        int8_activations=int(a.get("accuracy_level", 0)) == 4,
                    )
                else:
                    raise BundleError(f"{self.path}: {node.name}: {bits}-bit weights not supported")
            elif node.op_type == "MatMul" and self.has(node.input[1]):
                w = self.array(node.input[1])
                lin = Linear("f32", w.shape[0], w.shape[1], f32=w)
            elif node.op_type == "MatMul" and node.input[1] in transposed:
                w = self.array(transposed[node.input[1]]).T  # (N, K) stored: a view, no copy
                lin = Linear("f32", w.shape[0], w.shape[1], f32=w)
            else:
                continue
            bias = None
            for c in consumers.get(node.output[0], []):
                if c.op_type == "Add":
                    other = [i for i in c.input if i != node.output[0]]
                    if other and self.has(other[0]):
                        bias = self.array(other[0])
            out[path] = replace(lin, bias=bias)
        return out
