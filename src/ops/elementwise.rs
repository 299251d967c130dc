//! Elementwise maps: fill, add, mul, scale, axpy, SiLU and its backward.
//! CUDA: kernels/elementwise.cu.

use cudarc::driver::{CudaFunction, LaunchConfig, PushKernelArg};

use super::{common_device, expect_shape, launched};
use crate::device::{CudaDevice, Device};
use crate::error::Result;
use crate::tensor::Tensor;

const THREADS: u32 = 256;

/// The CPU bodies: the oracle for kernels/elementwise.cu.
pub mod cpu {
    pub fn silu(x: f32) -> f32 {
        x / (1.0 + (-x).exp())
    }

    /// dy * d/dx [x * sigmoid(x)] = dy * s * (1 + x * (1 - s)), s = sigmoid(x).
    pub fn silu_backward(x: f32, dy: f32) -> f32 {
        let s = 1.0 / (1.0 + (-x).exp());
        dy * (s * (1.0 + x * (1.0 - s)))
    }

    pub fn map1(x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32) {
        for (o, &a) in out.iter_mut().zip(x) {
            *o = f(a);
        }
    }

    pub fn map2(a: &[f32], b: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32) {
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = f(x, y);
        }
    }
}

/// A grid-stride launch over n elements, each thread taking float4s.
fn config(dev: &CudaDevice, n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (dev.grid_for(n.div_ceil(4), THREADS), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `out = f(a, b)` elementwise, on the CPU with `cpu` or on the GPU with the kernel `kernel`
/// (signature: a, b, out, n).
fn binary(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    out: &mut Tensor,
    cpu: impl Fn(f32, f32) -> f32,
    kernel: fn(&crate::device::Kernels) -> &CudaFunction,
) -> Result<()> {
    let device = common_device(op, &[a, b, out])?;
    expect_shape(op, "b", b, a.shape())?;
    expect_shape(op, "out", out, a.shape())?;
    let n = a.numel();
    match device {
        Device::Cpu => cpu::map2(a.cpu_f32()?, b.cpu_f32()?, out.cpu_f32_mut()?, cpu),
        Device::Cuda(dev) => {
            let (av, bv) = (a.cuda_f32()?, b.cuda_f32()?);
            let mut ov = out.cuda_f32_mut()?;
            let f = kernel(dev.kernels());
            let mut l = dev.stream().launch_builder(f);
            let n64 = n as i64;
            l.arg(&av).arg(&bv).arg(&mut ov).arg(&n64);
            launched(op, unsafe { l.launch(config(&dev, n)) })?;
        }
    }
    Ok(())
}

/// `out = f(x)` elementwise; the kernel's signature is x, out, n [, extra scalar].
fn unary(
    op: &'static str,
    x: &Tensor,
    out: &mut Tensor,
    cpu: impl Fn(f32) -> f32,
    kernel: fn(&crate::device::Kernels) -> &CudaFunction,
    scalar: Option<f32>,
) -> Result<()> {
    let device = common_device(op, &[x, out])?;
    expect_shape(op, "out", out, x.shape())?;
    let n = x.numel();
    match device {
        Device::Cpu => cpu::map1(x.cpu_f32()?, out.cpu_f32_mut()?, cpu),
        Device::Cuda(dev) => {
            let xv = x.cuda_f32()?;
            let mut ov = out.cuda_f32_mut()?;
            let f = kernel(dev.kernels());
            let mut l = dev.stream().launch_builder(f);
            let n64 = n as i64;
            let s = scalar.unwrap_or(0.0);
            l.arg(&xv).arg(&mut ov).arg(&n64);
            if scalar.is_some() {
                l.arg(&s);
            }
            launched(op, unsafe { l.launch(config(&dev, n)) })?;
        }
    }
    Ok(())
}

fn alloc_like(x: &Tensor) -> Result<Tensor> {
    Tensor::uninit(x.shape(), x.dtype(), &x.device())
}

/// Sets every element of `out` to `value`.
pub fn fill(out: &mut Tensor, value: f32) -> Result<()> {
    let device = common_device("fill", &[out])?;
    let n = out.numel();
    match device {
        Device::Cpu => out.cpu_f32_mut()?.fill(value),
        Device::Cuda(dev) => {
            let mut ov = out.cuda_f32_mut()?;
            let mut l = dev.stream().launch_builder(&dev.kernels().ew_fill_f32);
            let n64 = n as i64;
            l.arg(&mut ov).arg(&n64).arg(&value);
            launched("ew_fill_f32", unsafe { l.launch(config(&dev, n)) })?;
        }
    }
    Ok(())
}

/// out = a + b
pub fn add_into(a: &Tensor, b: &Tensor, out: &mut Tensor) -> Result<()> {
    binary("add", a, b, out, |x, y| x + y, |k| &k.ew_add_f32)
}

pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mut out = alloc_like(a)?;
    add_into(a, b, &mut out)?;
    Ok(out)
}

/// out = a * b (elementwise)
pub fn mul_into(a: &Tensor, b: &Tensor, out: &mut Tensor) -> Result<()> {
    binary("mul", a, b, out, |x, y| x * y, |k| &k.ew_mul_f32)
}

pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mut out = alloc_like(a)?;
    mul_into(a, b, &mut out)?;
    Ok(out)
}

/// out = alpha * x
pub fn scale_into(x: &Tensor, alpha: f32, out: &mut Tensor) -> Result<()> {
    unary("scale", x, out, |v| alpha * v, |k| &k.ew_scale_f32, Some(alpha))
}

pub fn scale(x: &Tensor, alpha: f32) -> Result<Tensor> {
    let mut out = alloc_like(x)?;
    scale_into(x, alpha, &mut out)?;
    Ok(out)
}

/// y <- y + alpha * x, in place.
pub fn axpy(alpha: f32, x: &Tensor, y: &mut Tensor) -> Result<()> {
    let device = common_device("axpy", &[x, y])?;
    expect_shape("axpy", "y", y, x.shape())?;
    let n = x.numel();
    match device {
        Device::Cpu => {
            for (yi, &xi) in y.cpu_f32_mut()?.iter_mut().zip(x.cpu_f32()?) {
                *yi += alpha * xi;
            }
        }
        Device::Cuda(dev) => {
            let xv = x.cuda_f32()?;
            let mut yv = y.cuda_f32_mut()?;
            let mut l = dev.stream().launch_builder(&dev.kernels().ew_axpy_f32);
            let n64 = n as i64;
            l.arg(&xv).arg(&mut yv).arg(&n64).arg(&alpha);
            launched("ew_axpy_f32", unsafe { l.launch(config(&dev, n)) })?;
        }
    }
    Ok(())
}

/// out = silu(x) = x * sigmoid(x)
pub fn silu_into(x: &Tensor, out: &mut Tensor) -> Result<()> {
    unary("silu", x, out, cpu::silu, |k| &k.ew_silu_f32, None)
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    let mut out = alloc_like(x)?;
    silu_into(x, &mut out)?;
    Ok(out)
}

/// dx = dy * silu'(x): the backward of SiLU (with dy = 1, its derivative).
pub fn silu_backward_into(x: &Tensor, dy: &Tensor, dx: &mut Tensor) -> Result<()> {
    binary("silu_backward", x, dy, dx, cpu::silu_backward, |k| {
        &k.ew_silu_backward_f32
    })
}

pub fn silu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let mut dx = alloc_like(x)?;
    silu_backward_into(x, dy, &mut dx)?;
    Ok(dx)
}
