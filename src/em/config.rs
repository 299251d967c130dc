//! EM run configuration: presets as TOML text compiled into the binary, `--set key=value`
//! overrides checked against the keys and types, and the resolved configuration written to (and
//! read back from) the run directory.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::error::{Error, Result};

/// The manifold experiment (method.md §7.1, §8): `quick` finishes in minutes on 2 CPU cores;
/// `paper` is the paper's scale (GPU).
pub const MANIFOLD_QUICK: &str = r#"
# Low-dimensional manifold, quick: small enough for a 2-core CPU in a few minutes.
experiment = "manifold"
seed = 0
# The network's arithmetic: auto (bf16 operands with f32 accumulation on a GPU with tensor
# cores, f32 on the CPU), f32 (exact) or bf16. May change on --resume.
precision = "auto"
observations = 4096
sigma_y = 0.01
sigma_min = 0.001
sigma_max = 10.0
laps = 10
init_rounds = 16
init_steps = 64
init_rank = 5
estep_steps = 48
estep_batch = 1024
pc_corrections = 1
pc_tau = 0.1
covariance = "gaussian"
# Where the E-step's starting mean and Gaussian covariance come from: "refit" (a PPCA of each
# lap's samples, ours) or "init" (the Gaussian initialisation's, fixed for all laps, as the
# paper's script does).
estep_moments = "refit"
# 1: drop lap 0's samples outside the box before the first M-step (ours); 0: keep them all (the
# paper's script). Later laps are always filtered.
filter_first = 1
cg_iters = 10
cg_rtol = 0.001
mstep_steps = 2500
mstep_batch = 256
lr_init = 0.001
lr_end = 0.000001
hidden = "256,256,256"
emb = 64
filter_bound = 3.0
# Entropic OT on the CPU is O(n^2) per iteration: 512 points per set here, 16,384 in the paper.
eval_samples = 512
"#;

/// The manifold experiment at the paper's scale (method.md §7.1, §8.3): 65,536 observations,
/// 32 laps, the initialisation's moments for every lap as the paper's script; meant for a GPU.
pub const MANIFOLD_PAPER: &str = r#"
# Low-dimensional manifold at the paper's scale (method.md §7.1, §8.3).
experiment = "manifold"
seed = 0
# The network's arithmetic: auto (bf16 operands with f32 accumulation on a GPU with tensor
# cores, f32 on the CPU), f32 (exact) or bf16. May change on --resume.
precision = "auto"
observations = 65536
sigma_y = 0.01
sigma_min = 0.001
sigma_max = 10.0
laps = 32
init_rounds = 16
init_steps = 256
init_rank = 5
estep_steps = 4096
estep_batch = 16384
pc_corrections = 1
pc_tau = 0.1
covariance = "gaussian"
# As the paper's script: the initialisation's moments for every lap, lap 0 unfiltered.
estep_moments = "init"
filter_first = 0
cg_iters = 20
cg_rtol = 0.001
mstep_steps = 65536
mstep_batch = 1024
lr_init = 0.001
lr_end = 0.000001
hidden = "256,256,256"
emb = 64
filter_bound = 3.0
# The paper evaluates on 16,384 points with a GPU Sinkhorn; ours runs on the host (O(n^2) per
# iteration), so 4,096 keeps a lap's evaluation to minutes. Raise it when time allows.
eval_samples = 4096
"#;

/// EM on the user's own vectors (`emprior em vectors --obs y.npy --operator A.npy`): the
/// manifold experiment's method and TimeMLP, with the data from files. Sized for minutes on a
/// 2-core CPU at a few thousand observations of a few dimensions; scale `mstep_steps`,
/// `estep_steps` and `laps` up for a real run.
pub const VECTORS_QUICK: &str = r#"
# EM on your own vectors: observations y = A x + noise from .npy files.
experiment = "vectors"
# Observations [n, m] (float32 or float64 .npy); set by --obs.
obs = ""
# Operators: [n, m, d] (one per observation) or [m, d] (shared); set by --operator.
operator = ""
# Observation noise standard deviation, or a file of m of them (a diagonal; --sigma-y-file).
sigma_y = 0.01
sigma_y_file = ""
# The true signals [n, d], when known: only for the metrics (--truth).
truth = ""
seed = 0
# The network's arithmetic: auto (bf16 operands with f32 accumulation on a GPU with tensor
# cores, f32 on the CPU), f32 (exact) or bf16. May change on --resume.
precision = "auto"
# The noise range of the diffusion prior: sigma_max well above the data's spread (standardise
# your data first), sigma_min well below the detail you care about.
sigma_min = 0.001
sigma_max = 10.0
laps = 10
init_rounds = 16
init_steps = 64
init_rank = 8
estep_steps = 48
estep_batch = 1024
pc_corrections = 1
pc_tau = 0.1
covariance = "gaussian"
estep_moments = "refit"
filter_first = 0
cg_iters = 10
cg_rtol = 0.001
mstep_steps = 2500
mstep_batch = 256
lr_init = 0.001
lr_end = 0.000001
hidden = "256,256,256"
emb = 64
# Drop samples outside (-filter_bound, filter_bound)^d before training; 0 keeps them all.
filter_bound = 0.0
# Points per set of the Sinkhorn divergence to the truth (only with truth).
eval_samples = 512
"#;

/// EM on the user's own masked images (`emprior em images --obs y.npy --mask m.npy`): the
/// CIFAR-10 quick preset's small U-Net and schedule, the data from files; widths by `--set
/// channels=...`.
pub const IMAGES_QUICK: &str = r#"
# EM on your own masked images: observed images and their masks from .npy files.
experiment = "images"
dataset = "npy"
# Observed images [n, H, W, C] or [n, H, W] in the model's range (about [-2, 2]); --obs.
obs = ""
# Masks [n, H, W] (shared by the channels) or [n, H, W, C], 1 = observed; --mask.
mask = ""
# The true images, when known: only for PSNR/SSIM (--truth).
truth = ""
seed = 0
# The network's arithmetic: auto (bf16 operands with f32 accumulation on a GPU with tensor
# cores, f32 on the CPU), f32 (exact) or bf16. May change on --resume.
precision = "auto"
sigma_y = 0.001
sigma_min = 0.001
sigma_max = 100.0
# The first observations shown (and scored, with a truth) as the "held-out" set each lap.
heldout = 16
# Posterior samples averaged into each held-out posterior mean.
heldout_samples = 2
laps = 3
init_observations = 1024
init_rounds = 4
init_steps = 32
init_rank = 32
init_cg_iters = 16
init_cg_rtol = 0.001
estep_steps = 24
estep_batch = 64
cg_iters = 1
prior_steps = 24
mstep_epochs = 20
mstep_batch = 32
lr = 0.001
ema = 0.99
# Flips and shifts of the samples in the M-step: off, as not every image allows them.
augment = 0
shift = 0
channels = "16,32"
blocks = "1,1"
# level:heads, comma-separated; empty for none.
attention = ""
emb = 64
dropout = 0.1
grid = 64
# Prior samples written as PNGs for FID tools at the last lap (and every export_every laps).
export_samples = 0
export_every = 0
keep_samples = 1
"#;

/// Corrupted CIFAR-10, quick: a small U-Net on 384 observations, minutes per lap on 2 CPU
/// cores (method.md §7.2, scaled down; `paper` has the paper's values).
pub const CIFAR10_QUICK: &str = r#"
# Corrupted CIFAR-10, quick: a small U-Net and a subset, for a 2-core CPU in under 15 minutes.
experiment = "cifar10"
dataset = "cifar10"
# Empty: $EMPRIOR_DATA/cifar10 or ~/.cache/emprior/cifar10 (scripts/fetch-cifar10.sh).
data_dir = ""
seed = 0
# The network's arithmetic: auto (bf16 operands with f32 accumulation on a GPU with tensor
# cores, f32 on the CPU), f32 (exact) or bf16. May change on --resume.
precision = "auto"
# Percentage of pixels removed (25, 50 or 75 in the paper).
corruption = 75.0
sigma_y = 0.001
sigma_min = 0.001
sigma_max = 100.0
observations = 384
heldout = 16
# Posterior samples averaged into each held-out posterior mean.
heldout_samples = 2
laps = 3
init_observations = 384
init_rounds = 4
init_steps = 32
init_rank = 32
init_cg_iters = 16
init_cg_rtol = 0.001
estep_steps = 24
estep_batch = 64
cg_iters = 1
prior_steps = 24
mstep_epochs = 20
mstep_batch = 32
lr = 0.001
ema = 0.99
augment = 1
shift = 1
channels = "16,32"
blocks = "1,1"
# level:heads, comma-separated; empty for none.
attention = ""
emb = 64
dropout = 0.1
grid = 64
# Prior samples written as PNGs for FID tools at the last lap (and every export_every laps).
export_samples = 0
export_every = 0
keep_samples = 1
"#;

/// Corrupted CIFAR-10 at the paper's scale (method.md §7.2, §8, §9.2): 50,000 observations,
/// the 57.6M-parameter U-Net, 256 epochs per lap, 32 laps.
pub const CIFAR10_PAPER: &str = r#"
# Corrupted CIFAR-10 at the paper's scale (GPU).
experiment = "cifar10"
dataset = "cifar10"
data_dir = ""
seed = 0
# The network's arithmetic: auto (bf16 operands with f32 accumulation on a GPU with tensor
# cores, f32 on the CPU), f32 (exact) or bf16. May change on --resume.
precision = "auto"
corruption = 75.0
sigma_y = 0.001
sigma_min = 0.001
sigma_max = 100.0
observations = 50000
heldout = 1000
heldout_samples = 4
laps = 32
init_observations = 16384
init_rounds = 16
init_steps = 256
init_rank = 64
# The paper runs CG to convergence here (maxiter None).
init_cg_iters = 128
init_cg_rtol = 0.00001
estep_steps = 256
estep_batch = 256
cg_iters = 1
prior_steps = 256
mstep_epochs = 256
mstep_batch = 256
lr = 0.0002
ema = 0.9999
augment = 1
shift = 1
channels = "128,256,384"
blocks = "5,5,5"
attention = "1:4"
emb = 256
dropout = 0.1
grid = 64
# 196 batches of 256, as the paper's FID protocol; export_every = 1 evaluates every lap.
export_samples = 50176
export_every = 0
keep_samples = 0
"#;

/// The paper's U-Net on a GPU for a few minutes: every kernel of the real experiment, with
/// few observations and steps, and E-step and M-step throughput to project a full lap from.
pub const CIFAR10_SMOKE: &str = r#"
# Corrupted CIFAR-10 smoke run: the paper's U-Net, few observations and steps (GPU, minutes).
experiment = "cifar10"
dataset = "cifar10"
data_dir = ""
seed = 0
# The network's arithmetic: auto (bf16 operands with f32 accumulation on a GPU with tensor
# cores, f32 on the CPU), f32 (exact) or bf16. May change on --resume.
precision = "auto"
corruption = 75.0
sigma_y = 0.001
sigma_min = 0.001
sigma_max = 100.0
observations = 1024
heldout = 64
heldout_samples = 2
laps = 1
init_observations = 1024
init_rounds = 2
init_steps = 32
init_rank = 64
init_cg_iters = 32
init_cg_rtol = 0.00001
estep_steps = 16
estep_batch = 256
cg_iters = 1
prior_steps = 16
mstep_epochs = 4
mstep_batch = 256
lr = 0.0002
ema = 0.9999
augment = 1
shift = 1
channels = "128,256,384"
blocks = "5,5,5"
attention = "1:4"
emb = 256
dropout = 0.1
grid = 64
export_samples = 0
export_every = 0
keep_samples = 1
"#;

/// Accelerated MRI, quick (method.md §7.3, scaled down): 64×64 axial slices of the Colin27 head
/// (scripts/fetch-mri.sh), seen only through 6×-undersampled k-space, and a small U-Net with the
/// paper's 4×4 patchify; minutes on 2 CPU cores.
pub const MRI_QUICK: &str = r#"
# Accelerated MRI, quick: 64x64 slices, a small U-Net, for a 2-core CPU in under 15 minutes.
experiment = "mri"
dataset = "mri"
# Empty: $EMPRIOR_DATA/mri or ~/.cache/emprior/mri (scripts/fetch-mri.sh); or a directory of
# your own .nii/.nii.gz volumes.
data_dir = ""
# Slices are padded to a square and resampled to slice_size x slice_size.
slice_size = 64
# A slice is used when at least this fraction of its voxels is tissue.
min_tissue = 0.25
# About one k-space column in `acceleration` is kept; the centre band always.
acceleration = 6.0
center_fraction = 0.0625
seed = 0
# The network's arithmetic: auto (bf16 operands with f32 accumulation on a GPU with tensor
# cores, f32 on the CPU), f32 (exact) or bf16. May change on --resume.
precision = "auto"
sigma_y = 0.01
sigma_min = 0.001
sigma_max = 100.0
# ch2.nii.gz gives 154 slices: 16 held out (evenly spaced through the head), 138 observed.
observations = 138
heldout = 16
heldout_samples = 4
# Posterior samples per observation per lap, all trained on (the paper: 2).
samples_per_observation = 2
laps = 3
init_observations = 138
init_rounds = 4
init_steps = 32
init_rank = 32
init_cg_iters = 5
init_cg_rtol = 0.0
estep_steps = 32
estep_batch = 64
cg_iters = 3
prior_steps = 32
mstep_epochs = 60
mstep_batch = 32
lr = 0.001
ema = 0.98
augment = 1
shift = 2
# The network sees patch x patch pixel blocks as channels (the paper: 4).
patch = 4
channels = "32,64"
blocks = "1,1"
attention = ""
emb = 64
# No dropout: a network this small, trained this briefly, underfits (the paper: 0.1 for 77M).
dropout = 0.0
grid = 16
export_samples = 0
export_every = 0
keep_samples = 1
# Ours, not the paper's: samples with a value outside (-filter_bound, filter_bound), whose
# MMPS solve diverged, are left out of the next M-step (0 keeps all).
filter_bound = 10.0
"#;

/// Accelerated MRI with the paper's network and schedules (method.md §7.3, §8): 320×320 slices,
/// the 77.6M-parameter U-Net with 4×4 patchify, 64 DDPM steps with 3 CG iterations, 2 samples
/// per observation, 64 epochs per lap, 16 laps. The observations are what the data holds (one
/// brain by default, not the paper's fastMRI knee); meant for a GPU.
pub const MRI_PAPER: &str = r#"
# Accelerated MRI with the paper's network and schedules (GPU).
experiment = "mri"
dataset = "mri"
data_dir = ""
slice_size = 320
min_tissue = 0.25
acceleration = 6.0
center_fraction = 0.0625
seed = 0
# The network's arithmetic: auto (bf16 operands with f32 accumulation on a GPU with tensor
# cores, f32 on the CPU), f32 (exact) or bf16. May change on --resume.
precision = "auto"
sigma_y = 0.01
sigma_min = 0.001
sigma_max = 100.0
# ch2.nii.gz gives 154 slices; with your own volumes in data_dir, raise these.
observations = 138
heldout = 16
heldout_samples = 2
samples_per_observation = 2
laps = 16
init_observations = 138
init_rounds = 16
init_steps = 256
init_rank = 64
init_cg_iters = 5
init_cg_rtol = 0.0
estep_steps = 64
estep_batch = 64
cg_iters = 3
prior_steps = 64
mstep_epochs = 64
mstep_batch = 256
lr = 0.0001
ema = 0.999
augment = 1
shift = 4
patch = 4
channels = "128,256,384,512"
blocks = "3,3,3,3"
attention = "3:4"
emb = 256
dropout = 0.1
grid = 16
export_samples = 0
export_every = 0
keep_samples = 0
# Ours, not the paper's: samples with a value outside (-filter_bound, filter_bound), whose
# MMPS solve diverged, are left out of the next M-step (0 keeps all).
filter_bound = 10.0
"#;

/// The paper's MRI U-Net on a GPU for a few minutes: every kernel of the real experiment at
/// 320×320, few observations and steps, and E-step and M-step throughput to project a lap from.
pub const MRI_SMOKE: &str = r#"
# Accelerated MRI smoke run: the paper's U-Net at 320x320, few observations and steps (GPU).
experiment = "mri"
dataset = "mri"
data_dir = ""
slice_size = 320
min_tissue = 0.25
acceleration = 6.0
center_fraction = 0.0625
seed = 0
# The network's arithmetic: auto (bf16 operands with f32 accumulation on a GPU with tensor
# cores, f32 on the CPU), f32 (exact) or bf16. May change on --resume.
precision = "auto"
sigma_y = 0.01
sigma_min = 0.001
sigma_max = 100.0
observations = 64
heldout = 8
heldout_samples = 1
samples_per_observation = 2
laps = 1
init_observations = 64
init_rounds = 2
init_steps = 32
init_rank = 32
init_cg_iters = 5
init_cg_rtol = 0.0
estep_steps = 16
estep_batch = 32
cg_iters = 3
prior_steps = 16
mstep_epochs = 4
mstep_batch = 32
lr = 0.0001
ema = 0.999
augment = 1
shift = 4
patch = 4
channels = "128,256,384,512"
blocks = "3,3,3,3"
attention = "3:4"
emb = 256
dropout = 0.1
grid = 16
export_samples = 0
export_every = 0
keep_samples = 1
# Ours, not the paper's: samples with a value outside (-filter_bound, filter_bound), whose
# MMPS solve diverged, are left out of the next M-step (0 keeps all).
filter_bound = 10.0
"#;

/// One configuration value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// An integer (counts, flags, seeds); written without a decimal point.
    Int(i64),
    /// A finite float; written with a decimal point or exponent.
    Float(f64),
    /// A string, written in double quotes (paths, names, comma-separated lists).
    Str(String),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(v) => write!(f, "{v}"),
            Value::Float(v) => write!(f, "{v:?}"),
            Value::Str(s) => write!(f, "\"{s}\""),
        }
    }
}

/// A flat TOML table: `key = value` lines (integers, floats, quoted strings) and comments.
/// Two configurations are equal when their values are; the comments ride along.
#[derive(Clone, Debug)]
pub struct Config {
    values: BTreeMap<String, Value>,
    /// The comment lines written directly above each key (a preset's explanations), kept so the
    /// saved config.toml still says why a value is what it is.
    notes: BTreeMap<String, Vec<String>>,
    /// The preset this configuration started from, when known (a saved config.toml records it).
    preset: Option<String>,
}

impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        self.values == other.values
    }
}

/// The header line of a saved config.toml that records the preset.
const PRESET_NOTE: &str = "preset: ";

/// The comment [`Config::to_toml`] writes above `key`: its meaning and valid values (a parse
/// drops it again, so saving twice does not repeat it).
fn key_note(key: &str) -> Option<String> {
    KEYS.iter()
        .find(|k| k.name == key)
        .map(|k| format!("{} (valid: {})", k.meaning, k.rule.range()))
}

fn parse_value(text: &str) -> Option<Value> {
    let t = text.trim();
    if let Some(s) = t.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        return Some(Value::Str(s.to_string()));
    }
    if let Ok(i) = t.parse::<i64>() {
        return Some(Value::Int(i));
    }
    t.parse::<f64>().ok().filter(|v| v.is_finite()).map(Value::Float)
}

impl Config {
    /// Parses the TOML subset the presets use; `origin` names the text in errors. A line that
    /// is not `key = value` or a value that is not an integer, finite float or quoted string is
    /// an error; keys are not checked here (see [`Config::validate`]).
    ///
    /// ```
    /// use emprior::em::Config;
    ///
    /// let cfg = Config::parse("laps = 3 # laps after lap 0\nsigma_y = 0.5\nhidden = \"64,64\"\n", "inline")?;
    /// assert_eq!(cfg.count("laps")?, 3);
    /// assert_eq!(cfg.float("sigma_y")?, 0.5);
    /// assert_eq!(cfg.string("hidden")?, "64,64");
    /// // The resolved TOML reads back to the same configuration.
    /// assert_eq!(Config::parse(&cfg.to_toml(), "round trip")?, cfg);
    /// assert!(cfg.string("laps").is_err(), "laps is an integer");
    /// # Ok::<(), emprior::Error>(())
    /// ```
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut values = BTreeMap::new();
        let mut notes = BTreeMap::new();
        let mut preset = None;
        // Comment lines since the last blank line: they belong to the next key.
        let mut pending: Vec<String> = Vec::new();
        for (no, raw) in text.lines().enumerate() {
            let (line, comment) = match raw.split_once('#') {
                Some((code, comment)) => (code.trim(), Some(comment.trim())),
                None => (raw.trim(), None),
            };
            if line.is_empty() {
                match comment {
                    Some(c) => match c.strip_prefix(PRESET_NOTE) {
                        Some(name) => preset = Some(name.trim().to_string()),
                        None => pending.push(c.to_string()),
                    },
                    None => pending.clear(),
                }
                continue;
            }
            let (k, v) = line.split_once('=').ok_or_else(|| {
                Error::Other(format!(
                    "{origin}:{}: expected `key = value`, got `{line}`",
                    no + 1
                ))
            })?;
            let value = parse_value(v).ok_or_else(|| {
                Error::Other(format!(
                    "{origin}:{}: cannot read the value `{}`",
                    no + 1,
                    v.trim()
                ))
            })?;
            let key = k.trim().to_string();
            pending.extend(comment.map(str::to_string));
            let generated = key_note(&key);
            pending.retain(|c| Some(c) != generated.as_ref());
            if !pending.is_empty() {
                notes.insert(key.clone(), std::mem::take(&mut pending));
            }
            values.insert(key, value);
        }
        Ok(Config {
            values,
            notes,
            preset,
        })
    }

    /// The preset `name` of `experiment`: manifold (quick, paper), cifar10, fashion-mnist and
    /// mri (quick, smoke, paper), vectors and images (quick). An unknown pair is an error that lists
    /// the known ones.
    pub fn preset(experiment: &str, name: &str) -> Result<Self> {
        let text = match (experiment, name) {
            ("manifold", "quick") => MANIFOLD_QUICK,
            ("manifold", "paper") => MANIFOLD_PAPER,
            ("vectors", "quick") => VECTORS_QUICK,
            ("images", "quick") => IMAGES_QUICK,
            ("vectors" | "images", other) => {
                return Err(Error::Other(format!(
                    "unknown preset '{other}' for {experiment} (expected quick; scale it with --set)"
                )))
            }
            ("cifar10" | "fashion-mnist", "quick") => CIFAR10_QUICK,
            ("cifar10" | "fashion-mnist", "smoke") => CIFAR10_SMOKE,
            ("cifar10" | "fashion-mnist", "paper") => CIFAR10_PAPER,
            ("mri", "quick") => MRI_QUICK,
            ("mri", "smoke") => MRI_SMOKE,
            ("mri", "paper") => MRI_PAPER,
            ("manifold" | "cifar10" | "fashion-mnist" | "mri", other) => {
                let known = if experiment == "manifold" {
                    "quick or paper"
                } else {
                    "quick, smoke or paper"
                };
                return Err(Error::Other(format!(
                    "unknown preset '{other}' for {experiment} (expected {known})"
                )));
            }
            (other, _) => {
                return Err(Error::Other(format!(
                "unknown experiment '{other}' (expected manifold, vectors, images, cifar10, fashion-mnist or mri)"
            )))
            }
        };
        let mut cfg = Config::parse(text, &format!("preset {experiment}/{name}"))?;
        cfg.preset = Some(name.to_string());
        if experiment == "fashion-mnist" {
            // The same experiment on 28 x 28 grayscale images: the CIFAR-10 presets with the
            // dataset swapped (method.md has no Fashion-MNIST run; this is for fast runs).
            cfg.set("experiment=fashion-mnist")?;
            cfg.set("dataset=fashion-mnist")?;
        }
        Ok(cfg)
    }

    /// Applies `key=value`: the key must exist and the value must have its type (an integer is
    /// accepted where a float is expected). Ranges are checked by [`Config::validate`].
    ///
    /// ```
    /// use emprior::em::Config;
    ///
    /// let mut cfg = Config::preset("vectors", "quick")?;
    /// cfg.set("laps=4")?;
    /// cfg.set("hidden=128,128")?;
    /// assert_eq!(cfg.count("laps")?, 4);
    /// assert!(cfg.set("lapz=4").is_err(), "an unknown key");
    /// cfg.set("sigma_y=-1")?; // the right type...
    /// assert!(cfg.validate().is_err(), "...out of range");
    /// # Ok::<(), emprior::Error>(())
    /// ```
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (k, v) = assignment
            .split_once('=')
            .ok_or_else(|| Error::Other(format!("--set '{assignment}': expected key=value")))?;
        let key = k.trim();
        let current = self.values.get(key).ok_or_else(|| {
            Error::Other(format!(
                "--set: unknown key '{key}' (known: {})",
                self.values.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let raw = v.trim();
        let new = match current {
            Value::Int(_) => raw.parse::<i64>().ok().map(Value::Int),
            Value::Float(_) => raw
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .map(Value::Float),
            Value::Str(_) => Some(Value::Str(raw.trim_matches('"').to_string())),
        }
        .ok_or_else(|| {
            let kind = match current {
                Value::Int(_) => "an integer",
                Value::Float(_) => "a number",
                Value::Str(_) => "a string",
            };
            Error::Other(format!("--set {key}={raw}: '{key}' takes {kind}"))
        })?;
        self.values.insert(key.to_string(), new);
        Ok(())
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.values
            .get(key)
            .ok_or_else(|| Error::Other(format!("configuration lacks '{key}'")))
    }

    /// Whether the configuration has `key` (runs written before a key existed lack it).
    pub fn has(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    /// [`Config::count`] of `key`, or `default` when the configuration lacks it (a run written
    /// before the key existed).
    pub fn count_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.has(key) {
            self.count(key)
        } else {
            Ok(default)
        }
    }

    /// [`Config::float`] of `key`, or `default` when the configuration lacks it.
    pub fn float_or(&self, key: &str, default: f64) -> Result<f64> {
        if self.has(key) {
            self.float(key)
        } else {
            Ok(default)
        }
    }

    /// The integer value of `key`; an error when the key is absent or holds a float or string.
    pub fn int(&self, key: &str) -> Result<i64> {
        match self.get(key)? {
            Value::Int(v) => Ok(*v),
            other => Err(Error::Other(format!(
                "configuration '{key}' = {other} is not an integer"
            ))),
        }
    }

    /// A non-negative integer.
    pub fn count(&self, key: &str) -> Result<usize> {
        usize::try_from(self.int(key)?)
            .map_err(|_| Error::Other(format!("configuration '{key}' must not be negative")))
    }

    /// The numeric value of `key` (an integer is widened); an error when it is absent or a string.
    pub fn float(&self, key: &str) -> Result<f64> {
        match self.get(key)? {
            Value::Float(v) => Ok(*v),
            Value::Int(v) => Ok(*v as f64),
            other => Err(Error::Other(format!(
                "configuration '{key}' = {other} is not a number"
            ))),
        }
    }

    /// The string value of `key`; an error when it is absent or a number.
    pub fn string(&self, key: &str) -> Result<String> {
        match self.get(key)? {
            Value::Str(s) => Ok(s.clone()),
            other => Err(Error::Other(format!(
                "configuration '{key}' = {other} is not a string"
            ))),
        }
    }

    /// Every range and cross-field rule of the keys this configuration has, checked before a run
    /// creates anything; the message names the key, its value and the valid range.
    pub fn validate(&self) -> Result<()> {
        for key in KEYS.iter().filter(|k| self.values.contains_key(k.name)) {
            let name = key.name;
            let ok = match key.rule {
                Rule::Positive => self.float(name)? > 0.0,
                Rule::NonNegative => self.float(name)? >= 0.0,
                Rule::Fraction => (0.0..1.0).contains(&self.float(name)?),
                Rule::Percent => (0.0..100.0).contains(&self.float(name)?),
                Rule::UnitInterval => (0.0..=1.0).contains(&self.float(name)?),
                Rule::AtLeastOneFloat => self.float(name)? >= 1.0,
                Rule::AtLeastOne => self.int(name)? >= 1,
                Rule::Count => self.int(name)? >= 0,
                Rule::Flag => matches!(self.int(name)?, 0 | 1),
                Rule::OneOf(options) => options.contains(&self.string(name)?.as_str()),
                Rule::Text(_) => {
                    self.string(name)?;
                    true
                }
            };
            if !ok {
                return Err(Error::Other(format!(
                    "configuration '{name}' = {} must be {}",
                    self.values[name],
                    key.rule.range()
                )));
            }
        }
        if self.values.contains_key("sigma_min") && self.float("sigma_min")? >= self.float("sigma_max")? {
            return Err(Error::Other(format!(
                "configuration sigma_min = {} must be below sigma_max = {}",
                self.values["sigma_min"], self.values["sigma_max"]
            )));
        }
        Ok(())
    }

    /// The keys whose values differ between `self` and `other` (either side missing counts),
    /// as (key, this value, other value), in key order.
    pub fn differences(&self, other: &Config) -> Vec<(String, String, String)> {
        let show = |v: Option<&Value>| v.map_or("(absent)".to_string(), |v| v.to_string());
        let mut keys: Vec<&String> = self.values.keys().chain(other.values.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|k| self.values.get(*k) != other.values.get(*k))
            .map(|k| (k.clone(), show(self.values.get(k)), show(other.values.get(k))))
            .collect()
    }

    /// The preset this configuration started from ("quick"), when known.
    pub fn preset_name(&self) -> Option<&str> {
        self.preset.as_deref()
    }

    /// The resolved configuration as TOML: every key under its meaning and valid values and the
    /// preset's own comments on it.
    pub fn to_toml(&self) -> String {
        self.to_toml_with(&[])
    }

    /// [`Config::to_toml`] under a header of `provenance` lines (who wrote it, where, when); the
    /// preset is recorded there too, so a resumed run still knows it.
    pub fn to_toml_with(&self, provenance: &[String]) -> String {
        let mut s = String::from(
            "# emprior em: the configuration of this run, every key with its meaning and valid values.\n",
        );
        if let Some(p) = &self.preset {
            let _ = writeln!(s, "# {PRESET_NOTE}{p}");
        }
        for line in provenance {
            let _ = writeln!(s, "# {line}");
        }
        let _ = writeln!(
            s,
            "# On --resume only {} may change; any other change needs a new run.",
            super::SAFE_ON_RESUME.join(", ")
        );
        for (k, v) in &self.values {
            s.push('\n');
            for note in key_note(k).iter().chain(self.notes.get(k).into_iter().flatten()) {
                let _ = writeln!(s, "# {note}");
            }
            let _ = writeln!(s, "{k} = {v}");
        }
        s
    }
}

/// A range rule of [`Config::validate`].
pub enum Rule {
    /// A number > 0.
    Positive,
    /// A number >= 0.
    NonNegative,
    /// A number in `[0, 1)` (decays, dropout).
    Fraction,
    /// A percentage in `[0, 100)`.
    Percent,
    /// A number in `[0, 1]` (shares that may be all).
    UnitInterval,
    /// A number >= 1 (factors).
    AtLeastOneFloat,
    /// An integer >= 1.
    AtLeastOne,
    /// An integer >= 0.
    Count,
    /// 0 or 1.
    Flag,
    /// One of these strings.
    OneOf(&'static [&'static str]),
    /// Free text, described.
    Text(&'static str),
}

impl Rule {
    /// The valid values, as the reference and the error messages say them.
    pub fn range(&self) -> String {
        match self {
            Rule::Positive => "a positive number".into(),
            Rule::NonNegative => "a number >= 0".into(),
            Rule::Fraction => "in [0, 1)".into(),
            Rule::Percent => "a percentage in [0, 100)".into(),
            Rule::UnitInterval => "in [0, 1]".into(),
            Rule::AtLeastOneFloat => "a number >= 1".into(),
            Rule::AtLeastOne => "an integer >= 1".into(),
            Rule::Count => "an integer >= 0".into(),
            Rule::Flag => "0 or 1".into(),
            Rule::OneOf(options) => format!("one of {}", options.join(", ")),
            Rule::Text(what) => (*what).into(),
        }
    }
}

/// One configuration key: its valid values and what it means. The one source of the reference
/// (`emprior keys`, the README's table) and of [`Config::validate`]'s range checks; a test keeps
/// every preset's keys in it.
pub struct Key {
    /// The key as written in the TOML and in `--set key=value`.
    pub name: &'static str,
    /// Its valid values.
    pub rule: Rule,
    /// What it controls, one line for the reference table.
    pub meaning: &'static str,
}

const fn key(name: &'static str, rule: Rule, meaning: &'static str) -> Key {
    Key { name, rule, meaning }
}

/// Every key of every preset, in alphabetical order.
pub const KEYS: &[Key] = &[
    key("acceleration", Rule::AtLeastOneFloat, "MRI: the k-space undersampling factor R (about one column in R kept; the paper: 6)"),
    key("attention", Rule::Text("level:heads pairs, comma-separated, or empty"), "U-Net self-attention: at which levels, with how many heads (the paper: 1:4)"),
    key("augment", Rule::Flag, "M-step: random horizontal flips of the training images"),
    key("blocks", Rule::Text("integers >= 1, one per level"), "U-Net residual blocks per level"),
    key("center_fraction", Rule::UnitInterval, "MRI: the fully sampled centre band, as a fraction of the k-space columns (the paper: 0.0625, 20 of 320)"),
    key("cg_iters", Rule::AtLeastOne, "E-step: conjugate-gradient iterations per MMPS denoiser call"),
    key("cg_rtol", Rule::NonNegative, "E-step: stop CG once every system's residual is below this fraction of its start (0: never early)"),
    key("channels", Rule::Text("integers >= 1, one per level"), "U-Net widths per level (their count sets the levels; H and W must divide by 2 per level after the first)"),
    key("corruption", Rule::Percent, "built-in image runs: the percentage of pixels removed by the Bernoulli masks"),
    key("covariance", Rule::OneOf(&["gaussian", "tweedie"]), "vector runs: MMPS's covariance V, the Gaussian fit of the samples or Tweedie's (the denoiser's Jacobian)"),
    key("data_dir", Rule::Text("a directory, or empty for the fetch script's cache"), "built-in image runs: where the dataset (or the PNG folder) is"),
    key("dataset", Rule::OneOf(&["cifar10", "fashion-mnist", "png-dir", "npy", "mri"]), "image runs: where the images come from (npy: the user's --obs/--mask; mri: NIfTI volumes' axial slices)"),
    key("dropout", Rule::Fraction, "U-Net dropout in training"),
    key("ema", Rule::Fraction, "image runs: the EMA decay of the weights (0: none)"),
    key("emb", Rule::AtLeastOne, "the width of the noise-level embedding"),
    key("estep_batch", Rule::AtLeastOne, "E-step: observations sampled together"),
    key("estep_moments", Rule::OneOf(&["refit", "init"]), "vector runs: the E-step's starting mean and Gaussian V from a PPCA of each lap's samples, or the Gaussian initialisation's for all laps (the paper's script)"),
    key("estep_steps", Rule::AtLeastOne, "E-step: sampler steps"),
    key("eval_samples", Rule::AtLeastOne, "vector runs: points per set of the Sinkhorn divergence to the truth"),
    key("experiment", Rule::OneOf(&["manifold", "vectors", "cifar10", "fashion-mnist", "images", "mri"]), "which run this is (set by the command line)"),
    key("export_every", Rule::Count, "image runs: also export prior samples every this many laps (0: only at the last)"),
    key("export_samples", Rule::Count, "image runs: prior samples written as PNGs for FID tools (0: none)"),
    key("filter_bound", Rule::NonNegative, "drop posterior samples with a value outside (-b, b) before each M-step (0: keep all)"),
    key("filter_first", Rule::Flag, "vector runs: 1 filters lap 0's samples too (ours), 0 keeps them (the paper's script)"),
    key("grid", Rule::AtLeastOne, "image runs: images per grid PNG"),
    key("heldout", Rule::Count, "image runs: held-out images scored each lap (the user's: the first observations, shown)"),
    key("heldout_samples", Rule::AtLeastOne, "image runs: posterior samples averaged into each held-out posterior mean"),
    key("hidden", Rule::Text("integers >= 1, comma-separated"), "vector runs: the TimeMLP's hidden widths"),
    key("init_cg_iters", Rule::AtLeastOne, "image runs: CG iterations of the Gaussian initialisation's exact MMPS"),
    key("init_cg_rtol", Rule::NonNegative, "image runs: the initialisation's CG relative tolerance"),
    key("init_observations", Rule::AtLeastOne, "image runs: observations the Gaussian initialisation fits on"),
    key("init_rank", Rule::AtLeastOne, "the rank of the Gaussian initialisation's PPCA covariance"),
    key("init_rounds", Rule::AtLeastOne, "rounds of the Gaussian initialisation's EM (sample, then PPCA)"),
    key("init_steps", Rule::AtLeastOne, "DDIM steps per initialisation round"),
    key("keep_samples", Rule::Flag, "image runs: 1 keeps every lap's samples.npy, 0 only the newest"),
    key("laps", Rule::Count, "EM laps after the Gaussian initialisation (lap 0); may grow on --resume"),
    key("lr", Rule::Positive, "image runs: Adam's learning rate (constant)"),
    key("lr_end", Rule::NonNegative, "vector runs: the learning rate at the M-step's end (linear decay); may change on --resume"),
    key("lr_init", Rule::Positive, "vector runs: the learning rate at the M-step's start; may change on --resume"),
    key("mask", Rule::Text("an .npy path (set by --mask)"), "your images' masks [n, H, W] or [n, H, W, C], 1 = observed"),
    key("min_tissue", Rule::UnitInterval, "MRI: an axial slice is used when at least this fraction of its voxels is tissue"),
    key("mstep_batch", Rule::AtLeastOne, "M-step: training batch"),
    key("mstep_epochs", Rule::AtLeastOne, "image runs: M-step epochs over the samples per lap"),
    key("mstep_steps", Rule::AtLeastOne, "vector runs: M-step Adam steps per lap"),
    key("obs", Rule::Text("an .npy path (set by --obs)"), "your observations: [n, m] vectors or [n, H, W, C] images"),
    key("observations", Rule::AtLeastOne, "built-in runs: how many observations are made (images: the first of the training split)"),
    key("operator", Rule::Text("an .npy path (set by --operator)"), "your operators: [n, m, d] per observation or [m, d] shared"),
    key("patch", Rule::AtLeastOne, "U-Net: pixel blocks of patch x patch folded into channels at the input (the paper's MRI: 4; H and W must divide by it)"),
    key("pc_corrections", Rule::Count, "vector runs: Langevin corrections per predictor step of the PC sampler"),
    key("pc_tau", Rule::Positive, "vector runs: the Langevin step size of the PC sampler"),
    key("precision", Rule::OneOf(&["auto", "f32", "bf16"]), "the network's arithmetic: auto (bf16 operands, f32 accumulation on a tensor-core GPU; f32 on the CPU), f32 (exact) or bf16; may change on --resume"),
    key("prior_steps", Rule::AtLeastOne, "image runs: DDIM steps of the prior samples in the grids and exports"),
    key("samples_per_observation", Rule::AtLeastOne, "image runs: posterior samples drawn per observation each lap, all trained on (the paper's MRI: 2)"),
    key("seed", Rule::Count, "every random draw of the run (Philox keyed by seed, lap and purpose)"),
    key("shift", Rule::Count, "image runs: the M-step's random shift of the images, in pixels (0: none)"),
    key("sigma_max", Rule::Positive, "the largest noise level of the diffusion prior (above sigma_min)"),
    key("sigma_min", Rule::Positive, "the smallest noise level of the diffusion prior (below sigma_max)"),
    key("sigma_y", Rule::Positive, "the observation noise standard deviation"),
    key("sigma_y_file", Rule::Text("an .npy path [m], or empty (set by --sigma-y-file)"), "vector runs: a standard deviation per observed coordinate, instead of sigma_y"),
    key("slice_size", Rule::AtLeastOne, "MRI: slices are padded to a square and resampled to this many pixels a side"),
    key("truth", Rule::Text("an .npy path, or empty (set by --truth)"), "your true signals or images, for the metrics only"),
];

/// The key reference as a markdown table (`emprior keys`, the README's copy).
pub fn keys_markdown() -> String {
    let mut s = String::from("| key | valid values | meaning |\n|---|---|---|\n");
    for k in KEYS {
        let _ = writeln!(s, "| `{}` | {} | {} |", k.name, k.rule.range(), k.meaning);
    }
    s
}
