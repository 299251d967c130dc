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
    if let Some(i) = samples.iter().position(|v| !v.is_finite()) {
        return Err(Error::Other(format!(
            "ppca: sample {} (value {}) is {}: the samples to fit diverged",
            i / d,
            i % d,
            samples[i]
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

/// PPCA for large dimensions (images: d = 3,072 with rank 64): the same fit as [`ppca`], with
/// the top-r eigenpairs of the covariance found by randomized subspace iteration, every product
/// with the data a GEMM on the samples' device (X^T (X Q) / n, never the d x d covariance).
/// `oversample` extra directions and `iterations` power steps trade time for accuracy.
pub fn ppca_randomized(
    samples: &crate::tensor::View,
    rank: usize,
    oversample: usize,
    iterations: usize,
    seed: u64,
) -> Result<Gaussian> {
    use crate::ops::broadcast::{add_bias, sum_rows_into};
    use crate::ops::{gemm_into, row_dot, GemmSpec, Philox};
    use crate::tensor::{AsView, Tensor};

    let (n, d) = match *samples.shape() {
        [n, d] if n >= 2 && rank <= d => (n, d),
        _ => {
            return Err(Error::Other(format!(
                "ppca: samples of shape {:?} cannot give rank {rank}",
                samples.shape()
            )))
        }
    };
    let (dtype, device) = (samples.dtype(), samples.device());
    let k = (rank + oversample).min(d);
    // Centre the samples.
    let mut sums = Tensor::uninit(&[1, d], dtype, &device)?;
    sum_rows_into(samples, 1, &mut sums, false)?;
    let mean: Vec<f64> = sums
        .as_view()?
        .to_vec_f64()?
        .iter()
        .map(|s| s / n as f64)
        .collect();
    let mut x = samples.to_tensor()?;
    add_bias(
        &mut x,
        &Tensor::from_f64_as(&mean.iter().map(|m| -m).collect::<Vec<_>>(), &[d], dtype, &device)?,
    )?;
    let trace = row_dot(&x, &x)?.as_view()?.to_vec_f64()?.iter().sum::<f64>() / n as f64;
    // C Q = X^T (X Q) / n, on the device.
    let apply = |q: &[f64]| -> Result<Vec<f64>> {
        let qt = Tensor::from_f64_as(q, &[d, k], dtype, &device)?;
        let mut xq = Tensor::uninit(&[n, k], dtype, &device)?;
        gemm_into(&x, &qt, &mut xq, GemmSpec::default())?;
        let mut cq = Tensor::uninit(&[d, k], dtype, &device)?;
        gemm_into(
            &x,
            &xq,
            &mut cq,
            GemmSpec {
                alpha: 1.0 / n as f32,
                ..GemmSpec::new(true, false)
            },
        )?;
        cq.as_view()?.to_vec_f64()
    };
    let mut z = vec![0.0f32; d * k];
    Philox::new(seed, 0x9ca).fill_normal(0, &mut z);
    let mut q = orthonormal_columns(&z.iter().map(|&v| v as f64).collect::<Vec<_>>(), d, k);
    for _ in 0..iterations {
        q = orthonormal_columns(&apply(&q)?, d, k);
    }
    // The Rayleigh-Ritz step: B = Q^T C Q (k x k), its eigenpairs, and U = Q V.
    let cq = apply(&q)?;
    let mut b = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..k {
            b[i * k + j] = (0..d).map(|t| q[t * k + i] * cq[t * k + j]).sum();
        }
    }
    let (values, vectors) = symmetric_eigen(&b, k);
    let floor = if rank == d {
        1e-6
    } else {
        ((trace - values[..rank].iter().sum::<f64>()) / (d - rank) as f64).max(1e-6)
    };
    let mut u = vec![0.0; d * rank];
    for t in 0..d {
        for c in 0..rank {
            let s = (values[c] - floor).max(0.0).sqrt();
            u[t * rank + c] = s * (0..k).map(|j| q[t * k + j] * vectors[j * k + c]).sum::<f64>();
        }
    }
    Gaussian::new(mean, Dplr::new(vec![floor; d], u, rank)?)
}

/// Modified Gram-Schmidt on the columns of a d x k row-major matrix (twice, for stability).
fn orthonormal_columns(a: &[f64], d: usize, k: usize) -> Vec<f64> {
    let mut q = a.to_vec();
    for _pass in 0..2 {
        for c in 0..k {
            for p in 0..c {
                let dot: f64 = (0..d).map(|t| q[t * k + c] * q[t * k + p]).sum();
                for t in 0..d {
                    q[t * k + c] -= dot * q[t * k + p];
                }
            }
            let norm = (0..d)
                .map(|t| q[t * k + c].powi(2))
                .sum::<f64>()
                .sqrt()
                .max(1e-300);
            for t in 0..d {
                q[t * k + c] /= norm;
            }
        }
    }
    q
}
