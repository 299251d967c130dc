//! The TimeMLP of the manifold experiment (method.md §3.4): input concat(x, emb), then
//! [Linear, SiLU, LayerNorm] per hidden width, then a Linear back to the features. SiLU and
//! LayerNorm run as one fused op (nn::norm::silu_layer_norm), forward and backward.
//! With 5 features, hidden (256, 256, 256) and a 64-wide embedding: 150,789 parameters.

use super::linear::Linear;
use super::norm::{silu_layer_norm, silu_layer_norm_backward, LnSaved};
use super::params::ParamLayout;
use super::resample::{concat_channels, split_channels};
use crate::error::{Error, Result};
use crate::tensor::{AsView, Tensor, View, ViewMut};

#[derive(Clone, Debug)]
pub struct TimeMlp {
    pub features: usize,
    pub hidden: Vec<usize>,
    pub emb: usize,
    pub layers: Vec<Linear>,
    pub layout: ParamLayout,
}

/// The first Linear's input, and per hidden layer its pre-activation and LayerNorm state (whose
/// output is the next Linear's input).
pub struct MlpSaved {
    input: Tensor,
    pre: Vec<Tensor>,
    norms: Vec<LnSaved>,
}

impl MlpSaved {
    pub fn bytes(&self) -> usize {
        let t: usize = std::iter::once(&self.input)
            .chain(&self.pre)
            .map(|t| t.size_in_bytes())
            .sum();
        t + self
            .norms
            .iter()
            .map(|n| n.y.size_in_bytes() + n.rstd.size_in_bytes())
            .sum::<usize>()
    }

    /// The input of Linear `i`.
    fn layer_input(&self, i: usize) -> &Tensor {
        if i == 0 {
            &self.input
        } else {
            &self.norms[i - 1].y
        }
    }
}

impl TimeMlp {
    pub fn new(features: usize, hidden: &[usize], emb: usize) -> Self {
        let mut layout = ParamLayout::new();
        let mut layers = Vec::new();
        let mut width = features + emb;
        for (i, &h) in hidden.iter().enumerate() {
            layers.push(Linear::new(&mut layout, &format!("mlp.{i}"), width, h, true));
            width = h;
        }
        layers.push(Linear::new(
            &mut layout,
            &format!("mlp.{}", hidden.len()),
            width,
            features,
            true,
        ));
        TimeMlp {
            features,
            hidden: hidden.to_vec(),
            emb,
            layers,
            layout,
        }
    }

    /// Multiply-adds of one forward for one sample (the linear layers).
    pub fn forward_macs(&self) -> u64 {
        self.layers.iter().map(|l| (l.fan_in * l.fan_out) as u64).sum()
    }

    /// y [N, F] = MLP(concat(x [N, F], emb [N, E])).
    pub fn forward(&self, params: &View, x: &View, emb: &View) -> Result<(Tensor, MlpSaved)> {
        if !matches!(*x.shape(), [_, f] if f == self.features) {
            return Err(Error::shape(
                "time_mlp",
                "x",
                format!("[N, {}]", self.features),
                x.shape(),
            ));
        }
        let mut saved = MlpSaved {
            input: concat_channels(x, emb)?,
            pre: Vec::new(),
            norms: Vec::new(),
        };
        let (last, hidden) = self.layers.split_last().unwrap();
        for (i, layer) in hidden.iter().enumerate() {
            let z = layer.forward(&self.layout, params, &saved.layer_input(i).as_view()?)?;
            let ln = silu_layer_norm(&z.as_view()?)?;
            saved.pre.push(z);
            saved.norms.push(ln);
        }
        let y = last.forward(&self.layout, params, &saved.layer_input(hidden.len()).as_view()?)?;
        Ok((y, saved))
    }

    /// dx [N, F] for dy; with `grads`, every parameter gradient.
    pub fn backward(
        &self,
        params: &View,
        saved: &MlpSaved,
        dy: &View,
        mut grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        let (last, hidden) = self.layers.split_last().unwrap();
        let k = hidden.len();
        let mut d = last.backward(
            &self.layout,
            params,
            &saved.layer_input(k).as_view()?,
            dy,
            grads.as_deref_mut(),
        )?;
        for i in (0..k).rev() {
            let dz = silu_layer_norm_backward(&saved.pre[i].as_view()?, &saved.norms[i], &d.as_view()?)?;
            let input = saved.layer_input(i).as_view()?;
            d = hidden[i].backward(&self.layout, params, &input, &dz.as_view()?, grads.as_deref_mut())?;
        }
        Ok(split_channels(&d.as_view()?, self.features)?.0)
    }
}
