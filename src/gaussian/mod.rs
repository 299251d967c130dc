//! Gaussian priors N(mu, Sigma) with a diagonal-plus-low-rank covariance Sigma = D + U U^T
//! (method.md §5.4, §8.1): the exact Gaussian denoiser, its (symmetric) Jacobian for MMPS, the
//! exact posterior covariance V[x | x_t] = (Sigma^-1 + sigma^-2 I)^-1 used by the covariance
//! heuristics, and the PPCA fit that the EM initialisation iterates. Solves use the Woodbury
//! identity with an r x r capacitance matrix, factored on the host; the batched products run
//! through the ops, so a Gaussian prior works on the CPU and on the GPU alike.

pub mod linalg;
pub mod ppca;

pub use ppca::{ppca, ppca_randomized};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::broadcast::{add_bias, scale_cols_into};
use crate::ops::{axpy, gemm_into, scale, GemmSpec};
use crate::tensor::{AsView, DType, Tensor, View};

/// Sigma = diag(d) + U U^T with U d x r (row-major), in f64 on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct Dplr {
    /// The diagonal D: `d` positive, finite entries.
    pub diag: Vec<f64>,
    /// U, `d × rank` row-major (entry `(i, k)` at `u[i * rank + k]`); empty when `rank` is 0.
    pub u: Vec<f64>,
    /// r, the number of columns of U.
    pub rank: usize,
}

impl Dplr {
    /// `diag(diag) + U Uᵀ`; errors unless `u` holds `diag.len() × rank` values and every
    /// diagonal entry is positive and finite.
    pub fn new(diag: Vec<f64>, u: Vec<f64>, rank: usize) -> Result<Self> {
        if u.len() != diag.len() * rank {
            return Err(Error::Other(format!(
                "DPLR: U has {} values, expected {} x {rank}",
                u.len(),
                diag.len()
            )));
        }
        if let Some(bad) = diag.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
            return Err(Error::Other(format!(
                "DPLR: diagonal entry {bad} is not positive"
            )));
        }
        Ok(Dplr { diag, u, rank })
    }

    /// The identity (N(0, I), where the EM initialisation starts).
    pub fn identity(d: usize) -> Self {
        Dplr {
            diag: vec![1.0; d],
            u: Vec::new(),
            rank: 0,
        }
    }

    /// A dense covariance as full-rank DPLR: D = eps I, U = the Cholesky factor of C - eps I.
    pub fn from_dense(c: &[f64], d: usize, eps: f64) -> Result<Self> {
        let mut shifted = c.to_vec();
        for i in 0..d {
            shifted[i * d + i] -= eps;
        }
        let l = linalg::cholesky(&shifted, d)?;
        Dplr::new(vec![eps; d], l, d)
    }

    /// d, the dimension of the (d × d) matrix.
    pub fn dim(&self) -> usize {
        self.diag.len()
    }

    /// The dense matrix (tests and small problems).
    pub fn dense(&self) -> Vec<f64> {
        let (d, r) = (self.dim(), self.rank);
        let mut c = vec![0.0; d * d];
        for i in 0..d {
            c[i * d + i] = self.diag[i];
            for j in 0..d {
                c[i * d + j] += (0..r).map(|k| self.u[i * r + k] * self.u[j * r + k]).sum::<f64>();
            }
        }
        c
    }

    /// Everything needed to apply (Sigma + shift I)^-1 to a batch: 1/(D + shift), U and the
    /// inverse capacitance (I + U^T diag(1/(D + shift)) U)^-1, as tensors of `dtype` on `device`.
    pub fn shifted_inverse(&self, shift: f64, dtype: DType, device: &Device) -> Result<ShiftedInverse> {
        let (d, r) = (self.dim(), self.rank);
        let dinv: Vec<f64> = self.diag.iter().map(|&v| 1.0 / (v + shift)).collect();
        let mut w = vec![0.0; r * r];
        for a in 0..r {
            for b in 0..r {
                w[a * r + b] = (a == b) as u8 as f64
                    + (0..d)
                        .map(|i| self.u[i * r + a] * dinv[i] * self.u[i * r + b])
                        .sum::<f64>();
            }
        }
        let winv = if r > 0 {
            linalg::spd_inverse(&w, r)?
        } else {
            Vec::new()
        };
        Ok(ShiftedInverse {
            dinv: Tensor::from_f64_as(&dinv, &[d], dtype, device)?,
            u: if r > 0 {
                Some(Tensor::from_f64_as(&self.u, &[d, r], dtype, device)?)
            } else {
                None
            },
            winv: if r > 0 {
                Some(Tensor::from_f64_as(&winv, &[r, r], dtype, device)?)
            } else {
                None
            },
        })
    }
}

/// (Sigma + shift I)^-1 ready to apply: see `Dplr::shifted_inverse`.
pub struct ShiftedInverse {
    dinv: Tensor,
    u: Option<Tensor>,
    winv: Option<Tensor>,
}

impl ShiftedInverse {
    /// (Sigma + shift I)^-1 v for every row of v [B, d], by Woodbury:
    /// D'^-1 (v - U W^-1 U^T D'^-1 v).
    pub fn apply(&self, v: &View) -> Result<Tensor> {
        let d = self.dinv.numel();
        let b = v.numel() / d;
        let v2 = v.reshape(&[b, d])?;
        let mut s = Tensor::uninit(&[b, d], v.dtype(), &v.device())?;
        scale_cols_into(&v2, &self.dinv, &mut s)?;
        let out = match (&self.u, &self.winv) {
            (Some(u), Some(winv)) => {
                let r = winv.shape()[0];
                let mut t = Tensor::uninit(&[b, r], v.dtype(), &v.device())?;
                gemm_into(&s, u, &mut t, GemmSpec::default())?;
                let mut t2 = Tensor::uninit(&[b, r], v.dtype(), &v.device())?;
                gemm_into(&t, winv, &mut t2, GemmSpec::default())?;
                let mut q = Tensor::uninit(&[b, d], v.dtype(), &v.device())?;
                gemm_into(&t2, u, &mut q, GemmSpec::new(false, true))?;
                let mut diff = v2.to_tensor()?;
                axpy(-1.0, &q, &mut diff)?;
                let mut res = Tensor::uninit(&[b, d], v.dtype(), &v.device())?;
                scale_cols_into(&diff, &self.dinv, &mut res)?;
                res
            }
            _ => s,
        };
        out.reshape(v.shape())
    }
}

/// A Gaussian prior N(mean, cov).
///
/// ```
/// use emprior::gaussian::{Dplr, Gaussian};
/// use emprior::{AsView, Device, Tensor};
///
/// // N(μ, I) in 2-D: at σ = 1, E[x | x_t] = μ + (x_t − μ) / 2.
/// let prior = Gaussian::new(vec![1.0, -1.0], Dplr::identity(2))?;
/// let x_t = Tensor::from_f64(&[3.0, 1.0], &[1, 2], &Device::Cpu)?;
/// let x_hat = prior.denoise(&x_t.as_view()?, 1.0)?.to_vec_f64()?;
/// assert!((x_hat[0] - 2.0).abs() < 1e-12);
/// assert!((x_hat[1] - 0.0).abs() < 1e-12);
/// # Ok::<(), emprior::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Gaussian {
    /// μ, `d` entries.
    pub mean: Vec<f64>,
    /// Σ, diagonal plus low rank.
    pub cov: Dplr,
    /// The last (Sigma + shift I)^-1 built: a sampler step calls the denoiser, then CG calls the
    /// VJP several times at the same sigma, and rebuilding would refactor the capacitance and
    /// re-upload the factors every time.
    cache: InverseCache,
}

/// (shift bits, dtype, device) -> the inverse built for them.
type CachedInverse = (u64, DType, String, std::sync::Arc<ShiftedInverse>);

/// One cached `ShiftedInverse`. Not part of a Gaussian's value: clones start empty and equality
/// ignores it.
#[derive(Default)]
struct InverseCache(std::sync::Mutex<Option<CachedInverse>>);

impl Clone for InverseCache {
    fn clone(&self) -> Self {
        InverseCache::default()
    }
}

impl PartialEq for InverseCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for InverseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InverseCache")
    }
}

impl Gaussian {
    /// N(mean, cov); errors when `mean`'s length differs from the covariance's dimension.
    pub fn new(mean: Vec<f64>, cov: Dplr) -> Result<Self> {
        if mean.len() != cov.dim() {
            return Err(Error::Other(format!(
                "Gaussian: mean has {} entries, covariance is {0}x{0}",
                cov.dim()
            )));
        }
        Ok(Gaussian {
            mean,
            cov,
            cache: InverseCache::default(),
        })
    }

    /// d, the dimension.
    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// (Sigma + shift I)^-1 for `dtype` on `device`, reused while the shift stays the same.
    fn inverse(&self, shift: f64, dtype: DType, device: &Device) -> Result<std::sync::Arc<ShiftedInverse>> {
        let key = (shift.to_bits(), dtype, device.to_string());
        let mut slot = self.cache.0.lock().unwrap();
        if let Some((bits, dt, dev, inv)) = slot.as_ref() {
            if (*bits, *dt, dev.as_str()) == (key.0, key.1, key.2.as_str()) {
                return Ok(inv.clone());
            }
        }
        let inv = std::sync::Arc::new(self.cov.shifted_inverse(shift, dtype, device)?);
        *slot = Some((key.0, key.1, key.2, inv.clone()));
        Ok(inv)
    }

    /// E[x | x_t] = x_t - sigma^2 (Sigma + sigma^2 I)^-1 (x_t - mu) for a batch x_t [B, d].
    pub fn denoise(&self, x_t: &View, sigma: f64) -> Result<Tensor> {
        let s2 = sigma * sigma;
        let inv = self.inverse(s2, x_t.dtype(), &x_t.device())?;
        let d = self.dim();
        let b = x_t.numel() / d;
        let mut centred = x_t.reshape(&[b, d])?.to_tensor()?;
        let neg_mean = Tensor::from_f64_as(
            &self.mean.iter().map(|m| -m).collect::<Vec<_>>(),
            &[d],
            x_t.dtype(),
            &x_t.device(),
        )?;
        add_bias(&mut centred, &neg_mean)?;
        let solved = inv.apply(&centred.as_view()?)?;
        let mut out = x_t.reshape(&[b, d])?.to_tensor()?;
        axpy(-s2, &solved, &mut out)?;
        out.reshape(x_t.shape())
    }

    /// J^T u for the Gaussian denoiser, J = I - sigma^2 (Sigma + sigma^2 I)^-1 (symmetric).
    pub fn vjp(&self, sigma: f64, u: &View) -> Result<Tensor> {
        let s2 = sigma * sigma;
        let solved = self.inverse(s2, u.dtype(), &u.device())?.apply(u)?;
        let mut out = u.to_tensor()?;
        axpy(-s2, &solved, &mut out)?;
        Ok(out)
    }

    /// V[x | x_t] u = (Sigma^-1 + sigma^-2 I)^-1 u = sigma^2 u - sigma^4 (Sigma + sigma^2 I)^-1 u.
    pub fn posterior_cov_apply(&self, sigma: f64, u: &View) -> Result<Tensor> {
        let s2 = sigma * sigma;
        let solved = self.inverse(s2, u.dtype(), &u.device())?.apply(u)?;
        let mut out = scale(u, s2)?;
        axpy(-(s2 * s2), &solved, &mut out)?;
        Ok(out)
    }

    /// The mean as a tensor, for the sampler's starting point.
    pub fn mean_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::from_f64_as(&self.mean, &[self.dim()], dtype, device)
    }
}
