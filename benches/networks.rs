//! The denoiser networks under criterion.
//! - CPU: TimeMLP (manifold preset) forward + backward with parameter gradients at batch 1024.
//! - GPU: the CIFAR-10 U-Net (19.44 GFLOP per image forward, counted by `forward_macs`) at batch
//!   64 and 256: forward; forward + one VJP (the MMPS pattern); forward + backward with parameter
//!   gradients (training). Throughput is images/s (criterion's elem/s). Device time comes from
//!   CUDA events. Without a GPU the GPU group prints `skipped: GPU unavailable: <reason>`.

use std::time::Duration;

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use emprior::bench::device_time;
use emprior::diffusion::{preset, Denoiser};
use emprior::nn::Mode;
use emprior::nn::Weights;
use emprior::ops::{self, Philox};
use emprior::{AsView, AsViewMut, DType, Device, Tensor};

fn time_mlp_cpu(c: &mut Criterion) {
    let den = Denoiser::new(preset("manifold").unwrap());
    let cpu = Device::Cpu;
    let batch = 1024;
    let params = den.layout().init(0, DType::F32, &cpu).unwrap();
    let x = ops::normal(&[batch, 5], Philox::new(1, 1), 0, &cpu).unwrap();
    let u = ops::normal(&[batch, 5], Philox::new(1, 2), 0, &cpu).unwrap();
    let sigmas: Vec<f64> = (0..batch)
        .map(|i| 1e-3 * (1e4f64).powf(i as f64 / batch as f64))
        .collect();
    let mut grads = Tensor::zeros(&[den.layout().len()], DType::F32, &cpu).unwrap();
    let mut group = c.benchmark_group("time_mlp_cpu");
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function(BenchmarkId::new("forward_backward", batch), |b| {
        b.iter(|| {
            let pv = params.as_view().unwrap();
            let (_, saved) = den
                .denoise(&Weights::from(&pv), &x.as_view().unwrap(), &sigmas, Mode::Eval)
                .unwrap();
            den.backward(
                &Weights::from(&pv),
                &saved,
                &u.as_view().unwrap(),
                Some(&mut grads.as_view_mut().unwrap()),
            )
            .unwrap()
        })
    });
    group.bench_function(BenchmarkId::new("forward_vjp", batch), |b| {
        b.iter(|| {
            let pv = params.as_view().unwrap();
            let (_, saved) = den
                .denoise(&Weights::from(&pv), &x.as_view().unwrap(), &sigmas, Mode::Eval)
                .unwrap();
            den.vjp(&Weights::from(&pv), &saved, &u.as_view().unwrap())
                .unwrap()
        })
    });
    group.finish();
}

fn unet_gpu(c: &mut Criterion) {
    let device = match Device::cuda(0) {
        Ok(d) => d,
        Err(e) => {
            println!("unet_gpu: skipped: {e}");
            return;
        }
    };
    let Device::Cuda(dev) = &device else {
        unreachable!()
    };
    let den = Denoiser::new(preset("cifar10").unwrap());
    let params = den.layout().init(0, DType::F32, &device).unwrap();
    let mut grads = Tensor::zeros(&[den.layout().len()], DType::F32, &device).unwrap();
    let mut group = c.benchmark_group("unet_cifar10_gpu_f32");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    for batch in [64usize, 256] {
        let x = ops::normal(&[batch, 32, 32, 3], Philox::new(2, 1), 0, &device).unwrap();
        let u = ops::normal(&[batch, 32, 32, 3], Philox::new(2, 2), 0, &device).unwrap();
        let sigmas = vec![0.5; batch];
        group.throughput(Throughput::Elements(batch as u64));
        let time = |iters: u64, f: &mut dyn FnMut()| device_time(dev, iters, f);
        group.bench_function(BenchmarkId::new("forward", batch), |b| {
            b.iter_custom(|iters| {
                time(iters, &mut || {
                    den.denoise(
                        &params.as_view().unwrap().into(),
                        &x.as_view().unwrap(),
                        &sigmas,
                        Mode::Eval,
                    )
                    .unwrap();
                })
            })
        });
        group.bench_function(BenchmarkId::new("forward_vjp", batch), |b| {
            b.iter_custom(|iters| {
                time(iters, &mut || {
                    let pv = params.as_view().unwrap();
                    let (_, s) = den
                        .denoise(&Weights::from(&pv), &x.as_view().unwrap(), &sigmas, Mode::Eval)
                        .unwrap();
                    den.vjp(&Weights::from(&pv), &s, &u.as_view().unwrap()).unwrap();
                })
            })
        });
        group.bench_function(BenchmarkId::new("forward_backward", batch), |b| {
            b.iter_custom(|iters| {
                time(iters, &mut || {
                    let pv = params.as_view().unwrap();
                    let mode = Mode::Train {
                        rng: Philox::new(3, 3),
                        first_row: 0,
                    };
                    let (_, s) = den
                        .denoise(&Weights::from(&pv), &x.as_view().unwrap(), &sigmas, mode)
                        .unwrap();
                    den.backward(
                        &Weights::from(&pv),
                        &s,
                        &u.as_view().unwrap(),
                        Some(&mut grads.as_view_mut().unwrap()),
                    )
                    .unwrap();
                })
            })
        });
    }
    group.finish();
}

/// One posterior sampler step for the manifold experiment on the CPU: an MMPS call (2 x 5
/// operator per observation, 3 CG iterations) and the PC update, at batch 1024.
fn time_mlp_posterior_cpu(c: &mut Criterion) {
    use emprior::device::StepClock;
    use emprior::diffusion::sampler::{sampler_step, table};
    use emprior::diffusion::{Denoise, NoiseLevel, Sampler, SamplerKind, VeSchedule};
    use emprior::posterior::{CgConfig, DenseOperators, Mmps, NetworkPrior, ObservationNoise};
    let den = Denoiser::new(preset("manifold").unwrap());
    let cpu = Device::Cpu;
    let batch = 1024;
    let params = den.layout().init(0, DType::F32, &cpu).unwrap();
    let ops = DenseOperators::new(ops::normal(&[batch, 2, 5], Philox::new(5, 1), 0, &cpu).unwrap()).unwrap();
    let y = ops::normal(&[batch, 2], Philox::new(5, 2), 0, &cpu).unwrap();
    let noise = ObservationNoise::Scalar(1e-4);
    let prior = NetworkPrior::new(&den, &params).unwrap();
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
    let mut x = ops::normal(&[batch, 5], Philox::new(5, 3), 0, &cpu).unwrap();
    // A Langevin correction at sigma 0.3, its coefficients from row 0 of a PC sampler's table.
    let kind = SamplerKind::Pc {
        corrections: 1,
        tau: 0.1,
    };
    let coefficients = Sampler::new(kind, 1, VeSchedule::new(0.3, 1.0), Philox::new(5, 4))
        .table(DType::F32, &cpu)
        .unwrap();
    let clock = StepClock::new(0, &cpu).unwrap();
    let rng = Philox::new(5, 4).moving(clock.link(0, 0));
    let level = NoiseLevel::from_host(0.3, batch, DType::F32, &cpu).unwrap();
    let mut group = c.benchmark_group("time_mlp_posterior_cpu");
    group.throughput(Throughput::Elements(batch as u64));
    group.bench_function(BenchmarkId::new("mmps_pc_step", batch), |b| {
        b.iter(|| {
            let d = mmps.denoise_level(&x, &level).unwrap();
            let t = coefficients.as_view().unwrap();
            sampler_step(&mut x, &d, &t, table::CORRECTOR, rng, 0).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, time_mlp_cpu, time_mlp_posterior_cpu, unet_gpu);
/// criterion_main!, with poison mode off first: cargo runs benches with EMPRIOR_POISON=1, and the
/// timings must be of the kernels, not of the memsets that poison every fresh buffer.
fn main() {
    emprior::set_poison(false);
    benches();
    Criterion::default().configure_from_args().final_summary();
}
