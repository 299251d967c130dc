//! Image augmentation for the M-step (method.md §8.3): per image a horizontal flip with
//! probability 1/2 and a translation by up to `shift` pixels each way with reflect padding
//! (the paper's CIFAR-10 FID runs: shift 1; MRI: shift 4). The choices for image i come from
//! Philox block i of (seed, stream), so both devices augment identically. CUDA:
//! kernels/augment.cu.

use crate::device::launch::grid_stride;

use crate::error::{Error, Result};
use crate::ops::{mismatch, Philox};
use crate::tensor::{AsViewMut, Data, DataMut, Tensor, View};

/// numpy's 'reflect' index (the edge is not repeated).
fn reflect(i: i64, size: i64) -> i64 {
    if size == 1 {
        return 0;
    }
    let period = 2 * (size - 1);
    let i = i.rem_euclid(period);
    if i < size {
        i
    } else {
        period - i
    }
}

/// (flip, dy, dx) for image `img`.
pub fn choices(rng: Philox, img: u64, shift: usize) -> (bool, i64, i64) {
    let r = rng.block(img);
    let span = 2 * shift as u32 + 1;
    (
        r[0] & 1 == 1,
        (r[1] % span) as i64 - shift as i64,
        (r[2] % span) as i64 - shift as i64,
    )
}

/// Flipped and shifted copies of a batch of images [N, H, W, C].
pub fn flip_shift(x: &View, shift: usize, rng: Philox) -> Result<Tensor> {
    let (n, h, w, c) = match *x.shape() {
        [n, h, w, c] => (n, h, w, c),
        _ => return Err(Error::shape("augment", "images", "[N, H, W, C]", x.shape())),
    };
    if shift >= h.min(w) {
        return Err(Error::Other(format!(
            "augment: a shift of {shift} does not fit {h}x{w} images"
        )));
    }
    rng.fixed("augment")?;
    let mut y = Tensor::uninit(x.shape(), x.dtype(), &x.device())?;
    {
        let mut yv = y.as_view_mut()?;
        match (&x.data, &mut yv.data) {
            (Data::Cuda(xv, dev), DataMut::Cuda(o, _)) => {
                let (n64, h32, w32, c32, s32) = (n as i64, h as i32, w as i32, c as i32, shift as i32);
                let cfg = grid_stride(dev, x.numel());
                // SAFETY: x and y hold n * h * w * c values (same shape, checked above).
                unsafe {
                    dev.kernels()
                        .aug_flip_shift_f32(cfg, xv, o, n64, h32, w32, c32, s32, rng.seed, rng.stream)
                }?;
            }
            (Data::Cuda(..), _) => return Err(mismatch("augment", &[x], &[])),
            _ => host_real!(x, T => {
                let (src, dst) = (x.cpu::<T>()?, yv.cpu_mut::<T>()?);
                for img in 0..n {
                    let (flip, dy, dx) = choices(rng, img as u64, shift);
                    for yy in 0..h {
                        for xx in 0..w {
                            let sy = reflect(yy as i64 + dy, h as i64) as usize;
                            let mut sx = reflect(xx as i64 + dx, w as i64) as usize;
                            if flip {
                                sx = w - 1 - sx;
                            }
                            let (o, s) = (((img * h + yy) * w + xx) * c, ((img * h + sy) * w + sx) * c);
                            dst[o..o + c].copy_from_slice(&src[s..s + c]);
                        }
                    }
                }
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(y)
}
