//! Datasets and observation models of the paper's experiments.

pub mod cifar10;
pub mod fashion_mnist;
pub mod manifold;
/// 2-D axial MRI slices from NIfTI head volumes, scaled to `[-2, 2]` (method.md §7.3).
pub mod mri;
/// A NIfTI-1 volume reader (`.nii`, `.nii.gz`), checked against forged headers.
pub mod nifti;
pub mod png_images;
