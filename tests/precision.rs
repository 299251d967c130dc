//! The bf16 precision policy on the CPU backend: a layer under bf16 computes exactly what the f32
//! path computes on bf16-rounded operands (the same bits: the twin widens the same bf16 values
//! and runs the same f32 code), layers the tensor cores cannot take stay f32, and a whole U-Net
//! under bf16 stays within bf16's rounding of its f32 self.

mod common;

use common::{random_vec, small_unet_config};
use emprior::diffusion::{Denoiser, Network};
use emprior::nn::Weights;
use emprior::nn::{conv::Conv3x3, linear::Linear, Mode, ParamLayout, UNet};
use emprior::ops::precision::round_to_bf16;
use emprior::ops::Precision;
use emprior::{AsView, AsViewMut, DType, Device, Tensor, View, ViewMut};

const CPU: Device = Device::Cpu;

fn t(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_f32(v, shape, &CPU).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_vec_f32().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// The gradients the policy gives: weight gradients from the bf16 operands (`rounded`), bias
/// gradients summed from the f32 dy (`plain`).
fn policy_grads(layout: &ParamLayout, rounded: &[u32], plain: &[u32]) -> Vec<u32> {
    let mut out = rounded.to_vec();
    for spec in layout.specs().iter().filter(|s| s.shape.len() == 1) {
        let n = spec.shape[0];
        out[spec.offset..spec.offset + n].copy_from_slice(&plain[spec.offset..spec.offset + n]);
    }
    out
}

/// The parameters with every weight (rank > 1) rounded to bf16; biases stay f32 (the policy
/// adds them in f32).
fn rounded_weights(layout: &ParamLayout, params: &[f32]) -> Vec<f32> {
    let mut out = params.to_vec();
    for spec in layout.specs() {
        if spec.shape.len() > 1 {
            let n: usize = spec.shape.iter().product();
            let r = round_to_bf16(&params[spec.offset..spec.offset + n]);
            out[spec.offset..spec.offset + n].copy_from_slice(&r);
        }
    }
    out
}

/// One layer's forward and backward.
trait Layer {
    fn forward(&self, layout: &ParamLayout, params: &Weights, x: &View) -> emprior::Result<Tensor>;
    fn backward(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: &View,
        dy: &View,
        grads: &mut ViewMut,
    ) -> emprior::Result<Tensor>;
}

impl Layer for Conv3x3 {
    fn forward(&self, layout: &ParamLayout, params: &Weights, x: &View) -> emprior::Result<Tensor> {
        Conv3x3::forward(self, layout, params, x)
    }
    fn backward(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: &View,
        dy: &View,
        grads: &mut ViewMut,
    ) -> emprior::Result<Tensor> {
        Conv3x3::backward(self, layout, params, x, dy, Some(grads))
    }
}

impl Layer for Linear {
    fn forward(&self, layout: &ParamLayout, params: &Weights, x: &View) -> emprior::Result<Tensor> {
        Linear::forward(self, layout, params, x)
    }
    fn backward(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: &View,
        dy: &View,
        grads: &mut ViewMut,
    ) -> emprior::Result<Tensor> {
        Linear::backward(self, layout, params, x, dy, Some(grads))
    }
}

/// Asserts that `layer` under bf16 gives the bits of the f32 path on bf16-rounded weights, x and
/// dy (its output, input gradient and weight gradients; bias gradients come from the f32 dy),
/// and that bf16 changed something.
fn check_layer(what: &str, layer: &impl Layer, layout: &ParamLayout, x_shape: &[usize], y_shape: &[usize]) {
    let params = layout.init(3, DType::F32, &CPU).unwrap().to_vec_f32().unwrap();
    let x = random_vec(4, x_shape.iter().product(), -2.0, 2.0);
    let dy = random_vec(5, y_shape.iter().product(), -1.0, 1.0);
    let run = |precision: Precision, params: &[f32], x: &[f32], dy: &[f32]| {
        let mut layout = layout.clone();
        layout.set_precision(precision);
        let p = t(params, &[params.len()]);
        let pv = Weights::from(p.as_view().unwrap());
        let xt = t(x, x_shape);
        let dyt = t(dy, y_shape);
        let y = layer.forward(&layout, &pv, &xt.as_view().unwrap()).unwrap();
        let mut g = Tensor::zeros(&[layout.len()], DType::F32, &CPU).unwrap();
        let (xv, dyv) = (xt.as_view().unwrap(), dyt.as_view().unwrap());
        let dx = layer
            .backward(&layout, &pv, &xv, &dyv, &mut g.as_view_mut().unwrap())
            .unwrap();
        (bits(&y), bits(&dx), bits(&g))
    };
    let bf16 = run(Precision::Bf16, &params, &x, &dy);
    let rounded = run(
        Precision::F32,
        &rounded_weights(layout, &params),
        &round_to_bf16(&x),
        &round_to_bf16(&dy),
    );
    let plain = run(Precision::F32, &params, &x, &dy);
    assert!(bf16.0 == rounded.0, "{what}: forward differs");
    assert!(bf16.1 == rounded.1, "{what}: input gradient differs");
    let want = policy_grads(layout, &rounded.2, &plain.2);
    assert!(bf16.2 == want, "{what}: parameter gradients differ");
    assert!(plain.0 != bf16.0, "{what}: bf16 had no effect");
}

#[test]
fn conv3x3_bf16_is_f32_on_rounded_operands() {
    for (stride, cin, cout) in [(1, 16, 24), (2, 8, 16)] {
        let mut layout = ParamLayout::new();
        let conv = Conv3x3::new(&mut layout, "c", cin, cout, stride);
        let x_shape = [2, 6, 5, cin];
        let y_shape = conv.out_shape(&x_shape).unwrap();
        check_layer(
            &format!("conv stride {stride}"),
            &conv,
            &layout,
            &x_shape,
            &y_shape,
        );
    }
}

#[test]
fn linear_bf16_is_f32_on_rounded_operands() {
    let mut layout = ParamLayout::new();
    let lin = Linear::new(&mut layout, "l", 24, 40, true);
    // 13 rows: the row count need not be a multiple of 8.
    check_layer("linear", &lin, &layout, &[13, 24], &[13, 40]);
}

#[test]
fn layers_the_tensor_cores_cannot_take_stay_f32() {
    // Cin = 3 (the U-Net's first convolution) and a 5-wide linear layer: same bits either way.
    let mut layout = ParamLayout::new();
    let conv = Conv3x3::new(&mut layout, "c", 3, 16, 1);
    let lin = Linear::new(&mut layout, "l", 5, 16, true);
    let params = layout.init(1, DType::F32, &CPU).unwrap();
    let pv = params.as_view().unwrap();
    let x = t(&random_vec(2, 2 * 4 * 4 * 3, -1.0, 1.0), &[2, 4, 4, 3]);
    let v = t(&random_vec(3, 3 * 5, -1.0, 1.0), &[3, 5]);
    let mut bf16_layout = layout.clone();
    bf16_layout.set_precision(Precision::Bf16);
    for l in [&layout, &bf16_layout] {
        assert_eq!(l.len(), layout.len());
    }
    let conv_f32 = bits(
        &conv
            .forward(&layout, &Weights::from(&pv), &x.as_view().unwrap())
            .unwrap(),
    );
    let conv_bf16 = bits(
        &conv
            .forward(&bf16_layout, &Weights::from(&pv), &x.as_view().unwrap())
            .unwrap(),
    );
    assert_eq!(conv_f32, conv_bf16);
    let lin_f32 = bits(
        &lin.forward(&layout, &Weights::from(&pv), &v.as_view().unwrap())
            .unwrap(),
    );
    let lin_bf16 = bits(
        &lin.forward(&bf16_layout, &Weights::from(&pv), &v.as_view().unwrap())
            .unwrap(),
    );
    assert_eq!(lin_f32, lin_bf16);
}

#[test]
fn unet_under_bf16_stays_within_bf16_rounding_of_f32() {
    let shape = [2, 8, 8, 3];
    let mut den = Denoiser::new(Network::UNet(UNet::new(small_unet_config()).unwrap()));
    let params = den.layout().init(11, DType::F32, &CPU).unwrap();
    let pv = params.as_view().unwrap();
    let x = t(&random_vec(12, shape.iter().product(), -2.0, 2.0), &shape);
    let u = t(&random_vec(13, shape.iter().product(), -1.0, 1.0), &shape);
    let run = |den: &Denoiser| {
        let (y, saved) = den
            .denoise(
                &Weights::from(&pv),
                &x.as_view().unwrap(),
                &[0.3, 3.0],
                Mode::Eval,
            )
            .unwrap();
        let mut g = Tensor::zeros(&[den.layout().len()], DType::F32, &CPU).unwrap();
        let dx = den
            .backward(
                &Weights::from(&pv),
                &saved,
                &u.as_view().unwrap(),
                Some(&mut g.as_view_mut().unwrap()),
            )
            .unwrap();
        [
            y.to_vec_f32().unwrap(),
            dx.to_vec_f32().unwrap(),
            g.to_vec_f32().unwrap(),
        ]
    };
    let exact = run(&den);
    den.net.set_precision(Precision::Bf16);
    assert_eq!(den.layout().precision(), Precision::Bf16);
    let bf16 = run(&den);
    for (name, (a, b)) in ["denoised", "input gradient", "parameter gradients"]
        .iter()
        .zip(exact.iter().zip(&bf16))
    {
        let diff: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let norm: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let rel = diff / norm;
        // bf16 keeps 8 significant bits (2^-9 = 2e-3 relative per rounding: operands and kept
        // activations); a dozen layers in sequence compound it to about 1e-3 here (1.0e-3 to
        // 3.9e-3 measured), never to O(1).
        eprintln!("{name}: bf16 vs f32 relative difference {rel:.2e}");
        assert!(
            rel > 0.0 && rel < 1e-2,
            "{name}: bf16 vs f32 relative difference {rel:e}"
        );
    }
}

#[test]
fn precision_parses_and_names_itself() {
    assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
    assert_eq!("f32".parse::<Precision>().unwrap(), Precision::F32);
    let e = "fp16".parse::<Precision>().unwrap_err().to_string();
    assert!(e.contains("fp16") && e.contains("bf16"), "{e}");
    assert_eq!(Precision::Bf16.name(), "bf16");
}

#[test]
fn a_layout_equals_itself_in_any_precision() {
    // A checkpoint (f32 layout) must fit a network running under bf16 (em's resume check).
    let mut a = UNet::new(small_unet_config()).unwrap().layout;
    let b = a.clone();
    a.set_precision(Precision::Bf16);
    assert!(a == b);
}

#[test]
fn the_tensor_core_startup_check_runs_and_is_a_no_op_on_the_cpu() {
    use emprior::nn::tensor_cores::{agree, check, resolve};
    use emprior::ops::PrecisionRequest;
    // Its problems and comparisons run (the CPU on both sides), so on a GPU only a real
    // disagreement can stop a bf16 run.
    agree(&CPU, &CPU).unwrap();
    check(&CPU).unwrap();
    assert_eq!(resolve(PrecisionRequest::Auto, &CPU).unwrap(), Precision::F32);
    let bf16: PrecisionRequest = "bf16".parse().unwrap();
    assert_eq!(resolve(bf16, &CPU).unwrap(), Precision::Bf16);
}

#[test]
fn softmax_kept_in_bf16_is_the_f32_softmax_rounded_and_its_vjp_reads_it() {
    use emprior::nn::attention::{softmax, softmax_backward, softmax_backward_kept, softmax_kept};
    use emprior::ops::precision::{to_bf16, to_f32, Operand};
    let shape = [3, 20, 20];
    let s = t(&random_vec(31, 1200, -6.0, 6.0), &shape);
    let dp = t(&random_vec(32, 1200, -1.0, 1.0), &shape);
    let p = softmax_kept(&s.as_view().unwrap(), Precision::Bf16).unwrap();
    let want = to_bf16(&softmax(&s.as_view().unwrap()).unwrap()).unwrap();
    assert_eq!(p.dtype(), DType::BF16);
    assert_eq!(p.cpu_bf16().unwrap(), want.cpu_bf16().unwrap());
    // Under f32 it is the plain softmax.
    let p32 = softmax_kept(&s.as_view().unwrap(), Precision::F32).unwrap();
    assert_eq!(p32.dtype(), DType::F32);
    // The VJP from the bf16 probabilities, in place, equals the f32 VJP from their widened values.
    let ds = softmax_backward_kept(
        &Operand::of(&p).unwrap(),
        dp.as_view().unwrap().to_tensor().unwrap(),
    )
    .unwrap();
    let widened = to_f32(&p).unwrap();
    let want = softmax_backward(&widened.as_view().unwrap(), &dp.as_view().unwrap()).unwrap();
    assert_eq!(ds.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
    // A dp of another shape is refused by name.
    let bad = t(&[0.0; 20], &[1, 20]);
    let e = softmax_backward_kept(&Operand::of(&p).unwrap(), bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("softmax_backward") && e.contains("dp"), "{e}");
}

#[test]
fn kept_activations_are_bf16_under_bf16_and_operands_read_them_in_place() {
    use emprior::ops::precision::{keep, Operand};
    let x = t(&random_vec(33, 48, -3.0, 3.0), &[2, 4, 6]);
    let same = keep(x.as_view().unwrap().to_tensor().unwrap(), Precision::F32).unwrap();
    assert_eq!(same.dtype(), DType::F32);
    assert_eq!(same.to_vec_f32().unwrap(), x.to_vec_f32().unwrap());
    let k = keep(x.as_view().unwrap().to_tensor().unwrap(), Precision::Bf16).unwrap();
    assert_eq!((k.dtype(), k.shape()), (DType::BF16, &[2usize, 4, 6][..]));
    let op = Operand::of(&k).unwrap();
    // Widened: the rounded values, under any shape of the same size, or a part of them.
    let rows = op.reshape(&[8, 6]).unwrap();
    assert_eq!(rows.shape(), [8, 6]);
    let wide = rows.widen().unwrap();
    assert_eq!(
        wide.view().unwrap().cpu::<f32>().unwrap(),
        round_to_bf16(&x.to_vec_f32().unwrap())
    );
    let part = op.sub(6, &[2, 6]).unwrap().widen().unwrap();
    assert_eq!(
        part.view().unwrap().cpu::<f32>().unwrap(),
        &round_to_bf16(&x.to_vec_f32().unwrap())[6..18]
    );
    // Narrowed: the kept tensor itself, no copy.
    let narrow = op.narrow().unwrap();
    assert!(std::ptr::eq(narrow.as_ref().tensor, &k));
    let e = op.reshape(&[5, 5]).err().unwrap().to_string();
    assert!(e.contains("48 elements"), "{e}");
    assert!(op.sub(40, &[2, 6]).is_err());
}

#[test]
fn a_unet_under_bf16_keeps_about_half_the_bytes() {
    let cfg = small_unet_config();
    let x = t(&random_vec(34, 2 * 8 * 8 * 3, -1.0, 1.0), &[2, 8, 8, 3]);
    let emb = t(&random_vec(35, 2 * cfg.emb, -1.0, 1.0), &[2, cfg.emb]);
    let kept = |precision| {
        let mut net = UNet::new(cfg.clone()).unwrap();
        net.layout.set_precision(precision);
        let p = net.layout.init(3, DType::F32, &CPU).unwrap();
        let (_, saved) = net
            .forward(
                &p.as_view().unwrap().into(),
                &x.as_view().unwrap(),
                &emb.as_view().unwrap(),
                Mode::Eval,
            )
            .unwrap();
        (saved.bytes(), net.activation_memory(2, false).saved)
    };
    let (f32_bytes, f32_est) = kept(Precision::F32);
    let (bf16_bytes, bf16_est) = kept(Precision::Bf16);
    assert_eq!((f32_bytes as u64, bf16_bytes as u64), (f32_est, bf16_est));
    let ratio = bf16_bytes as f64 / f32_bytes as f64;
    // The input image, the LayerNorms' 1/std and the modulation stay f32.
    assert!(ratio > 0.5 && ratio < 0.6, "bf16 keeps {ratio} of the f32 bytes");
}

#[test]
fn the_merge_input_in_bf16_is_upsample_then_concat_of_the_kept_values() {
    use emprior::nn::resample::{concat_channels, upsample2x, upsample_concat_bf16};
    use emprior::ops::precision::{to_bf16, to_f32, Bf16Ref};
    let below = to_bf16(&t(&random_vec(41, 2 * 3 * 2 * 8, -2.0, 2.0), &[2, 3, 2, 8])).unwrap();
    let skip = to_bf16(&t(&random_vec(42, 2 * 6 * 4 * 16, -2.0, 2.0), &[2, 6, 4, 16])).unwrap();
    let cat = upsample_concat_bf16(&Bf16Ref::new(&below), &Bf16Ref::new(&skip)).unwrap();
    assert_eq!((cat.dtype(), cat.shape()), (DType::BF16, &[2usize, 6, 4, 24][..]));
    let (bw, sw) = (to_f32(&below).unwrap(), to_f32(&skip).unwrap());
    let up = upsample2x(&bw.as_view().unwrap()).unwrap();
    let want = concat_channels(&up.as_view().unwrap(), &sw.as_view().unwrap()).unwrap();
    assert_eq!(
        cat.cpu_bf16().unwrap(),
        to_bf16(&want).unwrap().cpu_bf16().unwrap()
    );
    // A skip of the wrong size is refused by name.
    let e = upsample_concat_bf16(&Bf16Ref::new(&below), &Bf16Ref::new(&below))
        .unwrap_err()
        .to_string();
    assert!(e.contains("upsample_concat_bf16") && e.contains("skip"), "{e}");
}

/// The bf16 copy in `Weights` (made once per optimizer step or per sampling lap) is what the
/// tensor-core layers read: with the copy of the weights a bf16 U-Net gives the bits of the
/// per-call casts (denoised, input gradient, parameter gradients); with a copy of other weights
/// its output moves, so the copy is really read; f32 makes no copy; a copy that does not fit
/// the parameters is refused.
#[test]
fn layers_read_the_bf16_copy_of_the_weights() {
    use emprior::ops::precision::to_bf16;
    let shape = [2, 8, 8, 3];
    let mut den = Denoiser::new(Network::UNet(UNet::new(small_unet_config()).unwrap()));
    let params = den.layout().init(11, DType::F32, &CPU).unwrap();
    assert!(den.layout().bf16_copy(&params).unwrap().is_none(), "f32: no copy");
    den.net.set_precision(Precision::Bf16);
    let copy = den.layout().bf16_copy(&params).unwrap().expect("bf16: a copy");
    let x = t(&random_vec(12, shape.iter().product(), -2.0, 2.0), &shape);
    let u = t(&random_vec(13, shape.iter().product(), -1.0, 1.0), &shape);
    let run = |w: &Weights| {
        let (y, saved) = den
            .denoise(w, &x.as_view().unwrap(), &[0.3, 3.0], Mode::Eval)
            .unwrap();
        let mut g = Tensor::zeros(&[den.layout().len()], DType::F32, &CPU).unwrap();
        let dx = den
            .backward(
                w,
                &saved,
                &u.as_view().unwrap(),
                Some(&mut g.as_view_mut().unwrap()),
            )
            .unwrap();
        [bits(&y), bits(&dx), bits(&g)]
    };
    let cast = run(&Weights::from(params.as_view().unwrap()));
    let read = run(&Weights::new(params.as_view().unwrap(), Some(&copy)).unwrap());
    assert!(cast == read, "the copy gives the bits of the per-call casts");
    let other = to_bf16(&den.layout().init(12, DType::F32, &CPU).unwrap()).unwrap();
    let moved = run(&Weights::new(params.as_view().unwrap(), Some(&other)).unwrap());
    assert!(moved[0] != cast[0], "a copy of other weights moves the output");

    let short = to_bf16(&t(&[1.0; 8], &[8])).unwrap();
    let err = Weights::new(params.as_view().unwrap(), Some(&short))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("bf16 copy"), "{err}");
    let not_bf16 = Tensor::zeros(&[den.layout().len()], DType::F32, &CPU).unwrap();
    let err = Weights::new(params.as_view().unwrap(), Some(&not_bf16))
        .err()
        .expect("refused");
    assert!(err.to_string().contains("bf16 copy"), "{err}");
    let err = den.layout().bf16_copy(&t(&[1.0; 8], &[8])).expect_err("refused");
    assert!(err.to_string().contains("parameters"), "{err}");
}

/// The tensor cores load their operands in 16-byte chunks: a bf16 operand that starts at an
/// element offset not a multiple of 8 is refused by name on every device (so the CPU catches
/// it), and every weight of the paper's networks the tensor cores take starts at a multiple of
/// 8 in the flat buffer, so the layers read them from the bf16 copy rather than casting.
#[test]
fn tensor_core_operands_are_aligned_and_the_presets_weights_are_read_from_the_copy() {
    use emprior::nn::Bf16Weight;
    use emprior::ops::precision::{to_bf16, Bf16Ref};
    use emprior::ops::{gemm_bf16_into, GemmSpec};
    let a = to_bf16(&t(&random_vec(1, 8 * 16 + 1, -1.0, 1.0), &[8 * 16 + 1])).unwrap();
    let b = to_bf16(&t(&random_vec(2, 16 * 8, -1.0, 1.0), &[16, 8])).unwrap();
    let mut c = Tensor::zeros(&[8, 8], DType::F32, &CPU).unwrap();
    let misaligned = Bf16Ref::new(&a).sub(1, &[8, 16]).unwrap();
    let err = gemm_bf16_into(
        misaligned,
        &b,
        None,
        Some(&mut c.as_view_mut().unwrap()),
        None,
        GemmSpec::default(),
    )
    .expect_err("refused");
    assert!(err.to_string().contains("not a multiple of 8"), "{err}");
    let aligned = Bf16Ref::new(&a).sub(0, &[8, 16]).unwrap();
    gemm_bf16_into(
        aligned,
        &b,
        None,
        Some(&mut c.as_view_mut().unwrap()),
        None,
        GemmSpec::default(),
    )
    .unwrap();

    for name in ["cifar10", "mri"] {
        let mut net = emprior::diffusion::preset(name).unwrap();
        net.set_precision(Precision::Bf16);
        let layout = net.layout();
        let params = layout.init(0, DType::F32, &CPU).unwrap();
        let copy = layout.bf16_copy(&params).unwrap().unwrap();
        let w = Weights::new(params.as_view().unwrap(), Some(&copy)).unwrap();
        let mut taken = 0;
        for (i, s) in layout.specs().iter().enumerate() {
            // Weights (2-D or 4-D) whose matrix sides are multiples of 8 take the tensor cores.
            let (rows, cols) = match s.shape.as_slice() {
                [r, c] => (*r, *c),
                [kh, kw, ci, co] => (kh * kw * ci, *co),
                _ => continue,
            };
            let tc = s.shape.iter().rev().take(2).all(|d| d % 8 == 0);
            if !tc {
                continue;
            }
            let id = emprior::nn::ParamId(i);
            match layout.weight_bf16(&w, id, &[rows, cols]).unwrap() {
                Bf16Weight::Copy(_) => taken += 1,
                Bf16Weight::Cast(_) => panic!("{name}: {} at offset {} is cast per call", s.name, s.offset),
            }
        }
        assert!(taken > 20, "{name}: {taken} weights read from the copy");
    }
}

/// The permute that keeps its output (the attention's q/k/v, merged heads and their gradient):
/// under bf16 the bits of the f32 permute rounded, from f32 values (one rounding) or from bf16
/// ones (a copy); under f32 the f32 permute, a bf16 input widened.
#[test]
fn permute_kept_is_the_permute_rounded_once() {
    use emprior::nn::resample::{permute, permute_kept};
    use emprior::ops::precision::{to_bf16, to_f32, Operand};
    let shape = [2, 3, 5, 4, 8];
    let perm = [2, 0, 3, 1, 4];
    let x = t(&random_vec(41, shape.iter().product(), -3.0, 3.0), &shape);
    let xb = to_bf16(&x).unwrap();
    let bits16 = |t: &Tensor| -> Vec<u16> { t.cpu_bf16().unwrap().iter().map(|b| b.to_bits()).collect() };
    let want = to_bf16(&permute(&x.as_view().unwrap(), &perm).unwrap()).unwrap();
    let from_f32 = permute_kept(&Operand::F32(x.as_view().unwrap()), &perm, Precision::Bf16).unwrap();
    assert_eq!(from_f32.shape(), want.shape());
    assert_eq!(bits16(&from_f32), bits16(&want));
    let widened = to_f32(&xb).unwrap();
    let want_b = to_bf16(&permute(&widened.as_view().unwrap(), &perm).unwrap()).unwrap();
    let from_bf16 = permute_kept(&Operand::of(&xb).unwrap(), &perm, Precision::Bf16).unwrap();
    assert_eq!(bits16(&from_bf16), bits16(&want_b));
    let f32_path = permute_kept(&Operand::of(&xb).unwrap(), &perm, Precision::F32).unwrap();
    assert_eq!(f32_path.dtype(), DType::F32);
    assert_eq!(
        bits(&f32_path),
        bits(&permute(&widened.as_view().unwrap(), &perm).unwrap())
    );
    let err = permute_kept(&Operand::of(&xb).unwrap(), &[0, 1], Precision::Bf16).expect_err("refused");
    assert!(err.to_string().contains("permutation"), "{err}");
}
