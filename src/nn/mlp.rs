//! The TimeMLP of the manifold experiment (method.md §3.4): input concat(x, emb), then
//! [Linear, SiLU, LayerNorm] per hidden width, then a Linear back to the features. SiLU and
//! LayerNorm run as one fused op (nn::norm::silu_layer_norm), forward and backward.
//! With 5 features, hidden (256, 256, 256) and a 64-wide embedding: 150,789 parameters.

use super::linear::Linear;
use super::norm::{silu_layer_norm, silu_layer_norm_backward, LnSaved};
use super::params::{ParamLayout, Weights};
use super::resample::{concat_channels, split_channels};
use crate::error::{Error, Result};
use crate::tensor::{AsView, Tensor, View, ViewMut};

/// The manifold experiment's network F(x, emb) on `[N, F]` feature vectors, with its own
/// parameter layout.
///
/// ```
/// use emprior::nn::{embedding::sinusoidal_embedding, TimeMlp, Weights};
/// use emprior::{AsView, DType, Device, Tensor};
///
/// // The manifold network: 5 features, hidden widths (256, 256, 256), a 64-wide embedding.
/// let mlp = TimeMlp::new(5, &[256, 256, 256], 64);
/// assert_eq!(mlp.layout.len(), 150_789);
/// let params = mlp.layout.init(0, DType::F32, &Device::Cpu)?;
/// let x = Tensor::zeros(&[2, 5], DType::F32, &Device::Cpu)?;
/// let c_noise = Tensor::from_f32(&[-1.0, 0.5], &[2], &Device::Cpu)?; // ln sigma per row
/// let emb = sinusoidal_embedding(&c_noise.as_view()?, 64)?;
/// // The flat parameters as a layer reads them (no bf16 copy: this network runs in f32).
/// let weights = Weights::from(params.as_view()?);
/// let (y, saved) = mlp.forward(&weights, &x.as_view()?, &emb.as_view()?)?;
/// assert_eq!(y.shape(), [2, 5]);
/// // A VJP (no parameter gradients) against the saved activations.
/// let dx = mlp.backward(&weights, &saved, &y.as_view()?, None)?;
/// assert_eq!(dx.shape(), [2, 5]);
/// # Ok::<(), emprior::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct TimeMlp {
    /// Data features F: the width of x and of the output.
    pub features: usize,
    /// Hidden widths, one Linear-SiLU-LayerNorm layer each.
    pub hidden: Vec<usize>,
    /// Width E of the sinusoidal embedding concatenated to x.
    pub emb: usize,
    /// The Linears: one per hidden width, then the output layer back to F.
    pub layers: Vec<Linear>,
    /// The network's parameters, `mlp.{i}.weight` and `mlp.{i}.bias` in layer order.
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
    /// Bytes held for the backward.
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
    /// A TimeMLP for `features`-wide data, the given hidden widths and an `emb`-wide embedding;
    /// registers `mlp.0` to `mlp.{hidden.len()}` in its own layout.
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
    pub fn forward(&self, params: &Weights, x: &View, emb: &View) -> Result<(Tensor, MlpSaved)> {
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
        params: &Weights,
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
