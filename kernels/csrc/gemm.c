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

/* One output row n, one activation row: sum_b scale_b * (sum_k q*x - zp_b * sum_k x), with
 * the q*x products accumulated in vectors and the block scale applied as a vector FMA, so
 * there is one horizontal sum per output, not one per block. */
__attribute__((target("avx2,fma")))
static float q4_dot_f32_avx2(const float *x, const float *xsum, const uint8_t *p, const float *sc,
                             const uint8_t *zp, size_t nb, size_t block) {
    __m256 acc = _mm256_setzero_ps();
    float corr = 0.0f;
    for (size_t b = 0; b < nb; b++) {
        __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
        for (size_t c = 0; c < block; c += 32) {
            __m256i q = unpack32(p + (b * block + c) / 2);
            __m128i qa = _mm256_castsi256_si128(q), qb = _mm256_extracti128_si256(q, 1);
            const float *xb = x + b * block + c;
            d0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(qa)), _mm256_loadu_ps(xb), d0);
            d1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(qa, 8))),
                                 _mm256_loadu_ps(xb + 8), d1);
            d0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(qb)), _mm256_loadu_ps(xb + 16), d0);
            d1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(qb, 8))),
                                 _mm256_loadu_ps(xb + 24), d1);
        }
        acc = _mm256_fmadd_ps(_mm256_add_ps(d0, d1), _mm256_set1_ps(sc[b]), acc);
        corr += (float)zp[b] * xsum[b] * sc[b];
    }
    return hsum256(acc) - corr;
}

__attribute__((target("avx2,fma")))
static void q4_gemm_f32_rows_avx2(const float *x, const float *xsum, const uint8_t *packed,
                                  const float *scales, const uint8_t *zps, float *y, size_t m,
                                  size_t n, size_t k, size_t block, size_t r0, size_t r1) {
    size_t nb = k / block;
    for (size_t r = r0; r < r1; r++)
        for (size_t i = 0; i < m; i++)
            y[i * n + r] = q4_dot_f32_avx2(x + i * k, xsum + i * nb, packed + r * nb * (block / 2),
                                           scales + r * nb, zps + r * nb, nb, block);
}
#endif

void et_q4_gemm_f32(const float *x, const uint8_t *packed, const float *scales, const uint8_t *zps,
                    float *y, size_t m, size_t n, size_t k, size_t block, int threads, int use_simd) {
    size_t nb = k / block;
    float xsum_stack[4096];
    int simd = use_simd && block % 32 == 0 && m * nb <= 4096;
    if (simd) /* sum of each activation block, to fold the zero point in */
        for (size_t i = 0; i < m * nb; i++) {
            float s = 0.0f;
            for (size_t j = 0; j < block; j++) s += x[i * block + j];
            xsum_stack[i] = s;
        }
    int nt = threads > 0 ? threads : 1;
    #pragma omp parallel num_threads(nt)
    {
        size_t r0, r1;
        thread_rows(n, &r0, &r1);
#ifdef ET_X86
        if (simd)
            q4_gemm_f32_rows_avx2(x, xsum_stack, packed, scales, zps, y, m, n, k, block, r0, r1);
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
/* int8 x uint4 products with maddubs (u8 x s8 -> s16 pairs; |15 * 127 * 2| fits), pairs to
 * int32 with madd, the block's int32 lanes converted to float and scaled by ws * xs in a vector
 * FMA: one horizontal sum per output. The zero point folds in as zp * sum(xq) per block. */
__attribute__((target("avx2,fma")))
static void q4q8_rows_avx2(const int8_t *xq, const float *xs, const uint8_t *packed,
                           const float *scales, const uint8_t *zps, float *y, size_t m, size_t n,
                           size_t k, size_t block, size_t r0, size_t r1, const int32_t *xsum) {
    size_t nb = k / block;
    const __m256i ones = _mm256_set1_epi16(1);
    for (size_t r = r0; r < r1; r++) {
        const uint8_t *p = packed + r * nb * (block / 2);
        for (size_t i = 0; i < m; i++) {
            __m256 acc = _mm256_setzero_ps();
            float corr = 0.0f;
            for (size_t b = 0; b < nb; b++) {
                __m256i dot = _mm256_setzero_si256();
                for (size_t c = 0; c < block; c += 32) {
                    __m256i q = unpack32(p + (b * block + c) / 2);
                    __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + i * k + b * block + c));
                    dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(q, xv), ones));
                }
                float s = scales[r * nb + b] * xs[i * nb + b];
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s), acc);
                corr += (float)((int32_t)zps[r * nb + b] * xsum[i * nb + b]) * s;
            }
            y[i * n + r] = hsum256(acc) - corr;
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
