//! Datasets and observation models of the paper's experiments.

pub mod manifold;
