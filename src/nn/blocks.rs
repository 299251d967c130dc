//! The paper's residual blocks (method.md §3.2) and the fused maps around their convolutions and
//! attention. With (a, b, c) = Modulation(emb), split from one [N, 3C] output:
//!   ResBlock: h = Conv(Dropout(SiLU(Conv(LN((1 + a) x + b))))); out = (x + c h) / sqrt(1 + c^2)
//!   AttBlock: h = MHA(LN((1 + a) x + b));                         out = (x + c h) / sqrt(1 + c^2)
//! CUDA for the fused maps: kernels/blocks.cu.

use cudarc::driver::LaunchConfig;

use crate::device::launch::{blocks, grid_stride, THREADS};

use super::attention::{AttSaved, SelfAttention};
use super::conv::Conv3x3;
use super::dropout::{silu_dropout_backward, silu_dropout_to, DropoutMask};
use super::linear::Linear;
use super::norm::{layer_norm_backward, modulated_layer_norm_kept, LnSaved};
use super::params::ParamLayout;
use super::params::Weights;
use super::resample::{concat_channels, gather_rows_into};
use super::Mode;
use crate::error::{Error, Result};
use crate::ops::precision::{keep, Operand, Precision};
use crate::ops::{axpy, fill, gemm_into, mismatch, one_device, silu, silu_backward, GemmSpec};
use crate::tensor::{AsView, AsViewMut, DType, Data, DataMut, Tensor, View, ViewMut};

/// The CPU bodies: the oracle for kernels/blocks.cu. x, h, out: [n, p, c]; m: [n, 3c].
pub mod cpu {
    use crate::real::Real;

    /// `h = (1 + a) x + b`, with a and b the first two thirds of each sample's row of m (its
    /// kernel is fused into the modulated LayerNorm, so its body lives with that family).
    pub use crate::nn::norm::cpu::modulate;

    /// The VJP of [`modulate`]: `dx = (1 + a) dh`, and the a and b columns of dm set to the sums
    /// of `dh x` and `dh` over the p pixels (summed in f64); dm's c columns are left alone.
    pub fn modulate_backward<T: Real>(
        x: &[T],
        m: &[T],
        dh: &[T],
        dx: &mut [T],
        dm: &mut [T],
        p: usize,
        c: usize,
    ) {
        let n = m.len() / (3 * c);
        for s in 0..n {
            for ch in 0..c {
                let scale = T::ONE + m[s * 3 * c + ch];
                let (mut sa, mut sb) = (0.0f64, 0.0f64);
                for q in 0..p {
                    let i = (s * p + q) * c + ch;
                    sa += dh[i].to_f64() * x[i].to_f64();
                    sb += dh[i].to_f64();
                    dx[i] = scale * dh[i];
                }
                dm[s * 3 * c + ch] = T::from_f64(sa);
                dm[s * 3 * c + c + ch] = T::from_f64(sb);
            }
        }
    }

    /// `out = (x + c h) / sqrt(1 + c^2)`, with c the last third of each sample's row of m (the
    /// body is the ops layer's, which the convolution's fused epilogue twin also uses).
    pub use crate::ops::elementwise::cpu::residual;

    /// The VJP of [`residual`]: dx, dh, and dm's c columns set to their gradient summed over the
    /// p pixels (in f64); dm's a and b columns are left alone.
    #[allow(clippy::too_many_arguments)]
    pub fn residual_backward<T: Real>(
        x: &[T],
        h: &[T],
        m: &[T],
        dout: &[T],
        dx: &mut [T],
        dh: &mut [T],
        dm: &mut [T],
        p: usize,
        c: usize,
    ) {
        let n = m.len() / (3 * c);
        for s in 0..n {
            for ch in 0..c {
                let cc = m[s * 3 * c + 2 * c + ch];
                let inv = T::ONE / (T::ONE + cc * cc).sqrt();
                let mut sc = 0.0f64;
                for q in 0..p {
                    let i = (s * p + q) * c + ch;
                    let out = (x[i] + cc * h[i]) * inv;
                    sc += dout[i].to_f64() * ((h[i] - out * cc * inv) * inv).to_f64();
                    dx[i] = dout[i] * inv;
                    dh[i] = cc * dout[i] * inv;
                }
                dm[s * 3 * c + 2 * c + ch] = T::from_f64(sc);
            }
        }
    }
}

/// (n, p, c) of a [N, ..., C] activation with modulation [N, 3C].
fn npc(op: &'static str, x: &View, m: &View) -> Result<(usize, usize, usize)> {
    npc_of(op, x.shape(), m)
}

fn npc_of(op: &'static str, x: &[usize], m: &View) -> Result<(usize, usize, usize)> {
    let (n, c) = match (x.first(), x.last()) {
        (Some(&n), Some(&c)) if x.len() >= 2 && n > 0 && c > 0 => (n, c),
        _ => return Err(Error::shape(op, "x", "[N, .., C]", x)),
    };
    if m.shape() != [n, 3 * c] {
        return Err(Error::shape(op, "modulation", [n, 3 * c], m.shape()));
    }
    Ok((n, crate::tensor::numel(x) / (n * c), c))
}

/// The backward kernels index raw buffers: check every operand's shape first.
fn same_shapes(
    op: &'static str,
    x: &View,
    others: &[(&str, &[usize])],
    dm: &ViewMut,
    n: usize,
    c: usize,
) -> Result<()> {
    same_shapes_of(op, x.shape(), others, dm, n, c)
}

fn same_shapes_of(
    op: &'static str,
    x: &[usize],
    others: &[(&str, &[usize])],
    dm: &ViewMut,
    n: usize,
    c: usize,
) -> Result<()> {
    for (what, shape) in others {
        if *shape != x {
            return Err(Error::shape(op, *what, x, shape));
        }
    }
    if dm.shape() != [n, 3 * c] {
        return Err(Error::shape(op, "dm", [n, 3 * c], dm.shape()));
    }
    // The per-channel kernels put the batch on grid.y.
    if n > 65_535 {
        return Err(Error::shape(op, "batch", "at most 65,535 samples per call", n));
    }
    Ok(())
}

/// One thread per channel, one grid row per sample (the per-channel backward kernels).
fn per_channel(n: usize, c: usize) -> LaunchConfig {
    blocks(((c as u32).div_ceil(THREADS), n as u32, 1), THREADS)
}

/// The GPU of a bf16 operand whose other operands (and `dm`) are on it too: where the blocks'
/// bf16-input kernels run. None elsewhere (the op widens the kept values, exactly).
fn gpu_of(
    x: &Operand,
    others: &[&View],
    dm: Option<&ViewMut>,
) -> Option<std::sync::Arc<crate::device::CudaDevice>> {
    let Operand::Bf16(xb) = x else { return None };
    let dev = xb.gpu_with(others)?;
    match dm.map(|d| d.as_view().device()) {
        Some(d) if !d.same_as(&crate::Device::Cuda(dev.clone())) => None,
        _ => Some(dev),
    }
}

/// A GPU view's device buffer (the caller checked it is on the GPU).
fn cuda<'a>(v: &'a View) -> &'a cudarc::driver::CudaView<'a, f32> {
    match &v.data {
        Data::Cuda(c, _) => c,
        _ => unreachable!("on the GPU (checked by gpu_of)"),
    }
}

/// [`modulate_backward`] for a block input that may be kept in bf16 (read as it is by a GPU
/// kernel, widened elsewhere; the same values either way).
pub fn modulate_backward_operand(x: &Operand, m: &View, dh: &View, dm: &mut ViewMut) -> Result<Tensor> {
    let Some(dev) = gpu_of(x, &[m, dh], Some(dm)) else {
        return modulate_backward(&x.widen()?.view()?, m, dh, dm);
    };
    let Operand::Bf16(xb) = x else {
        unreachable!("gpu_of takes bf16 only")
    };
    let (n, p, c) = npc_of("modulate_backward", xb.shape(), m)?;
    same_shapes_of("modulate_backward", xb.shape(), &[("dh", dh.shape())], dm, n, c)?;
    crate::device::note_op();
    let mut dx = Tensor::uninit(xb.shape(), DType::F32, &crate::Device::Cuda(dev.clone()))?;
    let DataMut::Cuda(dmv, _) = &mut dm.data else {
        unreachable!("checked by gpu_of")
    };
    let (xv, mut o) = (xb.cuda()?, dx.cuda_f32_mut()?);
    // SAFETY: x, dh and dx are [n, p, c], m and dm [n, 3c] (checked above).
    unsafe {
        dev.kernels().blk_modulate_backward_bf16x(
            per_channel(n, c),
            &xv,
            cuda(m),
            cuda(dh),
            &mut o,
            dmv,
            n as i64,
            p as i64,
            c as i64,
        )
    }?;
    Ok(dx)
}

/// [`residual`] for x and h that may be kept in bf16: with both bf16 on a GPU one kernel reads
/// them as they are, elsewhere they are widened (exactly); the same values either way.
pub fn residual_operand(x: &Operand, h: &Operand, m: &View) -> Result<Tensor> {
    residual_to(x, h, m, DType::F32)
}

/// [`residual_operand`] as the next block keeps its input (`ops::precision::keep`): under bf16
/// written in bf16 by the kernel itself where it reads bf16 x and h on a GPU (no f32 copy to
/// cast), elsewhere the f32 output rounded (the same values).
pub fn residual_kept(x: &Operand, h: &Operand, m: &View, precision: Precision) -> Result<Tensor> {
    keep(residual_to(x, h, m, precision.kept_dtype())?, precision)
}

/// The residual with its output in `out_dtype` where the GPU's bf16-input kernel runs (bf16 or
/// f32), else f32.
fn residual_to(x: &Operand, h: &Operand, m: &View, out_dtype: DType) -> Result<Tensor> {
    let dev = match h {
        Operand::Bf16(_) => {
            gpu_of(x, &[m], None).filter(|d| h.device().same_as(&crate::Device::Cuda(d.clone())))
        }
        Operand::F32(_) => None,
    };
    let (Some(dev), Operand::Bf16(xb), Operand::Bf16(hb)) = (dev, x, h) else {
        return residual(&x.widen()?.view()?, &h.widen()?.view()?, m);
    };
    let (n, p, c) = npc_of("residual", xb.shape(), m)?;
    if hb.shape() != xb.shape() {
        return Err(Error::shape("residual", "h", xb.shape(), hb.shape()));
    }
    crate::device::note_op();
    let mut out = Tensor::uninit(xb.shape(), out_dtype, &crate::Device::Cuda(dev.clone()))?;
    let (xv, hv) = (xb.cuda()?, hb.cuda()?);
    let (cfg, k) = (grid_stride(&dev, n * p * c), dev.kernels());
    let (n, p, c) = (n as i64, p as i64, c as i64);
    // SAFETY: x, h and out are [n, p, c], m [n, 3c] (checked above).
    unsafe {
        match out_dtype {
            DType::BF16 => {
                k.blk_residual_bf16xh_bf16y(cfg, &xv, &hv, cuda(m), &mut out.cuda_bf16_mut()?, n, p, c)
            }
            _ => k.blk_residual_bf16xh(cfg, &xv, &hv, cuda(m), &mut out.cuda_f32_mut()?, n, p, c),
        }
    }?;
    Ok(out)
}

/// [`residual_backward`] for x and h that may be kept in bf16 (as [`residual_operand`]).
pub fn residual_backward_operand(
    x: &Operand,
    h: &Operand,
    m: &View,
    dout: &View,
    dm: &mut ViewMut,
) -> Result<(Tensor, Tensor)> {
    let dev = match h {
        Operand::Bf16(_) => {
            gpu_of(x, &[m, dout], Some(dm)).filter(|d| h.device().same_as(&crate::Device::Cuda(d.clone())))
        }
        Operand::F32(_) => None,
    };
    let (Some(dev), Operand::Bf16(xb), Operand::Bf16(hb)) = (dev, x, h) else {
        let (xw, hw) = (x.widen()?, h.widen()?);
        return residual_backward(&xw.view()?, &hw.view()?, m, dout, dm);
    };
    let (n, p, c) = npc_of("residual_backward", xb.shape(), m)?;
    same_shapes_of(
        "residual_backward",
        xb.shape(),
        &[("h", hb.shape()), ("dout", dout.shape())],
        dm,
        n,
        c,
    )?;
    crate::device::note_op();
    let device = crate::Device::Cuda(dev.clone());
    let mut dx = Tensor::uninit(xb.shape(), DType::F32, &device)?;
    let mut dh = Tensor::uninit(xb.shape(), DType::F32, &device)?;
    {
        let DataMut::Cuda(dmv, _) = &mut dm.data else {
            unreachable!("checked by gpu_of")
        };
        let (xv, hv) = (xb.cuda()?, hb.cuda()?);
        let (mut ox, mut oh) = (dx.cuda_f32_mut()?, dh.cuda_f32_mut()?);
        // SAFETY: x, h, dout, dx and dh are [n, p, c], m and dm [n, 3c] (checked above).
        unsafe {
            dev.kernels().blk_residual_backward_bf16xh(
                per_channel(n, c),
                &xv,
                &hv,
                cuda(m),
                cuda(dout),
                &mut ox,
                &mut oh,
                dmv,
                n as i64,
                p as i64,
                c as i64,
            )
        }?;
    }
    Ok((dx, dh))
}

/// dx and the (a, b) columns of dm for dh. `dm` is [N, 3C]; its c columns are left alone.
pub fn modulate_backward(x: &View, m: &View, dh: &View, dm: &mut ViewMut) -> Result<Tensor> {
    one_device("modulate_backward", &[x, m, dh], &[dm])?;
    let (n, p, c) = npc("modulate_backward", x, m)?;
    same_shapes("modulate_backward", x, &[("dh", dh.shape())], dm, n, c)?;
    let mut dx = Tensor::uninit(x.shape(), x.dtype(), &x.device())?;
    {
        let mut dxv = dx.as_view_mut()?;
        match (&x.data, &m.data, &dh.data, &mut dxv.data, &mut dm.data) {
            (
                Data::Cuda(xv, dev),
                Data::Cuda(mv, _),
                Data::Cuda(gv, _),
                DataMut::Cuda(o, _),
                DataMut::Cuda(dmv, _),
            ) => {
                let (n64, p64, c64) = (n as i64, p as i64, c as i64);
                // SAFETY: x, dh and dx are [n, p, c], m and dm [n, 3c] (checked by same_shapes).
                unsafe {
                    dev.kernels().blk_modulate_backward_f32(
                        per_channel(n, c),
                        xv,
                        mv,
                        gv,
                        o,
                        dmv,
                        n64,
                        p64,
                        c64,
                    )
                }?;
            }
            (Data::Cuda(..), ..) => return Err(mismatch("modulate_backward", &[x, m, dh], &[])),
            _ => host_real!(x, T => {
                cpu::modulate_backward::<T>(x.cpu()?, m.cpu()?, dh.cpu()?, dxv.cpu_mut()?, dm.cpu_mut()?, p, c);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(dx)
}

/// out = (x + c h) / sqrt(1 + c^2).
pub fn residual(x: &View, h: &View, m: &View) -> Result<Tensor> {
    one_device("residual", &[x, h, m], &[])?;
    let (n, p, c) = npc("residual", x, m)?;
    if h.shape() != x.shape() {
        return Err(Error::shape("residual", "h", x.shape(), h.shape()));
    }
    let mut out = Tensor::uninit(x.shape(), x.dtype(), &x.device())?;
    {
        let mut ov = out.as_view_mut()?;
        match (&x.data, &h.data, &m.data, &mut ov.data) {
            (Data::Cuda(xv, dev), Data::Cuda(hv, _), Data::Cuda(mv, _), DataMut::Cuda(o, _)) => {
                let (n64, p64, c64) = (n as i64, p as i64, c as i64);
                let cfg = grid_stride(dev, n * p * c);
                // SAFETY: x, h and out are [n, p, c], m [n, 3c] (checked above).
                unsafe { dev.kernels().blk_residual_f32(cfg, xv, hv, mv, o, n64, p64, c64) }?;
            }
            (Data::Cuda(..), ..) => return Err(mismatch("residual", &[x, h, m], &[])),
            _ => host_real!(x, T => {
                cpu::residual::<T>(x.cpu()?, h.cpu()?, m.cpu()?, ov.cpu_mut()?, p, c);
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok(out)
}

/// (dx, dh) and the c columns of dm for dout.
pub fn residual_backward(
    x: &View,
    h: &View,
    m: &View,
    dout: &View,
    dm: &mut ViewMut,
) -> Result<(Tensor, Tensor)> {
    one_device("residual_backward", &[x, h, m, dout], &[dm])?;
    let (n, p, c) = npc("residual_backward", x, m)?;
    same_shapes(
        "residual_backward",
        x,
        &[("h", h.shape()), ("dout", dout.shape())],
        dm,
        n,
        c,
    )?;
    let mut dx = Tensor::uninit(x.shape(), x.dtype(), &x.device())?;
    let mut dh = Tensor::uninit(x.shape(), x.dtype(), &x.device())?;
    {
        let (mut dxv, mut dhv) = (dx.as_view_mut()?, dh.as_view_mut()?);
        match (
            &x.data,
            &h.data,
            &m.data,
            &dout.data,
            &mut dxv.data,
            &mut dhv.data,
            &mut dm.data,
        ) {
            (
                Data::Cuda(xv, dev),
                Data::Cuda(hv, _),
                Data::Cuda(mv, _),
                Data::Cuda(gv, _),
                DataMut::Cuda(ox, _),
                DataMut::Cuda(oh, _),
                DataMut::Cuda(dmv, _),
            ) => {
                let (n64, p64, c64) = (n as i64, p as i64, c as i64);
                // SAFETY: x, h, dout, dx and dh are [n, p, c], m and dm [n, 3c] (same_shapes).
                unsafe {
                    dev.kernels().blk_residual_backward_f32(
                        per_channel(n, c),
                        xv,
                        hv,
                        mv,
                        gv,
                        ox,
                        oh,
                        dmv,
                        n64,
                        p64,
                        c64,
                    )
                }?;
            }
            (Data::Cuda(..), ..) => return Err(mismatch("residual_backward", &[x, h, m, dout], &[])),
            _ => host_real!(x, T => {
                cpu::residual_backward::<T>(
                    x.cpu()?, h.cpu()?, m.cpu()?, dout.cpu()?, dxv.cpu_mut()?, dhv.cpu_mut()?, dm.cpu_mut()?, p, c,
                );
                Ok::<(), Error>(())
            })?,
        }
    }
    Ok((dx, dh))
}

/// emb -> Linear(E, E) -> SiLU -> Linear(E, 3C), last weights scaled by 0.1 at init.
#[derive(Clone, Debug)]
pub struct Modulation {
    /// Linear(E, E) with bias (`{name}.mod.0`), followed by SiLU.
    pub hidden: Linear,
    /// Linear(E, 3C) with bias (`{name}.mod.2`), initial weights scaled by 0.1.
    pub out: Linear,
    /// Channels C of the modulated block; the output is 3C wide (a, b, c).
    pub channels: usize,
}

/// What one modulation's parameter backward needs: the hidden pre-activation (SiLU's output is
/// recomputed from it) and the output m = [a | b | c].
pub struct ModSaved {
    /// The hidden pre-activation `[N, E]` (SiLU's input).
    pub z: Tensor,
    /// The modulation `[N, 3C]`: a, b and c side by side in each row.
    pub m: Tensor,
}

impl Modulation {
    /// Registers `{name}.mod.0` and `{name}.mod.2`, each weight followed by its bias in the
    /// layout, as [`ModulationBank`] requires.
    pub fn new(layout: &mut ParamLayout, name: &str, channels: usize, emb: usize) -> Self {
        Modulation {
            hidden: Linear::new(layout, &format!("{name}.mod.0"), emb, emb, true),
            out: Linear::with_scale(layout, &format!("{name}.mod.2"), emb, 3 * channels, true, 0.1),
            channels,
        }
    }

    /// One block's modulation on its own (the U-Net evaluates all of them at once through
    /// [`ModulationBank`]; this is the reference it is tested against).
    pub fn forward(&self, layout: &ParamLayout, params: &Weights, emb: &View) -> Result<ModSaved> {
        let z = self.hidden.forward(layout, params, emb)?;
        let s = silu(&z)?;
        let m = self.out.forward(layout, params, &s.as_view()?)?;
        Ok(ModSaved { z, m })
    }

    /// Parameter gradients only: the embedding depends on sigma, never on x.
    pub fn backward_params(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        emb: &View,
        saved: &ModSaved,
        dm: &View,
        grads: &mut ViewMut,
    ) -> Result<()> {
        let s = silu(&saved.z)?;
        let ds = self
            .out
            .backward(layout, params, &s.as_view()?, dm, Some(grads))?;
        let dz = silu_backward(&saved.z, &ds)?;
        self.hidden
            .backward(layout, params, emb, &dz.as_view()?, Some(grads))?;
        Ok(())
    }

    /// Offsets of [W0; b0] and [W2; b2] in the flat parameters, when each weight is followed by
    /// its bias (as `new` registers them), so each layer is one [E + 1, fan_out] matrix.
    fn augmented_offsets(&self, layout: &ParamLayout) -> Option<(usize, usize)> {
        let at = |l: &Linear| {
            let w = layout.spec(l.weight).offset;
            let b = layout.spec(l.bias?).offset;
            (b == w + l.fan_in * l.fan_out).then_some(w)
        };
        Some((at(&self.hidden)?, at(&self.out)?))
    }
}

/// One modulation MLP's place in a [`ModulationBank`].
#[derive(Clone, Debug)]
struct BankSlot {
    /// Offsets of [W0; b0] and [W2; b2] in the flat parameters.
    hidden: usize,
    out: usize,
    channels: usize,
    /// Sum of 3C over the slots before this one: its m starts at N times this in the bank's m.
    m_before: usize,
}

/// Every block's modulation MLP at once. They all read the same embedding, so the first layers
/// of all B of them are one batched GEMM against it ([N, E+1] x [B, E+1, E]), and the second
/// layers one batched GEMM per channel width ([k, N, E+1] x [k, E+1, 3C]). The bias rides in
/// the GEMM as a last row of the weight, met by a column of ones: each Linear's weight is
/// followed by its bias in the flat parameters, so [W; b] is one contiguous matrix. The weights
/// are gathered from their places (one strided copy per equally spaced run of blocks) and the
/// gradients scattered back, so the parameter layout and the checkpoint names stay as they are.
#[derive(Clone, Debug)]
pub struct ModulationBank {
    emb: usize,
    slots: Vec<BankSlot>,
    /// Runs of consecutive slots with one width: (first slot, count, channels).
    groups: Vec<(usize, usize, usize)>,
}

/// The bank's forward state: z [B, N, E] (SiLU's input, for the backward) and every block's m,
/// block after block, each [N, 3C].
pub struct BankSaved {
    /// SiLU's input of every modulation's first layer, `[B, N, E]`.
    pub z: Tensor,
    /// Every block's m, flat: slot after slot, each `[N, 3C]` (see [`ModulationBank::slot`]).
    pub m: Tensor,
    n: usize,
}

impl BankSaved {
    /// The batch size N.
    pub fn batch(&self) -> usize {
        self.n
    }

    /// Bytes held by z and m.
    pub fn bytes(&self) -> usize {
        self.z.size_in_bytes() + self.m.size_in_bytes()
    }
}

/// Maximal runs of equally spaced offsets: (first index, count, spacing).
fn strided_runs(offsets: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for (i, &o) in offsets.iter().enumerate() {
        if let Some((start, count, stride)) = runs.last_mut() {
            let last = offsets[*start + *count - 1];
            if o > last && (*count == 1 || o - last == *stride) {
                *stride = o - last;
                *count += 1;
                continue;
            }
        }
        runs.push((i, 1, 0));
    }
    runs
}

/// Gathers `cols` values at each of `offsets` of `flat` into consecutive rows of `out`.
fn gather(flat: &View, offsets: &[usize], cols: usize, out: &mut ViewMut) -> Result<()> {
    for (start, count, stride) in strided_runs(offsets) {
        let mut rows = out.sub_mut(start * cols, &[count, cols])?;
        gather_rows_into(flat, offsets[start], stride, &mut rows)?;
    }
    Ok(())
}

/// A tensor of ones (the bias column) in `like`'s dtype and device.
fn ones(like: &View, shape: &[usize]) -> Result<Tensor> {
    let mut t = Tensor::uninit(shape, like.dtype(), &like.device())?;
    fill(&mut t, 1.0)?;
    Ok(t)
}

/// [x, 1]: a column of ones after the last axis of a [rows, k] matrix.
fn with_ones(x: &View) -> Result<Tensor> {
    let rows = x.numel() / x.shape().last().copied().unwrap_or(1).max(1);
    concat_channels(x, &ones(x, &[rows, 1])?.as_view()?)
}

impl ModulationBank {
    /// A bank over `mods` in this order; consecutive modulations of one width share the second
    /// GEMM, so order them by width.
    pub fn new(layout: &ParamLayout, mods: &[&Modulation]) -> Result<Self> {
        let emb = mods.first().map_or(0, |m| m.hidden.fan_in);
        let mut slots = Vec::with_capacity(mods.len());
        let mut groups: Vec<(usize, usize, usize)> = Vec::new();
        let mut m_before = 0;
        for (i, md) in mods.iter().enumerate() {
            let (hidden, out) = md
                .augmented_offsets(layout)
                .filter(|_| md.hidden.fan_in == emb && md.hidden.fan_out == emb)
                .ok_or_else(|| {
                    Error::Other(format!(
                        "modulation {i}: each weight must be followed by its bias in the parameters, \
                         with a {emb}-wide embedding"
                    ))
                })?;
            slots.push(BankSlot {
                hidden,
                out,
                channels: md.channels,
                m_before,
            });
            m_before += 3 * md.channels;
            match groups.last_mut() {
                Some((_, count, c)) if *c == md.channels => *count += 1,
                _ => groups.push((i, 1, md.channels)),
            }
        }
        Ok(ModulationBank { emb, slots, groups })
    }

    /// Number of modulation MLPs (slots) in the bank.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the bank holds no modulation.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// (count, channels) of each run of slots that shares a second-layer GEMM.
    pub fn group_sizes(&self) -> Vec<(usize, usize)> {
        self.groups.iter().map(|&(_, k, c)| (k, c)).collect()
    }

    /// Elements per sample of every block's m together.
    pub fn m_width(&self) -> usize {
        self.slots.iter().map(|s| 3 * s.channels).sum()
    }

    /// Elements of the largest gathered weight stack (the forward's transient besides z and m).
    pub fn gathered_weights(&self) -> usize {
        let e = self.emb;
        let second = self.groups.iter().map(|&(_, k, c)| k * (e + 1) * 3 * c).max();
        (self.len() * (e + 1) * e).max(second.unwrap_or(0))
    }

    /// Slot `slot`'s part of a bank-shaped buffer (m or its gradient), [N, 3C].
    pub fn slot<'a>(&self, all: &View<'a>, n: usize, slot: usize) -> Result<View<'a>> {
        let s = &self.slots[slot];
        all.sub(n * s.m_before, &[n, 3 * s.channels])
    }

    /// Slot `slot`'s part of a mutable bank-shaped buffer (the gradient dm), `[N, 3C]`.
    pub fn slot_mut<'b>(&self, all: &'b mut ViewMut<'_>, n: usize, slot: usize) -> Result<ViewMut<'b>> {
        let s = &self.slots[slot];
        all.sub_mut(n * s.m_before, &[n, 3 * s.channels])
    }

    /// Every m for the embedding emb [N, E].
    pub fn forward(&self, params: &Weights, emb: &View) -> Result<BankSaved> {
        let (e, b) = (self.emb, self.len());
        let n = match *emb.shape() {
            [n, w] if w == e => n,
            _ => {
                return Err(Error::shape(
                    "modulation bank",
                    "embedding",
                    format!("[N, {e}]"),
                    emb.shape(),
                ))
            }
        };
        let z = {
            let mut w0 = Tensor::uninit(&[b, e + 1, e], emb.dtype(), &emb.device())?;
            let hidden: Vec<usize> = self.slots.iter().map(|s| s.hidden).collect();
            gather(params, &hidden, (e + 1) * e, &mut w0.as_view_mut()?)?;
            let mut z = Tensor::uninit(&[b, n, e], emb.dtype(), &emb.device())?;
            gemm_into(&with_ones(emb)?, &w0, &mut z, GemmSpec::default())?;
            z
        };
        let s1 = with_ones(&silu(&z)?.as_view()?.reshape(&[b * n, e])?)?;
        let s1 = s1.as_view()?;
        let mut m = Tensor::uninit(&[n * self.m_width()], emb.dtype(), &emb.device())?;
        {
            let mut mv = m.as_view_mut()?;
            for &(first, k, c) in &self.groups {
                let mut w2 = Tensor::uninit(&[k, e + 1, 3 * c], emb.dtype(), &emb.device())?;
                let out: Vec<usize> = self.slots[first..first + k].iter().map(|s| s.out).collect();
                gather(params, &out, (e + 1) * 3 * c, &mut w2.as_view_mut()?)?;
                let a = s1.sub(first * n * (e + 1), &[k, n, e + 1])?;
                let at = n * self.slots[first].m_before;
                gemm_into(&a, &w2, &mut mv.sub_mut(at, &[k, n, 3 * c])?, GemmSpec::default())?;
            }
        }
        Ok(BankSaved { z, m, n })
    }

    /// Accumulates every modulation's parameter gradient for dm (shaped like `saved.m`).
    pub fn backward_params(
        &self,
        params: &Weights,
        emb: &View,
        saved: &BankSaved,
        dm: &View,
        grads: &mut ViewMut,
    ) -> Result<()> {
        let (e, b, n) = (self.emb, self.len(), saved.n);
        if dm.shape() != saved.m.shape() {
            return Err(Error::shape("modulation bank", "dm", saved.m.shape(), dm.shape()));
        }
        let (dtype, device) = (dm.dtype(), dm.device());
        let s1 = with_ones(&silu(&saved.z)?.as_view()?.reshape(&[b * n, e])?)?;
        let mut ds = Tensor::uninit(&[b, n, e], dtype, &device)?;
        for &(first, k, c) in &self.groups {
            let dmk = dm.sub(n * self.slots[first].m_before, &[k, n, 3 * c])?;
            // ds = dm W2^T, with W2 (no bias row) gathered again.
            let mut w2 = Tensor::uninit(&[k, e, 3 * c], dtype, &device)?;
            let out: Vec<usize> = self.slots[first..first + k].iter().map(|s| s.out).collect();
            gather(params, &out, e * 3 * c, &mut w2.as_view_mut()?)?;
            let mut dsk = ds.as_view_mut()?;
            gemm_into(
                &dmk,
                &w2,
                &mut dsk.sub_mut(first * n * e, &[k, n, e])?,
                GemmSpec::new(false, true),
            )?;
            drop(w2);
            // [dW2; db2] = [s, 1]^T dm.
            let mut g2 = Tensor::uninit(&[k, e + 1, 3 * c], dtype, &device)?;
            let a = s1.as_view()?.sub(first * n * (e + 1), &[k, n, e + 1])?;
            gemm_into(&a, &dmk, &mut g2, GemmSpec::new(true, false))?;
            scatter_add(&g2.as_view()?, &out, (e + 1) * 3 * c, grads)?;
        }
        drop(s1);
        let dz = silu_backward(&saved.z, &ds)?;
        drop(ds);
        // [dW0; db0] = [emb, 1]^T dz, every block in one GEMM.
        let mut g0 = Tensor::uninit(&[b, e + 1, e], dtype, &device)?;
        gemm_into(&with_ones(emb)?, &dz, &mut g0, GemmSpec::new(true, false))?;
        let hidden: Vec<usize> = self.slots.iter().map(|s| s.hidden).collect();
        scatter_add(&g0.as_view()?, &hidden, (e + 1) * e, grads)
    }
}

/// grads[offsets[j] ..][.. cols] += g[j] for every row j of g.
fn scatter_add(g: &View, offsets: &[usize], cols: usize, grads: &mut ViewMut) -> Result<()> {
    for (j, &o) in offsets.iter().enumerate() {
        axpy(1.0, &g.sub(j * cols, &[cols])?, &mut grads.sub_mut(o, &[cols])?)?;
    }
    Ok(())
}

/// What a ResBlock's backward needs besides its input x and modulation m (which the caller
/// keeps). Conv2's input Dropout(SiLU(c1)) is not kept: the parameter backward recomputes it
/// from c1 (the same ops on the same values), and a VJP needs only its shape.
pub struct ResCore {
    /// LN((1 + a) x + b): conv1's input.
    pub ln: LnSaved,
    /// Conv1's output, SiLU's input.
    pub c1: Tensor,
    /// Conv2's output, the h of the residual.
    pub c2: Tensor,
    /// This call's dropout mask (Train mode with p > 0), regenerated by the backward; None
    /// without dropout.
    pub mask: Option<DropoutMask>,
}

impl ResCore {
    /// Bytes held by the saved tensors.
    pub fn bytes(&self) -> usize {
        [&self.ln.y, &self.ln.rstd, &self.c1, &self.c2]
            .iter()
            .map(|t| t.size_in_bytes())
            .sum()
    }
}

/// Everything a standalone ResBlock's backward needs.
pub struct ResSaved {
    /// The block's input `[N, H, W, C]`.
    pub x: Tensor,
    /// The block's own modulation state (z and m).
    pub modulation: ModSaved,
    /// The block body's state.
    pub core: ResCore,
}

impl ResSaved {
    /// Bytes held, input and modulation included.
    pub fn bytes(&self) -> usize {
        self.x.size_in_bytes()
            + self.core.bytes()
            + self.modulation.z.size_in_bytes()
            + self.modulation.m.size_in_bytes()
    }
}

/// The paper's ResBlock(C), shape-preserving on `[N, H, W, C]`: modulated LayerNorm,
/// Conv3x3, SiLU, Dropout, Conv3x3, then `out = (x + c h) / sqrt(1 + c^2)`.
#[derive(Clone, Debug)]
pub struct ResBlock {
    /// Produces (a, b, c) from the embedding.
    pub modulation: Modulation,
    /// Conv3x3(C -> C) on the modulated LayerNorm output.
    pub conv1: Conv3x3,
    /// Conv3x3(C -> C) on Dropout(SiLU(conv1)); its output is the residual's h.
    pub conv2: Conv3x3,
    /// Dropout probability before conv2, applied in Train mode only.
    pub dropout: f32,
}

impl ResBlock {
    /// Registers the modulation (`{name}.mod.*`), `{name}.conv1` and `{name}.conv2`, all C -> C
    /// with stride 1.
    pub fn new(layout: &mut ParamLayout, name: &str, channels: usize, emb: usize, dropout: f32) -> Self {
        ResBlock {
            modulation: Modulation::new(layout, name, channels, emb),
            conv1: Conv3x3::new(layout, &format!("{name}.conv1"), channels, channels, 1),
            conv2: Conv3x3::new(layout, &format!("{name}.conv2"), channels, channels, 1),
            dropout,
        }
    }

    /// `dropout_offset` is this block's first element in the dropout stream (unique per block).
    pub fn forward(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: Tensor,
        emb: &View,
        mode: Mode,
        dropout_offset: u64,
    ) -> Result<(Tensor, ResSaved)> {
        let modulation = self.modulation.forward(layout, params, emb)?;
        let (out, core) = self.forward_modulated(
            layout,
            params,
            &Operand::of(&x)?,
            &modulation.m.as_view()?,
            mode,
            dropout_offset,
            false,
        )?;
        Ok((out, ResSaved { x, modulation, core }))
    }

    /// The block for a given modulation m [N, 3C]; the caller keeps x (f32, or a kept bf16
    /// activation) and m for the backward. Under the bf16 policy the block keeps the LayerNorm
    /// output, c1 and c2 in bf16 and goes on from those rounded values. With `keep_out` the
    /// output is returned as the caller keeps it (`ops::precision::keep`, for the next block).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_modulated(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: &Operand,
        m: &View,
        mode: Mode,
        dropout_offset: u64,
        keep_out: bool,
    ) -> Result<(Tensor, ResCore)> {
        let p = layout.precision();
        let ln = modulated_layer_norm_kept(x, m, p)?;
        let c1 = self.conv1.forward_kept(layout, params, &Operand::of(&ln.y)?)?;
        let mask = match mode {
            Mode::Train { rng, first_row } if self.dropout > 0.0 => Some(DropoutMask {
                rng,
                // Element offsets over the whole batch: this part starts first_row rows in.
                offset: dropout_offset + first_row * (c1.numel() / m.shape()[0].max(1)) as u64,
                p: self.dropout,
            }),
            _ => None,
        };
        let d1 = conv2_input(&self.conv2, layout, &c1, mask.as_ref())?;
        // Under bf16 the residual runs in conv2's epilogue (the same bits as the two ops).
        let fused = self
            .conv2
            .forward_kept_residual(layout, params, &Operand::of(&d1)?, x, m, keep_out)?;
        let (c2, out) = match fused {
            Some(both) => both,
            None => {
                let c2 = self.conv2.forward_kept(layout, params, &Operand::of(&d1)?)?;
                drop(d1);
                let out = residual_out(x, &Operand::of(&c2)?, m, p, keep_out)?;
                (c2, out)
            }
        };
        Ok((out, ResCore { ln, c1, c2, mask }))
    }

    /// dx; with `grads`, accumulates every parameter gradient of the block.
    pub fn backward(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        emb: &View,
        saved: &ResSaved,
        dout: &View,
        mut grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        let m = saved.modulation.m.as_view()?;
        let mut dm = Tensor::uninit(m.shape(), m.dtype(), &m.device())?;
        let dx = self.backward_modulated(
            layout,
            params,
            &Operand::of(&saved.x)?,
            &m,
            &saved.core,
            dout.to_tensor()?,
            &mut dm.as_view_mut()?,
            grads.as_deref_mut(),
        )?;
        if let Some(g) = grads {
            self.modulation
                .backward_params(layout, params, emb, &saved.modulation, &dm.as_view()?, g)?;
        }
        Ok(dx)
    }

    /// dx for dout, and the modulation's gradient into dm [N, 3C]; with `grads`, the
    /// convolutions' parameter gradients (the modulation's are the caller's, from dm). Takes
    /// dout to free it as soon as the residual's backward has read it.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_modulated(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: &Operand,
        m: &View,
        core: &ResCore,
        dout: Tensor,
        dm: &mut ViewMut,
        mut grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        let (mut dx, dc2) = residual_backward_operand(x, &Operand::of(&core.c2)?, m, &dout.as_view()?, dm)?;
        drop(dout);
        // Under bf16, dc2 rounded once for conv2's two passes (its input is rebuilt between).
        let dc2b = self.conv2.dy_bf16(layout, core.c1.shape(), &dc2.as_view()?)?;
        if let Some(g) = grads.as_deref_mut() {
            let d1 = conv2_input(&self.conv2, layout, &core.c1, core.mask.as_ref())?;
            let d1 = Operand::of(&d1)?;
            self.conv2
                .param_grads_with(layout, &d1, &dc2.as_view()?, dc2b.as_ref(), g)?;
        }
        let dd1 = self.conv2.backward_input_with(
            layout,
            params,
            core.c1.shape(),
            &dc2.as_view()?,
            dc2b.as_ref(),
        )?;
        drop((dc2, dc2b));
        let dc1 = silu_dropout_backward(&Operand::of(&core.c1)?, dd1, core.mask.as_ref())?;
        let dln =
            self.conv1
                .backward_operand(layout, params, &Operand::of(&core.ln.y)?, &dc1.as_view()?, grads)?;
        drop(dc1);
        let dh0 = layer_norm_backward(&core.ln, &dln.as_view()?)?;
        drop(dln);
        let dx_mod = modulate_backward_operand(x, m, &dh0.as_view()?, dm)?;
        drop(dh0);
        // dx_res + dx_mod in place (the same rounding as a new sum).
        axpy(1.0, &dx_mod, &mut dx)?;
        Ok(dx)
    }
}

/// A block's output: kept for the next block (`keep_out`), else f32.
fn residual_out(x: &Operand, h: &Operand, m: &View, p: Precision, keep_out: bool) -> Result<Tensor> {
    match keep_out {
        true => residual_kept(x, h, m, p),
        false => residual_operand(x, h, m),
    }
}

/// Conv2's input: Dropout(SiLU(c1)), or SiLU(c1) without dropout (c1 f32 or kept bf16), made
/// in bf16 by its own kernel when conv2 reads bf16 operands (no cast in conv2), else f32.
fn conv2_input(
    conv2: &Conv3x3,
    layout: &ParamLayout,
    c1: &Tensor,
    mask: Option<&DropoutMask>,
) -> Result<Tensor> {
    let dtype = match conv2.tensor_cores(layout, c1.shape(), &c1.device())? {
        true => DType::BF16,
        false => DType::F32,
    };
    silu_dropout_to(&Operand::of(c1)?, mask, dtype)
}

/// What an AttBlock's backward needs besides its input x and modulation m.
pub struct AttCore {
    /// LN((1 + a) x + b): the attention's input (which the attention does not copy).
    pub ln: LnSaved,
    /// The attention's saved state (it keeps no input copy: its input is `ln.y`).
    pub attention: AttSaved,
    /// The attention's output, the h of the residual.
    pub h: Tensor,
}

impl AttCore {
    /// Bytes held by the saved tensors.
    pub fn bytes(&self) -> usize {
        [&self.ln.y, &self.ln.rstd, &self.h]
            .iter()
            .map(|t| t.size_in_bytes())
            .sum::<usize>()
            + self.attention.bytes()
    }
}

/// Everything a standalone AttBlock's backward needs.
pub struct AttBlockSaved {
    /// The block's input `[N, H, W, C]`.
    pub x: Tensor,
    /// The block's own modulation state (z and m).
    pub modulation: ModSaved,
    /// The block body's state.
    pub core: AttCore,
}

impl AttBlockSaved {
    /// Bytes held, input and modulation included.
    pub fn bytes(&self) -> usize {
        self.x.size_in_bytes()
            + self.core.bytes()
            + self.modulation.z.size_in_bytes()
            + self.modulation.m.size_in_bytes()
    }
}

/// The paper's AttBlock(C, heads), shape-preserving on `[N, H, W, C]`: modulated LayerNorm,
/// self-attention over the pixels, then `out = (x + c h) / sqrt(1 + c^2)`.
#[derive(Clone, Debug)]
pub struct AttBlock {
    /// Produces (a, b, c) from the embedding.
    pub modulation: Modulation,
    /// Multi-head self-attention on the modulated LayerNorm output; its output is the residual's h.
    pub attention: SelfAttention,
}

impl AttBlock {
    /// Registers the modulation (`{name}.mod.*`) and the attention (`{name}.attn.*`). Panics
    /// unless `heads` divides `channels`.
    pub fn new(layout: &mut ParamLayout, name: &str, channels: usize, heads: usize, emb: usize) -> Self {
        AttBlock {
            modulation: Modulation::new(layout, name, channels, emb),
            attention: SelfAttention::new(layout, &format!("{name}.attn"), channels, heads),
        }
    }

    /// The standalone block: out for x `[N, H, W, C]` and emb `[N, E]`, with its own modulation
    /// evaluated; the saved state takes ownership of x.
    pub fn forward(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: Tensor,
        emb: &View,
    ) -> Result<(Tensor, AttBlockSaved)> {
        let modulation = self.modulation.forward(layout, params, emb)?;
        let (out, core) =
            self.forward_modulated(layout, params, &Operand::of(&x)?, &modulation.m.as_view()?, false)?;
        Ok((out, AttBlockSaved { x, modulation, core }))
    }

    /// The block for a given modulation m [N, 3C]; the caller keeps x (f32, or a kept bf16
    /// activation) and m for the backward. Under the bf16 policy the LayerNorm output, the
    /// attention's state and h are kept in bf16.
    pub fn forward_modulated(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: &Operand,
        m: &View,
        keep_out: bool,
    ) -> Result<(Tensor, AttCore)> {
        let p = layout.precision();
        let ln = modulated_layer_norm_kept(x, m, p)?;
        let (h, attention) = self
            .attention
            .forward_shared_kept(layout, params, &Operand::of(&ln.y)?)?;
        let out = residual_out(x, &Operand::of(&h)?, m, p, keep_out)?;
        Ok((out, AttCore { ln, attention, h }))
    }

    /// dx for dout through the standalone block; with `grads`, accumulates every parameter
    /// gradient of the block, its modulation's included.
    pub fn backward(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        emb: &View,
        saved: &AttBlockSaved,
        dout: &View,
        mut grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        let m = saved.modulation.m.as_view()?;
        let mut dm = Tensor::uninit(m.shape(), m.dtype(), &m.device())?;
        let dx = self.backward_modulated(
            layout,
            params,
            &Operand::of(&saved.x)?,
            &m,
            &saved.core,
            dout.to_tensor()?,
            &mut dm.as_view_mut()?,
            grads.as_deref_mut(),
        )?;
        if let Some(g) = grads {
            self.modulation
                .backward_params(layout, params, emb, &saved.modulation, &dm.as_view()?, g)?;
        }
        Ok(dx)
    }

    /// dx for dout, and the modulation's gradient into dm [N, 3C]; with `grads`, the
    /// attention's parameter gradients.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_modulated(
        &self,
        layout: &ParamLayout,
        params: &Weights,
        x: &Operand,
        m: &View,
        core: &AttCore,
        dout: Tensor,
        dm: &mut ViewMut,
        grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        let (mut dx, dh) = residual_backward_operand(x, &Operand::of(&core.h)?, m, &dout.as_view()?, dm)?;
        drop(dout);
        let dln = self.attention.backward_shared(
            layout,
            params,
            &Operand::of(&core.ln.y)?,
            &core.attention,
            &dh.as_view()?,
            grads,
        )?;
        drop(dh);
        let dh0 = layer_norm_backward(&core.ln, &dln.as_view()?)?;
        drop(dln);
        let dx_mod = modulate_backward_operand(x, m, &dh0.as_view()?, dm)?;
        drop(dh0);
        axpy(1.0, &dx_mod, &mut dx)?;
        Ok(dx)
    }
}
