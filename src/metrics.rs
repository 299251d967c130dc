//! Distances between sample sets (row-major [n, d] on the host, f64).

use crate::ops::Philox;

/// Sliced Wasserstein-1: the mean over random unit directions of the 1-D Wasserstein distance
/// between the projected samples (equal sizes: sorted projections matched in order).
pub fn sliced_wasserstein(a: &[f64], b: &[f64], d: usize, projections: usize, seed: u64) -> f64 {
    let (na, nb) = (a.len() / d, b.len() / d);
    let n = na.min(nb);
    let mut dirs = vec![0.0f32; projections * d];
    Philox::new(seed, 0x5751).fill_normal(0, &mut dirs);
    let mut total = 0.0;
    for p in 0..projections {
        let dir: Vec<f64> = dirs[p * d..(p + 1) * d].iter().map(|&v| v as f64).collect();
        let norm = dir.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
        let project = |x: &[f64], count: usize| -> Vec<f64> {
            let mut v: Vec<f64> = (0..count)
                .map(|i| (0..d).map(|j| x[i * d + j] * dir[j]).sum::<f64>() / norm)
                .collect();
            v.sort_by(|p, q| p.partial_cmp(q).unwrap());
            v
        };
        let (pa, pb) = (project(a, na), project(b, nb));
        // Quantile matching at n evenly spaced levels (handles unequal sizes).
        total += (0..n)
            .map(|i| {
                let qa = pa[i * na / n];
                let qb = pb[i * nb / n];
                (qa - qb).abs()
            })
            .sum::<f64>()
            / n as f64;
    }
    total / projections as f64
}

/// Entropic optimal transport between two uniform point clouds with squared Euclidean cost,
/// solved in the log domain (regularisation `reg`, at most `max_iters` iterations, stopping when
/// the row marginal's L1 error falls below `tol`, checked every 10 iterations, as POT does).
/// Returns the transport cost <P, C> of the plan (POT's `sinkhorn2`).
pub fn sinkhorn_cost(a: &[f64], b: &[f64], d: usize, reg: f64, max_iters: usize, tol: f64) -> f64 {
    let (n, m) = (a.len() / d, b.len() / d);
    let sq = |x: &[f64], i: usize, y: &[f64], j: usize| -> f64 {
        (0..d).map(|t| (x[i * d + t] - y[j * d + t]).powi(2)).sum()
    };
    // The cost over reg, in both orientations so each potential update reads rows contiguously.
    let c_ab: Vec<f64> = (0..n * m).map(|k| sq(a, k / m, b, k % m) / reg).collect();
    let c_ba: Vec<f64> = (0..m * n).map(|k| c_ab[(k % n) * m + k / n]).collect();
    let (log_a, log_b) = (-(n as f64).ln(), -(m as f64).ln());
    // Potentials over reg: f_i = -logsumexp_j (g_j - C_ij + log b_j), and symmetrically.
    let (mut f, mut g) = (vec![0.0; n], vec![0.0; m]);
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(16);
    let update = |out: &mut [f64], other: &[f64], cost: &[f64], cols: usize, log_w: f64| {
        let chunk = out.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for (c, part) in out.chunks_mut(chunk).enumerate() {
                s.spawn(move || {
                    for (r, o) in part.iter_mut().enumerate() {
                        let row = &cost[(c * chunk + r) * cols..(c * chunk + r + 1) * cols];
                        // One-pass (online) log-sum-exp: one exp per entry.
                        let (mut mx, mut sum) = (f64::NEG_INFINITY, 0.0f64);
                        for (&oj, &cj) in other.iter().zip(row) {
                            let v = oj - cj;
                            if v > mx {
                                sum = sum * (mx - v).exp() + 1.0;
                                mx = v;
                            } else {
                                sum += (v - mx).exp();
                            }
                        }
                        *o = -(mx + sum.ln() + log_w);
                    }
                });
            }
        });
    };
    for it in 0..max_iters {
        update(&mut f, &g, &c_ab, m, log_b);
        update(&mut g, &f, &c_ba, n, log_a);
        if (it + 1) % 10 == 0 {
            let err: f64 = (0..n)
                .map(|i| {
                    let row: f64 = (0..m)
                        .map(|j| (f[i] + g[j] - c_ab[i * m + j] + log_a + log_b).exp())
                        .sum();
                    (row - 1.0 / n as f64).abs()
                })
                .sum();
            if err < tol {
                break;
            }
        }
    }
    (0..n * m)
        .map(|k| (f[k / m] + g[k % m] - c_ab[k] + log_a + log_b).exp() * c_ab[k] * reg)
        .sum()
}

/// The paper's debiased Sinkhorn divergence (method.md §9.1): max(OT(u1, v) - OT(u1, u2), 1e-6)
/// with u1, u2 two disjoint ground-truth sets and v the model's samples; OT with reg 1e-3, at
/// most 1024 iterations, tolerance 1e-3. `reference` is OT(u1, u2), computed once per run.
pub fn sinkhorn_divergence(u1: &[f64], v: &[f64], reference: f64, d: usize) -> f64 {
    (sinkhorn_cost(u1, v, d, 1e-3, 1024, 1e-3) - reference).max(1e-6)
}
