// C-simulation testbench: runs the kernels on the vectors in tb_vectors.h (written by
// edgetune from the numpy golden model) and returns 0 only if every output is equal.
#include <cstdio>

#include "nf4_dequant.h"
#include "tb_check.h"
#include "tb_vectors.h"

int main() {
    int bad = check_gemv<TB_K, TB_N, TB_BLOCK>("q4q8 gemv", TB_W_PACKED, TB_W_ZP, TB_W_SCALE, TB_X,
                                              TB_X_SCALE, TB_SHIFT, TB_Y);
    bad += check_q4_dequant<TB_K, TB_N, TB_BLOCK>(TB_W_PACKED, TB_W_ZP, TB_W_SCALE, TB_W_DEQ);
    static ap_uint<8> nf4_packed[TB_NF4_NUMEL / 2];
    static ap_int<16> nf4_absmax[TB_NF4_NUMEL / 64];
    static ap_int<32> nf4_out[TB_NF4_NUMEL];
    for (int i = 0; i < TB_NF4_NUMEL / 2; i++) nf4_packed[i] = TB_NF4_PACKED[i];
    for (int i = 0; i < TB_NF4_NUMEL / 64; i++) nf4_absmax[i] = TB_NF4_ABSMAX[i];
    nf4_dequant<TB_NF4_NUMEL>(nf4_packed, nf4_absmax, nf4_out);
    bad += count_mismatches("nf4 dequant", nf4_out, TB_NF4_OUT, TB_NF4_NUMEL);
    std::printf("%s: %d mismatches (%d gemv outputs, %d q4 and %d nf4 values)\n", bad ? "FAIL" : "PASS",
                bad, TB_N, TB_N * TB_K, TB_NF4_NUMEL);
    return bad != 0;
}
