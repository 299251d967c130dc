//! The `emprior` command line: parses arguments and calls the library; no logic of its own.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use emprior::device::{probe_cuda, Device, DeviceRequest, Kernels};
use emprior::ops::PrecisionRequest;
use std::path::PathBuf;

use emprior::diffusion::SamplerKind;
use emprior::{bench, commands, kernels};

/// The command line: one subcommand per task.
#[derive(Parser)]
#[command(
    name = "emprior",
    version,
    about = "Diffusion priors from incomplete observations by EM, on CUDA or the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Sampler flags shared by `sample` and `posterior`.
#[derive(clap::Args, Clone, Debug)]
struct SamplerArgs {
    /// ddpm (ancestral), ddim, or pc (predictor-corrector, 1 Langevin step, tau 0.1).
    #[arg(long, default_value = "ddpm")]
    sampler: SamplerKind,
    /// Reverse-diffusion steps from --sigma-max down to --sigma-min (at least 1).
    #[arg(long, default_value_t = 256)]
    steps: usize,
    /// Smallest noise level, where sampling ends [default: the checkpoint's training range, else
    /// 1e-3].
    #[arg(long)]
    sigma_min: Option<f64>,
    /// Largest noise level, where sampling starts [default: the checkpoint's training range, else
    /// 100].
    #[arg(long)]
    sigma_max: Option<f64>,
    /// Seeds the initial noise and every step's noise (the same seed gives the same samples).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The network's arithmetic: auto (bf16 on a GPU with tensor cores, else f32), f32 (exact)
    /// or bf16 (bf16 operands, f32 accumulation).
    #[arg(long, default_value = "auto")]
    precision: PrecisionRequest,
}

impl SamplerArgs {
    fn options(&self) -> commands::SamplerOptions {
        commands::SamplerOptions {
            kind: self.sampler,
            steps: self.steps,
            sigma_min: self.sigma_min,
            sigma_max: self.sigma_max,
            seed: self.seed,
            precision: self.precision,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Print the build (embedded kernels, architectures, toolkit) and the devices found.
    Info {
        /// Require this device (auto, cpu, cuda, cuda:N); exits non-zero if it cannot be used.
        #[arg(long, default_value = "auto")]
        device: DeviceRequest,
        /// Also list every kernel function.
        #[arg(long)]
        kernels: bool,
    },
    /// Print a preset network: architecture, parameter count, forward cost and, with --batch,
    /// the activation memory one forward keeps for the VJPs (MMPS) or the backward.
    Model {
        /// manifold (TimeMLP), cifar10 or mri (U-Nets).
        #[arg(long)]
        preset: String,
        /// Report the memory at this batch size: what one forward keeps, and the peaks of a
        /// training step's forward and backward and of posterior sampling.
        #[arg(long)]
        batch: Option<usize>,
        /// The memory under f32 (the exact path) or bf16 (what `--precision auto` runs on a
        /// GPU with tensor cores: a U-Net keeps its activations in bf16).
        #[arg(long, default_value = "f32")]
        precision: emprior::ops::Precision,
    },
    /// Train a denoiser by denoising score matching on samples (.npy [n, ...]).
    #[command(allow_negative_numbers = true)]
    Train {
        /// The training samples: an .npy [n, ...] (f32, f64 or u8), one sample per row, of the
        /// preset's sample shape.
        #[arg(long)]
        data: PathBuf,
        /// manifold, cifar10, mri, or mlp (a TimeMLP sized to the data).
        #[arg(long)]
        preset: String,
        /// The checkpoint to write (safetensors), once training ends.
        #[arg(long)]
        out: PathBuf,
        /// Adam steps to run (at least 1).
        #[arg(long, default_value_t = 10_000)]
        steps: u64,
        /// Samples per step, drawn with replacement from --data.
        #[arg(long, default_value_t = 256)]
        batch: usize,
        /// Adam's learning rate (constant, or the start of the decay with --lr-end).
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Decay the learning rate linearly to this value over the run [default: constant].
        #[arg(long)]
        lr_end: Option<f64>,
        /// Keep an EMA of the weights with this decay, in [0, 1), and save it instead of the
        /// last weights.
        #[arg(long)]
        ema: Option<f64>,
        /// Smallest noise level of the VE schedule (stored in the checkpoint for sampling).
        #[arg(long, default_value_t = 1e-3)]
        sigma_min: f64,
        /// Largest noise level of the VE schedule (stored in the checkpoint for sampling).
        #[arg(long, default_value_t = 1e2)]
        sigma_max: f64,
        /// Seeds the initialisation, the minibatches and the noise (a run is reproducible).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The network's arithmetic: auto (bf16 on a GPU with tensor cores, else f32), f32
        /// (exact) or bf16 (bf16 operands, f32 accumulation).
        #[arg(long, default_value = "auto")]
        precision: PrecisionRequest,
        /// Where to run: auto (a GPU when one is usable, else the CPU), cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: DeviceRequest,
    },
    /// Draw prior samples from a checkpoint into an .npy [n, ...].
    #[command(allow_negative_numbers = true)]
    Sample {
        /// The prior: a safetensors checkpoint written by `emprior train` or `emprior em`.
        #[arg(long)]
        checkpoint: PathBuf,
        /// How many samples to draw (at least 1).
        #[arg(long)]
        n: usize,
        /// The .npy to write: f32 samples [n, ...] of the network's sample shape.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        sampler: SamplerArgs,
        /// Where to run: auto (a GPU when one is usable, else the CPU), cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: DeviceRequest,
    },
    /// Posterior samples for observations y = A x + noise with MMPS, into an .npy [n, K, ...].
    #[command(allow_negative_numbers = true)]
    Posterior {
        /// The observations y: an .npy [n, m] (or images [n, H, W, C], each read as its m values
        /// in row-major order).
        #[arg(long)]
        obs: PathBuf,
        /// The observation noise's standard deviation (positive; the same for every value).
        #[arg(long)]
        sigma_y: f64,
        /// The .npy to write: f32 samples [n, K, ...] (K = --samples-per-obs).
        #[arg(long)]
        out: PathBuf,
        /// The operator A: an .npy [n, m, d] (one per observation) or [m, d] (shared); or --mask.
        #[arg(long, conflicts_with = "mask", required_unless_present = "mask")]
        operator: Option<PathBuf>,
        /// A 0/1 mask instead of --operator (1 = observed): [n, d], or [n, H, W] broadcast over
        /// channels; --obs then holds whole signals (m = d), any value where missing.
        #[arg(long)]
        mask: Option<PathBuf>,
        /// The prior as a trained checkpoint (safetensors); or --gaussian-mean and --gaussian-cov.
        #[arg(long, conflicts_with_all = ["gaussian_mean", "gaussian_cov"], required_unless_present = "gaussian_mean")]
        checkpoint: Option<PathBuf>,
        /// The prior as a Gaussian instead of --checkpoint: its mean, an .npy [d] (with
        /// --gaussian-cov).
        #[arg(long, requires = "gaussian_cov")]
        gaussian_mean: Option<PathBuf>,
        /// The Gaussian prior's covariance, an .npy [d, d], symmetric positive semi-definite
        /// (with --gaussian-mean).
        #[arg(long, requires = "gaussian_mean")]
        gaussian_cov: Option<PathBuf>,
        #[command(flatten)]
        sampler: SamplerArgs,
        /// Conjugate-gradient iterations per posterior-denoiser call (MMPS's linear solve).
        #[arg(long, default_value_t = 1)]
        cg_iters: usize,
        /// Stop CG early once every system's residual is below this fraction of its start
        /// [default: run all --cg-iters].
        #[arg(long)]
        cg_rtol: Option<f64>,
        /// The denoiser covariance V[x | x_t] in MMPS's solve: tweedie (MMPS, sigma^2 times the
        /// Jacobian), zeros, sigma-t, ones, or gaussian (a Gaussian prior's own covariance).
        #[arg(long, default_value = "tweedie")]
        covariance: String,
        /// Posterior samples K drawn per observation (at least 1).
        #[arg(long, default_value_t = 1)]
        samples_per_obs: usize,
        /// Use DPS (the baseline) with this step size zeta (positive) instead of MMPS; --cg-* and
        /// --covariance are then unused.
        #[arg(long)]
        dps_zeta: Option<f64>,
        /// Where to run: auto (a GPU when one is usable, else the CPU), cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: DeviceRequest,
    },
    /// Learn a diffusion prior from observations by EM (the paper's experiments).
    Em {
        /// The experiment: manifold, cifar10, fashion-mnist or mri (accelerated MRI from k-space);
        /// vectors or images on your own data.
        experiment: String,
        /// quick (the default: minutes on a 2-core CPU), smoke (cifar10, mri: the paper's U-Net
        /// for a few GPU minutes) or paper.
        #[arg(long, default_value = "quick")]
        preset: String,
        /// Images: the percentage of pixels removed (25, 50 or 75 in the paper); the same as
        /// --set corruption=N.
        #[arg(long)]
        corruption: Option<f64>,
        /// mri: the k-space undersampling factor R, about one column in R kept (6 in the paper);
        /// the same as --set acceleration=R.
        #[arg(long)]
        acceleration: Option<f64>,
        /// Override a configuration value, e.g. --set laps=4 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// vectors: your observations [n, m]; images: your observed images [n, H, W, C] (.npy),
        /// or a folder of PNGs (the same as --set obs=PATH).
        #[arg(long)]
        obs: Option<PathBuf>,
        /// images: the masks [n, H, W] or [n, H, W, C] of --obs, 1 = observed (.npy), or a folder
        /// of mask PNGs in the same name order (0 = missing, 255 = observed).
        #[arg(long)]
        mask: Option<PathBuf>,
        /// vectors: the operators, [n, m, d] (one per observation) or [m, d] (shared).
        #[arg(long)]
        operator: Option<PathBuf>,
        /// vectors, images: the observation noise standard deviation (--set sigma_y=S).
        #[arg(long)]
        sigma_y: Option<f64>,
        /// vectors: a file of m noise standard deviations [m] (a diagonal noise).
        #[arg(long)]
        sigma_y_file: Option<PathBuf>,
        /// vectors, images: the true signals [n, d] or images, when known; only the metrics use
        /// them.
        #[arg(long)]
        truth: Option<PathBuf>,
        /// The run directory (default runs/<experiment>-<preset>).
        #[arg(long, conflicts_with = "resume")]
        out: Option<PathBuf>,
        /// Continue the run in this directory after its last complete lap (its config.toml).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Where to run: auto (a GPU when one is usable, else the CPU), cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: DeviceRequest,
    },
    /// Print every configuration key of `emprior em` (the `--set` keys): its valid values and
    /// its meaning, as a markdown table (the README's copy is checked against it).
    Keys,
    /// Copy the first images of the fetched CIFAR-10 into a small directory of the same layout
    /// (for machines without registry access: `--set data_dir=DIR`).
    Cifar10Subset {
        /// Training images (at most 10,000).
        #[arg(long, default_value_t = 1024)]
        train: usize,
        /// Test images.
        #[arg(long, default_value_t = 64)]
        test: usize,
        /// The directory to write (created), in the fetched dataset's layout: data_batch_1.png and
        /// test_batch.png, one image per row.
        #[arg(long)]
        out: PathBuf,
        /// The full dataset (default: the fetch script's cache).
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Time the kernels (CUDA events on a GPU) and print a markdown table with throughput against
    /// ceilings measured in the same run; with --peers, the workloads measured beside PyTorch and
    /// JAX (benches/baselines/WORKLOADS.md) and a projection of paper runs from their rates.
    Bench {
        /// Where to measure: auto (a GPU when one is usable, else the CPU), cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: DeviceRequest,
        /// Fewer shapes and repeats (about a minute on a GPU).
        #[arg(long)]
        quick: bool,
        /// Measure the peer workloads instead of the kernels.
        #[arg(long)]
        peers: bool,
        /// With --peers: comma-separated workloads (default: all on a GPU, the small ones on the CPU).
        #[arg(long, value_delimiter = ',', requires = "peers")]
        workloads: Vec<String>,
        /// With --peers: timed runs per workload after warm-up (default 10, 3 with --quick).
        #[arg(long, requires = "peers")]
        repeats: Option<usize>,
        /// With --peers: append one JSON line per workload to this file.
        #[arg(long, requires = "peers")]
        json: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    // A closed pipe (`emprior info | head -1`) ends the process quietly, as it does any Unix
    // tool, instead of panicking in println!.
    // SAFETY: restoring the default disposition of one signal before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    emprior::tune_cpu_allocator();
    let cli = Cli::parse();
    // Launched by mpirun/srun as several processes: the data-parallel EM over MPI (with the
    // `mpi` feature), or a refusal before any work (without it).
    let computes = matches!(
        cli.command,
        Command::Em { .. } | Command::Train { .. } | Command::Sample { .. } | Command::Posterior { .. }
    );
    let world = if computes {
        match emprior::dist::launch().and_then(|l| emprior::dist::communicator(&l)) {
            Ok(world) => {
                let _ = emprior::dist::install(world.clone());
                world
            }
            Err(e) => {
                eprintln!("error: {e}");
                return std::process::ExitCode::FAILURE;
            }
        }
    } else {
        emprior::dist::world()
    };
    if world.world_size() > 1 && !matches!(cli.command, Command::Em { .. }) {
        eprintln!(
            "error: launched as rank {} of {}: only `emprior em` runs data-parallel; run train, \
             sample and posterior as one process",
            world.rank(),
            world.world_size()
        );
        world.abort(2);
        return std::process::ExitCode::FAILURE;
    }
    if world.rank() > 0 {
        // Rank 0 speaks for the job: the others' progress and summaries would repeat its own.
        emprior::progress::set_quiet(true);
    }
    if world.world_size() > 1 {
        say_when_terminated(world.rank(), world.world_size());
    }
    let result = emprior::ops::parallel::on_pool(move || match cli.command {
        Command::Info { device, kernels } => info(device, kernels),
        Command::Bench {
            device,
            quick,
            peers: false,
            ..
        } => bench(device, quick),
        Command::Bench {
            device,
            quick,
            peers: true,
            workloads,
            repeats,
            json,
        } => bench_peers(device, quick, &workloads, repeats, json.as_deref()),
        Command::Cifar10Subset {
            train,
            test,
            out,
            from,
        } => {
            let from = from.unwrap_or_else(emprior::data::cifar10::default_dir);
            emprior::data::cifar10::write_subset(&from, &out, train, test)
                .map(|()| {
                    println!(
                        "wrote {train} training and {test} test images to {}",
                        out.display()
                    )
                })
                .map_err(Into::into)
        }
        Command::Model {
            preset,
            batch,
            precision,
        } => model(&preset, batch, precision),
        Command::Keys => {
            print!("{}", emprior::em::config::keys_markdown());
            Ok(())
        }
        Command::Em {
            experiment,
            preset,
            corruption,
            acceleration,
            overrides,
            obs,
            mask,
            operator,
            sigma_y,
            sigma_y_file,
            truth,
            out,
            resume,
            device,
        } => {
            let mut overrides = overrides;
            if let Some(c) = corruption {
                overrides.insert(0, format!("corruption={c}"));
            }
            if let Some(r) = acceleration {
                overrides.insert(0, format!("acceleration={r}"));
            }
            if let Some(s) = sigma_y {
                overrides.insert(0, format!("sigma_y={s}"));
            }
            // Files by absolute path, so a resume finds them from anywhere.
            let files = [
                ("obs", obs),
                ("mask", mask),
                ("operator", operator),
                ("sigma_y_file", sigma_y_file),
                ("truth", truth),
            ];
            for (key, path) in files {
                if let Some(p) = path {
                    let p = std::path::absolute(&p).unwrap_or(p);
                    overrides.insert(0, format!("{key}={}", p.display()));
                }
            }
            em(&experiment, &preset, &overrides, out, resume, device)
        }
        Command::Train {
            data,
            preset,
            out,
            steps,
            batch,
            lr,
            lr_end,
            ema,
            sigma_min,
            sigma_max,
            seed,
            precision,
            device,
        } => {
            let o = commands::TrainOptions {
                data,
                preset,
                out,
                steps,
                batch,
                lr,
                lr_end,
                ema,
                sigma_min,
                sigma_max,
                seed,
                precision,
                device,
                log_every: (steps / 20).max(1),
            };
            // The header, the progress and the summary are on stderr.
            commands::train(&o).map(|_loss| ()).map_err(Into::into)
        }
        Command::Sample {
            checkpoint,
            n,
            out,
            sampler,
            device,
        } => commands::sample(&checkpoint, n, &out, &sampler.options(), device).map_err(Into::into),
        Command::Posterior {
            obs,
            sigma_y,
            out,
            operator,
            mask,
            checkpoint,
            gaussian_mean,
            gaussian_cov,
            sampler,
            cg_iters,
            cg_rtol,
            covariance,
            samples_per_obs,
            dps_zeta,
            device,
        } => {
            let operator = match (operator, mask) {
                (Some(a), _) => commands::OperatorSource::Matrix(a),
                (None, Some(m)) => commands::OperatorSource::Mask(m),
                (None, None) => unreachable!("clap requires one"),
            };
            let prior = match (checkpoint, gaussian_mean, gaussian_cov) {
                (Some(c), _, _) => commands::PriorSource::Checkpoint(c),
                (None, Some(mean), Some(cov)) => commands::PriorSource::Gaussian { mean, cov },
                _ => unreachable!("clap requires a prior"),
            };
            let o = commands::PosteriorOptions {
                obs,
                sigma_y,
                out,
                operator,
                prior,
                sampler: sampler.options(),
                cg_iters,
                cg_rtol,
                covariance,
                samples_per_obs,
                dps_zeta,
                device,
            };
            commands::posterior(&o).map_err(Into::into)
        }
    });
    match result {
        Ok(()) => {
            emprior::dist::finish();
            std::process::ExitCode::SUCCESS
        }
        Err(e) if world.world_size() > 1 => {
            // The other ranks may be waiting in a collective for this one: stop them all.
            eprintln!("error (rank {} of {}): {e:#}", world.rank(), world.world_size());
            world.abort(1);
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The line a rank prints when its launcher ends it (SIGTERM: another rank failed or died, or the
/// job's time ran out), written by the handler without allocating.
static TERMINATED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

extern "C" fn on_sigterm(_signal: libc::c_int) {
    if let Some(line) = TERMINATED.get() {
        // SAFETY: write(2) and _exit are async-signal-safe; the buffer lives for the process.
        unsafe {
            libc::write(2, line.as_ptr().cast(), line.len());
        }
    }
    // SAFETY: as above.
    unsafe { libc::_exit(143) }
}

/// A rank of a data-parallel job says why it stops when the launcher ends it, instead of
/// vanishing silently beside the rank that failed.
fn say_when_terminated(rank: usize, world: usize) {
    let line = format!(
        "error (rank {rank} of {world}): stopped by the launcher (SIGTERM): another rank failed or \
         was lost, or the job's time ran out; the laps with a DONE marker are kept, and --resume \
         continues after the last\n"
    );
    let _ = TERMINATED.set(line.into_bytes());
    // SAFETY: installing a handler that only calls async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGTERM, on_sigterm as *const () as libc::sighandler_t);
    }
}

fn info(request: DeviceRequest, list_kernels: bool) -> Result<()> {
    println!("{}", kernels::version_line());
    println!("build: {}", kernels::build_summary());
    println!("data-parallel: {}", emprior::dist::transports());
    if list_kernels {
        for (module, func) in Kernels::names() {
            println!("  kernel {module}.cu :: {func}");
        }
    }
    match probe_cuda() {
        Ok(n) => {
            println!("CUDA devices: {n}");
            for i in 0..n {
                match Device::cuda(i) {
                    Ok(d) => println!("  {d:?}: ready"),
                    Err(e) => println!("  cuda:{i}: {e}"),
                }
            }
        }
        Err(reason) => println!("GPU unavailable: {reason}"),
    }
    println!(
        "cpu: {} threads available",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    // What `--precision auto` means on the selected device.
    let precision = |d: &Device| {
        let p = PrecisionRequest::Auto.resolve(d);
        println!(
            "precision: --precision auto computes in {} here{}",
            p.name(),
            match p {
                emprior::ops::Precision::Bf16 => " (bf16 operands on the tensor cores, f32 accumulation)",
                emprior::ops::Precision::F32 => " (the exact path)",
            }
        );
    };
    let device = match request {
        DeviceRequest::Auto => {
            let (d, why) = Device::auto();
            if let Some(why) = why {
                println!("selected: cpu (auto; GPU unavailable: {why})");
            } else {
                println!("selected: {d:?} (auto)");
            }
            precision(&d);
            return Ok(());
        }
        r => Device::open(r),
    };
    match device {
        Ok(d) => {
            println!("selected: {d:?}");
            precision(&d);
        }
        Err(e) => bail!("--device {request}: {e}"),
    }
    Ok(())
}

fn bench_peers(
    request: DeviceRequest,
    quick: bool,
    workloads: &[String],
    repeats: Option<usize>,
    json: Option<&std::path::Path>,
) -> Result<()> {
    use emprior::bench::peers;
    // Timings are of the work, not of poison memsets (cargo sets EMPRIOR_POISON=1).
    emprior::set_poison(false);
    let device = Device::open(request)?;
    let names: Vec<&str> = if workloads.is_empty() {
        peers::default_workloads(&device)
    } else {
        workloads.iter().map(String::as_str).collect()
    };
    let repeats = repeats.unwrap_or(if quick { 3 } else { 10 });
    let rows = peers::run(&device, &names, repeats, json)?;
    print!(
        "{}",
        peers::format_table(&format!("emprior on {device:?}"), &rows)
    );
    println!();
    print!("{}", peers::projection(&rows));
    Ok(())
}

fn bench(request: DeviceRequest, quick: bool) -> Result<()> {
    // Timings are of the kernels, not of poison memsets (cargo sets EMPRIOR_POISON=1).
    emprior::set_poison(false);
    let device = Device::open(request)?;
    let (title, rows) = match &device {
        Device::Cuda(dev) => (
            format!("GPU kernels on {dev:?}"),
            bench::run_gpu(dev, &device, quick)?,
        ),
        Device::Cpu => ("CPU (wall clock)".to_string(), bench::run_cpu(quick)?),
    };
    print!("{}", bench::format_table(&title, &rows));
    println!();
    // A failure of the tensor-core table (new kernels) still lets the traffic table run; the
    // command fails at the end with it.
    let mut tensor_core_error = None;
    if let Device::Cuda(dev) = &device {
        match bench::tensor_cores::run(dev, &device, quick) {
            Ok(rows) => {
                let title = format!("Tensor-core kernels (bf16) on {dev:?}");
                print!("{}", bench::format_table(&title, &rows));
                println!();
            }
            Err(e) => {
                eprintln!("error: the tensor-core table failed: {e}");
                tensor_core_error = Some(e);
            }
        }
    }
    let traffic = bench::run_host_traffic(&device, quick)?;
    print!(
        "{}",
        bench::format_traffic_table(&format!("Host traffic on {device}"), &traffic)
    );
    match tensor_core_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

fn model(name: &str, batch: Option<usize>, precision: emprior::ops::Precision) -> Result<()> {
    print!("{}", emprior::commands::model_report(name, batch, precision)?);
    Ok(())
}

fn em(
    experiment: &str,
    preset: &str,
    overrides: &[String],
    out: Option<PathBuf>,
    resume: Option<PathBuf>,
    request: DeviceRequest,
) -> Result<()> {
    use emprior::em::{run_images, run_vectors, Config};

    let (cfg, dir, resuming) = match resume {
        Some(dir) => {
            if !overrides.is_empty() {
                bail!("--resume continues a run with its saved config.toml; --set cannot change it");
            }
            let path = dir.join("config.toml");
            let text = std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            (Config::parse(&text, &path.display().to_string())?, dir, true)
        }
        None => {
            let mut cfg = Config::preset(experiment, preset)?;
            for o in overrides {
                cfg.set(o)?;
            }
            let dir = out.unwrap_or_else(|| PathBuf::from(format!("runs/{experiment}-{preset}")));
            (cfg, dir, false)
        }
    };
    // One GPU per rank, by local rank, when several ranks share a node.
    let world = emprior::dist::world();
    let local_rank = if world.world_size() > 1 {
        emprior::dist::launch()?.local_rank
    } else {
        0
    };
    let device = match request {
        DeviceRequest::Auto => {
            let (d, why) = Device::auto_at(local_rank);
            if let (Some(why), true) = (why, world.rank() == 0) {
                eprintln!("device: cpu (GPU unavailable: {why})");
            }
            d
        }
        DeviceRequest::Cuda(0) if local_rank > 0 => Device::cuda(local_rank)?,
        r => Device::open(r)?,
    };
    // The run's header (device, data, network, output) comes from the run itself; every value
    // is in DIR/config.toml with its meaning.
    let experiment_name = cfg.string("experiment")?;
    let (first, last, plots) = match experiment_name.as_str() {
        "manifold" | "vectors" => {
            let laps = run_vectors(&cfg, &dir, &device, resuming)?;
            let s = |m: Option<&emprior::em::LapMetrics>| m.map(|m| m.summary()).unwrap_or_default();
            (
                s(laps.first()),
                s(laps.last()),
                "divergence.png, lap-XXX/pairs.png",
            )
        }
        "cifar10" | "fashion-mnist" | "images" | "mri" => {
            let laps = run_images(&cfg, &dir, &device, resuming)?;
            let s = |m: Option<&emprior::em::ImageLapMetrics>| m.map(|m| m.summary()).unwrap_or_default();
            let plots = if experiment_name == "mri" {
                "psnr.png, lap-XXX/{heldout,observations,posterior,prior}.png, lap-000/masks.png"
            } else {
                "lap-XXX/{observations,posterior,heldout,prior}.png"
            };
            (s(laps.first()), s(laps.last()), plots)
        }
        other => bail!("unknown experiment '{other}'"),
    };
    if !emprior::dist::is_lead() {
        // Rank 0 reports the job.
        return Ok(());
    }
    println!("first lap: {first}");
    if last != first {
        println!("last lap:  {last}");
    }
    println!(
        "metrics: {}; plots in {}: {plots}",
        dir.join("metrics.jsonl").display(),
        dir.display()
    );
    Ok(())
}
