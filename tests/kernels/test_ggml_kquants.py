"""edgetune's Q4_K / Q5_K / Q6_K quantizers (numpy spec and Numba build) against
llama.cpp's C ``quantize_row_q*_K_ref``: bit-identical bytes, and the dequantized error
llama.cpp's own dequantizer (the ``gguf`` package) sees."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from edgetune.kernels import ggml_kquants as kq
from hypothesis import given, settings
from hypothesis import strategies as st
from llama_cpp_lib import ggml_quantize

NAMES = list(kq.QUANTIZE)


def hand_built() -> np.ndarray:
    """Super-blocks where the search's branches matter: all zero; one flat negative
    sub-block (max == min) among others; all positive (the minimum clamps to 0); one
    sub-block far larger than the rest (small sub-block scales round to 0 and keep the
    search's codes); ties; alternating signs; a lone spike; a ramp."""
    r = np.zeros((8, 512), np.float32)
    r[1, :32] = -3.0
    r[1, 32:256] = np.linspace(-1, 1, 224)
    r[2, :256] = np.linspace(0.5, 2.0, 256)
    r[3, :256] = np.random.default_rng(0).standard_normal(256) * 1e-3
    r[3, 64:96] *= 1e5
    r[4, :256] = np.tile([0.5, -0.5, 1.5, -1.5], 64)
    r[5, :256] = np.tile([1.0, -1.0], 128)
    r[6, 300] = 6e4
    r[7] = np.arange(512) * 0.125 - 32.0
    return r


@pytest.mark.parametrize("fast", [False, True], ids=["spec", "numba"])
@pytest.mark.parametrize("name", NAMES)
def test_hand_built_blocks_equal_llama_cpp(name, fast):
    x = hand_built()
    ours = kq.QUANTIZE[name](x, fast=fast)
    assert ours.shape == (8, 2 * kq.BLOCK_BYTES[name])
    assert np.array_equal(ours, ggml_quantize(x, name))


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 4),
    blocks=st.integers(1, 3),
    scale=st.sampled_from([1e-4, 0.02, 1.0, 300.0]),
    shift=st.sampled_from([0.0, 0.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_rows_equal_llama_cpp(rows, blocks, scale, shift, seed):
    rng = np.random.default_rng(seed)
    x = ((rng.standard_normal((rows, 256 * blocks)) + shift) * scale).astype(np.float32)
    for name in NAMES:
        ref = ggml_quantize(x, name)
        assert np.array_equal(kq.QUANTIZE[name](x), ref), name
        assert np.array_equal(kq.QUANTIZE[name](x, fast=True), ref), name


# relative RMS error of weight-like rows after llama.cpp's own dequantizer: the K formats
# rank as their bits do (Q6_K < Q5_K < Q4_K), each near what llama.cpp reports for them
@pytest.mark.parametrize("name, bound", [("Q4_K", 0.11), ("Q5_K", 0.055), ("Q6_K", 0.03)])
def test_dequantized_error(name, bound):
    x = (np.random.default_rng(2).standard_normal((64, 1024)) * 0.02).astype(np.float32)
    y = gguf.quants.dequantize(kq.QUANTIZE[name](x, fast=True), gguf.GGMLQuantizationType[name])
    assert y.shape == x.shape
    rel = np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2))
    assert rel < bound, rel


def test_row_not_a_whole_super_block_is_refused():
    with pytest.raises(ValueError, match="not a whole number of 256"):
        kq.quantize_q4_k(np.zeros((2, 288), np.float32))
