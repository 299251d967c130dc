//! The accelerated-MRI observation operator (method.md §7.3): a column-masked, centred,
//! orthonormal 2-D DFT of a real image, with its exact adjoint, and the paper's random column
//! masks.
//!
//! Conventions, as in the paper's `utils.py`:
//! - an image is real, one channel, `[h, w]` per row of the batch, so the signal size is
//!   d = h·w;
//! - F = fftshift ∘ FFT2 ∘ ifftshift over both axes with norm "ortho" (unitary); for odd lengths
//!   fftshift and ifftshift differ, and the zero frequency sits at index `n / 2` (rounded down)
//!   of an axis of length n either way;
//! - k-space is stored channels-last as `[h, w, 2]` per row, channel 0 the real part and channel 1
//!   the imaginary part, so the observation size is m = 2·h·w: unobserved entries are kept, as
//!   zeros (as the paper does), rather than dropped;
//! - `A x = [Re, Im](mask ⊙ F x)`, with one mask per row of the batch over the w k-space columns
//!   (a column is kept or dropped for all h rows), and
//!   Aᵀ v = Re(F⁻¹(mask ⊙ (v_re + i·v_im))), the exact adjoint for real x and real-packed v:
//!   ⟨A x, v⟩ = Re⟨mask ⊙ F x, v_c⟩ = Re⟨x, F⁻¹(mask ⊙ v_c)⟩ = ⟨x, Aᵀ v⟩ since F is unitary and x
//!   real.
//!
//! The CPU path computes in f64 whatever the tensors' dtype (f32 or f64) and returns the input's
//! dtype; only the kept k-space columns are transformed along the rows' axis. On a GPU the
//! operator runs as dense products through the engine's GEMM kernels: the centred DFT matrices
//! `C_h`, `C_w` (taken from the FFT path itself) give A x = M ⊙ (C_h X C_wᵀ) in six real GEMMs and
//! the adjoint in six, O(h·w·(h + w)) per image (an FFT kernel would be O(h·w·log)); the CPU runs
//! the same products in tests to check them against the FFT path.

use std::sync::{Arc, OnceLock};

use rayon::prelude::*;
use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::resample::{concat_channels, split_channels};
use crate::ops::gemm::{gemm_into, GemmSpec};
use crate::ops::mul;
use crate::ops::Philox;
use crate::tensor::{AsView, DType, Data, Tensor, View};

use super::operator::LinearOperator;

/// The paper's acceleration factor for fastMRI knee (`data.py:60`): about one k-space column in 6
/// is kept.
pub const PAPER_ACCELERATION: f64 = 6.0;

/// The paper's fully sampled centre band at [`PAPER_ACCELERATION`], as a fraction of the columns:
/// 2·⌈60/6⌉ = 20 of 320 columns, 0.0625 (the paper's band is 2·⌈60/R⌉ of 320 columns at other R).
pub const PAPER_CENTER_FRACTION: f64 = 0.0625;

/// The Philox stream [`column_masks`] draws from (under the caller's seed).
pub const MASK_STREAM: u64 = 0x4d52_495f_4d41_534b; // "MRI_MASK"

/// The index in an unshifted (FFT-order) axis of length `n` of centred index `c`: ifftshift
/// reads centred index `(u + n/2) % n` into unshifted index u, fftshift is its inverse.
fn unshifted(c: usize, n: usize) -> usize {
    (c + n - n / 2) % n
}

/// `A x = [Re, Im](mask ⊙ fft2c(x))` for a batch of real `[h, w]` images, each row of the
/// batch with its own column mask (method.md §7.3): signal size d = h·w, observation size
/// m = 2·h·w (k-space `[h, w, 2]` channels-last, zeros in the dropped columns).
///
/// The FFT plans (any lengths: 320 = 2⁶·5 and odd lengths included) are made once, in
/// [`FourierOperator::new`], and shared by [`FourierOperator::rows`].
///
/// ```
/// use emprior::posterior::{FourierOperator, LinearOperator};
/// use emprior::{AsView, Device, Tensor};
///
/// // Two 4×6 images; the first keeps k-space columns 2..5, the second keeps all of them.
/// let masks = [0., 0., 1., 1., 1., 0., 1., 1., 1., 1., 1., 1.];
/// let op = FourierOperator::new(&masks, 2, 4, 6)?;
/// assert_eq!((op.signal_dim(), op.obs_dim()), (24, 48));
/// let x = Tensor::from_f64(&[1.0; 48], &[2, 4, 6], &Device::Cpu)?;
/// let y = op.apply(&x.as_view()?)?.to_vec_f64()?;
/// // A constant image has all its energy at the zero frequency, centred at (h/2, w/2):
/// // sqrt(h·w) · 1 in the real channel.
/// assert!((y[(2 * 6 + 3) * 2] - 24f64.sqrt()).abs() < 1e-12);
/// // The second mask keeps everything, so Aᵀ A is the identity there.
/// let back = op.adjoint(&op.apply(&x.as_view()?)?.as_view()?)?.to_vec_f64()?;
/// assert!(back[24..].iter().all(|v| (v - 1.0).abs() < 1e-12));
/// # Ok::<(), emprior::Error>(())
/// ```
#[derive(Clone)]
pub struct FourierOperator {
    masks: Arc<Vec<f64>>,
    first: usize,
    batch: usize,
    h: usize,
    w: usize,
    fft_h: Arc<dyn Fft<f64>>,
    ifft_h: Arc<dyn Fft<f64>>,
    fft_w: Arc<dyn Fft<f64>>,
    ifft_w: Arc<dyn Fft<f64>>,
    /// The dense matrices and expanded mask of the product path, built on first use on a
    /// device (a sub-batch from [`FourierOperator::rows`] builds its own).
    products: Arc<OnceLock<Arc<Products>>>,
}

/// The operator as dense products on one device: the centred DFT matrices `C_h`, `C_w` (real and
/// imaginary parts, `[n, n]`) and the masks expanded to `[B·h, w]`.
struct Products {
    device: Device,
    dtype: DType,
    ch: (Tensor, Tensor),
    cw: (Tensor, Tensor),
    mask: Tensor,
}

impl std::fmt::Debug for FourierOperator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FourierOperator")
            .field("batch", &self.batch)
            .field("h", &self.h)
            .field("w", &self.w)
            .finish()
    }
}

impl FourierOperator {
    /// The operator for `batch` images of `h`×`w` pixels; `masks` is `[batch, w]`, row i the
    /// column mask of image i over the centred k-space columns (1 keeps a column, 0 drops it; other
    /// finite values weight it, and the adjoint stays exact). Errors on an empty image, a mask of
    /// the wrong size or a non-finite mask value.
    pub fn new(masks: &[f32], batch: usize, h: usize, w: usize) -> Result<Self> {
        if h == 0 || w == 0 {
            return Err(Error::Other(format!(
                "FourierOperator: images must have at least one pixel (got {h}×{w})"
            )));
        }
        if Some(masks.len()) != batch.checked_mul(w) {
            return Err(Error::shape("FourierOperator", "masks", [batch, w], masks.len()));
        }
        if let Some(bad) = masks.iter().find(|v| !v.is_finite()) {
            return Err(Error::Other(format!(
                "FourierOperator: mask values must be finite (got {bad})"
            )));
        }
        let mut planner = FftPlanner::<f64>::new();
        Ok(FourierOperator {
            masks: Arc::new(masks.iter().map(|&v| v as f64).collect()),
            first: 0,
            batch,
            h,
            w,
            fft_h: planner.plan_fft_forward(h),
            ifft_h: planner.plan_fft_inverse(h),
            fft_w: planner.plan_fft_forward(w),
            ifft_w: planner.plan_fft_inverse(w),
            products: Arc::new(OnceLock::new()),
        })
    }

    /// The operator of rows `lo..hi` of this batch (sharing the masks and FFT plans), for a batch
    /// processed in parts. Errors unless `lo <= hi <= batch`.
    pub fn rows(&self, lo: usize, hi: usize) -> Result<Self> {
        if lo > hi || hi > self.batch {
            return Err(Error::Other(format!(
                "FourierOperator::rows: rows {lo}..{hi} of a batch of {}",
                self.batch
            )));
        }
        Ok(FourierOperator {
            first: self.first + lo,
            batch: hi - lo,
            products: Arc::new(OnceLock::new()),
            ..self.clone()
        })
    }

    /// The number of images (rows of the batch) the operator expects.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The image height h (k-space rows).
    pub fn height(&self) -> usize {
        self.h
    }

    /// The image width w (k-space columns, the axis the masks select).
    pub fn width(&self) -> usize {
        self.w
    }

    /// The column mask of image `i` (`w` values over the centred k-space columns).
    pub fn mask(&self, i: usize) -> &[f64] {
        let at = (self.first + i) * self.w;
        &self.masks[at..at + self.w]
    }

    /// The zero-filled reconstruction Aᵀ y (the inverse centred DFT of the masked k-space, real
    /// part), `[B, h·w]`: the baseline row of the paper's MRI figures.
    pub fn zero_filled(&self, y: &View) -> Result<Tensor> {
        self.adjoint(y)
    }

    /// The centred 1-D DFT of length `n` as a dense `[n, n]` matrix (real, imaginary parts),
    /// taken from the FFT path itself (its images of the unit vectors), so both paths compute one
    /// operator by construction.
    fn centred_dft(n: usize) -> (Vec<f64>, Vec<f64>) {
        // n images of 1 x n (all columns kept): row j of the batch is the unit vector e_j.
        let line = FourierOperator::new(&vec![1.0; n * n], n, 1, n).expect("n >= 1");
        let (mut re, mut im) = (vec![0.0; n * n], vec![0.0; n * n]);
        let mut e = vec![0.0; n];
        let mut out = vec![0.0; 2 * n];
        for j in 0..n {
            e.iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = f64::from(u8::from(i == j)));
            out.iter_mut().for_each(|v| *v = 0.0);
            line.apply_one(j, &e, &mut out);
            for k in 0..n {
                re[k * n + j] = out[2 * k];
                im[k * n + j] = out[2 * k + 1];
            }
        }
        (re, im)
    }

    /// The product path's matrices and mask on `device` in `dtype` (cached for the first device
    /// and dtype used; another pair builds them afresh).
    fn products(&self, device: &Device, dtype: DType) -> Result<Arc<Products>> {
        let build = || -> Result<Products> {
            let (h, w) = (self.h, self.w);
            let upload = |(re, im): (Vec<f64>, Vec<f64>), n: usize| -> Result<(Tensor, Tensor)> {
                Ok((
                    Tensor::from_f64_as(&re, &[n, n], dtype, device)?,
                    Tensor::from_f64_as(&im, &[n, n], dtype, device)?,
                ))
            };
            let mut mask = Vec::with_capacity(self.batch * h * w);
            for i in 0..self.batch {
                for _ in 0..h {
                    mask.extend_from_slice(self.mask(i));
                }
            }
            Ok(Products {
                device: device.clone(),
                dtype,
                ch: upload(Self::centred_dft(h), h)?,
                cw: upload(Self::centred_dft(w), w)?,
                mask: Tensor::from_f64_as(&mask, &[self.batch * h, w], dtype, device)?,
            })
        };
        match self.products.get() {
            Some(p) if p.device.same_as(device) && p.dtype == dtype => Ok(p.clone()),
            Some(_) => Ok(Arc::new(build()?)),
            None => {
                let built = Arc::new(build()?);
                let _ = self.products.set(built.clone());
                Ok(built)
            }
        }
    }

    /// A x by dense products (`C_h X C_wᵀ`, masked, packed): the path for tensors on a GPU (the
    /// engine's GEMM kernels), public so tests can check it against the FFT path on the CPU.
    /// `x` holds B real `[h, w]` images; returns `[B, 2·h·w]` in x's dtype on x's device.
    pub fn apply_by_products(&self, x: &View) -> Result<Tensor> {
        let (b, h, w) = (self.batch, self.h, self.w);
        self.check_shape("apply", x, h * w)?;
        let p = self.products(&x.device(), x.dtype())?;
        let (dev, dt) = (&p.device, p.dtype);
        let x3 = x.reshape(&[b, h, w])?;
        // T = C_h X, batched over the images (C_h broadcast).
        let mut tr = Tensor::zeros(&[b, h, w], dt, dev)?;
        let mut ti = Tensor::zeros(&[b, h, w], dt, dev)?;
        gemm_into(&p.ch.0, &x3, &mut tr, GemmSpec::new(false, false))?;
        gemm_into(&p.ch.1, &x3, &mut ti, GemmSpec::new(false, false))?;
        let (tr, ti) = (tr.reshape(&[b * h, w])?, ti.reshape(&[b * h, w])?);
        // Y = T C_wᵀ: Re = Tr Cwrᵀ - Ti Cwiᵀ, Im = Tr Cwiᵀ + Ti Cwrᵀ.
        let mut yr = Tensor::zeros(&[b * h, w], dt, dev)?;
        let mut yi = Tensor::zeros(&[b * h, w], dt, dev)?;
        gemm_into(&tr, &p.cw.0, &mut yr, GemmSpec::new(false, true))?;
        gemm_into(&ti, &p.cw.1, &mut yr, accumulate(-1.0, true))?;
        gemm_into(&tr, &p.cw.1, &mut yi, GemmSpec::new(false, true))?;
        gemm_into(&ti, &p.cw.0, &mut yi, accumulate(1.0, true))?;
        let (yr, yi) = (mul(&yr, &p.mask)?, mul(&yi, &p.mask)?);
        let packed = concat_channels(
            &yr.reshape(&[b * h * w, 1])?.as_view()?,
            &yi.reshape(&[b * h * w, 1])?.as_view()?,
        )?;
        packed.reshape(&[b, 2 * h * w])
    }

    /// Aᵀ y by dense products (`Re(C_hᴴ (M ⊙ Y) conj(C_w))`), the adjoint of
    /// [`FourierOperator::apply_by_products`]: `y` holds B k-spaces `[h, w, 2]`; returns
    /// `[B, h·w]` in y's dtype on y's device.
    pub fn adjoint_by_products(&self, y: &View) -> Result<Tensor> {
        let (b, h, w) = (self.batch, self.h, self.w);
        self.check_shape("adjoint", y, 2 * h * w)?;
        let p = self.products(&y.device(), y.dtype())?;
        let (dev, dt) = (&p.device, p.dtype);
        let (vr, vi) = split_channels(&y.reshape(&[b * h * w, 2])?, 1)?;
        let vr = mul(&vr.reshape(&[b * h, w])?, &p.mask)?;
        let vi = mul(&vi.reshape(&[b * h, w])?, &p.mask)?;
        // S = V conj(C_w): Re = Vr Cwr + Vi Cwi, Im = Vi Cwr - Vr Cwi.
        let mut sr = Tensor::zeros(&[b * h, w], dt, dev)?;
        let mut si = Tensor::zeros(&[b * h, w], dt, dev)?;
        gemm_into(&vr, &p.cw.0, &mut sr, GemmSpec::new(false, false))?;
        gemm_into(&vi, &p.cw.1, &mut sr, accumulate(1.0, false))?;
        gemm_into(&vi, &p.cw.0, &mut si, GemmSpec::new(false, false))?;
        gemm_into(&vr, &p.cw.1, &mut si, accumulate(-1.0, false))?;
        // X = Re(C_hᴴ S) = Chrᵀ Sr + Chiᵀ Si, batched over the images.
        let (sr, si) = (sr.reshape(&[b, h, w])?, si.reshape(&[b, h, w])?);
        let mut x = Tensor::zeros(&[b, h, w], dt, dev)?;
        gemm_into(&p.ch.0, &sr, &mut x, GemmSpec::new(true, false))?;
        gemm_into(
            &p.ch.1,
            &si,
            &mut x,
            GemmSpec {
                beta: 1.0,
                ..GemmSpec::new(true, false)
            },
        )?;
        x.reshape(&[b, h * w])
    }

    fn check_shape(&self, what: &str, v: &View, per: usize) -> Result<()> {
        if v.shape().first() != Some(&self.batch) || v.numel() != self.batch * per {
            return Err(Error::shape(
                "FourierOperator",
                format!("{what} input"),
                [self.batch, per],
                v.shape(),
            ));
        }
        Ok(())
    }

    /// The host f64 values of `v` (B rows of `per` values), after checking its size.
    fn input(&self, what: &str, v: &View, per: usize) -> Result<Vec<f64>> {
        if v.shape().first() != Some(&self.batch) || v.numel() != self.batch * per {
            return Err(Error::shape(
                "FourierOperator",
                format!("{what} input"),
                [self.batch, per],
                v.shape(),
            ));
        }
        match &v.data {
            Data::F32(x) => Ok(x.iter().map(|&a| a as f64).collect()),
            Data::F64(x) => Ok(x.to_vec()),
            Data::Cuda(..) => Err(Error::Other(format!(
                "FourierOperator: the FFT path reads host memory; its {what} input is on {} (apply \
                 and adjoint take the product path there)",
                v.device()
            ))),
        }
    }

    /// The kept columns of mask `i`: (centred column, weight).
    fn kept(&self, i: usize) -> Vec<(usize, f64)> {
        self.mask(i)
            .iter()
            .enumerate()
            .filter(|(_, &m)| m != 0.0)
            .map(|(c, &m)| (c, m))
            .collect()
    }

    /// One image `x` `[h, w]` to its masked k-space `out` `[h, w, 2]` (`out` zeroed on entry).
    fn apply_one(&self, i: usize, x: &[f64], out: &mut [f64]) {
        let (h, w) = (self.h, self.w);
        let kept = self.kept(i);
        if kept.is_empty() {
            return;
        }
        let scale = 1.0 / ((h * w) as f64).sqrt();
        let mut scratch = scratch_for(&self.fft_w, &self.fft_h);
        // ifftshift over both axes, then the FFT along each row (length w).
        let mut buf = vec![Complex::default(); h * w];
        for a in 0..h {
            let src = &x[((a + h / 2) % h) * w..][..w];
            for (b, z) in buf[a * w..(a + 1) * w].iter_mut().enumerate() {
                *z = Complex::new(src[(b + w / 2) % w], 0.0);
            }
        }
        self.fft_w.process_with_scratch(&mut buf, &mut scratch);
        // The FFT along the columns (length h), for the kept columns only; fftshift on the way out.
        let mut cols = vec![Complex::default(); h * kept.len()];
        for (col, &(c, _)) in cols.chunks_exact_mut(h).zip(&kept) {
            let u = unshifted(c, w);
            for (a, z) in col.iter_mut().enumerate() {
                *z = buf[a * w + u];
            }
        }
        self.fft_h.process_with_scratch(&mut cols, &mut scratch);
        for (col, &(c, m)) in cols.chunks_exact(h).zip(&kept) {
            for r in 0..h {
                let z = col[unshifted(r, h)] * (scale * m);
                out[(r * w + c) * 2] = z.re;
                out[(r * w + c) * 2 + 1] = z.im;
            }
        }
    }

    /// One k-space `v` `[h, w, 2]` to Re(F⁻¹(mask ⊙ v)) in `out` `[h, w]` (`out` zeroed on entry).
    fn adjoint_one(&self, i: usize, v: &[f64], out: &mut [f64]) {
        let (h, w) = (self.h, self.w);
        let kept = self.kept(i);
        if kept.is_empty() {
            return;
        }
        let scale = 1.0 / ((h * w) as f64).sqrt();
        let mut scratch = scratch_for(&self.ifft_w, &self.ifft_h);
        // Masked kept columns, ifftshifted along the rows' axis, inverse FFT along it (length h).
        let mut cols = vec![Complex::default(); h * kept.len()];
        for (col, &(c, m)) in cols.chunks_exact_mut(h).zip(&kept) {
            for (a, z) in col.iter_mut().enumerate() {
                let r = (a + h / 2) % h;
                *z = Complex::new(v[(r * w + c) * 2], v[(r * w + c) * 2 + 1]) * m;
            }
        }
        self.ifft_h.process_with_scratch(&mut cols, &mut scratch);
        // Into the unshifted columns of a full buffer (dropped columns stay 0), inverse FFT along
        // each row (length w), then fftshift over both axes and keep the real part.
        let mut buf = vec![Complex::default(); h * w];
        for (col, &(c, _)) in cols.chunks_exact(h).zip(&kept) {
            let u = unshifted(c, w);
            for (a, z) in col.iter().enumerate() {
                buf[a * w + u] = *z;
            }
        }
        self.ifft_w.process_with_scratch(&mut buf, &mut scratch);
        for (r, row) in out.chunks_exact_mut(w).enumerate() {
            let src = &buf[unshifted(r, h) * w..][..w];
            for (c, o) in row.iter_mut().enumerate() {
                *o = src[unshifted(c, w)].re * scale;
            }
        }
    }
}

/// Scratch for in-place transforms by either plan (they take turns on one image).
fn scratch_for(a: &Arc<dyn Fft<f64>>, b: &Arc<dyn Fft<f64>>) -> Vec<Complex<f64>> {
    let len = a.get_inplace_scratch_len().max(b.get_inplace_scratch_len());
    vec![Complex::default(); len]
}

/// `C = alpha op(A) op(B) + C` (B transposed or not): the second half of a complex product.
fn accumulate(alpha: f32, trans_b: bool) -> GemmSpec {
    GemmSpec {
        alpha,
        beta: 1.0,
        ..GemmSpec::new(false, trans_b)
    }
}

impl LinearOperator for FourierOperator {
    /// m = 2·h·w: k-space `[h, w, 2]` ([real, imag] channels-last), zeros in dropped columns.
    fn obs_dim(&self) -> usize {
        2 * self.h * self.w
    }

    /// d = h·w: one real channel.
    fn signal_dim(&self) -> usize {
        self.h * self.w
    }

    /// `[Re, Im](mask ⊙ fft2c(x))`: `x` holds B real `[h, w]` images (any shape with leading axis
    /// B and B·h·w values, f32 or f64 on the CPU); returns `[B, 2·h·w]` in x's dtype.
    fn apply(&self, x: &View) -> Result<Tensor> {
        if matches!(x.data, Data::Cuda(..)) {
            return self.apply_by_products(x);
        }
        let (d, m) = (self.signal_dim(), self.obs_dim());
        let xs = self.input("apply", x, d)?;
        let mut out = vec![0.0f64; self.batch * m];
        out.par_chunks_mut(m)
            .zip(xs.par_chunks(d))
            .enumerate()
            .for_each(|(i, (o, xi))| self.apply_one(i, xi, o));
        Tensor::from_f64_as(&out, &[self.batch, m], x.dtype(), &Device::Cpu)
    }

    /// Re(ifft2c(mask ⊙ (v_re + i·v_im))): `y` holds B k-spaces `[h, w, 2]` (any shape with
    /// leading axis B and B·2·h·w values, f32 or f64 on the CPU); returns `[B, h·w]` in y's dtype.
    fn adjoint(&self, y: &View) -> Result<Tensor> {
        if matches!(y.data, Data::Cuda(..)) {
            return self.adjoint_by_products(y);
        }
        let (d, m) = (self.signal_dim(), self.obs_dim());
        let ys = self.input("adjoint", y, m)?;
        let mut out = vec![0.0f64; self.batch * d];
        out.par_chunks_mut(d)
            .zip(ys.par_chunks(m))
            .enumerate()
            .for_each(|(i, (o, yi))| self.adjoint_one(i, yi, o));
        Tensor::from_f64_as(&out, &[self.batch, d], y.dtype(), &Device::Cpu)
    }
}

/// The number of fully sampled centre columns of a `w`-column k-space: `round(w ·
/// center_fraction)`, at columns `(w - n_low + 1) / 2 ..` (fastMRI's placement, centred on the
/// zero frequency at column `w / 2`).
pub fn center_band(w: usize, center_fraction: f64) -> std::ops::Range<usize> {
    let n_low = ((w as f64 * center_fraction).round() as usize).min(w);
    let pad = (w - n_low).div_ceil(2);
    pad..pad + n_low
}

/// Random column masks `[n, w]` (1 kept, 0 dropped), one per slice, after fastMRI's
/// `RandomMaskFunc` (method.md §7.3): the centre band of `round(w · center_fraction)` columns
/// ([`center_band`]) is always kept, and every other column independently with probability
/// (w/R − n_low) / (w − n_low), so that 1/R of the columns are kept on average (when the band
/// alone is narrower than w/R; otherwise only the band is kept). The paper's setting is
/// R = [`PAPER_ACCELERATION`], centre fraction [`PAPER_CENTER_FRACTION`]: at w = 320 a 20-column
/// band and keep-probability 1/9, about 53 columns.
///
/// Uniforms come from Philox stream [`MASK_STREAM`] of `seed` (element `s·w + j` decides column j
/// of slice s), so the masks are reproducible, and slice s is the same whatever n.
/// Errors unless R ≥ 1 (finite), `center_fraction` is in `[0, 1]` and w > 0.
pub fn column_masks(
    n: usize,
    w: usize,
    acceleration: f64,
    center_fraction: f64,
    seed: u64,
) -> Result<Vec<f32>> {
    if !(acceleration.is_finite() && acceleration >= 1.0) {
        return Err(Error::Other(format!(
            "column_masks: the acceleration must be a finite number >= 1 (got {acceleration})"
        )));
    }
    if !(0.0..=1.0).contains(&center_fraction) {
        return Err(Error::Other(format!(
            "column_masks: the centre fraction must be in [0, 1] (got {center_fraction})"
        )));
    }
    if w == 0 {
        return Err(Error::Other(
            "column_masks: k-space needs at least one column (w = 0)".into(),
        ));
    }
    let total = n
        .checked_mul(w)
        .ok_or_else(|| Error::Other(format!("column_masks: {n}×{w} masks are too large")))?;
    let band = center_band(w, center_fraction);
    let n_low = band.len();
    let prob = if n_low < w {
        ((w as f64 / acceleration - n_low as f64) / (w - n_low) as f64).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let mut u = vec![0.0f32; total];
    Philox::new(seed, MASK_STREAM).fill_uniform(0, &mut u);
    Ok(u.chunks_exact(w)
        .flat_map(|row| {
            let band = band.clone();
            row.iter().enumerate().map(move |(j, &r)| {
                if band.contains(&j) || (r as f64) < prob {
                    1.0
                } else {
                    0.0
                }
            })
        })
        .collect())
}
