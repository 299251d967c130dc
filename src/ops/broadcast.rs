//! Row-broadcast maps and column reductions over `[rows, cols]` data (rows = every leading axis,
//! cols = the last): bias add and its gradient, per-group sums (per-sample reductions over
//! pixels), and per-sample scaling. CUDA: kernels/broadcast.cu.

use cudarc::driver::{CudaView, CudaViewMut};

use super::{expect_shape, mismatch, one_device};
use crate::device::launch::{blocks, grid_stride, THREADS};
use crate::device::CudaDevice;
use crate::error::{Error, Result};
use crate::real::Real;
use crate::tensor::{AsView, AsViewMut, Data, DataMut, View, ViewMut};

/// The CPU bodies: the oracle for kernels/broadcast.cu.
pub mod cpu {
    use crate::real::Real;

    /// `y[r, c] += b[c]` for every row of `y` (rows of `b.len()`), rows split over the cores.
    pub fn add_bias<T: Real>(y: &mut [T], b: &[T]) {
        crate::ops::parallel::for_rows(y, b.len(), |_, y| {
            for row in y.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(b).for_each(|(v, &bi)| *v += bi);
            }
        });
    }

    /// out[g, c] (+)= sum of the rows of group g, in f64, each column summed top to bottom.
    /// The rows are walked in memory order into a row of f64 accumulators (a column walk
    /// strides through memory and missed the cache on every element); each column's sum keeps
    /// its order, so the bits are those of the column walk.
    pub fn sum_rows<T: Real>(x: &[T], out: &mut [T], groups: usize, cols: usize, accumulate: bool) {
        let per = x.len() / groups.max(1) / cols.max(1);
        crate::ops::parallel::for_rows(out, cols.max(1), |gs, out| {
            let mut acc = vec![0.0f64; cols];
            for (g, o) in gs.zip(out.chunks_exact_mut(cols.max(1))) {
                acc.iter_mut().for_each(|a| *a = 0.0);
                for row in x[g * per * cols..(g + 1) * per * cols].chunks_exact(cols) {
                    acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v.to_f64());
                }
                for (o, &s) in o.iter_mut().zip(&acc) {
                    *o = if accumulate {
                        *o + T::from_f64(s)
                    } else {
                        T::from_f64(s)
                    };
                }
            }
        });
    }

    /// `y[r, c] = x[r, c] * v[c]` for every row (rows of `v.len()`).
    pub fn scale_cols<T: Real>(x: &[T], v: &[T], y: &mut [T]) {
        for (yr, xr) in y.chunks_exact_mut(v.len()).zip(x.chunks_exact(v.len())) {
            for ((o, &a), &d) in yr.iter_mut().zip(xr).zip(v) {
                *o = a * d;
            }
        }
    }

    /// `y[s, i] = alpha[s] a[s, i]`, plus `beta[s] b[s, i]` when `b` is `Some((b, beta))`, for
    /// `alpha.len()` samples of `a.len() / alpha.len()` elements each.
    pub fn scale_rows<T: Real>(a: &[T], alpha: &[T], b: Option<(&[T], &[T])>, y: &mut [T]) {
        let len = a.len() / alpha.len().max(1);
        for (i, o) in y.iter_mut().enumerate() {
            let s = i / len;
            let mut v = alpha[s] * a[i];
            if let Some((b, beta)) = b {
                v += beta[s] * b[i];
            }
            *o = v;
        }
    }
}

fn cols_of(op: &'static str, shape: &[usize]) -> Result<usize> {
    shape
        .last()
        .copied()
        .filter(|&c| c > 0)
        .ok_or_else(|| Error::shape(op, "input", "[.., channels]", shape))
}

/// `y[.., c] += b[c]` in place.
pub fn add_bias(y: &mut impl AsViewMut, b: &impl AsView) -> Result<()> {
    let (mut y, b) = (y.as_view_mut()?, b.as_view()?);
    one_device("add_bias", &[&b], &[&y])?;
    let cols = cols_of("add_bias", y.shape())?;
    expect_shape("add_bias", "bias", b.shape(), &[cols])?;
    let rows = y.numel() / cols;
    match (&mut y.data, &b.data) {
        (DataMut::F32(yv), Data::F32(bv)) => cpu::add_bias(yv, bv),
        (DataMut::F64(yv), Data::F64(bv)) => cpu::add_bias(yv, bv),
        (DataMut::Cuda(yv, dev), Data::Cuda(bv, _)) => {
            let cfg = grid_stride(dev, rows * cols);
            // SAFETY: y holds rows * cols values and b cols (shapes checked above).
            unsafe {
                dev.kernels()
                    .bc_add_bias_f32(cfg, yv, bv, rows as i64, cols as i64)
            }?;
        }
        _ => return Err(mismatch("add_bias", &[&b], &[&y])),
    }
    Ok(())
}

/// out[g, c] (+= when `accumulate`) the sum over the rows of group g of x viewed as
/// `[groups, rows_per_group, cols]`. `groups = 1` gives a bias gradient.
///
/// On a GPU, version 2 of kernels/broadcast.cu: two stages over chunks of rows, cut from the
/// shape alone (see [`col_sum_plan`]), so the result is identical run to run and on every GPU.
pub fn sum_rows_into(
    x: &impl AsView,
    groups: usize,
    out: &mut impl AsViewMut,
    accumulate: bool,
) -> Result<()> {
    sum_rows_version(x, groups, out, accumulate, false)
}

/// [`sum_rows_into`] with version 1 of the GPU kernel (one thread per column, summing every
/// row), kept for the parity trials and `emprior bench`; the same on the CPU.
pub fn sum_rows_into_v1(
    x: &impl AsView,
    groups: usize,
    out: &mut impl AsViewMut,
    accumulate: bool,
) -> Result<()> {
    sum_rows_version(x, groups, out, accumulate, true)
}

fn sum_rows_version(
    x: &impl AsView,
    groups: usize,
    out: &mut impl AsViewMut,
    accumulate: bool,
    v1: bool,
) -> Result<()> {
    let (x, mut out) = (x.as_view()?, out.as_view_mut()?);
    one_device("sum_rows", &[&x], &[&out])?;
    let cols = cols_of("sum_rows", x.shape())?;
    if groups == 0 || x.numel() % (groups * cols) != 0 {
        return Err(Error::shape(
            "sum_rows",
            "input",
            format!("{groups} groups of rows"),
            x.shape(),
        ));
    }
    if out.numel() != groups * cols {
        return Err(Error::shape("sum_rows", "out", [groups, cols], out.shape()));
    }
    let per = x.numel() / (groups * cols);
    match (&x.data, &mut out.data) {
        (Data::F32(xv), DataMut::F32(o)) => cpu::sum_rows(xv, o, groups, cols, accumulate),
        (Data::F64(xv), DataMut::F64(o)) => cpu::sum_rows(xv, o, groups, cols, accumulate),
        (Data::Cuda(xv, dev), DataMut::Cuda(o, _)) if v1 => {
            if groups > 65_535 {
                // Version 1 puts the groups on grid.y.
                return Err(Error::shape(
                    "sum_rows",
                    "groups",
                    "at most 65,535 on the GPU",
                    groups,
                ));
            }
            let (g, p, c, acc) = (groups as i64, per as i64, cols as i64, accumulate as i32);
            let cfg = blocks(((cols as u32).div_ceil(THREADS), groups as u32, 1), THREADS);
            // SAFETY: x holds groups * per * cols values and out groups * cols (checked above).
            unsafe { dev.kernels().bc_sum_rows_f32(cfg, xv, o, g, p, c, acc) }?;
        }
        (Data::Cuda(xv, dev), DataMut::Cuda(o, _)) => col_sum(dev, xv, o, groups, per, cols, accumulate)?,
        _ => return Err(mismatch("sum_rows", &[&x], &[&out])),
    }
    Ok(())
}

/// Rows per chunk in the first stage of the column sums, and at most this many chunks per group
/// (longer groups get longer chunks): bounds the partials and the finishing stage's work.
const COL_CHUNK_ROWS: usize = 256;
const COL_MAX_CHUNKS: usize = 512;
/// Must equal COL_TILE in kernels/broadcast.cu.
const COL_TILE: usize = 32;

/// How version 2 cuts `rows_per_group` rows: (rows per chunk, chunks), from the shape alone.
pub fn col_sum_plan(rows_per_group: usize) -> (usize, usize) {
    let chunk_rows = COL_CHUNK_ROWS.max(rows_per_group.div_ceil(COL_MAX_CHUNKS));
    (chunk_rows, rows_per_group.div_ceil(chunk_rows).max(1))
}

/// Version 2 of the column sums on the GPU: f64 partials per (group, chunk, column), then one
/// pass adding each column's chunks in order; a single chunk is written out directly.
#[allow(clippy::too_many_arguments)]
fn col_sum(
    dev: &CudaDevice,
    x: &CudaView<f32>,
    out: &mut CudaViewMut<f32>,
    groups: usize,
    per: usize,
    cols: usize,
    accumulate: bool,
) -> Result<()> {
    let (chunk_rows, chunks) = col_sum_plan(per);
    let tiles = cols.div_ceil(COL_TILE);
    let grid = |n: usize| {
        u32::try_from(n)
            .ok()
            .filter(|&b| b <= i32::MAX as u32)
            .ok_or_else(|| Error::shape("sum_rows", "input", "at most 2^31 - 1 blocks of work", n))
    };
    let stage1 = blocks((grid(groups * chunks * tiles)?, 1, 1), THREADS);
    let (g, p, c, acc) = (groups as i64, per as i64, cols as i64, accumulate as i32);
    let (cr, ch) = (chunk_rows as i64, chunks as i64);
    let k = dev.kernels();
    if chunks == 1 {
        // SAFETY: x holds groups * per * cols values and out groups * cols; one chunk per group
        // goes straight to out.
        return unsafe { k.bc_col_sum_partial_f32(stage1, x, g, p, c, cr, ch, None, Some(out), acc) };
    }
    let len = groups * chunks * cols;
    let mut partials = dev.alloc(len * 8)?;
    // SAFETY: the buffer holds groups * chunks * cols f64 values.
    let mut pv = unsafe { partials.slice_mut().transmute_mut::<f64>(len) }.expect("sized above");
    let stage2 = blocks((grid(groups * tiles)?, 1, 1), THREADS);
    // SAFETY: as above; the partials are written in full before the finishing kernel reads them.
    unsafe {
        k.bc_col_sum_partial_f32(stage1, x, g, p, c, cr, ch, Some(&mut pv), None, acc)?;
        k.bc_col_sum_finish_f32(stage2, &pv.slice(..), g, ch, c, out, acc)
    }
}

/// `y[.., c] = x[.., c] * v[c]`: a diagonal matrix applied to every row.
pub fn scale_cols_into(x: &impl AsView, v: &impl AsView, y: &mut impl AsViewMut) -> Result<()> {
    let (x, v, mut y) = (x.as_view()?, v.as_view()?, y.as_view_mut()?);
    one_device("scale_cols", &[&x, &v], &[&y])?;
    let cols = cols_of("scale_cols", x.shape())?;
    expect_shape("scale_cols", "diagonal", v.shape(), &[cols])?;
    expect_shape("scale_cols", "out", y.shape(), x.shape())?;
    let rows = x.numel() / cols;
    match (&x.data, &v.data, &mut y.data) {
        (Data::F32(xv), Data::F32(vv), DataMut::F32(o)) => cpu::scale_cols(xv, vv, o),
        (Data::F64(xv), Data::F64(vv), DataMut::F64(o)) => cpu::scale_cols(xv, vv, o),
        (Data::Cuda(xv, dev), Data::Cuda(vv, _), DataMut::Cuda(o, _)) => {
            let cfg = grid_stride(dev, rows * cols);
            // SAFETY: x and y hold rows * cols values and v cols (shapes checked above).
            unsafe {
                dev.kernels()
                    .bc_scale_cols_f32(cfg, xv, vv, o, rows as i64, cols as i64)
            }?;
        }
        _ => return Err(mismatch("scale_cols", &[&x, &v], &[&y])),
    }
    Ok(())
}

/// `y[s, ..] = alpha[s] a[s, ..]`: per-sample scalars over a batch.
pub fn scale_rows_into(a: &impl AsView, alpha: &impl AsView, y: &mut impl AsViewMut) -> Result<()> {
    scale_rows(a.as_view()?, alpha.as_view()?, None, y.as_view_mut()?)
}

/// `y[s, ..] = alpha[s] a[s, ..] + beta[s] b[s, ..]` (EDM's c_skip x_t + c_out F).
pub fn scale_rows_add_into(
    a: &impl AsView,
    alpha: &impl AsView,
    b: &impl AsView,
    beta: &impl AsView,
    y: &mut impl AsViewMut,
) -> Result<()> {
    scale_rows(
        a.as_view()?,
        alpha.as_view()?,
        Some((b.as_view()?, beta.as_view()?)),
        y.as_view_mut()?,
    )
}

fn scale_rows(a: View, alpha: View, b: Option<(View, View)>, mut y: ViewMut) -> Result<()> {
    match &b {
        Some((b, beta)) => one_device("scale_rows", &[&a, &alpha, b, beta], &[&y])?,
        None => one_device("scale_rows", &[&a, &alpha], &[&y])?,
    }
    let samples = a.shape().first().copied().unwrap_or(0);
    expect_shape("scale_rows", "alpha", alpha.shape(), &[samples])?;
    expect_shape("scale_rows", "out", y.shape(), a.shape())?;
    if let Some((b, beta)) = &b {
        expect_shape("scale_rows", "b", b.shape(), a.shape())?;
        expect_shape("scale_rows", "beta", beta.shape(), &[samples])?;
    }
    fn host<T: Real>(a: &View, alpha: &View, b: &Option<(View, View)>, y: &mut ViewMut) -> Result<()> {
        let bb = match b {
            Some((b, beta)) => Some((b.cpu::<T>()?, beta.cpu::<T>()?)),
            None => None,
        };
        cpu::scale_rows(a.cpu::<T>()?, alpha.cpu::<T>()?, bb, y.cpu_mut::<T>()?);
        Ok(())
    }
    match (&a.data, &alpha.data) {
        (Data::F32(_), Data::F32(_)) => host::<f32>(&a, &alpha, &b, &mut y),
        (Data::F64(_), Data::F64(_)) => host::<f64>(&a, &alpha, &b, &mut y),
        (Data::Cuda(av, dev), Data::Cuda(alv, _)) => {
            let bviews = match &b {
                Some((bv, betav)) => match (&bv.data, &betav.data) {
                    (Data::Cuda(x, _), Data::Cuda(z, _)) => Some((x.slice(..), z.slice(..))),
                    _ => return Err(mismatch("scale_rows", &[&a, bv, betav], &[])),
                },
                None => None,
            };
            let DataMut::Cuda(yv, _) = &mut y.data else {
                return Err(mismatch("scale_rows", &[&a, &alpha], &[]));
            };
            let (s, len) = (samples as i64, (a.numel() / samples.max(1)) as i64);
            // Without b the kernel gets null pointers and skips the second term.
            let (bv, betav) = match &bviews {
                Some((x, z)) => (Some(x), Some(z)),
                None => (None, None),
            };
            // SAFETY: a, b and y hold samples * len values, alpha and beta samples (checked above).
            unsafe {
                dev.kernels()
                    .bc_scale_rows_f32(grid_stride(dev, a.numel()), av, alv, bv, betav, yv, s, len)
            }
        }
        _ => Err(mismatch("scale_rows", &[&a, &alpha], &[&y])),
    }
}
