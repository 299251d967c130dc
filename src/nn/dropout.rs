//! Inverted dropout: y = x * keep / (1 - p), keep = [uniform(seed, stream, offset + i) >= p].
//! The mask is a function of the Philox counters, so the backward (the same map applied to dy)
//! regenerates it instead of storing it, and CPU and GPU drop the same elements.
//! CUDA: kernels/dropout.cu.

use crate::device::launch::grid_stride;

use crate::error::{Error, Result};
use crate::ops::elementwise::{silu_backward_operand, silu_operand};
use crate::ops::precision::{to_bf16, Operand};
use crate::ops::{mismatch, Philox};
use crate::real::Real;
use crate::tensor::{AsView, AsViewMut, DType, Data, DataMut, Tensor, View};

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
    check_p(mask)?;
    let n = x.numel();
    let mut y = Tensor::uninit(x.shape(), x.dtype(), &x.device())?;
    {
        let mut yv = y.as_view_mut()?;
        match (&x.data, &mut yv.data) {
            (Data::Cuda(xv, dev), DataMut::Cuda(o, _)) => {
                let (n64, p, seed, stream, off) =
                    (n as i64, mask.p, mask.rng.seed, mask.rng.stream, mask.offset);
                let (clock, sps, ops) = mask.rng.clock_args();
                // 1 / (1 - p) rounded once from f64, as the CPU body below.
                let scale = (1.0 / (1.0 - mask.p as f64)) as f32;
                // SAFETY: x and y hold n values (same shape); a clock address is a live clock's.
                unsafe {
                    dev.kernels().dropout_f32(
                        grid_stride(dev, n),
                        xv,
                        o,
                        n64,
                        p,
                        scale,
                        seed,
                        stream,
                        off,
                        clock,
                        sps,
                        ops,
                    )
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

fn check_p(mask: &DropoutMask) -> Result<()> {
    if !(0.0..1.0).contains(&mask.p) {
        return Err(Error::Other(format!(
            "dropout probability {} is not in [0, 1)",
            mask.p
        )));
    }
    Ok(())
}

/// A ResBlock's conv2 input from c1 (f32, or kept in bf16): `dropout(silu(c1))`, or `silu(c1)`
/// without a mask, in `dtype`: f32, or bf16 (rounded to nearest even) for a conv2 that reads
/// bf16 operands. On a GPU with c1 in bf16, one kernel that stores either (kernels/dropout.cu;
/// no mask: p = 0, nothing drawn); elsewhere SiLU, dropout, then the cast. The same values
/// either way.
pub fn silu_dropout_to(c1: &Operand, mask: Option<&DropoutMask>, dtype: DType) -> Result<Tensor> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(Error::Other(format!(
            "silu_dropout: no {} output (f32 or bf16)",
            dtype.name()
        )));
    }
    let gpu = match c1 {
        Operand::Bf16(xb) => xb.gpu_with(&[]).map(|dev| (xb, dev)),
        Operand::F32(_) => None,
    };
    let Some((xb, dev)) = gpu else {
        let s1 = silu_operand(c1)?;
        let d1 = match mask {
            Some(mk) => dropout(&s1.as_view()?, mk)?,
            None => s1,
        };
        return match dtype {
            DType::BF16 => to_bf16(&d1),
            _ => Ok(d1),
        };
    };
    let (p, scale, rng, offset) = mask_args(mask)?;
    crate::device::note_op();
    let n = xb.numel();
    let mut out = Tensor::uninit(xb.shape(), dtype, &crate::Device::Cuda(dev.clone()))?;
    let (xv, cfg, k) = (xb.cuda()?, grid_stride(&dev, n), dev.kernels());
    let (n, seed, stream) = (n as i64, rng.seed, rng.stream);
    let (clock, sps, ops) = rng.clock_args();
    // SAFETY: x and out hold n values; a clock address is a live clock's.
    unsafe {
        match dtype {
            DType::BF16 => {
                let mut o = out.cuda_bf16_mut()?;
                k.silu_dropout_bf16x_bf16y(
                    cfg, &xv, &mut o, n, p, scale, seed, stream, offset, clock, sps, ops,
                )
            }
            _ => {
                let mut o = out.cuda_f32_mut()?;
                k.silu_dropout_bf16x(
                    cfg, &xv, &mut o, n, p, scale, seed, stream, offset, clock, sps, ops,
                )
            }
        }
    }?;
    Ok(out)
}

/// The kernels' (p, 1 / (1 - p), key, offset) for a mask; no mask: p = 0, nothing drawn.
fn mask_args(mask: Option<&DropoutMask>) -> Result<(f32, f32, Philox, u64)> {
    Ok(match mask {
        Some(mk) => {
            check_p(mk)?;
            // 1 / (1 - p) rounded once from f64, as the CPU body.
            (mk.p, (1.0 / (1.0 - mk.p as f64)) as f32, mk.rng, mk.offset)
        }
        None => (0.0, 1.0, Philox::new(0, 0), 0),
    })
}

/// [`silu_dropout_to`] in f32.
pub fn silu_dropout(c1: &Operand, mask: Option<&DropoutMask>) -> Result<Tensor> {
    silu_dropout_to(c1, mask, DType::F32)
}

/// The VJP of [`silu_dropout`] for `g` (conv2's input gradient): `silu'(c1) dropout(g)`. On a
/// GPU with c1 in bf16, one kernel in place in `g`; elsewhere dropout then the SiLU VJP.
pub fn silu_dropout_backward(c1: &Operand, mut g: Tensor, mask: Option<&DropoutMask>) -> Result<Tensor> {
    let dev = match c1 {
        Operand::Bf16(xb) => xb.gpu_with(&[&g.as_view()?]),
        Operand::F32(_) => None,
    };
    let (Some(dev), Operand::Bf16(xb)) = (dev, c1) else {
        let d = match mask {
            Some(mk) => {
                let d = dropout(&g.as_view()?, mk)?;
                drop(g);
                d
            }
            None => g,
        };
        return silu_backward_operand(c1, &d);
    };
    if g.shape() != xb.shape() || g.dtype() != DType::F32 {
        return Err(Error::shape(
            "silu_dropout_backward",
            "g (f32)",
            xb.shape(),
            g.shape(),
        ));
    }
    let (p, scale, rng, offset) = mask_args(mask)?;
    crate::device::note_op();
    let n = xb.numel();
    let (xv, mut gv) = (xb.cuda()?, g.cuda_f32_mut()?);
    let (clock, sps, ops) = rng.clock_args();
    // SAFETY: x and g hold n values (checked above); a clock address is a live clock's.
    unsafe {
        dev.kernels().silu_dropout_backward_bf16x(
            grid_stride(&dev, n),
            &xv,
            &mut gv,
            n as i64,
            p,
            scale,
            rng.seed,
            rng.stream,
            offset,
            clock,
            sps,
            ops,
        )
    }?;
    Ok(g)
}
