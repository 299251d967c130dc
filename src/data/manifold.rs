//! The low-dimensional manifold experiment's data (method.md §7.1): a smooth random 1-D manifold
//! in R^5 in the style of randman (K = 10 Fourier terms with a 1/k^3 decay), each feature
//! min-max normalised to [-2, 2]; and its observations y_i = A_i x_i + 0.01 eps with a fresh
//! 2 x 5 Gaussian A_i per sample, rows scaled to unit norm.

use crate::ops::Philox;

/// Ambient dimension, observation dimension, Fourier terms and their decay exponent.
pub const DIM: usize = 5;
/// Observation dimension: each y_i has 2 values, each A_i is `[2, 5]`.
pub const OBS_DIM: usize = 2;
const TERMS: usize = 10;
const ALPHA: f64 = 3.0;
/// Samples used to fix the min-max normalisation (the paper's training-set size).
const NORMALISATION_SAMPLES: usize = 65_536;

/// A manifold: the Fourier coefficients and the normalisation, fixed by a seed.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifold {
    a: Vec<f64>,
    b: Vec<f64>,
    c: Vec<f64>,
    lo: [f64; DIM],
    hi: [f64; DIM],
}

impl Manifold {
    /// The manifold of `seed`: its Fourier coefficients drawn from Philox, its per-feature
    /// min-max range fixed on 65,536 reference points (the same manifold in every preset).
    pub fn new(seed: u64) -> Self {
        let draw = |stream: u64| -> Vec<f64> {
            let mut u = vec![0.0f32; DIM * TERMS];
            Philox::new(seed, stream).fill_uniform(0, &mut u);
            u.iter().map(|&v| v as f64).collect()
        };
        let mut m = Manifold {
            a: draw(1),
            b: draw(2),
            c: draw(3),
            lo: [0.0; DIM],
            hi: [0.0; DIM],
        };
        // Normalise with a fixed large sample, so every preset sees the same manifold.
        let raw = m.raw(&latents(seed, 0, NORMALISATION_SAMPLES));
        for j in 0..DIM {
            m.lo[j] = raw
                .iter()
                .skip(j)
                .step_by(DIM)
                .copied()
                .fold(f64::INFINITY, f64::min);
            m.hi[j] = raw
                .iter()
                .skip(j)
                .step_by(DIM)
                .copied()
                .fold(f64::NEG_INFINITY, f64::max);
        }
        m
    }

    /// x_j = sum_k a_jk / k^alpha sin(2 pi (k b_jk z + c_jk)), before normalisation.
    fn raw(&self, z: &[f64]) -> Vec<f64> {
        let mut out = Vec::with_capacity(z.len() * DIM);
        for &zi in z {
            for j in 0..DIM {
                let mut v = 0.0;
                for k in 0..TERMS {
                    let i = j * TERMS + k;
                    let kk = (k + 1) as f64;
                    v += self.a[i] / kk.powf(ALPHA)
                        * (std::f64::consts::TAU * (kk * self.b[i] * zi + self.c[i])).sin();
                }
                out.push(v);
            }
        }
        out
    }

    /// `n` points [n, 5] in [-2, 2] (roughly: normalised by the reference sample's range), from
    /// latent stream `stream` (different streams give disjoint sample sets).
    pub fn sample(&self, seed: u64, stream: u64, n: usize) -> Vec<f64> {
        let mut x = self.raw(&latents(seed, stream, n));
        for (i, v) in x.iter_mut().enumerate() {
            let j = i % DIM;
            *v = 4.0 * (*v - self.lo[j]) / (self.hi[j] - self.lo[j]) - 2.0;
        }
        x
    }
}

fn latents(seed: u64, stream: u64, n: usize) -> Vec<f64> {
    let mut u = vec![0.0f32; n];
    Philox::new(seed, 0x100 + stream).fill_uniform(0, &mut u);
    u.iter().map(|&v| v as f64).collect()
}

/// Observations of `x` [n, 5]: operators A [n, 2, 5] with unit-norm rows and y [n, 2].
pub fn observe(x: &[f64], sigma_y: f64, seed: u64) -> (Vec<f64>, Vec<f64>) {
    let n = x.len() / DIM;
    let mut a32 = vec![0.0f32; n * OBS_DIM * DIM];
    Philox::new(seed, 0x200).fill_normal(0, &mut a32);
    let mut a: Vec<f64> = a32.iter().map(|&v| v as f64).collect();
    for row in a.chunks_exact_mut(DIM) {
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
    }
    let mut eps = vec![0.0f32; n * OBS_DIM];
    Philox::new(seed, 0x201).fill_normal(0, &mut eps);
    let y = (0..n * OBS_DIM)
        .map(|r| {
            let (i, row) = (r / OBS_DIM, &a[r * DIM..(r + 1) * DIM]);
            row.iter()
                .zip(&x[i * DIM..(i + 1) * DIM])
                .map(|(p, q)| p * q)
                .sum::<f64>()
                + sigma_y * eps[r] as f64
        })
        .collect();
    (a, y)
}

/// Keeps the samples inside the open box (-bound, bound)^d (the manifold M-step's filter).
pub fn inside_box(x: &[f64], d: usize, bound: f64) -> Vec<f64> {
    x.chunks_exact(d)
        .filter(|p| p.iter().all(|v| v.abs() < bound))
        .flatten()
        .copied()
        .collect()
}
