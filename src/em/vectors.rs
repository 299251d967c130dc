//! EM on vectors: a TimeMLP prior learned from observations y = A x + noise of d-dimensional
//! signals, with dense operators (one per observation, or one shared) and scalar or diagonal
//! noise. Two sources of observations run through the same driver:
//! - the low-dimensional manifold experiment (method.md §7.1, §8.2): 5-D points on a random 1-D
//!   manifold, each seen only through a random 2 x 5 projection with noise 0.01, its posterior
//!   samples compared with the ground truth each lap;
//! - the user's own (`experiment = "vectors"`): `obs` [n, m], `operator` [n, m, d] or [m, d],
//!   `sigma_y` or a diagonal `sigma_y_file` `[m]`, and, when given, the ground truth `truth` `[n, d]`
//!   for the metrics.
//!
//! Either way the observations, operators (and truth) are saved in `DIR/observations/` as .npy
//! (`obs.npy`, `operator.npy`, `truth.npy`, `sigma_y_file.npy`),
//! so `emprior posterior` can replay any lap's checkpoint on them; a resume reads them back from
//! there.

use std::path::Path;
use std::time::Instant;

use super::{
    abort_requested, check_observations, create_lap_dir, derive_seed, ensure_finite_samples, json_field,
    json_line, kill_requested, lap_dir, lap_params, mark_done, metric, print_header, read_lap_metrics,
    sample_batch, save_lap_checkpoint, write_metrics_jsonl, write_run_report, Config, Fingerprint,
};
use crate::data::manifold::{observe, Manifold, DIM as MANIFOLD_DIM};
use crate::device::Device;
use crate::diffusion::{Denoiser, Network, Sampler, SamplerKind, VeSchedule};
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::gaussian::{ppca, Dplr, Gaussian};
use crate::io::report::Figure;
use crate::io::{plot, read_npy, write_atomically, write_npy_f32, write_npy_f64};
use crate::metrics::{sinkhorn_cost, sliced_wasserstein, Sinkhorn};
use crate::nn::TimeMlp;
use crate::ops::rng::gather_rows_uniform;
use crate::ops::Philox;
use crate::posterior::{
    CgConfig, Covariance, DenseOperators, LinearOperator, Mmps, NetworkPrior, ObservationNoise, Prior,
    SharedOperator,
};
use crate::progress::{say, Laps, Phase};
use crate::tensor::{AsView, DType, Tensor};
use crate::train::{AdamConfig, LrSchedule, Trainer};

/// Purposes for `derive_seed`.
const SEED_INIT: u64 = 1;
const SEED_ESTEP: u64 = 2;
const SEED_MSTEP: u64 = 3;
const SEED_PARAMS: u64 = 4;
/// Rows per part of an E-step batch on the CPU: a TimeMLP part's saved activations (about
/// 7 KB a row at width 256) fit a core's 2 MB L2 beside the weights. Measured on one core, PC
/// 64 steps over 8,192 observations: 11.3 s in parts of 512, 11.9 s of 256, 12.8 s of 128 or
/// 1,024, 13.4 s whole.
const CPU_PART_ROWS: usize = 512;

/// What one lap measured; one line of metrics.jsonl.
#[derive(Clone, Debug, PartialEq)]
pub struct LapMetrics {
    /// The lap: 0 for the Gaussian initialisation, then 1, 2, ...
    pub lap: usize,
    /// The paper's Sinkhorn divergence of the lap's posterior samples to the ground truth
    /// (method.md §9.1: `max(OT(u1, v) - OT(u1, u2), 1e-6)`, u1 and u2 disjoint truth draws;
    /// NaN without a truth).
    pub sinkhorn: f64,
    /// Sliced Wasserstein-1 distance of the same samples to the ground truth, over 128 random
    /// directions (NaN without one).
    pub sliced_wasserstein: f64,
    /// Posterior samples inside (-bound, bound)^d, out of all observations (all without a bound).
    pub kept: usize,
    /// Mean DSM loss over the M-step's last 100 steps (NaN for the initialisation).
    pub loss: f64,
    /// Wall time of the E-step in seconds (lap 0: the whole Gaussian initialisation with it).
    pub estep_seconds: f64,
    /// Wall time of the M-step in seconds (0 for lap 0).
    pub mstep_seconds: f64,
    /// Sinkhorn iterations of the OT(u1, v) solve (POT's stopping rule; cap 1,024).
    pub sinkhorn_iterations: usize,
    /// The evaluation's own time (Sinkhorn and sliced W1).
    pub eval_seconds: f64,
    /// Writing the lap's plots and the run's report (NaN in runs written before it was
    /// recorded).
    pub plot_seconds: f64,
}

impl LapMetrics {
    fn to_json(&self) -> String {
        json_line(&[
            ("lap", self.lap as f64),
            ("sinkhorn", self.sinkhorn),
            ("sliced_wasserstein", self.sliced_wasserstein),
            ("kept", self.kept as f64),
            ("loss", self.loss),
            ("estep_seconds", self.estep_seconds),
            ("mstep_seconds", self.mstep_seconds),
            ("sinkhorn_iterations", self.sinkhorn_iterations as f64),
            ("eval_seconds", self.eval_seconds),
            ("plot_seconds", self.plot_seconds),
        ])
    }

    fn from_json(line: &str) -> Result<Self> {
        let field = |k: &str| json_field(line, k);
        Ok(LapMetrics {
            lap: field("lap")? as usize,
            sinkhorn: field("sinkhorn")?,
            sliced_wasserstein: field("sliced_wasserstein")?,
            kept: field("kept")? as usize,
            loss: field("loss")?,
            estep_seconds: field("estep_seconds")?,
            mstep_seconds: field("mstep_seconds")?,
            // Absent from runs written before they were recorded.
            sinkhorn_iterations: field("sinkhorn_iterations").unwrap_or(0.0) as usize,
            eval_seconds: field("eval_seconds").unwrap_or(f64::NAN),
            plot_seconds: field("plot_seconds").unwrap_or(f64::NAN),
        })
    }

    /// The one-line summary printed per lap.
    pub fn summary(&self) -> String {
        format!(
            "lap {:>3} | sinkhorn {} | sliced W1 {} | kept {} | loss {} | E-step {:.1}s | M-step {:.1}s | eval {}s | plots {}s",
            self.lap,
            metric(self.sinkhorn, 5),
            metric(self.sliced_wasserstein, 4),
            self.kept,
            metric(self.loss, 4),
            self.estep_seconds,
            self.mstep_seconds,
            metric(self.eval_seconds, 1),
            metric(self.plot_seconds, 1)
        )
    }
}

/// The operators of a run: one [m, d] matrix per observation, or one for all.
enum Operators {
    PerObservation(Vec<f64>),
    Shared(Vec<f64>),
}

/// The ground truth a run is measured against: the first evaluation set u1 and the debiased
/// divergence's reference OT(u1, u2) to a second, disjoint one.
struct Truth {
    u1: Vec<f64>,
    reference: f64,
    /// Every observation's true signal, when known (for the pair plot).
    shown: Vec<f64>,
}

/// Everything fixed for a run.
struct Setup {
    cfg: Config,
    seed: u64,
    n: usize,
    /// Signal and observation sizes.
    d: usize,
    m: usize,
    ops: Operators,
    y: Vec<f64>,
    /// Per-coordinate noise variances [m] (None: sigma_y^2 for all).
    noise_diag: Option<Vec<f64>>,
    truth: Option<Truth>,
    eval: usize,
    schedule: VeSchedule,
    /// The M-step's box filter (0: none).
    bound: f64,
    network: Network,
}

impl Setup {
    /// The run's observations; only the `lead` rank writes them into the run directory.
    fn new(cfg: &Config, run: &Path, lead: bool) -> Result<Self> {
        match cfg.string("experiment")?.as_str() {
            "manifold" => Self::manifold(cfg, run, lead),
            "vectors" => Self::user(cfg, run),
            other => Err(Error::Other(format!(
                "experiment '{other}' is not a vector experiment"
            ))),
        }
    }

    /// The manifold experiment's observations, made from the seed (and saved for `posterior`).
    fn manifold(cfg: &Config, run: &Path, lead: bool) -> Result<Self> {
        let (d, m) = (MANIFOLD_DIM, crate::data::manifold::OBS_DIM);
        let seed = cfg.int("seed")? as u64;
        let n = cfg.count("observations")?;
        let eval = cfg.count("eval_samples")?;
        if n == 0 || eval < 2 {
            return Err(Error::Other(
                "observations and eval_samples must be positive".into(),
            ));
        }
        let manifold = Manifold::new(seed);
        let x = manifold.sample(seed, 0, n);
        let (a, y) = observe(&x, cfg.float("sigma_y")?, seed);
        // Two disjoint ground-truth sets for the debiased divergence.
        let u1 = manifold.sample(seed, 1, eval);
        let u2 = manifold.sample(seed, 2, eval);
        let reference = sinkhorn_cost(&u1, &u2, d, 1e-3, 1024, 1e-3);
        let dir = super::observations_dir(run);
        if lead && !dir.join("obs.npy").is_file() {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::Other(format!("cannot create {}: {e}", dir.display())))?;
            write_npy_f64(&dir.join("operator.npy"), &[n, m, d], &a)?;
            write_npy_f64(&dir.join("truth.npy"), &[n, d], &x)?;
            // Last: its presence means the set is complete.
            write_npy_f64(&dir.join("obs.npy"), &[n, m], &y)?;
        }
        Ok(Setup {
            seed,
            n,
            d,
            m,
            ops: Operators::PerObservation(a),
            y,
            noise_diag: None,
            truth: Some(Truth {
                shown: u1.clone(),
                u1,
                reference,
            }),
            eval,
            schedule: VeSchedule::new(cfg.float("sigma_min")?, cfg.float("sigma_max")?),
            bound: cfg.float("filter_bound")?,
            network: Network::Mlp(TimeMlp::new(d, &hidden_widths(cfg)?, cfg.count("emb")?)),
            cfg: cfg.clone(),
        })
    }

    /// The user's observations (`obs`, `operator`, `sigma_y` or `sigma_y_file`, `truth`).
    fn user(cfg: &Config, run: &Path) -> Result<Self> {
        let need = |key: &str, what: &str| -> Result<crate::io::NpyArray> {
            super::user_array(cfg, run, key, &[2, 3], what)?.ok_or_else(|| {
                Error::Other(format!(
                    "experiment vectors needs {key} (--{} FILE.npy): {what}",
                    key.replace('_', "-")
                ))
            })
        };
        let y = need("obs", "observations [n, m]")?;
        if y.shape.len() != 2 || y.shape[0] == 0 || y.shape[1] == 0 {
            return Err(Error::Other(format!(
                "observations: expected [n, m] with n, m > 0, got {:?}",
                y.shape
            )));
        }
        let (n, m) = (y.shape[0], y.shape[1]);
        let a = need(
            "operator",
            "the operator, [n, m, d] per observation or [m, d] shared",
        )?;
        let (ops, d) = match a.shape.as_slice() {
            [an, am, ad] if *an == n && *am == m && *ad > 0 => (Operators::PerObservation(a.data), *ad),
            [am, ad] if *am == m && *ad > 0 => (Operators::Shared(a.data), *ad),
            other => {
                return Err(Error::Other(format!(
                    "operator: expected [{n}, {m}, d] (per observation) or [{m}, d] (shared) for observations [{n}, {m}], got {other:?}"
                )))
            }
        };
        let noise_diag = match super::user_array(cfg, run, "sigma_y_file", &[1], "observation noise std [m]")?
        {
            None => None,
            Some(s) => {
                if s.shape != [m] || s.data.iter().any(|&v| v <= 0.0) {
                    return Err(Error::Other(format!(
                        "sigma_y_file: expected {m} positive standard deviations [{m}], got shape {:?}",
                        s.shape
                    )));
                }
                Some(s.data.iter().map(|v| v * v).collect())
            }
        };
        let eval = cfg.count("eval_samples")?;
        let truth = match super::user_array(cfg, run, "truth", &[2], "the ground truth [n, d]")? {
            None => None,
            Some(t) if t.shape == [n, d] => {
                // Two disjoint halves of the truth: u1 to compare with, u2 for the reference.
                let e = eval.min(n / 2);
                if e < 2 {
                    return Err(Error::Other(format!(
                        "truth: {n} rows are too few to evaluate on (at least 4)"
                    )));
                }
                let u1 = t.data[..e * d].to_vec();
                let u2 = t.data[e * d..2 * e * d].to_vec();
                let reference = sinkhorn_cost(&u1, &u2, d, 1e-3, 1024, 1e-3);
                Some(Truth {
                    u1,
                    reference,
                    shown: t.data,
                })
            }
            Some(t) => {
                return Err(Error::Other(format!(
                    "truth: expected [{n}, {d}] (one signal per observation), got {:?}",
                    t.shape
                )))
            }
        };
        Ok(Setup {
            seed: cfg.int("seed")? as u64,
            n,
            d,
            m,
            ops,
            y: y.data,
            noise_diag,
            truth,
            eval,
            schedule: VeSchedule::new(cfg.float("sigma_min")?, cfg.float("sigma_max")?),
            bound: cfg.float("filter_bound")?,
            network: Network::Mlp(TimeMlp::new(d, &hidden_widths(cfg)?, cfg.count("emb")?)),
            cfg: cfg.clone(),
        })
    }

    /// The fingerprint of everything observed.
    fn fingerprint(&self) -> Fingerprint {
        let mut f = Fingerprint::new();
        match &self.ops {
            Operators::PerObservation(a) | Operators::Shared(a) => f.add(a),
        };
        f.add(&self.y);
        if let Some(s) = &self.noise_diag {
            f.add(s);
        }
        f
    }

    /// The operator of observations lo..hi on `device`.
    fn operator(&self, lo: usize, hi: usize, device: &Device) -> Result<Box<dyn LinearOperator>> {
        let (m, d) = (self.m, self.d);
        Ok(match &self.ops {
            Operators::PerObservation(a) => Box::new(DenseOperators::new(Tensor::from_f64_as(
                &a[lo * m * d..hi * m * d],
                &[hi - lo, m, d],
                DType::F32,
                device,
            )?)?),
            Operators::Shared(a) => Box::new(SharedOperator::new(Tensor::from_f64_as(
                a,
                &[m, d],
                DType::F32,
                device,
            )?)?),
        })
    }

    /// The observation noise of `rows` observations on `device`.
    fn noise(&self, rows: usize, device: &Device) -> Result<ObservationNoise> {
        Ok(match &self.noise_diag {
            None => ObservationNoise::Scalar(self.cfg.float("sigma_y")?.powi(2)),
            Some(v) => {
                let repeated: Vec<f64> = (0..rows).flat_map(|_| v.iter().copied()).collect();
                ObservationNoise::Diagonal(Tensor::from_f64_as(
                    &repeated,
                    &[rows, self.m],
                    DType::F32,
                    device,
                )?)
            }
        })
    }

    /// Posterior samples [n, d] for every observation under `prior`, in batches.
    #[allow(clippy::too_many_arguments)]
    fn e_step<P: Prior + Sync>(
        &self,
        comm: &dyn Communicator,
        prior: &P,
        covariance: &Covariance,
        mean: Option<&Tensor>,
        kind: SamplerKind,
        steps: usize,
        seed: u64,
        device: &Device,
        label: &str,
    ) -> Result<Vec<f32>> {
        let batch = self.cfg.count("estep_batch")?.max(1);
        let (d, m) = (self.d, self.m);
        let cg = CgConfig {
            max_iters: self.cfg.count("cg_iters")?,
            rtol: Some(self.cfg.float("cg_rtol")?),
        };
        let mut out = Vec::with_capacity(self.n * d);
        let mut phase = Phase::new(label, self.n as u64, "observations");
        for (chunk, first) in (0..self.n).step_by(batch).enumerate() {
            let rows = batch.min(self.n - first);
            let sampler = Sampler::new(kind, steps, self.schedule, Philox::new(seed, chunk as u64));
            // On the CPU in parts of CPU_PART_ROWS rows, this rank's share (em::sample_batch).
            sample_batch(&mut out, rows, d, CPU_PART_ROWS, device, comm, |part, at| {
                let (lo, hi) = (first + part.start, first + part.end);
                let y = Tensor::from_f64_as(&self.y[lo * m..hi * m], &[hi - lo, m], DType::F32, device)?;
                let ops = self.operator(lo, hi, device)?;
                let noise = self.noise(hi - lo, device)?;
                let mut mmps = Mmps::new(prior, ops.as_ref(), &y, &noise, cg);
                mmps.covariance = covariance.clone();
                if sampler.cuda_graphs && device.is_cuda() {
                    // A step replayed from a graph cannot read residuals back: every solve runs
                    // all its iterations, its rows frozen on the device at the tolerance (the
                    // same samples; more CG work where solves converge early). Only where the
                    // steps can be captured at all (not with the Gaussian covariance).
                    let checked = std::mem::replace(&mut mmps.cg_check_every, 0);
                    if !crate::diffusion::Denoise::graph_safe(&mmps) {
                        mmps.cg_check_every = checked;
                    }
                }
                let mean_view = mean.map(|m| m.as_view()).transpose()?;
                sampler.sample_part(
                    &mut mmps,
                    &[hi - lo, d],
                    at,
                    mean_view.as_ref(),
                    DType::F32,
                    device,
                )
            })?;
            phase.set((first + rows) as u64);
        }
        phase.finish();
        ensure_finite_samples(label, &out, d)?;
        Ok(out)
    }

    /// DSM training of `params` on `samples` (drawn with replacement), a fresh Adam state.
    fn m_step(
        &self,
        comm: &dyn Communicator,
        params: Tensor,
        samples: &[f32],
        seed: u64,
        device: &Device,
        lap: usize,
    ) -> Result<(Tensor, f64)> {
        let steps = self.cfg.count("mstep_steps")? as u64;
        let batch = self.cfg.count("mstep_batch")?;
        let d = self.d;
        let count = samples.len() / d;
        if count == 0 {
            return Err(Error::Other(format!(
                "lap {lap}: no posterior sample lies inside the filter box; the run diverged"
            )));
        }
        let lr = LrSchedule::Linear {
            init: self.cfg.float("lr_init")?,
            end: self.cfg.float("lr_end")?,
            steps,
        };
        let den = Denoiser::new(self.network.clone());
        let mut trainer = Trainer::new(den, params, AdamConfig::new(lr), self.schedule, seed)?;
        // The training set goes to the device once; each step's batch is drawn there.
        let pool = Tensor::from_f32(samples, &[count, d], device)?;
        // This rank's rows of every step's batch (all of them for one process).
        let mine = trainer.shard_rows(batch, comm, device)?;
        let (mut tail, mut tail_n) = (0.0, 0usize);
        let mut phase = Phase::new(format!("lap {lap} M-step"), steps, "steps");
        for step in 0..steps {
            if step == steps / 2 {
                kill_requested(lap, comm.rank());
            }
            let xt = gather_rows_uniform(
                &pool,
                mine.len(),
                Philox::new(seed, 0xda7a),
                step * batch as u64 + mine.start as u64,
            )?;
            trainer
                .step_shard(&xt.as_view()?, batch, mine.start, comm)
                .map_err(|e| Error::Other(format!("lap {lap}, M-step {step}: {e}")))?;
            if (step + 1) % 250 == 0 || step + 1 == steps {
                // The losses wait on the device until here (one synchronisation per 250 steps).
                let done = trainer
                    .take_stats()
                    .map_err(|e| Error::Other(format!("lap {lap}, M-step: {e}")))?;
                for st in done.iter().filter(|st| st.step + 100 >= steps) {
                    tail += st.loss;
                    tail_n += 1;
                }
                if let Some(last) = done.last() {
                    phase.message(format!("loss {:.4}", last.loss));
                }
                phase.set(step + 1);
            }
        }
        phase.finish();
        Ok((trainer.params, tail / tail_n.max(1) as f64))
    }

    /// The lap's metrics; the Sinkhorn solve runs on `device` (kernels/sinkhorn.cu on a GPU).
    fn metrics(
        &self,
        lap: usize,
        samples: &[f32],
        loss: f64,
        estep: f64,
        mstep: f64,
        device: &Device,
    ) -> Result<LapMetrics> {
        let d = self.d;
        let kept: Vec<f64> = samples_of(samples, d, self.bound)
            .iter()
            .map(|&v| v as f64)
            .collect();
        let count = kept.len() / d;
        let v = &kept[..self.eval.min(count) * d];
        let start = Instant::now();
        let (sinkhorn, iterations, sliced) = match &self.truth {
            Some(truth) if v.len() >= 2 * d => {
                // method.md §9.1: max(OT(u1, v) - OT(u1, u2), 1e-6).
                let ot = Sinkhorn::PAPER.solve_on(device, &truth.u1, v, d)?;
                (
                    (ot.value - truth.reference).max(1e-6),
                    ot.iterations,
                    sliced_wasserstein(&truth.u1, v, d, 128, 0),
                )
            }
            _ => (f64::NAN, 0, f64::NAN),
        };
        Ok(LapMetrics {
            lap,
            sinkhorn,
            sliced_wasserstein: sliced,
            kept: count,
            loss,
            estep_seconds: estep,
            mstep_seconds: mstep,
            sinkhorn_iterations: iterations,
            eval_seconds: start.elapsed().as_secs_f64(),
            plot_seconds: f64::NAN,
        })
    }
}

/// The TimeMLP's hidden widths, "256,256,256".
fn hidden_widths(cfg: &Config) -> Result<Vec<usize>> {
    cfg.string("hidden")?
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| Error::Other(format!("hidden = '{s}' is not a list of widths")))
        })
        .collect()
}

/// The samples inside the open box (-bound, bound)^d (all of them when bound is 0).
fn samples_of(samples: &[f32], d: usize, bound: f64) -> Vec<f32> {
    if bound <= 0.0 {
        return samples.to_vec();
    }
    samples
        .chunks_exact(d)
        .filter(|p| p.iter().all(|v| (v.abs() as f64) < bound))
        .flatten()
        .copied()
        .collect()
}

/// The Gaussian initialisation's prior, saved with lap 0 (mean, DPLR diagonal and factor, f64)
/// for the E-step's moments when `estep_moments = "init"`, and for a resumed run.
fn write_init_prior(run: &Path, g: &Gaussian) -> Result<()> {
    let dir = lap_dir(run, 0);
    let d = g.mean.len();
    write_npy_f64(&dir.join("prior_mean.npy"), &[d], &g.mean)?;
    write_npy_f64(&dir.join("prior_diag.npy"), &[d], &g.cov.diag)?;
    write_npy_f64(&dir.join("prior_factor.npy"), &[d, g.cov.rank], &g.cov.u)
}

fn read_init_prior(run: &Path) -> Result<Gaussian> {
    let dir = lap_dir(run, 0);
    let read = |name: &str| -> Result<(Vec<usize>, Vec<f64>)> {
        let path = dir.join(name);
        let a = read_npy(&path).map_err(|e| {
            Error::Other(format!(
                "{e} (the Gaussian initialisation's prior, written with lap 0; a run from before it was saved cannot be resumed)"
            ))
        })?;
        Ok((a.shape, a.data))
    };
    let (_, mean) = read("prior_mean.npy")?;
    let (_, diag) = read("prior_diag.npy")?;
    let (shape, u) = read("prior_factor.npy")?;
    let rank = shape.get(1).copied().unwrap_or(0);
    Gaussian::new(mean, Dplr::new(diag, u, rank)?)
}

/// A PPCA fit of rank at most `rank` (and below d) to samples [_, d].
fn fit(samples: &[f32], d: usize, rank: usize) -> Result<Gaussian> {
    let x: Vec<f64> = samples.iter().map(|&v| v as f64).collect();
    ppca(&x, x.len() / d, d, rank.min(d))
}

/// The pair plot shows at most this many coordinates.
const PLOTTED_COORDINATES: usize = 6;

/// The first `k` of the `d` coordinates of every row.
fn first_columns<T: Copy>(x: &[T], d: usize, k: usize) -> Vec<T> {
    x.chunks_exact(d).flat_map(|r| r[..k].iter().copied()).collect()
}

/// A symmetric plot range that holds 99% of the values (at least [-1, 1]).
fn plot_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let mut a: Vec<f64> = values.filter(|v| v.is_finite()).map(f64::abs).collect();
    a.sort_by(f64::total_cmp);
    let top = a.get(a.len() * 99 / 100).copied().unwrap_or(1.0).max(1.0) * 1.1;
    (-top, top)
}

/// Writes lap `lap`'s samples, plots and metrics (the last of `all`, whose `plot_seconds` it
/// sets) and regenerates the run's report.
fn write_lap(
    setup: &Setup,
    run: &Path,
    lap: usize,
    samples: &[f32],
    all: &mut [LapMetrics],
    device: &Device,
) -> Result<()> {
    let d = setup.d;
    let dir = create_lap_dir(run, lap)?;
    write_npy_f32(&dir.join("samples.npy"), &[samples.len() / d, d], samples)?;
    let start = Instant::now();
    write_plots(setup, run, &dir, samples, all)?;
    let last = all.len() - 1;
    all[last].plot_seconds = start.elapsed().as_secs_f64();
    let mut figures = Vec::new();
    if setup.truth.is_some() {
        figures.push(Figure {
            caption: "Distances of the EM samples to the ground truth, by lap".into(),
            path: run.join("divergence.png"),
        });
    }
    figures.push(Figure {
        caption: format!(
            "Lap {lap}: posterior samples (left) and the ground truth (right), first coordinates"
        ),
        path: dir.join("pairs.png"),
    });
    let lines: Vec<String> = all.iter().map(LapMetrics::to_json).collect();
    write_run_report(run, &setup.cfg, device, &lines, figures)?;
    let metrics = &mut all[last];
    metrics.plot_seconds = start.elapsed().as_secs_f64();
    write_atomically(
        &dir.join("metrics.json"),
        format!("{}\n", metrics.to_json()).as_bytes(),
    )
}

/// The lap's pair plot and the run's distance curves.
fn write_plots(setup: &Setup, run: &Path, dir: &Path, samples: &[f32], all: &[LapMetrics]) -> Result<()> {
    let d = setup.d;
    let metrics = &all[all.len() - 1];
    let lap = metrics.lap;
    let k = d.min(PLOTTED_COORDINATES);
    let truth = setup
        .truth
        .as_ref()
        .map_or(Vec::new(), |t| first_columns(&t.shown, d, k));
    let shown = first_columns(samples, d, k);
    // The manifold's box; the user's data by its own spread.
    let range = if setup.cfg.string("experiment")? == "manifold" {
        (-3.0, 3.0)
    } else {
        plot_range(shown.iter().map(|&v| v as f64).chain(truth.iter().copied()))
    };
    let laps = setup.cfg.count("laps")?;
    let what = if lap == 0 {
        "Gaussian initialisation (lap 0)".to_string()
    } else {
        format!("lap {lap} of {laps}")
    };
    let title = if setup.truth.is_some() {
        format!(
            "{what}: posterior samples; Sinkhorn {}, sliced W1 {}",
            metric(metrics.sinkhorn, 4),
            metric(metrics.sliced_wasserstein, 4)
        )
    } else {
        format!("{what}: posterior samples")
    };
    plot::pair_plot(&dir.join("pairs.png"), &title, &shown, &truth, k, range)?;
    if setup.truth.is_none() {
        return Ok(());
    }
    let series = |f: fn(&LapMetrics) -> f64| all.iter().map(|m| (m.lap, f(m))).collect::<Vec<_>>();
    // Lap 0 is the Gaussian initialisation: the line every later lap should fall below.
    let references = all
        .iter()
        .find(|m| m.lap == 0)
        .map(|m| {
            vec![(
                format!("Gaussian initialisation: Sinkhorn {}", metric(m.sinkhorn, 4)),
                m.sinkhorn,
            )]
        })
        .unwrap_or_default();
    plot::curves(
        &run.join("divergence.png"),
        &plot::CurvePlot {
            title: "Distance of the EM samples to the ground truth, by lap",
            y_label: "distance (log scale)",
            log_y: true,
            series: vec![
                plot::Series {
                    name: "Sinkhorn divergence (method.md §9.1)",
                    points: series(|m| m.sinkhorn),
                },
                plot::Series {
                    name: "sliced Wasserstein-1 (128 directions)",
                    points: series(|m| m.sliced_wasserstein),
                },
            ],
            references,
        },
    )
}

/// Runs (or, with `resume`, continues) the EM of a vector experiment (`manifold`, or `vectors`
/// on the user's observations) in `run`; returns every lap's metrics (on rank 0 of a
/// data-parallel run; the other ranks return none).
///
/// Under several ranks ([`crate::dist::world`]) the run directory must be one every rank sees
/// (a resume reads the last lap there); rank 0 alone writes it.
pub fn run_vectors(cfg: &Config, run: &Path, device: &Device, resume: bool) -> Result<Vec<LapMetrics>> {
    cfg.validate()?;
    if cfg.string("experiment")? == "manifold" {
        // The host arrays per observation (f64 truth, operator and observation, and their saved
        // copies; f32 samples, kept twice across a lap), checked before the run directory is made.
        let (d, m) = (MANIFOLD_DIM, crate::data::manifold::OBS_DIM);
        let per_observation = 2 * 8 * (d + m * d + m) + 2 * 4 * d;
        crate::host_pool::ensure_available(
            &format!("observations = {}", cfg.count("observations")?),
            cfg.count("observations")?.saturating_mul(per_observation),
        )?;
    }
    // Data-parallel (dist::world() of several ranks): rank 0 (the lead) opens, writes and
    // reports the run; every rank samples its share of each E-step batch and trains on its share
    // of each M-step batch, and all of them hold the same samples and weights throughout.
    let comm = crate::dist::world();
    let comm = comm.as_ref();
    let lead = comm.rank() == 0;
    let (done, _lock) = super::open_run_on_ranks(cfg, run, resume, device, comm, || {
        Ok(Network::Mlp(TimeMlp::new(
            1,
            &hidden_widths(cfg)?,
            cfg.count("emb")?,
        )))
    })?;
    let mut setup = Setup::new(cfg, run, lead)?;
    setup.network.set_precision(super::precision(cfg, device)?.1);
    if lead {
        check_observations(run, done, setup.fingerprint())?;
    }
    let operators = match setup.ops {
        Operators::PerObservation(_) => format!("one [{}, {}] operator per observation", setup.m, setup.d),
        Operators::Shared(_) => format!("one shared [{}, {}] operator", setup.m, setup.d),
    };
    let data = format!(
        "{} observations y of {} values of signals x of {}, {operators}{}",
        setup.n,
        setup.m,
        setup.d,
        if setup.truth.is_some() {
            ""
        } else {
            "; no ground truth"
        }
    );
    let network = format!(
        "TimeMLP {} -> {} -> {}, {} parameters",
        setup.d,
        cfg.string("hidden")?,
        setup.d,
        setup.network.layout().len()
    );
    if lead {
        print_header(run, cfg, device, &data, &network, done)?;
        super::say_data_parallel(comm);
    }
    let d = setup.d;
    let pc = SamplerKind::Pc {
        corrections: cfg.count("pc_corrections")?,
        tau: cfg.float("pc_tau")?,
    };
    let estep_steps = cfg.count("estep_steps")?;
    let laps = cfg.count("laps")?;
    let tweedie = match cfg.string("covariance")?.as_str() {
        "gaussian" => false,
        "tweedie" => true,
        other => {
            return Err(Error::Other(format!(
                "covariance = '{other}' (expected gaussian or tweedie)"
            )))
        }
    };
    let moments_from_init = match cfg.string("estep_moments")?.as_str() {
        "refit" => false,
        "init" => true,
        other => {
            return Err(Error::Other(format!(
                "estep_moments = '{other}' (expected refit or init)"
            )))
        }
    };
    let filter_first = match cfg.int("filter_first")? {
        0 => false,
        1 => true,
        other => return Err(Error::Other(format!("filter_first = {other} (expected 0 or 1)"))),
    };
    // The lead's record of the laps (the other ranks keep none).
    let mut all = if lead {
        let all = read_lap_metrics(run, done.map(|k| k.min(laps)), LapMetrics::from_json)?;
        write_metrics_jsonl(run, all.iter().map(LapMetrics::to_json))?;
        all
    } else {
        Vec::new()
    };

    let lap_bar = Laps::new(done.map_or(0, |k| k + 1), laps);
    // Lap 0: the Gaussian prior fitted by EM, and the posterior samples under it.
    let (mut samples, mut params, init_prior) = match done {
        Some(k) => {
            let dir = lap_dir(run, k);
            let s = read_npy(&dir.join("samples.npy"))?.to_f32();
            let init_prior = moments_from_init.then(|| read_init_prior(run)).transpose()?;
            let p = lap_params(
                run,
                k,
                &setup.network,
                derive_seed(setup.seed, 0, SEED_PARAMS),
                device,
            )?;
            say(format!("resuming {} after lap {k}", run.display()));
            (s, p, init_prior)
        }
        None => {
            lap_bar.start(0);
            let start = Instant::now();
            let rank = cfg.count("init_rank")?;
            let mut g = Gaussian::new(vec![0.0; d], Dplr::identity(d))?;
            for round in 0..cfg.count("init_rounds")? {
                let mean = g.mean_tensor(DType::F32, device)?;
                let seed = derive_seed(setup.seed, round, SEED_INIT);
                let cov = Covariance::Gaussian(Box::new(g.clone()));
                let x = setup.e_step(
                    comm,
                    &g,
                    &cov,
                    Some(&mean),
                    SamplerKind::Ddim,
                    cfg.count("init_steps")?,
                    seed,
                    device,
                    &format!("init round {round}"),
                )?;
                g = fit(&x, d, rank)?;
            }
            let mean = g.mean_tensor(DType::F32, device)?;
            let cov = Covariance::Gaussian(Box::new(g.clone()));
            let s = setup.e_step(
                comm,
                &g,
                &cov,
                Some(&mean),
                pc,
                estep_steps,
                derive_seed(setup.seed, 0, SEED_ESTEP),
                device,
                "lap 0 E-step",
            )?;
            if lead {
                let m = setup.metrics(0, &s, f64::NAN, start.elapsed().as_secs_f64(), 0.0, device)?;
                all.push(m);
                write_lap(&setup, run, 0, &s, &mut all, device)?;
                say(all[all.len() - 1].summary());
                write_init_prior(run, &g)?;
                mark_done(run, 0)?;
                write_metrics_jsonl(run, all.iter().map(LapMetrics::to_json))?;
            }
            lap_bar.done(0);
            let p =
                setup
                    .network
                    .layout()
                    .init(derive_seed(setup.seed, 0, SEED_PARAMS), DType::F32, device)?;
            // Read back what was written, so a resumed run uses the very same values (f64, so the
            // other ranks' own copy, fitted to the same gathered samples, has the same bits).
            let init_prior = match (moments_from_init, lead) {
                (false, _) => None,
                (true, true) => Some(read_init_prior(run)?),
                (true, false) => Some(g),
            };
            (s, p, init_prior)
        }
    };

    let den = Denoiser::new(setup.network.clone());
    for lap in done.map_or(1, |k| k + 1)..=laps {
        lap_bar.start(lap);
        let train_set = if lap == 1 && !filter_first {
            samples.clone()
        } else {
            samples_of(&samples, d, setup.bound)
        };
        device.set_memory_phase("m-step");
        let t = Instant::now();
        let (new_params, loss) = setup.m_step(
            comm,
            params,
            &train_set,
            derive_seed(setup.seed, lap, SEED_MSTEP),
            device,
            lap,
        )?;
        params = new_params;
        let mstep = t.elapsed().as_secs_f64();
        // The E-step: MMPS under the new network, started at the PPCA mean of the current
        // samples (or, with estep_moments = "init", the Gaussian initialisation's), with that
        // covariance as V (cov_x) unless the Tweedie covariance is asked.
        device.set_memory_phase("e-step");
        let t = Instant::now();
        let moments = match &init_prior {
            Some(g) => g.clone(),
            None => fit(&samples_of(&train_set, d, setup.bound), d, d)?,
        };
        let mean = moments.mean_tensor(DType::F32, device)?;
        let cov = if tweedie {
            Covariance::Tweedie
        } else {
            Covariance::Gaussian(Box::new(moments))
        };
        let prior = NetworkPrior::new(&den, &params)?;
        let seed = derive_seed(setup.seed, lap, SEED_ESTEP);
        samples = setup.e_step(
            comm,
            &prior,
            &cov,
            Some(&mean),
            pc,
            estep_steps,
            seed,
            device,
            &format!("lap {lap} E-step"),
        )?;
        abort_requested(lap)?;
        if !lead {
            // The lap's metrics, checkpoint and pictures are the lead's.
            continue;
        }
        let m = setup.metrics(lap, &samples, loss, t.elapsed().as_secs_f64(), mstep, device)?;
        all.push(m);
        save_lap_checkpoint(
            run,
            lap,
            "manifold",
            setup.seed,
            &setup.schedule,
            &setup.network,
            &params,
        )?;
        write_lap(&setup, run, lap, &samples, &mut all, device)?;
        mark_done(run, lap)?;
        lap_bar.done(lap);
        say(all[all.len() - 1].summary());
        let memory = device.memory_phase_summary();
        if !memory.is_empty() {
            say(format!("  GPU memory by phase: {memory}"));
        }
        // metrics.jsonl follows DONE: a kill between the two leaves it a lap behind, and the
        // resume rewrites it from the complete laps.
        write_metrics_jsonl(run, all.iter().map(LapMetrics::to_json))?;
    }
    Ok(all)
}
