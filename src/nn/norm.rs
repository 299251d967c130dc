//! LayerNorm over channels (the last axis) without affine parameters, eps = 1e-5 (inox's
//! LayerNorm as the paper uses it). CUDA: kernels/norm.cu.

use crate::device::launch::warp_per_row;

use crate::error::{Error, Result};
use crate::ops::{mismatch, one_device};
use crate::real::Real;
use crate::tensor::{Data, DataMut, Tensor, View};

pub const LN_EPS: f64 = 1e-5;

/// The CPU bodies: the oracle for kernels/norm.cu.
pub mod cpu {
    use crate::real::Real;

    pub fn forward<T: Real>(x: &[T], y: &mut [T], rstd: &mut [T], c: usize, eps: f64) {
        let inv_c = T::from_f64(1.0 / c as f64);
        for ((xr, yr), r) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)).zip(rstd.iter_mut()) {
            let mean = xr.iter().copied().sum::<T>() * inv_c;
            let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<T>() * inv_c;
            *r = T::ONE / (var + T::from_f64(eps)).sqrt();
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = (v - mean) * *r;
            }
        }
    }

    pub fn backward<T: Real>(y: &[T], rstd: &[T], dy: &[T], dx: &mut [T], c: usize) {
        let inv_c = T::from_f64(1.0 / c as f64);
        for (((yr, gr), dr), &r) in y
            .chunks_exact(c)
            .zip(dy.chunks_exact(c))
            .zip(dx.chunks_exact_mut(c))
            .zip(rstd)
        {
            let ma = gr.iter().copied().sum::<T>() * inv_c;
            let mb = gr.iter().zip(yr).map(|(&g, &v)| g * v).sum::<T>() * inv_c;
            for ((d, &g), &v) in dr.iter_mut().zip(gr).zip(yr) {
                *d = r * (g - ma - v * mb);
            }
        }
    }
}

/// What the backward needs: the output and 1/std per row.
pub struct LnSaved {
    pub y: Tensor,
    pub rstd: Tensor,
}

fn channels(x: &View) -> Result<(usize, usize)> {
    match x.shape().last() {
        Some(&c) if c > 0 => Ok((x.numel() / c, c)),
        _ => Err(Error::shape("layer_norm", "input", "[.., channels]", x.shape())),
    }
}

/// y = LN(x); the returned `LnSaved` holds y (also the layer's output) and 1/std.
pub fn layer_norm(x: &View) -> Result<LnSaved> {
    let (rows, c) = channels(x)?;
    let (device, dtype) = (x.device(), x.dtype());
    let mut y = Tensor::uninit(x.shape(), dtype, &device)?;
    let mut rstd = Tensor::uninit(&[rows], dtype, &device)?;
    {
        let (mut yv, mut rv) = (
            crate::AsViewMut::as_view_mut(&mut y)?,
            crate::AsViewMut::as_view_mut(&mut rstd)?,
        );
        match (&x.data, &mut yv.data, &mut rv.data) {
            (Data::Cuda(xv, dev), DataMut::Cuda(yo, _), DataMut::Cuda(ro, _)) => {
                let (r64, c32, eps) = (rows as i64, c as i32, LN_EPS as f32);
                // SAFETY: x and y hold rows * c values, rstd rows.
                unsafe {
                    dev.kernels()
                        .ln_forward_f32(warp_per_row(dev, rows), xv, yo, ro, r64, c32, eps)
                }?;
            }
            (Data::Cuda(..), ..) => return Err(mismatch("layer_norm", &[x], &[])),
            _ => host_real!(x, T => {
                cpu::forward::<T>(x.cpu()?, yv.cpu_mut()?, rv.cpu_mut()?, c, LN_EPS);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(LnSaved { y, rstd })
}

/// The block entry: LN((1 + a) x + b) with (a, b) from the modulation m [N, 3C], broadcast over
/// the pixels of each sample. One fused kernel on the GPU (the modulated tensor is never stored).
pub fn modulated_layer_norm(x: &View, m: &View) -> Result<LnSaved> {
    one_device("modulated_layer_norm", &[x, m], &[])?;
    let (rows, c) = channels(x)?;
    let n = x.shape()[0];
    if x.shape().len() < 2 || m.shape() != [n, 3 * c] {
        return Err(Error::shape(
            "modulated_layer_norm",
            "modulation",
            [n, 3 * c],
            m.shape(),
        ));
    }
    let p = rows / n;
    let (device, dtype) = (x.device(), x.dtype());
    let mut y = Tensor::uninit(x.shape(), dtype, &device)?;
    let mut rstd = Tensor::uninit(&[rows], dtype, &device)?;
    {
        let (mut yv, mut rv) = (
            crate::AsViewMut::as_view_mut(&mut y)?,
            crate::AsViewMut::as_view_mut(&mut rstd)?,
        );
        match (&x.data, &m.data, &mut yv.data, &mut rv.data) {
            (Data::Cuda(xv, dev), Data::Cuda(mv, _), DataMut::Cuda(yo, _), DataMut::Cuda(ro, _)) => {
                let (r64, p64, c32, eps) = (rows as i64, p as i64, c as i32, LN_EPS as f32);
                let cfg = warp_per_row(dev, rows);
                // SAFETY: x and y hold rows * c values, rstd rows, m [rows / p, 3c] (checked above).
                unsafe {
                    dev.kernels()
                        .ln_modulate_forward_f32(cfg, xv, mv, yo, ro, r64, p64, c32, eps)
                }?;
            }
            (Data::Cuda(..), ..) => return Err(mismatch("modulated_layer_norm", &[x, m], &[])),
            _ => host_real!(x, T => {
                let mut h = vec![T::ZERO; x.numel()];
                crate::nn::blocks::cpu::modulate::<T>(x.cpu()?, m.cpu()?, &mut h, p, c);
                cpu::forward::<T>(&h, yv.cpu_mut()?, rv.cpu_mut()?, c, LN_EPS);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(LnSaved { y, rstd })
}

/// dx for dy, given what the forward saved.
pub fn layer_norm_backward(saved: &LnSaved, dy: &View) -> Result<Tensor> {
    layer_norm_backward_from(
        &crate::AsView::as_view(&saved.y)?,
        &crate::AsView::as_view(&saved.rstd)?,
        dy,
    )
}

/// dx for dy from the forward's output y and 1/std (when y is kept elsewhere, e.g. as the next
/// block's saved input).
pub fn layer_norm_backward_from(y: &View, rstd: &View, dy: &View) -> Result<Tensor> {
    let (y, rstd) = (y.clone(), rstd.clone());
    one_device("layer_norm_backward", &[&y, &rstd, dy], &[])?;
    let (rows, c) = channels(&y)?;
    if dy.shape() != y.shape() {
        return Err(Error::shape("layer_norm_backward", "dy", y.shape(), dy.shape()));
    }
    let mut dx = Tensor::uninit(y.shape(), y.dtype(), &y.device())?;
    {
        let mut dv = crate::AsViewMut::as_view_mut(&mut dx)?;
        match (&y.data, &rstd.data, &dy.data, &mut dv.data) {
            (Data::Cuda(yv, dev), Data::Cuda(rv, _), Data::Cuda(gv, _), DataMut::Cuda(dout, _)) => {
                let (r64, c32) = (rows as i64, c as i32);
                // SAFETY: y, dy and dx hold rows * c values, rstd rows.
                unsafe {
                    dev.kernels()
                        .ln_backward_f32(warp_per_row(dev, rows), yv, rv, gv, dout, r64, c32)
                }?;
            }
            (Data::Cuda(..), ..) => return Err(mismatch("layer_norm_backward", &[&y, dy], &[])),
            _ => host_real!(y, T => {
                cpu::backward::<T>(y.cpu()?, rstd.cpu()?, dy.cpu()?, dv.cpu_mut()?, c);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(dx)
}
