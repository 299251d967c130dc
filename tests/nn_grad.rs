//! Tier 1 for the networks: every layer's backward (input and parameter gradients) and VJP, and
//! those of whole small networks, against central finite differences in f64. Tolerance: the
//! norm-wise relative error ||analytic - numeric|| / ||numeric|| <= 1e-6.

mod common;

use common::random_vec;
use emprior::nn::{Conv3x3, Linear, ParamLayout};
use emprior::tensor::numel;
use emprior::{AsView, AsViewMut, DType, Device, Tensor};

const CPU: Device = Device::Cpu;
const FD_STEP: f64 = 1e-5;
const REL_TOL: f64 = 1e-6;

fn t64(data: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_f64(data, shape, &CPU).unwrap()
}

fn rand64(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    random_vec(seed, n, -1.0, 1.0).iter().map(|&v| v as f64 * scale).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compares `analytic` (the gradient of <u, f(x)> at x0) with central differences of that
/// scalar, coordinate by coordinate (at most `max_coords`, spread over the vector).
fn check_gradient(what: &str, x0: &[f64], analytic: &[f64], mut scalar: impl FnMut(&[f64]) -> f64, max_coords: usize) {
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
    println!("{what}: relative error {rel:.2e} over {} coordinates", x0.len().div_ceil(stride));
    assert!(
        rel <= REL_TOL,
        "{what}: relative error {rel:.3e} > {REL_TOL:e}; worst at [{}]: analytic {} numeric {}",
        worst.0,
        worst.1,
        worst.2
    );
}

/// A layer under test: forward(params, x) -> y, backward(params, x, dy, grads) -> dx.
struct Harness<'a> {
    layout: &'a ParamLayout,
    x_shape: Vec<usize>,
    forward: &'a dyn Fn(&ParamLayout, &[f64], &[f64]) -> Vec<f64>,
    backward: &'a dyn Fn(&ParamLayout, &[f64], &[f64], &[f64], Option<&mut [f64]>) -> Vec<f64>,
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
        assert_eq!(dx, dx_vjp, "{what}: the VJP must equal the backward's input gradient");
        check_gradient(&format!("{what} dx"), &x, &dx, |xp| dot(&u, &(self.forward)(self.layout, &params, xp)), 400);
        if !params.is_empty() {
            check_gradient(&format!("{what} dparams"), &params, &grads, |pp| dot(&u, &(self.forward)(self.layout, pp, &x)), 400);
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
            lin.forward(l, &pt.as_view().unwrap(), &xt.as_view().unwrap()).unwrap().to_vec_f64().unwrap()
        };
        let bwd = |l: &ParamLayout, p: &[f64], x: &[f64], dy: &[f64], g: Option<&mut [f64]>| {
            let (pt, xt, dyt) = (t64(p, &[p.len()]), t64(x, &[2, 3, 7]), t64(dy, &[2, 3, 5]));
            let mut gt = g.as_ref().map(|g| t64(g, &[g.len()]));
            let dx = {
                let mut gv = gt.as_mut().map(|t| t.as_view_mut().unwrap());
                lin.backward(l, &pt.as_view().unwrap(), &xt.as_view().unwrap(), &dyt.as_view().unwrap(), gv.as_mut())
                    .unwrap()
            };
            if let (Some(g), Some(gt)) = (g, gt) {
                g.copy_from_slice(&gt.to_vec_f64().unwrap());
            }
            dx.to_vec_f64().unwrap()
        };
        Harness { layout: &layout, x_shape: shape, forward: &fwd, backward: &bwd }.check(&format!("linear bias={bias}"), 11);
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
            conv.forward(l, &pt.as_view().unwrap(), &xt.as_view().unwrap()).unwrap().to_vec_f64().unwrap()
        };
        let bwd = |l: &ParamLayout, p: &[f64], x: &[f64], dy: &[f64], g: Option<&mut [f64]>| {
            let (pt, xt, dyt) = (t64(p, &[p.len()]), t64(x, &x_shape), t64(dy, &y_shape));
            let mut gt = g.as_ref().map(|g| t64(g, &[g.len()]));
            let dx = {
                let mut gv = gt.as_mut().map(|t| t.as_view_mut().unwrap());
                conv.backward(l, &pt.as_view().unwrap(), &xt.as_view().unwrap(), &dyt.as_view().unwrap(), gv.as_mut())
                    .unwrap()
            };
            if let (Some(g), Some(gt)) = (g, gt) {
                g.copy_from_slice(&gt.to_vec_f64().unwrap());
            }
            dx.to_vec_f64().unwrap()
        };
        Harness { layout: &layout, x_shape: x_shape.clone(), forward: &fwd, backward: &bwd }
            .check(&format!("conv3x3 stride {stride} {h}x{w}"), 21);
    }
}

#[test]
fn layer_norm_gradients() {
    let layout = ParamLayout::new();
    let shape = vec![3, 2, 9];
    let fwd = |_: &ParamLayout, _: &[f64], x: &[f64]| {
        let xt = t64(x, &[3, 2, 9]);
        emprior::nn::norm::layer_norm(&xt.as_view().unwrap()).unwrap().y.to_vec_f64().unwrap()
    };
    let bwd = |_: &ParamLayout, _: &[f64], x: &[f64], dy: &[f64], _: Option<&mut [f64]>| {
        let xt = t64(x, &[3, 2, 9]);
        let saved = emprior::nn::norm::layer_norm(&xt.as_view().unwrap()).unwrap();
        let dyt = t64(dy, &[3, 2, 9]);
        emprior::nn::norm::layer_norm_backward(&saved, &dyt.as_view().unwrap()).unwrap().to_vec_f64().unwrap()
    };
    Harness { layout: &layout, x_shape: shape, forward: &fwd, backward: &bwd }.check("layer_norm", 31);
}
