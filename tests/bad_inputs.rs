//! A table of bad inputs and faults against the command line, as a hostile user would try them:
//! each must exit with status 1 (never a panic's 101, an abort's 134 or a signal), print no
//! panic, and say what is wrong in a message that contains the expected words. Run with
//! `--nocapture` to see the table (input, exit code, first line of the message).

use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use emprior::em::Config;
use emprior::io::write_npy_f64;

/// A fresh directory of this test process for the test `name`: one each, since the tests of
/// this binary run in parallel and each empties its own (a shared one was emptied under the
/// other test's feet: a rename into it failed in CI).
fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("emprior-bad-inputs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An .npy file with `header` (the dictionary) and `data` bytes, version 1.0.
fn raw_npy(path: &Path, header: &str, data: &[u8]) {
    let mut h = header.to_string();
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((h.len() as u16).to_le_bytes());
    bytes.extend(h.as_bytes());
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

/// The command's exit code and its output (stdout then stderr).
fn run(args: &[String]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_emprior"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// The error line of a failed command's output (the last line that starts with "error").
fn first_line(text: &str) -> String {
    text.lines()
        .rev()
        .find(|l| l.starts_with("error") || l.starts_with("Error"))
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("")
        .to_string()
}

struct Case {
    input: &'static str,
    args: Vec<String>,
    want: &'static str,
}

#[test]
fn bad_inputs_are_refused_with_a_message_that_names_the_problem() {
    let dir = dir("table");
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();

    // ---- Files: arrays, checkpoints, configurations, images ---------------------------------
    let good: Vec<f64> = (0..128).map(|i| ((i * 37) % 17) as f64 / 8.0 - 1.0).collect();
    write_npy_f64(&dir.join("good.npy"), &[64, 2], &good).unwrap();
    let mut nan = good.clone();
    nan[77] = f64::NAN;
    write_npy_f64(&dir.join("nan.npy"), &[64, 2], &nan).unwrap();
    std::fs::write(dir.join("empty.npy"), b"").unwrap();
    std::fs::write(dir.join("text.npy"), b"x,y\n1,2\n").unwrap();
    let bytes = std::fs::read(dir.join("good.npy")).unwrap();
    std::fs::write(dir.join("truncated.npy"), &bytes[..bytes.len() - 100]).unwrap();
    raw_npy(
        &dir.join("huge.npy"),
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }",
        &[0; 16],
    );
    raw_npy(
        &dir.join("complex.npy"),
        "{'descr': '<c8', 'fortran_order': False, 'shape': (2, 2), }",
        &[0; 32],
    );
    raw_npy(
        &dir.join("fortran.npy"),
        "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
        &[0; 16],
    );
    raw_npy(
        &dir.join("negative.npy"),
        "{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 2), }",
        &[0; 16],
    );
    write_npy_f64(&dir.join("rank1.npy"), &[5], &[0.0; 5]).unwrap();
    write_npy_f64(&dir.join("zero-rows.npy"), &[0, 2], &[]).unwrap();

    // A real checkpoint to corrupt.
    let (code, text) = run(&s(&[
        "train",
        "--data",
        &p("good.npy"),
        "--preset",
        "mlp",
        "--steps",
        "20",
        "--batch",
        "8",
        "--out",
        &p("ck.safetensors"),
        "--device",
        "cpu",
    ]));
    assert_eq!(code, Some(0), "{text}");
    let ck = std::fs::read(dir.join("ck.safetensors")).unwrap();
    std::fs::write(dir.join("ck-truncated.safetensors"), &ck[..ck.len() / 2]).unwrap();
    let mut garbage = ck.clone();
    garbage[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(dir.join("ck-length.safetensors"), &garbage).unwrap();
    std::fs::write(
        dir.join("ck-random.safetensors"),
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761u32) >> 13) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let header = u64::from_le_bytes(ck[..8].try_into().unwrap()) as usize;
    let mut poisoned = ck.clone();
    poisoned[8 + header..12 + header].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(dir.join("ck-nan.safetensors"), &poisoned).unwrap();

    // Posterior inputs: 4 observations of 2 values of a 2-D Gaussian.
    write_npy_f64(
        &dir.join("y.npy"),
        &[4, 2],
        &[0.1, -0.2, 0.3, 0.0, -0.1, 0.2, 0.0, 0.5],
    )
    .unwrap();
    let mut y_inf = vec![0.1; 8];
    y_inf[5] = f64::INFINITY;
    write_npy_f64(&dir.join("y-inf.npy"), &[4, 2], &y_inf).unwrap();
    write_npy_f64(&dir.join("mu.npy"), &[2], &[0.0, 0.0]).unwrap();
    write_npy_f64(&dir.join("cov.npy"), &[2, 2], &[1.0, 0.2, 0.2, 1.0]).unwrap();
    write_npy_f64(&dir.join("cov-3.npy"), &[3, 3], &[0.0; 9]).unwrap();
    write_npy_f64(&dir.join("cov-indefinite.npy"), &[2, 2], &[1.0, 3.0, 3.0, 1.0]).unwrap();
    write_npy_f64(&dir.join("a.npy"), &[2, 2], &[1.0, 0.0, 0.0, 1.0]).unwrap();
    write_npy_f64(&dir.join("a-wrong.npy"), &[3, 2], &[0.0; 6]).unwrap();
    write_npy_f64(
        &dir.join("mask-half.npy"),
        &[4, 2],
        &[1.0, 0.5, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0],
    )
    .unwrap();
    let posterior = |extra: &[&str]| {
        let mut v = s(&[
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
            "--steps",
            "4",
            "--out",
            &p("post.npy"),
            "--device",
            "cpu",
        ]);
        // A flag given again replaces the default; an empty value removes the flag.
        for pair in extra.chunks(2) {
            match v.iter().position(|a| a == pair[0]) {
                Some(i) if pair[1].is_empty() => {
                    v.drain(i..i + 2);
                }
                Some(i) => v[i + 1] = pair[1].to_string(),
                None => v.extend(pair.iter().map(|x| x.to_string())),
            }
        }
        v
    };
    let train = |data: &str, extra: &[&str]| {
        let mut v = s(&[
            "train",
            "--data",
            &p(data),
            "--preset",
            "mlp",
            "--steps",
            "5",
            "--batch",
            "8",
            "--out",
            &p("out.safetensors"),
            "--device",
            "cpu",
        ]);
        for pair in extra.chunks(2) {
            match v.iter().position(|a| a == pair[0]) {
                Some(i) => v[i + 1] = pair[1].to_string(),
                None => v.extend(pair.iter().map(|x| x.to_string())),
            }
        }
        v
    };
    let sample = |ck: &str, extra: &[&str]| {
        let mut v = s(&[
            "sample",
            "--checkpoint",
            &p(ck),
            "--n",
            "4",
            "--steps",
            "4",
            "--out",
            &p("s.npy"),
            "--device",
            "cpu",
        ]);
        for pair in extra.chunks(2) {
            match v.iter().position(|a| a == pair[0]) {
                Some(i) => v[i + 1] = pair[1].to_string(),
                None => v.extend(pair.iter().map(|x| x.to_string())),
            }
        }
        v
    };
    let em = |exp: &str, out: &str, sets: &[&str]| {
        let mut v = s(&["em", exp, "--out", &p(out), "--device", "cpu"]);
        for k in sets {
            v.push("--set".into());
            v.push(k.to_string());
        }
        v
    };

    // Run directories: one that holds a lap, one whose data-defining key was edited, one in use.
    let origin = Config::preset("manifold", "quick").unwrap().to_toml();
    for name in ["held", "edited"] {
        std::fs::create_dir_all(dir.join(name).join("lap-000")).unwrap();
        std::fs::write(dir.join(name).join("lap-000/DONE"), "complete\n").unwrap();
        std::fs::write(dir.join(name).join(".config.origin.toml"), &origin).unwrap();
        std::fs::write(dir.join(name).join("config.toml"), &origin).unwrap();
    }
    let edited = origin.replacen("sigma_y = 0.01", "sigma_y = 0.02", 1);
    assert_ne!(edited, origin, "the preset's sigma_y line");
    std::fs::write(dir.join("edited/config.toml"), edited).unwrap();
    std::fs::create_dir_all(dir.join("broken")).unwrap();
    std::fs::write(dir.join("broken/config.toml"), "laps = [1, 2\nseed = ").unwrap();
    std::fs::create_dir_all(dir.join("busy")).unwrap();
    let mut lock = std::fs::File::create(dir.join("busy/.lock")).unwrap();
    write!(lock, "{}", std::process::id()).unwrap();
    // SAFETY: flock on a descriptor this File owns.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let busy_pid = std::process::id().to_string();
    // A PNG directory with one corrupt file and one of the wrong size.
    std::fs::create_dir_all(dir.join("pngs")).unwrap();
    std::fs::write(dir.join("pngs/000.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    std::fs::write(dir.join("pngs/001.png"), b"").unwrap();

    let cases = vec![
        // .npy files
        Case {
            input: "train: --data that does not exist",
            args: train("absent.npy", &[]),
            want: "absent.npy",
        },
        Case {
            input: "train: an empty .npy",
            args: train("empty.npy", &[]),
            want: "empty.npy",
        },
        Case {
            input: "train: a CSV named .npy",
            args: train("text.npy", &[]),
            want: "text.npy",
        },
        Case {
            input: "train: a truncated .npy",
            args: train("truncated.npy", &[]),
            want: "truncated.npy",
        },
        Case {
            input: "train: an .npy whose shape overflows",
            args: train("huge.npy", &[]),
            want: "huge.npy",
        },
        Case {
            input: "train: a complex64 .npy",
            args: train("complex.npy", &[]),
            want: "<c8",
        },
        Case {
            input: "train: a Fortran-order .npy",
            args: train("fortran.npy", &[]),
            want: "fortran",
        },
        Case {
            input: "train: an .npy with a negative dimension",
            args: train("negative.npy", &[]),
            want: "negative.npy",
        },
        Case {
            input: "train: a NaN in the data",
            args: train("nan.npy", &[]),
            want: "NaN",
        },
        Case {
            input: "train: data of rank 1",
            args: train("rank1.npy", &[]),
            want: "rank1.npy",
        },
        Case {
            input: "train: data with no rows",
            args: train("zero-rows.npy", &[]),
            want: "zero-rows.npy",
        },
        Case {
            input: "train: the manifold preset on 2-D data",
            args: train("good.npy", &["--preset", "manifold"]),
            want: "[5]",
        },
        Case {
            input: "train: an unknown preset",
            args: train("good.npy", &["--preset", "resnet"]),
            want: "resnet",
        },
        // training options
        Case {
            input: "train: --steps 0",
            args: train("good.npy", &["--steps", "0"]),
            want: "--steps 0",
        },
        Case {
            input: "train: --batch 0",
            args: train("good.npy", &["--batch", "0"]),
            want: "--batch 0",
        },
        Case {
            input: "train: --batch 10^15 (memory)",
            args: train("good.npy", &["--batch", "1000000000000000"]),
            want: "host memory",
        },
        Case {
            input: "train: --ema 2",
            args: train("good.npy", &["--ema", "2"]),
            want: "ema",
        },
        Case {
            input: "train: --lr -1",
            args: train("good.npy", &["--lr", "-1"]),
            want: "lr",
        },
        Case {
            input: "train: --lr NaN",
            args: train("good.npy", &["--lr", "NaN"]),
            want: "lr",
        },
        Case {
            input: "train: --sigma-min above --sigma-max",
            args: train("good.npy", &["--sigma-min", "10", "--sigma-max", "1"]),
            want: "sigma",
        },
        Case {
            input: "train: --out in a missing directory",
            args: train("good.npy", &["--out", "/nonexistent-dir/ck.safetensors"]),
            want: "/nonexistent-dir",
        },
        // checkpoints
        Case {
            input: "sample: a checkpoint that does not exist",
            args: sample("absent.safetensors", &[]),
            want: "absent.safetensors",
        },
        Case {
            input: "sample: a truncated checkpoint",
            args: sample("ck-truncated.safetensors", &[]),
            want: "ck-truncated.safetensors",
        },
        Case {
            input: "sample: a checkpoint whose header length is 2^64-1",
            args: sample("ck-length.safetensors", &[]),
            want: "ck-length.safetensors",
        },
        Case {
            input: "sample: random bytes as a checkpoint",
            args: sample("ck-random.safetensors", &[]),
            want: "ck-random.safetensors",
        },
        Case {
            input: "sample: a checkpoint holding a NaN weight",
            args: sample("ck-nan.safetensors", &[]),
            want: "non-finite",
        },
        Case {
            input: "sample: --n 0",
            args: sample("ck.safetensors", &["--n", "0"]),
            want: "--n 0",
        },
        Case {
            input: "sample: --steps 0",
            args: sample("ck.safetensors", &["--steps", "0"]),
            want: "step",
        },
        Case {
            input: "sample: --n 10^12 (memory)",
            args: sample("ck.safetensors", &["--n", "1000000000000"]),
            want: "host memory",
        },
        Case {
            input: "sample: --out is a directory",
            args: sample("ck.safetensors", &["--out", &p("")]),
            want: "is a directory",
        },
        // posterior
        Case {
            input: "posterior: an infinite observation",
            args: posterior(&["--obs", &p("y-inf.npy")]),
            want: "observation value 5 is inf",
        },
        Case {
            input: "posterior: --sigma-y -1",
            args: posterior(&["--sigma-y", "-1"]),
            want: "--sigma-y",
        },
        Case {
            input: "posterior: --sigma-y NaN",
            args: posterior(&["--sigma-y", "NaN"]),
            want: "--sigma-y",
        },
        Case {
            input: "posterior: an operator of the wrong shape",
            args: posterior(&["--operator", &p("a-wrong.npy")]),
            want: "a-wrong.npy",
        },
        Case {
            input: "posterior: a mask holding 0.5",
            args: posterior(&["--operator", "", "--mask", &p("mask-half.npy")]),
            want: "mask value 1 is 0.5",
        },
        Case {
            input: "posterior: a covariance of the wrong size",
            args: posterior(&["--gaussian-cov", &p("cov-3.npy")]),
            want: "cov-3.npy",
        },
        Case {
            input: "posterior: an indefinite covariance",
            args: posterior(&["--gaussian-cov", &p("cov-indefinite.npy")]),
            want: "cov-indefinite.npy",
        },
        Case {
            input: "posterior: an unknown --covariance",
            args: posterior(&["--covariance", "magic"]),
            want: "magic",
        },
        Case {
            input: "posterior: --samples-per-obs 10^12 (memory)",
            args: posterior(&["--samples-per-obs", "1000000000000"]),
            want: "host memory",
        },
        Case {
            input: "posterior: --samples-per-obs 0",
            args: posterior(&["--samples-per-obs", "0"]),
            want: "--samples-per-obs 0",
        },
        Case {
            input: "posterior: --sigma-min 0",
            args: posterior(&["--sigma-min", "0"]),
            want: "sigma_min = 0",
        },
        Case {
            input: "posterior: --out in a missing directory",
            args: posterior(&["--out", "/nonexistent-dir/o.npy"]),
            want: "/nonexistent-dir",
        },
        // EM configuration
        Case {
            input: "em: an unknown experiment",
            args: em("galaxies", "e1", &[]),
            want: "galaxies",
        },
        Case {
            input: "em: an unknown preset",
            args: {
                let mut v = em("manifold", "e2", &[]);
                v.extend(s(&["--preset", "huge"]));
                v
            },
            want: "huge",
        },
        Case {
            input: "em: --set of an unknown key",
            args: em("manifold", "e3", &["lapz=3"]),
            want: "lapz",
        },
        Case {
            input: "em: --set without '='",
            args: em("manifold", "e4", &["laps"]),
            want: "expected key=value",
        },
        Case {
            input: "em: --set laps=abc",
            args: em("manifold", "e5", &["laps=abc"]),
            want: "laps",
        },
        Case {
            input: "em: --set ema=2 (images)",
            args: em("cifar10", "e6", &["ema=2"]),
            want: "ema",
        },
        Case {
            input: "em: --set sigma_y=-1",
            args: em("manifold", "e7", &["sigma_y=-1"]),
            want: "sigma_y",
        },
        Case {
            input: "em: --set sigma_min above sigma_max",
            args: em("manifold", "e8", &["sigma_min=500"]),
            want: "sigma_min",
        },
        Case {
            input: "em: --set mstep_batch=0",
            args: em("manifold", "e9", &["mstep_batch=0"]),
            want: "mstep_batch",
        },
        Case {
            input: "em: --set lr_init=inf",
            args: em("manifold", "e10", &["lr_init=inf"]),
            want: "lr_init",
        },
        Case {
            input: "em: --set observations=10^12 (memory)",
            args: em("manifold", "e11", &["observations=1000000000000"]),
            want: "host memory",
        },
        Case {
            input: "em: CIFAR-10 with mstep_batch=10^7 (memory)",
            args: em("cifar10", "e12", &["mstep_batch=10000000"]),
            want: "GB of host memory",
        },
        Case {
            input: "em: CIFAR-10 from a missing directory",
            args: em("cifar10", "e13", &["data_dir=/nonexistent-cifar"]),
            want: "/nonexistent-cifar",
        },
        Case {
            input: "em: a PNG directory with a corrupt PNG",
            args: em(
                "cifar10",
                "e14",
                &[
                    "dataset=png-dir",
                    &format!("data_dir={}", p("pngs")),
                    "observations=1",
                    "heldout=1",
                ],
            ),
            want: "000.png",
        },
        Case {
            input: "em: a learning rate of 1e30 (the M-step diverges)",
            args: em(
                "manifold",
                "e15",
                &[
                    "observations=256",
                    "init_rounds=1",
                    "estep_steps=8",
                    "eval_samples=128",
                    "lr_init=1e30",
                    "lr_end=1e30",
                ],
            ),
            want: "lap 1, M-step: training step 1: the loss is inf",
        },
        // run directories
        Case {
            input: "em: a fresh run into a directory that holds one",
            args: em("manifold", "held", &[]),
            want: "already holds a run",
        },
        Case {
            input: "em: a run into a directory in use",
            args: em("manifold", "busy", &[]),
            want: "in use by another emprior run",
        },
        Case {
            input: "em: --resume of a directory without config.toml",
            args: s(&["em", "manifold", "--resume", &p("nowhere"), "--device", "cpu"]),
            want: "config.toml",
        },
        Case {
            input: "em: --resume with a corrupt config.toml",
            args: s(&["em", "manifold", "--resume", &p("broken"), "--device", "cpu"]),
            want: "config.toml",
        },
        Case {
            input: "em: --resume after editing sigma_y",
            args: s(&["em", "manifold", "--resume", &p("edited"), "--device", "cpu"]),
            want: "sigma_y (was 0.01, now 0.02)",
        },
        Case {
            input: "em: --resume with --set",
            args: s(&[
                "em",
                "manifold",
                "--resume",
                &p("held"),
                "--set",
                "laps=3",
                "--device",
                "cpu",
            ]),
            want: "--set",
        },
    ];

    let mut table = String::from("| input | exit | first line of the message |\n|---|---|---|\n");
    let mut failures = Vec::new();
    for case in &cases {
        let (code, text) = run(&case.args);
        let line = first_line(&text);
        table.push_str(&format!(
            "| {} | {} | {} |\n",
            case.input,
            code.map_or("signal".into(), |c| c.to_string()),
            line.replace('|', "\\|")
        ));
        let panicked = text.contains("panicked") || text.contains("memory allocation of");
        if code != Some(1) || panicked || !text.contains(case.want) {
            failures.push(format!(
                "{}: exit {code:?}, wanted '{}' in:\n{text}",
                case.input, case.want
            ));
        }
    }
    println!("{table}");
    assert!(
        text_contains_pid(&dir, &busy_pid),
        "the busy directory's lock names its holder"
    );
    drop(lock);
    assert!(cases.len() >= 30);
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The lock file of the busy directory still names the test as its holder (the refused run did
/// not overwrite it).
fn text_contains_pid(dir: &Path, pid: &str) -> bool {
    std::fs::read_to_string(dir.join("busy/.lock")).is_ok_and(|t| t.trim() == pid)
}

/// Launched as two processes (mpirun's variables), a computing command is refused before any
/// work, naming the launcher; a one-process launch and `info` are not.
#[test]
fn a_multi_process_launch_is_refused_before_any_work() {
    let out_dir = dir("launch").join("launched-twice");
    let _ = std::fs::remove_dir_all(&out_dir);
    let out = Command::new(env!("CARGO_BIN_EXE_emprior"))
        .args(["em", "manifold", "--out"])
        .arg(&out_dir)
        .env("OMPI_COMM_WORLD_RANK", "1")
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("rank 1 of 2") && text.contains("Open MPI"),
        "{text}"
    );
    assert!(!out_dir.exists(), "nothing is written");
    let info = Command::new(env!("CARGO_BIN_EXE_emprior"))
        .arg("info")
        .env("SLURM_PROCID", "0")
        .env("SLURM_NTASKS", "4")
        .output()
        .unwrap();
    assert!(info.status.success(), "info runs under any launcher");
}
