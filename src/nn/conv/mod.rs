//! 3x3 convolution with padding 1 and stride 1 or 2, channels-last: x [N, H, W, Cin], weight
//! `[3, 3, Cin, Cout]` (inox's layout), bias `[Cout]`. Computed as im2col followed by a GEMM on both
//! backends (kernels/conv.cu builds the columns, kernels/gemm.cu multiplies and adds the bias in
//! its epilogue); the backward
//! rebuilds the columns from the saved input instead of keeping them. Columns are built for a
//! chunk of samples at a time when the whole batch's would pass a budget (1 GiB by default).
//!
//! Under the bf16 policy (the layout's precision) the three passes run as implicit GEMMs on bf16
//! copies of x, the weight and dy with f32 accumulation ([`bf16`]: tensor cores on a
//! GPU, no column buffer), when both channel counts are multiples of 8; outputs and gradients
//! stay f32. An input kept in bf16 (`*_operand`) is read as it is, or widened on the f32 path.
//! This f32 path is the exact reference.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::device::launch::grid_stride;

pub mod bf16;

use crate::error::{Error, Result};
use crate::nn::params::{Bf16Weight, ParamId, ParamLayout, Weights};
use crate::ops::broadcast::sum_rows_into;
use crate::ops::precision::{keep, to_bf16, Operand};
use crate::ops::{gemm_bias_into, gemm_into, mismatch, GemmSpec};
use crate::tensor::{AsView, AsViewMut, DType, Data, DataMut, Tensor, View, ViewMut};
use bf16 as conv_bf16;

/// The shape of one convolution: the `#[repr(C)]` mirror of `ConvGeometry` in kernels/conv.cu,
/// generated from it by the build (layout asserted on both sides).
pub use crate::device::params::ConvGeometry;

impl ConvGeometry {
    /// The geometry of a batch of `n` images `h x w x cin` under a 3x3 convolution with padding 1
    /// and `stride`: the output is `ceil(h / stride) x ceil(w / stride)`.
    pub fn new(n: usize, h: usize, w: usize, cin: usize, stride: usize) -> ConvGeometry {
        ConvGeometry {
            n: n as i32,
            h: h as i32,
            w: w as i32,
            cin: cin as i32,
            oh: ((h - 1) / stride + 1) as i32,
            ow: ((w - 1) / stride + 1) as i32,
            stride: stride as i32,
        }
    }

    fn out_pixels(&self) -> usize {
        self.n as usize * self.oh as usize * self.ow as usize
    }
    fn in_elems(&self) -> usize {
        self.n as usize * self.h as usize * self.w as usize * self.cin as usize
    }
    fn col_cols(&self) -> usize {
        9 * self.cin as usize
    }
}

/// The CPU bodies: the oracle for kernels/conv.cu.
pub mod cpu {
    use super::ConvGeometry;
    use crate::real::Real;

    /// The row-major column matrix `[n * oh * ow, 9 * cin]` of the NHWC input: per output pixel,
    /// the 9 taps in (ky, kx) order with channels fastest; taps in the padding are zero.
    pub fn im2col<T: Real>(x: &[T], col: &mut [T], g: &ConvGeometry) {
        let (h, w, cin, oh, ow, s) = (g.h, g.w, g.cin as usize, g.oh, g.ow, g.stride);
        let mut i = 0;
        for n in 0..g.n as usize {
            for oy in 0..oh {
                for ox in 0..ow {
                    for tap in 0..9 {
                        let (iy, ix) = (oy * s + tap / 3 - 1, ox * s + tap % 3 - 1);
                        let inside = iy >= 0 && iy < h && ix >= 0 && ix < w;
                        let base =
                            ((n * h as usize + iy.max(0) as usize) * w as usize + ix.max(0) as usize) * cin;
                        for ci in 0..cin {
                            col[i] = if inside { x[base + ci] } else { T::ZERO };
                            i += 1;
                        }
                    }
                }
            }
        }
    }

    /// dx = the adjoint of im2col applied to dcol (overwrites dx).
    pub fn col2im<T: Real>(dcol: &[T], dx: &mut [T], g: &ConvGeometry) {
        dx.fill(T::ZERO);
        let (h, w, cin, oh, ow, s) = (g.h, g.w, g.cin as usize, g.oh, g.ow, g.stride);
        let mut i = 0;
        for n in 0..g.n as usize {
            for oy in 0..oh {
                for ox in 0..ow {
                    for tap in 0..9 {
                        let (iy, ix) = (oy * s + tap / 3 - 1, ox * s + tap % 3 - 1);
                        if iy >= 0 && iy < h && ix >= 0 && ix < w {
                            let base = ((n * h as usize + iy as usize) * w as usize + ix as usize) * cin;
                            for ci in 0..cin {
                                dx[base + ci] += dcol[i + ci];
                            }
                        }
                        i += cin;
                    }
                }
            }
        }
    }
}

/// The column matrix [N * OH * OW, 9 * Cin] of x.
pub fn im2col(x: &View, g: &ConvGeometry) -> Result<Tensor> {
    let mut col = Tensor::uninit(&[g.out_pixels(), g.col_cols()], x.dtype(), &x.device())?;
    {
        let mut cv = col.as_view_mut()?;
        match (&x.data, &mut cv.data) {
            (Data::Cuda(xv, dev), DataMut::Cuda(co, _)) => {
                let cfg = grid_stride(dev, g.out_pixels() * g.col_cols());
                // SAFETY: x holds g.in_elems() values and col out_pixels * col_cols.
                unsafe { dev.kernels().conv_im2col_f32(cfg, xv, co, *g) }?;
            }
            (Data::Cuda(..), _) => return Err(mismatch("im2col", &[x], &[])),
            _ => host_real!(x, T => {
                cpu::im2col::<T>(x.cpu()?, cv.cpu_mut()?, g);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(col)
}

/// The input gradient [N, H, W, Cin] from the column gradient.
pub fn col2im(dcol: &View, g: &ConvGeometry) -> Result<Tensor> {
    let shape = [g.n as usize, g.h as usize, g.w as usize, g.cin as usize];
    let mut dx = Tensor::uninit(&shape, dcol.dtype(), &dcol.device())?;
    col2im_into(dcol, g, &mut dx.as_view_mut()?)?;
    Ok(dx)
}

/// As `col2im`, into a view holding [N, H, W, Cin] (overwritten).
pub fn col2im_into(dcol: &View, g: &ConvGeometry, dx: &mut ViewMut) -> Result<()> {
    if dx.numel() != g.in_elems() || dcol.numel() != g.out_pixels() * g.col_cols() {
        return Err(Error::shape("col2im", "dx", [g.in_elems()], dx.shape()));
    }
    match (&dcol.data, &mut dx.data) {
        (Data::Cuda(cv, dev), DataMut::Cuda(o, _)) => {
            // SAFETY: dcol holds out_pixels * col_cols values and dx g.in_elems() (checked).
            unsafe {
                dev.kernels()
                    .conv_col2im_f32(grid_stride(dev, g.in_elems()), cv, o, *g)
            }?;
        }
        (Data::Cuda(..), _) => return Err(mismatch("col2im", &[dcol], &[])),
        _ => host_real!(dcol, T => {
            cpu::col2im::<T>(dcol.cpu()?, dx.cpu_mut()?, g);
            Ok::<(), Error>(())
        })?,
    }
    Ok(())
}

/// Column buffers are built for at most this many bytes at once (f32): a convolution whose
/// columns need more runs over chunks of samples. Each output row and each sample's input
/// gradient comes out as in one piece; the weight gradient adds the chunks' products in turn.
/// The MRI U-Net's widest convolution needs 84 MiB of columns per sample, 21 GiB at batch 256.
static COLUMN_BUDGET: AtomicUsize = AtomicUsize::new(1 << 30);

/// Sets the column budget in bytes (tests use a small one to exercise the chunks).
pub fn set_column_budget(bytes: usize) {
    COLUMN_BUDGET.store(bytes.max(1), Ordering::Relaxed);
}

/// The current column budget in bytes (see [`set_column_budget`]).
pub fn column_budget() -> usize {
    COLUMN_BUDGET.load(Ordering::Relaxed)
}

/// Samples per chunk for `col_bytes` bytes of columns per sample (at least one).
pub fn samples_per_chunk(col_bytes: usize) -> usize {
    (column_budget() / col_bytes.max(1)).max(1)
}

impl ConvGeometry {
    /// (first sample, geometry) of each chunk of samples whose columns fit the budget.
    fn chunks(&self) -> Vec<(usize, ConvGeometry)> {
        let n = self.n as usize;
        let per = (self.oh * self.ow) as usize * self.col_cols() * 4;
        let k = samples_per_chunk(per);
        (0..n)
            .step_by(k)
            .map(|s| {
                let count = k.min(n - s);
                (
                    s,
                    ConvGeometry {
                        n: count as i32,
                        ..*self
                    },
                )
            })
            .collect()
    }

    /// Elements of one sample's input and of its output pixels.
    fn per_sample(&self) -> (usize, usize) {
        (
            (self.h * self.w * self.cin) as usize,
            (self.oh * self.ow) as usize,
        )
    }
}

/// A 3x3 convolution with padding 1 and stride 1 or 2, channels-last:
/// `[N, H, W, Cin]` -> `[N, ceil(H / s), ceil(W / s), Cout]`.
#[derive(Clone, Debug)]
pub struct Conv3x3 {
    /// The weight `[3, 3, Cin, Cout]`.
    pub weight: ParamId,
    /// The bias `[Cout]`.
    pub bias: ParamId,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// 1, or 2 for the U-Net's down-sampling convolutions.
    pub stride: usize,
}

impl Conv3x3 {
    /// Registers `{name}.weight` [3, 3, cin, cout] (U(+-1/sqrt(9 cin))) and `{name}.bias`.
    pub fn new(layout: &mut ParamLayout, name: &str, cin: usize, cout: usize, stride: usize) -> Self {
        assert!(stride == 1 || stride == 2, "Conv3x3 supports stride 1 or 2");
        let weight = layout.weight(format!("{name}.weight"), &[3, 3, cin, cout], 9 * cin);
        let bias = layout.add(format!("{name}.bias"), &[cout], super::params::Init::Zeros);
        Conv3x3 {
            weight,
            bias,
            cin,
            cout,
            stride,
        }
    }

    /// The geometry for an input of shape `[N, H, W, Cin]`; errors on any other shape.
    pub fn geometry(&self, x_shape: &[usize]) -> Result<ConvGeometry> {
        match *x_shape {
            [n, h, w, c] if c == self.cin => Ok(ConvGeometry::new(n, h, w, c, self.stride)),
            _ => Err(Error::shape(
                "conv3x3",
                "input",
                format!("[N, H, W, {}]", self.cin),
                x_shape,
            )),
        }
    }

    /// The output shape for an input shape.
    pub fn out_shape(&self, x_shape: &[usize]) -> Result<Vec<usize>> {
        let g = self.geometry(x_shape)?;
        Ok(vec![g.n as usize, g.oh as usize, g.ow as usize, self.cout])
    }

    fn weight_matrix<'a>(&self, layout: &ParamLayout, params: &Weights<'a>) -> Result<View<'a>> {
        layout
            .view(params, self.weight)?
            .reshape(&[9 * self.cin, self.cout])
    }

    /// The weight matrix in bf16: from the caller's bf16 copy, or cast for this call.
    fn weight_bf16<'a>(&self, layout: &ParamLayout, params: &Weights<'a>) -> Result<Bf16Weight<'a>> {
        layout.weight_bf16(params, self.weight, &[9 * self.cin, self.cout])
    }

    /// Whether the passes run on the tensor cores for an input of `x_shape` on `device`: a
    /// caller can then hand this layer a bf16 input made in its own pass (no cast here).
    pub(crate) fn tensor_cores(
        &self,
        layout: &ParamLayout,
        x_shape: &[usize],
        device: &crate::Device,
    ) -> Result<bool> {
        Ok(self.bf16(layout, &self.geometry(x_shape)?, device))
    }

    /// True when the passes take the bf16 implicit-GEMM path (see the module doc).
    fn bf16(&self, layout: &ParamLayout, g: &ConvGeometry, device: &crate::Device) -> bool {
        layout.precision() == crate::ops::Precision::Bf16
            && conv_bf16::refusal(g, self.cout, device).is_none()
    }

    /// y = conv(x) + b.
    pub fn forward(&self, layout: &ParamLayout, params: &Weights, x: &View) -> Result<Tensor> {
        self.forward_operand(layout, params, &Operand::F32(x.clone()))
    }

    /// As [`Self::forward`], for an input that may be a kept bf16 activation (read as it is
    /// under bf16, widened otherwise).
    pub fn forward_operand(&self, layout: &ParamLayout, params: &Weights, x: &Operand) -> Result<Tensor> {
        self.forward_into(layout, params, x, false)
    }

    /// The output as a forward keeps it for its backward (`ops::precision::keep`): under the
    /// bf16 policy written in bf16 by the kernel's epilogue (the bits of `keep(forward(x))`
    /// without the f32 copy), else f32.
    pub fn forward_kept(&self, layout: &ParamLayout, params: &Weights, x: &Operand) -> Result<Tensor> {
        let y = self.forward_into(layout, params, x, true)?;
        keep(y, layout.precision())
    }

    /// [`Self::forward_kept`] for a ResBlock's conv2 with the block's residual
    /// `out = (x + c h) / sqrt(1 + c^2)` in the convolution's epilogue
    /// ([`conv_bf16::forward_residual`]: one pass fewer over h on a GPU, the bits of the two
    /// ops): `Some((h, out))` on the tensor-core path with the block input `x` kept in bf16
    /// (out bf16 when `out_bf16`, as the next block keeps it; else f32), `None` where that path
    /// does not apply and the caller runs the two ops.
    pub fn forward_kept_residual(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        input: &Operand,
        x: &Operand,
        m: &View,
        out_bf16: bool,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let g = self.geometry(input.shape())?;
        let device = input.device();
        let Operand::Bf16(xb) = x else { return Ok(None) };
        if !self.bf16(layout, &g, &device) {
            return Ok(None);
        }
        let out_shape = self.out_shape(input.shape())?;
        if xb.shape() != out_shape.as_slice() {
            return Err(Error::shape("conv3x3 residual", "x", &out_shape, xb.shape()));
        }
        let b = layout.view(params, self.bias)?;
        let mut h = Tensor::uninit(&[g.out_pixels(), self.cout], DType::BF16, &device)?;
        let out_dtype = if out_bf16 { DType::BF16 } else { DType::F32 };
        let mut out = Tensor::uninit(&out_shape, out_dtype, &device)?;
        let (inb, wb) = (input.narrow()?, self.weight_bf16(layout, params)?);
        let residual = conv_bf16::Residual {
            x: xb.clone(),
            m,
            out: &mut out,
        };
        conv_bf16::forward_residual(inb.as_ref(), wb.get(), Some(&b), &g, self.cout, &mut h, residual)?;
        Ok(Some((h.reshape(&out_shape)?, out)))
    }

    /// The forward; with `bf16_out` on the tensor-core path the output is bf16.
    fn forward_into(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: &Operand,
        bf16_out: bool,
    ) -> Result<Tensor> {
        let g = self.geometry(x.shape())?;
        let device = x.device();
        let (w, b) = (
            self.weight_matrix(layout, params)?,
            layout.view(params, self.bias)?,
        );
        if self.bf16(layout, &g, &device) {
            let dtype = if bf16_out { DType::BF16 } else { DType::F32 };
            let mut y = Tensor::uninit(&[g.out_pixels(), self.cout], dtype, &device)?;
            let (xb, wb) = (x.narrow()?, self.weight_bf16(layout, params)?);
            let (xb, wb, cout) = (xb.as_ref(), wb.get(), self.cout);
            if bf16_out {
                conv_bf16::forward(xb, wb, Some(&b), &g, cout, None, Some(&mut y))?;
            } else {
                conv_bf16::forward(xb, wb, Some(&b), &g, cout, Some(&mut y.as_view_mut()?), None)?;
            }
            return y.reshape(&self.out_shape(x.shape())?);
        }
        let mut y = Tensor::uninit(&[g.out_pixels(), self.cout], out_dtype(x), &device)?;
        {
            let xw = x.widen()?;
            let x = xw.view()?;
            let (in_per, out_per) = g.per_sample();
            for (s, gk) in g.chunks() {
                let n = gk.n as usize;
                let col = im2col(&x.sub(s * in_per, &[n * in_per])?, &gk)?;
                let mut yv = y.as_view_mut()?;
                let mut yk = yv.sub_mut(s * out_per * self.cout, &[n * out_per, self.cout])?;
                gemm_bias_into(&col, &w, &b, &mut yk, GemmSpec::default())?;
            }
        }
        y.reshape(&self.out_shape(x.shape())?)
    }

    /// dx for dy (x is the saved input); with `grads`, dW += col^T dy and db += sum dy.
    pub fn backward(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: &View,
        dy: &View,
        grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        self.backward_operand(layout, params, &Operand::F32(x.clone()), dy, grads)
    }

    /// As [`Self::backward`], for a saved input that may be a kept bf16 activation.
    pub fn backward_operand(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: &Operand,
        dy: &View,
        grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        // Under bf16, dy is rounded once for both passes.
        let dyb = self.dy_bf16(layout, x.shape(), dy)?;
        if let Some(grads) = grads {
            self.param_grads_with(layout, x, dy, dyb.as_ref(), grads)?;
        }
        self.backward_input_with(layout, params, x.shape(), dy, dyb.as_ref())
    }

    /// dy rounded to bf16 (`[pixels, Cout]`) when this layer's passes take the tensor cores for an
    /// input of `x_shape`, else None: for a caller that runs the two backward passes apart
    /// ([`Self::param_grads_with`], [`Self::backward_input_with`]) to round it once.
    pub(crate) fn dy_bf16(
        &self,
        layout: &ParamLayout,
        x_shape: &[usize],
        dy: &View,
    ) -> Result<Option<Tensor>> {
        let g = self.geometry(x_shape)?;
        if !self.bf16(layout, &g, &dy.device()) {
            return Ok(None);
        }
        Ok(Some(to_bf16(&dy.reshape(&[g.out_pixels(), self.cout])?)?))
    }

    /// dx for dy alone: the input enters only through its shape, so a VJP needs no saved input.
    pub fn backward_input(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x_shape: &[usize],
        dy: &View,
    ) -> Result<Tensor> {
        self.backward_input_with(layout, params, x_shape, dy, None)
    }

    /// [`Self::backward_input`], with dy already rounded to bf16 when the caller has it.
    pub(crate) fn backward_input_with(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x_shape: &[usize],
        dy: &View,
        dy_bf16: Option<&Tensor>,
    ) -> Result<Tensor> {
        let g = self.geometry(x_shape)?;
        let dy2 = dy.reshape(&[g.out_pixels(), self.cout])?;
        let wm = self.weight_matrix(layout, params)?;
        let mut dx = Tensor::uninit(x_shape, dy.dtype(), &dy.device())?;
        if self.bf16(layout, &g, &dy.device()) {
            let mut own = None;
            let dyb = dy_rounded(&dy2, dy_bf16, &mut own)?;
            let wb = self.weight_bf16(layout, params)?;
            conv_bf16::input_grad(dyb, wb.get(), &g, self.cout, &mut dx.as_view_mut()?, 0.0)?;
            return Ok(dx);
        }
        let (in_per, out_per) = g.per_sample();
        for (s, gk) in g.chunks() {
            let n = gk.n as usize;
            let dyk = dy2.sub(s * out_per * self.cout, &[n * out_per, self.cout])?;
            let mut dcol = Tensor::uninit(&[n * out_per, g.col_cols()], dy.dtype(), &dy.device())?;
            gemm_into(&dyk, &wm, &mut dcol, GemmSpec::new(false, true))?;
            let mut dxv = dx.as_view_mut()?;
            col2im_into(
                &dcol.as_view()?,
                &gk,
                &mut dxv.sub_mut(s * in_per, &[n * in_per])?,
            )?;
        }
        Ok(dx)
    }

    /// dW += col(x)^T dy and db += sum dy. The column buffer is freed before the input gradient's
    /// own column buffer exists (`backward` calls this first), so the two never coexist.
    pub fn param_grads(&self, layout: &ParamLayout, x: &View, dy: &View, grads: &mut ViewMut) -> Result<()> {
        self.param_grads_operand(layout, &Operand::F32(x.clone()), dy, grads)
    }

    /// As [`Self::param_grads`], for an input that may be a kept bf16 activation.
    pub fn param_grads_operand(
        &self,
        layout: &ParamLayout,
        x: &Operand,
        dy: &View,
        grads: &mut ViewMut,
    ) -> Result<()> {
        self.param_grads_with(layout, x, dy, None, grads)
    }

    /// [`Self::param_grads_operand`], with dy already rounded to bf16 when the caller has it.
    pub(crate) fn param_grads_with(
        &self,
        layout: &ParamLayout,
        x: &Operand,
        dy: &View,
        dy_bf16: Option<&Tensor>,
        grads: &mut ViewMut,
    ) -> Result<()> {
        let g = self.geometry(x.shape())?;
        let dy2 = dy.reshape(&[g.out_pixels(), self.cout])?;
        if self.bf16(layout, &g, &x.device()) {
            let xb = x.narrow()?;
            let mut own = None;
            let dyb = dy_rounded(&dy2, dy_bf16, &mut own)?;
            let mut dw = layout.view_mut(grads, self.weight)?;
            conv_bf16::weight_grad(xb.as_ref(), dyb, &g, self.cout, &mut dw, 1.0)?;
        } else {
            let xw = x.widen()?;
            let x = xw.view()?;
            let acc = GemmSpec {
                beta: 1.0,
                ..GemmSpec::new(true, false)
            };
            let (in_per, out_per) = g.per_sample();
            for (s, gk) in g.chunks() {
                let n = gk.n as usize;
                let col = im2col(&x.sub(s * in_per, &[n * in_per])?, &gk)?;
                let dyk = dy2.sub(s * out_per * self.cout, &[n * out_per, self.cout])?;
                let mut dw = layout
                    .view_mut(grads, self.weight)?
                    .reshape(&[9 * self.cin, self.cout])?;
                gemm_into(&col, &dyk, &mut dw, acc)?;
            }
        }
        sum_rows_into(&dy2, 1, &mut layout.view_mut(grads, self.bias)?, true)
    }
}

/// dy in bf16 for the tensor-core passes: the caller's rounding when it made one
/// ([`Conv3x3::dy_bf16`]), else one made now and held in `own`.
fn dy_rounded<'t>(dy2: &View, given: Option<&'t Tensor>, own: &'t mut Option<Tensor>) -> Result<&'t Tensor> {
    match given {
        Some(t) => Ok(t),
        None => Ok(own.insert(to_bf16(dy2)?)),
    }
}

/// A convolution's output type: f32, or f64 for the CPU oracle's f64 input.
fn out_dtype(x: &Operand) -> DType {
    match x.dtype() {
        DType::BF16 => DType::F32,
        d => d,
    }
}
