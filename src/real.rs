//! `Real`: the float types the CPU backend computes in. f32 is what the GPU computes; f64 makes
//! the CPU an oracle precise enough for central finite differences (relative errors of 1e-6 on
//! gradients are out of reach in f32).

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

use crate::dtype::DType;

/// A host float type the CPU backend computes in; the crate implements it for `f32` and `f64`.
///
/// CPU op bodies are generic over it (the crate's `host_real!` macro picks the instance from a
/// view's [`DType`]); it bundles the arithmetic, the few transcendental functions the ops need,
/// and a strided GEMM.
pub trait Real:
    bytemuck::Pod
    + Default
    + Debug
    + PartialOrd
    + Send
    + Sync
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
{
    /// The tensor dtype whose host storage holds this type (`F32` or `F64`).
    const DTYPE: DType;
    /// Additive identity, `0.0`.
    const ZERO: Self;
    /// Multiplicative identity, `1.0`.
    const ONE: Self;
    /// Converts with `as` (rounds to nearest for `f32`).
    fn from_f64(v: f64) -> Self;
    /// Converts with `as` (exact).
    fn from_f32(v: f32) -> Self;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
    /// `e^self`.
    fn exp(self) -> Self;
    /// Natural logarithm (NaN for negative input, `-inf` at zero).
    fn ln(self) -> Self;
    /// Square root (NaN for negative input).
    fn sqrt(self) -> Self;
    /// Sine of an angle in radians.
    fn sin(self) -> Self;
    /// Cosine of an angle in radians.
    fn cos(self) -> Self;
    /// The larger of the two; if one is NaN, the other (as `f32::max`).
    fn max(self, other: Self) -> Self;
    /// Absolute value.
    fn abs(self) -> Self;

    /// C = alpha A B + beta C with arbitrary strides (matrixmultiply's sgemm / dgemm).
    ///
    /// # Safety
    /// The pointers and strides must address valid, non-aliasing (for C) memory.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

macro_rules! impl_real {
    ($t:ty, $dtype:expr, $gemm:path) => {
        impl Real for $t {
            const DTYPE: DType = $dtype;
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            unsafe fn gemm(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: *const Self,
                rsa: isize,
                csa: isize,
                b: *const Self,
                rsb: isize,
                csb: isize,
                beta: Self,
                c: *mut Self,
                rsc: isize,
                csc: isize,
            ) {
                $gemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
            }
        }
    };
}

impl_real!(f32, DType::F32, matrixmultiply::sgemm);
impl_real!(f64, DType::F64, matrixmultiply::dgemm);
