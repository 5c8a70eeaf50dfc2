/* AVX2 + FMA helpers shared by the C core (internal). Functions that use them carry
 * ET_AVX2 (or are ET_INLINE): the build flags stay portable and the callers pick these
 * paths at run time (et_best_isa), never by compiling for -march=native. */
#ifndef EDGETUNE_SIMD_H
#define EDGETUNE_SIMD_H

#if defined(__x86_64__) || defined(_M_X64)
#define ET_X86 1
#include <immintrin.h>

#define ET_AVX2 __attribute__((target("avx2,fma")))
#define ET_INLINE static inline __attribute__((always_inline, target("avx2,fma")))

/* Sum of the 8 lanes. */
ET_INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* 8 code indices (epi32, 0..15) -> 8 floats via two in-register 8-entry tables (NF4). */
ET_INLINE __m256 lut16(__m256i idx, __m256 lo, __m256 hi) {
    __m256 a = _mm256_permutevar8x32_ps(lo, idx);
    __m256 b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
#endif

#endif
