//! Observation operators y = A x with exact adjoints, batched over observations (one row of the
//! batch per observation): a dense matrix per observation, one shared dense matrix, or a
//! per-pixel mask (kept at full size, zeros where unobserved, as the paper does). The trait is
//! all MMPS needs: the MRI operator (masked, centred, orthonormal FFT) is `super::fourier`.

use crate::error::{Error, Result};
use crate::ops::{gemm_into, mul_into, GemmSpec};
use crate::tensor::{AsView, Tensor, View};

/// A batched linear operator: `apply` maps x [B, d...] to y [B, m]; `adjoint` maps back.
pub trait LinearOperator {
    /// Observation size m per row.
    fn obs_dim(&self) -> usize;
    /// Signal size d per row (the product of the signal's non-batch axes).
    fn signal_dim(&self) -> usize;
    /// A x, shaped `[B, m]`: `x` holds B rows of d values (any shape whose leading axis is B);
    /// errors when its size does not fit.
    fn apply(&self, x: &View) -> Result<Tensor>;
    /// A^T y, shaped [B, d].
    fn adjoint(&self, y: &View) -> Result<Tensor>;
}

fn rows(op: &str, v: &View, per: usize) -> Result<usize> {
    let n = v.numel();
    if per == 0 || n % per != 0 || v.shape().first().map(|&b| b * per) != Some(n) {
        return Err(Error::shape(
            "operator",
            format!("{op} input"),
            format!("[B, {per}]"),
            v.shape(),
        ));
    }
    Ok(n / per)
}

/// A_i [m, d] per observation, as a [B, m, d] tensor.
pub struct DenseOperators {
    /// The matrices A_i, `[B, m, d]` row-major; row i of a batch is observed through A_i.
    pub a: Tensor,
}

impl DenseOperators {
    /// Wraps `a`, `[B, m, d]`; errors unless it has three axes.
    pub fn new(a: Tensor) -> Result<Self> {
        if a.shape().len() != 3 {
            return Err(Error::shape("DenseOperators", "A", "[n, m, d]", a.shape()));
        }
        Ok(DenseOperators { a })
    }
}

impl LinearOperator for DenseOperators {
    fn obs_dim(&self) -> usize {
        self.a.shape()[1]
    }
    fn signal_dim(&self) -> usize {
        self.a.shape()[2]
    }
    fn apply(&self, x: &View) -> Result<Tensor> {
        let (m, d) = (self.obs_dim(), self.signal_dim());
        let b = rows("apply", x, d)?;
        if b != self.a.shape()[0] {
            return Err(Error::shape(
                "operator",
                "batch",
                format!("{} observations", self.a.shape()[0]),
                x.shape(),
            ));
        }
        let mut y = Tensor::uninit(&[b, m, 1], x.dtype(), &x.device())?;
        gemm_into(&self.a, &x.reshape(&[b, d, 1])?, &mut y, GemmSpec::default())?;
        y.reshape(&[b, m])
    }
    fn adjoint(&self, y: &View) -> Result<Tensor> {
        let (m, d) = (self.obs_dim(), self.signal_dim());
        let b = rows("adjoint", y, m)?;
        let mut x = Tensor::uninit(&[b, d, 1], y.dtype(), &y.device())?;
        gemm_into(
            &self.a,
            &y.reshape(&[b, m, 1])?,
            &mut x,
            GemmSpec::new(true, false),
        )?;
        x.reshape(&[b, d])
    }
}

/// One A [m, d] for every observation.
pub struct SharedOperator {
    /// A, `[m, d]` row-major.
    pub a: Tensor,
}

impl SharedOperator {
    /// Wraps `a`, `[m, d]`; errors unless it has two axes.
    pub fn new(a: Tensor) -> Result<Self> {
        if a.shape().len() != 2 {
            return Err(Error::shape("SharedOperator", "A", "[m, d]", a.shape()));
        }
        Ok(SharedOperator { a })
    }
}

impl LinearOperator for SharedOperator {
    fn obs_dim(&self) -> usize {
        self.a.shape()[0]
    }
    fn signal_dim(&self) -> usize {
        self.a.shape()[1]
    }
    fn apply(&self, x: &View) -> Result<Tensor> {
        let (m, d) = (self.obs_dim(), self.signal_dim());
        let b = rows("apply", x, d)?;
        let mut y = Tensor::uninit(&[b, m], x.dtype(), &x.device())?;
        gemm_into(&x.reshape(&[b, d])?, &self.a, &mut y, GemmSpec::new(false, true))?;
        Ok(y)
    }
    fn adjoint(&self, y: &View) -> Result<Tensor> {
        let (m, d) = (self.obs_dim(), self.signal_dim());
        let b = rows("adjoint", y, m)?;
        let mut x = Tensor::uninit(&[b, d], y.dtype(), &y.device())?;
        gemm_into(&y.reshape(&[b, m])?, &self.a, &mut x, GemmSpec::default())?;
        Ok(x)
    }
}

/// A 0/1 mask per observation, already broadcast over channels: [B, d]. A = A^T = diag(mask).
pub struct MaskOperator {
    /// The mask `[B, d]`: 1 where an entry is observed, 0 where it is not.
    pub mask: Tensor,
}

impl MaskOperator {
    /// `mask` [B, P] per pixel, broadcast over `channels` (channels-last signals [B, P, C]).
    pub fn from_pixel_mask(
        mask: &[f32],
        batch: usize,
        pixels: usize,
        channels: usize,
        dtype: crate::tensor::DType,
        device: &crate::device::Device,
    ) -> Result<Self> {
        if mask.len() != batch * pixels {
            return Err(Error::shape("MaskOperator", "mask", [batch, pixels], mask.len()));
        }
        let full: Vec<f64> = mask
            .iter()
            .flat_map(|&m| std::iter::repeat_n(m as f64, channels))
            .collect();
        Ok(MaskOperator {
            mask: Tensor::from_f64_as(&full, &[batch, pixels * channels], dtype, device)?,
        })
    }
}

impl LinearOperator for MaskOperator {
    fn obs_dim(&self) -> usize {
        self.mask.shape()[1]
    }
    fn signal_dim(&self) -> usize {
        self.mask.shape()[1]
    }
    fn apply(&self, x: &View) -> Result<Tensor> {
        let d = self.signal_dim();
        let b = rows("apply", x, d)?;
        let mut y = Tensor::uninit(&[b, d], x.dtype(), &x.device())?;
        mul_into(
            &x.reshape(&[b, d])?,
            &self.mask.as_view()?.reshape(&[b, d])?,
            &mut y,
        )?;
        Ok(y)
    }
    fn adjoint(&self, y: &View) -> Result<Tensor> {
        self.apply(y)
    }
}

/// Sigma_y: a scalar variance, or one variance per observed entry [B, m].
pub enum ObservationNoise {
    /// One variance σ_y² for every entry: Σ_y = σ_y² I (not the standard deviation).
    Scalar(f64),
    /// One variance per observed entry, `[B, m]` (any shape with B · m values).
    Diagonal(Tensor),
}

impl ObservationNoise {
    /// The smallest variance of Σ_y (one device read for a diagonal); an error for a negative
    /// or non-finite one.
    pub fn smallest_variance(&self) -> Result<f64> {
        let v = match self {
            ObservationNoise::Scalar(s2) => *s2,
            ObservationNoise::Diagonal(d) => d
                .as_view()?
                .to_vec_f64()?
                .into_iter()
                .fold(f64::INFINITY, f64::min),
        };
        if !(v.is_finite() && v >= 0.0) {
            return Err(Error::Other(format!(
                "observation noise: a variance of {v}; Σ_y must be finite and non-negative"
            )));
        }
        Ok(v)
    }

    /// Sigma_y v for a batch v [B, m].
    pub fn apply(&self, v: &View) -> Result<Tensor> {
        match self {
            ObservationNoise::Scalar(s2) => crate::ops::scale(v, *s2),
            ObservationNoise::Diagonal(d) => crate::ops::mul(v, &d.as_view()?.reshape(v.shape())?),
        }
    }
}
