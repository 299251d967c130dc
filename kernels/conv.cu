// 3x3 convolution, padding 1, stride 1 or 2, channels-last (NHWC), as im2col + GEMM: these
// kernels build the column matrix col[n, oy, ox, (ky, kx, ci)] from x and scatter its gradient
// back. The GEMMs (col x W, dy x W^T, col^T x dy) run in kernels/gemm.cu.
//
// col2im is written as a gather (each input pixel sums the column entries that read it, in a
// fixed order), so the input gradient needs no atomics and is deterministic.
//
// Launch contract: any grid/block; grid-stride loops.
//
// Version 2, implicit GEMM on the tensor cores (conv3x3_*_bf16, at the end of this file): bf16
// operands, f32 accumulation, no column buffer: the main loop of mma.cuh gathers the im2col
// chunks straight from the NHWC tensors (8 channels of one tap per 16-byte copy, zero filled in
// the padding). Weights stay [3, 3, Cin, Cout] = [9 Cin][Cout]. The three passes as GEMMs:
//   fprop  y[M = N*OH*OW][Cout]  = col(x)[M][9 Cin]  W[9 Cin][Cout]            (+ bias)
//          and, for a ResBlock's conv2 (res_x non-null, y_bf16 kept), its residual out = (x + c y)
//          / sqrt(1 + c^2) from the same registers (TcEpilogue): one pass fewer over y
//   dgrad  dx[N*H*W][Cin]        = dcol(dy)[..][9 Cout] W'[9 Cout][Cin], W'[(tap, co)][ci] = W[tap][ci][co]
//   wgrad  dW[9 Cin][Cout]       = col(x)^T dy, K = N*OH*OW split over grid.z into f32 partials,
//                                  then summed in split order by conv3x3_wgrad_sum_f32 (no atomics)
// dgrad reads dy[n, (iy + 1 - ky) / s, ...] where the division is exact. At stride 2 the 9-tap
// kernel zero fills the taps that land between output pixels (6.75 of 9 per input pixel on
// average: their MMAs are wasted); version 3, conv3x3_dgrad_s2_bf16, runs one parity class of input pixels
// per grid z with only its 1, 2, 2 or 4 live taps (tc_index.cuh, DgradParity).
// Launch contract (src/nn/conv.rs checks it): blockDim = 256; grid = (ceil(M/128), ceil(N/128),
// 1 or splits); Cin and Cout multiples of 8.
#include "common.cuh"
#include "conv_tc.cuh"

// Mirrored in Rust by a generated struct (build/interface.rs), with methods in src/nn/conv.rs.
struct ConvGeometry {
    int n, h, w, cin, oh, ow, stride;
};
CHECK_LAYOUT(ConvGeometry);

// hot
extern "C" __global__ void conv_im2col_f32(const float* x, float* col, ConvGeometry g) {
    const i64 kc = 9LL * g.cin;
    const i64 total = (i64)g.n * g.oh * g.ow * kc;
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const int ci = (int)(i % g.cin);
        const int tap = (int)((i / g.cin) % 9);
        const i64 pix = i / kc;  // n * oh * ow + oy * ow + ox
        const int ox = (int)(pix % g.ow), oy = (int)((pix / g.ow) % g.oh);
        const i64 n = pix / ((i64)g.ow * g.oh);
        const int iy = oy * g.stride + tap / 3 - 1, ix = ox * g.stride + tap % 3 - 1;
        float v = 0.0f;
        if (iy >= 0 && iy < g.h && ix >= 0 && ix < g.w) v = x[((n * g.h + iy) * g.w + ix) * g.cin + ci];
        col[i] = v;
    }
}

// dx[n, iy, ix, ci] = sum over taps (ky, kx) and output pixels (oy, ox) with
// oy * stride + ky - 1 == iy (same for x) of dcol[n, oy, ox, (ky, kx, ci)].
// hot
extern "C" __global__ void conv_col2im_f32(const float* dcol, float* dx, ConvGeometry g) {
    const i64 total = (i64)g.n * g.h * g.w * g.cin;
    const i64 step = (i64)gridDim.x * blockDim.x;
    const i64 kc = 9LL * g.cin;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const int ci = (int)(i % g.cin);
        const i64 pix = i / g.cin;
        const int ix = (int)(pix % g.w), iy = (int)((pix / g.w) % g.h);
        const i64 n = pix / ((i64)g.w * g.h);
        float acc = 0.0f;
        for (int ky = 0; ky < 3; ++ky) {
            const int ty = iy + 1 - ky;  // = oy * stride
            if (ty < 0 || ty % g.stride) continue;
            const int oy = ty / g.stride;
            if (oy >= g.oh) continue;
            for (int kx = 0; kx < 3; ++kx) {
                const int tx = ix + 1 - kx;
                if (tx < 0 || tx % g.stride) continue;
                const int ox = tx / g.stride;
                if (ox >= g.ow) continue;
                acc += dcol[((n * g.oh + oy) * g.ow + ox) * kc + (ky * 3 + kx) * g.cin + ci];
            }
        }
        dx[i] = acc;
    }
}

// ---- version 2: implicit GEMM on the tensor cores --------------------------------------------------

// The loaders (FpropLoadA, DgradLoadA, DgradLoadB, WgradLoadA) are in tc_index.cuh, where the
// host emulation of tests/tc_emulation.rs runs them too.

// hot tensor-core
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    conv3x3_fprop_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, NULLABLE const float* bias,
                       NULLABLE float* y, NULLABLE __nv_bfloat16* y_bf16, ConvGeometry g, int cout,
                       NULLABLE const __nv_bfloat16* res_x, NULLABLE const float* res_m, NULLABLE float* res_out,
                       NULLABLE __nv_bfloat16* res_out_bf16) {
#if __CUDA_ARCH__ >= 800
    TC_SMEM_DECL;
    // W as stored, [9 Cin][Cout]: MN-major rows k.
    const auto weight = [&](int n0) { return DenseMNMajor{n0, cout, 9 * g.cin, cout}; };
    conv3x3_fprop_tc<TcEngine>(tc_smem, x, w, weight, bias, y, y_bf16, g, cout, res_x, res_m, res_out, res_out_bf16);
#else
    __trap();
#endif
}

// dx = beta dx + dgrad (beta 0 never reads dx).
// hot tensor-core
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    conv3x3_dgrad_bf16(const __nv_bfloat16* dy, const __nv_bfloat16* w, NULLABLE float* dx,
                       NULLABLE __nv_bfloat16* dx_bf16, ConvGeometry g, int cout, float beta) {
#if __CUDA_ARCH__ >= 800
    TC_SMEM_DECL;
    conv3x3_dgrad_tc<TcEngine>(tc_smem, dy, w, dx, dx_bf16, g, cout, beta);
#else
    __trap();
#endif
}

// dx = beta dx + dgrad at stride 2, one parity class of input pixels per grid z (DgradParity):
// K = (the class's taps) x Cout, no zero-filled taps; the epilogue stores each row at its pixel.
// hot tensor-core
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    conv3x3_dgrad_s2_bf16(const __nv_bfloat16* dy, const __nv_bfloat16* w, NULLABLE float* dx,
                          NULLABLE __nv_bfloat16* dx_bf16, ConvGeometry g, int cout, float beta) {
#if __CUDA_ARCH__ >= 800
    TC_SMEM_DECL;
    conv3x3_dgrad_s2_tc<TcEngine>(tc_smem, dy, w, dx, dx_bf16, g, cout, beta);
#else
    __trap();
#endif
}

// Split z of the weight gradient: partials[z][9 cin][cout] = the product over its share of the
// output pixels (K tiles z * per .. (z + 1) * per, per = ceil(tiles / splits)).
// hot tensor-core
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    conv3x3_wgrad_bf16(const __nv_bfloat16* x, const __nv_bfloat16* dy, float* partials, ConvGeometry g, int cout,
                       int splits) {
#if __CUDA_ARCH__ >= 800
    TC_SMEM_DECL;
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    const int m = 9 * g.cin, pixels = g.n * g.oh * g.ow;
    const int z = blockIdx.z;
    int begin, end;
    tc_split_range((pixels + TC_BK - 1) / TC_BK, splits, z, begin, end);
    const WgradLoadA<ConvGeometry> la{g, m0, pixels};
    const DenseMNMajor lb{n0, cout, pixels, cout};
    TcAcc acc;
    tc_mainloop(tc_smem, x, la, dy, lb, begin, end, acc);
    float* out = partials + (i64)z * m * cout;
    tc_store(acc, TcEpilogue{1.0f, 0.0f, nullptr, out, nullptr, cout}, m0, n0, m, cout);
#else
    __trap();
#endif
}

// wt[tap][co][ci] = w[tap][ci][co]: the weight in the order the Hopper forward reads it
// (K-major rows co; kernels/conv_sm90a.cu). One pass over the weight per forward: 9 Cin Cout
// values against the N H W (Cin + Cout) of the activations it multiplies.
extern "C" __global__ void conv3x3_weight_taps_cout_cin_bf16(const __nv_bfloat16* w, __nv_bfloat16* wt, int cin,
                                                             int cout) {
    const i64 total = 9LL * cin * cout;
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const int ci = (int)(i % cin);
        const i64 rest = i / cin;
        const int co = (int)(rest % cout);
        const i64 tap = rest / cout;
        wt[i] = w[(tap * cin + ci) * cout + co];
    }
}

// dw = beta dw + sum over z = 0 .. splits - 1, in that order, of partials[z] (count values each).
// hot
extern "C" __global__ void conv3x3_wgrad_sum_f32(const float* partials, float* dw, int splits, i64 count,
                                                 float beta) {
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += step) {
        float v = 0.0f;
        for (int z = 0; z < splits; ++z) v += partials[(i64)z * count + i];
        dw[i] = beta != 0.0f ? fmaf(beta, dw[i], v) : v;
    }
}
