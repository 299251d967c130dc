//! The EM loop end to end on small manifold configurations: the divergence to the ground truth
//! falls; a run killed mid-lap and resumed ends bit for bit where an uninterrupted one does; bad
//! configurations and damaged runs stop with a message that names the cause.

use std::path::{Path, PathBuf};
use std::process::Command;

use emprior::em::{run_manifold, Config};
use emprior::io::load_checkpoint;
use emprior::{DType, Device};

fn dir(name: &str) -> PathBuf {
    // As the binary does: keep freed activations in-process (glibc), for CPU speed.
    emprior::tune_cpu_allocator();
    let d = std::env::temp_dir().join(format!("emprior-em-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
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

fn emprior(args: &[&str], abort_lap: Option<usize>) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_emprior"));
    cmd.args(args);
    if let Some(lap) = abort_lap {
        cmd.env("EMPRIOR_ABORT_LAP", lap.to_string());
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn em_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["em", "manifold", "--device", "cpu", "--out", out];
    for s in SMALL.iter().chain(extra) {
        v.push("--set");
        v.push(s);
    }
    v
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn a_run_killed_mid_lap_and_resumed_matches_an_uninterrupted_one() {
    let (a, b) = (dir("whole"), dir("resumed"));
    let (sa, sb) = (a.to_str().unwrap(), b.to_str().unwrap());
    // Determinism, not quality, is under test here: a smaller run still.
    let tiny = [
        "laps=2",
        "observations=512",
        "mstep_steps=150",
        "eval_samples=128",
    ];
    let (ok, log) = emprior(&em_args(sa, &tiny), None);
    assert!(ok, "{log}");
    // Killed during lap 2 (after its E-step, before anything of lap 2 is written)...
    let (ok, log) = emprior(&em_args(sb, &tiny), Some(2));
    assert!(!ok && log.contains("aborted during lap 2"), "{log}");
    assert!(b.join("lap-001/DONE").is_file() && !b.join("lap-002").join("DONE").exists());
    // ...and resumed from lap 1.
    let (ok, log) = emprior(&["em", "manifold", "--device", "cpu", "--resume", sb], None);
    assert!(ok && log.contains("resuming"), "{log}");
    for f in ["lap-002/samples.npy", "lap-001/samples.npy"] {
        assert!(
            bytes(&a.join(f)) == bytes(&b.join(f)),
            "{f} differs between the uninterrupted and the resumed run"
        );
    }
    // Checkpoints: the same weights bit for bit and the same metadata (the file bytes may differ:
    // safetensors writes its metadata map in hash order).
    for f in ["lap-001/checkpoint.safetensors", "lap-002/checkpoint.safetensors"] {
        let (ca, cb) = (
            load_checkpoint(&a.join(f), DType::F32).unwrap(),
            load_checkpoint(&b.join(f), DType::F32).unwrap(),
        );
        let bits = |t: &emprior::Tensor| {
            t.to_vec_f32()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        assert!(
            bits(&ca.params) == bits(&cb.params),
            "{f}: the weights differ between the uninterrupted and the resumed run"
        );
        assert_eq!(ca.metadata, cb.metadata, "{f}: metadata");
    }
    let strip = |p: &Path| -> Vec<String> {
        // The metrics lines agree but for the wall-clock timings.
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| l.split(", \"estep_seconds\"").next().unwrap().to_string())
            .collect()
    };
    assert_eq!(strip(&a.join("metrics.jsonl")), strip(&b.join("metrics.jsonl")));

    // A damaged checkpoint in the lap to resume from is named.
    std::fs::write(b.join("lap-002/checkpoint.safetensors"), b"garbage").unwrap();
    let (ok, log) = emprior(&["em", "manifold", "--device", "cpu", "--resume", sb], None);
    assert!(!ok && log.contains("lap-002/checkpoint.safetensors"), "{log}");
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

    let (ok, log) = emprior(
        &[
            "em",
            "manifold",
            "--device",
            "cpu",
            "--set",
            "laps=lots",
            "--out",
            "/tmp/never",
        ],
        None,
    );
    assert!(!ok && log.contains("laps"), "{log}");
    let (ok, log) = emprior(
        &[
            "em",
            "manifold",
            "--device",
            "cpu",
            "--out",
            "/proc/emprior-not-writable",
        ],
        None,
    );
    assert!(!ok && log.contains("/proc/emprior-not-writable"), "{log}");
}
