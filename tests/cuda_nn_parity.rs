//! Tier 2 for the networks: every layer's CUDA forward, backward and VJP against the CPU oracle
//! (f32 on both), from the same host inputs, with gradient buffers and outputs poisoned where the
//! op writes a caller buffer; then the full CIFAR-10 U-Net at batch 8 (32x32) and a TimeMLP.
//! Every output is compared on its own and every parameter gradient tensor on its own, under its
//! name (see `common::compare_outputs` for the rule).
//!
//! Own harness (`common::Suite`): without a GPU the GPU trials are reported as ignored, and under
//! EMPRIOR_REQUIRE_GPU=1 they fail. The `harness::` trials check the comparison itself (a planted
//! error is caught and named) and run everywhere.

mod common;

use common::{
    case, compare_outputs, edited, on, parity, per_param, unravel, whole, Case, Output, Suite, Tol,
};
use emprior::diffusion::{Denoiser, Network};
use emprior::nn::attention::{softmax, softmax_backward, softmax_backward_kept, softmax_kept, SelfAttention};
use emprior::nn::blocks::{
    modulate_backward, modulate_backward_operand, residual, residual_backward, residual_backward_operand,
    residual_kept, residual_operand, AttBlock, ResBlock,
};
use emprior::nn::dropout::{dropout, silu_dropout, silu_dropout_backward, silu_dropout_to, DropoutMask};
use emprior::nn::embedding::sinusoidal_embedding;
use emprior::nn::norm::{
    layer_norm, layer_norm_backward, layer_norm_backward_operand, layer_norm_kept, modulated_layer_norm,
    modulated_layer_norm_kept, modulated_layer_norm_operand, silu_layer_norm, silu_layer_norm_backward,
};
use emprior::nn::resample::{permute_kept, upsample_concat_bf16};
use emprior::nn::Weights;
use emprior::nn::{resample, Conv3x3, Linear, Mode, ParamLayout, TimeMlp, UNet, UNetConfig};
use emprior::ops::broadcast::{add_bias, scale_rows_add_into, sum_rows_into};
use emprior::ops::elementwise::{silu_backward_operand, silu_operand};
use emprior::ops::precision::{to_bf16, to_f32, Bf16Ref, Operand, Precision};
use emprior::ops::Philox;
use emprior::{AsView, AsViewMut, DType, Device, Tensor};

const CPU: Device = Device::Cpu;

/// The U-Net's outputs and per-tensor gradients. f32 rounding alone (the f32 CPU run of the
/// batch-8 CIFAR-10 case against its f64 run) reaches 1.2e-6 norm-wise and 1.8e-5 elementwise
/// (relative to the bound's scale) in the worst tensors; the GPU adds its own rounding of the same
/// size. A bug moves a tensor by far more. `harness::unet_tolerance_admits_f32_rounding` keeps
/// the small U-Net's f32 rounding within a quarter of this on every run.
const UNET_TOL: f64 = 1e-4;
/// Norm-wise, GPU bf16 against the CPU's bf16 twins (see the case).
const UNET_BF16_TOL: f64 = 5e-3;

/// One sigma per sample, spread geometrically over the EDM range [0.002, 80]: per-sample
/// scalings must each pick their own.
fn sigmas(n: usize) -> Vec<f64> {
    let ratio: f64 = 80.0 / 0.002;
    (0..n)
        .map(|i| 0.002 * ratio.powf(i as f64 / (n.max(2) - 1) as f64))
        .collect()
}

/// The layers one by one, then whole networks.
const CASES: [Case; 16] = [
    case("layers::linear", "linear", Tol::norm(2e-6), linear_case),
    case(
        "layers::layer_norm",
        "layer_norm",
        Tol::norm(2e-6),
        layer_norm_case,
    ),
    case(
        "layers::silu_layer_norm_fused",
        "fused SiLU + LayerNorm",
        Tol::norm(2e-6),
        silu_layer_norm_case,
    ),
    case(
        "layers::modulated_layer_norm_and_residual",
        "modulated LayerNorm and residual",
        Tol::norm(2e-6),
        modulation_case,
    ),
    // The same maps reading activations kept in bf16 (GPU kernels that read bf16 themselves;
    // the CPU widens): the same f32 arithmetic on the same values.
    case(
        "layers::bf16_kept_inputs",
        "block maps on kept bf16 activations",
        Tol::norm(2e-6),
        kept_bf16_case,
    ),
    case("layers::softmax", "softmax", Tol::norm(2e-6), softmax_case),
    // Probabilities stored in bf16 and the in-place VJP from them: a probability's rounding may
    // flip by one bf16 unit where the two sides' f32 values straddle a rounding boundary (rare).
    case(
        "layers::softmax_bf16_kept",
        "softmax, bf16 probabilities",
        Tol::norm(1e-4),
        softmax_bf16_case,
    ),
    // conv2's input and the modulated LayerNorm stored in bf16 by their kernels: a value may
    // round one bf16 unit apart where the two sides' f32 values straddle a rounding boundary
    // (rare); a wrong mask, scale or statistic is off by far more.
    case(
        "layers::bf16_stored_outputs",
        "dropout(silu), the LayerNorms, the residual and the permutes stored in bf16",
        Tol {
            norm: 1e-3,
            elem: 4e-3,
        },
        bf16_stored_case,
    ),
    case("layers::resampling", "resampling", Tol::EXACT, resampling_case),
    case("layers::dropout", "dropout", Tol::norm(1e-7), dropout_case),
    case(
        "layers::embedding_bias_sums_row_scaling",
        "embedding, bias, sums, per-sample scaling",
        Tol::norm(1e-6),
        embedding_case,
    ),
    case(
        "layers::self_attention",
        "self-attention",
        Tol::norm(1e-5),
        attention_case,
    ),
    case(
        "layers::resblock_dropout_and_attblock",
        "ResBlock (dropout on) + AttBlock",
        Tol::norm(1e-5),
        blocks_case,
    ),
    case(
        "nets::cifar10_unet_batch8_32x32",
        "cifar10 U-Net b8 32x32",
        Tol::norm(UNET_TOL),
        |d| denoiser_case(d, &cifar10_unet(), DType::F32, &[8, 32, 32, 3]),
    ),
    // The bf16 policy: the GPU's tensor cores against the CPU twins, which multiply the same
    // bf16 operands; the f32 sums differ in order, so a bf16 rounding of an activation can flip
    // by one unit (2^-8) and carry on. An indexing bug in a tensor-core kernel gives O(1).
    case(
        "nets::cifar10_unet_bf16_batch8_32x32",
        "cifar10 U-Net bf16 b8 32x32",
        Tol::norm(UNET_BF16_TOL),
        // Batch 2 when the CPU stands in for the GPU (the device check's dry run in CI).
        |d| {
            let batch = if common::gpu_stand_in() { 2 } else { 8 };
            denoiser_case(d, &cifar10_unet_bf16(), DType::F32, &[batch, 32, 32, 3])
        },
    ),
    case("nets::timemlp_batch64", "TimeMLP b64", Tol::norm(1e-5), |d| {
        denoiser_case(d, &time_mlp(), DType::F32, &[64, 5])
    }),
];

fn main() {
    let mut s = Suite::from_args();
    s.gpu("layers::conv3x3", conv3x3);
    s.parity_cases(&CASES);
    s.cpu("harness::planted_gradient_error_is_named", planted_gradient_error);
    s.cpu("harness::planted_output_error_is_named", planted_output_error);
    s.cpu("harness::equal_outputs_pass", equal_outputs_pass);
    s.cpu("harness::nan_is_caught_on_either_side", nan_is_caught);
    s.cpu(
        "harness::diffuse_error_is_caught_norm_wise",
        diffuse_error_is_caught,
    );
    s.cpu(
        "harness::every_unet_parameter_is_compared",
        every_parameter_compared,
    );
    s.cpu(
        "harness::unet_tolerance_admits_f32_rounding",
        unet_tolerance_admits_f32_rounding,
    );
    s.run()
}

/// A gradient buffer of the layout's size: accumulation needs a defined start, zeros.
fn grads(layout: &ParamLayout, dev: &Device) -> Tensor {
    Tensor::zeros(&[layout.len()], DType::F32, dev).unwrap()
}

fn linear_case(d: &Device) -> Vec<Output> {
    let mut layout = ParamLayout::new();
    let lin = Linear::new(&mut layout, "lin", 67, 130, true);
    let p = layout.init(1, DType::F32, &CPU).unwrap().to_device(d).unwrap();
    let x = on(d, 2, &[3, 37, 67], 1.0);
    let dy = on(d, 3, &[3, 37, 130], 1.0);
    let pv = p.as_view().unwrap();
    let y = lin
        .forward(&layout, &Weights::from(&pv), &x.as_view().unwrap())
        .unwrap();
    let mut g = grads(&layout, d);
    let dx = lin
        .backward(
            &layout,
            &Weights::from(&pv),
            &x.as_view().unwrap(),
            &dy.as_view().unwrap(),
            Some(&mut g.as_view_mut().unwrap()),
        )
        .unwrap();
    vec![whole("y", y), whole("dx", dx), per_param("grads", g, &layout)]
}

fn conv3x3(gpu: &Device) {
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
            gpu,
            Tol::norm(1e-5),
            |d| {
                let p = layout.init(4, DType::F32, &CPU).unwrap().to_device(d).unwrap();
                let x = on(d, 5, &[2, h, w, cin], 1.0);
                let pv = p.as_view().unwrap();
                let y = conv
                    .forward(&layout, &Weights::from(&pv), &x.as_view().unwrap())
                    .unwrap();
                let dy = on(d, 6, y.shape(), 1.0);
                let mut g = grads(&layout, d);
                let dx = conv
                    .backward(
                        &layout,
                        &Weights::from(&pv),
                        &x.as_view().unwrap(),
                        &dy.as_view().unwrap(),
                        Some(&mut g.as_view_mut().unwrap()),
                    )
                    .unwrap();
                vec![whole("y", y), whole("dx", dx), per_param("grads", g, &layout)]
            },
        );
    }
}

fn layer_norm_case(d: &Device) -> Vec<Output> {
    let x = on(d, 7, &[5, 33, 384], 3.0);
    let saved = layer_norm(&x.as_view().unwrap()).unwrap();
    let dy = on(d, 8, &[5, 33, 384], 1.0);
    let dx = layer_norm_backward(&saved, &dy.as_view().unwrap()).unwrap();
    vec![whole("y", saved.y), whole("rstd", saved.rstd), whole("dx", dx)]
}

/// The TimeMLP's fused activation at its real shape (manifold E-step batch 8,192, width 256),
/// with pre-activations spread over SiLU's curved range.
fn silu_layer_norm_case(d: &Device) -> Vec<Output> {
    let z = on(d, 13, &[8192, 256], 4.0);
    let saved = silu_layer_norm(&z.as_view().unwrap()).unwrap();
    let dy = on(d, 14, &[8192, 256], 1.0);
    let dz = silu_layer_norm_backward(&z.as_view().unwrap(), &saved, &dy.as_view().unwrap()).unwrap();
    vec![whole("y", saved.y), whole("rstd", saved.rstd), whole("dz", dz)]
}

fn modulation_case(d: &Device) -> Vec<Output> {
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
    vec![
        whole("modulated y", ln.y),
        whole("rstd", ln.rstd),
        whole("residual", r),
        whole("residual dx", dxr),
        whole("residual dh", dhr),
        whole("modulate dx", dxm),
        whole("dmodulation", dm),
    ]
}

fn kept_bf16_case(d: &Device) -> Vec<Output> {
    let (n, p, c) = (3, 70, 40);
    let kept = |seed| to_bf16(&on(d, seed, &[n, p, c], 1.0)).unwrap();
    let (x, h, c1) = (kept(9), kept(10), kept(15));
    let m = on(d, 11, &[n, 3 * c], 0.5);
    let dy = on(d, 12, &[n, p, c], 1.0);
    let (xo, ho, c1o) = (
        Operand::of(&x).unwrap(),
        Operand::of(&h).unwrap(),
        Operand::of(&c1).unwrap(),
    );
    let (mv, dv) = (m.as_view().unwrap(), dy.as_view().unwrap());
    let ln = modulated_layer_norm_operand(&xo, &mv).unwrap();
    let y = to_bf16(&ln.y).unwrap();
    let dln =
        layer_norm_backward_operand(&Operand::of(&y).unwrap(), &ln.rstd.as_view().unwrap(), &dv).unwrap();
    let r = residual_operand(&xo, &ho, &mv).unwrap();
    let mut dm = Tensor::full(&[n, 3 * c], f32::NAN, d).unwrap();
    let (dxr, dhr) = residual_backward_operand(&xo, &ho, &mv, &dv, &mut dm.as_view_mut().unwrap()).unwrap();
    let dxm = modulate_backward_operand(&xo, &mv, &dv, &mut dm.as_view_mut().unwrap()).unwrap();
    let s = silu_operand(&c1o).unwrap();
    let ds = silu_backward_operand(&c1o, &dy).unwrap();
    // The ResBlock's conv2 input and its VJP, fused on a GPU (one kernel each, the VJP in place).
    let mask = DropoutMask {
        rng: Philox::new(5, 6),
        offset: 1 << 40,
        p: 0.1,
    };
    let sd = silu_dropout(&c1o, Some(&mask)).unwrap();
    let g = || on(d, 16, &[n, p, c], 1.0);
    let dsd = silu_dropout_backward(&c1o, g(), Some(&mask)).unwrap();
    let dsd0 = silu_dropout_backward(&c1o, g(), None).unwrap();
    // The merge input from kept values (copies: exact).
    let below = to_bf16(&on(d, 17, &[n, 5, 7, 16], 1.0)).unwrap();
    let skip = to_bf16(&on(d, 18, &[n, 10, 14, 8], 1.0)).unwrap();
    let cat = upsample_concat_bf16(&Bf16Ref::new(&below), &Bf16Ref::new(&skip)).unwrap();
    vec![
        whole("upsampled and concatenated (bf16)", to_f32(&cat).unwrap()),
        whole("dropout(silu)", sd),
        whole("dropout(silu) VJP", dsd),
        whole("silu VJP in place", dsd0),
        whole("modulated y", ln.y),
        whole("rstd", ln.rstd),
        whole("LayerNorm dx from bf16 y", dln),
        whole("residual", r),
        whole("residual dx", dxr),
        whole("residual dh", dhr),
        whole("modulate dx", dxm),
        whole("dmodulation", dm),
        whole("silu", s),
        whole("silu dx", ds),
    ]
}

fn bf16_stored_case(d: &Device) -> Vec<Output> {
    let c1 = to_bf16(&on(d, 19, &[4, 16, 16, 64], 3.0)).unwrap();
    let c1o = Operand::of(&c1).unwrap();
    let mask = DropoutMask {
        rng: Philox::new(7, 8),
        offset: 1 << 33,
        p: 0.1,
    };
    let with = silu_dropout_to(&c1o, Some(&mask), DType::BF16).unwrap();
    let without = silu_dropout_to(&c1o, None, DType::BF16).unwrap();
    assert_eq!((with.dtype(), without.dtype()), (DType::BF16, DType::BF16));
    let x = to_bf16(&on(d, 20, &[4, 64, 64], 2.0)).unwrap();
    let m = on(d, 21, &[4, 3 * 64], 0.5);
    let ln =
        modulated_layer_norm_kept(&Operand::of(&x).unwrap(), &m.as_view().unwrap(), Precision::Bf16).unwrap();
    assert_eq!(ln.y.dtype(), DType::BF16);
    let h = to_bf16(&on(d, 22, &[4, 64, 64], 1.0)).unwrap();
    let (xo, ho) = (Operand::of(&x).unwrap(), Operand::of(&h).unwrap());
    let out = residual_kept(&xo, &ho, &m.as_view().unwrap(), Precision::Bf16).unwrap();
    assert_eq!(out.dtype(), DType::BF16);
    // The attention's permutes that keep their output: from f32 (one rounding) and from bf16.
    let heads = on(d, 24, &[2, 4, 16, 24], 1.0);
    let perm = [0, 2, 1, 3];
    let from_f32 = permute_kept(&Operand::F32(heads.as_view().unwrap()), &perm, Precision::Bf16).unwrap();
    let hb = to_bf16(&heads).unwrap();
    let from_bf16 = permute_kept(&Operand::of(&hb).unwrap(), &perm, Precision::Bf16).unwrap();
    let z = on(d, 23, &[4, 64, 72], 2.0);
    let lnz = layer_norm_kept(&z.as_view().unwrap(), Precision::Bf16).unwrap();
    assert_eq!(lnz.y.dtype(), DType::BF16);
    vec![
        whole("dropout(silu) in bf16", to_f32(&with).unwrap()),
        whole("silu in bf16, no mask", to_f32(&without).unwrap()),
        whole("modulated LayerNorm in bf16", to_f32(&ln.y).unwrap()),
        whole("its 1/std", ln.rstd),
        whole("residual in bf16", to_f32(&out).unwrap()),
        whole("LayerNorm in bf16", to_f32(&lnz.y).unwrap()),
        whole("permute f32 -> bf16", to_f32(&from_f32).unwrap()),
        whole("permute bf16 -> bf16", to_f32(&from_bf16).unwrap()),
        whole("its 1/std", lnz.rstd),
    ]
}

fn softmax_case(d: &Device) -> Vec<Output> {
    let s = on(d, 13, &[8, 256, 256], 4.0);
    let p = softmax(&s.as_view().unwrap()).unwrap();
    let dp = on(d, 14, &[8, 256, 256], 1.0);
    let ds = softmax_backward(&p.as_view().unwrap(), &dp.as_view().unwrap()).unwrap();
    vec![whole("p", p), whole("ds", ds)]
}

fn softmax_bf16_case(d: &Device) -> Vec<Output> {
    let s = on(d, 13, &[8, 256, 256], 4.0);
    let p = softmax_kept(&s.as_view().unwrap(), Precision::Bf16).unwrap();
    assert_eq!(p.dtype(), DType::BF16);
    let dp = on(d, 14, &[8, 256, 256], 1.0);
    let ds = softmax_backward_kept(&Operand::of(&p).unwrap(), dp).unwrap();
    vec![whole("p (bf16)", to_f32(&p).unwrap()), whole("ds", ds)]
}

fn resampling_case(d: &Device) -> Vec<Output> {
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
    vec![
        whole("upsample2x", up),
        whole("upsample2x backward", down),
        whole("concat", cat),
        whole("split a", sa),
        whole("split b", sb),
        whole("pixel_unshuffle", un),
        whole("pixel_shuffle", sh),
    ]
}

fn dropout_case(d: &Device) -> Vec<Output> {
    let x = on(d, 18, &[3, 1001], 1.0);
    // p = 0.15: 1 / (1 - p) rounds differently in f32 and f64, so the scale must come from the host.
    let mask = DropoutMask {
        rng: Philox::new(3, 7),
        offset: 5,
        p: 0.15,
    };
    vec![whole("dropout", dropout(&x.as_view().unwrap(), &mask).unwrap())]
}

fn embedding_case(d: &Device) -> Vec<Output> {
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
    vec![
        whole("embedding", emb),
        whole("y + bias", y),
        whole("row sums", s),
        whole("scale_rows_add", out),
    ]
}

fn attention_case(d: &Device) -> Vec<Output> {
    let mut layout = ParamLayout::new();
    let attn = SelfAttention::new(&mut layout, "attn", 64, 4);
    let p = layout.init(24, DType::F32, &CPU).unwrap().to_device(d).unwrap();
    let pv = p.as_view().unwrap();
    let x = on(d, 25, &[2, 16, 16, 64], 1.0);
    let (y, saved) = attn
        .forward(&layout, &Weights::from(&pv), &x.as_view().unwrap())
        .unwrap();
    let dy = on(d, 26, y.shape(), 1.0);
    let mut g = grads(&layout, d);
    let dx = attn
        .backward(
            &layout,
            &Weights::from(&pv),
            &saved,
            &dy.as_view().unwrap(),
            Some(&mut g.as_view_mut().unwrap()),
        )
        .unwrap();
    vec![whole("y", y), whole("dx", dx), per_param("grads", g, &layout)]
}

fn blocks_case(d: &Device) -> Vec<Output> {
    let mut layout = ParamLayout::new();
    let res = ResBlock::new(&mut layout, "res", 32, 16, 0.1);
    let att = AttBlock::new(&mut layout, "att", 32, 2, 16);
    let p = layout.init(27, DType::F32, &CPU).unwrap().to_device(d).unwrap();
    let pv = p.as_view().unwrap();
    let emb = on(d, 28, &[2, 16], 1.0);
    let ev = emb.as_view().unwrap();
    let x = on(d, 29, &[2, 8, 8, 32], 1.0);
    let mode = Mode::Train {
        rng: Philox::new(1, 2),
        first_row: 0,
    };
    let (h, rs) = res
        .forward(&layout, &Weights::from(&pv), x, &ev, mode, 0)
        .unwrap();
    let (y, ats) = att.forward(&layout, &Weights::from(&pv), h, &ev).unwrap();
    let dy = on(d, 30, y.shape(), 1.0);
    let mut g = grads(&layout, d);
    let mut gv = g.as_view_mut().unwrap();
    let dh = att
        .backward(
            &layout,
            &Weights::from(&pv),
            &ev,
            &ats,
            &dy.as_view().unwrap(),
            Some(&mut gv),
        )
        .unwrap();
    let dx = res
        .backward(
            &layout,
            &Weights::from(&pv),
            &ev,
            &rs,
            &dh.as_view().unwrap(),
            Some(&mut gv),
        )
        .unwrap();
    drop(gv);
    vec![whole("y", y), whole("dx", dx), per_param("grads", g, &layout)]
}

fn time_mlp() -> Denoiser {
    Denoiser::new(Network::Mlp(TimeMlp::new(5, &[64, 64], 16)))
}

fn cifar10_unet() -> Denoiser {
    Denoiser::new(Network::UNet(UNet::new(UNetConfig::cifar10()).unwrap()))
}

fn cifar10_unet_bf16() -> Denoiser {
    let mut den = cifar10_unet();
    den.net.set_precision(emprior::ops::Precision::Bf16);
    den
}

fn small_unet() -> Denoiser {
    Denoiser::new(Network::UNet(UNet::new(common::small_unet_config()).unwrap()))
}

/// `shape` values uniform in [-scale, scale) (the same draws as `common::on`), in `dtype`.
fn input(d: &Device, seed: u64, shape: &[usize], scale: f32, dtype: DType) -> Tensor {
    let n = shape.iter().product();
    let v = common::random_vec(seed, n, -scale, scale);
    let v: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    Tensor::from_f64_as(&v, shape, dtype, d).unwrap()
}

/// A denoiser's forward (eval mode), VJP, and the input and parameter gradients of <u, d(x)>,
/// for a batch of `shape[0]` with one sigma per sample. Under bf16 the layers read the bf16
/// copy of the weights made on the device, as training and sampling pass them.
fn denoiser_case(d: &Device, den: &Denoiser, dtype: DType, shape: &[usize]) -> Vec<Output> {
    let p = den.layout().init(31, dtype, &CPU).unwrap().to_device(d).unwrap();
    let copy = match dtype {
        DType::F32 => den.layout().bf16_copy(&p).unwrap(),
        _ => None,
    };
    let pv = Weights::new(p.as_view().unwrap(), copy.as_ref()).unwrap();
    let x = input(d, 32, shape, 2.0, dtype);
    let (y, saved) = den
        .denoise(&pv, &x.as_view().unwrap(), &sigmas(shape[0]), Mode::Eval)
        .unwrap();
    let u = input(d, 33, shape, 1.0, dtype);
    let vjp = den.vjp(&pv, &saved, &u.as_view().unwrap()).unwrap();
    let mut g = Tensor::zeros(&[den.layout().len()], dtype, d).unwrap();
    let dx = den
        .backward(
            &pv,
            &saved,
            &u.as_view().unwrap(),
            Some(&mut g.as_view_mut().unwrap()),
        )
        .unwrap();
    vec![
        whole("denoised", y),
        whole("vjp", vjp),
        whole("dx", dx),
        per_param("param grads", g, den.layout()),
    ]
}

// ---- harness checks (CPU, everywhere) ----------------------------------------------------------

/// The small U-Net's outputs at batch 2 on the CPU: the material for the planted errors.
fn small_unet_outputs() -> (Denoiser, Vec<Output>) {
    let den = small_unet();
    let out = denoiser_case(&CPU, &den, DType::F32, &[2, 8, 8, 3]);
    (den, out)
}

/// A copy of `outputs` with `edit` applied to the values of output `k`.
fn with_edit(outputs: &[Output], k: usize, edit: impl FnOnce(&mut [f32])) -> Vec<Output> {
    let mut edit = Some(edit);
    outputs
        .iter()
        .enumerate()
        .map(|(i, o)| Output {
            name: o.name.clone(),
            tensor: if i == k {
                edited(&o.tensor, edit.take().unwrap())
            } else {
                edited(&o.tensor, |_| {})
            },
            pieces: o.pieces.clone(),
        })
        .collect()
}

fn rms(v: &[f32]) -> f64 {
    (v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

/// One element of one parameter's gradient off by 10x its elementwise bound: the comparison must
/// fail, naming that tensor, its shape, the element and both values, although the global norm
/// over all gradients (the old test's measure) stays within the tolerance.
fn planted_gradient_error() {
    let (den, cpu) = small_unet_outputs();
    let tol = Tol::norm(UNET_TOL);
    let k = cpu.iter().position(|o| o.name == "param grads").unwrap();
    // A small tensor deep inside: the last bias of the layout with at least 8 elements.
    let spec = den
        .layout()
        .specs()
        .iter()
        .rev()
        .find(|s| s.shape.len() == 1 && s.shape[0] >= 8)
        .unwrap();
    let (elem, all) = (5, cpu[k].tensor.to_vec_f32().unwrap());
    let piece = &all[spec.offset..spec.offset + spec.shape[0]];
    let was = piece[elem];
    let delta = 10.0 * tol.elem * (was.abs() as f64 + rms(piece));
    let now = (was as f64 + delta) as f32;
    let gpu = with_edit(&cpu, k, |v| v[spec.offset + elem] = now);

    let msg = compare_outputs("planted", &cpu, &gpu, tol).expect_err("a planted gradient error passed");
    for needle in [
        spec.name.as_str(),
        &format!("{:?}", spec.shape),
        &format!("[{elem}]"),
        &format!("gpu {now:e}"),
        &format!("cpu {was:e}"),
    ] {
        assert!(msg.contains(needle), "the message lacks '{needle}': {msg}");
    }
    assert_eq!(msg.lines().count(), 1, "only the planted tensor fails: {msg}");
    let global = delta / (rms(&all) * (all.len() as f64).sqrt());
    assert!(
        global < tol.norm,
        "a global norm would have caught it too ({global:e}): a weak demonstration"
    );
    println!(
        "planted in {} element {elem}: caught; the global relative error was only {global:.1e}",
        spec.name
    );
}

/// One element of the VJP output off: named with its multi-index and both values.
fn planted_output_error() {
    let (_, cpu) = small_unet_outputs();
    let k = cpu.iter().position(|o| o.name == "vjp").unwrap();
    let shape = cpu[k].tensor.shape().to_vec();
    let flat = 8 * 8 * 3 + 3 * 8 * 3 + 2 * 3 + 1; // sample 1, row 3, column 2, channel 1
    assert_eq!(unravel(flat, &shape), [1, 3, 2, 1]);
    let was = cpu[k].tensor.to_vec_f32().unwrap()[flat];
    let now = was + 0.5;
    let gpu = with_edit(&cpu, k, |v| v[flat] = now);
    let msg = compare_outputs("planted", &cpu, &gpu, Tol::norm(UNET_TOL))
        .expect_err("a planted output error passed");
    for needle in [
        "planted: vjp [2, 8, 8, 3]",
        "[1, 3, 2, 1]",
        &format!("gpu {now:e}"),
        &format!("cpu {was:e}"),
    ] {
        assert!(msg.contains(needle), "the message lacks '{needle}': {msg}");
    }
    assert_eq!(msg.lines().count(), 1, "only the planted output fails: {msg}");
}

/// Identical outputs pass even bit-exactly, with one summary line per output.
fn equal_outputs_pass() {
    let (_, cpu) = small_unet_outputs();
    let copy = with_edit(&cpu, 0, |_| {});
    let lines = compare_outputs("equal", &cpu, &copy, Tol::EXACT).unwrap();
    assert_eq!(lines.len(), cpu.len());
}

/// A NaN on the GPU side (an unwritten poisoned output) and a NaN on the CPU side (an oracle bug)
/// both fail, whatever the tolerance.
fn nan_is_caught() {
    let (den, cpu) = small_unet_outputs();
    let k = cpu.iter().position(|o| o.name == "param grads").unwrap();
    let spec = &den.layout().specs()[1];
    let loose = Tol {
        norm: 1e30,
        elem: 1e30,
    };
    let gpu = with_edit(&cpu, k, |v| v[spec.offset] = f32::NAN);
    let msg = compare_outputs("nan", &cpu, &gpu, loose).expect_err("a NaN passed");
    assert!(msg.contains(&spec.name) && msg.contains("gpu NaN"), "{msg}");
    let cpu_nan = with_edit(&cpu, 0, |v| v[7] = f32::NAN);
    let msg = compare_outputs("nan", &cpu_nan, &cpu, loose).expect_err("a NaN in the oracle passed");
    assert!(msg.contains("denoised") && msg.contains("cpu NaN"), "{msg}");
}

/// Every element of a piece off by 2x the norm-wise tolerance, relatively: within the elementwise
/// bound everywhere, so only the norm-wise check sees it (and must).
fn diffuse_error_is_caught() {
    let (_, cpu) = small_unet_outputs();
    let tol = Tol::norm(UNET_TOL);
    let gpu = with_edit(&cpu, 0, |v| {
        v.iter_mut().for_each(|x| *x *= 1.0 + 2.0 * tol.norm as f32)
    });
    let msg = compare_outputs("diffuse", &cpu, &gpu, tol).expect_err("a diffuse error passed");
    assert!(msg.contains("denoised") && msg.contains(" 0 of "), "{msg}");
}

/// The CIFAR-10 U-Net's gradient is compared in as many pieces as the network has parameter
/// tensors, and they tile the flat buffer (`common::pieces` checks it): no gradient escapes.
fn every_parameter_compared() {
    for den in [cifar10_unet(), small_unet()] {
        let l = den.layout();
        let o = per_param(
            "param grads",
            Tensor::zeros(&[l.len()], DType::F32, &CPU).unwrap(),
            l,
        );
        assert_eq!(o.pieces.len(), l.specs().len());
        assert!(o.pieces.iter().all(|p| !p.name.is_empty()));
    }
}

/// The U-Net tolerance against f32 rounding: the f32 CPU run of the small U-Net against its f64
/// run must use at most a quarter of it, piece by piece (the GPU adds its own f32 rounding, of
/// the same size: the GPU-CPU difference is about sqrt(2) of the f32-f64 one).
fn unet_tolerance_admits_f32_rounding() {
    let den = small_unet();
    let tol = Tol::norm(UNET_TOL / 4.0);
    let f32_run = denoiser_case(&CPU, &den, DType::F32, &[8, 8, 8, 3]);
    let f64_run = denoiser_case(&CPU, &den, DType::F64, &[8, 8, 8, 3]);
    let as_f32 = |o: &Output| Output {
        name: o.name.clone(),
        tensor: {
            let v: Vec<f32> = o.tensor.to_vec_f64().unwrap().iter().map(|&x| x as f32).collect();
            Tensor::from_f32(&v, o.tensor.shape(), &CPU).unwrap()
        },
        pieces: o.pieces.clone(),
    };
    let exact: Vec<Output> = f64_run.iter().map(as_f32).collect();
    let lines =
        compare_outputs("small U-Net f32 vs f64", &exact, &f32_run, tol).unwrap_or_else(|m| panic!("{m}"));
    lines.iter().for_each(|l| println!("{l}"));
}
