/* Internals shared by the matmul files of the C core (gemm.c, q4q8.c): the thread split,
 * the activation-row groups, the block-size switch and the Q8 activation layout. */
#ifndef EDGETUNE_GEMM_INTERNAL_H
#define EDGETUNE_GEMM_INTERNAL_H
#include "edgetune_kernels.h"
#include "et_simd.h"

#define ET_MR 4 /* activation rows sharing one decode of a weight row */
#ifndef ET_PREFETCH
#define ET_PREFETCH 1024 /* bytes ahead of the weight stream to prefetch */
#endif

/* Output rows go to threads in chunks, whichever thread is free taking the next one (OpenMP
 * dynamic schedule), so a core slowed by a busy neighbour (a shared vCPU, a little core)
 * takes fewer rows instead of holding the others at the join; measured here, one of the two
 * vCPUs ran a kernel up to 1.8x slower than the other, and an even split ran at its pace.
 * About 16 chunks a thread: big enough to keep each weight stream long. Statement `...`
 * reads its rows as [r0, r1). */
#define ET_FOR_ROWS(nt, n, ...)                                                               \
    do {                                                                                      \
        const size_t et_chunk_ = (n) / (16 * (size_t)(nt)) > 0 ? (n) / (16 * (size_t)(nt)) : 1; \
        const size_t et_count_ = ((n) + et_chunk_ - 1) / et_chunk_;                           \
        _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nt)")                      \
        for (size_t et_c_ = 0; et_c_ < et_count_; et_c_++) {                                  \
            const size_t r0 = et_c_ * et_chunk_;                                              \
            const size_t r1 = r0 + et_chunk_ < (n) ? r0 + et_chunk_ : (n);                    \
            __VA_ARGS__;                                                                      \
        }                                                                                     \
    } while (0)

/* Threads worth starting for a matmul of n rows x k: one for small ones (start-up costs more). */
static int team_size(int threads, size_t n, size_t k) {
    int nt = threads > 0 ? threads : 1;
    return n * k < (1u << 16) ? 1 : nt;
}

#ifdef ET_X86
/* For activation rows i = 0 .. m-1 in groups of 4 (ET_MR), then 2, then 1, runs ROW(MR) with
 * `i` the group's first row. MR is a compile-time constant at each expansion, so the row
 * kernels' loops over their activation rows unroll. */
#define ET_MR_GROUPS(m, ROW)                                                                  \
    for (size_t i = 0; i < (m);) {                                                            \
        if (i + 4 <= (m)) {                                                                   \
            ROW(4);                                                                           \
            i += 4;                                                                           \
        } else if (i + 2 <= (m)) {                                                            \
            ROW(2);                                                                           \
            i += 2;                                                                           \
        } else {                                                                              \
            ROW(1);                                                                           \
            i += 1;                                                                           \
        }                                                                                     \
    }

/* CALL(BLOCK) with the common block sizes as compile-time constants (the row kernels are
 * always inlined, so each size gets its own fully unrolled block loop). */
#define ET_BY_BLOCK(block, CALL)                                                              \
    switch (block) {                                                                          \
    case 16: CALL(16); break;                                                                 \
    case 32: CALL(32); break;                                                                 \
    case 64: CALL(64); break;                                                                 \
    case 128: CALL(128); break;                                                               \
    default: CALL(block);                                                                     \
    }

/* sum_b s[b] * z[b] * xsum[b] over one row's blocks (z = 8 when zps is NULL): the zero-point
 * term that the kernels subtract once per output instead of once per weight. */
ET_INLINE float zero_point_term(const float *s, const uint8_t *zps, const float *xsum, size_t nb) {
    __m256 acc = _mm256_setzero_ps();
    size_t b = 0;
    for (; b + 8 <= nb; b += 8) {
        __m256 sx = _mm256_mul_ps(_mm256_loadu_ps(s + b), _mm256_loadu_ps(xsum + b));
        __m256 z = zps ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zps + b))))
                       : _mm256_set1_ps(8.0f);
        acc = _mm256_fmadd_ps(sx, z, acc);
    }
    float t = hsum256(acc);
    for (; b < nb; b++) t += s[b] * xsum[b] * (zps ? (float)zps[b] : 8.0f);
    return t;
}

/* int8 activations, prepared per 64-element chunk (32 packed bytes): 32 even-position codes,
 * then 32 odd-position codes; the activation scale of each of the chunk's 8 int32 lanes (8
 * consecutive elements each); and per block xs_b * sum(xq_b) for the zero-point term. */
typedef struct {
    int8_t *xq; /* (m, k) permuted codes */
    float *sx;  /* (m, k / 8) activation scale of the lane's block */
    float *cb;  /* (m, nb) xs_b * sum of block b's codes */
    int32_t *nl; /* (m, k / 8) q4q8.c: -8 x the lane's codes (symmetric weights) or 0 */
} q8_prep;

/* Quantizes x (M, K) per block into P (bit-exact with et_q8_quantize) with xs the block
 * scales; gemm.c. */
void et_prepare_q8(const float *x, q8_prep *P, float *xs, size_t m, size_t k, size_t block);

/* The weight scale of each of a chunk's 8 lanes (lane l covers elements 8l..8l+7). */
ET_INLINE __m256 lane_scales(const float *s, size_t c, const size_t block) {
    if (block == 16) /* 4 blocks a chunk: lanes (0,1)(2,3)(4,5)(6,7) */
        return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(s + 4 * c)),
                                        _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
    if (block == 32) /* 2 blocks a chunk: lanes 0-3 and 4-7 */
        return _mm256_permutevar8x32_ps(_mm256_castpd_ps(_mm256_broadcast_sd((const double *)(s + 2 * c))),
                                        _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
    return _mm256_broadcast_ss(s + (64 * c) / block);
}
#endif

#endif
