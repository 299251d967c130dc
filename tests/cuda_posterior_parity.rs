//! Tier 2 for training and sampling: the GPU against the CPU from the same seeds (the same
//! Philox streams on both): sampler updates, Adam, one training step, a few DDPM + MMPS steps
//! with a U-Net and with a TimeMLP, and the Gaussian prior's solves. Norm-wise f32 tolerances.
//! Without a GPU each test prints `skipped: GPU unavailable: <reason>`; the harness also runs
//! CPU against CPU so its code is exercised everywhere.

mod common;

use common::{gpu_or_skip, on, parity, random_vec};
use emprior::diffusion::sampler::sampler_step;
use emprior::diffusion::{Denoiser, Network, Sampler, SamplerKind, VeSchedule};
use emprior::gaussian::{Dplr, Gaussian};
use emprior::nn::{TimeMlp, UNet, UNetConfig};
use emprior::ops::Philox;
use emprior::posterior::{CgConfig, DenseOperators, MaskOperator, Mmps, NetworkPrior, ObservationNoise};
use emprior::train::{Adam, AdamConfig, LrSchedule, Trainer};
use emprior::{AsView, DType, Device};

const CPU: Device = Device::Cpu;

#[test]
fn cuda_training_and_sampling_match_cpu() {
    let Some(gpu) = gpu_or_skip("cuda_training_and_sampling_match_cpu") else {
        return;
    };
    all(&gpu);
}

#[test]
fn parity_harness_runs_cpu_against_cpu() {
    all(&CPU);
}

fn all(gpu: &Device) {
    parity("sampler update with and without noise", gpu, 1e-6, |d| {
        let mut x = on(d, 1, &[3, 1001], 2.0);
        let den = on(d, 2, &[3, 1001], 1.0);
        sampler_step(&mut x, &den, 0.3, 0.7, Philox::new(4, 5), 17).unwrap();
        let mut y = on(d, 3, &[3, 1001], 2.0);
        sampler_step(&mut y, &den, 0.1, 0.0, Philox::new(4, 5), 0).unwrap();
        vec![x, y]
    });

    parity("Adam with clipping and EMA, three steps", gpu, 1e-6, |d| {
        let mut p = on(d, 4, &[5000], 1.0);
        // An EMA decay whose 1 - decay is not exact in f32 (the host rounds it once, as the CPU).
        let config = AdamConfig {
            ema: Some(0.9999),
            ..AdamConfig::new(LrSchedule::Linear {
                init: 1e-2,
                end: 1e-3,
                steps: 3,
            })
        };
        let mut adam = Adam::new(config, &p).unwrap();
        for s in 0..3 {
            let g = on(d, 10 + s, &[5000], if s == 0 { 0.01 } else { 1.0 });
            adam.update(&mut p, &g).unwrap();
        }
        vec![p, adam.ema().unwrap().to_device(d).unwrap()]
    });

    parity("one DSM training step of a TimeMLP", gpu, 1e-5, |d| {
        let den = Denoiser::new(Network::Mlp(TimeMlp::new(5, &[64, 64], 16)));
        let params = den.layout().init(1, DType::F32, d).unwrap();
        let config = AdamConfig::new(LrSchedule::Constant(1e-3));
        let mut trainer = Trainer::new(den, params, config, VeSchedule::new(1e-3, 10.0), 3).unwrap();
        let x = on(d, 20, &[128, 5], 2.0);
        trainer.step(&x.as_view().unwrap()).unwrap();
        vec![trainer.params.to_device(d).unwrap()]
    });

    parity(
        "DDPM + MMPS (1 CG iteration), small U-Net with masks",
        gpu,
        1e-4,
        |d| {
            let cfg = UNetConfig {
                in_channels: 3,
                out_channels: 3,
                channels: vec![16, 32],
                blocks: vec![1, 1],
                attention: vec![(1, 2)],
                emb: 32,
                dropout: 0.1,
                patch: 1,
                resolution: (8, 8),
            };
            let den = Denoiser::new(Network::UNet(UNet::new(cfg).unwrap()));
            let params = den.layout().init(2, DType::F32, d).unwrap();
            let b = 4;
            let bits: Vec<f32> = random_vec(30, b * 64, 0.0, 1.0)
                .iter()
                .map(|&u| (u > 0.5) as u8 as f32)
                .collect();
            let mask = MaskOperator::from_pixel_mask(&bits, b, 64, 3, DType::F32, d).unwrap();
            let y = on(d, 31, &[b, 192], 1.0);
            let noise = ObservationNoise::Scalar(1e-6);
            let prior = NetworkPrior {
                denoiser: &den,
                params: &params,
            };
            let mut mmps = Mmps::new(
                &prior,
                &mask,
                &y,
                &noise,
                CgConfig {
                    max_iters: 1,
                    rtol: None,
                },
            );
            let sampler = Sampler {
                kind: SamplerKind::Ddpm,
                steps: 4,
                schedule: VeSchedule::new(1e-3, 1e2),
                rng: Philox::new(6, 7),
            };
            vec![sampler
                .sample(&mut mmps, &[b, 8, 8, 3], None, DType::F32, d)
                .unwrap()]
        },
    );

    parity(
        "PC + MMPS (3 CG iterations), TimeMLP with per-observation operators",
        gpu,
        1e-4,
        |d| {
            let den = Denoiser::new(Network::Mlp(TimeMlp::new(5, &[64, 64], 16)));
            let params = den.layout().init(3, DType::F32, d).unwrap();
            let b = 64;
            let ops = DenseOperators::new(on(d, 40, &[b, 2, 5], 1.0)).unwrap();
            let y = on(d, 41, &[b, 2], 1.0);
            let noise = ObservationNoise::Scalar(1e-4);
            let prior = NetworkPrior {
                denoiser: &den,
                params: &params,
            };
            let mut mmps = Mmps::new(
                &prior,
                &ops,
                &y,
                &noise,
                CgConfig {
                    max_iters: 3,
                    rtol: None,
                },
            );
            let kind = SamplerKind::Pc {
                corrections: 1,
                tau: 0.1,
            };
            let sampler = Sampler {
                kind,
                steps: 4,
                schedule: VeSchedule::new(1e-3, 10.0),
                rng: Philox::new(8, 9),
            };
            vec![sampler.sample(&mut mmps, &[b, 5], None, DType::F32, d).unwrap()]
        },
    );

    parity(
        "Gaussian prior: denoiser and posterior covariance (Woodbury)",
        gpu,
        1e-5,
        |d| {
            let (dim, r) = (300, 16);
            let u: Vec<f64> = random_vec(50, dim * r, -0.3, 0.3)
                .iter()
                .map(|&v| v as f64)
                .collect();
            let g = Gaussian::new(vec![0.5; dim], Dplr::new(vec![0.3; dim], u, r).unwrap()).unwrap();
            let x = on(d, 51, &[7, dim], 3.0);
            vec![
                g.denoise(&x.as_view().unwrap(), 0.7).unwrap(),
                g.posterior_cov_apply(2.0, &x.as_view().unwrap()).unwrap(),
            ]
        },
    );
}
