//! An EM run driven from code: observations made here, written as .npy, and `em::run_vectors`
//! on them with a configuration built from the `vectors` preset. The same run as
//! `emprior em vectors --obs ... --operator ...`, returning each lap's metrics.
//!
//! `cargo run --release --example em_from_code`

use emprior::em::{run_vectors, Config};
use emprior::io::write_npy_f32;
use emprior::ops::Philox;
use emprior::{Device, DeviceRequest};

fn main() -> emprior::Result<()> {
    let device = Device::open(DeviceRequest::Auto)?;
    let dir = std::env::temp_dir().join(format!("emprior-example-em-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| emprior::Error::Other(e.to_string()))?;
    // 1,024 points of a 2-D ring, each seen through one random unit vector (m = 1, d = 2).
    let (n, d) = (1024, 2);
    let mut t = vec![0.0f32; n];
    Philox::new(1, 1).fill_uniform(0, &mut t);
    let x: Vec<f32> = t
        .iter()
        .flat_map(|&u| {
            let a = u * std::f32::consts::TAU;
            [a.cos(), a.sin()]
        })
        .collect();
    let mut a = vec![0.0f32; n * d];
    Philox::new(1, 2).fill_normal(0, &mut a);
    for row in a.chunks_exact_mut(d) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
    }
    let mut z = vec![0.0f32; n];
    Philox::new(1, 3).fill_normal(0, &mut z);
    let y: Vec<f32> = (0..n)
        .map(|i| a[2 * i] * x[2 * i] + a[2 * i + 1] * x[2 * i + 1] + 0.02 * z[i])
        .collect();
    write_npy_f32(&dir.join("y.npy"), &[n, 1], &y)?;
    write_npy_f32(&dir.join("a.npy"), &[n, 1, d], &a)?;
    write_npy_f32(&dir.join("x.npy"), &[n, d], &x)?;

    let mut cfg = Config::preset("vectors", "quick")?;
    let path = |f: &str| dir.join(f).display().to_string();
    for set in [
        format!("obs={}", path("y.npy")),
        format!("operator={}", path("a.npy")),
        format!("truth={}", path("x.npy")),
        "sigma_y=0.02".into(),
        "laps=2".into(),
        "init_rounds=4".into(),
        "estep_steps=24".into(),
        "mstep_steps=600".into(),
        "eval_samples=256".into(),
    ] {
        cfg.set(&set)?;
    }
    let laps = run_vectors(&cfg, &dir.join("run"), &device, false)?;
    for lap in &laps {
        println!("{}", lap.summary());
    }
    let (first, last) = (laps[0].sinkhorn, laps[laps.len() - 1].sinkhorn);
    if last.partial_cmp(&first) != Some(std::cmp::Ordering::Less) {
        return Err(emprior::Error::Other(format!(
            "the divergence did not fall: {first} -> {last}"
        )));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
