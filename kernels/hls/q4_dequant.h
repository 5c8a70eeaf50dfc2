// Q4 (MatMulNBits) dequantizer for HLS (spec: kernels/fixed_point.py, q4_dequant_fixed).
//
//   out[n, k] = (q[n, k] - zp[n, b]) * ws[n, b]        int32 = int5 x int16, Q(ws_frac)
//
// Initiation interval target: II=1, one packed byte (two codes) per clock; resources: two
// 5x16-bit multipliers, no memories beyond the AXI streams.
#ifndef EDGETUNE_Q4_DEQUANT_H
#define EDGETUNE_Q4_DEQUANT_H

#include <ap_int.h>

template <int K, int N, int BLOCK>
void q4_dequant(const ap_uint<8> w_packed[N * K / 2], const ap_uint<4> w_zp[N * (K / BLOCK)],
                const ap_int<16> w_scale[N * (K / BLOCK)], ap_int<32> out[N * K]) {
    const int NB = K / BLOCK;
ROWS:
    for (int n = 0; n < N; n++) {
    BYTES:
        for (int j = 0; j < K / 2; j++) {
#pragma HLS PIPELINE II = 1
            const int b = (2 * j) / BLOCK;
            const ap_uint<8> byte = w_packed[n * (K / 2) + j];
            const ap_int<6> zp = ap_int<6>(w_zp[n * NB + b]);
            const ap_int<16> s = w_scale[n * NB + b];
            out[n * K + 2 * j] = ap_int<32>((ap_int<6>(ap_uint<4>(byte.range(3, 0))) - zp) * s);
            out[n * K + 2 * j + 1] = ap_int<32>((ap_int<6>(ap_uint<4>(byte.range(7, 4))) - zp) * s);
        }
    }
}

#endif
