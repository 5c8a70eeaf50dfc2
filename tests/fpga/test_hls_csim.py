"""HLS C++ kernels in C simulation (plain g++) equal the numpy integer golden model bit for bit."""

import numpy as np
import pytest
from edgetune.kernels import fixed_point as fx

from edgetune import kernels
from edgetune.fpga import hls
from edgetune.fpga.memimage import read_coe, read_mem, write_coe, write_mem

pytestmark = pytest.mark.fpga


def vectors(k, n, block, symmetric, seed):
    rng = np.random.default_rng(seed)
    w = kernels.q4_quantize(rng.standard_normal((k, n)).astype(np.float32), block, symmetric)
    layer = fx.fixed_layer(w)
    act = fx.fixed_activation(rng.standard_normal(k).astype(np.float32) * 3, block)
    y = fx.q4q8_gemv_fixed(layer, act)
    codes = rng.integers(0, 16, 64 * 4).astype(np.uint8)
    absmax = rng.integers(1, 2**15, 4).astype(np.int16)
    return layer, act, y, codes, absmax, fx.nf4_dequant_fixed(codes, absmax)


@pytest.mark.parametrize(
    "k, n, block, symmetric",
    [
        (64, 8, 32, True),
        (256, 24, 64, False),
        (512, 16, 128, True),
        (96, 5, 16, False),
        (256, 4, 256, True),
    ],
)
def test_csim_bit_exact(tmp_path, k, n, block, symmetric):
    layer, act, y, codes, absmax, nf4 = vectors(k, n, block, symmetric, seed=k + n)
    run = hls.csim(tmp_path, hls.tb_vectors(layer, act, y, codes, absmax, nf4))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "PASS: 0 mismatches" in run.stdout


def test_csim_catches_a_wrong_golden_value(tmp_path):
    layer, act, y, codes, absmax, nf4 = vectors(64, 8, 32, True, seed=1)
    y = y.copy()
    y[3] += 1
    run = hls.csim(tmp_path, hls.tb_vectors(layer, act, y, codes, absmax, nf4))
    assert run.returncode != 0 and "1 mismatches" in run.stdout


def test_golden_model_tracks_float_result():
    rng = np.random.default_rng(0)
    w = kernels.q4_quantize(rng.standard_normal((512, 32)).astype(np.float32), 32)
    x = rng.standard_normal(512).astype(np.float32)
    got = fx.q4q8_gemv_fixed(fx.fixed_layer(w), fx.fixed_activation(x, 32)) / 2.0**fx.OUT_FRAC
    want = kernels.reference.q4_q8_gemm(x[None], w)[0]
    assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


@pytest.mark.parametrize("word_bytes", [1, 2, 4])
def test_memory_images_round_trip(tmp_path, word_bytes):
    data = np.random.default_rng(word_bytes).integers(0, 256, 64 * word_bytes).astype(np.uint8)
    mem = write_mem(tmp_path / "w.mem", data, word_bytes, comment="layer 0 q_proj")
    coe = write_coe(tmp_path / "w.coe", data, word_bytes, comment="layer 0 q_proj")
    assert read_mem(mem, word_bytes) == data.tobytes()
    assert read_coe(coe, word_bytes) == data.tobytes()
    text = coe.read_text()
    assert "memory_initialization_radix=16;" in text and text.rstrip().endswith(";")
    assert mem.read_text().splitlines()[1] == "@0"


def test_fpga_export_of_the_quickstart_model(merged_model, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "hls"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgetune.cli",
            "export",
            str(merged_model),
            "--target",
            "fpga",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    for name in (
        "hls/q4q8_gemv.h",
        "hls/top.cpp",
        "hls/config.h",
        "run_hls.tcl",
        "fpga.json",
        "README.md",
        "tb_layer0.cpp",
    ):
        assert (out / name).is_file(), name
    tb = out / "tb"
    build = subprocess.run(
        [
            "g++",
            "-std=c++14",
            "-O1",
            "-I",
            str(hls.ap_types_dir()),
            "-I",
            str(out / "hls"),
            "-I",
            str(out),
            str(out / "tb_layer0.cpp"),
            "-o",
            str(tb),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([str(tb)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "PASS: 0 mismatches" in run.stdout, run.stdout
    assert run.stdout.count("bit-exact") == 4  # qkv, o, gate_up, down of layer 0

    # the memory image holds exactly the packed weight the kernels produce
    from safetensors.numpy import load_file

    w = load_file(str(merged_model / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    q = kernels.q4_quantize(np.ascontiguousarray(w.astype(np.float32).T), 32)
    mem = read_mem(out / "weights" / "model_layers_1_mlp_down_proj.w.mem")
    assert mem == q.packed.tobytes()
    assert read_coe(out / "weights" / "model_layers_1_mlp_down_proj.w.coe") == mem


@pytest.mark.parametrize("block, symmetric", [(32, True), (64, False), (16, True)])
def test_cpu_integer_mode_equals_golden(block, symmetric):
    rng = np.random.default_rng(block)
    w = kernels.q4_quantize(rng.standard_normal((512, 48)).astype(np.float32), block, symmetric)
    layer = fx.fixed_layer(w)
    act = fx.fixed_activation(rng.standard_normal(512).astype(np.float32), block)
    ws_fx, ws_frac = fx.fixed_scales(w)
    np.testing.assert_array_equal(
        fx.q4q8_gemv_fixed_fast(w, ws_fx, ws_frac, act), fx.q4q8_gemv_fixed(layer, act)
    )


def test_fpga_export_from_a_bundle_uses_its_int4_weights(int4_bundle, tmp_path):
    import subprocess

    from edgetune.fpga.project import export_fpga
    from edgetune.runtime.weights import OnnxWeights

    out = export_fpga(int4_bundle, tmp_path / "hls")
    shipped = OnnxWeights(int4_bundle / "model.onnx").linears()["model.layers.0.self_attn.o_proj"]
    mem = read_mem(out / "weights" / "model_layers_0_self_attn_o_proj.w.mem")
    assert mem == shipped.q4.packed.tobytes()
    tb = tmp_path / "tb"
    subprocess.run(
        [
            "g++",
            "-std=c++14",
            "-O1",
            "-I",
            str(hls.ap_types_dir()),
            "-I",
            str(out / "hls"),
            "-I",
            str(out),
            str(out / "tb_layer0.cpp"),
            "-o",
            str(tb),
        ],
        check=True,
        capture_output=True,
    )
    run = subprocess.run([str(tb)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.count("bit-exact") == 4, run.stdout
