//! Training a denoiser by denoising score matching: Adam with clipping and EMA over the flat
//! parameters, sigma from Beta(3, 3) training times, noise from Philox, so a step is a pure
//! function of (parameters, optimizer state, batch, seed, step index).
//!
//! A step never waits for the device: its loss and gradient norm go to the training log
//! ([`log::StepLog`]) on the device, and the host reads them with [`Trainer::take_stats`] at its
//! log interval, which is also where a non-finite step is reported.

pub mod adam;
pub mod augment;
pub mod log;

pub use adam::{Adam, AdamConfig, LrSchedule, StepStats};
pub use log::{StepLog, TrainStep};

use crate::diffusion::loss::{dsm_loss_into, dsm_loss_part_into};
use crate::diffusion::Network;
use crate::diffusion::{beta33, Denoiser, VeSchedule};
use crate::error::Result;
use crate::nn::Mode;
use crate::ops::parallel::map_parts;
use crate::ops::{axpy, fill, Philox};
use crate::tensor::{numel, AsView, AsViewMut, DType, Tensor, View};

/// Philox streams of a training run (per seed).
const STREAM_TIMES: u64 = 1;
const STREAM_NOISE: u64 = 2;
/// Dropout uses stream STREAM_DROPOUT + step.
const STREAM_DROPOUT: u64 = 1 << 32;

/// One training run's state.
pub struct Trainer {
    /// The preconditioned denoiser being trained.
    pub denoiser: Denoiser,
    /// Its flat parameters `[P]` (the raw weights, not the EMA).
    pub params: Tensor,
    /// The optimizer state (moments, EMA, step count).
    pub adam: Adam,
    /// The VE noise schedule that maps training times to noise levels.
    pub schedule: VeSchedule,
    /// Seeds the step's training times, noise and dropout (with the step index).
    pub seed: u64,
    /// On the CPU, a step's batch runs in parts of this many rows, one per core at a time,
    /// each small enough to keep its activations in cache (None: whole). Set from the network
    /// by [`Trainer::new`]; the GPU always takes the batch whole.
    pub cpu_part_rows: Option<usize>,
    grads: Tensor,
    log: StepLog,
}

/// Parts per core in one wave of a CPU training step: a wave's gradients (one per part, the
/// network's size each) are live together.
pub const CPU_PARTS_PER_CORE: usize = 2;

/// Rows per CPU part of a training batch, by network, measured on 2 cores: the manifold M-step
/// (TimeMLP, batch 1024, 1,000 steps) 10.3 s whole, 9.1 s in parts of 256, 9.5 s of 128, 9.7 s
/// of 512; the CIFAR-10 quick M-step (U-Net, batch 32, 3 epochs) 11.4 s whole, 5.5-6.0 s in
/// parts of 4, 6.1 s of 2, 6.3 s of 8, 5.9 s of 16.
pub fn cpu_part_rows(net: &Network) -> Option<usize> {
    Some(match net {
        Network::Mlp(_) => 256,
        Network::UNet(_) => 4,
    })
}

impl Trainer {
    /// A run from `params` (checked against the denoiser's layout) with fresh Adam state; an
    /// error when the layout or `config` is invalid.
    pub fn new(
        denoiser: Denoiser,
        params: Tensor,
        config: AdamConfig,
        schedule: VeSchedule,
        seed: u64,
    ) -> Result<Self> {
        denoiser.layout().check(&params)?;
        let grads = Tensor::zeros(params.shape(), params.dtype(), &params.device())?;
        let adam = Adam::new(config, &params)?;
        let log = StepLog::new(params.dtype(), &params.device())?;
        Ok(Trainer {
            cpu_part_rows: cpu_part_rows(&denoiser.net),
            denoiser,
            params,
            adam,
            schedule,
            seed,
            grads,
            log,
        })
    }

    /// One Adam step on the batch `x` (its first axis is the batch). Reads nothing back from
    /// the device: the step's loss and gradient norm wait in the log for [`Trainer::take_stats`].
    pub fn step(&mut self, x: &View) -> Result<()> {
        let step = self.adam.steps();
        let b = x.shape()[0];
        let per = numel(x.shape()) as u64;
        let sigmas: Vec<f64> = beta33(Philox::new(self.seed, STREAM_TIMES), step * b as u64, b)
            .into_iter()
            .map(|t| self.schedule.sigma(t))
            .collect();
        let mut z = Tensor::uninit(x.shape(), x.dtype(), &x.device())?;
        Philox::new(self.seed, STREAM_NOISE).normal_into(&mut z, step * per)?;
        let rng = Philox::new(self.seed, STREAM_DROPOUT + step);
        let slot = self.log.begin(step, self.adam.config.lr.at(step))?;
        let part_rows = self.cpu_part_rows.filter(|&p| !x.device().is_cuda() && p < b);
        let (den, params, grads) = (&self.denoiser, &self.params, &mut self.grads);
        match part_rows {
            None => {
                fill(grads, 0.0)?;
                let mode = Mode::Train { rng, first_row: 0 };
                self.log.with_loss(slot, |loss| {
                    let mut g = grads.as_view_mut()?;
                    dsm_loss_into(
                        den,
                        &params.as_view()?,
                        x,
                        &sigmas,
                        &z.as_view()?,
                        mode,
                        Some(&mut g),
                        loss,
                    )
                })?;
            }
            Some(part_rows) => {
                // On the CPU: row parts on the cores, each with its own gradient, added in part
                // order (the same bits on any number of threads; the sum's order, hence the last
                // bits, differ from one piece's). In waves of a few parts per core, so a large
                // batch holds a few gradients at once, not one per part.
                let (zv, row) = (z.as_view()?, per as usize / b);
                let wave_rows = part_rows * CPU_PARTS_PER_CORE * rayon::current_num_threads();
                fill(grads, 0.0)?;
                let mut losses = Vec::with_capacity(b.div_ceil(part_rows));
                for wave in (0..b).step_by(wave_rows) {
                    let rows = wave_rows.min(b - wave);
                    let parts = map_parts(rows, part_rows, |r| -> Result<(Tensor, Tensor)> {
                        let r = wave + r.start..wave + r.end;
                        let n = r.len();
                        let mut shape = x.shape().to_vec();
                        shape[0] = n;
                        let (xp, zp) = (x.sub(r.start * row, &shape)?, zv.sub(r.start * row, &shape)?);
                        let mut g = Tensor::zeros(params.shape(), params.dtype(), &params.device())?;
                        let mut loss = Tensor::zeros(&[], params.dtype(), &params.device())?;
                        let mode = Mode::Train {
                            rng,
                            first_row: r.start as u64,
                        };
                        dsm_loss_part_into(
                            den,
                            &params.as_view()?,
                            &xp,
                            &sigmas[r],
                            &zp,
                            mode,
                            Some(&mut g.as_view_mut()?),
                            &mut loss.as_view_mut()?,
                            b,
                        )?;
                        Ok((g, loss))
                    });
                    for part in parts {
                        let (g, loss) = part?;
                        axpy(1.0, &g, grads)?;
                        losses.push(loss);
                    }
                }
                self.log.with_loss(slot, |total| {
                    fill(total, 0.0)?;
                    losses.iter().try_for_each(|l| axpy(1.0, l, total))
                })?;
            }
        }
        self.adam
            .update_logged(&mut self.params, &self.grads, &mut self.log, slot)
    }

    /// The steps since the last call (loss, gradient norm, learning rate), read from the device
    /// in one host synchronisation; none when no step ran. Fails, naming the first bad step, when
    /// a step's loss or gradient norm was not finite (the updates stopped there: the parameters
    /// are those of the last good step).
    pub fn take_stats(&mut self) -> Result<Vec<TrainStep>> {
        self.log.take()
    }

    /// Steps waiting in the log.
    pub fn pending_stats(&self) -> usize {
        self.log.len()
    }

    /// The weights to sample with: the EMA copy when kept, else the parameters.
    pub fn weights(&self) -> &Tensor {
        self.adam.ema().unwrap_or(&self.params)
    }

    /// The dtype of the parameters (and of every step's arithmetic).
    pub fn dtype(&self) -> DType {
        self.params.dtype()
    }
}
