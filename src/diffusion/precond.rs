//! EDM preconditioning with sigma_data = 1 (method.md §2.2):
//!   d(x_t, sigma) = c_skip x_t + c_out F(c_in x_t, emb(c_noise)),
//!   c_skip = 1 / (sigma^2 + 1), c_out = sigma / sqrt(sigma^2 + 1), c_in = 1 / sqrt(sigma^2 + 1),
//!   c_noise = ln sigma.
//!
//! The MMPS hot path: `denoise` runs one forward and keeps what the backward needs; `vjp` then
//! applies J^T (J = d d / d x_t) to any number of cotangents against those saved activations,
//! never recomputing the forward.

use crate::device::launch::grid_stride;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::nn::embedding::sinusoidal_embedding;
use crate::nn::mlp::MlpSaved;
use crate::nn::unet::UNetSaved;
use crate::nn::{Mode, ParamLayout, TimeMlp, UNet, Weights};
use crate::ops::broadcast::{scale_rows_add_into, scale_rows_into};
use crate::real::Real;
use crate::tensor::{AsView, AsViewMut, DType, Data, DataMut, Tensor, View, ViewMut};

/// A denoiser network F: the manifold's TimeMLP or an image U-Net.
#[derive(Clone, Debug)]
pub enum Network {
    /// The manifold experiment's TimeMLP on flat samples `[N, features]` (method.md §3.4).
    Mlp(TimeMlp),
    /// An image U-Net on channels-last samples `[N, H, W, C]` (method.md §3.3).
    UNet(UNet),
}

/// What a network's forward saved.
pub enum NetSaved {
    /// Activations the TimeMLP's forward kept for its backward.
    Mlp(MlpSaved),
    /// Activations the U-Net's forward kept for its backward.
    UNet(UNetSaved),
}

impl NetSaved {
    /// Bytes the saved activations occupy (on the device they live on).
    pub fn bytes(&self) -> usize {
        match self {
            NetSaved::Mlp(s) => s.bytes(),
            NetSaved::UNet(s) => s.bytes(),
        }
    }
}

impl Network {
    /// Names, shapes and offsets of the network's parameters in its flat parameter vector.
    pub fn layout(&self) -> &ParamLayout {
        match self {
            Network::Mlp(m) => &m.layout,
            Network::UNet(u) => &u.layout,
        }
    }

    /// Sets the arithmetic of the network's GEMMs and convolutions (see
    /// [`ParamLayout::set_precision`]); the parameters and their layout do not change.
    pub fn set_precision(&mut self, precision: crate::ops::Precision) {
        match self {
            Network::Mlp(m) => m.layout.set_precision(precision),
            Network::UNet(u) => u.layout.set_precision(precision),
        }
    }

    /// E, the width of the sinusoidal noise embedding the network reads (64 for the manifold
    /// MLP, 256 for the U-Nets; method.md §2.3).
    pub fn emb_width(&self) -> usize {
        match self {
            Network::Mlp(m) => m.emb,
            Network::UNet(u) => u.config.emb,
        }
    }

    /// The shape of one sample: `[features]` or `[H, W, C]`.
    pub fn sample_shape(&self) -> Vec<usize> {
        match self {
            Network::Mlp(m) => vec![m.features],
            Network::UNet(u) => vec![u.config.resolution.0, u.config.resolution.1, u.config.in_channels],
        }
    }

    /// Multiply-adds of one forward for one sample (FLOPs are twice this).
    pub fn forward_macs(&self) -> u64 {
        match self {
            Network::Mlp(m) => m.forward_macs(),
            Network::UNet(u) => u.forward_macs(),
        }
    }

    /// A human-readable summary of the architecture.
    pub fn describe(&self) -> String {
        match self {
            Network::Mlp(m) => format!(
                "TimeMLP: input concat(x[{f}], emb[{e}]) = {w}; hidden {h:?}, each Linear -> SiLU -> LayerNorm; \
                 output Linear -> {f}\n",
                f = m.features,
                e = m.emb,
                w = m.features + m.emb,
                h = m.hidden
            ),
            Network::UNet(u) => u.describe(),
        }
    }

    /// One forward of the raw network F (no preconditioning): `x` is a batch `[N, ...]` of
    /// [`Network::sample_shape`] samples, `emb` their noise embeddings `[N, E]`; returns F's
    /// output, shaped like `x`, and the activations [`Network::backward`] needs. `mode` switches
    /// dropout (the U-Net's; the MLP has none).
    pub fn forward(&self, params: &Weights, x: &View, emb: &View, mode: Mode) -> Result<(Tensor, NetSaved)> {
        match self {
            Network::Mlp(m) => m.forward(params, x, emb).map(|(y, s)| (y, NetSaved::Mlp(s))),
            Network::UNet(u) => u
                .forward(params, x, emb, mode)
                .map(|(y, s)| (y, NetSaved::UNet(s))),
        }
    }

    /// The backward of [`Network::forward`] against its saved activations: returns the input
    /// cotangent `(∂F/∂x)ᵀ dy`, shaped like `x`, and with `grads` accumulates the parameter
    /// gradient of `⟨dy, F⟩` there. Errors when `saved` comes from the other kind of network.
    pub fn backward(
        &self,
        params: &Weights,
        emb: &View,
        saved: &NetSaved,
        dy: &View,
        grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        match (self, saved) {
            (Network::Mlp(m), NetSaved::Mlp(s)) => m.backward(params, s, dy, grads),
            (Network::UNet(u), NetSaved::UNet(s)) => u.backward(params, emb, s, dy, grads),
            _ => Err(Error::Other("saved activations come from another network".into())),
        }
    }
}

/// A network with EDM preconditioning.
#[derive(Clone, Debug)]
pub struct Denoiser {
    /// The network F inside the preconditioning.
    pub net: Network,
}

/// One forward's state: the network's saved activations, the embedding and the per-sample
/// preconditioning coefficients.
pub struct DenoiserSaved {
    /// The network's saved activations.
    pub net: NetSaved,
    /// The noise embeddings emb(c_noise), `[N, E]`, one row per sample.
    pub emb: Tensor,
    /// c_skip(σ) = 1/(σ² + 1) per sample, `[N]`.
    pub c_skip: Tensor,
    /// c_out(σ) = σ/√(σ² + 1) per sample, `[N]`.
    pub c_out: Tensor,
    /// c_in(σ) = 1/√(σ² + 1) per sample, `[N]`.
    pub c_in: Tensor,
}

impl std::fmt::Debug for DenoiserSaved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DenoiserSaved({} bytes)", self.bytes())
    }
}

impl DenoiserSaved {
    /// Bytes kept for the VJPs.
    pub fn bytes(&self) -> usize {
        self.net.bytes()
            + [&self.emb, &self.c_skip, &self.c_out, &self.c_in]
                .iter()
                .map(|t| t.size_in_bytes())
                .sum::<usize>()
    }
}

/// (c_skip, c_out, c_in, c_noise) for one sigma.
pub fn edm_coefficients(sigma: f64) -> (f64, f64, f64, f64) {
    let s2 = sigma * sigma;
    (
        1.0 / (s2 + 1.0),
        sigma / (s2 + 1.0).sqrt(),
        1.0 / (s2 + 1.0).sqrt(),
        sigma.ln(),
    )
}

/// [c_skip, c_out, c_in, c_noise] as [N] tensors on `device`. On a GPU they are computed there:
/// with one sigma for the whole batch (every sampler step) nothing is uploaded at all.
fn preconditioning(sigmas: &[f64], dtype: DType, device: &Device) -> Result<[Tensor; 4]> {
    let n = sigmas.len();
    if let Device::Cuda(dev) = device {
        let make = || Tensor::uninit(&[n], DType::F32, device);
        let (mut a, mut b, mut c, mut d) = (make()?, make()?, make()?, make()?);
        let uniform = sigmas.iter().all(|&s| s == sigmas[0]);
        let per_sample = if uniform {
            None
        } else {
            Some(Tensor::from_f64_as(sigmas, &[n], DType::F32, device)?)
        };
        {
            let sview = per_sample.as_ref().map(|t| t.cuda_f32()).transpose()?;
            let (mut av, mut bv, mut cv, mut dv) = (
                a.cuda_f32_mut()?,
                b.cuda_f32_mut()?,
                c.cuda_f32_mut()?,
                d.cuda_f32_mut()?,
            );
            // SAFETY: every buffer holds n values (one per sample).
            unsafe {
                dev.kernels().emb_precond_f32(
                    grid_stride(dev, n),
                    sview.as_ref(),
                    sigmas[0],
                    &mut av,
                    &mut bv,
                    &mut cv,
                    &mut dv,
                    n as i64,
                )
            }?;
        }
        return Ok([a, b, c, d]);
    }
    let coef: Vec<_> = sigmas.iter().map(|&s| edm_coefficients(s)).collect();
    let col = |f: fn(&(f64, f64, f64, f64)) -> f64| -> Result<Tensor> {
        Tensor::from_f64_as(&coef.iter().map(f).collect::<Vec<_>>(), &[n], dtype, device)
    };
    Ok([col(|c| c.0)?, col(|c| c.1)?, col(|c| c.2)?, col(|c| c.3)?])
}

/// [c_skip, c_out, c_in, c_noise] as [N] tensors from noise levels `sigma` (`[N]`) on their
/// device: the coefficients of [`edm_coefficients`] in f64 from each level as stored, rounded
/// once (kernels/embedding.cu on a GPU, where it reads the levels in place).
fn preconditioning_levels(sigma: &View) -> Result<[Tensor; 4]> {
    crate::device::note_op();
    let n = sigma.numel();
    let (dtype, device) = (sigma.dtype(), sigma.device());
    let make = || Tensor::uninit(&[n], dtype, &device);
    let mut out = [make()?, make()?, make()?, make()?];
    {
        let [a, b, c, d] = &mut out;
        let (mut av, mut bv, mut cv, mut dv) = (
            a.as_view_mut()?,
            b.as_view_mut()?,
            c.as_view_mut()?,
            d.as_view_mut()?,
        );
        match (
            &sigma.data,
            &mut av.data,
            &mut bv.data,
            &mut cv.data,
            &mut dv.data,
        ) {
            (
                Data::Cuda(s, dev),
                DataMut::Cuda(a, _),
                DataMut::Cuda(b, _),
                DataMut::Cuda(c, _),
                DataMut::Cuda(d, _),
            ) => {
                // SAFETY: every buffer holds n values (one per sample).
                unsafe {
                    dev.kernels()
                        .emb_precond_f32(grid_stride(dev, n), Some(s), 0.0, a, b, c, d, n as i64)
                }?;
            }
            (Data::Cuda(..), ..) => return Err(crate::ops::mismatch("preconditioning", &[sigma], &[])),
            _ => host_real!(sigma, T => {
                let coef: Vec<[f64; 4]> = sigma
                    .cpu::<T>()?
                    .iter()
                    .map(|s| {
                        let (a, b, c, d) = edm_coefficients(s.to_f64());
                        [a, b, c, d]
                    })
                    .collect();
                for (k, o) in [&mut av, &mut bv, &mut cv, &mut dv].into_iter().enumerate() {
                    for (v, c) in o.cpu_mut::<T>()?.iter_mut().zip(&coef) {
                        *v = T::from_f64(c[k]);
                    }
                }
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(out)
}

impl Denoiser {
    /// Wraps `net` in EDM preconditioning with σ_data = 1 (method.md §2.2).
    pub fn new(net: Network) -> Self {
        Denoiser { net }
    }

    /// The network's parameter layout ([`Network::layout`]).
    pub fn layout(&self) -> &ParamLayout {
        self.net.layout()
    }

    /// x_hat = d(x_t, sigma) for a batch with one sigma per sample; keeps what VJPs need.
    pub fn denoise(
        &self,
        params: &Weights,
        x_t: &View,
        sigmas: &[f64],
        mode: Mode,
    ) -> Result<(Tensor, DenoiserSaved)> {
        let n = x_t.shape().first().copied().unwrap_or(0);
        if sigmas.len() != n || n == 0 {
            return Err(Error::shape(
                "denoise",
                "sigmas",
                format!("{} values (one per sample)", n),
                sigmas.len(),
            ));
        }
        if let Some(bad) = sigmas.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(Error::Other(format!(
                "denoise: sigma {bad} is not a positive finite number"
            )));
        }
        self.check_input(x_t, n)?;
        let coefficients = preconditioning(sigmas, x_t.dtype(), &x_t.device())?;
        self.denoise_with(params, x_t, coefficients, mode)
    }

    /// [`Denoiser::denoise`] with the noise levels on the device (`sigma`, `[N]`, x_t's dtype,
    /// positive: a training step draws them from the schedule there), so nothing is uploaded.
    pub fn denoise_levels(
        &self,
        params: &Weights,
        x_t: &View,
        sigma: &View,
        mode: Mode,
    ) -> Result<(Tensor, DenoiserSaved)> {
        let n = x_t.shape().first().copied().unwrap_or(0);
        if sigma.shape() != [n] || n == 0 {
            return Err(Error::shape("denoise", "sigma", vec![n], sigma.shape()));
        }
        self.check_input(x_t, n)?;
        let coefficients = preconditioning_levels(sigma)?;
        self.denoise_with(params, x_t, coefficients, mode)
    }

    /// The network between the preconditioning `coefficients` ([c_skip, c_out, c_in, c_noise]).
    fn denoise_with(
        &self,
        params: &Weights,
        x_t: &View,
        [c_skip, c_out, c_in, c_noise]: [Tensor; 4],
        mode: Mode,
    ) -> Result<(Tensor, DenoiserSaved)> {
        let (dtype, device) = (x_t.dtype(), x_t.device());
        let emb = sinusoidal_embedding(&c_noise.as_view()?, self.net.emb_width())?;
        let mut x_in = Tensor::uninit(x_t.shape(), dtype, &device)?;
        scale_rows_into(x_t, &c_in, &mut x_in)?;
        let (f, net) = self
            .net
            .forward(params, &x_in.as_view()?, &emb.as_view()?, mode)?;
        let mut x_hat = Tensor::uninit(x_t.shape(), dtype, &device)?;
        scale_rows_add_into(x_t, &c_skip, &f, &c_out, &mut x_hat)?;
        Ok((
            x_hat,
            DenoiserSaved {
                net,
                emb,
                c_skip,
                c_out,
                c_in,
            },
        ))
    }

    /// An error naming the shape expected when the network does not take `x_t` (`n` rows).
    fn check_input(&self, x_t: &View, n: usize) -> Result<()> {
        if self.accepts(x_t.shape()) {
            return Ok(());
        }
        let mut expected = vec![n];
        expected.extend(self.net.sample_shape());
        Err(Error::shape("denoise", "x_t", expected, x_t.shape()))
    }

    /// A batch shape the network takes: [N, features] for the MLP; [N, H, W, C] for a U-Net
    /// (any resolution its depth divides; the forward checks that).
    fn accepts(&self, shape: &[usize]) -> bool {
        match &self.net {
            Network::Mlp(m) => matches!(*shape, [_, f] if f == m.features),
            Network::UNet(u) => matches!(*shape, [_, _, _, c] if c == u.config.in_channels),
        }
    }

    /// J^T u against the activations of one `denoise` call (no parameter gradients).
    pub fn vjp(&self, params: &Weights, saved: &DenoiserSaved, u: &View) -> Result<Tensor> {
        self.backward(params, saved, u, None)
    }

    /// J^T u, and with `grads` the parameter gradient of <u, d(x_t, sigma)> accumulated there.
    pub fn backward(
        &self,
        params: &Weights,
        saved: &DenoiserSaved,
        u: &View,
        grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        let (dtype, device) = (u.dtype(), u.device());
        let mut du_f = Tensor::uninit(u.shape(), dtype, &device)?;
        scale_rows_into(u, &saved.c_out, &mut du_f)?;
        let d_in = self
            .net
            .backward(params, &saved.emb.as_view()?, &saved.net, &du_f.as_view()?, grads)?;
        let mut dx = Tensor::uninit(u.shape(), dtype, &device)?;
        scale_rows_add_into(u, &saved.c_skip, &d_in, &saved.c_in, &mut dx)?;
        Ok(dx)
    }
}
