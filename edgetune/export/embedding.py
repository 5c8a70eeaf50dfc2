"""Embedding-table quantization: ``Gather`` -> ``com.microsoft.GatherBlockQuantized``.

The (V, H) table is quantized in blocks along H by the same kernels as the projections
(``kernels.q4_quantize`` / ``q8_weight_quantize`` on the transposed table), so its bytes
are MatMulNBits' layout with N = V: 4-bit uint8 (V, H/2) low nibble first, default zero
point 8, or packed 4-bit zero points (V, ceil(H/block/2)) when asymmetric; 8-bit uint8
(V, H), zero point 128. GatherBlockQuantized reads uint8 data exactly so (``bits``
attribute, ONNX Runtime >= 1.20), and dequantizes only the rows a step looks up.
Only on request (``--embedding int4|int8``): for a small vocabulary model the table is
most of the bundle, for a large one the projections are.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import kernels
from .config import ExportConfig
from .quantize import MS_DOMAIN, use_ms_domain


def quantize_embedding(model: onnx.ModelProto, cfg: ExportConfig) -> str:
    """Rewrite the Gather over the embedding table in place; returns what was done."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    node = next((n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
                 and len(inits[n.input[0]].dims) == 2), None)
    if node is None:
        return "no embedding Gather over an initializer found; kept fp32"
    table = numpy_helper.to_array(inits[node.input[0]])
    vocab, hidden = table.shape
    if hidden % cfg.block_size or table.dtype != np.float32:
        return f"embedding {table.shape} not divisible by block {cfg.block_size}; kept fp32"
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if axis != 0:
        return f"embedding Gather on axis {axis}; kept fp32"
    name = node.input[0]  # Optimum keeps the readable 'model.embed_tokens.weight'
    bt = np.ascontiguousarray(table.T)  # (H, V): the table as a (K, N) MatMul weight
    if cfg.embedding == "int4":
        q = kernels.q4_quantize(bt, cfg.block_size, cfg.symmetric)
        extra = [numpy_helper.from_array(q.packed.reshape(vocab, hidden // 2), f"{name}_Q4"),
                 numpy_helper.from_array(q.scales, f"{name}_scales")]
        if q.zero_points is not None:
            extra.append(numpy_helper.from_array(q.zero_points, f"{name}_zp"))
        bits = 4
    else:
        codes, scales = kernels.q8_weight_quantize(bt, cfg.block_size)
        extra = [numpy_helper.from_array(codes.reshape(vocab, hidden), f"{name}_Q8"),
                 numpy_helper.from_array(scales, f"{name}_scales")]
        bits = 8
    graph.initializer.extend(extra)
    new = helper.make_node("GatherBlockQuantized", [extra[0].name, node.input[1]]
                           + [t.name for t in extra[1:]], list(node.output),
                           name=f"{node.name}_Q{bits}", domain=MS_DOMAIN, gather_axis=0,
                           quantize_axis=1, block_size=cfg.block_size, bits=bits)
    idx = list(graph.node).index(node)
    graph.node.remove(node)
    graph.node.insert(idx, new)
    if not any(name in n.input for n in graph.node):  # a tied LM head may still read it
        graph.initializer.remove(inits[name])
    use_ms_domain(model)
    return f"embedding {vocab}x{hidden} as {bits}-bit blocks of {cfg.block_size} (GatherBlockQuantized)"
