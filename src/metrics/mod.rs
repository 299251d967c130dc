//! Distances between sample sets (row-major [n, d] on the host, f64).

mod sinkhorn;

pub use sinkhorn::{
    debiased_sinkhorn_divergence, fast_exp, sinkhorn, sinkhorn_cost, sinkhorn_divergence, Sinkhorn,
    SinkhornResult,
};

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
            v.sort_by(|p, q| p.total_cmp(q));
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

/// Mean PSNR in dB over a batch of images (rows of `a` and `b`, `per` values each) whose values
/// span `range` (4 for the model's [-2, 2) scale). An exact match counts as infinite.
pub fn psnr(a: &[f64], b: &[f64], per: usize, range: f64) -> f64 {
    let n = a.len() / per;
    (0..n)
        .map(|i| {
            let mse = (0..per)
                .map(|k| (a[i * per + k] - b[i * per + k]).powi(2))
                .sum::<f64>()
                / per as f64;
            10.0 * (range * range / mse).log10()
        })
        .sum::<f64>()
        / n as f64
}

/// Mean SSIM over a batch of [n, h, w, c] images (Wang et al. 2004: an 11 x 11 Gaussian window
/// with sigma 1.5, K1 = 0.01, K2 = 0.03, the dynamic range `range`), averaged over the window
/// positions that fit inside the image and over channels and images.
pub fn ssim(a: &[f64], b: &[f64], h: usize, w: usize, c: usize, range: f64) -> f64 {
    const WIN: usize = 11;
    let g: Vec<f64> = (0..WIN)
        .map(|i| (-((i as f64 - 5.0).powi(2)) / (2.0 * 1.5 * 1.5)).exp())
        .collect();
    let norm: f64 = g.iter().sum::<f64>().powi(2);
    let (c1, c2) = ((0.01 * range).powi(2), (0.03 * range).powi(2));
    let per = h * w * c;
    let n = a.len() / per;
    let (mut total, mut count) = (0.0, 0usize);
    for img in 0..n {
        let at = |x: &[f64], y: usize, xx: usize, ch: usize| x[img * per + (y * w + xx) * c + ch];
        for ch in 0..c {
            for y0 in 0..=h.saturating_sub(WIN) {
                for x0 in 0..=w.saturating_sub(WIN) {
                    let (mut ma, mut mb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
                    for dy in 0..WIN {
                        for dx in 0..WIN {
                            let wgt = g[dy] * g[dx] / norm;
                            let (p, q) = (at(a, y0 + dy, x0 + dx, ch), at(b, y0 + dy, x0 + dx, ch));
                            ma += wgt * p;
                            mb += wgt * q;
                            saa += wgt * p * p;
                            sbb += wgt * q * q;
                            sab += wgt * p * q;
                        }
                    }
                    let (va, vb, cov) = (saa - ma * ma, sbb - mb * mb, sab - ma * mb);
                    total += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                        / ((ma * ma + mb * mb + c1) * (va + vb + c2));
                    count += 1;
                }
            }
        }
    }
    total / count.max(1) as f64
}
