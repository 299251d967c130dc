//! Linear layer y = x W + b over the last axis (W is [fan_in, fan_out], as inox stores it).
//! It is a GEMM with the bias added in its epilogue; the backward's bias gradient is a column sum
//! (`ops::broadcast`). CUDA: kernels/gemm.cu and kernels/broadcast.cu. Under the bf16 policy
//! (the layout's precision) the three GEMMs read bf16 copies of x, W and dy and accumulate in f32
//! (`ops::gemm_bf16_into`); outputs and gradients stay f32.

use super::params::{Init, ParamId, ParamLayout};
use crate::error::{Error, Result};
use crate::ops::broadcast::sum_rows_into;
use crate::ops::precision::{tensor_core_refusal, to_bf16, Precision};
use crate::ops::{gemm_bf16_into, gemm_bias_into, gemm_into, GemmSpec};
use crate::tensor::{AsViewMut, Tensor, View, ViewMut};

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

    fn rows(&self, x: &View) -> Result<usize> {
        match x.shape().last() {
            Some(&c) if c == self.fan_in => Ok(x.numel() / c),
            _ => Err(Error::shape(
                "linear",
                "input",
                format!("[.., {}]", self.fan_in),
                x.shape(),
            )),
        }
    }

    /// True when this layer's GEMMs take bf16 operands: the layout asks for it and both widths
    /// are multiples of 8 (any row count works).
    fn bf16(&self, layout: &ParamLayout, x: &View) -> bool {
        layout.precision() == Precision::Bf16
            && tensor_core_refusal(&[("fan_in", self.fan_in), ("fan_out", self.fan_out)], &x.device())
                .is_none()
    }

    /// y[.., fan_out] = x[.., fan_in] W + b.
    pub fn forward(&self, layout: &ParamLayout, params: &View, x: &View) -> Result<Tensor> {
        let rows = self.rows(x)?;
        let x2 = x.reshape(&[rows, self.fan_in])?;
        let mut out_shape = x.shape().to_vec();
        *out_shape.last_mut().unwrap() = self.fan_out;
        let mut y = Tensor::uninit(&[rows, self.fan_out], x.dtype(), &x.device())?;
        let w = layout.view(params, self.weight)?;
        let bias = self.bias.map(|b| layout.view(params, b)).transpose()?;
        let spec = GemmSpec::default();
        if self.bf16(layout, x) {
            let (xb, wb) = (to_bf16(&x2)?, to_bf16(&w)?);
            gemm_bf16_into(&xb, &wb, bias.as_ref(), Some(&mut y.as_view_mut()?), None, spec)?;
        } else {
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
        params: &View,
        x: &View,
        dy: &View,
        grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        let rows = self.rows(x)?;
        let dy2 = dy.reshape(&[rows, self.fan_out])?;
        let mut dx = Tensor::uninit(&[rows, self.fan_in], x.dtype(), &x.device())?;
        let w = layout.view(params, self.weight)?;
        // Under bf16, dy is cast once and serves both GEMMs.
        let dyb = if self.bf16(layout, x) {
            Some(to_bf16(&dy2)?)
        } else {
            None
        };
        let nt = GemmSpec::new(false, true);
        match &dyb {
            Some(dyb) => gemm_bf16_into(dyb, &to_bf16(&w)?, None, Some(&mut dx.as_view_mut()?), None, nt)?,
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
                Some(dyb) => gemm_bf16_into(&to_bf16(&x2)?, dyb, None, Some(&mut dw), None, accumulate)?,
                None => gemm_into(&x2, &dy2, &mut dw, accumulate)?,
            }
            if let Some(b) = self.bias {
                sum_rows_into(&dy2, 1, &mut layout.view_mut(g, b)?, true)?;
            }
        }
        dx.reshape(x.shape())
    }
}
