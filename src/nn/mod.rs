//! Layers and networks with explicit backward passes: no tape, no graph. Each layer's `forward`
//! returns what its backward needs; `backward` returns the input gradient and, when given a
//! gradient buffer, accumulates (`+=`) its parameter gradients there. A VJP is the backward
//! without parameter gradients; MMPS runs one forward and then any number of VJPs against the
//! same saved activations.
//!
//! Layout: channels-last (NHWC), parameters in one flat buffer ([`params`]). Each file holds a
//! layer family's CPU bodies (generic over f32/f64: the oracle, and f64 for finite differences)
//! and its CUDA launches.

pub mod attention;
pub mod blocks;
pub mod conv;
pub mod dropout;
pub mod embedding;
pub mod linear;
pub mod mlp;
pub mod norm;
pub mod params;
pub mod resample;
pub mod tensor_cores;
pub mod unet;

pub use conv::Conv3x3;
pub use linear::Linear;
pub use mlp::TimeMlp;
pub use norm::LnSaved;
pub use params::{Bf16Weight, Init, ParamId, ParamLayout, ParamSpec, Weights};
pub use unet::{UNet, UNetConfig};

use crate::ops::Philox;

/// Training (dropout on, driven by a Philox stream) or evaluation (dropout off, as when sampling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Evaluation: dropout off.
    Eval,
    /// Dropout masks come from `rng`; every dropout layer uses its own element offset range.
    Train {
        /// The Philox key every dropout mask of the step is drawn from.
        rng: Philox,
        /// The first row of this batch within the step's batch (diffusion::BatchPart): a batch
        /// run in row parts draws each row's masks from where the whole batch would.
        first_row: u64,
    },
}
