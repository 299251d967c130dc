//! Datasets and observation models of the paper's experiments.

pub mod cifar10;
pub mod fashion_mnist;
pub mod manifold;
pub mod png_images;
