//! The op set. Every op has a CPU body (plain Rust, the oracle the kernels are checked against)
//! and a CUDA launch, side by side in the file of its family; the public function checks shapes,
//! dtypes and devices once and dispatches on where the operands live.
//!
//! Conventions: `op_into(inputs.., out)` writes a caller-provided output (hot loops reuse their
//! buffers); `op(inputs..)` allocates the output. All f32.

pub mod elementwise;
pub mod gemm;
pub mod reduce;
pub mod rng;

pub use elementwise::{
    add, add_into, axpy, fill, mul, mul_into, scale, scale_into, silu, silu_backward, silu_backward_into,
    silu_into,
};
pub use gemm::{gemm_into, matmul, GemmSpec};
pub use reduce::{row_dot, row_dot_into, row_norm, row_norm_into, sum, sum_into};
pub use rng::{normal, philox4x32_10, uniform, Philox};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// The device all operands share, after checking that they are f32.
pub(crate) fn common_device(op: &'static str, tensors: &[&Tensor]) -> Result<Device> {
    let first = tensors[0].device();
    for t in tensors {
        if t.dtype() != DType::F32 {
            return Err(t.dtype_error(op, "f32"));
        }
        let d = t.device();
        if !d.same_as(&first) {
            return Err(Error::DeviceMismatch {
                op,
                detail: format!("{first} and {d}"),
            });
        }
    }
    Ok(first)
}

/// Checks that `t` has exactly `expected` as its shape.
pub(crate) fn expect_shape(op: &'static str, what: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.shape() != expected {
        return Err(Error::shape(op, what, expected, t.shape()));
    }
    Ok(())
}

/// Launch failures carry the kernel's name.
pub(crate) fn launched<T>(
    kernel: &'static str,
    r: std::result::Result<T, cudarc::driver::DriverError>,
) -> Result<()> {
    r.map(drop)
        .map_err(|e| Error::cuda(format!("launching {kernel}"), e))
}
