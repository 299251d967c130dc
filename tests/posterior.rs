//! Closed forms for posterior sampling: with a Gaussian prior N(mu, Sigma) and y = A x + noise,
//! MMPS with the Tweedie covariance and converged CG is the exact posterior denoiser, so DDPM
//! sampling must reproduce the analytic posterior N(mu_post, Sigma_post):
//!   Sigma_post = (Sigma^-1 + A^T A / s^2)^-1,  mu_post = Sigma_post (Sigma^-1 mu + A^T y / s^2).
//! Tolerances come from the sample size (Monte-Carlo standard errors), plus a small allowance
//! for the sampler's time discretisation.

mod common;

use common::{check_gaussian_samples, gaussian_posterior, random_vec};
use emprior::diffusion::{Denoise, Sampler, SamplerKind, VeSchedule};
use emprior::gaussian::linalg::spd_inverse;
use emprior::gaussian::{Dplr, Gaussian};
use emprior::ops::Philox;
use emprior::posterior::{
    cg, cg_checked, CgConfig, Covariance, DenseOperators, LinearOperator, Mmps, ObservationNoise,
    SharedOperator,
};
use emprior::{AsView, DType, Device, Tensor};

const CPU: Device = Device::Cpu;

fn randn(seed: u64, n: usize) -> Vec<f64> {
    let mut z = vec![0.0f32; n];
    Philox::new(seed, 77).fill_normal(0, &mut z);
    z.iter().map(|&v| v as f64).collect()
}

struct Problem {
    d: usize,
    m: usize,
    prior: Gaussian,
    sigma_dense: Vec<f64>,
    a: Vec<f64>,
    y: Vec<f64>,
    noise_std: f64,
}

fn problem(seed: u64, d: usize, m: usize, noise_std: f64) -> Problem {
    let mean = randn(seed, d);
    let l: Vec<f64> = randn(seed + 1, d * d)
        .iter()
        .map(|v| v / (d as f64).sqrt())
        .collect();
    let mut c = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            c[i * d + j] =
                (0..d).map(|k| l[i * d + k] * l[j * d + k]).sum::<f64>() + if i == j { 0.1 } else { 0.0 };
        }
    }
    let prior = Gaussian::new(mean, Dplr::from_dense(&c, d, 0.05).unwrap()).unwrap();
    // Unit-norm rows, as the manifold experiment's operators.
    let mut a = randn(seed + 2, m * d);
    for r in 0..m {
        let n = a[r * d..(r + 1) * d].iter().map(|v| v * v).sum::<f64>().sqrt();
        a[r * d..(r + 1) * d].iter_mut().for_each(|v| *v /= n);
    }
    let x_true = randn(seed + 3, d);
    let y: Vec<f64> = (0..m)
        .map(|r| (0..d).map(|j| a[r * d + j] * x_true[j]).sum::<f64>() + noise_std * randn(seed + 4, m)[r])
        .collect();
    Problem {
        d,
        m,
        sigma_dense: c,
        prior,
        a,
        y,
        noise_std,
    }
}

fn analytic_posterior(p: &Problem) -> (Vec<f64>, Vec<f64>) {
    gaussian_posterior(
        &p.prior.mean,
        &p.sigma_dense,
        &p.a,
        &p.y,
        p.noise_std * p.noise_std,
        None,
    )
}

fn run_mmps(p: &Problem, op: &dyn LinearOperator, k: usize, seed: u64) -> Vec<f64> {
    let y = Tensor::from_f64(&p.y.repeat(k), &[k, p.m], &CPU).unwrap();
    let noise = ObservationNoise::Scalar(p.noise_std * p.noise_std);
    let cg_cfg = CgConfig {
        max_iters: 4 * p.m,
        rtol: Some(1e-8),
    };
    let mut mmps = Mmps::new(&p.prior, op, &y, &noise, cg_cfg);
    mmps.covariance = Covariance::Tweedie;
    let sampler = Sampler::new(
        SamplerKind::Ddpm,
        256,
        VeSchedule::new(1e-3, 30.0),
        Philox::new(seed, 5),
    );
    let mean = p.prior.mean_tensor(DType::F64, &CPU).unwrap();
    let x = sampler
        .sample(
            &mut mmps,
            &[k, p.d],
            Some(&mean.as_view().unwrap()),
            DType::F64,
            &CPU,
        )
        .unwrap();
    x.to_vec_f64().unwrap()
}

#[test]
fn mmps_with_a_gaussian_prior_samples_the_exact_posterior() {
    // d = 8 with a shared operator, d = 32 with the same matrix given per observation; the
    // sample sizes set the standard errors the checks use.
    for (seed, d, m, k, per_observation) in [
        (10u64, 8usize, 3usize, 4000usize, false),
        (20, 32, 20, 2000, true),
    ] {
        let p = problem(seed, d, m, 0.1);
        let (mean, cov) = analytic_posterior(&p);
        let samples = if per_observation {
            let dense =
                DenseOperators::new(Tensor::from_f64(&p.a.repeat(k), &[k, m, d], &CPU).unwrap()).unwrap();
            run_mmps(&p, &dense, k, seed)
        } else {
            let shared = SharedOperator::new(Tensor::from_f64(&p.a, &[m, d], &CPU).unwrap()).unwrap();
            run_mmps(&p, &shared, k, seed)
        };
        let label = if per_observation {
            "per-observation A"
        } else {
            "shared A"
        };
        check_gaussian_samples(
            &format!("d={d} m={m} {label}, {k} samples"),
            &samples,
            k,
            d,
            &mean,
            &cov,
        );
    }
}

#[test]
fn the_posterior_denoiser_is_exact_at_every_noise_level() {
    // E[x | x_t, y] for a Gaussian prior, in closed form, against MMPS with converged CG (no
    // sampling, so the tolerance is numerical).
    let p = problem(3, 10, 4, 0.05);
    let (d, m) = (p.d, p.m);
    let shared = SharedOperator::new(Tensor::from_f64(&p.a, &[m, d], &CPU).unwrap()).unwrap();
    let y = Tensor::from_f64(&p.y, &[1, m], &CPU).unwrap();
    let noise = ObservationNoise::Scalar(p.noise_std * p.noise_std);
    for (covariance, name) in [
        (Covariance::Tweedie, "tweedie"),
        (Covariance::Gaussian(Box::new(p.prior.clone())), "gaussian"),
    ] {
        let mut mmps = Mmps::new(
            &p.prior,
            &shared,
            &y,
            &noise,
            CgConfig {
                max_iters: 50,
                rtol: Some(1e-13),
            },
        );
        mmps.covariance = covariance;
        for sigma in [0.01, 0.3, 3.0] {
            let x_t = randn(40, d);
            let got = mmps
                .denoise(&Tensor::from_f64(&x_t, &[1, d], &CPU).unwrap(), sigma)
                .unwrap()
                .to_vec_f64()
                .unwrap();
            // Closed form: x ~ N(mu, S), x_t = x + sigma z, y = A x + n: E[x | x_t, y] is the
            // mean of the Gaussian posterior given both.
            let s2 = p.noise_std * p.noise_std;
            let (want, _) = gaussian_posterior(
                &p.prior.mean,
                &p.sigma_dense,
                &p.a,
                &p.y,
                s2,
                Some((&x_t, sigma * sigma)),
            );
            for i in 0..d {
                assert!(
                    (got[i] - want[i]).abs() < 1e-8 * (1.0 + want[i].abs()),
                    "{name} sigma={sigma}: [{i}] {} vs {}",
                    got[i],
                    want[i]
                );
            }
        }
    }
}

#[test]
fn batched_cg_solves_each_system_and_skips_converged_rows() {
    // Row-wise SPD systems M_b = diag(1..m) * (b + 1), one per row.
    let (rows, m) = (3, 6);
    let b: Vec<f64> = random_vec(5, rows * m, -1.0, 1.0)
        .iter()
        .map(|&v| v as f64)
        .collect();
    let mut b_t = b.clone();
    b_t[m..2 * m].iter_mut().for_each(|v| *v = 0.0); // a zero right-hand side converges at once
    let bt = Tensor::from_f64(&b_t, &[rows, m], &CPU).unwrap();
    let diag: Vec<f64> = (0..rows)
        .flat_map(|r| (0..m).map(move |i| (i + 1) as f64 * (r + 1) as f64))
        .collect();
    let dt = Tensor::from_f64(&diag, &[rows, m], &CPU).unwrap();
    let matvec = |v: &Tensor| emprior::ops::mul(v, &dt);
    let config = CgConfig {
        max_iters: 20,
        rtol: Some(1e-12),
    };
    // Checked every iteration, the solve stops as soon as it converges.
    let (x, stats) = cg_checked(matvec, &bt, config, 1).unwrap();
    assert!(
        stats.iterations <= m,
        "a diagonal system with m distinct values converges in m steps: {stats:?}"
    );
    // Checked every 5 (the default), it stops at the first check after that, still converged.
    let (x5, stats5) = cg(matvec, &bt, config).unwrap();
    assert_eq!(
        stats5.iterations,
        m.div_ceil(5) * 5,
        "stops at the first check past convergence: {stats5:?}"
    );
    assert!(stats5.worst_relative_residual.unwrap() <= 1e-12, "{stats5:?}");
    for x in [x, x5] {
        let x = x.to_vec_f64().unwrap();
        for i in 0..rows * m {
            assert!(
                (x[i] - b_t[i] / diag[i]).abs() < 1e-10,
                "[{i}] {} vs {}",
                x[i],
                b_t[i] / diag[i]
            );
        }
    }
    // One iteration is one steepest-descent step: v = (r^T r / r^T M r) r.
    let (x1, _) = cg(
        |v: &Tensor| emprior::ops::mul(v, &dt),
        &bt,
        CgConfig {
            max_iters: 1,
            rtol: None,
        },
    )
    .unwrap();
    let x1 = x1.to_vec_f64().unwrap();
    for r in [0usize, 2] {
        let row = &b_t[r * m..(r + 1) * m];
        let rr: f64 = row.iter().map(|v| v * v).sum();
        let rmr: f64 = row.iter().zip(&diag[r * m..]).map(|(v, d)| v * v * d).sum();
        for i in 0..m {
            assert!((x1[r * m + i] - rr / rmr * row[i]).abs() < 1e-12);
        }
    }
}

#[test]
fn operators_have_exact_adjoints() {
    let (b, m, d) = (3, 4, 7);
    let a = Tensor::from_f64(&randn(1, b * m * d), &[b, m, d], &CPU).unwrap();
    let x = Tensor::from_f64(&randn(2, b * d), &[b, d], &CPU).unwrap();
    let u = Tensor::from_f64(&randn(3, b * m), &[b, m], &CPU).unwrap();
    let dense = DenseOperators::new(a).unwrap();
    let shared = SharedOperator::new(Tensor::from_f64(&randn(4, m * d), &[m, d], &CPU).unwrap()).unwrap();
    let mask_bits: Vec<f32> = (0..b * 7).map(|i| (i % 3 != 0) as u8 as f32).collect();
    let mask =
        emprior::posterior::MaskOperator::from_pixel_mask(&mask_bits, b, 7, 1, DType::F64, &CPU).unwrap();
    let u_mask = Tensor::from_f64(&randn(5, b * d), &[b, d], &CPU).unwrap();
    for (name, op, u) in [
        ("dense", &dense as &dyn LinearOperator, &u),
        ("shared", &shared, &u),
        ("mask", &mask, &u_mask),
    ] {
        let ax = op.apply(&x.as_view().unwrap()).unwrap().to_vec_f64().unwrap();
        let atu = op.adjoint(&u.as_view().unwrap()).unwrap().to_vec_f64().unwrap();
        let lhs: f64 = ax.iter().zip(u.to_vec_f64().unwrap()).map(|(p, q)| p * q).sum();
        let rhs: f64 = atu.iter().zip(x.to_vec_f64().unwrap()).map(|(p, q)| p * q).sum();
        assert!(
            (lhs - rhs).abs() < 1e-12 * lhs.abs().max(1.0),
            "{name}: {lhs} vs {rhs}"
        );
    }
}

#[test]
fn every_sampler_draws_a_gaussian_prior() {
    let p = problem(50, 6, 1, 0.1);
    let k = 4000;
    let mean = p.prior.mean_tensor(DType::F64, &CPU).unwrap();
    for (kind, steps) in [
        (SamplerKind::Ddpm, 256),
        (SamplerKind::Ddim, 256),
        (
            SamplerKind::Pc {
                corrections: 1,
                tau: 0.1,
            },
            128,
        ),
    ] {
        let sampler = Sampler::new(kind, steps, VeSchedule::new(1e-3, 30.0), Philox::new(9, 1));
        let mut prior = p.prior.clone();
        let x = sampler
            .sample(
                &mut prior,
                &[k, 6],
                Some(&mean.as_view().unwrap()),
                DType::F64,
                &CPU,
            )
            .unwrap();
        check_gaussian_samples(
            &format!("{kind:?} prior samples"),
            &x.to_vec_f64().unwrap(),
            k,
            6,
            &p.prior.mean,
            &p.sigma_dense,
        );
    }
}

#[test]
fn woodbury_solves_and_ppca_recovers_a_low_rank_covariance() {
    use emprior::gaussian::ppca;
    // Sigma = 0.2 I + U U^T, rank 3 in 10 dimensions.
    let (d, r) = (10, 3);
    let u = randn(60, d * r);
    let cov = Dplr::new(vec![0.2; d], u.clone(), r).unwrap();
    let dense = cov.dense();
    for shift in [0.0, 0.5, 100.0] {
        let v = randn(61, 2 * d);
        let got = cov
            .shifted_inverse(shift, DType::F64, &CPU)
            .unwrap()
            .apply(&Tensor::from_f64(&v, &[2, d], &CPU).unwrap().as_view().unwrap())
            .unwrap()
            .to_vec_f64()
            .unwrap();
        let mut shifted = dense.clone();
        (0..d).for_each(|i| shifted[i * d + i] += shift);
        let inv = spd_inverse(&shifted, d).unwrap();
        for row in 0..2 {
            for i in 0..d {
                let want: f64 = (0..d).map(|j| inv[i * d + j] * v[row * d + j]).sum();
                assert!(
                    (got[row * d + i] - want).abs() < 1e-10 * (1.0 + want.abs()),
                    "shift {shift}"
                );
            }
        }
    }
    // Draw samples from N(m, Sigma) and fit: the covariance comes back within sampling error.
    let n = 20_000;
    let l = emprior::gaussian::linalg::cholesky(&dense, d).unwrap();
    let z = randn(62, n * d);
    let m = randn(63, d);
    let samples: Vec<f64> = (0..n * d)
        .map(|k| {
            m[k % d]
                + (0..=k % d)
                    .map(|j| l[(k % d) * d + j] * z[(k / d) * d + j])
                    .sum::<f64>()
        })
        .collect();
    let fit = ppca(&samples, n, d, r).unwrap();
    let got = fit.cov.dense();
    let scale = (0..d).map(|i| dense[i * d + i]).fold(0.0, f64::max);
    for i in 0..d * d {
        assert!(
            (got[i] - dense[i]).abs() < 0.05 * scale,
            "ppca covariance [{i}]: {} vs {}",
            got[i],
            dense[i]
        );
    }
    for (fitted, truth) in fit.mean.iter().zip(&m) {
        assert!((fitted - truth).abs() < 0.05 * scale.sqrt());
    }
    assert!(
        (fit.cov.diag[0] - 0.2).abs() < 0.02,
        "noise floor {}",
        fit.cov.diag[0]
    );
    // Fewer samples than dimensions: the Gram-matrix path.
    let few = ppca(&samples[..8 * d], 8, d, 3).unwrap();
    assert_eq!((few.cov.rank, few.cov.dim()), (3, d));
}

#[test]
fn dps_pulls_samples_towards_the_observation() {
    use emprior::posterior::Dps;
    let p = problem(70, 6, 2, 0.05);
    let k = 500;
    let op = SharedOperator::new(Tensor::from_f64(&p.a, &[p.m, p.d], &CPU).unwrap()).unwrap();
    let y = Tensor::from_f64(&p.y.repeat(k), &[k, p.m], &CPU).unwrap();
    let sampler = Sampler::new(
        SamplerKind::Ddpm,
        128,
        VeSchedule::new(1e-3, 30.0),
        Philox::new(2, 2),
    );
    let mean = p.prior.mean_tensor(DType::F64, &CPU).unwrap();
    let misfit = |x: &Tensor| -> f64 {
        let ax = op.apply(&x.as_view().unwrap()).unwrap().to_vec_f64().unwrap();
        ax.iter()
            .enumerate()
            .map(|(i, v)| (v - p.y[i % p.m]).powi(2))
            .sum::<f64>()
            / k as f64
    };
    let mut prior = p.prior.clone();
    let free = sampler
        .sample(
            &mut prior,
            &[k, p.d],
            Some(&mean.as_view().unwrap()),
            DType::F64,
            &CPU,
        )
        .unwrap();
    let before = misfit(&free);
    let mut last = before;
    for zeta in [1.0, 5.0, 25.0] {
        let mut dps = Dps {
            prior: &p.prior,
            operator: &op,
            y: &y,
            zeta,
        };
        let guided = sampler
            .sample(
                &mut dps,
                &[k, p.d],
                Some(&mean.as_view().unwrap()),
                DType::F64,
                &CPU,
            )
            .unwrap();
        let after = misfit(&guided);
        println!("DPS zeta {zeta}: misfit {before:.4} -> {after:.4}");
        assert!(
            after < last,
            "a larger step must fit the observation better: {last:.4} -> {after:.4} at zeta {zeta}"
        );
        last = after;
    }
    assert!(
        last < 0.1 * before,
        "DPS must fit the observation: misfit {before:.3} -> {last:.3}"
    );
}

#[test]
fn randomized_ppca_agrees_with_the_exact_fit() {
    use emprior::gaussian::{ppca, ppca_randomized};
    // 40 dimensions, a rank-4 signal over a 0.1 noise floor.
    let (n, d, r) = (3000, 40, 4);
    let u = randn(80, d * r);
    let z = randn(81, n * r);
    let e = randn(82, n * d);
    let m = randn(83, d);
    let samples: Vec<f64> = (0..n * d)
        .map(|k| {
            let (i, j) = (k / d, k % d);
            m[j] + (0..r).map(|c| u[j * r + c] * z[i * r + c]).sum::<f64>() + 0.1f64.sqrt() * e[k]
        })
        .collect();
    let exact = ppca(&samples, n, d, r).unwrap();
    for dtype in [DType::F64, DType::F32] {
        let t = Tensor::from_f64_as(&samples, &[n, d], dtype, &CPU).unwrap();
        let fast = ppca_randomized(&t.as_view().unwrap(), r, 8, 6, 1).unwrap();
        let (ce, cf) = (exact.cov.dense(), fast.cov.dense());
        let scale = ce.iter().map(|v| v.abs()).fold(0.0, f64::max);
        let tol = if dtype == DType::F64 { 1e-6 } else { 1e-4 };
        for i in 0..d * d {
            assert!(
                (ce[i] - cf[i]).abs() < tol * scale,
                "{dtype:?} covariance [{i}]: {} vs {}",
                cf[i],
                ce[i]
            );
        }
        for j in 0..d {
            assert!((exact.mean[j] - fast.mean[j]).abs() < tol * scale);
        }
        assert!(
            (exact.cov.diag[0] - fast.cov.diag[0]).abs() < tol * scale,
            "noise floor"
        );
    }
}

/// The CPU backend samples an E-step batch in parts, one per core (ops::parallel::map_parts);
/// that is only sound if each row's sample depends on nothing but its own observation. Here a
/// TimeMLP prior with MMPS (Tweedie covariance, CG with a relative tolerance that some rows
/// reach before others) and a PC sampler draw 37 rows whole and in parts of 1, 8 and 16 rows,
/// run sequentially and through map_parts: every way gives the same bits.
#[test]
fn a_batch_sampled_in_parts_gives_the_bits_of_the_whole() {
    use emprior::diffusion::{BatchPart, Denoiser, Network};
    use emprior::nn::TimeMlp;
    use emprior::posterior::NetworkPrior;
    let (rows, d, m) = (37usize, 5usize, 2usize);
    let denoiser = Denoiser::new(Network::Mlp(TimeMlp::new(d, &[64, 64], 16)));
    let params = denoiser.layout().init(11, DType::F32, &CPU).unwrap();
    let prior = NetworkPrior::new(&denoiser, &params).unwrap();
    let a = randn(21, rows * m * d);
    let y: Vec<f64> = randn(22, rows * m).iter().map(|v| 0.5 * v).collect();
    let noise = ObservationNoise::Scalar(0.05f64.powi(2));
    let cg = CgConfig {
        max_iters: 10,
        rtol: Some(1e-2),
    };
    let sampler = Sampler::new(
        SamplerKind::Pc {
            corrections: 1,
            tau: 0.1,
        },
        6,
        VeSchedule::new(1e-3, 10.0),
        Philox::new(5, 3),
    );
    let mean = Tensor::from_f64_as(&[0.1, -0.2, 0.3, 0.0, 0.5], &[d], DType::F32, &CPU).unwrap();
    let part = |range: std::ops::Range<usize>| -> Vec<f32> {
        let (lo, hi) = (range.start, range.end);
        let a = Tensor::from_f64_as(&a[lo * m * d..hi * m * d], &[hi - lo, m, d], DType::F32, &CPU).unwrap();
        let y = Tensor::from_f64_as(&y[lo * m..hi * m], &[hi - lo, m], DType::F32, &CPU).unwrap();
        let ops = DenseOperators::new(a).unwrap();
        let mut mmps = Mmps::new(&prior, &ops, &y, &noise, cg);
        let at = BatchPart {
            first: lo,
            total: rows,
        };
        let mv = mean.as_view().unwrap();
        let x = sampler
            .sample_part(&mut mmps, &[hi - lo, d], at, Some(&mv), DType::F32, &CPU)
            .unwrap();
        x.to_vec_f32().unwrap()
    };
    let whole = part(0..rows);
    assert!(whole.iter().all(|v| v.is_finite()));
    for part_rows in [1, 8, 16] {
        let sequential: Vec<f32> = (0..rows)
            .step_by(part_rows)
            .flat_map(|s| part(s..(s + part_rows).min(rows)))
            .collect();
        let parallel: Vec<f32> = emprior::ops::parallel::map_parts(rows, part_rows, part)
            .into_iter()
            .flatten()
            .collect();
        for (what, got) in [("sequential", sequential), ("map_parts", parallel)] {
            let same = whole.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same && got.len() == whole.len(),
                "parts of {part_rows} rows ({what}) differ from the whole batch"
            );
        }
    }
}

/// With a relative tolerance, a row that has converged stops moving (a 0 step size, decided on
/// the device), so each row's solution is the same bits whether it is solved alone or beside
/// rows that need more iterations.
#[test]
fn cg_rows_converge_on_their_own() {
    let m = 6;
    // Row 0: a well-conditioned system; row 1: a spread spectrum that needs all m iterations.
    let diag: Vec<f64> = (0..m)
        .map(|i| 1.0 + 0.01 * i as f64)
        .chain((0..m).map(|i| 10f64.powi(i as i32 - 2)))
        .collect();
    let b: Vec<f64> = random_vec(9, 2 * m, -1.0, 1.0)
        .iter()
        .map(|&v| v as f64)
        .collect();
    let config = CgConfig {
        max_iters: 12,
        rtol: Some(1e-3),
    };
    let solve_checked = |rows: std::ops::Range<usize>, check_every: usize| -> (Vec<f32>, usize) {
        let n = rows.len();
        let bt = Tensor::from_f64_as(&b[rows.start * m..rows.end * m], &[n, m], DType::F32, &CPU).unwrap();
        let dt = Tensor::from_f64_as(&diag[rows.start * m..rows.end * m], &[n, m], DType::F32, &CPU).unwrap();
        let (x, stats) =
            cg_checked(|v: &Tensor| emprior::ops::mul(v, &dt), &bt, config, check_every).unwrap();
        (x.to_vec_f32().unwrap(), stats.iterations)
    };
    let solve = |rows| solve_checked(rows, 1).0;
    let both = solve(0..2);
    let (alone0, alone1) = (solve(0..1), solve(1..2));
    assert_eq!(&both[..m], &alone0[..], "the fast row moved after it converged");
    assert_eq!(&both[m..], &alone1[..]);
    // Never read on the host (check_every 0, as a step replayed from a CUDA graph solves): all
    // 12 iterations run, and each row still stops at the tolerance, so the same bits.
    let (quiet, iterations) = solve_checked(0..2, 0);
    assert_eq!(iterations, 12);
    assert_eq!(
        quiet, both,
        "rows kept moving past the tolerance without host checks"
    );
    let (early, _) = solve_checked(0..1, 0);
    assert_eq!(early, alone0);
    // And it did converge: the relative residual is within the tolerance.
    let res: f64 = (0..m)
        .map(|i| (b[i] - diag[i] * both[i] as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let bn: f64 = b[..m].iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!(res <= 1e-3 * bn * 1.01, "row 0: {res} vs {}", 1e-3 * bn);
}

/// CG meeting a direction of non-positive (or, with a floor, too little) curvature stops that row
/// where it is instead of stepping along it, the other rows untouched: an indefinite diagonal
/// system (plain CG's first step, rr / pAp = 2 / -0.0001, would land 20 000 times b away) beside
/// an SPD one, whose iterates the guard leaves bit for bit as they were.
#[test]
fn cg_stops_a_row_at_bad_curvature_and_leaves_the_others_alone() {
    use emprior::posterior::cg_floored;
    let m = 4;
    // Row 0: SPD, spectrum 0.5..2. Row 1: eigenvalues 1, -1.0001, 3, 0.5 and b = (1, 1, 0, 0),
    // so the curvature along b is -0.0001.
    let diag = [0.5, 1.0, 1.5, 2.0, 1.0, -1.0001, 3.0, 0.5];
    let b = [1.0, -1.0, 0.5, 2.0, 1.0, 1.0, 0.0, 0.0];
    let bt = Tensor::from_f64(&b, &[2, m], &CPU).unwrap();
    let dt = Tensor::from_f64(&diag, &[2, m], &CPU).unwrap();
    let config = CgConfig {
        max_iters: 4,
        rtol: None,
    };
    let matvec = |v: &Tensor| emprior::ops::mul(v, &dt);
    let (x, _) = cg_floored(matvec, &bt, config, 0, false, 0.0).unwrap();
    let x = x.to_vec_f64().unwrap();
    // The SPD row alone, through the unguarded entry point: the same bits.
    let b0 = Tensor::from_f64(&b[..m], &[1, m], &CPU).unwrap();
    let d0 = Tensor::from_f64(&diag[..m], &[1, m], &CPU).unwrap();
    let (alone, _) = cg_checked(|v: &Tensor| emprior::ops::mul(v, &d0), &b0, config, 0).unwrap();
    assert_eq!(&x[..m], &alone.to_vec_f64().unwrap()[..]);
    for i in 0..m {
        assert!(
            (x[i] - b[i] / diag[i]).abs() < 1e-9,
            "row 0 solved: {:?}",
            &x[..m]
        );
    }
    // Row 1: the first step is refused, so the row stays at 0.
    assert!(
        x[m..].iter().all(|v| v.abs() < 1e-12),
        "row 1 stopped at 0: {:?}",
        &x[m..]
    );
    // With a floor, a positive but too small curvature stops a row too: eigenvalues 1e-3 under
    // a floor of 1e-2 (as MMPS sets from Σ_y).
    let small = Tensor::from_f64(&[1e-3, 1e-3, 1e-3, 1e-3], &[1, m], &CPU).unwrap();
    let floored = |floor: f64| -> Vec<f64> {
        let matvec = |v: &Tensor| emprior::ops::mul(v, &small);
        let (x, _) = cg_floored(matvec, &b0, config, 0, false, floor).unwrap();
        x.to_vec_f64().unwrap()
    };
    assert!(floored(1e-2).iter().all(|v| *v == 0.0));
    let x = floored(1e-4);
    assert!((x[0] - 1e3).abs() < 1e-6, "above the floor, CG solves");
}

/// The same for the image experiments' E-step: a small U-Net (with attention) and MMPS through
/// masks, DDPM, CG without a tolerance; 5 images whole and in parts of 1 and 2.
#[test]
fn an_image_batch_sampled_in_parts_gives_the_bits_of_the_whole() {
    use emprior::diffusion::{BatchPart, Denoiser, Network};
    use emprior::nn::UNet;
    use emprior::posterior::{MaskOperator, NetworkPrior};
    let (rows, h, w, c) = (5usize, 8usize, 8usize, 3usize);
    let per = h * w * c;
    let denoiser = Denoiser::new(Network::UNet(UNet::new(common::small_unet_config()).unwrap()));
    let params = denoiser.layout().init(12, DType::F32, &CPU).unwrap();
    let prior = NetworkPrior::new(&denoiser, &params).unwrap();
    let masks: Vec<f32> = random_vec(23, rows * h * w, 0.0, 1.0)
        .iter()
        .map(|&u| (u < 0.4) as u8 as f32)
        .collect();
    let y: Vec<f32> = random_vec(24, rows * per, -1.0, 1.0);
    let noise = ObservationNoise::Scalar(1e-3f64.powi(2));
    let cg = CgConfig {
        max_iters: 2,
        rtol: None,
    };
    let sampler = Sampler::new(
        SamplerKind::Ddpm,
        3,
        VeSchedule::new(1e-3, 100.0),
        Philox::new(6, 1),
    );
    let part = |range: std::ops::Range<usize>| -> Vec<f32> {
        let (lo, hi) = (range.start, range.end);
        let n = hi - lo;
        let y = Tensor::from_f32(&y[lo * per..hi * per], &[n, per], &CPU).unwrap();
        let op = MaskOperator::from_pixel_mask(&masks[lo * h * w..hi * h * w], n, h * w, c, DType::F32, &CPU)
            .unwrap();
        let mut mmps = Mmps::new(&prior, &op, &y, &noise, cg);
        let at = BatchPart {
            first: lo,
            total: rows,
        };
        sampler
            .sample_part(&mut mmps, &[n, h, w, c], at, None, DType::F32, &CPU)
            .unwrap()
            .to_vec_f32()
            .unwrap()
    };
    let whole = part(0..rows);
    assert!(whole.iter().all(|v| v.is_finite()));
    for part_rows in [1, 2] {
        let got: Vec<f32> = emprior::ops::parallel::map_parts(rows, part_rows, part)
            .into_iter()
            .flatten()
            .collect();
        let same = whole.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same && got.len() == whole.len(),
            "parts of {part_rows} images differ from the whole batch"
        );
    }
}

/// A NaN among the samples to fit is refused by name (it used to panic in the eigen-solver's
/// sort), and the eigen-solver itself sorts a NaN without panicking.
#[test]
fn ppca_refuses_non_finite_samples() {
    use emprior::gaussian::linalg::symmetric_eigen;
    use emprior::gaussian::ppca;
    let mut x = randn(31, 40 * 3);
    x[7 * 3 + 2] = f64::NAN;
    let Err(e) = ppca(&x, 40, 3, 2) else {
        panic!("a NaN sample was accepted")
    };
    let e = e.to_string();
    assert!(e.contains("sample 7") && e.contains("NaN"), "{e}");
    let (values, _) = symmetric_eigen(&[1.0, 0.0, 0.0, f64::NAN], 2);
    assert_eq!(values.len(), 2);
}
