//! Samplers over any denoiser (method.md §4): DDPM (ancestral, = DDIM with eta = 1), DDIM
//! (eta = 0) and predictor-corrector with Langevin corrections, on the grid t_k = 1, 1 - 1/S,
//! ..., 0 (log-uniform sigma from sigma_max to sigma_min), started at mu + sigma_max z and
//! finished with one more denoiser call at sigma_min. Posterior sampling is the same code with
//! the MMPS posterior denoiser in place of the prior's. The update and its noise are one kernel
//! (kernels/sampler.cu); the whole loop stays on the device.

use crate::device::launch::grid_stride;

use super::schedule::VeSchedule;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::broadcast::add_bias;
use crate::ops::{mismatch, one_device, Philox};
use crate::real::Real;
use crate::tensor::{AsView, AsViewMut, DType, Data, DataMut, Tensor, View};

/// E[x | x_t] for a batch at one noise level: what a sampler calls.
pub trait Denoise {
    /// `d(x_t, σ) ≈ E[x | x_t]` for every row of `x_t` (`[N, ...]`), all at noise level `sigma`;
    /// the result has `x_t`'s shape.
    fn denoise(&mut self, x_t: &Tensor, sigma: f64) -> Result<Tensor>;
}

/// The update rule a [`Sampler`] applies at each step t → s (method.md §4). Parses from
/// `ddpm`, `ddim` or `pc` (the last with 1 correction and τ_c = 0.1, the paper's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SamplerKind {
    /// Ancestral sampling, DDIM with η = 1: `x_s = x_t − τ (x_t − d) + σ_s √τ ε` with
    /// `τ = 1 − σ_s²/σ_t²` (the E-steps' sampler).
    Ddpm,
    /// Deterministic DDIM, η = 0: `x_s = x_t − (1 − σ_s/σ_t) (x_t − d)`.
    Ddim,
    /// A DDIM predictor and `corrections` Langevin steps of size tau per step.
    Pc {
        /// Langevin steps at σ_s after each predictor step (the paper: 1).
        corrections: usize,
        /// τ_c in `x ← x − τ_c (x − d(x, σ_s)) + σ_s √(2 τ_c) ε` (the paper: 0.1).
        tau: f64,
    },
}

impl std::str::FromStr for SamplerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "ddpm" => Ok(SamplerKind::Ddpm),
            "ddim" => Ok(SamplerKind::Ddim),
            "pc" => Ok(SamplerKind::Pc {
                corrections: 1,
                tau: 0.1,
            }),
            other => Err(format!("unknown sampler '{other}' (expected ddpm, ddim or pc)")),
        }
    }
}

/// A sampler: update rule, step count S, VE schedule and noise stream. [`Sampler::sample`] runs
/// it against any [`Denoise`]: S denoiser calls on the grid t_k = 1 − k/S (plus `corrections`
/// per step for PC) and one final call at σ_min.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampler {
    /// The update rule.
    pub kind: SamplerKind,
    /// S, the number of steps (at least 1; sampling errors on 0).
    pub steps: usize,
    /// The schedule giving σ at each grid time.
    pub schedule: VeSchedule,
    /// The noise: Philox (seed, stream), element offsets laid out per step.
    pub rng: Philox,
}

/// x <- x - a (x - d) + c eps with eps = normals `offset ..` of `rng` (in place).
pub fn sampler_step(x: &mut Tensor, d: &Tensor, a: f64, c: f64, rng: Philox, offset: u64) -> Result<()> {
    // Its kernel takes no clock: refused on either backend, so both take the same inputs.
    rng.fixed("sampler_step")?;
    let (dv, mut xv) = (d.as_view()?, x.as_view_mut()?);
    one_device("sampler_step", &[&dv], &[&xv])?;
    if dv.shape() != xv.shape() {
        return Err(Error::shape("sampler_step", "denoised", xv.shape(), dv.shape()));
    }
    let n = xv.numel();
    fn host<T: Real>(x: &mut [T], d: &[T], a: f64, c: f64, rng: Philox, offset: u64) {
        let mut eps = vec![0.0f32; if c != 0.0 { x.len() } else { 0 }];
        rng.fill_normal(offset, &mut eps);
        let (a, c) = (T::from_f64(a), T::from_f64(c));
        for (i, (xi, &di)) in x.iter_mut().zip(d).enumerate() {
            let mut v = *xi - a * (*xi - di);
            if !eps.is_empty() {
                v += c * T::from_f32(eps[i]);
            }
            *xi = v;
        }
    }
    match (&mut xv.data, &dv.data) {
        (DataMut::F32(xs), Data::F32(ds)) => host(xs, ds, a, c, rng, offset),
        (DataMut::F64(xs), Data::F64(ds)) => host(xs, ds, a, c, rng, offset),
        (DataMut::Cuda(xs, dev), Data::Cuda(ds, _)) => {
            let (n64, af, cf) = (n as i64, a as f32, c as f32);
            // SAFETY: x and d hold n values (shapes checked above).
            unsafe {
                dev.kernels().sampler_step_f32(
                    grid_stride(dev, n),
                    xs,
                    ds,
                    n64,
                    af,
                    cf,
                    rng.seed,
                    rng.stream,
                    offset,
                )
            }?;
        }
        _ => return Err(mismatch("sampler_step", &[&dv], &[])),
    }
    Ok(())
}

/// Which rows of a batch a sampler call draws: rows `first .. first + shape[0]` of a batch of
/// `total` samples. The noise is laid out over the whole batch, so a batch sampled in parts gives
/// the same bits as in one piece when the denoiser treats rows independently (as the networks,
/// the operators and CG do: posterior::cg's notes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPart {
    /// The index, within the whole batch, of the first row this call draws.
    pub first: usize,
    /// Rows in the whole batch (the noise is laid out over all of them).
    pub total: usize,
}

impl BatchPart {
    /// The whole batch of `rows` rows.
    pub fn whole(rows: usize) -> Self {
        BatchPart {
            first: 0,
            total: rows,
        }
    }
}

impl Sampler {
    /// Samples of `shape` ([N, ...]) from `den`, started at mean + sigma_max z (mean: one sample's
    /// shape, broadcast; None for 0).
    pub fn sample(
        &self,
        den: &mut impl Denoise,
        shape: &[usize],
        mean: Option<&View>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let rows = shape.first().copied().unwrap_or(0);
        self.sample_part(den, shape, BatchPart::whole(rows), mean, dtype, device)
    }

    /// Rows `part.first ..` of a batch of `part.total` samples ([`BatchPart`]); `shape` is the
    /// part's ([rows, ...]) and `den` denoises those rows only.
    pub fn sample_part(
        &self,
        den: &mut impl Denoise,
        shape: &[usize],
        part: BatchPart,
        mean: Option<&View>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if self.steps == 0 {
            return Err(Error::Other("a sampler needs at least one step".into()));
        }
        let rows = shape.first().copied().unwrap_or(0);
        if part.first + rows > part.total {
            return Err(Error::Other(format!(
                "a sampler part of rows {}..{} lies outside its batch of {}",
                part.first,
                part.first + rows,
                part.total
            )));
        }
        let n: usize = shape.iter().product();
        let per = n.checked_div(rows).unwrap_or(0);
        // Element offsets over the whole batch: block 1 + k of `whole` normals for step k's
        // update, then the corrections' blocks after all steps; this part starts `base` in.
        let (whole, base) = ((part.total * per) as u64, (part.first * per) as u64);
        let grid = self.schedule.grid(self.steps);
        let mut x = Tensor::uninit(shape, dtype, device)?;
        self.rng.normal_into(&mut x, base)?;
        let mut x = crate::ops::scale(&x, grid[0])?;
        if let Some(mu) = mean {
            let mut flat = x.as_view_mut()?.reshape(&[rows, per])?;
            add_bias(&mut flat, &mu.reshape(&[per])?)?;
        }
        for k in 0..self.steps {
            let (t, s) = (grid[k], grid[k + 1]);
            let d = den.denoise(&x, t)?;
            match self.kind {
                SamplerKind::Ddpm => {
                    let tau = 1.0 - (s * s) / (t * t);
                    let offset = (1 + k as u64) * whole + base;
                    sampler_step(&mut x, &d, tau, s * tau.sqrt(), self.rng, offset)?;
                }
                SamplerKind::Ddim => sampler_step(&mut x, &d, 1.0 - s / t, 0.0, self.rng, 0)?,
                SamplerKind::Pc { corrections, tau } => {
                    sampler_step(&mut x, &d, 1.0 - s / t, 0.0, self.rng, 0)?;
                    for j in 0..corrections {
                        let d = den.denoise(&x, s)?;
                        let block = 1 + self.steps as u64 + (k * corrections + j) as u64;
                        sampler_step(
                            &mut x,
                            &d,
                            tau,
                            s * (2.0 * tau).sqrt(),
                            self.rng,
                            block * whole + base,
                        )?;
                    }
                }
            }
        }
        den.denoise(&x, grid[self.steps])
    }
}
