// NF4 dequantizer through an integer code book, for HLS (spec: kernels/fixed_point.py).
//
//   out[i] = NF4_I8[code i] * absmax[i / 64]          int32 = int8 x int16
//
// NF4_I8 is round(127 * NF4 value): the 16-entry code book as int8, completely partitioned
// into registers. Initiation interval target: II=1, two codes (one byte) per clock;
// resources: two 8x16-bit multipliers, 16 bytes of registers for the code book.
#ifndef EDGETUNE_NF4_DEQUANT_H
#define EDGETUNE_NF4_DEQUANT_H

#include <ap_int.h>

static const ap_int<8> NF4_I8[16] = {-127, -88, -67, -50, -36, -23, -12, 0,
                                     10,   20,  31,  43,  56,  71,  92,  127};

template <int NUMEL>
void nf4_dequant(const ap_uint<8> packed[NUMEL / 2], const ap_int<16> absmax[NUMEL / 64],
                 ap_int<32> out[NUMEL]) {
#pragma HLS ARRAY_PARTITION variable = NF4_I8 complete
BYTES:
    for (int j = 0; j < NUMEL / 2; j++) {
#pragma HLS PIPELINE II = 1
        const ap_uint<8> byte = packed[j];
        const ap_int<16> am = absmax[(2 * j) / 64];
        out[2 * j] = ap_int<32>(NF4_I8[ap_uint<4>(byte.range(3, 0))] * am);
        out[2 * j + 1] = ap_int<32>(NF4_I8[ap_uint<4>(byte.range(7, 4))] * am);
    }
}

#endif
