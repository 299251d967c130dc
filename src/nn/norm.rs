//! LayerNorm over channels (the last axis) without affine parameters, eps = 1e-5 (inox's
//! LayerNorm as the paper uses it). CUDA: kernels/norm.cu.

use crate::device::launch::warp_per_row;

use crate::error::{Error, Result};
use crate::ops::precision::{keep, Operand, Precision};
use crate::ops::{mismatch, one_device};
use crate::real::Real;
use crate::tensor::{DType, Data, DataMut, Tensor, View};
use crate::Device;

/// LayerNorm's epsilon, added to the variance (inox's default).
pub const LN_EPS: f64 = 1e-5;

/// The CPU bodies: the oracle for kernels/norm.cu. Rows are independent, so they run on both
/// cores (ops::parallel); row sums go over 8 lanes (ops::simd::sum8_map, dot8), a fixed order that
/// vectorises, and the f32 loops are compiled for the CPU's widest vector unit.
pub mod cpu {
    use bytemuck::{cast_slice, cast_slice_mut};

    use crate::ops::elementwise::cpu::{silu, silu_backward};
    use crate::ops::parallel::for_rows2;
    use crate::ops::simd::{dot8, multiversion, sum8_map};
    use crate::real::Real;
    use crate::tensor::DType;

    /// `h = (1 + a) x + b`, with a and b the first two thirds of each sample's row of m
    /// (`[n, 3c]`; x, h `[n, p, c]`): the modulation the LayerNorm kernels fuse before
    /// normalising (kernels/norm.cu); `nn::blocks` uses it too.
    pub fn modulate<T: Real>(x: &[T], m: &[T], h: &mut [T], p: usize, c: usize) {
        for (i, o) in h.iter_mut().enumerate() {
            let (ch, s) = (i % c, i / (p * c));
            *o = (T::ONE + m[s * 3 * c + ch]) * x[i] + m[s * 3 * c + c + ch];
        }
    }

    /// y = (x - mean) / sqrt(var + eps) per row; `y` may already hold x (then `x` is None).
    #[inline(always)]
    fn normalise_rows<T: Real>(x: Option<&[T]>, y: &mut [T], rstd: &mut [T], c: usize, eps: f64) {
        let inv_c = T::from_f64(1.0 / c as f64);
        for (i, (yr, r)) in y.chunks_exact_mut(c).zip(rstd.iter_mut()).enumerate() {
            if let Some(x) = x {
                yr.copy_from_slice(&x[i * c..(i + 1) * c]);
            }
            let mean = sum8_map(yr, |v| v) * inv_c;
            let var = sum8_map(yr, |v| (v - mean) * (v - mean)) * inv_c;
            *r = T::ONE / (var + T::from_f64(eps)).sqrt();
            for v in yr.iter_mut() {
                *v = (*v - mean) * *r;
            }
        }
    }

    #[inline(always)]
    fn forward_rows<T: Real>(x: &[T], y: &mut [T], rstd: &mut [T], c: usize, eps: f64) {
        normalise_rows(Some(x), y, rstd, c, eps)
    }

    /// y = LN(silu(z)): SiLU written into y, then normalised in place.
    #[inline(always)]
    fn silu_forward_rows<T: Real>(z: &[T], y: &mut [T], rstd: &mut [T], c: usize, eps: f64) {
        for (o, &v) in y.iter_mut().zip(z) {
            *o = silu(v);
        }
        normalise_rows(None, y, rstd, c, eps)
    }

    /// dx = rstd (dy - mean(dy) - y mean(dy y)) per row.
    #[inline(always)]
    fn backward_rows<T: Real>(y: &[T], rstd: &[T], dy: &[T], dx: &mut [T], c: usize) {
        let inv_c = T::from_f64(1.0 / c as f64);
        for (i, (dr, &r)) in dx.chunks_exact_mut(c).zip(rstd).enumerate() {
            let (yr, gr) = (&y[i * c..(i + 1) * c], &dy[i * c..(i + 1) * c]);
            let ma = sum8_map(gr, |v| v) * inv_c;
            let mb = dot8(gr, yr) * inv_c;
            for ((d, &g), &v) in dr.iter_mut().zip(gr).zip(yr) {
                *d = r * (g - ma - v * mb);
            }
        }
    }

    /// dz = silu'(z) * LN backward(dy): the fused pair's backward, one pass per row.
    #[inline(always)]
    fn silu_backward_rows<T: Real>(z: &[T], y: &[T], rstd: &[T], dy: &[T], dz: &mut [T], c: usize) {
        backward_rows(y, rstd, dy, dz, c);
        for (d, &v) in dz.iter_mut().zip(z) {
            *d = silu_backward(v, *d);
        }
    }

    // The f32 monomorphs, compiled for AVX-512, AVX2 and the baseline.
    multiversion! { fn forward_f32(x: &[f32], y: &mut [f32], rstd: &mut [f32], c: usize, eps: f64) => forward_rows::<f32> }
    multiversion! { fn silu_forward_f32(z: &[f32], y: &mut [f32], rstd: &mut [f32], c: usize, eps: f64) => silu_forward_rows::<f32> }
    multiversion! { fn backward_f32(y: &[f32], rstd: &[f32], dy: &[f32], dx: &mut [f32], c: usize) => backward_rows::<f32> }
    multiversion! { fn silu_backward_f32(z: &[f32], y: &[f32], rstd: &[f32], dy: &[f32], dz: &mut [f32], c: usize) => silu_backward_rows::<f32> }

    fn is_f32<T: Real>() -> bool {
        T::DTYPE == DType::F32
    }

    /// y = LN(x) per row of the row-major `[rows, c]` x, and 1/std per row into `rstd`.
    pub fn forward<T: Real>(x: &[T], y: &mut [T], rstd: &mut [T], c: usize, eps: f64) {
        for_rows2(y, c, rstd, 1, |r, y, rs| {
            let x = &x[r.start * c..r.end * c];
            if is_f32::<T>() {
                forward_f32(cast_slice(x), cast_slice_mut(y), cast_slice_mut(rs), c, eps)
            } else {
                forward_rows(x, y, rs, c, eps)
            }
        });
    }

    /// y = LN(silu(z)) per row, with 1/std.
    pub fn silu_forward<T: Real>(z: &[T], y: &mut [T], rstd: &mut [T], c: usize, eps: f64) {
        for_rows2(y, c, rstd, 1, |r, y, rs| {
            let z = &z[r.start * c..r.end * c];
            if is_f32::<T>() {
                silu_forward_f32(cast_slice(z), cast_slice_mut(y), cast_slice_mut(rs), c, eps)
            } else {
                silu_forward_rows(z, y, rs, c, eps)
            }
        });
    }

    /// The LayerNorm VJP per row from the forward's y and 1/std:
    /// `dx = rstd (dy - mean(dy) - y mean(dy y))`.
    pub fn backward<T: Real>(y: &[T], rstd: &[T], dy: &[T], dx: &mut [T], c: usize) {
        crate::ops::parallel::for_rows(dx, c, |r, dx| {
            let (y, dy, rstd) = (&y[r.start * c..r.end * c], &dy[r.start * c..r.end * c], &rstd[r]);
            if is_f32::<T>() {
                backward_f32(
                    cast_slice(y),
                    cast_slice(rstd),
                    cast_slice(dy),
                    cast_slice_mut(dx),
                    c,
                )
            } else {
                backward_rows(y, rstd, dy, dx, c)
            }
        });
    }

    /// dz for dy through LN(silu(z)), from z and the forward's y and 1/std.
    pub fn silu_backward_fused<T: Real>(z: &[T], y: &[T], rstd: &[T], dy: &[T], dz: &mut [T], c: usize) {
        crate::ops::parallel::for_rows(dz, c, |r, dz| {
            let rows = r.start * c..r.end * c;
            let (z, y, dy, rstd) = (&z[rows.clone()], &y[rows.clone()], &dy[rows], &rstd[r]);
            if is_f32::<T>() {
                let (z, y, rstd, dy) = (cast_slice(z), cast_slice(y), cast_slice(rstd), cast_slice(dy));
                silu_backward_f32(z, y, rstd, dy, cast_slice_mut(dz), c)
            } else {
                silu_backward_rows(z, y, rstd, dy, dz, c)
            }
        });
    }
}

/// What the backward needs: the output and 1/std per row.
pub struct LnSaved {
    /// The normalised output, shaped like the input (f32, or bf16 where a block keeps it so).
    pub y: Tensor,
    /// `1 / sqrt(var + eps)` per row, `[rows]` (rows: the product of all axes but the last).
    pub rstd: Tensor,
}

fn channels(x: &View) -> Result<(usize, usize)> {
    rows_channels("layer_norm", x.shape())
}

/// (rows, channels) of an activation `[.., C]`.
fn rows_channels(op: &'static str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape.last() {
        Some(&c) if c > 0 => Ok((crate::tensor::numel(shape) / c, c)),
        _ => Err(Error::shape(op, "input", "[.., channels]", shape)),
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

/// [`layer_norm`] as the U-Net keeps it (`ops::precision::keep`): under bf16 on a GPU the kernel
/// writes the output in bf16 itself (no f32 copy to cast); elsewhere the f32 output rounded (the
/// same values). 1/std stays f32.
pub fn layer_norm_kept(x: &View, precision: Precision) -> Result<LnSaved> {
    let (Precision::Bf16, Data::Cuda(xv, dev)) = (precision, &x.data) else {
        let mut ln = layer_norm(x)?;
        ln.y = keep(ln.y, precision)?;
        return Ok(ln);
    };
    let (rows, c) = channels(x)?;
    let device = x.device();
    let mut y = Tensor::uninit(x.shape(), DType::BF16, &device)?;
    let mut rstd = Tensor::uninit(&[rows], DType::F32, &device)?;
    {
        let (mut yo, mut ro) = (y.cuda_bf16_mut()?, rstd.cuda_f32_mut()?);
        let (r64, c32, eps) = (rows as i64, c as i32, LN_EPS as f32);
        // SAFETY: x and y hold rows * c values, rstd rows.
        unsafe {
            dev.kernels()
                .ln_forward_f32_bf16y(warp_per_row(dev, rows), xv, &mut yo, &mut ro, r64, c32, eps)
        }?;
    }
    Ok(LnSaved { y, rstd })
}

/// [`modulated_layer_norm`] for a block input that may be kept in bf16: on a GPU one kernel reads
/// it as it is, elsewhere it is widened (exactly); the same values either way.
pub fn modulated_layer_norm_operand(x: &Operand, m: &View) -> Result<LnSaved> {
    modulated_layer_norm_to(x, m, DType::F32)
}

/// The block entry as the block keeps it (`ops::precision::keep`): under bf16 the output is
/// bf16, written so by the kernel itself on a GPU from a bf16 input (no f32 copy and cast);
/// elsewhere the f32 output rounded (the same values). 1/std stays f32.
pub fn modulated_layer_norm_kept(x: &Operand, m: &View, precision: Precision) -> Result<LnSaved> {
    let mut ln = modulated_layer_norm_to(x, m, precision.kept_dtype())?;
    ln.y = keep(ln.y, precision)?;
    Ok(ln)
}

/// [`modulated_layer_norm_operand`] with the output in `y_dtype` (f32, or bf16 from the GPU's
/// bf16-input kernel; elsewhere f32, which the caller rounds).
fn modulated_layer_norm_to(x: &Operand, m: &View, y_dtype: DType) -> Result<LnSaved> {
    if let Operand::Bf16(xb) = x {
        if let Some(dev) = xb.gpu_with(&[m]) {
            let (rows, c) = rows_channels("modulated_layer_norm", xb.shape())?;
            let n = xb.shape()[0];
            if xb.shape().len() < 2 || m.shape() != [n, 3 * c] {
                return Err(Error::shape(
                    "modulated_layer_norm",
                    "modulation",
                    [n, 3 * c],
                    m.shape(),
                ));
            }
            crate::device::note_op();
            let device = Device::Cuda(dev.clone());
            let bf16_out = y_dtype == DType::BF16;
            let mut y = Tensor::uninit(xb.shape(), y_dtype, &device)?;
            let mut rstd = Tensor::uninit(&[rows], DType::F32, &device)?;
            let Data::Cuda(mv, _) = &m.data else {
                unreachable!("on the GPU (checked above)")
            };
            let (xv, mut ro) = (xb.cuda()?, rstd.cuda_f32_mut()?);
            let (cfg, r64, p64, c32, eps) = (
                warp_per_row(&dev, rows),
                rows as i64,
                (rows / n) as i64,
                c as i32,
                LN_EPS as f32,
            );
            let k = dev.kernels();
            // SAFETY: x and y hold rows * c values, rstd rows, m [rows / p, 3c] (checked above).
            unsafe {
                if bf16_out {
                    let mut yo = y.cuda_bf16_mut()?;
                    k.ln_modulate_forward_bf16x_bf16y(cfg, &xv, mv, &mut yo, &mut ro, r64, p64, c32, eps)
                } else {
                    let mut yo = y.cuda_f32_mut()?;
                    k.ln_modulate_forward_bf16x(cfg, &xv, mv, &mut yo, &mut ro, r64, p64, c32, eps)
                }
            }?;
            return Ok(LnSaved { y, rstd });
        }
    }
    let x = x.widen()?;
    modulated_layer_norm(&x.view()?, m)
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
                cpu::modulate::<T>(x.cpu()?, m.cpu()?, &mut h, p, c);
                cpu::forward::<T>(&h, yv.cpu_mut()?, rv.cpu_mut()?, c, LN_EPS);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(LnSaved { y, rstd })
}

/// dx for dy, given what the forward saved (y may be kept in bf16).
pub fn layer_norm_backward(saved: &LnSaved, dy: &View) -> Result<Tensor> {
    layer_norm_backward_operand(&Operand::of(&saved.y)?, &crate::AsView::as_view(&saved.rstd)?, dy)
}

/// [`layer_norm_backward_from`] for a y that may be kept in bf16: on a GPU one kernel reads it
/// as it is, elsewhere it is widened (exactly); the same values either way.
pub fn layer_norm_backward_operand(y: &Operand, rstd: &View, dy: &View) -> Result<Tensor> {
    if let Operand::Bf16(yb) = y {
        if let Some(dev) = yb.gpu_with(&[rstd, dy]) {
            let (rows, c) = rows_channels("layer_norm_backward", yb.shape())?;
            if dy.shape() != yb.shape() || rstd.numel() != rows {
                return Err(Error::shape("layer_norm_backward", "dy", yb.shape(), dy.shape()));
            }
            crate::device::note_op();
            let mut dx = Tensor::uninit(dy.shape(), DType::F32, &Device::Cuda(dev.clone()))?;
            let (Data::Cuda(rv, _), Data::Cuda(gv, _)) = (&rstd.data, &dy.data) else {
                unreachable!("on the GPU (checked above)")
            };
            let (yv, mut o) = (yb.cuda()?, dx.cuda_f32_mut()?);
            // SAFETY: y, dy and dx hold rows * c values, rstd rows (checked above).
            unsafe {
                dev.kernels().ln_backward_bf16y(
                    warp_per_row(&dev, rows),
                    &yv,
                    rv,
                    gv,
                    &mut o,
                    rows as i64,
                    c as i32,
                )
            }?;
            return Ok(dx);
        }
    }
    let y = y.widen()?;
    layer_norm_backward_from(&y.view()?, rstd, dy)
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

/// y = LN(silu(z)): the TimeMLP's activation and normalisation in one pass. SiLU's output is
/// never stored; the backward recomputes it from z, which the layer keeps anyway.
pub fn silu_layer_norm(z: &View) -> Result<LnSaved> {
    let (rows, c) = channels(z)?;
    let (device, dtype) = (z.device(), z.dtype());
    let mut y = Tensor::uninit(z.shape(), dtype, &device)?;
    let mut rstd = Tensor::uninit(&[rows], dtype, &device)?;
    {
        let (mut yv, mut rv) = (
            crate::AsViewMut::as_view_mut(&mut y)?,
            crate::AsViewMut::as_view_mut(&mut rstd)?,
        );
        match (&z.data, &mut yv.data, &mut rv.data) {
            (Data::Cuda(zv, dev), DataMut::Cuda(yo, _), DataMut::Cuda(ro, _)) => {
                let (r64, c32, eps) = (rows as i64, c as i32, LN_EPS as f32);
                // SAFETY: z and y hold rows * c values, rstd rows.
                unsafe {
                    dev.kernels()
                        .ln_silu_forward_f32(warp_per_row(dev, rows), zv, yo, ro, r64, c32, eps)
                }?;
            }
            (Data::Cuda(..), ..) => return Err(mismatch("silu_layer_norm", &[z], &[])),
            _ => host_real!(z, T => {
                cpu::silu_forward::<T>(z.cpu()?, yv.cpu_mut()?, rv.cpu_mut()?, c, LN_EPS);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(LnSaved { y, rstd })
}

/// dz for dy through `silu_layer_norm(z)`, given z and what it saved.
pub fn silu_layer_norm_backward(z: &View, saved: &LnSaved, dy: &View) -> Result<Tensor> {
    let (y, rstd) = (
        crate::AsView::as_view(&saved.y)?,
        crate::AsView::as_view(&saved.rstd)?,
    );
    one_device("silu_layer_norm_backward", &[z, &y, &rstd, dy], &[])?;
    let (rows, c) = channels(&y)?;
    if dy.shape() != y.shape() || z.shape() != y.shape() {
        return Err(Error::shape(
            "silu_layer_norm_backward",
            "z and dy",
            y.shape(),
            (z.shape(), dy.shape()),
        ));
    }
    let mut dz = Tensor::uninit(y.shape(), y.dtype(), &y.device())?;
    {
        let mut dv = crate::AsViewMut::as_view_mut(&mut dz)?;
        match (&z.data, &y.data, &rstd.data, &dy.data, &mut dv.data) {
            (
                Data::Cuda(zv, dev),
                Data::Cuda(yv, _),
                Data::Cuda(rv, _),
                Data::Cuda(gv, _),
                DataMut::Cuda(dout, _),
            ) => {
                let (r64, c32) = (rows as i64, c as i32);
                let cfg = warp_per_row(dev, rows);
                // SAFETY: z, y, dy and dz hold rows * c values, rstd rows (checked above).
                unsafe {
                    dev.kernels()
                        .ln_silu_backward_f32(cfg, zv, yv, rv, gv, dout, r64, c32)
                }?;
            }
            (Data::Cuda(..), ..) => return Err(mismatch("silu_layer_norm_backward", &[z, dy], &[])),
            _ => host_real!(y, T => {
                cpu::silu_backward_fused::<T>(z.cpu()?, y.cpu()?, rstd.cpu()?, dy.cpu()?, dv.cpu_mut()?, c);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(dz)
}
