//! `DType`: the element types a tensor can hold, below every other module (the tensor, the
//! CPU's `Real` types and the ops all name it).

/// The element type of a tensor. Every op computes in `F32` on both backends and in `F64` on the
/// CPU (the oracle); `BF16` holds the tensor-core operands of the bf16 policy, which only the
/// bf16 GEMM and convolutions (and the casts) accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32, 4 bytes: what the GPU kernels compute in.
    F32,
    /// bfloat16, 2 bytes: tensor-core operands (f32 accumulation).
    BF16,
    /// IEEE binary64, 8 bytes: the CPU oracle's type; GPU ops do not accept it.
    F64,
}

impl DType {
    /// Bytes per element: 4, 2 or 8.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
            DType::F64 => 8,
        }
    }

    /// The lower-case name used in error messages and files: `"f32"`, `"bf16"` or `"f64"`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
        }
    }
}
