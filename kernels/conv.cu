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
//   dgrad  dx[N*H*W][Cin]        = dcol(dy)[..][9 Cout] W'[9 Cout][Cin], W'[(tap, co)][ci] = W[tap][ci][co]
//   wgrad  dW[9 Cin][Cout]       = col(x)^T dy, K = N*OH*OW split over grid.z into f32 partials,
//                                  then summed in split order by conv3x3_wgrad_sum_f32 (no atomics)
// dgrad reads dy[n, (iy + 1 - ky) / s, ...] where the division is exact (stride 2: 3 of 4 taps
// of an output pixel land between input pixels and are zero filled; their MMAs are wasted).
// Launch contract (src/nn/conv.rs checks it): blockDim = 256; grid = (ceil(M/128), ceil(N/128),
// 1 or splits); Cin and Cout multiples of 8.
#include "common.cuh"
#include "mma.cuh"

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

// A thread of tc_load_stage fills K-major rows tid / 4 and tid / 4 + 64 of every A tile; the row
// loaders below precompute those two rows' pixels once (slot = r >= 64).
__device__ __forceinline__ int tc_kmajor_row(int slot) { return (threadIdx.x >> 2) + 64 * slot; }

// fprop A: rows are output pixels m = (n, oy, ox), columns k = (tap, ci) of col(x).
struct FpropLoadA {
    static constexpr bool K_MAJOR = true;
    const bf16* x;
    ConvGeometry g;
    int k;  // 9 cin
    i64 pixel[2];  // n * h, or -1 past the last pixel
    int iy0[2], ix0[2];
    __device__ FpropLoadA(const bf16* x_, const ConvGeometry& g_, int m0) : x(x_), g(g_), k(9 * g_.cin) {
        const int m = g.n * g.oh * g.ow;
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            const int row = m0 + tc_kmajor_row(s);
            const int ox = row % g.ow, oy = (row / g.ow) % g.oh, n = row / (g.ow * g.oh);
            pixel[s] = row < m ? (i64)n * g.h : -1;
            iy0[s] = oy * g.stride - 1;
            ix0[s] = ox * g.stride - 1;
        }
    }
    __device__ __forceinline__ const bf16* chunk(int r, int c, int kt, bool& valid) const {
        // Selects, not a dynamic index: an indexed register array would live in local memory.
        const bool s = r >= 64;
        const i64 pix = s ? pixel[1] : pixel[0];
        const int kk = kt * TC_BK + c * 8;
        const int tap = kk / g.cin, ci = kk - tap * g.cin;
        const int iy = (s ? iy0[1] : iy0[0]) + tap / 3, ix = (s ? ix0[1] : ix0[0]) + tap % 3;
        valid = pix >= 0 && kk < k && iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
        return valid ? x + ((pix + iy) * g.w + ix) * g.cin + ci : x;
    }
};

// dgrad A: rows are input pixels (n, iy, ix), columns k = (tap, co) of dy at the pixel that tap
// reads from: oy = (iy + 1 - ky) / stride when exact and inside.
struct DgradLoadA {
    static constexpr bool K_MAJOR = true;
    const bf16* dy;
    ConvGeometry g;
    int cout, k;  // 9 cout
    i64 pixel[2];  // n * oh, or -1 past the last pixel
    int ty0[2], tx0[2];  // iy + 1, ix + 1
    __device__ DgradLoadA(const bf16* dy_, const ConvGeometry& g_, int cout_, int m0)
        : dy(dy_), g(g_), cout(cout_), k(9 * cout_) {
        const int m = g.n * g.h * g.w;
#pragma unroll
        for (int s = 0; s < 2; ++s) {
            const int row = m0 + tc_kmajor_row(s);
            const int ix = row % g.w, iy = (row / g.w) % g.h, n = row / (g.w * g.h);
            pixel[s] = row < m ? (i64)n * g.oh : -1;
            ty0[s] = iy + 1;
            tx0[s] = ix + 1;
        }
    }
    __device__ __forceinline__ const bf16* chunk(int r, int c, int kt, bool& valid) const {
        const bool s = r >= 64;
        const i64 pix = s ? pixel[1] : pixel[0];
        const int kk = kt * TC_BK + c * 8;
        const int tap = kk / cout, co = kk - tap * cout;
        const int ty = (s ? ty0[1] : ty0[0]) - tap / 3, tx = (s ? tx0[1] : tx0[0]) - tap % 3;
        const int oy = ty / g.stride, ox = tx / g.stride;
        valid = pix >= 0 && kk < k && ty >= 0 && tx >= 0 && oy * g.stride == ty && ox * g.stride == tx &&
                oy < g.oh && ox < g.ow;
        return valid ? dy + ((pix + oy) * g.ow + ox) * cout + co : dy;
    }
};

// dgrad B: W'[(tap, co)][ci] = W[tap][ci][co], stored [ci][co] per tap: K-major rows ci.
struct DgradLoadB {
    static constexpr bool K_MAJOR = true;
    const bf16* w;
    int n0, cin, cout;
    __device__ __forceinline__ const bf16* chunk(int r, int c, int kt, bool& valid) const {
        const int ci = n0 + r, kk = kt * TC_BK + c * 8;
        const int tap = kk / cout, co = kk - tap * cout;
        valid = ci < cin && tap < 9;
        return valid ? w + ((i64)tap * cin + ci) * cout + co : w;
    }
};

// wgrad A': rows are output pixels p (the GEMM's K), columns (tap, ci) (its M): col(x)^T.
struct WgradLoadA {
    static constexpr bool K_MAJOR = false;
    const bf16* x;
    ConvGeometry g;
    int m0, pixels;
    __device__ __forceinline__ const bf16* chunk(int r, int c, int kt, bool& valid) const {
        const int p = kt * TC_BK + r, col = m0 + c * 8;
        const int tap = col / g.cin, ci = col - tap * g.cin;
        const int ox = p % g.ow, oy = (p / g.ow) % g.oh, n = p / (g.ow * g.oh);
        const int iy = oy * g.stride - 1 + tap / 3, ix = ox * g.stride - 1 + tap % 3;
        valid = p < pixels && tap < 9 && iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
        return valid ? x + (((i64)n * g.h + iy) * g.w + ix) * g.cin + ci : x;
    }
};

// hot tensor-core
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    conv3x3_fprop_bf16(const __nv_bfloat16* x, const __nv_bfloat16* w, NULLABLE const float* bias,
                       NULLABLE float* y, NULLABLE __nv_bfloat16* y_bf16, ConvGeometry g, int cout) {
#if __CUDA_ARCH__ >= 800
    TC_SMEM_DECL;
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    const int k = 9 * g.cin, m = g.n * g.oh * g.ow;
    const FpropLoadA la(x, g, m0);
    const DenseMNMajor lb{w, n0, cout, k, cout};
    TcAcc acc;
    tc_mainloop<true, false>(tc_smem, la, lb, 0, (k + TC_BK - 1) / TC_BK, acc);
    tc_store(acc, TcEpilogue{1.0f, 0.0f, bias, y, y_bf16, cout}, m0, n0, m, cout);
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
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    const int k = 9 * cout, m = g.n * g.h * g.w;
    const DgradLoadA la(dy, g, cout, m0);
    const DgradLoadB lb{w, n0, g.cin, cout};
    TcAcc acc;
    tc_mainloop<true, true>(tc_smem, la, lb, 0, (k + TC_BK - 1) / TC_BK, acc);
    tc_store(acc, TcEpilogue{1.0f, beta, nullptr, dx, dx_bf16, g.cin}, m0, n0, m, g.cin);
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
    const int tiles = (pixels + TC_BK - 1) / TC_BK, per = (tiles + splits - 1) / splits;
    const int z = blockIdx.z;
    const int begin = min(tiles, z * per), end = min(tiles, begin + per);
    const WgradLoadA la{x, g, m0, pixels};
    const DenseMNMajor lb{dy, n0, cout, pixels, cout};
    TcAcc acc;
    tc_mainloop<false, false>(tc_smem, la, lb, begin, end, acc);
    float* out = partials + (i64)z * m * cout;
    tc_store(acc, TcEpilogue{1.0f, 0.0f, nullptr, out, nullptr, cout}, m0, n0, m, cout);
#else
    __trap();
#endif
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
