//! Helpers shared by the integration tests: seeded random inputs and llm.c's tolerance rule.
#![allow(dead_code)]

use emprior::device::Device;
use emprior::ops::{GemmSpec, Philox};
use emprior::Error;
use emprior::Tensor;

/// `n` values uniform in [lo, hi), reproducible from `seed`.
pub fn random_vec(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut v = vec![0.0; n];
    Philox::new(seed, 0x7e57).fill_uniform(0, &mut v);
    v.iter_mut().for_each(|x| *x = lo + (hi - lo) * *x);
    v
}

/// Asserts |got - want| <= atol + rtol * |want| everywhere, printing the first few comparisons as
/// proof and the worst offenders on failure.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut bad = Vec::new();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        // A NaN (a poisoned output left unwritten) fails too.
        if err.is_nan() || err > atol + rtol * w.abs() {
            bad.push((i, g, w, err));
        }
    }
    if !bad.is_empty() {
        let shown: Vec<String> = bad
            .iter()
            .take(8)
            .map(|(i, g, w, e)| format!("[{i}] got {g} want {w} (err {e:.3e})"))
            .collect();
        panic!(
            "{what}: {} of {} values outside atol {atol:e} + rtol {rtol:e}: {}",
            bad.len(),
            got.len(),
            shown.join("; ")
        );
    }
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The first GPU, or None after printing why the calling test is skipped. With
/// EMPRIOR_REQUIRE_GPU=1 (the device-check script sets it) a missing GPU fails the test instead.
pub fn gpu_or_skip(test: &str) -> Option<Device> {
    match Device::cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            let reason = match e {
                Error::GpuUnavailable(r) => r,
                other => other.to_string(),
            };
            if std::env::var("EMPRIOR_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("{test}: EMPRIOR_REQUIRE_GPU=1 but GPU unavailable: {reason}");
            }
            // Straight to the stderr handle: libtest captures println!/eprintln! of passing tests,
            // and a skip must never be silent.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "{test}: skipped: GPU unavailable: {reason}");
            None
        }
    }
}

/// The f64 reference: C = alpha op(A) op(B) + beta C over a batch (rank-2 operands broadcast).
pub fn naive_gemm(
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    c0: &[f32],
    spec: GemmSpec,
) -> Vec<f64> {
    let (ba, ra, ca) = if a_shape.len() == 3 {
        (a_shape[0], a_shape[1], a_shape[2])
    } else {
        (1, a_shape[0], a_shape[1])
    };
    let (bb, rb, cb) = if b_shape.len() == 3 {
        (b_shape[0], b_shape[1], b_shape[2])
    } else {
        (1, b_shape[0], b_shape[1])
    };
    let (m, k) = if spec.trans_a { (ca, ra) } else { (ra, ca) };
    let n = if spec.trans_b { rb } else { cb };
    let batch = ba.max(bb);
    let mut c = vec![0.0f64; batch * m * n];
    for z in 0..batch {
        let ao = if ba == 1 { 0 } else { z * ra * ca };
        let bo = if bb == 1 { 0 } else { z * rb * cb };
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f64;
                for p in 0..k {
                    let av = if spec.trans_a {
                        a[ao + p * ca + i]
                    } else {
                        a[ao + i * ca + p]
                    };
                    let bv = if spec.trans_b {
                        b[bo + j * cb + p]
                    } else {
                        b[bo + p * cb + j]
                    };
                    acc += av as f64 * bv as f64;
                }
                let idx = z * m * n + i * n + j;
                let prev = if spec.beta == 0.0 {
                    0.0
                } else {
                    spec.beta as f64 * c0[idx] as f64
                };
                c[idx] = spec.alpha as f64 * acc + prev;
            }
        }
    }
    c
}

/// (batch_a, batch_b, m, n, k): ragged sizes, tile multiples, broadcast weights.
pub const GEMM_CASES: &[(usize, usize, usize, usize, usize)] = &[
    (0, 0, 1, 1, 1),
    (0, 0, 5, 3, 7),
    (0, 0, 128, 128, 8),
    (0, 0, 129, 130, 131),
    (3, 3, 33, 65, 17),
    (4, 0, 64, 200, 96),
    (0, 2, 70, 9, 300),
];

pub fn operand_shape(batch: usize, rows: usize, cols: usize) -> Vec<usize> {
    if batch == 0 {
        vec![rows, cols]
    } else {
        vec![batch, rows, cols]
    }
}

/// An f32 tensor of uniforms in [-scale, scale) on `dev`, reproducible from `seed`.
pub fn on(dev: &Device, seed: u64, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f32(&random_vec(seed, n, -scale, scale), shape, dev).unwrap()
}

/// Runs `f` on the CPU and on `gpu` and compares every output norm-wise:
/// ||gpu - cpu|| / ||cpu|| <= tol (a NaN anywhere fails).
pub fn parity(what: &str, gpu: &Device, tol: f64, f: impl Fn(&Device) -> Vec<Tensor>) {
    let (want, got) = (f(&Device::Cpu), f(gpu));
    assert_eq!(want.len(), got.len());
    for (k, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w.shape(), g.shape(), "{what} output {k}: shape");
        let (w, g) = (w.to_vec_f32().unwrap(), g.to_vec_f32().unwrap());
        let (mut num, mut den, mut max_abs) = (0.0f64, 0.0f64, 0.0f64);
        for (&a, &b) in w.iter().zip(&g) {
            let d = (a as f64 - b as f64).abs();
            num += d * d;
            den += (a as f64).powi(2);
            max_abs = if d.is_nan() { f64::NAN } else { max_abs.max(d) };
        }
        let rel = (num / den.max(1e-30)).sqrt();
        println!("{what} output {k}: relative error {rel:.2e}, max abs {max_abs:.2e}");
        assert!(
            rel <= tol && !max_abs.is_nan(),
            "{what} output {k}: relative error {rel:.3e} > {tol:e} (max abs {max_abs:e})"
        );
    }
}

/// The posterior of x ~ N(mu, S) given y = A x + N(0, s2 I) (A is m x d, row-major) and,
/// optionally, also x_t = x + N(0, t2 I): (mean, covariance) by dense f64 algebra, written
/// independently of the library's Woodbury and CG code.
pub fn gaussian_posterior(
    mu: &[f64],
    s: &[f64],
    a: &[f64],
    y: &[f64],
    s2: f64,
    x_t: Option<(&[f64], f64)>,
) -> (Vec<f64>, Vec<f64>) {
    use emprior::gaussian::linalg::spd_inverse;
    let (d, m) = (mu.len(), y.len());
    let sinv = spd_inverse(s, d).unwrap();
    let mut prec = sinv.clone();
    for i in 0..d {
        if let Some((_, t2)) = x_t {
            prec[i * d + i] += 1.0 / t2;
        }
        for j in 0..d {
            prec[i * d + j] += (0..m).map(|r| a[r * d + i] * a[r * d + j]).sum::<f64>() / s2;
        }
    }
    let cov = spd_inverse(&prec, d).unwrap();
    let rhs: Vec<f64> = (0..d)
        .map(|i| {
            (0..d).map(|j| sinv[i * d + j] * mu[j]).sum::<f64>()
                + (0..m).map(|r| a[r * d + i] * y[r]).sum::<f64>() / s2
                + x_t.map_or(0.0, |(xt, t2)| xt[i] / t2)
        })
        .collect();
    let mean = (0..d)
        .map(|i| (0..d).map(|j| cov[i * d + j] * rhs[j]).sum())
        .collect();
    (mean, cov)
}

/// Runs the emprior binary; returns whether it succeeded and its stdout + stderr.
pub fn emprior<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String) {
    emprior_aborting_at(args, None)
}

/// [`emprior`], with `EMPRIOR_ABORT_LAP` set to stop an EM run after that lap's E-step (as a
/// kill mid-lap would).
pub fn emprior_aborting_at<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    abort_lap: Option<usize>,
) -> (bool, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_emprior"));
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

/// A fresh temporary directory for an EM run (removed first); the allocator is tuned as the
/// binary does it (freed activations stay in-process, for CPU speed).
pub fn run_dir(prefix: &str, name: &str) -> std::path::PathBuf {
    emprior::tune_cpu_allocator();
    let d = std::env::temp_dir().join(format!("emprior-{prefix}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub fn file_bytes(p: &std::path::Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Asserts that the checkpoints `files` of runs `a` and `b` hold bit-identical weights and the
/// same metadata (the file bytes may differ: safetensors writes its metadata map in hash order).
pub fn assert_same_checkpoints(a: &std::path::Path, b: &std::path::Path, files: &[&str]) {
    use emprior::io::load_checkpoint;
    let bits = |t: &Tensor| -> Vec<u32> { t.to_vec_f32().unwrap().iter().map(|v| v.to_bits()).collect() };
    for f in files {
        let (ca, cb) = (
            load_checkpoint(&a.join(f), emprior::DType::F32).unwrap(),
            load_checkpoint(&b.join(f), emprior::DType::F32).unwrap(),
        );
        assert!(
            bits(&ca.params) == bits(&cb.params),
            "{f}: the weights differ between the runs"
        );
        assert_eq!(ca.metadata, cb.metadata, "{f}: metadata");
    }
}

/// The lines of a run's metrics.jsonl up to the wall-clock timings (which differ run to run).
pub fn metrics_without_timings(p: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| l.split(", \"estep_seconds\"").next().unwrap().to_string())
        .collect()
}

/// The operands of one GEMM test case: A and B of (batch_a, batch_b, m, n, k) laid out for the
/// spec's transposes (batch 0: a plain matrix), and a starting C, drawn from `seeds`.
pub struct GemmCase {
    pub a: Vec<f32>,
    pub a_shape: Vec<usize>,
    pub b: Vec<f32>,
    pub b_shape: Vec<usize>,
    pub c0: Vec<f32>,
    pub c_shape: Vec<usize>,
}

pub fn gemm_case(
    (ba, bb, m, n, k): (usize, usize, usize, usize, usize),
    spec: GemmSpec,
    seeds: [u64; 3],
) -> GemmCase {
    let a_shape = if spec.trans_a {
        operand_shape(ba, k, m)
    } else {
        operand_shape(ba, m, k)
    };
    let b_shape = if spec.trans_b {
        operand_shape(bb, n, k)
    } else {
        operand_shape(bb, k, n)
    };
    let batch = ba.max(bb);
    let c_shape = operand_shape(batch, m, n);
    GemmCase {
        a: random_vec(seeds[0], a_shape.iter().product(), -1.0, 1.0),
        b: random_vec(seeds[1], b_shape.iter().product(), -1.0, 1.0),
        c0: random_vec(seeds[2], c_shape.iter().product(), -1.0, 1.0),
        a_shape,
        b_shape,
        c_shape,
    }
}
