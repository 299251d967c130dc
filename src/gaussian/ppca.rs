//! Probabilistic PCA (method.md §8.1): the mean, the top-r eigenpairs of the sample covariance
//! (or of the Gram matrix when there are fewer samples than dimensions), and the noise floor
//! D = (tr C - sum L) / (N - r); Sigma = D I + U U^T with U = Q diag(sqrt(max(L - D, 0))).

use super::linalg::symmetric_eigen;
use super::{Dplr, Gaussian};
use crate::error::{Error, Result};

/// Fits N(mu, D I + U U^T) of rank r to n samples of dimension d (row-major [n, d]).
pub fn ppca(samples: &[f64], n: usize, d: usize, rank: usize) -> Result<Gaussian> {
    if n < 2 || samples.len() != n * d || rank > d {
        return Err(Error::Other(format!(
            "ppca: {n} samples of dimension {d} cannot give rank {rank}"
        )));
    }
    let mean: Vec<f64> = (0..d)
        .map(|j| (0..n).map(|i| samples[i * d + j]).sum::<f64>() / n as f64)
        .collect();
    let x: Vec<f64> = (0..n * d).map(|k| samples[k] - mean[k % d]).collect();
    let (values, vectors, trace) = if n < d {
        // Gram matrix X X^T / n, then map the eigenvectors back: Q = X^T Q_gram, normalised.
        let mut g = vec![0.0; n * n];
        for a in 0..n {
            for b in 0..n {
                g[a * n + b] = (0..d).map(|j| x[a * d + j] * x[b * d + j]).sum::<f64>() / n as f64;
            }
        }
        let trace = (0..n).map(|a| g[a * n + a]).sum::<f64>();
        let (vals, qg) = symmetric_eigen(&g, n);
        let k = rank.min(n);
        let mut q = vec![0.0; d * rank];
        for c in 0..k {
            let col: Vec<f64> = (0..d)
                .map(|j| (0..n).map(|a| x[a * d + j] * qg[a * n + c]).sum())
                .collect();
            let norm = col.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-300);
            for j in 0..d {
                q[j * rank + c] = col[j] / norm;
            }
        }
        let mut v = vals[..k].to_vec();
        v.resize(rank, 0.0);
        (v, q, trace)
    } else {
        let mut c = vec![0.0; d * d];
        for a in 0..d {
            for b in 0..d {
                c[a * d + b] = (0..n).map(|i| x[i * d + a] * x[i * d + b]).sum::<f64>() / n as f64;
            }
        }
        let trace = (0..d).map(|a| c[a * d + a]).sum::<f64>();
        let (vals, q) = symmetric_eigen(&c, d);
        let mut top = vec![0.0; d * rank];
        for j in 0..d {
            for k in 0..rank {
                top[j * rank + k] = q[j * d + k];
            }
        }
        (vals[..rank].to_vec(), top, trace)
    };
    let floor = if rank == d {
        1e-6
    } else {
        ((trace - values.iter().sum::<f64>()) / (d - rank) as f64).max(1e-6)
    };
    let mut u = vectors;
    for k in 0..rank {
        let s = (values[k] - floor).max(0.0).sqrt();
        for j in 0..d {
            u[j * rank + k] *= s;
        }
    }
    Gaussian::new(mean, Dplr::new(vec![floor; d], u, rank)?)
}
