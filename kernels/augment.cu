// Data augmentation for the image M-steps (method.md §8.3): per image, a horizontal flip with
// probability 1/2 and a translation by (dy, dx) in [-shift, shift]^2 with reflect padding
// (numpy's 'reflect': the edge pixel is not repeated). The choices come from Philox block i of
// (seed, stream) for image i, so the CPU (src/train/augment.rs) makes the same ones; no
// per-step upload.
//
// Launch contract: any grid/block; grid-stride over n * h * w * c.
#include "common.cuh"

__device__ __forceinline__ int reflect_index(int i, int size) {
    if (size == 1) return 0;
    const int period = 2 * (size - 1);
    i %= period;
    if (i < 0) i += period;
    return i < size ? i : period - i;
}

extern "C" __global__ void aug_flip_shift_f32(const float* x, float* y, i64 n, int h, int w, int c, int shift, u64 seed,
                                              u64 stream) {
    const i64 total = n * h * w * c, step = (i64)gridDim.x * blockDim.x;
    const uint32_t span = 2u * (uint32_t)shift + 1u;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step) {
        const int ch = (int)(i % c);
        const i64 pix = i / c;
        const int xx = (int)(pix % w), yy = (int)((pix / w) % h);
        const i64 img = pix / ((i64)w * h);
        const Philox4 r = philox_block(seed, stream, (u64)img);
        const bool flip = r.v[0] & 1u;
        const int dy = (int)(r.v[1] % span) - shift, dx = (int)(r.v[2] % span) - shift;
        const int sy = reflect_index(yy + dy, h);
        int sx = reflect_index(xx + dx, w);
        if (flip) sx = w - 1 - sx;
        y[i] = x[((img * h + sy) * w + sx) * c + ch];
    }
}
