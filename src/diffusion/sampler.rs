//! Samplers over any denoiser (method.md §4): DDPM (ancestral, = DDIM with eta = 1), DDIM
//! (eta = 0) and predictor-corrector with Langevin corrections, on the grid t_k = 1, 1 - 1/S,
//! ..., 0 (log-uniform sigma from sigma_max to sigma_min), started at mu + sigma_max z and
//! finished with one more denoiser call at sigma_min. Posterior sampling is the same code with
//! the MMPS posterior denoiser in place of the prior's. The update and its noise are one kernel
//! (kernels/sampler.cu); the whole loop stays on the device.
//!
//! Nothing a step does varies from step to step on the host: the noise levels, the update's
//! coefficients and the noise's offsets are read on the device from a table of the whole grid
//! (uploaded once per call) at the row of a step clock ([`StepClock`]) that each step advances.
//! So one step recorded as a CUDA graph replays as every later one ([`Sampler::cuda_graphs`]),
//! and a step uploads nothing on either backend.

use crate::device::launch::grid_stride;

use super::schedule::VeSchedule;
use crate::device::{ClockLink, Device, StepClock};
use crate::error::{Error, Result};
use crate::ops::broadcast::add_bias;
use crate::ops::{mismatch, one_device, Philox};
use crate::real::Real;
use crate::tensor::{AsView, AsViewMut, DType, Data, DataMut, Tensor, View};

/// A sampler step failed to be captured in this process (its reason is said once).
static CAPTURE_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Columns of a sampler's table ([`Sampler::table`]): one row per grid point k = 0 ..= S.
pub mod table {
    /// Values per row.
    pub const WIDTH: usize = 7;
    /// σ_k.
    pub const SIGMA: usize = 0;
    /// σ_k² (rounded once from the f64 square).
    pub const SIGMA2: usize = 1;
    /// σ_k² / (1 + σ_k²).
    pub const SHRINK: usize = 2;
    /// The step k → k + 1's update (a, c) ([`super::sampler_step`]); 0 in row S.
    pub const PREDICTOR: usize = 3;
    /// A Langevin correction's (a, c) at σ_{k+1}; 0 in row S and for samplers without.
    pub const CORRECTOR: usize = 5;
}

/// A noise level for every row of a batch, on the batch's device: what a sampler hands its
/// denoiser. Its values come from a table on the device, so a step recorded in a CUDA graph reads
/// the level of the step it replays as.
pub struct NoiseLevel {
    /// σ per row, `[N]`.
    pub sigma: Tensor,
    /// σ² per row, `[N]`.
    pub sigma2: Tensor,
    /// σ² / (1 + σ²) per row, `[N]`.
    pub shrink: Tensor,
    host: Option<f64>,
}

impl NoiseLevel {
    /// The level `sigma` for `rows` rows, made from the host (for direct calls, not a sampler's
    /// steps): on a GPU filled by kernels (f32, rounded once), on the CPU three small columns.
    pub fn from_host(sigma: f64, rows: usize, dtype: DType, device: &Device) -> Result<Self> {
        let s2 = sigma * sigma;
        let col = |v: f64| match device {
            Device::Cuda(_) => {
                let mut t = Tensor::uninit(&[rows], dtype, device)?;
                crate::ops::fill(&mut t, v as f32)?;
                Ok(t)
            }
            Device::Cpu => Tensor::from_f64_as(&vec![v; rows], &[rows], dtype, device),
        };
        Ok(NoiseLevel {
            sigma: col(sigma)?,
            sigma2: col(s2)?,
            shrink: col(s2 / (1.0 + s2))?,
            host: Some(sigma),
        })
    }

    /// [`NoiseLevel::from_host`] for every row of `x_t`, on its device and in its dtype.
    pub fn for_batch(sigma: f64, x_t: &Tensor) -> Result<Self> {
        let rows = x_t.shape().first().copied().unwrap_or(0);
        Self::from_host(sigma, rows, x_t.dtype(), &x_t.device())
    }

    /// Row `ahead` past the clock's step of a sampler's `table` (`[S + 1, table::WIDTH]`), for
    /// `rows` rows, read on the device when the work runs (on the CPU, at the step the link was
    /// made at). `host` is the same σ on the host, or None where nothing may read it (a step being
    /// recorded in a CUDA graph: it would be baked into every replay).
    pub fn at(table: &View, clock: ClockLink, ahead: usize, rows: usize, host: Option<f64>) -> Result<Self> {
        crate::device::note_op();
        let (dtype, device) = (table.dtype(), table.device());
        let row = clock.step as usize + ahead;
        // σ, σ² and σ²/(1 + σ²): the first three columns.
        check_table("NoiseLevel::at", table, row, table::SIGMA, 3)?;
        let make = || Tensor::uninit(&[rows], dtype, &device);
        let (mut sigma, mut sigma2, mut shrink) = (make()?, make()?, make()?);
        {
            let (mut a, mut b, mut c) = (sigma.as_view_mut()?, sigma2.as_view_mut()?, shrink.as_view_mut()?);
            match (&table.data, &mut a.data, &mut b.data, &mut c.data) {
                (Data::Cuda(t, dev), DataMut::Cuda(a, _), DataMut::Cuda(b, _), DataMut::Cuda(c, _)) => {
                    no_null_clock("NoiseLevel::at", clock)?;
                    // SAFETY: the table holds rows past the clock's step + ahead (checked against
                    // the host's step, which the device's equals when the work runs); a, b and c
                    // hold `rows` values.
                    unsafe {
                        dev.kernels().sampler_levels_f32(
                            grid_stride(dev, rows),
                            t,
                            table::WIDTH as i64,
                            clock.address,
                            ahead as i64,
                            a,
                            b,
                            c,
                            rows as i64,
                        )
                    }?;
                }
                (Data::Cuda(..), ..) => return Err(mismatch("NoiseLevel::at", &[table], &[])),
                _ => host_real!(table, T => {
                    let values = &table.cpu::<T>()?[row * table::WIDTH..][..3];
                    for (out, v) in [&mut a, &mut b, &mut c].into_iter().zip(values) {
                        out.cpu_mut::<T>()?.fill(*v);
                    }
                    Ok::<(), Error>(())
                })?,
            }
        }
        Ok(NoiseLevel {
            sigma,
            sigma2,
            shrink,
            host,
        })
    }

    /// σ on the host, for a denoiser that needs it there; an error while a step is being recorded
    /// in a CUDA graph (such a denoiser is not [`Denoise::graph_safe`]).
    pub fn host(&self) -> Result<f64> {
        self.host.ok_or_else(|| {
            Error::Other(
                "a denoiser asked for its noise level on the host while a sampler step was being \
                 recorded in a CUDA graph (it would replay that level at every step)"
                    .into(),
            )
        })
    }
}

/// E[x | x_t] for a batch at one noise level: what a sampler calls.
pub trait Denoise {
    /// `d(x_t, σ) ≈ E[x | x_t]` for every row of `x_t` (`[N, ...]`), all at noise level `sigma`;
    /// the result has `x_t`'s shape.
    fn denoise(&mut self, x_t: &Tensor, sigma: f64) -> Result<Tensor>;

    /// [`Denoise::denoise`] at a level the device holds (what a sampler calls). By default it
    /// asks for the level on the host ([`NoiseLevel::host`]); a denoiser that reads only the
    /// level's tensors overrides this and [`Denoise::graph_safe`].
    fn denoise_level(&mut self, x_t: &Tensor, level: &NoiseLevel) -> Result<Tensor> {
        self.denoise(x_t, level.host()?)
    }

    /// Whether [`Denoise::denoise_level`] reads its level only on the device and queues nothing
    /// that synchronises with or uploads from the host (after its first call), so a sampler on a
    /// GPU may record a step of it in a CUDA graph and replay it.
    fn graph_safe(&self) -> bool {
        false
    }

    /// Told by a sampler after each of its steps is queued (run eagerly or replayed from a
    /// graph; never while one is being recorded): the denoiser calls the step made and the noise
    /// level it reached, on `device`. For progress reports; nothing by default.
    fn step_done(&mut self, calls: usize, sigma: f64, device: &Device) -> Result<()> {
        let _ = (calls, sigma, device);
        Ok(())
    }
}

/// The update rule a [`Sampler`] applies at each step t → s (method.md §4). Parses from
/// `ddpm`, `ddim` or `pc` (the last with 1 correction and τ_c = 0.1, the paper's defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SamplerKind {
    /// Ancestral sampling, DDIM with η = 1: `x_s = x_t − τ (x_t − d) + σ_s √τ ε` with
    /// `τ = 1 − σ_s²/σ_t²` (the E-steps' sampler).
    Ddpm,
    /// Deterministic DDIM, η = 0: `x_s = x_t − (1 − σ_s/σ_t) (x_t − d)`.
    Ddim,
    /// A DDIM predictor and `corrections` Langevin steps of size tau per step.
    Pc {
        /// Langevin steps at σ_s after each predictor step (the paper: 1).
        corrections: usize,
        /// τ_c in `x ← x − τ_c (x − d(x, σ_s)) + σ_s √(2 τ_c) ε` (the paper: 0.1).
        tau: f64,
    },
}

impl std::str::FromStr for SamplerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "ddpm" => Ok(SamplerKind::Ddpm),
            "ddim" => Ok(SamplerKind::Ddim),
            "pc" => Ok(SamplerKind::Pc {
                corrections: 1,
                tau: 0.1,
            }),
            other => Err(format!("unknown sampler '{other}' (expected ddpm, ddim or pc)")),
        }
    }
}

/// A sampler: update rule, step count S, VE schedule and noise stream. [`Sampler::sample`] runs
/// it against any [`Denoise`]: S denoiser calls on the grid t_k = 1 − k/S (plus `corrections`
/// per step for PC) and one final call at σ_min.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampler {
    /// The update rule.
    pub kind: SamplerKind,
    /// S, the number of steps (at least 1; sampling errors on 0).
    pub steps: usize,
    /// The schedule giving σ at each grid time.
    pub schedule: VeSchedule,
    /// The noise: Philox (seed, stream), element offsets laid out per step.
    pub rng: Philox,
    /// On a GPU, with a [`Denoise::graph_safe`] denoiser: the first step runs eagerly, the second
    /// is recorded as a CUDA graph, and it and every later step are replays of it (one launch
    /// each instead of one per kernel). The same bits as eager steps. A capture that fails says
    /// why on stderr (once per process) and the call goes on eagerly. Default:
    /// `EMPRIOR_CUDA_GRAPHS`.
    pub cuda_graphs: bool,
}

/// The kernels read the clock's row on the device: a link made from a CPU clock has no address.
fn no_null_clock(op: &str, clock: ClockLink) -> Result<()> {
    match clock.address {
        0 => Err(Error::Other(format!(
            "{op}: its step clock is not on the GPU (make it with StepClock::new on the tensors' device)"
        ))),
        _ => Ok(()),
    }
}

/// An error unless `table` is a sampler's table (`[rows, table::WIDTH]`) with row `row` and the
/// `count` columns from `column`.
fn check_table(op: &'static str, table: &View, row: usize, column: usize, count: usize) -> Result<()> {
    let shape = table.shape();
    if shape.len() == 2 && shape[1] == table::WIDTH && row < shape[0] && column + count <= table::WIDTH {
        return Ok(());
    }
    Err(Error::shape(
        op,
        "table",
        format!("[> {row}, {}] (column {column})", table::WIDTH),
        shape,
    ))
}

/// x <- x - a (x - d) + c eps in place, with (a, c) the values at columns `column`,
/// `column + 1` of `table`'s row at `rng`'s clock step, and eps = normals `offset ..` of `rng`
/// as it stands at that step (both read on the device when the kernel runs: a replayed step
/// reads its own). `rng` must move with the sampler's step clock ([`Philox::moving`]); the
/// noise is drawn only where c != 0.
pub fn sampler_step(
    x: &mut Tensor,
    d: &Tensor,
    table: &View,
    column: usize,
    rng: Philox,
    offset: u64,
) -> Result<()> {
    let Some(clock) = rng.clock else {
        return Err(Error::Other(
            "sampler_step reads its coefficients at a step clock's row: give it a stream moving with one"
                .into(),
        ));
    };
    let (dv, mut xv) = (d.as_view()?, x.as_view_mut()?);
    one_device("sampler_step", &[&dv, table], &[&xv])?;
    if dv.shape() != xv.shape() {
        return Err(Error::shape("sampler_step", "denoised", xv.shape(), dv.shape()));
    }
    let row = clock.step as usize;
    check_table("sampler_step", table, row, column, 2)?;
    let n = xv.numel();
    fn host<T: Real>(x: &mut [T], d: &[T], coef: &[T], rng: Philox, offset: u64) {
        let (a, c) = (coef[0], coef[1]);
        let mut eps = vec![0.0f32; if c != T::ZERO { x.len() } else { 0 }];
        rng.fill_normal(offset, &mut eps);
        for (i, (xi, &di)) in x.iter_mut().zip(d).enumerate() {
            let mut v = *xi - a * (*xi - di);
            if !eps.is_empty() {
                v += c * T::from_f32(eps[i]);
            }
            *xi = v;
        }
    }
    let at = row * table::WIDTH + column;
    match (&mut xv.data, &dv.data, &table.data) {
        (DataMut::F32(xs), Data::F32(ds), Data::F32(t)) => host(xs, ds, &t[at..at + 2], rng, offset),
        (DataMut::F64(xs), Data::F64(ds), Data::F64(t)) => host(xs, ds, &t[at..at + 2], rng, offset),
        (DataMut::Cuda(xs, dev), Data::Cuda(ds, _), Data::Cuda(t, _)) => {
            no_null_clock("sampler_step", clock)?;
            let (clock, sps, ops) = rng.clock_args();
            // SAFETY: x and d hold n values (shapes checked above); the table has the clock's
            // row (checked against the host's step, which the device's equals when this runs).
            unsafe {
                dev.kernels().sampler_step_f32(
                    grid_stride(dev, n),
                    xs,
                    ds,
                    n as i64,
                    t,
                    table::WIDTH as i64,
                    column as i64,
                    rng.seed,
                    rng.stream,
                    offset,
                    clock,
                    sps,
                    ops,
                )
            }?;
        }
        _ => return Err(mismatch("sampler_step", &[&dv, table], &[])),
    }
    Ok(())
}

/// Which rows of a batch a sampler call draws: rows `first .. first + shape[0]` of a batch of
/// `total` samples. The noise is laid out over the whole batch, so a batch sampled in parts gives
/// the same bits as in one piece when the denoiser treats rows independently (as the networks,
/// the operators and CG do: posterior::cg's notes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPart {
    /// The index, within the whole batch, of the first row this call draws.
    pub first: usize,
    /// Rows in the whole batch (the noise is laid out over all of them).
    pub total: usize,
}

impl BatchPart {
    /// The whole batch of `rows` rows.
    pub fn whole(rows: usize) -> Self {
        BatchPart {
            first: 0,
            total: rows,
        }
    }
}

impl Sampler {
    /// A sampler with CUDA graphs as `EMPRIOR_CUDA_GRAPHS` says ([`Sampler::cuda_graphs`]).
    pub fn new(kind: SamplerKind, steps: usize, schedule: VeSchedule, rng: Philox) -> Self {
        Sampler {
            kind,
            steps,
            schedule,
            rng,
            cuda_graphs: crate::device::cuda_graphs_from_env(),
        }
    }

    /// Denoiser calls per step (the predictor's and the corrections').
    pub fn calls_per_step(&self) -> usize {
        match self.kind {
            SamplerKind::Pc { corrections, .. } => 1 + corrections,
            SamplerKind::Ddpm | SamplerKind::Ddim => 1,
        }
    }

    /// The grid and every step's coefficients, `[S + 1, table::WIDTH]` in `dtype` on `device`
    /// (one upload): row k holds σ_k, σ_k², σ_k²/(1 + σ_k²), then the update k → k + 1's (a, c)
    /// and its corrections' (a, c), all computed in f64 and rounded once.
    pub fn table(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let grid = self.schedule.grid(self.steps);
        let mut rows = vec![0.0f64; (self.steps + 1) * table::WIDTH];
        for (k, row) in rows.chunks_exact_mut(table::WIDTH).enumerate() {
            let t = grid[k];
            let t2 = t * t;
            row[table::SIGMA] = t;
            row[table::SIGMA2] = t2;
            row[table::SHRINK] = t2 / (1.0 + t2);
            let Some(&s) = grid.get(k + 1) else { continue };
            let (predictor, corrector) = match self.kind {
                SamplerKind::Ddpm => {
                    let tau = 1.0 - (s * s) / t2;
                    ((tau, s * tau.sqrt()), (0.0, 0.0))
                }
                SamplerKind::Ddim => ((1.0 - s / t, 0.0), (0.0, 0.0)),
                SamplerKind::Pc { tau, .. } => ((1.0 - s / t, 0.0), (tau, s * (2.0 * tau).sqrt())),
            };
            row[table::PREDICTOR..table::PREDICTOR + 2].copy_from_slice(&[predictor.0, predictor.1]);
            row[table::CORRECTOR..table::CORRECTOR + 2].copy_from_slice(&[corrector.0, corrector.1]);
        }
        Tensor::from_f64_as(&rows, &[self.steps + 1, table::WIDTH], dtype, device)
    }

    /// Samples of `shape` ([N, ...]) from `den`, started at mean + sigma_max z (mean: one sample's
    /// shape, broadcast; None for 0).
    pub fn sample(
        &self,
        den: &mut impl Denoise,
        shape: &[usize],
        mean: Option<&View>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let rows = shape.first().copied().unwrap_or(0);
        self.sample_part(den, shape, BatchPart::whole(rows), mean, dtype, device)
    }

    /// Rows `part.first ..` of a batch of `part.total` samples ([`BatchPart`]); `shape` is the
    /// part's ([rows, ...]) and `den` denoises those rows only.
    pub fn sample_part(
        &self,
        den: &mut impl Denoise,
        shape: &[usize],
        part: BatchPart,
        mean: Option<&View>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.begin(den, shape, part, mean, dtype, device)?.finish()
    }

    /// The start of a sampler call with `den`, to be driven step by step
    /// ([`SamplerCall::step`], then [`SamplerCall::finish`]; [`Sampler::sample_part`] does both):
    /// the starting point mean + σ_max z for rows `part.first ..` of `shape`, the table and the
    /// step clock. The call holds `den` to its end: a step replayed from a graph runs the
    /// denoiser it recorded, so no other may take its place.
    pub fn begin<'a, D: Denoise>(
        &'a self,
        den: &'a mut D,
        shape: &[usize],
        part: BatchPart,
        mean: Option<&View>,
        dtype: DType,
        device: &Device,
    ) -> Result<SamplerCall<'a, D>> {
        if self.steps == 0 {
            return Err(Error::Other("a sampler needs at least one step".into()));
        }
        let rows = shape.first().copied().unwrap_or(0);
        if part.first + rows > part.total {
            return Err(Error::Other(format!(
                "a sampler part of rows {}..{} lies outside its batch of {}",
                part.first,
                part.first + rows,
                part.total
            )));
        }
        let n: usize = shape.iter().product();
        let per = n.checked_div(rows).unwrap_or(0);
        let grid = self.schedule.grid(self.steps);
        let mut x = Tensor::uninit(shape, dtype, device)?;
        let base = (part.first * per) as u64;
        self.rng.normal_into(&mut x, base)?;
        let mut x = crate::ops::scale(&x, grid[0])?;
        if let Some(mu) = mean {
            let mut flat = x.as_view_mut()?.reshape(&[rows, per])?;
            add_bias(&mut flat, &mu.reshape(&[per])?)?;
        }
        // Fixed for the call: the sampler's setting, the device and the denoiser it holds.
        let graphs = match device {
            Device::Cuda(dev) if self.cuda_graphs && den.graph_safe() => Some(dev.clone()),
            _ => None,
        };
        Ok(SamplerCall {
            sampler: self,
            table: self.table(dtype, device)?,
            clock: StepClock::new(0, device)?,
            whole: (part.total * per) as u64,
            base,
            grid,
            x,
            graphs,
            den,
            device: device.clone(),
            graph: None,
        })
    }
}

/// A sampler call in progress ([`Sampler::begin`]): its denoiser, the current samples, the
/// table, the step clock, and on a GPU the step captured as a CUDA graph once there is one.
pub struct SamplerCall<'a, D: Denoise> {
    sampler: &'a Sampler,
    den: &'a mut D,
    table: Tensor,
    clock: StepClock,
    /// Normals per noise block (the whole batch's elements): block 1 + k is step k's update,
    /// the corrections' blocks come after all steps.
    whole: u64,
    /// Where this part's rows start in a block.
    base: u64,
    grid: Vec<f64>,
    x: Tensor,
    /// The GPU whose steps are recorded and replayed as a graph (None: eager steps, also after
    /// a capture failed).
    graphs: Option<std::sync::Arc<crate::device::CudaDevice>>,
    device: Device,
    graph: Option<crate::device::CapturedGraph>,
}

impl<D: Denoise> SamplerCall<'_, D> {
    /// Steps not yet taken.
    pub fn steps_left(&self) -> usize {
        self.sampler.steps - self.clock.step() as usize
    }

    /// Whether the steps are replays of a captured CUDA graph now.
    pub fn replaying(&self) -> bool {
        self.graph.is_some()
    }

    /// The next step, k → k + 1: eager, recorded (the second step of a call whose sampler
    /// wants CUDA graphs, on a GPU, with a graph-safe denoiser) or replayed (the steps after).
    pub fn step(&mut self) -> Result<()> {
        let k = self.clock.step() as usize;
        if k >= self.sampler.steps {
            return Err(Error::Other(format!(
                "a sampler call of {} steps has taken them all",
                self.sampler.steps
            )));
        }
        let host = Some((self.grid[k], self.grid[k + 1]));
        match (self.graphs.clone(), &self.graph) {
            (_, Some(g)) => {
                g.replay()?;
                self.clock.advanced();
            }
            // The first step eagerly (the pool then holds what the capture takes), the second
            // recorded and launched.
            (Some(dev), None) if k > 0 => match dev.capture(|| self.eager(None)) {
                Ok(g) => {
                    g.replay()?;
                    self.graph = Some(g);
                }
                Err(e) => {
                    if !CAPTURE_FAILED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        eprintln!("warning: a sampler step could not be captured as a CUDA graph, so it runs eagerly (said once per process): {e}");
                    }
                    self.graphs = None;
                    // Nothing recorded ran: the clock's device value did not move.
                    self.clock.rewind_mirror(k as u64);
                    self.eager(host)?;
                }
            },
            _ => self.eager(host)?,
        }
        self.den
            .step_done(self.sampler.calls_per_step(), self.grid[k + 1], &self.device)
    }

    /// Takes the steps left and the final denoiser call at σ_min: the samples.
    pub fn finish(mut self) -> Result<Tensor> {
        while self.steps_left() > 0 {
            self.step()?;
        }
        self.graph = None;
        let (rows, sigma_min) = (self.x.shape()[0], self.grid[self.sampler.steps]);
        let last = NoiseLevel::at(
            &self.table.as_view()?,
            self.clock.link(0, 0),
            0,
            rows,
            Some(sigma_min),
        )?;
        let out = self.den.denoise_level(&self.x, &last)?;
        self.den.step_done(1, sigma_min, &self.device)?;
        Ok(out)
    }

    /// The step at the clock, queued op by op, advancing the clock. `host`: (σ_k, σ_{k+1}) for
    /// denoisers that read the level on the host; None while the step is recorded in a graph.
    fn eager(&mut self, host: Option<(f64, f64)>) -> Result<()> {
        let (s, rows) = (self.sampler, self.x.shape()[0]);
        let (whole, base, steps) = (self.whole, self.base, s.steps as u64);
        let table = self.table.as_view()?;
        let at_t = NoiseLevel::at(&table, self.clock.link(0, 0), 0, rows, host.map(|h| h.0))?;
        let d = self.den.denoise_level(&self.x, &at_t)?;
        drop(at_t);
        // The predictor's noise (DDPM's only) is block 1 + k.
        let predictor = s.rng.moving(self.clock.link(0, whole));
        sampler_step(&mut self.x, &d, &table, table::PREDICTOR, predictor, whole + base)?;
        drop(d);
        if let SamplerKind::Pc { corrections, .. } = s.kind {
            let at_s = NoiseLevel::at(&table, self.clock.link(0, 0), 1, rows, host.map(|h| h.1))?;
            // Correction j of step k draws block 1 + S + k * corrections + j.
            let corrector = s.rng.moving(self.clock.link(0, corrections as u64 * whole));
            for j in 0..corrections as u64 {
                let d = self.den.denoise_level(&self.x, &at_s)?;
                let offset = (1 + steps + j) * whole + base;
                sampler_step(&mut self.x, &d, &table, table::CORRECTOR, corrector, offset)?;
            }
        }
        drop(table);
        self.clock.advance()
    }
}
