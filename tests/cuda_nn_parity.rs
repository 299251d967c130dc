//! Tier 2 for the networks: every layer's CUDA forward, backward and VJP against the CPU oracle
//! (f32 on both), from the same host inputs, with gradient buffers and outputs poisoned where the
//! op writes a caller buffer; then the full CIFAR-10 U-Net's forward, VJP and parameter gradient
//! at batch 2. Errors are measured norm-wise: ||gpu - cpu|| / ||cpu||.
//! Without a GPU each test prints `skipped: GPU unavailable: <reason>`.

mod common;

use common::{gpu_or_skip, on, parity};
use emprior::diffusion::{Denoiser, Network};
use emprior::nn::attention::{softmax, softmax_backward, SelfAttention};
use emprior::nn::blocks::{modulate_backward, residual, residual_backward, AttBlock, ResBlock};
use emprior::nn::dropout::{dropout, DropoutMask};
use emprior::nn::embedding::sinusoidal_embedding;
use emprior::nn::norm::{layer_norm, layer_norm_backward, modulated_layer_norm};
use emprior::nn::{resample, Conv3x3, Linear, Mode, ParamLayout, UNet, UNetConfig};
use emprior::ops::broadcast::{add_bias, scale_rows_add_into, sum_rows_into};
use emprior::ops::Philox;
use emprior::{AsView, AsViewMut, DType, Device, Tensor};

const CPU: Device = Device::Cpu;

/// A gradient buffer of the layout's size, poisoned with NaN except that accumulation needs a
/// defined start: zeros.
fn grads(layout: &ParamLayout, dev: &Device) -> Tensor {
    Tensor::zeros(&[layout.len()], DType::F32, dev).unwrap()
}

#[test]
fn cuda_layers_match_cpu() {
    let Some(gpu) = gpu_or_skip("cuda_layers_match_cpu") else {
        return;
    };
    layers(&gpu);
}

#[test]
fn cuda_cifar10_unet_matches_cpu_at_batch_2() {
    let Some(gpu) = gpu_or_skip("cuda_cifar10_unet_matches_cpu_at_batch_2") else {
        return;
    };
    cifar10_unet(&gpu);
}

/// The GPU never runs where this is developed: run the same comparisons CPU against CPU, so the
/// harness itself (shapes, closures, tolerances) is exercised on every test run.
#[test]
fn parity_harness_runs_cpu_against_cpu() {
    layers(&CPU);
    cifar10_unet(&CPU);
}

fn layers(gpu: &Device) {
    let gpu = gpu.clone();
    let tol = 2e-6;

    let mut layout = ParamLayout::new();
    let lin = Linear::new(&mut layout, "lin", 67, 130, true);
    parity("linear", &gpu, tol, |d| {
        let p = layout.init(1, DType::F32, &CPU).unwrap().to_device(d).unwrap();
        let x = on(d, 2, &[3, 37, 67], 1.0);
        let dy = on(d, 3, &[3, 37, 130], 1.0);
        let pv = p.as_view().unwrap();
        let y = lin.forward(&layout, &pv, &x.as_view().unwrap()).unwrap();
        let mut g = grads(&layout, d);
        let dx = lin
            .backward(
                &layout,
                &pv,
                &x.as_view().unwrap(),
                &dy.as_view().unwrap(),
                Some(&mut g.as_view_mut().unwrap()),
            )
            .unwrap();
        vec![y, dx, g]
    });

    for (stride, h, w, cin, cout) in [
        (1, 9, 7, 5, 6),
        (2, 16, 16, 8, 12),
        (2, 7, 9, 3, 4),
        (1, 32, 32, 128, 128),
    ] {
        let mut layout = ParamLayout::new();
        let conv = Conv3x3::new(&mut layout, "conv", cin, cout, stride);
        parity(
            &format!("conv3x3 s{stride} {h}x{w}x{cin}->{cout}"),
            &gpu,
            1e-5,
            |d| {
                let p = layout.init(4, DType::F32, &CPU).unwrap().to_device(d).unwrap();
                let x = on(d, 5, &[2, h, w, cin], 1.0);
                let pv = p.as_view().unwrap();
                let y = conv.forward(&layout, &pv, &x.as_view().unwrap()).unwrap();
                let dy = on(d, 6, y.shape(), 1.0);
                let mut g = grads(&layout, d);
                let dx = conv
                    .backward(
                        &layout,
                        &pv,
                        &x.as_view().unwrap(),
                        &dy.as_view().unwrap(),
                        Some(&mut g.as_view_mut().unwrap()),
                    )
                    .unwrap();
                vec![y, dx, g]
            },
        );
    }

    parity("layer_norm", &gpu, tol, |d| {
        let x = on(d, 7, &[5, 33, 384], 3.0);
        let saved = layer_norm(&x.as_view().unwrap()).unwrap();
        let dy = on(d, 8, &[5, 33, 384], 1.0);
        let dx = layer_norm_backward(&saved, &dy.as_view().unwrap()).unwrap();
        vec![saved.y, saved.rstd, dx]
    });

    parity("modulated LayerNorm and residual", &gpu, tol, |d| {
        let (n, p, c) = (3, 70, 40);
        let x = on(d, 9, &[n, p, c], 1.0);
        let h = on(d, 10, &[n, p, c], 1.0);
        let m = on(d, 11, &[n, 3 * c], 0.5);
        let dy = on(d, 12, &[n, p, c], 1.0);
        let (xv, hv, mv, dv) = (
            x.as_view().unwrap(),
            h.as_view().unwrap(),
            m.as_view().unwrap(),
            dy.as_view().unwrap(),
        );
        let ln = modulated_layer_norm(&xv, &mv).unwrap();
        let r = residual(&xv, &hv, &mv).unwrap();
        let mut dm = Tensor::full(&[n, 3 * c], f32::NAN, d).unwrap();
        let (dxr, dhr) = residual_backward(&xv, &hv, &mv, &dv, &mut dm.as_view_mut().unwrap()).unwrap();
        let dxm = modulate_backward(&xv, &mv, &dv, &mut dm.as_view_mut().unwrap()).unwrap();
        vec![ln.y, ln.rstd, r, dxr, dhr, dxm, dm]
    });

    parity("softmax", &gpu, tol, |d| {
        let s = on(d, 13, &[8, 256, 256], 4.0);
        let p = softmax(&s.as_view().unwrap()).unwrap();
        let dp = on(d, 14, &[8, 256, 256], 1.0);
        let ds = softmax_backward(&p.as_view().unwrap(), &dp.as_view().unwrap()).unwrap();
        vec![p, ds]
    });

    parity("resampling", &gpu, 0.0, |d| {
        let x = on(d, 15, &[2, 10, 6, 5], 1.0);
        let xv = x.as_view().unwrap();
        let up = resample::upsample2x(&xv).unwrap();
        let down = resample::upsample2x_backward(&up.as_view().unwrap()).unwrap();
        let b = on(d, 16, &[2, 10, 6, 3], 1.0);
        let cat = resample::concat_channels(&xv, &b.as_view().unwrap()).unwrap();
        let (sa, sb) = resample::split_channels(&cat.as_view().unwrap(), 5).unwrap();
        let img = on(d, 17, &[2, 16, 12, 1], 1.0);
        let un = resample::pixel_unshuffle(&img.as_view().unwrap(), 4).unwrap();
        let sh = resample::pixel_shuffle(&un.as_view().unwrap(), 4).unwrap();
        vec![up, down, cat, sa, sb, un, sh]
    });

    parity("dropout", &gpu, 1e-7, |d| {
        let x = on(d, 18, &[3, 1001], 1.0);
        // p = 0.15: 1 / (1 - p) rounds differently in f32 and f64, so the scale must come from
        // the host.
        let mask = DropoutMask {
            rng: Philox::new(3, 7),
            offset: 5,
            p: 0.15,
        };
        vec![dropout(&x.as_view().unwrap(), &mask).unwrap()]
    });

    parity("embedding, bias, sums, per-sample scaling", &gpu, 1e-6, |d| {
        let c = Tensor::from_f32(&[-6.9, -1.0, 0.0, 2.3, 4.6], &[5], d).unwrap();
        let emb = sinusoidal_embedding(&c.as_view().unwrap(), 256).unwrap();
        let mut y = on(d, 19, &[7, 9, 33], 1.0);
        let b = on(d, 20, &[33], 1.0);
        add_bias(&mut y, &b).unwrap();
        let mut s = Tensor::full(&[7, 33], f32::NAN, d).unwrap();
        sum_rows_into(&y, 7, &mut s, false).unwrap();
        let alpha = on(d, 21, &[7], 1.0);
        let beta = on(d, 22, &[7], 1.0);
        let z = on(d, 23, &[7, 9, 33], 1.0);
        let mut out = Tensor::full(&[7, 9, 33], f32::NAN, d).unwrap();
        scale_rows_add_into(&y, &alpha, &z, &beta, &mut out).unwrap();
        vec![emb, y, s, out]
    });

    let mut layout = ParamLayout::new();
    let attn = SelfAttention::new(&mut layout, "attn", 64, 4);
    parity("self-attention", &gpu, 1e-5, |d| {
        let p = layout.init(24, DType::F32, &CPU).unwrap().to_device(d).unwrap();
        let pv = p.as_view().unwrap();
        let x = on(d, 25, &[2, 16, 16, 64], 1.0);
        let (y, saved) = attn.forward(&layout, &pv, &x.as_view().unwrap()).unwrap();
        let dy = on(d, 26, y.shape(), 1.0);
        let mut g = grads(&layout, d);
        let dx = attn
            .backward(
                &layout,
                &pv,
                &saved,
                &dy.as_view().unwrap(),
                Some(&mut g.as_view_mut().unwrap()),
            )
            .unwrap();
        vec![y, dx, g]
    });

    let mut layout = ParamLayout::new();
    let res = ResBlock::new(&mut layout, "res", 32, 16, 0.1);
    let att = AttBlock::new(&mut layout, "att", 32, 2, 16);
    parity("ResBlock (dropout on) + AttBlock", &gpu, 1e-5, |d| {
        let p = layout.init(27, DType::F32, &CPU).unwrap().to_device(d).unwrap();
        let pv = p.as_view().unwrap();
        let emb = on(d, 28, &[2, 16], 1.0);
        let ev = emb.as_view().unwrap();
        let x = on(d, 29, &[2, 8, 8, 32], 1.0);
        let mode = Mode::Train {
            rng: Philox::new(1, 2),
        };
        let (h, rs) = res.forward(&layout, &pv, x, &ev, mode, 0).unwrap();
        let (y, ats) = att.forward(&layout, &pv, h, &ev).unwrap();
        let dy = on(d, 30, y.shape(), 1.0);
        let mut g = grads(&layout, d);
        let mut gv = g.as_view_mut().unwrap();
        let dh = att
            .backward(&layout, &pv, &ev, &ats, &dy.as_view().unwrap(), Some(&mut gv))
            .unwrap();
        let dx = res
            .backward(&layout, &pv, &ev, &rs, &dh.as_view().unwrap(), Some(&mut gv))
            .unwrap();
        drop(gv);
        vec![y, dx, g]
    });
}

fn cifar10_unet(gpu: &Device) {
    let gpu = gpu.clone();
    let den = Denoiser::new(Network::UNet(UNet::new(UNetConfig::cifar10()).unwrap()));
    let sigmas = [0.05, 3.0];
    parity(
        "cifar10 U-Net: denoise, VJP, parameter gradient",
        &gpu,
        1e-4,
        |d| {
            let p = den
                .layout()
                .init(31, DType::F32, &CPU)
                .unwrap()
                .to_device(d)
                .unwrap();
            let pv = p.as_view().unwrap();
            let x = on(d, 32, &[2, 32, 32, 3], 2.0);
            let (y, saved) = den
                .denoise(&pv, &x.as_view().unwrap(), &sigmas, Mode::Eval)
                .unwrap();
            let u = on(d, 33, &[2, 32, 32, 3], 1.0);
            let vjp = den.vjp(&pv, &saved, &u.as_view().unwrap()).unwrap();
            let mut g = grads(den.layout(), d);
            let dx = den
                .backward(
                    &pv,
                    &saved,
                    &u.as_view().unwrap(),
                    Some(&mut g.as_view_mut().unwrap()),
                )
                .unwrap();
            vec![y, vjp, dx, g]
        },
    );
}
