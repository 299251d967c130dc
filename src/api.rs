//! The embedding API: a short, stable surface for programs that use emprior as a library (and
//! the one a C ABI would wrap). Host arrays in, host arrays out, row-major f32;
//! everything else (devices, tensors, kernels) stays inside.
//!
//! - [`Prior`]: a trained checkpoint ([`Prior::load`]) or a Gaussian ([`Prior::gaussian`]);
//! - [`Operator`]: y = A x from caller arrays: one matrix per observation, one shared, or a mask;
//! - [`sample_posterior`]: MMPS posterior samples of a batch of observations, with
//!   [`PosteriorOptions`];
//! - an EM run: [`crate::em::Config`] and [`crate::em::run_vectors`] / [`crate::em::run_images`];
//!   training alone: [`crate::commands::train`].
//!
//! Posterior samples of two observations under a 2-D Gaussian prior, each seeing one coordinate:
//!
//! ```
//! use emprior::api::{sample_posterior, Operator, PosteriorOptions, Prior};
//! use emprior::Device;
//!
//! let device = Device::Cpu;
//! let prior = Prior::gaussian(&[0.0, 0.0], &[1.0, 0.0, 0.0, 1.0])?;
//! // Observation 0 sees x[0], observation 1 sees x[1]: A is [n = 2, m = 1, d = 2].
//! let op = Operator::per_observation(&[1.0, 0.0, 0.0, 1.0], 2, 1, 2, &device)?;
//! let y = [0.5f32, -1.0];
//! let opts = PosteriorOptions { steps: 64, ..PosteriorOptions::default() };
//! let x = sample_posterior(&prior, &op, &y, 0.01, &opts, &device)?;
//! assert_eq!(x.len(), 2 * 2);
//! // The observed coordinates are pinned to y (noise 0.01), the others drawn from the prior.
//! assert!((x[0] - 0.5).abs() < 0.1 && (x[3] + 1.0).abs() < 0.1);
//! # Ok::<(), emprior::Error>(())
//! ```

#![deny(missing_docs)]

use std::path::Path;

use crate::device::Device;
use crate::diffusion::{Denoiser, Sampler, SamplerKind, VeSchedule};
use crate::error::{Error, Result};
use crate::gaussian::{Dplr, Gaussian};
use crate::io::load_checkpoint;
use crate::ops::Philox;
use crate::posterior::{
    CgConfig, Covariance, DenseOperators, LinearOperator, MaskOperator, Mmps, NetworkPrior, ObservationNoise,
    SharedOperator,
};
use crate::tensor::{AsView, DType, Tensor};

/// A prior over signals of [`Prior::dim`] values.
pub struct Prior {
    kind: PriorKind,
}

enum PriorKind {
    /// A trained denoiser, its weights on the device, and its training noise range.
    Network {
        denoiser: Box<Denoiser>,
        params: Tensor,
        schedule: VeSchedule,
    },
    Gaussian(Gaussian),
}

impl Prior {
    /// The prior of a checkpoint written by `emprior train` or an EM lap
    /// (`DIR/lap-XXX/checkpoint.safetensors`), its weights on `device`. Its network computes in
    /// the device's default precision (bf16 operands on a tensor-core GPU, f32 on the CPU, as
    /// `--precision auto`); [`Prior::set_precision`] changes it.
    pub fn load(path: &Path, device: &Device) -> Result<Prior> {
        let ck = load_checkpoint(path, DType::F32)?;
        let meta = |k: &str, default: f64| ck.metadata.get(k).and_then(|v| v.parse().ok()).unwrap_or(default);
        let schedule = VeSchedule::checked(meta("sigma_min", 1e-3), meta("sigma_max", 1e2))
            .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
        let mut denoiser = Box::new(Denoiser::new(ck.network));
        denoiser.net.set_precision(crate::nn::tensor_cores::resolve(
            crate::ops::PrecisionRequest::Auto,
            device,
        )?);
        Ok(Prior {
            kind: PriorKind::Network {
                params: ck.params.to_device(device)?,
                denoiser,
                schedule,
            },
        })
    }

    /// Sets the arithmetic of a network prior's GEMMs and convolutions (f32 is the exact path);
    /// a Gaussian prior has no network and ignores it.
    pub fn set_precision(&mut self, precision: crate::ops::Precision) {
        if let PriorKind::Network { denoiser, .. } = &mut self.kind {
            denoiser.net.set_precision(precision);
        }
    }

    /// A Gaussian prior N(mean, cov), `cov` dense [d, d] row-major and positive definite. With
    /// it MMPS is exact: the samples follow the closed-form posterior.
    pub fn gaussian(mean: &[f64], cov: &[f64]) -> Result<Prior> {
        let d = mean.len();
        if d == 0 || cov.len() != d * d {
            return Err(Error::Other(format!(
                "Prior::gaussian: a mean of {d} values needs a covariance of {} values ([d, d]), got {}",
                d * d,
                cov.len()
            )));
        }
        if let Some(i) = mean.iter().chain(cov).position(|v| !v.is_finite()) {
            return Err(Error::Other(format!(
                "Prior::gaussian: value {i} of the mean then covariance is not finite"
            )));
        }
        let smallest = (0..d).map(|i| cov[i * d + i]).fold(f64::INFINITY, f64::min);
        let dplr = Dplr::from_dense(cov, d, 1e-6 * smallest.max(1e-12))?;
        Ok(Prior {
            kind: PriorKind::Gaussian(Gaussian::new(mean.to_vec(), dplr)?),
        })
    }

    /// Values per signal.
    pub fn dim(&self) -> usize {
        match &self.kind {
            PriorKind::Network { denoiser, .. } => denoiser.net.sample_shape().iter().product(),
            PriorKind::Gaussian(g) => g.dim(),
        }
    }

    /// The shape of one signal (`[d]` for vectors, `[H, W, C]` for images).
    pub fn sample_shape(&self) -> Vec<usize> {
        match &self.kind {
            PriorKind::Network { denoiser, .. } => denoiser.net.sample_shape(),
            PriorKind::Gaussian(g) => vec![g.dim()],
        }
    }
}

/// The observation operator of a batch of n observations of m values each, of signals of d
/// values.
pub struct Operator {
    inner: Box<dyn LinearOperator>,
    rows: Option<usize>,
}

impl Operator {
    /// One matrix per observation: `a` is [n, m, d] row-major.
    pub fn per_observation(a: &[f32], n: usize, m: usize, d: usize, device: &Device) -> Result<Operator> {
        check_len("Operator::per_observation", a, &[n, m, d])?;
        let t = Tensor::from_f32(a, &[n, m, d], device)?;
        Ok(Operator {
            inner: Box::new(DenseOperators::new(t)?),
            rows: Some(n),
        })
    }

    /// One matrix `a` [m, d] shared by every observation.
    pub fn shared(a: &[f32], m: usize, d: usize, device: &Device) -> Result<Operator> {
        check_len("Operator::shared", a, &[m, d])?;
        let t = Tensor::from_f32(a, &[m, d], device)?;
        Ok(Operator {
            inner: Box::new(SharedOperator::new(t)?),
            rows: None,
        })
    }

    /// A 0/1 mask per observation: `mask` [n, pixels], each value shared by `channels`
    /// consecutive signal values (d = pixels x channels; an image mask [n, H, W] of HWC images);
    /// m = d, the unobserved values of y being 0.
    pub fn mask(mask: &[f32], n: usize, pixels: usize, channels: usize, device: &Device) -> Result<Operator> {
        check_len("Operator::mask", mask, &[n, pixels])?;
        if let Some(i) = mask.iter().position(|&v| v != 0.0 && v != 1.0) {
            return Err(Error::Other(format!(
                "Operator::mask: value {i} is {}; a mask holds 0 (missing) or 1 (observed)",
                mask[i]
            )));
        }
        Ok(Operator {
            inner: Box::new(MaskOperator::from_pixel_mask(
                mask,
                n,
                pixels,
                channels,
                DType::F32,
                device,
            )?),
            rows: Some(n),
        })
    }

    /// Values per observation.
    pub fn obs_dim(&self) -> usize {
        self.inner.obs_dim()
    }

    /// Values per signal.
    pub fn signal_dim(&self) -> usize {
        self.inner.signal_dim()
    }
}

fn check_len(what: &str, v: &[f32], shape: &[usize]) -> Result<()> {
    let want = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
    if want != Some(v.len()) || shape.contains(&0) {
        return Err(Error::Other(format!(
            "{what}: {} values for shape {shape:?} (every size positive)",
            v.len()
        )));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::Other(format!(
            "{what}: value {i} is {} (not finite)",
            v[i]
        )));
    }
    Ok(())
}

/// How [`sample_posterior`] samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PosteriorOptions {
    /// DDPM (ancestral, the default), DDIM or predictor-corrector.
    pub sampler: SamplerKind,
    /// Sampler steps from sigma_max down to sigma_min (each one denoiser call, plus corrections).
    pub steps: usize,
    /// CG iterations per denoiser call (1 as in the paper's images, 3 for MRI, more for dense
    /// operators).
    pub cg_iters: usize,
    /// Stop CG early once every residual is below this fraction of its start.
    pub cg_rtol: Option<f64>,
    /// Every random draw (Philox): the same seed gives the same samples on the same device.
    pub seed: u64,
    /// The noise range to sample over; None: the checkpoint's training range (a Gaussian prior:
    /// 1e-3 to 1e2).
    pub sigma_range: Option<(f64, f64)>,
}

impl Default for PosteriorOptions {
    fn default() -> Self {
        PosteriorOptions {
            sampler: SamplerKind::Ddpm,
            steps: 256,
            cg_iters: 3,
            cg_rtol: None,
            seed: 0,
            sigma_range: None,
        }
    }
}

/// One posterior sample per observation: `y` [n, m] row-major observed through `op` with noise
/// standard deviation `sigma_y`; returns [n, d]. MMPS with Tweedie's covariance for a network
/// prior, the prior's own covariance (exact) for a Gaussian. For K samples per observation,
/// repeat the rows of `y` (and of a per-observation operator) K times.
pub fn sample_posterior(
    prior: &Prior,
    op: &Operator,
    y: &[f32],
    sigma_y: f64,
    opts: &PosteriorOptions,
    device: &Device,
) -> Result<Vec<f32>> {
    let (m, d) = (op.obs_dim(), op.signal_dim());
    if d != prior.dim() {
        return Err(Error::Other(format!(
            "sample_posterior: the operator takes signals of {d} values, the prior gives {}",
            prior.dim()
        )));
    }
    if m == 0 || y.len() % m != 0 || y.is_empty() {
        return Err(Error::Other(format!(
            "sample_posterior: {} observed values are not rows of the operator's {m}",
            y.len()
        )));
    }
    let n = y.len() / m;
    if op.rows.is_some_and(|r| r != n) {
        return Err(Error::Other(format!(
            "sample_posterior: {n} observations for an operator of {} rows",
            op.rows.unwrap_or(0)
        )));
    }
    if !(sigma_y > 0.0 && sigma_y.is_finite()) || opts.steps == 0 {
        return Err(Error::Other(format!(
            "sample_posterior: sigma_y = {sigma_y} must be positive and steps = {} at least 1",
            opts.steps
        )));
    }
    check_len("sample_posterior: y", y, &[n, m])?;
    let yt = Tensor::from_f32(y, &[n, m], device)?;
    let noise = ObservationNoise::Scalar(sigma_y * sigma_y);
    let cg = CgConfig {
        max_iters: opts.cg_iters,
        rtol: opts.cg_rtol,
    };
    let mut shape = vec![n];
    shape.extend(prior.sample_shape());
    let sampler = |schedule: VeSchedule| -> Result<Sampler> {
        let schedule = match opts.sigma_range {
            Some((lo, hi)) => VeSchedule::checked(lo, hi)?,
            None => schedule,
        };
        Ok(Sampler::new(
            opts.sampler,
            opts.steps,
            schedule,
            Philox::new(opts.seed, 0x9057),
        ))
    };
    let x = match &prior.kind {
        PriorKind::Gaussian(g) => {
            let mean = g.mean_tensor(DType::F32, device)?;
            let mut mmps = Mmps::new(g, op.inner.as_ref(), &yt, &noise, cg);
            mmps.covariance = Covariance::Gaussian(Box::new(g.clone()));
            let s = sampler(VeSchedule::new(1e-3, 1e2))?;
            s.sample(&mut mmps, &shape, Some(&mean.as_view()?), DType::F32, device)?
        }
        PriorKind::Network {
            denoiser,
            params,
            schedule,
        } => {
            let net = NetworkPrior::new(denoiser.as_ref(), params)?;
            let mut mmps = Mmps::new(&net, op.inner.as_ref(), &yt, &noise, cg);
            sampler(*schedule)?.sample(&mut mmps, &shape, None, DType::F32, device)?
        }
    };
    let x = x.to_vec_f32()?;
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::Other(format!(
            "sample_posterior: sample {} diverged (value {}); more CG iterations or steps may help",
            i / d,
            x[i]
        )));
    }
    Ok(x)
}
