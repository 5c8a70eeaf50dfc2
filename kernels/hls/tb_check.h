// Testbench helpers shared by tb.cpp and the FPGA export's tb_layer0.cpp: copy plain C
// arrays (the golden model's vectors) into the kernels' ap_int types, run the kernel,
// count outputs that differ from the golden values.
#ifndef EDGETUNE_TB_CHECK_H
#define EDGETUNE_TB_CHECK_H

#include <cstdio>

#include "q4_dequant.h"
#include "q4q8_gemv.h"

template <int K, int N, int B>
struct Q4Inputs {
    wbyte_t w[N * K / 2];
    zp_t zp[N * (K / B)];
    scale_t ws[N * (K / B)];
    Q4Inputs(const unsigned char *w_, const unsigned char *zp_, const short *ws_) {
        for (int i = 0; i < N * K / 2; i++) w[i] = w_[i];
        for (int i = 0; i < N * (K / B); i++) { zp[i] = zp_[i]; ws[i] = ws_[i]; }
    }
};

template <typename T>
int count_mismatches(const char *what, const T *got, const long long *golden, int n) {
    int bad = 0;
    for (int i = 0; i < n; i++) {
        if (got[i].to_int64() != golden[i]) {
            if (bad < 5) std::printf("%s[%d] = %lld, golden %lld\n", what, i, (long long)got[i].to_int64(), golden[i]);
            bad++;
        }
    }
    return bad;
}

// Q4 x Q8 GEMV on one activation vector against its golden outputs.
template <int K, int N, int B>
int check_gemv(const char *name, const unsigned char *w, const unsigned char *zp, const short *ws,
               const signed char *x, const short *xs, int shift, const long long *golden) {
    Q4Inputs<K, N, B> *in = new Q4Inputs<K, N, B>(w, zp, ws);  // testbench only: kernels never allocate
    static act_t x_[K];
    static scale_t xs_[K / B];
    static out_t y[N];
    for (int i = 0; i < K; i++) x_[i] = x[i];
    for (int i = 0; i < K / B; i++) xs_[i] = xs[i];
    q4q8_gemv<K, N, B>(in->w, in->zp, in->ws, x_, xs_, shift, y);
    int bad = count_mismatches(name, y, golden, N);
    std::printf("%-40s N=%-5d K=%-5d %s\n", name, N, K, bad ? "MISMATCH" : "bit-exact");
    delete in;
    return bad;
}

// Q4 dequantizer on the same weights against its golden int32 values.
template <int K, int N, int B>
int check_q4_dequant(const unsigned char *w, const unsigned char *zp, const short *ws,
                     const long long *golden) {
    Q4Inputs<K, N, B> *in = new Q4Inputs<K, N, B>(w, zp, ws);
    static ap_int<32> out[N * K];
    q4_dequant<K, N, B>(in->w, in->zp, in->ws, out);
    delete in;
    return count_mismatches("q4 dequant", out, golden, N * K);
}

#endif
