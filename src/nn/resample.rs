//! Data movement: nearest x2 upsampling, channel concatenation, and axis permutations (4x4
//! pixel unshuffle/shuffle for the MRI U-Net, attention head split/merge). Each has an adjoint
//! for the backward. CUDA: kernels/resample.cu.

use crate::device::launch::grid_stride;
use crate::device::params;

use crate::error::{Error, Result};
use crate::ops::precision::{to_bf16, Bf16Ref, Operand, Precision};
use crate::ops::{mismatch, one_device};
use crate::tensor::{numel, AsViewMut, DType, Data, DataMut, Tensor, View, ViewMut};

/// The CPU bodies: the oracle for kernels/resample.cu.
pub mod cpu {
    use crate::real::Real;

    /// Nearest x2 upsampling of NHWC `[n, h, w, c]` into `[n, 2h, 2w, c]`.
    pub fn upsample2x<T: Real>(x: &[T], y: &mut [T], n: usize, h: usize, w: usize, c: usize) {
        for b in 0..n {
            for oy in 0..2 * h {
                for ox in 0..2 * w {
                    let src = ((b * h + oy / 2) * w + ox / 2) * c;
                    let dst = ((b * 2 * h + oy) * 2 * w + ox) * c;
                    y[dst..dst + c].copy_from_slice(&x[src..src + c]);
                }
            }
        }
    }

    /// The adjoint of [`upsample2x`]: each dx pixel is the sum of its 2x2 block of dy.
    pub fn upsample2x_backward<T: Real>(dy: &[T], dx: &mut [T], n: usize, h: usize, w: usize, c: usize) {
        for b in 0..n {
            for iy in 0..h {
                for ix in 0..w {
                    for ch in 0..c {
                        let at = |oy: usize, ox: usize| dy[((b * 2 * h + oy) * 2 * w + ox) * c + ch];
                        let (y0, x0) = (2 * iy, 2 * ix);
                        dx[((b * h + iy) * w + ix) * c + ch] =
                            (at(y0, x0) + at(y0, x0 + 1)) + (at(y0 + 1, x0) + at(y0 + 1, x0 + 1));
                    }
                }
            }
        }
    }

    /// Per row, a `[rows, ca]` then b `[rows, cb]` into y `[rows, ca + cb]`.
    pub fn concat<T: Real>(a: &[T], b: &[T], y: &mut [T], ca: usize, cb: usize) {
        for ((yr, ar), br) in y
            .chunks_exact_mut(ca + cb)
            .zip(a.chunks_exact(ca))
            .zip(b.chunks_exact(cb))
        {
            yr[..ca].copy_from_slice(ar);
            yr[ca..].copy_from_slice(br);
        }
    }

    /// The adjoint of [`concat()`]: dy `[rows, ca + cb]` split into da and db.
    pub fn split<T: Real>(dy: &[T], da: &mut [T], db: &mut [T], ca: usize, cb: usize) {
        for ((yr, ar), br) in dy
            .chunks_exact(ca + cb)
            .zip(da.chunks_exact_mut(ca))
            .zip(db.chunks_exact_mut(cb))
        {
            ar.copy_from_slice(&yr[..ca]);
            br.copy_from_slice(&yr[ca..]);
        }
    }

    /// A strided gather: output element i, at row-major multi-index `idx` over `out_dims`, is
    /// `x[sum_a idx[a] * in_strides[a]]`.
    pub fn permute<T: Copy>(x: &[T], y: &mut [T], out_dims: &[usize], in_strides: &[usize]) {
        for (i, o) in y.iter_mut().enumerate() {
            let (mut rest, mut src) = (i, 0);
            for a in (0..out_dims.len()).rev() {
                src += (rest % out_dims[a]) * in_strides[a];
                rest /= out_dims[a];
            }
            *o = x[src];
        }
    }
}

fn nhwc(op: &'static str, shape: &[usize]) -> Result<(usize, usize, usize, usize)> {
    match *shape {
        [n, h, w, c] => Ok((n, h, w, c)),
        _ => Err(Error::shape(op, "input", "[N, H, W, C]", shape)),
    }
}

/// Nearest-neighbour x2 upsampling: [N, H, W, C] -> [N, 2H, 2W, C].
pub fn upsample2x(x: &View) -> Result<Tensor> {
    let (n, h, w, c) = nhwc("upsample2x", x.shape())?;
    let mut y = Tensor::uninit(&[n, 2 * h, 2 * w, c], x.dtype(), &x.device())?;
    {
        let mut yv = y.as_view_mut()?;
        match (&x.data, &mut yv.data) {
            (Data::Cuda(xv, dev), DataMut::Cuda(o, _)) => {
                let d = [n as i64, h as i64, w as i64, c as i64];
                let cfg = grid_stride(dev, 4 * x.numel());
                // SAFETY: x is [n, h, w, c] and y [n, 2h, 2w, c].
                unsafe {
                    dev.kernels()
                        .rs_upsample2x_f32(cfg, xv, o, d[0], d[1], d[2], d[3])
                }?;
            }
            (Data::Cuda(..), _) => return Err(mismatch("upsample2x", &[x], &[])),
            _ => host_real!(x, T => {
                cpu::upsample2x::<T>(x.cpu()?, yv.cpu_mut()?, n, h, w, c);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(y)
}

/// The adjoint of `upsample2x`: [N, 2H, 2W, C] -> [N, H, W, C], summing 2x2 blocks.
pub fn upsample2x_backward(dy: &View) -> Result<Tensor> {
    let (n, h2, w2, c) = nhwc("upsample2x_backward", dy.shape())?;
    if h2 % 2 != 0 || w2 % 2 != 0 {
        return Err(Error::shape(
            "upsample2x_backward",
            "dy",
            "even H and W",
            dy.shape(),
        ));
    }
    let (h, w) = (h2 / 2, w2 / 2);
    let mut dx = Tensor::uninit(&[n, h, w, c], dy.dtype(), &dy.device())?;
    {
        let mut dv = dx.as_view_mut()?;
        match (&dy.data, &mut dv.data) {
            (Data::Cuda(gv, dev), DataMut::Cuda(o, _)) => {
                let d = [n as i64, h as i64, w as i64, c as i64];
                let cfg = grid_stride(dev, n * h * w * c);
                // SAFETY: dy is [n, 2h, 2w, c] and dx [n, h, w, c].
                unsafe {
                    dev.kernels()
                        .rs_upsample2x_backward_f32(cfg, gv, o, d[0], d[1], d[2], d[3])
                }?;
            }
            (Data::Cuda(..), _) => return Err(mismatch("upsample2x_backward", &[dy], &[])),
            _ => host_real!(dy, T => {
                cpu::upsample2x_backward::<T>(dy.cpu()?, dv.cpu_mut()?, n, h, w, c);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(dx)
}

fn split_last(op: &'static str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape.last() {
        Some(&c) if c > 0 => Ok((numel(shape) / c, c)),
        _ => Err(Error::shape(op, "input", "[.., C]", shape)),
    }
}

/// Concatenates along the last axis: [.., Ca] ++ [.., Cb] -> [.., Ca + Cb].
pub fn concat_channels(a: &View, b: &View) -> Result<Tensor> {
    one_device("concat_channels", &[a, b], &[])?;
    let (rows, ca) = split_last("concat_channels", a.shape())?;
    let (rows_b, cb) = split_last("concat_channels", b.shape())?;
    if rows_b != rows || a.shape()[..a.shape().len() - 1] != b.shape()[..b.shape().len() - 1] {
        return Err(Error::shape(
            "concat_channels",
            "b",
            format!("{:?} but the last axis", a.shape()),
            b.shape(),
        ));
    }
    let mut shape = a.shape().to_vec();
    *shape.last_mut().unwrap() = ca + cb;
    let mut y = Tensor::uninit(&shape, a.dtype(), &a.device())?;
    {
        let mut yv = y.as_view_mut()?;
        match (&a.data, &b.data, &mut yv.data) {
            (Data::Cuda(av, dev), Data::Cuda(bv, _), DataMut::Cuda(o, _)) => {
                let d = [rows as i64, ca as i64, cb as i64];
                let cfg = grid_stride(dev, rows * (ca + cb));
                // SAFETY: a is [rows, ca], b [rows, cb] and y [rows, ca + cb].
                unsafe { dev.kernels().rs_concat_f32(cfg, av, bv, o, d[0], d[1], d[2]) }?;
            }
            (Data::Cuda(..), ..) | (_, Data::Cuda(..), _) => {
                return Err(mismatch("concat_channels", &[a, b], &[]))
            }
            _ => host_real!(a, T => {
                cpu::concat::<T>(a.cpu()?, b.cpu()?, yv.cpu_mut()?, ca, cb);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(y)
}

/// The adjoint of `concat_channels`: splits [.., Ca + Cb] into [.., Ca] and [.., Cb].
pub fn split_channels(dy: &View, ca: usize) -> Result<(Tensor, Tensor)> {
    let (rows, c) = split_last("split_channels", dy.shape())?;
    if ca > c {
        return Err(Error::shape(
            "split_channels",
            "dy",
            format!("at least {ca} channels"),
            dy.shape(),
        ));
    }
    let cb = c - ca;
    let mut sa = dy.shape().to_vec();
    let mut sb = sa.clone();
    *sa.last_mut().unwrap() = ca;
    *sb.last_mut().unwrap() = cb;
    let mut da = Tensor::uninit(&sa, dy.dtype(), &dy.device())?;
    let mut db = Tensor::uninit(&sb, dy.dtype(), &dy.device())?;
    {
        let (mut av, mut bv) = (da.as_view_mut()?, db.as_view_mut()?);
        match (&dy.data, &mut av.data, &mut bv.data) {
            (Data::Cuda(gv, dev), DataMut::Cuda(oa, _), DataMut::Cuda(ob, _)) => {
                let d = [rows as i64, ca as i64, cb as i64];
                let cfg = grid_stride(dev, rows * c);
                // SAFETY: dy is [rows, ca + cb], da [rows, ca] and db [rows, cb].
                unsafe { dev.kernels().rs_split_f32(cfg, gv, oa, ob, d[0], d[1], d[2]) }?;
            }
            (Data::Cuda(..), ..) => return Err(mismatch("split_channels", &[dy], &[])),
            _ => host_real!(dy, T => {
                cpu::split::<T>(dy.cpu()?, av.cpu_mut()?, bv.cpu_mut()?, ca, cb);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok((da, db))
}

/// out[j, i] = x[offset + j * stride + i]: `rows` equally spaced runs of `cols` values copied
/// into the [rows, cols] view `out`. The permute kernel's index map is any strided one, so this
/// is that kernel with strides of our choosing.
pub fn gather_rows_into(x: &View, offset: usize, stride: usize, out: &mut ViewMut) -> Result<()> {
    one_device("gather_rows", &[x], &[&*out])?;
    let (rows, cols) = match *out.shape() {
        [r, c] if r > 0 && c > 0 => (r, c),
        _ => return Err(Error::shape("gather_rows", "out", "[rows, cols]", out.shape())),
    };
    if rows > 1 && stride < cols {
        return Err(Error::Other(format!(
            "gather_rows: runs of {cols} values {stride} apart overlap"
        )));
    }
    let span = (rows - 1) * stride + cols;
    let src = x.sub(offset, &[span])?;
    let (dims, strides) = ([rows, cols], [stride, 1]);
    match (&src.data, &mut out.data) {
        (Data::Cuda(xv, dev), DataMut::Cuda(o, _)) => {
            let mut p = params::PermuteParams {
                rank: 2,
                out_dims: [1; 6],
                in_strides: [0; 6],
            };
            for a in 0..2 {
                p.out_dims[a] = dims[a] as i64;
                p.in_strides[a] = strides[a] as i64;
            }
            let cfg = grid_stride(dev, rows * cols);
            // SAFETY: src holds span values, the largest index the map reads plus one; out holds
            // rows * cols.
            unsafe { dev.kernels().rs_permute_f32(cfg, xv, o, (rows * cols) as i64, p) }?;
        }
        (Data::Cuda(..), _) => return Err(mismatch("gather_rows", &[x], &[])),
        _ => host_real!(src, T => {
            cpu::permute::<T>(src.cpu()?, out.cpu_mut()?, &dims, &strides);
            Ok::<(), Error>(())
        })?,
    }
    Ok(())
}

/// The permutation's plan: y's dims, and for each of y's axes the stride of x's axis it reads
/// (a checked permutation of at most 6 axes).
fn permute_plan(shape: &[usize], perm: &[usize]) -> Result<(Vec<usize>, Vec<usize>)> {
    let rank = shape.len();
    let mut seen = [false; 6];
    if rank > 6
        || perm.len() != rank
        || perm
            .iter()
            .any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
    {
        return Err(Error::shape(
            "permute",
            format!("permutation {perm:?}"),
            "a permutation of the axes",
            shape,
        ));
    }
    let mut strides = vec![1usize; rank];
    for a in (0..rank.saturating_sub(1)).rev() {
        strides[a] = strides[a + 1] * shape[a + 1];
    }
    let out_dims: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let in_strides: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
    Ok((out_dims, in_strides))
}

/// The kernels' form of a plan.
fn permute_params(out_dims: &[usize], in_strides: &[usize]) -> params::PermuteParams {
    let mut p = params::PermuteParams {
        rank: out_dims.len() as i32,
        out_dims: [1; 6],
        in_strides: [0; 6],
    };
    for a in 0..out_dims.len() {
        p.out_dims[a] = out_dims[a] as i64;
        p.in_strides[a] = in_strides[a] as i64;
    }
    p
}

/// [`permute`] as a kept activation (`ops::precision::keep`): under bf16 the output is bf16,
/// written so by the permute itself from f32 values (one rounding, no f32 permuted copy) or
/// copied from bf16 ones (exact); under f32 the f32 permute (a bf16 input is widened).
pub fn permute_kept(x: &Operand, perm: &[usize], precision: Precision) -> Result<Tensor> {
    if precision == Precision::F32 {
        return permute(&x.widen()?.view()?, perm);
    }
    let device = x.device();
    if let (Operand::F32(v), crate::Device::Cpu) = (x, &device) {
        return to_bf16(&permute(v, perm)?);
    }
    let (out_dims, in_strides) = permute_plan(x.shape(), perm)?;
    let mut y = Tensor::uninit(&out_dims, DType::BF16, &device)?;
    let n = numel(&out_dims);
    match (x, &device) {
        (Operand::F32(_), crate::Device::Cpu) => unreachable!("returned above"),
        (Operand::Bf16(b), crate::Device::Cpu) => {
            crate::device::note_op();
            cpu::permute(b.cpu()?, y.cpu_bf16_mut()?, &out_dims, &in_strides);
        }
        (Operand::F32(v), crate::Device::Cuda(dev)) => {
            let Data::Cuda(xv, _) = &v.data else {
                return Err(mismatch("permute_kept", &[v], &[]));
            };
            crate::device::note_op();
            let (p, cfg, mut o) = (
                permute_params(&out_dims, &in_strides),
                grid_stride(dev, n),
                y.cuda_bf16_mut()?,
            );
            // SAFETY: x and y hold n values; p describes x's shape (rank <= 6).
            unsafe { dev.kernels().rs_permute_f32_bf16y(cfg, xv, &mut o, n as i64, p) }?;
        }
        (Operand::Bf16(b), crate::Device::Cuda(dev)) => {
            crate::device::note_op();
            let (p, cfg) = (permute_params(&out_dims, &in_strides), grid_stride(dev, n));
            let (xv, mut o) = (b.cuda()?, y.cuda_bf16_mut()?);
            // SAFETY: as above.
            unsafe { dev.kernels().rs_permute_bf16(cfg, &xv, &mut o, n as i64, p) }?;
        }
    }
    Ok(y)
}

/// y = x with its axes reordered: y's axis i is x's axis `perm[i]` (rank <= 6).
pub fn permute(x: &View, perm: &[usize]) -> Result<Tensor> {
    let (out_dims, in_strides) = permute_plan(x.shape(), perm)?;
    let mut y = Tensor::uninit(&out_dims, x.dtype(), &x.device())?;
    {
        let mut yv = y.as_view_mut()?;
        match (&x.data, &mut yv.data) {
            (Data::Cuda(xv, dev), DataMut::Cuda(o, _)) => {
                let p = permute_params(&out_dims, &in_strides);
                let cfg = grid_stride(dev, x.numel());
                // SAFETY: x and y hold x.numel() values; p describes x's shape (rank <= 6).
                unsafe { dev.kernels().rs_permute_f32(cfg, xv, o, x.numel() as i64, p) }?;
            }
            (Data::Cuda(..), _) => return Err(mismatch("permute", &[x], &[])),
            _ => host_real!(x, T => {
                cpu::permute::<T>(x.cpu()?, yv.cpu_mut()?, &out_dims, &in_strides);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(y)
}

/// The inverse permutation of `perm`.
pub fn inverse_permutation(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

/// 4x4 (or any f) pixel unshuffle, einops `(H h) (W w) C -> H W (h w C)`:
/// [N, H f, W f, C] -> [N, H, W, f f C].
pub fn pixel_unshuffle(x: &View, f: usize) -> Result<Tensor> {
    let (n, hf, wf, c) = nhwc("pixel_unshuffle", x.shape())?;
    if hf % f != 0 || wf % f != 0 {
        return Err(Error::shape(
            "pixel_unshuffle",
            "input",
            format!("H and W divisible by {f}"),
            x.shape(),
        ));
    }
    let (h, w) = (hf / f, wf / f);
    let x6 = x.reshape(&[n, h, f, w, f, c])?;
    permute(&x6, &[0, 1, 3, 2, 4, 5])?.reshape(&[n, h, w, f * f * c])
}

/// The inverse of `pixel_unshuffle` (and its adjoint: a permutation is orthogonal).
pub fn pixel_shuffle(x: &View, f: usize) -> Result<Tensor> {
    let (n, h, w, ffc) = nhwc("pixel_shuffle", x.shape())?;
    if ffc % (f * f) != 0 {
        return Err(Error::shape(
            "pixel_shuffle",
            "input",
            format!("channels divisible by {}", f * f),
            x.shape(),
        ));
    }
    let c = ffc / (f * f);
    let x6 = x.reshape(&[n, h, w, f, f, c])?;
    permute(&x6, &[0, 1, 3, 2, 4, 5])?.reshape(&[n, h * f, w * f, c])
}

/// The merge convolution's input from kept bf16 values, in one pass: the nearest x2 upsampling
/// of `below` `[N, H/2, W/2, Cu]` concatenated with `skip` `[N, H, W, Cs]` on the channel axis,
/// `[N, H, W, Cu + Cs]` in bf16. Copies only, so the same values as [`upsample2x`] then
/// [`concat_channels`] on the widened tensors, rounded back.
pub fn upsample_concat_bf16(below: &Bf16Ref, skip: &Bf16Ref) -> Result<Tensor> {
    let op = "upsample_concat_bf16";
    let (n, h2, w2, cu) = nhwc(op, below.shape())?;
    let (ns, h, w, cs) = nhwc(op, skip.shape())?;
    if ns != n || h != 2 * h2 || w != 2 * w2 {
        return Err(Error::shape(
            op,
            "skip",
            format!("[{n}, {}, {}, C]", 2 * h2, 2 * w2),
            skip.shape(),
        ));
    }
    let device = below.tensor.device();
    if !skip.tensor.device().same_as(&device) {
        return Err(Error::DeviceMismatch {
            op,
            detail: format!("below is on {device}, skip on {}", skip.tensor.device()),
        });
    }
    let mut cat = Tensor::uninit(&[n, h, w, cu + cs], DType::BF16, &device)?;
    match &device {
        crate::Device::Cuda(dev) => {
            crate::device::note_op();
            let (bv, sv, mut o) = (below.cuda()?, skip.cuda()?, cat.cuda_bf16_mut()?);
            let cfg = grid_stride(dev, n * h * w * (cu + cs));
            let d = [n, h, w, cu, cs].map(|v| v as i64);
            // SAFETY: below is [n, h/2, w/2, cu], skip [n, h, w, cs] and cat [n, h, w, cu + cs]
            // (checked above).
            unsafe {
                dev.kernels()
                    .rs_upsample_concat_bf16(cfg, &bv, &sv, &mut o, d[0], d[1], d[2], d[3], d[4])
            }?;
        }
        crate::Device::Cpu => {
            crate::device::note_op();
            let (bv, sv) = (below.cpu()?, skip.cpu()?);
            let out = cat.cpu_bf16_mut()?;
            for (pix, row) in out.chunks_exact_mut(cu + cs).enumerate() {
                let (x, y, b) = (pix % w, (pix / w) % h, pix / (h * w));
                let src = ((b * h2 + y / 2) * w2 + x / 2) * cu;
                row[..cu].copy_from_slice(&bv[src..src + cu]);
                row[cu..].copy_from_slice(&sv[pix * cs..(pix + 1) * cs]);
            }
        }
    }
    Ok(cat)
}
