# cython: language_level=3, boundscheck=False, wraparound=False
"""Cython glue over the C kernel core (csrc/edgetune_kernels.c).

Only typed, contiguous memoryviews reach C; the Python dispatcher in
``edgetune.kernels`` has already checked dtypes, shapes and block sizes.
"""

from libc.stdint cimport int8_t, uint8_t

cdef extern from "edgetune_kernels.h":
    int et_best_isa()
    ctypedef struct et_absmax:
        const uint8_t *q
        const float *scale
        float offset
        const float *dyn
    void et_nf4_dequantize(const uint8_t *packed, const et_absmax *absmax, const float *code,
                           float *out, size_t n, int use_simd) nogil
    void et_q4_dequantize_nk(const uint8_t *packed, const float *scales, const uint8_t *zps,
                             float *out, size_t n_rows, size_t k, size_t block, int use_simd) nogil
    void et_q8_quantize(const float *x, int8_t *xq, float *xs, size_t m, size_t k,
                        size_t block) nogil
    int et_q4_gemm_f32(const float *x, const uint8_t *packed, const float *scales,
                       const uint8_t *zps, float *y, size_t m, size_t n, size_t k, size_t block,
                       int threads, int use_simd) nogil
    int et_q4q8_gemm(const float *x, const uint8_t *packed, const float *scales,
                     const uint8_t *zps, float *y, size_t m, size_t n, size_t k, size_t block,
                     int threads, int use_simd) nogil
    double et_int8_peak(int isa, size_t iters, int threads, int *checksum) nogil
    int et_q8w_gemm(const float *x, const uint8_t *codes, const float *scales, float *y, size_t m,
                    size_t n, size_t k, size_t block, int threads, int use_simd) nogil
    int et_nf4_gemv(const float *x, const uint8_t *packed, const et_absmax *absmax, const float *code,
                    float *y, size_t m, size_t n, size_t k, int threads, int use_simd) nogil
    int et_nf4_q8_gemv(const float *x, const uint8_t *packed, const et_absmax *absmax,
                       const int8_t *code, float *y, size_t m, size_t n, size_t k, int threads,
                       int use_simd) nogil
    void et_rms_norm(const float *x, const float *w, float *out, size_t t, size_t h, float eps,
                     int use_simd) nogil
    void et_swiglu(const float *gu, float *out, size_t t, size_t n, int use_simd) nogil
    void et_attention_decode(const float *q, const float *k, const float *v, float *kc,
                             float *vc, const float *cos, const float *sin, float *out,
                             float *scores, size_t n_heads, size_t n_kv, size_t d, size_t rot,
                             size_t ctx, size_t pos, size_t first, float scale, int threads,
                             int use_simd) nogil

ISA_NAMES = ("scalar", "avx2", "avx_vnni", "avx512_vnni")  # the C core's ET_ISA_* levels


def _isa_cap():
    """The level ``EDGETUNE_ISA`` allows (a name of ISA_NAMES; unset: no cap), to run and
    benchmark the slower paths on a CPU that has faster ones."""
    import os

    name = os.environ.get("EDGETUNE_ISA", "").strip().lower()
    if not name:
        return len(ISA_NAMES) - 1
    if name not in ISA_NAMES:
        raise ValueError(f"EDGETUNE_ISA={name!r}: expected one of {', '.join(ISA_NAMES)}")
    return ISA_NAMES.index(name)


BEST_ISA = et_best_isa()  # what the CPU and OS support (cpuid + xgetbv)
ISA = min(BEST_ISA, _isa_cap())  # what the kernels run by default
HAVE_AVX2 = ISA >= 1


cdef et_absmax _absmax(const uint8_t[::1] absmax_q, const float[::1] absmax_scale, float offset,
                      const float[::1] dyn):
    cdef et_absmax a
    a.q = &absmax_q[0]
    a.scale = &absmax_scale[0]
    a.offset = offset
    a.dyn = &dyn[0]
    return a


def nf4_dequantize(const uint8_t[::1] packed, const uint8_t[::1] absmax_q,
                   const float[::1] absmax_scale, float offset, const float[::1] dyn,
                   const float[::1] code, float[::1] out, bint simd=HAVE_AVX2):
    """Double-quantized absmax (codes into ``dyn``, scales, offset) dequantized on the fly."""
    cdef et_absmax a = _absmax(absmax_q, absmax_scale, offset, dyn)
    with nogil:
        et_nf4_dequantize(&packed[0], &a, &code[0], &out[0], out.shape[0], simd)


def q4_dequantize_nk(const uint8_t[:, :, ::1] packed, const float[:, ::1] scales,
                     const uint8_t[:, ::1] zps, float[:, ::1] out, bint simd=HAVE_AVX2):
    cdef size_t block = packed.shape[2] * 2
    with nogil:
        et_q4_dequantize_nk(&packed[0, 0, 0], &scales[0, 0], &zps[0, 0], &out[0, 0],
                            out.shape[0], out.shape[1], block, simd)


cdef const uint8_t *_zps_or_null(const uint8_t[:, ::1] zps):
    """Stored zero points, or NULL for a symmetric weight (zero point 8, nothing to read)."""
    return NULL if zps is None else &zps[0, 0]


def q8_quantize(const float[:, ::1] x, int8_t[:, ::1] xq, float[:, ::1] xs):
    cdef size_t block = x.shape[1] // xs.shape[1]
    with nogil:
        et_q8_quantize(&x[0, 0], &xq[0, 0], &xs[0, 0], x.shape[0], x.shape[1], block)


def q4_gemm(const float[:, ::1] x, const uint8_t[:, :, ::1] packed, const float[:, ::1] scales,
            const uint8_t[:, ::1] zps, float[:, ::1] out, int threads=1, bint simd=HAVE_AVX2):
    """``zps`` is None for a symmetric weight."""
    cdef size_t block = packed.shape[2] * 2
    cdef const uint8_t *z = _zps_or_null(zps)
    cdef int rc
    with nogil:
        rc = et_q4_gemm_f32(&x[0, 0], &packed[0, 0, 0], &scales[0, 0], z, &out[0, 0],
                            x.shape[0], packed.shape[0], x.shape[1], block, threads, simd)
    if rc:
        raise MemoryError("q4_gemm: out of memory for the activation workspace")


def q4q8_gemm(const float[:, ::1] x, const uint8_t[:, :, ::1] packed, const float[:, ::1] scales,
              const uint8_t[:, ::1] zps, float[:, ::1] out, int threads=1, int simd=ISA):
    """Quantizes x to Q8 itself (bit-exact with the reference); ``zps`` None = symmetric.
    ``simd``: an index into ISA_NAMES (True = AVX2); above BEST_ISA runs BEST_ISA."""
    cdef size_t block = packed.shape[2] * 2
    cdef const uint8_t *z = _zps_or_null(zps)
    cdef int rc
    with nogil:
        rc = et_q4q8_gemm(&x[0, 0], &packed[0, 0, 0], &scales[0, 0], z, &out[0, 0],
                          x.shape[0], packed.shape[0], x.shape[1], block, threads, simd)
    if rc:
        raise MemoryError("q4q8_gemm: out of memory for the activation workspace")


def int8_peak(size_t iters, int threads=1, int simd=ISA):
    """(multiply-adds done, checksum) of the int8 multiply-add peak loop (et_int8_peak); the
    caller times the call. 0 multiply-adds on the scalar level."""
    cdef int checksum = 0
    cdef double macs
    with nogil:
        macs = et_int8_peak(simd, iters, threads, &checksum)
    return macs, checksum


def nf4_gemv(const float[:, ::1] x, const uint8_t[::1] packed, const uint8_t[::1] absmax_q,
             const float[::1] absmax_scale, float offset, const float[::1] dyn,
             const float[::1] code, float[:, ::1] out, int threads=1, bint simd=HAVE_AVX2):
    """y = x @ W.T for an NF4 weight W (N, K), without materializing W."""
    cdef et_absmax a = _absmax(absmax_q, absmax_scale, offset, dyn)
    cdef int rc
    with nogil:
        rc = et_nf4_gemv(&x[0, 0], &packed[0], &a, &code[0], &out[0, 0], x.shape[0],
                         out.shape[1], x.shape[1], threads, simd)
    if rc:
        raise MemoryError("nf4_gemv: out of memory for the activation workspace")


def nf4_q8_gemv(const float[:, ::1] x, const uint8_t[::1] packed, const uint8_t[::1] absmax_q,
                const float[::1] absmax_scale, float offset, const float[::1] dyn,
                const int8_t[::1] code, float[:, ::1] out, int threads=1, bint simd=HAVE_AVX2):
    """Integer datapath y = x @ W.T for an NF4 weight W (N, K), K % 64 == 0: ``code`` is the
    int8 code book; x is quantized per 64-element block here (as q8_quantize)."""
    cdef et_absmax a = _absmax(absmax_q, absmax_scale, offset, dyn)
    cdef int rc
    with nogil:
        rc = et_nf4_q8_gemv(&x[0, 0], &packed[0], &a, &code[0], &out[0, 0], x.shape[0],
                            out.shape[1], x.shape[1], threads, simd)
    if rc == -2:
        raise ValueError("nf4_q8_gemv: K must be a multiple of 64")
    if rc:
        raise MemoryError("nf4_q8_gemv: out of memory for the activation workspace")


def q8w_gemm(const float[:, ::1] x, const uint8_t[:, :, ::1] codes, const float[:, ::1] scales,
             float[:, ::1] out, int threads=1, bint simd=HAVE_AVX2):
    """y = x @ dequant(B) for an 8-bit MatMulNBits weight (zero point 128)."""
    cdef int rc
    with nogil:
        rc = et_q8w_gemm(&x[0, 0], &codes[0, 0, 0], &scales[0, 0], &out[0, 0], x.shape[0],
                         codes.shape[0], x.shape[1], codes.shape[2], threads, simd)
    if rc:
        raise MemoryError("q8w_gemm: out of memory for the activation workspace")


def rms_norm(const float[:, ::1] x, const float[::1] w, float[:, ::1] out, float eps,
             bint simd=HAVE_AVX2):
    et_rms_norm(&x[0, 0], &w[0], &out[0, 0], x.shape[0], x.shape[1], eps, simd)


def swiglu(const float[:, ::1] gu, float[:, ::1] out, bint simd=HAVE_AVX2):
    et_swiglu(&gu[0, 0], &out[0, 0], gu.shape[0], out.shape[1], simd)


def attention_decode(const float[:, ::1] q, const float[:, ::1] k, const float[:, ::1] v,
                     float[:, :, ::1] kc, float[:, :, ::1] vc, const float[::1] cos,
                     const float[::1] sin, float[:, ::1] out, float[::1] scratch, size_t pos,
                     size_t first, float scale, int threads=1, bint simd=HAVE_AVX2):
    """Shapes checked by edgetune.kernels.attention_decode."""
    with nogil:
        et_attention_decode(&q[0, 0], &k[0, 0], &v[0, 0], &kc[0, 0, 0], &vc[0, 0, 0], &cos[0],
                            &sin[0], &out[0, 0], &scratch[0], q.shape[0], k.shape[0], q.shape[1],
                            cos.shape[0], kc.shape[1], pos, first, scale, threads, simd)
