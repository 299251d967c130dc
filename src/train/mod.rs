//! Training a denoiser by denoising score matching: Adam with clipping and EMA over the flat
//! parameters, sigma from Beta(3, 3) training times, noise from Philox, so a step is a pure
//! function of (parameters, optimizer state, batch, seed, step index).

pub mod adam;
pub mod augment;

pub use adam::{Adam, AdamConfig, LrSchedule, StepStats};

use crate::diffusion::loss::dsm_loss;
use crate::diffusion::{beta33, Denoiser, VeSchedule};
use crate::error::Result;
use crate::nn::Mode;
use crate::ops::{fill, Philox};
use crate::tensor::{numel, AsView, AsViewMut, DType, Tensor, View};

/// Philox streams of a training run (per seed).
const STREAM_TIMES: u64 = 1;
const STREAM_NOISE: u64 = 2;
/// Dropout uses stream STREAM_DROPOUT + step.
const STREAM_DROPOUT: u64 = 1 << 32;

/// One training run's state.
pub struct Trainer {
    pub denoiser: Denoiser,
    pub params: Tensor,
    pub adam: Adam,
    pub schedule: VeSchedule,
    pub seed: u64,
    grads: Tensor,
}

/// What a step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainStep {
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

impl Trainer {
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
        Ok(Trainer {
            denoiser,
            params,
            adam,
            schedule,
            seed,
            grads,
        })
    }

    /// One Adam step on the batch `x` (its first axis is the batch).
    pub fn step(&mut self, x: &View) -> Result<TrainStep> {
        let step = self.adam.steps();
        let b = x.shape()[0];
        let per = numel(x.shape()) as u64;
        let sigmas: Vec<f64> = beta33(Philox::new(self.seed, STREAM_TIMES), step * b as u64, b)
            .into_iter()
            .map(|t| self.schedule.sigma(t))
            .collect();
        let mut z = Tensor::uninit(x.shape(), x.dtype(), &x.device())?;
        Philox::new(self.seed, STREAM_NOISE).normal_into(&mut z, step * per)?;
        fill(&mut self.grads, 0.0)?;
        let mode = Mode::Train {
            rng: Philox::new(self.seed, STREAM_DROPOUT + step),
        };
        let loss = {
            let mut g = self.grads.as_view_mut()?;
            dsm_loss(
                &self.denoiser,
                &self.params.as_view()?,
                x,
                &sigmas,
                &z.as_view()?,
                mode,
                Some(&mut g),
            )?
        };
        let stats = self.adam.update(&mut self.params, &self.grads)?;
        Ok(TrainStep {
            loss,
            grad_norm: stats.grad_norm,
            lr: stats.lr,
        })
    }

    /// The weights to sample with: the EMA copy when kept, else the parameters.
    pub fn weights(&self) -> &Tensor {
        self.adam.ema().unwrap_or(&self.params)
    }

    pub fn dtype(&self) -> DType {
        self.params.dtype()
    }
}
