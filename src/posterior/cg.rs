//! Batched conjugate gradient: one SPD system M v = b per row of b [B, m], all systems advanced
//! together with per-row step sizes held on the device. Starts from v = 0 with r = b, so it does
//! not spend an operator call on M 0 (as JAX's cg does). Dot products accumulate in f64
//! (ops::row_dot). A row whose p becomes 0 (converged) gets a 0 step size and stays put.
//!
//! Host synchronisation: none without a relative tolerance. With one, the residuals are read
//! back (one synchronisation, two at the first check) only every `check_every` iterations
//! ([`DEFAULT_CHECK_EVERY`] through [`cg`]) and never after the last iteration, so a solve of at
//! most that many iterations, as a sampler step's usually is, reads nothing. The price is up to
//! `check_every - 1` iterations past convergence, which leave a converged solve converged.
//! Deciding on the device instead would still need the host to learn whether to stop.

use crate::error::Result;
use crate::ops::broadcast::scale_rows_add_into;
use crate::ops::{div_guarded, row_dot, scale};
use crate::tensor::{AsView, Tensor};

/// How often [`cg`] reads its residuals when a relative tolerance is set.
pub const DEFAULT_CHECK_EVERY: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CgConfig {
    /// The most iterations (each one operator call).
    pub max_iters: usize,
    /// Stop once every row has ||r|| <= rtol ||b||, checked on the host every few iterations
    /// (see the module notes).
    pub rtol: Option<f64>,
}

/// What a solve did.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct CgStats {
    pub iterations: usize,
    /// The largest ||r|| / ||b|| over rows at the last tolerance check, if one ran.
    pub worst_relative_residual: Option<f64>,
}

/// Solves M v = b row by row; `matvec` applies M to a batch [B, m]. With a tolerance, checks it
/// every [`DEFAULT_CHECK_EVERY`] iterations.
pub fn cg(
    matvec: impl FnMut(&Tensor) -> Result<Tensor>,
    b: &Tensor,
    config: CgConfig,
) -> Result<(Tensor, CgStats)> {
    cg_checked(matvec, b, config, DEFAULT_CHECK_EVERY)
}

/// [`cg`] with the tolerance checked every `check_every` iterations (0: never; the solve runs
/// `max_iters` iterations and reads nothing back).
pub fn cg_checked(
    mut matvec: impl FnMut(&Tensor) -> Result<Tensor>,
    b: &Tensor,
    config: CgConfig,
    check_every: usize,
) -> Result<(Tensor, CgStats)> {
    let rows = b.shape()[0];
    let (dtype, device) = (b.dtype(), b.device());
    let mut ones = Tensor::uninit(&[rows], dtype, &device)?;
    crate::ops::fill(&mut ones, 1.0)?;
    let mut x = Tensor::zeros(b.shape(), dtype, &device)?;
    let mut r = b.as_view()?.to_tensor()?;
    let mut p = b.as_view()?.to_tensor()?;
    let mut rr = row_dot(&r, &r)?;
    let tol = config.rtol.filter(|_| check_every > 0);
    // ||b||^2 per row stays on the device until the first check needs it.
    let b_norm2 = match tol {
        Some(_) => Some(row_dot(&r, &r)?),
        None => None,
    };
    let mut b_norm2_host: Option<Vec<f64>> = None;
    let mut stats = CgStats::default();
    for it in 1..=config.max_iters {
        let ap = matvec(&p)?;
        let pap = row_dot(&p, &ap)?;
        let alpha = div_guarded(&rr, &pap)?;
        let neg_alpha = scale(&alpha, -1.0)?;
        let mut x_next = Tensor::uninit(x.shape(), dtype, &device)?;
        scale_rows_add_into(&x, &ones, &p, &alpha, &mut x_next)?;
        x = x_next;
        stats.iterations = it;
        if it == config.max_iters {
            break; // the last iteration needs neither r nor p
        }
        let mut r_next = Tensor::uninit(r.shape(), dtype, &device)?;
        scale_rows_add_into(&r, &ones, &ap, &neg_alpha, &mut r_next)?;
        r = r_next;
        let rr_next = row_dot(&r, &r)?;
        if let (Some(tol), Some(bn)) = (tol, &b_norm2) {
            if it % check_every == 0 {
                let bn = match &mut b_norm2_host {
                    Some(v) => v,
                    slot => slot.insert(bn.as_view()?.to_vec_f64()?),
                };
                let now = rr_next.as_view()?.to_vec_f64()?;
                let worst = now
                    .iter()
                    .zip(bn.iter())
                    .map(|(r, b)| if *b > 0.0 { (r / b).sqrt() } else { 0.0 })
                    .fold(0.0, f64::max);
                stats.worst_relative_residual = Some(worst);
                if worst <= tol {
                    break;
                }
            }
        }
        let beta = div_guarded(&rr_next, &rr)?;
        let mut p_next = Tensor::uninit(p.shape(), dtype, &device)?;
        scale_rows_add_into(&r, &ones, &p, &beta, &mut p_next)?;
        p = p_next;
        rr = rr_next;
    }
    Ok((x, stats))
}
