//! Multi-head self-attention over the pixels of a feature map (inox semantics): q, k, v are
//! Linear(C -> C) with bias (fused here into one [C, 3C] projection), the output projection is
//! Linear(C -> C) without bias, scores are softmax(q k^T / sqrt(d)) with d = C / heads.
//! The matrix products are batched GEMMs over (sample, head); the softmax and its backward are
//! kernels/attention.cu. Under the bf16 policy q, k, v, the probabilities (written in bf16 by the
//! softmax kernel) and the merged heads are kept in bf16, the products run on bf16 operands
//! (`ops::gemm::gemm_operands_into`) and the softmax VJP reads the bf16 probabilities in place.

use crate::device::launch::warp_per_row;

use super::linear::Linear;
use super::params::{ParamLayout, Weights};
use super::resample::{inverse_permutation, permute, permute_kept};
use crate::error::{Error, Result};
use crate::ops::gemm::gemm_operands_into;
use crate::ops::precision::{keep, Operand, Precision};
use crate::ops::{mismatch, GemmSpec};
use crate::tensor::{numel, AsView, AsViewMut, DType, Data, DataMut, Tensor, View, ViewMut};

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

/// Softmax over the last axis, the probabilities kept as the layout's precision keeps
/// activations: under bf16 rounded to bf16 as they are stored (one kernel, no f32 copy; the
/// values of `keep(softmax(s))`), else f32.
pub fn softmax_kept(s: &View, precision: Precision) -> Result<Tensor> {
    if precision != Precision::Bf16 || s.dtype() != DType::F32 {
        return softmax(s);
    }
    let cols = *s
        .shape()
        .last()
        .ok_or_else(|| Error::shape("softmax", "input", "[.., cols]", s.shape()))?;
    let rows = s.numel() / cols.max(1);
    let mut p = Tensor::uninit(s.shape(), DType::BF16, &s.device())?;
    match &s.data {
        Data::Cuda(sv, dev) => {
            let mut pv = p.cuda_bf16_mut()?;
            // SAFETY: s and p hold rows * cols values (same shape).
            unsafe {
                dev.kernels().attn_softmax_f32_to_bf16(
                    warp_per_row(dev, rows),
                    sv,
                    &mut pv,
                    rows as i64,
                    cols as i32,
                )
            }?;
        }
        _ => {
            let (sv, pv) = (s.cpu::<f32>()?, p.cpu_bf16_mut()?);
            let mut row = vec![0.0f32; cols];
            for (sr, pr) in sv.chunks_exact(cols).zip(pv.chunks_exact_mut(cols)) {
                cpu::softmax::<f32>(sr, &mut row, cols);
                for (o, &v) in pr.iter_mut().zip(&row) {
                    *o = half::bf16::from_f32(v);
                }
            }
        }
    }
    Ok(p)
}

/// The softmax VJP from kept probabilities `p`: from bf16 ones in place in `dp` (which becomes
/// ds), from f32 ones into a new tensor (`dp` is freed after).
pub fn softmax_backward_kept(p: &Operand, mut dp: Tensor) -> Result<Tensor> {
    let pb = match p {
        Operand::F32(pv) => return softmax_backward(pv, &dp.as_view()?),
        Operand::Bf16(pb) => pb,
    };
    if pb.shape() != dp.shape() || dp.dtype() != DType::F32 {
        return Err(Error::shape(
            "softmax_backward",
            "dp (f32)",
            pb.shape(),
            dp.shape(),
        ));
    }
    let cols = *dp.shape().last().unwrap_or(&1);
    let rows = dp.numel() / cols.max(1);
    match p.device() {
        crate::Device::Cuda(dev) => {
            crate::device::note_op();
            let (pv, mut gv) = (pb.cuda()?, dp.cuda_f32_mut()?);
            // SAFETY: p and g hold rows * cols values (same shape, checked above).
            unsafe {
                dev.kernels().attn_softmax_backward_bf16p(
                    warp_per_row(&dev, rows),
                    &pv,
                    &mut gv,
                    rows as i64,
                    cols as i32,
                )
            }?;
        }
        crate::Device::Cpu => {
            let pv = pb.cpu()?;
            let mut gv = dp.as_view_mut()?;
            for (pr, gr) in pv
                .chunks_exact(cols)
                .zip(gv.cpu_mut::<f32>()?.chunks_exact_mut(cols))
            {
                let dot: f32 = pr.iter().zip(gr.iter()).map(|(a, b)| a.to_f32() * b).sum();
                for (g, a) in gr.iter_mut().zip(pr) {
                    *g = a.to_f32() * (*g - dot);
                }
            }
        }
    }
    Ok(dp)
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

    fn dims(&self, shape: &[usize]) -> Result<(usize, usize, usize)> {
        if shape.len() < 3 || *shape.last().unwrap() != self.channels {
            return Err(Error::shape(
                "attention",
                "input",
                format!("[N, .., {}]", self.channels),
                shape,
            ));
        }
        let n = shape[0];
        Ok((n, numel(shape) / (n * self.channels), self.channels / self.heads))
    }

    /// y = MHA(x) over all pixels of each sample (x is [N, H, W, C] or [N, T, C]); the saved
    /// state holds its own copy of x.
    pub fn forward(&self, layout: &ParamLayout, params: &Weights, x: &View) -> Result<(Tensor, AttSaved)> {
        let (y, mut saved) = self.forward_shared(layout, params, &Operand::F32(x.clone()))?;
        saved.x = Some(x.to_tensor()?);
        Ok((y, saved))
    }

    /// As `forward`, but the caller keeps x (f32, or a kept bf16 activation) and hands it to
    /// [`Self::backward_shared`]. Under the bf16 policy q, k, v, the probabilities and the
    /// merged heads are kept in bf16, and the four batched products run on bf16 operands
    /// ([`gemm_operands_into`]).
    pub fn forward_shared(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: &Operand,
    ) -> Result<(Tensor, AttSaved)> {
        self.forward_into(layout, params, x, false)
    }

    /// As [`Self::forward_shared`], the output as a block keeps it (`ops::precision::keep`):
    /// under bf16 written in bf16 by the output projection's epilogue (no f32 copy to cast).
    pub fn forward_shared_kept(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: &Operand,
    ) -> Result<(Tensor, AttSaved)> {
        self.forward_into(layout, params, x, true)
    }

    fn forward_into(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: &Operand,
        kept_out: bool,
    ) -> Result<(Tensor, AttSaved)> {
        let (n, t, d) = self.dims(x.shape())?;
        let (h, c, p) = (self.heads, self.channels, layout.precision());
        let (dtype, device) = (values_dtype(x), x.device());
        let tokens = x.reshape(&[n, t, c])?;
        // Under bf16 the projection comes out of the GEMM epilogue in bf16 and is permuted as it
        // is (a copy): q, k, v kept with no f32 copy of either.
        let proj = self.qkv.forward_kept(layout, params, &tokens)?;
        let qkv = permute_kept(&Operand::of(&proj)?.reshape(&[n, t, 3, h, d])?, &SPLIT_QKV, p)?
            .reshape(&[3, n * h, t, d])?;
        // Transients go as soon as they are read: the forward's peak is kept state plus these.
        drop(proj);
        let qkv_op = Operand::of(&qkv)?;
        let (q, k, v) = split3(&qkv_op, n * h, t, d)?;
        let mut scores = Tensor::uninit(&[n * h, t, t], dtype, &device)?;
        let scaled = GemmSpec {
            alpha: 1.0 / (d as f32).sqrt(),
            ..GemmSpec::new(false, true)
        };
        gemm_operands_into(&q, &k, &mut scores.as_view_mut()?, scaled, p)?;
        let probs = softmax_kept(&scores.as_view()?, p)?;
        drop(scores);
        let mut heads_out = Tensor::uninit(&[n, h, t, d], dtype, &device)?;
        gemm_operands_into(
            &Operand::of(&probs)?,
            &v,
            &mut heads_out.as_view_mut()?.reshape(&[n * h, t, d])?,
            GemmSpec::default(),
            p,
        )?;
        // Kept (bf16 under bf16) by the permute itself.
        let merged =
            permute_kept(&Operand::F32(heads_out.as_view()?), &MERGE_HEADS, p)?.reshape(&[n, t, c])?;
        drop(heads_out);
        let merged_op = Operand::of(&merged)?;
        let y = match kept_out {
            true => self.out.forward_kept(layout, params, &merged_op)?,
            false => self.out.forward_operand(layout, params, &merged_op)?,
        }
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
        params: &Weights,
        saved: &AttSaved,
        dy: &View,
        grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        let x = saved.x.as_ref().ok_or_else(|| {
            Error::Other("attention backward: the forward kept no input (use backward_shared)".into())
        })?;
        self.backward_shared(layout, params, &Operand::of(x)?, saved, dy, grads)
    }

    /// The backward against an input the caller kept (`forward_shared`'s x).
    pub fn backward_shared(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: &Operand,
        saved: &AttSaved,
        dy: &View,
        mut grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        let (n, t, d) = self.dims(x.shape())?;
        let (h, c, p) = (self.heads, self.channels, layout.precision());
        let (dtype, device) = (dy.dtype(), dy.device());
        let dy3 = dy.reshape(&[n, t, c])?;
        let dmerged = self.out.backward_operand(
            layout,
            params,
            &Operand::of(&saved.merged)?,
            &dy3,
            grads.as_deref_mut(),
        )?;
        // Under bf16 a transient read by two products is rounded once for both, by the permute.
        let dheads_t = permute_kept(
            &Operand::F32(dmerged.as_view()?.reshape(&[n, t, h, d])?),
            &inverse_permutation(&MERGE_HEADS),
            p,
        )?;
        drop(dmerged);
        let dheads = Operand::of(&dheads_t)?.reshape(&[n * h, t, d])?;
        let qkv = Operand::of(&saved.qkv)?;
        let (q, k, v) = split3(&qkv, n * h, t, d)?;
        let probs = Operand::of(&saved.probs)?;
        let scale = 1.0 / (d as f32).sqrt();

        let mut dqkv = Tensor::uninit(&[3, n * h, t, d], dtype, &device)?;
        let mut dprobs = Tensor::uninit(&[n * h, t, t], dtype, &device)?;
        gemm_operands_into(
            &dheads,
            &v,
            &mut dprobs.as_view_mut()?,
            GemmSpec::new(false, true),
            p,
        )?;
        let dscores = keep(softmax_backward_kept(&probs, dprobs)?, p)?;
        let ds = Operand::of(&dscores)?;
        {
            let mut dv_all = dqkv.as_view_mut()?;
            let block = n * h * t * d;
            let scaled = |ta, tb| GemmSpec {
                alpha: scale,
                ..GemmSpec::new(ta, tb)
            };
            // dq = dS k / sqrt(d); dk = dS^T q / sqrt(d); dv = P^T dO.
            gemm_operands_into(
                &ds,
                &k,
                &mut dv_all.sub_mut(0, &[n * h, t, d])?,
                scaled(false, false),
                p,
            )?;
            gemm_operands_into(
                &ds,
                &q,
                &mut dv_all.sub_mut(block, &[n * h, t, d])?,
                scaled(true, false),
                p,
            )?;
            gemm_operands_into(
                &probs,
                &dheads,
                &mut dv_all.sub_mut(2 * block, &[n * h, t, d])?,
                GemmSpec::new(true, false),
                p,
            )?;
        }
        drop(dheads);
        drop((dscores, dheads_t));
        let dproj = permute(
            &dqkv.as_view()?.reshape(&[3, n, h, t, d])?,
            &inverse_permutation(&SPLIT_QKV),
        )?;
        drop(dqkv);
        let dx = self.qkv.backward_operand(
            layout,
            params,
            &x.reshape(&[n, t, c])?,
            &dproj.as_view()?.reshape(&[n, t, 3 * c])?,
            grads,
        )?;
        dx.reshape(dy.shape())
    }
}

/// The type an op computes in for this input: f32 for a kept bf16 activation, else its own.
fn values_dtype(x: &Operand) -> DType {
    match x.dtype() {
        DType::BF16 => DType::F32,
        d => d,
    }
}

/// The q, k, v blocks of a [3, B, T, d] tensor.
fn split3<'a>(
    qkv: &Operand<'a>,
    b: usize,
    t: usize,
    d: usize,
) -> Result<(Operand<'a>, Operand<'a>, Operand<'a>)> {
    let block = b * t * d;
    Ok((
        qkv.sub(0, &[b, t, d])?,
        qkv.sub(block, &[b, t, d])?,
        qkv.sub(2 * block, &[b, t, d])?,
    ))
}
