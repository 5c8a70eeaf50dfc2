# cython: language_level=3, boundscheck=False, wraparound=False
"""Cython glue over the C kernel core (csrc/edgetune_kernels.c).

Only typed, contiguous memoryviews reach C; the Python dispatcher in
``edgetune.kernels`` has already checked dtypes, shapes and block sizes.
"""

from libc.stdint cimport int8_t, uint8_t

cdef extern from "edgetune_kernels.h":
    int et_have_avx2()
    void et_nf4_dequantize(const uint8_t *packed, const float *absmax, const float *code,
                           float *out, size_t n, int use_simd) nogil
    void et_q4_dequantize_nk(const uint8_t *packed, const float *scales, const uint8_t *zps,
                             float *out, size_t n_rows, size_t k, size_t block, int use_simd) nogil
    void et_q4_gemm_f32(const float *x, const uint8_t *packed, const float *scales,
                        const uint8_t *zps, float *y, size_t m, size_t n, size_t k, size_t block,
                        int threads, int use_simd) nogil
    void et_q4q8_gemm(const int8_t *xq, const float *xs, const uint8_t *packed, const float *scales,
                      const uint8_t *zps, float *y, size_t m, size_t n, size_t k, size_t block,
                      int threads, int use_simd) nogil

HAVE_AVX2 = bool(et_have_avx2())


def nf4_dequantize(const uint8_t[::1] packed, const float[::1] absmax, const float[::1] code,
                   float[::1] out, bint simd=HAVE_AVX2):
    with nogil:
        et_nf4_dequantize(&packed[0], &absmax[0], &code[0], &out[0], out.shape[0], simd)


def q4_dequantize_nk(const uint8_t[:, :, ::1] packed, const float[:, ::1] scales,
                     const uint8_t[:, ::1] zps, float[:, ::1] out, bint simd=HAVE_AVX2):
    cdef size_t block = packed.shape[2] * 2
    with nogil:
        et_q4_dequantize_nk(&packed[0, 0, 0], &scales[0, 0], &zps[0, 0], &out[0, 0],
                            out.shape[0], out.shape[1], block, simd)


def q4_gemm(const float[:, ::1] x, const uint8_t[:, :, ::1] packed, const float[:, ::1] scales,
            const uint8_t[:, ::1] zps, float[:, ::1] out, int threads=1, bint simd=HAVE_AVX2):
    cdef size_t block = packed.shape[2] * 2
    with nogil:
        et_q4_gemm_f32(&x[0, 0], &packed[0, 0, 0], &scales[0, 0], &zps[0, 0], &out[0, 0],
                       x.shape[0], packed.shape[0], x.shape[1], block, threads, simd)


def q4q8_gemm(const int8_t[:, ::1] xq, const float[:, ::1] xs, const uint8_t[:, :, ::1] packed,
              const float[:, ::1] scales, const uint8_t[:, ::1] zps, float[:, ::1] out,
              int threads=1, bint simd=HAVE_AVX2):
    cdef size_t block = packed.shape[2] * 2
    with nogil:
        et_q4q8_gemm(&xq[0, 0], &xs[0, 0], &packed[0, 0, 0], &scales[0, 0], &zps[0, 0],
                     &out[0, 0], xq.shape[0], packed.shape[0], xq.shape[1], block, threads, simd)
