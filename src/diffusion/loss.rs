//! The weighted denoising score-matching loss (method.md §2.4):
//!   L = mean_b [ lambda_b * mean_f (d(x_b + sigma_b z_b, sigma_b) - x_b)^2 ],
//!   lambda = 1 / sigma^2 + 1 (EDM's weighting for sigma_data = 1).
//! The loss is reduced on the device ([`dsm_loss_into`]: per-sample squared errors, then their
//! weighted sum, both deterministic f64 reductions) so a training step never waits for it.

use super::precond::Denoiser;
use crate::error::{Error, Result};
use crate::nn::{Mode, Weights};
use crate::ops::broadcast::{scale_rows_add_into, scale_rows_into};
use crate::ops::{row_dot, row_dot_into};
use crate::tensor::{AsView, AsViewMut, Tensor, View, ViewMut};

/// lambda(sigma) = 1 / sigma^2 + 1.
pub fn dsm_weight(sigma: f64) -> f64 {
    1.0 / (sigma * sigma) + 1.0
}

/// The loss for clean samples `x`, noise levels `sigmas` (one per sample) and standard normal
/// noise `z`, written to the scalar `loss` on the device (nothing is read back); with `grads`,
/// also accumulates the loss's parameter gradient there. A non-finite loss is not checked here:
/// the training log flags it (train::log).
#[allow(clippy::too_many_arguments)]
pub fn dsm_loss_into(
    den: &Denoiser,
    params: &Weights,
    x: &View,
    sigmas: &[f64],
    z: &View,
    mode: Mode,
    grads: Option<&mut ViewMut>,
    loss: &mut ViewMut,
) -> Result<()> {
    let b = x.shape().first().copied().unwrap_or(0);
    dsm_loss_part_into(den, params, x, sigmas, z, mode, grads, loss, b)
}

/// [`dsm_loss_into`] for a part of a step's batch of `batch_rows` rows (x, sigmas and z are the
/// part's; `mode` says where the part starts): the loss and gradient are this part's terms of the
/// whole batch's mean, so the parts' losses and gradients add up to the whole's.
#[allow(clippy::too_many_arguments)]
pub fn dsm_loss_part_into(
    den: &Denoiser,
    params: &Weights,
    x: &View,
    sigmas: &[f64],
    z: &View,
    mode: Mode,
    grads: Option<&mut ViewMut>,
    loss: &mut ViewMut,
    batch_rows: usize,
) -> Result<()> {
    let b = x.shape().first().copied().unwrap_or(0);
    if sigmas.len() != b || z.shape() != x.shape() || b == 0 || batch_rows < b {
        return Err(Error::shape("dsm_loss", "noise", x.shape(), z.shape()));
    }
    if !loss.shape().is_empty() {
        return Err(Error::shape("dsm_loss", "loss", "[]", loss.shape()));
    }
    let features = (x.numel() / b) as f64;
    let (dtype, device) = (x.dtype(), x.device());
    let col = |v: Vec<f64>, shape: &[usize]| Tensor::from_f64_as(&v, shape, dtype, &device);
    let ones = col(vec![1.0; b], &[b])?;
    let mut x_t = Tensor::uninit(x.shape(), dtype, &device)?;
    scale_rows_add_into(x, &ones, z, &col(sigmas.to_vec(), &[b])?, &mut x_t)?;
    let (d, saved) = den.denoise(params, &x_t.as_view()?, sigmas, mode)?;
    let mut r = Tensor::uninit(x.shape(), dtype, &device)?;
    scale_rows_add_into(&d, &ones, x, &col(vec![-1.0; b], &[b])?, &mut r)?;
    // L = sum_b (lambda_b / (B F)) ||r_b||^2, B the whole batch's rows: a dot of the weights
    // with the squared errors, as one row of this part's length.
    let weights: Vec<f64> = sigmas.iter().map(|&s| dsm_weight(s)).collect();
    let rr = row_dot(&r, &r)?.reshape(&[1, b])?;
    let mean_weights: Vec<f64> = weights
        .iter()
        .map(|w| w / (batch_rows as f64 * features))
        .collect();
    row_dot_into(
        &col(mean_weights, &[1, b])?,
        &rr,
        &mut loss.reborrow().reshape(&[1])?,
    )?;
    if let Some(g) = grads {
        let scale: Vec<f64> = weights
            .iter()
            .map(|w| 2.0 * w / (batch_rows as f64 * features))
            .collect();
        let mut dl_dd = Tensor::uninit(x.shape(), dtype, &device)?;
        scale_rows_into(&r, &col(scale, &[b])?, &mut dl_dd)?;
        den.backward(params, &saved, &dl_dd.as_view()?, Some(g))?;
    }
    Ok(())
}

/// [`dsm_loss_into`] with the loss read back to the host (one synchronisation): for tests and
/// evaluation. A non-finite loss is an error.
pub fn dsm_loss(
    den: &Denoiser,
    params: &Weights,
    x: &View,
    sigmas: &[f64],
    z: &View,
    mode: Mode,
    grads: Option<&mut ViewMut>,
) -> Result<f64> {
    let mut out = Tensor::zeros(&[], x.dtype(), &x.device())?;
    dsm_loss_into(den, params, x, sigmas, z, mode, grads, &mut out.as_view_mut()?)?;
    let loss = out.as_view()?.to_vec_f64()?[0];
    if !loss.is_finite() {
        return Err(Error::Other(format!(
            "dsm_loss: the loss is {loss} (diverged, or NaN in the data)"
        )));
    }
    Ok(loss)
}
