/* edgetune C kernel core: NF4 and Q4 (MatMulNBits) dequantization.
 * Each kernel has a portable version and an AVX2+FMA version chosen at run
 * time by CPU feature detection; nothing is compiled for -march=native.
 * Callers (the Cython glue) validate every shape before calling. */
#ifndef EDGETUNE_KERNELS_H
#define EDGETUNE_KERNELS_H
#include <stdint.h>
#include <stddef.h>

/* x86 instruction-set levels, each including the ones below it; the kernels take one as their
 * `use_simd` / `isa` argument (any non-zero level means AVX2 to kernels without a faster
 * path) and never run above et_best_isa(). */
enum { ET_ISA_SCALAR = 0, ET_ISA_AVX2 = 1, ET_ISA_AVX_VNNI = 2, ET_ISA_AVX512_VNNI = 3 };

/* The best level this CPU and OS support: cpuid's feature bits and the register state the OS
 * saves (xgetbv: YMM for AVX2, opmask and ZMM for AVX-512). Computed once. */
int et_best_isa(void);

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
 * (q - zp) * xq, then scaled by both block scales; `isa` an ET_ISA_* level (q4q8.c). */
int et_q4q8_gemm(const float *x, const uint8_t *packed, const float *scales, const uint8_t *zps,
                 float *y, size_t m, size_t n, size_t k, size_t block, int threads, int isa);

/* The int8 multiply-add peak of `threads` threads: `iters` rounds of 8 independent chains of
 * the path's multiply-add (vpdpbusd on the VNNI levels, vpmaddubsw + vpmaddwd + vpaddd on
 * AVX2) per thread. Returns the multiply-adds done (0 on the scalar level); the caller times
 * it. `checksum` receives the lane sums, so the work cannot be optimised away (q4q8.c). */
double et_int8_peak(int isa, size_t iters, int threads, int32_t *checksum);

/* y (M, N) = x (M, K) @ W.T for an NF4 weight W (N, K) (PyTorch Linear layout): packed low
 * nibble first, absmax of each 64-element block dequantized on the fly. */
int et_nf4_gemv(const float *x, const uint8_t *packed, const et_absmax *absmax, const float *code,
                float *y, size_t m, size_t n, size_t k, int threads, int use_simd);

/* Integer datapath for NF4, k % 64 == 0 (else -2): x quantized per 64-element block to int8
 * (as et_q8_quantize), int32 block sums of code[q] * xq with `code` the int8 code book
 * (reference.NF4_CODE_I8), then x absmax x xs / 127. */
int et_nf4_q8_gemv(const float *x, const uint8_t *packed, const et_absmax *absmax,
                   const int8_t *code, float *y, size_t m, size_t n, size_t k, int threads,
                   int use_simd);

/* y (M, N) = x (M, K) @ dequant(B) for 8-bit MatMulNBits weights: codes (N, K/block, block)
 * with zero point 128, scales (N, K/block). */
int et_q8w_gemm(const float *x, const uint8_t *codes, const float *scales, float *y, size_t m,
                size_t n, size_t k, size_t block, int threads, int use_simd);
#endif

#ifndef EDGETUNE_OPS_DECL
#define EDGETUNE_OPS_DECL
/* Decoder ops (ops.c); shapes checked by the caller. */

/* out (T, H) = x / sqrt(mean(x^2) + eps) * w, per row. */
void et_rms_norm(const float *x, const float *w, float *out, size_t t, size_t h, float eps,
                 int use_simd);

/* out (T, N) = silu(gu[:, :N]) * gu[:, N:], gu (T, 2N). */
void et_swiglu(const float *gu, float *out, size_t t, size_t n, int use_simd);

/* One new token at position `pos` attending to cache positions [first, pos]: k and v
 * (n_kv, d) rotated (k) and written at `pos` of kc / vc (n_kv, ctx, d); q (n_heads, d)
 * rotated; out (n_heads, d) = softmax(scale q.K) V per head, head h reading kv head
 * h / (n_heads / n_kv), heads split over `threads` OpenMP threads. cos / sin: (rot,) tables
 * of the position; scratch: n_heads * (pos + 1) floats. d <= 1024. */
void et_attention_decode(const float *q, const float *k, const float *v, float *kc, float *vc,
                         const float *cos, const float *sin, float *out, float *scratch,
                         size_t n_heads, size_t n_kv, size_t d, size_t rot, size_t ctx,
                         size_t pos, size_t first, float scale, int threads, int use_simd);
#endif
