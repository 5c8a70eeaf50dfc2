/* edgetune C kernel core: NF4 and Q4 (MatMulNBits) dequantization.
 * Each kernel has a portable version and an AVX2+FMA version chosen at run
 * time by CPU feature detection; nothing is compiled for -march=native.
 * Callers (the Cython glue) validate every shape before calling. */
#ifndef EDGETUNE_KERNELS_H
#define EDGETUNE_KERNELS_H
#include <stdint.h>
#include <stddef.h>

int et_have_avx2(void);

/* out[i] = code[nibble i] * absmax[i / 64]; n elements, packed low nibble first. */
void et_nf4_dequantize(const uint8_t *packed, const float *absmax, const float *code,
                       float *out, size_t n, int use_simd);

/* out (N, K) row-major = (q - zp) * scale; packed (N, K/block, block/2), scales and
 * zps (N, K/block). */
void et_q4_dequantize_nk(const uint8_t *packed, const float *scales, const uint8_t *zps,
                         float *out, size_t n_rows, size_t k, size_t block, int use_simd);

#endif

#ifndef EDGETUNE_GEMV_DECL
#define EDGETUNE_GEMV_DECL
/* y (M, N) = x (M, K) @ dequant(B) with fp32 activations; B in MatMulNBits layout
 * (packed (N, K/block, block/2), scales and zps (N, K/block)). Rows of N split over
 * `threads` OpenMP threads. */
void et_q4_gemm_f32(const float *x, const uint8_t *packed, const float *scales, const uint8_t *zps,
                    float *y, size_t m, size_t n, size_t k, size_t block, int threads, int use_simd);

/* Integer datapath: xq (M, K) int8 codes with per-block scales xs (M, K/block);
 * y[m, n] = sum_b ws[n, b] * xs[m, b] * (sum_k (q - zp) * xq)  (int32 block sums). */
void et_q4q8_gemm(const int8_t *xq, const float *xs, const uint8_t *packed, const float *scales,
                  const uint8_t *zps, float *y, size_t m, size_t n, size_t k, size_t block,
                  int threads, int use_simd);
#endif
