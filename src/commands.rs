//! What the `train`, `sample` and `posterior` subcommands do, as library functions over option
//! structs (the binary only parses arguments). Arrays come and go as `.npy`; networks as
//! safetensors checkpoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::device::{Device, DeviceRequest};
use crate::diffusion::{preset, Denoise, Denoiser, Network, NoiseLevel, Sampler, SamplerKind, VeSchedule};
use crate::error::{Error, Result};
use crate::gaussian::{Dplr, Gaussian};
use crate::io::{load_checkpoint, read_npy, save_checkpoint, write_npy_f32};
use crate::nn::TimeMlp;
use crate::ops::precision::describe as describe_precision;
use crate::ops::{Philox, Precision, PrecisionRequest};
use crate::posterior::{
    CgConfig, Covariance, DenseOperators, Dps, LinearOperator, MaskOperator, Mmps, NetworkPrior,
    ObservationNoise, Prior, SharedOperator,
};
use crate::progress::{self, Phase};
use crate::tensor::{AsView, DType, Tensor};
use crate::train::{AdamConfig, LrSchedule, Trainer};

/// `emprior train`: denoising score matching on given samples.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// The training samples: an `.npy` (f32, f64 or u8) of shape `[n, ...]`.
    pub data: PathBuf,
    /// manifold, cifar10, mri, or mlp (a TimeMLP sized to the data's features).
    pub preset: String,
    /// The safetensors checkpoint to write (atomically, once training ends).
    pub out: PathBuf,
    /// Adam steps to run (at least 1).
    pub steps: u64,
    /// Samples per step, drawn with replacement (at least 1).
    pub batch: usize,
    /// Adam's learning rate (the start of the decay with `lr_end`).
    pub lr: f64,
    /// Decay linearly to this learning rate over the run (None: constant).
    pub lr_end: Option<f64>,
    /// Keep an EMA of the weights with this decay in `[0, 1)` and save it (None: save the
    /// parameters).
    pub ema: Option<f64>,
    /// Smallest noise level of the VE schedule (also stored in the checkpoint for sampling).
    pub sigma_min: f64,
    /// Largest noise level of the VE schedule (also stored in the checkpoint for sampling).
    pub sigma_max: f64,
    /// Seeds the initialisation, minibatches, noise levels and noise (a run is reproducible).
    pub seed: u64,
    /// The network's arithmetic (auto: bf16 on a tensor-core GPU, else f32).
    pub precision: PrecisionRequest,
    /// Where to run: auto, cpu, cuda or cuda:N.
    pub device: DeviceRequest,
    /// Print a progress line every this many steps.
    pub log_every: u64,
}

fn network_for(preset_name: &str, features: &[usize]) -> Result<Network> {
    match preset_name {
        "mlp" => match features {
            [f] => Ok(Network::Mlp(TimeMlp::new(*f, &[256, 256, 256], 64))),
            other => Err(Error::Other(format!(
                "preset mlp needs [n, features] data, got samples of shape {other:?}"
            ))),
        },
        name => preset(name),
    }
}

/// Refuses an output path that cannot be written, before any work: a directory, a missing or
/// read-only parent (probed with a temporary file, removed at once).
pub fn check_output(path: &Path) -> Result<()> {
    if path.is_dir() {
        return Err(Error::Other(format!(
            "--out {} is a directory; name a file",
            path.display()
        )));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let probe = parent.join(format!(".emprior-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| {
        Error::Other(format!(
            "--out {}: cannot write in {}: {e}",
            path.display(),
            parent.display()
        ))
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The first non-finite value of an input array, as an error naming the file.
fn check_finite(path: &Path, what: &str, data: &[f64]) -> Result<()> {
    match data.iter().position(|v| !v.is_finite()) {
        Some(i) => Err(Error::Other(format!(
            "{}: {what} value {i} is {} (NaN or infinite)",
            path.display(),
            data[i]
        ))),
        None => Ok(()),
    }
}

/// Samples are written only when every value is finite: a diverged sampler is reported, not
/// saved.
fn check_samples(what: &str, x: &[f32]) -> Result<()> {
    let bad = x.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        return Err(Error::Other(format!(
            "{bad} of {} {what} values are NaN or infinite (the sampler diverged: fewer steps, another covariance or CG setting, or a checkpoint trained longer may help); nothing written",
            x.len()
        )));
    }
    Ok(())
}

/// Seconds between two progress updates of a sampler (each one synchronises the device).
const REPORT_EVERY: f64 = 0.5;

/// A sampler's denoiser driving a [`Phase`] over its calls (the run's total known from the
/// sampler), the current noise level as its message. The device is synchronised before each
/// update, so the count is of finished work; updates come every [`REPORT_EVERY`] seconds and at
/// the last call.
struct Progress<'a, D: ?Sized> {
    inner: &'a mut D,
    phase: Phase,
    calls: u64,
    total: u64,
    last: Instant,
}

impl<'a, D: Denoise + ?Sized> Progress<'a, D> {
    /// Progress named `label` over the denoiser calls of `sampler`.
    fn new(inner: &'a mut D, label: &'static str, sampler: &Sampler) -> Self {
        let total = (sampler.steps * sampler.calls_per_step() + 1) as u64;
        Progress {
            inner,
            phase: Phase::new(label, total, "denoiser calls"),
            calls: 0,
            total,
            last: Instant::now(),
        }
    }

    /// Ends the phase (its line with the count, rate and time); returns its seconds.
    fn finish(mut self) -> f64 {
        self.phase.set(self.calls);
        self.phase.finish()
    }
}

/// The sampler tells a [`Progress`] its steps (eager or replayed from a CUDA graph), so the
/// count is of steps queued, not of denoiser calls made on the host.
impl<D: Denoise + ?Sized> Denoise for Progress<'_, D> {
    fn denoise(&mut self, x_t: &Tensor, sigma: f64) -> Result<Tensor> {
        self.inner.denoise(x_t, sigma)
    }
    fn denoise_level(&mut self, x_t: &Tensor, level: &NoiseLevel) -> Result<Tensor> {
        self.inner.denoise_level(x_t, level)
    }
    fn graph_safe(&self) -> bool {
        self.inner.graph_safe()
    }
    fn step_done(&mut self, calls: usize, sigma: f64, device: &Device) -> Result<()> {
        self.inner.step_done(calls, sigma, device)?;
        self.calls += calls as u64;
        if self.last.elapsed().as_secs_f64() >= REPORT_EVERY || self.calls == self.total {
            device.synchronize()?;
            self.last = Instant::now();
            self.phase.message(format!("sigma {sigma:.3e}"));
            self.phase.set(self.calls);
        }
        Ok(())
    }
}

/// The device a command runs on, opened from the request, and the header's line for it (with
/// the reason when `auto` passed a GPU over).
fn open_device(request: DeviceRequest) -> Result<(Device, String)> {
    let (device, passed_over) = match request {
        DeviceRequest::Auto => Device::auto(),
        r => (Device::open(r)?, None),
    };
    let mut line = describe_device(&device);
    if let Some(why) = passed_over {
        line.push_str(&format!(" (auto: GPU unavailable: {why})"));
    }
    Ok((device, line))
}

/// The device and the kernels it runs, as the commands' headers print it: "CPU (2 threads); ..."
/// or the GPU with the embedded kernel modules and whether they load as SASS or JIT-compiled PTX.
pub fn describe_device(device: &Device) -> String {
    use crate::kernels::{kernels_embedded, KERNEL_MODULES, NVCC_VERSION, SASS_ARCHS};
    match device {
        Device::Cpu => {
            let kernels = if kernels_embedded() {
                format!(
                    "{} CUDA kernel modules embedded, unused on the CPU",
                    KERNEL_MODULES.len()
                )
            } else {
                "CUDA kernels not compiled (a CPU-only build, without nvcc)".to_string()
            };
            format!("CPU ({} threads); {kernels}", rayon::current_num_threads())
        }
        Device::Cuda(dev) => {
            let (major, minor) = dev.compute_capability();
            let arch = format!("sm_{major}{minor}");
            let isa = KERNEL_MODULES.first().map_or("?", |m| m.ptx_isa);
            let code = if SASS_ARCHS.contains(&arch.as_str()) {
                format!("SASS for {arch}")
            } else {
                format!(
                    "PTX ISA {isa} JIT-compiled for {arch} (SASS only for {})",
                    SASS_ARCHS.join(", ")
                )
            };
            // Hopper's convolutions: loaded on sm_90a, used only when asked (and checked).
            let wgmma = match (dev.has_wgmma(), crate::nn::tensor_cores::wgmma_requested()) {
                (false, _) => "",
                (true, false) => "; wgmma convolutions available (EMPRIOR_WGMMA=1)",
                (true, true) => "; wgmma convolutions requested (on once the tensor-core check passes)",
            };
            format!(
                "{dev:?}; {} CUDA kernel modules (nvcc {}), {code}{wgmma}",
                KERNEL_MODULES.len(),
                NVCC_VERSION.unwrap_or("?")
            )
        }
    }
}

/// An `.npy` as the headers name it: "x.npy [10000, 5] f32".
fn describe_npy(path: &Path, shape: &[usize], dtype: &str) -> String {
    let dtype = match dtype {
        "f4" => "f32",
        "f8" => "f64",
        "u1" => "u8",
        other => other,
    };
    format!("{} {shape:?} {dtype}", path.display())
}

/// A network in one line: its architecture and parameter count.
fn describe_network(net: &Network) -> String {
    let arch = match net {
        Network::Mlp(m) => format!(
            "TimeMLP {f} -> {h:?} -> {f}, embedding {e}",
            f = m.features,
            h = m.hidden,
            e = m.emb
        ),
        Network::UNet(u) => {
            let c = &u.config;
            format!(
                "U-Net {}x{}x{}, channels {:?}, blocks {:?}, embedding {}",
                c.resolution.0, c.resolution.1, c.in_channels, c.channels, c.blocks, c.emb
            )
        }
    };
    format!(
        "{arch}; {} parameters",
        crate::nn::unet::fmt_count(net.layout().len())
    )
}

/// A sampler in a few words: "ddpm (ancestral), 256 steps, sigma 1.0e2 down to 1.0e-3, seed 0".
fn describe_sampler(sampler: &Sampler, seed: u64) -> String {
    let kind = match sampler.kind {
        SamplerKind::Ddpm => "ddpm (ancestral)".to_string(),
        SamplerKind::Ddim => "ddim (deterministic)".to_string(),
        SamplerKind::Pc { corrections, tau } => {
            format!("pc ({corrections} Langevin correction(s) of tau {tau} per step)")
        }
    };
    format!(
        "{kind}, {} steps, sigma {:.1e} down to {:.1e}, seed {seed}",
        sampler.steps, sampler.schedule.sigma_max, sampler.schedule.sigma_min
    )
}

/// The header every command prints before its work: a title, then one labelled line per field
/// (the labels aligned).
fn print_header(title: &str, fields: &[(&str, String)]) {
    let width = fields.iter().map(|(l, _)| l.len() + 1).max().unwrap_or(0);
    progress::say(title);
    for (label, value) in fields {
        progress::say(format!("  {:<width$} {value}", format!("{label}:")));
    }
}

/// "12.3s (81.3 samples/s)" (short runs to the hundredth of a second).
fn time_and_rate(secs: f64, count: u64, unit: &str) -> String {
    let time = if secs < 10.0 {
        format!("{secs:.2}s")
    } else {
        progress::duration(secs)
    };
    format!("{time} ({:.1} {unit}/s)", count as f64 / secs.max(1e-9))
}

/// Rows whose norm is this many times the median row norm are reported as far from the rest.
const FAR_FACTOR: f64 = 10.0;

/// What a person should know about a batch of samples before trusting it: how many are not
/// finite, how many lie far from the rest (row norm over FAR_FACTOR times the median), and the
/// norms' median and largest. The text, and whether it deserves a warning.
pub fn sample_diagnostics(x: &[f32], rows: usize) -> (String, bool) {
    let per = x.len().checked_div(rows).unwrap_or(0).max(1);
    let norms: Vec<f64> = x
        .chunks(per)
        .map(|r| r.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt())
        .collect();
    let non_finite = norms.iter().filter(|v| !v.is_finite()).count();
    let mut finite: Vec<f64> = norms.iter().copied().filter(|v| v.is_finite()).collect();
    finite.sort_by(f64::total_cmp);
    let median = finite.get(finite.len() / 2).copied().unwrap_or(f64::NAN);
    let largest = finite.last().copied().unwrap_or(f64::NAN);
    let far = finite.iter().filter(|&&v| v > FAR_FACTOR * median).count();
    let text = format!(
        "{rows} samples: {non_finite} non-finite, {far} far from the rest (norm over {FAR_FACTOR}x the median); norm median {median:.4}, largest {largest:.4}"
    );
    (text, non_finite > 0 || far > 0)
}

/// Trains and writes the checkpoint (atomically); returns the final loss.
pub fn train(o: &TrainOptions) -> Result<f64> {
    check_output(&o.out)?;
    // Options first, before any file is read.
    if o.steps == 0 || o.batch == 0 {
        return Err(Error::Other(format!(
            "--steps {} --batch {}: both must be at least 1",
            o.steps, o.batch
        )));
    }
    let schedule = VeSchedule::checked(o.sigma_min, o.sigma_max)
        .map_err(|e| Error::Other(format!("--sigma-min/--sigma-max: {e}")))?;
    let lr = match o.lr_end {
        Some(end) => LrSchedule::Linear {
            init: o.lr,
            end,
            steps: o.steps,
        },
        None => LrSchedule::Constant(o.lr),
    };
    let config = AdamConfig {
        ema: o.ema,
        ..AdamConfig::new(lr)
    };
    config.validate()?;
    let (device, device_line) = open_device(o.device)?;
    let precision = crate::nn::tensor_cores::resolve(o.precision, &device)?;
    let data = read_npy(&o.data)?;
    if data.shape.len() < 2 || data.shape[0] == 0 {
        return Err(Error::Other(format!(
            "{}: expected samples [n, ...], got shape {:?}",
            o.data.display(),
            data.shape
        )));
    }
    check_finite(&o.data, "sample", &data.data)?;
    let net = network_for(&o.preset, &data.shape[1..])?;
    let expected = net.sample_shape();
    if data.shape[1..] != expected[..] {
        return Err(Error::Other(format!(
            "{}: samples have shape {:?}, preset {} takes {:?}",
            o.data.display(),
            &data.shape[1..],
            o.preset,
            expected
        )));
    }
    let per: usize = expected.iter().product();
    // The batch on the host, and on the device with its noise, noisy copy and gradients.
    let batch_bytes = o.batch.checked_mul(per).and_then(|v| v.checked_mul(4 * 8));
    crate::host_pool::ensure_available(&format!("--batch {}", o.batch), batch_bytes.unwrap_or(usize::MAX))?;
    let lr_text = match o.lr_end {
        Some(end) => format!("{:.1e} decaying linearly to {end:.1e}", o.lr),
        None => format!("{:.1e} (constant)", o.lr),
    };
    let ema_text = o.ema.map_or("no EMA".to_string(), |d| format!("EMA {d}"));
    print_header(
        &format!(
            "emprior train: denoising score matching, {} steps of batch {}",
            o.steps, o.batch
        ),
        &[
            ("device", device_line),
            ("data", describe_npy(&o.data, &data.shape, data.dtype)),
            ("network", format!("{}: {}", o.preset, describe_network(&net))),
            (
                "optimiser",
                format!(
                    "Adam, lr {lr_text}, {ema_text}; VE noise sigma {:.1e} .. {:.1e}; seed {}",
                    o.sigma_min, o.sigma_max, o.seed
                ),
            ),
            ("precision", describe_precision(o.precision, precision)),
            ("output", format!("{} (safetensors checkpoint)", o.out.display())),
        ],
    );
    let mut den = Denoiser::new(net);
    den.net.set_precision(precision);
    let params = den.layout().init(o.seed, DType::F32, &device)?;
    let mut trainer = Trainer::new(den.clone(), params, config, schedule, o.seed)?;
    let n = data.shape[0];
    let values = data.to_f32();
    let mut shape = vec![o.batch];
    shape.extend(&expected);
    let mut u = vec![0.0f32; o.batch];
    let (mut loss, mut loss_step) = (f64::NAN, 0);
    let mut batch = vec![0.0f32; o.batch * per];
    let mut phase = Phase::new("train", o.steps, "steps");
    for step in 0..o.steps {
        // Minibatches drawn with replacement from the samples (reproducible from the seed).
        Philox::new(o.seed, 0xba7c).fill_uniform(step * o.batch as u64, &mut u);
        for (k, &ui) in u.iter().enumerate() {
            let i = ((ui * n as f32) as usize).min(n - 1);
            batch[k * per..(k + 1) * per].copy_from_slice(&values[i * per..(i + 1) * per]);
        }
        let x = Tensor::from_f32(&batch, &shape, &device)?;
        trainer.step(&x.as_view()?)?;
        // The log is read (one device synchronisation) only at the log interval and at the end.
        let log_now = o.log_every > 0 && (step + 1) % o.log_every == 0;
        if log_now || step + 1 == o.steps {
            let Some(st) = trainer.take_stats()?.pop() else {
                continue;
            };
            (loss, loss_step) = (st.loss, step + 1);
            if o.log_every > 0 {
                let rate = (step + 1) as f64 / phase.seconds();
                progress::say(format!(
                    "step {:>7}/{} | loss {:.5} | grad norm {:.3} | lr {:.2e} | {:.1} steps/s",
                    step + 1,
                    o.steps,
                    st.loss,
                    st.grad_norm,
                    st.lr,
                    rate
                ));
            }
            phase.message(format!("loss {:.5}", st.loss));
            phase.set(step + 1);
        }
    }
    let secs = phase.finish();
    let meta = BTreeMap::from([
        ("preset".to_string(), o.preset.clone()),
        ("steps".to_string(), o.steps.to_string()),
        ("seed".to_string(), o.seed.to_string()),
        ("sigma_min".to_string(), o.sigma_min.to_string()),
        ("sigma_max".to_string(), o.sigma_max.to_string()),
        (
            "weights".to_string(),
            if o.ema.is_some() { "ema" } else { "params" }.to_string(),
        ),
    ]);
    save_checkpoint(&o.out, &den.net, trainer.weights(), &meta)?;
    progress::say(format!(
        "summary: final loss {loss:.5} (step {loss_step}); {} steps in {}; checkpoint ({} weights) written to {}",
        o.steps,
        time_and_rate(secs, o.steps, "steps"),
        if o.ema.is_some() { "EMA" } else { "last" },
        o.out.display()
    ));
    Ok(loss)
}

/// Sampler settings shared by `sample` and `posterior`.
#[derive(Clone, Debug)]
pub struct SamplerOptions {
    /// The reverse-diffusion sampler: DDPM (ancestral), DDIM or predictor-corrector.
    pub kind: SamplerKind,
    /// Discretisation steps from `sigma_max` down to `sigma_min` (at least 1).
    pub steps: usize,
    /// None: the checkpoint's training range (or 1e-3 / 1e2).
    pub sigma_min: Option<f64>,
    /// None: the checkpoint's training range (or 1e2).
    pub sigma_max: Option<f64>,
    /// Seeds the sampler's initial noise and every step's noise.
    pub seed: u64,
    /// The network's arithmetic (auto: bf16 on a tensor-core GPU, else f32).
    pub precision: PrecisionRequest,
}

fn schedule_for(o: &SamplerOptions, meta: &BTreeMap<String, String>) -> Result<VeSchedule> {
    let from_meta = |k: &str, default: f64| meta.get(k).and_then(|v| v.parse().ok()).unwrap_or(default);
    VeSchedule::checked(
        o.sigma_min.unwrap_or(from_meta("sigma_min", 1e-3)),
        o.sigma_max.unwrap_or(from_meta("sigma_max", 1e2)),
    )
    .map_err(|e| {
        Error::Other(format!(
            "--sigma-min/--sigma-max (or the checkpoint's range): {e}"
        ))
    })
}

/// Refuses a sampler run whose arrays would not fit in host memory: `rows` samples of `per`
/// values, `copies` f32 arrays of that size live at once (the state, the denoised batch, the
/// sampler's and CG's vectors).
fn check_sample_memory(what: &str, rows: usize, per: usize, copies: usize) -> Result<()> {
    let bytes = rows
        .checked_mul(per)
        .and_then(|v| v.checked_mul(4 * copies))
        .unwrap_or(usize::MAX);
    crate::host_pool::ensure_available(what, bytes)
}

/// `emprior sample`: prior samples from a checkpoint, written as [n, ...].
pub fn sample(
    checkpoint: &Path,
    n: usize,
    out: &Path,
    s: &SamplerOptions,
    device: DeviceRequest,
) -> Result<()> {
    check_output(out)?;
    if n == 0 || s.steps == 0 {
        return Err(Error::Other(format!(
            "--n {n} --steps {}: both must be at least 1",
            s.steps
        )));
    }
    let (device, device_line) = open_device(device)?;
    let ck = load_checkpoint(checkpoint, DType::F32)?;
    let params = ck.params.to_device(&device)?;
    let network_line = describe_checkpoint(checkpoint, &ck.network, &ck.metadata);
    let precision = crate::nn::tensor_cores::resolve(s.precision, &device)?;
    let mut den = Denoiser::new(ck.network);
    den.net.set_precision(precision);
    let mut shape = vec![n];
    shape.extend(den.net.sample_shape());
    check_sample_memory(&format!("--n {n}"), n, shape[1..].iter().product(), 8)?;
    let sampler = Sampler::new(
        s.kind,
        s.steps,
        schedule_for(s, &ck.metadata)?,
        Philox::new(s.seed, 0x5a),
    );
    let mut prior = NetworkPrior::new(&den, &params)?;
    print_header(
        &format!(
            "emprior sample: {n} prior samples of {:?} from {}",
            &shape[1..],
            checkpoint.display()
        ),
        &[
            ("device", device_line),
            ("network", network_line),
            ("sampler", describe_sampler(&sampler, s.seed)),
            ("precision", describe_precision(s.precision, precision)),
            ("output", describe_npy(out, &shape, "f4")),
        ],
    );
    let mut progress = Progress::new(&mut prior, "sample", &sampler);
    let x = sampler.sample(&mut progress, &shape, None, DType::F32, &device)?;
    let secs = progress.finish();
    let x = x.to_vec_f32()?;
    let (text, warn) = sample_diagnostics(&x, n);
    progress::say(format!("diagnostics: {text}"));
    if warn {
        progress::say("warning: some prior samples diverged or lie far from the rest; fewer or more steps, or a checkpoint trained longer, may help");
    }
    check_samples("prior sample", &x)?;
    write_npy_f32(out, &shape, &x)?;
    progress::say(format!(
        "summary: {n} samples {shape:?} written to {}; sampled in {}",
        out.display(),
        time_and_rate(secs, n as u64, "samples")
    ));
    Ok(())
}

/// A checkpoint's network for the headers: the preset it was trained as (when recorded), the
/// architecture and parameter count, and how it was trained.
fn describe_checkpoint(path: &Path, net: &Network, meta: &BTreeMap<String, String>) -> String {
    let mut facts = vec![path.display().to_string()];
    if let Some(steps) = meta.get("steps") {
        facts.push(format!("{steps} training steps"));
    }
    match meta.get("weights").map(String::as_str) {
        Some("ema") => facts.push("EMA weights".into()),
        Some("params") => facts.push("last weights".into()),
        _ => {}
    }
    let preset = meta.get("preset").map_or(String::new(), |p| format!("{p}: "));
    format!("{preset}{} ({})", describe_network(net), facts.join(", "))
}

/// Where the prior of `posterior` comes from.
#[derive(Clone, Debug)]
pub enum PriorSource {
    /// A trained diffusion prior: a safetensors checkpoint written by `train` or `em`.
    Checkpoint(PathBuf),
    /// A Gaussian prior N(mean, cov), whose posterior is exact up to the sampler.
    Gaussian {
        /// The mean, an `.npy` of shape `[d]`.
        mean: PathBuf,
        /// The covariance, an `.npy` of shape `[d, d]` (symmetric positive semi-definite).
        cov: PathBuf,
    },
}

/// The observation operator of `posterior`.
#[derive(Clone, Debug)]
pub enum OperatorSource {
    /// [n, m, d] per observation or [m, d] shared.
    Matrix(PathBuf),
    /// [n, d] or [n, H, W] (broadcast over channels).
    Mask(PathBuf),
}

/// `emprior posterior`: posterior sampling for observations y = A x + noise.
#[derive(Clone, Debug)]
pub struct PosteriorOptions {
    /// The observations: an `.npy` `[n, m]` (or images `[n, H, W, C]`, read in row-major order).
    pub obs: PathBuf,
    /// The observation noise's standard deviation (positive; the same for every value).
    pub sigma_y: f64,
    /// The `.npy` to write: f32 samples `[n, K, ...]` (K = `samples_per_obs`).
    pub out: PathBuf,
    /// The observation operator A: dense matrices or a 0/1 mask.
    pub operator: OperatorSource,
    /// The prior: a diffusion checkpoint or a Gaussian.
    pub prior: PriorSource,
    /// The reverse-diffusion sampler and its noise range.
    pub sampler: SamplerOptions,
    /// Conjugate-gradient iterations per posterior-denoiser call (MMPS's linear solve).
    pub cg_iters: usize,
    /// Stop CG early once every residual is below this fraction of its start (None: run all).
    pub cg_rtol: Option<f64>,
    /// tweedie, zeros, sigma-t, ones, or gaussian (a Gaussian prior's own covariance).
    pub covariance: String,
    /// Posterior samples K drawn per observation (at least 1).
    pub samples_per_obs: usize,
    /// DPS instead of MMPS, with this step size zeta.
    pub dps_zeta: Option<f64>,
    /// Where to run: auto, cpu, cuda or cuda:N.
    pub device: DeviceRequest,
}

/// `emprior posterior`: K posterior samples per observation, written as [n, K, ...].
pub fn posterior(o: &PosteriorOptions) -> Result<()> {
    check_output(&o.out)?;
    let (device, device_line) = open_device(o.device)?;
    // A Gaussian prior has no network: the precision applies to checkpoints only.
    let posterior_precision = match &o.prior {
        PriorSource::Checkpoint(_) => {
            describe_precision(o.sampler.precision, o.sampler.precision.resolve(&device))
        }
        PriorSource::Gaussian { .. } => "f32 (a Gaussian prior has no network)".to_string(),
    };
    let obs = read_npy(&o.obs)?;
    // Images may come as [n, H, W, C]: each observation is its values in order.
    obs.expect_rank(&o.obs, &[2, 3, 4], "observations [n, m] (or images [n, H, W, C])")?;
    check_finite(&o.obs, "observation", &obs.data)?;
    let (n, m) = (obs.shape[0], obs.shape[1..].iter().product::<usize>());
    let k = o.samples_per_obs;
    if k == 0 || o.sampler.steps == 0 {
        return Err(Error::Other(format!(
            "--samples-per-obs {k} --steps {}: both must be at least 1",
            o.sampler.steps
        )));
    }
    if !(o.sigma_y > 0.0 && o.sigma_y.is_finite()) {
        return Err(Error::Other(format!(
            "--sigma-y {} must be a positive number",
            o.sigma_y
        )));
    }
    if let Some(zeta) = o.dps_zeta.filter(|z| !(*z > 0.0 && z.is_finite())) {
        return Err(Error::Other(format!(
            "--dps-zeta {zeta} must be a positive number"
        )));
    }
    // The prior and the signal shape.
    let (gaussian, checkpoint, prior_line) = match &o.prior {
        PriorSource::Gaussian { mean, cov } => {
            let mu = read_npy(mean)?;
            mu.expect_rank(mean, &[1], "a mean [d]")?;
            check_finite(mean, "mean", &mu.data)?;
            let d = mu.shape[0];
            let c = read_npy(cov)?;
            check_finite(cov, "covariance", &c.data)?;
            if c.shape != [d, d] {
                return Err(Error::Other(format!(
                    "{}: expected a covariance [{d}, {d}], got {:?}",
                    cov.display(),
                    c.shape
                )));
            }
            let smallest = (0..d).map(|i| c.data[i * d + i]).fold(f64::INFINITY, f64::min);
            let dplr = Dplr::from_dense(&c.data, d, 1e-6 * smallest.max(1e-12))
                .map_err(|e| Error::Other(format!("{}: {e}", cov.display())))?;
            let line = format!(
                "Gaussian, mean {}, covariance {}",
                describe_npy(mean, &mu.shape, mu.dtype),
                describe_npy(cov, &c.shape, c.dtype)
            );
            (Some(Gaussian::new(mu.data, dplr)?), None, ("prior", line))
        }
        PriorSource::Checkpoint(path) => {
            let ck = load_checkpoint(path, DType::F32)?;
            let line = describe_checkpoint(path, &ck.network, &ck.metadata);
            (None, Some(ck), ("network", line))
        }
    };
    let sample_shape = match (&gaussian, &checkpoint) {
        (Some(g), _) => vec![g.dim()],
        (_, Some(ck)) => ck.network.sample_shape(),
        _ => unreachable!(),
    };
    let d: usize = sample_shape.iter().product();
    let rows = n.saturating_mul(k);
    // The observations and operators repeated per sample (f64 while built), and the sampler's
    // and CG's vectors.
    let operator_values = match &o.operator {
        OperatorSource::Matrix(_) => m.saturating_mul(d),
        OperatorSource::Mask(_) => d,
    };
    check_sample_memory(
        &format!("{n} observations x --samples-per-obs {k}"),
        rows,
        m.max(d).saturating_add(operator_values),
        12,
    )?;
    // Each observation repeated K times (consecutive rows).
    let repeat = |v: &[f64], per: usize| -> Vec<f64> {
        (0..n)
            .flat_map(|i| {
                std::iter::repeat_n(&v[i * per..(i + 1) * per], k)
                    .flatten()
                    .copied()
            })
            .collect()
    };
    let y = Tensor::from_f64_as(&repeat(&obs.data, m), &[rows, m], DType::F32, &device)?;
    let operator_line;
    let operator: Box<dyn LinearOperator> = match &o.operator {
        OperatorSource::Matrix(path) => {
            let a = read_npy(path)?;
            check_finite(path, "operator", &a.data)?;
            let shared = if a.shape.len() == 2 {
                "shared"
            } else {
                "one per observation"
            };
            operator_line = format!("{} ({shared})", describe_npy(path, &a.shape, a.dtype));
            match a.shape.as_slice() {
                [an, am, ad] if *an == n && *am == m && *ad == d => Box::new(DenseOperators::new(Tensor::from_f64_as(
                    &repeat(&a.data, m * d),
                    &[rows, m, d],
                    DType::F32,
                    &device,
                )?)?),
                [am, ad] if *am == m && *ad == d => {
                    Box::new(SharedOperator::new(Tensor::from_f64_as(&a.data, &[m, d], DType::F32, &device)?)?)
                }
                other => {
                    return Err(Error::Other(format!(
                        "{}: expected an operator [{n}, {m}, {d}] (per observation) or [{m}, {d}] (shared), got {other:?}",
                        path.display()
                    )))
                }
            }
        }
        OperatorSource::Mask(path) => {
            let mk = read_npy(path)?;
            if let Some(i) = mk.data.iter().position(|&v| v != 0.0 && v != 1.0) {
                return Err(Error::Other(format!(
                    "{}: mask value {i} is {}; a mask holds 0 (missing) or 1 (observed)",
                    path.display(),
                    mk.data[i]
                )));
            }
            let pixels: usize = mk.shape[1..].iter().product();
            let observed = mk.data.iter().filter(|&&v| v == 1.0).count();
            operator_line = format!(
                "mask {} ({:.1}% observed)",
                describe_npy(path, &mk.shape, mk.dtype),
                100.0 * observed as f64 / mk.data.len().max(1) as f64
            );
            if mk.shape.first() != Some(&n) || pixels == 0 || d % pixels != 0 || m != d {
                return Err(Error::Other(format!(
                    "{}: expected a mask [{n}, pixels] dividing the signal size {d} (and observations [n, {d}]), got {:?}",
                    path.display(),
                    mk.shape
                )));
            }
            let bits: Vec<f32> = repeat(&mk.data, pixels).iter().map(|&v| v as f32).collect();
            Box::new(MaskOperator::from_pixel_mask(
                &bits,
                rows,
                pixels,
                d / pixels,
                DType::F32,
                &device,
            )?)
        }
    };
    let noise = ObservationNoise::Scalar(o.sigma_y * o.sigma_y);
    let cg = CgConfig {
        max_iters: o.cg_iters,
        rtol: o.cg_rtol,
    };
    let covariance = match (o.covariance.as_str(), &gaussian) {
        ("gaussian", Some(g)) => Covariance::Gaussian(Box::new(g.clone())),
        ("gaussian", None) => {
            return Err(Error::Other(
                "--covariance gaussian needs a Gaussian prior (--gaussian-mean/--gaussian-cov)".into(),
            ))
        }
        (name, _) => name.parse::<Covariance>().map_err(Error::Other)?,
    };
    let mut shape = vec![rows];
    shape.extend(&sample_shape);
    let empty = BTreeMap::new();
    let meta = checkpoint.as_ref().map_or(&empty, |c| &c.metadata);
    let sampler = Sampler::new(
        o.sampler.kind,
        o.sampler.steps,
        schedule_for(&o.sampler, meta)?,
        Philox::new(o.sampler.seed, 0x9057),
    );
    let mut out_shape = vec![n, k];
    out_shape.extend(&sample_shape);
    let method = match o.dps_zeta {
        Some(zeta) => Method::Dps(zeta),
        None => Method::Mmps { cg, covariance },
    };
    let method_line = match o.dps_zeta {
        Some(zeta) => format!(
            "DPS, step size zeta {zeta} (--cg-iters, --cg-rtol and --covariance unused); sigma_y {}",
            o.sigma_y
        ),
        None => format!(
            "MMPS, {} covariance, {} CG iteration(s) per denoiser call{}; sigma_y {}",
            o.covariance,
            o.cg_iters,
            o.cg_rtol
                .map_or(String::new(), |r| format!(" (stopping at rtol {r:e})")),
            o.sigma_y
        ),
    };
    print_header(
        &format!(
            "emprior posterior: {k} sample(s) of {sample_shape:?} for each of {n} observations of {m} values"
        ),
        &[
            ("device", device_line),
            ("data", describe_npy(&o.obs, &obs.shape, obs.dtype)),
            ("operator", operator_line),
            prior_line,
            ("method", method_line),
            ("sampler", describe_sampler(&sampler, o.sampler.seed)),
            ("precision", posterior_precision),
            ("output", describe_npy(&o.out, &out_shape, "f4")),
        ],
    );
    let (x, worst_cg, secs) = match (&gaussian, &checkpoint) {
        (Some(g), _) => {
            let mean = g.mean_tensor(DType::F32, &device)?;
            let run = (&sampler, shape.as_slice(), Some(&mean), &device);
            posterior_samples(g, operator.as_ref(), &y, &noise, method, run)?
        }
        (_, Some(ck)) => {
            let params = ck.params.to_device(&device)?;
            let mut den = Denoiser::new(ck.network.clone());
            den.net
                .set_precision(crate::nn::tensor_cores::resolve(o.sampler.precision, &device)?);
            let prior = NetworkPrior::new(&den, &params)?;
            let run = (&sampler, shape.as_slice(), None, &device);
            posterior_samples(&prior, operator.as_ref(), &y, &noise, method, run)?
        }
        _ => unreachable!(),
    };
    // How well the samples explain their observations: RMS of y - A x over sigma_y, per row.
    let fit = {
        let mut r = y.as_view()?.to_tensor()?;
        let flat = x.as_view()?.reshape(&[rows, d])?;
        crate::ops::axpy(-1.0, &operator.apply(&flat)?, &mut r)?;
        let r = r.to_vec_f32()?;
        let mut per_row: Vec<f64> = r
            .chunks(m.max(1))
            .map(|c| {
                (c.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / m.max(1) as f64).sqrt() / o.sigma_y
            })
            .collect();
        per_row.sort_by(f64::total_cmp);
        per_row.get(per_row.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let x = x.to_vec_f32()?;
    let (text, warn) = sample_diagnostics(&x, rows);
    let cg_text = worst_cg.map_or("no CG solve".into(), |r| {
        format!("largest final CG relative residual {r:.3e}")
    });
    progress::say(format!(
        "diagnostics: {text}; observation fit, median RMS(y - A x) / sigma_y {fit:.3}; {cg_text}"
    ));
    if warn {
        progress::say("warning: some posterior samples diverged or lie far from the rest; the Gaussian covariance (--covariance gaussian with a Gaussian prior), more --cg-iters, or more steps may help");
    }
    check_samples("posterior sample", &x)?;
    write_npy_f32(&o.out, &out_shape, &x)?;
    progress::say(format!(
        "summary: {rows} posterior samples {out_shape:?} ({k} per observation) written to {}; sampled in {}",
        o.out.display(),
        time_and_rate(secs, rows as u64, "samples")
    ));
    Ok(())
}

/// The posterior denoiser of `posterior`.
enum Method {
    /// MMPS with this CG solve and covariance.
    Mmps { cg: CgConfig, covariance: Covariance },
    /// DPS with this step size.
    Dps(f64),
}

/// Posterior samples over `prior` by `method`, with progress: the sampler, the batch shape, the
/// prior mean to start from (a Gaussian's) and the device in `run`. Returns the samples, the
/// largest final CG relative residual (MMPS measures every solve's: one host synchronisation
/// per solve, nothing else changes) and the sampling's seconds.
fn posterior_samples<P: Prior>(
    prior: &P,
    operator: &dyn LinearOperator,
    y: &Tensor,
    noise: &ObservationNoise,
    method: Method,
    run: (&Sampler, &[usize], Option<&Tensor>, &Device),
) -> Result<(Tensor, Option<f64>, f64)> {
    let (sampler, shape, mean, device) = run;
    let mean_view = mean.map(|m| m.as_view()).transpose()?;
    let sample = |den: &mut dyn Denoise| -> Result<(Tensor, f64)> {
        let mut progress = Progress::new(den, "posterior", sampler);
        let x = sampler.sample(&mut progress, shape, mean_view.as_ref(), DType::F32, device)?;
        Ok((x, progress.finish()))
    };
    match method {
        Method::Dps(zeta) => {
            let mut dps = Dps {
                prior,
                operator,
                y,
                zeta,
            };
            let (x, secs) = sample(&mut dps)?;
            Ok((x, None, secs))
        }
        Method::Mmps { cg, covariance } => {
            let mut mmps = Mmps::new(prior, operator, y, noise, cg);
            mmps.covariance = covariance;
            // Measuring reads each solve's residual back, which a step replayed from a CUDA
            // graph cannot: with graphs on a GPU the residual goes unreported.
            mmps.measure_cg = !(sampler.cuda_graphs && device.is_cuda());
            let (x, secs) = sample(&mut mmps)?;
            Ok((x, mmps.worst_cg_residual, secs))
        }
    }
}

/// `emprior model`: the architecture, parameter count and forward cost of a preset and, with a
/// batch size, its memory: what one forward keeps, and each phase's peak of a training step
/// and of posterior sampling (U-Nets from `UNet::activation_memory`), under `precision`: bf16
/// keeps a U-Net's activations in bf16 and adds the GPU path's casts (the TimeMLP keeps f32
/// either way); parameters, gradients, Adam and EMA are f32 master copies in both.
pub fn model_report(name: &str, batch: Option<usize>, precision: Precision) -> Result<String> {
    use std::fmt::Write as _;

    use crate::nn::unet::fmt_count;
    use crate::nn::Mode;

    let mut net = preset(name)?;
    net.set_precision(precision);
    let mut s = net.describe();
    let params = net.layout().len();
    let p_bytes = params as f64 * 4.0;
    let _ = writeln!(
        s,
        "parameters: {} ({} in f32)",
        fmt_count(params),
        fmt_bytes(p_bytes)
    );
    let _ = writeln!(
        s,
        "forward cost: {} per sample (GEMM-shaped work only)",
        fmt_flops(2.0 * net.forward_macs() as f64)
    );
    let Some(n) = batch else { return Ok(s) };
    let u = match &net {
        Network::UNet(u) => u,
        Network::Mlp(_) => {
            // Small: measured from a one-sample forward.
            let den = Denoiser::new(net);
            let weights = den.layout().init(0, DType::F32, &Device::Cpu)?;
            let mut shape = vec![1];
            shape.extend(den.net.sample_shape());
            let x = Tensor::zeros(&shape, DType::F32, &Device::Cpu)?;
            let (_, saved) = den.denoise(&weights.as_view()?.into(), &x.as_view()?, &[1.0], Mode::Eval)?;
            let per = saved.bytes() as f64;
            let _ = writeln!(
                s,
                "activations kept by one forward for the VJPs (f32 under either precision): {} per sample, {} at batch {n}",
                fmt_bytes(per),
                fmt_bytes(per * n as f64)
            );
            return Ok(s);
        }
    };
    let mem = u.activation_memory(n, true);
    let cfg = &u.config;
    let image = (n * cfg.resolution.0 * cfg.resolution.1 * cfg.in_channels) as f64 * 4.0;
    // Held by a training step around the network: the batch, its noise and noisy copy, the
    // network's scaled input (forward); then the denoised batch, the residual, the loss
    // gradient and its scaled copy instead of the scaled input (backward).
    let (images_fwd, images_bwd) = (4.0 * image, 7.0 * image);
    // Parameters, gradients, both Adam moments and the EMA copy; under bf16 also the bf16 copy
    // of the weights the layers read (the optimizer rewrites it each step; sampling casts the
    // weights it uses once).
    let copy = precision.weight_copy_bytes(p_bytes);
    let state = 5.0 * p_bytes + copy;
    let _ = writeln!(
        s,
        "memory at batch {n}, {}:",
        match precision {
            Precision::F32 => "f32",
            Precision::Bf16 =>
                "bf16 (activations kept in bf16; f32 master weights, gradients and optimizer state)",
        }
    );
    let _ = writeln!(
        s,
        "  kept by one forward for its backward or VJPs: {} ({} per sample)",
        fmt_bytes(mem.saved as f64),
        fmt_bytes(mem.saved as f64 / n as f64)
    );
    let fwd_total = state + images_fwd + mem.forward_peak as f64;
    let bwd_total = state + images_bwd + mem.backward_peak as f64;
    let _ = writeln!(
        s,
        "  training step: parameters, gradients, Adam moments and EMA{} {}; images around the network {} / {}",
        if copy > 0.0 { ", bf16 weights" } else { "" },
        fmt_bytes(state),
        fmt_bytes(images_fwd),
        fmt_bytes(images_bwd)
    );
    let _ = writeln!(
        s,
        "    forward peak: kept so far + transients {} -> {} in all",
        fmt_bytes(mem.forward_peak as f64),
        fmt_bytes(fwd_total)
    );
    let _ = writeln!(
        s,
        "    backward peak: kept {} + transients {} -> {} in all",
        fmt_bytes(mem.saved as f64),
        fmt_bytes((mem.backward_peak - mem.saved) as f64),
        fmt_bytes(bwd_total)
    );
    let _ = writeln!(
        s,
        "  posterior sampling: one forward then VJPs, peak kept + transients {} -> {} with the weights \
         (plus the sampler's image-sized vectors)",
        fmt_bytes(mem.vjp_peak as f64),
        fmt_bytes(p_bytes + copy + mem.vjp_peak as f64)
    );
    // An 80 GB device: the pool's limit is the memory free when it starts (after about 0.5 GiB
    // of context and modules) less a 32nd of the device, as DevicePool::new sets it; the
    // activations get what the step's other buffers leave of it.
    let device = 80e9;
    let limit = device - 0.5 * (1u64 << 30) as f64 - device / 32.0;
    let worst = fwd_total.max(bwd_total);
    let pool = u.pool_estimate(n, (limit - state - images_bwd).max(0.0) as u64);
    let _ = writeln!(
        s,
        "  on an 80 GB GPU ({}): a training step peaks at {} of live buffers ({:.0}%; {} in the pool's size classes){}",
        fmt_bytes(device),
        fmt_bytes(worst),
        100.0 * worst / device,
        fmt_bytes(state + images_bwd + pool.peak_in_use as f64),
        if worst <= limit { "" } else { ": does not fit" }
    );
    let _ = writeln!(
        s,
        "    a pool that keeps every freed buffer for its size class would hold {} after one step{}",
        fmt_bytes(state + images_bwd + pool.unlimited_held as f64),
        if state + images_bwd + pool.unlimited_held as f64 <= limit {
            ""
        } else {
            " (too much)"
        }
    );
    let _ = writeln!(
        s,
        "    the pool within its limit ({}) holds at most {} and allocates {} buffers a step from the driver",
        fmt_bytes(limit),
        fmt_bytes(state + images_bwd + pool.limited_held as f64),
        pool.allocations_per_step
    );
    Ok(s)
}

fn fmt_bytes(b: f64) -> String {
    match b {
        b if b >= (1u64 << 30) as f64 => format!("{:.2} GiB", b / (1u64 << 30) as f64),
        b if b >= (1u64 << 20) as f64 => format!("{:.2} MiB", b / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b / 1024.0),
    }
}

fn fmt_flops(f: f64) -> String {
    match f {
        f if f >= 1e9 => format!("{:.3} GFLOP", f / 1e9),
        f if f >= 1e6 => format!("{:.3} MFLOP", f / 1e6),
        f => format!("{:.1} kFLOP", f / 1e3),
    }
}
