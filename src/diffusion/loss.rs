//! The weighted denoising score-matching loss (method.md §2.4):
//!   L = mean_b [ lambda_b * mean_f (d(x_b + sigma_b z_b, sigma_b) - x_b)^2 ],
//!   lambda = 1 / sigma^2 + 1 (EDM's weighting for sigma_data = 1).
//! The loss is reduced on the device ([`dsm_loss_into`]: per-sample squared errors, then their
//! weighted sum, both deterministic f64 reductions) so a training step never waits for it.

use super::precond::Denoiser;
use crate::device::launch::grid_stride;
use crate::error::{Error, Result};
use crate::nn::{Mode, Weights};
use crate::ops::broadcast::{scale_rows_add_into, scale_rows_into};
use crate::ops::{fill, mismatch, row_dot, row_dot_into};
use crate::real::Real;
use crate::tensor::{AsView, AsViewMut, Data, DataMut, Tensor, View, ViewMut};

/// lambda(sigma) = 1 / sigma^2 + 1.
pub fn dsm_weight(sigma: f64) -> f64 {
    1.0 / (sigma * sigma) + 1.0
}

/// The loss for clean samples `x`, noise levels `sigmas` (one per sample) and standard normal
/// noise `z`, written to the scalar `loss` on the device (nothing is read back); with `grads`,
/// also accumulates the loss's parameter gradient there. A non-finite loss is not checked here:
/// the training log flags it (train::log). The noise levels are rounded to `x`'s dtype and
/// uploaded: a training step draws them on the device instead ([`dsm_loss_levels_into`]).
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
    if sigmas.len() != b || b == 0 {
        return Err(Error::shape(
            "dsm_loss",
            "sigmas",
            format!("{b} values"),
            sigmas.len(),
        ));
    }
    if let Some(bad) = sigmas.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        return Err(Error::Other(format!(
            "dsm_loss: sigma {bad} is not a positive finite number"
        )));
    }
    let levels = Tensor::from_f64_as(sigmas, &[b], x.dtype(), &x.device())?;
    dsm_loss_levels_into(den, params, x, &levels.as_view()?, z, mode, grads, loss, b)
}

/// The loss's per-sample weights for noise levels `sigma` (`[n]`, on the device) in a batch of
/// `bf` = rows x features: lambda / bf for the loss and 2 lambda / bf for its gradient,
/// lambda = [`dsm_weight`], in f64 from each level as stored, rounded once (kernels/loss.cu).
fn dsm_weights(sigma: &View, bf: f64) -> Result<(Tensor, Tensor)> {
    crate::device::note_op();
    let n = sigma.numel();
    let (dtype, device) = (sigma.dtype(), sigma.device());
    let (mut w, mut w_grad) = (
        Tensor::uninit(&[n], dtype, &device)?,
        Tensor::uninit(&[n], dtype, &device)?,
    );
    {
        let (mut wv, mut gv) = (w.as_view_mut()?, w_grad.as_view_mut()?);
        match (&sigma.data, &mut wv.data, &mut gv.data) {
            (Data::Cuda(s, dev), DataMut::Cuda(wo, _), DataMut::Cuda(go, _)) => {
                // SAFETY: the three buffers hold n values.
                unsafe {
                    dev.kernels()
                        .dsm_weights_f32(grid_stride(dev, n), s, wo, go, n as i64, bf)
                }?;
            }
            (Data::Cuda(..), _, _) => return Err(mismatch("dsm_weights", &[sigma], &[])),
            _ => host_real!(sigma, T => {
                let s = sigma.cpu::<T>()?;
                for (o, &si) in wv.cpu_mut::<T>()?.iter_mut().zip(s) {
                    *o = T::from_f64(dsm_weight(si.to_f64()) / bf);
                }
                for (o, &si) in gv.cpu_mut::<T>()?.iter_mut().zip(s) {
                    *o = T::from_f64(2.0 * dsm_weight(si.to_f64()) / bf);
                }
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok((w, w_grad))
}

/// [`dsm_loss_into`] with the noise levels `sigma` (`[b]`, x's dtype) on the device, for a part
/// of a step's batch of `batch_rows` rows (x, sigma and z are the part's; `mode` says where the
/// part starts): the loss and gradient are this part's terms of the whole batch's mean, so the
/// parts' losses and gradients add up to the whole's. Uploads nothing and reads nothing back,
/// so a training step can be captured and replayed (the levels must be positive: a training
/// step draws them from the schedule).
#[allow(clippy::too_many_arguments)]
pub fn dsm_loss_levels_into(
    den: &Denoiser,
    params: &Weights,
    x: &View,
    sigma: &View,
    z: &View,
    mode: Mode,
    grads: Option<&mut ViewMut>,
    loss: &mut ViewMut,
    batch_rows: usize,
) -> Result<()> {
    let b = x.shape().first().copied().unwrap_or(0);
    if sigma.shape() != [b] || z.shape() != x.shape() || b == 0 || batch_rows < b {
        return Err(Error::shape("dsm_loss", "noise", x.shape(), z.shape()));
    }
    if sigma.dtype() != x.dtype() {
        return Err(Error::DType {
            op: "dsm_loss",
            expected: x.dtype().name(),
            actual: sigma.dtype().name(),
        });
    }
    if !loss.shape().is_empty() {
        return Err(Error::shape("dsm_loss", "loss", "[]", loss.shape()));
    }
    let features = (x.numel() / b) as f64;
    let (dtype, device) = (x.dtype(), x.device());
    let column = |v: f32| -> Result<Tensor> {
        let mut t = Tensor::uninit(&[b], dtype, &device)?;
        fill(&mut t, v)?;
        Ok(t)
    };
    let ones = column(1.0)?;
    let mut x_t = Tensor::uninit(x.shape(), dtype, &device)?;
    scale_rows_add_into(x, &ones, z, sigma, &mut x_t)?;
    let (d, saved) = den.denoise_levels(params, &x_t.as_view()?, sigma, mode)?;
    let mut r = Tensor::uninit(x.shape(), dtype, &device)?;
    scale_rows_add_into(&d, &ones, x, &column(-1.0)?, &mut r)?;
    // L = sum_b (lambda_b / (B F)) ||r_b||^2, B the whole batch's rows: a dot of the weights
    // with the squared errors, as one row of this part's length.
    let (w_loss, w_grad) = dsm_weights(sigma, batch_rows as f64 * features)?;
    let rr = row_dot(&r, &r)?.reshape(&[1, b])?;
    row_dot_into(
        &w_loss.reshape(&[1, b])?,
        &rr,
        &mut loss.reborrow().reshape(&[1])?,
    )?;
    if let Some(g) = grads {
        let mut dl_dd = Tensor::uninit(x.shape(), dtype, &device)?;
        scale_rows_into(&r, &w_grad, &mut dl_dd)?;
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
