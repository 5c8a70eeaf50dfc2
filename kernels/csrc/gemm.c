/* Q4 (MatMulNBits) GEMV / small GEMM with fp32 and int8 activations, and NF4 x fp32 GEMV.
 *
 * The portable loops are the readable spec in C. The AVX2+FMA versions, chosen at run time,
 * never reorder the packed weights: they permute the (small) activation vector instead, so the
 * low nibbles of a 32-byte weight load meet the even-position activations and the high nibbles
 * the odd ones. Zero points fold into per-lane activation sums (sum (q - z) x = sum q x - z sum x)
 * and block scales apply as vector FMAs, so the inner loop is loads, masks, multiply-adds, and
 * one horizontal sum per output. Output rows (N) are split over OpenMP threads. */
#include "edgetune_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>


#include "et_gemm.h"

/* ---- Q8 activation quantization (bit-exact with reference.q8_quantize) ---------------- */

void et_q8_quantize(const float *x, int8_t *xq, float *xs, size_t m, size_t k, size_t block) {
    size_t nb = k / block;
    for (size_t i = 0; i < m * nb; i++) {
        const float *xb = x + i * block;
        float amax = 0.0f;
        for (size_t j = 0; j < block; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float s = amax / 127.0f;
        float inv = s == 0.0f ? 0.0f : 1.0f / s;
        xs[i] = s;
        for (size_t j = 0; j < block; j++) {
            float q = nearbyintf(xb[j] * inv); /* round half to even, as numpy */
            q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
            xq[i * block + j] = (int8_t)q;
        }
    }
}

/* ---- portable versions (the spec in C) ------------------------------------------------ */

static void q4_gemm_f32_rows(const float *x, const uint8_t *packed, const float *scales,
                             const uint8_t *zps, float *y, size_t m, size_t n, size_t k,
                             size_t block, size_t r0, size_t r1) {
    size_t nb = k / block;
    for (size_t r = r0; r < r1; r++) {
        for (size_t i = 0; i < m; i++) {
            const float *xr = x + i * k;
            float acc = 0.0f;
            for (size_t b = 0; b < nb; b++) {
                const uint8_t *p = packed + (r * nb + b) * (block / 2);
                float dot = 0.0f, z = zps ? (float)zps[r * nb + b] : 8.0f;
                for (size_t j = 0; j < block / 2; j++) {
                    dot += ((float)(p[j] & 15) - z) * xr[b * block + 2 * j];
                    dot += ((float)(p[j] >> 4) - z) * xr[b * block + 2 * j + 1];
                }
                acc += dot * scales[r * nb + b];
            }
            y[i * n + r] = acc;
        }
    }
}

static void nf4_gemv_rows(const float *x, const uint8_t *packed, const et_absmax *absmax,
                          const float *code, float *y, size_t m, size_t n, size_t k,
                          size_t r0, size_t r1) {
    for (size_t r = r0; r < r1; r++)
        for (size_t i = 0; i < m; i++) {
            float acc = 0.0f;
            for (size_t j = 0; j < k; j++) {
                size_t e = r * k + j;
                uint8_t byte = packed[e >> 1];
                float w = code[(e & 1) ? byte >> 4 : byte & 15] * et_absmax_at(absmax, e / 64);
                acc += w * x[i * k + j];
            }
            y[i * n + r] = acc;
        }
}

/* NF4 x Q8, portable: xq (M, K) int8 codes and xs127 (M, K/64) their scales / 127 (k % 64 == 0). */
static void nf4q8_rows(const int8_t *xq, const float *xs127, const uint8_t *packed,
                       const et_absmax *absmax, const int8_t *code, float *y, size_t m, size_t n,
                       size_t k, size_t r0, size_t r1) {
    const size_t nb = k / 64;
    for (size_t r = r0; r < r1; r++)
        for (size_t i = 0; i < m; i++) {
            float acc = 0.0f;
            for (size_t b = 0; b < nb; b++) {
                const uint8_t *p = packed + (r * k + 64 * b) / 2;
                const int8_t *xb = xq + i * k + 64 * b;
                int32_t dot = 0;
                for (size_t j = 0; j < 32; j++)
                    dot += code[p[j] & 15] * xb[2 * j] + code[p[j] >> 4] * xb[2 * j + 1];
                acc += (float)dot * (et_absmax_at(absmax, r * nb + b) * xs127[i * nb + b]);
            }
            y[i * n + r] = acc;
        }
}

static void q8w_rows(const float *x, const uint8_t *codes, const float *scales, float *y,
                     size_t m, size_t n, size_t k, size_t block, size_t r0, size_t r1) {
    size_t nb = k / block;
    for (size_t r = r0; r < r1; r++)
        for (size_t i = 0; i < m; i++) {
            float acc = 0.0f;
            for (size_t b = 0; b < nb; b++) {
                const uint8_t *q = codes + (r * nb + b) * block;
                float dot = 0.0f;
                for (size_t j = 0; j < block; j++)
                    dot += ((float)q[j] - 128.0f) * x[i * k + b * block + j];
                acc += dot * scales[r * nb + b];
            }
            y[i * n + r] = acc;
        }
}

#ifdef ET_X86
/* ---- AVX2 + FMA ------------------------------------------------------------------------ */


/* fp32 activations, permuted per 16-element group (8 packed bytes): its 8 even-position
 * values, then its 8 odd-position values. xsum: the sum of each block of x. */
ET_AVX2 static void permute_f32(const float *x, float *xp, float *xsum, size_t m, size_t k,
                                size_t block) {
    for (size_t i = 0; i < m; i++) {
        const float *xr = x + i * k;
        float *o = xp + i * k;
        for (size_t g = 0; g < k / 16; g++) {
            __m256 a = _mm256_loadu_ps(xr + 16 * g), b = _mm256_loadu_ps(xr + 16 * g + 8);
            /* shuffle_ps pairs up a and b per 128-bit lane; permute4x64 puts the lanes in order */
            __m256 ev = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
            __m256 od = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
            _mm256_storeu_ps(o + 16 * g, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8)));
            _mm256_storeu_ps(o + 16 * g + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), 0xD8)));
        }
        for (size_t b = 0; b < k / block; b++) {
            __m256 s = _mm256_setzero_ps();
            for (size_t j = 0; j < block; j += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(xr + b * block + j));
            xsum[i * (k / block) + b] = hsum256(s);
        }
    }
}


/* 8 packed bytes -> their 8 low and 8 high nibbles as floats. */
ET_INLINE void nibbles_f32(const uint8_t *p, __m256 *lo, __m256 *hi) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
    *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}

/* One block of one weight row against MR activation rows: acc[i] += s_b * sum q x_i. Low and
 * high nibbles feed separate partial sums so consecutive FMAs do not wait on each other. */
ET_INLINE void q4_f32_block(const uint8_t *p, float sb, const float *xp, size_t k, size_t b,
                            const size_t block, const int mr, __m256 *acc) {
    const size_t groups = block / 16;
    __m256 ta[ET_MR], tb[ET_MR];
    for (int i = 0; i < mr; i++) ta[i] = tb[i] = _mm256_setzero_ps();
    for (size_t j = 0; j < groups; j++) { /* a constant trip count: unrolls completely */
        const size_t g = b * groups + j;
        __m256 lo, hi;
        nibbles_f32(p + 8 * g, &lo, &hi);
        for (int i = 0; i < mr; i++) {
            const float *xg = xp + i * k + 16 * g;
            ta[i] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xg), ta[i]);
            tb[i] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xg + 8), tb[i]);
        }
    }
    const __m256 vs = _mm256_set1_ps(sb);
    for (int i = 0; i < mr; i++) acc[i] = _mm256_fmadd_ps(_mm256_add_ps(ta[i], tb[i]), vs, acc[i]);
}

/* One weight row against MR activation rows: y[i] = sum_b s_b * sum_k q x_i - zero-point term.
 * Blocks go in pairs into two register accumulators (an array indexed by b & 1 would live on
 * the stack and chain every block through a store and a reload). `block` is a compile-time
 * constant at each call site, so a block's groups unroll completely. */
ET_INLINE void q4_f32_row(const uint8_t *p, const float *s, const uint8_t *zps, const float *xp,
                          const float *xsum, float *y, size_t ystride, size_t k, const size_t block,
                          const int mr) {
    const size_t nb = k / block;
    __m256 acc0[ET_MR], acc1[ET_MR];
    for (int i = 0; i < mr; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
    size_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        _mm_prefetch((const char *)(p + b * block / 2 + ET_PREFETCH), _MM_HINT_NTA);
        q4_f32_block(p, s[b], xp, k, b, block, mr, acc0);
        q4_f32_block(p, s[b + 1], xp, k, b + 1, block, mr, acc1);
    }
    if (b < nb) q4_f32_block(p, s[b], xp, k, b, block, mr, acc0);
    for (int i = 0; i < mr; i++)
        y[i * ystride] = hsum256(_mm256_add_ps(acc0[i], acc1[i]))
                         - zero_point_term(s, zps, xsum + i * nb, nb);
}

ET_INLINE void q4_f32_rows_avx2(const float *xp, const float *xsum, const uint8_t *packed,
                           const float *scales, const uint8_t *zps, float *y, size_t m,
                           size_t n, size_t k, const size_t block, size_t r0, size_t r1) {
    const size_t nb = k / block;
    for (size_t r = r0; r < r1; r++) {
        const uint8_t *p = packed + r * (k / 2);
        const float *s = scales + r * nb;
        const uint8_t *z = zps ? zps + r * nb : NULL;
#define ROW(MR) q4_f32_row(p, s, z, xp + i * k, xsum + i * nb, y + i * n + r, n, k, block, MR)
        ET_MR_GROUPS(m, ROW)
#undef ROW
    }
}

ET_AVX2 static void q4_gemm_f32_avx2(const float *xp, const float *xsum, const uint8_t *packed,
                                     const float *scales, const uint8_t *zps, float *y, size_t m,
                                     size_t n, size_t k, size_t block, size_t r0, size_t r1) {
#define CALL(B) q4_f32_rows_avx2(xp, xsum, packed, scales, zps, y, m, n, k, B, r0, r1)
    ET_BY_BLOCK(block, CALL)
#undef CALL
}

ET_AVX2 void et_prepare_q8(const float *x, q8_prep *P, float *xs, size_t m, size_t k,
                   size_t block) {
    const size_t nb = k / block;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    /* per 128-bit lane: its 8 even-position bytes, then its 8 odd-position bytes */
    const __m256i even_odd = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                              0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (size_t i = 0; i < m; i++) {
        int8_t *q = P->xq + i * k; /* codes in natural order first, chunk order below */
        for (size_t b = 0; b < nb; b++) {
            const float *xb = x + i * k + b * block;
            __m256 amax = _mm256_setzero_ps();
            for (size_t j = 0; j < block; j += 8)
                amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_loadu_ps(xb + j), absmask));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
            float s = _mm_cvtss_f32(m4) / 127.0f;
            float inv = s == 0.0f ? 0.0f : 1.0f / s;
            xs[i * nb + b] = s;
            /* x * inv rounded half to even (the default MXCSR mode, as numpy), clipped */
            const __m256 vinv = _mm256_set1_ps(inv);
            __m256i sum = _mm256_setzero_si256();
            for (size_t j = 0; j < block; j += 8) {
                __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + j), vinv),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                __m256i qi = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
                sum = _mm256_add_epi32(sum, qi);
                /* 8 int32 -> 8 int8 (saturation is a no-op within +-127): 4 per lane */
                __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(qi, qi), _mm256_packs_epi32(qi, qi));
                int32_t q03 = _mm_cvtsi128_si32(_mm256_castsi256_si128(w));
                int32_t q47 = _mm_cvtsi128_si32(_mm256_extracti128_si256(w, 1));
                memcpy(q + b * block + j, &q03, 4);
                memcpy(q + b * block + j + 4, &q47, 4);
            }
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
            P->cb[i * nb + b] = s * (float)_mm_cvtsi128_si32(s4);
            for (size_t l = 0; l < block / 8; l++) P->sx[i * (k / 8) + b * (block / 8) + l] = s;
        }
        /* each 64-code chunk: its 32 even-position codes, then its 32 odd-position ones */
        for (size_t c = 0; c < k / 64; c++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(q + 64 * c));
            __m256i d = _mm256_loadu_si256((const __m256i *)(q + 64 * c + 32));
            a = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(a, even_odd), 0xD8);
            d = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(d, even_odd), 0xD8);
            _mm256_storeu_si256((__m256i *)(q + 64 * c), _mm256_permute2x128_si256(a, d, 0x20));
            _mm256_storeu_si256((__m256i *)(q + 64 * c + 32), _mm256_permute2x128_si256(a, d, 0x31));
        }
    }
}


/* NF4's 16 fp32 code values as 4 byte planes, each a 16-entry byte-shuffle table repeated in
 * both 128-bit lanes: plane j holds byte j of every code value. Looking the 4 bytes up
 * separately and interleaving them rebuilds the exact fp32 values, 32 at a time with 12
 * shuffles, where a float table (two vpermps and a blend per 8 codes) needs 16 shuffle-unit
 * uops for the same 32 and ran at ~5 G weights/s a core here, half what DRAM delivers. */
typedef struct {
    __m256i plane[4];
} nf4_planes;

ET_INLINE nf4_planes nf4_tables(const float *code) {
    uint8_t b[4][16];
    for (int c = 0; c < 16; c++) {
        uint32_t u;
        memcpy(&u, code + c, sizeof u);
        for (int j = 0; j < 4; j++) b[j][c] = (uint8_t)(u >> (8 * j));
    }
    nf4_planes T;
    for (int j = 0; j < 4; j++)
        T.plane[j] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)b[j]));
    return T;
}

/* 32 code indices (bytes 0..15) -> their 32 code values in 4 vectors: lane t of out[j] holds
 * the value for the index at byte 16 * (t / 4) + 4 * j + t % 4 (the unpacks work within
 * 128-bit lanes; permute_nf4 orders the activations to match). */
ET_INLINE void nf4_decode32(__m256i idx, const nf4_planes *T, __m256 *out) {
    __m256i b0 = _mm256_shuffle_epi8(T->plane[0], idx), b1 = _mm256_shuffle_epi8(T->plane[1], idx);
    __m256i b2 = _mm256_shuffle_epi8(T->plane[2], idx), b3 = _mm256_shuffle_epi8(T->plane[3], idx);
    __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
    __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
    out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
    out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
    out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
    out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
}

/* Activations in the order nf4_block decodes a 64-element block (one 32-byte load: low
 * nibbles are the even elements, high nibbles the odd ones; see nf4_decode32). */
static void permute_nf4(const float *x, float *xp, size_t m, size_t k) {
    for (size_t i = 0; i < m; i++)
        for (size_t b = 0; b < k / 64; b++) {
            const float *xb = x + i * k + 64 * b;
            float *o = xp + i * k + 64 * b;
            for (size_t u = 0; u < 8; u++)
                for (size_t t = 0; t < 8; t++) {
                    size_t pos = 16 * (t / 4) + 4 * (u % 4) + t % 4; /* byte of the block */
                    o[8 * u + t] = xb[2 * pos + (u >= 4)];
                }
        }
}

/* One 64-element NF4 block of one weight row against MR activation rows: acc[i] += absmax *
 * sum code[q] x_i. The block is one 32-byte load; its 64 values are decoded once for all MR
 * rows. */
ET_INLINE void nf4_block(const uint8_t *p, float a, const float *xp, size_t k, size_t b,
                         const nf4_planes *T, const int mr, __m256 *acc) {
    const __m256i m4 = _mm256_set1_epi8(15);
    __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 * b));
    __m256 w[8];
    nf4_decode32(_mm256_and_si256(v, m4), T, w);
    /* high nibbles: v >> 4 as a 16-bit multiply-high by 2^12, which runs on the multiply
     * pipe rather than competing with the shuffles (measured ~4 % faster than a shift) */
    nf4_decode32(_mm256_and_si256(_mm256_mulhi_epu16(v, _mm256_set1_epi16(4096)), m4), T, w + 4);
    const __m256 va = _mm256_set1_ps(a);
    for (int i = 0; i < mr; i++) {
        const float *xb = xp + i * k + 64 * b;
        __m256 s0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
        __m256 s1 = _mm256_mul_ps(w[1], _mm256_loadu_ps(xb + 8));
        for (int u = 2; u < 8; u += 2) {
            s0 = _mm256_fmadd_ps(w[u], _mm256_loadu_ps(xb + 8 * u), s0);
            s1 = _mm256_fmadd_ps(w[u + 1], _mm256_loadu_ps(xb + 8 * u + 8), s1);
        }
        acc[i] = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), va, acc[i]);
    }
}

/* NF4 weight (n, k), k % 64 == 0: each 64-element block is scaled by its absmax. Blocks in
 * pairs into two register accumulators. */
ET_INLINE void nf4_row(const uint8_t *p, const et_absmax *absmax, size_t b0, const float *xp,
                       float *y, size_t ystride, size_t k, const nf4_planes *T, const int mr) {
    const size_t nb = k / 64;
    __m256 acc0[ET_MR], acc1[ET_MR];
    for (int i = 0; i < mr; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
    size_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        _mm_prefetch((const char *)(p + 32 * b + ET_PREFETCH), _MM_HINT_NTA);
        nf4_block(p, et_absmax_at(absmax, b0 + b), xp, k, b, T, mr, acc0);
        nf4_block(p, et_absmax_at(absmax, b0 + b + 1), xp, k, b + 1, T, mr, acc1);
    }
    if (b < nb) nf4_block(p, et_absmax_at(absmax, b0 + b), xp, k, b, T, mr, acc0);
    for (int i = 0; i < mr; i++) y[i * ystride] = hsum256(_mm256_add_ps(acc0[i], acc1[i]));
}

ET_AVX2 static void nf4_gemv_avx2(const float *xp, const uint8_t *packed, const et_absmax *absmax,
                                  const float *code, float *y, size_t m, size_t n, size_t k,
                                  size_t r0, size_t r1) {
    const nf4_planes T = nf4_tables(code);
    for (size_t r = r0; r < r1; r++) {
        const uint8_t *p = packed + r * (k / 2);
        const size_t b0 = r * (k / 64);
#define ROW(MR) nf4_row(p, absmax, b0, xp + i * k, y + i * n + r, n, k, &T, MR)
        ET_MR_GROUPS(m, ROW)
#undef ROW
    }
}

/* NF4 x Q8: the code book as int8 (|value| <= 127) in one byte-shuffle table of magnitudes.
 * A 64-element block is one 32-byte load: 2 shuffles give the 64 weight magnitudes, and the
 * sign goes onto the activations instead (vpsignb by code - 7: codes 0-6 are negative, 7 is
 * zero), so maddubs (u8 x s8 -> s16 pairs, at most 2 * 127 * 127, no saturation) computes
 * w * xq. The activations are prepared by et_prepare_q8 with 64-element blocks: its chunk order
 * (32 even-position codes, then 32 odd) meets the low and high nibbles of the load. */
ET_INLINE void nf4q8_block(const uint8_t *p, float a, const q8_prep *P, const float *xs127,
                           size_t i0, size_t k, size_t b, __m256i tabs, const int mr,
                           __m256 *acc) {
    const size_t nb = k / 64;
    const __m256i m4 = _mm256_set1_epi8(15), seven = _mm256_set1_epi8(7), ones = _mm256_set1_epi16(1);
    __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 * b));
    __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    __m256i wl = _mm256_shuffle_epi8(tabs, lo), wh = _mm256_shuffle_epi8(tabs, hi);
    __m256i sl = _mm256_sub_epi8(lo, seven), sh = _mm256_sub_epi8(hi, seven);
    for (int i = 0; i < mr; i++) {
        const int8_t *xb = P->xq + (i0 + i) * k + 64 * b;
        __m256i dl = _mm256_maddubs_epi16(wl, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xb), sl));
        __m256i dh = _mm256_maddubs_epi16(wh, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xb + 32)), sh));
        /* two s16 pair sums can exceed int16 together: widen each before adding */
        __m256i d = _mm256_add_epi32(_mm256_madd_epi16(dl, ones), _mm256_madd_epi16(dh, ones));
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(a * xs127[(i0 + i) * nb + b]), acc[i]);
    }
}

/* One NF4 weight row against MR activation rows; blocks in pairs into two accumulators. */
ET_INLINE void nf4q8_row(const uint8_t *p, const et_absmax *absmax, size_t b0, const q8_prep *P,
                         const float *xs127, size_t i0, float *y, size_t ystride, size_t k,
                         __m256i tabs, const int mr) {
    const size_t nb = k / 64;
    __m256 acc0[ET_MR], acc1[ET_MR];
    for (int i = 0; i < mr; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
    size_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        _mm_prefetch((const char *)(p + 32 * b + ET_PREFETCH), _MM_HINT_NTA);
        nf4q8_block(p, et_absmax_at(absmax, b0 + b), P, xs127, i0, k, b, tabs, mr, acc0);
        nf4q8_block(p, et_absmax_at(absmax, b0 + b + 1), P, xs127, i0, k, b + 1, tabs, mr, acc1);
    }
    if (b < nb) nf4q8_block(p, et_absmax_at(absmax, b0 + b), P, xs127, i0, k, b, tabs, mr, acc0);
    for (int i = 0; i < mr; i++) y[i * ystride] = hsum256(_mm256_add_ps(acc0[i], acc1[i]));
}

ET_AVX2 static void nf4q8_gemv_avx2(const q8_prep *P, const float *xs127, const uint8_t *packed,
                                    const et_absmax *absmax, const int8_t *code, float *y,
                                    size_t m, size_t n, size_t k, size_t r0, size_t r1) {
    uint8_t mag[16];
    for (int c = 0; c < 16; c++) mag[c] = (uint8_t)(code[c] < 0 ? -code[c] : code[c]);
    const __m256i tabs = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)mag));
    for (size_t r = r0; r < r1; r++) {
        const uint8_t *p = packed + r * (k / 2);
        const size_t b0 = r * (k / 64);
#define ROW(MR) nf4q8_row(p, absmax, b0, P, xs127, i, y + i * n + r, n, k, tabs, MR)
        ET_MR_GROUPS(m, ROW)
#undef ROW
    }
}

/* 8-bit weights (zero point 128) x fp32 activations: 8 codes widened to floats per FMA, the
 * zero point folded into the block sums of x. */
ET_INLINE void q8w_block(const uint8_t *q, float sb, const float *x, size_t k, size_t b,
                         const size_t block, const int mr, __m256 *acc) {
    __m256 ta[ET_MR], tb[ET_MR];
    for (int i = 0; i < mr; i++) ta[i] = tb[i] = _mm256_setzero_ps();
    for (size_t t = 0; t < block; t += 16) { /* a constant trip count: unrolls completely */
        const size_t j = b * block + t;
        __m128i v = _mm_loadu_si128((const __m128i *)(q + j));
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
        for (int i = 0; i < mr; i++) {
            ta[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + i * k + j), ta[i]);
            tb[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + i * k + j + 8), tb[i]);
        }
    }
    const __m256 vs = _mm256_set1_ps(sb);
    for (int i = 0; i < mr; i++) acc[i] = _mm256_fmadd_ps(_mm256_add_ps(ta[i], tb[i]), vs, acc[i]);
}

/* 8-bit weights (zero point 128) x fp32 activations: 8 codes widened to floats per FMA, the
 * zero point folded into the block sums of x; blocks in pairs into two register
 * accumulators. */
ET_INLINE void q8w_row(const uint8_t *q, const float *s, const float *x, const float *xsum,
                       float *y, size_t ystride, size_t k, const size_t block, const int mr) {
    const size_t nb = k / block;
    __m256 acc0[ET_MR], acc1[ET_MR];
    for (int i = 0; i < mr; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
    size_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        _mm_prefetch((const char *)(q + b * block + ET_PREFETCH), _MM_HINT_NTA);
        if (block > 32) _mm_prefetch((const char *)(q + b * block + 64 + ET_PREFETCH), _MM_HINT_NTA);
        q8w_block(q, s[b], x, k, b, block, mr, acc0);
        q8w_block(q, s[b + 1], x, k, b + 1, block, mr, acc1);
    }
    if (b < nb) q8w_block(q, s[b], x, k, b, block, mr, acc0);
    for (int i = 0; i < mr; i++) {
        float corr = 0.0f; /* 128 * sum_b s_b * xsum_b */
        for (size_t b2 = 0; b2 < nb; b2++) corr += s[b2] * xsum[i * nb + b2];
        y[i * ystride] = hsum256(_mm256_add_ps(acc0[i], acc1[i])) - 128.0f * corr;
    }
}

ET_INLINE void q8w_rows_avx2(const float *x, const float *xsum, const uint8_t *codes,
                        const float *scales, float *y, size_t m, size_t n, size_t k,
                        const size_t block, size_t r0, size_t r1) {
    const size_t nb = k / block;
    for (size_t r = r0; r < r1; r++) {
        const uint8_t *q = codes + r * k;
        const float *s = scales + r * nb;
#define ROW(MR) q8w_row(q, s, x + i * k, xsum + i * nb, y + i * n + r, n, k, block, MR)
        ET_MR_GROUPS(m, ROW)
#undef ROW
    }
}

ET_AVX2 static void q8w_gemm_avx2(const float *x, const float *xsum, const uint8_t *codes,
                                  const float *scales, float *y, size_t m, size_t n, size_t k,
                                  size_t block, size_t r0, size_t r1) {
#define CALL(B) q8w_rows_avx2(x, xsum, codes, scales, y, m, n, k, B, r0, r1)
    ET_BY_BLOCK(block, CALL)
#undef CALL
}
#endif

/* ---- entry points ------------------------------------------------------------------------ */

int et_q4_gemm_f32(const float *x, const uint8_t *packed, const float *scales, const uint8_t *zps,
                   float *y, size_t m, size_t n, size_t k, size_t block, int threads, int use_simd) {
    int nt = team_size(threads, n, k);
#ifdef ET_X86
    if (use_simd && k % 16 == 0) {
        float *xp = malloc(sizeof(float) * (m * k + m * (k / block)));
        if (xp) {
            float *xsum = xp + m * k;
            permute_f32(x, xp, xsum, m, k, block);
            ET_FOR_ROWS(nt, n, q4_gemm_f32_avx2(xp, xsum, packed, scales, zps, y, m, n, k, block, r0, r1));
            free(xp);
            return 0;
        }
        return -1;
    }
#endif
    (void)use_simd;
    ET_FOR_ROWS(nt, n, q4_gemm_f32_rows(x, packed, scales, zps, y, m, n, k, block, r0, r1));
    return 0;
}


int et_nf4_gemv(const float *x, const uint8_t *packed, const et_absmax *absmax, const float *code,
                float *y, size_t m, size_t n, size_t k, int threads, int use_simd) {
    int nt = team_size(threads, n, k);
#ifdef ET_X86
    if (use_simd && k % 64 == 0) {
        float *xp = malloc(sizeof(float) * m * k);
        if (xp) {
            permute_nf4(x, xp, m, k);
            ET_FOR_ROWS(nt, n, nf4_gemv_avx2(xp, packed, absmax, code, y, m, n, k, r0, r1));
            free(xp);
            return 0;
        }
        return -1;
    }
#endif
    (void)use_simd;
    ET_FOR_ROWS(nt, n, nf4_gemv_rows(x, packed, absmax, code, y, m, n, k, r0, r1));
    return 0;
}

int et_nf4_q8_gemv(const float *x, const uint8_t *packed, const et_absmax *absmax,
                   const int8_t *code, float *y, size_t m, size_t n, size_t k, int threads,
                   int use_simd) {
    if (k % 64) return -2; /* the Python boundary rejects this first */
    int nt = team_size(threads, n, k), simd = 0;
    size_t nb = k / 64;
    /* one allocation: codes (m k), lane scales (m k / 8), block scales, their sums and the
     * block scales / 127 (3 m nb) */
    char *buf = malloc(m * k + sizeof(float) * (m * k / 8 + 3 * m * nb));
    if (!buf) return -1;
    int8_t *xq = (int8_t *)buf;
    float *sx = (float *)(buf + m * k), *xs = sx + m * k / 8, *cb = xs + m * nb, *xs127 = cb + m * nb;
#ifdef ET_X86
    q8_prep P = {xq, sx, cb, NULL};
    if (use_simd) {
        et_prepare_q8(x, &P, xs, m, k, 64);
        simd = 1;
    }
#endif
    (void)use_simd;
    (void)cb;
    if (!simd) et_q8_quantize(x, xq, xs, m, k, 64);
    for (size_t j = 0; j < m * nb; j++) xs127[j] = xs[j] / 127.0f;
#ifdef ET_X86
    if (simd)
        ET_FOR_ROWS(nt, n, nf4q8_gemv_avx2(&P, xs127, packed, absmax, code, y, m, n, k, r0, r1));
    else
#endif
        ET_FOR_ROWS(nt, n, nf4q8_rows(xq, xs127, packed, absmax, code, y, m, n, k, r0, r1));
    free(buf);
    return 0;
}

int et_q8w_gemm(const float *x, const uint8_t *codes, const float *scales, float *y, size_t m,
                size_t n, size_t k, size_t block, int threads, int use_simd) {
    int nt = team_size(threads, n, k);
#ifdef ET_X86
    if (use_simd && block % 16 == 0) {
        float *xsum = malloc(sizeof(float) * m * (k / block));
        if (!xsum) return -1;
        for (size_t i = 0; i < m * (k / block); i++) {
            float t = 0.0f;
            for (size_t j = 0; j < block; j++) t += x[i * block + j];
            xsum[i] = t;
        }
        ET_FOR_ROWS(nt, n, q8w_gemm_avx2(x, xsum, codes, scales, y, m, n, k, block, r0, r1));
        free(xsum);
        return 0;
    }
#endif
    (void)use_simd;
    ET_FOR_ROWS(nt, n, q8w_rows(x, codes, scales, y, m, n, k, block, r0, r1));
    return 0;
}
