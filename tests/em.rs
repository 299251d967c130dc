//! The EM loop end to end on small manifold configurations: the divergence to the ground truth
//! falls; a run killed mid-lap and resumed ends bit for bit where an uninterrupted one does; bad
//! configurations and damaged runs stop with a message that names the cause.

use std::path::PathBuf;

mod common;

use common::{
    assert_same_checkpoints, emprior, emprior_aborting_at, file_bytes, metrics_without_timings, run_dir,
};

use emprior::em::{run_manifold, Config};
use emprior::Device;

fn dir(name: &str) -> PathBuf {
    run_dir("em", name)
}

/// A configuration that runs in seconds on the CPU.
const SMALL: &[&str] = &[
    "observations=1024",
    "laps=3",
    "init_rounds=4",
    "init_steps=24",
    "estep_steps=24",
    "estep_batch=512",
    "mstep_steps=600",
    "mstep_batch=256",
    "eval_samples=512",
    "hidden=128,128",
    "emb=32",
];

fn small(extra: &[&str]) -> Config {
    let mut cfg = Config::preset("manifold", "quick").unwrap();
    for s in SMALL.iter().chain(extra) {
        cfg.set(s).unwrap();
    }
    cfg
}

#[test]
fn em_lowers_the_divergence_to_the_ground_truth() {
    let run = dir("falls");
    let laps = run_manifold(&small(&[]), &run, &Device::Cpu, false).unwrap();
    let (first, last) = (&laps[0], laps.last().unwrap());
    println!("{}\n{}", first.summary(), last.summary());
    assert_eq!(laps.len(), 4, "the initialisation and three laps");
    assert!(
        last.sinkhorn < 0.8 * first.sinkhorn,
        "Sinkhorn {} -> {}",
        first.sinkhorn,
        last.sinkhorn
    );
    assert!(
        last.sliced_wasserstein < first.sliced_wasserstein,
        "sliced W1 {} -> {}",
        first.sliced_wasserstein,
        last.sliced_wasserstein
    );
    for name in [
        "config.toml",
        "metrics.jsonl",
        "divergence.png",
        "lap-003/checkpoint.safetensors",
        "lap-003/pairs.png",
        "lap-003/DONE",
    ] {
        assert!(run.join(name).is_file(), "{name} written");
    }
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4);
    // Starting over in a directory that holds a run is refused (results are never overwritten).
    let err = run_manifold(&small(&[]), &run, &Device::Cpu, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--resume"), "{err}");
}

fn em_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["em", "manifold", "--device", "cpu", "--out", out];
    for s in SMALL.iter().chain(extra) {
        v.push("--set");
        v.push(s);
    }
    v
}

/// Runs a two-lap configuration (SMALL, smaller still, plus `extra`) whole into `a`, and into `b`
/// killed during lap 2 (after its E-step, before anything of lap 2 is written) and resumed from
/// lap 1. Determinism, not quality, is under test: hence the small run.
fn run_whole_and_resumed(a: &std::path::Path, b: &std::path::Path, extra: &[&str]) {
    let (sa, sb) = (a.to_str().unwrap(), b.to_str().unwrap());
    let mut tiny = vec![
        "laps=2",
        "observations=512",
        "mstep_steps=150",
        "eval_samples=128",
    ];
    tiny.extend_from_slice(extra);
    let (ok, log) = emprior(&em_args(sa, &tiny));
    assert!(ok, "{log}");
    let (ok, log) = emprior_aborting_at(&em_args(sb, &tiny), Some(2));
    assert!(!ok && log.contains("aborted during lap 2"), "{log}");
    assert!(b.join("lap-001/DONE").is_file() && !b.join("lap-002").join("DONE").exists());
    // A kill leaves metrics.jsonl no further than DONE: one line per complete lap (0 and 1).
    let lines = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
    assert_eq!(
        lines.lines().filter(|l| l.contains("\"lap\"")).count(),
        2,
        "{lines}"
    );
    // Even one emptied (a kill between DONE and its rewrite) is made whole by the resume.
    std::fs::write(b.join("metrics.jsonl"), b"").unwrap();
    let (ok, log) = emprior(&["em", "manifold", "--device", "cpu", "--resume", sb]);
    assert!(ok && log.contains("resuming"), "{log}");
}

#[test]
fn a_run_killed_mid_lap_and_resumed_matches_an_uninterrupted_one() {
    let (a, b) = (dir("whole"), dir("resumed"));
    let sb = b.to_str().unwrap();
    run_whole_and_resumed(&a, &b, &[]);
    for f in [
        "lap-002/samples.npy",
        "lap-001/samples.npy",
        "lap-001/checkpoint.safetensors",
        "lap-002/checkpoint.safetensors",
    ] {
        assert!(
            file_bytes(&a.join(f)) == file_bytes(&b.join(f)),
            "{f} differs between the uninterrupted and the resumed run"
        );
    }
    // Checkpoints: the same weights bit for bit and the same metadata.
    assert_same_checkpoints(
        &a,
        &b,
        &["lap-001/checkpoint.safetensors", "lap-002/checkpoint.safetensors"],
    );
    assert_eq!(
        metrics_without_timings(&a.join("metrics.jsonl")),
        metrics_without_timings(&b.join("metrics.jsonl"))
    );

    // A damaged checkpoint in the lap to resume from is named.
    std::fs::write(b.join("lap-002/checkpoint.safetensors"), b"garbage").unwrap();
    let (ok, log) = emprior(&["em", "manifold", "--device", "cpu", "--resume", sb]);
    assert!(!ok && log.contains("lap-002/checkpoint.safetensors"), "{log}");
}

/// The paper script's E-step (the initialisation's moments for every lap, lap 0 unfiltered):
/// the initial prior is saved with lap 0 and read back, so a resumed run matches a whole one.
#[test]
fn the_papers_estep_moments_run_and_resume_exactly() {
    let (a, b) = (dir("paper-moments-whole"), dir("paper-moments-resumed"));
    run_whole_and_resumed(&a, &b, &["estep_moments=init", "filter_first=0"]);
    for f in ["prior_mean.npy", "prior_diag.npy", "prior_factor.npy"] {
        assert!(a.join("lap-000").join(f).is_file(), "{f} saved with lap 0");
    }
    assert!(
        file_bytes(&a.join("lap-002/samples.npy")) == file_bytes(&b.join("lap-002/samples.npy")),
        "lap 2's samples differ between the uninterrupted and the resumed run"
    );
    // A value outside the choices is refused before any work.
    let mut cfg = small(&[]);
    cfg.set("estep_moments=mine").unwrap();
    let err = run_manifold(&cfg, &dir("paper-moments-bad"), &Device::Cpu, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("estep_moments"), "{err}");
}

#[test]
fn bad_configurations_are_named() {
    let mut cfg = Config::preset("manifold", "quick").unwrap();
    let e = cfg.set("lapz=3").unwrap_err().to_string();
    assert!(e.contains("unknown key 'lapz'"), "{e}");
    let e = cfg.set("laps=many").unwrap_err().to_string();
    assert!(e.contains("'laps' takes an integer"), "{e}");
    let e = cfg.set("sigma_y=abc").unwrap_err().to_string();
    assert!(e.contains("takes a number"), "{e}");
    cfg.set("sigma_y=1").unwrap(); // an integer where a float is expected is fine
    assert!(Config::preset("manifold", "huge").is_err());
    assert!(Config::preset("cifar", "quick")
        .unwrap_err()
        .to_string()
        .contains("unknown experiment"));

    let (ok, log) = emprior(&em_args("/tmp/never", &["laps=lots"]));
    assert!(!ok && log.contains("laps"), "{log}");
    let (ok, log) = emprior(&[
        "em",
        "manifold",
        "--device",
        "cpu",
        "--out",
        "/proc/emprior-not-writable",
    ]);
    assert!(!ok && log.contains("/proc/emprior-not-writable"), "{log}");
}

/// Ranges and cross-field rules are checked before a run creates anything (issue 16's reports:
/// `ema=2` marked a lap DONE with NaN weights; a negative sigma_y ran silently).
#[test]
fn out_of_range_values_are_refused_before_the_run_starts() {
    let cases = [
        ("cifar10", "ema=2", "'ema' = 2.0 must be in [0, 1)"),
        ("cifar10", "dropout=1", "'dropout' = 1.0 must be in [0, 1)"),
        (
            "cifar10",
            "mstep_batch=0",
            "'mstep_batch' = 0 must be an integer >= 1",
        ),
        (
            "manifold",
            "sigma_y=-0.05",
            "'sigma_y' = -0.05 must be a positive number",
        ),
        (
            "manifold",
            "sigma_min=200",
            "sigma_min = 200.0 must be below sigma_max",
        ),
        (
            "manifold",
            "estep_steps=0",
            "'estep_steps' = 0 must be an integer >= 1",
        ),
        ("manifold", "laps=-1", "'laps' = -1 must be an integer >= 0"),
    ];
    for (experiment, set, want) in cases {
        let mut cfg = Config::preset(experiment, "quick").unwrap();
        cfg.set(set).unwrap();
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(want), "{set}: {e} (wanted: {want})");
    }
    for experiment in ["manifold", "cifar10", "fashion-mnist", "mri"] {
        for preset in ["quick", "smoke", "paper"] {
            if let Ok(cfg) = Config::preset(experiment, preset) {
                cfg.validate()
                    .unwrap_or_else(|e| panic!("{experiment}/{preset}: {e}"));
            }
        }
    }
    let out = std::env::temp_dir().join(format!("emprior-bad-sigma-{}", std::process::id()));
    let (ok, log) = emprior(&em_args(out.to_str().unwrap(), &["sigma_y=-1"]));
    assert!(!ok && log.contains("sigma_y"), "{log}");
    assert!(!out.exists(), "a refused run leaves no directory");
    // A size past the host's memory: refused with what it needs, not an allocator abort.
    let (ok, log) = emprior(&em_args(out.to_str().unwrap(), &["observations=100000000000"]));
    assert!(
        !ok && log.contains("GB of host memory") && !log.contains("panicked"),
        "{log}"
    );
    assert!(!out.exists(), "a refused run leaves no directory");
}

/// A run directory in use is refused to a second run, which names the holder; the lock goes
/// with its holder, and temporary files a killed writer left are removed when a run opens it.
#[test]
fn a_run_directory_serves_one_run_at_a_time() {
    use emprior::em::{open_run, RunLock};
    let run = std::env::temp_dir().join(format!("emprior-lock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run);
    std::fs::create_dir_all(run.join("lap-000")).unwrap();
    let stale = run.join("lap-000").join(".checkpoint.safetensors.tmp-999999");
    std::fs::write(&stale, b"torn").unwrap();
    let held = RunLock::acquire(&run).unwrap();
    let e = RunLock::acquire(&run).err().expect("refused").to_string();
    assert!(
        e.contains("in use by another emprior run") && e.contains(&std::process::id().to_string()),
        "{e}"
    );
    let (ok, log) = emprior(&em_args(run.to_str().unwrap(), &["laps=1"]));
    assert!(!ok && log.contains("in use by another emprior run"), "{log}");
    drop(held);
    let cfg = Config::preset("manifold", "quick").unwrap();
    let (done, _lock) = open_run(&cfg, &run, true, &Device::Cpu).unwrap();
    assert_eq!(done, None);
    assert!(!stale.exists(), "the stale temporary file is removed");
}

/// A resume may change how many laps and what is evaluated, nothing that defines the data or the
/// model: an edited config.toml that would mix two runs is refused, naming the keys.
#[test]
fn a_resume_refuses_an_edited_data_defining_configuration() {
    use emprior::em::open_run;
    let run = std::env::temp_dir().join(format!("emprior-origin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run);
    let cfg = Config::preset("manifold", "quick").unwrap();
    drop(open_run(&cfg, &run, false, &Device::Cpu).unwrap());
    let mut edited = cfg.clone();
    edited.set("seed=7").unwrap();
    edited.set("sigma_y=0.1").unwrap();
    let e = open_run(&edited, &run, true, &Device::Cpu)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("seed (was 0, now 7)") && e.contains("sigma_y (was 0.01, now 0.1)"),
        "{e}"
    );
    let mut more = cfg.clone();
    more.set("laps=40").unwrap();
    more.set("eval_samples=512").unwrap();
    assert!(
        open_run(&more, &run, true, &Device::Cpu).is_ok(),
        "laps and evaluation settings may change"
    );
}

/// A resume may lower the learning rate of a run that diverged; the change is logged in the run.
#[test]
fn a_resume_may_change_the_learning_rate_and_says_so() {
    use emprior::em::open_run;
    let run = std::env::temp_dir().join(format!("emprior-lr-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run);
    let cfg = Config::preset("manifold", "quick").unwrap();
    drop(open_run(&cfg, &run, false, &Device::Cpu).unwrap());
    std::fs::create_dir_all(run.join("lap-000")).unwrap();
    std::fs::write(run.join("lap-000/DONE"), "complete\n").unwrap();
    let mut lower = cfg.clone();
    lower.set("lr_init=0.0001").unwrap();
    let (done, _lock) = open_run(&lower, &run, true, &Device::Cpu).unwrap();
    assert_eq!(done, Some(0));
    let log = std::fs::read_to_string(run.join("resumes.log")).unwrap();
    assert!(
        log.contains("resumed after lap 0 with lr_init (was 0.001, now 0.0001)"),
        "{log}"
    );
}

/// The observations' fingerprint is recorded by a fresh run and checked by a resume: other data
/// (an edited file, another dataset under the same name) is refused, the same data accepted.
#[test]
fn a_resume_refuses_changed_observations() {
    use emprior::em::{check_observations, Fingerprint};
    let run = std::env::temp_dir().join(format!("emprior-fingerprint-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&run);
    std::fs::create_dir_all(&run).unwrap();
    let y = vec![0.25f32, -1.0, 3.5, 0.0, 7.0];
    let print = |v: &[f32]| *Fingerprint::new().add(v);
    check_observations(&run, None, print(&y)).unwrap();
    check_observations(&run, Some(0), print(&y)).unwrap();
    let mut edited = y.clone();
    edited[3] = 1e-7;
    let e = check_observations(&run, Some(0), print(&edited))
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("the observations differ") && e.contains("data files changed"),
        "{e}"
    );
    // Every value and the length count: a prefix, a reordering and a bit flip all differ.
    assert_ne!(print(&y[..4]), print(&y));
    assert_ne!(print(&[y[1], y[0], y[2], y[3], y[4]]), print(&y));
    assert_ne!(print(&[-0.0f32]), print(&[0.0f32]));
}

/// A diverged sampler stops the run, naming the phase, how many samples and the first bad one.
#[test]
fn non_finite_samples_stop_the_lap_with_the_phase_named() {
    use emprior::em::ensure_finite_samples;
    let mut x = vec![0.5f32; 5 * 4];
    ensure_finite_samples("lap 3 E-step", &x, 5).unwrap();
    x[7] = f32::NAN;
    x[13] = f32::INFINITY;
    x[19] = f32::NEG_INFINITY;
    let e = ensure_finite_samples("lap 3 E-step", &x, 5)
        .expect_err("refused")
        .to_string();
    assert!(
        e.starts_with("lap 3 E-step: 3 of 4 samples hold NaN or infinite values (first: sample 1, value NaN at coordinate 2)"),
        "{e}"
    );
}

/// The key reference has one source: every key of every preset is in `KEYS` (sorted, once), and
/// the README's table is `emprior keys`'s output.
#[test]
fn the_key_reference_covers_every_preset_and_matches_the_readme() {
    use emprior::em::config::{keys_markdown, KEYS};
    let names: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(names, sorted, "KEYS sorted, each once");
    for (experiment, presets) in [
        ("manifold", &["quick", "paper"][..]),
        ("vectors", &["quick"][..]),
        ("cifar10", &["quick", "smoke", "paper"][..]),
        ("images", &["quick"][..]),
        ("mri", &["quick", "smoke", "paper"][..]),
    ] {
        for preset in presets {
            let cfg = Config::preset(experiment, preset).unwrap();
            cfg.validate().unwrap();
            for line in cfg
                .to_toml()
                .lines()
                .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            {
                let key = line.split('=').next().unwrap().trim();
                assert!(
                    names.contains(&key),
                    "{experiment}/{preset}: '{key}' is not in KEYS"
                );
            }
        }
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = readme
        .split("<!-- keys:begin -->\n")
        .nth(1)
        .and_then(|rest| rest.split("<!-- keys:end -->").next())
        .expect("the README's key table markers");
    assert_eq!(
        table,
        keys_markdown(),
        "README's key table: regenerate it with `emprior keys`"
    );
}

/// Each rule's range is what validate enforces, and its message says it.
#[test]
fn key_rules_are_enforced_with_their_range() {
    let mut cfg = Config::preset("manifold", "quick").unwrap();
    cfg.set("covariance=diagonal").unwrap();
    let e = cfg.validate().expect_err("refused").to_string();
    assert!(
        e.contains("'covariance' = \"diagonal\" must be one of gaussian, tweedie"),
        "{e}"
    );
    let mut cfg = Config::preset("manifold", "quick").unwrap();
    cfg.set("filter_first=2").unwrap();
    let e = cfg.validate().expect_err("refused").to_string();
    assert!(e.contains("'filter_first' = 2 must be 0 or 1"), "{e}");
    let mut cfg = Config::preset("cifar10", "quick").unwrap();
    cfg.set("laps=-1").unwrap();
    let e = cfg.validate().expect_err("refused").to_string();
    assert!(e.contains("'laps' = -1 must be an integer >= 0"), "{e}");
}
