//! The variance-exploding schedule with log-linear sigma (method.md §2.1), the sampler's time
//! grid, and training times t ~ Beta(3, 3).

use crate::ops::Philox;

/// sigma(t) = exp((1 - t) ln sigma_min + t ln sigma_max), t in [0, 1].
///
/// ```
/// use emprior::diffusion::VeSchedule;
///
/// let s = VeSchedule::new(1e-3, 1e2);
/// assert!((s.sigma(0.0) - 1e-3).abs() < 1e-12);
/// assert!((s.sigma(1.0) - 1e2).abs() < 1e-9);
/// // Log-linear: the midpoint is the geometric mean √(σ_min σ_max).
/// assert!((s.sigma(0.5) - 0.1f64.sqrt()).abs() < 1e-12);
/// // A 4-step sampler visits 5 levels, from σ_max down to σ_min.
/// let grid = s.grid(4);
/// assert_eq!(grid.len(), 5);
/// assert!((grid[0] - 1e2).abs() < 1e-9 && (grid[4] - 1e-3).abs() < 1e-12);
/// assert!(VeSchedule::checked(1.0, 0.5).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VeSchedule {
    /// σ at t = 0, the smallest noise level (a in method.md §2.1; 1e-3 in the paper).
    pub sigma_min: f64,
    /// σ at t = 1, the largest noise level (b; 1e2 for CIFAR-10 and MRI, 1e1 for the manifold).
    pub sigma_max: f64,
}

impl VeSchedule {
    /// The schedule from `sigma_min` to `sigma_max`, unchecked ([`VeSchedule::checked`] is for
    /// values from a user).
    pub fn new(sigma_min: f64, sigma_max: f64) -> Self {
        VeSchedule { sigma_min, sigma_max }
    }

    /// [`VeSchedule::new`] for values from a user: both positive and finite, the minimum below
    /// the maximum, or an error that says which.
    pub fn checked(sigma_min: f64, sigma_max: f64) -> crate::error::Result<Self> {
        let positive = |v: f64| v > 0.0 && v.is_finite();
        if !positive(sigma_min) || !positive(sigma_max) || sigma_min >= sigma_max {
            return Err(crate::error::Error::Other(format!(
                "the noise range sigma_min = {sigma_min}, sigma_max = {sigma_max} must hold two positive, finite values with sigma_min < sigma_max (1e-3 and 1e2 are usual)"
            )));
        }
        Ok(VeSchedule { sigma_min, sigma_max })
    }

    /// σ(t) = exp((1 − t) ln σ_min + t ln σ_max); `t` is not clamped to `[0, 1]`.
    pub fn sigma(&self, t: f64) -> f64 {
        ((1.0 - t) * self.sigma_min.ln() + t * self.sigma_max.ln()).exp()
    }

    /// sigma at t_k = 1, 1 - 1/S, ..., 0: the S + 1 noise levels an S-step sampler visits
    /// (log-uniform from sigma_max down to sigma_min).
    pub fn grid(&self, steps: usize) -> Vec<f64> {
        (0..=steps)
            .map(|k| self.sigma(1.0 - k as f64 / steps as f64))
            .collect()
    }
}

/// `n` draws of Beta(3, 3), elements `offset ..` of the stream: the third smallest of five
/// uniforms (the k-th order statistic of n uniforms is Beta(k, n + 1 - k)), so the draw is exact
/// and reproducible on any device.
pub fn beta33(rng: Philox, offset: u64, n: usize) -> Vec<f64> {
    let mut u = vec![0.0f32; 5 * n];
    rng.fill_uniform(5 * offset, &mut u);
    u.chunks_exact_mut(5)
        .map(|c| {
            c.sort_by(|a, b| a.total_cmp(b));
            c[2] as f64
        })
        .collect()
}

/// The noise levels of `out.numel()` training rows whose first is row `first_row` of `rng`'s
/// stream: sigma = `schedule.sigma(t)`, t ~ Beta(3, 3) as [`beta33`] draws it, written to `out`
/// (`[n]`, f32 or f64) on its device. With `rng` moving with a step clock
/// ([`Philox::moving`], one batch of rows per step) a GPU draws the step's rows where the kernel
/// runs (kernels/rng.cu), so a training step takes no noise level from the host.
pub fn train_sigmas_into(
    rng: Philox,
    first_row: u64,
    schedule: &VeSchedule,
    out: &mut crate::tensor::ViewMut,
) -> crate::error::Result<()> {
    use crate::real::Real;
    use crate::tensor::DataMut;
    crate::device::note_op();
    let n = out.numel();
    if out.shape().len() != 1 {
        return Err(crate::error::Error::shape(
            "train_sigmas",
            "out",
            "[n]",
            out.shape(),
        ));
    }
    let (ln_min, ln_max) = (schedule.sigma_min.ln(), schedule.sigma_max.ln());
    match &mut out.data {
        DataMut::Cuda(o, dev) => {
            if n == 0 {
                return Ok(());
            }
            let (clock, sps, ops) = rng.clock_args();
            // SAFETY: out holds n values, one thread per row; a clock address is a live clock's.
            unsafe {
                dev.kernels().rng_train_sigmas_f32(
                    crate::device::launch::grid_stride(dev, n),
                    o,
                    n as i64,
                    rng.seed,
                    rng.stream,
                    first_row,
                    clock,
                    sps,
                    ops,
                    ln_min,
                    ln_max,
                )
            }
        }
        _ => {
            let (fixed, first) = rng.at_step(first_row);
            let sigmas: Vec<f64> = beta33(fixed, first, n)
                .into_iter()
                .map(|t| schedule.sigma(t))
                .collect();
            host_real!(out, T => {
                for (o, &s) in out.cpu_mut::<T>()?.iter_mut().zip(&sigmas) {
                    *o = T::from_f64(s);
                }
                Ok(())
            })
        }
    }
}
