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
            &pt.as_view().unwrap().into(),
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

/// n points from a mixture of four Gaussians (std 0.25) at (+-1.2, +-1.2).
fn mixture(seed: u64, n: usize) -> Vec<f64> {
    let mut u = vec![0.0f32; n];
    let mut z = vec![0.0f32; 2 * n];
    Philox::new(seed, 1).fill_uniform(0, &mut u);
    Philox::new(seed, 2).fill_normal(0, &mut z);
    (0..n)
        .flat_map(|i| {
            let k = (u[i] * 4.0) as usize;
            let (cx, cy) = (
                if k & 1 == 0 { -1.2 } else { 1.2 },
                if k & 2 == 0 { -1.2 } else { 1.2 },
            );
            [cx + 0.25 * z[2 * i] as f64, cy + 0.25 * z[2 * i + 1] as f64]
        })
        .collect()
}

#[test]
fn a_time_mlp_trained_by_dsm_reproduces_a_mixture_of_gaussians() {
    use emprior::diffusion::{Sampler, SamplerKind};
    use emprior::metrics::sliced_wasserstein;
    use emprior::posterior::NetworkPrior;
    use emprior::train::Trainer;

    let den = Denoiser::new(Network::Mlp(TimeMlp::new(2, &[128, 128, 128], 32)));
    let params = den.layout().init(1, DType::F32, &CPU).unwrap();
    let schedule = VeSchedule::new(1e-3, 10.0);
    let steps = 2500;
    let config = AdamConfig::new(LrSchedule::Linear {
        init: 2e-3,
        end: 1e-5,
        steps,
    });
    let mut trainer = Trainer::new(den.clone(), params, config, schedule, 7).unwrap();
    let train = mixture(100, 20_000);
    let batch = 256;
    let mut idx = vec![0.0f32; batch];
    for s in 0..steps {
        // Minibatches drawn with replacement, as the manifold experiment does.
        Philox::new(8, 0).fill_uniform(s * batch as u64, &mut idx);
        let x: Vec<f32> = idx
            .iter()
            .flat_map(|&u| {
                let i = ((u * 20_000.0) as usize).min(19_999);
                [train[2 * i] as f32, train[2 * i + 1] as f32]
            })
            .collect();
        let xt = Tensor::from_f32(&x, &[batch, 2], &CPU).unwrap();
        trainer.step(&xt.as_view().unwrap()).unwrap();
    }
    // The losses waited in the training log; one read gives every step's.
    let log = trainer.take_stats().unwrap();
    assert_eq!(log.len(), steps as usize);
    assert!(log.iter().enumerate().all(|(i, st)| st.step == i as u64));
    let first_losses: f64 = log[..100].iter().map(|st| st.loss / 100.0).sum();
    let last_losses: f64 = log[log.len() - 100..].iter().map(|st| st.loss / 100.0).sum();
    // The DSM loss has an irreducible floor (a denoiser cannot undo large noise), so it only
    // falls part of the way; the samples are the real check.
    assert!(
        last_losses < 0.9 * first_losses,
        "the loss falls: {first_losses} -> {last_losses}"
    );

    let n = 2000;
    let sampler = Sampler::new(SamplerKind::Ddpm, 128, schedule, Philox::new(3, 3));
    let sample = |weights: &Tensor| -> Vec<f64> {
        let mut prior = NetworkPrior::new(&den, weights).unwrap();
        sampler
            .sample(&mut prior, &[n, 2], None, DType::F32, &CPU)
            .unwrap()
            .to_vec_f32()
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect()
    };
    let generated = sample(trainer.weights());
    let untrained = sample(&den.layout().init(1, DType::F32, &CPU).unwrap());
    let (held_a, held_b) = (mixture(200, n), mixture(300, n));
    let floor = sliced_wasserstein(&held_a, &held_b, 2, 64, 1);
    let trained = sliced_wasserstein(&generated, &held_a, 2, 64, 1);
    let before = sliced_wasserstein(&untrained, &held_a, 2, 64, 1);
    println!("sliced W1: held-out vs held-out {floor:.4}, trained {trained:.4}, untrained {before:.4}");
    // Within twice the sampling noise of two held-out sets (measured: at it), far from untrained.
    assert!(
        trained < 2.0 * floor + 0.01,
        "trained model: sliced W1 {trained:.4} (floor {floor:.4})"
    );
    assert!(
        trained < 0.25 * before,
        "training must help: {trained:.4} vs untrained {before:.4}"
    );
    // Every mode is populated in about the right proportion.
    for k in 0..4 {
        let (sx, sy) = (
            if k & 1 == 0 { -1.0 } else { 1.0 },
            if k & 2 == 0 { -1.0 } else { 1.0 },
        );
        let count = (0..n)
            .filter(|&i| generated[2 * i] * sx > 0.0 && generated[2 * i + 1] * sy > 0.0)
            .count();
        let share = count as f64 / n as f64;
        assert!(
            (share - 0.25).abs() < 0.06,
            "mode {k} holds {share:.3} of the samples"
        );
    }
}

#[test]
fn sinkhorn_and_sliced_wasserstein_behave_like_distances() {
    use emprior::metrics::{sinkhorn_cost, sliced_wasserstein};
    let a: Vec<f64> = mixture(1, 256);
    let b: Vec<f64> = mixture(2, 256);
    let shifted: Vec<f64> = a.iter().map(|v| v + 0.5).collect();
    let same = sinkhorn_cost(&a, &b, 2, 1e-3, 1024, 1e-3);
    let moved = sinkhorn_cost(&a, &shifted, 2, 1e-3, 1024, 1e-3);
    // Translating every point by (0.5, 0.5) costs |t|^2 = 0.5 per point under the optimal plan.
    assert!((moved - 0.5).abs() < 0.02, "translation cost {moved}");
    assert!(
        same < 0.2 * moved,
        "two samples of one law are closer than a translate: {same} vs {moved}"
    );
    let self_cost = sinkhorn_cost(&a, &a, 2, 1e-3, 1024, 1e-3);
    assert!(self_cost < 1e-3, "a cloud against itself: {self_cost}");
    let sw = sliced_wasserstein(&a, &shifted, 2, 128, 0);
    // Projected translation: E|<t, u>| over unit u = |t| 2/pi = 0.45.
    assert!((sw - 0.45).abs() < 0.05, "sliced W1 of a translate {sw}");
}

#[test]
fn augmentation_flips_and_shifts_with_reflect_padding() {
    use emprior::train::augment::{choices, flip_shift};
    let (n, h, w, c) = (64, 5, 6, 2);
    let x: Vec<f64> = (0..n * h * w * c).map(|v| v as f64).collect();
    let xt = Tensor::from_f64(&x, &[n, h, w, c], &CPU).unwrap();
    let rng = Philox::new(4, 2);
    let y = flip_shift(&xt.as_view().unwrap(), 1, rng)
        .unwrap()
        .to_vec_f64()
        .unwrap();
    // numpy's 'reflect' padding: index -1 reads 1, index size reads size - 2.
    let reflect = |i: i64, size: i64| {
        if i < 0 {
            -i
        } else if i >= size {
            2 * (size - 1) - i
        } else {
            i
        }
    };
    let (mut flips, mut shifts) = (0, [0usize; 3]);
    for img in 0..n {
        let (flip, dy, dx) = choices(rng, img as u64, 1);
        flips += flip as usize;
        shifts[(dy + 1) as usize] += 1;
        for yy in 0..h {
            for xx in 0..w {
                let sy = reflect(yy as i64 + dy, h as i64) as usize;
                let mut sx = reflect(xx as i64 + dx, w as i64) as usize;
                if flip {
                    sx = w - 1 - sx;
                }
                for ch in 0..c {
                    assert_eq!(
                        y[((img * h + yy) * w + xx) * c + ch],
                        x[((img * h + sy) * w + sx) * c + ch]
                    );
                }
            }
        }
    }
    assert!(
        (20..=44).contains(&flips),
        "about half the images are flipped: {flips}"
    );
    assert!(shifts.iter().all(|&s| s >= 10), "every shift occurs: {shifts:?}");
    let err = flip_shift(&xt.as_view().unwrap(), 5, rng)
        .unwrap_err()
        .to_string();
    assert!(err.contains("shift of 5"), "{err}");
}

#[test]
fn adam_refuses_a_non_positive_clipping_threshold() {
    let mut p = Tensor::from_f64(&[1.0], &[1], &CPU).unwrap();
    let config = AdamConfig {
        clip: Some(0.0),
        ..AdamConfig::new(LrSchedule::Constant(0.1))
    };
    let err = Adam::new(config, &p).err().expect("refused").to_string();
    assert!(err.contains("clipping threshold"), "{err}");
    // Changed after construction, it is refused by the update too.
    let mut adam = Adam::new(AdamConfig::new(LrSchedule::Constant(0.1)), &p).unwrap();
    adam.config.clip = Some(f64::NAN);
    let g = Tensor::from_f64(&[1.0], &[1], &CPU).unwrap();
    let err = adam.update(&mut p, &g).unwrap_err().to_string();
    assert!(err.contains("clipping threshold"), "{err}");
}

/// Every Adam hyper-parameter out of range is refused before any step, naming the value and
/// its range (an EMA decay of 2 used to produce NaN weights that were then saved).
#[test]
fn adam_refuses_out_of_range_hyper_parameters() {
    let p = Tensor::from_f64(&[1.0], &[1], &CPU).unwrap();
    let base = AdamConfig::new(LrSchedule::Constant(0.1));
    let cases: [(AdamConfig, &str); 6] = [
        (
            AdamConfig {
                ema: Some(2.0),
                ..base
            },
            "ema = 2 must be in [0, 1)",
        ),
        (
            AdamConfig {
                ema: Some(f64::NAN),
                ..base
            },
            "ema = NaN",
        ),
        (AdamConfig { beta1: 1.0, ..base }, "beta1 = 1 must be in [0, 1)"),
        (AdamConfig { beta2: -0.5, ..base }, "beta2 = -0.5"),
        (AdamConfig { eps: 0.0, ..base }, "eps = 0 must be positive"),
        (
            AdamConfig::new(LrSchedule::Constant(-1e-3)),
            "lr = -0.001 must be positive",
        ),
    ];
    for (config, want) in cases {
        let err = Adam::new(config, &p).err().expect("refused").to_string();
        assert!(err.contains(want), "{err} (wanted: {want})");
    }
}

/// On the CPU a training step runs its batch in row parts (`Trainer::cpu_part_rows`), each with
/// its own gradient, added in part order: the same bits on one thread and on two, and the same
/// step as the batch in one piece up to the sum's rounding.
#[test]
fn training_steps_in_parts_match_the_whole_batch() {
    use emprior::train::Trainer;
    let (b, f) = (300usize, 5usize);
    let x = Tensor::from_f32(&random_vec(41, b * f, -2.0, 2.0), &[b, f], &CPU).unwrap();
    let run = |parts: Option<usize>, threads: usize| -> (Vec<f32>, Vec<f64>) {
        let den = Denoiser::new(Network::Mlp(TimeMlp::new(f, &[64, 64], 16)));
        let params = den.layout().init(3, DType::F32, &CPU).unwrap();
        let cfg = AdamConfig::new(LrSchedule::Constant(1e-3));
        let mut t = Trainer::new(den, params, cfg, VeSchedule::new(1e-3, 10.0), 9).unwrap();
        t.cpu_part_rows = parts;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for _ in 0..3 {
                t.step(&x.as_view().unwrap()).unwrap();
            }
        });
        let losses = t.take_stats().unwrap().iter().map(|s| s.loss).collect();
        (t.params.to_vec_f32().unwrap(), losses)
    };
    let (whole, whole_loss) = run(None, 2);
    let (one, one_loss) = run(Some(64), 1);
    let (two, two_loss) = run(Some(64), 2);
    assert!(
        one.iter().zip(&two).all(|(a, b)| a.to_bits() == b.to_bits()),
        "1 vs 2 threads"
    );
    assert_eq!(one_loss, two_loss);
    let worst = one
        .iter()
        .zip(&whole)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "parts vs whole: parameters differ by {worst}");
    for (p, w) in one_loss.iter().zip(&whole_loss) {
        assert!((p - w).abs() <= 1e-5 * w.abs(), "loss {p} vs {w}");
    }
}

/// Dropout in a batch part draws each row's masks where the whole batch would (Mode::Train's
/// first_row): a U-Net's training forward on rows 1..3 is rows 1..3 of the whole forward.
#[test]
fn dropout_masks_of_a_part_are_the_whole_batchs() {
    use emprior::nn::UNet;
    let (n, per) = (4usize, 8 * 8 * 3);
    let den = Denoiser::new(Network::UNet(UNet::new(common::small_unet_config()).unwrap()));
    let params = den.layout().init(5, DType::F32, &CPU).unwrap();
    let x = random_vec(42, n * per, -1.0, 1.0);
    let forward = |lo: usize, hi: usize| {
        let xt = Tensor::from_f32(&x[lo * per..hi * per], &[hi - lo, 8, 8, 3], &CPU).unwrap();
        let mode = Mode::Train {
            rng: Philox::new(6, 7),
            first_row: lo as u64,
        };
        let sigmas = vec![0.5; hi - lo];
        let (y, _) = den
            .denoise(
                &params.as_view().unwrap().into(),
                &xt.as_view().unwrap(),
                &sigmas,
                mode,
            )
            .unwrap();
        y.to_vec_f32().unwrap()
    };
    let (whole, part) = (forward(0, n), forward(1, 3));
    assert!(
        whole[per..3 * per]
            .iter()
            .zip(&part)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "a part's dropout masks differ from the whole batch's"
    );
    let eval = {
        let xt = Tensor::from_f32(&x[per..3 * per], &[2, 8, 8, 3], &CPU).unwrap();
        let (y, _) = den
            .denoise(
                &params.as_view().unwrap().into(),
                &xt.as_view().unwrap(),
                &[0.5, 0.5],
                Mode::Eval,
            )
            .unwrap();
        y.to_vec_f32().unwrap()
    };
    assert_ne!(eval, part, "dropout was active (p = 0.1 in the small U-Net)");
}

/// Data-parallel steps (`Trainer::step_shard`) on 2 and 3 ranks (threads over channels,
/// `dist::threads`), each with its share of whole parts, take the same steps as one process
/// running the whole batch in the same parts: the same bits, not only close.
#[test]
fn data_parallel_steps_on_thread_ranks_are_one_process_bits() {
    use emprior::dist::{threads, Communicator};
    use emprior::train::Trainer;
    let (b, f, part) = (300usize, 5usize, 64usize);
    let x = random_vec(43, b * f, -2.0, 2.0);
    let trainer = || {
        let den = Denoiser::new(Network::Mlp(TimeMlp::new(f, &[64, 64], 16)));
        let params = den.layout().init(3, DType::F32, &CPU).unwrap();
        let cfg = AdamConfig::new(LrSchedule::Constant(1e-3));
        let mut t = Trainer::new(den, params, cfg, VeSchedule::new(1e-3, 10.0), 9).unwrap();
        t.cpu_part_rows = Some(part);
        t
    };
    let mut one = trainer();
    let whole = Tensor::from_f32(&x, &[b, f], &CPU).unwrap();
    for _ in 0..3 {
        one.step(&whole.as_view().unwrap()).unwrap();
    }
    let one_losses: Vec<f64> = one.take_stats().unwrap().iter().map(|s| s.loss).collect();
    let one = one.params.to_vec_f32().unwrap();
    for world in [2, 3] {
        let results: Vec<(Vec<f32>, Vec<f64>)> = std::thread::scope(|s| {
            let handles: Vec<_> = threads::ranks(world)
                .into_iter()
                .map(|rank| {
                    let x = &x;
                    s.spawn(move || {
                        let mut t = trainer();
                        let mine = t.shard_rows(b, &rank, &CPU).unwrap();
                        let local =
                            Tensor::from_f32(&x[mine.start * f..mine.end * f], &[mine.len(), f], &CPU)
                                .unwrap();
                        for _ in 0..3 {
                            t.step_shard(
                                &local.as_view().unwrap(),
                                b,
                                mine.start,
                                &rank as &dyn Communicator,
                            )
                            .unwrap();
                        }
                        let losses = t.take_stats().unwrap().iter().map(|s| s.loss).collect();
                        (t.params.to_vec_f32().unwrap(), losses)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, (params, losses)) in results.iter().enumerate() {
            assert!(
                params.iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits()),
                "world {world}, rank {r}: parameters differ from one process's"
            );
            assert_eq!(losses, &one_losses, "world {world}, rank {r}");
        }
    }
}

/// The bf16 copy the bf16 policy's layers read (`nn::Weights`): Adam rewrites it in its own pass
/// at every step, so it is always the parameters rounded to bf16 (the bits of a fresh cast), a
/// skipped step leaves both alone, and only f32 parameters of its own length are taken.
#[test]
fn adam_keeps_the_bf16_copy_of_the_parameters_it_updates() {
    use emprior::ops::precision::to_bf16;
    let n = 4099;
    let mut p = Tensor::from_f32(&random_vec(1, n, -1.0, 1.0), &[n], &CPU).unwrap();
    let config = AdamConfig {
        ema: Some(0.99),
        ..AdamConfig::new(LrSchedule::Constant(1e-2))
    };
    let mut adam = Adam::new(config, &p).unwrap();
    assert!(adam.bf16_copy().is_none(), "no copy until asked for");
    adam.keep_bf16_copy(&p).unwrap();
    let copy_bits = |adam: &Adam| -> Vec<u16> {
        let c = adam.bf16_copy().expect("kept");
        c.cpu_bf16().unwrap().iter().map(|b| b.to_bits()).collect()
    };
    let cast_bits = |p: &Tensor| -> Vec<u16> {
        to_bf16(p)
            .unwrap()
            .cpu_bf16()
            .unwrap()
            .iter()
            .map(|b| b.to_bits())
            .collect()
    };
    assert_eq!(copy_bits(&adam), cast_bits(&p));
    for s in 0..3 {
        let before = cast_bits(&p);
        let g = Tensor::from_f32(&random_vec(10 + s, n, -1.0, 1.0), &[n], &CPU).unwrap();
        adam.update(&mut p, &g).unwrap();
        let after = cast_bits(&p);
        assert_eq!(copy_bits(&adam), after, "step {s}");
        assert_ne!(before, after, "step {s} moved the rounded weights");
    }
    // A non-finite gradient: the step is refused and neither buffer moves.
    let kept = (p.to_vec_f32().unwrap(), copy_bits(&adam));
    let mut bad = random_vec(20, n, -1.0, 1.0);
    bad[7] = f32::NAN;
    let g = Tensor::from_f32(&bad, &[n], &CPU).unwrap();
    assert!(adam.update(&mut p, &g).is_err());
    assert_eq!((p.to_vec_f32().unwrap(), copy_bits(&adam)), kept);

    let p64 = Tensor::from_f64(&[1.0; 4], &[4], &CPU).unwrap();
    let mut adam64 = Adam::new(AdamConfig::new(LrSchedule::Constant(0.1)), &p64).unwrap();
    let err = adam64.keep_bf16_copy(&p64).unwrap_err().to_string();
    assert!(err.contains("f32 parameters"), "{err}");
    let short = Tensor::from_f32(&[1.0; 3], &[3], &CPU).unwrap();
    let err = adam.keep_bf16_copy(&short).unwrap_err().to_string();
    assert!(err.contains("parameters"), "{err}");
    // Updating other parameters than those the copy was made for is refused before any work.
    let mut other = Tensor::from_f32(&[0.5; 8], &[8], &CPU).unwrap();
    let g8 = Tensor::from_f32(&[0.1; 8], &[8], &CPU).unwrap();
    let mut small = Adam::new(AdamConfig::new(LrSchedule::Constant(0.1)), &other).unwrap();
    small
        .keep_bf16_copy(&Tensor::from_f32(&[0.5; 8], &[8], &CPU).unwrap())
        .unwrap();
    small.update(&mut other, &g8).unwrap();
    let mut wrong = Tensor::from_f32(&[0.5; 9], &[9], &CPU).unwrap();
    let g9 = Tensor::from_f32(&[0.1; 9], &[9], &CPU).unwrap();
    assert!(small.update(&mut wrong, &g9).is_err());
}

/// The training log past its first buffer: the records a step files at the device's count, its
/// loss taken from the header, keep their order and values when the buffer grows between two
/// reads, and the count starts again after a read.
#[test]
fn the_training_log_files_every_record_across_a_growth() {
    use emprior::train::StepLog;
    let cpu = Device::Cpu;
    let mut p = Tensor::from_f32(&[0.5, -0.25, 1.0, 2.0], &[4], &cpu).unwrap();
    let g = Tensor::from_f32(&[0.1, 0.2, -0.3, 0.4], &[4], &cpu).unwrap();
    let config = AdamConfig::new(LrSchedule::Linear {
        init: 1e-3,
        end: 0.0,
        steps: 1000,
    });
    let mut adam = Adam::new(config, &p).unwrap();
    let mut log = StepLog::new(DType::F32, &cpu).unwrap();
    let first = log.capacity();
    for round in 0..2u64 {
        let steps = if round == 0 { first + 5 } else { 3 };
        for _ in 0..steps {
            let step = adam.steps();
            let slot = log.begin(step, config.lr.at(step)).unwrap();
            log.with_loss(|l| emprior::ops::fill(l, step as f32)).unwrap();
            adam.update_logged(&mut p, &g, &mut log, slot).unwrap();
        }
        let records = log.take().unwrap();
        assert_eq!(records.len(), steps);
        let base = if round == 0 { 0 } else { first as u64 + 5 };
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.step, base + i as u64);
            assert_eq!(
                r.loss,
                (base + i as u64) as f32 as f64,
                "record {i} of round {round}"
            );
            assert!((r.grad_norm - 0.3f64.sqrt()).abs() < 1e-6);
        }
    }
    assert!(log.capacity() > first, "the log grew");
    assert_eq!(adam.steps(), first as u64 + 8);
}
