//! The sinusoidal noise embedding (no learned parameters): `emb[n, j] = sin(f_j c_noise[n])` for
//! j < E/2, `cos(f_{j-E/2} c_noise[n])` after, f_j = 1e-4^(j / (E/2 - 1)), with c_noise = ln sigma.
//! Every block of the networks reads this raw embedding. CUDA: kernels/embedding.cu.

use crate::device::launch::grid_stride;

use crate::error::{Error, Result};
use crate::ops::mismatch;
use crate::real::Real;
use crate::tensor::{AsViewMut, Data, DataMut, Tensor, View};

/// The CPU body: the oracle for kernels/embedding.cu.
pub fn embed_cpu<T: Real>(c_noise: &[T], out: &mut [T], e: usize) {
    let half = e / 2;
    for (row, &c) in out.chunks_exact_mut(e).zip(c_noise) {
        for k in 0..half {
            let freq = T::from_f64((1e-4f64.ln() * k as f64 / (half - 1) as f64).exp());
            row[k] = (freq * c).sin();
            row[half + k] = (freq * c).cos();
        }
    }
}

/// `[N]` values of c_noise -> `[N, E]` embedding (E even, at least 4).
pub fn sinusoidal_embedding(c_noise: &View, e: usize) -> Result<Tensor> {
    if e < 4 || e % 2 != 0 {
        return Err(Error::Other(format!(
            "embedding width {e} must be even and at least 4"
        )));
    }
    let n = match *c_noise.shape() {
        [n] => n,
        _ => {
            return Err(Error::shape(
                "sinusoidal_embedding",
                "c_noise",
                "[N]",
                c_noise.shape(),
            ))
        }
    };
    let mut out = Tensor::uninit(&[n, e], c_noise.dtype(), &c_noise.device())?;
    {
        let mut ov = out.as_view_mut()?;
        match (&c_noise.data, &mut ov.data) {
            (Data::Cuda(cv, dev), DataMut::Cuda(o, _)) => {
                let (n64, e32) = (n as i64, e as i32);
                // SAFETY: c_noise holds n values and the output n * e.
                unsafe {
                    dev.kernels()
                        .emb_sinusoidal_f32(grid_stride(dev, n * e), cv, o, n64, e32)
                }?;
            }
            (Data::Cuda(..), _) => return Err(mismatch("sinusoidal_embedding", &[c_noise], &[])),
            _ => host_real!(c_noise, T => {
                embed_cpu::<T>(c_noise.cpu()?, ov.cpu_mut()?, e);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(out)
}
