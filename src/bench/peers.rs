//! Our side of the workloads measured beside PyTorch and JAX (benches/baselines/WORKLOADS.md):
//! each is one unit of work the EM loop repeats, built from the same library calls the EM driver
//! makes, timed as the peers time theirs (median of repeats after warm-up; CUDA events on a GPU),
//! and written as the same JSON lines, so one table can put them side by side. From the measured
//! rates, `projection` estimates a paper lap and a paper run of each experiment on this device.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::Path;

use crate::device::Device;
use crate::diffusion::sampler::{BatchPart, Denoise, Sampler, SamplerKind};
use crate::diffusion::{preset, Denoiser, Network, VeSchedule};
use crate::error::{Error, Result};
use crate::nn::{Mode, UNet, UNetConfig, Weights};
use crate::ops::{self, Philox};
use crate::posterior::{CgConfig, DenseOperators, MaskOperator, Mmps, NetworkPrior, ObservationNoise};
use crate::tensor::{AsView, DType, Tensor};
use crate::train::{AdamConfig, LrSchedule, Trainer};

/// Every workload, in table order; the `cifar10` ones are meant for a GPU.
pub const WORKLOADS: &[&str] = &[
    "timemlp_train_step",
    "pc_mmps_step",
    "unet_small_train_step",
    "unet_small_forward_vjp",
    "unet_cifar10_train_step",
    "unet_cifar10_forward_vjp",
    "unet_cifar10_mmps",
];

/// The default set on a device: all on a GPU, the small ones on the CPU.
pub fn default_workloads(device: &Device) -> Vec<&'static str> {
    WORKLOADS
        .iter()
        .copied()
        .filter(|w| device.is_cuda() || !w.contains("cifar10"))
        .collect()
}

/// One measured workload.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// The workload's name, one of [`WORKLOADS`].
    pub workload: String,
    /// Median wall time of one unit of work, in milliseconds (CUDA events on a GPU).
    pub median_ms: f64,
    /// Timed runs the median is over (after warm-up).
    pub repeats: usize,
    /// Parameters of the network the workload runs.
    pub params: usize,
    /// Rows (samples) per unit of work.
    pub batch: usize,
    /// Floating-point operations of one unit (network passes only), when counted.
    pub flops: Option<f64>,
    /// Free text on how it ran (e.g. the CPU's threading), empty on a GPU.
    pub note: String,
}

impl Measurement {
    /// The JSON line of WORKLOADS.md.
    pub fn json(&self, device: &Device) -> String {
        let flops = self.flops.map_or("null".into(), |f| format!("{f:.6e}"));
        format!(
            "{{\"impl\": \"ours\", \"workload\": \"{}\", \"device\": \"{}\", \"median_ms\": {:.6}, \
             \"repeats\": {}, \"params\": {}, \"batch\": {}, \"flops\": {flops}, \"note\": \"{}\"}}",
            self.workload,
            if device.is_cuda() { "cuda" } else { "cpu" },
            self.median_ms,
            self.repeats,
            self.params,
            self.batch,
            self.note.replace('"', "'")
        )
    }
}

/// The CIFAR-10 quick preset's U-Net (93,699 parameters).
fn small_unet() -> Result<Denoiser> {
    Ok(Denoiser::new(Network::UNet(UNet::new(UNetConfig {
        in_channels: 3,
        out_channels: 3,
        channels: vec![16, 32],
        blocks: vec![1, 1],
        attention: vec![],
        emb: 64,
        dropout: 0.1,
        patch: 1,
        resolution: (32, 32),
    })?)))
}

/// Median milliseconds of `f` after warm-up: CUDA events on a GPU, the host clock on the CPU.
fn time(device: &Device, repeats: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    match device {
        Device::Cuda(dev) => super::time_gpu(dev, repeats, f),
        Device::Cpu => super::time_cpu(repeats, f),
    }
}

/// Forward FLOPs of one sample through `den`.
fn forward_flops(den: &Denoiser) -> f64 {
    2.0 * den.net.forward_macs() as f64
}

/// One DSM training step (sigma ~ the VE schedule at Beta(3, 3) times, Adam, clipping, EMA).
fn train_step(
    device: &Device,
    den: Denoiser,
    shape: &[usize],
    lr: f64,
    ema: f64,
    schedule: VeSchedule,
    repeats: usize,
) -> Result<(f64, usize, f64)> {
    let params = den.layout().init(0, DType::F32, device)?;
    let count = den.layout().len();
    let flops = 3.0 * forward_flops(&den) * shape[0] as f64;
    let mut config = AdamConfig::new(LrSchedule::Constant(lr));
    config.ema = Some(ema);
    let mut trainer = Trainer::new(den, params, config, schedule, 0)?;
    let x = ops::normal(shape, Philox::new(7, 1), 0, device)?;
    let ms = time(device, repeats, || trainer.step(&x.as_view()?).map(drop))?;
    Ok((ms, count, flops))
}

/// One forward at sigma = 1 keeping its activations, then one VJP. On the CPU the batch runs in
/// parts of `CPU_PART_IMAGES` images, both cores one part each at a time, as the E-step runs its
/// MMPS calls (the training step's parts are the trainer's own).
fn forward_vjp(
    device: &Device,
    den: &Denoiser,
    shape: &[usize],
    repeats: usize,
) -> Result<(f64, usize, f64)> {
    let params = den.layout().init(0, DType::F32, device)?;
    let x = ops::normal(shape, Philox::new(8, 1), 0, device)?;
    let u = ops::normal(shape, Philox::new(8, 2), 0, device)?;
    let sigmas = vec![1.0; shape[0]];
    let copy = den.layout().bf16_copy(&params)?;
    let pv = Weights::new(params.as_view()?, copy.as_ref())?;
    let per = x.numel() / shape[0];
    let part = |rows: std::ops::Range<usize>| -> Result<()> {
        let mut part_shape = shape.to_vec();
        part_shape[0] = rows.len();
        let xv = x.as_view()?.sub(rows.start * per, &part_shape)?;
        let uv = u.as_view()?.sub(rows.start * per, &part_shape)?;
        let (_, saved) = den.denoise(&pv, &xv, &sigmas[rows], Mode::Eval)?;
        den.vjp(&pv, &saved, &uv).map(drop)
    };
    let part_rows = match device {
        Device::Cpu => crate::em::images::CPU_PART_IMAGES,
        Device::Cuda(_) => shape[0],
    };
    let ms = time(device, repeats, || {
        ops::parallel::map_parts(shape[0], part_rows, part)
            .into_iter()
            .collect()
    })?;
    Ok((ms, den.layout().len(), 3.0 * forward_flops(den) * shape[0] as f64))
}

/// One predictor-corrector step of MMPS posterior sampling for 8,192 observations of the
/// manifold TimeMLP: two posterior denoiser calls of one forward and 4 VJPs (3 CG iterations).
fn pc_mmps_step(device: &Device, repeats: usize) -> Result<(f64, usize, f64)> {
    const N: usize = 8192;
    let den = Denoiser::new(preset("manifold")?);
    let params = den.layout().init(0, DType::F32, device)?;
    let prior = NetworkPrior::new(&den, &params)?;
    // Unit-norm rows, as the manifold experiment's operators.
    let a = ops::normal(&[N, 2, 5], Philox::new(9, 1), 0, device)?.to_vec_f32()?;
    let a: Vec<f32> = a
        .chunks(5)
        .flat_map(|row| {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            row.iter().map(move |v| v / norm).collect::<Vec<_>>()
        })
        .collect();
    let operator = DenseOperators::new(Tensor::from_f32(&a, &[N, 2, 5], device)?)?;
    let y = ops::normal(&[N, 2], Philox::new(9, 2), 0, device)?;
    let noise = ObservationNoise::Scalar(0.01 * 0.01);
    let cg = CgConfig {
        max_iters: 3,
        rtol: None,
    };
    let mut mmps = Mmps::new(&prior, &operator, &y, &noise, cg);
    // A PC sampler call long enough for the warm-up and the timed steps.
    let kind = SamplerKind::Pc {
        corrections: 1,
        tau: 0.1,
    };
    let mut sampler = Sampler::new(kind, repeats + 3, VeSchedule::new(1e-3, 10.0), Philox::new(9, 4));
    sampler.cuda_graphs = false;
    let mut call = sampler.begin(&mut mmps, &[N, 5], BatchPart::whole(N), None, DType::F32, device)?;
    let ms = time(device, repeats, || call.step())?;
    // 2 calls x (1 forward + 4 VJPs of about 2 forwards each).
    Ok((ms, den.layout().len(), 2.0 * 9.0 * forward_flops(&den) * N as f64))
}

/// One MMPS posterior denoiser call of the CIFAR-10 U-Net on 75%-masked images, 1 CG iteration.
fn unet_mmps(device: &Device, den: &Denoiser, batch: usize, repeats: usize) -> Result<(f64, usize, f64)> {
    let params = den.layout().init(0, DType::F32, device)?;
    let prior = NetworkPrior::new(den, &params)?;
    let pixels = 32 * 32;
    let keep = ops::uniform(&[batch * pixels], Philox::new(10, 1), 0, &Device::Cpu)?.to_vec_f32()?;
    let mask: Vec<f32> = keep.iter().map(|&u| if u < 0.25 { 1.0 } else { 0.0 }).collect();
    let operator = MaskOperator::from_pixel_mask(&mask, batch, pixels, 3, DType::F32, device)?;
    let m = crate::posterior::LinearOperator::obs_dim(&operator);
    let y = ops::normal(&[batch, m], Philox::new(10, 2), 0, device)?;
    let noise = ObservationNoise::Scalar(1e-3 * 1e-3);
    let cg = CgConfig {
        max_iters: 1,
        rtol: None,
    };
    let mut mmps = Mmps::new(&prior, &operator, &y, &noise, cg);
    let x = ops::normal(&[batch, 32, 32, 3], Philox::new(10, 3), 0, device)?;
    let ms = time(device, repeats, || mmps.denoise(&x, 1.0).map(drop))?;
    Ok((ms, den.layout().len(), 5.0 * forward_flops(den) * batch as f64))
}

/// Measures `workload` on `device` (`repeats` timed runs after warm-up).
pub fn measure(device: &Device, workload: &str, repeats: usize) -> Result<Measurement> {
    let (batch, (ms, params, flops)) = match workload {
        "timemlp_train_step" => {
            let den = Denoiser::new(preset("manifold")?);
            let schedule = VeSchedule::new(1e-3, 1e1);
            (
                1024,
                train_step(device, den, &[1024, 5], 1e-3, 0.999, schedule, repeats)?,
            )
        }
        "pc_mmps_step" => (8192, pc_mmps_step(device, repeats)?),
        "unet_small_train_step" => {
            let schedule = VeSchedule::new(1e-3, 1e2);
            (
                32,
                train_step(
                    device,
                    small_unet()?,
                    &[32, 32, 32, 3],
                    1e-3,
                    0.99,
                    schedule,
                    repeats,
                )?,
            )
        }
        "unet_small_forward_vjp" => (
            64,
            forward_vjp(device, &small_unet()?, &[64, 32, 32, 3], repeats)?,
        ),
        "unet_cifar10_train_step" => {
            let den = Denoiser::new(preset("cifar10")?);
            let schedule = VeSchedule::new(1e-3, 1e2);
            (
                256,
                train_step(device, den, &[256, 32, 32, 3], 2e-4, 0.9999, schedule, repeats)?,
            )
        }
        "unet_cifar10_forward_vjp" => {
            let den = Denoiser::new(preset("cifar10")?);
            (256, forward_vjp(device, &den, &[256, 32, 32, 3], repeats)?)
        }
        "unet_cifar10_mmps" => {
            let den = Denoiser::new(preset("cifar10")?);
            (64, unet_mmps(device, &den, 64, repeats)?)
        }
        other => {
            return Err(Error::Other(format!(
                "unknown workload '{other}' (expected one of {})",
                WORKLOADS.join(", ")
            )))
        }
    };
    let note = if device.is_cuda() {
        String::new()
    } else {
        "f32; GEMMs on matrixmultiply's threads (MATMUL_NUM_THREADS or the physical cores), other ops on one"
            .into()
    };
    Ok(Measurement {
        workload: workload.into(),
        median_ms: ms,
        repeats,
        params,
        batch,
        flops: Some(flops),
        note,
    })
}

/// Measures `workloads` in order, each `repeats` times after warm-up, appending each line to
/// `json` as soon as it is measured. The names, the repeat count and the file are checked before
/// any work, so a typo does not cost a GPU run.
pub fn run(
    device: &Device,
    workloads: &[&str],
    repeats: usize,
    json: Option<&Path>,
) -> Result<Vec<Measurement>> {
    if let Some(bad) = workloads.iter().find(|w| !WORKLOADS.contains(w)) {
        return Err(Error::Other(format!(
            "unknown workload '{bad}' (expected one of {})",
            WORKLOADS.join(", ")
        )));
    }
    if repeats == 0 {
        return Err(Error::Other("--repeats must be at least 1".into()));
    }
    let mut file = match json {
        Some(path) => Some(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| Error::Other(format!("cannot open {} for the results: {e}", path.display())))?,
        ),
        None => None,
    };
    let mut rows = Vec::new();
    for &name in workloads {
        eprintln!("bench --peers: {name} on {device} ({repeats} repeats)");
        let m = measure(device, name, repeats)?;
        if let (Some(f), Some(path)) = (file.as_mut(), json) {
            writeln!(f, "{}", m.json(device))
                .map_err(|e| Error::Other(format!("writing {}: {e}", path.display())))?;
        }
        rows.push(m);
    }
    Ok(rows)
}

/// The measurements as a markdown table.
pub fn format_table(title: &str, rows: &[Measurement]) -> String {
    let mut s = format!(
        "{title}\n\n| workload | batch | params | median ms | items/s | GFLOP/s |\n|---|---:|---:|---:|---:|---:|\n"
    );
    for r in rows {
        let per_s = r.batch as f64 / (r.median_ms * 1e-3);
        let gflops = r
            .flops
            .map_or("-".into(), |f| format!("{:.1}", f / (r.median_ms * 1e-3) / 1e9));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} | {per_s:.0} | {gflops} |",
            r.workload, r.batch, r.params, r.median_ms
        );
    }
    s
}

/// Wall time of one paper lap and of a paper run of each experiment on this device, from the
/// measured rates (method.md §8.3, §10): what is projected from what, and where we stand
/// against the goal of one CIFAR-10 lap in 1.5 hours on one H100.
pub fn projection(rows: &[Measurement]) -> String {
    let per_item = |w: &str| {
        rows.iter()
            .find(|r| r.workload == w)
            .map(|r| r.median_ms * 1e-3 / r.batch as f64)
    };
    let mut s =
        String::from("Projected paper runs on this device (from the rates above; f32, as measured)\n\n");
    s += "| experiment | E-step per lap | M-step per lap | lap | laps | run | from |\n|---|---:|---:|---:|---:|---:|---|\n";
    let hours = |secs: f64| secs / 3600.0;
    let mut line = |name: &str, e: Option<f64>, m: Option<f64>, laps: f64, from: &str| match (e, m) {
        (Some(e), Some(m)) => {
            let _ = writeln!(
                s,
                "| {name} | {:.2} h | {:.2} h | {:.2} h | {laps} | {:.1} days | {from} |",
                hours(e),
                hours(m),
                hours(e + m),
                hours(e + m) * laps / 24.0
            );
        }
        _ => {
            let _ = writeln!(
                s,
                "| {name} | - | - | - | {laps} | - | not measured here ({from}) |"
            );
        }
    };
    // Manifold: 65,536 observations x 4,096 PC steps; 65,536 Adam steps of 1,024.
    let e = per_item("pc_mmps_step").map(|t| 65_536.0 * 4096.0 * t);
    let m = per_item("timemlp_train_step").map(|t| 65_536.0 * 1024.0 * t);
    line(
        "manifold",
        e,
        m,
        32.0,
        "pc_mmps_step (Tweedie, 3 CG; the paper preset uses its Gaussian covariance and 20 CG), timemlp_train_step",
    );
    // CIFAR-10: 50,000 observations x 256 DDPM steps of one MMPS call (1 CG); 256 epochs x 195
    // batches of 256.
    let e = per_item("unet_cifar10_mmps").map(|t| 50_000.0 * 256.0 * t);
    let m = per_item("unet_cifar10_train_step").map(|t| 256.0 * 195.0 * 256.0 * t);
    line(
        "CIFAR-10",
        e,
        m,
        32.0,
        "unet_cifar10_mmps, unet_cifar10_train_step",
    );
    // MRI: about 66,000 slices (training slices twice, plus validation) x 64 steps of an MMPS call
    // with 3 CG (1 forward + 4 VJPs, vs 1 + 2 measured); 64 epochs x 60,000 slices. The MRI U-Net
    // is not measured: its rates are the CIFAR-10 U-Net's scaled by forward FLOPs.
    let flop_ratio = match (preset("mri"), preset("cifar10")) {
        (Ok(a), Ok(b)) => a.forward_macs() as f64 / b.forward_macs() as f64,
        _ => f64::NAN,
    };
    let e = per_item("unet_cifar10_mmps").map(|t| 66_000.0 * 64.0 * t * flop_ratio * 9.0 / 5.0);
    let m = per_item("unet_cifar10_train_step").map(|t| 64.0 * 60_000.0 * t * flop_ratio);
    line(
        "MRI",
        e,
        m,
        16.0,
        &format!("CIFAR-10 U-Net rates x {flop_ratio:.2} (MRI/CIFAR forward FLOPs), 3 CG"),
    );
    if let (Some(e), Some(m)) = (per_item("unet_cifar10_mmps"), per_item("unet_cifar10_train_step")) {
        let lap = hours(50_000.0 * 256.0 * e + 256.0 * 195.0 * 256.0 * m);
        let _ = writeln!(
            s,
            "\nGoal: one CIFAR-10 lap in at most 1.5 h on one H100; projected here {lap:.2} h ({:.1}x the goal).",
            lap / 1.5
        );
    }
    s
}
