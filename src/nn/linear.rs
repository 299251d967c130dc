//! Linear layer y = x W + b over the last axis (W is [fan_in, fan_out], as inox stores it).
//! It is a GEMM with the bias added in its epilogue; the backward's bias gradient is a column sum
//! (`ops::broadcast`). CUDA: kernels/gemm.cu and kernels/broadcast.cu. Under the bf16 policy
//! (the layout's precision) the three GEMMs read bf16 copies of x, W and dy and accumulate in f32
//! (`ops::gemm_bf16_into`); outputs and gradients stay f32. An input kept in bf16 (`*_operand`)
//! is read as it is, or widened where the layer stays f32.

use super::params::{Bf16Weight, Init, ParamId, ParamLayout, Weights};
use crate::error::{Error, Result};
use crate::ops::broadcast::sum_rows_into;
use crate::ops::precision::{keep, tensor_core_refusal, to_bf16, Operand, Precision};
use crate::ops::{gemm_bf16_into, gemm_bias_into, gemm_into, GemmSpec};
use crate::tensor::{AsViewMut, DType, Tensor, View, ViewMut};

/// A fully connected layer over the last axis, `y = x W + b`, its parameters in a [`ParamLayout`].
#[derive(Clone, Debug)]
pub struct Linear {
    /// The weight `[fan_in, fan_out]`.
    pub weight: ParamId,
    /// The bias `[fan_out]`, when the layer has one.
    pub bias: Option<ParamId>,
    /// Input features: the input's last axis.
    pub fan_in: usize,
    /// Output features.
    pub fan_out: usize,
}

impl Linear {
    /// Registers `{name}.weight` (U(+-1/sqrt(fan_in))) and, with `bias`, `{name}.bias` (zeros).
    pub fn new(layout: &mut ParamLayout, name: &str, fan_in: usize, fan_out: usize, bias: bool) -> Self {
        Self::with_scale(layout, name, fan_in, fan_out, bias, 1.0)
    }

    /// As `new`, with the initial weights multiplied by `scale` (0.1 for modulation outputs).
    pub fn with_scale(
        layout: &mut ParamLayout,
        name: &str,
        fan_in: usize,
        fan_out: usize,
        bias: bool,
        scale: f64,
    ) -> Self {
        let weight = layout.add(
            format!("{name}.weight"),
            &[fan_in, fan_out],
            Init::Uniform {
                bound: 1.0 / (fan_in as f64).sqrt(),
                scale,
            },
        );
        let bias = bias.then(|| layout.add(format!("{name}.bias"), &[fan_out], Init::Zeros));
        Linear {
            weight,
            bias,
            fan_in,
            fan_out,
        }
    }

    fn rows(&self, shape: &[usize]) -> Result<usize> {
        match shape.last() {
            Some(&c) if c == self.fan_in => Ok(crate::tensor::numel(shape) / c),
            _ => Err(Error::shape(
                "linear",
                "input",
                format!("[.., {}]", self.fan_in),
                shape,
            )),
        }
    }

    /// True when this layer's GEMMs take bf16 operands: the layout asks for it and both widths
    /// are multiples of 8 (any row count works).
    fn bf16(&self, layout: &ParamLayout, device: &crate::Device) -> bool {
        layout.precision() == Precision::Bf16
            && tensor_core_refusal(&[("fan_in", self.fan_in), ("fan_out", self.fan_out)], device).is_none()
    }

    /// W in bf16: from the caller's bf16 copy, or cast for this call.
    fn weight_bf16<'a>(&self, layout: &ParamLayout, params: &Weights<'a>) -> Result<Bf16Weight<'a>> {
        layout.weight_bf16(params, self.weight, &[self.fan_in, self.fan_out])
    }

    /// y[.., fan_out] = x[.., fan_in] W + b.
    pub fn forward(&self, layout: &ParamLayout, params: &Weights, x: &View) -> Result<Tensor> {
        self.forward_operand(layout, params, &Operand::F32(x.clone()))
    }

    /// As [`Self::forward`], for an input that may be a kept bf16 activation (read as it is
    /// under bf16, widened otherwise).
    pub fn forward_operand(&self, layout: &ParamLayout, params: &Weights, x: &Operand) -> Result<Tensor> {
        self.forward_into(layout, params, x, false)
    }

    /// The output as a forward keeps it for its backward (`ops::precision::keep`): under the
    /// bf16 policy written in bf16 by the GEMM's epilogue (the bits of `keep(forward(x))`
    /// without the f32 copy), else f32.
    pub fn forward_kept(&self, layout: &ParamLayout, params: &Weights, x: &Operand) -> Result<Tensor> {
        let y = self.forward_into(layout, params, x, true)?;
        keep(y, layout.precision())
    }

    /// The forward; with `bf16_out` on the tensor-core path the output is bf16.
    fn forward_into(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: &Operand,
        bf16_out: bool,
    ) -> Result<Tensor> {
        let rows = self.rows(x.shape())?;
        let x2 = x.reshape(&[rows, self.fan_in])?;
        let mut out_shape = x.shape().to_vec();
        *out_shape.last_mut().unwrap() = self.fan_out;
        let tensor_cores = self.bf16(layout, &x.device());
        // f32 out (bf16 when asked on the tensor-core path), or f64 for the CPU oracle's input.
        let out_dtype = match x.dtype() {
            _ if tensor_cores && bf16_out => DType::BF16,
            DType::BF16 => DType::F32,
            d => d,
        };
        let mut y = Tensor::uninit(&[rows, self.fan_out], out_dtype, &x.device())?;
        let w = layout.view(params, self.weight)?;
        let bias = self.bias.map(|b| layout.view(params, b)).transpose()?;
        let spec = GemmSpec::default();
        if tensor_cores {
            let (xb, wb) = (x2.narrow()?, self.weight_bf16(layout, params)?);
            let (xb, wb, bias) = (xb.as_ref(), wb.get(), bias.as_ref());
            if bf16_out {
                gemm_bf16_into(xb, wb, bias, None, Some(&mut y), spec)?;
            } else {
                gemm_bf16_into(xb, wb, bias, Some(&mut y.as_view_mut()?), None, spec)?;
            }
        } else {
            let xw = x2.widen()?;
            let x2 = xw.view()?;
            match &bias {
                Some(b) => gemm_bias_into(&x2, &w, b, &mut y, spec)?,
                None => gemm_into(&x2, &w, &mut y, spec)?,
            }
        }
        y.reshape(&out_shape)
    }

    /// dx = dy W^T; with `grads`, dW += x^T dy and db += column sums of dy.
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
        let rows = self.rows(x.shape())?;
        let dy2 = dy.reshape(&[rows, self.fan_out])?;
        let mut dx = Tensor::uninit(&[rows, self.fan_in], dy.dtype(), &dy.device())?;
        let w = layout.view(params, self.weight)?;
        // Under bf16, dy is cast once and serves both GEMMs.
        let dyb = if self.bf16(layout, &dy.device()) {
            Some(to_bf16(&dy2)?)
        } else {
            None
        };
        let nt = GemmSpec::new(false, true);
        match &dyb {
            Some(dyb) => {
                let wb = self.weight_bf16(layout, params)?;
                gemm_bf16_into(dyb, wb.get(), None, Some(&mut dx.as_view_mut()?), None, nt)?
            }
            None => gemm_into(&dy2, &w, &mut dx, nt)?,
        }
        if let Some(g) = grads {
            let x2 = x.reshape(&[rows, self.fan_in])?;
            let accumulate = GemmSpec {
                beta: 1.0,
                ..GemmSpec::new(true, false)
            };
            let mut dw = layout.view_mut(g, self.weight)?;
            match &dyb {
                Some(dyb) => {
                    let xb = x2.narrow()?;
                    gemm_bf16_into(xb.as_ref(), dyb, None, Some(&mut dw), None, accumulate)?
                }
                None => gemm_into(&x2.widen()?.view()?, &dy2, &mut dw, accumulate)?,
            }
            if let Some(b) = self.bias {
                sum_rows_into(&dy2, 1, &mut layout.view_mut(g, b)?, true)?;
            }
        }
        dx.reshape(x.shape())
    }
}
