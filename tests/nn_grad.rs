//! Tier 1 for the networks: every layer's backward (input and parameter gradients) and VJP, and
//! those of whole small networks, against central finite differences in f64. Tolerance: the
//! norm-wise relative error ||analytic - numeric|| / ||numeric|| <= 1e-6.

mod common;

use common::random_vec;
use emprior::nn::attention::SelfAttention;
use emprior::nn::blocks::{AttBlock, ResBlock};
use emprior::nn::Weights;
use emprior::nn::{resample, Conv3x3, Linear, Mode, ParamLayout};
use emprior::ops::Philox;
use emprior::tensor::numel;
use emprior::{AsView, AsViewMut, DType, Device, Tensor};

const CPU: Device = Device::Cpu;
const FD_STEP: f64 = 1e-5;
const REL_TOL: f64 = 1e-6;

fn t64(data: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_f64(data, shape, &CPU).unwrap()
}

fn rand64(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    random_vec(seed, n, -1.0, 1.0)
        .iter()
        .map(|&v| v as f64 * scale)
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compares `analytic` (the gradient of <u, f(x)> at x0) with central differences of that
/// scalar, coordinate by coordinate (at most `max_coords`, spread over the vector).
fn check_gradient(
    what: &str,
    x0: &[f64],
    analytic: &[f64],
    mut scalar: impl FnMut(&[f64]) -> f64,
    max_coords: usize,
) {
    assert_eq!(x0.len(), analytic.len(), "{what}: gradient length");
    let stride = x0.len().div_ceil(max_coords).max(1);
    let (mut num2, mut diff2) = (0.0f64, 0.0f64);
    let mut x = x0.to_vec();
    let mut worst = (0usize, 0.0f64, 0.0f64);
    for i in (0..x0.len()).step_by(stride) {
        x[i] = x0[i] + FD_STEP;
        let plus = scalar(&x);
        x[i] = x0[i] - FD_STEP;
        let minus = scalar(&x);
        x[i] = x0[i];
        let numeric = (plus - minus) / (2.0 * FD_STEP);
        num2 += numeric * numeric;
        diff2 += (numeric - analytic[i]).powi(2);
        if (numeric - analytic[i]).abs() > (worst.1 - worst.2).abs() {
            worst = (i, analytic[i], numeric);
        }
    }
    let rel = diff2.sqrt() / num2.sqrt().max(1e-300);
    println!(
        "{what}: relative error {rel:.2e} over {} coordinates",
        x0.len().div_ceil(stride)
    );
    assert!(
        rel <= REL_TOL,
        "{what}: relative error {rel:.3e} > {REL_TOL:e}; worst at [{}]: analytic {} numeric {}",
        worst.0,
        worst.1,
        worst.2
    );
}

/// forward(layout, params, x) -> y
type ForwardFn<'a> = &'a dyn Fn(&ParamLayout, &[f64], &[f64]) -> Vec<f64>;
/// backward(layout, params, x, dy, grads) -> dx, accumulating parameter gradients into grads
type BackwardFn<'a> = &'a dyn Fn(&ParamLayout, &[f64], &[f64], &[f64], Option<&mut [f64]>) -> Vec<f64>;

/// A layer under test.
struct Harness<'a> {
    layout: &'a ParamLayout,
    x_shape: Vec<usize>,
    forward: ForwardFn<'a>,
    backward: BackwardFn<'a>,
}

impl Harness<'_> {
    /// Checks the input gradient, the VJP (backward without parameter gradients, which must
    /// give the same dx), and the parameter gradient.
    fn check(&self, what: &str, seed: u64) {
        let params = {
            let p = self.layout.init(seed, DType::F64, &CPU).unwrap();
            // Perturb the zero biases too, so their gradients matter in the check.
            let mut v = p.to_vec_f64().unwrap();
            let noise = rand64(seed + 1, v.len(), 0.05);
            v.iter_mut().zip(noise).for_each(|(a, b)| *a += b);
            v
        };
        let x = rand64(seed + 2, numel(&self.x_shape), 1.0);
        let y = (self.forward)(self.layout, &params, &x);
        let u = rand64(seed + 3, y.len(), 1.0);
        let mut grads = vec![0.0; params.len()];
        let dx = (self.backward)(self.layout, &params, &x, &u, Some(&mut grads));
        let dx_vjp = (self.backward)(self.layout, &params, &x, &u, None);
        assert_eq!(
            dx, dx_vjp,
            "{what}: the VJP must equal the backward's input gradient"
        );
        check_gradient(
            &format!("{what} dx"),
            &x,
            &dx,
            |xp| dot(&u, &(self.forward)(self.layout, &params, xp)),
            400,
        );
        if !params.is_empty() {
            check_gradient(
                &format!("{what} dparams"),
                &params,
                &grads,
                |pp| dot(&u, &(self.forward)(self.layout, pp, &x)),
                400,
            );
        }
    }
}

#[test]
fn linear_gradients() {
    for bias in [true, false] {
        let mut layout = ParamLayout::new();
        let lin = Linear::new(&mut layout, "lin", 7, 5, bias);
        let shape = vec![2, 3, 7];
        let fwd = |l: &ParamLayout, p: &[f64], x: &[f64]| {
            let (pt, xt) = (t64(p, &[p.len()]), t64(x, &[2, 3, 7]));
            lin.forward(l, &pt.as_view().unwrap().into(), &xt.as_view().unwrap())
                .unwrap()
                .to_vec_f64()
                .unwrap()
        };
        let bwd = |l: &ParamLayout, p: &[f64], x: &[f64], dy: &[f64], g: Option<&mut [f64]>| {
            let (pt, xt, dyt) = (t64(p, &[p.len()]), t64(x, &[2, 3, 7]), t64(dy, &[2, 3, 5]));
            with_grads(g, |gv| {
                let (pv, xv, dv) = (
                    pt.as_view().unwrap(),
                    xt.as_view().unwrap(),
                    dyt.as_view().unwrap(),
                );
                lin.backward(l, &Weights::from(&pv), &xv, &dv, gv).unwrap()
            })
        };
        Harness {
            layout: &layout,
            x_shape: shape,
            forward: &fwd,
            backward: &bwd,
        }
        .check(&format!("linear bias={bias}"), 11);
    }
}

#[test]
fn conv3x3_gradients() {
    for (stride, h, w) in [(1usize, 5usize, 4usize), (2, 6, 6), (2, 5, 7)] {
        let (cin, cout, n) = (3, 4, 2);
        let mut layout = ParamLayout::new();
        let conv = Conv3x3::new(&mut layout, "conv", cin, cout, stride);
        let x_shape = vec![n, h, w, cin];
        let y_shape = conv.out_shape(&x_shape).unwrap();
        let fwd = |l: &ParamLayout, p: &[f64], x: &[f64]| {
            let (pt, xt) = (t64(p, &[p.len()]), t64(x, &x_shape));
            conv.forward(l, &pt.as_view().unwrap().into(), &xt.as_view().unwrap())
                .unwrap()
                .to_vec_f64()
                .unwrap()
        };
        let bwd = |l: &ParamLayout, p: &[f64], x: &[f64], dy: &[f64], g: Option<&mut [f64]>| {
            let (pt, xt, dyt) = (t64(p, &[p.len()]), t64(x, &x_shape), t64(dy, &y_shape));
            with_grads(g, |gv| {
                let (pv, xv, dv) = (
                    pt.as_view().unwrap(),
                    xt.as_view().unwrap(),
                    dyt.as_view().unwrap(),
                );
                conv.backward(l, &Weights::from(&pv), &xv, &dv, gv).unwrap()
            })
        };
        Harness {
            layout: &layout,
            x_shape: x_shape.clone(),
            forward: &fwd,
            backward: &bwd,
        }
        .check(&format!("conv3x3 stride {stride} {h}x{w}"), 21);
    }
}

#[test]
fn layer_norm_gradients() {
    let layout = ParamLayout::new();
    let shape = vec![3, 2, 9];
    let fwd = |_: &ParamLayout, _: &[f64], x: &[f64]| {
        let xt = t64(x, &[3, 2, 9]);
        emprior::nn::norm::layer_norm(&xt.as_view().unwrap())
            .unwrap()
            .y
            .to_vec_f64()
            .unwrap()
    };
    let bwd = |_: &ParamLayout, _: &[f64], x: &[f64], dy: &[f64], _: Option<&mut [f64]>| {
        let xt = t64(x, &[3, 2, 9]);
        let saved = emprior::nn::norm::layer_norm(&xt.as_view().unwrap()).unwrap();
        let dyt = t64(dy, &[3, 2, 9]);
        emprior::nn::norm::layer_norm_backward(&saved, &dyt.as_view().unwrap())
            .unwrap()
            .to_vec_f64()
            .unwrap()
    };
    Harness {
        layout: &layout,
        x_shape: shape,
        forward: &fwd,
        backward: &bwd,
    }
    .check("layer_norm", 31);
}

#[test]
fn fused_silu_layer_norm_gradients() {
    let layout = ParamLayout::new();
    let shape = vec![4, 11];
    let fwd = |_: &ParamLayout, _: &[f64], z: &[f64]| {
        let zt = t64(z, &[4, 11]);
        emprior::nn::norm::silu_layer_norm(&zt.as_view().unwrap())
            .unwrap()
            .y
            .to_vec_f64()
            .unwrap()
    };
    let bwd = |_: &ParamLayout, _: &[f64], z: &[f64], dy: &[f64], _: Option<&mut [f64]>| {
        let zt = t64(z, &[4, 11]);
        let zv = zt.as_view().unwrap();
        let saved = emprior::nn::norm::silu_layer_norm(&zv).unwrap();
        let dyt = t64(dy, &[4, 11]);
        emprior::nn::norm::silu_layer_norm_backward(&zv, &saved, &dyt.as_view().unwrap())
            .unwrap()
            .to_vec_f64()
            .unwrap()
    };
    Harness {
        layout: &layout,
        x_shape: shape,
        forward: &fwd,
        backward: &bwd,
    }
    .check("silu_layer_norm", 37);
}

/// Runs a layer's backward with an optional f64 gradient buffer, copying the gradients back.
fn with_grads(g: Option<&mut [f64]>, f: impl FnOnce(Option<&mut emprior::ViewMut>) -> Tensor) -> Vec<f64> {
    let mut gt = g.as_ref().map(|g| t64(g, &[g.len()]));
    let dx = {
        let mut gv = gt.as_mut().map(|t| t.as_view_mut().unwrap());
        f(gv.as_mut())
    };
    if let (Some(g), Some(gt)) = (g, gt) {
        g.copy_from_slice(&gt.to_vec_f64().unwrap());
    }
    dx.to_vec_f64().unwrap()
}

#[test]
fn res_block_gradients() {
    // Dropout on (training mode): the mask comes from Philox counters, so the finite differences
    // see the same mask at every evaluation.
    for (mode, label) in [
        (Mode::Eval, "eval"),
        (
            Mode::Train {
                rng: Philox::new(5, 9),
                first_row: 0,
            },
            "train p=0.3",
        ),
    ] {
        let (n, h, w, c, e) = (2, 4, 3, 4, 6);
        let mut layout = ParamLayout::new();
        let block = ResBlock::new(&mut layout, "res", c, e, if label == "eval" { 0.0 } else { 0.3 });
        let emb = t64(&rand64(99, n * e, 1.0), &[n, e]);
        let x_shape = vec![n, h, w, c];
        let fwd = |l: &ParamLayout, p: &[f64], x: &[f64]| {
            let pt = t64(p, &[p.len()]);
            let (y, _) = block
                .forward(
                    l,
                    &pt.as_view().unwrap().into(),
                    t64(x, &x_shape),
                    &emb.as_view().unwrap(),
                    mode,
                    17,
                )
                .unwrap();
            y.to_vec_f64().unwrap()
        };
        let bwd = |l: &ParamLayout, p: &[f64], x: &[f64], dy: &[f64], g: Option<&mut [f64]>| {
            let pt = t64(p, &[p.len()]);
            let pv = pt.as_view().unwrap();
            let ev = emb.as_view().unwrap();
            let (_, saved) = block
                .forward(l, &Weights::from(&pv), t64(x, &x_shape), &ev, mode, 17)
                .unwrap();
            let dyt = t64(dy, &x_shape);
            with_grads(g, |gv| {
                block
                    .backward(l, &Weights::from(&pv), &ev, &saved, &dyt.as_view().unwrap(), gv)
                    .unwrap()
            })
        };
        Harness {
            layout: &layout,
            x_shape: x_shape.clone(),
            forward: &fwd,
            backward: &bwd,
        }
        .check(&format!("res_block {label}"), 41);
    }
}

#[test]
fn attention_and_att_block_gradients() {
    let (n, h, w, c, heads, e) = (2, 3, 2, 6, 2, 4);
    let x_shape = vec![n, h, w, c];
    let mut layout = ParamLayout::new();
    let attn = SelfAttention::new(&mut layout, "attn", c, heads);
    let fwd = |l: &ParamLayout, p: &[f64], x: &[f64]| {
        let (pt, xt) = (t64(p, &[p.len()]), t64(x, &x_shape));
        attn.forward(l, &pt.as_view().unwrap().into(), &xt.as_view().unwrap())
            .unwrap()
            .0
            .to_vec_f64()
            .unwrap()
    };
    let bwd = |l: &ParamLayout, p: &[f64], x: &[f64], dy: &[f64], g: Option<&mut [f64]>| {
        let (pt, xt, dyt) = (t64(p, &[p.len()]), t64(x, &x_shape), t64(dy, &x_shape));
        let pv = pt.as_view().unwrap();
        let (_, saved) = attn
            .forward(l, &Weights::from(&pv), &xt.as_view().unwrap())
            .unwrap();
        with_grads(g, |gv| {
            attn.backward(l, &Weights::from(&pv), &saved, &dyt.as_view().unwrap(), gv)
                .unwrap()
        })
    };
    Harness {
        layout: &layout,
        x_shape: x_shape.clone(),
        forward: &fwd,
        backward: &bwd,
    }
    .check("self_attention", 51);

    let mut layout = ParamLayout::new();
    let block = AttBlock::new(&mut layout, "att", c, heads, e);
    let emb = t64(&rand64(98, n * e, 1.0), &[n, e]);
    let fwd = |l: &ParamLayout, p: &[f64], x: &[f64]| {
        let pt = t64(p, &[p.len()]);
        let (y, _) = block
            .forward(
                l,
                &pt.as_view().unwrap().into(),
                t64(x, &x_shape),
                &emb.as_view().unwrap(),
            )
            .unwrap();
        y.to_vec_f64().unwrap()
    };
    let bwd = |l: &ParamLayout, p: &[f64], x: &[f64], dy: &[f64], g: Option<&mut [f64]>| {
        let pt = t64(p, &[p.len()]);
        let (pv, ev) = (pt.as_view().unwrap(), emb.as_view().unwrap());
        let (_, saved) = block
            .forward(l, &Weights::from(&pv), t64(x, &x_shape), &ev)
            .unwrap();
        let dyt = t64(dy, &x_shape);
        with_grads(g, |gv| {
            block
                .backward(l, &Weights::from(&pv), &ev, &saved, &dyt.as_view().unwrap(), gv)
                .unwrap()
        })
    };
    Harness {
        layout: &layout,
        x_shape: x_shape.clone(),
        forward: &fwd,
        backward: &bwd,
    }
    .check("att_block", 61);
}

/// Linear maps without parameters: the adjoint identity <u, A x> = <A^T u, x> on random vectors
/// (exact up to rounding, so much tighter than finite differences need).
fn check_adjoint(
    what: &str,
    x_shape: &[usize],
    fwd: impl Fn(&Tensor) -> Tensor,
    adj: impl Fn(&Tensor) -> Tensor,
) {
    let x = t64(&rand64(7, numel(x_shape), 1.0), x_shape);
    let y = fwd(&x);
    let u = t64(&rand64(8, y.numel(), 1.0), y.shape());
    let at_u = adj(&u);
    assert_eq!(at_u.shape(), x_shape, "{what}: adjoint shape");
    let lhs = dot(&u.to_vec_f64().unwrap(), &y.to_vec_f64().unwrap());
    let rhs = dot(&at_u.to_vec_f64().unwrap(), &x.to_vec_f64().unwrap());
    assert!(
        (lhs - rhs).abs() <= 1e-12 * lhs.abs().max(1.0),
        "{what}: <u, Ax> = {lhs} but <A^T u, x> = {rhs}"
    );
}

#[test]
fn resampling_maps_and_their_adjoints() {
    check_adjoint(
        "upsample2x",
        &[2, 3, 5, 4],
        |x| resample::upsample2x(&x.as_view().unwrap()).unwrap(),
        |u| resample::upsample2x_backward(&u.as_view().unwrap()).unwrap(),
    );
    // Concatenation with a fixed b is affine in x; with b = 0 it is linear and split is its adjoint.
    let b = t64(&[0.0; 2 * 3 * 5 * 2], &[2, 3, 5, 2]);
    check_adjoint(
        "concat_channels",
        &[2, 3, 5, 4],
        |x| resample::concat_channels(&x.as_view().unwrap(), &b.as_view().unwrap()).unwrap(),
        |u| resample::split_channels(&u.as_view().unwrap(), 4).unwrap().0,
    );
    check_adjoint(
        "pixel_unshuffle 4x4",
        &[2, 8, 12, 3],
        |x| resample::pixel_unshuffle(&x.as_view().unwrap(), 4).unwrap(),
        |u| resample::pixel_shuffle(&u.as_view().unwrap(), 4).unwrap(),
    );
    // Unshuffle then shuffle is the identity, and the layout is einops' (H h)(W w)C -> H W (h w C).
    let x = t64(
        &(0..2 * 8 * 8 * 2).map(|v| v as f64).collect::<Vec<_>>(),
        &[2, 8, 8, 2],
    );
    let u = resample::pixel_unshuffle(&x.as_view().unwrap(), 4).unwrap();
    assert_eq!(u.shape(), &[2, 2, 2, 32]);
    let uv = u.to_vec_f64().unwrap();
    // Output pixel (0, 0, 1), sub-pixel (h=1, w=2), channel 1 is input pixel (1, 4 + 2), channel 1.
    assert_eq!(uv[32 + (4 + 2) * 2 + 1], ((8 + 6) * 2 + 1) as f64);
    let back = resample::pixel_shuffle(&u.as_view().unwrap(), 4).unwrap();
    assert_eq!(back.to_vec_f64().unwrap(), x.to_vec_f64().unwrap());
    let up = resample::upsample2x(&x.as_view().unwrap())
        .unwrap()
        .to_vec_f64()
        .unwrap();
    assert_eq!(
        up[((16 + 3) * 16 + 5) * 2 + 1],
        x.to_vec_f64().unwrap()[((8 + 1) * 8 + 2) * 2 + 1]
    );
}

#[test]
fn dropout_is_inverted_reproducible_and_self_adjoint() {
    use emprior::nn::dropout::{dropout, DropoutMask};
    let mask = DropoutMask {
        rng: Philox::new(3, 4),
        offset: 1000,
        p: 0.25,
    };
    let n = 40_000;
    let x = Tensor::full(&[n], 1.0, &CPU).unwrap();
    let y = dropout(&x.as_view().unwrap(), &mask)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
    assert!((kept - 0.75).abs() < 0.01, "kept fraction {kept}");
    assert!(
        y.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6),
        "kept values scaled by 1/(1-p)"
    );
    let mean = y.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    assert!(
        (mean - 1.0).abs() < 0.02,
        "inverted dropout keeps the mean: {mean}"
    );
    assert_eq!(
        y,
        dropout(&x.as_view().unwrap(), &mask)
            .unwrap()
            .to_vec_f32()
            .unwrap(),
        "same counters, same mask"
    );
    check_adjoint(
        "dropout",
        &[3, 50],
        |v| dropout(&v.as_view().unwrap(), &mask).unwrap(),
        |u| dropout(&u.as_view().unwrap(), &mask).unwrap(),
    );
}

#[test]
fn time_mlp_gradients() {
    use emprior::nn::TimeMlp;
    let mlp = TimeMlp::new(3, &[8, 7], 4);
    let (n, f, e) = (5, 3, 4);
    let emb = t64(&rand64(97, n * e, 1.0), &[n, e]);
    let x_shape = vec![n, f];
    let fwd = |_: &ParamLayout, p: &[f64], x: &[f64]| {
        let (pt, xt) = (t64(p, &[p.len()]), t64(x, &x_shape));
        mlp.forward(
            &pt.as_view().unwrap().into(),
            &xt.as_view().unwrap(),
            &emb.as_view().unwrap(),
        )
        .unwrap()
        .0
        .to_vec_f64()
        .unwrap()
    };
    let bwd = |_: &ParamLayout, p: &[f64], x: &[f64], dy: &[f64], g: Option<&mut [f64]>| {
        let (pt, xt, dyt) = (t64(p, &[p.len()]), t64(x, &x_shape), t64(dy, &x_shape));
        let pv = pt.as_view().unwrap();
        let (_, saved) = mlp
            .forward(
                &Weights::from(&pv),
                &xt.as_view().unwrap(),
                &emb.as_view().unwrap(),
            )
            .unwrap();
        with_grads(g, |gv| {
            mlp.backward(&Weights::from(&pv), &saved, &dyt.as_view().unwrap(), gv)
                .unwrap()
        })
    };
    Harness {
        layout: &mlp.layout,
        x_shape: x_shape.clone(),
        forward: &fwd,
        backward: &bwd,
    }
    .check("time_mlp", 71);
}

#[test]
fn small_unet_gradients() {
    use emprior::nn::{UNet, UNetConfig};
    // Two levels with attention at the deeper one; then three levels with a 2x2 patchify and
    // dropout on, which exercises the pixel (un)shuffle, the merge convolutions and the skips.
    let configs = [
        (
            UNetConfig {
                in_channels: 2,
                out_channels: 2,
                channels: vec![4, 6],
                blocks: vec![1, 1],
                attention: vec![(1, 2)],
                emb: 4,
                dropout: 0.0,
                patch: 1,
                resolution: (4, 4),
            },
            Mode::Eval,
        ),
        (
            UNetConfig {
                in_channels: 1,
                out_channels: 1,
                channels: vec![4, 4, 6],
                blocks: vec![1, 2, 1],
                attention: vec![(0, 2), (2, 3)],
                emb: 6,
                dropout: 0.2,
                patch: 2,
                resolution: (8, 8),
            },
            Mode::Train {
                rng: Philox::new(8, 1),
                first_row: 0,
            },
        ),
    ];
    for (k, (cfg, mode)) in configs.into_iter().enumerate() {
        let unet = UNet::new(cfg.clone()).unwrap();
        let n = 2;
        let x_shape = vec![n, cfg.resolution.0, cfg.resolution.1, cfg.in_channels];
        let emb = t64(&rand64(96, n * cfg.emb, 1.0), &[n, cfg.emb]);
        let fwd = |_: &ParamLayout, p: &[f64], x: &[f64]| {
            let (pt, xt) = (t64(p, &[p.len()]), t64(x, &x_shape));
            unet.forward(
                &pt.as_view().unwrap().into(),
                &xt.as_view().unwrap(),
                &emb.as_view().unwrap(),
                mode,
            )
            .unwrap()
            .0
            .to_vec_f64()
            .unwrap()
        };
        let bwd = |_: &ParamLayout, p: &[f64], x: &[f64], dy: &[f64], g: Option<&mut [f64]>| {
            let (pt, xt) = (t64(p, &[p.len()]), t64(x, &x_shape));
            let (pv, ev) = (pt.as_view().unwrap(), emb.as_view().unwrap());
            let (y, saved) = unet
                .forward(&Weights::from(&pv), &xt.as_view().unwrap(), &ev, mode)
                .unwrap();
            let dyt = t64(dy, y.shape());
            with_grads(g, |gv| {
                unet.backward(&Weights::from(&pv), &ev, &saved, &dyt.as_view().unwrap(), gv)
                    .unwrap()
            })
        };
        Harness {
            layout: &unet.layout,
            x_shape: x_shape.clone(),
            forward: &fwd,
            backward: &bwd,
        }
        .check(&format!("unet config {k}"), 81 + k as u64);
    }
}

#[test]
fn preconditioned_denoiser_vjp_and_parameter_gradient() {
    use emprior::diffusion::{Denoiser, Network};
    use emprior::nn::{TimeMlp, UNet, UNetConfig};
    let unet_cfg = UNetConfig {
        in_channels: 1,
        out_channels: 1,
        channels: vec![4, 6],
        blocks: vec![1, 1],
        attention: vec![(1, 2)],
        emb: 4,
        dropout: 0.0,
        patch: 1,
        resolution: (4, 4),
    };
    let nets = [
        ("mlp", Network::Mlp(TimeMlp::new(3, &[8, 8], 6)), vec![3usize, 3]),
        (
            "unet",
            Network::UNet(UNet::new(unet_cfg).unwrap()),
            vec![3usize, 4, 4, 1],
        ),
    ];
    // One sigma per sample, across the schedule's range.
    let sigmas = [0.01, 0.7, 30.0];
    for (name, net, x_shape) in nets {
        let den = Denoiser::new(net);
        let fwd = |_: &ParamLayout, p: &[f64], x: &[f64]| {
            let (pt, xt) = (t64(p, &[p.len()]), t64(x, &x_shape));
            den.denoise(
                &pt.as_view().unwrap().into(),
                &xt.as_view().unwrap(),
                &sigmas,
                Mode::Eval,
            )
            .unwrap()
            .0
            .to_vec_f64()
            .unwrap()
        };
        let bwd = |_: &ParamLayout, p: &[f64], x: &[f64], dy: &[f64], g: Option<&mut [f64]>| {
            let (pt, xt, ut) = (t64(p, &[p.len()]), t64(x, &x_shape), t64(dy, &x_shape));
            let pv = pt.as_view().unwrap();
            let (_, saved) = den
                .denoise(&Weights::from(&pv), &xt.as_view().unwrap(), &sigmas, Mode::Eval)
                .unwrap();
            with_grads(g, |gv| {
                den.backward(&Weights::from(&pv), &saved, &ut.as_view().unwrap(), gv)
                    .unwrap()
            })
        };
        Harness {
            layout: den.layout(),
            x_shape: x_shape.clone(),
            forward: &fwd,
            backward: &bwd,
        }
        .check(&format!("denoiser {name}"), 91);

        // Many VJPs against one forward give what fresh forwards give.
        let p = den.layout().init(5, DType::F64, &CPU).unwrap();
        let x = t64(&rand64(6, numel(&x_shape), 1.0), &x_shape);
        let (_, saved) = den
            .denoise(
                &p.as_view().unwrap().into(),
                &x.as_view().unwrap(),
                &sigmas,
                Mode::Eval,
            )
            .unwrap();
        for k in 0..3 {
            let u = t64(&rand64(10 + k, numel(&x_shape), 1.0), &x_shape);
            let reused = den
                .vjp(&p.as_view().unwrap().into(), &saved, &u.as_view().unwrap())
                .unwrap()
                .to_vec_f64()
                .unwrap();
            let (_, fresh) = den
                .denoise(
                    &p.as_view().unwrap().into(),
                    &x.as_view().unwrap(),
                    &sigmas,
                    Mode::Eval,
                )
                .unwrap();
            let again = den
                .vjp(&p.as_view().unwrap().into(), &fresh, &u.as_view().unwrap())
                .unwrap()
                .to_vec_f64()
                .unwrap();
            assert_eq!(reused, again, "{name}: VJP {k} against saved activations");
        }
    }
}

#[test]
fn denoiser_tends_to_identity_at_small_sigma_and_checks_inputs() {
    use emprior::diffusion::{Denoiser, Network};
    use emprior::nn::TimeMlp;
    let den = Denoiser::new(Network::Mlp(TimeMlp::new(2, &[8], 4)));
    let p = den.layout().init(1, DType::F64, &CPU).unwrap();
    let x = t64(&rand64(2, 4, 1.0), &[2, 2]);
    let (y, _) = den
        .denoise(
            &p.as_view().unwrap().into(),
            &x.as_view().unwrap(),
            &[1e-6, 1e-6],
            Mode::Eval,
        )
        .unwrap();
    for (a, b) in y.to_vec_f64().unwrap().iter().zip(x.to_vec_f64().unwrap()) {
        assert!((a - b).abs() < 1e-5, "c_skip -> 1 and c_out -> 0 as sigma -> 0");
    }
    let err = den
        .denoise(
            &p.as_view().unwrap().into(),
            &x.as_view().unwrap(),
            &[1.0],
            Mode::Eval,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("sigmas"), "{err}");
    let err = den
        .denoise(
            &p.as_view().unwrap().into(),
            &x.as_view().unwrap(),
            &[1.0, f64::NAN],
            Mode::Eval,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("NaN"), "{err}");
    let bad = t64(&[0.0; 6], &[2, 3]);
    let err = den
        .denoise(
            &p.as_view().unwrap().into(),
            &bad.as_view().unwrap(),
            &[1.0, 1.0],
            Mode::Eval,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("x_t") && err.contains("[2, 3]"), "{err}");
}
