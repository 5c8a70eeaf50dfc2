"""Weight quantization of an exported ONNX decoder.

Every ``MatMul`` whose right operand is a 2-D weight initializer becomes a
``com.microsoft.MatMulNBits`` node whose packed weight comes from
``edgetune.kernels`` (the same packing the native runtime reads): 4-bit blocks
for the decoder projections, chosen by round-to-nearest, HQQ or GPTQ (``cfg.algo``),
and 8-bit round-to-nearest blocks for the LM head by default. The embedding table
(a Gather) is left to ``embedding.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tqdm.auto import tqdm

from .. import kernels
from ..errors import ModelError
from .config import ExportConfig

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class QuantSummary:
    quantized: dict[str, int]  # bits -> number of MatMuls
    kept: list[str]  # MatMul weights left in fp32, with the reason


def is_lm_head(node: onnx.NodeProto, graph_outputs: set[str]) -> bool:
    return "lm_head" in node.name or node.output[0] in graph_outputs


def weight_name(node: onnx.NodeProto) -> str:
    """A readable initializer prefix from the node name: '/model/layers.0/mlp/down_proj/MatMul'
    -> 'model.layers.0.mlp.down_proj.weight' (what the native runtime looks weights up by)."""
    parts = [p for p in node.name.split("/") if p]
    if parts and parts[-1].startswith("MatMul"):
        parts = parts[:-1]
    return ".".join(parts) + ".weight" if parts else node.input[1]


def weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMul nodes whose right operand is a weight initializer."""
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def q4_blocks(
    w: np.ndarray, name: str, cfg: ExportConfig, hessian: np.ndarray | None = None
) -> kernels.Q4Weight:
    """4-bit blocks of one (K, N) weight (or a chunk of its N columns) by ``cfg.algo``;
    GPTQ needs the (K, K) ``hessian`` of the projection's inputs."""
    assert cfg.symmetric is not None  # ExportConfig.__post_init__ resolves None to a bool
    if cfg.algo == "hqq":
        from .hqq import hqq_quantize

        return hqq_quantize(w, cfg.block_size, cfg.symmetric)
    if cfg.algo == "gptq":
        from .gptq import gptq_quantize

        if hessian is None:
            raise ModelError(f"GPTQ: no calibration inputs for {name}")
        return gptq_quantize(
            w, hessian, cfg.block_size, cfg.symmetric, damp=cfg.gptq_damp, act_order=cfg.act_order
        )
    return kernels.q4_quantize(w, cfg.block_size, cfg.symmetric)


def _q4(w: np.ndarray, prefix: str, cfg: ExportConfig, hessians: dict | None) -> kernels.Q4Weight:
    module = prefix.removesuffix(".weight")
    if cfg.algo == "gptq" and (hessians is None or module not in hessians):
        raise ModelError(
            f"GPTQ: no calibration inputs for {module} (the ONNX MatMul names "
            "must match the PyTorch module names)"
        )
    return q4_blocks(w, prefix, cfg, hessians.get(module) if hessians else None)


def quantize_weights(
    model: onnx.ModelProto, cfg: ExportConfig, hessians: dict[str, np.ndarray] | None = None
) -> QuantSummary:
    """Rewrite MatMuls over weight initializers in place, per ``cfg`` (``hessians``: GPTQ's
    ``X^T X`` per module path, from ``gptq.collect_hessians``)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    uses: dict[str, int] = {}
    for nd in graph.node:
        for i in nd.input:
            uses[i] = uses.get(i, 0) + 1
    counts: dict[str, int] = {}
    kept: list[str] = []
    new_nodes = []
    drop: set[str] = set()
    bar = tqdm(
        total=len(weight_matmuls(model)),
        desc=f"quantize {cfg.algo}",
        unit="matmul",
        disable=None,
        leave=False,
    )
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        bar.update()
        w = numpy_helper.to_array(inits[node.input[1]])
        head = is_lm_head(node, outputs)
        bits = 4
        if cfg.quant == "int8" or (head and cfg.lm_head == "int8"):
            bits = 8
        if head and cfg.lm_head == "fp32":
            kept.append(f"{node.name}: lm_head kept fp32 (--lm-head fp32)")
            new_nodes.append(node)
            continue
        if w.ndim != 2 or w.shape[0] % cfg.block_size or w.dtype != np.float32:
            kept.append(f"{node.name}: weight {w.shape} not divisible by block {cfg.block_size}")
            new_nodes.append(node)
            continue
        k, n = w.shape
        prefix = weight_name(node)
        extra = []
        if bits == 4:
            q = _q4(w, prefix, cfg, hessians)
            extra = [
                numpy_helper.from_array(q.packed, f"{prefix}_Q4"),
                numpy_helper.from_array(q.scales.reshape(-1), f"{prefix}_scales"),
            ]
            if q.zero_points is not None:
                extra.append(numpy_helper.from_array(q.zero_points.reshape(-1), f"{prefix}_zp"))
        else:
            codes, scales = kernels.q8_weight_quantize(w, cfg.block_size)
            extra = [
                numpy_helper.from_array(codes, f"{prefix}_Q8"),
                numpy_helper.from_array(scales.reshape(-1), f"{prefix}_scales"),
            ]
        graph.initializer.extend(extra)
        new_nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0]] + [t.name for t in extra],
                list(node.output),
                name=f"{node.name}_Q{bits}",
                domain=MS_DOMAIN,
                K=k,
                N=n,
                bits=bits,
                block_size=cfg.block_size,
                accuracy_level=cfg.accuracy_level,
            )
        )
        counts[str(bits)] = counts.get(str(bits), 0) + 1
        if uses.get(node.input[1], 0) <= 1:
            drop.add(node.input[1])
    bar.close()
    del graph.node[:]
    graph.node.extend(new_nodes)
    remaining = [i for i in graph.initializer if i.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(remaining)
    use_ms_domain(model)
    return QuantSummary(counts, kept)


def use_ms_domain(model: onnx.ModelProto) -> None:
    """Declare ONNX Runtime's contrib-op domain (MatMulNBits, GatherBlockQuantized) once."""
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
