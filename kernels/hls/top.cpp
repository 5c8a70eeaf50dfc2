// Synthesis top functions: fixed sizes come from config.h (written by the FPGA export).
// AXI4 masters carry the weight stream; AXI4-Lite carries control, the shift and the
// small activation / scale buffers.
#include "config.h"
#include "nf4_dequant.h"
#include "q4_dequant.h"
#include "q4q8_gemv.h"

void q4q8_gemv_top(const wbyte_t w_packed[ET_N * ET_K / 2], const zp_t w_zp[ET_N * (ET_K / ET_BLOCK)],
                   const scale_t w_scale[ET_N * (ET_K / ET_BLOCK)], const act_t x[ET_K],
                   const scale_t x_scale[ET_K / ET_BLOCK], int shift, out_t y[ET_N]) {
#pragma HLS INTERFACE m_axi port = w_packed offset = slave bundle = gmem0 depth = ET_N * ET_K / 2
#pragma HLS INTERFACE m_axi port = w_zp offset = slave bundle = gmem1 depth = ET_N * (ET_K / ET_BLOCK)
#pragma HLS INTERFACE m_axi port = w_scale offset = slave bundle = gmem1 depth = ET_N * (ET_K / ET_BLOCK)
#pragma HLS INTERFACE m_axi port = y offset = slave bundle = gmem2 depth = ET_N
#pragma HLS INTERFACE s_axilite port = x bundle = control
#pragma HLS INTERFACE s_axilite port = x_scale bundle = control
#pragma HLS INTERFACE s_axilite port = shift bundle = control
#pragma HLS INTERFACE s_axilite port = return bundle = control
    q4q8_gemv<ET_K, ET_N, ET_BLOCK>(w_packed, w_zp, w_scale, x, x_scale, shift, y);
}

void nf4_dequant_top(const ap_uint<8> packed[ET_NF4_NUMEL / 2], const ap_int<16> absmax[ET_NF4_NUMEL / 64],
                     ap_int<32> out[ET_NF4_NUMEL]) {
#pragma HLS INTERFACE m_axi port = packed offset = slave bundle = gmem0 depth = ET_NF4_NUMEL / 2
#pragma HLS INTERFACE m_axi port = absmax offset = slave bundle = gmem1 depth = ET_NF4_NUMEL / 64
#pragma HLS INTERFACE m_axi port = out offset = slave bundle = gmem2 depth = ET_NF4_NUMEL
#pragma HLS INTERFACE s_axilite port = return bundle = control
    nf4_dequant<ET_NF4_NUMEL>(packed, absmax, out);
}

void q4_dequant_top(const ap_uint<8> w_packed[ET_N * ET_K / 2], const ap_uint<4> w_zp[ET_N * (ET_K / ET_BLOCK)],
                    const ap_int<16> w_scale[ET_N * (ET_K / ET_BLOCK)], ap_int<32> out[ET_N * ET_K]) {
#pragma HLS INTERFACE m_axi port = w_packed offset = slave bundle = gmem0 depth = ET_N * ET_K / 2
#pragma HLS INTERFACE m_axi port = w_zp offset = slave bundle = gmem1 depth = ET_N * (ET_K / ET_BLOCK)
#pragma HLS INTERFACE m_axi port = w_scale offset = slave bundle = gmem1 depth = ET_N * (ET_K / ET_BLOCK)
#pragma HLS INTERFACE m_axi port = out offset = slave bundle = gmem2 depth = ET_N * ET_K
#pragma HLS INTERFACE s_axilite port = return bundle = control
    q4_dequant<ET_K, ET_N, ET_BLOCK>(w_packed, w_zp, w_scale, out);
}
