// build: sm_90a only
// The 3x3 convolution's forward and input gradient on Hopper's warpgroup MMAs (version 4): the
// implicit GEMMs of conv.cu version 2 and 3, with the same tiles, loaders, pipeline and epilogue,
// their stage MMAs issued as wgmma (kernels/wgmma.cuh). Only K-major operands take wgmma here,
// so:
//   fprop  y = col(x) W, with W read as Wt[tap][co][ci] (conv3x3_weight_taps_cout_cin_bf16 in
//          conv.cu writes it): K-major rows co, which is DgradLoadB's order with Cin and Cout
//          swapped;
//   dgrad  as version 2 (all taps) and version 3 (stride 2 by parity class), loaders unchanged.
// The weight gradient reads both operands MN-major (K = the output pixels) and stays on
// mma.sync (conv.cu).
//
// The first line of this file makes build.rs compile it for sm_90a alone (wgmma exists nowhere
// else, and "a" targets run on no other architecture); the runtime loads the module only on a
// compute capability 9.0 GPU and chooses these kernels only when asked (EMPRIOR_WGMMA=1) and after
// they have given the CPU's bits on the tensor-core check's integer problems
// (src/nn/tensor_cores.rs). The #else branches exist for nvcc's host pass only.
// Launch contract: as conv.cu version 2 (blockDim = 256; Cin and Cout multiples of 8).
#include "common.cuh"
#include "conv_tc.cuh"
#include "wgmma.cuh"

// Mirrors conv.cu's (build/interface.rs checks the two definitions agree with the Rust mirror).
struct ConvGeometry {
    int n, h, w, cin, oh, ow, stride;
};
CHECK_LAYOUT(ConvGeometry);

// hot tensor-core wgmma
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    conv3x3_fprop_wgmma(const __nv_bfloat16* x, const __nv_bfloat16* w_taps_cout_cin, NULLABLE const float* bias,
                        NULLABLE float* y, NULLABLE __nv_bfloat16* y_bf16, ConvGeometry g, int cout,
                        NULLABLE const __nv_bfloat16* res_x, NULLABLE const float* res_m, NULLABLE float* res_out,
                        NULLABLE __nv_bfloat16* res_out_bf16) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    WG_SMEM_DECL;
    // Rows co, K = (tap, ci): DgradLoadB's order over [tap][co][ci].
    const auto weight = [&](int n0) { return DgradLoadB{n0, cout, g.cin}; };
    conv3x3_fprop_tc<WgEngine>(tc_smem, x, w_taps_cout_cin, weight, bias, y, y_bf16, g, cout, res_x, res_m, res_out,
                               res_out_bf16);
#else
    __trap();
#endif
}

// dx = beta dx + dgrad (beta 0 never reads dx), all nine taps.
// hot tensor-core wgmma
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    conv3x3_dgrad_wgmma(const __nv_bfloat16* dy, const __nv_bfloat16* w, NULLABLE float* dx,
                        NULLABLE __nv_bfloat16* dx_bf16, ConvGeometry g, int cout, float beta) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    WG_SMEM_DECL;
    conv3x3_dgrad_tc<WgEngine>(tc_smem, dy, w, dx, dx_bf16, g, cout, beta);
#else
    __trap();
#endif
}

// dx = beta dx + dgrad at stride 2, one parity class of input pixels per grid z (DgradParity).
// hot tensor-core wgmma
extern "C" __global__ void __launch_bounds__(TC_THREADS, 2)
    conv3x3_dgrad_s2_wgmma(const __nv_bfloat16* dy, const __nv_bfloat16* w, NULLABLE float* dx,
                           NULLABLE __nv_bfloat16* dx_bf16, ConvGeometry g, int cout, float beta) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    WG_SMEM_DECL;
    conv3x3_dgrad_s2_tc<WgEngine>(tc_smem, dy, w, dx, dx_bf16, g, cout, beta);
#else
    __trap();
#endif
}
