/* Q4 (MatMulNBits) x Q8 activations: the integer datapath of the native backend, on every
 * x86 instruction set it meets (et_best_isa):
 *
 *   scalar       the spec in C (q4q8_rows);
 *   AVX2         vpmaddubsw (u8 x s8 -> s16 pairs) + vpmaddwd (-> int32), 256-bit;
 *   AVX-VNNI     vpdpbusd (u8 x s8, 4 products into an int32 lane in one instruction), 256-bit
 *                (Intel Alder Lake / Sapphire Rapids and later, AMD Zen 5);
 *   AVX-512 VNNI vpdpbusd on 512-bit registers: two 64-element chunks per instruction (Intel
 *                Ice Lake / Cascade Lake and later, AMD Zen 4 and 5).
 *
 * All three SIMD paths compute each int32 lane from the same 8 products (maddubs cannot
 * saturate here: 2 * 15 * 127 and twice that fit in int16) and scale and accumulate the lanes
 * in the same order, so their outputs are bit-identical to each other. The AVX-512 path holds
 * the AVX2 path's two accumulators (even and odd chunks) as the two halves of one register,
 * and reads activations laid out by pair_layout so a 64-byte weight load meets both chunks'
 * even-position codes in one load and their odd-position codes in the next. */
#include <stdlib.h>
#include <string.h>

#include "et_gemm.h"

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
                int32_t dot = 0, z = zps ? zps[r * nb + b] : 8;
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
#define ET_NR 4 /* weight rows decoded together: each activation load feeds all of them */
#define ET_VNNI256_INLINE static inline __attribute__((always_inline, target("avx2,fma,avxvnni")))
#define ET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
#define ET_AVX512_INLINE \
    static inline __attribute__((always_inline, target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))

/* The 8 int32 lane sums of one 64-element chunk: lane l = off[l] + the sum over elements
 * 8l..8l+7 of q * xq, from the chunk's low nibbles (lo) against its even-position codes
 * xc[0..32) and its high nibbles (hi) against the odd-position codes xc[32..64). With off =
 * -8 x the lane's codes (P->nl) that is sum (q - 8) xq: a symmetric weight's zero point
 * costs nothing (VNNI starts its accumulator there) instead of a pass over the blocks per
 * output (measured: 10-19 % of a GEMM at m = 16-64). */
ET_INLINE __m256i dot_avx2(__m256i lo, __m256i hi, const int8_t *xc, __m256i off) {
    __m256i d = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xc)),
                                 _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xc + 32))));
    return _mm256_add_epi32(_mm256_madd_epi16(d, _mm256_set1_epi16(1)), off);
}

ET_VNNI256_INLINE __m256i dot_vnni256(__m256i lo, __m256i hi, const int8_t *xc, __m256i off) {
    __m256i d = _mm256_dpbusd_avx_epi32(off, lo, _mm256_loadu_si256((const __m256i *)xc));
    return _mm256_dpbusd_avx_epi32(d, hi, _mm256_loadu_si256((const __m256i *)(xc + 32)));
}

/* The 256-bit kernels over one chunk dot product DOT, for the target ATTR / ATTR_INLINE:
 *   q4q8_chunk_<S>  one chunk of one weight row against MR activation rows: acc[i] += the
 *                   chunk's lane sums x activation lane scale x weight lane scale;
 *   q4q8_tile_<S>   nr weight rows x mr activation rows: chunks in pairs into two register
 *                   accumulators (even and odd chunks), the zero points off once per output;
 *   q4q8_gemm_<S>   weight rows [r0, r1) against all M activation rows, `block` a compile-time
 *                   constant at each expansion (ET_BY_BLOCK) so the chunk loop unrolls. */
#define ET_Q4Q8_256(S, ATTR, ATTR_INLINE, DOT)                                                   \
    ATTR_INLINE void q4q8_chunk_##S(const uint8_t *p, const float *s, const q8_prep *P, size_t i0, \
                                    size_t k, size_t c, const size_t block, const int mr,        \
                                    __m256 *acc) {                                               \
        const __m256i m4 = _mm256_set1_epi8(15);                                                 \
        /* a few cache lines ahead of the weight stream (the thread's rows are one contiguous   \
         * stream), non-temporal so the streamed weights do not evict the rest */               \
        _mm_prefetch((const char *)(p + 32 * c + ET_PREFETCH), _MM_HINT_NTA);                     \
        __m256i w = _mm256_loadu_si256((const __m256i *)(p + 32 * c));                           \
        __m256i lo = _mm256_and_si256(w, m4);                                                    \
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);                              \
        __m256 sw = lane_scales(s, c, block);                                                    \
        for (int i = 0; i < mr; i++) {                                                           \
            __m256i d = DOT(lo, hi, P->xq + (i0 + i) * k + 64 * c,                               \
                            _mm256_loadu_si256((const __m256i *)(P->nl + (i0 + i) * (k / 8) + 8 * c))); \
            __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(d),                                      \
                                     _mm256_loadu_ps(P->sx + (i0 + i) * (k / 8) + 8 * c));       \
            acc[i] = _mm256_fmadd_ps(t, sw, acc[i]);                                             \
        }                                                                                        \
    }                                                                                            \
    /* nr weight rows from r against mr activation rows from i0 (nr * mr <= 4: 8 accumulators \
     * of the 16 registers) */                                                                  \
    ATTR_INLINE void q4q8_tile_##S(const uint8_t *packed, const float *scales,                   \
                                   const uint8_t *zps, const q8_prep *P, size_t r, size_t i0,    \
                                   float *y, size_t n, size_t k, const size_t block,             \
                                   const int nr, const int mr) {                                 \
        const size_t chunks = k / 64, nb = k / block;                                            \
        __m256 acc0[ET_NR][ET_MR], acc1[ET_NR][ET_MR];                                           \
        for (int j = 0; j < nr; j++)                                                             \
            for (int i = 0; i < mr; i++) acc0[j][i] = acc1[j][i] = _mm256_setzero_ps();          \
        size_t c = 0;                                                                            \
        for (; c + 2 <= chunks; c += 2)                                                          \
            for (int j = 0; j < nr; j++) {                                                       \
                const uint8_t *p = packed + (r + j) * (k / 2);                                   \
                const float *s = scales + (r + j) * nb;                                          \
                q4q8_chunk_##S(p, s, P, i0, k, c, block, mr, acc0[j]);                           \
                q4q8_chunk_##S(p, s, P, i0, k, c + 1, block, mr, acc1[j]);                       \
            }                                                                                    \
        if (c < chunks)                                                                          \
            for (int j = 0; j < nr; j++)                                                         \
                q4q8_chunk_##S(packed + (r + j) * (k / 2), scales + (r + j) * nb, P, i0, k, c,   \
                               block, mr, acc0[j]);                                              \
        for (int j = 0; j < nr; j++)                                                             \
            for (int i = 0; i < mr; i++)                                                         \
                y[(i0 + i) * n + r + j] =                                                        \
                    hsum256(_mm256_add_ps(acc0[j][i], acc1[j][i]))                               \
                    - (zps ? zero_point_term(scales + (r + j) * nb, zps + (r + j) * nb,          \
                                             P->cb + (i0 + i) * nb, nb)                          \
                           : 0.0f);                                                              \
    }                                                                                            \
    /* a GEMV (m = 1) decodes 4 weight rows together (4 concurrent streams; see the AVX-512 \
     * path), a GEMM one weight row per group of up to 4 activation rows */                     \
    ATTR_INLINE void q4q8_rows_##S(const q8_prep *P, const uint8_t *packed, const float *scales, \
                                   const uint8_t *zps, float *y, size_t m, size_t n, size_t k,   \
                                   const size_t block, size_t r0, size_t r1) {                   \
        size_t r = r0;                                                                           \
        if (m == 1)                                                                              \
            for (; r + ET_NR <= r1; r += ET_NR)                                                  \
                q4q8_tile_##S(packed, scales, zps, P, r, 0, y, n, k, block, ET_NR, 1);           \
        for (; r < r1; r++) {                                                                    \
            ET_MR_GROUPS(m, Q4Q8_ROW_##S)                                                        \
        }                                                                                        \
    }                                                                                            \
    ATTR static void q4q8_gemm_##S(const q8_prep *P, const uint8_t *packed, const float *scales, \
                                   const uint8_t *zps, float *y, size_t m, size_t n, size_t k,   \
                                   size_t block, size_t r0, size_t r1) {                         \
        ET_BY_BLOCK(block, Q4Q8_CALL_##S)                                                        \
    }

#define Q4Q8_ROW_avx2(MR) q4q8_tile_avx2(packed, scales, zps, P, r, i, y, n, k, block, 1, MR)
#define Q4Q8_CALL_avx2(B) q4q8_rows_avx2(P, packed, scales, zps, y, m, n, k, B, r0, r1)
ET_Q4Q8_256(avx2, ET_AVX2, ET_INLINE, dot_avx2)

#define ET_VNNI256 __attribute__((target("avx2,fma,avxvnni")))
#define Q4Q8_ROW_vnni256(MR) q4q8_tile_vnni256(packed, scales, zps, P, r, i, y, n, k, block, 1, MR)
#define Q4Q8_CALL_vnni256(B) q4q8_rows_vnni256(P, packed, scales, zps, y, m, n, k, B, r0, r1)
ET_Q4Q8_256(vnni256, ET_VNNI256, ET_VNNI256_INLINE, dot_vnni256)

/* ---- AVX-512 VNNI ------------------------------------------------------------------------ */

/* P->nl: per int32 lane (8 consecutive elements), -8 x the sum of its codes for a symmetric
 * weight (zps NULL; see dot_avx2), 0 for stored zero points (they come off per output, as
 * zero_point_term). Reads the chunk order et_prepare_q8 writes: element 8l + 2t is even code
 * 4l + t, element 8l + 2t + 1 odd code 4l + t. */
static void lane_offsets(const q8_prep *P, size_t m, size_t k, int symmetric) {
    for (size_t i = 0; i < m; i++)
        for (size_t c = 0; c < k / 64; c++)
            for (size_t l = 0; l < 8; l++) {
                const int8_t *q = P->xq + i * k + 64 * c + 4 * l;
                int32_t t = 0;
                for (int e = 0; e < 4; e++) t += q[e] + q[32 + e];
                P->nl[i * (k / 8) + 8 * c + l] = symmetric ? -8 * t : 0;
            }
}

/* Reorders each row's prepared codes for 128-element chunk pairs: [even c, even c+1, odd c,
 * odd c+1] (32 bytes each) instead of [even c, odd c, even c+1, odd c+1]. A last unpaired
 * chunk keeps its layout. */
static void pair_layout(int8_t *xq, size_t m, size_t k) {
    int8_t tmp[32];
    for (size_t i = 0; i < m; i++)
        for (size_t c = 0; c + 2 <= k / 64; c += 2) {
            int8_t *q = xq + i * k + 64 * c;
            memcpy(tmp, q + 32, 32);
            memcpy(q + 32, q + 64, 32);
            memcpy(q + 64, tmp, 32);
        }
}

/* Two 256-bit halves into one 512-bit register (AVX512F only; no DQ). */
ET_AVX512_INLINE __m512 join256(__m256 lo, __m256 hi) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)),
                                               _mm256_castps_pd(hi), 1));
}

/* Chunks c and c + 1 (64 packed bytes) of NR weight rows (p[j], scales s[j]) against MR
 * activation rows: acc[j][i] for weight row j, activation row i. NR concurrent weight streams
 * keep more cache-line misses in flight than one (measured here: one stream per thread read
 * 6 GB/s a core, where ONNX Runtime's four-column kernel read 8). */
ET_AVX512_INLINE void q4q8_pair_avx512(const uint8_t *const *p, const float *const *s,
                                       const q8_prep *P, size_t i0, size_t k, size_t c,
                                       const size_t block, const int nr, const int mr,
                                       __m512 acc[][ET_MR]) {
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512i lo[ET_NR], hi[ET_NR];
    __m512 sw[ET_NR];
    for (int j = 0; j < nr; j++) {
        _mm_prefetch((const char *)(p[j] + 32 * c + ET_PREFETCH), _MM_HINT_NTA);
        __m512i w = _mm512_loadu_si512((const void *)(p[j] + 32 * c));
        lo[j] = _mm512_and_si512(w, m4);
        hi[j] = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
        sw[j] = join256(lane_scales(s[j], c, block), lane_scales(s[j], c + 1, block));
    }
    for (int i = 0; i < mr; i++) {
        const int8_t *xc = P->xq + (i0 + i) * k + 64 * c;
        const __m512i xe = _mm512_loadu_si512((const void *)xc);
        const __m512i xo = _mm512_loadu_si512((const void *)(xc + 64));
        const __m512 sx = _mm512_loadu_ps(P->sx + (i0 + i) * (k / 8) + 8 * c);
        const __m512i off = _mm512_loadu_si512((const void *)(P->nl + (i0 + i) * (k / 8) + 8 * c));
        for (int j = 0; j < nr; j++) {
            __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(off, lo[j], xe), hi[j], xo);
            acc[j][i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), sx), sw[j], acc[j][i]);
        }
    }
}

/* A last unpaired chunk c into the low halves (the AVX2 path's even-chunk accumulator). */
ET_AVX512_INLINE void q4q8_tail_avx512(const uint8_t *const *p, const float *const *s,
                                       const q8_prep *P, size_t i0, size_t k, size_t c,
                                       const size_t block, const int nr, const int mr,
                                       __m512 acc[][ET_MR]) {
    const __m256i m4 = _mm256_set1_epi8(15);
    for (int j = 0; j < nr; j++) {
        __m256i w = _mm256_loadu_si256((const __m256i *)(p[j] + 32 * c));
        __m256i lo = _mm256_and_si256(w, m4), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
        __m256 sw = lane_scales(s[j], c, block);
        for (int i = 0; i < mr; i++) {
            const int8_t *xc = P->xq + (i0 + i) * k + 64 * c;
            __m256i off = _mm256_loadu_si256((const __m256i *)(P->nl + (i0 + i) * (k / 8) + 8 * c));
            __m256i d = _mm256_dpbusd_epi32(off, lo, _mm256_loadu_si256((const __m256i *)xc));
            d = _mm256_dpbusd_epi32(d, hi, _mm256_loadu_si256((const __m256i *)(xc + 32)));
            __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(P->sx + (i0 + i) * (k / 8) + 8 * c));
            __m256 low = _mm256_fmadd_ps(t, sw, _mm512_castps512_ps256(acc[j][i]));
            acc[j][i] = join256(low, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[j][i]), 1)));
        }
    }
}

/* NR weight rows from r against MR activation rows from i0: y[i][r + j]. */
ET_AVX512_INLINE void q4q8_tile_avx512(const uint8_t *packed, const float *scales,
                                       const uint8_t *zps, const q8_prep *P, size_t r, size_t i0,
                                       float *y, size_t n, size_t k, const size_t block,
                                       const int nr, const int mr) {
    const size_t chunks = k / 64, nb = k / block;
    const uint8_t *p[ET_NR];
    const float *s[ET_NR];
    __m512 acc[ET_NR][ET_MR];
    for (int j = 0; j < nr; j++) {
        p[j] = packed + (r + j) * (k / 2);
        s[j] = scales + (r + j) * nb;
        for (int i = 0; i < mr; i++) acc[j][i] = _mm512_setzero_ps();
    }
    size_t c = 0;
    for (; c + 2 <= chunks; c += 2) q4q8_pair_avx512(p, s, P, i0, k, c, block, nr, mr, acc);
    if (c < chunks) q4q8_tail_avx512(p, s, P, i0, k, c, block, nr, mr, acc);
    for (int j = 0; j < nr; j++)
        for (int i = 0; i < mr; i++) {
            __m256 lo = _mm512_castps512_ps256(acc[j][i]);
            __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[j][i]), 1));
            y[(i0 + i) * n + r + j] =
                hsum256(_mm256_add_ps(lo, hi))
                - (zps ? zero_point_term(s[j], zps + (r + j) * nb, P->cb + (i0 + i) * nb, nb) : 0.0f);
        }
}

ET_AVX512_INLINE void q4q8_rows_avx512(const q8_prep *P, const uint8_t *packed, const float *scales,
                                       const uint8_t *zps, float *y, size_t m, size_t n, size_t k,
                                       const size_t block, size_t r0, size_t r1) {
    size_t r = r0;
    for (; r + ET_NR <= r1; r += ET_NR) {
#define ROW(MR) q4q8_tile_avx512(packed, scales, zps, P, r, i, y, n, k, block, ET_NR, MR)
        ET_MR_GROUPS(m, ROW)
#undef ROW
    }
    for (; r < r1; r++) {
#define ROW(MR) q4q8_tile_avx512(packed, scales, zps, P, r, i, y, n, k, block, 1, MR)
        ET_MR_GROUPS(m, ROW)
#undef ROW
    }
}

ET_AVX512 static void q4q8_gemm_avx512(const q8_prep *P, const uint8_t *packed, const float *scales,
                                       const uint8_t *zps, float *y, size_t m, size_t n, size_t k,
                                       size_t block, size_t r0, size_t r1) {
#define CALL(B) q4q8_rows_avx512(P, packed, scales, zps, y, m, n, k, B, r0, r1)
    ET_BY_BLOCK(block, CALL)
#undef CALL
}
#endif

int et_q4q8_gemm(const float *x, const uint8_t *packed, const float *scales, const uint8_t *zps,
                 float *y, size_t m, size_t n, size_t k, size_t block, int threads, int isa) {
    int nt = team_size(threads, n, k);
    size_t nb = k / block;
    if (isa > et_best_isa()) isa = et_best_isa(); /* never run an instruction the CPU lacks */
    /* one allocation: codes (m k), lane scales and offsets (2 m k / 8), block scales and sums
     * (2 m nb) */
    char *buf = malloc(m * k + sizeof(float) * (2 * m * k / 8 + 2 * m * nb));
    if (!buf) return -1;
    int8_t *xq = (int8_t *)buf;
    float *sx = (float *)(buf + m * k), *xs = sx + m * k / 8, *cb = xs + m * nb;
    int32_t *nl = (int32_t *)(cb + m * nb);
#ifdef ET_X86
    if (isa >= ET_ISA_AVX2 && k % 64 == 0) {
        q8_prep P = {xq, sx, cb, nl};
        et_prepare_q8(x, &P, xs, m, k, block);
        lane_offsets(&P, m, k, zps == NULL);
        if (isa >= ET_ISA_AVX512_VNNI) {
            pair_layout(xq, m, k);
            ET_FOR_ROWS(nt, n, q4q8_gemm_avx512(&P, packed, scales, zps, y, m, n, k, block, r0, r1));
        } else if (isa == ET_ISA_AVX_VNNI) {
            ET_FOR_ROWS(nt, n, q4q8_gemm_vnni256(&P, packed, scales, zps, y, m, n, k, block, r0, r1));
        } else {
            ET_FOR_ROWS(nt, n, q4q8_gemm_avx2(&P, packed, scales, zps, y, m, n, k, block, r0, r1));
        }
        free(buf);
        return 0;
    }
#endif
    (void)cb;
    (void)nl;
    et_q8_quantize(x, xq, xs, m, k, block);
    ET_FOR_ROWS(nt, n, q4q8_rows(xq, xs, packed, scales, zps, y, m, n, k, block, r0, r1));
    free(buf);
    return 0;
}

/* ---- the int8 multiply-add peak, for the benchmarks' percent-of-peak ------------------- */

#ifdef ET_X86
/* 8 independent accumulator chains, so the loop runs at the instructions' throughput, not
 * their latency; the empty asm after each step (BAR) tells the compiler b changed, so it
 * cannot compute a multiply of the same operands once for all chains (it did: AVX2 "ran"
 * at 5 multiply-adds a cycle). */
#define BAR __asm__ volatile("" : "+x"(b))
#define ET_PEAK_LOOP(T, ZERO, STEP, SUM)                                                      \
    T c0 = ZERO, c1 = ZERO, c2 = ZERO, c3 = ZERO, c4 = ZERO, c5 = ZERO, c6 = ZERO, c7 = ZERO; \
    for (size_t t = 0; t < iters; t++) {                                                      \
        c0 = STEP(c0); BAR; c1 = STEP(c1); BAR; c2 = STEP(c2); BAR; c3 = STEP(c3); BAR;       \
        c4 = STEP(c4); BAR; c5 = STEP(c5); BAR; c6 = STEP(c6); BAR; c7 = STEP(c7); BAR;       \
    }                                                                                         \
    return SUM(c0) + SUM(c1) + SUM(c2) + SUM(c3) + SUM(c4) + SUM(c5) + SUM(c6) + SUM(c7);

ET_INLINE int32_t sum256_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

ET_AVX2 static int32_t peak_avx2(size_t iters) {
    __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-2);
    const __m256i ones = _mm256_set1_epi16(1);
#define STEP(c) _mm256_add_epi32(c, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones))
    ET_PEAK_LOOP(__m256i, _mm256_setzero_si256(), STEP, sum256_epi32)
#undef STEP
}

ET_VNNI256 static int32_t peak_vnni256(size_t iters) {
    __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-2);
#define STEP(c) _mm256_dpbusd_avx_epi32(c, a, b)
    ET_PEAK_LOOP(__m256i, _mm256_setzero_si256(), STEP, sum256_epi32)
#undef STEP
}

ET_AVX512 static int32_t peak_avx512(size_t iters) {
    __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
#define STEP(c) _mm512_dpbusd_epi32(c, a, b)
    ET_PEAK_LOOP(__m512i, _mm512_setzero_si512(), STEP, _mm512_reduce_add_epi32)
#undef STEP
}
#undef BAR
#endif

double et_int8_peak(int isa, size_t iters, int threads, int32_t *checksum) {
    if (isa > et_best_isa()) isa = et_best_isa();
    int nt = threads > 0 ? threads : 1;
    int32_t total = 0;
    double macs = 0.0;
#ifdef ET_X86
    const double per_iter = 8.0 * (isa >= ET_ISA_AVX512_VNNI ? 64 : 32); /* 8 chains */
    if (isa >= ET_ISA_AVX2) {
#pragma omp parallel for num_threads(nt) reduction(+ : total) schedule(static, 1)
        for (int t = 0; t < nt; t++)
            total += isa >= ET_ISA_AVX512_VNNI ? peak_avx512(iters)
                     : isa == ET_ISA_AVX_VNNI  ? peak_vnni256(iters)
                                               : peak_avx2(iters);
        macs = per_iter * (double)iters * nt;
    }
#endif
    (void)iters;
    *checksum = total;
    return macs;
}
