//! Inverted dropout: y = x * keep / (1 - p), keep = [uniform(seed, stream, offset + i) >= p].
//! The mask is a function of the Philox counters, so the backward (the same map applied to dy)
//! regenerates it instead of storing it, and CPU and GPU drop the same elements.
//! CUDA: kernels/dropout.cu.

use crate::device::launch::grid_stride;

use crate::error::{Error, Result};
use crate::ops::{mismatch, Philox};
use crate::real::Real;
use crate::tensor::{AsViewMut, Data, DataMut, Tensor, View};

/// Where a dropout layer's mask comes from: a stream and the first element offset.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutMask {
    /// The Philox key (seed and stream) the mask is drawn from.
    pub rng: Philox,
    /// Counter of the layer's first element: element i is kept when uniform(offset + i) >= p.
    pub offset: u64,
    /// Drop probability, in `[0, 1)`.
    pub p: f32,
}

/// y = dropout(x). Also the backward: dx = dropout(dy) with the same mask.
pub fn dropout(x: &View, mask: &DropoutMask) -> Result<Tensor> {
    if !(0.0..1.0).contains(&mask.p) {
        return Err(Error::Other(format!(
            "dropout probability {} is not in [0, 1)",
            mask.p
        )));
    }
    let n = x.numel();
    let mut y = Tensor::uninit(x.shape(), x.dtype(), &x.device())?;
    {
        let mut yv = y.as_view_mut()?;
        match (&x.data, &mut yv.data) {
            (Data::Cuda(xv, dev), DataMut::Cuda(o, _)) => {
                let (n64, p, seed, stream, off) =
                    (n as i64, mask.p, mask.rng.seed, mask.rng.stream, mask.offset);
                // 1 / (1 - p) rounded once from f64, as the CPU body below.
                let scale = (1.0 / (1.0 - mask.p as f64)) as f32;
                // SAFETY: x and y hold n values (same shape).
                unsafe {
                    dev.kernels()
                        .dropout_f32(grid_stride(dev, n), xv, o, n64, p, scale, seed, stream, off)
                }?;
            }
            (Data::Cuda(..), _) => return Err(mismatch("dropout", &[x], &[])),
            _ => host_real!(x, T => {
                let mut u = vec![0.0f32; n];
                mask.rng.fill_uniform(mask.offset, &mut u);
                let scale = T::from_f64(1.0 / (1.0 - mask.p as f64));
                for ((o, &v), &ui) in yv.cpu_mut::<T>()?.iter_mut().zip(x.cpu::<T>()?).zip(&u) {
                    *o = if ui >= mask.p { v * scale } else { T::ZERO };
                }
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(y)
}
