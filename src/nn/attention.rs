//! Multi-head self-attention over the pixels of a feature map (inox semantics): q, k, v are
//! Linear(C -> C) with bias (fused here into one [C, 3C] projection), the output projection is
//! Linear(C -> C) without bias, scores are softmax(q k^T / sqrt(d)) with d = C / heads.
//! The matrix products are batched GEMMs over (sample, head); the softmax and its backward are
//! kernels/attention.cu.

use crate::device::launch::warp_per_row;

use super::linear::Linear;
use super::params::ParamLayout;
use super::resample::{inverse_permutation, permute};
use crate::error::{Error, Result};
use crate::ops::{gemm_into, mismatch, GemmSpec};
use crate::tensor::{AsView, AsViewMut, Data, DataMut, Tensor, View, ViewMut};

/// The CPU bodies: the oracle for kernels/attention.cu.
pub mod cpu {
    use crate::real::Real;

    /// Row-wise softmax of the row-major `[rows, cols]` scores `s` into `p`, with the row max
    /// subtracted first for stability.
    pub fn softmax<T: Real>(s: &[T], p: &mut [T], cols: usize) {
        for (sr, pr) in s.chunks_exact(cols).zip(p.chunks_exact_mut(cols)) {
            let mx = sr.iter().copied().fold(sr[0], T::max);
            let mut sum = T::ZERO;
            for (o, &v) in pr.iter_mut().zip(sr) {
                *o = (v - mx).exp();
                sum += *o;
            }
            pr.iter_mut().for_each(|o| *o /= sum);
        }
    }

    /// The softmax VJP per row, from the forward's probabilities `p`:
    /// `ds = p * (dp - sum(p * dp))`.
    pub fn softmax_backward<T: Real>(p: &[T], dp: &[T], ds: &mut [T], cols: usize) {
        for ((pr, gr), dr) in p
            .chunks_exact(cols)
            .zip(dp.chunks_exact(cols))
            .zip(ds.chunks_exact_mut(cols))
        {
            let dot: T = pr.iter().zip(gr).map(|(&a, &b)| a * b).sum();
            for ((o, &pv), &gv) in dr.iter_mut().zip(pr).zip(gr) {
                *o = pv * (gv - dot);
            }
        }
    }
}

/// Softmax over the last axis.
pub fn softmax(s: &View) -> Result<Tensor> {
    let cols = *s
        .shape()
        .last()
        .ok_or_else(|| Error::shape("softmax", "input", "[.., cols]", s.shape()))?;
    let rows = s.numel() / cols.max(1);
    let mut p = Tensor::uninit(s.shape(), s.dtype(), &s.device())?;
    {
        let mut pv = p.as_view_mut()?;
        match (&s.data, &mut pv.data) {
            (Data::Cuda(sv, dev), DataMut::Cuda(o, _)) => {
                let (r, c) = (rows as i64, cols as i32);
                // SAFETY: s and p hold rows * cols values (same shape).
                unsafe {
                    dev.kernels()
                        .attn_softmax_f32(warp_per_row(dev, rows), sv, o, r, c)
                }?;
            }
            (Data::Cuda(..), _) => return Err(mismatch("softmax", &[s], &[])),
            _ => host_real!(s, T => {
                cpu::softmax::<T>(s.cpu()?, pv.cpu_mut()?, cols);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(p)
}

/// ds = p * (dp - rowsum(p * dp)).
pub fn softmax_backward(p: &View, dp: &View) -> Result<Tensor> {
    crate::ops::one_device("softmax_backward", &[p, dp], &[])?;
    if p.shape() != dp.shape() {
        return Err(Error::shape("softmax_backward", "dp", p.shape(), dp.shape()));
    }
    let cols = *p.shape().last().unwrap_or(&1);
    let rows = p.numel() / cols.max(1);
    let mut ds = Tensor::uninit(p.shape(), p.dtype(), &p.device())?;
    {
        let mut dv = ds.as_view_mut()?;
        match (&p.data, &dp.data, &mut dv.data) {
            (Data::Cuda(pv, dev), Data::Cuda(gv, _), DataMut::Cuda(o, _)) => {
                let (r, c) = (rows as i64, cols as i32);
                // SAFETY: p, dp and ds hold rows * cols values (same shape).
                unsafe {
                    dev.kernels()
                        .attn_softmax_backward_f32(warp_per_row(dev, rows), pv, gv, o, r, c)
                }?;
            }
            (Data::Cuda(..), ..) => return Err(mismatch("softmax_backward", &[p, dp], &[])),
            _ => host_real!(p, T => {
                cpu::softmax_backward::<T>(p.cpu()?, dp.cpu()?, dv.cpu_mut()?, cols);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(ds)
}

/// [N, T, 3, heads, d] -> [3, N, heads, T, d]: q, k, v as contiguous [N * heads, T, d] blocks.
const SPLIT_QKV: [usize; 5] = [2, 0, 3, 1, 4];
/// [N, heads, T, d] -> [N, T, heads, d].
const MERGE_HEADS: [usize; 4] = [0, 2, 1, 3];

/// Multi-head self-attention over the tokens (pixels) of each sample: one fused q/k/v projection
/// with bias, `softmax(q k^T / sqrt(d))` per head, and an output projection without bias.
/// Shape-preserving on `[N, H, W, C]` or `[N, T, C]`.
#[derive(Clone, Debug)]
pub struct SelfAttention {
    /// The fused q, k, v projection C -> 3C with bias; its output columns run (q/k/v, head, d).
    pub qkv: Linear,
    /// The output projection C -> C, without bias.
    pub out: Linear,
    /// Token width C, the input's last axis.
    pub channels: usize,
    /// Number of heads; each is d = channels / heads wide.
    pub heads: usize,
}

/// What the attention backward needs.
pub struct AttSaved {
    /// A copy of the input tokens [N, T, C], kept by [`SelfAttention::forward`] only: inside an
    /// AttBlock the input is the block's LayerNorm output, which the block keeps anyway.
    pub x: Option<Tensor>,
    /// q, k, v as [3, N * heads, T, d].
    pub qkv: Tensor,
    /// Softmax probabilities [N * heads, T, T].
    pub probs: Tensor,
    /// Attention output before the projection [N, T, C].
    pub merged: Tensor,
}

impl AttSaved {
    /// Bytes held by the saved tensors, the input copy included when there is one.
    pub fn bytes(&self) -> usize {
        [&self.qkv, &self.probs, &self.merged]
            .iter()
            .map(|t| t.size_in_bytes())
            .sum::<usize>()
            + self.x.as_ref().map_or(0, Tensor::size_in_bytes)
    }
}

impl SelfAttention {
    /// Registers `{name}.qkv.weight` `[C, 3C]`, `{name}.qkv.bias` `[3C]` and `{name}.out.weight`
    /// `[C, C]`. Panics unless `heads > 0` divides `channels`.
    pub fn new(layout: &mut ParamLayout, name: &str, channels: usize, heads: usize) -> Self {
        assert!(
            heads > 0 && channels % heads == 0,
            "channels {channels} not divisible by {heads} heads"
        );
        SelfAttention {
            qkv: Linear::new(layout, &format!("{name}.qkv"), channels, 3 * channels, true),
            out: Linear::new(layout, &format!("{name}.out"), channels, channels, false),
            channels,
            heads,
        }
    }

    fn dims(&self, x: &View) -> Result<(usize, usize, usize)> {
        let shape = x.shape();
        if shape.len() < 3 || *shape.last().unwrap() != self.channels {
            return Err(Error::shape(
                "attention",
                "input",
                format!("[N, .., {}]", self.channels),
                shape,
            ));
        }
        let n = shape[0];
        Ok((n, x.numel() / (n * self.channels), self.channels / self.heads))
    }

    /// y = MHA(x) over all pixels of each sample (x is [N, H, W, C] or [N, T, C]); the saved
    /// state holds its own copy of x.
    pub fn forward(&self, layout: &ParamLayout, params: &View, x: &View) -> Result<(Tensor, AttSaved)> {
        let (y, mut saved) = self.forward_shared(layout, params, x)?;
        saved.x = Some(x.to_tensor()?);
        Ok((y, saved))
    }

    /// As `forward`, but the caller keeps x and hands it to [`Self::backward_shared`].
    pub fn forward_shared(
        &self,
        layout: &ParamLayout,
        params: &View,
        x: &View,
    ) -> Result<(Tensor, AttSaved)> {
        let (n, t, d) = self.dims(x)?;
        let (h, c) = (self.heads, self.channels);
        let tokens = x.reshape(&[n, t, c])?;
        let proj = self.qkv.forward(layout, params, &tokens)?;
        let qkv =
            permute(&proj.as_view()?.reshape(&[n, t, 3, h, d])?, &SPLIT_QKV)?.reshape(&[3, n * h, t, d])?;
        // Transients go as soon as they are read: the forward's peak is kept state plus these.
        drop(proj);
        let (q, k, v) = split3(&qkv.as_view()?, n * h, t, d)?;
        let mut scores = Tensor::uninit(&[n * h, t, t], x.dtype(), &x.device())?;
        let scaled = GemmSpec {
            alpha: 1.0 / (d as f32).sqrt(),
            ..GemmSpec::new(false, true)
        };
        gemm_into(&q, &k, &mut scores, scaled)?;
        let probs = softmax(&scores.as_view()?)?;
        drop(scores);
        let mut heads_out = Tensor::uninit(&[n, h, t, d], x.dtype(), &x.device())?;
        gemm_into(
            &probs,
            &v,
            &mut heads_out.as_view_mut()?.reshape(&[n * h, t, d])?,
            GemmSpec::default(),
        )?;
        let merged = permute(&heads_out.as_view()?, &MERGE_HEADS)?.reshape(&[n, t, c])?;
        drop(heads_out);
        let y = self
            .out
            .forward(layout, params, &merged.as_view()?)?
            .reshape(x.shape())?;
        Ok((
            y,
            AttSaved {
                x: None,
                qkv,
                probs,
                merged,
            },
        ))
    }

    /// dx for dy; with `grads`, the projections' parameter gradients.
    pub fn backward(
        &self,
        layout: &ParamLayout,
        params: &View,
        saved: &AttSaved,
        dy: &View,
        grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        let x = saved.x.as_ref().ok_or_else(|| {
            Error::Other("attention backward: the forward kept no input (use backward_shared)".into())
        })?;
        self.backward_shared(layout, params, &x.as_view()?, saved, dy, grads)
    }

    /// The backward against an input the caller kept (`forward_shared`'s x).
    pub fn backward_shared(
        &self,
        layout: &ParamLayout,
        params: &View,
        x: &View,
        saved: &AttSaved,
        dy: &View,
        mut grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        let (n, t, d) = self.dims(x)?;
        let (h, c) = (self.heads, self.channels);
        let dy3 = dy.reshape(&[n, t, c])?;
        let dmerged = self.out.backward(
            layout,
            params,
            &saved.merged.as_view()?,
            &dy3,
            grads.as_deref_mut(),
        )?;
        let dheads_t = permute(
            &dmerged.as_view()?.reshape(&[n, t, h, d])?,
            &inverse_permutation(&MERGE_HEADS),
        )?;
        drop(dmerged);
        let dheads = dheads_t.as_view()?.reshape(&[n * h, t, d])?;
        let qkv = saved.qkv.as_view()?;
        let (q, k, v) = split3(&qkv, n * h, t, d)?;
        let probs = saved.probs.as_view()?;
        let scale = 1.0 / (d as f32).sqrt();

        let mut dqkv = Tensor::uninit(&[3, n * h, t, d], x.dtype(), &x.device())?;
        let mut dprobs = Tensor::uninit(&[n * h, t, t], x.dtype(), &x.device())?;
        gemm_into(&dheads, &v, &mut dprobs, GemmSpec::new(false, true))?;
        let dscores = softmax_backward(&probs, &dprobs.as_view()?)?;
        drop(dprobs);
        {
            let mut dv_all = dqkv.as_view_mut()?;
            let block = n * h * t * d;
            let scaled = |ta, tb| GemmSpec {
                alpha: scale,
                ..GemmSpec::new(ta, tb)
            };
            // dq = dS k / sqrt(d); dk = dS^T q / sqrt(d); dv = P^T dO.
            gemm_into(
                &dscores,
                &k,
                &mut dv_all.sub_mut(0, &[n * h, t, d])?,
                scaled(false, false),
            )?;
            gemm_into(
                &dscores,
                &q,
                &mut dv_all.sub_mut(block, &[n * h, t, d])?,
                scaled(true, false),
            )?;
            gemm_into(
                &probs,
                &dheads,
                &mut dv_all.sub_mut(2 * block, &[n * h, t, d])?,
                GemmSpec::new(true, false),
            )?;
        }
        drop(dheads);
        drop((dscores, dheads_t));
        let dproj = permute(
            &dqkv.as_view()?.reshape(&[3, n, h, t, d])?,
            &inverse_permutation(&SPLIT_QKV),
        )?;
        drop(dqkv);
        let dx = self.qkv.backward(
            layout,
            params,
            x,
            &dproj.as_view()?.reshape(&[n, t, 3 * c])?,
            grads,
        )?;
        dx.reshape(dy.shape())
    }
}

/// The q, k, v blocks of a [3, B, T, d] tensor.
fn split3<'a>(qkv: &View<'a>, b: usize, t: usize, d: usize) -> Result<(View<'a>, View<'a>, View<'a>)> {
    let block = b * t * d;
    Ok((
        qkv.sub(0, &[b, t, d])?,
        qkv.sub(block, &[b, t, d])?,
        qkv.sub(2 * block, &[b, t, d])?,
    ))
}
