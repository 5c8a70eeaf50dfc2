"""``edgetune bench runtime``: both backends measured side by side, numbers consistent."""

import json
import subprocess
import sys

import pytest

from edgetune.bundle import verify


def test_bench_runtime_quick_json(int4_bundle):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgetune.cli",
            "bench",
            "runtime",
            str(int4_bundle),
            "--quick",
            "--json",
            "--prompt-tokens",
            "24",
            "--new-tokens",
            "12",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["benchmark"] == "runtime" and rep["threads"] == 2
    assert (rep["prompt_tokens"], rep["new_tokens"]) == (24, 12)
    files = verify(int4_bundle)["files"]
    assert rep["weight_bytes"] == files["model.onnx"]["bytes"] + files["model.onnx.data"]["bytes"]
    assert 0 < rep["decode_bytes_per_token"] < rep["weight_bytes"]
    bw = rep["read_bandwidth_gb_s"]
    assert 0.5 < bw < 2000
    ort, native = rep["results"]
    assert (ort["name"], native["name"]) == ("ort", "native")
    for res in (ort, native):
        assert res["tokens_per_s"] > 0 and res["prefill_tokens_per_s"] > 0
        # the first token waits for the prompt pass (24 tokens at the prefill rate) and more
        assert res["first_token_ms"] >= 1e3 * 24 / res["prefill_tokens_per_s"] * (1 - 1e-9)
        assert not res["torch_imported"]  # each backend ran in its own torch-free process
        assert 20 < res["peak_rss_mb"] < 8000
        assert res["rss_per_weight_byte"] == pytest.approx(
            res["peak_rss_bytes"] / rep["weight_bytes"]
        )
        assert res["bw_utilisation"] == pytest.approx(
            rep["decode_bytes_per_token"] * res["tokens_per_s"] / 1e9 / bw
        )
    assert native["baseline"] == "ort" and native["baseline_tokens_per_s"] == ort["tokens_per_s"]
    assert native["ratio"] == pytest.approx(native["tokens_per_s"] / ort["tokens_per_s"])
    assert native["prefill_ratio"] == pytest.approx(
        native["prefill_tokens_per_s"] / ort["prefill_tokens_per_s"]
    )
    assert rep["bundle_build_s"] is None  # a given bundle is not built


def test_bench_runtime_refuses_a_run_longer_than_the_context(int4_bundle):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgetune.cli",
            "bench",
            "runtime",
            str(int4_bundle),
            "--prompt-tokens",
            "500",
            "--new-tokens",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "exceeds the bundle's context of 512" in r.stderr
