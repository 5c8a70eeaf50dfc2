"""The bundle's quantized weights read back and dequantized, one tensor at a time.

The parity report compares the model as written (the bytes in ``model.onnx.data``) with
the checkpoint it came from; this reads a projection's blocks with ``pread`` (no memory
map whose pages would stay resident) and returns its fp32 weight in Hugging Face's
layout (out, in), by HF parameter name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import kernels
from ..kernels.reference import q8_weight_dequantize


def _hf_name(node_name: str) -> str:
    parts = [p for p in node_name.split("/") if p and not p.startswith(("MatMul", "Gather"))]
    return ".".join(parts) + ".weight"


class BundleWeights:
    """``get(hf_name)`` -> dequantized fp32 (out, in) weight, or None when the bundle keeps
    that tensor as it was (fp32 projections, norms, biases)."""

    def __init__(self, decoder: Path):
        self.path = Path(decoder)
        model = onnx.load(str(self.path), load_external_data=False)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.nodes: dict[str, onnx.NodeProto] = {}
        for n in model.graph.node:
            if n.op_type == "MatMulNBits":
                self.nodes[_hf_name(n.name)] = n
            elif n.op_type == "GatherBlockQuantized":
                self.nodes["model.embed_tokens.weight"] = n

    def names(self) -> list[str]:
        return list(self.nodes)

    def _array(self, name: str) -> np.ndarray:
        t = self.inits[name]
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        with open(self.path.parent / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            return np.fromfile(f, dtype, int(info["length"]) // dtype.itemsize).reshape(
                tuple(t.dims)
            )

    def __call__(self, hf_name: str) -> np.ndarray | None:
        return self.get(hf_name)

    def rows(self, hf_name: str) -> QuantRows | None:
        """The packed weight of ``hf_name`` (in memory, its bytes only) to dequantize a range
        of output rows at a time, or None when the bundle keeps the tensor as it was."""
        node = self.nodes.get(hf_name)
        if node is None:
            return None
        a = {x.name: x.i for x in node.attribute if x.type == onnx.AttributeProto.INT}
        block, bits = a["block_size"], a.get("bits", 4)
        if node.op_type == "GatherBlockQuantized":
            data, scales = self._array(node.input[0]), self._array(node.input[2])
            zp = self._array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            n, nb = scales.shape
        else:
            data, scales = self._array(node.input[1]), self._array(node.input[2])
            zp = self._array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
            n, nb = a["N"], a["K"] // block
        return QuantRows(
            data.reshape(n, nb, -1),
            np.ascontiguousarray(scales.reshape(n, nb)),
            None if zp is None else zp.reshape(n, -1),
            bits,
            block,
        )

    def get(self, hf_name: str) -> np.ndarray | None:
        """The whole dequantized fp32 (out, in) weight of ``hf_name`` (or None)."""
        rows = self.rows(hf_name)
        return None if rows is None else rows.rows(0, rows.shape[0])


class QuantRows:
    """A MatMulNBits / GatherBlockQuantized weight as stored (codes, scales, zero points),
    dequantized ``ROWS`` output rows at a time into one fp32 (out, in) result: no
    full-size temporaries (an int8 LM head of Phi-3's 32064 x 3072 is 394 MB in fp32)."""

    ROWS = 1024

    def __init__(
        self,
        codes: np.ndarray,
        scales: np.ndarray,
        zero_points: np.ndarray | None,
        bits: int,
        block: int,
    ):
        self.codes, self.scales, self.zp, self.bits, self.block = (
            codes,
            scales,
            zero_points,
            bits,
            block,
        )
        n, nb = scales.shape
        self.shape = (n, nb * block)

    def _chunk(self, a: int, b: int) -> np.ndarray:
        if self.bits == 8:
            return q8_weight_dequantize(self.codes[a:b], self.scales[a:b]).T
        zp = None if self.zp is None else np.ascontiguousarray(self.zp[a:b])
        q = kernels.Q4Weight(
            np.ascontiguousarray(self.codes[a:b]),
            self.scales[a:b],
            zp,
            self.shape[1],
            b - a,
            self.block,
        )
        return kernels.q4_dequantize(q).T

    def rows(self, start: int, stop: int) -> np.ndarray:
        """fp32 rows [start, stop) of the (out, in) weight, C-contiguous."""
        out = np.empty((stop - start, self.shape[1]), np.float32)
        for a in range(start, stop, self.ROWS):
            b = min(stop, a + self.ROWS)
            out[a - start : b - start] = self._chunk(a, b)
        return out
