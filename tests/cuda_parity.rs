//! Tier 2: every CUDA kernel against the CPU oracle on fresh random inputs, with outputs poisoned
//! (NaN) before the launch, at several shapes including ragged ones, misaligned sub-views, the
//! weight-gradient GEMM shapes (K = 262,144) and batches past grid.z's 65,535. Tolerance rule
//! (llm.c): |gpu - ref| <= atol + rtol * |ref|; GEMMs against an f64 reference with a bound
//! derived from K (see `common::gemm_reference`).
//!
//! Own harness (`common::Suite`): without a GPU the GPU trials are reported as ignored, and under
//! EMPRIOR_REQUIRE_GPU=1 they fail. The `harness::` trials check the tolerances themselves and
//! run everywhere.

mod common;

use common::{
    assert_close, assert_within, check_parity, gemm_case, gemm_reference, outliers, pieces, random_vec,
    to_f64, GemmCase, Piece, Suite, Tol, GEMM_CASES,
};
use emprior::device::size_class;
use emprior::ops::broadcast::{
    add_bias, scale_cols_into, scale_rows_add_into, sum_rows_into, sum_rows_into_v1,
};
use emprior::ops::{self, reduce, GemmSpec, Philox};
use emprior::{AsView, AsViewMut, Device, Tensor};

const CPU: Device = Device::Cpu;

/// Sizes around the float4 body, its tails, and grids larger than one wave.
const SIZES: &[usize] = &[1, 2, 3, 4, 5, 255, 1023, 4097, (1 << 20) + 3];

/// The conv weight gradient of a batch-256 step at 32x32: dW[9 Cin, Cout] += col^T dy with
/// K = 256 * 32 * 32 rows (Cin = 16, Cout = 24 keep the f64 reference to about 10^9 MACs).
const WEIGHT_GRAD: (usize, usize, usize, usize, usize) = (0, 0, 9 * 16, 24, 256 * 32 * 32);

fn main() {
    let mut s = Suite::from_args();
    s.gpu("elementwise::aligned_sizes", elementwise_aligned);
    s.gpu("misaligned::elementwise_offsets_1_2_3", misaligned_elementwise);
    s.gpu("misaligned::broadcast_and_reductions", misaligned_broadcast);
    s.gpu("reductions::match_cpu_and_are_deterministic", reductions);
    // Named apart from "reductions::", which the device check's sanitizer subset selects: at
    // these sizes a sanitizer would take minutes (the small shapes of `reductions` cover the
    // same code paths there).
    s.gpu("reductions_at_scale::column_sums_v1_v2", column_sums_real_shapes);
    s.gpu(
        "reductions_at_scale::norm_57m_and_cg_row_dots_v1_v2",
        norms_and_dots_real_shapes,
    );
    s.gpu(
        "reductions_at_scale::v2_bit_identical_run_to_run",
        reductions_bit_identical,
    );
    s.gpu("gemm::shapes_up_to_k1024", gemm_small_shapes);
    s.gpu("gemm::bias_epilogue", gemm_bias);
    s.gpu("gemm::nn_k262144", |g| gemm_weight_grad_shape(g, false, false));
    s.gpu("gemm::nt_k262144", |g| gemm_weight_grad_shape(g, false, true));
    s.gpu("gemm::tn_k262144_weight_gradient", |g| {
        gemm_weight_grad_shape(g, true, false)
    });
    s.gpu("gemm::tt_k262144", |g| gemm_weight_grad_shape(g, true, true));
    s.gpu("gemm::batch140000_grid_z_loop", gemm_grid_z_loop);
    s.gpu("rng::streams_match_cpu", random_streams);
    s.gpu("augment::flip_shift_matches_cpu", augment_flip_shift);
    s.gpu(
        "batch::gather_rows_uniform_matches_cpu",
        gather_rows_uniform_parity,
    );
    s.gpu(
        "batch::gather_rows_permuted_matches_cpu",
        gather_rows_permuted_parity,
    );
    s.gpu("cg::step_sizes_match_cpu", cg_step_sizes_parity);
    s.gpu("sinkhorn::lse_kernel_matches_cpu_solve", sinkhorn_matches_cpu);
    s.gpu("pool::hot_loop_without_new_allocations", pool_hot_loop);
    s.gpu(
        "poison::fresh_and_recycled_buffers_are_nan",
        poison_fresh_and_recycled,
    );
    s.gpu_alone("pool::oom_trims_cache_and_retries", pool_oom_retry);
    s.cpu(
        "harness::gemm_bound_admits_f32_sums_and_catches_one_lost_term",
        gemm_bound_check,
    );
    s.run()
}

fn on(dev: &Device, data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_f32(data, shape, dev).unwrap()
}

fn poisoned(dev: &Device, shape: &[usize]) -> Tensor {
    Tensor::full(shape, f32::NAN, dev).unwrap()
}

fn elementwise_aligned(gpu: &Device) {
    for (i, &n) in SIZES.iter().enumerate() {
        let a = random_vec(40 + i as u64, n, -6.0, 6.0);
        let b = random_vec(80 + i as u64, n, -6.0, 6.0);
        let (ca, cb) = (on(&CPU, &a, &[n]), on(&CPU, &b, &[n]));
        let (ga, gb) = (on(gpu, &a, &[n]), on(gpu, &b, &[n]));

        type Binary = fn(&Tensor, &Tensor, &mut Tensor) -> emprior::Result<()>;
        let binaries: [(&str, Binary, f64); 3] = [
            ("add", ops::add_into, 0.0),
            ("mul", ops::mul_into, 0.0),
            ("silu_backward", ops::silu_backward_into, 2e-6),
        ];
        for (name, f, rtol) in binaries {
            let mut want = Tensor::zeros(&[n], emprior::DType::F32, &CPU).unwrap();
            f(&ca, &cb, &mut want).unwrap();
            let mut got = poisoned(gpu, &[n]);
            f(&ga, &gb, &mut got).unwrap();
            let what = format!("{name} n={n}");
            assert_close(
                &what,
                &got.to_vec_f32().unwrap(),
                &to_f64(&want.to_vec_f32().unwrap()),
                1e-7,
                rtol,
            );
        }

        let mut got = poisoned(gpu, &[n]);
        ops::scale_into(&ga, 0.3, &mut got).unwrap();
        let want = ops::scale(&ca, 0.3).unwrap().to_vec_f32().unwrap();
        assert_close(
            &format!("scale n={n}"),
            &got.to_vec_f32().unwrap(),
            &to_f64(&want),
            0.0,
            0.0,
        );

        let mut got = poisoned(gpu, &[n]);
        ops::silu_into(&ga, &mut got).unwrap();
        let want = ops::silu(&ca).unwrap().to_vec_f32().unwrap();
        assert_close(
            &format!("silu n={n}"),
            &got.to_vec_f32().unwrap(),
            &to_f64(&want),
            1e-7,
            2e-6,
        );

        // axpy is in place: the GPU fuses the multiply-add, the CPU rounds twice.
        let mut gy = on(gpu, &b, &[n]);
        ops::axpy(-1.7, &ga, &mut gy).unwrap();
        let mut cy = on(&CPU, &b, &[n]);
        ops::axpy(-1.7, &ca, &mut cy).unwrap();
        let want = to_f64(&cy.to_vec_f32().unwrap());
        assert_close(
            &format!("axpy n={n}"),
            &gy.to_vec_f32().unwrap(),
            &want,
            2e-6,
            2e-7,
        );

        let mut filled = poisoned(gpu, &[n]);
        ops::fill(&mut filled, 0.25).unwrap();
        assert!(
            filled.to_vec_f32().unwrap().iter().all(|&v| v == 0.25),
            "fill n={n}"
        );
    }
}

/// Lengths that are no multiple of 4, below one float4, and past one block.
const RAGGED: &[usize] = &[1, 3, 5, 6, 7, 1021, 4099, 65_537];

/// Offsets (in f32) of the sub-views of operand a, operand b and the output: all misaligned, one
/// aligned among misaligned ones (the kernels must take float4 only when every pointer allows).
const OFFSETS: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (2, 2, 2),
    (3, 3, 3),
    (0, 1, 0),
    (1, 0, 2),
    (3, 2, 1),
    (0, 0, 3),
];

/// Room around each sub-view: its buffer is `PAD + n + PAD` long.
const PAD: usize = 4;

/// An output buffer for a sub-view at `offset` of length `n`: NaN inside (a kernel must write
/// every element) and a finite sentinel outside (a kernel must write nothing else).
fn out_buffer(dev: &Device, offset: usize, n: usize) -> Tensor {
    let mut v = vec![-7777.0f32; 2 * PAD + n];
    v[offset..offset + n].fill(f32::NAN);
    on(dev, &v, &[v.len()])
}

/// A buffer around a sub-view, compared in the pieces "before", "view" and "after", so that a
/// failure says whether the kernel left the view unwritten or wrote outside it.
fn regions(name: &str, out: Tensor, offset: usize, n: usize) -> common::Output {
    let piece = |name: &str, offset: usize, len: usize| Piece {
        name: name.into(),
        offset,
        shape: vec![len],
    };
    let after = offset + n;
    let total = out.numel();
    pieces(
        name,
        out,
        vec![
            piece("before", 0, offset),
            piece("view", offset, n),
            piece("after", after, total - after),
        ],
    )
}

fn misaligned_elementwise(gpu: &Device) {
    type Binary = fn(&emprior::View, &emprior::View, &mut emprior::ViewMut) -> emprior::Result<()>;
    type Unary = fn(&emprior::View, &mut emprior::ViewMut) -> emprior::Result<()>;
    let binaries: [(&str, Binary, Tol); 4] = [
        ("add", |a, b, o| ops::add_into(a, b, o), Tol::EXACT),
        ("mul", |a, b, o| ops::mul_into(a, b, o), Tol::EXACT),
        (
            "div_guarded",
            |a, b, o| ops::div_guarded_into(a, b, o),
            Tol::norm(1e-7),
        ),
        (
            "silu_backward",
            |a, b, o| ops::silu_backward_into(a, b, o),
            Tol::norm(1e-6),
        ),
    ];
    let unaries: [(&str, Unary, Tol); 3] = [
        ("scale", |x, o| ops::scale_into(x, 0.3, o), Tol::EXACT),
        ("silu", |x, o| ops::silu_into(x, o), Tol::norm(1e-6)),
        ("fill", |_, o| ops::fill(o, 0.25), Tol::EXACT),
    ];
    let mut cases = 0;
    for (si, &n) in RAGGED.iter().enumerate() {
        for &(oa, ob, oo) in OFFSETS {
            cases += binaries.len() + unaries.len() + 1;
            let seed = 1000 + 10 * si as u64;
            let a = random_vec(seed, 2 * PAD + n, -6.0, 6.0);
            let b = random_vec(seed + 1, 2 * PAD + n, -6.0, 6.0);
            let at = |what: &str| format!("{what} n={n} offsets a={oa} b={ob} out={oo}");
            for (name, f, tol) in binaries {
                check_parity(&at(name), gpu, tol, |d| {
                    let (ta, tb) = (on(d, &a, &[a.len()]), on(d, &b, &[b.len()]));
                    let mut out = out_buffer(d, oo, n);
                    {
                        let (va, vb) = (ta.as_view().unwrap(), tb.as_view().unwrap());
                        let mut vo = out.as_view_mut().unwrap();
                        f(
                            &va.sub(oa, &[n]).unwrap(),
                            &vb.sub(ob, &[n]).unwrap(),
                            &mut vo.sub_mut(oo, &[n]).unwrap(),
                        )
                        .unwrap();
                    }
                    vec![regions("out", out, oo, n)]
                });
            }
            for (name, f, tol) in unaries {
                check_parity(&at(name), gpu, tol, |d| {
                    let ta = on(d, &a, &[a.len()]);
                    let mut out = out_buffer(d, oo, n);
                    {
                        let mut vo = out.as_view_mut().unwrap();
                        f(
                            &ta.as_view().unwrap().sub(oa, &[n]).unwrap(),
                            &mut vo.sub_mut(oo, &[n]).unwrap(),
                        )
                        .unwrap();
                    }
                    vec![regions("out", out, oo, n)]
                });
            }
            // axpy updates y in place: y is the output sub-view, starting from b's values.
            check_parity(&at("axpy"), gpu, Tol::norm(1e-6), |d| {
                let ta = on(d, &a, &[a.len()]);
                let mut y = on(d, &b, &[b.len()]);
                {
                    let mut vy = y.as_view_mut().unwrap();
                    ops::axpy(
                        -1.7,
                        &ta.as_view().unwrap().sub(oa, &[n]).unwrap(),
                        &mut vy.sub_mut(oo, &[n]).unwrap(),
                    )
                    .unwrap();
                }
                vec![regions("y", y, oo, n)]
            });
        }
    }
    println!("misaligned elementwise: {cases} cases (lengths {RAGGED:?}, offsets {OFFSETS:?}) on {gpu:?}");
}

fn misaligned_broadcast(gpu: &Device) {
    // [rows, cols] sub-views with cols no multiple of 4, at offsets 1, 2, 3.
    let mut cases = 0;
    for &(rows, cols) in &[(1usize, 1usize), (3, 5), (7, 33), (129, 67)] {
        let n = rows * cols;
        for (k, &(oa, ob, oo)) in OFFSETS.iter().enumerate() {
            cases += 6;
            let seed = 2000 + 10 * k as u64 + n as u64;
            let a = random_vec(seed, 2 * PAD + n, -2.0, 2.0);
            let b = random_vec(seed + 1, 2 * PAD + n, -2.0, 2.0);
            let at = |what: &str| format!("{what} {rows}x{cols} offsets a={oa} b={ob} out={oo}");

            // In place: y starts from a's values.
            check_parity(&at("add_bias"), gpu, Tol::EXACT, |d| {
                let tb = on(d, &b, &[b.len()]);
                let mut y = on(d, &a, &[a.len()]);
                {
                    let mut vy = y.as_view_mut().unwrap();
                    add_bias(
                        &mut vy.sub_mut(oo, &[rows, cols]).unwrap(),
                        &tb.as_view().unwrap().sub(ob, &[cols]).unwrap(),
                    )
                    .unwrap();
                }
                vec![regions("y", y, oo, n)]
            });

            check_parity(&at("scale_cols"), gpu, Tol::EXACT, |d| {
                let (ta, tb) = (on(d, &a, &[a.len()]), on(d, &b, &[b.len()]));
                let mut out = out_buffer(d, oo, n);
                {
                    let mut vo = out.as_view_mut().unwrap();
                    scale_cols_into(
                        &ta.as_view().unwrap().sub(oa, &[rows, cols]).unwrap(),
                        &tb.as_view().unwrap().sub(ob, &[cols]).unwrap(),
                        &mut vo.sub_mut(oo, &[rows, cols]).unwrap(),
                    )
                    .unwrap();
                }
                vec![regions("out", out, oo, n)]
            });

            // alpha and beta: per-row scalars taken from misaligned places of b.
            check_parity(&at("scale_rows_add"), gpu, Tol::norm(1e-6), |d| {
                let (ta, tb) = (on(d, &a, &[a.len()]), on(d, &b, &[b.len()]));
                let mut out = out_buffer(d, oo, n);
                {
                    let (va, vb) = (ta.as_view().unwrap(), tb.as_view().unwrap());
                    let mut vo = out.as_view_mut().unwrap();
                    scale_rows_add_into(
                        &va.sub(oa, &[rows, cols]).unwrap(),
                        &vb.sub(ob, &[rows]).unwrap(),
                        &vb.sub(ob, &[rows, cols]).unwrap(),
                        &va.sub(oa, &[rows]).unwrap(),
                        &mut vo.sub_mut(oo, &[rows, cols]).unwrap(),
                    )
                    .unwrap();
                }
                vec![regions("out", out, oo, n)]
            });

            for accumulate in [false, true] {
                check_parity(
                    &at(&format!("sum_rows accumulate={accumulate}")),
                    gpu,
                    Tol::norm(1e-6),
                    |d| {
                        let ta = on(d, &a, &[a.len()]);
                        // Accumulating needs a defined start: b's values; else NaN inside.
                        let mut out = if accumulate {
                            on(d, &b, &[b.len()])
                        } else {
                            out_buffer(d, oo, cols)
                        };
                        {
                            let mut vo = out.as_view_mut().unwrap();
                            sum_rows_into(
                                &ta.as_view().unwrap().sub(oa, &[rows, cols]).unwrap(),
                                1,
                                &mut vo.sub_mut(oo, &[cols]).unwrap(),
                                accumulate,
                            )
                            .unwrap();
                        }
                        vec![regions("out", out, oo, cols)]
                    },
                );
            }

            // Reductions read through the same pointers; their outputs are sub-views too.
            check_parity(&at("row_dot and sum"), gpu, Tol::norm(1e-6), |d| {
                let (ta, tb) = (on(d, &a, &[a.len()]), on(d, &b, &[b.len()]));
                let (va, vb) = (ta.as_view().unwrap(), tb.as_view().unwrap());
                let mut dots = out_buffer(d, oo, rows);
                let mut total = out_buffer(d, oo, 1);
                {
                    let x = va.sub(oa, &[rows, cols]).unwrap();
                    let mut vd = dots.as_view_mut().unwrap();
                    ops::row_dot_into(
                        &x,
                        &vb.sub(ob, &[rows, cols]).unwrap(),
                        &mut vd.sub_mut(oo, &[rows]).unwrap(),
                    )
                    .unwrap();
                    let mut vt = total.as_view_mut().unwrap();
                    ops::sum_into(&x, &mut vt.sub_mut(oo, &[]).unwrap()).unwrap();
                }
                vec![regions("row_dot", dots, oo, rows), regions("sum", total, oo, 1)]
            });
        }
    }
    println!("misaligned broadcast and reductions: {cases} cases on {gpu:?}");
}

fn reductions(gpu: &Device) {
    for (i, &(rows, cols)) in [
        (1usize, 1usize),
        (1, 5),
        (7, 3),
        (3, 1023),
        (256, 3072),
        (2, 1_000_003),
        (70_000, 3),
    ]
    .iter()
    .enumerate()
    {
        let a = random_vec(500 + i as u64, rows * cols, -1.0, 1.0);
        let b = random_vec(600 + i as u64, rows * cols, -1.0, 1.0);
        let (ca, cb) = (on(&CPU, &a, &[rows, cols]), on(&CPU, &b, &[rows, cols]));
        let (ga, gb) = (on(gpu, &a, &[rows, cols]), on(gpu, &b, &[rows, cols]));

        let want = ops::sum(&ca).unwrap().to_vec_f32().unwrap();
        let mut got = poisoned(gpu, &[]);
        ops::sum_into(&ga, &mut got).unwrap();
        let first = got.to_vec_f32().unwrap();
        assert_close(&format!("sum {rows}x{cols}"), &first, &to_f64(&want), 1e-6, 1e-6);
        ops::sum_into(&ga, &mut got).unwrap();
        assert_eq!(
            first,
            got.to_vec_f32().unwrap(),
            "sum must be bit-identical run to run"
        );

        let want = ops::row_dot(&ca, &cb).unwrap().to_vec_f32().unwrap();
        let mut got = poisoned(gpu, &[rows]);
        ops::row_dot_into(&ga, &gb, &mut got).unwrap();
        let first = got.to_vec_f32().unwrap();
        assert_close(
            &format!("row_dot {rows}x{cols}"),
            &first,
            &to_f64(&want),
            1e-6,
            1e-6,
        );
        ops::row_dot_into(&ga, &gb, &mut got).unwrap();
        assert_eq!(
            first,
            got.to_vec_f32().unwrap(),
            "row_dot must be bit-identical run to run"
        );

        let want = ops::row_norm(&ca).unwrap().to_vec_f32().unwrap();
        let mut got = poisoned(gpu, &[rows]);
        ops::row_norm_into(&ga, &mut got).unwrap();
        assert_close(
            &format!("row_norm {rows}x{cols}"),
            &got.to_vec_f32().unwrap(),
            &to_f64(&want),
            1e-6,
            1e-6,
        );
    }
    // Column sums in two stages (several chunks of rows; partial last chunk and column tile).
    for (i, &(groups, per, cols)) in [(1usize, 5000usize, 33usize), (3, 700, 67)].iter().enumerate() {
        let x = random_vec(700 + i as u64, groups * per * cols, -1.0, 1.0);
        let mut want = on(&CPU, &vec![0.0; groups * cols], &[groups, cols]);
        sum_rows_into(&on(&CPU, &x, &[groups * per, cols]), groups, &mut want, false).unwrap();
        let gx = on(gpu, &x, &[groups * per, cols]);
        let mut got = poisoned(gpu, &[groups, cols]);
        sum_rows_into(&gx, groups, &mut got, false).unwrap();
        let first = got.to_vec_f32().unwrap();
        let what = format!("sum_rows {groups}x{per}x{cols}");
        assert_close(&what, &first, &to_f64(&want.to_vec_f32().unwrap()), 1e-6, 1e-6);
        sum_rows_into(&gx, groups, &mut got, false).unwrap();
        assert_eq!(
            first,
            got.to_vec_f32().unwrap(),
            "{what} must be bit-identical run to run"
        );
    }
}

/// Column sums as a step computes them: the bias gradient of a [262,144, 128] activation (batch
/// 256 at 32x32), per-sample sums over pixels (256 groups of 1,024 rows), and a ragged shape whose
/// last chunk and column tile are partial, with and without accumulation; version 2 (two stages)
/// and version 1 both against the CPU.
fn column_sums_real_shapes(gpu: &Device) {
    for (i, &(groups, per, cols)) in [
        (1usize, 262_144usize, 128usize),
        (256, 1024, 128),
        (3, 1000, 67),
        (1, 300_000, 3),
    ]
    .iter()
    .enumerate()
    {
        let x = random_vec(900 + i as u64, groups * per * cols, -1.0, 1.0);
        let start = random_vec(950 + i as u64, groups * cols, -1.0, 1.0);
        for accumulate in [false, true] {
            let want = {
                let cx = on(&CPU, &x, &[groups * per, cols]);
                let mut out = on(&CPU, &start, &[groups, cols]);
                sum_rows_into(&cx, groups, &mut out, accumulate).unwrap();
                to_f64(&out.to_vec_f32().unwrap())
            };
            let gx = on(gpu, &x, &[groups * per, cols]);
            type SumRows = fn(&Tensor, usize, &mut Tensor, bool) -> emprior::Result<()>;
            let versions: [(&str, SumRows); 2] = [
                ("v2", |x, g, o, a| sum_rows_into(x, g, o, a)),
                ("v1", |x, g, o, a| sum_rows_into_v1(x, g, o, a)),
            ];
            for (version, f) in versions {
                let mut got = if accumulate {
                    on(gpu, &start, &[groups, cols])
                } else {
                    poisoned(gpu, &[groups, cols])
                };
                f(&gx, groups, &mut got, accumulate).unwrap();
                assert_close(
                    &format!("sum_rows {version} {groups}x{per}x{cols} accumulate={accumulate}"),
                    &got.to_vec_f32().unwrap(),
                    &want,
                    1e-6,
                    1e-6,
                );
            }
        }
    }
}

/// The global gradient norm over 57.6M values (the largest U-Net's parameters) and CG's
/// per-observation dots at [8192, 10], plus full sums, version 2 and version 1 against the CPU.
fn norms_and_dots_real_shapes(gpu: &Device) {
    let n = 57_600_000;
    let g = random_vec(970, n, -1.0, 1.0);
    let want = {
        let c = on(&CPU, &g, &[1, n]);
        (
            to_f64(&ops::row_norm(&c).unwrap().to_vec_f32().unwrap()),
            to_f64(&ops::sum(&c).unwrap().to_vec_f32().unwrap()),
        )
    };
    let gg = on(gpu, &g, &[1, n]);
    for (version, v1) in [("v2", false), ("v1", true)] {
        let mut norm = poisoned(gpu, &[1]);
        let mut total = poisoned(gpu, &[]);
        if v1 {
            reduce::row_norm_into_v1(&gg, &mut norm).unwrap();
            reduce::sum_into_v1(&gg, &mut total).unwrap();
        } else {
            reduce::row_norm_into(&gg, &mut norm).unwrap();
            reduce::sum_into(&gg, &mut total).unwrap();
        }
        let what = format!("norm {version} of {n} values");
        assert_close(&what, &norm.to_vec_f32().unwrap(), &want.0, 0.0, 1e-6);
        // Both sides add in f64 and round once to f32: a few f32 ulps at most.
        let what = format!("sum {version} of {n} values");
        assert_close(&what, &total.to_vec_f32().unwrap(), &want.1, 1e-3, 1e-6);
    }
    for (i, &(rows, cols)) in [(8192usize, 10usize), (8192, 2), (1024, 3072), (3, 40_000)]
        .iter()
        .enumerate()
    {
        let a = random_vec(980 + i as u64, rows * cols, -1.0, 1.0);
        let b = random_vec(990 + i as u64, rows * cols, -1.0, 1.0);
        let (ca, cb) = (on(&CPU, &a, &[rows, cols]), on(&CPU, &b, &[rows, cols]));
        let want = to_f64(&ops::row_dot(&ca, &cb).unwrap().to_vec_f32().unwrap());
        let want_norm = to_f64(&ops::row_norm(&ca).unwrap().to_vec_f32().unwrap());
        let (ga, gb) = (on(gpu, &a, &[rows, cols]), on(gpu, &b, &[rows, cols]));
        for (version, v1) in [("v2", false), ("v1", true)] {
            let (mut dots, mut norms) = (poisoned(gpu, &[rows]), poisoned(gpu, &[rows]));
            if v1 {
                reduce::row_dot_into_v1(&ga, &gb, &mut dots).unwrap();
                reduce::row_norm_into_v1(&ga, &mut norms).unwrap();
            } else {
                reduce::row_dot_into(&ga, &gb, &mut dots).unwrap();
                reduce::row_norm_into(&ga, &mut norms).unwrap();
            }
            let what = format!("row_dot {version} {rows}x{cols}");
            assert_close(&what, &dots.to_vec_f32().unwrap(), &want, 1e-6, 1e-6);
            let what = format!("row_norm {version} {rows}x{cols}");
            assert_close(&what, &norms.to_vec_f32().unwrap(), &want_norm, 0.0, 1e-6);
        }
    }
}

/// Version 2 of every reduction twice on the same inputs, and once more on a copy of them in
/// another buffer: the same bits each time (a fixed grid and tree, no atomics).
fn reductions_bit_identical(gpu: &Device) {
    let (rows, cols) = (262_144, 128);
    let x = random_vec(1001, rows * cols, -1.0, 1.0);
    let n = 57_600_000;
    let g = random_vec(1002, n, -1.0, 1.0);
    let d = random_vec(1003, 8192 * 10, -1.0, 1.0);
    let run = || {
        let gx = on(gpu, &x, &[rows, cols]);
        let gg = on(gpu, &g, &[1, n]);
        let gd = on(gpu, &d, &[8192, 10]);
        let mut bias = poisoned(gpu, &[cols]);
        sum_rows_into(&gx, 1, &mut bias, false).unwrap();
        let mut per_sample = poisoned(gpu, &[256, cols]);
        sum_rows_into(&gx, 256, &mut per_sample, false).unwrap();
        let mut norm = poisoned(gpu, &[1]);
        reduce::row_norm_into(&gg, &mut norm).unwrap();
        let mut total = poisoned(gpu, &[]);
        reduce::sum_into(&gg, &mut total).unwrap();
        let dots = ops::row_dot(&gd, &gd).unwrap();
        [bias, per_sample, norm, total, dots]
            .iter()
            .map(|t| {
                t.to_vec_f32()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<u32>>()
            })
            .collect::<Vec<_>>()
    };
    let first = run();
    for again in 0..3 {
        assert!(first == run(), "run {again}: a reduction changed its bits");
    }
}

/// One GEMM on the GPU against the f64 reference, within the K-derived bound. With beta = 0 the
/// output starts poisoned: the kernel must not read it.
fn gemm_check(gpu: &Device, case: (usize, usize, usize, usize, usize), spec: GemmSpec, seed: u64) {
    let GemmCase {
        a,
        a_shape,
        b,
        b_shape,
        c0,
        c_shape,
    } = gemm_case(case, spec, [seed, seed + 1, seed + 2]);
    let mut gc = if spec.beta == 0.0 {
        poisoned(gpu, &c_shape)
    } else {
        on(gpu, &c0, &c_shape)
    };
    ops::gemm_into(&on(gpu, &a, &a_shape), &on(gpu, &b, &b_shape), &mut gc, spec).unwrap();
    let (want, bound) = gemm_reference(&a, &a_shape, &b, &b_shape, &c0, None, spec);
    let what = format!("gemm {a_shape:?} x {b_shape:?} {spec:?}");
    assert_within(&what, &c_shape, &gc.to_vec_f32().unwrap(), &want, &bound);
}

const TRANSPOSES: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

fn gemm_small_shapes(gpu: &Device) {
    let mut all = GEMM_CASES.to_vec();
    all.extend([
        (0, 0, 512, 384, 1024),
        (2, 0, 1000, 130, 257),
        (300, 300, 8, 8, 8),
    ]);
    let mut seed = 7000;
    for &case in &all {
        for (trans_a, trans_b) in TRANSPOSES {
            for (alpha, beta) in [(1.0f32, 0.0f32), (0.5, -1.25)] {
                seed += 3;
                let spec = GemmSpec {
                    trans_a,
                    trans_b,
                    alpha,
                    beta,
                };
                gemm_check(gpu, case, spec, seed);
            }
        }
    }
}

/// The bias epilogue (linear and convolution layers), against the f64 reference.
fn gemm_bias(gpu: &Device) {
    for &(m, n, k) in &[(1usize, 1usize, 1usize), (129, 300, 77), (200, 3, 4100)] {
        let a = random_vec(11, m * k, -1.0, 1.0);
        let b = random_vec(12, k * n, -1.0, 1.0);
        let bias = random_vec(13, n, -1.0, 1.0);
        let spec = GemmSpec::default();
        let mut got = poisoned(gpu, &[m, n]);
        ops::gemm_bias_into(
            &on(gpu, &a, &[m, k]),
            &on(gpu, &b, &[k, n]),
            &on(gpu, &bias, &[n]),
            &mut got,
            spec,
        )
        .unwrap();
        let (want, bound) = gemm_reference(&a, &[m, k], &b, &[k, n], &[], Some(&bias), spec);
        assert_within(
            &format!("gemm + bias {m}x{n}x{k}"),
            &[m, n],
            &got.to_vec_f32().unwrap(),
            &want,
            &bound,
        );
    }
}

/// The weight-gradient shape under one pair of transposes. The layer itself runs (true, false)
/// and accumulates (beta = 1); the others scale to exercise the epilogue.
fn gemm_weight_grad_shape(gpu: &Device, trans_a: bool, trans_b: bool) {
    let (alpha, beta) = match (trans_a, trans_b) {
        (true, false) => (1.0, 1.0),
        (false, false) => (1.0, 0.0),
        (false, true) => (0.5, 0.0),
        (true, true) => (0.5, -1.25),
    };
    let spec = GemmSpec {
        trans_a,
        trans_b,
        alpha,
        beta,
    };
    gemm_check(
        gpu,
        WEIGHT_GRAD,
        spec,
        31_000 + 10 * (2 * trans_a as u64 + trans_b as u64),
    );
}

/// grid.z is capped at 65,535, so the kernel loops over the batch in steps of gridDim.z: a
/// batch of 140,000 needs up to three passes. Tiny matrices, batched and broadcast operands.
fn gemm_grid_z_loop(gpu: &Device) {
    let batch = 140_000;
    for (trans_a, trans_b) in TRANSPOSES {
        gemm_check(
            gpu,
            (batch, batch, 3, 5, 4),
            GemmSpec::new(trans_a, trans_b),
            41_000,
        );
    }
    let accumulate = GemmSpec {
        beta: 1.0,
        ..GemmSpec::new(false, false)
    };
    gemm_check(gpu, (batch, 0, 2, 3, 9), accumulate, 42_000);
    gemm_check(gpu, (0, batch, 5, 1, 2), GemmSpec::new(true, false), 43_000);
}

/// The manifold M-step's batch, drawn on the device from Philox indices: a pure gather, so
/// bit for bit, at the paper's batch (1,024 of 65,536 rows) and at an offset inside a block of 4.
fn gather_rows_uniform_parity(gpu: &Device) {
    use emprior::ops::rng::gather_rows_uniform;
    for &(rows, per, batch, offset) in &[(65_536usize, 5usize, 1024usize, 7_340_032u64), (3, 7, 41, 6)] {
        let x = random_vec(rows as u64, rows * per, -3.0, 3.0);
        let rng = Philox::new(9, 0xda7a);
        let pick = |d: &Device| {
            let pool = on(d, &x, &[rows, per]);
            gather_rows_uniform(&pool, batch, rng, offset)
                .unwrap()
                .to_vec_f32()
                .unwrap()
        };
        let (want, got) = (pick(&CPU), pick(gpu));
        assert!(
            got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()),
            "gather_rows_uniform rows {rows} batch {batch} offset {offset}"
        );
    }
}

/// The images M-step's device-side shuffle against the CPU bit for bit: CIFAR-10's quick and
/// paper shapes (a batch of 256 images of 3,072 values out of 50,000, the last full batch of an
/// epoch) and a ragged one.
fn gather_rows_permuted_parity(gpu: &Device) {
    use emprior::ops::rng::gather_rows_permuted;
    for &(rows, per, batch, start, epoch) in &[
        (50_000usize, 3072usize, 256usize, 49_664usize, 31u64),
        (384, 3072, 32, 64, 0),
        (13, 5, 7, 6, 2),
    ] {
        let x = random_vec(rows as u64, rows * per, -2.0, 2.0);
        let rng = Philox::new(4, 0x5bf1);
        let pick = |d: &Device| {
            gather_rows_permuted(&on(d, &x, &[rows, per]), batch, rng, epoch, start)
                .unwrap()
                .to_vec_f32()
                .unwrap()
        };
        let (want, got) = (pick(&CPU), pick(gpu));
        assert!(
            got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits()),
            "gather_rows_permuted rows {rows} batch {batch} start {start}"
        );
    }
}

/// CG's per-row steps with convergence freezing and the curvature guard (kernels/cg.cu): one f32
/// division and two f32 products per row, so the GPU must give the CPU's bits, at CG's E-step
/// shape (8,192 rows) with converged rows, zero and negative pAp, curvature under the floor and
/// zero right-hand sides mixed in.
fn cg_step_sizes_parity(gpu: &Device) {
    use emprior::posterior::cg::step_sizes;
    let rows = 8192;
    let mut rr = random_vec(1, rows, 0.0, 1.0);
    let mut pap = random_vec(2, rows, 0.1, 2.0);
    let pp = random_vec(4, rows, 0.5, 4.0);
    let mut bn = random_vec(3, rows, 0.5, 1e4);
    for i in (0..rows).step_by(7) {
        rr[i] = 1e-7 * bn[i]; // converged at tol2 = 1e-6
    }
    for i in (0..rows).step_by(11) {
        pap[i] = 0.0;
    }
    for i in (0..rows).step_by(17) {
        pap[i] = -pap[i];
    }
    for i in (0..rows).step_by(19) {
        pap[i] = 0.05 * pp[i]; // under a floor of 0.1
    }
    for i in (0..rows).step_by(13) {
        (rr[i], bn[i]) = (0.0, 0.0);
    }
    for (tol2, floor) in [(0.0, 0.0), (1e-6, 0.0), (1e-6, 0.1)] {
        let run = |d: &Device| {
            let t = |v: &Vec<f32>| on(d, v, &[rows]);
            let (alpha, keep) = step_sizes(&t(&rr), &t(&pap), &t(&pp), &t(&bn), tol2, floor).unwrap();
            (alpha.to_vec_f32().unwrap(), keep.to_vec_f32().unwrap())
        };
        let (want, got) = (run(&CPU), run(gpu));
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same(&got.0, &want.0) && same(&got.1, &want.1),
            "cg steps at tol2 = {tol2}, floor = {floor}"
        );
        assert!(
            tol2 == 0.0 || want.0.iter().step_by(7).all(|&a| a == 0.0),
            "converged rows keep still"
        );
        assert!(
            (0..rows)
                .step_by(17)
                .filter(|i| i % 19 != 0)
                .all(|i| want.0[i] == 0.0),
            "negative curvature: no step"
        );
        assert!(
            floor == 0.0
                || (0..rows)
                    .step_by(19)
                    .all(|i| want.0[i] == 0.0 && (want.1[i] == 0.0 || rr[i] <= tol2 as f32 * bn[i])),
            "curvature under the floor stops the row"
        );
    }
}

/// The M-step's augmentation (random flips and reflect-padded shifts from Philox): a pure
/// gather, so the GPU must reproduce the CPU bit for bit, at CIFAR-10's shape and a ragged one.
fn augment_flip_shift(gpu: &Device) {
    use emprior::train::augment::flip_shift;
    for &(shape, shift, seed) in &[([256usize, 32, 32, 3], 1usize, 3u64), ([7, 5, 9, 2], 2, 11)] {
        let n: usize = shape.iter().product();
        let x = random_vec(seed, n, -2.0, 2.0);
        let rng = Philox::new(seed, 5);
        let want = flip_shift(&on(&CPU, &x, &shape).as_view().unwrap(), shift, rng)
            .unwrap()
            .to_vec_f32()
            .unwrap();
        let got = flip_shift(&on(gpu, &x, &shape).as_view().unwrap(), shift, rng)
            .unwrap()
            .to_vec_f32()
            .unwrap();
        let differing = got
            .iter()
            .zip(&want)
            .filter(|(g, w)| g.to_bits() != w.to_bits())
            .count();
        assert_eq!(
            differing, 0,
            "flip_shift {shape:?} shift {shift}: {differing} of {n} values differ"
        );
    }
}

/// kernels/sinkhorn.cu against the CPU solver (src/metrics/sinkhorn.rs): the kernel repeats the
/// CPU's f32 operations in the CPU's order, so only CUDA's f64 log (an ulp from glibc's) separates
/// them; over hundreds of iterations that may flip the last bit of a few f32 potentials, which
/// moves the value far less than 1e-9. Iteration counts must be equal. Sizes: ragged (partial
/// blocks, a half-warp past the last row), the unrolled d = 5 and 2, d = 11, and the manifold
/// reference at 4,096 points.
fn sinkhorn_matches_cpu(gpu: &Device) {
    use emprior::data::manifold::Manifold;
    use emprior::metrics::Sinkhorn;
    let cloud = |seed: u64, n: usize, d: usize| to_f64(&random_vec(seed, n * d, -1.5, 1.5));
    let manifold = Manifold::new(0);
    type Case = (String, Vec<f64>, Vec<f64>, usize, Sinkhorn);
    let cases: Vec<Case> = vec![
        (
            "5-D 1000 x 777".into(),
            cloud(1, 1000, 5),
            cloud(2, 777, 5),
            5,
            Sinkhorn::PAPER,
        ),
        (
            "2-D 33 x 517".into(),
            cloud(3, 33, 2),
            cloud(4, 517, 2),
            2,
            Sinkhorn::PAPER,
        ),
        (
            "11-D 300 x 301, reg 0.1".into(),
            cloud(5, 300, 11),
            cloud(6, 301, 11),
            11,
            Sinkhorn::new(0.1, 500, 1e-6),
        ),
        (
            "manifold 4096".into(),
            manifold.sample(0, 1, 4096),
            manifold.sample(0, 2, 4096),
            5,
            Sinkhorn::PAPER,
        ),
    ];
    for (what, a, b, d, s) in cases {
        let cpu = s.solve(&a, &b, d);
        let start = std::time::Instant::now();
        let got = s.solve_on(gpu, &a, &b, d).unwrap();
        println!(
            "sinkhorn {what}: GPU {:.3} s, value {:.12e} (CPU {:.12e}), iterations {} (CPU {})",
            start.elapsed().as_secs_f64(),
            got.value,
            cpu.value,
            got.iterations,
            cpu.iterations
        );
        assert_eq!(got.iterations, cpu.iterations, "{what}: iterations");
        assert_eq!(got.converged, cpu.converged, "{what}");
        assert!(
            ((got.value - cpu.value) / cpu.value).abs() < 1e-9,
            "{what}: value {} vs {}",
            got.value,
            cpu.value
        );
        assert!(
            (got.marginal_error - cpu.marginal_error).abs() <= 1e-9 * cpu.marginal_error + 1e-15,
            "{what}: marginal error {} vs {}",
            got.marginal_error,
            cpu.marginal_error
        );
    }
}

fn random_streams(gpu: &Device) {
    for &(seed, stream, offset, n) in &[
        (0u64, 0u64, 0u64, 1usize),
        (1, 2, 3, 5),
        (7, 1 << 40, 6, 1023),
        (u64::MAX, u64::MAX, (1 << 33) + 1, 4097),
        (12345, 9, 2, (1 << 20) + 3),
    ] {
        let rng = Philox::new(seed, stream);
        let mut got = poisoned(gpu, &[n]);
        rng.uniform_into(&mut got, offset).unwrap();
        let mut want = vec![0.0; n];
        rng.fill_uniform(offset, &mut want);
        assert_eq!(
            got.to_vec_f32().unwrap(),
            want,
            "uniform streams must be bit-identical"
        );

        rng.normal_into(&mut got, offset).unwrap();
        rng.fill_normal(offset, &mut want);
        // Box-Muller in f64 on both sides, rounded once: identical but for a rare last-ulp tie.
        let got = got.to_vec_f32().unwrap();
        let differing = got.iter().zip(&want).filter(|(g, w)| g != w).count();
        assert_close(
            &format!("normal seed={seed} n={n}"),
            &got,
            &to_f64(&want),
            1e-7,
            2.4e-7,
        );
        assert!(
            differing * 100_000 <= n.max(100_000),
            "{differing} of {n} normals differ in the last bit"
        );
    }
}

fn pool_hot_loop(gpu: &Device) {
    let Device::Cuda(dev) = gpu else {
        return; // the CPU stand-in has no pool
    };
    let x = on(gpu, &random_vec(1, 1 << 16, -1.0, 1.0), &[256, 256]);
    let step = |x: &Tensor| -> Tensor {
        let y = ops::matmul(x, x, false, true).unwrap();
        let z = ops::silu(&y).unwrap();
        let s = ops::row_norm(&z).unwrap();
        let _ = ops::sum(&s).unwrap();
        ops::scale(&z, 1e-3).unwrap()
    };
    let _ = step(&x);
    gpu.synchronize().unwrap();
    let before = dev.pool_stats();
    for _ in 0..10 {
        let _ = step(&x);
    }
    gpu.synchronize().unwrap();
    let after = dev.pool_stats();
    // Other trials share the device and may allocate concurrently; only this thread's loop is
    // deterministic, so require that it was served from the cache (reuses grew by at least the
    // 10 x 6 buffers the loop asked for) rather than a flat global counter.
    assert!(after.reuses - before.reuses >= 60, "{before:?} -> {after:?}");
    println!("cuda pool: {before:?} -> {after:?}");
}

/// Poison mode on the GPU (EMPRIOR_POISON=1, set by cargo and by the device check): a buffer the
/// pool hands out, fresh from the driver or recycled from a dropped tensor that held finite
/// values, reads as NaN, and a planted read-before-write (a GEMM accumulating into a C that was
/// never written) comes out NaN instead of passing on stale data.
fn poison_fresh_and_recycled(gpu: &Device) {
    assert!(
        emprior::poison_enabled(),
        "poison mode is off: run the GPU tests with EMPRIOR_POISON=1"
    );
    let all_nan = |t: &Tensor, what: &str| {
        let v = t.to_vec_f32().unwrap();
        let finite = v.iter().filter(|x| !x.is_nan()).count();
        assert_eq!(finite, 0, "{what}: {finite} of {} elements are not NaN", v.len());
    };
    // An odd size class no other trial uses, so the first request is fresh from the driver.
    let shape = [7, 1013];
    all_nan(
        &Tensor::uninit(&shape, emprior::DType::F32, gpu).unwrap(),
        "fresh buffer",
    );
    drop(Tensor::full(&shape, 1.5, gpu).unwrap());
    all_nan(
        &Tensor::uninit(&shape, emprior::DType::F32, gpu).unwrap(),
        "recycled buffer",
    );

    let a = on(gpu, &random_vec(3, 64 * 32, -1.0, 1.0), &[64, 32]);
    let b = on(gpu, &random_vec(4, 32 * 48, -1.0, 1.0), &[32, 48]);
    let accumulate = GemmSpec {
        beta: 1.0,
        ..GemmSpec::default()
    };
    let mut c = Tensor::uninit(&[64, 48], emprior::DType::F32, gpu).unwrap();
    ops::gemm_into(&a, &b, &mut c, accumulate).unwrap();
    all_nan(&c, "GEMM accumulating into an unwritten C");
}

/// The pool's out-of-memory path: with the GPU's memory parked in the pool's free lists, a request
/// of a size class the cache does not hold fails at the driver, and must succeed after the pool
/// hands its cache back (trim) and retries. Runs alone: nothing else may allocate meanwhile.
fn pool_oom_retry(gpu: &Device) {
    let Device::Cuda(dev) = gpu else {
        return; // the CPU stand-in has no pool
    };
    const GIB: usize = 1 << 30;
    // A size class (3 GiB) that the 1 GiB buffers below never fill.
    let big = 3 * GIB;
    assert_eq!(size_class(big), big);
    assert_eq!(size_class(GIB), GIB);

    dev.trim_pool();
    dev.synchronize().unwrap();
    dev.context().bind_to_thread().unwrap();
    let free = || cudarc::driver::result::mem_get_info().unwrap().0;
    let free_at_start = free();
    // Hold 1 GiB buffers until less than 1.5 GiB is free (bounded: at most 1 TiB of them). A
    // poison mode may fill each fresh buffer: about 1 ms per GiB.
    let mut held = Vec::new();
    while free() > GIB + GIB / 2 && held.len() < 1024 {
        match dev.alloc(GIB) {
            Ok(buf) => held.push(buf),
            Err(_) => break,
        }
    }
    let left = free();
    assert!(
        left < big,
        "could not fill the GPU: {} GiB free after parking {} GiB",
        left as f64 / GIB as f64,
        held.len()
    );
    let parked = held.len();
    drop(held);
    let before = dev.pool_stats();
    assert!(
        before.bytes_cached >= parked * GIB,
        "the dropped buffers were not cached: {before:?}"
    );

    // If this fails: the driver's stream-ordered allocator keeps freed memory reserved until the
    // stream synchronizes, so the pool may need to synchronize between its trim and the retry.
    let buf = dev.alloc(big).unwrap_or_else(|e| {
        panic!("3 GiB with {parked} GiB cached and {left} bytes free, not served after the trim: {e}")
    });
    let after = dev.pool_stats();
    assert_eq!(
        after.bytes_cached, 0,
        "the cache was not trimmed: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.device_allocations,
        before.device_allocations + 1,
        "the request was not served by the driver after the trim: {before:?} -> {after:?}"
    );
    drop(buf);
    dev.trim_pool();
    dev.synchronize().unwrap();
    println!(
        "cuda pool OOM retry: parked {parked} GiB, {:.2} GiB left free, 3 GiB served after the trim; \
         {:.1} of {:.1} GiB free again",
        left as f64 / GIB as f64,
        free() as f64 / GIB as f64,
        free_at_start as f64 / GIB as f64
    );
}

/// The K-derived GEMM bound at K = 262,144, on the CPU: f32 dot products accumulated in sequence
/// (the GPU kernel's order) and the CPU oracle's blocked GEMM both pass it, and dropping one term,
/// or one K-tile of 8 terms, from the f32 sums fails it at every output.
fn gemm_bound_check() {
    let (m, n, k) = (2, 3, WEIGHT_GRAD.4);
    let spec = GemmSpec {
        beta: 1.0,
        ..GemmSpec::new(true, false)
    };
    let GemmCase {
        a,
        a_shape,
        b,
        b_shape,
        c0,
        c_shape,
    } = gemm_case((0, 0, m, n, k), spec, [51, 52, 53]);
    let (want, bound) = gemm_reference(&a, &a_shape, &b, &b_shape, &c0, None, spec);
    // A is stored K x M (trans_a), B is K x N.
    let term = |i: usize, j: usize, p: usize| a[p * m + i] * b[p * n + j];
    let sequential = |skip: &dyn Fn(usize, usize, usize) -> bool| -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f32;
                for p in (0..k).filter(|&p| !skip(i, j, p)) {
                    acc = a[p * m + i].mul_add(b[p * n + j], acc);
                }
                c[i * n + j] = acc + c0[i * n + j];
            }
        }
        c
    };
    assert_within(
        "f32 sequential sums",
        &c_shape,
        &sequential(&|_, _, _| false),
        &want,
        &bound,
    );
    let mut oracle = on(&CPU, &c0, &c_shape);
    ops::gemm_into(
        &on(&CPU, &a, &a_shape),
        &on(&CPU, &b, &b_shape),
        &mut oracle,
        spec,
    )
    .unwrap();
    assert_within(
        "CPU oracle GEMM",
        &c_shape,
        &oracle.to_vec_f32().unwrap(),
        &want,
        &bound,
    );

    // The largest term of each output, and the K-tile at 1000 * 8.
    let largest: Vec<usize> = (0..m * n)
        .map(|ij| {
            (0..k)
                .max_by(|&p, &q| {
                    term(ij / n, ij % n, p)
                        .abs()
                        .total_cmp(&term(ij / n, ij % n, q).abs())
                })
                .unwrap()
        })
        .collect();
    let one_lost = sequential(&|i, j, p| p == largest[i * n + j]);
    let tile_lost = sequential(&|_, _, p| p / 8 == 1000);
    for (what, got) in [("one lost term", one_lost), ("one lost K-tile", tile_lost)] {
        let o = outliers(&got, &want, |i| bound[i]);
        assert_eq!(
            o.count,
            m * n,
            "{what}: only {} of {} outputs outside the bound",
            o.count,
            m * n
        );
    }
    let worst = (0..m * n).map(|i| bound[i]).fold(0.0, f64::max);
    println!(
        "K = {k}: bound at most {worst:.2e} on outputs of magnitude ~{:.0}",
        (k as f64 / 9.0).sqrt()
    );
}
