//! Training pieces: Adam, clipping and EMA against a hand computation; the learning-rate
//! schedules; the DSM loss gradient against finite differences; Beta(3, 3) moments.

mod common;

use common::random_vec;
use emprior::diffusion::loss::dsm_loss;
use emprior::diffusion::{beta33, Denoiser, Network, VeSchedule};
use emprior::nn::{Mode, TimeMlp};
use emprior::ops::Philox;
use emprior::train::{Adam, AdamConfig, LrSchedule};
use emprior::{AsView, AsViewMut, DType, Device, Tensor};

const CPU: Device = Device::Cpu;

#[test]
fn adam_clipping_and_ema_match_a_hand_computation() {
    let config = AdamConfig {
        lr: LrSchedule::Constant(0.1),
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        clip: Some(1.0),
        ema: Some(0.5),
    };
    let mut p = Tensor::from_f64(&[1.0, -1.0], &[2], &CPU).unwrap();
    let mut adam = Adam::new(config, &p).unwrap();

    // Step 1: g = (3, 4) has norm 5 > 1, so it is scaled to (0.6, 0.8). Then m = 0.1 g,
    // v = 0.001 g^2, the bias-corrected moments are g and g^2, and the update is
    // lr * g / (|g| + eps) per coordinate.
    let g = Tensor::from_f64(&[3.0, 4.0], &[2], &CPU).unwrap();
    let s = adam.update(&mut p, &g).unwrap();
    assert!((s.grad_norm - 5.0).abs() < 1e-12 && s.lr == 0.1);
    let p1 = [1.0 - 0.1 * 0.6 / (0.6 + 1e-8), -1.0 - 0.1 * 0.8 / (0.8 + 1e-8)];
    let got = p.to_vec_f64().unwrap();
    assert!(
        (got[0] - p1[0]).abs() < 1e-15 && (got[1] - p1[1]).abs() < 1e-15,
        "{got:?} vs {p1:?}"
    );
    let e1 = [1.0 + 0.5 * (p1[0] - 1.0), -1.0 + 0.5 * (p1[1] + 1.0)];
    let ema = adam.ema().unwrap().to_vec_f64().unwrap();
    assert!(
        (ema[0] - e1[0]).abs() < 1e-15 && (ema[1] - e1[1]).abs() < 1e-15,
        "{ema:?} vs {e1:?}"
    );

    // Step 2: g = (0.5, 0) is under the clip threshold.
    let g = Tensor::from_f64(&[0.5, 0.0], &[2], &CPU).unwrap();
    adam.update(&mut p, &g).unwrap();
    let (m0, v0) = (0.9 * 0.06 + 0.1 * 0.5, 0.999 * 0.00036 + 0.001 * 0.25);
    let (m1, v1) = (0.9 * 0.08, 0.999 * 0.00064);
    let (b1, b2) = (1.0 - 0.9f64.powi(2), 1.0 - 0.999f64.powi(2));
    let p2 = [
        p1[0] - 0.1 * (m0 / b1) / ((v0 / b2).sqrt() + 1e-8),
        p1[1] - 0.1 * (m1 / b1) / ((v1 / b2).sqrt() + 1e-8),
    ];
    let got = p.to_vec_f64().unwrap();
    assert!(
        (got[0] - p2[0]).abs() < 1e-14 && (got[1] - p2[1]).abs() < 1e-14,
        "{got:?} vs {p2:?}"
    );
    let e2 = [e1[0] + 0.5 * (p2[0] - e1[0]), e1[1] + 0.5 * (p2[1] - e1[1])];
    let ema = adam.ema().unwrap().to_vec_f64().unwrap();
    assert!((ema[0] - e2[0]).abs() < 1e-14 && (ema[1] - e2[1]).abs() < 1e-14);
    assert_eq!(adam.steps(), 2);

    // A NaN gradient stops with a clear error and leaves the parameters alone.
    let before = p.to_vec_f64().unwrap();
    let g = Tensor::from_f64(&[f64::NAN, 0.0], &[2], &CPU).unwrap();
    let err = adam.update(&mut p, &g).unwrap_err().to_string();
    assert!(err.contains("gradient norm"), "{err}");
    assert_eq!(p.to_vec_f64().unwrap(), before);
}

#[test]
fn learning_rate_schedules() {
    let lin = LrSchedule::Linear {
        init: 1e-3,
        end: 1e-6,
        steps: 65_536,
    };
    assert!((lin.at(0) - (1e-3 + (1e-6 - 1e-3) / 65_537.0)).abs() < 1e-18);
    assert!((lin.at(65_535) - (1e-3 + (1e-6 - 1e-3) * 65_536.0 / 65_537.0)).abs() < 1e-18);
    assert!((lin.at(65_536) - 1e-6).abs() < 1e-18);
    assert!((lin.at(1_000_000) - 1e-6).abs() < 1e-18);
    assert_eq!(LrSchedule::Constant(2e-4).at(123), 2e-4);
}

#[test]
fn beta33_has_the_right_moments_and_schedule_the_right_range() {
    let t = beta33(Philox::new(1, 1), 0, 200_000);
    let mean = t.iter().sum::<f64>() / t.len() as f64;
    let var = t.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / t.len() as f64;
    // Beta(3, 3): mean 1/2, variance 1/28; standard errors about 5e-4 and 1.5e-4.
    assert!((mean - 0.5).abs() < 3e-3, "{mean}");
    assert!((var - 1.0 / 28.0).abs() < 1e-3, "{var}");
    assert_eq!(
        &t[10..20],
        &beta33(Philox::new(1, 1), 10, 10)[..],
        "draws are addressable by offset"
    );
    let s = VeSchedule::new(1e-3, 1e2);
    assert!((s.sigma(0.0) - 1e-3).abs() < 1e-15 && (s.sigma(1.0) - 1e2).abs() < 1e-12);
    assert!(
        (s.sigma(0.5) - (1e-3f64 * 1e2).sqrt()).abs() < 1e-12,
        "the median sigma is sqrt(ab)"
    );
    let g = s.grid(4);
    assert_eq!(g.len(), 5);
    assert!((g[0] - 1e2).abs() < 1e-12 && (g[4] - 1e-3).abs() < 1e-15);
    assert!((g[1] / g[2] - g[2] / g[3]).abs() < 1e-9, "log-uniform");
}

#[test]
fn dsm_loss_gradient_matches_finite_differences() {
    let den = Denoiser::new(Network::Mlp(TimeMlp::new(3, &[6], 4)));
    let p0 = den
        .layout()
        .init(2, DType::F64, &CPU)
        .unwrap()
        .to_vec_f64()
        .unwrap();
    let b = 4;
    let x: Vec<f64> = random_vec(3, b * 3, -2.0, 2.0)
        .iter()
        .map(|&v| v as f64)
        .collect();
    let z: Vec<f64> = random_vec(4, b * 3, -1.0, 1.0)
        .iter()
        .map(|&v| v as f64)
        .collect();
    let sigmas = [0.01, 0.3, 2.0, 50.0];
    let xt = Tensor::from_f64(&x, &[b, 3], &CPU).unwrap();
    let zt = Tensor::from_f64(&z, &[b, 3], &CPU).unwrap();
    let loss = |p: &[f64], g: Option<&mut Tensor>| {
        let pt = Tensor::from_f64(p, &[p.len()], &CPU).unwrap();
        let mut gv = g.map(|g| g.as_view_mut().unwrap());
        dsm_loss(
            &den,
            &pt.as_view().unwrap(),
            &xt.as_view().unwrap(),
            &sigmas,
            &zt.as_view().unwrap(),
            Mode::Eval,
            gv.as_mut(),
        )
        .unwrap()
    };
    let mut g = Tensor::zeros(&[p0.len()], DType::F64, &CPU).unwrap();
    loss(&p0, Some(&mut g));
    let g = g.to_vec_f64().unwrap();
    let (mut num2, mut diff2) = (0.0, 0.0);
    let mut p = p0.clone();
    for i in 0..p0.len() {
        let h = 1e-6;
        p[i] = p0[i] + h;
        let up = loss(&p, None);
        p[i] = p0[i] - h;
        let down = loss(&p, None);
        p[i] = p0[i];
        let fd = (up - down) / (2.0 * h);
        num2 += fd * fd;
        diff2 += (fd - g[i]).powi(2);
    }
    let rel = (diff2 / num2).sqrt();
    assert!(rel < 1e-6, "dsm gradient relative error {rel:e}");
}
