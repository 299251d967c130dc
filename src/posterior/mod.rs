//! Posterior sampling: observation operators, batched CG, and the MMPS posterior denoiser (and
//! DPS). A posterior sample is a prior sampler run with `Mmps` as its denoiser.

pub mod cg;
pub mod fourier;
pub mod mmps;
pub mod operator;

pub use cg::{cg, cg_checked, cg_floored, cg_measured, CgConfig, CgStats, DEFAULT_CHECK_EVERY};
pub use fourier::{column_masks, FourierOperator, PAPER_ACCELERATION, PAPER_CENTER_FRACTION};
pub use mmps::{Covariance, Dps, Mmps, NetworkPrior, Prior};
pub use operator::{DenseOperators, LinearOperator, MaskOperator, ObservationNoise, SharedOperator};
