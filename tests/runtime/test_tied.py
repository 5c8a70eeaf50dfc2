"""Tied LM heads (Qwen2.5-0.5B/1.5B, Llama-3.2-1B/3B): both backends decode them alike.

Bundles come from ``edgetune.export``; a tied head then reaches the runtime as an fp32 MatMul
over the transposed embedding table, as an explicit 8-bit MatMulNBits head, or not at all
(the native backend then multiplies by the embedding table itself, whatever its format).
"""

import shutil
import tracemalloc

import numpy as np
import pytest

from edgetune.errors import BundleError
from edgetune.models import copy_tokenizer
from edgetune.runtime import Model, SamplingConfig

PROMPTS = [np.random.default_rng(s).integers(6, 2000, 12).tolist() for s in range(4)]
CFG = SamplingConfig(max_new_tokens=16)


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory, family_config, tiny_model):
    """family -> (model dir, PyTorch model): a tiny random model with a tied head. Weights
    at std 0.2, so greedy decoding does not just repeat the prompt's last token; norm weights
    away from 1, as a trained model's (with all-ones norms an int4 embedding's rows put
    int8 activations on exact rounding ties, which ORT, scaling by 127/amax, and edgetune's
    kernels, by 1/(amax/127), round apart)."""
    import torch
    from transformers import AutoModelForCausalLM

    made = {}

    def make(family: str):
        if family not in made:
            cfg = family_config(family)
            cfg.tie_word_embeddings, cfg.initializer_range = True, 0.2
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg).eval()
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.uniform_(0.8, 1.2)
            d = tmp_path_factory.mktemp(f"tied-{family}")
            model.save_pretrained(d)
            copy_tokenizer(tiny_model, d)
            made[family] = d, model
        return made[family]

    return make


@pytest.fixture(scope="module")
def tied_bundle(tmp_path_factory, tied_model):
    """(family, quant, embedding) -> the tied model's bundle, exported once."""
    from edgetune.export import ExportConfig, export

    made = {}

    def make(family: str, quant: str, embedding: str):
        key = family, quant, embedding
        if key not in made:
            out = tmp_path_factory.mktemp("tied") / "-".join(key)
            made[key] = export(
                tied_model(family)[0],
                out,
                ExportConfig(quant=quant, embedding=embedding, report_tokens=2),
                log=lambda s: None,
            )
        return made[key]

    return make


def greedy(model: Model) -> list[list[int]]:
    return [list(model.generate_ids(p, CFG)) for p in PROMPTS]


def same_storage(a: np.ndarray, b: np.ndarray) -> bool:
    return a.__array_interface__["data"][0] == b.__array_interface__["data"][0]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_tied_fp32_bundle_decodes_as_pytorch_on_both_backends(family, tied_model, tied_bundle):
    import torch

    bundle = tied_bundle(family, "none", "fp32")
    native = Model.load(bundle, backend="native")
    want = []
    with torch.no_grad():
        for p in PROMPTS:
            out = (
                tied_model(family)[1]
                .generate(
                    torch.tensor([p]),
                    max_new_tokens=CFG.max_new_tokens,
                    do_sample=False,
                    eos_token_id=native.eos_ids,
                    pad_token_id=1,
                )[0, len(p) :]
                .tolist()
            )
            want.append(out[:-1] if out and out[-1] in native.eos_ids else out)
    assert len({t for w in want for t in w}) > 16  # decodes text, not one repeated token
    assert greedy(native) == want
    assert greedy(Model.load(bundle, backend="ort")) == want
    dec = native.decoder  # the head reads the bundle's bytes in place, each counted once
    head = dec.lin["lm_head"]
    assert any(np.may_share_memory(head.f32, m) for m in dec.w._maps.values())
    assert dec.weight_bytes <= (bundle / "model.onnx.data").stat().st_size
    x = np.ones((1, dec.h), np.float32)
    tracemalloc.start()
    dec.linear(x, "lm_head")  # x @ table.T on the transposed view: no (H, V) copy
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < head.nbytes / 8


@pytest.mark.parametrize(
    "family,embedding", [("qwen2", "fp32"), ("qwen2", "int8"), ("qwen2", "int4"), ("llama", "int4")]
)
def test_tied_int4_bundle_decodes_as_ort(family, embedding, tied_bundle):
    bundle = tied_bundle(family, "int4", embedding)
    native = Model.load(bundle, backend="native")
    assert native.decoder.embed.kind == {"fp32": "f32", "int8": "q8", "int4": "q4"}[embedding]
    assert greedy(native) == greedy(Model.load(bundle, backend="ort"))


def _with_int8_head(bundle, out):
    """``bundle`` with its tied head rewritten as the exporter's future explicit one: an
    8-bit MatMulNBits over the quantized table; returns ``out``."""
    import onnx
    from onnx import helper, numpy_helper

    from edgetune import kernels
    from edgetune.bundle import MANIFEST, read_manifest, write_manifest

    model = onnx.load(str(bundle / "model.onnx"))
    graph = model.graph
    head = next((n for n in graph.node if n.op_type == "MatMul" and n.output[0] == "logits"), None)
    transpose = next(
        (
            n
            for n in graph.node
            if head and n.output[0] == head.input[1] and n.op_type == "Transpose"
        ),
        None,
    )
    if transpose is None:  # the exporter writes an explicit head already
        return bundle
    shutil.copytree(bundle, out)
    for name in ("model.onnx.data", MANIFEST):
        (out / name).unlink()
    table = next(
        numpy_helper.to_array(t) for t in graph.initializer if t.name == transpose.input[0]
    )
    vocab, hidden = table.shape
    codes, scales = kernels.q8_weight_quantize(np.ascontiguousarray(table.T), 32)
    graph.initializer.extend(
        [
            numpy_helper.from_array(codes, "lm_head.weight_Q8"),
            numpy_helper.from_array(scales.reshape(-1), "lm_head.weight_scales"),
        ]
    )
    new = helper.make_node(
        "MatMulNBits",
        [head.input[0], "lm_head.weight_Q8", "lm_head.weight_scales"],
        list(head.output),
        name="/lm_head/MatMul_Q8",
        domain="com.microsoft",
        K=hidden,
        N=vocab,
        bits=8,
        block_size=32,
        accuracy_level=4,
    )
    at = list(graph.node).index(head)
    graph.node.remove(head)
    graph.node.remove(transpose)
    graph.node.insert(at - 1, new)
    onnx.save_model(
        model,
        str(out / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    manifest = read_manifest(bundle)
    write_manifest(out, {k: v for k, v in manifest.items() if k not in ("files", "format_version")})
    return out


def test_tied_bundle_with_an_explicit_int8_head_decodes_as_ort(tied_bundle, tmp_path):
    bundle = _with_int8_head(tied_bundle("qwen2", "int4", "int8"), tmp_path / "b")
    native = Model.load(bundle, backend="native")
    assert native.decoder.lin["lm_head"].kind == "q8"
    assert greedy(native) == greedy(Model.load(bundle, backend="ort"))


@pytest.mark.parametrize("embedding,bound", [("fp32", 1e-5), ("int8", 1e-5), ("int4", 0.02)])
def test_embedding_table_is_the_head_when_the_graph_has_none(
    embedding, bound, tied_bundle, monkeypatch
):
    """With no head in the graph the native backend multiplies by the table as stored (fp32,
    or 8/4-bit blocks through the MatMulNBits kernels, in place): logits as with an fp32 head
    of the table's dequantized rows (the 4-bit kernel rounds activations to int8: measured
    0.006 of the largest logit; fp32 and 8-bit: < 1e-6)."""
    from edgetune.bundle import read_manifest
    from edgetune.runtime.native import NativeDecoder
    from edgetune.runtime.weights import Linear, OnnxWeights

    bundle = tied_bundle("qwen2", "int4", embedding)
    linears = OnnxWeights.linears
    monkeypatch.setattr(
        OnnxWeights,
        "linears",
        lambda self: {k: v for k, v in linears(self).items() if k != "lm_head"},
    )
    manifest = read_manifest(bundle)
    dec, ref = NativeDecoder(bundle, manifest), NativeDecoder(bundle, manifest)
    head, table = dec.lin["lm_head"], dec.embed
    stored = {
        "f32": (head.f32, table.f32),
        "q8": (head.q8_codes, table.q8_codes),
        "q4": (getattr(head.q4, "packed", None), getattr(table.q4, "packed", None)),
    }
    assert head.kind == table.kind and same_storage(*stored[table.kind])
    vocab, hidden = table.shape  # the rows as the lookup dequantizes them, as an fp32 head:
    ref.lin["lm_head"] = Linear("f32", hidden, vocab, f32=table[np.arange(vocab)].T)
    logits = np.concatenate([dec.forward(np.array([p]))[0] for p in PROMPTS])
    want = np.concatenate([ref.forward(np.array([p]))[0] for p in PROMPTS])
    assert np.abs(logits - want).max() <= bound * np.abs(want).max()
    untied = {
        **manifest,
        "architecture": {**manifest["architecture"], "tie_word_embeddings": False},
    }
    with pytest.raises(BundleError, match="no lm_head"):
        NativeDecoder(bundle, untied)
