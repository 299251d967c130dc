//! Poison mode (src/device/poison.rs): every test run is poisoned (`.cargo/config.toml` sets
//! EMPRIOR_POISON=1), so uninitialised buffers are NaN and an op that reads its output before
//! writing it fails the CPU tests. These tests check the mode is on and that a planted
//! read-before-write is caught.

use emprior::ops::{gemm_into, GemmSpec};
use emprior::{poison_enabled, DType, Device, Tensor};

#[test]
fn every_cargo_test_run_is_poisoned() {
    assert!(
        poison_enabled(),
        "poison mode is off: cargo should set EMPRIOR_POISON=1 (.cargo/config.toml); a test binary \
         run by hand needs EMPRIOR_POISON=1 in its environment"
    );
}

#[test]
fn uninitialised_tensors_are_nan_and_zeros_are_zero() {
    for dtype in [DType::F32, DType::F64] {
        let t = Tensor::uninit(&[3, 5], dtype, &Device::Cpu).unwrap();
        let values = t.host_values();
        assert!(values.iter().all(|v| v.is_nan()), "{dtype:?} uninit: {values:?}");
        let z = Tensor::zeros(&[3, 5], dtype, &Device::Cpu).unwrap();
        assert!(z.host_values().iter().all(|&v| v == 0.0), "{dtype:?} zeros");
    }
}

/// A planted bug: a GEMM told to accumulate into C (beta = 1) when C was never written. With
/// zeros for uninitialised memory this passes silently; poisoned, the result is NaN.
#[test]
fn a_planted_read_before_write_is_caught() {
    let dev = Device::Cpu;
    let a = Tensor::from_f32(&[1.0, 2.0, 3.0, 4.0], &[2, 2], &dev).unwrap();
    let b = Tensor::from_f32(&[1.0, 0.0, 0.0, 1.0], &[2, 2], &dev).unwrap();
    let accumulate = GemmSpec {
        beta: 1.0,
        ..GemmSpec::default()
    };

    let mut c = Tensor::uninit(&[2, 2], DType::F32, &dev).unwrap();
    gemm_into(&a, &b, &mut c, accumulate).unwrap();
    let got = c.to_vec_f32().unwrap();
    assert!(
        got.iter().all(|v| v.is_nan()),
        "the read of an unwritten C went unseen: {got:?}"
    );

    // The correct op (beta = 0 never reads C) is untouched by the poison.
    let mut c = Tensor::uninit(&[2, 2], DType::F32, &dev).unwrap();
    gemm_into(&a, &b, &mut c, GemmSpec::default()).unwrap();
    assert_eq!(c.to_vec_f32().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
}

trait HostValues {
    fn host_values(&self) -> Vec<f64>;
}

impl HostValues for Tensor {
    fn host_values(&self) -> Vec<f64> {
        match self.dtype() {
            DType::F32 => self.to_vec_f32().unwrap().into_iter().map(f64::from).collect(),
            _ => self.to_vec_f64().unwrap(),
        }
    }
}
