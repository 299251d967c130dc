//! Convolutions over chunks of samples (when their column buffers would pass the budget) give
//! what one piece gives: outputs, VJPs and input gradients to the bit, weight gradients to the
//! rounding of adding the chunks' products in turn.
//!
//! One test in this binary: the budget is process-wide.

use emprior::nn::conv::set_column_budget;
use emprior::nn::Weights;
use emprior::nn::{Mode, UNet, UNetConfig};
use emprior::ops::Philox;
use emprior::{AsView, AsViewMut, DType, Device, Tensor};

fn values(t: &Tensor) -> Vec<f64> {
    match t.dtype() {
        DType::F32 => t.to_vec_f32().unwrap().iter().map(|&x| x as f64).collect(),
        _ => t.to_vec_f64().unwrap(),
    }
}

/// y, a VJP, and the input and parameter gradients of one forward.
fn run(unet: &UNet, cfg: &UNetConfig, dtype: DType, n: usize) -> [Vec<f64>; 4] {
    let cpu = Device::Cpu;
    let rand = |seed, shape: &[usize]| {
        let len = shape.iter().product();
        let mut u = vec![0f32; len];
        Philox::new(seed, 5).fill_uniform(0, &mut u);
        let v: Vec<f64> = u.iter().map(|&x| 2.0 * x as f64 - 1.0).collect();
        Tensor::from_f64_as(&v, shape, dtype, &cpu).unwrap()
    };
    let (h, w) = cfg.resolution;
    let p = unet.layout.init(2, dtype, &cpu).unwrap();
    let x = rand(1, &[n, h, w, cfg.in_channels]);
    let e = rand(2, &[n, cfg.emb]);
    let u = rand(3, &[n, h, w, cfg.out_channels]);
    let (pv, ev, uv) = (p.as_view().unwrap(), e.as_view().unwrap(), u.as_view().unwrap());
    let mode = Mode::Train {
        rng: Philox::new(4, 4),
        first_row: 0,
    };
    let (y, saved) = unet
        .forward(&Weights::from(&pv), &x.as_view().unwrap(), &ev, mode)
        .unwrap();
    let vjp = unet
        .backward(&Weights::from(&pv), &ev, &saved, &uv, None)
        .unwrap();
    let mut g = Tensor::zeros(&[unet.layout.len()], dtype, &cpu).unwrap();
    let dx = unet
        .backward(
            &Weights::from(&pv),
            &ev,
            &saved,
            &uv,
            Some(&mut g.as_view_mut().unwrap()),
        )
        .unwrap();
    [values(&y), values(&vjp), values(&dx), values(&g)]
}

#[test]
fn chunked_convolutions_match_whole_ones() {
    let cfg = UNetConfig {
        in_channels: 2,
        out_channels: 2,
        channels: vec![4, 6, 8],
        blocks: vec![1, 2, 1],
        attention: vec![(1, 2)],
        emb: 8,
        dropout: 0.2,
        patch: 2,
        resolution: (16, 16),
    };
    let unet = UNet::new(cfg.clone()).unwrap();
    for dtype in [DType::F64, DType::F32] {
        let n = 5;
        set_column_budget(usize::MAX);
        let whole = run(&unet, &cfg, dtype, n);
        // Two samples' columns of the widest convolution: chunks of 1, 2 or 5 samples.
        set_column_budget(2 * 8 * 8 * 9 * 10 * 4);
        let chunked = run(&unet, &cfg, dtype, n);
        set_column_budget(1);
        let single = run(&unet, &cfg, dtype, n);
        for (k, what) in ["y", "vjp", "dx"].iter().enumerate() {
            assert!(whole[k] == chunked[k], "{what} ({dtype:?}) differs in chunks");
            assert!(
                whole[k] == single[k],
                "{what} ({dtype:?}) differs one sample at a time"
            );
        }
        for other in [&chunked[3], &single[3]] {
            let (mut worst, mut scale, mut same) = (0.0f64, 0.0f64, 0usize);
            for (&a, &b) in whole[3].iter().zip(other) {
                worst = worst.max((a - b).abs());
                scale = scale.max(a.abs());
                same += (a == b) as usize;
            }
            let rel = worst / scale;
            println!(
                "{dtype:?}: parameter gradients within {rel:.1e} of the largest, {same} of {} equal",
                other.len()
            );
            let tol = if dtype == DType::F64 { 1e-14 } else { 1e-6 };
            assert!(rel <= tol, "{dtype:?}: parameter gradients differ by {rel:e}");
        }
    }
    set_column_budget(1 << 30);
}
