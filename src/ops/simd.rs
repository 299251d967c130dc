//! Vector code for the CPU backend's f32 hot loops. The release build targets baseline x86-64
//! (SSE2: 4 lanes, no FMA), so each loop here is compiled three times (AVX-512, AVX2 + FMA and
//! the baseline) and the widest the CPU has is chosen at run time. The loops are written without
//! branches or libm calls so that LLVM vectorises them; `exp` is our own for that reason.
//! The f64 oracle path keeps libm (it is what finite differences are checked against).

/// Defines `fn $name($args)` that runs `$body` compiled for the widest instruction set the
/// CPU supports. The body must be a call of an `#[inline(always)]` function so that it is
/// compiled inside each `#[target_feature]` wrapper.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $body:path) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if $crate::ops::simd::has_avx512() {
                    // SAFETY: the CPU supports every feature the wrapper enables.
                    return unsafe { avx512($($arg),*) };
                }
                if $crate::ops::simd::has_avx2() {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// True when the CPU has AVX-512F and AVX-512VL plus AVX2 and FMA (detected once, then cached).
#[cfg(target_arch = "x86_64")]
pub fn has_avx512() -> bool {
    use std::sync::OnceLock;
    static YES: OnceLock<bool> = OnceLock::new();
    *YES.get_or_init(|| {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
    })
}

/// True when the CPU has AVX2 and FMA (detected once, then cached).
#[cfg(target_arch = "x86_64")]
pub fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static YES: OnceLock<bool> = OnceLock::new();
    *YES.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// e^x in f32 without a libm call, branch-free so that it vectorises: x = n ln2 + r with
/// |r| <= ln2 / 2 (ln2 split in two for an exact product), a degree-6 minimax polynomial for e^r
/// (Cephes' expf coefficients), and 2^n built in the exponent bits. Relative error below 2e-7
/// (about 2 ulp; `tests` checks it against libm over the whole range) for x in [-87.3, 88.3];
/// inputs outside are clamped there (e^x saturates at 2.1e38 and 1.2e-38 instead of inf and 0,
/// which SiLU, its only user, cannot tell apart).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    // t's low mantissa bits hold n as a two's-complement integer; reading them, rather than
    // converting n with `as i32` (which checks for NaN and saturates), keeps the loop vectorised.
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    e * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// silu(x) = x sigmoid(x).
#[inline(always)]
pub fn silu_f32(x: f32) -> f32 {
    x / (1.0 + exp_f32(-x))
}

/// dy * d/dx silu(x) = dy * s * (1 + x (1 - s)), s = sigmoid(x).
#[inline(always)]
pub fn silu_backward_f32(x: f32, dy: f32) -> f32 {
    let s = 1.0 / (1.0 + exp_f32(-x));
    dy * (s * (1.0 + x * (1.0 - s)))
}

/// The sum of `x` over 8 interleaved lanes, combined pairwise: a fixed order that vectorises
/// (a left-to-right sum cannot be reordered by the compiler), the same bits on every CPU.
#[inline(always)]
pub fn sum8(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] += v;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// The sum of `f(x[i])` over 8 interleaved lanes, as [`sum8`], in any float type.
#[inline(always)]
pub fn sum8_map<T: crate::real::Real>(x: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::ZERO; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += f(c[l]);
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] += f(v);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// The dot product of `a` and `b` over 8 interleaved lanes, as [`sum8`], in any float type.
#[inline(always)]
pub fn dot8<T: crate::real::Real>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (&x, &y)) in ta.iter().zip(tb).enumerate() {
        acc[l] += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

#[inline(always)]
fn silu_slice(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = silu_f32(v);
    }
}

#[inline(always)]
fn silu_backward_slice(x: &[f32], dy: &[f32], out: &mut [f32]) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(dy) {
        *o = silu_backward_f32(v, g);
    }
}

multiversion! {
    /// out = silu(x).
    pub fn silu(x: &[f32], out: &mut [f32]) => silu_slice
}

multiversion! {
    /// out = dy * silu'(x).
    pub fn silu_backward(x: &[f32], dy: &[f32], out: &mut [f32]) => silu_backward_slice
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm_within_two_ulp_over_its_range() {
        let mut worst = 0.0f64;
        let mut x = -87.3f32;
        while x < 88.3 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_37;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e9) > 0.0 && exp_f32(-1e9) < 1.3e-38);
        assert!(exp_f32(1e9).is_finite());
    }

    #[test]
    fn silu_and_its_backward_match_the_libm_formulas() {
        let xs: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) * 0.01).collect();
        let dy: Vec<f32> = xs.iter().map(|v| 1.0 + 0.5 * v.sin()).collect();
        let (mut y, mut g) = (vec![0.0; xs.len()], vec![0.0; xs.len()]);
        silu(&xs, &mut y);
        silu_backward(&xs, &dy, &mut g);
        for i in 0..xs.len() {
            let x = xs[i] as f64;
            let s = 1.0 / (1.0 + (-x).exp());
            let (wy, wg) = (x * s, dy[i] as f64 * s * (1.0 + x * (1.0 - s)));
            assert!((y[i] as f64 - wy).abs() <= 4e-7 * wy.abs().max(1e-3), "silu({x})");
            // s (1 + x (1 - s)) cancels near its root (x = -1.28): bound by the terms' size.
            let scale = dy[i].abs() as f64 * (1.0 + x.abs() * s);
            assert!((g[i] as f64 - wg).abs() <= 4e-7 * scale, "silu'({x})");
        }
    }

    #[test]
    fn lane_sums_are_the_plain_sum_up_to_rounding_and_agree_with_each_other() {
        let x: Vec<f32> = (0..1003)
            .map(|i| ((i * 7919) % 101) as f32 * 0.013 - 0.6)
            .collect();
        let plain: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((sum8(&x) as f64 - plain).abs() < 1e-4);
        assert_eq!(sum8(&x).to_bits(), sum8_map(&x, |v| v).to_bits());
        let ones = vec![1.0f32; x.len()];
        assert_eq!(sum8(&x).to_bits(), dot8(&x, &ones).to_bits());
    }
}
