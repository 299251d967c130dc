//! Datasets and observation models of the paper's experiments.

pub mod cifar10;
pub mod manifold;
