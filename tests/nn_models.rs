//! The paper's networks: parameter counts (method.md §3.4) and layouts.

use emprior::nn::{TimeMlp, UNet, UNetConfig};

#[test]
fn parameter_counts_match_the_paper_networks() {
    assert_eq!(TimeMlp::new(5, &[256, 256, 256], 64).layout.len(), 150_789);
    let cifar = UNet::new(UNetConfig::cifar10()).unwrap();
    println!("{}", cifar.describe());
    assert_eq!(cifar.layout.len(), 57_560_451);
    let mri = UNet::new(UNetConfig::mri()).unwrap();
    println!("{}", mri.describe());
    assert_eq!(mri.layout.len(), 77_648_912);
}
