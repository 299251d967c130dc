//! Batched GEMM with transposes, row-major:
//! `C[b] = alpha * op(A[b]) * op(B[b]) + beta * C[b]`.
//! A rank-2 operand is shared by every batch entry (batch stride 0), which is how a layer's
//! weight meets a batch of activations. `beta == 0` never reads C.
//! CPU: `matrixmultiply` (blocked, SIMD; transposes are strides). CUDA: kernels/gemm.cu.

use super::precision::{Bf16Ref, Operand, Precision};
use super::{alloc_like, expect_shape, mismatch, one_device};
use crate::device::launch;
use crate::error::{Error, Result};
use crate::tensor::{AsView, AsViewMut, Data, DataMut, Tensor, View, ViewMut};

/// What to compute besides the product: transposes and the alpha/beta scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmSpec {
    /// Use `A` transposed: `A` is stored `[k, m]` (per batch entry) instead of `[m, k]`.
    pub trans_a: bool,
    /// Use `B` transposed: `B` is stored `[n, k]` instead of `[k, n]`.
    pub trans_b: bool,
    /// Scale of the product (1 by default).
    pub alpha: f32,
    /// Scale of the existing `C` (0 by default); 0 never reads `C`, which may be uninitialised.
    pub beta: f32,
}

impl Default for GemmSpec {
    fn default() -> Self {
        GemmSpec {
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
        }
    }
}

impl GemmSpec {
    /// C = op(A) op(B) with the given transposes.
    pub fn new(trans_a: bool, trans_b: bool) -> Self {
        GemmSpec {
            trans_a,
            trans_b,
            ..Default::default()
        }
    }
}

/// A resolved problem: the `#[repr(C)]` mirror of `GemmParams` in kernels/gemm.cu, generated
/// from it by the build (layout asserted on both sides).
pub use crate::device::params::GemmParams;

/// Works out M, N, K, leading dimensions, batch strides and the output shape.
pub fn resolve(a: &[usize], b: &[usize], spec: &GemmSpec) -> Result<(GemmParams, Vec<usize>)> {
    let split = |what: &str, s: &[usize]| -> Result<(usize, usize, usize, bool)> {
        match *s {
            [r, c] => Ok((1, r, c, false)),
            [bt, r, c] => Ok((bt, r, c, true)),
            _ => Err(Error::shape(
                "gemm",
                what,
                "[rows, cols] or [batch, rows, cols]",
                s,
            )),
        }
    };
    let (ba, ra, ca, batched_a) = split("A", a)?;
    let (bb, rb, cb, batched_b) = split("B", b)?;
    let (m, k) = if spec.trans_a { (ca, ra) } else { (ra, ca) };
    let (kb, n) = if spec.trans_b { (cb, rb) } else { (rb, cb) };
    if kb != k {
        return Err(Error::shape(
            "gemm",
            format!("B (trans_b = {})", spec.trans_b),
            format!("inner dimension {k} to match op(A) = {m}x{k}"),
            b,
        ));
    }
    if batched_a && batched_b && ba != bb {
        return Err(Error::shape("gemm", "B", format!("batch {ba} like A"), b));
    }
    let batch = ba.max(bb);
    let out_shape = if batched_a || batched_b {
        vec![batch, m, n]
    } else {
        vec![m, n]
    };
    let fits = |v: usize| i32::try_from(v).is_ok();
    if ![m, n, k, batch, ca, cb].into_iter().all(fits) {
        return Err(Error::shape(
            "gemm",
            "operands",
            "every dimension below 2^31",
            (a, b),
        ));
    }
    let params = GemmParams {
        m: m as i32,
        n: n as i32,
        k: k as i32,
        lda: ca as i32,
        ldb: cb as i32,
        ldc: n as i32,
        stride_a: if batched_a { (ra * ca) as i64 } else { 0 },
        stride_b: if batched_b { (rb * cb) as i64 } else { 0 },
        stride_c: (m * n) as i64,
        batch: batch as i32,
        alpha: spec.alpha,
        beta: spec.beta,
    };
    Ok((params, out_shape))
}

/// The CPU body: the oracle for kernels/gemm.cu.
pub mod cpu {
    use super::GemmParams;
    use crate::real::Real;

    /// At most this many multiply-adds per row of C, a batched GEMM (an operand per entry) runs
    /// as plain loops over the batch on both cores: matrixmultiply's packing and dispatch cost
    /// more than a 2 x 5 product (the manifold's per-observation operators, 16,384 of them per
    /// call) or a 16-token attention head.
    pub const SMALL_ROW_MACS: usize = 256;

    /// `C = alpha op(A) op(B) + beta C` for every batch entry of `p` (from `resolve`) on the
    /// host; small per-entry products run as plain loops, one large product in row blocks.
    pub fn gemm<T: Real>(p: &GemmParams, trans_a: bool, trans_b: bool, a: &[T], b: &[T], c: &mut [T]) {
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        let (lda, ldb, ldc) = (p.lda as isize, p.ldb as isize, p.ldc as isize);
        let (rsa, csa) = if trans_a { (1, lda) } else { (lda, 1) };
        let (rsb, csb) = if trans_b { (1, ldb) } else { (ldb, 1) };
        // Decided by whether an operand is per entry and by the size of one row of C (n, k),
        // never by m or the batch count, which may be the rows of a batch: a batch cut into row
        // parts (ops::parallel::map_parts) must take the same path in every part.
        let per_entry = p.stride_a != 0 || p.stride_b != 0;
        if per_entry && n * k <= SMALL_ROW_MACS {
            return small_batched(p, (rsa, csa), (rsb, csb), a, b, c);
        }
        if p.batch == 1 && m >= SPLIT_ROWS && m * n * k >= SPLIT_MACS && !crate::ops::parallel::inline() {
            return split_rows(p, (rsa, csa), (rsb, csb), a, b, c);
        }
        // Batch entries in parallel (each one single-threaded product).
        let per = p.stride_c as usize;
        crate::ops::parallel::for_rows(&mut c[..p.batch as usize * per], per, |entries, cs| {
            for (bz, cc) in entries.zip(cs.chunks_exact_mut(per)) {
                let a_off = bz * p.stride_a as usize;
                let b_off = bz * p.stride_b as usize;
                // SAFETY: resolve() derived every stride from the operand shapes, so all indexed
                // elements lie inside the slices; C entries do not alias (ldc = n, stride m * n).
                unsafe {
                    T::gemm(
                        m,
                        k,
                        n,
                        T::from_f32(p.alpha),
                        a.as_ptr().add(a_off),
                        rsa,
                        csa,
                        b.as_ptr().add(b_off),
                        rsb,
                        csb,
                        T::from_f32(p.beta),
                        cc.as_mut_ptr(),
                        ldc,
                        1,
                    );
                }
            }
        });
    }

    /// A single product this large is cut into `SPLIT_PARTS` row blocks of C, run on rayon's pool
    /// (matrixmultiply itself runs single-threaded: with its own thread pool beside rayon's, the
    /// two spun against each other on 2 cores, 17% of an E-step in sched_yield). Each C entry is
    /// still one matrixmultiply dot product over the whole of K, so the split does not depend on
    /// the number of threads.
    pub const SPLIT_ROWS: usize = 64;
    /// With [`SPLIT_ROWS`] rows or more, the multiply-adds (`m * n * k`) from which a single
    /// product is cut into row blocks.
    pub const SPLIT_MACS: usize = 1 << 20;
    const SPLIT_PARTS: usize = 4;

    fn split_rows<T: Real>(
        p: &GemmParams,
        (rsa, csa): (isize, isize),
        (rsb, csb): (isize, isize),
        a: &[T],
        b: &[T],
        c: &mut [T],
    ) {
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        let rows = m.div_ceil(SPLIT_PARTS).next_multiple_of(8);
        let (alpha, beta) = (T::from_f32(p.alpha), T::from_f32(p.beta));
        use rayon::prelude::*;
        c[..m * n]
            .par_chunks_mut(rows * n)
            .enumerate()
            .for_each(|(i, cc)| {
                let r = cc.len() / n;
                // SAFETY: rows i*rows .. i*rows + r of op(A) and of C (ldc = n) lie inside the
                // operands, whose strides resolve() derived from their shapes.
                unsafe {
                    T::gemm(
                        r,
                        k,
                        n,
                        alpha,
                        a.as_ptr().offset(i as isize * rows as isize * rsa),
                        rsa,
                        csa,
                        b.as_ptr(),
                        rsb,
                        csb,
                        beta,
                        cc.as_mut_ptr(),
                        n as isize,
                        1,
                    );
                }
            });
    }

    /// Many small products: each C entry is a dot product over k in order, batches split over
    /// the cores in fixed chunks (the same bits on any number of threads).
    fn small_batched<T: Real>(
        p: &GemmParams,
        (rsa, csa): (isize, isize),
        (rsb, csb): (isize, isize),
        a: &[T],
        b: &[T],
        c: &mut [T],
    ) {
        let (m, n, k) = (p.m as usize, p.n as usize, p.k as usize);
        let (rsa, csa, rsb, csb) = (rsa as usize, csa as usize, rsb as usize, csb as usize);
        let (alpha, beta) = (T::from_f32(p.alpha), T::from_f32(p.beta));
        let per = p.stride_c as usize;
        crate::ops::parallel::for_rows(&mut c[..p.batch as usize * per], per, |batches, cs| {
            for (bz, cb) in batches.zip(cs.chunks_exact_mut(per)) {
                let ab = &a[bz * p.stride_a as usize..];
                let bb = &b[bz * p.stride_b as usize..];
                for i in 0..m {
                    for j in 0..n {
                        let mut s = T::ZERO;
                        for l in 0..k {
                            s += ab[i * rsa + l * csa] * bb[l * rsb + j * csb];
                        }
                        let o = &mut cb[i * n + j];
                        // beta = 0 never reads C (it may be uninitialised).
                        *o = if p.beta == 0.0 {
                            alpha * s
                        } else {
                            alpha * s + beta * *o
                        };
                    }
                }
            }
        });
    }
}

/// Threads per block and output tile of kernels/gemm.cu.
const GEMM_THREADS: u32 = 256;
const GEMM_TILE: u32 = 128;

/// C = alpha * op(A) op(B) + beta * C into an existing C of the resolved shape.
pub fn gemm_into(a: &impl AsView, b: &impl AsView, c: &mut impl AsViewMut, spec: GemmSpec) -> Result<()> {
    gemm_impl(a.as_view()?, b.as_view()?, None, c.as_view_mut()?, spec)
}

/// C = alpha * op(A) op(B) + beta * C + bias (bias `[N]` broadcast over rows, added in the GEMM's
/// epilogue: the linear and convolution layers' forward in one pass).
pub fn gemm_bias_into(
    a: &impl AsView,
    b: &impl AsView,
    bias: &impl AsView,
    c: &mut impl AsViewMut,
    spec: GemmSpec,
) -> Result<()> {
    gemm_impl(
        a.as_view()?,
        b.as_view()?,
        Some(bias.as_view()?),
        c.as_view_mut()?,
        spec,
    )
}

fn gemm_impl(a: View, b: View, bias: Option<View>, mut c: ViewMut, spec: GemmSpec) -> Result<()> {
    one_device("gemm", &[&a, &b], &[&c])?;
    let (p, out_shape) = resolve(a.shape(), b.shape(), &spec)?;
    expect_shape("gemm", "C", c.shape(), &out_shape)?;
    if let Some(bias) = &bias {
        one_device("gemm", &[&a, bias], &[])?;
        expect_shape("gemm", "bias", bias.shape(), &[p.n as usize])?;
    }
    if c.numel() == 0 {
        return Ok(());
    }
    let (ta, tb) = (spec.trans_a, spec.trans_b);
    match (&a.data, &b.data, &mut c.data) {
        (Data::F32(x), Data::F32(y), DataMut::F32(o)) => {
            cpu::gemm(&p, ta, tb, x, y, o);
            if let Some(bias) = &bias {
                crate::ops::broadcast::cpu::add_bias(o, bias.cpu::<f32>()?);
            }
        }
        (Data::F64(x), Data::F64(y), DataMut::F64(o)) => {
            cpu::gemm(&p, ta, tb, x, y, o);
            if let Some(bias) = &bias {
                crate::ops::broadcast::cpu::add_bias(o, bias.cpu::<f64>()?);
            }
        }
        (Data::Cuda(x, dev), Data::Cuda(y, _), DataMut::Cuda(o, _)) => {
            if (p.m as u32).div_ceil(GEMM_TILE) > 65535 {
                return Err(Error::shape(
                    "gemm",
                    "op(A)",
                    "at most 8,388,480 rows on the GPU",
                    p.m,
                ));
            }
            let cfg = launch::blocks(
                (
                    (p.n as u32).div_ceil(GEMM_TILE),
                    (p.m as u32).div_ceil(GEMM_TILE),
                    (p.batch as u32).min(65535),
                ),
                GEMM_THREADS,
            );
            let bias_view = match &bias {
                Some(v) => match &v.data {
                    Data::Cuda(bv, _) => Some(bv.slice(..)),
                    _ => return Err(mismatch("gemm", &[&a, v], &[])),
                },
                None => None,
            };
            let (k, bias) = (dev.kernels(), bias_view.as_ref());
            // SAFETY: `resolve` checked every operand against (m, n, k, batch, strides); the grid
            // covers C's tiles and the kernel loops over batches beyond grid.z.
            unsafe {
                match (ta, tb) {
                    (false, false) => k.gemm_f32_nn(cfg, x, y, o, p, bias),
                    (false, true) => k.gemm_f32_nt(cfg, x, y, o, p, bias),
                    (true, false) => k.gemm_f32_tn(cfg, x, y, o, p, bias),
                    (true, true) => k.gemm_f32_tt(cfg, x, y, o, p, bias),
                }
            }?;
        }
        _ => return Err(mismatch("gemm", &[&a, &b], &[&c])),
    }
    Ok(())
}

/// op(A) op(B) in a new tensor on `a`'s device and dtype, shaped as [`resolve`] says:
/// `[m, n]`, or `[batch, m, n]` when either operand is batched.
///
/// ```
/// use emprior::{ops, Device, Tensor};
///
/// let a = Tensor::from_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3], &Device::Cpu)?;
/// let b = Tensor::from_f32(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[3, 2], &Device::Cpu)?;
/// let c = ops::matmul(&a, &b, false, false)?;
/// assert_eq!(c.shape(), &[2, 2]);
/// assert_eq!(c.to_vec_f32()?, [4.0, 5.0, 10.0, 11.0]);
/// // A^T A is `[3, 3]`.
/// let g = ops::matmul(&a, &a, true, false)?;
/// assert_eq!(g.shape(), &[3, 3]);
/// assert_eq!(g.to_vec_f32()?[0], 17.0);
/// // Accumulate into an existing C: C = 2 A B + C.
/// let mut acc = Tensor::full(&[2, 2], 1.0, &Device::Cpu)?;
/// let spec = ops::GemmSpec { alpha: 2.0, beta: 1.0, ..ops::GemmSpec::default() };
/// ops::gemm_into(&a, &b, &mut acc, spec)?;
/// assert_eq!(acc.to_vec_f32()?, [9.0, 11.0, 21.0, 23.0]);
/// // Inner dimensions must agree.
/// assert!(ops::matmul(&a, &a, false, false).is_err());
/// # Ok::<(), emprior::Error>(())
/// ```
pub fn matmul(a: &impl AsView, b: &impl AsView, trans_a: bool, trans_b: bool) -> Result<Tensor> {
    let (a, b) = (a.as_view()?, b.as_view()?);
    let spec = GemmSpec::new(trans_a, trans_b);
    let (_, out_shape) = resolve(a.shape(), b.shape(), &spec)?;
    let mut c = alloc_like(&a, &out_shape)?;
    gemm_into(&a, &b, &mut c, spec)?;
    Ok(c)
}

/// Floating-point operations of one call: 2 M N K per batch entry.
pub fn flops(p: &GemmParams) -> f64 {
    2.0 * p.m as f64 * p.n as f64 * p.k as f64 * p.batch as f64
}

/// The sizes the tensor-core GEMM moves in 16-byte chunks, which must be multiples of 8: the
/// leading dimensions, the dimension each operand's chunks run along (K for an operand stored
/// K-contiguous, M or N for one stored the other way), and N (paired f32 stores). The rows of
/// an operand (the batch of a linear layer) may be anything.
pub fn bf16_gemm_dims(p: &GemmParams, spec: GemmSpec) -> Vec<(&'static str, usize)> {
    let mut dims = vec![
        ("lda", p.lda as usize),
        ("ldb", p.ldb as usize),
        ("N", p.n as usize),
    ];
    if !spec.trans_a || spec.trans_b {
        dims.push(("K", p.k as usize));
    }
    if spec.trans_a {
        dims.push(("M", p.m as usize));
    }
    dims
}

/// The tensor-core GEMM (kernels/gemm.cu, version 2) and its CPU twin: `C = alpha op(A) op(B) +
/// beta C + bias` with bf16 `A` and `B` (tensors of dtype bf16, shaped as for [`gemm_into`]) and
/// f32 accumulation (each a tensor, or a [`Bf16Ref`] reading one under another shape),
/// written to an f32 `c` (which `beta` reads), a bf16 `c_bf16` (rounded to
/// nearest even), or both. The sizes of [`bf16_gemm_dims`] must be multiples of 8 on both
/// backends, so a layer takes this path or the f32 one the same way everywhere. `A^T B^T` is not offered (no layer needs it).
///
/// The CPU twin multiplies the same bf16 values widened to f32 (exact) with the f32 oracle; a
/// GPU adds the products in another order, so the two agree to f32 accumulation error, about
/// `(K / 16 + 4) 2^-23 |A| |B|` elementwise (shared/docs/tensor-cores.md §6).
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_into<'a, 'b>(
    a: impl Into<Bf16Ref<'a>>,
    b: impl Into<Bf16Ref<'b>>,
    bias: Option<&View>,
    c: Option<&mut ViewMut>,
    c_bf16: Option<&mut Tensor>,
    spec: GemmSpec,
) -> Result<()> {
    use crate::tensor::DType;
    let (a, b) = (a.into(), b.into());
    let (a_shape, b_shape) = (a.shape(), b.shape());
    let device = a.tensor.device();
    // Every operand: its dtype, on A's device.
    let expect = |what: &str, dtype: DType, on: &crate::Device, want: DType| -> Result<()> {
        if dtype == want && on.same_as(&device) {
            return Ok(());
        }
        Err(Error::DeviceMismatch {
            op: "gemm_bf16",
            detail: format!(
                "{what} must be {} on {device}; it is {} on {on}",
                want.name(),
                dtype.name()
            ),
        })
    };
    expect("A", a.tensor.dtype(), &device, DType::BF16)?;
    expect("B", b.tensor.dtype(), &b.tensor.device(), DType::BF16)?;
    a.check_tensor_core_alignment("gemm_bf16", "A")?;
    b.check_tensor_core_alignment("gemm_bf16", "B")?;
    if spec.trans_a && spec.trans_b {
        return Err(Error::Other(
            "gemm_bf16: A^T B^T is not implemented (transpose one operand first)".into(),
        ));
    }
    let (p, out_shape) = resolve(a_shape, b_shape, &spec)?;
    if let Some(why) = super::precision::tensor_core_refusal(&bf16_gemm_dims(&p, spec), &device) {
        return Err(Error::Other(format!("gemm_bf16: {why}")));
    }
    if c.is_none() && c_bf16.is_none() {
        return Err(Error::Other("gemm_bf16: no output given".into()));
    }
    if spec.beta != 0.0 && c.is_none() {
        return Err(Error::Other(
            "gemm_bf16: beta != 0 needs the f32 output to read".into(),
        ));
    }
    if let Some(c) = &c {
        expect_shape("gemm_bf16", "C", c.shape(), &out_shape)?;
        expect("C", c.dtype(), &c.as_view().device(), DType::F32)?;
    }
    if let Some(cb) = &c_bf16 {
        expect_shape("gemm_bf16", "C (bf16)", cb.shape(), &out_shape)?;
        expect("the bf16 C", cb.dtype(), &cb.device(), DType::BF16)?;
    }
    if let Some(bias) = bias {
        expect_shape("gemm_bf16", "bias", bias.shape(), &[p.n as usize])?;
        expect("the bias", bias.dtype(), &bias.device(), DType::F32)?;
    }
    crate::device::note_op();
    let numel: usize = out_shape.iter().product();
    if numel == 0 {
        return Ok(());
    }
    let (ta, tb) = (spec.trans_a, spec.trans_b);
    match &device {
        crate::Device::Cpu => {
            let widen =
                |t: &Bf16Ref| -> Result<Vec<f32>> { Ok(t.cpu()?.iter().map(|v| v.to_f32()).collect()) };
            let (af, bf) = (widen(&a)?, widen(&b)?);
            let mut out = match &c {
                Some(c) if spec.beta != 0.0 => c.as_view().cpu::<f32>()?.to_vec(),
                _ => vec![0.0f32; numel],
            };
            cpu::gemm(&p, ta, tb, &af, &bf, &mut out);
            if let Some(bias) = bias {
                crate::ops::broadcast::cpu::add_bias(&mut out, bias.cpu::<f32>()?);
            }
            if let Some(cb) = c_bf16 {
                for (o, &v) in cb.cpu_bf16_mut()?.iter_mut().zip(&out) {
                    *o = half::bf16::from_f32(v);
                }
            }
            if let Some(c) = c {
                c.cpu_mut::<f32>()?.copy_from_slice(&out);
            }
        }
        crate::Device::Cuda(dev) => {
            if (p.n as u32).div_ceil(GEMM_TILE) > 65535 {
                return Err(Error::shape(
                    "gemm_bf16",
                    "op(B)",
                    "at most 8,388,480 columns on the GPU",
                    p.n,
                ));
            }
            let cfg = launch::blocks(
                (
                    (p.m as u32).div_ceil(GEMM_TILE),
                    (p.n as u32).div_ceil(GEMM_TILE),
                    (p.batch as u32).min(65535),
                ),
                GEMM_THREADS,
            );
            let bias_view = match bias.map(|v| &v.data) {
                Some(Data::Cuda(bv, _)) => Some(bv.slice(..)),
                Some(_) => unreachable!("checked to be on the GPU above"),
                None => None,
            };
            let mut c_view = match c {
                Some(c) => match &mut c.data {
                    DataMut::Cuda(o, _) => Some(o.slice_mut(..)),
                    _ => unreachable!("checked to be on the GPU above"),
                },
                None => None,
            };
            let mut cb_view = match c_bf16 {
                Some(cb) => Some(cb.cuda_bf16_mut()?),
                None => None,
            };
            let (x, y) = (a.cuda()?, b.cuda()?);
            let k = dev.kernels();
            let (c, cb, bias) = (c_view.as_mut(), cb_view.as_mut(), bias_view.as_ref());
            // SAFETY: `resolve` checked every operand against (m, n, k, batch, strides), the
            // refusal above every 16-byte chunk's alignment; the grid covers C's tiles and the
            // kernel loops over batches beyond grid.z.
            unsafe {
                match (ta, tb) {
                    (false, false) => k.gemm_bf16_nn(cfg, &x, &y, c, cb, p, bias),
                    (false, true) => k.gemm_bf16_nt(cfg, &x, &y, c, cb, p, bias),
                    (true, false) => k.gemm_bf16_tn(cfg, &x, &y, c, cb, p, bias),
                    (true, true) => unreachable!("refused above"),
                }
            }?;
        }
    }
    Ok(())
}

/// `C = alpha op(A) op(B) + beta C` for operands that may be kept bf16 activations, at a
/// layer's precision: under bf16, with sizes the tensor cores take, on bf16 operands (a kept
/// one read as it is, an f32 one rounded) with f32 accumulation; otherwise the f32 GEMM on
/// the values widened (exact). The attention's score and value products go through here.
pub fn gemm_operands_into(
    a: &Operand,
    b: &Operand,
    c: &mut ViewMut,
    spec: GemmSpec,
    precision: Precision,
) -> Result<()> {
    let tensor_cores = precision == Precision::Bf16
        && !(spec.trans_a && spec.trans_b)
        && resolve(a.shape(), b.shape(), &spec).is_ok_and(|(p, _)| {
            super::precision::tensor_core_refusal(&bf16_gemm_dims(&p, spec), &a.device()).is_none()
        });
    if tensor_cores {
        let (an, bn) = (a.narrow()?, b.narrow()?);
        gemm_bf16_into(an.as_ref(), bn.as_ref(), None, Some(c), None, spec)
    } else {
        let (aw, bw) = (a.widen()?, b.widen()?);
        gemm_into(&aw.view()?, &bw.view()?, c, spec)
    }
}
