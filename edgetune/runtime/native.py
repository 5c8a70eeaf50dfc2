"""Native backend: the decoder run by edgetune's own kernels (no ONNX Runtime session).

Llama / Phi-3 / Mistral / Qwen2: RMSNorm -> attention (rotary embeddings, Phi-3 longrope,
grouped-query attention over a preallocated KV cache) -> RMSNorm -> SwiGLU MLP, every
projection a Q4 x Q8 GEMV/GEMM (``edgetune.kernels``) over the bundle's own MatMulNBits
weights, memory-mapped. A tied LM head (Qwen2.5, Llama-3.2) multiplies by the embedding
table's own bytes, whatever its format (``Embedding.as_head``), never by a transposed copy.
The prompt is one batched pass (GEMM), decoding one token a pass.
``integer=True`` runs the Q4 projections through the fixed-point datapath the FPGA kernels
implement (kernels/fixed_point.py), bit-exact with the HLS C simulation.
Same interface as ``OrtDecoder``: ``forward(input_ids (1, T), past) -> logits, past``; and
``step(batch)`` runs several sequences, each with its own cache, through one set of GEMMs.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from .. import kernels
from ..errors import BundleError
from ..kernels import fixed_point as fx
from .weights import Linear, OnnxWeights, held, unique_nbytes

FAMILIES = ("llama", "phi3", "mistral", "qwen2")


def lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """fp32 zeros in anonymous memory backed page by page only once written, in 4 KiB pages:
    numpy asks for 2 MiB huge pages on large arrays, which would back the whole
    (context, head_dim) slab of every (layer, head) of a KV cache at its first token."""
    count = math.prod(shape)
    buf = mmap.mmap(-1, max(4 * count, 1))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, np.float32, count).reshape(shape)


def q8_round_trip(x: np.ndarray, block: int) -> np.ndarray:
    """x (T, K) rounded to per-block int8 and back (kernels' Q8): with it the 8-bit GEMM
    computes what ONNX Runtime's accuracy_level 4 does (int8 x int8 block sums, then both
    scales); with fp32 activations the logits of an 8-bit LM head differ from ORT's by ~0.5 %,
    enough to change greedy tokens."""
    t, k = x.shape
    q, s = kernels.reference.q8_quantize(x, block)
    return (q.reshape(t, k // block, block) * s[:, :, None]).reshape(t, k)


class KVCache:
    """Preallocated keys and values, (layers, kv_heads, context, head_dim) each; resident
    memory grows with the tokens written, not with the context."""

    def __init__(self, layers: int, kv_heads: int, context: int, head_dim: int):
        self.k = lazy_zeros((layers, kv_heads, context, head_dim))
        self.v = lazy_zeros((layers, kv_heads, context, head_dim))
        self.length = 0


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x (T, H) normalised by its root mean square, times w (H,); fp32, C-contiguous."""
    return kernels.rms_norm(np.ascontiguousarray(x, dtype=np.float32), w, eps)


class Rope:
    """Rotary embeddings (rotate-half form), with Phi-3's longrope scaling when configured."""

    def __init__(self, arch: dict, head_dim: int):
        self.dim = int(head_dim * arch.get("partial_rotary_factor", 1.0))
        base = float(arch.get("rope_theta", 10000.0))
        inv = 1.0 / base ** (np.arange(0, self.dim, 2, dtype=np.float64) / self.dim)
        self.inv_short = self.inv_long = inv
        self.attn_factor = 1.0
        self.original = int(arch.get("original_max_position_embeddings") or 0)
        scaling = arch.get("rope_scaling") or None
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "longrope":
                raise BundleError(f"rope scaling {kind!r} is not supported by the native backend")
            self.inv_short = inv / np.asarray(scaling["short_factor"], np.float64)
            self.inv_long = inv / np.asarray(scaling["long_factor"], np.float64)
            factor = arch["max_position_embeddings"] / self.original
            self.attn_factor = scaling.get("attention_factor") or (
                1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(self.original))
            )

    def tables(self, pos: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
        """(cos, sin), (T, dim) fp32 each, for positions ``pos``; ``total`` decides longrope's
        factors. Computed once per forward pass, shared by every layer's q and k."""
        inv = self.inv_long if self.original and total > self.original else self.inv_short
        ang = pos[:, None].astype(np.float64) * inv[None, :]  # (T, dim/2)
        emb = np.concatenate([ang, ang], axis=-1)
        return (
            (np.cos(emb) * self.attn_factor).astype(np.float32),
            (np.sin(emb) * self.attn_factor).astype(np.float32),
        )

    def rotate(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x (heads, T, head_dim) rotated by the ``tables`` of its positions (the prompt pass;
        decoding rotates inside ``kernels.attention_decode``)."""
        return kernels.reference.rope_rotate(x, cos, sin)


Groups = Sequence[tuple[Union[slice, np.ndarray], Any]]  # (rows, adapter)


def adapter_groups(spans: list[tuple[int, int, int]], adapters: list | None) -> Groups:
    """(rows, adapter) per distinct adapter of a step: a slice when one adapter has all rows,
    else the row indices of its sequences."""
    if not adapters or all(a is None for a in adapters):
        return ()
    if all(a is adapters[0] for a in adapters):
        return ((slice(0, spans[-1][1]), adapters[0]),)
    rows: dict[int, tuple[list[np.ndarray], Any]] = {}
    for (a, b, _), adapter in zip(spans, adapters, strict=True):
        if adapter is not None:
            rows.setdefault(id(adapter), ([], adapter))[0].append(np.arange(a, b))
    return tuple((np.concatenate(r), ad) for r, ad in rows.values())


class NativeDecoder:
    """The decoder of a bundle, run with edgetune.kernels."""

    def __init__(
        self, bundle: Path, manifest: dict, threads: int | None = None, integer: bool = False
    ):
        arch = manifest["architecture"]
        if arch["model_type"] not in FAMILIES:
            raise BundleError(
                f"native backend supports {', '.join(FAMILIES)}, not {arch['model_type']!r}"
            )
        if manifest.get("quantization", {}).get("quant") == "int8-dynamic":
            raise BundleError(
                f"{bundle}: an int8-dynamic bundle (ONNX Runtime dynamic quantization, "
                "MatMulInteger) runs on the ort backend only: load it with "
                "backend='ort' (edgetune run --backend ort)"
            )
        self.arch = arch
        self.threads = threads
        self.integer = integer  # Q4 projections through the FPGA's fixed-point datapath
        self.w = OnnxWeights(bundle / manifest["decoder"]["filename"])
        self.lin = self.w.linears()
        self.h = int(arch["hidden_size"])
        self.n_layers = int(arch["num_hidden_layers"])
        self.n_heads = int(arch["num_attention_heads"])
        self.n_kv = int(arch.get("num_key_value_heads") or self.n_heads)
        self.head_dim = int(arch.get("head_dim") or self.h // self.n_heads)
        self.eps = float(arch.get("rms_norm_eps", 1e-6))
        self.context = int(manifest["decoder"]["context_length"])
        window = arch.get("sliding_window")
        self.window = int(window) if window and arch["model_type"] in ("mistral",) else None
        self.rope = Rope(arch, self.head_dim)
        self.embed = self.w.embedding()  # fp32, or blocks dequantized per looked-up row
        self.norms = [
            (
                self.w.module_vector(f"model.layers.{i}.input_layernorm", self.h),
                self.w.module_vector(f"model.layers.{i}.post_attention_layernorm", self.h),
            )
            for i in range(self.n_layers)
        ]
        self.final_norm = self.w.module_vector("model.norm", self.h)
        if "lm_head" not in self.lin:  # a tied head the graph does not spell out: the table
            if not arch.get("tie_word_embeddings"):
                raise BundleError(
                    f"{bundle}: no lm_head projection found, and the model does "
                    "not tie its LM head to the embedding (tie_word_embeddings)"
                )
            self.lin["lm_head"] = self.embed.as_head()
        self.weight_bytes = unique_nbytes([*self.lin.values(), self.embed])
        self.fixed = {
            name: fx.fixed_scales(lin.q4)
            for name, lin in self.lin.items()
            if integer and lin.kind == "q4"
        }
        # each projection's GEMM bound once: weight checks and dispatch out of the token loop
        self.gemm = {
            name: kernels.prepare_q4_q8_gemm(lin.q4, threads)
            if lin.kind == "q4"
            else kernels.prepare_q8_f32_gemm(lin.q8_codes, lin.q8_scales, threads)
            for name, lin in self.lin.items()
            if lin.kind in ("q4", "q8")
        }

    # -- pieces -----------------------------------------------------------------------------

    def linear(self, x: np.ndarray, name: str, groups: Groups = ()) -> np.ndarray:
        """x (T, K) @ W of projection ``name`` (+ bias); ``groups``: (rows, adapter) whose
        low-rank update those rows get on top of the shared base weight."""
        lin: Linear = self.lin[name]
        if lin.kind == "q4" and self.integer:
            ws_fx, ws_frac = self.fixed[name]
            q4 = held(lin.q4)
            y = np.stack(
                [
                    fx.q4q8_gemv_fixed_fast(q4, ws_fx, ws_frac, fx.fixed_activation(row, q4.block))
                    for row in x
                ]
            ).astype(np.float32) / np.float32(2.0**fx.OUT_FRAC)
        elif lin.kind == "q8" and lin.int8_activations:
            y = self.gemm[name](q8_round_trip(x, held(lin.q8_codes).shape[2]))
        elif lin.kind in ("q4", "q8"):
            y = self.gemm[name](x)
        else:
            y = x @ lin.f32
        for rows, adapter in groups:
            upd = adapter.modules.get(name)
            if upd is not None:
                if isinstance(rows, slice):
                    upd.apply(y[rows], x[rows])
                else:
                    y[rows] = upd.apply(y[rows], x[rows])
        return y + lin.bias if lin.bias is not None else y

    def _qkv(self, i: int, x: np.ndarray, g: Groups):
        p = f"model.layers.{i}.self_attn"
        if f"{p}.qkv_proj" in self.lin:
            qkv = self.linear(x, f"{p}.qkv_proj", g)
            q_end = self.n_heads * self.head_dim
            kv_end = q_end + self.n_kv * self.head_dim
            return qkv[:, :q_end], qkv[:, q_end:kv_end], qkv[:, kv_end:]
        return (
            self.linear(x, f"{p}.q_proj", g),
            self.linear(x, f"{p}.k_proj", g),
            self.linear(x, f"{p}.v_proj", g),
        )

    def _mlp(self, i: int, x: np.ndarray, g: Groups) -> np.ndarray:
        p = f"model.layers.{i}.mlp"
        if f"{p}.gate_up_proj" in self.lin:
            gu = self.linear(x, f"{p}.gate_up_proj", g)
        else:
            gu = np.concatenate(
                [self.linear(x, f"{p}.gate_proj", g), self.linear(x, f"{p}.up_proj", g)], axis=1
            )
        return self.linear(kernels.swiglu(gu), f"{p}.down_proj", g)

    def _attend(
        self,
        i: int,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        cache: KVCache,
        start: int,
        rope: tuple[np.ndarray, np.ndarray],
    ) -> np.ndarray:
        """Attention of one sequence's t new positions (q, k, v: (t, heads x head_dim)) after
        its ``start`` cached ones, writing their keys and values into ``cache`` of layer i;
        (t, heads x head_dim) before o_proj."""
        t = q.shape[0]
        total = start + t
        if t == 1:  # decoding: one fused call (rotary, cache write, softmax, values)
            first = max(0, start - self.window + 1) if self.window else 0
            out = kernels.attention_decode(
                q.reshape(self.n_heads, self.head_dim),
                k.reshape(self.n_kv, self.head_dim),
                v.reshape(self.n_kv, self.head_dim),
                cache.k[i],
                cache.v[i],
                rope[0][0],
                rope[1][0],
                start,
                first,
                1.0 / math.sqrt(self.head_dim),
                self.threads,
            )
            return out.reshape(1, -1)
        pos = np.arange(start, total)
        q = self.rope.rotate(q.reshape(t, self.n_heads, self.head_dim).transpose(1, 0, 2), *rope)
        k = self.rope.rotate(k.reshape(t, self.n_kv, self.head_dim).transpose(1, 0, 2), *rope)
        cache.k[i, :, start:total] = k
        cache.v[i, :, start:total] = v.reshape(t, self.n_kv, self.head_dim).transpose(1, 0, 2)
        keys, vals = cache.k[i, :, :total], cache.v[i, :, :total]  # (kv, S, d)
        group = self.n_heads // self.n_kv
        qg = q.reshape(self.n_kv, group * t, self.head_dim)
        scores = (qg @ keys.transpose(0, 2, 1)).reshape(self.n_kv, group, t, total)
        scores *= np.float32(1.0 / math.sqrt(self.head_dim))
        qpos, kpos = pos[:, None], np.arange(total)[None, :]
        masked = kpos > qpos  # causal, and outside Mistral's sliding window
        if self.window:
            masked |= kpos <= qpos - self.window
        scores[:, :, masked] = -np.inf
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores, out=scores)
        p /= p.sum(axis=-1, keepdims=True)
        out = (p.reshape(self.n_kv, group * t, total) @ vals).reshape(
            self.n_heads, t, self.head_dim
        )
        return np.ascontiguousarray(out.transpose(1, 0, 2).reshape(t, self.n_heads * self.head_dim))

    # -- the decoder ------------------------------------------------------------------------

    def new_cache(self) -> KVCache:
        return KVCache(self.n_layers, self.n_kv, self.context, self.head_dim)

    def forward(
        self, input_ids: np.ndarray, past: KVCache | None = None, last_only: bool = False
    ) -> tuple[np.ndarray, KVCache]:
        """Logits (1, T, V) for ``input_ids`` (1, T) after ``past`` (``last_only``: (1, 1, V)
        of the last position, which is all generation needs: the LM head, the largest
        matrix, then runs once instead of T times); the cache grows in place."""
        if input_ids.shape[0] != 1:
            raise ValueError("the native backend's forward runs one sequence: use step()")
        cache = past if past is not None else self.new_cache()
        (logits,) = self.step([(input_ids[0], cache)], last_only=last_only)
        return logits[None], cache

    def step(
        self,
        batch: list[tuple[np.ndarray, KVCache]],
        last_only: bool = True,
        adapters: list | None = None,
    ) -> list[np.ndarray]:
        """One pass over several sequences: ``batch`` holds each sequence's new token ids
        (t_i,) and its own cache (any length, any position). Every projection runs once for
        all the new rows together (a GEMM of sum t_i rows: the weights are read once for the
        batch, where decode is bandwidth-bound), attention and the cache writes per sequence.
        Returns each sequence's logits, (t_i, V), or (1, V) of its last position with
        ``last_only``; each cache grows by t_i. Every row is computed exactly as alone (the
        kernels' outputs depend on their own row only), so a sequence gets the same tokens in
        a batch as by itself. ``adapters``: per sequence, a ``runtime.adapters.Adapter`` (or
        None for the base) whose low-rank updates its rows get."""
        if not batch:
            return []
        if adapters is not None and len(adapters) != len(batch):
            raise ValueError(f"{len(adapters)} adapters for {len(batch)} sequences")
        spans: list[tuple[int, int, int]] = []  # (first row, end row, cached positions)
        ropes: list[tuple[np.ndarray, np.ndarray]] = []
        ids_all: list[np.ndarray] = []
        row = 0
        for n, (ids, cache) in enumerate(batch):
            ids = np.asarray(ids, dtype=np.int64).reshape(-1)
            start = cache.length
            where = f"batch[{n}]: " if len(batch) > 1 else ""
            if ids.size == 0:
                raise ValueError(f"{where}no new tokens")
            if start + ids.size > self.context:
                raise ValueError(
                    f"{where}context of {self.context} tokens exceeded "
                    f"({start} cached + {ids.size} new)"
                )
            if any(cache is other for _, other in batch[:n]):
                raise ValueError(f"{where}a cache appears twice in one step")
            spans.append((row, row + ids.size, start))
            row += ids.size
            ropes.append(self.rope.tables(np.arange(start, start + ids.size), start + ids.size))
            ids_all.append(ids)
        x = np.ascontiguousarray(self.embed[np.concatenate(ids_all)], dtype=np.float32)
        g = adapter_groups(spans, adapters)
        for i, (n_in, n_post) in enumerate(self.norms):
            q, k, v = self._qkv(i, rms_norm(x, n_in, self.eps), g)
            att = [
                self._attend(i, q[a:b], k[a:b], v[a:b], cache, start, rope)
                for (a, b, start), (_, cache), rope in zip(spans, batch, ropes, strict=True)
            ]
            att_x = att[0] if len(att) == 1 else np.concatenate(att)
            x = x + self.linear(att_x, f"model.layers.{i}.self_attn.o_proj", g)
            x = x + self._mlp(i, rms_norm(x, n_post, self.eps), g)
        for (a, b, start), (_, cache) in zip(spans, batch, strict=True):
            cache.length = start + (b - a)
        if last_only:
            x = x[[b - 1 for _, b, _ in spans]]
            spans = [(j, j + 1, 0) for j in range(len(spans))]
            g = adapter_groups(spans, adapters)
        logits = self.linear(rms_norm(x, self.final_norm, self.eps), "lm_head", g)
        if last_only:
            return [logits[j : j + 1] for j in range(len(spans))]
        return [logits[a:b] for a, b, _ in spans]
