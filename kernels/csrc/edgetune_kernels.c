/* NF4 and Q4 dequantization, portable and AVX2+FMA (see edgetune_kernels.h). */
#include "edgetune_kernels.h"

#include "et_simd.h"

/* Outputs larger than the last-level cache bypass it (non-temporal stores): writing them
 * through the cache would first read every line from DRAM for nothing. The streaming stores
 * are 128-bit, which needs 16-byte alignment only: numpy places a large array 16 bytes into
 * its first page, so a 32-byte-alignment test turned streaming off for every numpy output
 * (measured: 3072x8192 dequantization wrote at 13-15 GB/s through the cache, ~19 GB/s
 * streamed). */
#define ET_STREAM_BYTES ((size_t)32 << 20)

static int use_stream(const float *out, size_t n) {
    return n * sizeof(float) >= ET_STREAM_BYTES && ((uintptr_t)out & 15) == 0;
}

#ifdef ET_X86
/* 8 floats to o: streamed past the caches (o 16-byte aligned) or stored normally. */
ET_INLINE void store8(float *o, __m256 v, int stream) {
    if (stream) {
        _mm_stream_ps(o, _mm256_castps256_ps128(v));
        _mm_stream_ps(o + 4, _mm256_extractf128_ps(v, 1));
    } else {
        _mm256_storeu_ps(o, v);
    }
}
#endif

#ifdef ET_X86
#include <cpuid.h>

/* XCR0: the register state the OS saves on a context switch (bit 1 SSE, 2 AVX, 5-7 AVX-512). */
static unsigned long long xcr0(void) {
    unsigned int eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((unsigned long long)edx << 32) | eax;
}

static int detect_isa(void) {
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return ET_ISA_SCALAR;
    const int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
    if (!osxsave || !avx || !fma) return ET_ISA_SCALAR;
    const unsigned long long x = xcr0();
    if ((x & 0x6) != 0x6) return ET_ISA_SCALAR; /* the OS does not save YMM */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((b >> 5) & 1)) return ET_ISA_SCALAR;
    const unsigned int max_sub = a, b7 = b, c7 = c;
    int isa = ET_ISA_AVX2;
    if (max_sub >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 4) & 1))
        isa = ET_ISA_AVX_VNNI;
    /* avx512f (ebx 16), avx512bw (30), avx512vl (31), avx512_vnni (ecx 11), ZMM state saved */
    if (((b7 >> 16) & 1) && ((b7 >> 30) & 1) && ((b7 >> 31) & 1) && ((c7 >> 11) & 1)
        && (x & 0xE6) == 0xE6)
        isa = ET_ISA_AVX512_VNNI;
    return isa;
}
#endif

int et_best_isa(void) {
#ifdef ET_X86
    static int best = -1; /* every thread computes the same value: a benign race */
    if (best < 0) best = detect_isa();
    return best;
#else
    return ET_ISA_SCALAR;
#endif
}

static void nf4_dequantize_generic(const uint8_t *packed, const et_absmax *absmax,
                                   const float *code, float *out, size_t begin, size_t end) {
    for (size_t i = begin; i < end; i++) {
        uint8_t byte = packed[i >> 1];
        uint8_t q = (i & 1) ? (byte >> 4) : (byte & 15);
        out[i] = code[q] * et_absmax_at(absmax, i / 64);
    }
}

#ifdef ET_X86
__attribute__((target("avx2,fma")))
static void nf4_dequantize_avx2(const uint8_t *packed, const et_absmax *absmax, const float *code,
                                float *out, size_t n) {
    const __m256 lo = _mm256_loadu_ps(code), hi = _mm256_loadu_ps(code + 8);
    const __m128i mask = _mm_set1_epi8(0x0F);
    size_t full = n / 64;
    const int stream = use_stream(out, n);
    /* blocks are independent: split them over the cores (OpenMP) when the tensor is large, in
     * 64 KiB chunks of output taken by whichever thread is free (a core slowed by a busy
     * neighbour takes fewer; see gemm.c) */
    #pragma omp parallel for schedule(dynamic, 256) if (full >= 4096)
    for (size_t b = 0; b < full; b++) {
        const __m256 am = _mm256_set1_ps(et_absmax_at(absmax, b));
        const uint8_t *p = packed + b * 32;
        float *o = out + b * 64;
        for (int h = 0; h < 2; h++) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)(p + 16 * h));
            __m128i l = _mm_and_si128(bytes, mask);
            __m128i u = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
            __m128i e0 = _mm_unpacklo_epi8(l, u); /* elements 0..15 in order */
            __m128i e1 = _mm_unpackhi_epi8(l, u); /* elements 16..31 */
            __m128i parts[4] = {e0, _mm_srli_si128(e0, 8), e1, _mm_srli_si128(e1, 8)};
            for (int j = 0; j < 4; j++) {
                __m256i idx = _mm256_cvtepu8_epi32(parts[j]);
                store8(o + 32 * h + 8 * j, _mm256_mul_ps(lut16(idx, lo, hi), am), stream);
            }
        }
    }
    _mm_sfence();
    nf4_dequantize_generic(packed, absmax, code, out, full * 64, n);
}
#endif

void et_nf4_dequantize(const uint8_t *packed, const et_absmax *absmax, const float *code,
                       float *out, size_t n, int use_simd) {
#ifdef ET_X86
    if (use_simd) {
        nf4_dequantize_avx2(packed, absmax, code, out, n);
        return;
    }
#endif
    (void)use_simd;
    nf4_dequantize_generic(packed, absmax, code, out, 0, n);
}

static void q4_dequantize_generic(const uint8_t *packed, const float *scales, const uint8_t *zps,
                                  float *out, size_t n_rows, size_t k, size_t block) {
    size_t nb = k / block;
    for (size_t r = 0; r < n_rows; r++) {
        for (size_t b = 0; b < nb; b++) {
            float s = scales[r * nb + b], z = (float)zps[r * nb + b];
            const uint8_t *p = packed + (r * nb + b) * (block / 2);
            float *o = out + r * k + b * block;
            for (size_t j = 0; j < block / 2; j++) {
                o[2 * j] = ((float)(p[j] & 15) - z) * s;
                o[2 * j + 1] = ((float)(p[j] >> 4) - z) * s;
            }
        }
    }
}

#ifdef ET_X86
__attribute__((target("avx2,fma")))
static void q4_dequantize_avx2(const uint8_t *packed, const float *scales, const uint8_t *zps,
                               float *out, size_t n_rows, size_t k, size_t block) {
    const size_t nb = k / block;
    const __m128i mask = _mm_set1_epi8(0x0F);
    const int stream = use_stream(out, n_rows * k);
    /* rows are independent: split them over the cores when the weight is large, a chunk of
     * rows at a time to whichever thread is free */
    #pragma omp parallel for schedule(dynamic, 8) if (n_rows * k >= (1u << 18))
    for (size_t r = 0; r < n_rows; r++) {
        for (size_t b = 0; b < nb; b++) {
            __m256 s = _mm256_set1_ps(scales[r * nb + b]);
            __m256 z = _mm256_set1_ps((float)zps[r * nb + b]);
            const uint8_t *p = packed + (r * nb + b) * (block / 2);
            float *o = out + r * k + b * block;
            for (size_t j = 0; j < block / 2; j += 8) { /* 8 bytes -> 16 values */
                __m128i bytes = _mm_loadl_epi64((const __m128i *)(p + j));
                __m128i l = _mm_and_si128(bytes, mask);
                __m128i u = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
                __m128i e = _mm_unpacklo_epi8(l, u);
                __m256 v0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(e));
                __m256 v1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(e, 8)));
                /* (q - zp) * scale, in that order: bit-exact with the reference */
                v0 = _mm256_mul_ps(_mm256_sub_ps(v0, z), s);
                v1 = _mm256_mul_ps(_mm256_sub_ps(v1, z), s);
                store8(o + 2 * j, v0, stream);
                store8(o + 2 * j + 8, v1, stream);
            }
        }
    }
    _mm_sfence();
}
#endif

void et_q4_dequantize_nk(const uint8_t *packed, const float *scales, const uint8_t *zps,
                         float *out, size_t n_rows, size_t k, size_t block, int use_simd) {
#ifdef ET_X86
    if (use_simd && block % 16 == 0) {
        q4_dequantize_avx2(packed, scales, zps, out, n_rows, k, block);
        return;
    }
#endif
    (void)use_simd;
    q4_dequantize_generic(packed, scales, zps, out, n_rows, k, block);
}
