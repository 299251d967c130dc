// Data movement for the U-Net: nearest x2 upsampling and its adjoint, channel concatenation and
// its split, and a general permutation of up to 6 axes (pixel shuffle / unshuffle, attention
// head split and merge). Each output element is written exactly once (gathers only): no atomics.
//
// Launch contract: any grid/block; grid-stride loops.
#include "common.cuh"

// y[n, oy, ox, c] = x[n, oy / 2, ox / 2, c]; y is [n, 2h, 2w, c].
// hot
extern "C" __global__ void rs_upsample2x_f32(const float* x, float* y, i64 n, i64 h, i64 w, i64 c) {
    const i64 total = n * 4 * h * w * c, step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const i64 ch = i % c, pix = i / c;
        const i64 ox = pix % (2 * w), oy = (pix / (2 * w)) % (2 * h), b = pix / (4 * h * w);
        y[i] = x[((b * h + oy / 2) * w + ox / 2) * c + ch];
    }
}

// dx[n, iy, ix, c] = sum of the 2x2 block of dy above it.
// hot
extern "C" __global__ void rs_upsample2x_backward_f32(const float* dy, float* dx, i64 n, i64 h, i64 w, i64 c) {
    const i64 total = n * h * w * c, step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const i64 ch = i % c, pix = i / c;
        const i64 ix = pix % w, iy = (pix / w) % h, b = pix / (h * w);
        const float* r0 = dy + ((b * 2 * h + 2 * iy) * 2 * w + 2 * ix) * c + ch;
        const float* r1 = r0 + 2 * w * c;
        dx[i] = (r0[0] + r0[c]) + (r1[0] + r1[c]);
    }
}

// y[r, :ca] = a[r], y[r, ca:] = b[r] over rows r.
// hot
extern "C" __global__ void rs_concat_f32(const float* a, const float* b, float* y, i64 rows, i64 ca, i64 cb) {
    const i64 cy = ca + cb, total = rows * cy, step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const i64 r = i / cy, ch = i % cy;
        y[i] = ch < ca ? a[r * ca + ch] : b[r * cb + ch - ca];
    }
}

// The adjoint: da[r] = dy[r, :ca], db[r] = dy[r, ca:].
// hot
extern "C" __global__ void rs_split_f32(const float* dy, float* da, float* db, i64 rows, i64 ca, i64 cb) {
    const i64 cy = ca + cb, total = rows * cy, step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const i64 r = i / cy, ch = i % cy;
        if (ch < ca)
            da[r * ca + ch] = dy[i];
        else
            db[r * cb + ch - ca] = dy[i];
    }
}

// Mirrored in Rust by a generated struct (build/interface.rs): y's dims, and for each of y's axes the stride
// of the x axis it comes from.
struct PermuteParams {
    int rank;
    i64 out_dims[6];
    i64 in_strides[6];
};
CHECK_LAYOUT(PermuteParams);

// X, Y: float or bf16. A copy, so f32 -> bf16 rounds once (the kept bf16 copy of a permuted f32
// tensor without the f32 permuted copy) and bf16 -> bf16 is exact.
template <class X, class Y>
__device__ __forceinline__ void permute(const X* x, Y* y, i64 total, const PermuteParams& p) {
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        i64 rest = i, src = 0;
        // Unrolled with constant indices: a runtime index into the by-value arrays would copy
        // them to local memory (a 104-byte stack frame in ptxas -v).
#pragma unroll
        for (int a = 5; a >= 0; --a) {
            if (a < p.rank) {
                const i64 coord = rest % p.out_dims[a];
                rest /= p.out_dims[a];
                src += coord * p.in_strides[a];
            }
        }
        st(y, i, ld(x, src));
    }
}

// hot
extern "C" __global__ void rs_permute_f32(const float* x, float* y, i64 total, PermuteParams p) {
    permute(x, y, total, p);
}

// hot
extern "C" __global__ void rs_permute_f32_bf16y(const float* x, __nv_bfloat16* y, i64 total, PermuteParams p) {
    permute(x, y, total, p);
}

// hot
extern "C" __global__ void rs_permute_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, i64 total, PermuteParams p) {
    permute(x, y, total, p);
}

// The U-Net's merge input under the bf16 policy, in one pass over kept bf16 values:
// cat[b, y, x, :cu] = below[b, y / 2, x / 2, :] (nearest x2 upsampling of the level below's
// LayerNorm output), cat[b, y, x, cu:] = skip[b, y, x, :]. h, w are the skip's (the output's).
// Pure copies: the same bits as upsampling and concatenating in f32 and rounding.
// hot
extern "C" __global__ void rs_upsample_concat_bf16(const __nv_bfloat16* below, const __nv_bfloat16* skip,
                                                   __nv_bfloat16* cat, i64 n, i64 h, i64 w, i64 cu, i64 cs) {
    const i64 cy = cu + cs, total = n * h * w * cy, step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const i64 ch = i % cy, pix = i / cy;
        const i64 x = pix % w, y = (pix / w) % h, b = pix / (h * w);
        cat[i] = ch < cu ? below[((b * (h / 2) + y / 2) * (w / 2) + x / 2) * cu + ch] : skip[pix * cs + ch - cu];
    }
}
