//! EM on the user's own vectors through the command line, as the README tells it: observations,
//! operators and the truth written as .npy files (float32, as NumPy writes them), `emprior em
//! vectors`, then `emprior posterior` replaying a lap's checkpoint on the observations the run
//! saved.

use std::path::{Path, PathBuf};

mod common;

use common::{emprior, run_dir};

use emprior::io::{read_npy, write_npy_f32};
use emprior::ops::Philox;

/// n points on a helix in 3-D seen through random 2 x 3 projections with noise sigma_y; the
/// files written into `dir`: x.npy [n, 3], a.npy [n, 2, 3], y.npy [n, 2].
fn helix_data(dir: &Path, n: usize, sigma_y: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (d, m) = (3, 2);
    let mut t = vec![0.0f32; n];
    Philox::new(7, 1).fill_uniform(0, &mut t);
    let x: Vec<f32> = t
        .iter()
        .flat_map(|&u| {
            let s = 6.0 * u - 3.0;
            [s.cos(), s.sin(), 0.5 * s]
        })
        .collect();
    let mut a = vec![0.0f32; n * m * d];
    Philox::new(7, 2).fill_normal(0, &mut a);
    for row in a.chunks_exact_mut(d) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
    }
    let mut eps = vec![0.0f32; n * m];
    Philox::new(7, 3).fill_normal(0, &mut eps);
    let y: Vec<f32> = (0..n * m)
        .map(|r| {
            let i = r / m;
            (0..d).map(|j| a[r * d + j] * x[i * d + j]).sum::<f32>() + sigma_y * eps[r]
        })
        .collect();
    write_npy_f32(&dir.join("x.npy"), &[n, d], &x).unwrap();
    write_npy_f32(&dir.join("a.npy"), &[n, m, d], &a).unwrap();
    write_npy_f32(&dir.join("y.npy"), &[n, m], &y).unwrap();
    (x, a, y)
}

fn field(line: &str, key: &str) -> f64 {
    emprior::em::json_field(line, key).unwrap()
}

const SMALL: &[&str] = &[
    "laps=2",
    "init_rounds=4",
    "init_steps=24",
    "estep_steps=24",
    "mstep_steps=600",
    "eval_samples=256",
];

fn em_args(out: &Path, extra: &[String]) -> Vec<String> {
    let mut v: Vec<String> = ["em", "vectors", "--out", out.to_str().unwrap(), "--device", "cpu"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for s in SMALL {
        v.push("--set".into());
        v.push(s.to_string());
    }
    v.extend(extra.iter().cloned());
    v
}

#[test]
fn em_on_your_own_vectors_learns_and_posterior_replays_a_lap() {
    let data = run_dir("vectors", "data");
    std::fs::create_dir_all(&data).unwrap();
    let (n, sigma_y) = (1024, 0.05);
    let (x, a, y) = helix_data(&data, n, sigma_y);
    let out = run_dir("vectors", "run");
    let p = |f: &str| data.join(f).to_str().unwrap().to_string();
    let (ok, log) = emprior(&em_args(
        &out,
        &[
            "--obs".into(),
            p("y.npy"),
            "--operator".into(),
            p("a.npy"),
            "--sigma-y".into(),
            sigma_y.to_string(),
            "--truth".into(),
            p("x.npy"),
        ],
    ));
    assert!(ok, "{log}");
    // The observations, operators and truth are kept in the run, as given.
    let saved = |f: &str| read_npy(&out.join("observations").join(f)).unwrap();
    assert_eq!(saved("obs.npy").to_f32(), y);
    assert_eq!(saved("operator.npy").to_f32(), a);
    assert_eq!(saved("truth.npy").to_f32(), x);
    let samples = read_npy(&out.join("lap-002/samples.npy")).unwrap();
    assert_eq!(samples.shape, vec![n, 3]);
    let lines: Vec<String> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 3, "laps 0..=2");
    let (first, last) = (field(&lines[0], "sinkhorn"), field(&lines[2], "sinkhorn"));
    assert!(
        first.is_finite() && last.is_finite() && last < first,
        "the divergence to the truth falls from the Gaussian initialisation: {first} -> {last}"
    );
    for f in [
        "lap-002/checkpoint.safetensors",
        "lap-002/pairs.png",
        "divergence.png",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }

    // `posterior` replays lap 2's prior on the saved observations.
    let o = |f: &str| out.join("observations").join(f).to_str().unwrap().to_string();
    let post = out.join("replay.npy");
    let (ok, log) = emprior(&[
        "posterior",
        "--checkpoint",
        out.join("lap-002/checkpoint.safetensors").to_str().unwrap(),
        "--obs",
        &o("obs.npy"),
        "--operator",
        &o("operator.npy"),
        "--sigma-y",
        &sigma_y.to_string(),
        "--steps",
        "24",
        "--cg-iters",
        "3",
        "--out",
        post.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{log}");
    assert_eq!(read_npy(&post).unwrap().shape, vec![n, 1, 3]);
    assert!(log.contains("observation fit"), "{log}");
}

/// One operator shared by every observation, a diagonal noise from a file and no ground truth:
/// the run has no divergence to report, resumes from its saved copies after the user's files are
/// gone, and refuses saved observations that were edited.
#[test]
fn shared_operator_diagonal_noise_no_truth_and_resume() {
    let data = run_dir("vectors", "shared-data");
    std::fs::create_dir_all(&data).unwrap();
    let (n, d, m) = (512, 4, 3);
    let mut z = vec![0.0f32; n * d];
    Philox::new(9, 1).fill_normal(0, &mut z);
    // Correlated Gaussian signals, a fixed 3 x 4 operator.
    let x: Vec<f32> = z
        .chunks_exact(d)
        .flat_map(|r| [r[0], 0.5 * r[0] + r[1], r[2], 0.3 * r[3]])
        .collect();
    let a: Vec<f32> = vec![1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 0.0, -0.5, 0.2, 0.2, 0.2, 0.2];
    let sd = [0.05f32, 0.1, 0.02];
    let mut eps = vec![0.0f32; n * m];
    Philox::new(9, 2).fill_normal(0, &mut eps);
    let y: Vec<f32> = (0..n * m)
        .map(|r| {
            let (i, k) = (r / m, r % m);
            (0..d).map(|j| a[k * d + j] * x[i * d + j]).sum::<f32>() + sd[k] * eps[r]
        })
        .collect();
    write_npy_f32(&data.join("y.npy"), &[n, m], &y).unwrap();
    write_npy_f32(&data.join("a.npy"), &[m, d], &a).unwrap();
    write_npy_f32(&data.join("sd.npy"), &[m], &sd).unwrap();
    let out = run_dir("vectors", "shared-run");
    let p = |f: &str| data.join(f).to_str().unwrap().to_string();
    let mut args = em_args(
        &out,
        &[
            "--obs".into(),
            p("y.npy"),
            "--operator".into(),
            p("a.npy"),
            "--sigma-y-file".into(),
            p("sd.npy"),
        ],
    );
    args.extend(["--set".to_string(), "laps=1".to_string()]);
    let (ok, log) = emprior(&args);
    assert!(ok, "{log}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert!(
        metrics.contains("\"sinkhorn\": null"),
        "no truth, no divergence: {metrics}"
    );
    assert!(log.contains("sinkhorn -"), "{log}");

    // The user's files are gone; the run continues from its own copies.
    std::fs::remove_dir_all(&data).unwrap();
    let config = out.join("config.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("laps = 1", "laps = 2");
    std::fs::write(&config, text).unwrap();
    let resume = |out: &PathBuf| {
        emprior(&[
            "em",
            "vectors",
            "--resume",
            out.to_str().unwrap(),
            "--device",
            "cpu",
        ])
    };
    let (ok, log) = resume(&out);
    assert!(ok, "{log}");
    assert!(out.join("lap-002/DONE").is_file());

    // Edited saved observations are refused by the fingerprint.
    let mut edited = y.clone();
    edited[5] += 1.0;
    write_npy_f32(&out.join("observations/obs.npy"), &[n, m], &edited).unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("laps = 2", "laps = 3");
    std::fs::write(&config, text).unwrap();
    let (ok, log) = resume(&out);
    assert!(!ok && log.contains("the observations differ"), "{log}");
}

#[test]
fn bad_vector_inputs_are_named() {
    let data = run_dir("vectors", "bad");
    std::fs::create_dir_all(&data).unwrap();
    write_npy_f32(&data.join("y.npy"), &[8, 2], &[0.5; 16]).unwrap();
    write_npy_f32(&data.join("a-wrong.npy"), &[8, 3, 4], &[0.5; 96]).unwrap();
    write_npy_f32(&data.join("truth-wrong.npy"), &[8, 5], &[0.5; 40]).unwrap();
    write_npy_f32(&data.join("a.npy"), &[2, 4], &[0.5; 8]).unwrap();
    let p = |f: &str| data.join(f).to_str().unwrap().to_string();
    let out = |name: &str| data.join(name).to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--operator".into(), p("a.npy")], "needs obs"),
        (vec!["--obs".into(), p("y.npy")], "needs operator"),
        (
            vec!["--obs".into(), p("y.npy"), "--operator".into(), p("a-wrong.npy")],
            "expected [8, 2, d] (per observation) or [2, d] (shared)",
        ),
        (
            vec![
                "--obs".into(),
                p("y.npy"),
                "--operator".into(),
                p("a.npy"),
                "--truth".into(),
                p("truth-wrong.npy"),
            ],
            "truth: expected [8, 4]",
        ),
    ];
    for (i, (extra, want)) in cases.into_iter().enumerate() {
        let mut args: Vec<String> = ["em", "vectors", "--device", "cpu", "--out"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(out(&format!("run{i}")));
        args.extend(extra);
        let (ok, log) = emprior(&args);
        assert!(!ok && log.contains(want), "wanted '{want}': {log}");
    }
}
