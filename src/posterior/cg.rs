//! Batched conjugate gradient: one SPD system M v = b per row of b [B, m], all systems advanced
//! together with per-row step sizes held on the device (no host round trip per iteration unless
//! a relative tolerance asks for one). Starts from v = 0 with r = b, so it does not spend an
//! operator call on M 0 (as JAX's cg does). Dot products accumulate in f64 (ops::row_dot).
//! A row whose p becomes 0 (converged) gets a 0 step size and stays put.

use crate::error::Result;
use crate::ops::broadcast::scale_rows_add_into;
use crate::ops::{div_guarded, row_dot, scale};
use crate::tensor::{AsView, Tensor};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CgConfig {
    /// The most iterations (each one operator call).
    pub max_iters: usize,
    /// Stop once every row has ||r|| <= rtol ||b|| (checked on the host each iteration).
    pub rtol: Option<f64>,
}

/// What a solve did.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct CgStats {
    pub iterations: usize,
    /// The largest ||r|| / ||b|| over rows at the end (when a tolerance was set).
    pub worst_relative_residual: Option<f64>,
}

/// Solves M v = b row by row; `matvec` applies M to a batch [B, m].
pub fn cg(
    mut matvec: impl FnMut(&Tensor) -> Result<Tensor>,
    b: &Tensor,
    config: CgConfig,
) -> Result<(Tensor, CgStats)> {
    let rows = b.shape()[0];
    let (dtype, device) = (b.dtype(), b.device());
    let mut ones = Tensor::uninit(&[rows], dtype, &device)?;
    crate::ops::fill(&mut ones, 1.0)?;
    let mut x = Tensor::zeros(b.shape(), dtype, &device)?;
    let mut r = b.as_view()?.to_tensor()?;
    let mut p = b.as_view()?.to_tensor()?;
    let mut rr = row_dot(&r, &r)?;
    let b_norm2 = match config.rtol {
        Some(_) => Some(rr.as_view()?.to_vec_f64()?),
        None => None,
    };
    let mut stats = CgStats::default();
    let residual_ok = |rr: &Tensor| -> Result<(bool, f64)> {
        let (Some(tol), Some(bn)) = (config.rtol, &b_norm2) else {
            return Ok((false, 0.0));
        };
        let now = rr.as_view()?.to_vec_f64()?;
        let worst = now
            .iter()
            .zip(bn)
            .map(|(r, b)| if *b > 0.0 { (r / b).sqrt() } else { 0.0 })
            .fold(0.0, f64::max);
        Ok((worst <= tol, worst))
    };
    for _ in 0..config.max_iters {
        let ap = matvec(&p)?;
        let pap = row_dot(&p, &ap)?;
        let alpha = div_guarded(&rr, &pap)?;
        let neg_alpha = scale(&alpha, -1.0)?;
        let mut x_next = Tensor::uninit(x.shape(), dtype, &device)?;
        scale_rows_add_into(&x, &ones, &p, &alpha, &mut x_next)?;
        x = x_next;
        let mut r_next = Tensor::uninit(r.shape(), dtype, &device)?;
        scale_rows_add_into(&r, &ones, &ap, &neg_alpha, &mut r_next)?;
        r = r_next;
        let rr_next = row_dot(&r, &r)?;
        stats.iterations += 1;
        let (done, worst) = residual_ok(&rr_next)?;
        stats.worst_relative_residual = config.rtol.map(|_| worst);
        if done {
            break;
        }
        let beta = div_guarded(&rr_next, &rr)?;
        let mut p_next = Tensor::uninit(p.shape(), dtype, &device)?;
        scale_rows_add_into(&r, &ones, &p, &beta, &mut p_next)?;
        p = p_next;
        rr = rr_next;
    }
    Ok((x, stats))
}
