// 3x3 convolution, padding 1, stride 1 or 2, channels-last (NHWC), as im2col + GEMM: these
// kernels build the column matrix col[n, oy, ox, (ky, kx, ci)] from x and scatter its gradient
// back. The GEMMs (col x W, dy x W^T, col^T x dy) run in kernels/gemm.cu.
//
// col2im is written as a gather (each input pixel sums the column entries that read it, in a
// fixed order), so the input gradient needs no atomics and is deterministic.
//
// Launch contract: any grid/block; grid-stride loops.
#include "common.cuh"

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
