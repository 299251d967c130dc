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
