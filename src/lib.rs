//! emprior: learning diffusion priors from incomplete, noisy observations by
//! expectation-maximization (DiEM with MMPS posterior sampling), on handwritten CUDA kernels with
//! a plain-Rust CPU backend that is both the fallback and the oracle every kernel is checked
//! against.
//!
//! Layers of the crate, bottom up:
//! - [`device`]: the CPU or a CUDA GPU (context, one stream, kernels loaded once, memory pool);
//! - [`tensor`]: shape + dtype + storage on a device;
//! - [`ops`]: the op set, each op with a CPU body and a CUDA launch side by side;
//! - [`kernels`]: what build.rs compiled and embedded.

pub mod bench;
pub mod commands;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod em;
pub mod error;
pub mod gaussian;
pub mod io;
pub mod kernels;
pub mod metrics;
pub mod nn;
pub mod ops;
pub mod posterior;
pub mod real;
pub mod tensor;
pub mod train;

pub use device::{Device, DeviceRequest};
pub use error::{Error, Result};
pub use real::Real;
pub use tensor::{AsView, AsViewMut, DType, Tensor, View, ViewMut};
