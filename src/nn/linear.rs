//! Linear layer y = x W + b over the last axis (W is [fan_in, fan_out], as inox stores it).
//! It is a GEMM with a bias epilogue: forward and backward go through `ops::gemm` and the bias
//! ops of `ops::broadcast`, so its CUDA path is kernels/gemm.cu and kernels/broadcast.cu.

use super::params::{Init, ParamId, ParamLayout};
use crate::error::{Error, Result};
use crate::ops::broadcast::{add_bias, sum_rows_into};
use crate::ops::{gemm_into, GemmSpec};
use crate::tensor::{Tensor, View, ViewMut};

#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
    pub fan_in: usize,
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

    /// y[.., fan_out] = x[.., fan_in] W + b.
    pub fn forward(&self, layout: &ParamLayout, params: &View, x: &View) -> Result<Tensor> {
        let rows = self.rows(x)?;
        let x2 = x.reshape(&[rows, self.fan_in])?;
        let mut out_shape = x.shape().to_vec();
        *out_shape.last_mut().unwrap() = self.fan_out;
        let mut y = Tensor::uninit(&[rows, self.fan_out], x.dtype(), &x.device())?;
        gemm_into(
            &x2,
            &layout.view(params, self.weight)?,
            &mut y,
            GemmSpec::default(),
        )?;
        if let Some(b) = self.bias {
            add_bias(&mut y, &layout.view(params, b)?)?;
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
        gemm_into(
            &dy2,
            &layout.view(params, self.weight)?,
            &mut dx,
            GemmSpec::new(false, true),
        )?;
        if let Some(g) = grads {
            let x2 = x.reshape(&[rows, self.fan_in])?;
            let accumulate = GemmSpec {
                beta: 1.0,
                ..GemmSpec::new(true, false)
            };
            gemm_into(&x2, &dy2, &mut layout.view_mut(g, self.weight)?, accumulate)?;
            if let Some(b) = self.bias {
                sum_rows_into(&dy2, 1, &mut layout.view_mut(g, b)?, true)?;
            }
        }
        dx.reshape(x.shape())
    }
}
