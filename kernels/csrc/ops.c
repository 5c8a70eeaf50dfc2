/* Decoder ops of the native runtime that are not matmuls: RMSNorm, SwiGLU and the attention
 * of one new token over the KV cache (rotary embedding, cache write, softmax, values).
 *
 * Run once per layer per decoded token on vectors of a few thousand floats, so what they cost
 * in numpy is call overhead (about 60 small array operations a layer, ~190 us, 20 % of a
 * 0.55B model's decode step); each is one call here. Portable C loops with an AVX2+FMA
 * variant picked at run time, as the rest of the core. Reference: kernels/reference.py. */
#include "edgetune_kernels.h"

#include <math.h>

#include "et_simd.h"

/* ---- portable --------------------------------------------------------------------------- */

static float dot_generic(const float *a, const float *b, size_t n) {
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    size_t j = 0;
    for (; j + 4 <= n; j += 4)
        for (int l = 0; l < 4; l++) s[l] += a[j + l] * b[j + l];
    float t = (s[0] + s[1]) + (s[2] + s[3]);
    for (; j < n; j++) t += a[j] * b[j];
    return t;
}

static void axpy_generic(float a, const float *x, float *y, size_t n) {
    for (size_t j = 0; j < n; j++) y[j] += a * x[j];
}

static void exp_generic(float *x, size_t n) {
    for (size_t j = 0; j < n; j++) x[j] = expf(x[j]);
}

static void swiglu_generic(const float *g, const float *u, float *out, size_t n) {
    for (size_t j = 0; j < n; j++) out[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
}

#ifdef ET_X86
/* ---- AVX2 + FMA ------------------------------------------------------------------------- */
/* e^x for 8 floats (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, degree-5 polynomial, times
 * 2^n); within 2 ulp of expf. Inputs are clamped to [-87.3, 88.7]: below, the result is 0
 * (softmax weights and SiLU gates that small are 0 in fp32 anyway). */
ET_INLINE __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.7f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    /* 2^n: n + 127 in the exponent field; n >= -126 here (x >= -87.3), n <= 128 is split as
     * 2^(n-1) * 2 so that x = 88.7 does not overflow the field */
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(126)), 23);
    p = _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_set1_ps(2.0f));
    return _mm256_andnot_ps(under, p);
}

ET_AVX2 static float dot_avx2(const float *a, const float *b, size_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    size_t j = 0;
    for (; j + 16 <= n; j += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
    }
    for (; j + 8 <= n; j += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
    float t = hsum256(_mm256_add_ps(s0, s1));
    for (; j < n; j++) t += a[j] * b[j];
    return t;
}

ET_AVX2 static void axpy_avx2(float a, const float *x, float *y, size_t n) {
    const __m256 va = _mm256_set1_ps(a);
    size_t j = 0;
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(y + j, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
    for (; j < n; j++) y[j] += a * x[j];
}

ET_AVX2 static void exp_avx2(float *x, size_t n) {
    size_t j = 0;
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(x + j, exp8(_mm256_loadu_ps(x + j)));
    for (; j < n; j++) x[j] = expf(x[j]);
}

ET_AVX2 static void swiglu_avx2(const float *g, const float *u, float *out, size_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    size_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 gv = _mm256_loadu_ps(g + j);
        __m256 e = exp8(_mm256_xor_ps(gv, sign));
        _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)),
                                                _mm256_loadu_ps(u + j)));
    }
    for (; j < n; j++) out[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
}

/* scores[s] = scale * q . keys[s] for `count` keys of length d (d % 8 == 0): four keys at a
 * time, so four independent FMA chains run instead of one chain of d / 8 dependent FMAs. */
ET_AVX2 static void scores_avx2(const float *q, const float *keys, float *scores, size_t count,
                                size_t d, float scale) {
    size_t s = 0;
    for (; s + 4 <= count; s += 4) {
        const float *k0 = keys + s * d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (size_t j = 0; j < d; j += 8) {
            __m256 qv = _mm256_loadu_ps(q + j);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + j), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d + j), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * d + j), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * d + j), a3);
        }
        scores[s] = hsum256(a0) * scale;
        scores[s + 1] = hsum256(a1) * scale;
        scores[s + 2] = hsum256(a2) * scale;
        scores[s + 3] = hsum256(a3) * scale;
    }
    for (; s < count; s++) scores[s] = dot_avx2(q, keys + s * d, d) * scale;
}

/* o (d) = sum_s p[s] vals[s] (d % 8 == 0): 64 columns at a time held in 8 registers across
 * all keys, instead of reloading and storing o for every key. */
ET_AVX2 static void values_avx2(const float *p, const float *vals, float *o, size_t count,
                                size_t d) {
    size_t j = 0;
    for (; j + 64 <= d; j += 64) {
        __m256 a[8];
        for (int c = 0; c < 8; c++) a[c] = _mm256_setzero_ps();
        for (size_t s = 0; s < count; s++) {
            __m256 ps = _mm256_broadcast_ss(p + s);
            for (int c = 0; c < 8; c++)
                a[c] = _mm256_fmadd_ps(ps, _mm256_loadu_ps(vals + s * d + j + 8 * c), a[c]);
        }
        for (int c = 0; c < 8; c++) _mm256_storeu_ps(o + j + 8 * c, a[c]);
    }
    for (; j < d; j += 8) {
        __m256 a = _mm256_setzero_ps();
        for (size_t s = 0; s < count; s++)
            a = _mm256_fmadd_ps(_mm256_broadcast_ss(p + s), _mm256_loadu_ps(vals + s * d + j), a);
        _mm256_storeu_ps(o + j, a);
    }
}
#endif

/* The vector primitives of one path: AVX2 when the CPU has it (and the caller allows it). */
typedef struct {
    float (*dot)(const float *, const float *, size_t);
    void (*exp)(float *, size_t);
    void (*axpy)(float, const float *, float *, size_t);
} vec_ops;

static vec_ops pick(int simd) {
#ifdef ET_X86
    if (simd) return (vec_ops){dot_avx2, exp_avx2, axpy_avx2};
#endif
    (void)simd;
    return (vec_ops){dot_generic, exp_generic, axpy_generic};
}

/* ---- entry points ----------------------------------------------------------------------- */

void et_rms_norm(const float *x, const float *w, float *out, size_t t, size_t h, float eps,
                 int use_simd) {
    const vec_ops ops = pick(use_simd);
    for (size_t i = 0; i < t; i++) {
        const float *xr = x + i * h;
        float inv = 1.0f / sqrtf(ops.dot(xr, xr, h) / (float)h + eps);
        for (size_t j = 0; j < h; j++) out[i * h + j] = xr[j] * inv * w[j];
    }
}

void et_swiglu(const float *gu, float *out, size_t t, size_t n, int use_simd) {
    for (size_t i = 0; i < t; i++) {
        const float *g = gu + i * 2 * n;
#ifdef ET_X86
        if (use_simd) {
            swiglu_avx2(g, g + n, out + i * n, n);
            continue;
        }
#endif
        swiglu_generic(g, g + n, out + i * n, n);
    }
}

/* Rotate-half rotary embedding of the first `rot` of `d` values of one head; the tables are
 * cat(angles, angles), so entry j and j + rot/2 share an angle. */
static void rope_head(const float *x, float *out, const float *cos, const float *sin, size_t d,
                      size_t rot) {
    size_t half = rot / 2;
    for (size_t j = 0; j < half; j++) {
        float a = x[j], b = x[j + half];
        out[j] = a * cos[j] - b * sin[j];
        out[j + half] = b * cos[j + half] + a * sin[j + half];
    }
    for (size_t j = rot; j < d; j++) out[j] = x[j];
}

void et_attention_decode(const float *q, const float *k, const float *v, float *kc, float *vc,
                         const float *cos, const float *sin, float *out, float *scratch,
                         size_t n_heads, size_t n_kv, size_t d, size_t rot, size_t ctx,
                         size_t pos, size_t first, float scale, int threads, int use_simd) {
    const vec_ops ops = pick(use_simd);
    for (size_t g = 0; g < n_kv; g++) {
        rope_head(k + g * d, kc + (g * ctx + pos) * d, cos, sin, d, rot);
        for (size_t j = 0; j < d; j++) vc[(g * ctx + pos) * d + j] = v[g * d + j];
    }
    const size_t group = n_heads / n_kv, count = pos + 1 - first;
#ifdef ET_X86
    const int vec = use_simd && d % 8 == 0;
#else
    const int vec = 0;
#endif
    /* heads split over threads: reading the cache is most of the work (a layer's keys and
     * values are often colder than L2), and one core alone cannot stream it at full speed */
    int nt = threads > 1 && count * n_heads * d >= (1u << 14) ? threads : 1;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (size_t h = 0; h < n_heads; h++) {
        float qr[1024]; /* head_dim <= 1024, checked by the caller */
        float *scores = scratch + h * (pos + 1);
        const float *keys = kc + ((h / group) * ctx + first) * d;
        const float *vals = vc + ((h / group) * ctx + first) * d;
        rope_head(q + h * d, qr, cos, sin, d, rot);
        float mx = -INFINITY;
#ifdef ET_X86
        if (vec)
            scores_avx2(qr, keys, scores, count, d, scale);
        else
#endif
            for (size_t s = 0; s < count; s++) scores[s] = ops.dot(qr, keys + s * d, d) * scale;
        for (size_t s = 0; s < count; s++) mx = scores[s] > mx ? scores[s] : mx;
        for (size_t s = 0; s < count; s++) scores[s] -= mx;
        ops.exp(scores, count);
        float total = 0.0f;
        for (size_t s = 0; s < count; s++) total += scores[s];
        float *o = out + h * d, inv = 1.0f / total;
        for (size_t s = 0; s < count; s++) scores[s] *= inv;
#ifdef ET_X86
        if (vec) {
            values_avx2(scores, vals, o, count, d);
            continue;
        }
#endif
        for (size_t j = 0; j < d; j++) o[j] = 0.0f;
        for (size_t s = 0; s < count; s++) ops.axpy(scores[s], vals + s * d, o, d);
    }
}
