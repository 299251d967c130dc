//! Adam (optax semantics: bias-corrected moments, update m_hat / (sqrt(v_hat) + eps)) after
//! global-norm gradient clipping, with constant or linear learning-rate schedules and an EMA of
//! the parameters, all in one pass over the flat buffers (kernels/adam.cu on the GPU).

use super::log::{finish_norm, StepLog, GATE};
use crate::device::launch::{self, grid_stride};
use crate::device::params;
use crate::device::StepClock;
use crate::error::{Error, Result};
use crate::ops::precision::to_bf16;
use crate::ops::reduce::square_partials;
use crate::ops::{mismatch, one_device};
use crate::real::Real;
use crate::tensor::{AsView, AsViewMut, DType, Data, DataMut, Tensor};

/// Threads of the one-block norm finish (REDUCE_THREADS in kernels/common.cuh).
const REDUCE_THREADS: u32 = 256;

/// lr(step) for step = 0, 1, ... (method.md §8.3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrSchedule {
    /// The same learning rate at every step.
    Constant(f64),
    /// lr_init + (lr_end - lr_init) * min((step + 1) / (steps + 1), 1).
    Linear {
        /// lr_init: the rate the decay starts from (positive).
        init: f64,
        /// lr_end: the rate reached at step `steps` and kept after it (non-negative).
        end: f64,
        /// The number of steps the decay spans.
        steps: u64,
    },
}

impl LrSchedule {
    /// The learning rate of update `step` (0 for the first).
    pub fn at(&self, step: u64) -> f64 {
        match *self {
            LrSchedule::Constant(lr) => lr,
            LrSchedule::Linear { init, end, steps } => {
                init + (end - init) * ((step + 1) as f64 / (steps + 1) as f64).min(1.0)
            }
        }
    }
}

/// Adam's hyper-parameters, clipping and EMA ([`AdamConfig::new`] gives optax's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    /// The learning rate by step.
    pub lr: LrSchedule,
    /// Decay of the first-moment average, in `[0, 1)` (default 0.9).
    pub beta1: f64,
    /// Decay of the second-moment average, in `[0, 1)` (default 0.999).
    pub beta2: f64,
    /// Added to sqrt(v_hat) in the update's denominator (positive; default 1e-8).
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

impl AdamConfig {
    /// Every hyper-parameter in its valid range, or an error that names the value and the range
    /// (checked by [`Adam::new`], before any step).
    pub fn validate(&self) -> Result<()> {
        let range = |name: &str, v: f64, ok: bool, want: &str| -> Result<()> {
            if ok && v.is_finite() {
                Ok(())
            } else {
                Err(crate::error::Error::Other(format!(
                    "Adam: {name} = {v} must be {want}"
                )))
            }
        };
        range("beta1", self.beta1, (0.0..1.0).contains(&self.beta1), "in [0, 1)")?;
        range("beta2", self.beta2, (0.0..1.0).contains(&self.beta2), "in [0, 1)")?;
        range("eps", self.eps, self.eps > 0.0, "positive")?;
        if let Some(clip) = self.clip {
            range("the clipping threshold", clip, clip > 0.0, "positive")?;
        }
        if let Some(ema) = self.ema {
            range(
                "ema",
                ema,
                (0.0..1.0).contains(&ema),
                "in [0, 1) (the EMA decay; 0.999 is usual)",
            )?;
        }
        match self.lr {
            LrSchedule::Constant(lr) => range("lr", lr, lr > 0.0, "positive")?,
            LrSchedule::Linear { init, end, .. } => {
                range("lr (start)", init, init > 0.0, "positive")?;
                range("lr (end)", end, end >= 0.0, "non-negative")?;
            }
        }
        Ok(())
    }
}

/// What one step did (Adam::update).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The global L2 norm of the gradient, before clipping.
    pub grad_norm: f64,
    /// The learning rate the step used.
    pub lr: f64,
}

/// The CPU body: the oracle for kernels/adam.cu (with `log::finish_norm`).
pub mod cpu {
    use crate::real::Real;

    /// The squared L2 norm in f64, the twin of the norm's reduction (ops::reduce::cpu::dot).
    pub fn sum_sq<T: Real>(g: &[T]) -> f64 {
        crate::ops::reduce::cpu::dot(g, g)
    }

    /// One Adam update of `p` in place, with moments `m` and `v` and the optional EMA copy:
    /// the gradient `g` is multiplied by the clipping factor `scale` first, `bias1`/`bias2` are
    /// 1 - beta^t, and the EMA moves toward the new `p` by 1 - `ema_decay`. `p_bf16`, when
    /// given, receives each new value rounded to bf16 (f32 parameters only).
    #[allow(clippy::too_many_arguments)]
    pub fn step<T: Real>(
        p: &mut [T],
        g: &[T],
        m: &mut [T],
        v: &mut [T],
        mut ema: Option<&mut [T]>,
        mut p_bf16: Option<&mut [half::bf16]>,
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
            if let Some(b) = p_bf16.as_deref_mut() {
                // f32 parameters: exact through f64, so the bits of to_bf16's rounding.
                b[i] = half::bf16::from_f32(p[i].to_f64() as f32);
            }
        }
    }
}

/// Optimizer state in the layout of the flat parameters.
pub struct Adam {
    /// The hyper-parameters every update reads.
    pub config: AdamConfig,
    m: Tensor,
    v: Tensor,
    ema: Option<Tensor>,
    /// The bf16 copy of the parameters the bf16 policy's layers read (`nn::Weights`), written
    /// by every update beside the parameters.
    bf16: Option<Tensor>,
    /// The number of updates applied, on the device: the update's learning rate and bias
    /// corrections are computed there from it, and a training step's random streams move with
    /// it ([`Adam::clock`]).
    clock: StepClock,
}

impl Adam {
    /// Fresh state (zero moments; the EMA starts at the current parameters, as every lap does).
    pub fn new(config: AdamConfig, params: &Tensor) -> Result<Self> {
        config.validate()?;
        let (shape, dtype, device) = (params.shape().to_vec(), params.dtype(), params.device());
        Ok(Adam {
            config,
            m: Tensor::zeros(&shape, dtype, &device)?,
            v: Tensor::zeros(&shape, dtype, &device)?,
            ema: match config.ema {
                Some(_) => Some(params.to_device(&device)?),
                None => None,
            },
            bf16: None,
            clock: StepClock::new(0, &device)?,
        })
    }

    /// From now on, keep a bf16 copy of `params` (f32) for the bf16 policy's layers: made here
    /// and rewritten by each update in its own pass over the parameters, so the weights are
    /// cast once per step. `params` must be the buffer later updates receive.
    pub fn keep_bf16_copy(&mut self, params: &Tensor) -> Result<()> {
        if params.dtype() != DType::F32 {
            return Err(Error::Other(format!(
                "adam: a bf16 copy is kept of f32 parameters, not {:?}",
                params.dtype()
            )));
        }
        if params.shape() != self.m.shape() {
            return Err(Error::shape("adam", "parameters", self.m.shape(), params.shape()));
        }
        self.bf16 = Some(to_bf16(params)?);
        Ok(())
    }

    /// The bf16 copy of the parameters, when kept ([`Adam::keep_bf16_copy`]).
    pub fn bf16_copy(&self) -> Option<&Tensor> {
        self.bf16.as_ref()
    }

    /// The number of updates applied.
    pub fn steps(&self) -> u64 {
        self.clock.step()
    }

    /// The clock, for a replayed step that advanced its device value (or an abandoned capture).
    pub(crate) fn clock_mut(&mut self) -> &mut StepClock {
        &mut self.clock
    }

    /// The step clock the updates advance: a training step's random streams move with it
    /// ([`crate::ops::Philox::moving`]).
    pub fn clock(&self) -> &StepClock {
        &self.clock
    }

    /// The EMA copy of the parameters, if kept.
    pub fn ema(&self) -> Option<&Tensor> {
        self.ema.as_ref()
    }

    /// Moments and EMA, for checkpoints.
    pub fn moments(&self) -> (&Tensor, &Tensor) {
        (&self.m, &self.v)
    }

    /// One update of `params` with `grads` (clip, Adam, EMA), reading the gradient norm back
    /// (one host synchronisation): for tests and one-off use. Training steps use
    /// [`Adam::update_logged`], which reads nothing. A non-finite gradient norm is an error and
    /// leaves the parameters, the moments and the step count alone.
    pub fn update(&mut self, params: &mut Tensor, grads: &Tensor) -> Result<StepStats> {
        let step = self.steps();
        let lr = self.config.lr.at(step);
        // A fresh log: the record's loss is a finite zero, so only the gradient can flag it.
        let mut log = StepLog::new(params.dtype(), &params.device())?;
        let slot = log.begin(step, lr)?;
        self.update_logged(params, grads, &mut log, slot)?;
        match log.take() {
            Ok(records) => Ok(StepStats {
                grad_norm: records[0].grad_norm,
                lr,
            }),
            Err(e) => {
                // The skipped update still advanced the clock: put it back.
                self.clock = StepClock::new(step, &params.device())?;
                Err(Error::Other(format!("adam: {e}")))
            }
        }
    }

    /// One update with no host synchronisation: the gradient norm is reduced on the device and
    /// filed with the step's loss (already written: [`StepLog::with_loss`]) as record `slot` of
    /// `log`, the newest open one; the log's flag is raised when that loss or the norm is not
    /// finite, and the update reads the clipping norm, its learning rate and bias corrections
    /// from the log (computed there from the step clock, which then advances), skipping itself
    /// entirely once the flag is up. Nothing in it varies from step to step on the host side,
    /// so a captured step replays as the next one.
    pub fn update_logged(
        &mut self,
        params: &mut Tensor,
        grads: &Tensor,
        log: &mut StepLog,
        slot: usize,
    ) -> Result<()> {
        let n = params.numel();
        if grads.shape() != params.shape() || params.shape() != [n] {
            return Err(Error::shape("adam", "gradients", params.shape(), grads.shape()));
        }
        if params.shape() != self.m.shape() {
            return Err(Error::shape(
                "adam",
                "parameters (the state's)",
                self.m.shape(),
                params.shape(),
            ));
        }
        log.check_slot(slot)?;
        if slot + 1 != log.len() {
            return Err(Error::Other(format!(
                "adam: record {slot} is not the newest open one ({} open)",
                log.len()
            )));
        }
        // The copy has the state's length (keep_bf16_copy), checked against params above.
        if let Some(b) = self
            .bf16
            .as_ref()
            .filter(|b| !b.device().same_as(&params.device()))
        {
            return Err(Error::Other(format!(
                "adam: the bf16 copy is on {} and the parameters on {} (keep_bf16_copy with them)",
                b.device(),
                params.device()
            )));
        }
        let c = self.config;
        if let Some(max) = c.clip.filter(|m| !(*m > 0.0 && m.is_finite())) {
            return Err(Error::Other(format!(
                "adam: the clipping threshold {max} must be a positive number"
            )));
        }
        // The EMA runs only when both the config asks for it and the copy exists.
        let ema_decay = c.ema.filter(|_| self.ema.is_some());
        let t = self.steps() + 1;
        let lr = c.lr.at(self.steps());
        let capacity = log.capacity();
        let (bias1, bias2) = (1.0 - c.beta1.powi(t as i32), 1.0 - c.beta2.powi(t as i32));
        let decay = ema_decay.unwrap_or(0.0);
        {
            let (mut pv, gv) = (params.as_view_mut()?, grads.as_view()?);
            let (mut mv, mut vv) = (self.m.as_view_mut()?, self.v.as_view_mut()?);
            let mut lv = log.buffer_mut().as_view_mut()?;
            let mut ev = match (&mut self.ema, ema_decay) {
                (Some(e), Some(_)) => Some(e.as_view_mut()?),
                _ => None,
            };
            match &ev {
                Some(e) => one_device("adam", &[&gv], &[&pv, &mv, &vv, &lv, e])?,
                None => one_device("adam", &[&gv], &[&pv, &mv, &vv, &lv])?,
            }
            // The clipping scale from the gate the norm's finish left in the log, in f64 from
            // the stored value as the CPU always computed it; None: the update is skipped.
            fn host_scale<T: Real>(
                g: &[T],
                log: &mut [T],
                capacity: usize,
                [lr, bias1, bias2]: [f64; 3],
                clip: Option<f64>,
            ) -> Option<f64> {
                finish_norm(log, cpu::sum_sq(g), capacity, lr, bias1, bias2);
                let gate = log[GATE].to_f64();
                if !gate.is_finite() {
                    return None;
                }
                Some(match clip {
                    Some(max) if gate > max => max / gate,
                    _ => 1.0,
                })
            }
            match (&mut pv.data, &gv.data, &mut mv.data, &mut vv.data, &mut lv.data) {
                (DataMut::F32(p), Data::F32(g), DataMut::F32(m), DataMut::F32(v), DataMut::F32(l)) => {
                    let e = match ev.as_mut() {
                        Some(e) => Some(e.cpu_mut::<f32>()?),
                        None => None,
                    };
                    let b = self.bf16.as_mut().map(|b| b.cpu_bf16_mut()).transpose()?;
                    if let Some(scale) = host_scale(g, l, capacity, [lr, bias1, bias2], c.clip) {
                        cpu::step(
                            p, g, m, v, e, b, scale, lr, c.beta1, c.beta2, c.eps, bias1, bias2, decay,
                        )
                    }
                }
                (DataMut::F64(p), Data::F64(g), DataMut::F64(m), DataMut::F64(v), DataMut::F64(l)) => {
                    let e = match ev.as_mut() {
                        Some(e) => Some(e.cpu_mut::<f64>()?),
                        None => None,
                    };
                    if let Some(scale) = host_scale(g, l, capacity, [lr, bias1, bias2], c.clip) {
                        cpu::step(
                            p, g, m, v, e, None, scale, lr, c.beta1, c.beta2, c.eps, bias1, bias2, decay,
                        )
                    }
                }
                (
                    DataMut::Cuda(p, dev),
                    Data::Cuda(g, _),
                    DataMut::Cuda(m, _),
                    DataMut::Cuda(v, _),
                    DataMut::Cuda(l, _),
                ) => {
                    let kp = params::AdamKernelParams {
                        beta1: c.beta1 as f32,
                        beta2: c.beta2 as f32,
                        one_minus_beta1: (1.0 - c.beta1) as f32,
                        one_minus_beta2: (1.0 - c.beta2) as f32,
                        eps: c.eps as f32,
                        max_norm: c.clip.unwrap_or(0.0) as f32,
                        one_minus_decay: (1.0 - decay) as f32,
                        use_ema: ev.is_some() as i32,
                    };
                    // Without an EMA copy the kernel gets a null pointer and use_ema = 0.
                    let ema = match ev.as_mut().map(|e| &mut e.data) {
                        Some(DataMut::Cuda(e, _)) => Some(e),
                        _ => None,
                    };
                    let mut bf16 = self.bf16.as_mut().map(|b| b.cuda_bf16_mut()).transpose()?;
                    let (partials, count) = square_partials(dev, g, n)?;
                    // SAFETY: the buffer holds `count` f64 partials, written above in stream order.
                    let pv = unsafe { partials.slice().transmute::<f64>(count) }
                        .expect("sized by square_partials");
                    let schedule = match c.lr {
                        LrSchedule::Constant(lr) => params::AdamSchedule {
                            lr_init: lr,
                            lr_end: lr,
                            beta1: c.beta1,
                            beta2: c.beta2,
                            lr_steps: 0,
                            linear: 0,
                        },
                        LrSchedule::Linear { init, end, steps } => params::AdamSchedule {
                            lr_init: init,
                            lr_end: end,
                            beta1: c.beta1,
                            beta2: c.beta2,
                            lr_steps: steps,
                            linear: 1,
                        },
                    };
                    let mut clock = self
                        .clock
                        .cuda_mut()
                        .ok_or_else(|| Error::Other("adam: the step clock is not on the GPU".into()))?;
                    let k = dev.kernels();
                    let one_block = launch::blocks((1, 1, 1), REDUCE_THREADS);
                    // SAFETY: one block finishes the norm into the log's next record (the kernel
                    // checks it against the capacity) and advances the clock (one u64); then p,
                    // g, m, v (and the EMA copy) share the flat layout of n values (checked
                    // above) and the header is the log's first values.
                    unsafe {
                        k.adam_norm_finish_f32(
                            one_block,
                            &pv,
                            count as i32,
                            l,
                            capacity as i64,
                            &mut clock,
                            schedule,
                        )?;
                        let header = l.slice(0..super::log::HEADER);
                        k.adam_step_f32(
                            grid_stride(dev, n),
                            p,
                            g,
                            m,
                            v,
                            ema,
                            bf16.as_mut(),
                            &header,
                            n as i64,
                            kp,
                        )
                    }?;
                }
                _ => return Err(mismatch("adam", &[&gv], &[])),
            }
        }
        self.clock.advanced();
        Ok(())
    }
}
