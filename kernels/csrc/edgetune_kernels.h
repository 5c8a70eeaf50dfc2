/* edgetune C kernel core: NF4 and Q4 (MatMulNBits) dequantization.
 * Each kernel has a portable version and an AVX2+FMA version chosen at run
 * time by CPU feature detection; nothing is compiled for -march=native.
 * Callers (the Cython glue) validate every shape before calling. */
#ifndef EDGETUNE_KERNELS_H
#define EDGETUNE_KERNELS_H
#include <stdint.h>
#include <stddef.h>

int et_have_avx2(void);

/* Double-quantized NF4 absmax of 64-element block b: dynamic-map code times the scale of its
 * 256-block, plus the offset (two float32 roundings, as reference.dequantize_absmax). */
typedef struct {
    const uint8_t *q;   /* (nblocks,) codes into dyn */
    const float *scale; /* (ceil(nblocks / 256),) */
    float offset;
    const float *dyn;   /* 256-entry signed dynamic map */
} et_absmax;

static inline float et_absmax_at(const et_absmax *a, size_t b) {
    float v = a->dyn[a->q[b]] * a->scale[b / 256];
    return v + a->offset;
}

/* out[i] = code[nibble i] * absmax(i / 64); n elements, packed low nibble first. */
void et_nf4_dequantize(const uint8_t *packed, const et_absmax *absmax, const float *code,
                       float *out, size_t n, int use_simd);

/* out (N, K) row-major = (q - zp) * scale; packed (N, K/block, block/2), scales and
 * zps (N, K/block). */
void et_q4_dequantize_nk(const uint8_t *packed, const float *scales, const uint8_t *zps,
                         float *out, size_t n_rows, size_t k, size_t block, int use_simd);

#endif

#ifndef EDGETUNE_GEMV_DECL
#define EDGETUNE_GEMV_DECL
/* GEMV / small GEMM entry points (gemm.c). B in MatMulNBits layout: packed (N, K/block,
 * block/2), scales (N, K/block), zps (N, K/block) unpacked zero points or NULL for 8.
 * Rows of N split over `threads` OpenMP threads. Return 0, or -1 when out of memory. */

/* Per-block symmetric int8 of x (M, K): bit-exact with reference.q8_quantize. */
void et_q8_quantize(const float *x, int8_t *xq, float *xs, size_t m, size_t k, size_t block);

/* y (M, N) = x (M, K) @ dequant(B), fp32 activations. */
int et_q4_gemm_f32(const float *x, const uint8_t *packed, const float *scales, const uint8_t *zps,
                   float *y, size_t m, size_t n, size_t k, size_t block, int threads, int use_simd);

/* Integer datapath: x quantized per block to int8 (as et_q8_quantize), int32 sums of
 * (q - zp) * xq, then scaled by both block scales. */
int et_q4q8_gemm(const float *x, const uint8_t *packed, const float *scales, const uint8_t *zps,
                 float *y, size_t m, size_t n, size_t k, size_t block, int threads, int use_simd);

/* y (M, N) = x (M, K) @ W.T for an NF4 weight W (N, K) (PyTorch Linear layout): packed low
 * nibble first, absmax of each 64-element block dequantized on the fly. */
int et_nf4_gemv(const float *x, const uint8_t *packed, const et_absmax *absmax, const float *code,
                float *y, size_t m, size_t n, size_t k, int threads, int use_simd);

/* y (M, N) = x (M, K) @ dequant(B) for 8-bit MatMulNBits weights: codes (N, K/block, block)
 * with zero point 128, scales (N, K/block). */
int et_q8w_gemm(const float *x, const uint8_t *codes, const float *scales, float *y, size_t m,
                size_t n, size_t k, size_t block, int threads, int use_simd);
#endif
