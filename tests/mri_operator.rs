//! The accelerated-MRI operator (method.md §7.3): A x = [Re, Im](mask ⊙ fft2c(x)) with its exact
//! adjoint, against a direct centred DFT written here; the random column masks' statistics; and
//! MMPS with this operator against the closed-form posterior of a Gaussian prior.

mod common;

use common::{check_gaussian_samples, gaussian_posterior};
use emprior::diffusion::{Denoise, Sampler, SamplerKind, VeSchedule};
use emprior::gaussian::{Dplr, Gaussian};
use emprior::ops::Philox;
use emprior::posterior::{
    column_masks, CgConfig, Covariance, FourierOperator, LinearOperator, Mmps, ObservationNoise,
    PAPER_ACCELERATION, PAPER_CENTER_FRACTION,
};
use emprior::{AsView, DType, Device, Tensor};

const CPU: Device = Device::Cpu;

fn randn(seed: u64, n: usize) -> Vec<f64> {
    let mut z = vec![0.0f32; n];
    Philox::new(seed, 91).fill_normal(0, &mut z);
    z.iter().map(|&v| v as f64).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(p, q)| p * q).sum()
}

fn norm(a: &[f64]) -> f64 {
    dot(a, a).sqrt()
}

fn t64(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_f64(v, shape, &CPU).unwrap()
}

fn apply(op: &FourierOperator, x: &[f64]) -> Vec<f64> {
    let b = op.batch();
    op.apply(&t64(x, &[b, op.signal_dim()]).as_view().unwrap())
        .unwrap()
        .to_vec_f64()
        .unwrap()
}

fn adjoint(op: &FourierOperator, y: &[f64]) -> Vec<f64> {
    let b = op.batch();
    op.adjoint(&t64(y, &[b, op.obs_dim()]).as_view().unwrap())
        .unwrap()
        .to_vec_f64()
        .unwrap()
}

/// The centred frequency of centred index `i` on an axis of length n: `i - n/2` (rounded down),
/// by the definitions fftshift(z)[k] = z[(k - n/2) mod n], ifftshift(z)[k] = z[(k + n/2) mod n].
fn centred(i: usize, n: usize) -> f64 {
    i as f64 - (n / 2) as f64
}

/// The real matrix of x ↦ [Re, Im](mask ⊙ fft2c(x)) for one `[h, w]` image, `[2hw, hw]`
/// row-major, straight from the definition: fft2c(x)[r, c] = Σ_{a,b} x[a, b]
/// exp(-2πi ((r - h/2)(a - h/2)/h + (c - w/2)(b - w/2)/w)) / sqrt(h w).
fn direct_matrix(mask: &[f64], h: usize, w: usize) -> Vec<f64> {
    let (d, tau) = (h * w, std::f64::consts::TAU);
    let scale = 1.0 / (d as f64).sqrt();
    assert_eq!(mask.len(), w);
    let mut a = vec![0.0; 2 * d * d];
    for r in 0..h {
        for (c, &keep) in mask.iter().enumerate() {
            for p in 0..h {
                for q in 0..w {
                    let theta = tau
                        * (centred(r, h) * centred(p, h) / h as f64
                            + centred(c, w) * centred(q, w) / w as f64);
                    let row = (r * w + c) * 2;
                    a[row * d + p * w + q] = keep * scale * theta.cos();
                    a[(row + 1) * d + p * w + q] = -keep * scale * theta.sin();
                }
            }
        }
    }
    a
}

/// The direct O((hw)²) centred DFT of each image of a batch: mask ⊙ fft2c(x), packed.
fn direct_apply(masks: &[f64], b: usize, h: usize, w: usize, x: &[f64]) -> Vec<f64> {
    let d = h * w;
    (0..b)
        .flat_map(|i| {
            let a = direct_matrix(&masks[i * w..(i + 1) * w], h, w);
            (0..2 * d)
                .map(|r| dot(&a[r * d..(r + 1) * d], &x[i * d..(i + 1) * d]))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Re(ifft2c(mask ⊙ (v_re + i v_im))), directly: x[a, b] = Re Σ_{r,c} mask[c] v[r, c]
/// exp(+2πi (...)) / sqrt(h w).
fn direct_inverse(masks: &[f64], b: usize, h: usize, w: usize, v: &[f64]) -> Vec<f64> {
    let (d, tau) = (h * w, std::f64::consts::TAU);
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0; b * d];
    for i in 0..b {
        for p in 0..h {
            for q in 0..w {
                let mut acc = 0.0;
                for r in 0..h {
                    for c in 0..w {
                        let theta = tau
                            * (centred(r, h) * centred(p, h) / h as f64
                                + centred(c, w) * centred(q, w) / w as f64);
                        let (re, im) = (v[i * 2 * d + (r * w + c) * 2], v[i * 2 * d + (r * w + c) * 2 + 1]);
                        // Re((re + i im)(cos θ + i sin θ)).
                        acc += masks[i * w + c] * (re * theta.cos() - im * theta.sin());
                    }
                }
                out[i * d + p * w + q] = acc * scale;
            }
        }
    }
    out
}

fn masks_f64(m: &[f32]) -> Vec<f64> {
    m.iter().map(|&v| v as f64).collect()
}

#[test]
fn the_adjoint_is_exact() {
    // (batch, h, w, R): square, odd (and non-square), the paper's 320 (not a power of two), and a
    // batch with a mask of its own per slice.
    for (seed, b, h, w, r) in [
        (1u64, 1usize, 8usize, 8usize, 4.0),
        (2, 1, 7, 9, 2.0),
        (3, 1, 320, 320, PAPER_ACCELERATION),
        (4, 6, 12, 10, 3.0),
        (5, 5, 9, 11, 2.0),
    ] {
        let masks = column_masks(b, w, r, 0.2, seed).unwrap();
        if b > 1 {
            assert!(
                masks.chunks(w).any(|m| m != &masks[..w]),
                "the batch should hold different masks"
            );
        }
        let op = FourierOperator::new(&masks, b, h, w).unwrap();
        let (d, m) = (h * w, 2 * h * w);
        assert_eq!((op.signal_dim(), op.obs_dim()), (d, m));
        let x = randn(seed * 10, b * d);
        let v = randn(seed * 10 + 1, b * m);
        let (ax, atv) = (apply(&op, &x), adjoint(&op, &v));
        assert_eq!((ax.len(), atv.len()), (b * m, b * d));
        // Row by row and over the batch.
        for i in 0..=b {
            let (xs, vs, axs, atvs) = if i < b {
                (
                    &x[i * d..(i + 1) * d],
                    &v[i * m..(i + 1) * m],
                    &ax[i * m..(i + 1) * m],
                    &atv[i * d..(i + 1) * d],
                )
            } else {
                (&x[..], &v[..], &ax[..], &atv[..])
            };
            let (lhs, rhs) = (dot(axs, vs), dot(xs, atvs));
            let rel = (lhs - rhs).abs() / (norm(xs) * norm(vs));
            assert!(
                rel < 1e-10,
                "{h}x{w} b={b} row {i}: <Ax, v> = {lhs} vs <x, A^T v> = {rhs}"
            );
            if i == b {
                println!(
                    "{h}x{w}, batch {b}: <Ax,v> = {lhs:.6}, |<Ax,v> - <x,A^T v>| / (|x| |v|) = {rel:.1e}"
                );
            }
        }
        // Dropped columns observe nothing.
        for i in 0..b {
            for rr in 0..h {
                for c in 0..w {
                    if masks[i * w + c] == 0.0 {
                        let at = i * m + (rr * w + c) * 2;
                        assert_eq!((ax[at], ax[at + 1]), (0.0, 0.0));
                    }
                }
            }
        }
    }
}

#[test]
fn f32_tensors_give_f32_results_of_the_f64_computation() {
    let (b, h, w) = (2, 6, 5);
    let masks = column_masks(b, w, 2.0, 0.2, 8).unwrap();
    let op = FourierOperator::new(&masks, b, h, w).unwrap();
    let x: Vec<f32> = randn(80, b * h * w).iter().map(|&v| v as f32).collect();
    let y32 = op
        .apply(&Tensor::from_f32(&x, &[b, h, w], &CPU).unwrap().as_view().unwrap())
        .unwrap();
    assert_eq!((y32.dtype(), y32.shape()), (DType::F32, &[b, 2 * h * w][..]));
    let y64 = apply(&op, &x.iter().map(|&v| v as f64).collect::<Vec<_>>());
    for (p, q) in y32.to_vec_f32().unwrap().iter().zip(&y64) {
        assert_eq!(*p, *q as f32);
    }
    let back = op.adjoint(&y32.as_view().unwrap()).unwrap();
    assert_eq!((back.dtype(), back.shape()), (DType::F32, &[b, h * w][..]));
}

#[test]
fn with_every_column_kept_the_operator_is_unitary() {
    for (b, h, w) in [(2usize, 8usize, 8usize), (1, 7, 9), (1, 5, 5), (1, 320, 320)] {
        let op = FourierOperator::new(&vec![1.0; b * w], b, h, w).unwrap();
        let d = h * w;
        let x = randn((h * 100 + w) as u64, b * d);
        let ax = apply(&op, &x);
        let back = adjoint(&op, &ax);
        let mut worst_norm = 0.0f64;
        for i in 0..b {
            let (nx, nax) = (
                norm(&x[i * d..(i + 1) * d]),
                norm(&ax[i * 2 * d..(i + 1) * 2 * d]),
            );
            worst_norm = worst_norm.max((nax - nx).abs() / nx);
        }
        let worst_inverse = x
            .iter()
            .zip(&back)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        println!("{h}x{w}: | |Ax| - |x| | / |x| = {worst_norm:.1e}, max |A^T A x - x| = {worst_inverse:.1e}");
        assert!(worst_norm < 1e-12, "{h}x{w}: norm changed by {worst_norm:.2e}");
        assert!(
            worst_inverse < 1e-12,
            "{h}x{w}: A^T A x - x up to {worst_inverse:.2e}"
        );
    }
}

#[test]
fn the_operator_is_the_centred_orthonormal_dft() {
    // Odd and even sizes, where fftshift and ifftshift differ or agree; masks with dropped
    // columns on both sides of the centre.
    for (seed, b, h, w) in [
        (1u64, 2usize, 6usize, 6usize),
        (2, 2, 5, 7),
        (3, 1, 7, 4),
        (4, 1, 1, 3),
    ] {
        let masks = column_masks(b, w, 2.0, 0.0, seed).unwrap();
        let mf = masks_f64(&masks);
        let op = FourierOperator::new(&masks, b, h, w).unwrap();
        let (d, m) = (h * w, 2 * h * w);
        let x = randn(seed + 20, b * d);
        let v = randn(seed + 30, b * m);
        let (got, want) = (apply(&op, &x), direct_apply(&mf, b, h, w, &x));
        let err = got
            .iter()
            .zip(&want)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        let (got_t, want_t) = (adjoint(&op, &v), direct_inverse(&mf, b, h, w, &v));
        let err_t = got_t
            .iter()
            .zip(&want_t)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max);
        println!("{h}x{w}: max |A x - direct| = {err:.1e}, max |A^T v - direct| = {err_t:.1e}");
        assert!(err < 1e-12, "{h}x{w}: A x off the direct DFT by {err:.2e}");
        assert!(
            err_t < 1e-12,
            "{h}x{w}: A^T v off the direct inverse by {err_t:.2e}"
        );
    }
    // The zero frequency of a constant image sits at the centre (h/2, w/2), real, sqrt(h w).
    for (h, w) in [(5usize, 7usize), (4, 6), (5, 4)] {
        let op = FourierOperator::new(&vec![1.0; w], 1, h, w).unwrap();
        let y = apply(&op, &vec![1.0; h * w]);
        let centre = ((h / 2) * w + w / 2) * 2;
        assert!((y[centre] - ((h * w) as f64).sqrt()).abs() < 1e-12);
        let rest: f64 = y
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != centre)
            .map(|(_, v)| v.abs())
            .sum();
        assert!(rest < 1e-12, "{h}x{w}: energy off the centre {rest:.2e}");
        // zero_filled is A^T.
        let z = op
            .zero_filled(&t64(&y, &[1, 2 * h * w]).as_view().unwrap())
            .unwrap()
            .to_vec_f64()
            .unwrap();
        assert!(z.iter().all(|v| (v - 1.0).abs() < 1e-12));
    }
}

#[test]
fn bad_inputs_are_errors() {
    let op = FourierOperator::new(&[1.0; 8], 2, 3, 4).unwrap();
    // Wrong batch, wrong size per row.
    for shape in [[3usize, 12], [2, 13], [1, 24]] {
        let x = t64(&vec![0.0; shape[0] * shape[1]], &shape);
        assert!(
            op.apply(&x.as_view().unwrap()).is_err(),
            "apply accepted {shape:?}"
        );
    }
    assert!(op.adjoint(&t64(&[0.0; 24], &[2, 12]).as_view().unwrap()).is_err());
    // Other shapes with B rows of d values are fine.
    assert!(op
        .apply(&t64(&[0.0; 24], &[2, 3, 4, 1]).as_view().unwrap())
        .is_ok());
    assert!(op
        .adjoint(&t64(&[0.0; 48], &[2, 3, 4, 2]).as_view().unwrap())
        .is_ok());
    // Masks of the wrong size, non-finite masks, empty images.
    assert!(FourierOperator::new(&[1.0; 7], 2, 3, 4).is_err());
    assert!(FourierOperator::new(&[1.0, f32::NAN, 1.0, 1.0], 1, 3, 4).is_err());
    assert!(FourierOperator::new(&[], 1, 3, 0).is_err());
    assert!(FourierOperator::new(&[1.0; 4], 1, 0, 4).is_err());
    // Sub-batches.
    let part = op.rows(1, 2).unwrap();
    assert_eq!(part.batch(), 1);
    assert!(op.rows(1, 3).is_err());
    // Invalid mask settings.
    assert!(column_masks(4, 320, 0.5, 0.08, 0).is_err());
    assert!(column_masks(4, 320, f64::NAN, 0.08, 0).is_err());
    assert!(column_masks(4, 320, f64::INFINITY, 0.08, 0).is_err());
    assert!(column_masks(4, 320, 4.0, -0.1, 0).is_err());
    assert!(column_masks(4, 320, 4.0, 1.5, 0).is_err());
    assert!(column_masks(4, 0, 4.0, 0.08, 0).is_err());
    assert!(column_masks(0, 320, 4.0, 0.08, 0).unwrap().is_empty());
}

#[test]
fn a_sub_batch_is_the_rows_of_the_whole() {
    let (b, h, w) = (5, 6, 7);
    let masks = column_masks(b, w, 2.0, 0.2, 3).unwrap();
    let op = FourierOperator::new(&masks, b, h, w).unwrap();
    let x = randn(5, b * h * w);
    let whole = apply(&op, &x);
    let part = op.rows(2, 4).unwrap();
    assert_eq!(part.mask(0), &masks_f64(&masks[2 * w..3 * w])[..]);
    let got = apply(&part, &x[2 * h * w..4 * h * w]);
    assert_eq!(got, whole[2 * 2 * h * w..4 * 2 * h * w]);
}

#[test]
fn column_masks_have_the_papers_statistics() {
    // The paper's setting at 320 columns: a 20-column band 150..170 and keep-probability 1/9.
    let w = 320;
    let masks = column_masks(4000, w, PAPER_ACCELERATION, PAPER_CENTER_FRACTION, 7).unwrap();
    let outside: f64 = masks
        .chunks(w)
        .map(|m| {
            (0..w)
                .filter(|j| !(150..170).contains(j))
                .map(|j| m[j] as f64)
                .sum::<f64>()
        })
        .sum::<f64>()
        / (4000.0 * 300.0);
    let se = (1.0f64 / 9.0 * (8.0 / 9.0) / (4000.0 * 300.0)).sqrt();
    println!(
        "R = 6: keep-probability outside the band {outside:.5} (1/9 = {:.5}, se {se:.1e})",
        1.0 / 9.0
    );
    assert!((outside - 1.0 / 9.0).abs() < 5.0 * se);
    for m in masks.chunks(w) {
        assert!((150..170).all(|j| m[j] == 1.0));
    }
    // R = 4, 6, 8 with the paper's band 2·⌈60/R⌉ of 320 columns: the mean kept fraction is 1/R.
    let n = 3000;
    for (r, band) in [(4.0f64, 30usize), (6.0, 20), (8.0, 16)] {
        let masks = column_masks(n, w, r, band as f64 / w as f64, 11).unwrap();
        assert!(masks.iter().all(|&v| v == 0.0 || v == 1.0));
        let lo = (w - band).div_ceil(2);
        for m in masks.chunks(w) {
            assert!(
                (lo..lo + band).all(|j| m[j] == 1.0),
                "R = {r}: centre band dropped"
            );
        }
        assert!(
            lo <= w / 2 && w / 2 < lo + band,
            "the band holds the zero frequency"
        );
        let kept = masks.iter().map(|&v| v as f64).sum::<f64>() / (n * w) as f64;
        let p = (w as f64 / r - band as f64) / (w - band) as f64;
        let se = ((w - band) as f64 * p * (1.0 - p) / n as f64).sqrt() / w as f64;
        println!(
            "R = {r}: mean kept fraction {kept:.5} vs 1/R = {:.5} (se {se:.1e})",
            1.0 / r
        );
        assert!((kept - 1.0 / r).abs() < 5.0 * se, "R = {r}: kept {kept}");
        // Slices differ from one another.
        assert!(masks.chunks(w).skip(1).any(|m| m != &masks[..w]));
    }
    // Reproducible with a seed, different with another; slice s does not depend on n.
    let a = column_masks(50, w, 6.0, 0.0625, 3).unwrap();
    assert_eq!(a, column_masks(50, w, 6.0, 0.0625, 3).unwrap());
    assert_eq!(a[..10 * w], column_masks(10, w, 6.0, 0.0625, 3).unwrap()[..]);
    assert_ne!(a, column_masks(50, w, 6.0, 0.0625, 4).unwrap());
    // R = 1 keeps everything; a band wider than w/R leaves only the band.
    assert!(column_masks(5, 17, 1.0, 0.0, 1)
        .unwrap()
        .iter()
        .all(|&v| v == 1.0));
    let only_band = column_masks(20, 10, 8.0, 0.5, 1).unwrap();
    for m in only_band.chunks(10) {
        assert_eq!(m, [0., 0., 0., 1., 1., 1., 1., 1., 0., 0.]);
    }
    // Odd widths: the band is centred on the zero frequency at w/2.
    let odd = column_masks(1, 9, 1e9, 3.0 / 9.0, 1).unwrap();
    assert_eq!(odd, [0., 0., 0., 1., 1., 1., 0., 0., 0.]);
}

/// Two 4×4 observations with their own masks, y = A x + noise on every entry (the paper's).
struct Problem {
    h: usize,
    w: usize,
    masks: Vec<f32>,
    /// The dense A_i `[2hw, hw]` of each observation, from the direct DFT.
    a: Vec<Vec<f64>>,
    /// y_i `[2hw]`.
    y: Vec<Vec<f64>>,
    noise_std: f64,
}

fn problem(prior: &Gaussian, noise_std: f64) -> Problem {
    let (h, w) = (4, 4);
    let d = h * w;
    // Column 0 is the Nyquist column (its own conjugate), 1 and 3 are a conjugate pair, 2 the
    // zero frequency: both masks keep one column of a pair, so A^T A has eigenvalues 0, 1/2, 1.
    let masks = vec![0.0f32, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
    let mut a = Vec::new();
    let mut y = Vec::new();
    for i in 0..2 {
        let ai = direct_matrix(&masks_f64(&masks[i * w..(i + 1) * w]), h, w);
        let z = randn(300 + i as u64, d);
        // x ~ the prior: mean + a few standard deviations' worth of structure.
        let x: Vec<f64> = prior.mean.iter().zip(&z).map(|(m, z)| m + z).collect();
        let noise = randn(400 + i as u64, 2 * d);
        y.push(
            (0..2 * d)
                .map(|r| dot(&ai[r * d..(r + 1) * d], &x) + noise_std * noise[r])
                .collect(),
        );
        a.push(ai);
    }
    Problem {
        h,
        w,
        masks,
        a,
        y,
        noise_std,
    }
}

/// A generic dense prior N(mu, C) on 4×4 images (C = L Lᵀ + 0.1 I).
fn dense_prior(seed: u64, d: usize) -> (Gaussian, Vec<f64>) {
    let mean = randn(seed, d);
    let l: Vec<f64> = randn(seed + 1, d * d)
        .iter()
        .map(|v| v / (d as f64).sqrt())
        .collect();
    let mut c = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            c[i * d + j] =
                dot(&l[i * d..(i + 1) * d], &l[j * d..(j + 1) * d]) + if i == j { 0.1 } else { 0.0 };
        }
    }
    (
        Gaussian::new(mean, Dplr::from_dense(&c, d, 0.05).unwrap()).unwrap(),
        c,
    )
}

/// An isotropic prior N(mu, s I).
fn isotropic_prior(seed: u64, d: usize, s: f64) -> (Gaussian, Vec<f64>) {
    let mut c = vec![0.0; d * d];
    (0..d).for_each(|i| c[i * d + i] = s);
    (
        Gaussian::new(randn(seed, d), Dplr::new(vec![s; d], vec![], 0).unwrap()).unwrap(),
        c,
    )
}

/// The MMPS posterior denoiser (Tweedie covariance) for a batch of the two observations, each
/// repeated `k` times.
fn denoised(
    p: &Problem,
    prior: &Gaussian,
    cg: CgConfig,
    x_t: &[f64],
    k: usize,
    sigma: f64,
) -> (Vec<f64>, usize) {
    let d = p.h * p.w;
    let masks: Vec<f32> = (0..2)
        .flat_map(|i| p.masks[i * p.w..(i + 1) * p.w].repeat(k))
        .collect();
    let op = FourierOperator::new(&masks, 2 * k, p.h, p.w).unwrap();
    let y: Vec<f64> = (0..2).flat_map(|i| p.y[i].repeat(k)).collect();
    let y = t64(&y, &[2 * k, 2 * d]);
    let noise = ObservationNoise::Scalar(p.noise_std * p.noise_std);
    let mut mmps = Mmps::new(prior, &op, &y, &noise, cg);
    mmps.covariance = Covariance::Tweedie;
    let out = mmps
        .denoise(&t64(x_t, &[2 * k, d]), sigma)
        .unwrap()
        .to_vec_f64()
        .unwrap();
    (out, mmps.last_cg.iterations)
}

/// The worst |MMPS - closed form| / (1 + |closed form|) of E[x | x_t, y] over both observations.
fn denoiser_error(p: &Problem, prior: &Gaussian, cov: &[f64], cg: CgConfig, sigma: f64) -> (f64, usize) {
    let d = p.h * p.w;
    let x_t: Vec<f64> = (0..2).flat_map(|i| randn(40 + i, d)).collect();
    let (got, iterations) = denoised(p, prior, cg, &x_t, 1, sigma);
    let mut worst = 0.0f64;
    for i in 0..2 {
        let s2 = p.noise_std * p.noise_std;
        let (want, _) = gaussian_posterior(
            &prior.mean,
            cov,
            &p.a[i],
            &p.y[i],
            s2,
            Some((&x_t[i * d..(i + 1) * d], sigma * sigma)),
        );
        for j in 0..d {
            worst = worst.max((got[i * d + j] - want[j]).abs() / (1.0 + want[j].abs()));
        }
    }
    (worst, iterations)
}

#[test]
fn mmps_with_a_gaussian_prior_is_the_exact_posterior_denoiser() {
    let d = 16;
    // A generic dense prior: exact once CG has converged (A V Aᵀ has up to 16 distinct
    // eigenvalues besides Σ_y's, so 3 iterations are not enough; 64 with a tolerance of 1e-13).
    let (prior, cov) = dense_prior(3, d);
    let p = problem(&prior, 0.1);
    for sigma in [0.01, 0.3, 3.0] {
        let converged = CgConfig {
            max_iters: 64,
            rtol: Some(1e-13),
        };
        let (err, iterations) = denoiser_error(&p, &prior, &cov, converged, sigma);
        println!("dense prior, sigma = {sigma}: converged CG ({iterations} iterations), error {err:.1e}");
        assert!(err < 1e-8, "dense prior, sigma = {sigma}: error {err:.2e}");
    }
    // An isotropic prior N(mu, s I): V[x | x_t] = c I, and A Aᵀ has eigenvalues 0, 1/2 and 1
    // (AᵀA is the Fourier multiplier (mask(k) + mask(-k)) / 2), so Σ_y + c A Aᵀ has three distinct
    // eigenvalues and the paper's 3 CG iterations are exact; 2 are not.
    let (prior, cov) = isotropic_prior(5, d, 0.7);
    let p = problem(&prior, 0.1);
    let fixed = |n| CgConfig {
        max_iters: n,
        rtol: None,
    };
    for sigma in [0.01, 0.3, 3.0] {
        let (err3, _) = denoiser_error(&p, &prior, &cov, fixed(3), sigma);
        let (err2, _) = denoiser_error(&p, &prior, &cov, fixed(2), sigma);
        println!(
            "isotropic prior, sigma = {sigma}: 3 CG iterations error {err3:.1e} (2 iterations: {err2:.1e})"
        );
        assert!(err3 < 1e-10, "isotropic prior, sigma = {sigma}: error {err3:.2e}");
        // At small sigma, c = sigma² s / (s + sigma²) is tiny against Σ_y and the three
        // eigenvalues nearly coincide, so 2 iterations are close too; at larger sigma they are not.
        if sigma >= 0.3 {
            assert!(
                err2 > 1e-6,
                "isotropic prior, sigma = {sigma}: 2 iterations already exact ({err2:.2e})"
            );
        }
    }
}

#[test]
fn mmps_samples_the_exact_posterior_with_three_cg_iterations() {
    // DDPM with MMPS (Tweedie covariance, the paper's 3 CG iterations) under an isotropic Gaussian
    // prior, where 3 iterations are exact (see above): the samples of each of the two
    // observations must follow the closed-form posterior.
    let (d, k) = (16, 1500);
    let (prior, cov) = isotropic_prior(9, d, 0.7);
    let p = problem(&prior, 0.1);
    let masks: Vec<f32> = (0..2)
        .flat_map(|i| p.masks[i * p.w..(i + 1) * p.w].repeat(k))
        .collect();
    let op = FourierOperator::new(&masks, 2 * k, p.h, p.w).unwrap();
    let y: Vec<f64> = (0..2).flat_map(|i| p.y[i].repeat(k)).collect();
    let y = t64(&y, &[2 * k, 2 * d]);
    let noise = ObservationNoise::Scalar(p.noise_std * p.noise_std);
    let mut mmps = Mmps::new(
        &prior,
        &op,
        &y,
        &noise,
        CgConfig {
            max_iters: 3,
            rtol: None,
        },
    );
    mmps.covariance = Covariance::Tweedie;
    let sampler = Sampler::new(
        SamplerKind::Ddpm,
        256,
        VeSchedule::new(1e-3, 30.0),
        Philox::new(13, 5),
    );
    let mean = prior.mean_tensor(DType::F64, &CPU).unwrap();
    let x = sampler
        .sample(
            &mut mmps,
            &[2 * k, d],
            Some(&mean.as_view().unwrap()),
            DType::F64,
            &CPU,
        )
        .unwrap()
        .to_vec_f64()
        .unwrap();
    for i in 0..2 {
        let (want_mean, want_cov) = gaussian_posterior(
            &prior.mean,
            &cov,
            &p.a[i],
            &p.y[i],
            p.noise_std * p.noise_std,
            None,
        );
        check_gaussian_samples(
            &format!("observation {i}, {k} samples"),
            &x[i * k * d..(i + 1) * k * d],
            k,
            d,
            &want_mean,
            &want_cov,
        );
    }
}

/// The product path (dense centred DFT matrices through the GEMM op, what a GPU runs) is the FFT
/// path: the same A and Aᵀ to rounding, in f64 and f32, on odd and even sizes and batches with
/// their own masks (on a GPU, tests/cuda_posterior_parity.rs compares it with this CPU path).
#[test]
fn the_product_path_is_the_fft_path() {
    for (b, h, w, seed) in [(3usize, 7usize, 9usize, 11u64), (2, 16, 16, 12), (2, 32, 20, 13)] {
        let masks = column_masks(b, w, 3.0, 0.2, seed).unwrap();
        let op = FourierOperator::new(&masks, b, h, w).unwrap();
        let x: Vec<f64> = (0..b * h * w)
            .map(|i| ((i * 37 % 101) as f64 / 50.0) - 1.0)
            .collect();
        let v: Vec<f64> = (0..b * h * w * 2)
            .map(|i| ((i * 53 % 97) as f64 / 48.0) - 1.0)
            .collect();
        let xt = Tensor::from_f64(&x, &[b, h, w], &Device::Cpu).unwrap();
        let vt = Tensor::from_f64(&v, &[b, 2 * h * w], &Device::Cpu).unwrap();
        let rel = |a: &[f64], b: &[f64]| {
            let num: f64 = a
                .iter()
                .zip(b)
                .map(|(p, q)| (p - q) * (p - q))
                .sum::<f64>()
                .sqrt();
            num / b.iter().map(|q| q * q).sum::<f64>().sqrt().max(1e-300)
        };
        let fft = op.apply(&xt.as_view().unwrap()).unwrap().to_vec_f64().unwrap();
        let prod = op
            .apply_by_products(&xt.as_view().unwrap())
            .unwrap()
            .to_vec_f64()
            .unwrap();
        assert!(rel(&prod, &fft) < 1e-13, "A at {h}x{w}: {}", rel(&prod, &fft));
        let fft = op.adjoint(&vt.as_view().unwrap()).unwrap().to_vec_f64().unwrap();
        let prod = op
            .adjoint_by_products(&vt.as_view().unwrap())
            .unwrap()
            .to_vec_f64()
            .unwrap();
        assert!(rel(&prod, &fft) < 1e-13, "Aᵀ at {h}x{w}: {}", rel(&prod, &fft));
        // f32 tensors: the products in f32 against the f64 FFT path rounded to f32.
        let x32 = Tensor::from_f64_as(&x, &[b, h, w], DType::F32, &Device::Cpu).unwrap();
        let p32 = op.apply_by_products(&x32.as_view().unwrap()).unwrap();
        assert_eq!(p32.dtype(), DType::F32);
        let widen = |t: Tensor| -> Vec<f64> { t.to_vec_f32().unwrap().into_iter().map(f64::from).collect() };
        let fft = widen(op.apply(&x32.as_view().unwrap()).unwrap());
        let p32 = widen(p32);
        assert!(rel(&p32, &fft) < 1e-5, "f32 A at {h}x{w}: {}", rel(&p32, &fft));
    }
}
