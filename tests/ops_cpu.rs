//! Tier 1: every op's CPU body (the oracle) against a naive f64 computation on random inputs.

mod common;

use common::{assert_close, gemm_case, naive_gemm, random_vec, GemmCase, GEMM_CASES};
use emprior::nn::Weights;
use emprior::ops::{self, GemmSpec, Philox};
use emprior::{DType, Device, DeviceRequest, Error, Tensor};

const CPU: Device = Device::Cpu;

fn t(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_f32(data, shape, &CPU).unwrap()
}

// ---- random numbers ----------------------------------------------------------------------

#[test]
fn philox_matches_the_random123_known_answers() {
    // Known-answer vectors for Philox4x32-10 from Random123's kat_vectors.
    assert_eq!(
        ops::philox4x32_10([0, 0, 0, 0], [0, 0]),
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
    );
    assert_eq!(
        ops::philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
    );
    assert_eq!(
        ops::philox4x32_10(
            [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
            [0xa4093822, 0x299f31d0]
        ),
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
    );
}

#[test]
fn uniforms_never_reach_zero_or_one() {
    use emprior::ops::rng::uniform_from_bits;
    assert_eq!(uniform_from_bits(u32::MAX), 1.0 - 2f32.powi(-24));
    assert_eq!(uniform_from_bits(0), 2f32.powi(-24));
    assert!(uniform_from_bits(u32::MAX) < 1.0 && uniform_from_bits(0) > 0.0);
}

#[test]
fn random_streams_are_addressable_by_offset() {
    let rng = Philox::new(42, 7);
    let mut whole = vec![0.0; 103];
    rng.fill_normal(0, &mut whole);
    for (offset, len) in [(0usize, 1usize), (1, 5), (3, 17), (4, 4), (5, 98), (101, 2)] {
        let mut part = vec![0.0; len];
        rng.fill_normal(offset as u64, &mut part);
        assert_eq!(
            part,
            whole[offset..offset + len],
            "normal offset {offset} len {len}"
        );
        let mut u_whole = vec![0.0; offset + len];
        rng.fill_uniform(0, &mut u_whole);
        rng.fill_uniform(offset as u64, &mut part);
        assert_eq!(part, u_whole[offset..], "uniform offset {offset} len {len}");
    }
    // Streams and seeds are independent.
    let mut other = vec![0.0; 103];
    Philox::new(42, 8).fill_normal(0, &mut other);
    assert_ne!(other, whole);
    Philox::new(43, 7).fill_normal(0, &mut other);
    assert_ne!(other, whole);
}

#[test]
fn uniform_and_normal_moments() {
    let n = 1 << 18;
    let u = ops::uniform(&[n], Philox::new(1, 2), 0, &CPU)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert!(
        u.iter().all(|&x| x > 0.0 && x < 1.0),
        "uniforms must lie in (0, 1)"
    );
    let mean = u.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = u.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    // Standard errors: mean 0.29/sqrt(n) = 5.6e-4; variance about 1.6e-4. Allow 5 sigma.
    assert!((mean - 0.5).abs() < 3e-3, "uniform mean {mean}");
    assert!((var - 1.0 / 12.0).abs() < 1e-3, "uniform variance {var}");

    let z = ops::normal(&[n], Philox::new(1, 3), 0, &CPU)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    let mean = z.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = z.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    let kurt = z.iter().map(|&x| (x as f64 - mean).powi(4)).sum::<f64>() / n as f64 / (var * var);
    // Standard errors: mean 1/sqrt(n) = 2e-3, variance sqrt(2/n) = 2.8e-3, kurtosis sqrt(24/n) = 1e-2.
    assert!(mean.abs() < 1e-2, "normal mean {mean}");
    assert!((var - 1.0).abs() < 1.4e-2, "normal variance {var}");
    assert!((kurt - 3.0).abs() < 5e-2, "normal kurtosis {kurt}");
    let tail = z.iter().filter(|&&x| x.abs() > 1.959964).count() as f64 / n as f64;
    assert!((tail - 0.05).abs() < 2.2e-3, "two-sided 5% tail mass {tail}");
}

// ---- elementwise -------------------------------------------------------------------------

/// Sizes that exercise the float4 body and every tail length.
const SIZES: &[usize] = &[1, 3, 4, 7, 64, 1001, 4099];

#[test]
fn elementwise_ops_match_f64() {
    for (i, &n) in SIZES.iter().enumerate() {
        let a = random_vec(10 + i as u64, n, -4.0, 4.0);
        let b = random_vec(100 + i as u64, n, -4.0, 4.0);
        let (ta, tb) = (t(&a, &[n]), t(&b, &[n]));
        let f = |g: fn(f64, f64) -> f64| -> Vec<f64> {
            a.iter().zip(&b).map(|(&x, &y)| g(x as f64, y as f64)).collect()
        };

        let got = ops::add(&ta, &tb).unwrap().to_vec_f32().unwrap();
        assert_close("add", &got, &f(|x, y| x + y), 0.0, 6e-8);
        let got = ops::mul(&ta, &tb).unwrap().to_vec_f32().unwrap();
        assert_close("mul", &got, &f(|x, y| x * y), 0.0, 6e-8);
        let got = ops::scale(&ta, -0.37).unwrap().to_vec_f32().unwrap();
        assert_close("scale", &got, &f(|x, _| -0.37f32 as f64 * x), 0.0, 6e-8);

        let mut y = tb.to_device(&CPU).unwrap();
        ops::axpy(0.81, &ta, &mut y).unwrap();
        let want = f(|x, y| y + 0.81f32 as f64 * x);
        assert_close("axpy", &y.to_vec_f32().unwrap(), &want, 1e-6, 1e-6);

        let silu = |x: f64| x / (1.0 + (-x).exp());
        let got = ops::silu(&ta).unwrap().to_vec_f32().unwrap();
        assert_close("silu", &got, &f(|x, _| x / (1.0 + (-x).exp())), 1e-7, 1e-6);

        // The backward against a central finite difference of SiLU in f64.
        let h = 1e-5;
        let want: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(&x, &dy)| dy as f64 * (silu(x as f64 + h) - silu(x as f64 - h)) / (2.0 * h))
            .collect();
        let got = ops::silu_backward(&ta, &tb).unwrap().to_vec_f32().unwrap();
        assert_close("silu_backward", &got, &want, 1e-6, 1e-5);

        let mut full = Tensor::full(&[n], 2.5, &CPU).unwrap();
        assert!(full.to_vec_f32().unwrap().iter().all(|&v| v == 2.5));
        ops::fill(&mut full, -1.0).unwrap();
        assert!(full.to_vec_f32().unwrap().iter().all(|&v| v == -1.0));
    }
}

#[test]
fn elementwise_shape_and_dtype_errors_name_the_problem() {
    let a = t(&[1.0, 2.0, 3.0], &[3]);
    let b = t(&[1.0, 2.0], &[2]);
    let err = ops::add(&a, &b).unwrap_err().to_string();
    assert!(
        err.contains("add") && err.contains("[2]") && err.contains("[3]"),
        "{err}"
    );
    let d = Tensor::from_f64(&[1.0, 2.0, 3.0], &[3], &CPU).unwrap();
    let err = ops::mul(&a, &d).unwrap_err().to_string();
    assert!(err.contains("f64") && err.contains("mul"), "{err}");
    let err = Tensor::from_f32(&[1.0; 5], &[2, 3], &CPU)
        .unwrap_err()
        .to_string();
    assert!(err.contains("5 elements") && err.contains("[2, 3]"), "{err}");
}

// ---- reductions --------------------------------------------------------------------------

#[test]
fn reductions_match_f64() {
    for (i, &(rows, cols)) in [
        (1usize, 1usize),
        (1, 1000),
        (3, 7),
        (17, 257),
        (64, 3072),
        (5, 100_003),
    ]
    .iter()
    .enumerate()
    {
        let a = random_vec(200 + i as u64, rows * cols, -1.0, 1.0);
        let b = random_vec(300 + i as u64, rows * cols, -1.0, 1.0);
        let (ta, tb) = (t(&a, &[rows, cols]), t(&b, &[rows, cols]));

        let want: f64 = a.iter().map(|&x| x as f64).sum();
        let got = ops::sum(&ta).unwrap();
        assert_eq!(got.shape(), &[] as &[usize]);
        assert_close("sum", &got.to_vec_f32().unwrap(), &[want], 1e-6, 1e-6);

        let dots: Vec<f64> = (0..rows)
            .map(|r| {
                (0..cols)
                    .map(|c| a[r * cols + c] as f64 * b[r * cols + c] as f64)
                    .sum()
            })
            .collect();
        let got = ops::row_dot(&ta, &tb).unwrap().to_vec_f32().unwrap();
        assert_close("row_dot", &got, &dots, 1e-6, 1e-6);

        let norms: Vec<f64> = (0..rows)
            .map(|r| {
                (0..cols)
                    .map(|c| (a[r * cols + c] as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        let got = ops::row_norm(&ta).unwrap().to_vec_f32().unwrap();
        assert_close("row_norm", &got, &norms, 1e-6, 1e-6);
    }
    // Rows are the first axis; the rest is flattened.
    let x = t(&random_vec(9, 2 * 3 * 4, -1.0, 1.0), &[2, 3, 4]);
    assert_eq!(ops::row_norm(&x).unwrap().shape(), &[2]);
    let err = ops::row_dot(&x, &t(&[0.0; 24], &[4, 6])).unwrap_err().to_string();
    assert!(err.contains("row_dot"), "{err}");
}

// ---- GEMM --------------------------------------------------------------------------------

#[test]
fn gemm_matches_f64_for_every_transpose_and_batching() {
    let mut case = 0u64;
    for &(ba, bb, m, n, k) in GEMM_CASES {
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
            for (alpha, beta) in [(1.0f32, 0.0f32), (-0.5, 0.75)] {
                case += 1;
                let spec = GemmSpec {
                    trans_a,
                    trans_b,
                    alpha,
                    beta,
                };
                let GemmCase {
                    a,
                    a_shape,
                    b,
                    b_shape,
                    c0,
                    c_shape,
                } = gemm_case((ba, bb, m, n, k), spec, [1000 + case, 2000 + case, 3000 + case]);
                let want = naive_gemm(&a, &a_shape, &b, &b_shape, &c0, spec);
                let mut c = t(&c0, &c_shape);
                ops::gemm_into(&t(&a, &a_shape), &t(&b, &b_shape), &mut c, spec).unwrap();
                // f32 accumulation over k terms of size <= 1: error grows like sqrt(k) * eps.
                let atol = 2e-7 * (k as f64).sqrt() * 4.0;
                let what =
                    format!("gemm {a_shape:?} x {b_shape:?} ta={trans_a} tb={trans_b} a={alpha} b={beta}");
                assert_close(&what, &c.to_vec_f32().unwrap(), &want, atol, 1e-6);
            }
        }
    }
}

#[test]
fn gemm_with_a_bias_epilogue_matches_f64() {
    let (m, n, k) = (37, 19, 23);
    let a = random_vec(1, m * k, -1.0, 1.0);
    let b = random_vec(2, n * k, -1.0, 1.0);
    let bias = random_vec(3, n, -1.0, 1.0);
    let c0 = random_vec(4, m * n, -1.0, 1.0);
    let spec = GemmSpec {
        trans_a: false,
        trans_b: true,
        alpha: 0.5,
        beta: -1.0,
    };
    let mut want = naive_gemm(&a, &[m, k], &b, &[n, k], &c0, spec);
    want.iter_mut()
        .enumerate()
        .for_each(|(i, w)| *w += bias[i % n] as f64);
    let mut c = t(&c0, &[m, n]);
    ops::gemm_bias_into(&t(&a, &[m, k]), &t(&b, &[n, k]), &t(&bias, &[n]), &mut c, spec).unwrap();
    assert_close("gemm + bias", &c.to_vec_f32().unwrap(), &want, 1e-5, 1e-6);
    let err = ops::gemm_bias_into(
        &t(&a, &[m, k]),
        &t(&b, &[n, k]),
        &t(&bias[..5], &[5]),
        &mut c,
        spec,
    )
    .unwrap_err();
    assert!(err.to_string().contains("bias"), "{err}");
}

#[test]
fn gemm_beta_zero_ignores_a_poisoned_output() {
    let a = t(&random_vec(1, 6, -1.0, 1.0), &[2, 3]);
    let b = t(&random_vec(2, 12, -1.0, 1.0), &[3, 4]);
    let mut c = Tensor::full(&[2, 4], f32::NAN, &CPU).unwrap();
    ops::gemm_into(&a, &b, &mut c, GemmSpec::default()).unwrap();
    assert!(c.to_vec_f32().unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn gemm_shape_errors_name_the_operand() {
    let a = t(&[0.0; 6], &[2, 3]);
    let b = t(&[0.0; 8], &[4, 2]);
    let err = ops::matmul(&a, &b, false, false).unwrap_err().to_string();
    assert!(
        err.contains("inner dimension 3") && err.contains("[4, 2]"),
        "{err}"
    );
    let b3 = t(&[0.0; 24], &[2, 3, 4]);
    let a3 = t(&[0.0; 18], &[3, 2, 3]);
    let err = ops::matmul(&a3, &b3, false, false).unwrap_err().to_string();
    assert!(err.contains("batch 3"), "{err}");
    let v = t(&[0.0; 3], &[3]);
    assert!(matches!(
        ops::matmul(&v, &b, false, false),
        Err(Error::Shape { .. })
    ));
}

// ---- tensors and devices -----------------------------------------------------------------

#[test]
fn tensor_round_trips_and_reshapes() {
    let data = random_vec(5, 24, -1.0, 1.0);
    let x = t(&data, &[2, 3, 4]);
    assert_eq!(x.numel(), 24);
    assert_eq!(x.size_in_bytes(), 96);
    assert_eq!(x.dtype(), DType::F32);
    let y = x.reshape(&[6, 4]).unwrap();
    assert_eq!(y.shape(), &[6, 4]);
    assert_eq!(y.to_vec_f32().unwrap(), data);
    assert!(y.reshape(&[5, 5]).is_err());
    let z = Tensor::zeros(&[3, 2], DType::F64, &CPU).unwrap();
    assert_eq!(z.to_vec_f64().unwrap(), vec![0.0; 6]);
    assert!(z.to_vec_f32().is_err());
}

#[test]
fn device_requests_parse_and_fail_clearly() {
    assert_eq!("auto".parse::<DeviceRequest>().unwrap(), DeviceRequest::Auto);
    assert_eq!("CPU".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cpu);
    assert_eq!("cuda".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cuda(0));
    assert_eq!("cuda:3".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cuda(3));
    assert!("tpu".parse::<DeviceRequest>().unwrap_err().contains("tpu"));

    // Whatever this machine has, probing never panics, and auto always yields a device.
    let (auto, why) = Device::auto();
    match emprior::device::probe_cuda() {
        Ok(_) => println!("a CUDA driver is present here; auto chose {auto}"),
        Err(reason) => {
            assert!(!auto.is_cuda());
            assert!(why.unwrap().contains(&reason));
            let err = Device::open(DeviceRequest::Cuda(0)).unwrap_err();
            assert!(matches!(err, Error::GpuUnavailable(_)));
            assert!(err.to_string().starts_with("GPU unavailable: "), "{err}");
        }
    }
}

#[test]
fn ops_run_in_f64_on_the_cpu_and_refuse_mixed_dtypes() {
    let a: Vec<f64> = random_vec(77, 12, -1.0, 1.0)
        .iter()
        .map(|&x| x as f64 / 3.0)
        .collect();
    let b: Vec<f64> = random_vec(78, 12, -1.0, 1.0)
        .iter()
        .map(|&x| x as f64 / 7.0)
        .collect();
    let ta = Tensor::from_f64(&a, &[3, 4], &CPU).unwrap();
    let tb = Tensor::from_f64(&b, &[3, 4], &CPU).unwrap();
    let sum = ops::add(&ta, &tb).unwrap().to_vec_f64().unwrap();
    for i in 0..12 {
        assert_eq!(sum[i], a[i] + b[i], "f64 add is exact f64 arithmetic");
    }
    let c = ops::matmul(&ta, &tb, false, true).unwrap().to_vec_f64().unwrap();
    let want: f64 = (0..4).map(|p| a[p] * b[4 + p]).sum();
    assert!((c[1] - want).abs() < 1e-15, "f64 gemm {} vs {want}", c[1]);
    let err = ops::add(&ta, &t(&[0.0; 12], &[3, 4])).unwrap_err().to_string();
    assert!(err.contains("f64 on cpu") && err.contains("f32 on cpu"), "{err}");
}

/// The CPU backend splits rows over threads in fixed chunks: a TimeMLP forward and VJP at the
/// manifold's E-step shape give the same bits on one thread as on the whole pool.
#[test]
fn cpu_results_do_not_depend_on_the_thread_count() {
    use emprior::diffusion::{Denoiser, Network};
    use emprior::nn::{Mode, TimeMlp};
    use emprior::AsView;
    let den = Denoiser::new(Network::Mlp(TimeMlp::new(5, &[256, 256, 256], 64)));
    let params = den.net.layout().init(3, DType::F32, &CPU).unwrap();
    let x = t(&random_vec(5, 4096 * 5, -2.0, 2.0), &[4096, 5]);
    let u = t(&random_vec(6, 4096 * 5, -1.0, 1.0), &[4096, 5]);
    let sigmas: Vec<f64> = (0..4096).map(|i| 0.01 + i as f64 * 0.002).collect();
    let run = || {
        let pv = params.as_view().unwrap();
        let (y, saved) = den
            .denoise(&Weights::from(&pv), &x.as_view().unwrap(), &sigmas, Mode::Eval)
            .unwrap();
        let dx = den
            .vjp(&Weights::from(&pv), &saved, &u.as_view().unwrap())
            .unwrap();
        (y.to_vec_f32().unwrap(), dx.to_vec_f32().unwrap())
    };
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    let one = pool(1).install(run);
    let four = pool(4).install(run);
    assert!(
        one.0.iter().zip(&four.0).all(|(a, b)| a.to_bits() == b.to_bits()),
        "forward"
    );
    assert!(
        one.1.iter().zip(&four.1).all(|(a, b)| a.to_bits() == b.to_bits()),
        "vjp"
    );
}

/// The device-side batch draw reproduces the host loop it replaced in the manifold M-step
/// (uniforms, index = min(floor(u * rows), rows - 1), rows copied), in f32 and f64.
#[test]
fn batches_drawn_from_philox_indices_match_the_host_loop() {
    use emprior::ops::rng::gather_rows_uniform;
    let (rows, per, batch, offset) = (1000usize, 5usize, 256usize, 3 * 256u64);
    let x = random_vec(17, rows * per, -3.0, 3.0);
    let rng = Philox::new(4, 0xda7a);
    let mut u = vec![0.0f32; batch];
    rng.fill_uniform(offset, &mut u);
    let mut want = Vec::new();
    for &ui in &u {
        let i = ((ui * rows as f32) as usize).min(rows - 1);
        want.extend_from_slice(&x[i * per..(i + 1) * per]);
    }
    let got = gather_rows_uniform(&t(&x, &[rows, per]), batch, rng, offset)
        .unwrap()
        .to_vec_f32()
        .unwrap();
    assert_eq!(got, want);
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let got64 = gather_rows_uniform(
        &Tensor::from_f64(&x64, &[rows, per], &CPU).unwrap(),
        batch,
        rng,
        offset,
    )
    .unwrap()
    .to_vec_f64()
    .unwrap();
    assert!(got64.iter().zip(&want).all(|(a, &b)| *a == b as f64));
    let empty = Tensor::from_f32(&[], &[0, 5], &CPU).unwrap();
    assert!(gather_rows_uniform(&empty, 4, rng, 0).is_err());
}

/// The images M-step's shuffle: `permuted_index` is a permutation of 0..rows for every size
/// (powers of two, one past them, odd bit counts, 1), different per epoch, and the batches of one
/// epoch gathered by `gather_rows_permuted` visit every row exactly once.
#[test]
fn permuted_batches_visit_every_row_once_per_epoch() {
    use emprior::ops::rng::{gather_rows_permuted, permuted_index};
    let rng = Philox::new(3, 0x5bf1);
    for rows in [1u64, 2, 3, 4, 5, 17, 64, 65, 1000, 4097] {
        for epoch in [0u64, 1, 9] {
            let mut seen = vec![false; rows as usize];
            for i in 0..rows {
                let j = permuted_index(rng, epoch, rows, i);
                assert!(
                    j < rows && !seen[j as usize],
                    "rows {rows} epoch {epoch}: {i} -> {j}"
                );
                seen[j as usize] = true;
            }
        }
        if rows >= 64 {
            let order = |e| {
                (0..rows)
                    .map(|i| permuted_index(rng, e, rows, i))
                    .collect::<Vec<_>>()
            };
            assert_ne!(order(0), order(1), "rows {rows}: two epochs in the same order");
            let fixed = order(0)
                .iter()
                .enumerate()
                .filter(|(i, &j)| *i as u64 == j)
                .count();
            assert!(fixed < 8, "rows {rows}: {fixed} rows left in place");
        }
    }
    // Rows tagged by their index; three batches of 4 out of 13 rows, then the rest.
    let (rows, per) = (13usize, 3usize);
    let pool: Vec<f32> = (0..rows * per).map(|e| (e / per) as f32).collect();
    let pool = Tensor::from_f32(&pool, &[rows, per], &Device::Cpu).unwrap();
    let mut seen = Vec::new();
    for (start, batch) in [(0, 4), (4, 4), (8, 4), (12, 1)] {
        let got = gather_rows_permuted(&pool, batch, rng, 2, start).unwrap();
        assert_eq!(got.shape(), &[batch, per]);
        let v = got.to_vec_f32().unwrap();
        for row in v.chunks_exact(per) {
            assert!(row.iter().all(|&x| x == row[0]), "a row is copied whole");
            seen.push(row[0] as usize);
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..rows).collect::<Vec<_>>());
    assert!(
        gather_rows_permuted(&pool, 4, rng, 0, 10).is_err(),
        "a batch past the pool's end"
    );
}
