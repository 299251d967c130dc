//! Deterministic reductions: the sum of a tensor, and per-row dot products and L2 norms over a
//! batch (row = first axis). Partial sums are f64 on both backends; the GPU's fixed reduction
//! tree and the absence of atomics make every result identical run to run.
//! CUDA: kernels/reduce.cu.

use super::{alloc_like, expect_shape, mismatch, one_device};
use crate::device::launch;
use crate::error::{Error, Result};
use crate::tensor::{AsView, AsViewMut, Data, DataMut, Tensor};

/// Must equal REDUCE_THREADS in kernels/common.cuh.
const REDUCE_THREADS: u32 = 256;
/// At most this many f64 partials in the first stage of a full sum.
const MAX_PARTIALS: usize = 1024;

/// The CPU bodies: the oracle for kernels/reduce.cu.
pub mod cpu {
    use crate::real::Real;

    pub fn sum<T: Real>(x: &[T]) -> f64 {
        x.iter().map(|&v| v.to_f64()).sum()
    }

    pub fn dot<T: Real>(a: &[T], b: &[T]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x.to_f64() * y.to_f64()).sum()
    }

    /// out[r] = <a[r], b[r]> (or its square root) over rows of length `cols`.
    pub fn row_dot<T: Real>(a: &[T], b: &[T], out: &mut [T], cols: usize, sqrt: bool) {
        for (r, o) in out.iter_mut().enumerate() {
            let d = dot(&a[r * cols..(r + 1) * cols], &b[r * cols..(r + 1) * cols]);
            *o = T::from_f64(if sqrt { d.sqrt() } else { d });
        }
    }
}

/// out (shape []) = sum of all elements of x.
pub fn sum_into(x: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    let (x, mut out) = (x.as_view()?, out.as_view_mut()?);
    one_device("sum", &[&x], &[&out])?;
    expect_shape("sum", "out", out.shape(), &[])?;
    let n = x.numel();
    match (&x.data, &mut out.data) {
        (Data::F32(v), DataMut::F32(o)) => o[0] = cpu::sum(v) as f32,
        (Data::F64(v), DataMut::F64(o)) => o[0] = cpu::sum(v),
        (Data::Cuda(v, dev), DataMut::Cuda(o, _)) => {
            // The grid depends on n alone, so the summation order (hence the result) does too.
            let blocks = n.div_ceil(REDUCE_THREADS as usize * 4).clamp(1, MAX_PARTIALS);
            let mut partials = dev.alloc(blocks * 8)?;
            // SAFETY: the buffer holds `blocks` f64 values.
            let mut pv = unsafe { partials.slice_mut().transmute_mut::<f64>(blocks) }.expect("sized above");
            let k = dev.kernels();
            // SAFETY: one partial per block, and a one-block finish over them into the scalar.
            unsafe {
                k.reduce_sum_partial_f32(
                    launch::blocks((blocks as u32, 1, 1), REDUCE_THREADS),
                    v,
                    n as i64,
                    &mut pv,
                )?;
                k.reduce_sum_finish(
                    launch::blocks((1, 1, 1), REDUCE_THREADS),
                    &pv.slice(..),
                    blocks as i32,
                    o,
                )
            }?;
        }
        _ => return Err(mismatch("sum", &[&x], &[&out])),
    }
    Ok(())
}

pub fn sum(x: &impl AsView) -> Result<Tensor> {
    let v = x.as_view()?;
    let mut out = alloc_like(&v, &[])?;
    sum_into(&v, &mut out)?;
    Ok(out)
}

/// (rows, cols) of a batch: rows along the first axis, everything else flattened.
fn rows_cols(op: &'static str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape.first() {
        Some(&rows) if rows > 0 => Ok((rows, shape.iter().product::<usize>() / rows)),
        _ => Err(Error::shape(op, "input", "[rows, ...] with rows > 0", shape)),
    }
}

fn row_reduce(
    op: &'static str,
    a: &impl AsView,
    b: &impl AsView,
    out: &mut impl AsViewMut,
    sqrt: bool,
) -> Result<()> {
    let (a, b, mut out) = (a.as_view()?, b.as_view()?, out.as_view_mut()?);
    one_device(op, &[&a, &b], &[&out])?;
    expect_shape(op, "second operand", b.shape(), a.shape())?;
    let (rows, cols) = rows_cols(op, a.shape())?;
    expect_shape(op, "out", out.shape(), &[rows])?;
    match (&a.data, &b.data, &mut out.data) {
        (Data::F32(x), Data::F32(y), DataMut::F32(o)) => cpu::row_dot(x, y, o, cols, sqrt),
        (Data::F64(x), Data::F64(y), DataMut::F64(o)) => cpu::row_dot(x, y, o, cols, sqrt),
        (Data::Cuda(x, dev), Data::Cuda(y, _), DataMut::Cuda(o, _)) => {
            let (rows64, cols64, sqrt32) = (rows as i64, cols as i64, sqrt as i32);
            let cfg = launch::blocks(
                (rows.min(dev.sm_count() as usize * 32) as u32, 1, 1),
                REDUCE_THREADS,
            );
            // SAFETY: a and b hold rows * cols values and out rows (shapes checked above).
            unsafe {
                dev.kernels()
                    .reduce_row_dot_f32(cfg, x, y, o, rows64, cols64, sqrt32)
            }?;
        }
        _ => return Err(mismatch(op, &[&a, &b], &[&out])),
    }
    Ok(())
}

/// out[r] = <a[r], b[r]> for each row r of a batch.
pub fn row_dot_into(a: &impl AsView, b: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    row_reduce("row_dot", a, b, out, false)
}

pub fn row_dot(a: &impl AsView, b: &impl AsView) -> Result<Tensor> {
    let v = a.as_view()?;
    let (rows, _) = rows_cols("row_dot", v.shape())?;
    let mut out = alloc_like(&v, &[rows])?;
    row_dot_into(&v, b, &mut out)?;
    Ok(out)
}

/// out[r] = ||x[r]||_2 for each row r of a batch.
pub fn row_norm_into(x: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    row_reduce("row_norm", x, x, out, true)
}

pub fn row_norm(x: &impl AsView) -> Result<Tensor> {
    let v = x.as_view()?;
    let (rows, _) = rows_cols("row_norm", v.shape())?;
    let mut out = alloc_like(&v, &[rows])?;
    row_norm_into(&v, &mut out)?;
    Ok(out)
}
