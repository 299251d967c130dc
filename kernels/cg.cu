// Batched conjugate gradient's per-system step size (src/posterior/cg.rs, whose CPU twin gives
// the same bits): alpha = rr / pAp, and 0 for a system that has converged (rr <= tol2 * bn: its
// residual within the relative tolerance of its right-hand side, bn = ||b||^2) or whose pAp is 0.
// A converged system then stays where it is, so its iterates do not depend on which other
// systems share its batch, nor on when the host looks. tol2 = 0 leaves only the pAp guard.
//
// Launch contract: any grid/block; grid-stride.
#include "common.cuh"

// hot
extern "C" __global__ void cg_step_size_f32(const float* rr, const float* pap, const float* bn, float tol2,
                                            float* alpha, i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const bool converged = rr[i] <= tol2 * bn[i];
        alpha[i] = (converged || pap[i] == 0.0f) ? 0.0f : rr[i] / pap[i];
    }
}
