//! Tier 2 for training and sampling: the GPU against the CPU from the same seeds (the same
//! Philox streams on both): sampler updates, Adam, the DSM gradient and one training step of a
//! TimeMLP (tensor by tensor), a few DDPM + MMPS steps with a U-Net and with a TimeMLP, and the
//! Gaussian prior's solves. f32 tolerances per output (see `common::compare_outputs`).
//!
//! Own harness (`common::Suite`): without a GPU the GPU trials are reported as ignored, and under
//! EMPRIOR_REQUIRE_GPU=1 they fail. The `harness::` trials run everywhere: the oracle must be
//! reproducible from its seeds, and the tolerances must tell a wrong random stream from the
//! right one.

mod common;

use common::{case, compare_outputs, on, per_param, random_vec, whole, Case, Output, Suite, Tol};
use emprior::device::StepClock;
use emprior::diffusion::loss::dsm_loss;
use emprior::diffusion::sampler::{sampler_step, table, BatchPart, Denoise};
use emprior::diffusion::{Denoiser, Network, Sampler, SamplerKind, VeSchedule};
use emprior::gaussian::{Dplr, Gaussian};
use emprior::nn::{Mode, TimeMlp, UNet, Weights};
use emprior::ops::precision::{to_bf16, to_f32};
use emprior::ops::{axpy, Philox};
use emprior::posterior::{
    column_masks, CgConfig, DenseOperators, FourierOperator, LinearOperator, MaskOperator, Mmps,
    NetworkPrior, ObservationNoise,
};
use emprior::train::{Adam, AdamConfig, LrSchedule, Trainer};
use emprior::{AsView, AsViewMut, DType, Device, Tensor};

const CPU: Device = Device::Cpu;

const SAMPLER_TOL: Tol = Tol::norm(1e-6);
const MMPS_TOL: Tol = Tol::norm(1e-4);

const CASES: [Case; 8] = [
    case(
        "sampler::update_with_and_without_noise",
        "sampler update with and without noise",
        SAMPLER_TOL,
        |d| sampler_case(d, 5),
    ),
    case(
        "train::adam_clipping_ema_three_steps",
        "Adam with clipping and EMA, three steps",
        Tol::norm(1e-6),
        adam_case,
    ),
    case(
        "train::timemlp_dsm_gradient_and_step",
        "TimeMLP: DSM gradient and one training step",
        Tol::norm(1e-5),
        dsm_case,
    ),
    case(
        "train::timemlp_log_and_non_finite_flag",
        "TimeMLP: four steps' losses and norms from the device log, then a NaN step that stops the updates",
        Tol::norm(1e-5),
        train_log_case,
    ),
    case(
        "mmps::ddpm_small_unet_masks",
        "DDPM + MMPS (1 CG iteration), small U-Net with masks",
        MMPS_TOL,
        |d| ddpm_mmps_case(d, 7),
    ),
    case(
        "mmps::pc_timemlp_dense_operators",
        "PC + MMPS (3 CG iterations), TimeMLP with per-observation operators",
        MMPS_TOL,
        pc_mmps_case,
    ),
    case(
        "mri::fourier_operator_products_against_the_fft",
        "MRI operator: A x and A^T v by the GPU's GEMM products against rustfft on the CPU (64x40, 320x320)",
        Tol::norm(1e-5),
        fourier_case,
    ),
    case(
        "gaussian::denoiser_and_woodbury_covariance",
        "Gaussian prior: denoiser and posterior covariance (Woodbury)",
        Tol::norm(1e-5),
        gaussian_case,
    ),
];

fn main() {
    let mut s = Suite::from_args();
    s.parity_cases(&CASES);
    // Alone: a capture records everything queued on the device's one stream meanwhile.
    s.gpu_alone(
        "graphs::training_steps_replayed_from_a_cuda_graph_are_the_eager_bits",
        graph_replay_is_eager,
    );
    s.gpu_alone(
        "graphs::sampler_steps_replayed_from_a_cuda_graph_are_the_eager_bits",
        sampler_replay_is_eager,
    );
    s.cpu("harness::cpu_oracle_is_reproducible", oracle_is_reproducible);
    s.cpu(
        "harness::sampler_noise_from_another_stream_is_caught",
        another_sampler_stream_is_caught,
    );
    s.cpu(
        "harness::ddpm_mmps_from_another_seed_is_caught",
        another_ddpm_seed_is_caught,
    );
    s.run()
}

/// Two sampler updates at step 1 of a step clock, their (a, c) from row 1 of a table: with
/// noise from Philox stream (4, `stream`) moved 13 elements per step, and without noise.
fn sampler_case(d: &Device, stream: u64) -> Vec<Output> {
    let mut rows = vec![9.0; 2 * table::WIDTH];
    rows[table::WIDTH + table::PREDICTOR..][..2].copy_from_slice(&[0.3, 0.7]);
    rows[table::WIDTH + table::CORRECTOR..][..2].copy_from_slice(&[0.1, 0.0]);
    let coefficients = Tensor::from_f64_as(&rows, &[2, table::WIDTH], DType::F32, d).unwrap();
    let clock = StepClock::new(1, d).unwrap();
    let rng = Philox::new(4, stream).moving(clock.link(0, 13));
    let t = coefficients.as_view().unwrap();
    let mut x = on(d, 1, &[3, 1001], 2.0);
    let den = on(d, 2, &[3, 1001], 1.0);
    sampler_step(&mut x, &den, &t, table::PREDICTOR, rng, 17).unwrap();
    let mut y = on(d, 3, &[3, 1001], 2.0);
    sampler_step(&mut y, &den, &t, table::CORRECTOR, rng, 0).unwrap();
    vec![whole("with noise", x), whole("without noise", y)]
}

fn adam_case(d: &Device) -> Vec<Output> {
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
    // The bf16 copy of the parameters that adam_step_f32 writes in the same pass.
    adam.keep_bf16_copy(&p).unwrap();
    for s in 0..3 {
        let g = on(d, 10 + s, &[5000], if s == 0 { 0.01 } else { 1.0 });
        adam.update(&mut p, &g).unwrap();
    }
    let ema = adam.ema().unwrap().to_device(d).unwrap();
    let copy = to_f32(adam.bf16_copy().unwrap()).unwrap();
    // On each device the copy is the cast of that device's parameters, bit for bit: zero.
    let mut off = to_f32(&to_bf16(&p).unwrap()).unwrap();
    axpy(-1.0, &copy, &mut off).unwrap();
    vec![
        whole("params", p),
        whole("ema", ema),
        whole("bf16 copy", copy),
        whole("bf16 copy - cast of the params", off),
    ]
}

/// The DSM loss's parameter gradient (dropout on), then one training step: both in the
/// network's layout, compared parameter tensor by parameter tensor.
fn dsm_case(d: &Device) -> Vec<Output> {
    let den = Denoiser::new(Network::Mlp(TimeMlp::new(5, &[64, 64], 16)));
    let params = den.layout().init(1, DType::F32, d).unwrap();
    let x = on(d, 20, &[128, 5], 2.0);
    let z = on(d, 21, &[128, 5], 1.0);
    let sigmas: Vec<f64> = random_vec(22, 128, -6.0, 4.0)
        .iter()
        .map(|&l| (l as f64).exp())
        .collect();
    let mut g = Tensor::zeros(&[den.layout().len()], DType::F32, d).unwrap();
    let mode = Mode::Train {
        rng: Philox::new(23, 24),
        first_row: 0,
    };
    let (pv, xv, zv) = (
        params.as_view().unwrap(),
        x.as_view().unwrap(),
        z.as_view().unwrap(),
    );
    let loss = dsm_loss(
        &den,
        &Weights::from(&pv),
        &xv,
        &sigmas,
        &zv,
        mode,
        Some(&mut g.as_view_mut().unwrap()),
    )
    .unwrap();
    let loss = Tensor::from_f32(&[loss as f32], &[1], d).unwrap();

    let layout = den.layout().clone();
    let config = AdamConfig::new(LrSchedule::Constant(1e-3));
    let mut trainer = Trainer::new(den, params, config, VeSchedule::new(1e-3, 10.0), 3).unwrap();
    trainer.step(&xv).unwrap();
    vec![
        whole("loss", loss),
        per_param("dsm grads", g, &layout),
        per_param("params after one step", trainer.params, &layout),
    ]
}

/// Four training steps read from the log in one go (losses and gradient norms reduced on the
/// device: kernels/reduce.cu and adam.cu's norm finish), then three more with a NaN in the second
/// batch and one after it: the read names step 5, and the parameters and the EMA stay those of
/// step 4.
/// Training with each step replayed from a captured CUDA graph (Trainer::set_cuda_graphs) gives
/// the eager steps' bits: parameters, EMA, and every logged loss and gradient norm, for the
/// TimeMLP and for a small U-Net with dropout (whose masks move with the step clock), across a
/// log read in the middle and a batch of another size (a second capture). On the CPU stand-in
/// the setting is ignored, so this checks only the test code there.
fn graph_replay_is_eager(d: &Device) {
    let nets = [
        (
            Denoiser::new(Network::Mlp(TimeMlp::new(5, &[64, 64], 16))),
            vec![5usize],
        ),
        (
            Denoiser::new(Network::UNet(UNet::new(common::small_unet_config()).unwrap())),
            vec![8, 8, 3],
        ),
    ];
    for (den, sample) in nets {
        let run = |graphs: bool| {
            let params = den.layout().init(6, DType::F32, d).unwrap();
            let config = AdamConfig {
                ema: Some(0.999),
                ..AdamConfig::new(LrSchedule::Linear {
                    init: 1e-3,
                    end: 1e-4,
                    steps: 8,
                })
            };
            let mut t = Trainer::new(den.clone(), params, config, VeSchedule::new(1e-3, 1e2), 7).unwrap();
            t.set_cuda_graphs(graphs);
            let mut log = Vec::new();
            for s in 0..9u64 {
                let rows = if s < 6 { 8 } else { 4 };
                let shape: Vec<usize> = [rows].iter().chain(&sample).copied().collect();
                t.step(&on(d, 60 + s, &shape, 1.0).as_view().unwrap()).unwrap();
                if s == 3 || s == 8 {
                    log.extend(
                        t.take_stats()
                            .unwrap()
                            .iter()
                            .flat_map(|st| [st.step as f64, st.loss, st.grad_norm, st.lr]),
                    );
                }
            }
            if graphs && d.is_cuda() {
                assert!(t.replaying_cuda_graph(), "the steps ended on a replayed graph");
            }
            let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            (
                bits(t.params.to_vec_f32().unwrap()),
                bits(t.weights().to_vec_f32().unwrap()),
                log.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            )
        };
        let (eager, replayed) = (run(false), run(true));
        assert!(eager.2.len() == 9 * 4, "nine logged steps");
        assert!(eager == replayed, "graph replay differs from the eager steps");
    }
}

/// Posterior sampling with the MMPS denoiser, eager and with its steps replayed from a CUDA
/// graph (the second step recorded, the later ones replays): the same bits. DDPM with a small
/// U-Net under the bf16 policy behind a mask (1 CG iteration) and PC with a TimeMLP behind dense
/// operators (3 iterations), each batch in two parts (each part its own call and graph). On the
/// CPU stand-in the setting is ignored, so this checks only the test code there.
fn sampler_replay_is_eager(d: &Device) {
    use emprior::ops::Precision;
    let pc = SamplerKind::Pc {
        corrections: 1,
        tau: 0.1,
    };
    let mut unet = Network::UNet(UNet::new(common::small_unet_config()).unwrap());
    unet.set_precision(Precision::Bf16);
    let cases = [
        (unet, vec![8usize, 8, 3], 1, SamplerKind::Ddpm),
        (Network::Mlp(TimeMlp::new(5, &[64, 64], 16)), vec![5], 3, pc),
    ];
    for (net, sample, iters, kind) in cases {
        let den = Denoiser::new(net);
        let params = den.layout().init(5, DType::F32, d).unwrap();
        let prior = NetworkPrior::new(&den, &params).unwrap();
        let (n, per) = (6, sample.iter().product::<usize>());
        let dense = on(d, 70, &[n, 2, per], 1.0);
        let keep: Vec<f32> = random_vec(71, n * 64, 0.0, 1.0)
            .iter()
            .map(|&u| (u < 0.5) as u8 as f32)
            .collect();
        let m = if sample.len() == 1 { 2 } else { per };
        let y = on(d, 72, &[n, m], 1.0);
        let noise = ObservationNoise::Scalar(1e-3);
        let cg = CgConfig {
            max_iters: iters,
            rtol: None,
        };
        let run = |graphs: bool| {
            let mut sampler = Sampler::new(kind, 6, VeSchedule::new(1e-3, 10.0), Philox::new(8, 3));
            sampler.cuda_graphs = graphs;
            let mut out = Vec::new();
            for (lo, hi) in [(0, 4), (4, n)] {
                let rows = hi - lo;
                let rows_of = |t: &Tensor, width: usize| {
                    let mut shape = t.shape().to_vec();
                    shape[0] = rows;
                    t.as_view()
                        .unwrap()
                        .sub(lo * width, &shape)
                        .unwrap()
                        .to_tensor()
                        .unwrap()
                };
                let part_y = rows_of(&y, m);
                let operator: Box<dyn LinearOperator> = if sample.len() == 1 {
                    Box::new(DenseOperators::new(rows_of(&dense, 2 * per)).unwrap())
                } else {
                    let mask = &keep[lo * 64..hi * 64];
                    Box::new(MaskOperator::from_pixel_mask(mask, rows, 64, 3, DType::F32, d).unwrap())
                };
                let mut mmps = Mmps::new(&prior, operator.as_ref(), &part_y, &noise, cg);
                assert!(mmps.graph_safe());
                let shape: Vec<usize> = [rows].iter().chain(&sample).copied().collect();
                let part = BatchPart { first: lo, total: n };
                let mut call = sampler
                    .begin(&mut mmps, &shape, part, None, DType::F32, d)
                    .unwrap();
                while call.steps_left() > 0 {
                    call.step().unwrap();
                }
                if graphs && d.is_cuda() {
                    assert!(call.replaying(), "the steps ended on a replayed graph");
                }
                out.extend(call.finish().unwrap().to_vec_f32().unwrap());
            }
            out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        let (eager, replayed) = (run(false), run(true));
        assert_eq!(eager.len(), n * per);
        assert!(eager == replayed, "graph replay differs from the eager steps");
    }
}

fn train_log_case(d: &Device) -> Vec<Output> {
    let den = Denoiser::new(Network::Mlp(TimeMlp::new(5, &[64, 64], 16)));
    let params = den.layout().init(5, DType::F32, d).unwrap();
    let layout = den.layout().clone();
    let config = AdamConfig {
        ema: Some(0.99),
        ..AdamConfig::new(LrSchedule::Constant(1e-3))
    };
    let mut trainer = Trainer::new(den, params, config, VeSchedule::new(1e-3, 10.0), 4).unwrap();
    for s in 0..4 {
        let x = on(d, 40 + s, &[256, 5], 2.0);
        trainer.step(&x.as_view().unwrap()).unwrap();
    }
    let log: Vec<f32> = trainer
        .take_stats()
        .unwrap()
        .iter()
        .flat_map(|st| [st.loss as f32, st.grad_norm as f32])
        .collect();
    trainer
        .step(&on(d, 44, &[256, 5], 2.0).as_view().unwrap())
        .unwrap();
    let good = (
        trainer.params.to_vec_f32().unwrap(),
        trainer.weights().to_vec_f32().unwrap(),
    );
    let mut bad = on(d, 45, &[256, 5], 2.0).to_vec_f32().unwrap();
    bad[3] = f32::NAN;
    trainer
        .step(&Tensor::from_f32(&bad, &[256, 5], d).unwrap().as_view().unwrap())
        .unwrap();
    trainer
        .step(&on(d, 46, &[256, 5], 2.0).as_view().unwrap())
        .unwrap();
    let err = trainer.take_stats().unwrap_err().to_string();
    assert!(
        err.contains("training step 5") && err.contains("loss is NaN"),
        "{err}"
    );
    assert!(
        (
            trainer.params.to_vec_f32().unwrap(),
            trainer.weights().to_vec_f32().unwrap()
        ) == good,
        "the NaN step and the one after it left the parameters and the EMA alone"
    );
    vec![
        whole(
            "loss and gradient norm of steps 0..4",
            Tensor::from_f32(&log, &[4, 2], d).unwrap(),
        ),
        per_param(
            "params after the NaN step",
            trainer.params.to_device(d).unwrap(),
            &layout,
        ),
        per_param(
            "EMA after the NaN step",
            trainer.weights().to_device(d).unwrap(),
            &layout,
        ),
    ]
}

/// Four DDPM steps with MMPS guidance (1 CG iteration) through a small U-Net, under pixel masks;
/// the sampler draws from Philox (6, `stream`).
fn ddpm_mmps_case(d: &Device, stream: u64) -> Vec<Output> {
    let den = Denoiser::new(Network::UNet(UNet::new(common::small_unet_config()).unwrap()));
    let params = den.layout().init(2, DType::F32, d).unwrap();
    let b = 4;
    let bits: Vec<f32> = random_vec(30, b * 64, 0.0, 1.0)
        .iter()
        .map(|&u| (u > 0.5) as u8 as f32)
        .collect();
    let mask = MaskOperator::from_pixel_mask(&bits, b, 64, 3, DType::F32, d).unwrap();
    let y = on(d, 31, &[b, 192], 1.0);
    let noise = ObservationNoise::Scalar(1e-6);
    let prior = NetworkPrior::new(&den, &params).unwrap();
    let cg = CgConfig {
        max_iters: 1,
        rtol: None,
    };
    let mut mmps = Mmps::new(&prior, &mask, &y, &noise, cg);
    let sampler = Sampler::new(
        SamplerKind::Ddpm,
        4,
        VeSchedule::new(1e-3, 1e2),
        Philox::new(6, stream),
    );
    let x = sampler
        .sample(&mut mmps, &[b, 8, 8, 3], None, DType::F32, d)
        .unwrap();
    vec![whole("samples", x)]
}

fn pc_mmps_case(d: &Device) -> Vec<Output> {
    let den = Denoiser::new(Network::Mlp(TimeMlp::new(5, &[64, 64], 16)));
    let params = den.layout().init(3, DType::F32, d).unwrap();
    let b = 64;
    let ops = DenseOperators::new(on(d, 40, &[b, 2, 5], 1.0)).unwrap();
    let y = on(d, 41, &[b, 2], 1.0);
    let noise = ObservationNoise::Scalar(1e-4);
    let prior = NetworkPrior::new(&den, &params).unwrap();
    let cg = CgConfig {
        max_iters: 3,
        rtol: None,
    };
    let mut mmps = Mmps::new(&prior, &ops, &y, &noise, cg);
    let sampler = Sampler::new(
        SamplerKind::Pc {
            corrections: 1,
            tau: 0.1,
        },
        4,
        VeSchedule::new(1e-3, 10.0),
        Philox::new(8, 9),
    );
    vec![whole(
        "samples",
        sampler.sample(&mut mmps, &[b, 5], None, DType::F32, d).unwrap(),
    )]
}

/// The MRI operator: on the CPU the FFT path (rustfft), on a GPU the product path (the GEMM
/// kernels), from the same images and k-spaces.
fn fourier_case(d: &Device) -> Vec<Output> {
    let (b, h, w) = (3, 64, 40);
    let op = FourierOperator::new(&column_masks(b, w, 4.0, 0.125, 3).unwrap(), b, h, w).unwrap();
    let x = on(d, 61, &[b, h, w], 2.0);
    let v = on(d, 62, &[b, 2 * h * w], 1.0);
    let big = FourierOperator::new(&column_masks(1, 320, 6.0, 0.0625, 5).unwrap(), 1, 320, 320).unwrap();
    let xb = on(d, 63, &[1, 320, 320], 2.0);
    vec![
        whole("A x", op.apply(&x.as_view().unwrap()).unwrap()),
        whole("A^T v", op.adjoint(&v.as_view().unwrap()).unwrap()),
        whole("A x, 320 x 320", big.apply(&xb.as_view().unwrap()).unwrap()),
    ]
}

fn gaussian_case(d: &Device) -> Vec<Output> {
    let (dim, r) = (300, 16);
    let u: Vec<f64> = random_vec(50, dim * r, -0.3, 0.3)
        .iter()
        .map(|&v| v as f64)
        .collect();
    let g = Gaussian::new(vec![0.5; dim], Dplr::new(vec![0.3; dim], u, r).unwrap()).unwrap();
    let x = on(d, 51, &[7, dim], 3.0);
    vec![
        whole("denoised", g.denoise(&x.as_view().unwrap(), 0.7).unwrap()),
        whole(
            "posterior cov apply",
            g.posterior_cov_apply(2.0, &x.as_view().unwrap()).unwrap(),
        ),
    ]
}

// ---- harness checks (CPU, everywhere) ----------------------------------------------------------

/// Parity needs an oracle that is a function of its seeds: every case run twice on the CPU gives
/// bit-identical outputs.
fn oracle_is_reproducible() {
    for c in CASES {
        compare_outputs(c.what, &(c.run)(&CPU), &(c.run)(&CPU), Tol::EXACT).unwrap_or_else(|m| panic!("{m}"));
    }
}

/// A GPU sampler that drew its noise from a neighbouring Philox stream must fail the sampler's
/// tolerance, on the noisy update only.
fn another_sampler_stream_is_caught() {
    let (right, wrong) = (sampler_case(&CPU, 5), sampler_case(&CPU, 6));
    let msg = compare_outputs("sampler", &right, &wrong, SAMPLER_TOL).expect_err("another stream passed");
    assert!(
        msg.contains("sampler: with noise") && !msg.contains("without noise"),
        "{msg}"
    );
}

/// The same for a whole guided DDPM run: the MMPS tolerance must tell the streams apart.
fn another_ddpm_seed_is_caught() {
    let (right, wrong) = (ddpm_mmps_case(&CPU, 7), ddpm_mmps_case(&CPU, 8));
    let msg = compare_outputs("ddpm", &right, &wrong, MMPS_TOL).expect_err("another stream passed");
    assert!(msg.contains("ddpm: samples"), "{msg}");
}
