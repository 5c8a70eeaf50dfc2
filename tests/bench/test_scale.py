"""``edgetune bench scale``: the random model builder, the stages end to end on a tiny width,
and the slope / extrapolation arithmetic."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgetune.bench import scale
from edgetune.bench.random_model import cached_random_model, make_random_model
from edgetune.bench.scale import PHI3_MEDIUM, PHI3_MINI, Fit, Shape, fit
from edgetune.errors import OutputExistsError
from edgetune.tensors import INDEX, SafetensorsSource

TINY = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=2048)


@pytest.mark.parametrize("family", ["phi3", "llama"])
def test_random_model_loads_in_transformers_with_the_config_shapes(tmp_path, family):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = make_random_model(tmp_path / "m", 2, family=family, **TINY)
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.model_type == family and cfg.dtype == torch.bfloat16
    assert (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.vocab_size,
        cfg.num_key_value_heads,
    ) == (64, 128, 2, 2048, 2)
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_scaling) == (10000.0, 4096, None)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    fresh = AutoModelForCausalLM.from_config(cfg).state_dict()
    loaded = model.state_dict()
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in fresh.items()}
    # HF's init: N(0, 0.02) projections and embeddings, norms 1.0
    w = loaded["model.layers.1.mlp.down_proj.weight"].float()
    assert abs(float(w.mean())) < 2e-3 and 0.019 < float(w.std()) < 0.021
    assert bool((loaded["model.norm.weight"] == 1).all())
    # HF's sharded layout: embedding, one shard per layer, final norm + head; sizes add up
    index = json.loads((out / INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 2 + 2
    src = SafetensorsSource(out)
    assert index["metadata"]["total_size"] == sum(src.info(n).nbytes for n in src.names())
    assert src.dtype() == "BF16"
    ids = torch.tensor([[0, 17, 300, 2000]])
    assert model(input_ids=ids).logits.shape == (1, 4, 2048)


def test_random_model_is_seeded_atomic_and_cached(tmp_path, monkeypatch):
    a = make_random_model(tmp_path / "a", 1, **TINY)
    b = make_random_model(tmp_path / "b", 1, **TINY)
    c = make_random_model(tmp_path / "c", 1, seed=1, **TINY)
    name = "model.layers.0.self_attn.qkv_proj.weight"
    sa, sb, sc = (SafetensorsSource(p) for p in (a, b, c))
    assert np.array_equal(sa.raw(name), sb.raw(name))
    assert not np.array_equal(sa.raw(name), sc.raw(name))
    with pytest.raises(OutputExistsError):
        make_random_model(a, 1, **TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp dirs left
    monkeypatch.setenv("EDGETUNE_CACHE", str(tmp_path / "cache"))
    first, cached = cached_random_model(1, **TINY)
    again, cached_again = cached_random_model(1, **TINY)
    assert (cached, cached_again) == (False, True) and first == again
    assert first.parent == tmp_path / "cache" / "bench" / "scale" and "h64-i128" in first.name


def test_bench_scale_tiny_runs_every_stage(tmp_path):
    env = {**os.environ, "EDGETUNE_CACHE": str(tmp_path / "cache")}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgetune.cli",
            "bench",
            "scale",
            "--json",
            "--layers",
            "1,2",
            "--hidden",
            "64",
            "--intermediate",
            "128",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--vocab",
            "2048",
            "--prompt-tokens",
            "8",
            "--new-tokens",
            "8",
            "--keep",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["benchmark"] == "scale" and rep["layers"] == [1, 2]
    rows = {(x["name"], x["layers"]): x for x in rep["results"]}
    names = ("export", "merge", "qlora-step", "decode-native", "decode-ort")
    assert set(rows) == {(n, layers) for n in names for layers in (1, 2)}
    for x in rep["results"]:
        assert "error" not in x, x
        assert 20e6 < x["peak_rss_bytes"] < 6e9 and x["wall_s"] > 0
        assert x["ms"] == pytest.approx(1e3 * x["wall_s"])
    bw = rep["read_bandwidth_gb_s"]
    assert 0.5 < bw < 2000
    for b in ("native", "ort"):
        for layers in (1, 2):
            d = rows[(f"decode-{b}", layers)]
            assert d["tokens_per_s"] > 0 and 0 < d["bytes_per_token"] < d["weight_bytes"]
            assert d["kv_bytes"] > 0 and not d["torch_imported"]
            assert d["bw_utilisation"] == pytest.approx(
                d["bytes_per_token"] * d["tokens_per_s"] / 1e9 / bw
            )
            assert d["rss_per_read_and_kv"] == pytest.approx(
                d["peak_rss_bytes"] / (d["bytes_per_token"] + d["kv_bytes"])
            )
        # one more layer: more bytes read per token (one layer's int4 projections)
        one, two = (rows[(f"decode-{b}", n)]["bytes_per_token"] for n in (1, 2))
        assert two > one
    # the first step's loss on random N(0, 0.02) weights: near-uniform logits, ln(vocab)
    for layers in (1, 2):
        assert abs(rows[("qlora-step", layers)]["loss"] - np.log(2048)) < 0.1
    # two layer counts: the fit is the line through both, extrapolated by the shape ratios
    shape = Shape(**rep["shape"])
    for f in rep["fits"]:
        y1, y2 = (rows[(f["name"], n)]["peak_rss_bytes"] for n in (1, 2))
        assert f["peak_rss_bytes_slope"] == pytest.approx(y2 - y1)
        line = Fit(f["peak_rss_bytes_intercept"], f["peak_rss_bytes_slope"])
        assert f["phi3-medium"]["peak_rss_bytes"] == pytest.approx(
            line.extrapolate(shape, PHI3_MEDIUM)
        )
    verdicts = {t["name"]: t for t in rep["targets"]}
    assert "export int4 peak RSS, Phi-3-mini" in verdicts
    assert all(isinstance(t["passed"], bool) for t in rep["targets"])
    # the merge added the random adapter's delta to the NF4 round trip of the base
    run = rep["work_dir"]
    base = SafetensorsSource(rep["models"][1]["path"])
    merged = SafetensorsSource(f"{run}/L2/merged")
    adapter = SafetensorsSource(f"{run}/L2/adapter")
    mod = "model.layers.1.self_attn.qkv_proj"
    diff = merged.array(f"{mod}.weight") - base.array(f"{mod}.weight")
    delta = (
        2.0
        * adapter.array(f"base_model.model.{mod}.lora_B.weight")
        @ adapter.array(f"base_model.model.{mod}.lora_A.weight")
    )
    assert np.corrcoef(diff.ravel(), delta.ravel())[0, 1] > 0.9
    text = scale.format_results(rep)
    assert "Phi-3-medium" in text and "y = c*E_T/E_B + s*L_T*P_T/P_B" in text


def test_fit_and_extrapolation_on_hand_made_numbers():
    line = fit([(2, 100.0), (4, 140.0), (8, 220.0)])
    assert (line.intercept, line.slope) == pytest.approx((60.0, 20.0))
    assert fit([(4, 1.0), (4, 2.0)]) is None  # one layer count: no slope
    mini = Shape(3072, 8192, 32, 32, 32064)
    # P_mini = 3072*(3072 + 2*3072) + 3072^2 + 3*3072*8192; P_medium with 10 kv heads of 128
    assert mini.layer_params == 113_246_208 and PHI3_MEDIUM.layer_params == 340_787_200
    assert line.extrapolate(mini, PHI3_MINI) == pytest.approx(60 + 20 * 32)
    assert line.extrapolate(mini, PHI3_MEDIUM) == pytest.approx(
        60 * 5120 / 3072 + 20 * 40 * 340_787_200 / 113_246_208
    )
    half = Shape(1536, 4096, 16, 16, 32064)  # a quarter of the layer, half the embedding
    assert line.extrapolate(half, PHI3_MINI) == pytest.approx(
        60 * 2 + 20 * 32 * PHI3_MINI.layer_params / half.layer_params
    )


def test_targets_from_measured_and_extrapolated_numbers():
    mb = 1e6
    shape = Shape(3072, 8192, 32, 32, 32064)
    peaks = {2: 1000 * mb, 4: 1040 * mb, 8: 1120 * mb}  # 20 MB a layer
    results = [
        {"name": "export", "layers": n, "peak_rss_bytes": p, "wall_s": 10.0 * n}
        for n, p in peaks.items()
    ]
    results += [
        {"name": "merge", "layers": n, "peak_rss_bytes": 2000 * mb + 100 * mb * n, "wall_s": 1.0}
        for n in (2, 4)
    ]
    results.append({"name": "merge", "layers": 8, "error": "ModelError: boom"})
    results.append(
        {
            "name": "decode-native",
            "layers": 8,
            "peak_rss_bytes": 500 * mb,
            "wall_s": 1.0,
            "rss_per_read_and_kv": 1.05,
            "bw_utilisation": 0.5,
            "tokens_per_s": 5.0,
            "bytes_per_token": 400 * mb,
            "kv_bytes": 76 * mb,
        }
    )
    report = {
        "shape": {
            k: getattr(shape, k)
            for k in ("hidden", "intermediate", "heads", "kv_heads", "vocab", "layers")
        },
        "layers": [2, 4, 8],
        "threads": 2,
        "prompt_tokens": 32,
        "new_tokens": 32,
        "read_bandwidth_gb_s": 10.0,
        "results": results,
        "fits": scale.fit_results(results, shape),
    }
    report["targets"] = scale.targets(report)
    t = {x["name"]: x for x in report["targets"]}
    assert t["export peak(8 layers) - peak(2 layers)"]["value"] == pytest.approx(120 * mb)
    assert t["export peak(8 layers) - peak(2 layers)"]["passed"] is True
    assert t["export int4 peak RSS, Phi-3-mini"]["value"] == pytest.approx(960 * mb + 32 * 20 * mb)
    assert t["export int4 peak RSS, Phi-3-mini"]["passed"] is True
    assert t["export wall time, Phi-3-mini"]["value"] == pytest.approx(320.0)
    merge = t["merge peak RSS, Phi-3-mini"]  # the failed 8-layer merge is left out of the fit
    assert merge["value"] == pytest.approx(2000 * mb + 3200 * mb) and merge["passed"] is False
    assert t["native decode RSS / (bytes read per token + KV)"]["passed"] is True
    assert t["native decode share of read bandwidth"]["passed"] is False
    assert t["qlora-step peak RSS, Phi-3-mini"]["passed"] is None  # not run
    medium = t["export peak RSS, Phi-3-medium"]
    assert medium["value"] == pytest.approx(
        960 * mb * 5120 / 3072 + 20 * mb * 40 * 340_787_200 / 113_246_208
    )
    text = scale.format_results(report)
    assert "merge @8: ModelError: boom" in text and "FAIL" in text and "pass" in text


def test_bench_scale_refuses_bad_flags_before_building_anything(capsys):
    from edgetune.cli import main

    assert main(["bench", "scale", "--stages", "export,fly"]) == 2
    assert "--stages must be some of export, merge, qlora-step, decode" in capsys.readouterr().err
    assert main(["bench", "scale", "--layers", "2,x"]) == 2
    assert "--layers: expected a comma-separated list" in capsys.readouterr().err
    assert main(["bench", "scale", "--vocab", "100"]) == 2
    assert "vocab must be >= 2048" in capsys.readouterr().err
