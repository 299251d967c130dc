// Batched conjugate gradient's per-system step (src/posterior/cg.rs, whose CPU twin gives the
// same bits): alpha = rr / pAp and keep = 1, except for a system that has converged (rr <= tol2 *
// bn: its residual within the relative tolerance of its right-hand side, bn = ||b||^2; alpha 0,
// keep 1) or that meets curvature at or below the floor (pAp <= floor * pp, pp = ||p||^2, which
// includes pAp <= 0 and p = 0: the system is not positive definite along p; alpha 0, keep 0, and
// the caller zeroes its residual so it stays put). A system's iterates then do not depend on which
// other systems share its batch, nor on when the host looks.
//
// Launch contract: any grid/block; grid-stride.
#include "common.cuh"

// hot
extern "C" __global__ void cg_step_size_f32(const float* rr, const float* pap, const float* pp, const float* bn,
                                            float tol2, float floor_curvature, float* alpha, float* keep,
                                            i64 n) {
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const bool converged = rr[i] <= tol2 * bn[i];
        const bool flat = pap[i] <= floor_curvature * pp[i];
        alpha[i] = (converged || flat) ? 0.0f : rr[i] / pap[i];
        keep[i] = (!converged && flat) ? 0.0f : 1.0f;
    }
}
