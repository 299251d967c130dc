// The denoising score-matching loss's per-sample weights from noise levels kept on the device
// (src/diffusion/loss.rs), so a training step uploads nothing: lambda = 1 / sigma^2 + 1 (EDM's
// weighting for sigma_data = 1), the loss weight lambda / bf and the gradient's 2 lambda / bf,
// bf = B F (the whole batch's rows times the features). In f64 from the f32 sigma, as the CPU
// body computes them, rounded once to f32. Launch contract: any grid/block; grid-stride.
#include "common.cuh"

extern "C" __global__ void dsm_weights_f32(const float* sigma, float* w_loss, float* w_grad, i64 n, double bf) {
    const i64 step = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
        const double s = (double)sigma[i];
        const double lambda = 1.0 / (s * s) + 1.0;
        w_loss[i] = (float)(lambda / bf);
        w_grad[i] = (float)(2.0 * lambda / bf);
    }
}
