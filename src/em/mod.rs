//! The EM driver (method.md §8): a Gaussian prior fitted by EM first, then laps of E-step
//! (a posterior sample for every observation, batched, with MMPS under the current prior) and
//! M-step (denoising score matching on those samples, warm-started, optimizer state reset).
//!
//! Every lap ends with its results written atomically into `lap-XXX/` of the run directory and
//! a `DONE` marker last; `resume` continues after the last lap that has one. All randomness is
//! Philox keyed by (seed, lap, purpose), so on the CPU a resumed run reproduces an
//! uninterrupted one bit for bit.

pub mod config;
mod image_data;
pub mod images;
pub mod vectors;

pub use config::Config;
pub use images::{run_images, ImageLapMetrics};
pub use vectors::{run_vectors, LapMetrics};

/// The manifold experiment runs through the vector driver ([`run_vectors`]).
pub use vectors::run_vectors as run_manifold;

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::ops::{Precision, PrecisionRequest};

/// A seed for one purpose in one lap, derived from the run's seed (splitmix64).
pub fn derive_seed(seed: u64, lap: usize, purpose: u64) -> u64 {
    let mut z = seed ^ ((lap as u64) << 20) ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `lap-XXX` inside the run directory.
pub fn lap_dir(run: &Path, lap: usize) -> PathBuf {
    run.join(format!("lap-{lap:03}"))
}

/// The last lap whose directory holds a DONE marker (None: not even the initialisation).
pub fn last_complete_lap(run: &Path) -> Option<usize> {
    let mut lap = None;
    for k in 0.. {
        if lap_dir(run, k).join("DONE").is_file() {
            lap = Some(k);
        } else {
            break;
        }
    }
    lap
}

/// Creates the run directory (or checks an existing one) and fails early, naming the path, when
/// it cannot be written.
pub fn prepare_run_dir(run: &Path) -> Result<()> {
    fs::create_dir_all(run)
        .map_err(|e| Error::Other(format!("cannot create the run directory {}: {e}", run.display())))?;
    let probe = run.join(".write-test");
    fs::write(&probe, b"ok").map_err(|e| {
        Error::Other(format!(
            "the run directory {} is not writable: {e}",
            run.display()
        ))
    })?;
    let _ = fs::remove_file(probe);
    Ok(())
}

/// Marks a lap complete (the last write of a lap).
pub fn mark_done(run: &Path, lap: usize) -> Result<()> {
    crate::io::write_atomically(&lap_dir(run, lap).join("DONE"), b"complete\n")
}

/// Appends to `out` the samples of one E-step batch of `rows` rows of `row_len` values:
/// `sample(part, at)` draws rows `part` (in the batch) placed by `at`. A GPU takes the batch
/// whole; the CPU runs it in parts of `cpu_part_rows`, one per core at a time, with the same bits
/// (diffusion::BatchPart). With several ranks in `comm`, each draws its share of the parts
/// (whole CPU parts, [`crate::dist::share_rows`]; a GPU rank one part) and the rows are gathered
/// in order on every rank: the same samples as one process's.
pub fn sample_batch(
    out: &mut Vec<f32>,
    rows: usize,
    row_len: usize,
    cpu_part_rows: usize,
    device: &crate::device::Device,
    comm: &dyn crate::dist::Communicator,
    sample: impl Fn(std::ops::Range<usize>, crate::diffusion::BatchPart) -> Result<crate::tensor::Tensor> + Sync,
) -> Result<()> {
    let world = comm.world_size();
    let part_rows = if device.is_cuda() {
        rows.div_ceil(world)
    } else {
        cpu_part_rows
    };
    let shares: Vec<std::ops::Range<usize>> = (0..world)
        .map(|r| crate::dist::share_rows(rows, part_rows, r, world))
        .collect();
    let mine = shares[comm.rank()].clone();
    let parts = crate::ops::parallel::map_parts(mine.len(), part_rows, |part| {
        let part = mine.start + part.start..mine.start + part.end;
        let at = crate::diffusion::BatchPart {
            first: part.start,
            total: rows,
        };
        sample(part, at)?.to_vec_f32()
    });
    let mut local = Vec::with_capacity(mine.len() * row_len);
    for part in parts {
        local.extend(part?);
    }
    if world == 1 {
        out.extend(local);
        return Ok(());
    }
    let counts: Vec<usize> = shares.iter().map(|s| s.len() * row_len).collect();
    out.extend(crate::dist::all_gather_f32(comm, &local, &counts)?);
    Ok(())
}

/// [`open_run`] for every rank of `comm` (one process: the same): checks, before any work, that
/// each rank gets whole parts of the M-step's batches of the network `net()` makes; rank 0 opens the run directory
/// (and holds its lock) and says whether it is complete; every rank gets the last complete lap.
pub(crate) fn open_run_on_ranks(
    cfg: &Config,
    run: &Path,
    resume: bool,
    device: &crate::device::Device,
    comm: &dyn crate::dist::Communicator,
    net: impl FnOnce() -> Result<crate::diffusion::Network>,
) -> Result<(Option<usize>, Option<RunLock>)> {
    if comm.world_size() > 1 {
        let parts = crate::train::cpu_part_rows(&net()?);
        crate::train::batch_share(parts, cfg.count("mstep_batch")?, comm, device)?;
    }
    let (done, lock) = if comm.rank() == 0 {
        let (done, lock) = open_run(cfg, run, resume, device)?;
        (done, Some(lock))
    } else {
        (None, None)
    };
    let done = share_done(comm, done)?;
    if comm.rank() == 0 {
        say_if_complete(run, done, cfg.count("laps")?);
    }
    Ok((done, lock))
}

/// The last complete lap, as rank 0 found it, on every rank.
pub(crate) fn share_done(comm: &dyn crate::dist::Communicator, done: Option<usize>) -> Result<Option<usize>> {
    let mut word = done.map_or(u64::MAX, |k| k as u64).to_ne_bytes();
    comm.broadcast(0, &mut word)?;
    let k = u64::from_ne_bytes(word);
    Ok((k != u64::MAX).then_some(k as usize))
}

/// The run header's line for a data-parallel run (nothing for one process).
pub(crate) fn say_data_parallel(comm: &dyn crate::dist::Communicator) {
    if comm.world_size() > 1 {
        crate::progress::say(format!(
            "data-parallel over {} ranks ({}): each samples its share of every E-step batch and \
             trains on its share of every M-step batch; rank 0 writes the run",
            comm.world_size(),
            comm.name()
        ));
    }
}

/// Opens the run directory of a fresh run or a resumed one and writes its config.toml; returns
/// the last lap with a DONE marker when resuming. A fresh run refuses a directory that already
/// holds laps.
pub fn open_run(
    cfg: &Config,
    run: &Path,
    resume: bool,
    device: &crate::device::Device,
) -> Result<(Option<usize>, RunLock)> {
    cfg.validate()?;
    prepare_run_dir(run)?;
    let lock = RunLock::acquire(run)?;
    remove_stale_temporaries(run);
    if !resume && last_complete_lap(run).is_some() {
        return Err(Error::Other(format!(
            "{} already holds a run; pass --resume {} to continue it, or choose another --out",
            run.display(),
            run.display()
        )));
    }
    let origin = run.join(ORIGIN_CONFIG);
    if resume && origin.is_file() {
        check_resumable(cfg, &origin, run)?;
    } else if !resume || last_complete_lap(run).is_none() {
        crate::io::write_atomically(&origin, cfg.to_toml().as_bytes())?;
    }
    let provenance = [
        format!("written by {}", crate::kernels::version_line()),
        format!("device: {device}; kernels: {}", crate::kernels::kernels_line()),
        format!(
            "{} {}",
            if resume { "resumed" } else { "started" },
            utc_timestamp(std::time::SystemTime::now())
        ),
    ];
    crate::io::write_atomically(&run.join("config.toml"), cfg.to_toml_with(&provenance).as_bytes())?;
    Ok((if resume { last_complete_lap(run) } else { None }, lock))
}

/// `time` as "2026-12-01 13:55:02 UTC" (civil date from the Unix day count, no time zone
/// database needed).
pub fn utc_timestamp(time: std::time::SystemTime) -> String {
    let secs = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil: eras of 400 years, March-based years.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The configuration a run started with, kept beside the editable config.toml so a resume can
/// tell what changed.
const ORIGIN_CONFIG: &str = ".config.origin.toml";

/// Keys a resumed run may change: how many laps, what is evaluated or kept, and the M-step's
/// learning rates (to continue a run that diverged with a smaller one; the laps already run keep
/// theirs, and `resumes.log` records the change). Every other key defines the data, the model or
/// the laps already run, so a resume that changed it would mix two runs.
const SAFE_ON_RESUME: &[&str] = &[
    "laps",
    "precision",
    "lr_init",
    "lr_end",
    "eval_samples",
    "grid",
    "export_samples",
    "export_every",
    "keep_samples",
    "heldout_samples",
];

fn check_resumable(cfg: &Config, origin: &Path, run: &Path) -> Result<()> {
    let text = fs::read_to_string(origin)
        .map_err(|e| Error::Other(format!("cannot read {}: {e}", origin.display())))?;
    let start = Config::parse(&text, &origin.display().to_string())?;
    let (safe, changed): (Vec<_>, Vec<_>) = start
        .differences(cfg)
        .into_iter()
        .map(|(k, was, now)| {
            (
                SAFE_ON_RESUME.contains(&k.as_str()),
                format!("{k} (was {was}, now {now})"),
            )
        })
        .partition(|(safe, _)| *safe);
    let changed: Vec<String> = changed.into_iter().map(|(_, c)| c).collect();
    if changed.is_empty() {
        if !safe.is_empty() {
            let line = format!(
                "resumed after lap {} with {}\n",
                last_complete_lap(run).map_or("-".into(), |k| k.to_string()),
                safe.iter()
                    .map(|(_, c)| c.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            eprint!("{line}");
            let log = run.join("resumes.log");
            let before = fs::read_to_string(&log).unwrap_or_default();
            crate::io::write_atomically(&log, format!("{before}{line}").as_bytes())?;
        }
        return Ok(());
    }
    Err(Error::Other(format!(
        "this run started with another configuration; a resume may change only {} but {} changed: {}. Restore config.toml or start a new run with --out",
        SAFE_ON_RESUME.join(", "),
        if changed.len() == 1 { "this key" } else { "these keys" },
        changed.join("; ")
    )))
}

/// An exclusive lock on a run directory (`flock` on `DIR/.lock`, which holds the owner's pid),
/// held while a run uses it: a second run into the same directory is refused and names the
/// holder. The kernel drops the lock when the process ends, however it ends.
pub struct RunLock {
    _file: fs::File,
}

impl RunLock {
    /// Takes the lock of the run directory `run` (creating `run/.lock`) and writes our pid into
    /// it; an error naming the holder's pid when another process holds it.
    pub fn acquire(run: &Path) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        let path = run.join(".lock");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::Other(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: flock on a descriptor this File owns; no memory is involved.
        let try_lock =
            |f: &fs::File| unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        let mut locked = try_lock(&file);
        let mut holder = String::new();
        // Our own pid as the holder: a lock this process just released, still shared for a
        // moment with a child forked by another thread before its exec closed the descriptor.
        for _ in 0..100 {
            if locked {
                break;
            }
            holder.clear();
            let _ = file.rewind();
            let _ = file.read_to_string(&mut holder);
            if holder.trim() != std::process::id().to_string() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            locked = try_lock(&file);
        }
        if !locked {
            return Err(Error::Other(format!(
                "{} is in use by another emprior run (pid {}); wait for it to finish or choose another --out",
                run.display(),
                holder.trim()
            )));
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        Ok(RunLock { _file: file })
    }
}

/// Temporary files a killed writer left (`.NAME.tmp-PID`, io::write_atomically) in the run
/// directory and its lap directories; called with the run's lock held, so no writer is live.
fn remove_stale_temporaries(run: &Path) {
    let is_temp = |p: &Path| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.') && n.contains(".tmp-"))
    };
    let mut dirs = vec![run.to_path_buf()];
    if let Ok(entries) = fs::read_dir(run) {
        dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    for dir in dirs {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.is_file() && is_temp(&p) {
                let _ = fs::remove_file(&p);
            }
        }
    }
}

/// Reads back the metrics.json of laps 0..=last (for a resumed run's metrics.jsonl).
pub fn read_lap_metrics<M>(run: &Path, last: Option<usize>, parse: fn(&str) -> Result<M>) -> Result<Vec<M>> {
    let Some(last) = last else {
        return Ok(Vec::new());
    };
    (0..=last)
        .map(|k| {
            let path = lap_dir(run, k).join("metrics.json");
            let text = fs::read_to_string(&path)
                .map_err(|e| Error::Other(format!("lap {k} is marked done but {}: {e}", path.display())))?;
            parse(text.trim())
        })
        .collect()
}

/// One JSON object on one line from (key, number) pairs; non-finite numbers become null.
pub fn json_line(fields: &[(&str, f64)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in fields.iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        if v.is_finite() {
            let _ = write!(s, "{sep}\"{k}\": {v}");
        } else {
            let _ = write!(s, "{sep}\"{k}\": null");
        }
    }
    s.push('}');
    s
}

/// The number stored under `key` in a line written by [`json_line`] (null reads as NaN).
pub fn json_field(line: &str, key: &str) -> Result<f64> {
    let tag = format!("\"{key}\": ");
    let at = line
        .find(&tag)
        .ok_or_else(|| Error::Other(format!("metrics line lacks {key}: {line}")))?;
    let rest = &line[at + tag.len()..];
    let v = rest[..rest.find([',', '}']).unwrap_or(rest.len())].trim();
    if v == "null" {
        return Ok(f64::NAN);
    }
    v.parse()
        .map_err(|_| Error::Other(format!("bad {key} in {line}")))
}

/// Writes every lap's metrics as metrics.jsonl in the run directory.
pub fn write_metrics_jsonl(run: &Path, lines: impl Iterator<Item = String>) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        let _ = writeln!(text, "{l}");
    }
    crate::io::write_atomically(&run.join("metrics.jsonl"), text.as_bytes())
}

/// A metric for a lap summary with `digits` decimals, "-" when the lap did not measure it (no
/// truth to compare with, no M-step in lap 0).
pub fn metric(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "-".into()
    }
}

/// Tells a resume of a finished run that there is nothing left to do (and how to go on).
pub fn say_if_complete(run: &Path, done: Option<usize>, laps: usize) {
    if done.is_some_and(|k| k >= laps) {
        crate::progress::say(format!(
            "{} is complete: all {laps} laps are done; raise `laps` in its config.toml and --resume to run more",
            run.display()
        ));
    }
}

/// For tests of resuming: `EMPRIOR_ABORT_LAP=k` stops the run with an error after lap k's
/// E-step, before anything of lap k is written (as a kill mid-lap would).
pub fn abort_requested(lap: usize) -> Result<()> {
    if std::env::var("EMPRIOR_ABORT_LAP")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        == Some(lap)
    {
        return Err(Error::Other(format!(
            "aborted during lap {lap} (EMPRIOR_ABORT_LAP)"
        )));
    }
    Ok(())
}

/// The test hook for a rank lost mid-lap: with `EMPRIOR_KILL_RANK=r` and `EMPRIOR_ABORT_LAP=k`,
/// rank r of a data-parallel run is killed (SIGKILL, no clean-up: a node lost) halfway through
/// lap k's M-step. The launcher then ends every rank, and lap k stays incomplete for a resume.
pub fn kill_requested(lap: usize, rank: usize) {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
    if var("EMPRIOR_ABORT_LAP") == Some(lap) && var("EMPRIOR_KILL_RANK") == Some(rank) {
        eprintln!("rank {rank}: killed in lap {lap}'s M-step (EMPRIOR_KILL_RANK)");
        // SAFETY: raising a signal at this process; SIGKILL does not return.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    }
}

/// Creates a lap's directory.
pub fn create_lap_dir(run: &Path, lap: usize) -> Result<PathBuf> {
    let dir = lap_dir(run, lap);
    fs::create_dir_all(&dir).map_err(|e| Error::Other(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}

/// The parameters to continue a run from after lap `k`: a fresh initialisation (seeded by
/// `init_seed`) after the Gaussian lap 0, else lap k's checkpoint, which must hold `network`.
pub fn lap_params(
    run: &Path,
    k: usize,
    network: &crate::diffusion::Network,
    init_seed: u64,
    device: &crate::device::Device,
) -> Result<crate::tensor::Tensor> {
    use crate::tensor::DType;
    if k == 0 {
        return network.layout().init(init_seed, DType::F32, device);
    }
    let dir = lap_dir(run, k);
    let ck = crate::io::load_checkpoint(&dir.join("checkpoint.safetensors"), DType::F32)?;
    if ck.network.layout() != network.layout() {
        return Err(Error::Other(format!(
            "{}: the checkpoint's network differs from config.toml's",
            dir.display()
        )));
    }
    ck.params.to_device(device)
}

/// Creates lap `lap`'s directory and saves its checkpoint there, with the lap, seed, experiment
/// and noise range as metadata; returns the directory.
pub fn save_lap_checkpoint(
    run: &Path,
    lap: usize,
    experiment: &str,
    seed: u64,
    schedule: &crate::diffusion::VeSchedule,
    network: &crate::diffusion::Network,
    params: &crate::tensor::Tensor,
) -> Result<PathBuf> {
    let meta = [
        ("lap", lap.to_string()),
        ("seed", seed.to_string()),
        ("experiment", experiment.to_string()),
        ("sigma_min", schedule.sigma_min.to_string()),
        ("sigma_max", schedule.sigma_max.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let dir = create_lap_dir(run, lap)?;
    crate::io::save_checkpoint(&dir.join("checkpoint.safetensors"), network, params, &meta)?;
    Ok(dir)
}

/// Stops a run whose sampler diverged, before anything of the lap is written (so the last
/// complete lap stays resumable): the count of non-finite samples among `samples` (rows of
/// `per` values) and the first one, under `label` (the phase, e.g. "lap 3 E-step").
pub fn ensure_finite_samples(label: &str, samples: &[f32], per: usize) -> Result<()> {
    let Some(first) = samples.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let per = per.max(1);
    let bad = samples
        .chunks(per)
        .filter(|row| row.iter().any(|v| !v.is_finite()))
        .count();
    Err(Error::Other(format!(
        "{label}: {bad} of {} samples hold NaN or infinite values (first: sample {}, value {} at coordinate {}); the prior or the sampler diverged, and nothing of this lap was written (the last complete lap can be resumed; a lower learning rate, more CG iterations or the Gaussian covariance may help)",
        samples.len().div_ceil(per),
        first / per,
        samples[first],
        first % per
    )))
}

/// A 64-bit fingerprint of the observations a run learns from (a word-wise multiply-xorshift
/// hash; it detects changed data, it is not cryptographic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint(u64);

impl Fingerprint {
    /// The fingerprint of nothing, a fixed starting state to [`Fingerprint::add`] data to.
    pub fn new() -> Self {
        Fingerprint(0x243F_6A88_85A3_08D3)
    }

    /// Mixes in a slice of floats (their bits) and its length.
    pub fn add<T: bytemuck::Pod>(&mut self, values: &[T]) -> &mut Self {
        let bytes: &[u8] = bytemuck::cast_slice(values);
        let mut mix = |w: u64| {
            let h = (self.0 ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            self.0 = h ^ (h >> 29);
        };
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            mix(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let mut tail = [0u8; 8];
        tail[..words.remainder().len()].copy_from_slice(words.remainder());
        mix(u64::from_le_bytes(tail));
        mix(bytes.len() as u64);
        self
    }
}

impl Default for Fingerprint {
    fn default() -> Self {
        Self::new()
    }
}

/// Where a run keeps the fingerprint of its observations.
const FINGERPRINT_FILE: &str = ".observations.fingerprint";

/// Records the observations' fingerprint in a fresh run, and checks it on a resume: data files
/// changed since the run started (another dataset, edited PNGs, another masks file) are refused
/// instead of mixing two datasets. A run from before fingerprints were kept gets one now.
pub fn check_observations(run: &Path, done: Option<usize>, fingerprint: Fingerprint) -> Result<()> {
    let path = run.join(FINGERPRINT_FILE);
    let now = format!("{:016x}", fingerprint.0);
    if done.is_some() {
        if let Ok(was) = fs::read_to_string(&path) {
            if was.trim() != now {
                return Err(Error::Other(format!(
                    "the observations differ from those {} started with (fingerprint {} then, {now} now): the data files changed since; restore them, or start a new run with another --out",
                    run.display(),
                    was.trim()
                )));
            }
            return Ok(());
        }
    }
    crate::io::write_atomically(&path, format!("{now}\n").as_bytes())
}

/// Where a run keeps its observations (`observations/*.npy`).
pub fn observations_dir(run: &Path) -> PathBuf {
    run.join("observations")
}

/// A folder of PNGs (one size, grayscale or RGB) as an array: images [n, H, W, C] in the
/// model's range (bytes to [-2, 2), as CIFAR-10's); for `mask`, 0 = missing and 255 = observed
/// (anything else is refused), [n, H, W] when grayscale.
fn png_folder_array(dir: &Path, key: &str) -> Result<crate::io::NpyArray> {
    let (mut shape, bytes) = crate::data::png_images::read_folder(dir)?;
    let data: Vec<f64> = if key == "mask" {
        if let Some(i) = bytes.iter().position(|&b| b != 0 && b != 255) {
            return Err(Error::Other(format!(
                "{}: mask value {i} is {}; a mask PNG holds 0 (missing) or 255 (observed)",
                dir.display(),
                bytes[i]
            )));
        }
        if shape[3] == 1 {
            shape.truncate(3);
        }
        bytes.iter().map(|&b| (b == 255) as u8 as f64).collect()
    } else {
        crate::data::cifar10::to_model(&bytes)
            .iter()
            .map(|&v| v as f64)
            .collect()
    };
    Ok(crate::io::NpyArray {
        shape,
        data,
        dtype: "f4",
    })
}

/// An array of the user's (an .npy file, or for images a folder of PNGs: `png_folder_array`),
/// read from the run's saved copy when there is one (a resume), else from `cfg[key]` and then
/// saved there; finite values only, of a rank in `ranks`.
pub(crate) fn user_array(
    cfg: &Config,
    run: &Path,
    key: &str,
    ranks: &[usize],
    what: &str,
) -> Result<Option<crate::io::NpyArray>> {
    let copy = observations_dir(run).join(format!("{key}.npy"));
    let path = if copy.is_file() {
        copy.clone()
    } else {
        let given = cfg.string(key)?;
        if given.is_empty() {
            return Ok(None);
        }
        PathBuf::from(given)
    };
    let a = if path.is_dir() {
        png_folder_array(&path, key)?
    } else {
        crate::io::read_npy(&path)?
    };
    a.expect_rank(&path, ranks, what)?;
    if let Some(i) = a.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::Other(format!(
            "{}: {what}: value {i} is {} (NaN or infinite)",
            path.display(),
            a.data[i]
        )));
    }
    // Rank 0 alone writes the run directory (the other ranks of a data-parallel run read).
    if !copy.is_file() && crate::dist::is_lead() {
        std::fs::create_dir_all(observations_dir(run))
            .map_err(|e| Error::Other(format!("cannot create {}: {e}", observations_dir(run).display())))?;
        crate::io::write_npy_f64(&copy, &a.shape, &a.data)?;
    }
    Ok(Some(a))
}

/// Regenerates the run's `report.html`: its facts (experiment, preset, build, device, laps),
/// the metrics of every lap so far (`metrics`: lines written by [`json_line`]), `figures` and
/// the run's config.toml. Called after every lap's pictures are written.
pub fn write_run_report(
    run: &Path,
    cfg: &Config,
    device: &crate::device::Device,
    metrics: &[String],
    figures: Vec<crate::io::report::Figure>,
) -> Result<()> {
    use crate::io::report::{write_report, Report};
    let experiment = cfg.string("experiment")?;
    let laps = cfg.count("laps")?;
    let done = metrics.len().saturating_sub(1);
    let facts = [
        ("experiment", experiment.clone()),
        ("preset", cfg.preset_name().unwrap_or("-").to_string()),
        ("run directory", run.display().to_string()),
        (
            "laps",
            format!("{done} of {laps} done (lap 0 is the Gaussian initialisation)"),
        ),
        ("device", device.to_string()),
        ("kernels", crate::kernels::kernels_line()),
        ("build", crate::kernels::version_line()),
        ("updated", utc_timestamp(std::time::SystemTime::now())),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .to_vec();
    let columns = metrics.first().map(|l| json_keys(l)).unwrap_or_default();
    let rows = metrics
        .iter()
        .map(|line| {
            columns
                .iter()
                .map(|k| json_field(line, k).map_or("-".into(), |v| report_value(k, v)))
                .collect()
        })
        .collect();
    let config_toml = fs::read_to_string(run.join("config.toml")).unwrap_or_else(|_| cfg.to_toml());
    write_report(
        &run.join("report.html"),
        &Report {
            title: format!("emprior em {experiment}: {}", run.display()),
            facts,
            columns,
            rows,
            figures,
            config_toml,
        },
    )
}

/// The keys of a line written by [`json_line`], in order.
fn json_keys(line: &str) -> Vec<String> {
    line.split('"').skip(1).step_by(2).map(str::to_string).collect()
}

/// A metric for the report's table: counts as integers, seconds with one decimal, the rest
/// with four significant digits; "-" for what a lap did not measure.
fn report_value(key: &str, v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if key.ends_with("_seconds") {
        format!("{v:.1}")
    } else {
        let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 8) as usize;
        format!("{v:.digits$}")
    }
}

/// The run's network arithmetic: the `precision` key (auto when a saved config.toml from an
/// older version lacks it) resolved on `device`, the tensor cores checked when that is bf16 on a
/// GPU (`nn::tensor_cores::check`).
pub fn precision(cfg: &Config, device: &crate::device::Device) -> Result<(PrecisionRequest, Precision)> {
    let request: PrecisionRequest = match cfg.string("precision") {
        Ok(text) => text.parse()?,
        Err(_) => PrecisionRequest::Auto,
    };
    Ok((request, crate::nn::tensor_cores::resolve(request, device)?))
}

/// What a run prints before its first lap: the run, the device and its kernels, the data, the
/// network, the precision and where everything goes.
pub fn print_header(
    run: &Path,
    cfg: &Config,
    device: &crate::device::Device,
    data: &str,
    network: &str,
    done: Option<usize>,
) -> Result<()> {
    let laps = cfg.count("laps")?;
    let (request, precision) = precision(cfg, device)?;
    let start = match done {
        Some(k) => format!("resuming after lap {k}"),
        None => "a new run".into(),
    };
    crate::progress::say(format!(
        "emprior em {} (preset {}): {start}, laps 0..={laps} (lap 0 is the Gaussian initialisation)\n  \
         device: {}\n  data: {data}\n  network: {network}\n  precision: {}\n  \
         output: {} (config.toml, metrics.jsonl, report.html, lap-XXX/)",
        cfg.string("experiment")?,
        cfg.preset_name().unwrap_or("-"),
        crate::commands::describe_device(device),
        crate::ops::precision::describe(request, precision),
        run.display()
    ));
    Ok(())
}
