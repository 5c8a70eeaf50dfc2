// C-simulation testbench: runs both kernels on the vectors in tb_vectors.h (written by
// edgetune from the numpy golden model) and returns 0 only if every output is equal.
#include <cstdio>

#include "nf4_dequant.h"
#include "q4_dequant.h"
#include "q4q8_gemv.h"
#include "tb_vectors.h"

int main() {
    static wbyte_t w_packed[TB_N * TB_K / 2];
    static zp_t w_zp[TB_N * (TB_K / TB_BLOCK)];
    static scale_t w_scale[TB_N * (TB_K / TB_BLOCK)];
    static act_t x[TB_K];
    static scale_t x_scale[TB_K / TB_BLOCK];
    static out_t y[TB_N];
    for (int i = 0; i < TB_N * TB_K / 2; i++) w_packed[i] = TB_W_PACKED[i];
    for (int i = 0; i < TB_N * (TB_K / TB_BLOCK); i++) {
        w_zp[i] = TB_W_ZP[i];
        w_scale[i] = TB_W_SCALE[i];
    }
    for (int i = 0; i < TB_K; i++) x[i] = TB_X[i];
    for (int i = 0; i < TB_K / TB_BLOCK; i++) x_scale[i] = TB_X_SCALE[i];
    q4q8_gemv<TB_K, TB_N, TB_BLOCK>(w_packed, w_zp, w_scale, x, x_scale, TB_SHIFT, y);
    int bad = 0;
    for (int n = 0; n < TB_N; n++) {
        if (y[n].to_int64() != (long long)TB_Y[n]) {
            if (bad < 5) std::printf("q4q8 y[%d] = %lld, golden %lld\n", n, (long long)y[n].to_int64(), (long long)TB_Y[n]);
            bad++;
        }
    }
    static ap_int<32> w_deq[TB_N * TB_K];
    q4_dequant<TB_K, TB_N, TB_BLOCK>(w_packed, w_zp, w_scale, w_deq);
    for (int i = 0; i < TB_N * TB_K; i++) {
        if (w_deq[i].to_int64() != (long long)TB_W_DEQ[i]) {
            if (bad < 5) std::printf("q4 dequant[%d] = %lld, golden %lld\n", i, (long long)w_deq[i].to_int64(), (long long)TB_W_DEQ[i]);
            bad++;
        }
    }
    static ap_uint<8> nf4_packed[TB_NF4_NUMEL / 2];
    static ap_int<16> nf4_absmax[TB_NF4_NUMEL / 64];
    static ap_int<32> nf4_out[TB_NF4_NUMEL];
    for (int i = 0; i < TB_NF4_NUMEL / 2; i++) nf4_packed[i] = TB_NF4_PACKED[i];
    for (int i = 0; i < TB_NF4_NUMEL / 64; i++) nf4_absmax[i] = TB_NF4_ABSMAX[i];
    nf4_dequant<TB_NF4_NUMEL>(nf4_packed, nf4_absmax, nf4_out);
    for (int i = 0; i < TB_NF4_NUMEL; i++) {
        if (nf4_out[i].to_int64() != (long long)TB_NF4_OUT[i]) {
            if (bad < 5) std::printf("nf4 out[%d] = %lld, golden %lld\n", i, (long long)nf4_out[i].to_int64(), (long long)TB_NF4_OUT[i]);
            bad++;
        }
    }
    std::printf("%s: %d mismatches (%d gemv outputs, %d q4 and %d nf4 values)\n", bad ? "FAIL" : "PASS",
                bad, TB_N, TB_N * TB_K, TB_NF4_NUMEL);
    return bad != 0;
}
