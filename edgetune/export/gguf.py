"""``export_gguf(model_dir, out, quant) -> FILE.gguf``: a merged model as one GGUF file for
llama.cpp, Ollama, LM Studio and llama-cpp-python, streamed tensor by tensor.

merged/ (safetensors) ─► plan (every tensor's GGUF name, type and byte size, from the
    headers alone) ─► header + metadata (architecture, tokenizer, chat template) ─►
    tensors, each read, transformed (llama.cpp's q/k row order for Llama/Mistral),
    quantized (``edgetune.kernels.ggml_quants`` / ``ggml_kquants``) and appended ─►
    FILE.gguf (renamed into place when complete)

Names and metadata are those llama.cpp's ``convert_hf_to_gguf.py`` writes for the family
(the ``gguf`` package's tables): Phi-3 keeps its fused ``attn_qkv`` / ``ffn_up`` and writes
longrope factors as ``rope_factors_long/short``; Llama and Mistral (arch ``llama``) get q/k
rows permuted to llama.cpp's interleaved rope; Qwen2 keeps its q/k/v biases; a tied
embedding writes no ``output`` tensor. Each tensor's type is the one ``llama-quantize``
gives it for ``quant`` (``gguf_types``: Q6_K heads, the _M mixtures' Q6_K layers, the
fallbacks for rows that are not whole blocks), and its bytes are the ones llama-quantize
writes from the same fp32 weights.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gguf
import numpy as np

from ..errors import ModelError, OutputExistsError
from ..files import temp_beside
from ..hub import hub_source
from ..kernels import ggml_kquants, ggml_quants
from ..models import check_model_dir, load_tokenizer
from ..tensors import SafetensorsSource
from .config import gguf_quant
from .families import Dims, expected_shapes
from .gguf_types import FILE_TYPES, tensor_types
from .gguf_vocab import add_vocab
from .modelfile import write_modelfile

T = gguf.GGMLQuantizationType
ARCH = {
    "phi3": gguf.MODEL_ARCH.PHI3,
    "llama": gguf.MODEL_ARCH.LLAMA,
    "mistral": gguf.MODEL_ARCH.LLAMA,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
}
CHUNK = 1 << 22  # values converted at a time (16 MiB of fp32)
QUANTIZE = {
    **ggml_quants.QUANTIZE,
    **{k: partial(f, fast=True) for k, f in ggml_kquants.QUANTIZE.items()},
}


@dataclass(frozen=True)
class Planned:
    """One GGUF tensor: its name, where its values come from, and how it is stored."""

    name: str  # blk.0.attn_qkv.weight
    shape: tuple[int, ...]  # numpy order (rows, row length)
    qtype: gguf.GGMLQuantizationType
    values: Callable[..., np.ndarray]  # (rows=None) -> fp32 rows in llama.cpp's layout

    @property
    def nbytes(self) -> int:
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def _rows(x: np.ndarray, rows=None) -> np.ndarray:
    return x if rows is None else x[rows[0] : rows[1]]


def stored(t: Planned) -> np.ndarray:
    """Tensor ``t`` as GGUF stores it, converted CHUNK values at a time: the fp32 source
    rows and the quantizer's temporaries stay small beside the (smaller) result."""
    if len(t.shape) == 1:
        return encode(t.values(), t.qtype)
    out = np.empty(_byte_shape(t), _np_dtype(t.qtype))
    step = max(1, CHUNK // t.shape[-1])
    for r0 in range(0, t.shape[0], step):
        r1 = min(r0 + step, t.shape[0])
        out[r0:r1] = encode(t.values((r0, r1)), t.qtype).reshape(r1 - r0, -1)
    return out


def encode(x: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """fp32 values -> the bytes (or fp array) GGUF stores for ``qtype``."""
    if qtype == T.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == T.F16:
        return x.astype(np.float16)
    if qtype == T.BF16:
        return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), T.BF16)
    return QUANTIZE[qtype.name](x.reshape(-1, x.shape[-1]))


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for the ``llama`` arch (its rope rotates adjacent pairs;
    Hugging Face's rotates halves): within each head, rows (i, i + d/2) become (2i, 2i+1)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def _rope_factors(cfg: dict, d: Dims) -> dict[str, np.ndarray]:
    """Extra rope tensors: Phi-3 longrope factors, Llama-3 rope_freqs; refuses what llama.cpp
    would read differently."""
    rs = cfg.get("rope_scaling") or {}
    kind = (rs.get("rope_type") or rs.get("type") or "").lower()
    if not kind or kind == "default":
        return {}
    if kind in ("longrope", "su") and d.family == "phi3":
        long_f, short_f = rs.get("long_factor"), rs.get("short_factor")
        half = int(cfg.get("partial_rotary_factor", 1.0) * d.hidden) // d.heads // 2
        if not long_f or not short_f or len(long_f) != half or len(short_f) != half:
            raise ModelError(f"config.json: rope_scaling needs {half} long and short factors")
        return {
            "rope_factors_long.weight": np.asarray(long_f, np.float32),
            "rope_factors_short.weight": np.asarray(short_f, np.float32),
        }
    if kind == "llama3" and d.family == "llama":
        base = float(cfg.get("rope_theta", 10000.0))
        dim = d.head_dim
        freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor = rs.get("factor", 8.0)
        low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old = rs.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / freqs
        smooth = (old / wavelen - low) / (high - low)
        f = np.where(
            wavelen < old / high,
            1.0,
            np.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth)),
        )
        return {"rope_freqs.weight": f.astype(np.float32)}
    if kind == "linear":
        return {}
    raise ModelError(
        f"config.json: rope_scaling type {kind!r} for {d.family} is not supported "
        "by the GGUF export"
    )


def gguf_name(name: str, tokens: set[str]) -> str:
    """general.name for ``name``: llama.cpp gives special rstrip rules to every model whose
    name contains "phi3" / "phi-3" and looks up ``</s>``, ``<unk>``, ``<s>`` and
    ``<|endoftext|>`` to do it, failing to load a vocabulary without them (edgetune's tiny
    model has none); such a name is spelled "phi_3" instead."""
    needed = {"</s>", "<unk>", "<s>", "<|endoftext|>"}
    if re.search(r"phi-?3", name, re.I) and not needed <= tokens:
        return re.sub(r"phi-?3", "phi_3", name, flags=re.I)
    return name


def _metadata(w: gguf.GGUFWriter, cfg: dict, d: Dims, quant: str, name: str) -> None:
    w.add_name(name)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(d.hidden)
    w.add_feed_forward_length(d.intermediate)
    w.add_block_count(d.layers)
    w.add_head_count(d.heads)
    w.add_head_count_kv(d.kv_heads)
    w.add_layer_norm_rms_eps(d.eps)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_file_type(FILE_TYPES[quant][0])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if "head_dim" in cfg and cfg["head_dim"]:
        w.add_key_length(d.head_dim)
        w.add_value_length(d.head_dim)
    rs = cfg.get("rope_scaling") or {}
    if (rs.get("rope_type") or rs.get("type")) == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    if d.family == "phi3":
        orig = int(cfg.get("original_max_position_embeddings") or cfg["max_position_embeddings"])
        w.add_rope_scaling_orig_ctx_len(orig)
        rot = float(cfg.get("partial_rotary_factor", 1.0))
        w.add_rope_dimension_count(int(rot * d.hidden) // d.heads)
        w.add_sliding_window(int(cfg.get("sliding_window") or 0))
        if rs and (rs.get("rope_type") or rs.get("type")) in ("longrope", "su"):
            scale = cfg["max_position_embeddings"] / orig
            w.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
            )
    elif d.family in ("llama", "mistral"):
        w.add_vocab_size(d.vocab)
        w.add_rope_dimension_count(d.head_dim)


def plan(src: SafetensorsSource, cfg: dict, d: Dims, quant: str) -> list[Planned]:
    """Every tensor of the GGUF in file order, from the checkpoint's headers alone."""
    shapes = expected_shapes(d)
    for hf, shape in shapes.items():
        src.expect(hf, shape)
    names = gguf.get_tensor_name_map(ARCH[d.family], d.layers)
    out = [
        Planned(k, v.shape, T.F32, partial(np.asarray, v)) for k, v in _rope_factors(cfg, d).items()
    ]
    permute = d.family in ("llama", "mistral")
    tensors = []
    for hf, shape in shapes.items():
        base, _, suffix = hf.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None:
            raise ModelError(f"tensor {hf!r} has no GGUF name for {d.family}")
        gname = f"{mapped}.{suffix}"
        heads = (d.heads if ".q_proj." in hf else d.kv_heads) if permute else 0

        def values(rows=None, hf=hf, heads=heads) -> np.ndarray:
            if heads and (".q_proj." in hf or ".k_proj." in hf):  # rows move across the tensor
                x = _permute(src.array(hf), heads)
                return x if rows is None else x[rows[0] : rows[1]]
            return src.array(hf, rows)

        tensors.append((gname, shape, values))
    types = tensor_types([(n, s) for n, s, _ in tensors], quant, d.layers)
    return out + [Planned(n, s, t, v) for (n, s, v), t in zip(tensors, types, strict=True)]


def export_gguf(
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    quant: str = "q8_0",
    force: bool = False,
    log=print,
    report: bool = False,
    eval_data: str | None = None,
    eval_tokens: int = 2048,
) -> Path:
    """Write ``model_dir`` (a merged HF model dir) as one GGUF file at ``out``; returns it.

    Holds one tensor at a time; the file is written beside ``out`` under a temporary name
    and renamed when complete, so a failure leaves nothing behind. With ``report``,
    llama.cpp then scores the file against the fp32 checkpoint (``gguf_report``) into
    ``FILE.report.json``."""
    quant = gguf_quant(quant)
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: output exists (use --force to replace it)")
    cfg = check_model_dir(model_dir)
    d = Dims.of(cfg)
    src = SafetensorsSource(model_dir)
    tensors = plan(src, cfg, d, quant)  # every check happens before a byte is written
    tokenizer = load_tokenizer(model_dir)
    template = tokenizer.chat_template
    hub = hub_source(model_dir)  # a Hub snapshot: named after its repo, not its commit
    name = hub["repo_id"].rpartition("/")[2] if hub else model_dir.name
    fd, tmp = temp_beside(out)
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[ARCH[d.family]])
        _metadata(w, cfg, d, quant, gguf_name(name, set(tokenizer.get_vocab())))
        add_vocab(w, model_dir, d.vocab, tokenizer, template)
        for t in tensors:
            w.add_tensor_info(t.name, _byte_shape(t), _np_dtype(t.qtype), t.nbytes, t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            w.write_tensor_data(stored(t))
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    from . import eos_ids

    mf = write_modelfile(out, tokenizer, eos_ids(model_dir, tokenizer), model_dir)
    log(f"{out}: {len(tensors)} tensors, {quant}, {out.stat().st_size / 2**20:.1f} MiB")
    log(f"Ollama: ollama create {_ollama_name(out.stem)} -f {mf}")
    if report:
        from .gguf_report import format_gguf_report, gguf_report, write_report

        counts: dict[str, int] = {}
        for t in tensors:
            counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
        r = {
            "quant": quant,
            "tensor_types": counts,
            "file_bytes": out.stat().st_size,
            **({"source": hub} if hub else {}),
            **gguf_report(model_dir, out, eval_data, eval_tokens),
        }
        write_report(out, r)
        log(format_gguf_report(r))
    return out


def _ollama_name(stem: str) -> str:
    """A model name Ollama accepts (lowercase letters, digits, '-', '_', '.')."""
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.") or "model"


def _np_dtype(qtype: gguf.GGMLQuantizationType) -> np.dtype:
    if qtype == T.F32:
        return np.dtype(np.float32)
    return np.dtype(np.float16) if qtype == T.F16 else np.dtype(np.uint8)


def _byte_shape(t: Planned) -> tuple[int, ...]:
    """The array shape ``write_tensor_data`` receives: elements for F32/F16, bytes per row
    for block types and BF16 (which the ``gguf`` package stores as raw uint8)."""
    if t.qtype in (T.F32, T.F16):
        return t.shape
    block, size = gguf.GGML_QUANT_SIZES[t.qtype]
    return (*t.shape[:-1], t.shape[-1] // block * size)
