//! Diffusion pieces: the networks as one type, and EDM preconditioning that turns a network
//! into a denoiser d(x_t, sigma) ~ E[x | x_t] with a per-sample sigma.

pub mod loss;
pub mod precond;
pub mod presets;
pub mod sampler;
pub mod schedule;

pub use precond::{Denoiser, DenoiserSaved, NetSaved, Network};
pub use presets::{preset, PRESETS};
pub use sampler::{BatchPart, Denoise, NoiseLevel, Sampler, SamplerKind};
pub use schedule::{beta33, VeSchedule};
