//! The op set. Every op has a CPU body (plain Rust, generic over f32/f64: the oracle the kernels
//! are checked against) and a CUDA launch (f32), side by side in the file of its family. Ops take
//! anything viewable (`Tensor`, `View`, `ViewMut`), check shapes once, and dispatch on where the
//! data lives and its dtype.
//!
//! Conventions: `op_into(inputs.., out)` writes a caller-provided output (hot loops reuse their
//! buffers); `op(inputs..)` allocates the output.

pub mod broadcast;
pub mod elementwise;
pub mod gemm;
pub mod parallel;
pub mod precision;
pub mod reduce;
pub mod rng;
pub mod simd;

pub use elementwise::{
    add, add_into, axpy, copy_into, div_guarded, div_guarded_into, fill, mul, mul_into, scale, scale_into,
    silu, silu_backward, silu_backward_into, silu_into,
};
pub use gemm::{gemm_bf16_into, gemm_bias_into, gemm_into, matmul, GemmSpec};
pub use precision::{to_bf16, to_f32, Precision, PrecisionRequest};
pub use reduce::{row_dot, row_dot_into, row_norm, row_norm_into, sum, sum_into};
pub use rng::{normal, philox4x32_10, uniform, Philox};

use crate::error::{Error, Result};
use crate::tensor::{Data, Tensor, View, ViewMut};

/// Where a view's data lives and its dtype, for error messages.
fn describe(data: &Data) -> String {
    match data {
        Data::F32(_) => "f32 on cpu".into(),
        Data::F64(_) => "f64 on cpu".into(),
        Data::Cuda(_, d) => format!("f32 on cuda:{}", d.ordinal()),
    }
}

/// The error for operands that do not share a device and dtype (or f64 on a GPU).
pub fn mismatch(op: &'static str, views: &[&View], outs: &[&ViewMut]) -> Error {
    let mut all: Vec<String> = views.iter().map(|v| describe(&v.data)).collect();
    all.extend(outs.iter().map(|o| describe(&o.as_view().data)));
    Error::DeviceMismatch {
        op,
        detail: format!(
            "operands are {}; all must be f32 on one device, or f64 on the cpu",
            all.join(", ")
        ),
    }
}

/// Checks that all operands live on one device (the CPU, or the same GPU): the dispatch in each
/// op matches on data kinds and would otherwise hand one GPU's pointer to another's kernel.
pub fn one_device(op: &'static str, views: &[&View], outs: &[&ViewMut]) -> Result<()> {
    // Nearly every op passes here once: the CPU backend's count of "launches".
    crate::device::note_op();
    let mut devices = views
        .iter()
        .map(|v| v.device())
        .chain(outs.iter().map(|o| o.as_view().device()));
    if let Some(first) = devices.next() {
        if devices.any(|d| !d.same_as(&first)) {
            return Err(mismatch(op, views, outs));
        }
    }
    Ok(())
}

/// Checks that `shape` is exactly `expected`.
pub(crate) fn expect_shape(op: &'static str, what: &str, shape: &[usize], expected: &[usize]) -> Result<()> {
    if shape != expected {
        return Err(Error::shape(op, what, expected, shape));
    }
    Ok(())
}

/// A new, uninitialised tensor on the device and dtype of `like`.
pub(crate) fn alloc_like(like: &View, shape: &[usize]) -> Result<Tensor> {
    Tensor::uninit(shape, like.dtype(), &like.device())
}
