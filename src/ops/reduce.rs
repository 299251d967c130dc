//! Deterministic reductions: the sum of a tensor, and per-row dot products, sums and L2 norms
//! over a batch (row = first axis). Partial sums are f64 on both backends; on the GPU the grid
//! is fixed by the shape (never by the device), the reduction trees are fixed and there are no
//! atomics, so every result is identical run to run and on every GPU.
//!
//! GPU versions (kernels/reduce.cu): version 2 serves every call; version 1 (one block per row,
//! a 1,024-partial full sum) is kept for the parity trials and `emprior bench` (`*_v1`).
//! Version 2 cuts a shape by its row length alone: rows up to [`ROW_WARP_MAX`] get one warp each;
//! longer rows are cut into chunks of [`ROW_CHUNK`] elements, one block each, whose f64 partials
//! one block per row then adds in order (one launch when a row is a single chunk).

use cudarc::driver::{CudaView, CudaViewMut};

use super::{alloc_like, expect_shape, mismatch, one_device};
use crate::device::{launch, CudaDevice, PooledBuffer};
use crate::error::{Error, Result};
use crate::tensor::{AsView, AsViewMut, Data, DataMut, Tensor};

/// Must equal REDUCE_THREADS in kernels/common.cuh.
const REDUCE_THREADS: u32 = 256;
/// Version 1: at most this many f64 partials in the first stage of a full sum.
const MAX_PARTIALS: usize = 1024;
/// Must equal ROW_WARP_MAX in kernels/reduce.cu: rows up to this long get one warp each.
pub const ROW_WARP_MAX: usize = 512;
/// Must equal ROW_CHUNK in kernels/reduce.cu: longer rows are summed in chunks this long.
pub const ROW_CHUNK: usize = 16384;
/// Warps per block of the warp-per-row kernel.
const WARPS: usize = REDUCE_THREADS as usize / 32;

/// The CPU bodies: the oracle for kernels/reduce.cu.
pub mod cpu {
    use crate::real::Real;

    /// The sum of all elements, accumulated in f64 in order.
    pub fn sum<T: Real>(x: &[T]) -> f64 {
        x.iter().map(|&v| v.to_f64()).sum()
    }

    /// `sum_i a[i] b[i]` in f64, in order, over the shorter of the two slices.
    pub fn dot<T: Real>(a: &[T], b: &[T]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x.to_f64() * y.to_f64()).sum()
    }

    /// `out[r] = <a[r], b[r]>` (or its square root) over rows of length `cols`.
    pub fn row_dot<T: Real>(a: &[T], b: &[T], out: &mut [T], cols: usize, sqrt: bool) {
        for (r, o) in out.iter_mut().enumerate() {
            let d = dot(&a[r * cols..(r + 1) * cols], &b[r * cols..(r + 1) * cols]);
            *o = T::from_f64(if sqrt { d.sqrt() } else { d });
        }
    }
}

/// A launch grid of `blocks` blocks, or an error when the shape is past what one grid holds.
fn grid(op: &'static str, blocks: usize) -> Result<u32> {
    u32::try_from(blocks.max(1))
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| Error::shape(op, "input", "at most 2^31 - 1 blocks of work", blocks))
}

/// f64 scratch from the pool (freed in stream order, so the queued kernels keep it).
fn f64_buffer(dev: &CudaDevice, len: usize) -> Result<PooledBuffer> {
    dev.alloc(len.max(1) * 8)
}

/// Version 2 on the GPU: out[r] = sum_c a[r, c] b[r, c] (b = None: sum_c a[r, c]), or its square
/// root, for `rows` rows of `cols`.
#[allow(clippy::too_many_arguments)]
fn rows_v2(
    op: &'static str,
    dev: &CudaDevice,
    a: &CudaView<f32>,
    b: Option<&CudaView<f32>>,
    out: &mut CudaViewMut<f32>,
    rows: usize,
    cols: usize,
    sqrt: bool,
) -> Result<()> {
    let (k, rows64, cols64, sq) = (dev.kernels(), rows as i64, cols as i64, sqrt as i32);
    if cols <= ROW_WARP_MAX {
        let cfg = launch::blocks((grid(op, rows.div_ceil(WARPS))?, 1, 1), REDUCE_THREADS);
        // SAFETY: a (and b) hold rows * cols values and out rows; one warp per row.
        return unsafe { k.reduce_rows_warp_f32(cfg, a, b, out, rows64, cols64, sq) };
    }
    let chunks = cols.div_ceil(ROW_CHUNK);
    let cfg = launch::blocks((grid(op, rows * chunks)?, 1, 1), REDUCE_THREADS);
    if chunks == 1 {
        // SAFETY: one block per row writes out[row] directly; partials are not touched.
        return unsafe { k.reduce_rows_partial_f32(cfg, a, b, rows64, cols64, 1, None, Some(out), sq) };
    }
    let mut partials = f64_buffer(dev, rows * chunks)?;
    // SAFETY: the buffer holds rows * chunks f64 values.
    let mut pv = unsafe { partials.slice_mut().transmute_mut::<f64>(rows * chunks) }.expect("sized above");
    let finish = launch::blocks((grid(op, rows)?, 1, 1), REDUCE_THREADS);
    // SAFETY: one partial per (row, chunk) block, then one block per row over its partials.
    unsafe {
        k.reduce_rows_partial_f32(cfg, a, b, rows64, cols64, chunks as i64, Some(&mut pv), None, sq)?;
        k.reduce_rows_finish_f32(finish, &pv.slice(..), rows64, chunks as i64, out, sq)
    }
}

/// The first stage of the sum of squares of `x` (n values) as one row: the f64 partials of its
/// chunks (at least one), for a finishing kernel elsewhere (the gradient norm of
/// kernels/adam.cu). Returns the buffer and the number of partials.
pub(crate) fn square_partials(
    dev: &CudaDevice,
    x: &CudaView<f32>,
    n: usize,
) -> Result<(PooledBuffer, usize)> {
    let chunks = n.div_ceil(ROW_CHUNK).max(1);
    let mut partials = f64_buffer(dev, chunks)?;
    {
        // SAFETY: the buffer holds `chunks` f64 values.
        let mut pv = unsafe { partials.slice_mut().transmute_mut::<f64>(chunks) }.expect("sized above");
        let cfg = launch::blocks((grid("norm", chunks)?, 1, 1), REDUCE_THREADS);
        // SAFETY: x holds n values; one partial per chunk, out unused.
        unsafe {
            dev.kernels().reduce_rows_partial_f32(
                cfg,
                x,
                Some(x),
                1,
                n as i64,
                chunks as i64,
                Some(&mut pv),
                None,
                0,
            )
        }?;
    }
    Ok((partials, chunks))
}

/// Which GPU implementation: the current one, or version 1 (parity trials and benchmarks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    Current,
    V1,
}

/// out (shape []) = sum of all elements of x.
pub fn sum_into(x: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    sum_version(x, out, Version::Current)
}

/// [`sum_into`] with version 1 of the kernels on a GPU (the same on the CPU).
pub fn sum_into_v1(x: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    sum_version(x, out, Version::V1)
}

fn sum_version(x: &impl AsView, out: &mut impl AsViewMut, version: Version) -> Result<()> {
    let (x, mut out) = (x.as_view()?, out.as_view_mut()?);
    one_device("sum", &[&x], &[&out])?;
    expect_shape("sum", "out", out.shape(), &[])?;
    let n = x.numel();
    match (&x.data, &mut out.data) {
        (Data::F32(v), DataMut::F32(o)) => o[0] = cpu::sum(v) as f32,
        (Data::F64(v), DataMut::F64(o)) => o[0] = cpu::sum(v),
        (Data::Cuda(v, dev), DataMut::Cuda(o, _)) if version == Version::Current => {
            rows_v2("sum", dev, v, None, o, 1, n, false)?
        }
        (Data::Cuda(v, dev), DataMut::Cuda(o, _)) => {
            // The grid depends on n alone, so the summation order (hence the result) does too.
            let blocks = n.div_ceil(REDUCE_THREADS as usize * 4).clamp(1, MAX_PARTIALS);
            let mut partials = f64_buffer(dev, blocks)?;
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

/// The sum of all elements of `x` as a new shape-`[]` tensor on its device and dtype,
/// accumulated in f64 (see [`sum_into`]).
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
    version: Version,
) -> Result<()> {
    let (a, b, mut out) = (a.as_view()?, b.as_view()?, out.as_view_mut()?);
    one_device(op, &[&a, &b], &[&out])?;
    expect_shape(op, "second operand", b.shape(), a.shape())?;
    let (rows, cols) = rows_cols(op, a.shape())?;
    expect_shape(op, "out", out.shape(), &[rows])?;
    match (&a.data, &b.data, &mut out.data) {
        (Data::F32(x), Data::F32(y), DataMut::F32(o)) => cpu::row_dot(x, y, o, cols, sqrt),
        (Data::F64(x), Data::F64(y), DataMut::F64(o)) => cpu::row_dot(x, y, o, cols, sqrt),
        (Data::Cuda(x, dev), Data::Cuda(y, _), DataMut::Cuda(o, _)) if version == Version::Current => {
            rows_v2(op, dev, x, Some(y), o, rows, cols, sqrt)?
        }
        (Data::Cuda(x, dev), Data::Cuda(y, _), DataMut::Cuda(o, _)) => {
            let (rows64, cols64, sqrt32) = (rows as i64, cols as i64, sqrt as i32);
            // Version 1's grid depends on the device (its SM count); its per-row order does not.
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

/// `out[r] = <a[r], b[r]>` for each row r of a batch.
pub fn row_dot_into(a: &impl AsView, b: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    row_reduce("row_dot", a, b, out, false, Version::Current)
}

/// [`row_dot_into`] with version 1 of the kernel on a GPU (the same on the CPU).
pub fn row_dot_into_v1(a: &impl AsView, b: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    row_reduce("row_dot", a, b, out, false, Version::V1)
}

/// The per-row dot products of `a` and `b` (same shape, rows along the first axis) as a new
/// `[rows]` tensor (see [`row_dot_into`]).
pub fn row_dot(a: &impl AsView, b: &impl AsView) -> Result<Tensor> {
    let v = a.as_view()?;
    let (rows, _) = rows_cols("row_dot", v.shape())?;
    let mut out = alloc_like(&v, &[rows])?;
    row_dot_into(&v, b, &mut out)?;
    Ok(out)
}

/// `out[r] = ||x[r]||_2` for each row r of a batch.
pub fn row_norm_into(x: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    row_reduce("row_norm", x, x, out, true, Version::Current)
}

/// [`row_norm_into`] with version 1 of the kernel on a GPU (the same on the CPU).
pub fn row_norm_into_v1(x: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    row_reduce("row_norm", x, x, out, true, Version::V1)
}

/// The L2 norm of each row of `x` (rows along the first axis) as a new `[rows]` tensor (see
/// [`row_norm_into`]).
pub fn row_norm(x: &impl AsView) -> Result<Tensor> {
    let v = x.as_view()?;
    let (rows, _) = rows_cols("row_norm", v.shape())?;
    let mut out = alloc_like(&v, &[rows])?;
    row_norm_into(&v, &mut out)?;
    Ok(out)
}
