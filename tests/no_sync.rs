//! No host synchronisation inside a training step or a sampler step, counted on the CPU backend,
//! where `emprior::device::sync_count` counts every place that would be a device-to-host read on
//! a GPU: N TimeMLP training steps between two reads of the training log, and MMPS posterior
//! sampling with a CG tolerance. Also: a non-finite step is reported at the next log read, naming
//! the step, with the parameters of the last good step.

mod common;

use std::sync::Mutex;

use emprior::device::{sync_count, Counts};
use emprior::diffusion::{Denoiser, Network, Sampler, SamplerKind, VeSchedule};
use emprior::nn::TimeMlp;
use emprior::ops::Philox;
use emprior::posterior::{CgConfig, DenseOperators, Mmps, NetworkPrior, ObservationNoise};
use emprior::train::{AdamConfig, LrSchedule, Trainer};
use emprior::{AsView, DType, Device, Tensor};

const CPU: Device = Device::Cpu;

/// The counters are process-wide: the tests of this binary take turns.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn trainer(seed: u64) -> Trainer {
    let den = Denoiser::new(Network::Mlp(TimeMlp::new(5, &[64, 64], 16)));
    let params = den.layout().init(seed, DType::F32, &CPU).unwrap();
    let config = AdamConfig {
        ema: Some(0.99),
        ..AdamConfig::new(LrSchedule::Constant(1e-3))
    };
    Trainer::new(den, params, config, VeSchedule::new(1e-3, 10.0), seed).unwrap()
}

fn batch(step: u64) -> Tensor {
    let mut x = vec![0.0f32; 128 * 5];
    Philox::new(9, step).fill_normal(0, &mut x);
    Tensor::from_f32(&x, &[128, 5], &CPU).unwrap()
}

#[test]
fn training_steps_between_two_log_reads_do_not_synchronise() {
    let _turn = serial();
    let mut t = trainer(1);
    let batches: Vec<Tensor> = (0..12).map(batch).collect();
    t.step(&batches[0].as_view().unwrap()).unwrap();
    assert_eq!(t.take_stats().unwrap().len(), 1);

    let before = Counts::now();
    for x in &batches[1..] {
        t.step(&x.as_view().unwrap()).unwrap();
    }
    let steps = Counts::since(before);
    assert_eq!(steps.syncs, 0, "11 training steps synchronised: {steps:?}");
    // Nor does a step take anything from the host (the batch is already on the device): its
    // noise levels, noise, learning rate and log record all come from the step clock there.
    assert_eq!(steps.uploads, 0, "11 training steps uploaded: {steps:?}");
    assert!(
        steps.ops > 11 * 10,
        "the op counter counts the steps' ops: {steps:?}"
    );

    let log = t.take_stats().unwrap();
    let read = Counts::since(before);
    assert_eq!(read.syncs, 1, "one log read, one synchronisation: {read:?}");
    assert_eq!(log.len(), 11);
    assert!(log
        .iter()
        .enumerate()
        .all(|(i, s)| s.step == i as u64 + 1 && s.loss.is_finite() && s.grad_norm > 0.0 && s.lr == 1e-3));

    // An empty log reads nothing.
    let before = sync_count();
    assert!(t.take_stats().unwrap().is_empty());
    assert_eq!(sync_count(), before);
    // A read of values is counted.
    t.params.to_vec_f32().unwrap();
    assert_eq!(sync_count(), before + 1);
}

#[test]
fn training_is_bit_identical_run_to_run_and_across_log_intervals() {
    let _turn = serial();
    let run = |read_every: usize| {
        let mut t = trainer(2);
        let mut losses = Vec::new();
        for s in 0..9 {
            t.step(&batch(s).as_view().unwrap()).unwrap();
            if (s as usize + 1) % read_every == 0 {
                losses.extend(t.take_stats().unwrap().iter().map(|st| st.loss.to_bits()));
            }
        }
        losses.extend(t.take_stats().unwrap().iter().map(|st| st.loss.to_bits()));
        (
            t.params.to_vec_f32().unwrap(),
            t.weights().to_vec_f32().unwrap(),
            losses,
        )
    };
    let a = run(1);
    assert_eq!(a, run(1));
    assert_eq!(a, run(4));
    assert_eq!(a, run(100));
}

#[test]
fn a_non_finite_step_is_reported_at_the_next_read_and_stops_the_updates() {
    let _turn = serial();
    let good = {
        let mut t = trainer(3);
        for s in 0..3 {
            t.step(&batch(s).as_view().unwrap()).unwrap();
        }
        t.take_stats().unwrap();
        (t.params.to_vec_f32().unwrap(), t.weights().to_vec_f32().unwrap())
    };
    let mut t = trainer(3);
    for s in 0..6 {
        let x = if s == 3 {
            let mut v = batch(s).to_vec_f32().unwrap();
            v[7] = f32::NAN;
            Tensor::from_f32(&v, &[128, 5], &CPU).unwrap()
        } else {
            batch(s)
        };
        // No error at the step itself: nothing is read back.
        t.step(&x.as_view().unwrap()).unwrap();
    }
    let err = t.take_stats().unwrap_err().to_string();
    assert!(
        err.contains("training step 3") && err.contains("loss is NaN"),
        "{err}"
    );
    assert_eq!(
        (t.params.to_vec_f32().unwrap(), t.weights().to_vec_f32().unwrap()),
        good,
        "the parameters and the EMA are those after the last good step"
    );
    // The flag is sticky.
    t.step(&batch(9).as_view().unwrap()).unwrap();
    assert!(t
        .take_stats()
        .unwrap_err()
        .to_string()
        .contains("training step 3"));
}

#[test]
fn mmps_sampling_with_a_cg_tolerance_does_not_synchronise() {
    let _turn = serial();
    let t = trainer(4);
    let den = t.denoiser.clone();
    let prior = NetworkPrior::new(&den, t.weights()).unwrap();
    let n = 64;
    let mut a = vec![0.0f32; n * 2 * 5];
    Philox::new(5, 5).fill_normal(0, &mut a);
    let operator = DenseOperators::new(Tensor::from_f32(&a, &[n, 2, 5], &CPU).unwrap()).unwrap();
    let mut y = vec![0.0f32; n * 2];
    Philox::new(5, 6).fill_normal(0, &mut y);
    let y = Tensor::from_f32(&y, &[n, 2], &CPU).unwrap();
    let noise = ObservationNoise::Scalar(1e-4);
    let sampler = Sampler::new(
        SamplerKind::Pc {
            corrections: 1,
            tau: 0.1,
        },
        4,
        VeSchedule::new(1e-3, 10.0),
        Philox::new(6, 1),
    );
    let cg = CgConfig {
        max_iters: 3,
        rtol: Some(1e-3),
    };
    let sample = |check_every: usize| {
        let mut mmps = Mmps::new(&prior, &operator, &y, &noise, cg);
        mmps.cg_check_every = check_every;
        let before = Counts::now();
        let x = sampler
            .sample(&mut mmps, &[n, 5], None, DType::F32, &CPU)
            .unwrap();
        (Counts::since(before), x.to_vec_f32().unwrap())
    };
    // By default the tolerance is checked every 5 iterations, so 3-iteration solves read nothing.
    let (quiet, _) = sample(emprior::posterior::DEFAULT_CHECK_EVERY);
    assert_eq!(quiet.syncs, 0, "posterior sampling synchronised: {quiet:?}");
    assert_eq!(quiet, sample(emprior::posterior::DEFAULT_CHECK_EVERY).0);
    // Checked every iteration (as before), each of the 9 denoiser calls reads ||b|| and the
    // residuals after iterations 1 and 2 (or only 1, when that already converged).
    let (checked, _) = sample(1);
    assert!(
        (9 * 2..=9 * 3).contains(&checked.syncs),
        "the counter sees the checks: {checked:?}"
    );
    assert!(checked.ops <= quiet.ops, "{checked:?} vs {quiet:?}");
}

/// The U-Net's training step (dropout on, f32 and the bf16 policy): no synchronisation and no
/// upload between two log reads, so nothing it does on the host varies from step to step.
#[test]
fn unet_training_steps_take_nothing_from_the_host() {
    use emprior::nn::UNet;
    use emprior::ops::Precision;
    let _turn = serial();
    for precision in [Precision::F32, Precision::Bf16] {
        let mut net = Network::UNet(UNet::new(common::small_unet_config()).unwrap());
        net.set_precision(precision);
        let den = Denoiser::new(net);
        let params = den.layout().init(4, DType::F32, &CPU).unwrap();
        let config = AdamConfig {
            ema: Some(0.999),
            ..AdamConfig::new(LrSchedule::Linear {
                init: 1e-3,
                end: 1e-4,
                steps: 10,
            })
        };
        let mut t = Trainer::new(den, params, config, VeSchedule::new(1e-3, 1e2), 4).unwrap();
        let x = Tensor::from_f32(
            &common::random_vec(5, 4 * 8 * 8 * 3, -1.0, 1.0),
            &[4, 8, 8, 3],
            &CPU,
        )
        .unwrap();
        t.step(&x.as_view().unwrap()).unwrap();
        let before = Counts::now();
        for _ in 0..3 {
            t.step(&x.as_view().unwrap()).unwrap();
        }
        let steps = Counts::since(before);
        assert_eq!((steps.syncs, steps.uploads), (0, 0), "{precision:?}: {steps:?}");
        let log = t.take_stats().unwrap();
        assert_eq!(log.len(), 4);
        assert!(log.iter().all(|s| s.loss.is_finite() && s.grad_norm > 0.0));
    }
}

/// A stream moving with a step clock draws, at each step, what the fixed stream of that step
/// draws: stream + step x streams per step, offsets + step x elements per step.
#[test]
fn a_stream_moving_with_the_clock_is_the_fixed_stream_of_its_step() {
    use emprior::device::StepClock;
    let clock = StepClock::new(7, &CPU).unwrap();
    let moving = Philox::new(3, 10).moving(clock.link(2, 100));
    let (mut a, mut b) = ([0.0f32; 37], [0.0f32; 37]);
    moving.fill_normal(5, &mut a);
    Philox::new(3, 10 + 7 * 2).fill_normal(5 + 7 * 100, &mut b);
    assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits));
    assert_eq!(moving.at_step(5), (Philox::new(3, 24), 705));
}

/// A sampler step with the MMPS posterior denoiser (a TimeMLP with dense operators and 3 CG
/// iterations; a U-Net with a mask, 1 iteration, f32 and the bf16 policy): after the first step
/// (which reads the noise's floor once) no synchronisation and no upload, so one step recorded
/// in a CUDA graph replays as every later one. The steps driven one by one are the bits of
/// `sample`.
#[test]
fn sampler_steps_take_nothing_from_the_host() {
    use emprior::diffusion::sampler::{BatchPart, Denoise};
    use emprior::nn::UNet;
    use emprior::ops::Precision;
    use emprior::posterior::{LinearOperator, MaskOperator};
    let _turn = serial();
    let pc = SamplerKind::Pc {
        corrections: 1,
        tau: 0.1,
    };
    let cases: Vec<(Network, Vec<usize>, usize, SamplerKind)> = vec![
        (Network::Mlp(TimeMlp::new(5, &[64, 64], 16)), vec![5], 3, pc),
        (
            Network::UNet(UNet::new(common::small_unet_config()).unwrap()),
            vec![8, 8, 3],
            1,
            SamplerKind::Ddpm,
        ),
        (
            Network::UNet(UNet::new(common::small_unet_config()).unwrap()),
            vec![8, 8, 3],
            1,
            pc,
        ),
    ];
    for (i, (net, sample, iters, kind)) in cases.into_iter().enumerate() {
        for precision in [Precision::F32, Precision::Bf16] {
            let mut net = net.clone();
            net.set_precision(precision);
            let den = Denoiser::new(net);
            let params = den.layout().init(4, DType::F32, &CPU).unwrap();
            let prior = NetworkPrior::new(&den, &params).unwrap();
            let n = 6;
            let per: usize = sample.iter().product();
            let operator: Box<dyn LinearOperator> = if sample.len() == 1 {
                let a = common::random_vec(7, n * 2 * per, -1.0, 1.0);
                Box::new(DenseOperators::new(Tensor::from_f32(&a, &[n, 2, per], &CPU).unwrap()).unwrap())
            } else {
                let keep: Vec<f32> = common::random_vec(8, n * 64, 0.0, 1.0)
                    .iter()
                    .map(|&u| (u < 0.5) as u8 as f32)
                    .collect();
                Box::new(MaskOperator::from_pixel_mask(&keep, n, 64, 3, DType::F32, &CPU).unwrap())
            };
            let m = operator.obs_dim();
            let y = Tensor::from_f32(&common::random_vec(9, n * m, -1.0, 1.0), &[n, m], &CPU).unwrap();
            let noise = ObservationNoise::Scalar(1e-3);
            let cg = CgConfig {
                max_iters: iters,
                rtol: None,
            };
            let mut mmps = Mmps::new(&prior, operator.as_ref(), &y, &noise, cg);
            assert!(
                mmps.graph_safe(),
                "case {i}: MMPS over a network, CG without reads"
            );
            let sampler = Sampler::new(kind, 5, VeSchedule::new(1e-3, 10.0), Philox::new(6, 1));
            let shape: Vec<usize> = [n].iter().chain(&sample).copied().collect();
            let mut call = sampler
                .begin(&mut mmps, &shape, BatchPart::whole(n), None, DType::F32, &CPU)
                .unwrap();
            call.step().unwrap();
            let steps = three_steps(&mut call);
            assert_eq!(
                (steps.syncs, steps.uploads),
                (0, 0),
                "case {i} {precision:?}: {steps:?}"
            );
            let stepped = call.finish().unwrap().to_vec_f32().unwrap();
            let whole = sampler
                .sample(&mut mmps, &shape, None, DType::F32, &CPU)
                .unwrap()
                .to_vec_f32()
                .unwrap();
            assert!(stepped.iter().all(|v| v.is_finite()));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&stepped), bits(&whole), "case {i} {precision:?}");
            // DPS, the baseline, over the same prior: its step weights stay on the device too.
            let mut dps = emprior::posterior::Dps {
                prior: &prior,
                operator: operator.as_ref(),
                y: &y,
                zeta: 1.0,
            };
            assert!(dps.graph_safe());
            let mut call = sampler
                .begin(&mut dps, &shape, BatchPart::whole(n), None, DType::F32, &CPU)
                .unwrap();
            let steps = three_steps(&mut call);
            assert_eq!(
                (steps.syncs, steps.uploads),
                (0, 0),
                "DPS, case {i} {precision:?}: {steps:?}"
            );
            assert!(call
                .finish()
                .unwrap()
                .to_vec_f32()
                .unwrap()
                .iter()
                .all(|v| v.is_finite()));
        }
    }
}

/// What three more steps of a sampler call count.
fn three_steps<D: emprior::diffusion::Denoise>(
    call: &mut emprior::diffusion::sampler::SamplerCall<'_, D>,
) -> Counts {
    let before = Counts::now();
    for _ in 0..3 {
        call.step().unwrap();
    }
    Counts::since(before)
}
