// A CPU model of one thread block of the tensor-core kernels (kernels/mma.cuh), built against the
// kernels' own index header (kernels/tc_index.cuh) by tests/tc_emulation.rs. The three
// instructions are modelled from their PTX ISA definitions (shared/docs/tensor-cores.md §1):
// - cp.async 16 bytes with src-size 0 or 16: 8 values copied, or 8 zeros;
// - ldmatrix.x4 (.trans): matrix q's 8 rows are read at the addresses of lanes 8q..8q+7; without
//   .trans lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of each matrix; with .trans rows
//   2(l%4), 2(l%4)+1 of column l/4;
// - mma.m16n8k16: A from a0..a3 = A[g][2t..], A[g+8][2t..], A[g][2t+8..], A[g+8][2t+8..], B from
//   b0, b1 = B[2t..2t+1][g], B[2t+8..2t+9][g], C as c0..c3 = C[g][2t], C[g][2t+1], C[g+8][2t],
//   C[g+8][2t+1], with lane = 4g + t.
// - wgmma.m64n128k16 (sm_90a; kernels/wgmma.cuh): A (64 x 16) and B (128 x 16, N x K) read
//   through their descriptors (start address, SBO, the swizzle mode) from the K-major canonical
//   layout with the 64-byte swizzle: element (row, k) at byte start + (row / 8) SBO + (row % 8) 64
//   + 2 k, then bits [4,6) ^= bits [7,9) of that absolute address; D register i of warpgroup
//   thread T at row 16 (T / 32) + (T % 32) / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (T % 4)
//   + i % 2 (the PTX figure, written out here independently of the kernel's wg_acc_row/col).
// The main loop is the kernels' own tc_pipeline, driven by a machine that models the asynchrony
// (copies land at a wait, are seen by other threads after a barrier) and flags a read of data
// not landed, published or of the right K tile, and a stage overwritten while it may be read.
// The epilogue's store pattern is transliterated from mma.cuh. Values are small integers, so every
// sum is exact and results must equal the reference exactly. Besides the numbers it checks that
// each stage's shared memory is written exactly once per tile, and each output exactly once.
//
// Usage: tc_emulator (exit status 0 when every case matches; one line per case).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <utility>
#include <string>
#include <vector>

#include "../kernels/tc_index.cuh"

struct ConvGeometry {
    int n, h, w, cin, oh, ow, stride;
};

static int failures = 0;

static void fail(const std::string& what) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
}

// Pseudo-random small integers in [-2, 2]: exact in float sums of any length used here.
static std::vector<float> ints(size_t n, unsigned seed) {
    std::vector<float> v(n);
    unsigned s = seed * 2654435761u + 12345u;
    for (auto& x : v) {
        s = s * 1664525u + 1013904223u;
        x = (float)((int)((s >> 16) % 5) - 2);
    }
    return v;
}

typedef float Regs[32][4][2];  // per lane, 4 registers of 2 halves

// A thread block as tc_pipeline drives it (kernels/tc_index.cuh), with the asynchrony modelled:
// a cp.async lands only when a wait retires its group, and is seen by the other threads (every
// ldmatrix reads other threads' copies) only after the next barrier. The model flags a read of a
// chunk that has not landed and been published, or that holds another K tile than the one being
// computed; a copy into a stage that was read since the last barrier (another warp may still be
// reading it); a copy over one still in flight; and groups left pending at the end.
template <class LA, class LB, bool WG = false>
struct HostMachine {
    const std::vector<float>& a;
    const std::vector<float>& b;
    std::vector<LA> las;
    std::vector<LB> lbs;
    int kt_begin;
    std::string what;
    std::vector<float> smem = std::vector<float>(TC_STAGES * TC_STAGE_ELEMS, NAN);
    std::vector<int> tag = std::vector<int>(TC_STAGES * TC_STAGE_ELEMS, -1);       // K tile held
    std::vector<char> published = std::vector<char>(TC_STAGES * TC_STAGE_ELEMS, 0);
    std::vector<char> in_flight = std::vector<char>(TC_STAGES * TC_STAGE_ELEMS, 0);
    std::vector<char> read_since_sync = std::vector<char>(TC_STAGES * TC_STAGE_ELEMS, 0);
    struct Copy {
        size_t dst;
        float v[8];
        int tile, group;
    };
    std::vector<Copy> pending;
    int committed = 0;  // groups committed so far; copies issued now join group `committed`
    float acc[TC_THREADS][4][4][4] = {};
    float wacc[TC_THREADS][64] = {};  // the wgmma accumulators
    bool failed = false;

    HostMachine(const std::vector<float>& a_, const std::vector<float>& b_, int kt_begin_, std::string what_)
        : a(a_), b(b_), kt_begin(kt_begin_), what(std::move(what_)) {}

    void flag(const std::string& why) {
        if (!failed) fail(what + ": " + why);
        failed = true;
    }

    void issue(size_t dst, const std::vector<float>& src, tc_i64 off, bool valid, int tile) {
        Copy c{dst, {}, tile, committed};
        for (int e = 0; e < 8; ++e) {
            c.v[e] = valid ? src.at(off + e) : 0.0f;
            if (read_since_sync[dst + e]) flag("a stage is overwritten while another warp may still read it");
            if (in_flight[dst + e]) flag("a copy lands on one still in flight");
            in_flight[dst + e] = 1;
        }
        pending.push_back(c);
    }

    void load(int stage, int t) {
        std::vector<int> count(TC_STAGE_ELEMS, 0);
        const size_t base = (size_t)stage * TC_STAGE_ELEMS;
        for (int tid = 0; tid < TC_THREADS; ++tid)
            for (int i = 0; i < 2; ++i) {
                const int id = tid + i * TC_THREADS;
                int r, c;
                bool valid;
                tc_chunk_of(LA::K_MAJOR, id, r, c);
                tc_i64 off = las[tid].chunk(r, c, kt_begin + t, valid);
                int dst = LA::K_MAJOR ? kmajor_offset(r, c) : mnmajor_offset(r, c);
                issue(base + dst, a, off, valid, kt_begin + t);
                for (int e = 0; e < 8; ++e) ++count[dst + e];
                tc_chunk_of(LB::K_MAJOR, id, r, c);
                off = lbs[tid].chunk(r, c, kt_begin + t, valid);
                dst = TC_TILE + (LB::K_MAJOR ? kmajor_offset(r, c) : mnmajor_offset(r, c));
                issue(base + dst, b, off, valid, kt_begin + t);
                for (int e = 0; e < 8; ++e) ++count[dst + e];
            }
        for (int e = 0; e < TC_STAGE_ELEMS; ++e)
            if (count[e] != 1) flag("a stage element is written " + std::to_string(count[e]) + " times per tile");
    }

    void commit() { ++committed; }

    // cp.async.wait_group n: every group but the n most recent has landed.
    void wait(int n) {
        std::vector<Copy> still;
        for (const Copy& c : pending) {
            if (c.group < committed - n) {
                for (int e = 0; e < 8; ++e) {
                    smem[c.dst + e] = c.v[e];
                    tag[c.dst + e] = c.tile;
                    published[c.dst + e] = 0;
                    in_flight[c.dst + e] = 0;
                }
            } else {
                still.push_back(c);
            }
        }
        pending.swap(still);
    }

    // __syncthreads: what has landed is seen by every thread; reads before it are over.
    void sync() {
        for (size_t e = 0; e < smem.size(); ++e) {
            if (!in_flight[e] && tag[e] >= 0) published[e] = 1;
            read_since_sync[e] = 0;
        }
    }

    // ldmatrix.x4 at the 32 lanes' row offsets (elements from `base`), of tile `tile`.
    void ldmatrix(const int* offs, bool trans, size_t base, int tile, Regs& out) {
        for (int q = 0; q < 4; ++q) {
            float m[8][8];
            for (int r = 0; r < 8; ++r)
                for (int c = 0; c < 8; ++c) {
                    const size_t e = base + offs[8 * q + r] + c;
                    if (!published[e] || in_flight[e]) flag("a chunk is read before it has landed and been published");
                    if (tag[e] != tile) flag("a chunk of another K tile is read");
                    read_since_sync[e] = 1;
                    m[r][c] = smem[e];
                }
            for (int l = 0; l < 32; ++l) {
                const int g = l >> 2, t = l & 3;
                out[l][q][0] = trans ? m[2 * t][g] : m[g][2 * t];
                out[l][q][1] = trans ? m[2 * t + 1][g] : m[g][2 * t + 1];
            }
        }
    }

    // One element of a wgmma operand: row `row`, column k (< 16) of the matrix descriptor `desc`
    // names, from the shared memory model (the block's tile ring at shared address 0).
    float wg_read(unsigned long long desc, int row, int k, int tile) {
        const unsigned start = (unsigned)(desc & 0x3FFF) << 4, sbo = (unsigned)((desc >> 32) & 0x3FFF) << 4;
        if ((desc >> 62) != 2) flag("a wgmma descriptor does not say 64-byte swizzle");
        if (((desc >> 49) & 7) != 0) flag("a wgmma descriptor has a base offset");
        unsigned byte = start + (unsigned)(row / 8) * sbo + (unsigned)(row % 8) * 64 + 2u * (unsigned)k;
        byte ^= ((byte >> 7) & 3u) << 4;
        const size_t e = byte / 2;
        if (e >= smem.size()) {
            flag("a wgmma operand reads past the shared memory");
            return 0.0f;
        }
        if (!published[e] || in_flight[e]) flag("a wgmma reads a chunk before it has landed and been published");
        if (tag[e] != tile) flag("a wgmma reads a chunk of another K tile");
        read_since_sync[e] = 1;
        return smem[e];
    }

    // The stage's MMAs as wgmma.mma_async m64n128k16: each warpgroup, each k16 step, through the
    // descriptors WgDeviceMachine::compute builds (tc_index.cuh), accumulated into the registers
    // wg_acc_row / wg_acc_col name. Waited for before returning, as the device's compute is.
    void compute_wgmma(int stage, int t) {
        const unsigned base = 2u * (unsigned)(stage * TC_STAGE_ELEMS);
        for (int wg = 0; wg < 2; ++wg)
            for (int kk = 0; kk < TC_BK; kk += 16) {
                const unsigned long long da = wg_desc(base + 2u * wg_a_offset(wg, kk));
                const unsigned long long db = wg_desc(base + 2u * wg_b_offset(kk));
                static float am[64][16], bm[128][16];
                for (int r = 0; r < 64; ++r)
                    for (int k = 0; k < 16; ++k) am[r][k] = wg_read(da, r, k, kt_begin + t);
                for (int r = 0; r < 128; ++r)
                    for (int k = 0; k < 16; ++k) bm[r][k] = wg_read(db, r, k, kt_begin + t);
                // D of m64nNk16 (the PTX ISA's figure), written here rather than taken from
                // tc_index.cuh, so the kernel's wg_acc_row / wg_acc_col (its epilogue) are
                // checked against it: thread T of the warpgroup, warp w = T / 32, lane l,
                // register i at row 16 w + l / 4 + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (l % 4)
                // + i % 2.
                for (int tid = 128 * wg; tid < 128 * (wg + 1); ++tid)
                    for (int i = 0; i < 64; ++i) {
                        const int T = tid - 128 * wg, w = T / 32, l = T % 32;
                        const int row = 16 * w + l / 4 + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * (l % 4) + i % 2;
                        float d = 0.0f;
                        for (int k = 0; k < 16; ++k) d += am[row][k] * bm[col][k];
                        wacc[tid][i] += d;
                    }
            }
    }

    void compute(int stage, int t) {
        if (WG) return compute_wgmma(stage, t);
        const size_t base = (size_t)stage * TC_STAGE_ELEMS;
        for (int warp = 0; warp < 8; ++warp) {
            const int tid0 = warp * 32;
            const int wm = tc_warp_m(tid0), wn = tc_warp_n(tid0);
            for (int kk = 0; kk < TC_BK; kk += 16) {
                Regs ar[4], br[2];
                int offs[32];
                for (int i = 0; i < 4; ++i) {
                    for (int l = 0; l < 32; ++l) offs[l] = tc_a_ldsm_offset(LA::K_MAJOR, l, wm, i, kk);
                    ldmatrix(offs, !LA::K_MAJOR, base, kt_begin + t, ar[i]);
                }
                for (int j = 0; j < 4; j += 2) {
                    for (int l = 0; l < 32; ++l) offs[l] = TC_TILE + tc_b_ldsm_offset(LB::K_MAJOR, l, wn, j, kk);
                    ldmatrix(offs, !LB::K_MAJOR, base, kt_begin + t, br[j / 2]);
                }
                for (int i = 0; i < 4; ++i)
                    for (int j = 0; j < 4; ++j) mma(tid0, i, j, ar[i], br[j / 2], j & 1);
            }
        }
    }

    // mma.m16n8k16 of warp tid0 / 32 for tile (i, j); B's registers are 0, 1 of its x4 for an
    // even j and 2, 3 for an odd one.
    void mma(int tid0, int i, int j, const Regs& ar, const Regs& br, int odd) {
        float am[16][16], bm[16][8];
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            const float(*ra)[2] = ar[l];
            am[g][2 * t] = ra[0][0], am[g][2 * t + 1] = ra[0][1];
            am[g + 8][2 * t] = ra[1][0], am[g + 8][2 * t + 1] = ra[1][1];
            am[g][2 * t + 8] = ra[2][0], am[g][2 * t + 9] = ra[2][1];
            am[g + 8][2 * t + 8] = ra[3][0], am[g + 8][2 * t + 9] = ra[3][1];
            const float(*rb)[2] = br[l] + 2 * odd;
            bm[2 * t][g] = rb[0][0], bm[2 * t + 1][g] = rb[0][1];
            bm[2 * t + 8][g] = rb[1][0], bm[2 * t + 9][g] = rb[1][1];
        }
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
            for (int r = 0; r < 4; ++r) {
                float d = 0.0f;
                for (int k = 0; k < 16; ++k) d += am[rows[r]][k] * bm[k][cols[r]];
                acc[tid0 + l][i][j][r] += d;
            }
        }
    }
};

// One block's product over K tiles [begin, end) through the kernels' own tc_pipeline, then its
// stores into `out` (f32, ldc = n) at the rows `out_row` maps the tile's rows to (tc_store's
// row map), counting writes in `written`.
template <class LA, class LB, bool WG = false>
static void emulate_block(const std::vector<float>& a, std::function<LA(int)> make_a, const std::vector<float>& b,
                          std::function<LB(int)> make_b, int begin, int end, int m0, int n0, int m, int n,
                          std::vector<float>& out, std::vector<int>& written, const std::string& what,
                          std::function<tc_i64(int)> out_row = [](int row) { return (tc_i64)row; }) {
    auto blk = std::make_unique<HostMachine<LA, LB, WG>>(a, b, begin, what);
    for (int tid = 0; tid < TC_THREADS; ++tid) {
        blk->las.push_back(make_a(tid));
        blk->lbs.push_back(make_b(tid));
    }
    // Twice on the same shared memory, as the GEMM's batch loop runs it: the second pass's
    // prologue must not overwrite a stage the first pass's last tile may still be reading.
    for (int pass = 0; pass < 2; ++pass) {
        std::fill(&blk->acc[0][0][0][0], &blk->acc[0][0][0][0] + TC_THREADS * 64, 0.0f);
        std::fill(&blk->wacc[0][0], &blk->wacc[0][0] + TC_THREADS * 64, 0.0f);
        tc_pipeline(*blk, end - begin);
        if (!blk->pending.empty()) blk->flag("copies are still in flight after the pipeline");
    }
    auto store = [&](int row, int col, float v0, float v1) {
        if (row >= m || col >= n) return;
        const tc_i64 to = out_row(row);
        const size_t at = (size_t)to * n + col;
        if (to < 0 || at + 2 > out.size()) {
            fail(what + ": the epilogue stores row " + std::to_string(row) + " outside the output");
            return;
        }
        out[at] = v0;
        out[at + 1] = v1;
        ++written[at];
        ++written[at + 1];
    };
    // wg_store: registers 2 p and 2 p + 1, adjacent columns of one row.
    if (WG) {
        for (int tid = 0; tid < TC_THREADS; ++tid)
            for (int p = 0; p < 32; ++p) {
                if (wg_acc_row(tid, 2 * p + 1) != wg_acc_row(tid, 2 * p) ||
                    wg_acc_col(tid, 2 * p + 1) != wg_acc_col(tid, 2 * p) + 1)
                    fail(what + ": the wgmma epilogue's register pairs are not adjacent columns");
                store(m0 + wg_acc_row(tid, 2 * p), n0 + wg_acc_col(tid, 2 * p), blk->wacc[tid][2 * p],
                      blk->wacc[tid][2 * p + 1]);
            }
        return;
    }
    // tc_store: pairs of columns (c0, c1) and (c2, c3).
    for (int tid = 0; tid < TC_THREADS; ++tid)
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j)
                for (int h = 0; h < 2; ++h) {
                    const int row = m0 + tc_acc_row(tid, i, 2 * h), col = n0 + tc_acc_col(tid, j, 0);
                    if (row >= m || col >= n) continue;
                    if (tc_acc_row(tid, i, 2 * h + 1) != row - m0 || tc_acc_col(tid, j, 2 * h + 1) != col - n0 + 1)
                        fail(what + ": the epilogue's register pairs are not adjacent columns");
                    store(row, col, blk->acc[tid][i][j][2 * h], blk->acc[tid][i][j][2 * h + 1]);
                }
}

template <class LA, class LB, bool WG = false>
static void emulate(const std::vector<float>& a, std::function<LA(int, int)> make_a, const std::vector<float>& b,
                    std::function<LB(int, int)> make_b, int m, int n, int k, int splits, const std::vector<double>& want,
                    const std::string& what) {
    const int tiles = (k + TC_BK - 1) / TC_BK;
    std::vector<float> total((size_t)m * n, 0.0f);
    for (int z = 0; z < splits; ++z) {
        int begin, end;
        tc_split_range(tiles, splits, z, begin, end);
        std::vector<float> part((size_t)m * n, NAN);
        std::vector<int> written((size_t)m * n, 0);
        for (int m0 = 0; m0 < m; m0 += TC_BM)
            for (int n0 = 0; n0 < n; n0 += TC_BN)
                emulate_block<LA, LB, WG>(
                    a, [&](int tid) { return make_a(m0, tid); }, b, [&](int tid) { return make_b(n0, tid); }, begin,
                    end, m0, n0, m, n, part, written, what);
        for (size_t e = 0; e < part.size(); ++e) {
            if (written[e] != 1) {
                fail(what + ": output " + std::to_string(e) + " written " + std::to_string(written[e]) + " times");
                return;
            }
            total[e] += part[e];
        }
    }
    size_t bad = 0, first = 0;
    for (size_t e = 0; e < total.size(); ++e)
        if ((double)total[e] != want[e] && bad++ == 0) first = e;
    if (bad) {
        fail(what + ": " + std::to_string(bad) + " of " + std::to_string(total.size()) + " values differ; first at " +
             std::to_string(first) + ": got " + std::to_string(total[first]) + ", want " + std::to_string(want[first]));
    } else {
        std::printf("ok   %s (%d x %d x %d, %d part%s)\n", what.c_str(), m, n, k, splits, splits > 1 ? "s" : "");
    }
}

static void gemm_case(int m, int n, int k, bool ta, bool tb, unsigned seed) {
    const auto a = ints((size_t)m * k, seed), b = ints((size_t)k * n, seed + 1);
    // A stored [m][k] or [k][m]; B stored [k][n] or [n][k].
    auto av = [&](int i, int p) { return (double)(ta ? a[(size_t)p * m + i] : a[(size_t)i * k + p]); };
    auto bv = [&](int p, int j) { return (double)(tb ? b[(size_t)j * k + p] : b[(size_t)p * n + j]); };
    std::vector<double> want((size_t)m * n, 0.0);
    for (int i = 0; i < m; ++i)
        for (int j = 0; j < n; ++j)
            for (int p = 0; p < k; ++p) want[(size_t)i * n + j] += av(i, p) * bv(p, j);
    const std::string what = std::string("gemm ") + (ta ? "t" : "n") + (tb ? "t" : "n");
    const int lda = ta ? m : k, ldb = tb ? k : n;
    if (!ta && !tb)
        emulate<DenseKMajor, DenseMNMajor>(
            a, [&](int m0, int) { return DenseKMajor{m0, m, k, lda}; }, b,
            [&](int n0, int) { return DenseMNMajor{n0, n, k, ldb}; }, m, n, k, 1, want, what);
    else if (!ta && tb)
        emulate<DenseKMajor, DenseKMajor>(
            a, [&](int m0, int) { return DenseKMajor{m0, m, k, lda}; }, b,
            [&](int n0, int) { return DenseKMajor{n0, n, k, ldb}; }, m, n, k, 1, want, what);
    else
        emulate<DenseMNMajor, DenseMNMajor>(
            a, [&](int m0, int) { return DenseMNMajor{m0, m, k, lda}; }, b,
            [&](int n0, int) { return DenseMNMajor{n0, n, k, ldb}; }, m, n, k, 1, want, what);
}

// The stride-2 input gradient by parity class (conv3x3_dgrad_s2_bf16): the four classes' grids,
// each block's rows stored at their pixels; every value of dx written exactly once, by its class.
template <bool WG = false>
static void dgrad_parity_case(const ConvGeometry& g, int cout, const std::vector<float>& dy,
                              const std::vector<float>& wt, const std::vector<double>& want, const std::string& shape) {
    const std::string what = std::string(WG ? "wgmma " : "") + "conv dgrad by parity class " + shape;
    const int cin = g.cin, p_in = g.n * g.h * g.w;
    std::vector<float> out((size_t)p_in * cin, NAN);
    std::vector<int> written((size_t)p_in * cin, 0);
    int pixels = 0, kmax = 0;
    for (int cls = 0; cls < 4; ++cls) {
        const DgradParity pc(g, cls);
        pixels += pc.rows;
        const int k = pc.taps * cout;
        kmax = std::max(kmax, k);
        for (int m0 = 0; m0 < pc.rows; m0 += TC_BM)
            for (int n0 = 0; n0 < cin; n0 += TC_BN)
                emulate_block<DgradParityLoadA<ConvGeometry>, DgradParityLoadB, WG>(
                    dy, [&](int tid) { return DgradParityLoadA<ConvGeometry>(g, pc, cout, m0, tid); }, wt,
                    [&](int) { return DgradParityLoadB{pc, n0, cin, cout}; }, 0, (k + TC_BK - 1) / TC_BK, m0, n0,
                    pc.rows, cin, out, written, what, [&](int row) { return pc(row); });
    }
    if (pixels != p_in) fail(what + ": the classes hold " + std::to_string(pixels) + " pixels, not " + std::to_string(p_in));
    size_t bad = 0, first = 0;
    for (size_t e = 0; e < out.size(); ++e) {
        if (written[e] != 1) {
            fail(what + ": output " + std::to_string(e) + " written " + std::to_string(written[e]) + " times");
            return;
        }
        if ((double)out[e] != want[e] && bad++ == 0) first = e;
    }
    if (bad)
        fail(what + ": " + std::to_string(bad) + " of " + std::to_string(out.size()) + " values differ; first at " +
             std::to_string(first) + ": got " + std::to_string(out[first]) + ", want " + std::to_string(want[first]));
    else
        std::printf("ok   %s (%d x %d x at most %d, 4 classes)\n", what.c_str(), p_in, cin, kmax);
}

static void conv_case(int nb, int h, int w, int cin, int cout, int s, int splits, unsigned seed) {
    const ConvGeometry g{nb, h, w, cin, (h - 1) / s + 1, (w - 1) / s + 1, s};
    const int p_in = nb * h * w, p_out = nb * g.oh * g.ow;
    const auto x = ints((size_t)p_in * cin, seed), wt = ints((size_t)9 * cin * cout, seed + 1),
               dy = ints((size_t)p_out * cout, seed + 2);
    std::vector<double> y((size_t)p_out * cout, 0.0), dx((size_t)p_in * cin, 0.0), dw((size_t)9 * cin * cout, 0.0);
    for (int n = 0; n < nb; ++n)
        for (int oy = 0; oy < g.oh; ++oy)
            for (int ox = 0; ox < g.ow; ++ox)
                for (int tap = 0; tap < 9; ++tap) {
                    const int iy = oy * s - 1 + tap / 3, ix = ox * s - 1 + tap % 3;
                    if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
                    const size_t po = ((size_t)n * g.oh + oy) * g.ow + ox, pi = ((size_t)n * h + iy) * w + ix;
                    for (int ci = 0; ci < cin; ++ci)
                        for (int co = 0; co < cout; ++co) {
                            const size_t wi = ((size_t)tap * cin + ci) * cout + co;
                            y[po * cout + co] += (double)x[pi * cin + ci] * wt[wi];
                            dx[pi * cin + ci] += (double)dy[po * cout + co] * wt[wi];
                            dw[wi] += (double)x[pi * cin + ci] * dy[po * cout + co];
                        }
                }
    const std::string shape = std::to_string(nb) + "x" + std::to_string(h) + "x" + std::to_string(w) + "x" +
                              std::to_string(cin) + "->" + std::to_string(cout) + " stride " + std::to_string(s);
    emulate<FpropLoadA<ConvGeometry>, DenseMNMajor>(
        x, [&](int m0, int tid) { return FpropLoadA<ConvGeometry>(g, m0, tid); }, wt,
        [&](int n0, int) { return DenseMNMajor{n0, cout, 9 * cin, cout}; }, p_out, cout, 9 * cin, 1, y,
        "conv fprop " + shape);
    emulate<DgradLoadA<ConvGeometry>, DgradLoadB>(
        dy, [&](int m0, int tid) { return DgradLoadA<ConvGeometry>(g, cout, m0, tid); }, wt,
        [&](int n0, int) { return DgradLoadB{n0, cin, cout}; }, p_in, cin, 9 * cout, 1, dx, "conv dgrad " + shape);
    emulate<WgradLoadA<ConvGeometry>, DenseMNMajor>(
        x, [&](int m0, int) { return WgradLoadA<ConvGeometry>{g, m0, p_out}; }, dy,
        [&](int n0, int) { return DenseMNMajor{n0, cout, p_out, cout}; }, 9 * cin, cout, p_out, splits, dw,
        "conv wgrad " + shape);
    if (s == 2) dgrad_parity_case(g, cout, dy, wt, dx, shape);

    // The wgmma kernels (kernels/conv_sm90a.cu): fprop over the weight as [tap][co][ci]
    // (conv3x3_weight_taps_cout_cin_bf16), through DgradLoadB with Cin and Cout swapped; dgrad
    // with version 2's and 3's loaders.
    std::vector<float> wt_t(wt.size());
    for (int tap = 0; tap < 9; ++tap)
        for (int ci = 0; ci < cin; ++ci)
            for (int co = 0; co < cout; ++co)
                wt_t[((size_t)tap * cout + co) * cin + ci] = wt[((size_t)tap * cin + ci) * cout + co];
    emulate<FpropLoadA<ConvGeometry>, DgradLoadB, true>(
        x, [&](int m0, int tid) { return FpropLoadA<ConvGeometry>(g, m0, tid); }, wt_t,
        [&](int n0, int) { return DgradLoadB{n0, cout, cin}; }, p_out, cout, 9 * cin, 1, y, "wgmma conv fprop " + shape);
    emulate<DgradLoadA<ConvGeometry>, DgradLoadB, true>(
        dy, [&](int m0, int tid) { return DgradLoadA<ConvGeometry>(g, cout, m0, tid); }, wt,
        [&](int n0, int) { return DgradLoadB{n0, cin, cout}; }, p_in, cin, 9 * cout, 1, dx,
        "wgmma conv dgrad " + shape);
    if (s == 2) dgrad_parity_case<true>(g, cout, dy, wt, dx, shape);
}

int main() {
    // Several M and N tiles with ragged edges, a partial last K tile, each transpose.
    gemm_case(200, 136, 72, false, false, 1);
    gemm_case(136, 200, 40, false, true, 2);
    gemm_case(264, 24, 100, true, false, 3);
    // Convolutions: taps that straddle a K tile (Cin = 24), stride 2 (dgrad's divisibility),
    // more than one tile of output channels, and a split-K weight gradient with an empty part.
    conv_case(2, 5, 7, 24, 40, 1, 1, 4);
    conv_case(2, 5, 7, 24, 40, 2, 3, 5);
    conv_case(1, 8, 8, 8, 136, 2, 2, 6);
    conv_case(3, 6, 6, 136, 16, 1, 4, 7);
    conv_case(1, 3, 3, 32, 8, 1, 5, 8);
    // Stride 2 on one row: the odd-row parity classes are empty.
    conv_case(2, 1, 6, 16, 24, 2, 1, 9);
    // Stride 2 with classes of more than one M tile (162, 144, 144 and 128 pixels).
    conv_case(2, 18, 17, 8, 16, 2, 2, 10);
    std::printf("%s\n", failures ? "FAILED" : "all cases match");
    return failures ? 1 : 0;
}
