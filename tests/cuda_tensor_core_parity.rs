//! The bf16 tensor-core kernels (kernels/gemm.cu and kernels/conv.cu, version 2; on an H100 or
//! H200 also kernels/conv_sm90a.cu's wgmma forward and input gradient) against an f64
//! computation on the very bf16 values they read, at the CIFAR-10 U-Net's shapes (every distinct
//! convolution and the attention and modulation GEMMs, at a reduced batch) and at ragged ones
//! (partial tiles, taps that straddle a K tile, stride 2, batched GEMMs), with outputs poisoned
//! before each launch. The CPU twins are held to the same rule in the `twins::` trials, which run
//! everywhere.
//!
//! Tolerance (shared/docs/tensor-cores.md §6): with exact products and f32 accumulation in
//! 16-wide blocks, |got - f64| <= (K / 16 + 4 + parts) 2^-23 (|A| |B|) elementwise, where |A| |B|
//! is the same product on absolute values and parts the split-K partial sums; a bf16 output adds
//! one rounding, 2^-8 |f64|. An indexing or layout bug makes errors of the order of |A| |B|
//! itself, about 10^5 times the bound.

mod common;

use common::{assert_within, random_vec, Suite};
use emprior::nn::conv::bf16 as conv_bf16;
use emprior::nn::conv::bf16::InputGradKernel;
use emprior::nn::conv::{col2im_into, im2col, ConvGeometry};
use emprior::ops::precision::{round_to_bf16, tensor_core_refusal, to_bf16};
use emprior::ops::{self, GemmSpec};
use emprior::{AsView, AsViewMut, DType, Device, Tensor};

const CPU: Device = Device::Cpu;

fn main() {
    let mut s = Suite::from_args();
    s.cpu("twins::casts_round_to_nearest_even", casts_round_to_nearest_even);
    s.cpu("twins::gemm_matches_f64", || gemm_trials(&CPU, &small_gemms()));
    s.cpu("twins::conv_matches_f64", || conv_trials(&CPU, &small_convs(), 2));
    s.cpu("twins::refusals_name_the_problem", refusals);
    s.cpu("twins::wgrad_splits_depend_on_the_shape_alone", wgrad_splits_rule);
    s.cpu(
        "harness::bound_catches_one_lost_product",
        bound_catches_lost_product,
    );
    s.gpu("tc_gemm::ragged_and_batched", |g| gemm_trials(g, &small_gemms()));
    // The device check's dry run (the CPU standing in for the GPU) only checks that the code
    // runs: a smaller batch there keeps CI short; on a GPU the batch is 16.
    let batch = if common::gpu_stand_in() { 2 } else { 16 };
    s.gpu("tc_gemm::cifar10_unet_linear_shapes", move |g| {
        gemm_trials(g, &unet_gemms(batch))
    });
    s.gpu("tc_conv::ragged_and_strided", |g| {
        conv_trials(g, &small_convs(), 2)
    });
    s.gpu("tc_conv::cifar10_unet_shapes_batch16", move |g| {
        conv_trials(g, &unet_convs(), batch)
    });
    s.gpu("tc_conv::wgrad_bit_identical_run_to_run", wgrad_deterministic);
    s.cpu("twins::residual_epilogue_is_the_two_ops", || {
        residual_epilogue(&CPU, 2)
    });
    s.gpu(
        "tc_conv::residual_epilogue_gives_the_two_kernels_bits",
        move |g| residual_epilogue(g, batch),
    );
    s.gpu_if(
        "tc_wgmma::residual_epilogue_gives_the_two_kernels_bits",
        move |g| on_wgmma(g, || residual_epilogue(g, batch)),
    );
    s.gpu("tc::startup_check_agrees_with_the_cpu", |g| {
        emprior::nn::tensor_cores::check(g).unwrap()
    });
    // Hopper (kernels/conv_sm90a.cu): the forward and input gradient on wgmma, the same trials;
    // ignored, with the reason, on a GPU without sm_90a kernels.
    s.gpu_if("tc_wgmma::integer_check_agrees_with_the_cpu", |g| {
        on_wgmma(g, || {
            if let Device::Cuda(_) = g {
                emprior::nn::tensor_cores::try_wgmma(g).unwrap();
            }
        })
    });
    s.gpu_if("tc_wgmma::ragged_and_strided", |g| {
        on_wgmma(g, || conv_trials(g, &small_convs(), 2))
    });
    s.gpu_if("tc_wgmma::cifar10_unet_shapes_batch16", move |g| {
        on_wgmma(g, || conv_trials(g, &unet_convs(), batch))
    });
    s.run()
}

/// Runs `f` with the convolutions on wgmma (turned off again after, also on a panic), or says
/// why this GPU cannot. The CPU stand-in runs `f` as it is (the twins).
fn on_wgmma(dev: &Device, f: impl FnOnce()) -> Option<String> {
    let Device::Cuda(d) = dev else {
        f();
        return None;
    };
    if !d.has_wgmma() {
        let (major, minor) = d.compute_capability();
        return Some(format!(
            "{} (compute capability {major}.{minor}) has no sm_90a kernels",
            d.name()
        ));
    }
    d.set_wgmma(true).unwrap();
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    d.set_wgmma(false).unwrap();
    if let Err(p) = run {
        std::panic::resume_unwind(p);
    }
    None
}

// ---- operands --------------------------------------------------------------------------------------

/// Fresh random bf16 values (uniform in [-1, 1) before rounding) on `dev`, and the same values in
/// f64 on the host.
fn operand(dev: &Device, seed: u64, shape: &[usize]) -> (Tensor, Vec<f64>) {
    let n = shape.iter().product();
    let v = random_vec(seed, n, -1.0, 1.0);
    let t = to_bf16(&Tensor::from_f32(&v, shape, dev).unwrap()).unwrap();
    (t, round_to_bf16(&v).iter().map(|&x| x as f64).collect())
}

fn host_f64(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_f64(v, shape, &CPU).unwrap()
}

fn abs(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.abs()).collect()
}

fn poisoned(dev: &Device, shape: &[usize]) -> Tensor {
    Tensor::full(shape, f32::NAN, dev).unwrap()
}

fn poisoned_bf16(dev: &Device, shape: &[usize]) -> Tensor {
    to_bf16(&poisoned(dev, shape)).unwrap()
}

fn f32_of_bf16(t: &Tensor) -> Vec<f32> {
    ops::to_f32(t).unwrap().to_vec_f32().unwrap()
}

/// Asserts `got` within the block-accumulation bound of `want` (see the module doc).
#[allow(clippy::too_many_arguments)]
fn check(
    what: &str,
    shape: &[usize],
    got: &[f32],
    want: &[f64],
    abs_prod: &[f64],
    k: usize,
    parts: usize,
    bf16_out: bool,
) {
    let per = (k as f64 / 16.0 + 4.0 + parts as f64) * 2f64.powi(-23);
    let bound: Vec<f64> = want
        .iter()
        .zip(abs_prod)
        .map(|(w, a)| per * a + if bf16_out { 2f64.powi(-8) * w.abs() } else { 0.0 } + 1e-30)
        .collect();
    assert_within(what, shape, got, want, &bound);
}

// ---- GEMMs --------------------------------------------------------------------------------------------

struct GemmCase {
    name: &'static str,
    batch_a: usize, // 0 = shared (rank 2)
    batch_b: usize,
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
}

const fn gc(name: &'static str, m: usize, n: usize, k: usize, ta: bool, tb: bool) -> GemmCase {
    GemmCase {
        name,
        batch_a: 0,
        batch_b: 0,
        m,
        n,
        k,
        ta,
        tb,
    }
}

fn small_gemms() -> Vec<GemmCase> {
    let mut v = vec![
        gc("ragged nn", 200, 72, 40, false, false),
        gc("ragged nt", 136, 24, 264, false, true),
        gc("ragged tn", 8, 256, 520, true, false),
        gc("one tile", 128, 128, 32, false, false),
    ];
    v.push(GemmCase {
        batch_a: 3,
        ..gc("batched A, shared B", 40, 16, 48, false, false)
    });
    v.push(GemmCase {
        batch_a: 2,
        batch_b: 2,
        ..gc("batched both, tn", 24, 32, 16, true, false)
    });
    v
}

/// The U-Net's GEMM-shaped layers at `batch` images: level 1 attention (256 tokens, 256
/// channels, 4 heads x 64): the qkv and output projections forward (nn), their input VJPs (nt)
/// and weight gradients (tn); the per-block modulation MLPs (embedding 256 -> 2 C).
fn unet_gemms(batch: usize) -> Vec<GemmCase> {
    let t = batch * 256;
    vec![
        gc("attention qkv forward", t, 768, 256, false, false),
        gc("attention out forward", t, 256, 256, false, false),
        gc("attention qkv input vjp", t, 256, 768, false, true),
        gc("attention qkv weight grad", 256, 768, t, true, false),
        gc("modulation level 2", batch, 768, 256, false, false),
        gc("modulation weight grad", 256, 768, batch, true, false),
    ]
}

fn gemm_trials(dev: &Device, cases: &[GemmCase]) {
    for (ci, c) in cases.iter().enumerate() {
        let seed = 1000 + 10 * ci as u64;
        let shape = |batch: usize, r: usize, col: usize| {
            if batch == 0 {
                vec![r, col]
            } else {
                vec![batch, r, col]
            }
        };
        let a_shape = if c.ta {
            shape(c.batch_a, c.k, c.m)
        } else {
            shape(c.batch_a, c.m, c.k)
        };
        let b_shape = if c.tb {
            shape(c.batch_b, c.n, c.k)
        } else {
            shape(c.batch_b, c.k, c.n)
        };
        let (a, av) = operand(dev, seed, &a_shape);
        let (b, bv) = operand(dev, seed + 1, &b_shape);
        let bias_v = random_vec(seed + 2, c.n, -1.0, 1.0);
        let bias = Tensor::from_f32(&bias_v, &[c.n], dev).unwrap();
        let spec = GemmSpec::new(c.ta, c.tb);
        // The f64 reference on the same values, and on their absolute values.
        let reference = |x: &[f64], y: &[f64]| {
            let want = ops::matmul(&host_f64(x, &a_shape), &host_f64(y, &b_shape), c.ta, c.tb).unwrap();
            (want.shape().to_vec(), want.to_vec_f64().unwrap())
        };
        let (out_shape, prod) = reference(&av, &bv);
        let (_, abs_prod) = reference(&abs(&av), &abs(&bv));
        let with_bias: Vec<f64> = prod
            .iter()
            .enumerate()
            .map(|(i, p)| p + bias_v[i % c.n] as f64)
            .collect();
        let abs_bias: Vec<f64> = abs_prod
            .iter()
            .enumerate()
            .map(|(i, p)| p + (bias_v[i % c.n] as f64).abs())
            .collect();

        // f32 out with bias, and bf16 out together.
        let mut got = poisoned(dev, &out_shape);
        let mut got_bf16 = poisoned_bf16(dev, &out_shape);
        ops::gemm_bf16_into(
            &a,
            &b,
            Some(&bias.as_view().unwrap()),
            Some(&mut got.as_view_mut().unwrap()),
            Some(&mut got_bf16),
            spec,
        )
        .unwrap();
        let what = format!("gemm_bf16 {} (m {} n {} k {})", c.name, c.m, c.n, c.k);
        check(
            &what,
            &out_shape,
            &got.to_vec_f32().unwrap(),
            &with_bias,
            &abs_bias,
            c.k,
            1,
            false,
        );
        check(
            &format!("{what}, bf16 out"),
            &out_shape,
            &f32_of_bf16(&got_bf16),
            &with_bias,
            &abs_bias,
            c.k,
            1,
            true,
        );

        // beta = 1, alpha = 0.5: C = 0.5 AB + C, no bias.
        let c0 = random_vec(seed + 3, prod.len(), -1.0, 1.0);
        let mut acc = Tensor::from_f32(&c0, &out_shape, dev).unwrap();
        let spec_acc = GemmSpec {
            alpha: 0.5,
            beta: 1.0,
            ..spec
        };
        ops::gemm_bf16_into(
            &a,
            &b,
            None,
            Some(&mut acc.as_view_mut().unwrap()),
            None,
            spec_acc,
        )
        .unwrap();
        let want: Vec<f64> = prod.iter().zip(&c0).map(|(p, &c)| 0.5 * p + c as f64).collect();
        let abs_want: Vec<f64> = abs_prod
            .iter()
            .zip(&c0)
            .map(|(p, &c)| 0.5 * p + (c as f64).abs())
            .collect();
        check(
            &format!("{what}, alpha 0.5 beta 1"),
            &out_shape,
            &acc.to_vec_f32().unwrap(),
            &want,
            &abs_want,
            c.k,
            1,
            false,
        );
    }
}

// ---- convolutions -------------------------------------------------------------------------------------

/// (name, H, W, Cin, Cout, stride)
type ConvCase = (&'static str, usize, usize, usize, usize, usize);

fn small_convs() -> Vec<ConvCase> {
    vec![
        ("ragged 5x7 24->40", 5, 7, 24, 40, 1),
        ("ragged 5x7 24->40 stride 2", 5, 7, 24, 40, 2),
        ("8x8 8->136 stride 2", 8, 8, 8, 136, 2),
        ("9x9 136->8", 9, 9, 136, 8, 1),
    ]
}

/// Every distinct convolution of the CIFAR-10 U-Net but the first (3 input channels, f32 path).
fn unet_convs() -> Vec<ConvCase> {
    vec![
        ("level 0 resblock 32x32 128->128", 32, 32, 128, 128, 1),
        ("down 1 32x32 128->256 stride 2", 32, 32, 128, 256, 2),
        ("level 1 resblock 16x16 256->256", 16, 16, 256, 256, 1),
        ("down 2 16x16 256->384 stride 2", 16, 16, 256, 384, 2),
        ("level 2 resblock 8x8 384->384", 8, 8, 384, 384, 1),
        ("merge 1 16x16 640->256", 16, 16, 640, 256, 1),
        ("merge 0 32x32 384->128", 32, 32, 384, 128, 1),
    ]
}

fn geometry(n: usize, h: usize, w: usize, cin: usize, s: usize) -> ConvGeometry {
    ConvGeometry::new(n, h, w, cin, s)
}

/// The three passes in f64 through the f32 path's own structure (im2col, GEMM, col2im), which
/// tests/nn_grad.rs checks against finite differences.
struct ConvReference {
    y: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
}

fn conv_reference(g: &ConvGeometry, cout: usize, x: &[f64], w: &[f64], dy: &[f64]) -> ConvReference {
    let (cin, p_out) = (g.cin as usize, (g.n * g.oh * g.ow) as usize);
    let xt = host_f64(x, &[(g.n * g.h * g.w) as usize * cin]);
    let wt = host_f64(w, &[9 * cin, cout]);
    let dyt = host_f64(dy, &[p_out, cout]);
    let col = im2col(&xt.as_view().unwrap(), g).unwrap();
    let y = ops::matmul(&col, &wt, false, false)
        .unwrap()
        .to_vec_f64()
        .unwrap();
    let dw = ops::matmul(&col, &dyt, true, false)
        .unwrap()
        .to_vec_f64()
        .unwrap();
    let dcol = ops::matmul(&dyt, &wt, false, true).unwrap();
    let mut dx = Tensor::zeros(&[(g.n * g.h * g.w) as usize * cin], DType::F64, &CPU).unwrap();
    col2im_into(&dcol.as_view().unwrap(), g, &mut dx.as_view_mut().unwrap()).unwrap();
    ConvReference {
        y,
        dx: dx.to_vec_f64().unwrap(),
        dw,
    }
}

fn conv_trials(dev: &Device, cases: &[ConvCase], batch: usize) {
    for (ci, &(name, h, w, cin, cout, s)) in cases.iter().enumerate() {
        let g = geometry(batch, h, w, cin, s);
        let (p_in, p_out) = (batch * h * w, (g.n * g.oh * g.ow) as usize);
        let seed = 5000 + 10 * ci as u64;
        let (x, xv) = operand(dev, seed, &[p_in * cin]);
        let (wt, wv) = operand(dev, seed + 1, &[9 * cin * cout]);
        let (dy, dyv) = operand(dev, seed + 2, &[p_out * cout]);
        let bias_v = random_vec(seed + 3, cout, -1.0, 1.0);
        let bias = Tensor::from_f32(&bias_v, &[cout], dev).unwrap();
        let r = conv_reference(&g, cout, &xv, &wv, &dyv);
        let ra = conv_reference(&g, cout, &abs(&xv), &abs(&wv), &abs(&dyv));
        let what = format!("conv3x3 bf16 {name}, batch {batch}");

        let mut y = poisoned(dev, &[p_out * cout]);
        let mut y_bf16 = poisoned_bf16(dev, &[p_out * cout]);
        conv_bf16::forward(
            &x,
            &wt,
            Some(&bias.as_view().unwrap()),
            &g,
            cout,
            Some(&mut y.as_view_mut().unwrap()),
            Some(&mut y_bf16),
        )
        .unwrap();
        let want: Vec<f64> =
            r.y.iter()
                .enumerate()
                .map(|(i, v)| v + bias_v[i % cout] as f64)
                .collect();
        let abs_want: Vec<f64> =
            ra.y.iter()
                .enumerate()
                .map(|(i, v)| v + (bias_v[i % cout] as f64).abs())
                .collect();
        let shape = [p_out, cout];
        check(
            &format!("{what} forward"),
            &shape,
            &y.to_vec_f32().unwrap(),
            &want,
            &abs_want,
            9 * cin,
            1,
            false,
        );
        check(
            &format!("{what} forward, bf16 out"),
            &shape,
            &f32_of_bf16(&y_bf16),
            &want,
            &abs_want,
            9 * cin,
            1,
            true,
        );

        // The input gradient: at stride 2 both kernels (by parity class, the default, and the
        // 9-tap version 2), the parity one also accumulating (beta 1: its epilogue reads dx at
        // the pixels its row map gives).
        let kernels: &[InputGradKernel] = if s == 2 {
            &[InputGradKernel::ByParity, InputGradKernel::AllTaps]
        } else {
            &[InputGradKernel::ByParity]
        };
        for &kernel in kernels {
            let mut dx = poisoned(dev, &[p_in * cin]);
            conv_bf16::input_grad_with(&dy, &wt, &g, cout, &mut dx.as_view_mut().unwrap(), 0.0, kernel)
                .unwrap();
            check(
                &format!("{what} input gradient ({kernel:?})"),
                &[p_in, cin],
                &dx.to_vec_f32().unwrap(),
                &r.dx,
                &ra.dx,
                9 * cout,
                0,
                false,
            );
        }
        let dx0 = random_vec(seed + 5, p_in * cin, -1.0, 1.0);
        let mut dx = Tensor::from_f32(&dx0, &[p_in * cin], dev).unwrap();
        conv_bf16::input_grad(&dy, &wt, &g, cout, &mut dx.as_view_mut().unwrap(), 1.0).unwrap();
        let want: Vec<f64> = r.dx.iter().zip(&dx0).map(|(v, &d)| v + d as f64).collect();
        let abs_want: Vec<f64> = ra
            .dx
            .iter()
            .zip(&dx0)
            .map(|(v, &d)| v + (d as f64).abs())
            .collect();
        check(
            &format!("{what} input gradient, accumulated"),
            &[p_in, cin],
            &dx.to_vec_f32().unwrap(),
            &want,
            &abs_want,
            9 * cout,
            0,
            false,
        );

        // dw = 1 * dw0 + col^T dy (the layers accumulate into their gradient).
        let dw0 = random_vec(seed + 4, 9 * cin * cout, -1.0, 1.0);
        let mut dw = Tensor::from_f32(&dw0, &[9 * cin * cout], dev).unwrap();
        conv_bf16::weight_grad(&x, &dy, &g, cout, &mut dw.as_view_mut().unwrap(), 1.0).unwrap();
        let want: Vec<f64> = r.dw.iter().zip(&dw0).map(|(v, &d)| v + d as f64).collect();
        let abs_want: Vec<f64> = ra
            .dw
            .iter()
            .zip(&dw0)
            .map(|(v, &d)| v + (d as f64).abs())
            .collect();
        let parts = conv_bf16::wgrad_splits(&g, cout);
        check(
            &format!("{what} weight gradient ({parts} parts)"),
            &[9 * cin, cout],
            &dw.to_vec_f32().unwrap(),
            &want,
            &abs_want,
            p_out,
            parts,
            false,
        );
    }
}

/// A ResBlock's conv2 with the block's residual in its epilogue (`conv_bf16::forward_residual`,
/// at the level-0 shape) gives the bits of the two ops it replaces, the convolution with h kept
/// in bf16 then `residual_kept` (bf16 out, as the next block keeps it) or `residual_operand` (f32
/// out): on a GPU the fused kernel against the two kernels, on the CPU the twin against the ops.
/// Bad operands are refused by name.
fn residual_epilogue(dev: &Device, batch: usize) {
    use emprior::nn::blocks::{residual_kept, residual_operand};
    use emprior::ops::precision::{Bf16Ref, Operand, Precision};
    let (side, c) = (16, 128);
    let g = geometry(batch, side, side, c, 1);
    let pixels = batch * side * side;
    let (input, _) = operand(dev, 901, &[pixels * c]);
    let (w, _) = operand(dev, 902, &[9 * c * c]);
    let (x, _) = operand(dev, 903, &[batch, side, side, c]);
    let bias = Tensor::from_f32(&random_vec(904, c, -1.0, 1.0), &[c], dev).unwrap();
    let m = Tensor::from_f32(&random_vec(905, batch * 3 * c, -2.0, 2.0), &[batch, 3 * c], dev).unwrap();
    let (bv, mv) = (bias.as_view().unwrap(), m.as_view().unwrap());
    let bits = |t: &Tensor| -> Vec<u32> {
        let v = match t.dtype() {
            DType::BF16 => f32_of_bf16(t),
            _ => t.to_vec_f32().unwrap(),
        };
        v.iter().map(|v| v.to_bits()).collect()
    };

    let mut h = poisoned_bf16(dev, &[pixels * c]);
    conv_bf16::forward(&input, &w, Some(&bv), &g, c, None, Some(&mut h)).unwrap();
    let h = h.reshape(&[batch, side, side, c]).unwrap();
    let (xo, ho) = (Operand::of(&x).unwrap(), Operand::of(&h).unwrap());
    for out_dtype in [DType::BF16, DType::F32] {
        let want = match out_dtype {
            DType::BF16 => residual_kept(&xo, &ho, &mv, Precision::Bf16).unwrap(),
            _ => residual_operand(&xo, &ho, &mv).unwrap(),
        };
        let mut h2 = poisoned_bf16(dev, &[pixels * c]);
        let mut out = match out_dtype {
            DType::BF16 => poisoned_bf16(dev, &[batch, side, side, c]),
            _ => poisoned(dev, &[batch, side, side, c]),
        };
        let residual = conv_bf16::Residual {
            x: Bf16Ref::new(&x),
            m: &mv,
            out: &mut out,
        };
        conv_bf16::forward_residual(&input, &w, Some(&bv), &g, c, &mut h2, residual).unwrap();
        assert_eq!(
            bits(&h2),
            bits(&h),
            "h (kept) differs from the convolution's ({out_dtype:?} out)"
        );
        assert_eq!(
            bits(&out),
            bits(&want),
            "out differs from the residual op's ({out_dtype:?} out)"
        );
    }

    let mut h2 = poisoned_bf16(dev, &[pixels * c]);
    let mut out = poisoned(dev, &[batch, side, side, c]);
    let short = Tensor::zeros(&[batch, 2 * c], DType::F32, dev).unwrap();
    let residual = conv_bf16::Residual {
        x: Bf16Ref::new(&x),
        m: &short.as_view().unwrap(),
        out: &mut out,
    };
    let err = conv_bf16::forward_residual(&input, &w, Some(&bv), &g, c, &mut h2, residual)
        .unwrap_err()
        .to_string();
    assert!(err.contains("the modulation must be f32"), "{err}");
}

/// The split-K weight gradient at the level-0 shape gives the same bits twice.
fn wgrad_deterministic(dev: &Device) {
    let g = geometry(16, 32, 32, 128, 1);
    let (x, _) = operand(dev, 77, &[16 * 32 * 32 * 128]);
    let (dy, _) = operand(dev, 78, &[16 * 32 * 32 * 128]);
    let run = || {
        let mut dw = poisoned(dev, &[9 * 128 * 128]);
        conv_bf16::weight_grad(&x, &dy, &g, 128, &mut dw.as_view_mut().unwrap(), 0.0).unwrap();
        dw.to_vec_f32().unwrap()
    };
    let (first, second) = (run(), run());
    let same = first.iter().zip(&second).all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(
        same,
        "the split-K weight gradient differs between two runs on the same inputs"
    );
}

// ---- CPU-only checks -----------------------------------------------------------------------------------

fn casts_round_to_nearest_even() {
    // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even significand (1); 1 + 3 2^-8
    // is halfway between 1 + 2^-7 and 1 + 2^-6, which is even.
    let tie_down = 1.0 + 2f32.powi(-8);
    let tie_up = 1.0 + 3.0 * 2f32.powi(-8);
    let above = 1.0 + 2f32.powi(-8) + 2f32.powi(-20);
    let cases = [
        (tie_down, 1.0),
        (tie_up, 1.0 + 2f32.powi(-6)),
        (above, 1.0 + 2f32.powi(-7)),
        (-tie_down, -1.0),
        (f32::INFINITY, f32::INFINITY),
        (-0.0, -0.0),
        // The largest f32 is past the largest bf16 by more than half an ulp: infinity.
        (f32::MAX, f32::INFINITY),
    ];
    let input: Vec<f32> = cases.iter().map(|c| c.0).collect();
    let t = to_bf16(&Tensor::from_f32(&input, &[input.len()], &CPU).unwrap()).unwrap();
    let back = f32_of_bf16(&t);
    for ((x, want), got) in cases.iter().zip(&back) {
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "bf16({x:e}) = {got:e}, want {want:e}"
        );
    }
    let nan = to_bf16(&Tensor::from_f32(&[f32::NAN], &[1], &CPU).unwrap()).unwrap();
    assert!(f32_of_bf16(&nan)[0].is_nan(), "NaN must stay NaN");
    // round_to_bf16 (the tests' and oracles' rounding) agrees with the op.
    assert_eq!(round_to_bf16(&input[..4]), back[..4].to_vec());
}

fn refusals() {
    let err = |r: Option<String>| r.expect("a refusal");
    assert!(err(tensor_core_refusal(&[("Cin", 3)], &CPU)).contains("Cin = 3"));
    let g = geometry(2, 8, 8, 3, 1);
    let msg = err(conv_bf16::refusal(&g, 128, &CPU));
    assert!(msg.contains("Cin = 3") && msg.contains("multiple of 8"), "{msg}");
    let (x, _) = operand(&CPU, 1, &[2 * 64 * 3]);
    let (w, _) = operand(&CPU, 2, &[9 * 3 * 128]);
    let mut y = Tensor::zeros(&[2 * 64 * 128], DType::F32, &CPU).unwrap();
    let e = conv_bf16::forward(&x, &w, None, &g, 128, Some(&mut y.as_view_mut().unwrap()), None).unwrap_err();
    assert!(e.to_string().contains("Cin = 3"), "{e}");
    // An f32 operand is refused by name.
    let a = Tensor::zeros(&[8, 8], DType::F32, &CPU).unwrap();
    let (b, _) = operand(&CPU, 3, &[8, 8]);
    let mut c = Tensor::zeros(&[8, 8], DType::F32, &CPU).unwrap();
    let e = ops::gemm_bf16_into(
        &a,
        &b,
        None,
        Some(&mut c.as_view_mut().unwrap()),
        None,
        GemmSpec::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("bf16"), "{e}");
    // K = 12 is not a multiple of 8.
    let (a, _) = operand(&CPU, 4, &[8, 12]);
    let (b, _) = operand(&CPU, 5, &[12, 8]);
    let e = ops::gemm_bf16_into(
        &a,
        &b,
        None,
        Some(&mut c.as_view_mut().unwrap()),
        None,
        GemmSpec::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("= 12 is not a multiple of 8"), "{e}");
    // The rows of A (M) need not be: [13, 8] x [8, 8] is taken.
    let (a, _) = operand(&CPU, 6, &[13, 8]);
    let (b, _) = operand(&CPU, 7, &[8, 8]);
    let mut c = Tensor::zeros(&[13, 8], DType::F32, &CPU).unwrap();
    let spec = GemmSpec::default();
    ops::gemm_bf16_into(&a, &b, None, Some(&mut c.as_view_mut().unwrap()), None, spec).unwrap();
}

fn wgrad_splits_rule() {
    // Level 0 at batch 256: 9 output tiles, 8,192 K tiles -> 56 parts; batch 16 of the same
    // shape -> the same 56 (512 tiles of K allow it).
    let g256 = geometry(256, 32, 32, 128, 1);
    assert_eq!(conv_bf16::wgrad_splits(&g256, 128), 56);
    assert_eq!(conv_bf16::wgrad_splits(&geometry(16, 32, 32, 128, 1), 128), 56);
    // A tiny problem is never split below 8 K tiles a part.
    assert_eq!(conv_bf16::wgrad_splits(&geometry(1, 5, 7, 24, 1), 40), 1);
    // Level 2: 27 x 3 tiles -> 6 parts.
    assert_eq!(conv_bf16::wgrad_splits(&geometry(256, 8, 8, 384, 1), 384), 6);
}

/// The bound is tight enough to see one product term missing from one element of a K = 1,152
/// dot product (the level-0 convolution's K), where an indexing bug loses or moves many.
fn bound_catches_lost_product() {
    let (m, n, k) = (16, 16, 1152);
    let (a, av) = operand(&CPU, 91, &[m, k]);
    let (b, bv) = operand(&CPU, 92, &[k, n]);
    let mut c = Tensor::zeros(&[m, n], DType::F32, &CPU).unwrap();
    ops::gemm_bf16_into(
        &a,
        &b,
        None,
        Some(&mut c.as_view_mut().unwrap()),
        None,
        GemmSpec::default(),
    )
    .unwrap();
    let want = ops::matmul(&host_f64(&av, &[m, k]), &host_f64(&bv, &[k, n]), false, false)
        .unwrap()
        .to_vec_f64()
        .unwrap();
    let abs_prod = ops::matmul(
        &host_f64(&abs(&av), &[m, k]),
        &host_f64(&abs(&bv), &[k, n]),
        false,
        false,
    )
    .unwrap()
    .to_vec_f64()
    .unwrap();
    let got = c.to_vec_f32().unwrap();
    check(
        "harness: the twin itself",
        &[m, n],
        &got,
        &want,
        &abs_prod,
        k,
        1,
        false,
    );
    // Drop the median-sized term of C[0][0].
    let mut terms: Vec<f64> = (0..k).map(|p| av[p] * bv[p * n]).collect();
    terms.sort_by(|x, y| x.abs().total_cmp(&y.abs()));
    let mut broken = got.clone();
    broken[0] -= terms[k / 2] as f32;
    let caught =
        std::panic::catch_unwind(|| check("planted", &[m, n], &broken, &want, &abs_prod, k, 1, false));
    assert!(
        caught.is_err(),
        "a lost product term ({:e}) passed the bound",
        terms[k / 2]
    );
}
