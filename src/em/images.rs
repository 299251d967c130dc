//! The image experiments: corrupted images (method.md §7.2, §8, §9.2: CIFAR-10, or
//! Fashion-MNIST, the grayscale option for fast runs, or a directory of PNGs, or the user's own
//! masked images) seen only through a Bernoulli pixel mask per image, shared by the channels,
//! with noise sigma_y on every entry; and accelerated MRI (method.md §7.3), slices seen only
//! through column-masked k-space (`Observe::KSpace`, posterior::FourierOperator). A U-Net prior
//! is learned by EM:
//! - lap 0: a Gaussian prior (PPCA) fitted by EM with exact Gaussian MMPS and DDIM, then a
//!   posterior sample of every observation under it;
//! - lap k: an M-step (warm start from the previous EMA weights, fresh Adam, constant learning
//!   rate, dropout, EMA, flips and reflect-padded shifts, shuffled epochs), then the E-step:
//!   DDPM with MMPS (the Tweedie covariance through VJPs, `cg_iters` CG iterations: 1 for
//!   CIFAR-10, 3 for MRI), started at the mean of the previous samples, `samples_per_observation`
//!   samples of each observation (MRI: 2).
//!
//! Each lap measures the PSNR and SSIM of held-out posterior means (the average of several
//! posterior samples of held-out observations) against the clean images (and, for k-space, of
//! the zero-filled inverse Aᵀy, the baseline), and writes PNG grids of the observations, the
//! posterior samples, the held-out reconstructions and prior samples.

use std::borrow::Cow;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::image_data::{Dataset, MaskDraw, Observations, Observe};
use super::{
    abort_requested, check_observations, create_lap_dir, derive_seed, ensure_finite_samples, json_field,
    json_line, lap_dir, lap_params, mark_done, metric, print_header, read_lap_metrics, sample_batch,
    save_lap_checkpoint, write_metrics_jsonl, write_run_report, Config, Fingerprint,
};
use crate::data::cifar10;
use crate::device::Device;
use crate::diffusion::sampler::Denoise;
use crate::diffusion::{Denoiser, Network, Sampler, SamplerKind, VeSchedule};
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::gaussian::{ppca_randomized, Dplr, Gaussian};
use crate::io::plot::{self, image_grid, save_image};
use crate::io::report::Figure;
use crate::io::{read_npy, write_atomically, write_npy_f32, write_npy_u8};
use crate::metrics::{psnr, ssim};
use crate::nn::{UNet, UNetConfig};
use crate::ops::rng::gather_rows_permuted;
use crate::ops::Philox;
use crate::posterior::{CgConfig, Covariance, Mmps, NetworkPrior, ObservationNoise, Prior};
use crate::progress::{say, Laps, Phase};
use crate::tensor::{AsView, DType, Tensor};
use crate::train::augment::flip_shift;
use crate::train::{AdamConfig, LrSchedule, Trainer};

/// Images per part of an E-step batch on the CPU (diffusion::BatchPart). CIFAR-10 quick preset's
/// E-step (384 images, 24 DDPM + MMPS steps, batches of 64), 2 cores: 92.8 s whole, 35.9 s in
/// parts of 4, 34.2 s of 8, 39.9 s of 16.
pub(crate) const CPU_PART_IMAGES: usize = 8;

/// Purposes for `derive_seed`.
const SEED_INIT: u64 = 1;
const SEED_ESTEP: u64 = 2;
const SEED_MSTEP: u64 = 3;
const SEED_PARAMS: u64 = 4;
const SEED_HELDOUT: u64 = 5;
const SEED_PRIOR: u64 = 6;
const SEED_PPCA: u64 = 7;
const SEED_EXPORT: u64 = 8;
const SEED_MASKS: u64 = 11;
const SEED_NOISE: u64 = 12;
const SEED_HELDOUT_MASKS: u64 = 13;
const SEED_HELDOUT_NOISE: u64 = 14;

/// The dynamic range of the model's pixel scale [-2, 2).
const RANGE: f64 = 4.0;

/// What one lap measured; one line of metrics.jsonl.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageLapMetrics {
    /// The lap: 0 for the Gaussian initialisation, then 1, 2, ...
    pub lap: usize,
    /// PSNR (dB) of the held-out posterior means against the clean images.
    pub psnr: f64,
    /// SSIM of the held-out posterior means against the clean images.
    pub ssim: f64,
    /// PSNR of the training posterior samples (the first of each observation's) against the
    /// clean images.
    pub sample_psnr: f64,
    /// The baseline of k-space observations: PSNR (dB) of the held-out zero-filled inverses Aᵀy
    /// against the clean images (NaN for pixel masks, and in runs written before it existed).
    pub zero_filled_psnr: f64,
    /// SSIM of the held-out zero-filled inverses Aᵀy (NaN likewise).
    pub zero_filled_ssim: f64,
    /// Mean DSM loss over the M-step's last epoch (NaN for lap 0).
    pub loss: f64,
    /// Wall time of the E-step in seconds (lap 0: the whole Gaussian initialisation with it).
    pub estep_seconds: f64,
    /// Wall time of the M-step in seconds (0 for lap 0).
    pub mstep_seconds: f64,
    /// E-step throughput: observations times sampler steps per second.
    pub estep_image_steps_per_s: f64,
    /// M-step throughput: training images per second (NaN for lap 0).
    pub mstep_images_per_s: f64,
    /// The evaluation's time in seconds: held-out posterior means, prior samples, PSNR and SSIM
    /// (NaN in runs written before it was recorded).
    pub eval_seconds: f64,
    /// Writing the lap's grids, the run's curves and its report, in seconds (NaN likewise).
    pub plot_seconds: f64,
    /// Exporting prior samples for FID tools, in seconds (0 when the lap exports none).
    pub export_seconds: f64,
    /// This lap's posterior samples with a value outside (-filter_bound, filter_bound), left out
    /// of the next M-step (0 without a bound, and in runs written before it was recorded).
    pub outside_bound: usize,
}

impl ImageLapMetrics {
    fn to_json(&self) -> String {
        json_line(&[
            ("lap", self.lap as f64),
            ("psnr", self.psnr),
            ("ssim", self.ssim),
            ("sample_psnr", self.sample_psnr),
            ("zero_filled_psnr", self.zero_filled_psnr),
            ("zero_filled_ssim", self.zero_filled_ssim),
            ("loss", self.loss),
            ("estep_seconds", self.estep_seconds),
            ("mstep_seconds", self.mstep_seconds),
            ("estep_image_steps_per_s", self.estep_image_steps_per_s),
            ("mstep_images_per_s", self.mstep_images_per_s),
            ("eval_seconds", self.eval_seconds),
            ("plot_seconds", self.plot_seconds),
            ("export_seconds", self.export_seconds),
            ("outside_bound", self.outside_bound as f64),
        ])
    }

    fn from_json(line: &str) -> Result<Self> {
        let field = |k: &str| json_field(line, k);
        Ok(ImageLapMetrics {
            lap: field("lap")? as usize,
            psnr: field("psnr")?,
            ssim: field("ssim")?,
            sample_psnr: field("sample_psnr")?,
            zero_filled_psnr: field("zero_filled_psnr").unwrap_or(f64::NAN),
            zero_filled_ssim: field("zero_filled_ssim").unwrap_or(f64::NAN),
            loss: field("loss")?,
            estep_seconds: field("estep_seconds")?,
            mstep_seconds: field("mstep_seconds")?,
            estep_image_steps_per_s: field("estep_image_steps_per_s")?,
            mstep_images_per_s: field("mstep_images_per_s")?,
            // Absent from runs written before they were recorded.
            eval_seconds: field("eval_seconds").unwrap_or(f64::NAN),
            plot_seconds: field("plot_seconds").unwrap_or(f64::NAN),
            export_seconds: field("export_seconds").unwrap_or(f64::NAN),
            outside_bound: field("outside_bound").map_or(0, |v| v as usize),
        })
    }

    /// The one-line summary printed per lap.
    pub fn summary(&self) -> String {
        let baseline = if self.zero_filled_psnr.is_finite() {
            format!(" (zero-filled {} dB)", metric(self.zero_filled_psnr, 2))
        } else {
            String::new()
        };
        format!(
            "lap {:>3} | held-out PSNR {} dB{baseline} SSIM {} | sample PSNR {} dB | loss {} | E-step {:.1}s ({} image-steps/s) | M-step {:.1}s ({} images/s) | eval {}s | plots {}s",
            self.lap,
            metric(self.psnr, 2),
            metric(self.ssim, 4),
            metric(self.sample_psnr, 2),
            metric(self.loss, 4),
            self.estep_seconds,
            metric(self.estep_image_steps_per_s, 1),
            self.mstep_seconds,
            metric(self.mstep_images_per_s, 1),
            metric(self.eval_seconds, 1),
            metric(self.plot_seconds, 1)
        ) + &if self.outside_bound > 0 {
            format!(" | {} samples outside filter_bound", self.outside_bound)
        } else {
            String::new()
        }
    }
}

fn parse_list(cfg: &Config, key: &str) -> Result<Vec<usize>> {
    let text = cfg.string(key)?;
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| Error::Other(format!("{key} = '{text}' is not a list of integers")))
        })
        .collect()
}

/// The observations' count and image size (n, h, w, c) of the configured dataset, known before
/// it is read (the user's images: from their file, or the run's saved copy).
fn dataset_shape(cfg: &Config, run: &Path) -> Result<(usize, usize, usize, usize)> {
    use crate::data::fashion_mnist as fm;
    let n = || cfg.count("observations");
    match cfg.string("dataset")?.as_str() {
        "cifar10" | "png-dir" => Ok((n()?, cifar10::SIDE, cifar10::SIDE, cifar10::CHANNELS)),
        "fashion-mnist" => Ok((n()?, fm::SIDE, fm::SIDE, fm::CHANNELS)),
        "mri" => {
            let size = cfg.count("slice_size")?;
            Ok((n()?, size, size, 1))
        }
        "npy" => {
            let copy = super::observations_dir(run).join("obs.npy");
            let path = if copy.is_file() {
                copy
            } else {
                PathBuf::from(cfg.string("obs")?)
            };
            if path.as_os_str().is_empty() {
                return Err(Error::Other(
                    "experiment images needs obs (--obs FILE.npy): observed images [n, H, W, C]".into(),
                ));
            }
            let shape = if path.is_dir() {
                // A folder of PNGs: the count, and the first image's size.
                let files = crate::data::png_images::list(&path)?;
                let first = files
                    .first()
                    .ok_or_else(|| Error::Other(format!("{}: no PNG files", path.display())))?;
                let img = crate::data::png_images::read(first)?;
                vec![files.len(), img.height, img.width, img.channels]
            } else {
                crate::io::read_npy(&path)?.shape
            };
            match *shape.as_slice() {
                [n, h, w] => Ok((n, h, w, 1)),
                [n, h, w, c] => Ok((n, h, w, c)),
                ref other => Err(Error::Other(format!(
                    "{}: expected observed images [n, H, W, C] or [n, H, W], got {other:?}",
                    path.display()
                ))),
            }
        }
        other => Err(Error::Other(format!(
            "dataset = '{other}' (expected cifar10, fashion-mnist, png-dir or mri)"
        ))),
    }
}

/// Refuses, before anything is read or created, a configuration whose peak memory exceeds what
/// the device has: the host's arrays of observations and samples, and the larger of the M-step
/// (parameters, gradients, Adam moments and EMA, the training set, a batch's activations by
/// `UNet::activation_memory`) and the E-step (the weights, a batch's VJP activations and its
/// image-sized sampler and CG vectors). On the CPU both come from host memory, with the batches
/// as the CPU runs them (a part per core at a time). An estimate: it errs by the allocator's
/// rounding and small buffers, not by orders of magnitude.
fn check_memory(cfg: &Config, device: &Device, run: &Path) -> Result<()> {
    let (n, h, w, c) = dataset_shape(cfg, run)?;
    let mut net = network(cfg, h, w, c)?;
    // The run's precision: under bf16 the activations are kept in bf16 (about half the bytes).
    net.set_precision(super::precision(cfg, device)?.1);
    let Network::UNet(unet) = &net else {
        return Ok(());
    };
    let f32s = |count: usize| count as f64 * 4.0;
    let (per, pixels) = (h * w * c, h * w);
    let held = cfg.count("heldout")?;
    let repeats = cfg.count_or("samples_per_observation", 1)?;
    // Observed values per image: k-space holds [h, w, 2].
    let observed = if cfg.string("dataset")? == "mri" {
        2 * per
    } else {
        per
    };
    // Clean images, observations, masks; this lap's samples and the next; held-out means.
    let host =
        f32s(n * (per + observed + pixels) + 2 * repeats * n * per + held * (2 * per + observed + pixels));
    let threads = rayon::current_num_threads();
    let (m_batch, e_batch) = (cfg.count("mstep_batch")?.max(1), cfg.count("estep_batch")?.max(1));
    // The network's activations: a whole batch on a GPU, a part per core at a time on the CPU.
    let (m_active, e_active) = if device.is_cuda() {
        (m_batch, e_batch)
    } else {
        let part = |batch: usize, rows: usize| batch.min(threads * rows).max(1);
        let train_part = crate::train::cpu_part_rows(&net).unwrap_or(m_batch);
        (part(m_batch, train_part), part(e_batch, CPU_PART_IMAGES))
    };
    let params = f32s(net.layout().len());
    // Under bf16 both phases hold a bf16 copy of the weights they run (nn::Weights).
    let copy = net.layout().precision().weight_copy_bytes(params);
    let train = unet.activation_memory(m_active, true);
    // On the CPU each part of a wave keeps its own gradient (train::CPU_PARTS_PER_CORE).
    let part_grads = if device.is_cuda() {
        0.0
    } else {
        (threads * crate::train::CPU_PARTS_PER_CORE) as f64 * params
    };
    // Parameters, gradients, Adam moments and EMA; the training set; the batch with its noise,
    // noisy copy, denoised copy and gradients.
    let mstep = 5.0 * params
        + copy
        + part_grads
        + f32s(repeats * n * per)
        + f32s(m_batch.saturating_mul(7 * per))
        + train.backward_peak as f64;
    let sample = unet.activation_memory(e_active, false);
    let estep = params
        + copy
        + sample.vjp_peak as f64
        + f32s(e_batch.saturating_mul(10 * per + 2 * observed + pixels));
    let working = mstep.max(estep);
    let gb = |b: f64| b / 1e9;
    let what = format!(
        "{n} observations of {h}x{w}x{c} (host arrays {:.2} GB), M-step at mstep_batch = {m_batch} ({:.2} GB), E-step at estep_batch = {e_batch} ({:.2} GB)",
        gb(host),
        gb(mstep),
        gb(estep)
    );
    let advice = "lower observations, mstep_batch or estep_batch, or choose a smaller network";
    let refuse = |kind: &str, needs: f64, has: usize| {
        Err(Error::Other(format!(
            "this configuration needs about {:.2} GB of {kind} memory at its peak and {:.2} GB is available: {what}; {advice}",
            gb(needs),
            gb(has as f64)
        )))
    };
    let host_needs = if device.is_cuda() { host } else { host + working };
    if let Some(has) = crate::host_pool::available_bytes() {
        if host_needs > has as f64 {
            return refuse("host", host_needs, has);
        }
    }
    if device.is_cuda() {
        if let Some(has) = device.memory_available() {
            if working > has as f64 {
                return refuse("GPU", working, has);
            }
        }
    }
    Ok(())
}

/// The U-Net of the configuration, for images of h x w x c.
fn network(cfg: &Config, h: usize, w: usize, c: usize) -> Result<Network> {
    let attention = cfg
        .string("attention")?
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let parsed = s
                .split_once(':')
                .and_then(|(l, h)| Some((l.trim().parse().ok()?, h.trim().parse().ok()?)));
            parsed.ok_or_else(|| Error::Other(format!("attention = '{s}': expected level:heads, e.g. 1:4")))
        })
        .collect::<Result<Vec<(usize, usize)>>>()?;
    let config = UNetConfig {
        in_channels: c,
        out_channels: c,
        channels: parse_list(cfg, "channels")?,
        blocks: parse_list(cfg, "blocks")?,
        attention,
        emb: cfg.count("emb")?,
        dropout: cfg.float("dropout")? as f32,
        patch: cfg.count_or("patch", 1)?,
        resolution: (h, w),
    };
    Ok(Network::UNet(UNet::new(config)?))
}

/// Everything fixed for a run.
struct Setup {
    cfg: Config,
    seed: u64,
    data: Dataset,
    train: Observations,
    heldout: Observations,
    schedule: VeSchedule,
    network: Network,
    noise: ObservationNoise,
    /// Posterior samples drawn per observation each lap (the E-step runs over `train` this many
    /// times over; the paper's MRI: 2).
    repeats: usize,
}

impl Setup {
    /// Loads the data and makes (or, when the run directory has them, reads back) the masks;
    /// for `experiment = "images"`, the user's own observed images and masks.
    /// The run's data and observations; only rank 0 of `comm` writes into the run directory.
    fn new(cfg: &Config, run: &Path, comm: &dyn Communicator) -> Result<Self> {
        let lead = comm.rank() == 0;
        if cfg.string("experiment")? == "images" {
            return Self::user(cfg, run);
        }
        let seed = cfg.int("seed")? as u64;
        let mut data = Dataset::load(cfg)?;
        let kspace = cfg.string("dataset")? == "mri";
        let (h, w) = (data.h, data.w);
        let draw = if kspace {
            MaskDraw::Columns {
                acceleration: cfg.float("acceleration")?,
                center_fraction: cfg.float("center_fraction")?,
            }
        } else {
            let removed = cfg.float("corruption")? / 100.0;
            if !(0.0..1.0).contains(&removed) {
                return Err(Error::Other(format!(
                    "corruption = {} is not a percentage of pixels removed in [0, 100)",
                    removed * 100.0
                )));
            }
            MaskDraw::Pixels { removed }
        };
        let mask_shape = draw.shape(h, w);
        let sigma_y = cfg.float("sigma_y")?;
        let per = data.per();
        let masks = |name: &str, n: usize, purpose: u64| -> Result<Vec<f32>> {
            let path = run.join(name);
            let shape: Vec<usize> = std::iter::once(n).chain(mask_shape.iter().copied()).collect();
            if path.is_file() {
                let saved = read_npy(&path)?;
                if saved.shape != shape {
                    return Err(Error::Other(format!(
                        "{}: shape {:?}, expected {shape:?} for this configuration",
                        path.display(),
                        saved.shape,
                    )));
                }
                return Ok(saved.to_f32());
            }
            let m = draw.draw(n, (h, w), derive_seed(seed, 0, purpose))?;
            if lead {
                let bytes: Vec<u8> = m.iter().map(|&v| v as u8).collect();
                write_npy_u8(&path, &shape, &bytes)?;
            }
            Ok(m)
        };
        let n = data.train.len() / per;
        let held = data.heldout.len() / per;
        if n == 0 || held == 0 {
            return Err(Error::Other("observations and heldout must be positive".into()));
        }
        let train_masks = masks("masks.npy", n, SEED_MASKS)?;
        let held_masks = masks("heldout-masks.npy", held, SEED_HELDOUT_MASKS)?;
        let observe = |clean: Vec<f32>, masks: Vec<f32>, purpose: u64| -> Result<Observations> {
            let noise_seed = derive_seed(seed, 0, purpose);
            if kspace {
                Observations::kspace(clean, masks, (h, w), sigma_y, noise_seed)
            } else {
                Ok(Observations::new(clean, masks, per, sigma_y, noise_seed))
            }
        };
        let train = observe(std::mem::take(&mut data.train), train_masks, SEED_NOISE)?;
        let heldout = observe(std::mem::take(&mut data.heldout), held_masks, SEED_HELDOUT_NOISE)?;
        // The observations as the run sees them, written once (the observations file last: its
        // presence means the pair is complete). Pixels: y with unobserved values zeroed and the
        // masks, for `emprior posterior` to replay any lap; k-space: y [n, h, w, 2] and the
        // column masks [n, w].
        let saved = super::observations_dir(run);
        let (obs_file, mask_file) = if kspace {
            ("kspace.npy", "columns.npy")
        } else {
            ("obs.npy", "mask.npy")
        };
        if lead && !saved.join(obs_file).is_file() {
            fs::create_dir_all(&saved)
                .map_err(|e| Error::Other(format!("cannot create {}: {e}", saved.display())))?;
            let bits: Vec<u8> = train.masks.iter().map(|&v| v as u8).collect();
            let mask_dims: Vec<usize> = std::iter::once(n).chain(mask_shape.iter().copied()).collect();
            write_npy_u8(&saved.join(mask_file), &mask_dims, &bits)?;
            if kspace {
                write_npy_f32(&saved.join(obs_file), &[n, h, w, 2], &train.y)?;
            } else {
                write_npy_f32(&saved.join(obs_file), &[n, h, w, data.c], &train.shown(n, per)?)?;
            }
        }
        let network = network(cfg, data.h, data.w, data.c)?;
        Ok(Setup {
            seed,
            train,
            heldout,
            schedule: VeSchedule::new(cfg.float("sigma_min")?, cfg.float("sigma_max")?),
            network,
            noise: ObservationNoise::Scalar(sigma_y * sigma_y),
            data,
            repeats: cfg.count_or("samples_per_observation", 1)?,
            cfg: cfg.clone(),
        })
    }

    /// The user's observed images `obs` [n, H, W, C] (or [n, H, W]: grayscale), their masks
    /// `mask` [n, H, W] (shared by the channels) or [n, H, W, C], and, when given, the true
    /// images `truth` [n, H, W, C] for PSNR. The first `heldout` observations are also shown and
    /// scored as the held-out set (they are not held out of training: all are observations).
    fn user(cfg: &Config, run: &Path) -> Result<Self> {
        let need = |key: &str, what: &str| -> Result<crate::io::NpyArray> {
            super::user_array(cfg, run, key, &[3, 4], what)?.ok_or_else(|| {
                Error::Other(format!(
                    "experiment images needs {key} (--{key} FILE.npy): {what}"
                ))
            })
        };
        let obs = need("obs", "observed images [n, H, W, C] or [n, H, W]")?;
        let (n, h, w, c) = match *obs.shape.as_slice() {
            [n, h, w] => (n, h, w, 1),
            [n, h, w, c] => (n, h, w, c),
            ref other => return Err(Error::Other(format!("obs: expected [n, H, W, C], got {other:?}"))),
        };
        if n < 2 || h == 0 || w == 0 || !(1..=4).contains(&c) {
            return Err(Error::Other(format!(
                "obs: expected at least 2 images [n, H, W, C] with 1 to 4 channels, got {:?}",
                obs.shape
            )));
        }
        let mask = need("mask", "masks [n, H, W] or [n, H, W, C], 1 = observed")?;
        let per_pixel = mask.shape == [n, h, w];
        if !per_pixel && mask.shape != [n, h, w, c] {
            return Err(Error::Other(format!(
                "mask: expected [{n}, {h}, {w}] or [{n}, {h}, {w}, {c}] for observations {:?}, got {:?}",
                obs.shape, mask.shape
            )));
        }
        if let Some(i) = mask.data.iter().position(|&v| v != 0.0 && v != 1.0) {
            return Err(Error::Other(format!(
                "mask: value {i} is {}; a mask holds 0 (missing) or 1 (observed)",
                mask.data[i]
            )));
        }
        let truth = super::user_array(cfg, run, "truth", &[3, 4], "true images")?;
        let clean = match truth {
            None => Vec::new(),
            Some(t) if t.data.len() == obs.data.len() => t.to_f32(),
            Some(t) => {
                return Err(Error::Other(format!(
                    "truth: expected {:?} like the observations, got {:?}",
                    obs.shape, t.shape
                )))
            }
        };
        let sigma_y = cfg.float("sigma_y")?;
        // Unobserved values carry no information: zeroed, so y = mask * (x + noise) as MMPS assumes.
        let masks = mask.to_f32();
        let per = h * w * c;
        let channels = per / (masks.len() / n);
        let y: Vec<f32> = obs
            .to_f32()
            .iter()
            .enumerate()
            .map(|(i, &v)| v * masks[i / channels])
            .collect();
        let held = cfg.count("heldout")?.min(n);
        let train = Observations {
            y,
            masks,
            clean,
            n,
            observe: Observe::Pixels,
        };
        let heldout = train.first(held, per);
        let network = network(cfg, h, w, c)?;
        Ok(Setup {
            seed: cfg.int("seed")? as u64,
            data: Dataset {
                h,
                w,
                c,
                train: Vec::new(),
                heldout: Vec::new(),
            },
            train,
            heldout,
            schedule: VeSchedule::new(cfg.float("sigma_min")?, cfg.float("sigma_max")?),
            network,
            noise: ObservationNoise::Scalar(sigma_y * sigma_y),
            repeats: cfg.count_or("samples_per_observation", 1)?,
            cfg: cfg.clone(),
        })
    }

    fn image_shape(&self, rows: usize) -> [usize; 4] {
        [rows, self.data.h, self.data.w, self.data.c]
    }

    /// Posterior samples [n, h * w * c] of `obs` under `prior`, in batches of `estep_batch`.
    #[allow(clippy::too_many_arguments)]
    fn e_step<P: Prior + Sync>(
        &self,
        comm: &dyn Communicator,
        prior: &P,
        covariance: &Covariance,
        obs: &Observations,
        mean: &Tensor,
        kind: SamplerKind,
        steps: usize,
        cg: CgConfig,
        seed: u64,
        device: &Device,
        label: &str,
    ) -> Result<Vec<f32>> {
        let batch = self.cfg.count("estep_batch")?.max(1);
        let (per, m) = (self.data.per(), obs.width());
        let mut out = Vec::with_capacity(obs.n * per);
        let mut phase = Phase::new(label, obs.n as u64, "images");
        for (chunk, first) in (0..obs.n).step_by(batch).enumerate() {
            let rows = batch.min(obs.n - first);
            let sampler = Sampler::new(kind, steps, self.schedule, Philox::new(seed, chunk as u64));
            // On the CPU in parts of CPU_PART_IMAGES, this rank's share (em::sample_batch).
            sample_batch(&mut out, rows, per, CPU_PART_IMAGES, device, comm, |part, at| {
                let (lo, hi) = (first + part.start, first + part.end);
                let y = Tensor::from_f32(&obs.y[lo * m..hi * m], &[hi - lo, m], device)?;
                let op = obs.operator((lo, hi), per, device)?;
                let mut mmps = Mmps::new(prior, op.as_ref(), &y, &self.noise, cg);
                mmps.covariance = covariance.clone();
                let mean = mean.as_view()?;
                let shape = self.image_shape(hi - lo);
                sampler.sample_part(&mut mmps, &shape, at, Some(&mean), DType::F32, device)
            })?;
            phase.set((first + rows) as u64);
        }
        phase.finish();
        ensure_finite_samples(label, &out, per)?;
        Ok(out)
    }

    /// Samples of the prior itself (DDIM from mean + sigma_max z), for grids and FID export.
    fn prior_samples(
        &self,
        den: &mut impl Denoise,
        count: usize,
        mean: &Tensor,
        seed: u64,
        device: &Device,
    ) -> Result<Vec<f32>> {
        let batch = self.cfg.count("estep_batch")?.max(1);
        let mean = mean.as_view()?;
        let mut out = Vec::with_capacity(count * self.data.per());
        for (chunk, first) in (0..count).step_by(batch).enumerate() {
            let rows = batch.min(count - first);
            let sampler = Sampler::new(
                SamplerKind::Ddim,
                self.cfg.count("prior_steps")?,
                self.schedule,
                Philox::new(seed, chunk as u64),
            );
            out.extend(
                sampler
                    .sample(den, &self.image_shape(rows), Some(&mean), DType::F32, device)?
                    .to_vec_f32()?,
            );
        }
        ensure_finite_samples("prior samples", &out, self.data.per())?;
        Ok(out)
    }

    /// Posterior means of the held-out observations (the average of `heldout_samples` posterior
    /// samples each) and the first of those samples.
    #[allow(clippy::too_many_arguments)]
    fn heldout_means<P: Prior + Sync>(
        &self,
        comm: &dyn Communicator,
        prior: &P,
        covariance: &Covariance,
        mean: &Tensor,
        seed: u64,
        device: &Device,
        lap: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let repeats = self.cfg.count("heldout_samples")?.max(1);
        let mut sum = vec![0.0f64; self.heldout.n * self.data.per()];
        let mut first = Vec::new();
        for r in 0..repeats {
            let x = self.e_step(
                comm,
                prior,
                covariance,
                &self.heldout,
                mean,
                SamplerKind::Ddpm,
                self.cfg.count("estep_steps")?,
                self.estep_cg()?,
                derive_seed(seed, r, SEED_HELDOUT),
                device,
                &format!("lap {lap} held-out {}/{repeats}", r + 1),
            )?;
            for (s, v) in sum.iter_mut().zip(&x) {
                *s += *v as f64;
            }
            if r == 0 {
                first = x;
            }
        }
        let means = sum.iter().map(|s| (s / repeats as f64) as f32).collect();
        Ok((means, first))
    }

    fn estep_cg(&self) -> Result<CgConfig> {
        Ok(CgConfig {
            max_iters: self.cfg.count("cg_iters")?,
            rtol: None,
        })
    }

    /// DSM training from `params` on the posterior samples: shuffled epochs (the last partial
    /// batch dropped), flips and shifts, a fresh Adam with EMA. Returns the EMA weights, the mean
    /// loss of the last epoch and the training images per second.
    fn m_step(
        &self,
        comm: &dyn Communicator,
        params: Tensor,
        samples: &[f32],
        seed: u64,
        device: &Device,
        lap: usize,
    ) -> Result<(Tensor, f64, f64)> {
        let per = self.data.per();
        let n = samples.len() / per;
        let batch = self.cfg.count("mstep_batch")?;
        let epochs = self.cfg.count("mstep_epochs")?;
        if batch == 0 || batch > n {
            return Err(Error::Other(format!(
                "mstep_batch = {batch} must be between 1 and the {n} posterior samples"
            )));
        }
        let ema = self.cfg.float("ema")?;
        let config = AdamConfig {
            ema: (ema > 0.0).then_some(ema),
            ..AdamConfig::new(LrSchedule::Constant(self.cfg.float("lr")?))
        };
        let shift = self.cfg.count("shift")?;
        let augment = self.cfg.int("augment")? != 0;
        let den = Denoiser::new(self.network.clone());
        let mut trainer = Trainer::new(den, params, config, self.schedule, seed)?;
        // This rank's images of every batch (all of them for one process).
        let mine = trainer.shard_rows(batch, comm, device)?;
        let per_epoch = n / batch;
        let total = epochs * per_epoch;
        // The samples stay on the device for the whole M-step; each batch is gathered there
        // from a Philox-keyed permutation of the epoch (ops::rng::gather_rows_permuted).
        let pool = Tensor::from_f32(samples, &self.image_shape(n), device)?;
        let shuffle = Philox::new(seed, 0x5bf1);
        let (mut epoch_loss, mut step) = (f64::NAN, 0usize);
        let mut phase = Phase::new(format!("lap {lap} M-step"), total as u64, "steps");
        for epoch in 0..epochs {
            let mut sum = 0.0;
            for b in 0..per_epoch {
                let xt = gather_rows_permuted(&pool, batch, shuffle, epoch as u64, b * batch)?;
                let xt = if augment {
                    flip_shift(
                        &xt.as_view()?,
                        shift,
                        Philox::new(derive_seed(seed, 0, 0xa06), step as u64),
                    )?
                } else {
                    xt
                };
                // Every rank gathers and augments the whole batch (a copy: cheap beside the
                // network), so each image keeps its augmentation stream, and trains on its rows.
                if step == total / 2 {
                    super::kill_requested(lap, comm.rank());
                }
                let x = xt
                    .as_view()?
                    .sub(mine.start * per, &self.image_shape(mine.len()))?;
                trainer
                    .step_shard(&x, batch, mine.start, comm)
                    .map_err(|e| Error::Other(format!("lap {lap}, M-step {step}: {e}")))?;
                step += 1;
                if step % 50 == 0 || step == total {
                    // The losses wait on the device until here; a non-finite one fails here.
                    let losses = take_losses(&mut trainer, lap)?;
                    sum += losses;
                    phase.set(step as u64);
                    phase.message(format!(
                        "epoch {}/{epochs}, loss so far {:.4}",
                        epoch + 1,
                        sum / (b + 1) as f64
                    ));
                }
            }
            sum += take_losses(&mut trainer, lap)?;
            epoch_loss = sum / per_epoch as f64;
        }
        let rate = (total * batch) as f64 / phase.finish().max(1e-9);
        Ok((trainer.weights().to_device(device)?, epoch_loss, rate))
    }

    /// Writes the grids of a lap: the observations, their posterior samples, the held-out
    /// reconstructions and prior samples; for k-space observations the held-out grid is the
    /// paper's Figure 6 (rows: zero-filled Aᵀy, a posterior sample, the posterior mean, the
    /// ground truth) and lap 0 also draws the column masks (`masks.png`).
    fn write_grids(
        &self,
        dir: &Path,
        m: &ImageLapMetrics,
        samples: &[f32],
        held_first: &[f32],
        held_means: &[f32],
        prior: &[f32],
    ) -> Result<()> {
        let (h, w, c, per) = (self.data.h, self.data.w, self.data.c, self.data.per());
        let kspace = matches!(self.train.observe, Observe::KSpace { .. });
        let g = self.cfg.count("grid")?.min(self.train.n);
        let cols = (g as f64).sqrt().ceil() as usize;
        let lap = if m.lap == 0 {
            "Gaussian initialisation (lap 0)".to_string()
        } else {
            format!("lap {} of {}", m.lap, self.cfg.count("laps")?)
        };
        // Small images are drawn at twice their size.
        let scale = if h * w <= 64 * 64 { 2 } else { 1 };
        let grid = |name: &str, title: &str, x: &[f32], cols: usize, columns: &[String], rows: &[String]| {
            let bytes = cifar10::to_bytes(x);
            image_grid(
                &dir.join(name),
                title,
                &bytes,
                (h, w, c),
                cols,
                scale,
                columns,
                rows,
            )
        };
        let removed = self.train.removed_percent();
        let what = if kspace {
            format!(
                "zero-filled inverse of {}x undersampled k-space ({removed:.0}% of columns dropped)",
                metric(self.cfg.float("acceleration")?, 1)
            )
        } else {
            format!("{removed:.0}% of pixels removed, grey")
        };
        grid(
            "observations.png",
            &format!("The first {g} of {} training observations ({what})", self.train.n),
            &self.train.shown(g, per)?,
            cols,
            &[],
            &[],
        )?;
        grid(
            "posterior.png",
            &format!("{lap}: posterior samples of those observations (the E-step)"),
            &samples[..g * per],
            cols,
            &[],
            &[],
        )?;
        grid(
            "prior.png",
            &format!("{lap}: samples of the prior alone (no observation)"),
            prior,
            (prior.len() / per).max(1).isqrt().max(1),
            &[],
            &[],
        )?;
        let shown_count = self.heldout.n.min(if kspace { 8 } else { 16 });
        let shown = self.heldout.shown(shown_count, per)?;
        // Without the true images, their part is mid grey.
        let unknown = vec![0.0f32; shown_count * per];
        let clean = if self.heldout.clean.is_empty() {
            &unknown[..]
        } else {
            &self.heldout.clean[..]
        };
        let truth = if self.heldout.clean.is_empty() {
            "no ground truth given"
        } else {
            "ground truth"
        };
        let observation = if kspace {
            "zero-filled Aᵀy"
        } else {
            "observation"
        };
        let kinds = [observation, "a posterior sample", "posterior mean", truth].map(String::from);
        let parts = [&shown[..], held_first, held_means, clean];
        // (kind, image) in the order the grid is filled.
        let order: Vec<(usize, usize)> = if kspace {
            // The paper's Figure 6: one row per kind, one column per slice.
            (0..4)
                .flat_map(|k| (0..shown_count).map(move |i| (k, i)))
                .collect()
        } else {
            (0..shown_count)
                .flat_map(|i| (0..4).map(move |k| (k, i)))
                .collect()
        };
        let mut table = Vec::with_capacity(shown_count * 4 * per);
        for (k, i) in order {
            table.extend(
                parts[k][i * per..(i + 1) * per]
                    .iter()
                    .map(|v| v.clamp(-2.0, 2.0)),
            );
        }
        let psnr = if m.psnr.is_finite() {
            let baseline = if m.zero_filled_psnr.is_finite() {
                format!(" (zero-filled {} dB)", metric(m.zero_filled_psnr, 2))
            } else {
                String::new()
            };
            format!(
                "; posterior means' PSNR {} dB{baseline}, SSIM {}",
                metric(m.psnr, 2),
                metric(m.ssim, 3)
            )
        } else {
            String::new()
        };
        let title = format!("{lap}: held-out observations{psnr}");
        if kspace {
            grid("heldout.png", &title, &table, shown_count, &[], &kinds)?;
            if m.lap == 0 {
                self.write_masks(dir, shown_count.max(1))?;
            }
            Ok(())
        } else {
            grid("heldout.png", &title, &table, 4, &kinds, &[])
        }
    }

    /// `masks.png` for k-space observations: for the first `count` training observations, the
    /// column mask (white where a k-space column is kept), the observed k-space's log magnitude
    /// and the zero-filled inverse Aᵀy.
    fn write_masks(&self, dir: &Path, count: usize) -> Result<()> {
        let Observe::KSpace { h, w } = self.train.observe else {
            return Ok(());
        };
        let count = count.min(self.train.n);
        let pixels = h * w;
        let mut bytes = Vec::with_capacity(3 * count * pixels);
        for i in 0..count {
            let mask = &self.train.masks[i * w..(i + 1) * w];
            bytes.extend((0..pixels).map(|p| if mask[p % w] != 0.0 { 255u8 } else { 0 }));
        }
        for i in 0..count {
            let mask = &self.train.masks[i * w..(i + 1) * w];
            let y = &self.train.y[i * 2 * pixels..(i + 1) * 2 * pixels];
            let magnitude: Vec<f32> = (0..pixels)
                .map(|p| {
                    if mask[p % w] != 0.0 {
                        y[2 * p].hypot(y[2 * p + 1])
                    } else {
                        0.0
                    }
                })
                .collect();
            // Four decades below the largest value, on a log scale.
            let top = magnitude
                .iter()
                .copied()
                .fold(0.0f32, f32::max)
                .max(f32::MIN_POSITIVE);
            let floor = top * 1e-4;
            let span = (top / floor).ln_1p();
            bytes.extend(
                magnitude
                    .iter()
                    .map(|&a| ((a / floor).ln_1p() / span * 255.0).round().clamp(0.0, 255.0) as u8),
            );
        }
        bytes.extend(cifar10::to_bytes(&self.train.shown(count, pixels)?));
        let kept = self.train.masks[..count * w]
            .iter()
            .filter(|&&v| v != 0.0)
            .count() as f64
            / count as f64;
        image_grid(
            &dir.join("masks.png"),
            &format!(
                "k-space column masks of the first {count} observations ({kept:.1} of {w} columns kept on average; centre band always)"
            ),
            &bytes,
            (h, w, 1),
            count,
            if pixels <= 64 * 64 { 2 } else { 1 },
            &[],
            &["column mask", "log |k-space| observed", "zero-filled Aᵀy"].map(String::from),
        )
    }

    /// The lap's grids and the run's curves (the lap's metrics are the last of `all`, whose
    /// `plot_seconds` this sets).
    #[allow(clippy::too_many_arguments)]
    fn write_pictures(
        &self,
        run: &Path,
        dir: &Path,
        all: &mut [ImageLapMetrics],
        samples: &[f32],
        held_first: &[f32],
        held_means: &[f32],
        prior: &[f32],
        device: &Device,
    ) -> Result<()> {
        let start = Instant::now();
        let last = all.len() - 1;
        let lap = all[last].lap;
        self.write_grids(dir, &all[last], samples, held_first, held_means, prior)?;
        self.write_curves(run, all)?;
        all[last].plot_seconds = start.elapsed().as_secs_f64();
        let mut figures = Vec::new();
        if !self.heldout.clean.is_empty() {
            figures.push(Figure {
                caption: "PSNR by lap: held-out posterior means and training samples".into(),
                path: run.join("psnr.png"),
            });
        }
        let kspace = matches!(self.train.observe, Observe::KSpace { .. });
        let heldout = if kspace {
            "held-out slices; rows: the zero-filled inverse Aᵀy, a posterior sample, the posterior mean, the truth (the paper's Figure 6)"
        } else {
            "held-out observations, a posterior sample, the posterior mean, the truth"
        };
        for (file, what) in [
            ("heldout.png", heldout),
            ("posterior.png", "posterior samples of the training observations"),
            ("prior.png", "samples of the prior alone"),
        ] {
            figures.push(Figure {
                caption: format!("Lap {lap}: {what}"),
                path: dir.join(file),
            });
        }
        figures.push(Figure {
            caption: "The training observations (lap 0)".into(),
            path: lap_dir(run, 0).join("observations.png"),
        });
        if kspace {
            figures.push(Figure {
                caption: "The k-space column masks, the observed k-space and its zero-filled inverse (lap 0)"
                    .into(),
                path: lap_dir(run, 0).join("masks.png"),
            });
        }
        let lines: Vec<String> = all.iter().map(ImageLapMetrics::to_json).collect();
        write_run_report(run, &self.cfg, device, &lines, figures)?;
        all[last].plot_seconds = start.elapsed().as_secs_f64();
        Ok(())
    }

    /// The run's PSNR curves (held-out posterior means and training samples) over its laps, with
    /// the Gaussian initialisation's as the reference; nothing without a ground truth.
    fn write_curves(&self, run: &Path, all: &[ImageLapMetrics]) -> Result<()> {
        if self.heldout.clean.is_empty() {
            return Ok(());
        }
        let series = |f: fn(&ImageLapMetrics) -> f64| all.iter().map(|m| (m.lap, f(m))).collect::<Vec<_>>();
        let references = all
            .iter()
            .find(|m| m.lap == 0)
            .map(|m| {
                let mut lines = vec![(
                    format!("Gaussian initialisation: {} dB", metric(m.psnr, 2)),
                    m.psnr,
                )];
                if m.zero_filled_psnr.is_finite() {
                    lines.push((
                        format!("zero-filled Aᵀy: {} dB", metric(m.zero_filled_psnr, 2)),
                        m.zero_filled_psnr,
                    ));
                }
                lines
            })
            .unwrap_or_default();
        plot::curves(
            &run.join("psnr.png"),
            &plot::CurvePlot {
                title: "Reconstruction quality by lap (higher is better)",
                y_label: "PSNR (dB)",
                log_y: false,
                series: vec![
                    plot::Series {
                        name: "held-out posterior means",
                        points: series(|m| m.psnr),
                    },
                    plot::Series {
                        name: "training posterior samples",
                        points: series(|m| m.sample_psnr),
                    },
                ],
                references,
            },
        )
    }

    /// PSNR and SSIM of the held-out posterior means, and PSNR of the training samples (the
    /// first of each observation's).
    fn scores(&self, held_means: &[f32], samples: &[f32]) -> (f64, f64, f64) {
        if self.heldout.clean.is_empty() || self.train.clean.is_empty() {
            return (f64::NAN, f64::NAN, f64::NAN);
        }
        let per = self.data.per();
        let (psnr, ssim) = self.heldout_scores(held_means);
        let first = &samples[..self.train.n * per];
        (psnr, ssim, psnr_of(first, &self.train.clean, per))
    }

    /// PSNR and SSIM of held-out reconstructions `x` (values clamped to the model's range)
    /// against the clean held-out images.
    fn heldout_scores(&self, x: &[f32]) -> (f64, f64) {
        let (h, w, c) = (self.data.h, self.data.w, self.data.c);
        let clean = widen(&self.heldout.clean);
        let x = clamp_range(x);
        (
            psnr(&x, &clean, self.data.per(), RANGE),
            ssim(&x, &clean, h, w, c, RANGE),
        )
    }

    /// The zero-filled baseline of k-space observations: PSNR and SSIM of the held-out Aᵀy
    /// (NaN for pixel masks or without a ground truth).
    fn zero_filled_scores(&self) -> Result<(f64, f64)> {
        if !matches!(self.heldout.observe, Observe::KSpace { .. }) || self.heldout.clean.is_empty() {
            return Ok((f64::NAN, f64::NAN));
        }
        Ok(self.heldout_scores(&self.heldout.shown(self.heldout.n, self.data.per())?))
    }

    /// The samples with every value inside (-filter_bound, filter_bound) (all of them when the
    /// bound is 0 or absent), and how many were left out. A sample far outside the data's range
    /// is one whose MMPS solve diverged (a young network's Jacobian is not the symmetric
    /// positive covariance CG assumes); trained on, it would teach the prior its outliers.
    fn within_bound<'a>(&self, samples: &'a [f32]) -> Result<(Cow<'a, [f32]>, usize)> {
        let (bound, outside) = self.outside_bound(samples)?;
        let per = self.data.per();
        let inside = |row: &[f32]| row.iter().all(|v| v.abs() < bound);
        if outside == 0 {
            return Ok((Cow::Borrowed(samples), 0));
        }
        if outside == samples.len() / per {
            return Err(Error::Other(format!(
                "every one of the {outside} posterior samples has a value outside (-{bound}, {bound}) (filter_bound): the sampler diverged; more CG iterations (cg_iters) or a lower learning rate may help"
            )));
        }
        let kept: Vec<f32> = samples
            .chunks_exact(per)
            .filter(|row| inside(row))
            .flatten()
            .copied()
            .collect();
        Ok((Cow::Owned(kept), outside))
    }

    /// The bound (0: none) and how many samples have a value outside (-bound, bound).
    fn outside_bound(&self, samples: &[f32]) -> Result<(f32, usize)> {
        let bound = self.cfg.float_or("filter_bound", 0.0)? as f32;
        if bound == 0.0 {
            return Ok((bound, 0));
        }
        let outside = samples
            .chunks_exact(self.data.per())
            .filter(|row| row.iter().any(|v| v.abs() >= bound))
            .count();
        Ok((bound, outside))
    }

    /// Column means of samples [n, per] (the sampler's starting mean).
    fn mean_of(&self, samples: &[f32], device: &Device) -> Result<Tensor> {
        let per = self.data.per();
        let n = samples.len() / per;
        let mut m = vec![0.0f64; per];
        for row in samples.chunks_exact(per) {
            for (a, &v) in m.iter_mut().zip(row) {
                *a += v as f64;
            }
        }
        m.iter_mut().for_each(|v| *v /= n as f64);
        Tensor::from_f64_as(&m, &[per], DType::F32, device)
    }

    /// Prior samples as one PNG per image in `lap-XXX/fid-samples/` (the layout FID tools read),
    /// when this lap is one to export.
    fn export(
        &self,
        dir: &Path,
        den: &mut impl Denoise,
        mean: &Tensor,
        lap: usize,
        device: &Device,
    ) -> Result<()> {
        let count = self.cfg.count("export_samples")?;
        let every = self.cfg.count("export_every")?;
        let last = lap == self.cfg.count("laps")?;
        if count == 0 || !(last || (every > 0 && lap % every == 0)) {
            return Ok(());
        }
        let out = dir.join("fid-samples");
        fs::create_dir_all(&out)
            .map_err(|e| Error::Other(format!("cannot create {}: {e}", out.display())))?;
        let (h, w, c, per) = (self.data.h, self.data.w, self.data.c, self.data.per());
        let batch = self.cfg.count("estep_batch")?.max(1);
        let mut phase = Phase::new(format!("lap {lap} FID export"), count as u64, "images");
        for first in (0..count).step_by(batch) {
            let rows = batch.min(count - first);
            let seed = derive_seed(derive_seed(self.seed, lap, SEED_EXPORT), first, 0);
            let x = self.prior_samples(den, rows, mean, seed, device)?;
            for (k, img) in x.chunks_exact(per).enumerate() {
                save_image(
                    &out.join(format!("{:06}.png", first + k)),
                    &cifar10::to_bytes(img),
                    h,
                    w,
                    c,
                )?;
            }
            phase.set((first + rows) as u64);
        }
        phase.finish();
        Ok(())
    }
}

/// Values in f64, clamped to the model's range [-2, 2].
fn clamp_range(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| (v as f64).clamp(-2.0, 2.0)).collect()
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// The PSNR of images `x` (clamped to the model's range) against `clean`, rows of `per`.
fn psnr_of(x: &[f32], clean: &[f32], per: usize) -> f64 {
    psnr(&clamp_range(x), &widen(clean), per, RANGE)
}

/// Writes lap `lap`'s samples and metrics (the last of `all`), marks it done and rewrites
/// metrics.jsonl; drops the previous lap's samples unless they are kept.
fn write_lap(
    run: &Path,
    lap: usize,
    samples: &[f32],
    per: usize,
    all: &[ImageLapMetrics],
    keep_samples: bool,
) -> Result<()> {
    let metrics = &all[all.len() - 1];
    let dir = create_lap_dir(run, lap)?;
    write_npy_f32(&dir.join("samples.npy"), &[samples.len() / per, per], samples)?;
    write_atomically(
        &dir.join("metrics.json"),
        format!("{}\n", metrics.to_json()).as_bytes(),
    )?;
    mark_done(run, lap)?;
    // After DONE: a kill between the two leaves metrics.jsonl a lap behind, and the resume
    // rewrites it from the complete laps.
    write_metrics_jsonl(run, all.iter().map(ImageLapMetrics::to_json))?;
    // Only the newest samples are needed to resume; older ones go unless asked to keep them
    // (the paper's 50,000 CIFAR-10 samples are 614 MB per lap).
    if lap > 0 && !keep_samples {
        let old = lap_dir(run, lap - 1).join("samples.npy");
        if old.is_file() {
            fs::remove_file(&old)
                .map_err(|e| Error::Other(format!("cannot remove {}: {e}", old.display())))?;
        }
    }
    Ok(())
}

/// Runs (or, with `resume`, continues) the corrupted-image EM in `run`; returns every lap's
/// metrics.
pub fn run_images(cfg: &Config, run: &Path, device: &Device, resume: bool) -> Result<Vec<ImageLapMetrics>> {
    cfg.validate()?;
    // Data-parallel as the vector driver (em::vectors): rank 0 (the lead) opens, writes and
    // reports the run; every rank samples its share of each E-step batch and trains on its share
    // of each M-step batch, and all hold the same samples and weights.
    let world = crate::dist::world();
    let comm = world.as_ref();
    let lead = comm.rank() == 0;
    check_memory(cfg, device, run)?;
    let (done, _lock) = super::open_run_on_ranks(cfg, run, resume, device, comm, || {
        let (_, h, w, c) = dataset_shape(cfg, run)?;
        network(cfg, h, w, c)
    })?;
    let mut setup = Setup::new(cfg, run, comm)?;
    setup.network.set_precision(super::precision(cfg, device)?.1);
    let (train, held) = (&setup.train, &setup.heldout);
    let mut fingerprint = Fingerprint::new();
    for part in [
        &train.y,
        &train.masks,
        &train.clean,
        &held.y,
        &held.masks,
        &held.clean,
    ] {
        fingerprint.add(part);
    }
    if lead {
        check_observations(run, done, fingerprint)?;
    }
    let per = setup.data.per();
    let laps = cfg.count("laps")?;
    let keep = cfg.int("keep_samples")? != 0;
    let steps = cfg.count("estep_steps")?;
    // The lead's record of the laps (the other ranks keep none).
    let mut all = if lead {
        let all = read_lap_metrics(run, done.map(|k| k.min(laps)), ImageLapMetrics::from_json)?;
        write_metrics_jsonl(run, all.iter().map(ImageLapMetrics::to_json))?;
        all
    } else {
        Vec::new()
    };
    let removed = setup.train.removed_percent();
    let truth = if setup.train.clean.is_empty() {
        ", no ground truth"
    } else {
        ""
    };
    let (n, h, w, c) = (setup.train.n, setup.data.h, setup.data.w, setup.data.c);
    let (dataset, held) = (cfg.string("dataset")?, setup.heldout.n);
    let data = match setup.train.observe {
        Observe::KSpace { .. } => format!(
            "{n} slices of {h}x{w} seen through {}x undersampled k-space ({removed:.1}% of columns dropped; {dataset}), {} posterior samples each per lap; {held} held out{truth}",
            metric(cfg.float("acceleration")?, 1),
            setup.repeats
        ),
        Observe::Pixels => format!(
            "{n} observations of {h}x{w}x{c} images, {removed:.1}% of values removed ({dataset}); {held} held out{truth}"
        ),
    };
    let network = format!(
        "U-Net, {} parameters, {:.2} GFLOP per forward",
        setup.network.layout().len(),
        2.0 * setup.network.forward_macs() as f64 / 1e9
    );
    if lead {
        print_header(run, cfg, device, &data, &network, done)?;
        super::say_data_parallel(comm);
    }

    // The zero-filled baseline: the same held-out set every lap.
    let baseline = setup.zero_filled_scores()?;
    let lap_bar = Laps::new(done.map_or(0, |k| k + 1), laps);
    let (mut samples, mut params) = match done {
        Some(k) => {
            let dir = lap_dir(run, k);
            let s = read_npy(&dir.join("samples.npy"))?.to_f32();
            if s.len() != setup.repeats * setup.train.n * per {
                return Err(Error::Other(format!(
                    "{}: {} values, expected {} samples of {per}",
                    dir.join("samples.npy").display(),
                    s.len(),
                    setup.repeats * setup.train.n
                )));
            }
            let p = lap_params(
                run,
                k,
                &setup.network,
                derive_seed(setup.seed, 0, SEED_PARAMS),
                device,
            )?;
            say(format!("resuming {} after lap {k}", run.display()));
            (s, p)
        }
        None => {
            lap_bar.start(0);
            let s = gaussian_lap(comm, &setup, run, device, &mut all, baseline)?;
            lap_bar.done(0);
            let p =
                setup
                    .network
                    .layout()
                    .init(derive_seed(setup.seed, 0, SEED_PARAMS), DType::F32, device)?;
            (s, p)
        }
    };

    let den = Denoiser::new(setup.network.clone());
    let sampled = setup.train.repeated(setup.repeats);
    for lap in done.map_or(1, |k| k + 1)..=laps {
        lap_bar.start(lap);
        device.set_memory_phase("m-step");
        let t = Instant::now();
        // The previous lap's diverged samples (if a bound is set) are left out of training and
        // of the next E-step's starting mean.
        let (kept, _) = setup.within_bound(&samples)?;
        let (weights, loss, mstep_rate) = setup.m_step(
            comm,
            params,
            &kept,
            derive_seed(setup.seed, lap, SEED_MSTEP),
            device,
            lap,
        )?;
        params = weights;
        let mstep = t.elapsed().as_secs_f64();
        device.set_memory_phase("e-step");
        let t = Instant::now();
        let mean = setup.mean_of(&kept, device)?;
        drop(kept);
        let mut prior = NetworkPrior::new(&den, &params)?;
        samples = setup.e_step(
            comm,
            &prior,
            &Covariance::Tweedie,
            &sampled,
            &mean,
            SamplerKind::Ddpm,
            steps,
            setup.estep_cg()?,
            derive_seed(setup.seed, lap, SEED_ESTEP),
            device,
            &format!("lap {lap} E-step"),
        )?;
        let estep = t.elapsed().as_secs_f64();
        abort_requested(lap)?;
        device.set_memory_phase("evaluation");
        let t = Instant::now();
        let (held_means, held_first) = setup.heldout_means(
            comm,
            &prior,
            &Covariance::Tweedie,
            &mean,
            derive_seed(setup.seed, lap, SEED_HELDOUT),
            device,
            lap,
        )?;
        if !lead {
            // The lap's pictures, metrics and checkpoint are the lead's.
            continue;
        }
        let grid = cfg.count("grid")?;
        let shown = setup.prior_samples(
            &mut prior,
            grid,
            &mean,
            derive_seed(setup.seed, lap, SEED_PRIOR),
            device,
        )?;
        let (psnr, ssim, sample_psnr) = setup.scores(&held_means, &samples);
        let m = ImageLapMetrics {
            lap,
            psnr,
            ssim,
            sample_psnr,
            zero_filled_psnr: baseline.0,
            zero_filled_ssim: baseline.1,
            loss,
            estep_seconds: estep,
            mstep_seconds: mstep,
            estep_image_steps_per_s: (sampled.n * steps) as f64 / estep.max(1e-9),
            mstep_images_per_s: mstep_rate,
            eval_seconds: t.elapsed().as_secs_f64(),
            plot_seconds: f64::NAN,
            export_seconds: 0.0,
            outside_bound: setup.outside_bound(&samples)?.1,
        };
        all.push(m);
        let experiment = cfg.string("experiment")?;
        let dir = save_lap_checkpoint(
            run,
            lap,
            &experiment,
            setup.seed,
            &setup.schedule,
            &setup.network,
            &params,
        )?;
        setup.write_pictures(
            run,
            &dir,
            &mut all,
            &samples,
            &held_first,
            &held_means,
            &shown,
            device,
        )?;
        let t = Instant::now();
        setup.export(&dir, &mut prior, &mean, lap, device)?;
        if let Some(m) = all.last_mut() {
            m.export_seconds = t.elapsed().as_secs_f64();
        }
        write_lap(run, lap, &samples, per, &all, keep)?;
        lap_bar.done(lap);
        say(all[all.len() - 1].summary());
        let memory = device.memory_phase_summary();
        if !memory.is_empty() {
            say(format!("  GPU memory by phase: {memory}"));
        }
    }
    Ok(all)
}

/// Lap 0: the Gaussian prior fitted by EM (method.md §8.1: DDIM with the exact Gaussian MMPS,
/// then PPCA, `init_rounds` times on the first `init_observations`), then a posterior sample of
/// every observation under it. Returns the samples.
fn gaussian_lap(
    comm: &dyn Communicator,
    setup: &Setup,
    run: &Path,
    device: &Device,
    all: &mut Vec<ImageLapMetrics>,
    baseline: (f64, f64),
) -> Result<Vec<f32>> {
    let cfg = &setup.cfg;
    let per = setup.data.per();
    let start = Instant::now();
    let rank = cfg.count("init_rank")?;
    let used = cfg.count("init_observations")?.min(setup.train.n);
    let subset = setup.train.first(used, per);
    // A tolerance of 0 means a fixed number of iterations (the paper's MRI: 5).
    let init_cg = CgConfig {
        max_iters: cfg.count("init_cg_iters")?,
        rtol: Some(cfg.float("init_cg_rtol")?).filter(|&r| r > 0.0),
    };
    let mut g = Gaussian::new(vec![0.0; per], Dplr::identity(per))?;
    for round in 0..cfg.count("init_rounds")? {
        let mean = g.mean_tensor(DType::F32, device)?;
        let cov = Covariance::Gaussian(Box::new(g.clone()));
        let x = setup.e_step(
            comm,
            &g,
            &cov,
            &subset,
            &mean,
            SamplerKind::Ddim,
            cfg.count("init_steps")?,
            init_cg,
            derive_seed(setup.seed, round, SEED_INIT),
            device,
            &format!("init round {round}"),
        )?;
        let xt = Tensor::from_f32(&x, &[used, per], device)?;
        g = ppca_randomized(
            &xt.as_view()?,
            rank.min(used - 1),
            10,
            4,
            derive_seed(setup.seed, round, SEED_PPCA),
        )?;
    }
    let mean = g.mean_tensor(DType::F32, device)?;
    let cov = Covariance::Gaussian(Box::new(g.clone()));
    let steps = cfg.count("estep_steps")?;
    let t = Instant::now();
    let sampled = setup.train.repeated(setup.repeats);
    let samples = setup.e_step(
        comm,
        &g,
        &cov,
        &sampled,
        &mean,
        SamplerKind::Ddpm,
        steps,
        init_cg,
        derive_seed(setup.seed, 0, SEED_ESTEP),
        device,
        "lap 0 E-step",
    )?;
    let estep = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let (held_means, held_first) = setup.heldout_means(
        comm,
        &g,
        &cov,
        &mean,
        derive_seed(setup.seed, 0, SEED_HELDOUT),
        device,
        0,
    )?;
    if comm.rank() > 0 {
        // The lap's pictures and metrics are the lead's.
        return Ok(samples);
    }
    let mut gaussian = g.clone();
    let shown = setup.prior_samples(
        &mut gaussian,
        cfg.count("grid")?,
        &mean,
        derive_seed(setup.seed, 0, SEED_PRIOR),
        device,
    )?;
    let (psnr, ssim, sample_psnr) = setup.scores(&held_means, &samples);
    let m = ImageLapMetrics {
        lap: 0,
        psnr,
        ssim,
        sample_psnr,
        zero_filled_psnr: baseline.0,
        zero_filled_ssim: baseline.1,
        loss: f64::NAN,
        estep_seconds: start.elapsed().as_secs_f64(),
        mstep_seconds: 0.0,
        estep_image_steps_per_s: (sampled.n * steps) as f64 / estep.max(1e-9),
        mstep_images_per_s: f64::NAN,
        eval_seconds: t.elapsed().as_secs_f64(),
        plot_seconds: f64::NAN,
        export_seconds: 0.0,
        outside_bound: setup.outside_bound(&samples)?.1,
    };
    all.push(m);
    let dir = create_lap_dir(run, 0)?;
    setup.write_pictures(run, &dir, all, &samples, &held_first, &held_means, &shown, device)?;
    write_lap(run, 0, &samples, per, all, true)?;
    say(all[all.len() - 1].summary());
    Ok(samples)
}

/// The sum of the losses waiting in the trainer's log (one device synchronisation; none when
/// empty), or the error naming the first non-finite step.
fn take_losses(trainer: &mut Trainer, lap: usize) -> Result<f64> {
    let steps = trainer
        .take_stats()
        .map_err(|e| Error::Other(format!("lap {lap}, M-step: {e} (lower lr, or check the samples)")))?;
    Ok(steps.iter().map(|st| st.loss).sum())
}
