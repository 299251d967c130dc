//! Deterministic reductions: the sum of a tensor, and per-row dot products and L2 norms over a
//! batch (row = first axis). Partial sums are f64 on both backends; the GPU's fixed reduction
//! tree and the absence of atomics make every result identical run to run.
//! CUDA: kernels/reduce.cu.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{common_device, expect_shape, launched};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// Must equal REDUCE_THREADS in kernels/common.cuh.
const REDUCE_THREADS: u32 = 256;
/// At most this many f64 partials in the first stage of a full sum.
const MAX_PARTIALS: usize = 1024;

/// The CPU bodies: the oracle for kernels/reduce.cu.
pub mod cpu {
    pub fn sum(x: &[f32]) -> f32 {
        x.iter().map(|&v| v as f64).sum::<f64>() as f32
    }

    pub fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }
}

/// out (shape []) = sum of all elements of x.
pub fn sum_into(x: &Tensor, out: &mut Tensor) -> Result<()> {
    let device = common_device("sum", &[x, out])?;
    expect_shape("sum", "out", out, &[])?;
    let n = x.numel();
    match device {
        Device::Cpu => out.cpu_f32_mut()?[0] = cpu::sum(x.cpu_f32()?),
        Device::Cuda(dev) => {
            // The grid depends on n alone, so the summation order (hence the result) does too.
            let blocks = n.div_ceil(REDUCE_THREADS as usize * 4).clamp(1, MAX_PARTIALS);
            let mut partials = dev.alloc(blocks * 8)?;
            // SAFETY: the buffer holds `blocks` f64 values.
            let mut pv = unsafe { partials.slice_mut().transmute_mut::<f64>(blocks) }.expect("sized above");
            let xv = x.cuda_f32()?;
            let mut l = dev.stream().launch_builder(&dev.kernels().reduce_sum_partial_f32);
            let n64 = n as i64;
            l.arg(&xv).arg(&n64).arg(&mut pv);
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (REDUCE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            launched("reduce_sum_partial_f32", unsafe { l.launch(cfg) })?;
            let mut ov = out.cuda_f32_mut()?;
            let mut l = dev.stream().launch_builder(&dev.kernels().reduce_sum_finish);
            let count = blocks as i32;
            l.arg(&mut pv).arg(&count).arg(&mut ov);
            let cfg = LaunchConfig {
                grid_dim: (1, 1, 1),
                ..cfg
            };
            launched("reduce_sum_finish", unsafe { l.launch(cfg) })?;
        }
    }
    Ok(())
}

pub fn sum(x: &Tensor) -> Result<Tensor> {
    let mut out = Tensor::uninit(&[], DType::F32, &x.device())?;
    sum_into(x, &mut out)?;
    Ok(out)
}

/// (rows, cols) of a batch: rows along the first axis, everything else flattened.
fn rows_cols(op: &'static str, x: &Tensor) -> Result<(usize, usize)> {
    match x.shape().first() {
        Some(&rows) if rows > 0 => Ok((rows, x.numel() / rows)),
        _ => Err(Error::shape(op, "input", "[rows, ...] with rows > 0", x.shape())),
    }
}

fn row_reduce(op: &'static str, a: &Tensor, b: &Tensor, out: &mut Tensor, sqrt: bool) -> Result<()> {
    let device = common_device(op, &[a, b, out])?;
    expect_shape(op, "second operand", b, a.shape())?;
    let (rows, cols) = rows_cols(op, a)?;
    expect_shape(op, "out", out, &[rows])?;
    match device {
        Device::Cpu => {
            let (av, bv) = (a.cpu_f32()?, b.cpu_f32()?);
            let o = out.cpu_f32_mut()?;
            for r in 0..rows {
                let d = cpu::dot(&av[r * cols..(r + 1) * cols], &bv[r * cols..(r + 1) * cols]);
                o[r] = if sqrt { d.sqrt() } else { d } as f32;
            }
        }
        Device::Cuda(dev) => {
            let (av, bv) = (a.cuda_f32()?, b.cuda_f32()?);
            let mut ov = out.cuda_f32_mut()?;
            let mut l = dev.stream().launch_builder(&dev.kernels().reduce_row_dot_f32);
            let (rows64, cols64, sqrt32) = (rows as i64, cols as i64, sqrt as i32);
            l.arg(&av)
                .arg(&bv)
                .arg(&mut ov)
                .arg(&rows64)
                .arg(&cols64)
                .arg(&sqrt32);
            let cfg = LaunchConfig {
                grid_dim: (rows.min(dev.sm_count() as usize * 32) as u32, 1, 1),
                block_dim: (REDUCE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            launched("reduce_row_dot_f32", unsafe { l.launch(cfg) })?;
        }
    }
    Ok(())
}

/// out[r] = <a[r], b[r]> for each row r of a batch.
pub fn row_dot_into(a: &Tensor, b: &Tensor, out: &mut Tensor) -> Result<()> {
    row_reduce("row_dot", a, b, out, false)
}

pub fn row_dot(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (rows, _) = rows_cols("row_dot", a)?;
    let mut out = Tensor::uninit(&[rows], DType::F32, &a.device())?;
    row_dot_into(a, b, &mut out)?;
    Ok(out)
}

/// out[r] = ||x[r]||_2 for each row r of a batch.
pub fn row_norm_into(x: &Tensor, out: &mut Tensor) -> Result<()> {
    row_reduce("row_norm", x, x, out, true)
}

pub fn row_norm(x: &Tensor) -> Result<Tensor> {
    let (rows, _) = rows_cols("row_norm", x)?;
    let mut out = Tensor::uninit(&[rows], DType::F32, &x.device())?;
    row_norm_into(x, &mut out)?;
    Ok(out)
}
