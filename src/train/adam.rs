//! Adam (optax semantics: bias-corrected moments, update m_hat / (sqrt(v_hat) + eps)) after
//! global-norm gradient clipping, with constant or linear learning-rate schedules and an EMA of
//! the parameters, all in one pass over the flat buffers (kernels/adam.cu on the GPU).

use crate::device::launch::grid_stride;
use crate::device::params;

use crate::error::{Error, Result};
use crate::ops::{mismatch, one_device, row_norm};
use crate::tensor::{AsView, AsViewMut, Data, DataMut, Tensor};

/// lr(step) for step = 0, 1, ... (method.md §8.3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrSchedule {
    Constant(f64),
    /// lr_init + (lr_end - lr_init) * min((step + 1) / (steps + 1), 1).
    Linear {
        init: f64,
        end: f64,
        steps: u64,
    },
}

impl LrSchedule {
    pub fn at(&self, step: u64) -> f64 {
        match *self {
            LrSchedule::Constant(lr) => lr,
            LrSchedule::Linear { init, end, steps } => {
                init + (end - init) * ((step + 1) as f64 / (steps + 1) as f64).min(1.0)
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: LrSchedule,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global-norm clipping threshold (the paper: 1.0); None disables it.
    pub clip: Option<f64>,
    /// EMA decay (0.9999 for CIFAR-10, 0.999 for MRI); None keeps no average.
    pub ema: Option<f64>,
}

impl AdamConfig {
    /// optax's defaults with the paper's clipping.
    pub fn new(lr: LrSchedule) -> Self {
        AdamConfig {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip: Some(1.0),
            ema: None,
        }
    }
}

/// What one step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub grad_norm: f64,
    pub lr: f64,
}

/// The CPU body: the oracle for kernels/adam.cu.
pub mod cpu {
    use crate::real::Real;

    #[allow(clippy::too_many_arguments)]
    pub fn step<T: Real>(
        p: &mut [T],
        g: &[T],
        m: &mut [T],
        v: &mut [T],
        mut ema: Option<&mut [T]>,
        scale: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        bias1: f64,
        bias2: f64,
        ema_decay: f64,
    ) {
        let c = |x: f64| T::from_f64(x);
        for i in 0..p.len() {
            let gi = g[i] * c(scale);
            m[i] = c(beta1) * m[i] + c(1.0 - beta1) * gi;
            v[i] = c(beta2) * v[i] + c(1.0 - beta2) * gi * gi;
            p[i] -= c(lr) * (m[i] / c(bias1)) / ((v[i] / c(bias2)).sqrt() + c(eps));
            if let Some(e) = ema.as_deref_mut() {
                e[i] += c(1.0 - ema_decay) * (p[i] - e[i]);
            }
        }
    }
}

/// Optimizer state in the layout of the flat parameters.
pub struct Adam {
    pub config: AdamConfig,
    m: Tensor,
    v: Tensor,
    ema: Option<Tensor>,
    step: u64,
}

impl Adam {
    /// Fresh state (zero moments; the EMA starts at the current parameters, as every lap does).
    pub fn new(config: AdamConfig, params: &Tensor) -> Result<Self> {
        let (shape, dtype, device) = (params.shape().to_vec(), params.dtype(), params.device());
        Ok(Adam {
            config,
            m: Tensor::zeros(&shape, dtype, &device)?,
            v: Tensor::zeros(&shape, dtype, &device)?,
            ema: match config.ema {
                Some(_) => Some(params.to_device(&device)?),
                None => None,
            },
            step: 0,
        })
    }

    /// The number of updates applied.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The EMA copy of the parameters, if kept.
    pub fn ema(&self) -> Option<&Tensor> {
        self.ema.as_ref()
    }

    /// Moments and EMA, for checkpoints.
    pub fn moments(&self) -> (&Tensor, &Tensor) {
        (&self.m, &self.v)
    }

    /// One update of `params` with `grads` (clip, Adam, EMA).
    pub fn update(&mut self, params: &mut Tensor, grads: &Tensor) -> Result<StepStats> {
        let n = params.numel();
        if grads.shape() != params.shape() || params.shape() != [n] {
            return Err(Error::shape("adam", "gradients", params.shape(), grads.shape()));
        }
        let c = self.config;
        if let Some(max) = c.clip.filter(|m| !(*m > 0.0 && m.is_finite())) {
            return Err(Error::Other(format!(
                "adam: the clipping threshold {max} must be a positive number"
            )));
        }
        // The EMA runs only when both the config asks for it and the copy exists.
        let ema_decay = c.ema.filter(|_| self.ema.is_some());
        let t = self.step + 1;
        let lr = c.lr.at(self.step);
        let (bias1, bias2) = (1.0 - c.beta1.powi(t as i32), 1.0 - c.beta2.powi(t as i32));
        let norm_t = row_norm(&grads.as_view()?.reshape(&[1, n])?)?;
        let grad_norm = match norm_t.as_view()?.data {
            Data::F64(v) => v[0],
            _ => norm_t.to_vec_f32()?[0] as f64,
        };
        if !grad_norm.is_finite() {
            return Err(Error::Other(format!(
                "adam: the gradient norm is {grad_norm} (a NaN or an overflow upstream)"
            )));
        }
        {
            let (pv, gv) = (params.as_view_mut()?, grads.as_view()?);
            let (mut pv, mut mv, mut vv) = (pv, self.m.as_view_mut()?, self.v.as_view_mut()?);
            let mut ev = match (&mut self.ema, ema_decay) {
                (Some(e), Some(_)) => Some(e.as_view_mut()?),
                _ => None,
            };
            match &ev {
                Some(e) => one_device("adam", &[&gv], &[&pv, &mv, &vv, e])?,
                None => one_device("adam", &[&gv], &[&pv, &mv, &vv])?,
            }
            let scale = match c.clip {
                Some(max) if grad_norm > max => max / grad_norm,
                _ => 1.0,
            };
            let decay = ema_decay.unwrap_or(0.0);
            match (&mut pv.data, &gv.data, &mut mv.data, &mut vv.data) {
                (DataMut::F32(p), Data::F32(g), DataMut::F32(m), DataMut::F32(v)) => {
                    let e = match ev.as_mut() {
                        Some(e) => Some(e.cpu_mut::<f32>()?),
                        None => None,
                    };
                    cpu::step(
                        p, g, m, v, e, scale, lr, c.beta1, c.beta2, c.eps, bias1, bias2, decay,
                    )
                }
                (DataMut::F64(p), Data::F64(g), DataMut::F64(m), DataMut::F64(v)) => {
                    let e = match ev.as_mut() {
                        Some(e) => Some(e.cpu_mut::<f64>()?),
                        None => None,
                    };
                    cpu::step(
                        p, g, m, v, e, scale, lr, c.beta1, c.beta2, c.eps, bias1, bias2, decay,
                    )
                }
                (DataMut::Cuda(p, dev), Data::Cuda(g, _), DataMut::Cuda(m, _), DataMut::Cuda(v, _)) => {
                    let kp = params::AdamKernelParams {
                        lr: lr as f32,
                        beta1: c.beta1 as f32,
                        beta2: c.beta2 as f32,
                        one_minus_beta1: (1.0 - c.beta1) as f32,
                        one_minus_beta2: (1.0 - c.beta2) as f32,
                        eps: c.eps as f32,
                        bias1: bias1 as f32,
                        bias2: bias2 as f32,
                        max_norm: c.clip.unwrap_or(0.0) as f32,
                        one_minus_decay: (1.0 - decay) as f32,
                        use_ema: ev.is_some() as i32,
                    };
                    let norm_view = norm_t.as_view()?;
                    let Data::Cuda(nv, _) = &norm_view.data else {
                        return Err(mismatch("adam", &[&gv], &[]));
                    };
                    // Without an EMA copy the kernel gets a null pointer and use_ema = 0.
                    let ema = match ev.as_mut().map(|e| &mut e.data) {
                        Some(DataMut::Cuda(e, _)) => Some(e),
                        _ => None,
                    };
                    // SAFETY: p, g, m, v (and the EMA copy) share the flat layout of n values
                    // (checked above); the norm is one value.
                    unsafe {
                        dev.kernels()
                            .adam_step_f32(grid_stride(dev, n), p, g, m, v, ema, nv, n as i64, kp)
                    }?;
                }
                _ => return Err(mismatch("adam", &[&gv], &[])),
            }
        }
        self.step = t;
        Ok(StepStats { grad_norm, lr })
    }
}
