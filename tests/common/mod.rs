//! Helpers shared by the integration tests: seeded random inputs, the elementwise tolerance
//! check, the harness of the GPU test binaries (GPU trials ignored, and counted so, without a
//! GPU), the piece-by-piece parity comparison, and the GEMM reference with its K-derived bound.
#![allow(dead_code)]

use emprior::device::Device;
use emprior::ops::{GemmSpec, Philox};
use emprior::Error;
use emprior::Tensor;

/// xorshift64*: a deterministic stream for the mutation runs over the readers (no dependency,
/// the same sequence everywhere).
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `n` values uniform in [lo, hi), reproducible from `seed`.
pub fn random_vec(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut v = vec![0.0; n];
    Philox::new(seed, 0x7e57).fill_uniform(0, &mut v);
    v.iter_mut().for_each(|x| *x = lo + (hi - lo) * *x);
    v
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

// ---- Elementwise comparison: the one place that decides whether a value is close enough ------

/// The elements of `got` outside their bound around `want`: how many, and the worst one (index,
/// excess |got - want| / bound). A NaN on either side is outside any bound, and the worst.
pub struct Outliers {
    pub count: usize,
    pub worst: Option<(usize, f64)>,
}

pub fn outliers(got: &[f32], want: &[f64], bound: impl Fn(usize) -> f64) -> Outliers {
    assert_eq!(got.len(), want.len(), "outliers: lengths");
    let mut out = Outliers {
        count: 0,
        worst: None,
    };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let (err, b) = ((g as f64 - w).abs(), bound(i));
        if err <= b {
            continue;
        }
        out.count += 1;
        let excess = if err.is_nan() { f64::INFINITY } else { err / b };
        if out.worst.is_none_or(|(_, e)| excess > e) {
            out.worst = Some((i, excess));
        }
    }
    out
}

/// The multi-index of flat element `i` of a row-major `shape`.
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for (d, &n) in shape.iter().enumerate().rev() {
        idx[d] = i % n.max(1);
        i /= n.max(1);
    }
    idx
}

/// Asserts |got - want| <= bound[i] everywhere; the message names the worst element by index
/// into `shape`, with both values.
pub fn assert_within(what: &str, shape: &[usize], got: &[f32], want: &[f64], bound: &[f64]) {
    let o = outliers(got, want, |i| bound[i]);
    if let Some((i, _)) = o.worst {
        panic!(
            "{what}: {} of {} values outside their bound; worst element {:?} (flat {i}): got {:e}, \
             want {:e}, |diff| {:.3e} > bound {:.3e}",
            o.count,
            got.len(),
            unravel(i, shape),
            got[i],
            want[i],
            (got[i] as f64 - want[i]).abs(),
            bound[i]
        );
    }
}

/// Asserts |got - want| <= atol + rtol * |want| everywhere (llm.c's rule).
pub fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let bound: Vec<f64> = want.iter().map(|w| atol + rtol * w.abs()).collect();
    assert_within(what, &[got.len()], got, want, &bound);
}

// ---- GPU trials: one harness (libtest-mimic) for the cuda_* test binaries ----------------------

/// GPU trials hold this shared; a trial that needs the whole GPU (the pool's out-of-memory path)
/// holds it exclusively, so that no other trial of the binary allocates meanwhile.
static GPU_LOCK: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// EMPRIOR_REQUIRE_GPU=1 (the device-check script sets it): a missing GPU fails GPU tests.
pub fn gpu_required() -> bool {
    std::env::var("EMPRIOR_REQUIRE_GPU").as_deref() == Ok("1")
}

fn unavailable_reason(e: Error) -> String {
    match e {
        Error::GpuUnavailable(r) => r,
        other => other.to_string(),
    }
}

/// EMPRIOR_GPU_TESTS_ON_CPU=1: without a GPU, run the GPU trials' code with the CPU standing in
/// for the GPU (the device check's dry run): it checks that the test code runs, not the GPU, so
/// such trials still count as ignored (and fail if the code panics).
pub fn gpu_stand_in() -> bool {
    std::env::var("EMPRIOR_GPU_TESTS_ON_CPU").as_deref() == Ok("1")
}

/// The trials of one `harness = false` test binary. CPU trials run everywhere. GPU trials run on
/// cuda:0; without a usable GPU they are marked ignored, so the summary line counts them as
/// `N ignored` rather than passed, or, under EMPRIOR_REQUIRE_GPU=1, they fail. The usual libtest
/// command line works (`--list`, `--exact NAME`, `--include-ignored`, `--test-threads`, filters).
pub struct Suite {
    args: libtest_mimic::Arguments,
    /// Why GPU trials cannot run in this process (None: they can, or this is only a `--list`).
    missing: Option<String>,
    trials: Vec<libtest_mimic::Trial>,
}

/// Where a GPU trial runs.
enum Target {
    Gpu(Device),
    StandIn,
    Missing(String),
}

impl Suite {
    /// Parses the command line and looks for the GPU once, saying at the start what it found.
    pub fn from_args() -> Suite {
        let args = libtest_mimic::Arguments::from_args();
        // Listing never touches the GPU: a script lists the trials, then runs each one alone.
        let found = if args.list { None } else { Some(Device::cuda(0)) };
        let say = |line: String| {
            // Keep stdout parseable when it carries JSON events.
            if matches!(args.format, Some(libtest_mimic::FormatSetting::Json)) {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        };
        let missing = match found {
            None => None,
            Some(Ok(gpu)) => {
                say(format!("GPU tests run on {gpu:?}"));
                None
            }
            Some(Err(e)) => {
                let reason = unavailable_reason(e);
                if gpu_required() {
                    say(format!(
                        "GPU tests fail: EMPRIOR_REQUIRE_GPU=1 but no GPU is usable: {reason}"
                    ));
                } else if gpu_stand_in() {
                    say(format!(
                        "GPU tests ignored, their code run on the CPU (EMPRIOR_GPU_TESTS_ON_CPU=1): {reason}"
                    ));
                } else {
                    say(format!("GPU tests ignored: {reason}"));
                }
                Some(reason)
            }
        };
        Suite {
            args,
            missing,
            trials: Vec::new(),
        }
    }

    /// A trial that runs on the CPU everywhere (the harness's own checks).
    pub fn cpu(&mut self, name: &str, f: impl FnOnce() + Send + 'static) {
        self.trials.push(libtest_mimic::Trial::test(name, move || {
            f();
            Ok(())
        }));
    }

    /// A GPU trial: `f` gets cuda:0 and panics on a mismatch.
    pub fn gpu(&mut self, name: &str, f: impl FnOnce(&Device) + Send + 'static) {
        self.push_gpu(name, f, false);
    }

    /// A GPU trial that runs while no other trial of this binary touches the GPU.
    pub fn gpu_alone(&mut self, name: &str, f: impl FnOnce(&Device) + Send + 'static) {
        self.push_gpu(name, f, true);
    }

    /// A GPU trial that may find this GPU lacks what it tests: `f` answers `Some(why)` and the
    /// trial is reported ignored with that reason, never passed. It runs alone (it may switch a
    /// device-wide kernel choice, such as wgmma, that other trials would otherwise see).
    pub fn gpu_if(&mut self, name: &str, f: impl FnOnce(&Device) -> Option<String> + Send + 'static) {
        self.push_gpu_if(name, f, true);
    }

    fn push_gpu(&mut self, name: &str, f: impl FnOnce(&Device) + Send + 'static, alone: bool) {
        self.push_gpu_if(
            name,
            move |d| {
                f(d);
                None
            },
            alone,
        );
    }

    fn push_gpu_if(
        &mut self,
        name: &str,
        f: impl FnOnce(&Device) -> Option<String> + Send + 'static,
        alone: bool,
    ) {
        let (required, stand_in) = (gpu_required(), gpu_stand_in());
        let ignored = self.missing.is_some() && !required && !stand_in;
        let trial = libtest_mimic::Trial::ignorable_test(name, move || {
            let target = match Device::cuda(0) {
                Ok(gpu) => Target::Gpu(gpu),
                Err(e) if required => {
                    let reason = unavailable_reason(e);
                    return Err(format!("EMPRIOR_REQUIRE_GPU=1 but no GPU is usable: {reason}").into());
                }
                Err(_) if stand_in => Target::StandIn,
                Err(e) => Target::Missing(unavailable_reason(e)),
            };
            let _shared;
            let _exclusive;
            if alone {
                _exclusive = GPU_LOCK.write().unwrap_or_else(|p| p.into_inner());
            } else {
                _shared = GPU_LOCK.read().unwrap_or_else(|p| p.into_inner());
            }
            match target {
                Target::Gpu(gpu) => {
                    let skipped = f(&gpu);
                    // Asynchronous kernel faults surface here, charged to the trial that queued them.
                    gpu.synchronize()
                        .map_err(|e| format!("after the trial, synchronizing the GPU failed: {e}"))?;
                    Ok(match skipped {
                        None => libtest_mimic::Completion::Completed,
                        Some(why) => libtest_mimic::Completion::ignored_with(why),
                    })
                }
                Target::StandIn => {
                    let _ = f(&Device::Cpu);
                    Ok(libtest_mimic::Completion::ignored_with(
                        "test code run on the CPU, GPU not checked",
                    ))
                }
                // Run anyway (--include-ignored) without a GPU: still counted as ignored.
                Target::Missing(reason) => Ok(libtest_mimic::Completion::ignored_with(reason)),
            }
        });
        self.trials.push(trial.with_ignored_flag(ignored));
    }

    /// One GPU trial per parity case.
    pub fn parity_cases(&mut self, cases: &[Case]) {
        for &Case {
            trial,
            what,
            tol,
            run,
        } in cases
        {
            self.gpu(trial, move |gpu| parity(what, gpu, tol, run));
        }
    }

    /// Runs the selected trials, prints libtest's summary line and exits (101 on a failure).
    pub fn run(self) -> ! {
        libtest_mimic::run(&self.args, self.trials).exit()
    }
}

// ---- Parity: the GPU against the CPU oracle, one named piece at a time -------------------------

/// The tolerance of a parity comparison, applied to each named piece of each output on its own
/// (a parameter tensor, or a whole output), never to a norm over everything: one wrong bias
/// gradient among 57M entries barely moves a global norm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tol {
    /// Bound on ||gpu - cpu|| / ||cpu|| over the piece: catches an error spread thinly over it.
    pub norm: f64,
    /// Elementwise bound |gpu - cpu| <= elem * (|cpu| + rms(cpu)): llm.c's atol + rtol |ref| with
    /// atol scaled to the piece's own magnitude, so that one number serves tensors whose scales
    /// differ by orders of magnitude. Catches one wrong element in a large piece.
    pub elem: f64,
}

impl Tol {
    /// Bit-identical results.
    pub const EXACT: Tol = Tol { norm: 0.0, elem: 0.0 };

    /// Norm-wise `norm`, elementwise ten times that: rounding is spread over all elements and
    /// their worst sits a few times above the norm-wise level; a bug is usually far above both.
    pub const fn norm(norm: f64) -> Tol {
        Tol {
            norm,
            elem: 10.0 * norm,
        }
    }
}

/// A parity case: its trial's name, what it compares, its tolerance, and its body (run once on
/// the CPU and once on the GPU, from the same seeds).
#[derive(Clone, Copy)]
pub struct Case {
    pub trial: &'static str,
    pub what: &'static str,
    pub tol: Tol,
    pub run: fn(&Device) -> Vec<Output>,
}

/// A [`Case`], for tables of them.
pub const fn case(
    trial: &'static str,
    what: &'static str,
    tol: Tol,
    run: fn(&Device) -> Vec<Output>,
) -> Case {
    Case {
        trial,
        what,
        tol,
        run,
    }
}

/// A named piece of an output: elements `offset .. offset + numel(shape)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    pub name: String,
    pub offset: usize,
    pub shape: Vec<usize>,
}

/// One output of a parity case, and the pieces it is compared in.
pub struct Output {
    pub name: String,
    pub tensor: Tensor,
    pub pieces: Vec<Piece>,
}

/// An output compared as one piece.
pub fn whole(name: &str, tensor: Tensor) -> Output {
    let shape = tensor.shape().to_vec();
    pieces(
        name,
        tensor,
        vec![Piece {
            name: String::new(),
            offset: 0,
            shape,
        }],
    )
}

/// A flat buffer in a network's parameter layout (gradients, updated parameters), compared
/// parameter tensor by parameter tensor under their names and shapes.
pub fn per_param(name: &str, tensor: Tensor, layout: &emprior::nn::ParamLayout) -> Output {
    let parts = layout
        .specs()
        .iter()
        .map(|s| Piece {
            name: s.name.clone(),
            offset: s.offset,
            shape: s.shape.clone(),
        })
        .collect();
    pieces(name, tensor, parts)
}

/// An output split into named pieces, which must tile it exactly (no element escapes comparison).
pub fn pieces(name: &str, tensor: Tensor, pieces: Vec<Piece>) -> Output {
    let mut next = 0;
    for p in &pieces {
        assert_eq!(
            p.offset, next,
            "{name}: piece {} leaves a gap or overlaps",
            p.name
        );
        next += p.shape.iter().product::<usize>();
    }
    assert_eq!(next, tensor.numel(), "{name}: the pieces do not cover the output");
    Output {
        name: name.to_string(),
        tensor,
        pieces,
    }
}

/// Compares one piece; Ok(relative error), or a message naming the piece, its shape, the worst
/// element (index and both values) and how many are out of bounds.
pub fn compare_piece(
    label: &str,
    shape: &[usize],
    gpu: &[f32],
    cpu: &[f32],
    tol: Tol,
) -> Result<f64, String> {
    assert_eq!(gpu.len(), cpu.len(), "{label}: lengths");
    let cpu64 = to_f64(cpu);
    // The piece's scale comes from its finite values: a NaN in the oracle must not disable the
    // bound of every other element.
    let (mut num, mut den, mut finite_sq, mut finite) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    for (&g, &c) in gpu.iter().zip(&cpu64) {
        num += (g as f64 - c).powi(2);
        den += c * c;
        if c.is_finite() {
            finite_sq += c * c;
            finite += 1;
        }
    }
    let rms = (finite_sq / finite.max(1) as f64).sqrt();
    let rel = if den > 0.0 || num.is_nan() {
        (num / den).sqrt()
    } else if num == 0.0 {
        0.0
    } else {
        f64::INFINITY
    };
    let o = outliers(gpu, &cpu64, |i| tol.elem * (cpu64[i].abs() + rms));
    // NaN compares false: a NaN anywhere fails.
    if o.count == 0 && rel <= tol.norm {
        return Ok(rel);
    }
    let mut msg = format!(
        "{label} {shape:?}: relative error {rel:.3e} (bound {:e}), {} of {} elements outside \
         {:e} * (|cpu| + rms {rms:.3e})",
        tol.norm,
        o.count,
        gpu.len(),
        tol.elem
    );
    // The worst element: the largest excess over its bound, else (a diffuse error) the largest
    // difference.
    let worst = o.worst.map(|(i, _)| i).or_else(|| {
        (0..gpu.len()).max_by(|&a, &b| {
            let d = |i: usize| (gpu[i] as f64 - cpu64[i]).abs();
            d(a).total_cmp(&d(b))
        })
    });
    if let Some(i) = worst {
        msg += &format!(
            "; worst element {:?} (flat {i}): gpu {:e} vs cpu {:e}",
            unravel(i, shape),
            gpu[i],
            cpu[i]
        );
    }
    Err(msg)
}

/// Compares the outputs of a case run on the CPU and on the GPU, piece by piece. Ok: one summary
/// line per output; Err: one line per failing piece (the first 20, then a count).
pub fn compare_outputs(what: &str, cpu: &[Output], gpu: &[Output], tol: Tol) -> Result<Vec<String>, String> {
    if cpu.len() != gpu.len() {
        return Err(format!(
            "{what}: {} outputs on the GPU, {} on the CPU",
            gpu.len(),
            cpu.len()
        ));
    }
    let (mut summary, mut failures) = (Vec::new(), Vec::new());
    for (c, g) in cpu.iter().zip(gpu) {
        let name = format!("{what}: {}", c.name);
        if c.name != g.name || c.tensor.shape() != g.tensor.shape() || c.pieces != g.pieces {
            failures.push(format!(
                "{name}: the GPU returned {} {:?} for {} {:?}",
                g.name,
                g.tensor.shape(),
                c.name,
                c.tensor.shape()
            ));
            continue;
        }
        let (cv, gv) = (c.tensor.to_vec_f32().unwrap(), g.tensor.to_vec_f32().unwrap());
        let mut worst = (0.0f64, "");
        for p in &c.pieces {
            let range = p.offset..p.offset + p.shape.iter().product::<usize>();
            let label = if p.name.is_empty() {
                name.clone()
            } else {
                format!("{name}: {}", p.name)
            };
            match compare_piece(&label, &p.shape, &gv[range.clone()], &cv[range], tol) {
                Ok(rel) if rel > worst.0 => worst = (rel, &p.name),
                Ok(_) => {}
                Err(msg) => failures.push(msg),
            }
        }
        let at = if worst.1.is_empty() {
            String::new()
        } else {
            format!(" ({})", worst.1)
        };
        let within = if tol == Tol::EXACT {
            "bit-exact".to_string()
        } else {
            format!("within {:e}", tol.norm)
        };
        summary.push(format!(
            "{name}: {} piece(s) {within}, worst relative error {:.2e}{at}",
            c.pieces.len(),
            worst.0
        ));
    }
    if failures.is_empty() {
        return Ok(summary);
    }
    let n = failures.len();
    let mut msg = failures.into_iter().take(20).collect::<Vec<_>>().join("\n");
    if n > 20 {
        msg += &format!("\n... and {} more failing pieces", n - 20);
    }
    Err(msg)
}

/// Runs the case `f` on the CPU and on `gpu` from the same host inputs and compares its outputs
/// piece by piece; panics naming every failing piece, else returns one summary line per output.
pub fn check_parity(what: &str, gpu: &Device, tol: Tol, f: impl Fn(&Device) -> Vec<Output>) -> Vec<String> {
    let (cpu_out, gpu_out) = (f(&Device::Cpu), f(gpu));
    compare_outputs(what, &cpu_out, &gpu_out, tol).unwrap_or_else(|msg| panic!("{msg}"))
}

/// [`check_parity`], printing the summary (the record of what was compared, and how close).
pub fn parity(what: &str, gpu: &Device, tol: Tol, f: impl Fn(&Device) -> Vec<Output>) {
    check_parity(what, gpu, tol, f)
        .iter()
        .for_each(|l| println!("{l}"));
}

/// A host copy of `t` with `f` applied to its values (to plant errors in the harness checks).
pub fn edited(t: &Tensor, f: impl FnOnce(&mut [f32])) -> Tensor {
    let mut v = t.to_vec_f32().unwrap();
    f(&mut v);
    Tensor::from_f32(&v, t.shape(), &Device::Cpu).unwrap()
}

// ---- GEMM: the f64 reference and a bound derived from K ---------------------------------------

/// The f64 reference of C = alpha op(A) op(B) + beta C (+ bias) over a batch (rank-2 operands
/// broadcast), and for each output the bound its f32 result must meet.
///
/// The bound. An f32 dot product of K terms accumulated in sequence (one rounding per term, as
/// kernels/gemm.cu and blocked CPU GEMMs do) is off by E = sum_k d_k s_k, with s_k the partial
/// sums and |d_k| <= u = 2^-24. The worst case, gamma_K sum_k |a_k b_k| ~ K u sum|ab|, is 1.6%
/// of sum|ab| at K = 262,144: far too loose to see a lost tile. With independent roundings E has
/// a standard deviation of about u sqrt(sum_k s_k^2 / 3), and for zero-mean operands (the tests
/// draw uniforms in [-1, 1]) the partial sums are a random walk, E[s_k^2] = k r^2 with
/// r^2 = mean_k (a_k b_k)^2, so sd(E) ~ u K r / sqrt(6) = u sqrt(K) ||a o b||_2 / sqrt(6).
/// The bound is
///     |alpha| 8 u sqrt(K) ||a o b||_2  +  4 u (|alpha a.b| + |beta c| + |bias|),
/// about 20 standard deviations of the accumulation, plus the epilogue's few roundings. It still
/// sees one lost term: a typical term is r = ||a o b||_2 / sqrt(K), and the first part of the
/// bound is 8 u K r = 0.125 r at K = 262,144.
pub fn gemm_reference(
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    c0: &[f32],
    bias: Option<&[f32]>,
    spec: GemmSpec,
) -> (Vec<f64>, Vec<f64>) {
    const U: f64 = f32::EPSILON as f64 / 2.0;
    let split = |s: &[usize]| {
        if s.len() == 3 {
            (s[0], s[1], s[2])
        } else {
            (1, s[0], s[1])
        }
    };
    let ((ba, ra, ca), (bb, rb, cb)) = (split(a_shape), split(b_shape));
    let (m, k) = if spec.trans_a { (ca, ra) } else { (ra, ca) };
    let n = if spec.trans_b { rb } else { cb };
    let rows = ba.max(bb) * m;
    let (mut c, mut bound) = (vec![0.0f64; rows * n], vec![0.0f64; rows * n]);
    if rows * n == 0 {
        return (c, bound);
    }
    let (alpha, beta) = (spec.alpha as f64, spec.beta as f64);
    // One output row after another; rows split over threads (the K = 262,144 cases are 10^9 MACs).
    let one_row = |row: usize, c_row: &mut [f64], bound_row: &mut [f64]| {
        let (z, i) = (row / m, row % m);
        let ao = if ba == 1 { 0 } else { z * ra * ca };
        let bo = if bb == 1 { 0 } else { z * rb * cb };
        for j in 0..n {
            let (mut dot, mut sq) = (0.0f64, 0.0f64);
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
                let t = av as f64 * bv as f64;
                dot += t;
                sq += t * t;
            }
            let prev = if spec.beta == 0.0 {
                0.0
            } else {
                beta * c0[row * n + j] as f64
            };
            let bias_j = bias.map_or(0.0, |v| v[j] as f64);
            c_row[j] = alpha * dot + prev + bias_j;
            bound_row[j] = alpha.abs() * 8.0 * U * (k as f64).sqrt() * sq.sqrt()
                + 4.0 * U * ((alpha * dot).abs() + prev.abs() + bias_j.abs());
        }
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(rows);
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        let chunks = c.chunks_mut(per * n).zip(bound.chunks_mut(per * n));
        for (t, (cc, bc)) in chunks.enumerate() {
            let one_row = &one_row;
            s.spawn(move || {
                for (r, (c_row, bound_row)) in cc.chunks_mut(n).zip(bc.chunks_mut(n)).enumerate() {
                    one_row(t * per + r, c_row, bound_row);
                }
            });
        }
    });
    (c, bound)
}

/// The f64 reference alone: C = alpha op(A) op(B) + beta C over a batch.
pub fn naive_gemm(
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    c0: &[f32],
    spec: GemmSpec,
) -> Vec<f64> {
    gemm_reference(a, a_shape, b, b_shape, c0, None, spec).0
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
    // Many tiny products (the CPU's small-batched path, split over threads past 8,192 entries):
    // per-observation operators [B, 2, 5] against [B, 5, 1], and a shared A.
    (9000, 9000, 2, 1, 5),
    (0, 300, 5, 1, 2),
    (7, 0, 3, 4, 6),
    // One product large enough to be cut into row blocks on the CPU (ragged: 80, 80, 80, 60).
    (0, 0, 300, 70, 64),
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

/// A positive definite `[d, d]` covariance from a random square `l`: `l lᵀ / d + jitter I`.
pub fn spd_from(l: &[f64], d: usize, jitter: f64) -> Vec<f64> {
    let mut c = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            c[i * d + j] = (0..d).map(|q| l[i * d + q] * l[j * d + q]).sum::<f64>() / d as f64
                + if i == j { jitter } else { 0.0 };
        }
    }
    c
}

/// Asserts that `k` samples of dimension `d` (rows of `samples`) have the Gaussian's `mean` and
/// `cov` within 5 standard errors (plus a small allowance), naming the first entry that is not,
/// and prints the worst deviations as fractions of their bounds.
pub fn check_gaussian_samples(what: &str, samples: &[f64], k: usize, d: usize, mean: &[f64], cov: &[f64]) {
    let emp_mean: Vec<f64> = (0..d)
        .map(|j| (0..k).map(|i| samples[i * d + j]).sum::<f64>() / k as f64)
        .collect();
    let mut worst_mean = 0.0f64;
    for j in 0..d {
        let se = (cov[j * d + j] / k as f64).sqrt();
        let bound = 5.0 * se + 1e-3 * cov[j * d + j].sqrt();
        worst_mean = worst_mean.max((emp_mean[j] - mean[j]).abs() / bound);
        assert!(
            (emp_mean[j] - mean[j]).abs() <= bound,
            "{what}: mean[{j}] = {} vs analytic {} (standard error {se:.2e})",
            emp_mean[j],
            mean[j]
        );
    }
    let mut worst = 0.0f64;
    for a in 0..d {
        for b in 0..d {
            let c: f64 = (0..k)
                .map(|i| (samples[i * d + a] - emp_mean[a]) * (samples[i * d + b] - emp_mean[b]))
                .sum::<f64>()
                / (k - 1) as f64;
            let se = ((cov[a * d + a] * cov[b * d + b] + cov[a * d + b].powi(2)) / k as f64).sqrt();
            let allowance = 0.02 * (cov[a * d + a] * cov[b * d + b]).sqrt();
            worst = worst.max((c - cov[a * d + b]).abs() / (5.0 * se + allowance));
            assert!(
                (c - cov[a * d + b]).abs() <= 5.0 * se + allowance,
                "{what}: cov[{a},{b}] = {c} vs analytic {} (standard error {se:.2e})",
                cov[a * d + b]
            );
        }
    }
    println!(
        "{what}: worst mean deviation {worst_mean:.2}, worst covariance deviation {worst:.2} of its bound"
    );
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
/// Whether a test on fetched data can run: true when `found`; otherwise a skip message that
/// names `what` and the fetch script, or, under EMPRIOR_REQUIRE_DATA=1 (CI sets it after
/// fetching), a failure.
pub fn data_or_skip(test: &str, found: bool, what: &str, script: &str) -> bool {
    if found {
        return true;
    }
    if std::env::var("EMPRIOR_REQUIRE_DATA").is_ok_and(|v| v == "1") {
        panic!("{test}: {what} is missing and EMPRIOR_REQUIRE_DATA=1");
    }
    println!("{test}: skipped: {what} is missing (run {script})");
    false
}

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

/// Two levels, attention at the second, 8x8, RGB, dropout on: every U-Net code path at a small
/// cost (the GPU parity tests' small network).
pub fn small_unet_config() -> emprior::nn::UNetConfig {
    emprior::nn::UNetConfig {
        in_channels: 3,
        out_channels: 3,
        channels: vec![16, 32],
        blocks: vec![1, 1],
        attention: vec![(1, 2)],
        emb: 32,
        dropout: 0.1,
        patch: 1,
        resolution: (8, 8),
    }
}
