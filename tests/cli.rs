//! The command line end to end: posterior sampling with a Gaussian prior against the analytic
//! posterior, train -> sample, and errors that name their cause.

use std::path::PathBuf;

mod common;

use common::{emprior, gaussian_posterior, spd_from};

use emprior::io::{read_npy, write_npy_f64};
use emprior::ops::Philox;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("emprior-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn randn(seed: u64, n: usize) -> Vec<f64> {
    let mut z = vec![0.0f32; n];
    Philox::new(seed, 3).fill_normal(0, &mut z);
    z.iter().map(|&v| v as f64).collect()
}

#[test]
fn posterior_command_matches_the_analytic_gaussian_posterior() {
    let dir = dir("gauss");
    let (d, m, k) = (6usize, 3usize, 3000usize);
    let mean = randn(1, d);
    let l = randn(2, d * d);
    let c = spd_from(&l, d, 0.2);
    let a = randn(3, m * d);
    let y = randn(4, m);
    let sy = 0.2;
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    write_npy_f64(&dir.join("mu.npy"), &[d], &mean).unwrap();
    write_npy_f64(&dir.join("cov.npy"), &[d, d], &c).unwrap();
    write_npy_f64(&dir.join("a.npy"), &[m, d], &a).unwrap();
    write_npy_f64(&dir.join("y.npy"), &[1, m], &y).unwrap();
    let (ok, log) = emprior(&[
        "posterior",
        "--obs",
        &p("y.npy"),
        "--sigma-y",
        "0.2",
        "--operator",
        &p("a.npy"),
        "--gaussian-mean",
        &p("mu.npy"),
        "--gaussian-cov",
        &p("cov.npy"),
        "--samples-per-obs",
        "3000",
        "--sampler",
        "ddpm",
        "--steps",
        "256",
        "--cg-iters",
        "20",
        "--cg-rtol",
        "1e-5",
        "--sigma-max",
        "30",
        "--device",
        "cpu",
        "--seed",
        "1",
        "--out",
        &p("x.npy"),
    ]);
    assert!(ok, "{log}");
    let x = read_npy(&dir.join("x.npy")).unwrap();
    assert_eq!(x.shape, vec![1, k, d]);
    let (post, cov) = gaussian_posterior(&mean, &c, &a, &y, sy * sy, None);
    let s = &x.data;
    for j in 0..d {
        let emp: f64 = (0..k).map(|i| s[i * d + j]).sum::<f64>() / k as f64;
        let se = (cov[j * d + j] / k as f64).sqrt();
        assert!(
            (emp - post[j]).abs() < 5.0 * se + 1e-3,
            "mean[{j}] {emp} vs {} (se {se:.1e})",
            post[j]
        );
        let var: f64 = (0..k).map(|i| (s[i * d + j] - emp).powi(2)).sum::<f64>() / (k - 1) as f64;
        let se_var = cov[j * d + j] * (2.0 / k as f64).sqrt();
        assert!(
            (var - cov[j * d + j]).abs() < 5.0 * se_var + 0.02 * cov[j * d + j],
            "var[{j}] {var} vs {}",
            cov[j * d + j]
        );
    }
}

#[test]
fn train_then_sample_through_the_cli() {
    let dir = dir("train");
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let n = 512;
    let data: Vec<f64> = randn(5, 2 * n)
        .iter()
        .enumerate()
        .map(|(i, v)| 0.3 * v + if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    write_npy_f64(&dir.join("data.npy"), &[n, 2], &data).unwrap();
    let (ok, log) = emprior(&[
        "train",
        "--data",
        &p("data.npy"),
        "--preset",
        "mlp",
        "--out",
        &p("ck.safetensors"),
        "--steps",
        "40",
        "--batch",
        "64",
        "--sigma-max",
        "10",
        "--device",
        "cpu",
        "--ema",
        "0.9",
    ]);
    assert!(ok, "{log}");
    assert!(log.contains("final loss"), "{log}");
    let (ok, log) = emprior(&[
        "sample",
        "--checkpoint",
        &p("ck.safetensors"),
        "--n",
        "16",
        "--out",
        &p("s.npy"),
        "--steps",
        "8",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{log}");
    assert_eq!(read_npy(&dir.join("s.npy")).unwrap().shape, vec![16, 2]);
}

#[test]
fn bad_inputs_exit_nonzero_with_a_reason() {
    let dir = dir("errors");
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let (ok, log) = emprior(&[
        "train",
        "--data",
        &p("absent.npy"),
        "--preset",
        "mlp",
        "--out",
        &p("x.safetensors"),
        "--device",
        "cpu",
    ]);
    assert!(!ok && log.contains("absent.npy"), "{log}");

    write_npy_f64(&dir.join("nan.npy"), &[2, 2], &[0.0, f64::NAN, 1.0, 2.0]).unwrap();
    let (ok, log) = emprior(&[
        "train",
        "--data",
        &p("nan.npy"),
        "--preset",
        "mlp",
        "--out",
        &p("x.safetensors"),
        "--device",
        "cpu",
    ]);
    assert!(!ok && log.contains("NaN"), "{log}");
    assert!(
        !dir.join("x.safetensors").exists(),
        "no checkpoint for a failed run"
    );

    write_npy_f64(&dir.join("five.npy"), &[3, 4], &[0.0; 12]).unwrap();
    let (ok, log) = emprior(&[
        "train",
        "--data",
        &p("five.npy"),
        "--preset",
        "manifold",
        "--out",
        &p("x.safetensors"),
        "--device",
        "cpu",
    ]);
    assert!(!ok && log.contains("[4]") && log.contains("[5]"), "{log}");

    write_npy_f64(&dir.join("y.npy"), &[1, 2], &[0.0; 2]).unwrap();
    write_npy_f64(&dir.join("mu.npy"), &[3], &[0.0; 3]).unwrap();
    write_npy_f64(
        &dir.join("cov.npy"),
        &[3, 3],
        &[1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
    )
    .unwrap();
    write_npy_f64(&dir.join("a.npy"), &[2, 4], &[0.0; 8]).unwrap();
    let (ok, log) = emprior(&[
        "posterior",
        "--obs",
        &p("y.npy"),
        "--sigma-y",
        "0.1",
        "--operator",
        &p("a.npy"),
        "--gaussian-mean",
        &p("mu.npy"),
        "--gaussian-cov",
        &p("cov.npy"),
        "--out",
        &p("o.npy"),
        "--device",
        "cpu",
    ]);
    assert!(!ok && log.contains("a.npy") && log.contains("[2, 3]"), "{log}");

    if emprior::device::probe_cuda().is_err() {
        let (ok, log) = emprior(&["info", "--device", "cuda"]);
        assert!(!ok && log.contains("GPU unavailable"), "{log}");
        let (ok, log) = emprior(&[
            "sample",
            "--checkpoint",
            &p("none.safetensors"),
            "--n",
            "1",
            "--out",
            &p("s.npy"),
            "--device",
            "cuda",
        ]);
        assert!(!ok && log.contains("GPU unavailable"), "{log}");
    }
}

/// One-shot commands refuse, before any work, an output they could not write, non-finite
/// observations, operators or Gaussian moments, and masks that are not 0/1; nothing is written.
#[test]
fn posterior_refuses_bad_inputs_and_outputs_before_working() {
    let dir = dir("posterior-inputs");
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    write_npy_f64(&dir.join("y.npy"), &[1, 2], &[0.5, -0.5]).unwrap();
    write_npy_f64(&dir.join("y-nan.npy"), &[1, 2], &[0.5, f64::NAN]).unwrap();
    write_npy_f64(&dir.join("mu.npy"), &[2], &[0.0; 2]).unwrap();
    write_npy_f64(&dir.join("cov.npy"), &[2, 2], &[1.0, 0.0, 0.0, 1.0]).unwrap();
    write_npy_f64(&dir.join("cov-inf.npy"), &[2, 2], &[1.0, 0.0, 0.0, f64::INFINITY]).unwrap();
    write_npy_f64(&dir.join("a.npy"), &[2, 2], &[1.0, 0.0, 0.0, 1.0]).unwrap();
    write_npy_f64(&dir.join("a-nan.npy"), &[2, 2], &[1.0, 0.0, f64::NAN, 1.0]).unwrap();
    write_npy_f64(&dir.join("mask-half.npy"), &[1, 2], &[1.0, 0.5]).unwrap();
    let run = |obs: &str, op: (&str, &str), cov: &str, out: &str| {
        emprior(&[
            "posterior",
            "--obs",
            &p(obs),
            "--sigma-y",
            "0.1",
            op.0,
            &p(op.1),
            "--gaussian-mean",
            &p("mu.npy"),
            "--gaussian-cov",
            &p(cov),
            "--steps",
            "4",
            "--out",
            out,
            "--device",
            "cpu",
        ])
    };
    let out = p("o.npy");
    let cases = [
        (
            run("y-nan.npy", ("--operator", "a.npy"), "cov.npy", &out),
            "y-nan.npy: observation value 1 is NaN",
        ),
        (
            run("y.npy", ("--operator", "a-nan.npy"), "cov.npy", &out),
            "a-nan.npy: operator value 2 is NaN",
        ),
        (
            run("y.npy", ("--operator", "a.npy"), "cov-inf.npy", &out),
            "cov-inf.npy: covariance value 3 is inf",
        ),
        (
            run("y.npy", ("--mask", "mask-half.npy"), "cov.npy", &out),
            "mask value 1 is 0.5",
        ),
        (
            run(
                "y.npy",
                ("--operator", "a.npy"),
                "cov.npy",
                "/nonexistent-dir/o.npy",
            ),
            "cannot write in /nonexistent-dir",
        ),
        (
            run("y.npy", ("--operator", "a.npy"), "cov.npy", &p("")),
            "is a directory",
        ),
    ];
    for ((ok, log), want) in cases {
        assert!(!ok && log.contains(want), "wanted '{want}': {log}");
    }
    assert!(!dir.join("o.npy").exists(), "nothing written");
    let (ok, log) = run("y.npy", ("--operator", "a.npy"), "cov.npy", &out);
    assert!(ok && dir.join("o.npy").exists(), "{log}");
}

/// The diagnostics line of `sample` and `posterior` counts non-finite samples and samples far
/// from the rest (norm over 10x the median), and asks for a warning when there are any.
#[test]
fn sample_diagnostics_count_diverged_and_far_samples() {
    use emprior::commands::sample_diagnostics;
    let mut x: Vec<f32> = (0..200).map(|i| ((i * 7) % 11) as f32 / 10.0 - 0.5).collect();
    let (text, warn) = sample_diagnostics(&x, 100);
    assert!(
        !warn && text.contains("100 samples: 0 non-finite, 0 far from the rest"),
        "{text}"
    );
    x[10] = 8000.0;
    x[51] = f32::NAN;
    let (text, warn) = sample_diagnostics(&x, 100);
    assert!(
        warn && text.contains("1 non-finite, 1 far from the rest"),
        "{text}"
    );
    assert!(text.contains("largest 8000.0"), "{text}");
}
