//! The weighted denoising score-matching loss (method.md §2.4):
//!   L = mean_b [ lambda_b * mean_f (d(x_b + sigma_b z_b, sigma_b) - x_b)^2 ],
//!   lambda = 1 / sigma^2 + 1 (EDM's weighting for sigma_data = 1).

use super::precond::Denoiser;
use crate::error::{Error, Result};
use crate::nn::Mode;
use crate::ops::broadcast::{scale_rows_add_into, scale_rows_into};
use crate::ops::row_dot;
use crate::tensor::{AsView, Tensor, View, ViewMut};

/// lambda(sigma) = 1 / sigma^2 + 1.
pub fn dsm_weight(sigma: f64) -> f64 {
    1.0 / (sigma * sigma) + 1.0
}

/// The loss for clean samples `x`, noise levels `sigmas` (one per sample) and standard normal
/// noise `z`; with `grads`, also accumulates the loss's parameter gradient there.
pub fn dsm_loss(
    den: &Denoiser,
    params: &View,
    x: &View,
    sigmas: &[f64],
    z: &View,
    mode: Mode,
    grads: Option<&mut ViewMut>,
) -> Result<f64> {
    let b = x.shape().first().copied().unwrap_or(0);
    if sigmas.len() != b || z.shape() != x.shape() || b == 0 {
        return Err(Error::shape("dsm_loss", "noise", x.shape(), z.shape()));
    }
    let features = (x.numel() / b) as f64;
    let (dtype, device) = (x.dtype(), x.device());
    let col = |v: Vec<f64>| Tensor::from_f64_as(&v, &[b], dtype, &device);
    let ones = col(vec![1.0; b])?;
    let mut x_t = Tensor::uninit(x.shape(), dtype, &device)?;
    scale_rows_add_into(x, &ones, z, &col(sigmas.to_vec())?, &mut x_t)?;
    let (d, saved) = den.denoise(params, &x_t.as_view()?, sigmas, mode)?;
    let mut r = Tensor::uninit(x.shape(), dtype, &device)?;
    scale_rows_add_into(&d, &ones, x, &col(vec![-1.0; b])?, &mut r)?;
    let rr = row_dot(&r, &r)?.as_view()?.to_vec_f64()?;
    let weights: Vec<f64> = sigmas.iter().map(|&s| dsm_weight(s)).collect();
    let loss = weights.iter().zip(&rr).map(|(w, e)| w * e).sum::<f64>() / (b as f64 * features);
    if !loss.is_finite() {
        return Err(Error::Other(format!(
            "dsm_loss: the loss is {loss} (diverged, or NaN in the data)"
        )));
    }
    if let Some(g) = grads {
        let scale: Vec<f64> = weights.iter().map(|w| 2.0 * w / (b as f64 * features)).collect();
        let mut dl_dd = Tensor::uninit(x.shape(), dtype, &device)?;
        scale_rows_into(&r, &col(scale)?, &mut dl_dd)?;
        den.backward(params, &saved, &dl_dd.as_view()?, Some(g))?;
    }
    Ok(loss)
}
