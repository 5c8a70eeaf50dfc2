"""Fast kernels against the numpy reference, hand-built golden blocks, and ONNX Runtime."""

import numpy as np
import pytest
from edgetune.kernels import reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetune import kernels

FAST = [b for b in ("cython", "numba") if b in kernels.available_backends()]


@pytest.fixture
def use_backend(monkeypatch):
    def set_backend(name):
        monkeypatch.setenv("EDGETUNE_KERNELS", name)

    return set_backend


def test_forced_backend_restores_the_previous_choice(monkeypatch):
    monkeypatch.setenv("EDGETUNE_KERNELS", "numba")
    with kernels.forced_backend("reference"):
        assert kernels.backend("q4_f32_gemm") == "reference"
    assert kernels.backend("q4_f32_gemm") == "numba"
    monkeypatch.delenv("EDGETUNE_KERNELS")
    with kernels.forced_backend("numba"):
        assert kernels.backend("q4_f32_gemm") == "numba"
    assert kernels.backend("q4_f32_gemm") == "cython"


def test_all_backends_built():
    # both compiled implementations are real, shipped and importable
    assert kernels.available_backends() == ["cython", "numba", "reference"]


def test_nf4_code_book_is_bitsandbytes():
    assert ref.NF4_CODE.shape == (16,) and ref.NF4_CODE[7] == 0.0
    assert ref.NF4_CODE[0] == -1.0 and ref.NF4_CODE[15] == 1.0
    assert ref.NF4_CODE[8] == np.float32(0.07958029955625534)
    assert np.all(np.diff(ref.NF4_CODE) > 0)


def test_dynamic_map_matches_bitsandbytes_values():
    # bitsandbytes create_dynamic_map(signed=True): 127 negatives, 0, 127 positives, 1.0
    m = ref.DYNAMIC_MAP
    assert m.shape == (256,) and np.all(np.diff(m) > 0)
    assert m[127] == 0.0 and m[255] == 1.0
    assert m[0] == np.float32(-0.99296875)  # -(1 - 0.9 / 128): mean of the top fraction bin
    assert m[254] == np.float32(0.99296875)
    assert abs(m[128] - 5.5e-7) < 1e-13  # 10^-6 x mean(0.1, 1)


def test_nf4_golden_block_is_exact():
    # a block holding every code value times 2: codes are the indices, absmax 2 survives
    # double quantization exactly (one block: offset = 2, residual 0)
    block = np.tile(ref.NF4_CODE * 2.0, 4).astype(np.float32)
    t = ref.nf4_quantize(block)
    assert list(ref.unpack_nibbles(t.packed, 16)) == list(range(16))
    assert t.packed[0] == 0x10  # element 0 (code 0) low nibble, element 1 (code 1) high nibble
    np.testing.assert_array_equal(ref.nf4_dequantize(t), block)


def test_bitsandbytes_nibble_order_converts_losslessly():
    codes = np.random.default_rng(0).integers(0, 16, 128).astype(np.uint8)
    ours = ref.pack_nibbles(codes)
    bnb = (codes[0::2] << 4) | codes[1::2]  # bitsandbytes: first element in the high nibble
    np.testing.assert_array_equal(ref.bnb_nf4_to_edgetune(bnb.astype(np.uint8)), ours)


def test_nf4_storage_is_under_014_of_fp32():
    w = np.random.default_rng(0).standard_normal((256, 640)).astype(np.float32)
    t = kernels.nf4_quantize(w)
    assert t.nbytes <= 0.14 * w.nbytes


def test_nf4_error_bound():
    # NF4 of a normal weight: every value within half the widest code gap of its block absmax
    w = np.random.default_rng(1).standard_normal(64 * 50).astype(np.float32)
    t = kernels.nf4_quantize(w)
    d = ref.nf4_dequantize(t)
    absmax = np.abs(w.reshape(-1, 64)).max(axis=1).repeat(64)
    assert np.all(np.abs(d - w) <= absmax * (np.diff(ref.NF4_CODE).max() / 2 + 0.01))


@pytest.mark.parametrize("offset", [0, 1])
def test_dequantize_beyond_the_cache_bit_exact(offset):
    # outputs over 32 MiB are written with streaming stores; numpy places such an array 16
    # bytes into a page (offset 0) and a view one float in is not 16-byte aligned (offset 1)
    from edgetune.bench.kernels import random_nf4, random_q4

    rng = np.random.default_rng(offset)
    n, k = 3072, 3072  # 37.7 MB of fp32 output
    t, q = random_nf4(k, n, rng), random_q4(k, n, 32, rng)
    out = np.empty(n * k + offset, np.float32)[offset:].reshape(n, k)
    np.testing.assert_array_equal(kernels.nf4_dequantize(t, out), ref.nf4_dequantize(t))
    np.testing.assert_array_equal(kernels.q4_dequantize(q, out.T), ref.q4_dequantize(q))


@pytest.mark.parametrize("backend", FAST)
@settings(max_examples=10, deadline=None)
@given(
    block=st.sampled_from(kernels.Q4_BLOCK_SIZES),
    kb=st.integers(1, 4),
    n=st.integers(1, 48),
    symmetric=st.booleans(),
    seed=st.integers(0, 99),
)
def test_q4_dequantize_into_a_transposed_buffer_bit_exact(backend, block, kb, n, symmetric, seed):
    # (the plain call of every dequantization kernel: test_traits.test_dequantize_bit_exact)
    b = np.random.default_rng(seed).standard_normal((block * kb, n)).astype(np.float32)
    q = kernels.q4_quantize(b, block, symmetric)
    with kernels.forced_backend(backend):
        into = kernels.q4_dequantize(q, np.empty((n, block * kb), np.float32).T)
    np.testing.assert_array_equal(into, ref.q4_dequantize(q))


def test_q4_golden_block():
    # symmetric: the largest-magnitude value maps to code 0 (scale = v / -8)
    col = np.array([-8, -4, 0, 4, 7, 1, 2, 3] * 2, np.float32)
    q = ref.q4_quantize(col[:, None], block=16)
    assert q.scales[0, 0] == 1.0
    assert q.packed[0, 0, 0] == (0 | (4 << 4))  # codes 0 and 4: low nibble first
    np.testing.assert_array_equal(ref.q4_dequantize(q)[:, 0], col)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [16, 32, 128])
def test_q4_packing_runs_in_onnxruntime_matmulnbits(symmetric, block):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(block)
    k, n = 256, 40
    b = rng.standard_normal((k, n)).astype(np.float32)
    q = kernels.q4_quantize(b, block, symmetric)
    inits = [
        numpy_helper.from_array(q.packed, "B"),
        numpy_helper.from_array(q.scales.reshape(-1), "S"),
    ]
    names = ["A", "B", "S"]
    if q.zero_points is not None:
        inits.append(numpy_helper.from_array(q.zero_points.reshape(-1), "Z"))
        names.append("Z")
    node = helper.make_node(
        "MatMulNBits",
        names,
        ["Y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=4,
        block_size=block,
        accuracy_level=0,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((3, k)).astype(np.float32)
    got = sess.run(None, {"A": x})[0]
    want = ref.q4_f32_gemm(x, q)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_nf4_gemv_golden_block():
    # one 64-element row holding every code value x 2 (absmax 2 survives double quantization)
    w = np.tile(ref.NF4_CODE * 2.0, 4).astype(np.float32)[None, :]
    t = kernels.nf4_quantize(w)
    x = np.zeros((1, 64), np.float32)
    x[0, 15] = 1.0  # picks code 15 (1.0) x absmax 2
    x[0, 16] = 3.0  # picks code 0 (-1.0) x absmax 2, three times
    for backend in FAST:
        with kernels.forced_backend(backend):
            assert kernels.nf4_f32_gemv(x, t)[0, 0] == 2.0 - 6.0


def test_nf4_int8_code_book():
    # NF4 x 127 rounded; magnitudes fit a u8 x s8 maddubs pair sum (2 * 127 * 127 < 2^15)
    # and the sign follows the code index, which the C kernel relies on (sign = code - 7)
    want = np.round(ref.NF4_CODE.astype(np.float64) * 127)
    np.testing.assert_array_equal(ref.NF4_CODE_I8, want)
    assert ref.NF4_CODE_I8.dtype == np.int8 and np.abs(ref.NF4_CODE_I8.astype(int)).max() == 127
    np.testing.assert_array_equal(np.sign(ref.NF4_CODE_I8), np.sign(np.arange(16) - 7))


def test_nf4_q8_gemv_golden_block():
    # codes 0..15 four times, absmax 2; x[15] = 1.27 is the block max (xs = 0.01, xq = 127)
    # and x[16] = -0.5 gives xq = -50: int32 sum = 127 * 127 (code 15) + (-127) * (-50) (code 0)
    w = np.tile(ref.NF4_CODE * 2.0, 4).astype(np.float32)[None, :]
    t = kernels.nf4_quantize(w)
    x = np.zeros((1, 64), np.float32)
    x[0, 15], x[0, 16] = 1.27, -0.5
    xs = np.float32(1.27) / np.float32(127.0)
    want = np.float32(127 * 127 + 127 * 50) * (np.float32(2.0) * (xs / np.float32(127.0)))
    assert ref.nf4_q8_gemv(x, t)[0, 0] == want
    for backend in FAST:
        with kernels.forced_backend(backend):
            assert abs(kernels.nf4_q8_gemv(x, t)[0, 0] - want) <= 1e-6 * abs(want)


def test_nf4_q8_gemv_close_to_exact_nf4():
    # the two roundings (int8 code book, Q8 activations) cost ~1 % of the output here, small
    # next to NF4's own quantization error
    rng = np.random.default_rng(11)
    t = kernels.nf4_quantize(rng.standard_normal((48, 512)).astype(np.float32))
    x = rng.standard_normal((3, 512)).astype(np.float32)
    got, exact = kernels.nf4_q8_gemv(x, t), kernels.nf4_f32_gemv(x, t)
    assert np.linalg.norm(got - exact) <= 0.02 * np.linalg.norm(exact)


def test_q8_activation_codes_bit_exact():
    # the C core quantizes activations itself: same int8 codes and scales as the spec
    C = pytest.importorskip("edgetune.kernels._ckernels")
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 256)) * rng.uniform(0.01, 100, (3, 1))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block: scale 0, codes 0
    x[1, 40] = 0.5 * np.abs(x[1, 32:64]).max()  # exact ties round half to even
    for block in kernels.Q4_BLOCK_SIZES:
        xq = np.empty(x.shape, np.int8)
        xs = np.empty((3, 256 // block), np.float32)
        C.q8_quantize(x, xq, xs)
        want_q, want_s = ref.q8_quantize(x, block)
        np.testing.assert_array_equal(xq, want_q)
        np.testing.assert_array_equal(xs, want_s)


def test_q4_q8_golden_block_integer_sum():
    # hand-built block: codes 0..15 twice (q - 8 = -8..7), activations all equal to their
    # block max, so xq = 127 everywhere: the int32 block sum is 127 * 2 * sum(-8..7) = -2032
    codes = np.tile(np.arange(16, dtype=np.uint8), 4)  # 64 values = 2 blocks of 32
    packed = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8).reshape(1, 2, 16)
    w = kernels.Q4Weight(packed, np.array([[1.0, 0.5]], np.float32), None, 64, 1, 32)
    x = np.full((1, 64), 2.54, np.float32)  # xs = 2.54 / 127 = 0.02
    xs = np.float32(2.54) / np.float32(127.0)
    want = np.float32(-2032) * xs * np.float32(1.0) + np.float32(-2032) * xs * np.float32(0.5)
    for backend in FAST:
        with kernels.forced_backend(backend):
            got = kernels.q4_q8_gemm(x, w)[0, 0]
        assert abs(got - want) <= 1e-6 * abs(want)
    assert ref.q4_q8_gemm(x, w)[0, 0] == pytest.approx(want, rel=1e-6)


def test_q4_q8_integer_gemm_close_to_float():
    rng = np.random.default_rng(4)
    b = rng.standard_normal((128, 16)).astype(np.float32)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    q = ref.q4_quantize(b, 32)
    got, want = ref.q4_q8_gemm(x, q), ref.q4_f32_gemm(x, q)
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_q4_0_conversion_keeps_values():
    rng = np.random.default_rng(5)
    qs = rng.integers(0, 256, (4, 2, 16)).astype(np.uint8)
    d = rng.standard_normal((4, 2)).astype(np.float16)
    w = ref.q4_0_to_q4(qs, d)
    # llama.cpp Q4_0: element j in the low nibble of byte j, element j+16 in its high nibble
    vals = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.float32) - 8
    want = (vals * d.astype(np.float32)[..., None]).reshape(4, 64).T
    np.testing.assert_array_equal(ref.q4_dequantize(w), want)


def test_boundary_checks_raise_value_error(use_backend):
    good = kernels.q4_quantize(np.ones((64, 4), np.float32), 32)
    with pytest.raises(ValueError, match="float32"):
        kernels.q4_f32_gemm(np.ones((1, 64), np.float64), good)
    with pytest.raises(ValueError, match="K=32"):
        kernels.q4_f32_gemm(np.ones((1, 32), np.float32), good)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.q4_f32_gemm(np.ones((64, 2), np.float32).T, good)
    with pytest.raises(ValueError, match="block"):
        kernels.q4_quantize(np.ones((48, 4), np.float32), 32)
    with pytest.raises(ValueError, match="NaN"):
        kernels.nf4_quantize(np.array([np.nan, 1.0], np.float32))
    t = kernels.nf4_quantize(np.ones(128, np.float32))
    broken = kernels.NF4Tensor.__new__(kernels.NF4Tensor)
    object.__setattr__(broken, "packed", t.packed[:10])
    for f in ("absmax_q", "absmax_scale", "absmax_offset", "shape"):
        object.__setattr__(broken, f, getattr(t, f))
    use_backend("cython")
    with pytest.raises(ValueError, match="inconsistent"):
        kernels.nf4_dequantize(broken)
    with pytest.raises(ValueError, match="inconsistent"):
        kernels.nf4_f32_gemv(np.ones((1, 128), np.float32), broken)
    w2 = kernels.nf4_quantize(np.ones((4, 128), np.float32))
    with pytest.raises(ValueError, match="does not match"):
        kernels.nf4_f32_gemv(np.ones((1, 64), np.float32), w2)
    with pytest.raises(ValueError, match="float32"):
        kernels.nf4_f32_gemv(np.ones((1, 128), np.float64), w2)
    with pytest.raises(ValueError, match="multiple of 64"):
        kernels.nf4_q8_gemv(
            np.ones((1, 96), np.float32), kernels.nf4_quantize(np.ones((2, 96), np.float32))
        )
    with pytest.raises(ValueError, match="inconsistent"):
        kernels.nf4_q8_gemv(np.ones((1, 128), np.float32), broken)
    use_backend("fortran")
    with pytest.raises(ValueError, match="EDGETUNE_KERNELS"):
        kernels.nf4_dequantize(t)


def test_dynamic_map_table_is_the_readable_derivation_to_one_ulp():
    np.testing.assert_array_max_ulp(ref.DYNAMIC_MAP, ref.dynamic_map_signed(), maxulp=1)


@pytest.mark.parametrize("seed", range(8))
def test_nf4_matches_bitsandbytes(seed):
    """Same 4-bit codes and absmax scales as bitsandbytes; dequantizing bitsandbytes' own
    state gives its values bit for bit. Its CPU library picks the 8-bit absmax code with an
    approximate binary search (~0.2% of blocks differ); ours takes the nearest code, as its
    CUDA kernel and torch backend do."""
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(seed)
    w = torch.randn(256, 128) * (seed + 1)
    q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    offset = float(state.offset)
    t = ref.nf4_quantize(w.numpy(), absmax_offset=offset)  # torch's mean can differ by 1 ulp
    np.testing.assert_array_equal(ref.bnb_nf4_to_edgetune(q.numpy().reshape(-1)), t.packed)
    np.testing.assert_array_equal(state.state2.absmax.numpy(), t.absmax_scale)
    theirs = state.absmax.numpy()
    differ = np.flatnonzero(theirs != t.absmax_q)
    assert differ.size <= 0.01 * theirs.size
    absmax = np.abs(w.numpy().reshape(-1, 64)).max(axis=1)
    x = (absmax - np.float32(offset)) / t.absmax_scale[np.arange(absmax.size) // 256]
    m = ref.DYNAMIC_MAP
    assert np.all(np.abs(x - m[t.absmax_q])[differ] <= np.abs(x - m[theirs])[differ])
    bnb_state = kernels.NF4Tensor(
        t.packed, theirs.astype(np.uint8), state.state2.absmax.numpy(), offset, tuple(w.shape)
    )
    np.testing.assert_array_equal(
        kernels.nf4_dequantize(bnb_state), F.dequantize_4bit(q, state).numpy()
    )
