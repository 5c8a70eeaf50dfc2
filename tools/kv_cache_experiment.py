"""Decode-step attention in ONNX Runtime (CPU): edgetune's KV-cache pattern against
GroupQueryAttention on a shared cache buffer, to size the exporter change before making it.

    python tools/kv_cache_experiment.py --context 1536 --heads 32 --layers 8   # Phi-3-mini width

``concat``: what edgetune's graph does today (Concat past + new key/value, MatMul, Softmax,
MatMul; the present cache handed out as numpy and fed back next step). ``gqa``:
``com.microsoft.GroupQueryAttention`` on a (1, heads, max_len, head_dim) buffer bound by IO
binding as both past and present, so each step appends one position in place (how
onnxruntime-genai runs its models). Attention only: no projections, no mask or scale in the
concat graph (which flatters it); random inputs, timing only (outputs are not compared).
Three warm-up steps are left out of the timing: ORT's first GroupQueryAttention calls
allocate, and counting them turned a 3x win into an apparent 1.1x.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

F = TensorProto.FLOAT


def _graph(nodes, inputs, layers: int, opsets):
    outputs = [helper.make_tensor_value_info(f"o{i}", F, None) for i in range(layers)]
    outputs += [
        helper.make_tensor_value_info(f"o{kv}{i}", F, None) for i in range(layers) for kv in "kv"
    ]
    g = helper.make_graph(nodes, "attention", inputs, outputs)
    return helper.make_model(g, opset_imports=opsets).SerializeToString()


def concat_model(heads: int, dim: int, layers: int) -> bytes:
    nodes = []
    for i in range(layers):
        nodes += [
            helper.make_node("Concat", [f"pk{i}", "k"], [f"ok{i}"], axis=2),
            helper.make_node("Concat", [f"pv{i}", "v"], [f"ov{i}"], axis=2),
            helper.make_node("Transpose", [f"ok{i}"], [f"kt{i}"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["q", f"kt{i}"], [f"s{i}"]),
            helper.make_node("Softmax", [f"s{i}"], [f"p{i}"], axis=-1),
            helper.make_node("MatMul", [f"p{i}", f"ov{i}"], [f"o{i}"]),
        ]
    inputs = [helper.make_tensor_value_info(n, F, [1, heads, 1, dim]) for n in "qkv"]
    inputs += [
        helper.make_tensor_value_info(f"p{kv}{i}", F, [1, heads, "P", dim])
        for i in range(layers)
        for kv in "kv"
    ]
    return _graph(nodes, inputs, layers, [helper.make_opsetid("", 18)])


def gqa_model(heads: int, dim: int, layers: int, max_len: int) -> bytes:
    nodes = [
        helper.make_node(
            "GroupQueryAttention",
            ["q", "k", "v", f"pk{i}", f"pv{i}", "seqlens_k", "total"],
            [f"o{i}", f"ok{i}", f"ov{i}"],
            domain="com.microsoft",
            num_heads=heads,
            kv_num_heads=heads,
        )
        for i in range(layers)
    ]
    inputs = [helper.make_tensor_value_info(n, F, [1, 1, heads * dim]) for n in "qkv"]
    inputs += [
        helper.make_tensor_value_info(f"p{kv}{i}", F, [1, heads, max_len, dim])
        for i in range(layers)
        for kv in "kv"
    ]
    inputs += [
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return _graph(nodes, inputs, layers, opsets)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=1536, help="tokens already in the cache")
    ap.add_argument("--heads", type=int, default=32, help="attention (= key/value) heads")
    ap.add_argument("--head-dim", type=int, default=96)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    h, d, n, p0 = a.heads, a.head_dim, a.layers, a.context
    max_len = p0 + a.steps + 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    g = np.random.default_rng(0)
    names = [f"p{kv}{i}" for i in range(n) for kv in "kv"]
    presents = [f"o{kv}{i}" for i in range(n) for kv in "kv"]

    sess = ort.InferenceSession(concat_model(h, d, n), so, providers=["CPUExecutionProvider"])
    past = [g.standard_normal((1, h, p0, d)).astype(np.float32) for _ in names]
    t = time.perf_counter()
    for step in range(a.steps + 3):
        if step == 3:
            t = time.perf_counter()
        feed = {x: g.standard_normal((1, h, 1, d)).astype(np.float32) for x in "qkv"}
        feed.update(zip(names, past, strict=True))
        past = sess.run(presents, feed)
    concat_ms = (time.perf_counter() - t) / a.steps * 1e3

    sess = ort.InferenceSession(gqa_model(h, d, n, max_len), so, providers=["CPUExecutionProvider"])
    io = sess.io_binding()
    for name, present in zip(names, presents, strict=True):
        buf = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, h, max_len, d), np.float32))
        io.bind_ortvalue_input(name, buf)
        io.bind_ortvalue_output(present, buf)
    for i in range(n):
        io.bind_output(f"o{i}", "cpu")
    for step in range(a.steps + 3):
        if step == 3:
            t = time.perf_counter()
        for x in "qkv":
            io.bind_cpu_input(x, g.standard_normal((1, 1, h * d)).astype(np.float32))
        io.bind_cpu_input("seqlens_k", np.array([p0 + step], np.int32))  # total length - 1
        io.bind_cpu_input("total", np.array(p0 + step + 1, np.int32))
        sess.run_with_iobinding(io)
    gqa_ms = (time.perf_counter() - t) / a.steps * 1e3
    print(
        f"context {p0}, {n} layers of {h} heads x {d}: concat + numpy {concat_ms:.1f} ms/step, "
        f"GQA shared buffer {gqa_ms:.1f} ms/step ({concat_ms / gqa_ms:.1f}x)"
    )


if __name__ == "__main__":
    main()
