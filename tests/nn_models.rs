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

#[test]
fn forward_cost_is_counted() {
    let cifar = UNet::new(UNetConfig::cifar10()).unwrap();
    let gmac = cifar.forward_macs() as f64 / 1e9;
    // method.md estimates about 9.7 GMAC per CIFAR-10 image.
    assert!((gmac - 9.7).abs() < 0.3, "cifar10 forward {gmac:.3} GMAC");
    let mri = UNet::new(UNetConfig::mri()).unwrap();
    let gmac = mri.forward_macs() as f64 / 1e9;
    assert!(
        (gmac - 40.0).abs() < 4.0,
        "mri forward {gmac:.3} GMAC (method.md: about 40)"
    );
    assert_eq!(
        TimeMlp::new(5, &[256, 256, 256], 64).forward_macs(),
        69 * 256 + 2 * 256 * 256 + 256 * 5
    );
}
