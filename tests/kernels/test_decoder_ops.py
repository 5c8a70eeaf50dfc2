"""The native runtime's decoder ops (RMSNorm, SwiGLU, one-token attention) and the prepared
GEMMs against the numpy reference."""

import numpy as np
import pytest
from edgetune.kernels import reference as ref
from edgetune.kernels import traits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetune import kernels

# monkeypatch only sets EDGETUNE_KERNELS, the same for every generated example
ONE_BACKEND = HealthCheck.function_scoped_fixture


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("backend", list(traits.OPS["rms_norm"].entries))
@settings(max_examples=20, deadline=None, suppress_health_check=[ONE_BACKEND])
@given(t=st.integers(1, 5), h=st.sampled_from([1, 7, 64, 100, 1536]), seed=st.integers(0, 99))
def test_rms_norm_matches_reference(monkeypatch, backend, t, h, seed):
    monkeypatch.setenv("EDGETUNE_KERNELS", backend)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((t, h)) * rng.uniform(0.01, 50)).astype(np.float32)
    w = rng.standard_normal(h).astype(np.float32)
    assert _rel(kernels.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5)) < 1e-5


@settings(max_examples=20, deadline=None)
@given(t=st.integers(1, 4), n=st.sampled_from([1, 5, 8, 33, 4096]), seed=st.integers(0, 99))
def test_swiglu_matches_reference_including_saturated_gates(t, n, seed):
    rng = np.random.default_rng(seed)
    gu = (rng.standard_normal((t, 2 * n)) * 4).astype(np.float32)
    gu[0, 0] = 200.0  # exp(-g) underflows: silu(g) = g
    gu[-1, n - 1] = -200.0  # exp(-g) overflows the vector exp's range: silu(g) = -0
    got, want = kernels.swiglu(gu), ref.swiglu(gu)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max() + 1e-30


@pytest.mark.parametrize("backend", list(traits.OPS["attention_decode"].entries))
@settings(max_examples=30, deadline=None, suppress_health_check=[ONE_BACKEND])
@given(
    n_kv=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 3, 4]),
    d=st.sampled_from([8, 12, 64, 96, 128]),
    partial=st.booleans(),
    pos=st.integers(0, 70),
    window=st.sampled_from([0, 1, 5, 64]),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 99),
)
def test_attention_decode_matches_reference(
    monkeypatch, backend, n_kv, group, d, partial, pos, window, threads, seed
):
    monkeypatch.setenv("EDGETUNE_KERNELS", backend)
    rng = np.random.default_rng(seed)
    ctx = 80
    rot = d // 2 if partial and d % 4 == 0 else d
    q = rng.standard_normal((n_kv * group, d)).astype(np.float32)
    k, v = (rng.standard_normal((n_kv, d)).astype(np.float32) for _ in range(2))
    kc = rng.standard_normal((n_kv, ctx, d)).astype(np.float32)  # earlier positions
    vc = rng.standard_normal((n_kv, ctx, d)).astype(np.float32)
    ang = np.float32(pos) / 10000.0 ** (np.arange(0, rot, 2) / rot)
    emb = np.concatenate([ang, ang])
    cos, sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
    first = max(0, pos - window + 1) if window else 0
    kc2, vc2 = kc.copy(), vc.copy()
    got = kernels.attention_decode(q, k, v, kc, vc, cos, sin, pos, first, d**-0.5, threads)
    want = ref.attention_decode(q, k, v, kc2, vc2, cos, sin, pos, first, d**-0.5)
    assert got.shape == (n_kv * group, d)
    assert _rel(got, want) < 1e-5
    np.testing.assert_allclose(kc, kc2, rtol=1e-6, atol=1e-6)  # the rotated key went in
    np.testing.assert_array_equal(vc, vc2)


def test_attention_decode_sees_only_its_window():
    # keys outside [first, pos] must not matter: change them and the output stays
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 16)).astype(np.float32) for _ in range(3))
    kc, vc = (rng.standard_normal((2, 32, 16)).astype(np.float32) for _ in range(2))
    cos, sin = np.ones(16, np.float32), np.zeros(16, np.float32)
    a = kernels.attention_decode(q, k, v, kc.copy(), vc.copy(), cos, sin, 20, 10, 0.25)
    kc[:, :10] = 99.0
    kc[:, 21:] = -99.0
    b = kernels.attention_decode(q, k, v, kc, vc, cos, sin, 20, 10, 0.25)
    np.testing.assert_array_equal(a, b)


def test_decoder_ops_reject_bad_shapes():
    f32 = np.float32
    q, k = np.zeros((4, 8), f32), np.zeros((2, 8), f32)
    kc = np.zeros((2, 16, 8), f32)
    cs = np.ones(8, f32)
    with pytest.raises(ValueError, match="outside the cache"):
        kernels.attention_decode(q, k, k, kc, kc.copy(), cs, cs, 16, 0, 1.0)
    with pytest.raises(ValueError, match="outside the cache"):
        kernels.attention_decode(q, k, k, kc, kc.copy(), cs, cs, 3, 4, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        kernels.attention_decode(np.zeros((3, 8), f32), k, k, kc, kc.copy(), cs, cs, 1, 0, 1.0)
    with pytest.raises(ValueError, match="rotary"):
        kernels.attention_decode(
            q, k, k, kc, kc.copy(), np.ones(10, f32), np.ones(10, f32), 1, 0, 1.0
        )
    ro = kc.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        kernels.attention_decode(q, k, k, ro, kc.copy(), cs, cs, 1, 0, 1.0)
    with pytest.raises(ValueError, match="float32"):
        kernels.rms_norm(np.zeros((1, 8)), np.ones(8, f32), 1e-5)
    with pytest.raises(ValueError, match="norm weight"):
        kernels.rms_norm(np.zeros((1, 8), f32), np.ones(7, f32), 1e-5)
    with pytest.raises(ValueError, match="even"):
        kernels.swiglu(np.zeros((1, 7), f32))


def test_prepared_gemms_equal_the_dispatched_ones():
    rng = np.random.default_rng(0)
    w = kernels.q4_quantize(rng.standard_normal((128, 40)).astype(np.float32), 32)
    codes, scales = kernels.q8_weight_quantize(rng.standard_normal((128, 24)).astype(np.float32))
    x = rng.standard_normal((3, 128)).astype(np.float32)
    np.testing.assert_array_equal(kernels.prepare_q4_q8_gemm(w, 2)(x), kernels.q4_q8_gemm(x, w, 2))
    np.testing.assert_array_equal(
        kernels.prepare_q8_f32_gemm(codes, scales, 1)(x), kernels.q8_f32_gemm(x, codes, scales, 1)
    )
    run = kernels.prepare_q4_q8_gemm(w)
    with pytest.raises(ValueError, match="K=64"):
        run(np.zeros((1, 64), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        run(np.zeros((128, 2), np.float32).T)
    with pytest.raises(ValueError, match="float32"):
        run(np.zeros((1, 128)))
