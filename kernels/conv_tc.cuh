// The implicit-GEMM convolution passes on the tensor cores, written once for both MMAs: conv.cu
// instantiates them with mma.cuh's TcEngine (versions 2 and 3, mma.sync, sm_80 and newer),
// conv_sm90a.cu with wgmma.cuh's WgEngine (version 4, sm_90a). An engine brings the
// accumulators, the main loop and the epilogue's store; the tiles, loaders (tc_index.cuh) and
// epilogue (TcEpilogue) are the same. `smem` is the kernel's stage ring; every thread of the
// block calls these (barriers inside). G is the kernel's ConvGeometry.
#pragma once
#include "mma.cuh"

// y = col(x) W (+ bias) with W read through the loader `weight_loader(n0)` makes for the block's
// first column (the engines take W in different orders), and a ResBlock's residual when res_x
// is non-null (TcEpilogue).
template <class E, class G, class MakeLoadB>
__device__ __forceinline__ void conv3x3_fprop_tc(bf16* smem, const bf16* x, const bf16* w,
                                                 const MakeLoadB& weight_loader, const float* bias, float* y,
                                                 bf16* y_bf16, const G& g, int cout, const bf16* res_x,
                                                 const float* res_m, float* res_out, bf16* res_out_bf16) {
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    const int k = 9 * g.cin, m = g.n * g.oh * g.ow;
    const FpropLoadA<G> la(g, m0, threadIdx.x);
    const auto lb = weight_loader(n0);
    typename E::Acc acc;
    E::mainloop(smem, x, la, w, lb, 0, (k + TC_BK - 1) / TC_BK, acc);
    const TcEpilogue e{1.0f, 0.0f, bias, y, y_bf16, cout, res_x, res_m, res_out, res_out_bf16, g.oh * g.ow};
    E::store(acc, e, m0, n0, m, cout);
}

// dx = beta dx + dgrad over all nine taps (beta 0 never reads dx).
template <class E, class G>
__device__ __forceinline__ void conv3x3_dgrad_tc(bf16* smem, const bf16* dy, const bf16* w, float* dx, bf16* dx_bf16,
                                                 const G& g, int cout, float beta) {
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    const int k = 9 * cout, m = g.n * g.h * g.w;
    const DgradLoadA<G> la(g, cout, m0, threadIdx.x);
    const DgradLoadB lb{n0, g.cin, cout};
    typename E::Acc acc;
    E::mainloop(smem, dy, la, w, lb, 0, (k + TC_BK - 1) / TC_BK, acc);
    E::store(acc, TcEpilogue{1.0f, beta, nullptr, dx, dx_bf16, g.cin}, m0, n0, m, g.cin);
}

// dx = beta dx + dgrad at stride 2 for parity class blockIdx.z (DgradParity). Blocks past their
// class's pixels return at once (whole blocks, before any barrier).
template <class E, class G>
__device__ __forceinline__ void conv3x3_dgrad_s2_tc(bf16* smem, const bf16* dy, const bf16* w, float* dx,
                                                    bf16* dx_bf16, const G& g, int cout, float beta) {
    const DgradParity cls(g, blockIdx.z);
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    if (m0 >= cls.rows) return;
    const int k = cls.taps * cout;
    const DgradParityLoadA<G> la(g, cls, cout, m0, threadIdx.x);
    const DgradParityLoadB lb{cls, n0, g.cin, cout};
    typename E::Acc acc;
    E::mainloop(smem, dy, la, w, lb, 0, (k + TC_BK - 1) / TC_BK, acc);
    E::store(acc, TcEpilogue{1.0f, beta, nullptr, dx, dx_bf16, g.cin}, m0, n0, cls.rows, g.cin, cls);
}
