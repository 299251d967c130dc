//! Elementwise maps: fill, add, mul, scale, axpy, SiLU and its backward.
//! CUDA: kernels/elementwise.cu.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig};

use super::{alloc_like, expect_shape, mismatch, one_device};
use crate::device::launch::grid_stride;
use crate::device::{CudaDevice, Kernels};
use crate::error::{Error, Result};
use crate::ops::parallel::for_chunks;
use crate::real::Real;
use crate::tensor::{AsView, AsViewMut, Data, DataMut, Tensor};

/// The CPU bodies: the oracle for kernels/elementwise.cu.
pub mod cpu {
    use crate::ops::parallel::for_chunks;
    use crate::ops::simd;
    use crate::real::Real;
    use crate::tensor::DType;

    /// In f32 through our vectorisable exp (ops::simd), so that every CPU f32 SiLU, fused or
    /// not, gives the same bits; libm's in f64, the finite-difference oracle.
    #[inline(always)]
    pub fn silu<T: Real>(x: T) -> T {
        if T::DTYPE == DType::F32 {
            T::from_f32(simd::silu_f32(x.to_f64() as f32))
        } else {
            x / (T::ONE + (-x).exp())
        }
    }

    /// dy * d/dx [x * sigmoid(x)] = dy * s * (1 + x * (1 - s)), s = sigmoid(x).
    #[inline(always)]
    pub fn silu_backward<T: Real>(x: T, dy: T) -> T {
        if T::DTYPE == DType::F32 {
            T::from_f32(simd::silu_backward_f32(x.to_f64() as f32, dy.to_f64() as f32))
        } else {
            let s = T::ONE / (T::ONE + (-x).exp());
            dy * (s * (T::ONE + x * (T::ONE - s)))
        }
    }

    /// The residual combine of the paper's blocks, `out = (x + c h) / sqrt(1 + c^2)` with c the
    /// last third of each sample's row of m (x, h, out: [n, p, c]; m: [n, 3c]). The CPU body of
    /// kernels/blocks.cu's residual and of the convolution epilogue that fuses it into a
    /// ResBlock's conv2 (kernels/mma.cuh, `TcEpilogue`); `nn::blocks` builds on it.
    pub fn residual<T: Real>(x: &[T], h: &[T], m: &[T], out: &mut [T], p: usize, c: usize) {
        for (i, o) in out.iter_mut().enumerate() {
            let (ch, s) = (i % c, i / (p * c));
            let cc = m[s * 3 * c + 2 * c + ch];
            *o = (x[i] + cc * h[i]) / (T::ONE + cc * cc).sqrt();
        }
    }

    /// out = f(x), on both cores when large.
    pub fn map1<T: Real>(x: &[T], out: &mut [T], f: impl Fn(T) -> T + Sync) {
        for_chunks(out, |r, o| {
            for (o, &a) in o.iter_mut().zip(&x[r]) {
                *o = f(a);
            }
        });
    }

    /// out = f(a, b), on both cores when large.
    pub fn map2<T: Real>(a: &[T], b: &[T], out: &mut [T], f: impl Fn(T, T) -> T + Sync) {
        for_chunks(out, |r, o| {
            for ((o, &x), &y) in o.iter_mut().zip(&a[r.clone()]).zip(&b[r]) {
                *o = f(x, y);
            }
        });
    }
}

/// A grid-stride launch over n elements, each thread taking float4s.
fn config(dev: &CudaDevice, n: usize) -> LaunchConfig {
    grid_stride(dev, n.div_ceil(4))
}

/// A launcher of a binary map kernel (signature a, b, out, n).
type BinaryKernel = unsafe fn(
    &Kernels,
    LaunchConfig,
    &CudaView<'_, f32>,
    &CudaView<'_, f32>,
    &mut CudaViewMut<'_, f32>,
    i64,
) -> Result<()>;

/// An elementwise function of two operands: one CPU body for every float type, and its kernel.
trait Map: Sync {
    const NAME: &'static str;
    const KERNEL: BinaryKernel;
    fn apply<T: Real>(&self, a: T, b: T) -> T;
    /// The f32 loop over a chunk; maps with a vector body (ops::simd) replace it.
    fn slice_f32(&self, a: &[f32], b: &[f32], out: &mut [f32]) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = self.apply(x, y);
        }
    }
}

/// A map of one operand (kernel signature x, out, n [, scalar]).
trait UnaryMap: Sync {
    const NAME: &'static str;
    fn apply<T: Real>(&self, x: T) -> T;
    /// The f32 loop over a chunk; maps with a vector body (ops::simd) replace it.
    fn slice_f32(&self, x: &[f32], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = self.apply(v);
        }
    }
    /// # Safety
    /// `cfg` must come from `config(dev, n)` and both views must hold n elements.
    unsafe fn launch(
        &self,
        k: &Kernels,
        cfg: LaunchConfig,
        x: &CudaView<f32>,
        out: &mut CudaViewMut<f32>,
        n: i64,
    ) -> Result<()>;
}

struct Add;
impl Map for Add {
    const NAME: &'static str = "add";
    const KERNEL: BinaryKernel = Kernels::ew_add_f32;
    fn apply<T: Real>(&self, a: T, b: T) -> T {
        a + b
    }
}

struct Mul;
impl Map for Mul {
    const NAME: &'static str = "mul";
    const KERNEL: BinaryKernel = Kernels::ew_mul_f32;
    fn apply<T: Real>(&self, a: T, b: T) -> T {
        a * b
    }
}

struct SiluBackward;
impl Map for SiluBackward {
    const NAME: &'static str = "silu_backward";
    const KERNEL: BinaryKernel = Kernels::ew_silu_backward_f32;
    fn apply<T: Real>(&self, x: T, dy: T) -> T {
        cpu::silu_backward(x, dy)
    }
    fn slice_f32(&self, x: &[f32], dy: &[f32], out: &mut [f32]) {
        crate::ops::simd::silu_backward(x, dy, out)
    }
}

struct DivGuarded;
impl Map for DivGuarded {
    const NAME: &'static str = "div_guarded";
    const KERNEL: BinaryKernel = Kernels::ew_div_guarded_f32;
    fn apply<T: Real>(&self, a: T, b: T) -> T {
        if b == T::ZERO {
            T::ZERO
        } else {
            a / b
        }
    }
}

/// The scale is f64 so the f64 oracle keeps it exactly.
struct Scale(f64);
impl UnaryMap for Scale {
    const NAME: &'static str = "scale";
    fn apply<T: Real>(&self, x: T) -> T {
        // f32 data gets the f32-rounded scale, exactly what the kernel multiplies by.
        if T::DTYPE == crate::tensor::DType::F32 {
            T::from_f32(self.0 as f32) * x
        } else {
            T::from_f64(self.0) * x
        }
    }
    unsafe fn launch(
        &self,
        k: &Kernels,
        cfg: LaunchConfig,
        x: &CudaView<f32>,
        out: &mut CudaViewMut<f32>,
        n: i64,
    ) -> Result<()> {
        k.ew_scale_f32(cfg, x, out, n, self.0 as f32)
    }
}

struct Silu;
impl UnaryMap for Silu {
    const NAME: &'static str = "silu";
    fn apply<T: Real>(&self, x: T) -> T {
        cpu::silu(x)
    }
    fn slice_f32(&self, x: &[f32], out: &mut [f32]) {
        crate::ops::simd::silu(x, out)
    }
    unsafe fn launch(
        &self,
        k: &Kernels,
        cfg: LaunchConfig,
        x: &CudaView<f32>,
        out: &mut CudaViewMut<f32>,
        n: i64,
    ) -> Result<()> {
        k.ew_silu_f32(cfg, x, out, n)
    }
}

/// `out = f(a, b)` elementwise.
fn binary<F: Map>(f: F, a: &impl AsView, b: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    let (a, b, mut out) = (a.as_view()?, b.as_view()?, out.as_view_mut()?);
    one_device(F::NAME, &[&a, &b], &[&out])?;
    expect_shape(F::NAME, "second operand", b.shape(), a.shape())?;
    expect_shape(F::NAME, "out", out.shape(), a.shape())?;
    let n = a.numel();
    match (&a.data, &b.data, &mut out.data) {
        (Data::F32(x), Data::F32(y), DataMut::F32(o)) => {
            for_chunks(o, |r, o| f.slice_f32(&x[r.clone()], &y[r], o))
        }
        (Data::F64(x), Data::F64(y), DataMut::F64(o)) => cpu::map2(x, y, o, |p, q| f.apply(p, q)),
        (Data::Cuda(x, dev), Data::Cuda(y, _), DataMut::Cuda(o, _)) => {
            // SAFETY: all three views hold n elements (shapes checked above).
            unsafe { F::KERNEL(dev.kernels(), config(dev, n), x, y, o, n as i64) }?;
        }
        _ => return Err(mismatch(F::NAME, &[&a, &b], &[&out])),
    }
    Ok(())
}

/// `out = f(x)` elementwise.
fn unary<F: UnaryMap>(f: F, x: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    let (x, mut out) = (x.as_view()?, out.as_view_mut()?);
    one_device(F::NAME, &[&x], &[&out])?;
    expect_shape(F::NAME, "out", out.shape(), x.shape())?;
    let n = x.numel();
    match (&x.data, &mut out.data) {
        (Data::F32(v), DataMut::F32(o)) => for_chunks(o, |r, o| f.slice_f32(&v[r], o)),
        (Data::F64(v), DataMut::F64(o)) => cpu::map1(v, o, |p| f.apply(p)),
        (Data::Cuda(v, dev), DataMut::Cuda(o, _)) => {
            // SAFETY: both views hold n elements (shape checked above).
            unsafe { f.launch(dev.kernels(), config(dev, n), v, o, n as i64) }?;
        }
        _ => return Err(mismatch(F::NAME, &[&x], &[&out])),
    }
    Ok(())
}

fn alloc_for(x: &impl AsView) -> Result<Tensor> {
    let v = x.as_view()?;
    alloc_like(&v, v.shape())
}

/// Sets every element of `out` to `value`.
pub fn fill(out: &mut impl AsViewMut, value: f32) -> Result<()> {
    let mut out = out.as_view_mut()?;
    let n = out.numel();
    match &mut out.data {
        DataMut::F32(o) => o.fill(value),
        DataMut::F64(o) => o.fill(value as f64),
        // SAFETY: the view holds n elements.
        DataMut::Cuda(o, dev) => unsafe { dev.kernels().ew_fill_f32(config(dev, n), o, n as i64, value) }?,
    }
    Ok(())
}

/// out = x, a copy on their device (f32 or f64; same shape).
pub fn copy_into(x: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    let x = x.as_view()?;
    let mut out = out.as_view_mut()?;
    if x.shape() != out.shape() {
        return Err(Error::shape("copy", "out", x.shape(), out.shape()));
    }
    match (&x.data, &mut out.data) {
        (Data::F32(s), DataMut::F32(d)) => d.copy_from_slice(s),
        (Data::F64(s), DataMut::F64(d)) => d.copy_from_slice(s),
        (Data::Cuda(s, dev), DataMut::Cuda(d, _)) => dev
            .stream()
            .memcpy_dtod(s, d)
            .map_err(|e| Error::cuda("copying on the GPU", e))?,
        _ => return Err(super::mismatch("copy", &[&x], &[&out])),
    }
    Ok(())
}

/// out = a + b
pub fn add_into(a: &impl AsView, b: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    binary(Add, a, b, out)
}

/// `a + b` elementwise, in a new tensor on `a`'s device and dtype (see [`add_into`]).
pub fn add(a: &impl AsView, b: &impl AsView) -> Result<Tensor> {
    let mut out = alloc_for(a)?;
    add_into(a, b, &mut out)?;
    Ok(out)
}

/// out = a * b (elementwise)
pub fn mul_into(a: &impl AsView, b: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    binary(Mul, a, b, out)
}

/// `a * b` elementwise, in a new tensor on `a`'s device and dtype (see [`mul_into`]).
pub fn mul(a: &impl AsView, b: &impl AsView) -> Result<Tensor> {
    let mut out = alloc_for(a)?;
    mul_into(a, b, &mut out)?;
    Ok(out)
}

/// out = a / b elementwise, with 0 where b == 0.
pub fn div_guarded_into(a: &impl AsView, b: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    binary(DivGuarded, a, b, out)
}

/// `a / b` elementwise with 0 where `b == 0`, in a new tensor (see [`div_guarded_into`]).
pub fn div_guarded(a: &impl AsView, b: &impl AsView) -> Result<Tensor> {
    let mut out = alloc_for(a)?;
    div_guarded_into(a, b, &mut out)?;
    Ok(out)
}

/// out = alpha * x
pub fn scale_into(x: &impl AsView, alpha: f64, out: &mut impl AsViewMut) -> Result<()> {
    unary(Scale(alpha), x, out)
}

/// `alpha * x` in a new tensor on `x`'s device and dtype (f32 data uses `alpha` rounded to f32).
pub fn scale(x: &impl AsView, alpha: f64) -> Result<Tensor> {
    let mut out = alloc_for(x)?;
    scale_into(x, alpha, &mut out)?;
    Ok(out)
}

/// y <- y + alpha * x, in place.
pub fn axpy(alpha: f64, x: &impl AsView, y: &mut impl AsViewMut) -> Result<()> {
    let (x, mut y) = (x.as_view()?, y.as_view_mut()?);
    one_device("axpy", &[&x], &[&y])?;
    expect_shape("axpy", "y", y.shape(), x.shape())?;
    let n = x.numel();
    match (&x.data, &mut y.data) {
        (Data::F32(xv), DataMut::F32(yv)) => {
            let a = alpha as f32;
            for_chunks(yv, |r, y| {
                y.iter_mut().zip(&xv[r]).for_each(|(yi, &xi)| *yi += a * xi)
            })
        }
        (Data::F64(xv), DataMut::F64(yv)) => for_chunks(yv, |r, y| {
            y.iter_mut().zip(&xv[r]).for_each(|(yi, &xi)| *yi += alpha * xi)
        }),
        (Data::Cuda(xv, dev), DataMut::Cuda(yv, _)) => {
            // SAFETY: both views hold n elements (shape checked above).
            unsafe {
                dev.kernels()
                    .ew_axpy_f32(config(dev, n), xv, yv, n as i64, alpha as f32)
            }?;
        }
        _ => return Err(mismatch("axpy", &[&x], &[&y])),
    }
    Ok(())
}

/// out = silu(x) = x * sigmoid(x)
pub fn silu_into(x: &impl AsView, out: &mut impl AsViewMut) -> Result<()> {
    unary(Silu, x, out)
}

/// `silu(x) = x * sigmoid(x)` in a new tensor (see [`silu_into`]).
pub fn silu(x: &impl AsView) -> Result<Tensor> {
    let mut out = alloc_for(x)?;
    silu_into(x, &mut out)?;
    Ok(out)
}

/// dx = dy * silu'(x): the backward of SiLU (with dy = 1, its derivative).
pub fn silu_backward_into(x: &impl AsView, dy: &impl AsView, dx: &mut impl AsViewMut) -> Result<()> {
    binary(SiluBackward, x, dy, dx)
}

/// `dy * silu'(x)` in a new tensor on `x`'s device and dtype (see [`silu_backward_into`]).
pub fn silu_backward(x: &impl AsView, dy: &impl AsView) -> Result<Tensor> {
    let mut dx = alloc_for(x)?;
    silu_backward_into(x, dy, &mut dx)?;
    Ok(dx)
}

/// [`silu`] of values that may be kept in bf16 (ResBlock's c1 under the bf16 policy): on a GPU
/// one kernel reads them as they are, elsewhere they are widened (exactly); the same values.
pub fn silu_operand(x: &super::precision::Operand) -> Result<Tensor> {
    use super::precision::Operand;
    if let Operand::Bf16(xb) = x {
        if let Some(dev) = xb.gpu_with(&[]) {
            crate::device::note_op();
            let n = xb.numel();
            let mut out = Tensor::uninit(xb.shape(), crate::DType::F32, &crate::Device::Cuda(dev.clone()))?;
            let (xv, mut o) = (xb.cuda()?, out.cuda_f32_mut()?);
            // SAFETY: x and out hold n values.
            unsafe {
                dev.kernels()
                    .ew_silu_bf16x(grid_stride(&dev, n), &xv, &mut o, n as i64)
            }?;
            return Ok(out);
        }
    }
    silu(&x.widen()?.view()?)
}

/// [`silu_backward`] at values that may be kept in bf16 (as [`silu_operand`]).
pub fn silu_backward_operand(x: &super::precision::Operand, dy: &impl AsView) -> Result<Tensor> {
    use super::precision::Operand;
    let dy = dy.as_view()?;
    if let Operand::Bf16(xb) = x {
        if let Some(dev) = xb.gpu_with(&[&dy]) {
            expect_shape("silu_backward", "dy", dy.shape(), xb.shape())?;
            crate::device::note_op();
            let n = xb.numel();
            let mut dx = Tensor::uninit(xb.shape(), crate::DType::F32, &crate::Device::Cuda(dev.clone()))?;
            let Data::Cuda(gv, _) = &dy.data else {
                unreachable!("on the GPU (checked above)")
            };
            let (xv, mut o) = (xb.cuda()?, dx.cuda_f32_mut()?);
            // SAFETY: x, dy and dx hold n values (shapes checked above).
            unsafe {
                dev.kernels()
                    .ew_silu_backward_bf16x(grid_stride(&dev, n), &xv, gv, &mut o, n as i64)
            }?;
            return Ok(dx);
        }
    }
    silu_backward(&x.widen()?.view()?, &dy)
}
