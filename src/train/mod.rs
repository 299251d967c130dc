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

/// Re-exported: the trainers' default for [`Trainer::set_cuda_graphs`].
pub use crate::device::cuda_graphs_from_env;
pub use adam::{Adam, AdamConfig, LrSchedule, StepStats};
pub use log::{StepLog, TrainStep};

use std::ops::Range;

use crate::device::Device;
use crate::diffusion::loss::dsm_loss_levels_into;
use crate::diffusion::schedule::train_sigmas_into;
use crate::diffusion::Network;
use crate::diffusion::{Denoiser, VeSchedule};
use crate::dist::{ordered_sum, share_rows, Communicator, SingleProcess};
use crate::error::{Error, Result};
use crate::nn::{Mode, Weights};
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
    graphs: StepGraphs,
}

/// CUDA graphs for [`Trainer::step`] on a GPU: off until [`Trainer::set_cuda_graphs`].
#[derive(Default)]
struct StepGraphs {
    wanted: bool,
    /// The input of the step that last ran eagerly from it (the warm-up the capture needs: the
    /// pool then holds every buffer the step takes beside its input).
    warmed: Option<Tensor>,
    current: Option<StepGraph>,
    /// A capture failed (said once on stderr): steps stay eager until set_cuda_graphs again.
    given_up: bool,
}

/// One captured training step: it reads its batch from `input`.
struct StepGraph {
    graph: crate::device::CapturedGraph,
    input: Tensor,
    /// What the capture baked in besides the input; a replay needs all of it unchanged.
    key: GraphKey,
}

/// The trainer's values and buffers a captured step holds: its public fields may be replaced
/// between steps, and then the graph is captured again instead of replaying stale ones.
#[derive(PartialEq)]
struct GraphKey {
    seed: u64,
    schedule: VeSchedule,
    config: AdamConfig,
    /// Device addresses: parameters, gradients, moments, EMA, bf16 copy, training log (a new
    /// buffer once it grows), step clock.
    buffers: Vec<u64>,
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

/// The rows of a training batch of `batch` rows that this rank of `comm` computes on `device`,
/// for CPU parts of `cpu_part_rows` ([`cpu_part_rows`] of the network; None: whole): whole parts
/// on the CPU (so a rank runs exactly the parts one process would), single rows on a GPU. An
/// error, before any work when called at a run's start, when some rank would get none.
pub fn batch_share(
    cpu_part_rows: Option<usize>,
    batch: usize,
    comm: &dyn Communicator,
    device: &Device,
) -> Result<Range<usize>> {
    let world = comm.world_size();
    let part = cpu_part_rows
        .filter(|&p| !device.is_cuda() && p < batch)
        .unwrap_or(if device.is_cuda() { 1 } else { batch });
    let parts = batch.div_ceil(part.max(1));
    if parts < world {
        return Err(Error::Other(format!(
            "a training batch of {batch} rows in parts of {part} has {parts} part(s), too few for \
             {world} ranks: raise the batch to at least {} rows, or run fewer ranks",
            cpu_part_rows.filter(|_| !device.is_cuda()).unwrap_or(1) * world
        )));
    }
    Ok(share_rows(batch, part, comm.rank(), world))
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
        let mut adam = Adam::new(config, &params)?;
        // Under the bf16 policy the layers read a bf16 copy of the weights, which the
        // optimizer rewrites in its own pass at every step (cast once per step, not per layer).
        if denoiser.layout().precision() == crate::ops::Precision::Bf16 && params.dtype() == DType::F32 {
            adam.keep_bf16_copy(&params)?;
        }
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
            graphs: StepGraphs {
                wanted: cuda_graphs_from_env(),
                ..StepGraphs::default()
            },
        })
    }

    /// Runs each [`Trainer::step`] on a GPU as a CUDA graph (one launch instead of one per
    /// kernel): the first step of a batch shape runs eagerly, the second is captured, and later
    /// ones replay it with their batch copied into its input. Same arithmetic, same bits as
    /// eager steps (kernels read the step from the device clock). Ignored on the CPU, in parts
    /// and across ranks; a capture that fails says why on stderr once and the run goes on
    /// eagerly.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.graphs.wanted = on;
        self.graphs.current = None;
        self.graphs.warmed = None;
        self.graphs.given_up = false;
    }

    /// What a captured step bakes in now (see [`GraphKey`]).
    fn graph_key(&self, dev: &crate::device::CudaDevice) -> Result<GraphKey> {
        use cudarc::driver::DevicePtr;
        let address = |t: &Tensor| -> Result<u64> {
            Ok(match t.dtype() {
                DType::BF16 => t.cuda_bf16()?.device_ptr(dev.stream()).0,
                _ => t.cuda_f32()?.device_ptr(dev.stream()).0,
            })
        };
        let (m, v) = self.adam.moments();
        let mut buffers = vec![
            address(&self.params)?,
            address(&self.grads)?,
            address(m)?,
            address(v)?,
        ];
        for t in [self.adam.ema(), self.adam.bf16_copy(), Some(self.log.buffer())]
            .into_iter()
            .flatten()
        {
            buffers.push(address(t)?);
        }
        buffers.push(self.adam.clock().link(0, 0).address);
        Ok(GraphKey {
            seed: self.seed,
            schedule: self.schedule,
            config: self.adam.config,
            buffers,
        })
    }

    /// Whether the steps are replaying a captured graph now.
    pub fn replaying_cuda_graph(&self) -> bool {
        self.graphs.current.is_some()
    }

    /// One Adam step on the batch `x` (its first axis is the batch). Reads nothing back from
    /// the device: the step's loss and gradient norm wait in the log for [`Trainer::take_stats`].
    pub fn step(&mut self, x: &View) -> Result<()> {
        let b = x.shape().first().copied().unwrap_or(0);
        self.step_shard(x, b, 0, &SingleProcess)
    }

    /// [`Trainer::step`] through a captured graph (see [`Trainer::set_cuda_graphs`]).
    fn step_graphed(&mut self, dev: &std::sync::Arc<crate::device::CudaDevice>, x: &View) -> Result<()> {
        let b = x.shape()[0];
        // The log's buffer is part of the graph: grow it (and capture again) before it is full.
        self.log.reserve_one()?;
        let key = self.graph_key(dev)?;
        if let Some(g) = self
            .graphs
            .current
            .as_mut()
            .filter(|g| g.input.shape() == x.shape() && g.input.dtype() == x.dtype() && g.key == key)
        {
            crate::ops::copy_into(x, &mut g.input)?;
            let step = self.adam.steps();
            self.log.begin(step, self.adam.config.lr.at(step))?;
            if let Err(e) = g.graph.replay() {
                self.log.forget_last();
                return Err(e);
            }
            // The replay's Adam update advanced the device's clock; the host follows.
            self.adam.clock_mut().advanced();
            return Ok(());
        }
        self.graphs.current = None;
        let input = match self.graphs.warmed.take() {
            Some(mut input) if input.shape() == x.shape() && input.dtype() == x.dtype() => {
                crate::ops::copy_into(x, &mut input)?;
                input
            }
            _ => {
                // Eagerly first, from the input the graph will read.
                let mut input = Tensor::uninit(x.shape(), x.dtype(), &x.device())?;
                crate::ops::copy_into(x, &mut input)?;
                self.step_eager(&input.as_view()?, b, 0, &SingleProcess)?;
                self.graphs.warmed = Some(input);
                return Ok(());
            }
        };
        let (step, open) = (self.adam.steps(), self.log.len());
        let captured = {
            let input = input.as_view()?;
            dev.capture(|| self.step_eager(&input, b, 0, &SingleProcess))
        };
        match captured {
            Ok(graph) => {
                if let Err(e) = graph.replay() {
                    self.undo_host_side(step, open);
                    return Err(e);
                }
                self.graphs.current = Some(StepGraph { graph, input, key });
                Ok(())
            }
            Err(e) => {
                // Nothing of the step ran on the device: run it eagerly, and stay eager.
                self.undo_host_side(step, open);
                eprintln!("warning: CUDA graphs off for this training run: {e}");
                self.graphs.given_up = true;
                self.step_eager(x, b, 0, &SingleProcess)
            }
        }
    }

    /// Undoes a step's host side (its log record, the clock mirror's advance) for a step whose
    /// kernels never ran: the log back to `open` records, the mirror to `step`.
    fn undo_host_side(&mut self, step: u64, open: usize) {
        if self.log.len() > open {
            self.log.forget_last();
        }
        self.adam.clock_mut().rewind_mirror(step);
    }

    /// The rows of a step's batch of `batch` rows that this rank of `comm` computes
    /// ([`batch_share`]).
    pub fn shard_rows(&self, batch: usize, comm: &dyn Communicator, device: &Device) -> Result<Range<usize>> {
        batch_share(self.cpu_part_rows, batch, comm, device)
    }

    /// On the CPU, the rows per part of a batch of `batch` rows (None: the batch whole).
    fn part_rows(&self, batch: usize, device: &Device) -> Option<usize> {
        self.cpu_part_rows.filter(|&p| !device.is_cuda() && p < batch)
    }

    /// One data-parallel Adam step: `x` holds rows `first..first + n` of a step's batch of
    /// `batch` rows ([`Trainer::shard_rows`] of this rank of `comm`), whose training times, noise
    /// and dropout are drawn at those rows' places in the whole batch's streams. The gradients
    /// and loss of every rank's parts are added in rank order ([`crate::dist::ordered_sum`]), so
    /// every rank takes the same Adam step, the one a single process takes on the whole batch.
    pub fn step_shard(
        &mut self,
        x: &View,
        batch: usize,
        first: usize,
        comm: &dyn Communicator,
    ) -> Result<()> {
        let whole = first == 0 && x.shape().first() == Some(&batch) && comm.world_size() == 1;
        match x.device() {
            Device::Cuda(dev) if whole && batch > 0 && self.graphs.wanted && !self.graphs.given_up => {
                self.step_graphed(&dev, x)
            }
            _ => self.step_eager(x, batch, first, comm),
        }
    }

    /// [`Trainer::step_shard`] queued kernel by kernel.
    fn step_eager(&mut self, x: &View, batch: usize, first: usize, comm: &dyn Communicator) -> Result<()> {
        let step = self.adam.steps();
        let n = x.shape().first().copied().unwrap_or(0);
        if n == 0 || first + n > batch {
            return Err(Error::Other(format!(
                "training step: rows {first}..{} of a batch of {batch}",
                first + n
            )));
        }
        let row = numel(x.shape()) / n;
        // The step's random streams move with Adam's step clock, so nothing here depends on
        // the step on the host: training times and noise advance a batch per step, dropout a
        // stream per step (the same numbers as fixed streams at `step`).
        let clock = self.adam.clock();
        let times = Philox::new(self.seed, STREAM_TIMES).moving(clock.link(0, batch as u64));
        let noise = Philox::new(self.seed, STREAM_NOISE).moving(clock.link(0, (batch * row) as u64));
        let rng = Philox::new(self.seed, STREAM_DROPOUT).moving(clock.link(1, 0));
        let mut sigma = Tensor::uninit(&[n], x.dtype(), &x.device())?;
        train_sigmas_into(times, first as u64, &self.schedule, &mut sigma.as_view_mut()?)?;
        let mut z = Tensor::uninit(x.shape(), x.dtype(), &x.device())?;
        noise.normal_into(&mut z, (first * row) as u64)?;
        let slot = self.log.begin(step, self.adam.config.lr.at(step))?;
        let part_rows = self.part_rows(batch, &x.device());
        let alone = comm.world_size() == 1;
        let weights = Weights::new(self.params.as_view()?, self.adam.bf16_copy())?;
        let (den, params, grads) = (&self.denoiser, &self.params, &mut self.grads);
        // One part of this rank's rows (their place in the batch: `r` offset by `first`): its
        // gradient and its loss term of the whole batch's mean.
        let part = |r: Range<usize>| -> Result<(Tensor, Tensor)> {
            let mut shape = x.shape().to_vec();
            shape[0] = r.len();
            let (xp, zp, sp) = (
                x.sub(r.start * row, &shape)?,
                z.as_view()?.sub(r.start * row, &shape)?,
                sigma.as_view()?.sub(r.start, &[r.len()])?,
            );
            let mut g = Tensor::zeros(params.shape(), params.dtype(), &params.device())?;
            let mut loss = Tensor::zeros(&[], params.dtype(), &params.device())?;
            let mode = Mode::Train {
                rng,
                first_row: (first + r.start) as u64,
            };
            dsm_loss_levels_into(
                den,
                &weights,
                &xp,
                &sp,
                &zp,
                mode,
                Some(&mut g.as_view_mut()?),
                &mut loss.as_view_mut()?,
                batch,
            )?;
            Ok((g, loss))
        };
        fill(grads, 0.0)?;
        let (mut kept_grads, mut losses) =
            (Vec::new(), Vec::with_capacity(n.div_ceil(part_rows.unwrap_or(n))));
        match part_rows {
            None if alone => {
                let mode = Mode::Train { rng, first_row: 0 };
                return self
                    .log
                    .with_loss(|loss| {
                        let mut g = grads.as_view_mut()?;
                        let (sv, zv) = (sigma.as_view()?, z.as_view()?);
                        dsm_loss_levels_into(den, &weights, x, &sv, &zv, mode, Some(&mut g), loss, n)
                    })
                    .and_then(|()| {
                        self.adam
                            .update_logged(&mut self.params, &self.grads, &mut self.log, slot)
                    });
            }
            // A GPU rank's rows: one part.
            None => {
                let (g, loss) = part(0..n)?;
                kept_grads.push(g);
                losses.push(loss);
            }
            Some(part_rows) => {
                // On the CPU: row parts on the cores, each with its own gradient, added in part
                // order (the same bits on any number of threads or ranks; the sum's order, hence
                // the last bits, differ from one piece's). Alone, in waves of a few parts per
                // core, so a large batch holds a few gradients at once, not one per part; with
                // other ranks, this rank's parts are kept until the running sum reaches it.
                let wave_rows = part_rows * CPU_PARTS_PER_CORE * rayon::current_num_threads();
                for wave in (0..n).step_by(wave_rows) {
                    let rows = wave_rows.min(n - wave);
                    let parts = map_parts(rows, part_rows, |r| part(wave + r.start..wave + r.end));
                    for p in parts {
                        let (g, loss) = p?;
                        if alone {
                            axpy(1.0, &g, grads)?;
                        } else {
                            kept_grads.push(g);
                        }
                        losses.push(loss);
                    }
                }
            }
        }
        ordered_sum(comm, grads, &kept_grads)?;
        let mut total = Tensor::zeros(&[], self.params.dtype(), &self.params.device())?;
        ordered_sum(comm, &mut total, &losses)?;
        self.log.with_loss(|logged| {
            fill(logged, 0.0)?;
            axpy(1.0, &total, logged)
        })?;
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
