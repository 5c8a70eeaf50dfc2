"""edgetune's Q8_0 / Q4_0 / Q5_0 / Q5_1 quantizers against llama.cpp's: bit-identical bytes.

Two oracles: the ``gguf`` package's numpy quantizers (llama.cpp's Python reference) and
ggml's C ``ggml_quantize_chunk`` (the code ``llama-quantize`` runs, without an importance
matrix), from the llama.cpp build that llama-cpp-python installs."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from edgetune.kernels import ggml_quants as gq
from hypothesis import given, settings
from hypothesis import strategies as st
from llama_cpp_lib import ggml_quantize

TYPES = ("Q8_0", "Q4_0", "Q5_0", "Q5_1")


def hand_built() -> np.ndarray:
    """Blocks where the rules matter: zeros, ties at .5 after scaling, the negative extreme
    first, equal magnitudes of both signs, tiny values, one huge value."""
    rows = np.zeros((8, 64), np.float32)
    rows[1, :32] = np.linspace(-1, 1, 32)
    rows[2, :32] = 0.5
    rows[2, 5] = -0.5
    rows[3, :32] = np.arange(32) - 15.5  # 127 * x / 16 ties under Q8_0
    rows[4, :32] = 1e-30  # tiny; a denormal amax makes 1/d overflow, undefined in C
    rows[5, :32] = np.tile([1.0, -1.0], 16)
    rows[6, 7] = 6e4
    rows[7] = np.arange(64) * 0.125 - 4.0
    return rows


@pytest.mark.parametrize("name", TYPES)
def test_hand_built_blocks_equal_llama_cpp(name):
    x = hand_built()
    ours = gq.QUANTIZE[name](x)
    assert ours.shape == (8, 2 * gq.BLOCK_BYTES[name])
    assert np.array_equal(ours, ggml_quantize(x, name))
    ref = gguf.quants.quantize(x, getattr(gguf.GGMLQuantizationType, name))
    assert np.array_equal(ours, ref)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    blocks=st.integers(1, 6),
    scale=st.sampled_from([1e-6, 0.02, 1.0, 300.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_rows_equal_llama_cpp(rows, blocks, scale, seed):
    x = (np.random.default_rng(seed).standard_normal((rows, 32 * blocks)) * scale).astype(
        np.float32
    )
    for name in TYPES:
        assert np.array_equal(gq.QUANTIZE[name](x), ggml_quantize(x, name)), name


# half a step (Q8_0: d = amax/127), a whole one for Q4_0's clamped +8 (d = -max/8), plus
# the fp16 rounding of d over the largest code
@pytest.mark.parametrize(
    "name, bound",
    [
        ("Q8_0", 1 / 254 + 127 / 2048 / 127),
        ("Q4_0", 1 / 8 + 8 / 2048 / 8),
        ("Q5_0", 1 / 16 + 16 / 2048 / 16),
        ("Q5_1", 2 / 62 + 3 / 2048),  # a range of up to 2 amax; fp16 d and fp16 m
    ],
)
def test_dequantize_round_trip(name, bound):
    x = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    y = gguf.quants.dequantize(gq.QUANTIZE[name](x), getattr(gguf.GGMLQuantizationType, name))
    if name in gq.DEQUANTIZE:
        assert np.array_equal(gq.DEQUANTIZE[name](gq.QUANTIZE[name](x), 256), y)
    amax = np.abs(x.reshape(16, 8, 32)).max(-1, keepdims=True)
    err = np.abs((y - x).reshape(16, 8, 32))
    assert (err <= amax * bound * 1.001 + 1e-7).all()


def test_row_not_a_whole_block_is_refused():
    with pytest.raises(ValueError, match="not a whole number"):
        gq.quantize_q8_0(np.zeros((2, 40), np.float32))
