//! Batched conjugate gradient: one SPD system M v = b per row of b [B, m], all systems advanced
//! together with per-row step sizes held on the device. Starts from v = 0 with r = b, so it does
//! not spend an operator call on M 0 (as JAX's cg does). Dot products accumulate in f64
//! (ops::row_dot).
//!
//! Each row converges on its own: with a relative tolerance, a row whose residual is within it
//! (||r||^2 <= rtol^2 ||b||^2, decided on the device by [`step_sizes`]) gets a 0 step size and
//! stays put, as does a row whose p becomes 0. So a row's iterates depend only on its own
//! system, never on the other rows of its batch nor on when the host looks: a batch cut into
//! parts (the CPU backend samples an E-step batch in parts, one per core) gives the same bits.
//!
//! CG assumes M symmetric positive definite. A row that meets a direction p of curvature
//! pᵀMp <= `min_curvature`·pᵀp (0 or negative curvature always counts) proves that it is not,
//! along p: stepping there would move away from the solution, often far (MMPS with a young
//! network, whose Jacobian is not the symmetric positive covariance it stands for, meets such
//! directions at CG's second and third iterations). That row stops at its current iterate: its
//! residual is zeroed, so its p and its steps stay 0 from then on, and it counts as converged.
//! An SPD system above the floor never meets one, so its iterates are unchanged by the guard.
//!
//! Host synchronisation: none without a relative tolerance. With one, the residuals are read
//! back (one synchronisation, two at the first check) only every `check_every` iterations
//! ([`DEFAULT_CHECK_EVERY`] through [`cg`]) and never after the last iteration, so a solve of at
//! most that many iterations, as a sampler step's usually is, reads nothing. The price is up to
//! `check_every - 1` iterations past convergence, which leave a converged solve converged.
//! Deciding on the device instead would still need the host to learn whether to stop. With
//! `check_every` = 0 the host never reads: every solve runs `max_iters` iterations, its rows
//! frozen on the device as they converge, so the solution is the bits a checked solve gives
//! (a sampler step recorded in a CUDA graph solves so).

use crate::device::launch::grid_stride;
use crate::error::{Error, Result};
use crate::ops::broadcast::scale_rows_add_into;
use crate::ops::{div_guarded, mismatch, one_device, row_dot, scale};
use crate::tensor::{AsView, AsViewMut, Data, DataMut, Tensor};

/// How often [`cg`] reads its residuals when a relative tolerance is set.
pub const DEFAULT_CHECK_EVERY: usize = 5;

/// When a CG solve stops: after `max_iters` iterations, or earlier once `rtol` is met. DP's
/// Gaussian initialisation and manifold E-step solve to rtol 1e-3; the image E-steps run a fixed
/// 1 or 3 iterations (method.md §4, §5.2).
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
    /// Iterations run (each one operator call).
    pub iterations: usize,
    /// The largest ||r|| / ||b|| over rows at the last tolerance check, if one ran.
    pub worst_relative_residual: Option<f64>,
    /// The largest ||r|| / ||b|| over rows when the solve ended ([`cg_measured`] only).
    pub final_relative_residual: Option<f64>,
}

/// Solves M v = b row by row; `matvec` applies M to a batch [B, m]. With a tolerance, checks it
/// every [`DEFAULT_CHECK_EVERY`] iterations.
///
/// ```
/// use emprior::posterior::{cg, CgConfig, LinearOperator, SharedOperator};
/// use emprior::{AsView, Device, Tensor};
///
/// // M = [[4, 1], [1, 3]] (symmetric, so x ↦ x Mᵀ is x ↦ M x per row); two right-hand sides.
/// let m = SharedOperator::new(Tensor::from_f64(&[4.0, 1.0, 1.0, 3.0], &[2, 2], &Device::Cpu)?)?;
/// let b = Tensor::from_f64(&[1.0, 2.0, 4.0, 1.0], &[2, 2], &Device::Cpu)?;
/// let config = CgConfig { max_iters: 2, rtol: None };
/// let (v, stats) = cg(|p: &Tensor| m.apply(&p.as_view()?), &b, config)?;
/// assert_eq!(stats.iterations, 2); // exact after n = 2 steps for a 2 × 2 system
/// let expected = [1.0 / 11.0, 7.0 / 11.0, 1.0, 0.0];
/// for (got, want) in v.to_vec_f64()?.iter().zip(expected) {
///     assert!((got - want).abs() < 1e-12, "{got} vs {want}");
/// }
/// # Ok::<(), emprior::Error>(())
/// ```
pub fn cg(
    matvec: impl FnMut(&Tensor) -> Result<Tensor>,
    b: &Tensor,
    config: CgConfig,
) -> Result<(Tensor, CgStats)> {
    cg_checked(matvec, b, config, DEFAULT_CHECK_EVERY)
}

/// [`cg`] with the tolerance read on the host every `check_every` iterations (0: never; the
/// solve runs `max_iters` iterations and reads nothing back, each row still stopping on the
/// device where it meets the tolerance).
pub fn cg_checked(
    matvec: impl FnMut(&Tensor) -> Result<Tensor>,
    b: &Tensor,
    config: CgConfig,
    check_every: usize,
) -> Result<(Tensor, CgStats)> {
    cg_floored(matvec, b, config, check_every, false, 0.0)
}

/// [`cg_checked`] that also reports the largest relative residual of the rows when the solve
/// ends (`CgStats::final_relative_residual`): one more residual update and one host
/// synchronisation per solve, for diagnostics. The solution is the same bits.
pub fn cg_measured(
    matvec: impl FnMut(&Tensor) -> Result<Tensor>,
    b: &Tensor,
    config: CgConfig,
    check_every: usize,
) -> Result<(Tensor, CgStats)> {
    cg_floored(matvec, b, config, check_every, true, 0.0)
}

/// The largest sqrt(rr / bn) over rows (0 for a row with b = 0).
fn worst_ratio(rr: &[f64], bn: &[f64]) -> f64 {
    rr.iter()
        .zip(bn)
        .map(|(r, b)| if *b > 0.0 { (r / b).sqrt() } else { 0.0 })
        .fold(0.0, f64::max)
}

/// Whether every row meets the tolerance as [`step_sizes`] decides it on the device
/// (rr <= tol² · ||b||² in the tensors' precision), so that no row moves from here on.
fn all_converged(rr: &[f64], bn: &[f64], tol2: f64, dtype: crate::tensor::DType) -> bool {
    rr.iter().zip(bn).all(|(&r, &b)| match dtype {
        crate::tensor::DType::F64 => r <= tol2 * b,
        _ => (r as f32) <= (tol2 as f32) * (b as f32),
    })
}

/// [`cg_checked`] (or, with `measure`, [`cg_measured`]) that also stops a row at a direction
/// whose curvature pᵀMp is at most `min_curvature`·pᵀp (module notes). For M = Σ_y + A V Aᵀ with
/// V positive semi-definite, pᵀMp >= λ_min(Σ_y)·pᵀp, so a floor below λ_min(Σ_y) only stops rows
/// whose V is not. `min_curvature` = 0 (what the other entry points use) stops rows at
/// non-positive curvature only.
pub fn cg_floored(
    mut matvec: impl FnMut(&Tensor) -> Result<Tensor>,
    b: &Tensor,
    config: CgConfig,
    check_every: usize,
    measure: bool,
    min_curvature: f64,
) -> Result<(Tensor, CgStats)> {
    let rows = b.shape()[0];
    let (dtype, device) = (b.dtype(), b.device());
    let mut ones = Tensor::uninit(&[rows], dtype, &device)?;
    crate::ops::fill(&mut ones, 1.0)?;
    let mut x = Tensor::zeros(b.shape(), dtype, &device)?;
    let mut r = b.as_view()?.to_tensor()?;
    let mut p = b.as_view()?.to_tensor()?;
    let mut rr = row_dot(&r, &r)?;
    // Decided per row on the device; read on the host only with checks.
    let tol = config.rtol;
    let host_checks = tol.is_some() && check_every > 0;
    // ||b||^2 per row stays on the device until the first check needs it.
    let b_norm2 = match tol.is_some() || measure {
        true => Some(rr.as_view()?.to_tensor()?),
        false => None,
    };
    let tol2 = tol.map_or(0.0, |t| t * t);
    let mut b_norm2_host: Option<Vec<f64>> = None;
    let mut stats = CgStats::default();
    for it in 1..=config.max_iters {
        let ap = matvec(&p)?;
        let pap = row_dot(&p, &ap)?;
        // pᵀp only matters against a positive floor (0·pᵀp is 0 whatever it is).
        let pp = match min_curvature > 0.0 {
            true => Some(row_dot(&p, &p)?),
            false => None,
        };
        let bn = match (tol, &b_norm2) {
            (Some(_), Some(bn)) => bn,
            _ => &rr,
        };
        let (alpha, keep) = step_sizes(&rr, &pap, pp.as_ref().unwrap_or(&pap), bn, tol2, min_curvature)?;
        let neg_alpha = scale(&alpha, -1.0)?;
        let mut x_next = Tensor::uninit(x.shape(), dtype, &device)?;
        scale_rows_add_into(&x, &ones, &p, &alpha, &mut x_next)?;
        x = x_next;
        stats.iterations = it;
        if it == config.max_iters && !measure {
            break; // the last iteration needs neither r nor p
        }
        let mut r_next = Tensor::uninit(r.shape(), dtype, &device)?;
        // r - alpha Ap, or 0 for a row stopped at bad curvature (its alpha is 0 too).
        scale_rows_add_into(&r, &keep, &ap, &neg_alpha, &mut r_next)?;
        r = r_next;
        let rr_next = row_dot(&r, &r)?;
        if it == config.max_iters {
            if let Some(bn) = &b_norm2 {
                let bn = match &mut b_norm2_host {
                    Some(v) => v,
                    slot => slot.insert(bn.as_view()?.to_vec_f64()?),
                };
                stats.final_relative_residual = Some(worst_ratio(&rr_next.as_view()?.to_vec_f64()?, bn));
            }
            break;
        }
        if let (Some(bn), true) = (&b_norm2, host_checks) {
            if it % check_every == 0 {
                let bn = match &mut b_norm2_host {
                    Some(v) => v,
                    slot => slot.insert(bn.as_view()?.to_vec_f64()?),
                };
                let rr_host = rr_next.as_view()?.to_vec_f64()?;
                let worst = worst_ratio(&rr_host, bn);
                stats.worst_relative_residual = Some(worst);
                // Stop exactly when every row is frozen on the device, so a solve that never
                // reads gives the same bits.
                if all_converged(&rr_host, bn, tol2, dtype) {
                    if measure {
                        stats.final_relative_residual = Some(worst);
                    }
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

/// CG's step size per row and whether the row goes on, `(alpha, keep)`: alpha = rr / pAp and
/// keep = 1, except where the row has converged (rr <= tol2 * bn: alpha 0, keep 1, it stays
/// put) or meets bad curvature (pAp <= floor * pp, which includes pAp <= 0 and p = 0: alpha 0,
/// keep 0, its residual is to be zeroed). kernels/cg.cu; the CPU body gives the same bits.
pub fn step_sizes(
    rr: &Tensor,
    pap: &Tensor,
    pp: &Tensor,
    bn: &Tensor,
    tol2: f64,
    floor: f64,
) -> Result<(Tensor, Tensor)> {
    let (rv, pv, qv, bv) = (rr.as_view()?, pap.as_view()?, pp.as_view()?, bn.as_view()?);
    one_device("cg::step_sizes", &[&rv, &pv, &qv, &bv], &[])?;
    if pv.shape() != rv.shape() || qv.shape() != rv.shape() || bv.shape() != rv.shape() {
        return Err(Error::shape(
            "cg::step_sizes",
            "pAp, pp and ||b||^2",
            rv.shape(),
            (pv.shape(), qv.shape(), bv.shape()),
        ));
    }
    let mut alpha = Tensor::uninit(rv.shape(), rv.dtype(), &rv.device())?;
    let mut keep = Tensor::uninit(rv.shape(), rv.dtype(), &rv.device())?;
    {
        let (mut av, mut kv) = (alpha.as_view_mut()?, keep.as_view_mut()?);
        let n = rv.numel();
        struct Rows<'a, T> {
            rr: &'a [T],
            pap: &'a [T],
            pp: &'a [T],
            bn: &'a [T],
        }
        fn host<T: crate::real::Real>(x: Rows<T>, tol2: T, floor: T, alpha: &mut [T], keep: &mut [T]) {
            for (i, (a, k)) in alpha.iter_mut().zip(keep.iter_mut()).enumerate() {
                let converged = x.rr[i] <= tol2 * x.bn[i];
                let flat = x.pap[i] <= floor * x.pp[i];
                *a = if converged || flat {
                    T::ZERO
                } else {
                    x.rr[i] / x.pap[i]
                };
                *k = if !converged && flat { T::ZERO } else { T::ONE };
            }
        }
        match (&rv.data, &pv.data, &qv.data, &bv.data, &mut av.data, &mut kv.data) {
            (
                Data::F32(rr),
                Data::F32(pap),
                Data::F32(pp),
                Data::F32(bn),
                DataMut::F32(a),
                DataMut::F32(k),
            ) => host(Rows { rr, pap, pp, bn }, tol2 as f32, floor as f32, a, k),
            (
                Data::F64(rr),
                Data::F64(pap),
                Data::F64(pp),
                Data::F64(bn),
                DataMut::F64(a),
                DataMut::F64(k),
            ) => host(Rows { rr, pap, pp, bn }, tol2, floor, a, k),
            (
                Data::Cuda(rr, dev),
                Data::Cuda(pap, _),
                Data::Cuda(pp, _),
                Data::Cuda(bn, _),
                DataMut::Cuda(a, _),
                DataMut::Cuda(k, _),
            ) => {
                // SAFETY: all six views hold n values (shapes checked above; alpha and keep made
                // with rr's shape).
                unsafe {
                    dev.kernels().cg_step_size_f32(
                        grid_stride(dev, n),
                        rr,
                        pap,
                        pp,
                        bn,
                        tol2 as f32,
                        floor as f32,
                        a,
                        k,
                        n as i64,
                    )
                }?;
            }
            _ => return Err(mismatch("cg::step_sizes", &[&rv, &pv, &qv, &bv], &[])),
        }
    }
    Ok((alpha, keep))
}
