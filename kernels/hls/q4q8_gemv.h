// Q4 x Q8 block GEMV: the integer decode datapath of kernels/fixed_point.py, for HLS.
//
//   y[n] = sat32((sum_b s[n,b] * ws[n,b] * xs[b] + 2^(shift-1)) >> shift)
//   s[n,b] = sum_{k in block b} (q[n,k] - zp[n,b]) * xq[k]          (int32 block sum)
//
// Weights arrive as MatMulNBits bytes (two 4-bit codes a byte, element 2j in the low
// nibble) over an AXI master; activations and scales are small and sit in BRAM.
// Initiation interval target: II=1 on the inner loop, two weight codes (one byte) and two
// activations per cycle -> one byte of weight stream per clock. Resources: two 6x8-bit
// multipliers (LUTs) per inner iteration, one 32x16x16 DSP chain per block, no dynamic
// memory, no recursion, no STL.
#ifndef EDGETUNE_Q4Q8_GEMV_H
#define EDGETUNE_Q4Q8_GEMV_H

#include <ap_int.h>

typedef ap_uint<8> wbyte_t;   // two packed 4-bit weight codes
typedef ap_uint<4> zp_t;      // block zero point (8 for symmetric)
typedef ap_int<16> scale_t;   // fixed-point block scale, Q(frac) per tensor / vector
typedef ap_int<8> act_t;      // int8 activation code
typedef ap_int<32> out_t;     // Q15.16 output
typedef ap_int<64> acc_t;     // wide accumulator

// Round half up then arithmetic shift right, saturating to 32 bits.
inline out_t round_shift_sat(acc_t acc, int shift) {
    if (shift > 0) acc = (acc + (acc_t(1) << (shift - 1))) >> shift;
    else if (shift < 0) acc = acc << (-shift);
    const acc_t hi = acc_t(2147483647), lo = -acc_t(2147483647) - 1;
    if (acc > hi) return out_t(2147483647);
    if (acc < lo) return out_t(lo);
    return out_t(acc);
}

template <int K, int N, int BLOCK>
void q4q8_gemv(const wbyte_t w_packed[N * K / 2], const zp_t w_zp[N * (K / BLOCK)],
               const scale_t w_scale[N * (K / BLOCK)], const act_t x[K],
               const scale_t x_scale[K / BLOCK], int shift, out_t y[N]) {
#pragma HLS ARRAY_PARTITION variable = x cyclic factor = 2
    const int NB = K / BLOCK;
ROWS:
    for (int n = 0; n < N; n++) {
        acc_t acc = 0;
    BLOCKS:
        for (int b = 0; b < NB; b++) {
            ap_int<32> s = 0;
            const ap_int<6> zp = ap_int<6>(w_zp[n * NB + b]);
        ELEMS:
            for (int j = 0; j < BLOCK / 2; j++) {
#pragma HLS PIPELINE II = 1
                const wbyte_t byte = w_packed[(n * K + b * BLOCK) / 2 + j];
                const ap_int<6> w0 = ap_int<6>(ap_uint<4>(byte.range(3, 0))) - zp;
                const ap_int<6> w1 = ap_int<6>(ap_uint<4>(byte.range(7, 4))) - zp;
                s += ap_int<14>(w0 * x[b * BLOCK + 2 * j]) + ap_int<14>(w1 * x[b * BLOCK + 2 * j + 1]);
            }
            acc += acc_t(s) * acc_t(w_scale[n * NB + b]) * acc_t(x_scale[b]);
        }
        y[n] = round_shift_sat(acc, shift);
    }
}

#endif
