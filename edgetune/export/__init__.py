"""``export(model_dir, out, cfg) -> bundle``: a streamed ONNX decoder with quantized
weights, a parity report, and a self-describing bundle written atomically.

merged/ (safetensors) ─► source (one tensor at a time, ``edgetune.tensors``)
    ─► graph builder (the family's ops, ``graph.py``) ─► quantizer (per projection,
    ``quantize.py`` / ``hqq.py`` / ``gptq.py``) ─► writer (``writer.py``: appends to
    model.onnx.data) ─► report (layer by layer, ``report.py``) ─► bundle/

weights: int4 MatMulNBits blocks by rtn / hqq / gptq, 8-bit MatMulNBits blocks, or ONNX
Runtime dynamic quantization (``int8_dynamic.py``, which rewrites a whole fp32 model and so
does not stream); embedding: fp32, or GatherBlockQuantized int8/int4 on request.
The graph's inputs, outputs and node names are those of Optimum's export
(``onnx_export.py``, kept as the tests' reference).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import onnx

from ..bundle import commit_dir, file_table, write_manifest
from ..errors import ConfigError, OutputExistsError
from ..hub import hub_source
from ..models import check_model_dir, load_tokenizer, weights_sha256
from .config import ExportConfig
from .int8_dynamic import INT8_KIND, quantize_int8_dynamic
from .quantize import QuantSummary, quantize_weights
from .report import eval_texts, format_report, fp32_weight_bytes, parity_report
from .stream import DecoderWriter

__all__ = ["ExportConfig", "export"]

DECODER = "model.onnx"
DECODER_DATA = "model.onnx.data"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)


def budget(token_lists: list[list[int]], tokens: int) -> list[list[int]]:
    """The first sequences up to ``tokens`` tokens in all (the last one cut; none shorter
    than 2 tokens, which score nothing)."""
    out, left = [], tokens
    for ids in token_lists:
        if left < 2:
            break
        if len(ids) >= 2:
            out.append(ids[:left])
            left -= len(out[-1])
    return out


def _save_onnx(model: onnx.ModelProto, path: Path) -> None:
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DECODER_DATA,
        size_threshold=1024,
    )


def _architecture(cfg: dict) -> dict:
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "original_max_position_embeddings",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "partial_rotary_factor",
        "sliding_window",
        "tie_word_embeddings",
        "hidden_act",
    )
    return {"model_type": cfg["model_type"], **{k: cfg[k] for k in keys if k in cfg}}


def genai_config(cfg: dict, tokenizer, context: int) -> dict:
    """onnxruntime-genai's genai_config.json for the bundle's decoder."""
    heads = cfg["num_attention_heads"]
    gen_eos = cfg.get("eos_token_id")
    eos = (
        gen_eos
        if isinstance(gen_eos, list)
        else [gen_eos if gen_eos is not None else tokenizer.eos_token_id]
    )
    return {
        "model": {
            "bos_token_id": cfg.get("bos_token_id", tokenizer.bos_token_id),
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": DECODER,
                "head_size": cfg.get("head_dim") or cfg["hidden_size"] // heads,
                "hidden_size": cfg["hidden_size"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": heads,
                "num_hidden_layers": cfg["num_hidden_layers"],
                "num_key_value_heads": cfg.get("num_key_value_heads", heads),
            },
            "eos_token_id": eos,
            "pad_token_id": cfg.get("pad_token_id") or tokenizer.pad_token_id,
            "type": cfg["model_type"],
            "vocab_size": cfg["vocab_size"],
        },
        "search": {
            "do_sample": False,
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def eos_ids(model_dir: Path, tokenizer) -> list[int]:
    gen = model_dir / "generation_config.json"
    ids = []
    if gen.is_file():
        e = json.loads(gen.read_text()).get("eos_token_id")
        ids = e if isinstance(e, list) else ([e] if e is not None else [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def quantization_spec(cfg: ExportConfig, calibration: dict | None = None) -> dict:
    """What the manifest and report record: only the settings the bundle was built with."""
    spec: dict = {"quant": cfg.quant}
    if cfg.quant == "int4":
        spec.update(
            algo=cfg.algo,
            block_size=cfg.block_size,
            symmetric=cfg.symmetric,
            accuracy_level=cfg.accuracy_level,
            lm_head=cfg.lm_head,
        )
        if calibration:
            spec["calibration"] = calibration
    elif cfg.quant == "int8":
        spec.update(block_size=cfg.block_size, accuracy_level=cfg.accuracy_level)
    elif cfg.quant == "int8-dynamic":
        spec.update(int8=INT8_KIND, lm_head=cfg.lm_head)
    spec["embedding"] = cfg.embedding
    if cfg.embedding != "fp32":
        spec["embedding_block"] = {
            "block_size": cfg.block_size,
            "symmetric": cfg.symmetric or cfg.embedding == "int8",
            "op": "com.microsoft.GatherBlockQuantized",
        }
    return spec


def _decoder(model_dir: Path, bundle: Path, work: Path, cfg: ExportConfig, log):
    """Write the bundle's decoder; returns (QuantSummary, calibration, embedding note)."""
    calibration, gptq = None, None
    if cfg.algo == "gptq":
        from .gptq import GptqDriver

        gptq = GptqDriver.start(model_dir, cfg, log)
        calibration = gptq.calibration
    if cfg.quant == "int8-dynamic":  # ORT's quantize_dynamic rewrites a whole fp32 model
        fp32 = work / "fp32"
        fp32.mkdir()
        res = DecoderWriter(model_dir, cfg).write(fp32, DECODER, DECODER_DATA, cfg.opset)
        model = quantize_int8_dynamic(onnx.load(str(fp32 / DECODER)), work)
        head = quantize_weights(model, cfg)  # what is left: the LM head, per --lm-head
        shutil.rmtree(fp32)
        _save_onnx(model, bundle / DECODER)
        summary = QuantSummary(
            {
                "int8-dynamic": sum(n.op_type == "MatMulInteger" for n in model.graph.node),
                **head.quantized,
            },
            head.kept,
        )
        return summary, None, res.embedding
    res = DecoderWriter(model_dir, cfg, gptq).write(bundle, DECODER, DECODER_DATA, cfg.opset)
    if gptq is not None:
        gptq.finish()
    return QuantSummary(res.quantized, res.kept), calibration, res.embedding


def export(
    model_dir: str | Path,
    out: str | Path,
    cfg: ExportConfig | None = None,
    force: bool = False,
    log=print,
) -> Path:
    """Export a merged HF model dir into a bundle at ``out``; returns ``out``.

    Streams: tensors are read one at a time from the checkpoint and written to the bundle
    as they are quantized (``stream.py``); the report runs the model layer by layer."""
    cfg = cfg or ExportConfig()
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: output exists (use --force to replace it)")
    if cfg.calib_data and not Path(cfg.calib_data).is_file():
        raise ConfigError(f"{cfg.calib_data}: calibration data not found")
    hf_cfg = check_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir)
    texts = eval_texts(tokenizer, cfg.eval_data)
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        bundle = work / "bundle"
        bundle.mkdir()
        summary, calibration, embedding_note = _decoder(model_dir, bundle, work, cfg, log)
        for name in TOKENIZER_FILES:
            if (model_dir / name).is_file():
                shutil.copy(model_dir / name, bundle / name)
        context = int(hf_cfg.get("max_position_embeddings", 2048))
        (bundle / "genai_config.json").write_text(
            json.dumps(genai_config(hf_cfg, tokenizer, context), indent=2) + "\n"
        )

        token_lists = budget(
            [tokenizer(t, add_special_tokens=False)["input_ids"][:context] for t in texts],
            cfg.eval_tokens,
        )
        report = {
            "quantization": quantization_spec(cfg, calibration),
            **parity_report(model_dir, bundle / DECODER, token_lists, cfg),
        }
        report["matmuls_quantized"] = summary.quantized
        report["kept_fp32"] = summary.kept
        if embedding_note:
            report["embedding"] = embedding_note
        report["fp32_weight_bytes"] = fp32_weight_bytes(model_dir)
        report["eval_texts"] = len(token_lists)
        report["file_bytes"] = {k: v["bytes"] for k, v in file_table(bundle).items()}
        report["export_seconds"] = round(time.perf_counter() - t0, 2)
        (bundle / "report.json").write_text(json.dumps(report, indent=2) + "\n")

        tok_cfg = (
            json.loads((bundle / "tokenizer_config.json").read_text())
            if (bundle / "tokenizer_config.json").is_file()
            else {}
        )
        write_manifest(
            bundle,
            {
                "producer": "edgetune",
                # a model from the Hub cache: its repo id and commit too
                "source": {
                    "weights_sha256": weights_sha256(model_dir),
                    **(hub_source(model_dir) or {}),
                },
                "architecture": _architecture(hf_cfg),
                "quantization": report["quantization"],
                "decoder": {
                    "filename": DECODER,
                    "external_data": DECODER_DATA,
                    "context_length": context,
                    "inputs": "input_ids, attention_mask, position_ids, past_key_values.%d.key/value",
                    "kv_layout": "(batch, kv_heads, seq, head_dim)",
                },
                "tokenizer": {
                    "file": "tokenizer.json",
                    "eos_token_ids": eos_ids(model_dir, tokenizer),
                    "bos_token_id": tokenizer.bos_token_id,
                    "chat_template": tokenizer.chat_template or tok_cfg.get("chat_template"),
                    # what apply_chat_template hands the template besides the messages
                    "special_tokens": dict(tokenizer.special_tokens_map),
                },
                "report": {k: report[k] for k in ("onnx_vs_torch", "quant_vs_fp32") if k in report},
            },
        )
        log(format_report(report))
        commit_dir(bundle, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out
