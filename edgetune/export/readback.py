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
            return np.fromfile(f, dtype, int(info["length"]) // dtype.itemsize).reshape(tuple(t.dims))

    def get(self, hf_name: str) -> np.ndarray | None:
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
        scales = scales.reshape(n, nb)
        if bits == 8:
            return np.ascontiguousarray(q8_weight_dequantize(data.reshape(n, nb, block), scales).T)
        q = kernels.Q4Weight(data.reshape(n, nb, block // 2), np.ascontiguousarray(scales),
                             None if zp is None else zp.reshape(n, -1), nb * block, n, block)
        return np.ascontiguousarray(kernels.q4_dequantize(q).T)
