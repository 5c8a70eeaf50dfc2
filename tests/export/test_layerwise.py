"""The model run layer by layer from its safetensors (``export/layerwise.py``) is Hugging
Face's model: logits equal ``AutoModelForCausalLM``'s for every family (sliding windows,
Phi-3's long rope, tied heads, weight overrides), its memory is flat in the number of
layers, and sequential GPTQ driven layer by layer beats round-to-nearest."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from edgetune import kernels
from edgetune.export.config import ExportConfig
from edgetune.export.gptq import (
    GptqCalibration,
    GptqDriver,
    calibration_rows,
    calibration_texts,
    collect_hessians,
    gptq_quantize,
)
from edgetune.export.layerwise import Layerwise, greedy, logits, parity
from edgetune.export.report import eval_texts
from edgetune.export.scores import log_softmax
from edgetune.tensors import SafetensorsSource

REL = 1e-5


def _save(cfg, path, seed=0):
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def _hf_logits(model_dir, seqs, **params):
    """HF's eager fp32 model on each sequence (``params``: name -> replacement weight)."""
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        for name, w in params.items():
            model.get_parameter(name).copy_(torch.from_numpy(w))
        return [model(torch.tensor([s])).logits[0].numpy() for s in seqs]


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _seqs(lengths, vocab=2048, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


# -- equal to the HF model ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3"])
def test_logits_equal_hf_per_family(family, family_model):
    d = family_model(family)
    seqs = _seqs((1, 7, 50, 300, 250))  # packed into rows [1, 7, 50] [300] [250]
    for got, ref in zip(logits(d, seqs), _hf_logits(d, seqs), strict=True):
        assert got.shape == ref.shape and _rel(got, ref) < REL


def test_logits_equal_hf_on_the_shipped_model(tiny_model, tiny_tokenizer):
    seqs = [
        tiny_tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in eval_texts(tiny_tokenizer, None, 3)
    ]
    for got, ref in zip(logits(tiny_model, seqs), _hf_logits(tiny_model, seqs), strict=True):
        assert _rel(got, ref) < REL


@pytest.mark.parametrize(
    "family,change,length",
    [
        ("mistral", {"sliding_window": 8}, 40),  # every layer windowed
        (
            "qwen2",
            {
                "use_sliding_window": True,
                "sliding_window": 8,  # layer 1 of 2 windowed
                "max_window_layers": 1,
            },
            40,
        ),
        ("phi3", {"sliding_window": 8}, 40),  # HF's Phi-3 applies it too
        ("phi3", {}, 300),  # past original_max_position_embeddings 256: longrope's long factors
    ],
)
def test_windows_and_long_rope_as_hf(family, change, length, family_config, tmp_path):
    """Each feature changes HF's logits (so it is exercised) and ours follow HF."""
    cfg = family_config(family)
    for k, v in change.items():
        setattr(cfg, k, v)
    if family == "qwen2":
        cfg.layer_types = ["full_attention", "sliding_attention"]
    d = _save(cfg, tmp_path / "m")
    (seq,) = _seqs((length,))
    seqs = [seq, seq[:30]]
    got, ref = list(logits(d, seqs)), _hf_logits(d, seqs)
    for g, r in zip(got, ref, strict=True):
        assert _rel(g, r) < REL
    if family == "phi3" and not change:  # the first 30 positions: long factors differ from short
        assert _rel(ref[0][:30], ref[1]) > 1e-3
    else:
        plain = family_config(family)
        assert getattr(plain, "sliding_window", None) is None
        d2 = _save(plain, tmp_path / "plain")
        assert _rel(_hf_logits(d2, seqs[:1])[0], ref[0]) > 1e-3


def test_tied_head_and_overrides_as_hf(family_config, tmp_path):
    """A tied head reads the embedding; overrides of a projection, the embedding and the head
    (HF layout, (out, in)) act as if the checkpoint held them."""
    cfg = family_config("llama")
    cfg.tie_word_embeddings = True
    d = _save(cfg, tmp_path / "tied")
    seqs = _seqs((20, 5))
    for g, r in zip(logits(d, seqs), _hf_logits(d, seqs), strict=True):
        assert _rel(g, r) < REL
    cfg.tie_word_embeddings = False
    d = _save(cfg, tmp_path / "untied")
    src = SafetensorsSource(d)
    rng = np.random.default_rng(3)
    swap = {
        n: (src.array(n) * rng.uniform(0.5, 1.5, src.info(n).shape)).astype(np.float32)
        for n in (
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.embed_tokens.weight",
            "lm_head.weight",
        )
    }
    asked = []
    got = list(logits(d, seqs, lambda n: asked.append(n) or swap.get(n)))
    for g, r in zip(got, _hf_logits(d, seqs, **swap), strict=True):
        assert _rel(g, r) < REL
    assert set(swap) <= set(asked) and "model.norm.weight" in asked


def test_parity_metrics_and_greedy_as_hf(family_model):
    """parity's numbers are quant_vs_fp32's definitions applied to HF's logits of the two
    models; greedy decodes HF's argmax tokens; an empty override is a perfect match."""
    d = family_model("qwen2")
    src = SafetensorsSource(d)
    rng = np.random.default_rng(4)
    noisy = {
        n: (src.array(n) + 0.02 * rng.standard_normal(src.info(n).shape)).astype(np.float32)
        for n in src.names()
        if n.endswith("proj.weight") or n == "lm_head.weight"
    }
    seqs = _seqs((12, 30, 2))
    res = parity(d, seqs, noisy)
    ref_f, ref_q = _hf_logits(d, seqs), _hf_logits(d, seqs, **noisy)
    agree = kl = nll_f = nll_q = 0.0
    for ids, lf, lq in zip(seqs, ref_f, ref_q, strict=True):
        pf, pq, t = log_softmax(lf[:-1]), log_softmax(lq[:-1]), np.array(ids[1:])
        agree += (lf[:-1].argmax(-1) == lq[:-1].argmax(-1)).sum()
        kl += (np.exp(pf) * (pf - pq)).sum()
        nll_f -= pf[np.arange(len(t)), t].sum()
        nll_q -= pq[np.arange(len(t)), t].sum()
    n = sum(len(s) - 1 for s in seqs)
    m = res.metrics
    assert m["tokens"] == n and m["top1_agreement"] == pytest.approx(agree / n, abs=1e-9)
    assert m["kl_mean"] == pytest.approx(kl / n, rel=1e-4) and m["kl_mean"] > 1e-4
    assert m["ppl_fp32"] == pytest.approx(np.exp(nll_f / n), rel=1e-5)
    assert m["ppl_quant"] == pytest.approx(np.exp(nll_q / n), rel=1e-5)
    assert m["ppl_change"] == pytest.approx(m["ppl_quant"] / m["ppl_fp32"] - 1, rel=1e-9)
    assert _rel(res.fp32_logits, ref_f[0]) < REL and _rel(res.quant_logits, ref_q[0]) < REL
    same = parity(d, seqs, {}).metrics
    assert same["top1_agreement"] == 1.0 and abs(same["kl_mean"]) < 1e-9
    assert same["ppl_change"] == 0.0

    model = AutoModelForCausalLM.from_pretrained(str(d), attn_implementation="eager").eval()
    prompt, seq = seqs[1][:10], list(seqs[1][:10])
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert greedy(d, prompt, 6) == seq[10:]


# -- memory: one layer at a time -----------------------------------------------------------

_CHILD = """
import json, sys, numpy as np
from edgetune.export.layerwise import parity
from edgetune.tensors import SafetensorsSource
d = sys.argv[1]
src = SafetensorsSource(d)
scaled = lambda n: src.array(n) * 1.01 if n.endswith("proj.weight") else None
seqs = [list(np.random.default_rng(i).integers(0, 2048, 32)) for i in range(3)]
m = parity(d, seqs, scaled).metrics
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"hwm_kb": hwm, "tokens": m["tokens"]}))
"""


def test_parity_peak_memory_flat_in_layers(family_config, tmp_path):
    """Peak RSS of parity (two streams, an override per projection) on 6 layers exceeds that
    on 2 by less than one layer's fp32 weights (16.8 MB here): layers are not kept."""
    children, layer_bytes = {}, None
    for n in (2, 6):
        cfg = LlamaConfig(
            **{
                **family_config("llama").to_diff_dict(),
                "hidden_size": 512,
                "intermediate_size": 2048,
                "num_hidden_layers": n,
                "num_attention_heads": 8,
                "num_key_value_heads": 8,
                "head_dim": 64,
            }
        )
        d = _save(cfg, tmp_path / f"l{n}")
        src = SafetensorsSource(d)
        layer_bytes = sum(
            src.info(t).nbytes for t in src.names() if t.startswith("model.layers.0.")
        )
        children[n] = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(d)],
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    peaks = {}
    for n, child in children.items():  # both at once: most of each is importing torch
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err
        res = json.loads(out.strip().splitlines()[-1])
        assert res["tokens"] == 3 * 31
        peaks[n] = res["hwm_kb"] * 1024
    assert layer_bytes > 16e6
    print(
        f"peak RSS: 2 layers {peaks[2] / 1e6:.1f} MB, 6 layers {peaks[6] / 1e6:.1f} MB; "
        f"a layer {layer_bytes / 1e6:.1f} MB"
    )
    assert peaks[6] - peaks[2] < layer_bytes, (peaks, layer_bytes)


# -- sequential GPTQ -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calib_rows(tiny_model, tiny_tokenizer):
    return calibration_rows(tiny_tokenizer, calibration_texts(tiny_tokenizer, None), 1024)


def test_layer0_hessians_equal_collect_hessians(tiny_model, tiny_tokenizer, calib_rows):
    """Layer 0 sees the embeddings in both: the layer-by-layer sums equal the whole-model
    hooks' (fp64 there, fp32 here)."""
    from edgetune.models import load_model

    rows, used = calib_rows
    g = GptqCalibration(tiny_model, rows)
    assert g.tokens == used
    ours = g.hessians(0)
    names = {n.removesuffix(".weight") for n in ours}
    ref, ref_used = collect_hessians(
        load_model(tiny_model).eval(),
        tiny_tokenizer,
        calibration_texts(tiny_tokenizer, None),
        names,
        1024,
    )
    assert ref_used == used and len(ours) == 4
    for name, h in ours.items():
        r = ref[name.removesuffix(".weight")]
        assert h.shape == r.shape and _rel(h, r) < 1e-5
    with pytest.raises(ValueError, match="out of order"):
        g.hessians(1)


def test_sequential_gptq_beats_rtn(tiny_model, tiny_tokenizer, calib_rows):
    """GPTQ driven as the streaming exporter drives it (enter / hessian / quantized, layer
    order), scored by parity on held-out text: KL and |ppl change| no worse than RTN's."""
    src = SafetensorsSource(tiny_model)
    lw = Layerwise(tiny_model)
    names = [n for i in range(lw.n_layers) for n in lw.linear_names(i)]
    evals = [
        tiny_tokenizer(t, add_special_tokens=False)["input_ids"]
        for t in eval_texts(tiny_tokenizer, None, 12)
    ]
    deq = lambda q: np.ascontiguousarray(kernels.q4_dequantize(q).T)  # noqa: E731 (out, in)
    rtn = {n: deq(kernels.q4_quantize(src.array(n).T, 32, True)) for n in names}
    cfg = ExportConfig(algo="gptq", calib_tokens=1024)
    drv = GptqDriver.start(tiny_model, cfg, log=lambda s: None)
    assert drv.calibration["tokens"] == calib_rows[1] and drv.calibration["sequential"]
    gptq = {}
    for n in names:
        module = n.removesuffix(".weight")
        drv.enter(module)
        q = gptq_quantize(src.array(n).T, drv.hessian(module), 32, True, damp=cfg.gptq_damp)
        drv.quantized(module, q)
        gptq[n] = deq(q)
    drv.finish()
    r, g = parity(tiny_model, evals, rtn).metrics, parity(tiny_model, evals, gptq).metrics
    assert g["kl_mean"] < r["kl_mean"]
    assert abs(g["ppl_change"]) <= abs(r["ppl_change"]) + 2e-3
    assert g["top1_agreement"] >= r["top1_agreement"]


def test_driver_factors_a_shared_input_once(family_model):
    """Llama's q/k/v (and gate/up) read one input: one Hessian array, factored once (in
    place) by the driver, giving the blocks a fresh factorisation of a copy gives."""
    d = family_model("llama")
    rows = _seqs((40, 25, 60), seed=5)
    ref = GptqCalibration(d, rows).hessians(0)
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert ref[attn + "q_proj.weight"] is ref[attn + "k_proj.weight"] is ref[attn + "v_proj.weight"]
    assert ref[mlp + "gate_proj.weight"] is ref[mlp + "up_proj.weight"]
    assert len({id(h) for h in ref.values()}) == 4
    src = SafetensorsSource(d)
    drv = GptqDriver(GptqCalibration(d, rows), 0.01, False, {})
    for name in ref:
        module = name.removesuffix(".weight")
        drv.enter(module)
        w = src.array(name).T
        got = gptq_quantize(w, drv.hessian(module), 32, True)
        drv.quantized(module, got)
        want = gptq_quantize(w, ref[name].copy(), 32, True)
        assert np.array_equal(got.packed, want.packed) and np.array_equal(got.scales, want.scales)
    drv.enter("model.layers.1.self_attn.q_proj")  # layer 0 runs quantized, layer 1 sums
    assert drv.calib.layer == 1 and drv.current == 1
