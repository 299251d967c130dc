// Every index computation of the tensor-core kernels (mma.cuh, gemm.cu and conv.cu version 2),
// and the order of their copies, waits and barriers (tc_pipeline), in one header that also
// compiles as plain C++ on the host: tests/tc_emulation.rs builds tests/tc_emulator.cpp against
// it, which runs these very functions through a CPU model of cp.async (landing at a wait,
// published at a barrier), ldmatrix and mma.sync (their PTX semantics) and checks whole GEMMs
// and convolutions exactly. So the tile orders, the swizzle, the fragment addressing, the
// epilogue's mapping, the im2col gathers and the pipeline's synchronisation are checked without
// a GPU; what is left to the hardware is the instructions themselves.
//
// Nothing here touches threadIdx: the thread and lane are parameters.
#pragma once

#ifdef __CUDACC__
#define TC_HD __host__ __device__ __forceinline__
#else
#define TC_HD inline
#endif

#define TC_BM 128
#define TC_BN 128
#define TC_BK 32
#define TC_STAGES 3
#define TC_THREADS 256
// Elements of one operand tile (128 x 32 either way round) and of one pipeline stage.
#define TC_TILE (TC_BM * TC_BK)
#define TC_STAGE_ELEMS (2 * TC_TILE)

typedef long long tc_i64;

// ---- shared-memory tile orders --------------------------------------------------------------------
// K-major: one row per M (or N) index, TC_BK = 32 values = 4 chunks of 8 per row; chunk c of row r
// lives at chunk c ^ ((r >> 1) & 3). MN-major: one row per K index, 128 values = 16 chunks per
// row; chunk c of row r lives at chunk c ^ (r & 7). Both make ldmatrix's 8 row reads of a matrix
// and the 8 chunk stores of a cp.async phase hit 8 distinct 16-byte bank groups.

TC_HD int kmajor_offset(int r, int c) { return r * TC_BK + ((c ^ ((r >> 1) & 3)) << 3); }
TC_HD int mnmajor_offset(int r, int c) { return r * TC_BM + ((c ^ (r & 7)) << 3); }

// The chunks thread `tid` copies into a tile: id = tid + 256 i for i = 0, 1 (512 chunks a tile).
TC_HD void tc_chunk_of(bool kmajor, int id, int& r, int& c) {
    if (kmajor) {
        r = id >> 2;
        c = id & 3;
    } else {
        r = id >> 4;
        c = id & 15;
    }
}

// So the K-major rows of thread tid are tid / 4 and tid / 4 + 64 (slot 0 and 1).
TC_HD int tc_kmajor_row(int tid, int slot) { return (tid >> 2) + 64 * slot; }

// ---- warp tiles, fragments and accumulators ------------------------------------------------------
// 8 warps in a 2 x 4 grid, a 64 x 32 warp tile = 4 x 4 MMAs of m16n8k16 per 16 of K.

TC_HD int tc_warp_m(int tid) { return (tid >> 5) / 4 * 64; }
TC_HD int tc_warp_n(int tid) { return (tid >> 5) % 4 * 32; }

// The shared-memory element offset whose 16-byte row `lane` addresses in the ldmatrix.x4 of
// A's m16 tile i at k step kk (0 or 16): matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15),
// (m 8-15, k 8-15) = fragment registers a0..a3. K-major: plain ldmatrix; MN-major (stored [k][m]):
// ldmatrix .trans.
TC_HD int tc_a_ldsm_offset(bool kmajor, int lane, int wm, int i, int kk) {
    if (kmajor) return kmajor_offset(wm + 16 * i + (lane & 15), (kk >> 3) + (lane >> 4));
    const int q = lane >> 3;
    return mnmajor_offset(kk + (lane & 7) + 8 * (q >> 1), (wm + 16 * i + 8 * (q & 1)) >> 3);
}

// As above for B's n8 tiles j and j + 1 (j even) in one ldmatrix.x4: registers b0, b1 of tile j,
// then of tile j + 1. K-major (stored [n][k]): plain; MN-major (stored [k][n]): .trans.
TC_HD int tc_b_ldsm_offset(bool kmajor, int lane, int wn, int j, int kk) {
    if (kmajor) return kmajor_offset(wn + 8 * j + (lane & 7) + 8 * (lane >> 4), (kk >> 3) + ((lane >> 3) & 1));
    return mnmajor_offset(kk + (lane & 15), (wn + 8 * j + 8 * (lane >> 4)) >> 3);
}

// Accumulator register r of MMA (i, j) of thread tid holds C[row][col] of the block tile:
// row = warp_m + 16 i + g + 8 (r >> 1), col = warp_n + 8 j + 2 t + (r & 1), lane = 4 g + t.
TC_HD int tc_acc_row(int tid, int i, int r) { return tc_warp_m(tid) + 16 * i + ((tid & 31) >> 2) + 8 * (r >> 1); }
TC_HD int tc_acc_col(int tid, int j, int r) { return tc_warp_n(tid) + 8 * j + 2 * (tid & 3) + (r & 1); }

// ---- Hopper's warpgroup MMA (wgmma, sm_90a; kernels/wgmma.cuh) ----------------------------------
// The same block tile, stages, loaders and pipeline; only the stage's MMAs change. The K-major
// tile order above is the shared-memory layout wgmma calls "64-byte swizzle" (CuTe
// Swizzle<2,4,3> on byte addresses: bits [4,6) ^= bits [7,9)): a row of TC_BK = 32 bf16 is 64
// bytes, and chunk c of row r at chunk c ^ ((r >> 1) & 3) is that XOR, repeating every 8 rows =
// 512 bytes. So a K-major tile needs no other layout: a descriptor says where it starts (16-byte
// units), that 8-row groups are 512 bytes apart (SBO), and the swizzle. The swizzle applies to
// absolute shared addresses, so stage bases are 512-byte aligned and a k16 step inside the
// 64-byte row moves the start by 32 bytes (as CUTLASS's descriptor iterator does).
// Each of the two warpgroups computes 64 rows x TC_BN = 128 columns (wgmma.m64n128k16: 64 f32
// registers a thread); only K-major operands (both of them) take this path.

#define WG_SBO_BYTES 512
#define WG_SWIZZLE_64B 2ull

// The descriptor of a K-major operand at shared byte address `addr` (a 16-byte multiple).
TC_HD unsigned long long wg_desc(unsigned addr) {
    return (unsigned long long)((addr >> 4) & 0x3FFF)           // start address
           | (1ull << 16)                                       // LBO: unused for swizzled K-major
           | ((unsigned long long)(WG_SBO_BYTES >> 4) << 32)    // SBO: next 8-row group
           | (WG_SWIZZLE_64B << 62);
}

// Element offsets in a stage of A's rows of warpgroup wg, and of B's tile, at k step kk (0 or
// 16): row 64 wg (a multiple of 8, where the swizzle is the identity) and chunk kk / 8.
TC_HD int wg_a_offset(int wg, int kk) { return kmajor_offset(64 * wg, kk >> 3); }
TC_HD int wg_b_offset(int kk) { return TC_TILE + kmajor_offset(0, kk >> 3); }

// Accumulator register i (0..63) of thread tid holds C[row][col] of the block tile: warp w of
// warpgroup wg owns rows 64 wg + 16 w .. + 15; within a warp the m16n8 pattern of mma.sync,
// repeated over the 16 column groups of 8: row = g + 8 ((i >> 1) & 1), col = 8 (i >> 2) + 2 t +
// (i & 1), lane = 4 g + t.
TC_HD int wg_acc_row(int tid, int i) {
    return 64 * (tid >> 7) + 16 * ((tid >> 5) & 3) + ((tid & 31) >> 2) + 8 * ((i >> 1) & 1);
}
TC_HD int wg_acc_col(int tid, int i) { return 8 * (i >> 2) + 2 * (tid & 3) + (i & 1); }

// ---- loaders: where each 16-byte chunk of a tile comes from ---------------------------------------
// `chunk(r, c, kt, valid)`: the element offset (from the operand's base) of chunk (r, c) of K tile
// kt, in the loader's own tile order (K-major: r an M/N index, c in 0..3; MN-major: r a K index,
// c in 0..15), and whether it exists (else it is zero filled; the offset is then 0, a valid
// address). T: the element type; G: the convolution geometry (ConvGeometry in conv.cu).

// Rows are M (or N) indices: element (mn, k) at mn * ld + k.
struct DenseKMajor {
    static constexpr bool K_MAJOR = true;
    int mn0, mn, k, ld;
    TC_HD tc_i64 chunk(int r, int c, int kt, bool& valid) const {
        const int gm = mn0 + r, gk = kt * TC_BK + c * 8;
        valid = gm < mn && gk < k;
        return valid ? (tc_i64)gm * ld + gk : 0;
    }
};

// Rows are K indices: element (mn, k) at k * ld + mn.
struct DenseMNMajor {
    static constexpr bool K_MAJOR = false;
    int mn0, mn, k, ld;
    TC_HD tc_i64 chunk(int r, int c, int kt, bool& valid) const {
        const int gk = kt * TC_BK + r, gm = mn0 + c * 8;
        valid = gm < mn && gk < k;
        return valid ? (tc_i64)gk * ld + gm : 0;
    }
};

// fprop A: rows are output pixels m = (n, oy, ox), columns k = (tap, ci) of col(x); x is NHWC.
// The thread's two rows (tc_kmajor_row) are decoded once.
template <class G>
struct FpropLoadA {
    static constexpr bool K_MAJOR = true;
    G g;
    int k;              // 9 cin
    tc_i64 pixel[2];    // n * h, or -1 past the last pixel
    int iy0[2], ix0[2];
    TC_HD FpropLoadA(const G& g_, int m0, int tid) : g(g_), k(9 * g_.cin) {
        const int m = g.n * g.oh * g.ow;
        for (int s = 0; s < 2; ++s) {
            const int row = m0 + tc_kmajor_row(tid, s);
            const int ox = row % g.ow, oy = (row / g.ow) % g.oh, n = row / (g.ow * g.oh);
            pixel[s] = row < m ? (tc_i64)n * g.h : -1;
            iy0[s] = oy * g.stride - 1;
            ix0[s] = ox * g.stride - 1;
        }
    }
    TC_HD tc_i64 chunk(int r, int c, int kt, bool& valid) const {
        // Selects, not a dynamic index: an indexed register array would live in local memory.
        const bool s = r >= 64;
        const tc_i64 pix = s ? pixel[1] : pixel[0];
        const int kk = kt * TC_BK + c * 8;
        const int tap = kk / g.cin, ci = kk - tap * g.cin;
        const int iy = (s ? iy0[1] : iy0[0]) + tap / 3, ix = (s ? ix0[1] : ix0[0]) + tap % 3;
        valid = pix >= 0 && kk < k && iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
        return valid ? ((pix + iy) * g.w + ix) * g.cin + ci : 0;
    }
};

// dgrad A: rows are input pixels (n, iy, ix), columns k = (tap, co) of dy at the pixel that tap
// reads from: oy = (iy + 1 - ky) / stride when exact and inside.
template <class G>
struct DgradLoadA {
    static constexpr bool K_MAJOR = true;
    G g;
    int cout, k;          // 9 cout
    tc_i64 pixel[2];      // n * oh, or -1 past the last pixel
    int ty0[2], tx0[2];   // iy + 1, ix + 1
    TC_HD DgradLoadA(const G& g_, int cout_, int m0, int tid) : g(g_), cout(cout_), k(9 * cout_) {
        const int m = g.n * g.h * g.w;
        for (int s = 0; s < 2; ++s) {
            const int row = m0 + tc_kmajor_row(tid, s);
            const int ix = row % g.w, iy = (row / g.w) % g.h, n = row / (g.w * g.h);
            pixel[s] = row < m ? (tc_i64)n * g.oh : -1;
            ty0[s] = iy + 1;
            tx0[s] = ix + 1;
        }
    }
    TC_HD tc_i64 chunk(int r, int c, int kt, bool& valid) const {
        const bool s = r >= 64;
        const tc_i64 pix = s ? pixel[1] : pixel[0];
        const int kk = kt * TC_BK + c * 8;
        const int tap = kk / cout, co = kk - tap * cout;
        const int ty = (s ? ty0[1] : ty0[0]) - tap / 3, tx = (s ? tx0[1] : tx0[0]) - tap % 3;
        const int oy = ty / g.stride, ox = tx / g.stride;
        valid = pix >= 0 && kk < k && ty >= 0 && tx >= 0 && oy * g.stride == ty && ox * g.stride == tx &&
                oy < g.oh && ox < g.ow;
        return valid ? ((pix + oy) * g.ow + ox) * cout + co : 0;
    }
};

// dgrad B: W'[(tap, co)][ci] = W[tap][ci][co], stored [ci][co] per tap: K-major rows ci.
struct DgradLoadB {
    static constexpr bool K_MAJOR = true;
    int n0, cin, cout;
    TC_HD tc_i64 chunk(int r, int c, int kt, bool& valid) const {
        const int ci = n0 + r, kk = kt * TC_BK + c * 8;
        const int tap = kk / cout, co = kk - tap * cout;
        valid = ci < cin && tap < 9;
        return valid ? ((tc_i64)tap * cin + ci) * cout + co : 0;
    }
};

// dgrad at stride 2 by parity class. An input pixel (iy, ix) receives dy only through the taps
// with ky = iy + 1 and kx = ix + 1 (mod 2): ky in {1} on an even row, {0, 2} on an odd one. So
// the pixels of one class (py, px) = (iy % 2, ix % 2) share 1, 2, 2 or 4 taps; with one class per
// grid z its pixels are the GEMM's rows and its taps x Cout its K (at most 4 Cout, where the
// 9-tap loader runs 9 Cout with 3 of 4 taps zero filled), and the epilogue maps each row back to
// its pixel of dx (operator()).
struct DgradParity {
    int py, px, h, w, hc, wc, rows, nkx, taps;
    template <class G>
    TC_HD DgradParity(const G& g, int cls)
        : py(cls >> 1),
          px(cls & 1),
          h(g.h),
          w(g.w),
          hc((g.h - (cls >> 1) + 1) / 2),
          wc((g.w - (cls & 1) + 1) / 2),
          rows(g.n * hc * wc),
          nkx(1 + (cls & 1)),
          taps((1 + (cls >> 1)) * (1 + (cls & 1))) {}
    // The class's tap j (0 .. taps - 1), row-major over (ky, kx).
    TC_HD void tap(int j, int& ky, int& kx) const {
        const int jy = j / nkx, jx = j - jy * nkx;
        ky = py ? 2 * jy : 1;
        kx = px ? 2 * jx : 1;
    }
    // The pixel of dx that row `row` (< rows) of the class is: (n, 2 a + py, 2 b + px).
    TC_HD tc_i64 operator()(int row) const {
        const int b = row % wc, a = (row / wc) % hc, n = row / (wc * hc);
        return ((tc_i64)n * h + 2 * a + py) * w + 2 * b + px;
    }
};

// dgrad A by parity class: rows are the class's pixels, columns k = (class tap, co).
template <class G>
struct DgradParityLoadA {
    static constexpr bool K_MAJOR = true;
    G g;
    DgradParity cls;
    int cout, k;          // taps cout
    tc_i64 pixel[2];      // n * oh, or -1 past the class's last pixel
    int ty0[2], tx0[2];   // iy + 1, ix + 1
    TC_HD DgradParityLoadA(const G& g_, const DgradParity& cls_, int cout_, int m0, int tid)
        : g(g_), cls(cls_), cout(cout_), k(cls_.taps * cout_) {
        for (int s = 0; s < 2; ++s) {
            const int row = m0 + tc_kmajor_row(tid, s);
            pixel[s] = -1;
            ty0[s] = tx0[s] = 0;
            if (row < cls.rows) {
                const int b = row % cls.wc, a = (row / cls.wc) % cls.hc, n = row / (cls.wc * cls.hc);
                pixel[s] = (tc_i64)n * g.oh;
                ty0[s] = 2 * a + cls.py + 1;
                tx0[s] = 2 * b + cls.px + 1;
            }
        }
    }
    TC_HD tc_i64 chunk(int r, int c, int kt, bool& valid) const {
        const bool s = r >= 64;
        const tc_i64 pix = s ? pixel[1] : pixel[0];
        const int kk = kt * TC_BK + c * 8;
        const int j = kk / cout, co = kk - j * cout;
        int ky, kx;
        cls.tap(j, ky, kx);
        // Even by the class's choice of taps: the halving is exact.
        const int ty = (s ? ty0[1] : ty0[0]) - ky, tx = (s ? tx0[1] : tx0[0]) - kx;
        const int oy = ty >> 1, ox = tx >> 1;
        valid = pix >= 0 && kk < k && ty >= 0 && tx >= 0 && oy < g.oh && ox < g.ow;
        return valid ? ((pix + oy) * g.ow + ox) * cout + co : 0;
    }
};

// dgrad B by parity class: W'[(class tap, co)][ci] = W[tap][ci][co], K-major rows ci.
struct DgradParityLoadB {
    static constexpr bool K_MAJOR = true;
    DgradParity cls;
    int n0, cin, cout;
    TC_HD tc_i64 chunk(int r, int c, int kt, bool& valid) const {
        const int ci = n0 + r, kk = kt * TC_BK + c * 8;
        const int j = kk / cout, co = kk - j * cout;
        int ky, kx;
        cls.tap(j, ky, kx);
        valid = ci < cin && j < cls.taps;
        return valid ? ((tc_i64)(3 * ky + kx) * cin + ci) * cout + co : 0;
    }
};

// wgrad A': rows are output pixels p (the GEMM's K), columns (tap, ci) (its M): col(x)^T.
template <class G>
struct WgradLoadA {
    static constexpr bool K_MAJOR = false;
    G g;
    int m0, pixels;
    TC_HD tc_i64 chunk(int r, int c, int kt, bool& valid) const {
        const int p = kt * TC_BK + r, col = m0 + c * 8;
        const int tap = col / g.cin, ci = col - tap * g.cin;
        const int ox = p % g.ow, oy = (p / g.ow) % g.oh, n = p / (g.ow * g.oh);
        const int iy = oy * g.stride - 1 + tap / 3, ix = ox * g.stride - 1 + tap % 3;
        valid = p < pixels && tap < 9 && iy >= 0 && iy < g.h && ix >= 0 && ix < g.w;
        return valid ? (((tc_i64)n * g.h + iy) * g.w + ix) * g.cin + ci : 0;
    }
};

// ---- the pipeline ------------------------------------------------------------------------------
// The order of a block's copies, waits, barriers and MMAs over `tiles` K tiles, TC_STAGES deep,
// for a machine `m` with load(stage, tile), commit(), wait(pending groups allowed), sync() and
// compute(stage, tile): the device's (mma.cuh: cp.async, wait_group, __syncthreads, ldmatrix +
// mma) and the host model's (tests/tc_emulator.cpp, which checks that every read sees its tile
// landed and published, and that no stage is overwritten while it may still be read).
// - Prologue: tiles 0 .. STAGES - 2 in flight, one commit each (an empty group past the end:
//   "trivially complete", and it keeps the count of groups per tile fixed).
// - Tile t: wait until at most STAGES - 2 groups are pending (so tile t's has landed for this
//   thread); the barrier publishes it to every thread and guarantees all finished computing
//   tile t - 1, whose stage (t + STAGES - 1) % STAGES the next load overwrites.
// - End: drain every group and meet at a barrier, so a caller may reuse the shared memory.
#ifdef __CUDACC__
#pragma nv_exec_check_disable
#endif
template <class M>
TC_HD void tc_pipeline(M& m, int tiles) {
    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < tiles) m.load(s, s);
        m.commit();
    }
    for (int t = 0; t < tiles; ++t) {
        m.wait(TC_STAGES - 2);
        m.sync();
        const int next = t + TC_STAGES - 1;
        if (next < tiles) m.load(next % TC_STAGES, next);
        m.commit();
        m.compute(t % TC_STAGES, t);
    }
    m.wait(0);
    m.sync();
}

// The K tiles of split z of a split-K product: [begin, end) of ceil(tiles / splits) each.
TC_HD void tc_split_range(int tiles, int splits, int z, int& begin, int& end) {
    const int per = (tiles + splits - 1) / splits;
    begin = z * per < tiles ? z * per : tiles;
    end = begin + per < tiles ? begin + per : tiles;
}
