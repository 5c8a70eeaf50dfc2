"""The streaming export pass: checkpoint tensors -> graph -> quantizer -> data file.

One pass over the decoder in graph order. Each projection is read from the memory-mapped
safetensors in chunks of output rows, quantized chunk by chunk (RTN, HQQ and GPTQ blocks
are independent across output features), appended to ``model.onnx.data`` and freed; the
graph proto only points at the bytes. Peak memory is about one projection's fp32 chunk plus
its packed form, whatever the depth of the model. GPTQ is driven layer by layer: the
calibration activations of layer i give its Hessians, and flow on through the quantized
layer (``layerwise.GptqCalibration``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from tqdm.auto import tqdm

from .. import kernels
from ..tensors import SafetensorsSource, widen
from .config import ExportConfig
from .families import Dims, Proj, expected_shapes
from .graph import GraphBuilder, Rope
from .quantize import MS_DOMAIN, q4_blocks
from .writer import ExternalDataWriter

CHUNK_ELEMENTS = 1 << 23  # fp32 values read and quantized at a time (32 MB)


@dataclass
class StreamResult:
    """What the pass wrote: counts by bits, what stayed fp32, and the dequantized weights
    the parity report compares (by HF name, only when asked to keep them)."""

    quantized: dict[str, int] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    embedding: str | None = None


def check_checkpoint(src: SafetensorsSource, d: Dims) -> None:
    """Every tensor the decoder needs is there with the shape config.json implies."""
    for name, shape in expected_shapes(d).items():
        src.expect(name, shape)


def _rows(n: int, k: int) -> int:
    return max(1, min(n, CHUNK_ELEMENTS // max(k, 1)))


class DecoderWriter:
    """Emits the decoder of one checkpoint into ``bundle/model.onnx`` (+ ``.data``)."""

    def __init__(self, model_dir: Path, cfg: ExportConfig, gptq=None, progress: bool = True):
        from transformers import AutoConfig

        self.dir, self.cfg, self.gptq = Path(model_dir), cfg, gptq
        self.hf = json.loads((self.dir / "config.json").read_text())
        self.d = Dims.of(self.hf)
        self.src = SafetensorsSource(self.dir)
        check_checkpoint(self.src, self.d)
        self.rope = Rope.of(AutoConfig.from_pretrained(str(self.dir), trust_remote_code=False))
        self.result = StreamResult()
        self.progress = progress
        self._layer_done: dict[int, dict[str, np.ndarray]] = {}

    # -- callbacks the graph builder calls, in graph order ---------------------------------

    def _q4(self, name: str, k: int, n: int, hessian) -> kernels.Q4Weight:
        parts = []
        step = _rows(n, k)
        for n0 in range(0, n, step):
            w = self.src.array(name, rows=(n0, min(n, n0 + step))).T  # (K, rows)
            parts.append(q4_blocks(w, name, self.cfg, hessian))
        zp = (
            None if parts[0].zero_points is None else np.concatenate([p.zero_points for p in parts])
        )
        return kernels.Q4Weight(
            np.concatenate([p.packed for p in parts]),
            np.concatenate([p.scales for p in parts]),
            zp,
            k,
            n,
            self.cfg.block_size,
        )

    def _q8(self, name: str, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        step = _rows(n, k)
        parts = [
            kernels.q8_weight_quantize(
                self.src.array(name, rows=(n0, min(n, n0 + step))).T, self.cfg.block_size
            )
            for n0 in range(0, n, step)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _row_chunks(self, name: str, n: int, k: int):
        """fp32 rows of the (n, k) checkpoint tensor, a chunk at a time (C order)."""
        step = _rows(n, k)
        for n0 in range(0, n, step):
            yield self.src.array(name, rows=(n0, min(n, n0 + step)))

    def _columns(self, name: str, k: int, n: int):
        """The (k, n) transpose of the (n, k) checkpoint tensor, a chunk of its rows (the
        tensor's columns) at a time, for an fp32 MatMul weight."""
        step = _rows(k, n)
        raw = self.src.raw(name)
        dtype = self.src.info(name).dtype
        for k0 in range(0, k, step):
            yield widen(np.ascontiguousarray(raw[:, k0 : min(k, k0 + step)]), dtype).T

    def _add_chunked(self, name: str, shape: tuple[int, int], chunks) -> str:
        self._inits.append(self._writer.chunked(name, shape, np.float32, chunks))
        self._bar.update()
        return name

    def _bits(self, head: bool) -> int | None:
        """4, 8, or None (fp32) for a projection under ``cfg``."""
        cfg = self.cfg
        if cfg.quant in ("none", "int8-dynamic"):
            return None
        if head:
            return None if cfg.lm_head == "fp32" else (8 if cfg.lm_head == "int8" else 4)
        return 8 if cfg.quant == "int8" else 4

    def matmul(
        self, b: GraphBuilder, x: str, name: str, module: str, k: int, n: int, head: bool = False
    ) -> str:
        """x @ W for HF weight ``name`` (N, K): MatMulNBits over its blocks, or fp32 MatMul."""
        bits = self._bits(head)
        scope = "/" + module.replace(".", "/")
        prefix = f"{module}.weight"
        if bits is not None and k % self.cfg.block_size:
            self.result.kept.append(f"{module}: K={k} not divisible by block {self.cfg.block_size}")
            bits = None
        if bits is None:
            if (
                head
                and self.cfg.lm_head == "fp32"
                and self.cfg.quant not in ("none", "int8-dynamic")
            ):
                self.result.kept.append(f"{module}: lm_head kept fp32 (--lm-head fp32)")
            w = self._add_chunked(prefix, (k, n), self._columns(name, k, n))
            return b.op("MatMul", [x, w], scope)
        if bits == 4:
            hessian = self.gptq.hessian(module) if self.gptq is not None and not head else None
            q = self._q4(name, k, n, hessian)
            inputs = [
                b.add_init(f"{prefix}_Q4", q.packed),
                b.add_init(f"{prefix}_scales", q.scales.reshape(-1)),
            ]
            if q.zero_points is not None:
                inputs.append(b.add_init(f"{prefix}_zp", q.zero_points.reshape(-1)))
            if self.gptq is not None and not head:
                self.gptq.quantized(module, q)
        else:
            codes, scales = self._q8(name, k, n)
            inputs = [
                b.add_init(f"{prefix}_Q8", codes),
                b.add_init(f"{prefix}_scales", scales.reshape(-1)),
            ]
        self.result.quantized[str(bits)] = self.result.quantized.get(str(bits), 0) + 1
        return b.op(
            "MatMulNBits",
            [x, *inputs],
            scope,
            domain=MS_DOMAIN,
            K=k,
            N=n,
            bits=bits,
            block_size=self.cfg.block_size,
            accuracy_level=self.cfg.accuracy_level,
        )

    def linear(self, b: GraphBuilder, p: Proj, x: str) -> str:
        if self.gptq is not None:
            self.gptq.enter(p.module)
        y = self.matmul(b, x, p.weight, p.module, p.k, p.n)
        if p.bias:
            bias = b.add_init(f"{p.module}.bias", self.src.array(f"{p.module}.bias"))
            y = b.op("Add", [y, bias], "/" + p.module.replace(".", "/"))
        return y

    def embed(self, b: GraphBuilder, ids: str) -> str:
        """Gather over the fp32 table, or (``--embedding int4|int8``) com.microsoft
        GatherBlockQuantized over blocks along H made by the projections' quantizers on the
        transposed table, so the bytes are MatMulNBits' layout with N = V: 4-bit (V, H/2) low
        nibble first (zero point 8, or packed zero points when asymmetric), 8-bit (V, H) with
        zero point 128. Only the rows a step looks up are dequantized."""
        cfg, d, name = self.cfg, self.d, "model.embed_tokens.weight"
        scope = "/model/embed_tokens"
        if cfg.embedding == "fp32" or d.hidden % cfg.block_size:
            if cfg.embedding != "fp32":
                self.result.embedding = (
                    f"embedding {d.vocab}x{d.hidden} not divisible by block "
                    f"{cfg.block_size}; kept fp32"
                )
            table = self._add_chunked(
                name, (d.vocab, d.hidden), self._row_chunks(name, d.vocab, d.hidden)
            )
            return b.op("Gather", [table, ids], scope, axis=0)
        if cfg.embedding == "int4":
            q = self._q4(name, d.hidden, d.vocab, None)
            inputs = [
                b.add_init(f"{name}_Q4", q.packed.reshape(d.vocab, d.hidden // 2)),
                ids,
                b.add_init(f"{name}_scales", q.scales),
            ]
            if q.zero_points is not None:
                inputs.append(b.add_init(f"{name}_zp", q.zero_points))
            bits = 4
        else:
            codes, scales = self._q8(name, d.hidden, d.vocab)
            inputs = [
                b.add_init(f"{name}_Q8", codes.reshape(d.vocab, d.hidden)),
                ids,
                b.add_init(f"{name}_scales", scales),
            ]
            bits = 8
        self.result.embedding = (
            f"embedding {d.vocab}x{d.hidden} as {bits}-bit blocks of "
            f"{cfg.block_size} (GatherBlockQuantized)"
        )
        return b.op(
            "GatherBlockQuantized",
            inputs,
            scope,
            domain=MS_DOMAIN,
            gather_axis=0,
            quantize_axis=1,
            block_size=cfg.block_size,
            bits=bits,
        )

    def lm_head(self, b: GraphBuilder, x: str) -> str:
        """The head; a tied model's head is the embedding table, quantized as its own
        projection (ONNX Runtime would otherwise fold a transposed fp32 copy of the table)."""
        name = "model.embed_tokens.weight" if self.d.tied else "lm_head.weight"
        return self.matmul(b, x, name, "lm_head", self.d.hidden, self.d.vocab, head=True)

    # -- the pass ----------------------------------------------------------------------------

    def write(self, bundle: Path, decoder: str, data: str, opset: int) -> StreamResult:
        writer = ExternalDataWriter(bundle / data)
        inits: list[onnx.TensorProto] = []
        bar = tqdm(
            total=len(expected_shapes(self.d)),
            desc="export",
            unit="tensor",
            disable=None if self.progress else True,
            leave=False,
        )

        def add_init(name: str, array: np.ndarray) -> str:
            inits.append(writer.tensor(name, array))
            bar.update()
            return name

        self._writer, self._inits, self._bar = writer, inits, bar

        try:
            b = GraphBuilder(self.d, self.rope, add_init)
            graph = b.build(self.embed, self.linear, self.src.array, self.lm_head)
        finally:
            bar.close()
            writer.close()
        graph.initializer.extend(inits)
        model = helper.make_model(
            graph,
            producer_name="edgetune",
            opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
        )
        model.ir_version = 8
        onnx.save_model(model, str(bundle / decoder))
        return self.result
