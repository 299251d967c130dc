//! The embedding API (`emprior::api`) against closed forms: with a Gaussian prior MMPS is exact,
//! so posterior samples drawn through the API from host arrays match the analytic posterior's
//! mean and variance; and its inputs are checked with messages that name them.

mod common;

use common::{gaussian_posterior, spd_from};

use emprior::api::{sample_posterior, Operator, PosteriorOptions, Prior};
use emprior::ops::Philox;
use emprior::Device;

fn randn(seed: u64, n: usize) -> Vec<f64> {
    let mut z = vec![0.0f32; n];
    Philox::new(seed, 5).fill_normal(0, &mut z);
    z.iter().map(|&v| v as f64).collect()
}

#[test]
fn api_posterior_samples_match_the_gaussian_closed_form() {
    let (d, m, k) = (5usize, 2usize, 3000usize);
    let mean = randn(1, d);
    let l = randn(2, d * d);
    let c = spd_from(&l, d, 0.3);
    let a = randn(3, m * d);
    let y = randn(4, m);
    let sy = 0.1;
    let device = Device::Cpu;
    let prior = Prior::gaussian(&mean, &c).unwrap();
    // One shared operator; the observation repeated K times for K samples.
    let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
    let op = Operator::shared(&a32, m, d, &device).unwrap();
    let ys: Vec<f32> = (0..k).flat_map(|_| y.iter().map(|&v| v as f32)).collect();
    let opts = PosteriorOptions {
        steps: 256,
        cg_iters: 20,
        cg_rtol: Some(1e-5),
        seed: 3,
        sigma_range: Some((1e-3, 30.0)),
        ..PosteriorOptions::default()
    };
    let x = sample_posterior(&prior, &op, &ys, sy, &opts, &device).unwrap();
    assert_eq!(x.len(), k * d);
    let (post, cov) = gaussian_posterior(&mean, &c, &a, &y, sy * sy, None);
    for j in 0..d {
        let emp: f64 = (0..k).map(|i| x[i * d + j] as f64).sum::<f64>() / k as f64;
        let se = (cov[j * d + j] / k as f64).sqrt();
        assert!(
            (emp - post[j]).abs() < 5.0 * se + 1e-3,
            "mean[{j}] {emp} vs {}",
            post[j]
        );
        let var: f64 = (0..k).map(|i| (x[i * d + j] as f64 - emp).powi(2)).sum::<f64>() / (k - 1) as f64;
        let se_var = cov[j * d + j] * (2.0 / k as f64).sqrt();
        assert!(
            (var - cov[j * d + j]).abs() < 5.0 * se_var + 0.02 * cov[j * d + j],
            "var[{j}] {var} vs {}",
            cov[j * d + j]
        );
    }
    // The same seed gives the same bits.
    assert_eq!(x, sample_posterior(&prior, &op, &ys, sy, &opts, &device).unwrap());
}

#[test]
fn api_inputs_are_checked_with_messages() {
    let device = Device::Cpu;
    let prior = Prior::gaussian(&[0.0, 0.0], &[1.0, 0.0, 0.0, 1.0]).unwrap();
    let msg = |r: emprior::Result<Vec<f32>>| r.expect_err("refused").to_string();
    let opts = PosteriorOptions {
        steps: 4,
        ..PosteriorOptions::default()
    };
    let shared3 = Operator::shared(&[1.0; 3], 1, 3, &device).unwrap();
    assert!(
        msg(sample_posterior(&prior, &shared3, &[0.0], 0.1, &opts, &device))
            .contains("signals of 3 values, the prior gives 2")
    );
    let per = Operator::per_observation(&[1.0, 0.0, 0.0, 1.0], 2, 1, 2, &device).unwrap();
    assert!(
        msg(sample_posterior(&prior, &per, &[0.0; 3], 0.1, &opts, &device))
            .contains("3 observations for an operator of 2 rows")
    );
    assert!(msg(sample_posterior(
        &prior,
        &per,
        &[0.0, f32::NAN],
        0.1,
        &opts,
        &device
    ))
    .contains("value 1 is NaN"));
    assert!(msg(sample_posterior(&prior, &per, &[0.0; 2], -1.0, &opts, &device)).contains("sigma_y = -1"));
    let e = Operator::per_observation(&[1.0; 3], 2, 1, 2, &device)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("3 values for shape [2, 1, 2]"), "{e}");
    let e = Operator::mask(&[1.0, 0.5], 1, 2, 1, &device)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("value 1 is 0.5"), "{e}");
    let e = Prior::gaussian(&[0.0, 0.0], &[1.0, 3.0, 3.0, 1.0])
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("positive definite"), "{e}");
    let e = Prior::load(std::path::Path::new("/nonexistent/prior.safetensors"), &device)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("/nonexistent/prior.safetensors"), "{e}");
}
