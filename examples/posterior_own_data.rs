//! Posterior sampling of one's own observations with a checkpoint, from code.
//!
//! `cargo run --release --example posterior_own_data [CHECKPOINT]`
//!
//! Without a checkpoint it first trains a small TimeMLP prior on a 2-D ring (a few seconds on a
//! CPU) and saves it, as `emprior train` would; then it observes points of the ring through
//! random 1 x 2 projections with noise 0.05 and draws posterior samples of them with MMPS,
//! checking that the samples explain their observations.

use std::path::PathBuf;

use emprior::api::{sample_posterior, Operator, PosteriorOptions, Prior};
use emprior::commands::{train, TrainOptions};
use emprior::io::write_npy_f32;
use emprior::ops::Philox;
use emprior::{Device, DeviceRequest};

fn main() -> emprior::Result<()> {
    let device = Device::open(DeviceRequest::Auto)?;
    let dir = std::env::temp_dir().join(format!("emprior-example-posterior-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| emprior::Error::Other(e.to_string()))?;
    let ring = |seed: u64, n: usize| -> Vec<f32> {
        let mut t = vec![0.0f32; n];
        Philox::new(seed, 1).fill_uniform(0, &mut t);
        t.iter()
            .flat_map(|&u| {
                let a = u * std::f32::consts::TAU;
                [a.cos(), a.sin()]
            })
            .collect()
    };
    let checkpoint = match std::env::args().nth(1) {
        Some(path) => PathBuf::from(path),
        None => {
            let data = dir.join("ring.npy");
            write_npy_f32(&data, &[2048, 2], &ring(1, 2048))?;
            let out = dir.join("ring.safetensors");
            let loss = train(&TrainOptions {
                data,
                preset: "mlp".into(),
                out: out.clone(),
                steps: 1500,
                batch: 256,
                lr: 1e-3,
                lr_end: Some(1e-5),
                ema: None,
                sigma_min: 1e-3,
                sigma_max: 10.0,
                seed: 0,
                precision: Default::default(),
                device: if device.is_cuda() {
                    DeviceRequest::Cuda(0)
                } else {
                    DeviceRequest::Cpu
                },
                log_every: 0,
            })?;
            println!("trained a ring prior (final loss {loss:.3}): {}", out.display());
            out
        }
    };
    let prior = Prior::load(&checkpoint, &device)?;
    let d = prior.dim();
    // Observations y_i = <a_i, x_i> + 0.05 z of points x_i of the ring, a_i random unit vectors.
    let n = 256;
    let x = ring(2, n);
    let mut a = vec![0.0f32; n * d];
    Philox::new(3, 0).fill_normal(0, &mut a);
    for row in a.chunks_exact_mut(d) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
    }
    let mut z = vec![0.0f32; n];
    Philox::new(4, 0).fill_normal(0, &mut z);
    let sigma_y = 0.05;
    let y: Vec<f32> = (0..n)
        .map(|i| (0..d).map(|j| a[i * d + j] * x[i * d + j]).sum::<f32>() + sigma_y as f32 * z[i])
        .collect();
    let op = Operator::per_observation(&a, n, 1, d, &device)?;
    let opts = PosteriorOptions {
        steps: 128,
        cg_iters: 3,
        ..PosteriorOptions::default()
    };
    let samples = sample_posterior(&prior, &op, &y, sigma_y, &opts, &device)?;
    // Each sample should explain its observation (|<a_i, x_i> - y_i| about sigma_y) and lie near
    // the ring (|x| about 1).
    let (mut fit, mut radius) = (0.0f64, 0.0f64);
    for i in 0..n {
        let s = &samples[i * d..(i + 1) * d];
        let r = (0..d).map(|j| a[i * d + j] * s[j]).sum::<f32>() - y[i];
        fit += (r as f64).powi(2);
        radius += (s.iter().map(|v| v * v).sum::<f32>() as f64).sqrt();
    }
    let (fit, radius) = ((fit / n as f64).sqrt(), radius / n as f64);
    println!("{n} posterior samples: RMS(<a, x> - y) = {fit:.4} (sigma_y {sigma_y}), mean |x| = {radius:.3} (the ring: 1)");
    if fit > 5.0 * sigma_y || (radius - 1.0).abs() > 0.25 {
        return Err(emprior::Error::Other(
            "the posterior samples do not explain the observations".into(),
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
