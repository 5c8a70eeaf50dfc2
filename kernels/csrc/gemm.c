/* Q4 (MatMulNBits) GEMV / small GEMM: fp32 activations and int8 activations.
 * Portable versions are the readable spec in C; AVX2+FMA versions are chosen at run
 * time. Both split output rows (N) across OpenMP threads. */
#include "edgetune_kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define ET_X86 1
#include <immintrin.h>
#endif

/* This thread's share [r0, r1) of n output rows inside an OpenMP parallel region. */
static void thread_rows(size_t n, size_t *r0, size_t *r1) {
    size_t t = 0, T = 1;
#ifdef _OPENMP
    t = (size_t)omp_get_thread_num();
    T = (size_t)omp_get_num_threads();
#endif
    *r0 = n * t / T;
    *r1 = n * (t + 1) / T;
}

/* ---- fp32 activations ------------------------------------------------------------ */

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
                float dot = 0.0f, z = (float)zps[r * nb + b];
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

#ifdef ET_X86
__attribute__((target("avx2,fma")))
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* 16 packed bytes -> 32 codes in element order (low nibble of byte j = element 2j). */
__attribute__((target("avx2,fma")))
static inline __m256i unpack32(const uint8_t *p) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    __m128i lo = _mm_and_si128(bytes, mask);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    return _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
}

#define ET_MAX_M 16
__attribute__((target("avx2,fma")))
static void q4_gemm_f32_rows_avx2(const float *x, const uint8_t *packed, const float *scales,
                                  const uint8_t *zps, float *y, size_t m, size_t n, size_t k,
                                  size_t block, size_t r0, size_t r1) {
    size_t nb = k / block;
    for (size_t r = r0; r < r1; r++) {
        for (size_t i0 = 0; i0 < m; i0 += ET_MAX_M) {
            size_t mm = m - i0 < ET_MAX_M ? m - i0 : ET_MAX_M;
            float acc[ET_MAX_M] = {0};
            for (size_t b = 0; b < nb; b++) {
                const __m256 z = _mm256_set1_ps((float)zps[r * nb + b]);
                __m256 dots[ET_MAX_M];
                for (size_t i = 0; i < mm; i++) dots[i] = _mm256_setzero_ps();
                for (size_t c = 0; c < block; c += 32) {
                    __m256i q = unpack32(packed + (r * nb + b) * (block / 2) + c / 2);
                    __m128i qa = _mm256_castsi256_si128(q), qb = _mm256_extracti128_si256(q, 1);
                    __m256 w0 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(qa)), z);
                    __m256 w1 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(qa, 8))), z);
                    __m256 w2 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(qb)), z);
                    __m256 w3 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(qb, 8))), z);
                    for (size_t i = 0; i < mm; i++) {
                        const float *xr = x + (i0 + i) * k + b * block + c;
                        __m256 d = dots[i];
                        d = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), d);
                        d = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), d);
                        d = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), d);
                        d = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), d);
                        dots[i] = d;
                    }
                }
                float s = scales[r * nb + b];
                for (size_t i = 0; i < mm; i++) acc[i] += hsum256(dots[i]) * s;
            }
            for (size_t i = 0; i < mm; i++) y[(i0 + i) * n + r] = acc[i];
        }
    }
}
#endif

void et_q4_gemm_f32(const float *x, const uint8_t *packed, const float *scales, const uint8_t *zps,
                    float *y, size_t m, size_t n, size_t k, size_t block, int threads, int use_simd) {
    int nt = threads > 0 ? threads : 1;
    #pragma omp parallel num_threads(nt)
    {
        size_t r0, r1;
        thread_rows(n, &r0, &r1);
#ifdef ET_X86
        if (use_simd && block % 32 == 0)
            q4_gemm_f32_rows_avx2(x, packed, scales, zps, y, m, n, k, block, r0, r1);
        else
#endif
            q4_gemm_f32_rows(x, packed, scales, zps, y, m, n, k, block, r0, r1);
    }
}

/* ---- int8 activations (integer datapath) ------------------------------------------ */

static void q4q8_rows(const int8_t *xq, const float *xs, const uint8_t *packed, const float *scales,
                      const uint8_t *zps, float *y, size_t m, size_t n, size_t k, size_t block,
                      size_t r0, size_t r1) {
    size_t nb = k / block;
    for (size_t r = r0; r < r1; r++) {
        for (size_t i = 0; i < m; i++) {
            float acc = 0.0f;
            for (size_t b = 0; b < nb; b++) {
                const uint8_t *p = packed + (r * nb + b) * (block / 2);
                const int8_t *xb = xq + i * k + b * block;
                int32_t dot = 0, z = zps[r * nb + b];
                for (size_t j = 0; j < block / 2; j++) {
                    dot += ((int32_t)(p[j] & 15) - z) * xb[2 * j];
                    dot += ((int32_t)(p[j] >> 4) - z) * xb[2 * j + 1];
                }
                acc += (float)dot * (scales[r * nb + b] * xs[i * nb + b]);
            }
            y[i * n + r] = acc;
        }
    }
}

#ifdef ET_X86
__attribute__((target("avx2,fma")))
static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2,fma")))
static void q4q8_rows_avx2(const int8_t *xq, const float *xs, const uint8_t *packed,
                           const float *scales, const uint8_t *zps, float *y, size_t m, size_t n,
                           size_t k, size_t block, size_t r0, size_t r1, const int32_t *xsum) {
    size_t nb = k / block;
    const __m256i ones = _mm256_set1_epi16(1);
    for (size_t r = r0; r < r1; r++) {
        for (size_t i = 0; i < m; i++) {
            float acc = 0.0f;
            for (size_t b = 0; b < nb; b++) {
                __m256i dot = _mm256_setzero_si256();
                for (size_t c = 0; c < block; c += 32) {
                    __m256i q = unpack32(packed + (r * nb + b) * (block / 2) + c / 2);
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + i * k + b * block + c));
                    /* u8 x s8 -> s16 pairs (|15 * 127 * 2| fits), then pairs -> s32 */
                    dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones));
                }
                int32_t s = hsum_epi32(dot) - (int32_t)zps[r * nb + b] * xsum[i * nb + b];
                acc += (float)s * (scales[r * nb + b] * xs[i * nb + b]);
            }
            y[i * n + r] = acc;
        }
    }
}
#endif

void et_q4q8_gemm(const int8_t *xq, const float *xs, const uint8_t *packed, const float *scales,
                  const uint8_t *zps, float *y, size_t m, size_t n, size_t k, size_t block,
                  int threads, int use_simd) {
    size_t nb = k / block;
    int32_t xsum_stack[4096];
    int32_t *xsum = xsum_stack;
    int simd = use_simd && block % 32 == 0 && m * nb <= 4096;
    if (simd) { /* sum of each activation block, to fold the zero point in */
        for (size_t i = 0; i < m * nb; i++) {
            int32_t s = 0;
            for (size_t j = 0; j < block; j++) s += xq[i * block + j];
            xsum[i] = s;
        }
    }
    int nt = threads > 0 ? threads : 1;
    #pragma omp parallel num_threads(nt)
    {
        size_t r0, r1;
        thread_rows(n, &r0, &r1);
#ifdef ET_X86
        if (simd)
            q4q8_rows_avx2(xq, xs, packed, scales, zps, y, m, n, k, block, r0, r1, xsum);
        else
#endif
            q4q8_rows(xq, xs, packed, scales, zps, y, m, n, k, block, r0, r1);
    }
}
