//! Moment Matching Posterior Sampling as a posterior denoiser (method.md §5):
//!   f_y(x_t) = x_hat + sigma^2 J^T A^T v,   (Sigma_y + A V A^T) v = y - A x_hat,
//! with x_hat = d(x_t, sigma), J = d x_hat / d x_t applied only through VJPs against one saved
//! forward, V = sigma^2 J (Tweedie, the paper's method) or one of the heuristic covariances, and
//! v from batched CG. The covariance is treated as constant (no derivative through the solve).
//! DPS is here too, as the baseline posterior denoiser.

use super::cg::{cg_floored, CgConfig, CgStats, DEFAULT_CHECK_EVERY};
use super::operator::{LinearOperator, ObservationNoise};
use crate::diffusion::sampler::{Denoise, NoiseLevel};
use crate::diffusion::{Denoiser, DenoiserSaved};
use crate::error::{Error, Result};
use crate::gaussian::Gaussian;
use crate::nn::{Mode, Weights};
use crate::ops::broadcast::{scale_rows_add_into, scale_rows_into};
use crate::ops::{add, axpy, div_guarded, row_norm, scale};
use crate::tensor::{AsView, Tensor};

/// A prior the posterior samplers can use: a denoiser with VJPs against one saved forward.
pub trait Prior {
    /// What [`Prior::denoise_saved`] keeps for later VJPs (a network's activations; σ for a
    /// Gaussian).
    type Saved;
    /// x̂ = d(x_t, σ) for a batch `x_t` (`[B, ...]`) at one σ, and the state [`Prior::vjp`]
    /// needs.
    fn denoise_saved(&self, x_t: &Tensor, sigma: f64) -> Result<(Tensor, Self::Saved)>;
    /// Jᵀ u with J = ∂x̂/∂x_t at the point `saved` came from; `u` has `x_t`'s shape. Runs a
    /// backward only, never the forward again.
    fn vjp(&self, saved: &Self::Saved, u: &Tensor) -> Result<Tensor>;
    /// [`Prior::denoise_saved`] at a level on the device; by default it reads the level on the
    /// host ([`NoiseLevel::host`]).
    fn denoise_saved_level(&self, x_t: &Tensor, level: &NoiseLevel) -> Result<(Tensor, Self::Saved)> {
        self.denoise_saved(x_t, level.host()?)
    }
    /// Whether [`Prior::denoise_saved_level`] reads the level only on the device and neither it
    /// nor [`Prior::vjp`] synchronises with or uploads from the host (so MMPS over this prior can
    /// be recorded in a CUDA graph).
    fn reads_device_levels(&self) -> bool {
        false
    }
}

/// A trained network with its weights, in evaluation mode.
pub struct NetworkPrior<'a> {
    denoiser: &'a Denoiser,
    params: &'a Tensor,
    /// Under the bf16 policy, the weights cast to bf16 once for every step of the sampler.
    bf16: Option<Tensor>,
}

impl<'a> NetworkPrior<'a> {
    /// The network with its flat parameters (laid out by [`Denoiser::layout`], checked here).
    /// Under the bf16 policy the weights are cast to bf16 here, once, for all its steps.
    pub fn new(denoiser: &'a Denoiser, params: &'a Tensor) -> Result<Self> {
        let bf16 = denoiser.layout().bf16_copy(params)?;
        Ok(NetworkPrior {
            denoiser,
            params,
            bf16,
        })
    }

    /// The preconditioned network.
    pub fn denoiser(&self) -> &'a Denoiser {
        self.denoiser
    }

    /// Its flat parameters.
    pub fn params(&self) -> &'a Tensor {
        self.params
    }

    fn weights(&self) -> Result<Weights<'_>> {
        Weights::new(self.params.as_view()?, self.bf16.as_ref())
    }
}

impl Prior for NetworkPrior<'_> {
    type Saved = DenoiserSaved;
    fn denoise_saved(&self, x_t: &Tensor, sigma: f64) -> Result<(Tensor, DenoiserSaved)> {
        let sigmas = vec![sigma; x_t.shape()[0]];
        self.denoiser
            .denoise(&self.weights()?, &x_t.as_view()?, &sigmas, Mode::Eval)
    }
    fn vjp(&self, saved: &DenoiserSaved, u: &Tensor) -> Result<Tensor> {
        self.denoiser.vjp(&self.weights()?, saved, &u.as_view()?)
    }
    fn denoise_saved_level(&self, x_t: &Tensor, level: &NoiseLevel) -> Result<(Tensor, DenoiserSaved)> {
        self.denoiser.denoise_levels(
            &self.weights()?,
            &x_t.as_view()?,
            &level.sigma.as_view()?,
            Mode::Eval,
        )
    }
    fn reads_device_levels(&self) -> bool {
        true
    }
}

impl Denoise for NetworkPrior<'_> {
    fn denoise(&mut self, x_t: &Tensor, sigma: f64) -> Result<Tensor> {
        Ok(self.denoise_saved(x_t, sigma)?.0)
    }
    fn denoise_level(&mut self, x_t: &Tensor, level: &NoiseLevel) -> Result<Tensor> {
        Ok(self.denoise_saved_level(x_t, level)?.0)
    }
    fn graph_safe(&self) -> bool {
        true
    }
}

/// The exact Gaussian denoiser (its Jacobian is symmetric, so its VJP is its JVP).
impl Prior for Gaussian {
    type Saved = f64;
    fn denoise_saved(&self, x_t: &Tensor, sigma: f64) -> Result<(Tensor, f64)> {
        Ok((Gaussian::denoise(self, &x_t.as_view()?, sigma)?, sigma))
    }
    fn vjp(&self, sigma: &f64, u: &Tensor) -> Result<Tensor> {
        Gaussian::vjp(self, *sigma, &u.as_view()?)
    }
}

impl Denoise for Gaussian {
    fn denoise(&mut self, x_t: &Tensor, sigma: f64) -> Result<Tensor> {
        Gaussian::denoise(self, &x_t.as_view()?, sigma)
    }
}

/// V[x | x_t] in the likelihood's covariance (method.md §5.5).
#[derive(Clone, Debug, PartialEq)]
pub enum Covariance {
    /// sigma^2 J (the paper's MMPS), through VJPs.
    Tweedie,
    /// 0: a Gaussian likelihood with the mean only (DPS-like).
    Zeros,
    /// sigma^2 I (PiGDM-like).
    SigmaT,
    /// (I + Sigma_t^-1)^-1 = sigma^2 / (1 + sigma^2) I.
    Ones,
    /// (Sigma_x^-1 + Sigma_t^-1)^-1 with Sigma_x a Gaussian fit (exact for a Gaussian prior).
    Gaussian(Box<Gaussian>),
}

impl std::str::FromStr for Covariance {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tweedie" => Ok(Covariance::Tweedie),
            "zeros" => Ok(Covariance::Zeros),
            "sigma-t" | "cov_t" => Ok(Covariance::SigmaT),
            "ones" => Ok(Covariance::Ones),
            other => Err(format!(
                "unknown covariance '{other}' (expected tweedie, zeros, sigma-t, ones; the Gaussian-fit covariance needs a Gaussian)"
            )),
        }
    }
}

/// The MMPS posterior denoiser for a batch of observations y [B, m].
pub struct Mmps<'a, P: Prior> {
    /// The prior whose denoiser and VJPs give x̂ and J.
    pub prior: &'a P,
    /// A, mapping a flattened signal `[B, d]` to observations `[B, m]`.
    pub operator: &'a dyn LinearOperator,
    /// The observations `[B, m]`, one row per row of the batch being denoised.
    pub y: &'a Tensor,
    /// Σ_y, the observation noise covariance.
    pub noise: &'a ObservationNoise,
    /// When the CG solve of `(Σ_y + A V Aᵀ) v = y − A x̂` stops.
    pub cg: CgConfig,
    /// How often CG reads its residuals when `cg.rtol` is set (posterior::cg's notes; 0: never).
    pub cg_check_every: usize,
    /// Which `V[x | x_t]` the solve uses (the paper's: [`Covariance::Tweedie`], the default).
    pub covariance: Covariance,
    /// The last solve's statistics.
    pub last_cg: CgStats,
    /// Measure every solve's final residual (`cg_measured`: one host synchronisation per
    /// solve) and keep the largest in `worst_cg_residual`; for diagnostics.
    pub measure_cg: bool,
    /// The largest final relative residual of any solve so far, when `measure_cg`.
    pub worst_cg_residual: Option<f64>,
    /// λ_min(Σ_y), once read (CG's curvature floor is half of it).
    smallest_noise_variance: Option<f64>,
}

impl<'a, P: Prior> Mmps<'a, P> {
    /// MMPS with the Tweedie covariance, residual checks every [`DEFAULT_CHECK_EVERY`] CG
    /// iterations and no residual measurement; the other fields are public to change those.
    pub fn new(
        prior: &'a P,
        operator: &'a dyn LinearOperator,
        y: &'a Tensor,
        noise: &'a ObservationNoise,
        cg: CgConfig,
    ) -> Self {
        Mmps {
            prior,
            operator,
            y,
            noise,
            cg,
            cg_check_every: DEFAULT_CHECK_EVERY,
            covariance: Covariance::Tweedie,
            last_cg: CgStats::default(),
            measure_cg: false,
            worst_cg_residual: None,
            smallest_noise_variance: None,
        }
    }

    /// The smallest variance of Σ_y, read once (a diagonal's from its device).
    fn noise_floor(&mut self) -> Result<f64> {
        if let Some(v) = self.smallest_noise_variance {
            return Ok(v);
        }
        let v = self.noise.smallest_variance()?;
        self.smallest_noise_variance = Some(v);
        Ok(v)
    }

    /// V w for the chosen covariance.
    fn cov_apply(&self, saved: &P::Saved, level: &NoiseLevel, w: &Tensor) -> Result<Option<Tensor>> {
        Ok(match &self.covariance {
            Covariance::Tweedie => Some(rows_scaled(&self.prior.vjp(saved, w)?, &level.sigma2)?),
            Covariance::Zeros => None,
            Covariance::SigmaT => Some(rows_scaled(w, &level.sigma2)?),
            Covariance::Ones => Some(rows_scaled(w, &level.shrink)?),
            Covariance::Gaussian(g) => Some(g.posterior_cov_apply(level.host()?, &w.as_view()?)?),
        })
    }
}

/// Row i of `w` times `by[i]`.
fn rows_scaled(w: &Tensor, by: &Tensor) -> Result<Tensor> {
    let mut out = Tensor::uninit(w.shape(), w.dtype(), &w.device())?;
    scale_rows_into(w, by, &mut out)?;
    Ok(out)
}

/// x_t flattened to [B, d].
fn flat(t: &Tensor) -> Result<Tensor> {
    let b = t.shape()[0];
    t.as_view()?.reshape(&[b, t.numel() / b])?.to_tensor()
}

impl<P: Prior> Denoise for Mmps<'_, P> {
    fn denoise(&mut self, x_t: &Tensor, sigma: f64) -> Result<Tensor> {
        self.denoise_level(x_t, &NoiseLevel::for_batch(sigma, x_t)?)
    }

    /// Graph-safe with a prior that reads its level on the device, a CG solve that reads
    /// nothing back (no tolerance, or `cg_check_every` = 0; no measurement) and a covariance
    /// other than the Gaussian fit's (which applies σ on the host).
    fn graph_safe(&self) -> bool {
        self.prior.reads_device_levels()
            && !self.measure_cg
            && (self.cg.rtol.is_none() || self.cg_check_every == 0)
            && !matches!(self.covariance, Covariance::Gaussian(_))
    }

    fn denoise_level(&mut self, x_t: &Tensor, level: &NoiseLevel) -> Result<Tensor> {
        let (b, d) = (x_t.shape()[0], x_t.numel() / x_t.shape()[0]);
        if d != self.operator.signal_dim() || self.y.shape() != [b, self.operator.obs_dim()] {
            return Err(Error::shape(
                "mmps",
                "observations",
                [b, self.operator.obs_dim()],
                self.y.shape(),
            ));
        }
        // M = Σ_y + A V Aᵀ with V positive semi-definite has pᵀMp >= λ_min(Σ_y)·pᵀp; a direction
        // with under half of that shows V is not (a network's Jacobian need not be), and CG
        // stops that row instead of stepping along it (posterior::cg's notes).
        let floor = 0.5 * self.noise_floor()?;
        let (x_hat, saved) = self.prior.denoise_saved_level(x_t, level)?;
        let x_hat_flat = flat(&x_hat)?;
        let mut residual = self.y.as_view()?.to_tensor()?;
        axpy(-1.0, &self.operator.apply(&x_hat_flat.as_view()?)?, &mut residual)?;
        let matvec = |v: &Tensor| -> Result<Tensor> {
            let noise = self.noise.apply(&v.as_view()?)?;
            let at_v = self.operator.adjoint(&v.as_view()?)?.reshape(x_t.shape())?;
            match self.cov_apply(&saved, level, &at_v)? {
                Some(vat) => add(&noise, &self.operator.apply(&flat(&vat)?.as_view()?)?),
                None => Ok(noise),
            }
        };
        let (v, stats) = cg_floored(
            matvec,
            &residual,
            self.cg,
            self.cg_check_every,
            self.measure_cg,
            floor,
        )?;
        self.last_cg = stats;
        if let Some(r) = stats.final_relative_residual {
            self.worst_cg_residual = Some(self.worst_cg_residual.map_or(r, |w| w.max(r)));
        }
        let score = self.prior.vjp(
            &saved,
            &self.operator.adjoint(&v.as_view()?)?.reshape(x_t.shape())?,
        )?;
        // x̂ + σ² Jᵀ Aᵀ v, σ² per row from the level.
        let mut ones = Tensor::uninit(&[b], x_t.dtype(), &x_t.device())?;
        crate::ops::fill(&mut ones, 1.0)?;
        let mut out = Tensor::uninit(x_t.shape(), x_t.dtype(), &x_t.device())?;
        scale_rows_add_into(&x_hat, &ones, &score, &level.sigma2, &mut out)?;
        Ok(out)
    }
}

/// DPS as a posterior denoiser (the baseline): x_hat + sigma^2 zeta J^T A^T r / ||r||, r = y - A x_hat,
/// i.e. a step of size zeta along the gradient of -||y - A x_hat(x_t)|| per observation.
pub struct Dps<'a, P: Prior> {
    /// The prior whose denoiser and VJPs give x̂ and J.
    pub prior: &'a P,
    /// A, mapping a flattened signal `[B, d]` to observations `[B, m]`.
    pub operator: &'a dyn LinearOperator,
    /// The observations `[B, m]`.
    pub y: &'a Tensor,
    /// ζ, the step size along the normalised likelihood gradient (azula's default: 1).
    pub zeta: f64,
}

impl<P: Prior> Denoise for Dps<'_, P> {
    fn denoise(&mut self, x_t: &Tensor, sigma: f64) -> Result<Tensor> {
        self.denoise_level(x_t, &NoiseLevel::for_batch(sigma, x_t)?)
    }

    /// Graph-safe over a prior that reads its level on the device: the step's weights are
    /// computed there too.
    fn graph_safe(&self) -> bool {
        self.prior.reads_device_levels()
    }

    fn denoise_level(&mut self, x_t: &Tensor, level: &NoiseLevel) -> Result<Tensor> {
        let (x_hat, saved) = self.prior.denoise_saved_level(x_t, level)?;
        let mut r = self.y.as_view()?.to_tensor()?;
        axpy(-1.0, &self.operator.apply(&flat(&x_hat)?.as_view()?)?, &mut r)?;
        // ζ σ² / ||r|| per row, on the device (0 where r = 0, whose step is 0 either way).
        let weights = div_guarded(&scale(&level.sigma2, self.zeta)?, &row_norm(&r)?)?;
        let g = self.prior.vjp(
            &saved,
            &self.operator.adjoint(&r.as_view()?)?.reshape(x_t.shape())?,
        )?;
        let mut step = Tensor::uninit(g.shape(), g.dtype(), &g.device())?;
        scale_rows_into(&g, &weights, &mut step)?;
        add(&x_hat, &step)
    }
}
