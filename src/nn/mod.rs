//! Layers and networks with explicit backward passes: no tape, no graph. Each layer's `forward`
//! returns what its backward needs; `backward` returns the input gradient and, when given a
//! gradient buffer, accumulates (`+=`) its parameter gradients there. A VJP is the backward
//! without parameter gradients; MMPS runs one forward and then any number of VJPs against the
//! same saved activations.
//!
//! Layout: channels-last (NHWC), parameters in one flat buffer ([`params`]). Each file holds a
//! layer family's CPU bodies (generic over f32/f64: the oracle, and f64 for finite differences)
//! and its CUDA launches.

/// Runs `$body` with `$T` bound to the host float type of the view `$probe` (f32 or f64).
macro_rules! host_real {
    ($probe:expr, $T:ident => $body:expr) => {
        match $probe.dtype() {
            $crate::tensor::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::tensor::DType::F64 => {
                type $T = f64;
                $body
            }
            other => Err($crate::error::Error::DType {
                op: "host op",
                expected: "f32 or f64",
                actual: other.name(),
            }),
        }
    };
}

pub mod attention;
pub mod blocks;
pub mod conv;
pub mod dropout;
pub mod embedding;
pub mod linear;
pub mod norm;
pub mod params;
pub mod resample;

pub use conv::Conv3x3;
pub use linear::Linear;
pub use params::{Init, ParamId, ParamLayout, ParamSpec};

use crate::error::Error;
use crate::ops::Philox;

/// Training (dropout on, driven by a Philox stream) or evaluation (dropout off, as when sampling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Eval,
    /// Dropout masks come from `rng`; every dropout layer uses its own element offset range.
    Train { rng: Philox },
}

/// The error for an op that has no CUDA kernel in this build.
pub(crate) fn no_kernel(op: &str) -> Error {
    Error::Other(format!("{op}: no CUDA kernel yet; run it on the CPU"))
}

/// Bytes held by a list of saved tensors.
pub(crate) fn bytes_of(ts: &[&crate::tensor::Tensor]) -> usize {
    ts.iter().map(|t| t.size_in_bytes()).sum()
}
