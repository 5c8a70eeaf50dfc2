"""``--quant int8``: ONNX Runtime dynamic quantization of the decoder's MatMuls.

``onnxruntime.quantization.quantize_dynamic``: int8 weights with one scale per output
channel, activations quantized to uint8 at run time (``DynamicQuantizeLinear`` +
``MatMulInteger``). ONNX Runtime's own, well-kept pass, so it is used as is; edgetune
only renames the weights first ('onnx::MatMul_1592' -> 'model.layers.0.self_attn.
qkv_proj.weight', so the int8 initializers read 'model.layers.0...weight_quantized').
Only ONNX Runtime (and onnxruntime-genai) run these graphs; the native backend refuses
them by name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx

from .quantize import is_lm_head, weight_matmuls, weight_name

#: What the manifest records as the int8 scheme (``quantization.int8``).
INT8_KIND = (
    "ort-dynamic: per-channel int8 weights, DynamicQuantizeLinear + MatMulInteger; "
    "LM head per --lm-head (8-bit weight-only blocks by default)"
)


def rename_weights(model: onnx.ModelProto) -> None:
    """Give every MatMul weight initializer used once a readable, module-path name."""
    graph = model.graph
    uses: dict[str, int] = {}
    for nd in graph.node:
        for i in nd.input:
            uses[i] = uses.get(i, 0) + 1
    taken = {i.name for i in graph.initializer}
    inits = {i.name: i for i in graph.initializer}
    for node in weight_matmuls(model):
        old, new = node.input[1], weight_name(node)
        if uses.get(old, 0) == 1 and new not in taken:
            inits[old].name = new
            node.input[1] = new
            taken.add(new)


def quantize_int8_dynamic(model: onnx.ModelProto, work: Path) -> onnx.ModelProto:
    """The model with every decoder weight MatMul dynamically quantized (per-channel int8).

    The LM head is left out: one uint8 scale for the whole final hidden state costs top-1
    agreement (97.3 % instead of >= 98 % on the quickstart model); the caller gives the head
    8-bit weight-only blocks (``--lm-head``) as the int4 export does."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rename_weights(model)
    outputs = {o.name for o in model.graph.output}
    heads = [n.name for n in weight_matmuls(model) if is_lm_head(n, outputs)]
    # onnx refuses to write external data named like a file in the *current* directory
    # (its check ignores the output folder), so the name is as unique as the work dir's
    out = work / f"{work.name.strip('.')}-int8.onnx"
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing" is not for users
    try:
        quantize_dynamic(
            model,
            out,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=True,
            nodes_to_exclude=heads,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        logging.getLogger().setLevel(level)
    return onnx.load(str(out))
