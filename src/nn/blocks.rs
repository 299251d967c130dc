//! The paper's residual blocks (method.md §3.2) and the fused maps around their convolutions and
//! attention. With (a, b, c) = Modulation(emb), split from one [N, 3C] output:
//!   ResBlock: h = Conv(Dropout(SiLU(Conv(LN((1 + a) x + b))))); out = (x + c h) / sqrt(1 + c^2)
//!   AttBlock: h = MHA(LN((1 + a) x + b));                         out = (x + c h) / sqrt(1 + c^2)
//! CUDA for the fused maps: kernels/blocks.cu.

use cudarc::driver::LaunchConfig;

use crate::device::launch::{blocks, grid_stride, THREADS};

use super::attention::{AttSaved, SelfAttention};
use super::conv::Conv3x3;
use super::dropout::{dropout, DropoutMask};
use super::linear::Linear;
use super::norm::{layer_norm_backward, modulated_layer_norm, LnSaved};
use super::params::ParamLayout;
use super::Mode;
use crate::error::{Error, Result};
use crate::ops::{add, mismatch, one_device, silu, silu_backward};
use crate::tensor::{AsView, AsViewMut, Data, DataMut, Tensor, View, ViewMut};

/// The CPU bodies: the oracle for kernels/blocks.cu. x, h, out: [n, p, c]; m: [n, 3c].
pub mod cpu {
    use crate::real::Real;

    pub fn modulate<T: Real>(x: &[T], m: &[T], h: &mut [T], p: usize, c: usize) {
        for (i, o) in h.iter_mut().enumerate() {
            let (ch, s) = (i % c, i / (p * c));
            *o = (T::ONE + m[s * 3 * c + ch]) * x[i] + m[s * 3 * c + c + ch];
        }
    }

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

    pub fn residual<T: Real>(x: &[T], h: &[T], m: &[T], out: &mut [T], p: usize, c: usize) {
        for (i, o) in out.iter_mut().enumerate() {
            let (ch, s) = (i % c, i / (p * c));
            let cc = m[s * 3 * c + 2 * c + ch];
            *o = (x[i] + cc * h[i]) / (T::ONE + cc * cc).sqrt();
        }
    }

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
    let (n, c) = match (x.shape().first(), x.shape().last()) {
        (Some(&n), Some(&c)) if x.shape().len() >= 2 && n > 0 && c > 0 => (n, c),
        _ => return Err(Error::shape(op, "x", "[N, .., C]", x.shape())),
    };
    if m.shape() != [n, 3 * c] {
        return Err(Error::shape(op, "modulation", [n, 3 * c], m.shape()));
    }
    Ok((n, x.numel() / (n * c), c))
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
    for (what, shape) in others {
        if *shape != x.shape() {
            return Err(Error::shape(op, *what, x.shape(), shape));
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
    pub hidden: Linear,
    pub out: Linear,
    pub channels: usize,
}

/// What the modulation's parameter backward needs.
pub struct ModSaved {
    pub z: Tensor,
    pub s: Tensor,
    pub m: Tensor,
}

impl Modulation {
    pub fn new(layout: &mut ParamLayout, name: &str, channels: usize, emb: usize) -> Self {
        Modulation {
            hidden: Linear::new(layout, &format!("{name}.mod.0"), emb, emb, true),
            out: Linear::with_scale(layout, &format!("{name}.mod.2"), emb, 3 * channels, true, 0.1),
            channels,
        }
    }

    pub fn forward(&self, layout: &ParamLayout, params: &View, emb: &View) -> Result<ModSaved> {
        let z = self.hidden.forward(layout, params, emb)?;
        let s = silu(&z)?;
        let m = self.out.forward(layout, params, &s.as_view()?)?;
        Ok(ModSaved { z, s, m })
    }

    /// Parameter gradients only: the embedding depends on sigma, never on x.
    pub fn backward_params(
        &self,
        layout: &ParamLayout,
        params: &View,
        emb: &View,
        saved: &ModSaved,
        dm: &View,
        grads: &mut ViewMut,
    ) -> Result<()> {
        let ds = self
            .out
            .backward(layout, params, &saved.s.as_view()?, dm, Some(grads))?;
        let dz = silu_backward(&saved.z, &ds)?;
        self.hidden
            .backward(layout, params, emb, &dz.as_view()?, Some(grads))?;
        Ok(())
    }
}

/// Everything a ResBlock's backward needs.
pub struct ResSaved {
    pub x: Tensor,
    pub modulation: ModSaved,
    pub ln: LnSaved,
    pub c1: Tensor,
    pub d1: Tensor,
    pub c2: Tensor,
    pub mask: Option<DropoutMask>,
}

impl ResSaved {
    pub fn bytes(&self) -> usize {
        [
            &self.x,
            &self.ln.y,
            &self.ln.rstd,
            &self.c1,
            &self.d1,
            &self.c2,
            &self.modulation.m,
        ]
        .iter()
        .map(|t| t.size_in_bytes())
        .sum::<usize>()
            + self.modulation.z.size_in_bytes()
            + self.modulation.s.size_in_bytes()
    }
}

#[derive(Clone, Debug)]
pub struct ResBlock {
    pub modulation: Modulation,
    pub conv1: Conv3x3,
    pub conv2: Conv3x3,
    pub dropout: f32,
}

impl ResBlock {
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
        params: &View,
        x: Tensor,
        emb: &View,
        mode: Mode,
        dropout_offset: u64,
    ) -> Result<(Tensor, ResSaved)> {
        let modulation = self.modulation.forward(layout, params, emb)?;
        let xv = x.as_view()?;
        let mv = modulation.m.as_view()?;
        let ln = modulated_layer_norm(&xv, &mv)?;
        let c1 = self.conv1.forward(layout, params, &ln.y.as_view()?)?;
        let s1 = silu(&c1)?;
        let mask = match mode {
            Mode::Train { rng } if self.dropout > 0.0 => Some(DropoutMask {
                rng,
                offset: dropout_offset,
                p: self.dropout,
            }),
            _ => None,
        };
        let d1 = match &mask {
            Some(mk) => dropout(&s1.as_view()?, mk)?,
            None => s1,
        };
        let c2 = self.conv2.forward(layout, params, &d1.as_view()?)?;
        let out = residual(&xv, &c2.as_view()?, &mv)?;
        drop((xv, mv));
        Ok((
            out,
            ResSaved {
                x,
                modulation,
                ln,
                c1,
                d1,
                c2,
                mask,
            },
        ))
    }

    /// dx; with `grads`, accumulates every parameter gradient of the block.
    pub fn backward(
        &self,
        layout: &ParamLayout,
        params: &View,
        emb: &View,
        saved: &ResSaved,
        dout: &View,
        mut grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        let (x, m) = (saved.x.as_view()?, saved.modulation.m.as_view()?);
        let mut dm = Tensor::uninit(m.shape(), m.dtype(), &m.device())?;
        let (dx_res, dc2) = residual_backward(&x, &saved.c2.as_view()?, &m, dout, &mut dm.as_view_mut()?)?;
        let dd1 = self.conv2.backward(
            layout,
            params,
            &saved.d1.as_view()?,
            &dc2.as_view()?,
            grads.as_deref_mut(),
        )?;
        let ds1 = match &saved.mask {
            Some(mk) => dropout(&dd1.as_view()?, mk)?,
            None => dd1,
        };
        let dc1 = silu_backward(&saved.c1, &ds1)?;
        let dln = self.conv1.backward(
            layout,
            params,
            &saved.ln.y.as_view()?,
            &dc1.as_view()?,
            grads.as_deref_mut(),
        )?;
        let dh0 = layer_norm_backward(&saved.ln, &dln.as_view()?)?;
        let dx_mod = modulate_backward(&x, &m, &dh0.as_view()?, &mut dm.as_view_mut()?)?;
        if let Some(g) = grads {
            self.modulation
                .backward_params(layout, params, emb, &saved.modulation, &dm.as_view()?, g)?;
        }
        add(&dx_res, &dx_mod)
    }
}

/// Everything an AttBlock's backward needs.
pub struct AttBlockSaved {
    pub x: Tensor,
    pub modulation: ModSaved,
    pub ln: LnSaved,
    pub attention: AttSaved,
    pub h: Tensor,
}

impl AttBlockSaved {
    pub fn bytes(&self) -> usize {
        [
            &self.x,
            &self.ln.y,
            &self.ln.rstd,
            &self.h,
            &self.modulation.m,
            &self.modulation.z,
            &self.modulation.s,
        ]
        .iter()
        .map(|t| t.size_in_bytes())
        .sum::<usize>()
            + self.attention.bytes()
    }
}

#[derive(Clone, Debug)]
pub struct AttBlock {
    pub modulation: Modulation,
    pub attention: SelfAttention,
}

impl AttBlock {
    pub fn new(layout: &mut ParamLayout, name: &str, channels: usize, heads: usize, emb: usize) -> Self {
        AttBlock {
            modulation: Modulation::new(layout, name, channels, emb),
            attention: SelfAttention::new(layout, &format!("{name}.attn"), channels, heads),
        }
    }

    pub fn forward(
        &self,
        layout: &ParamLayout,
        params: &View,
        x: Tensor,
        emb: &View,
    ) -> Result<(Tensor, AttBlockSaved)> {
        let modulation = self.modulation.forward(layout, params, emb)?;
        let xv = x.as_view()?;
        let mv = modulation.m.as_view()?;
        let ln = modulated_layer_norm(&xv, &mv)?;
        let (h, attention) = self.attention.forward(layout, params, &ln.y.as_view()?)?;
        let out = residual(&xv, &h.as_view()?, &mv)?;
        drop((xv, mv));
        Ok((
            out,
            AttBlockSaved {
                x,
                modulation,
                ln,
                attention,
                h,
            },
        ))
    }

    pub fn backward(
        &self,
        layout: &ParamLayout,
        params: &View,
        emb: &View,
        saved: &AttBlockSaved,
        dout: &View,
        mut grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        let (x, m) = (saved.x.as_view()?, saved.modulation.m.as_view()?);
        let mut dm = Tensor::uninit(m.shape(), m.dtype(), &m.device())?;
        let (dx_res, dh) = residual_backward(&x, &saved.h.as_view()?, &m, dout, &mut dm.as_view_mut()?)?;
        let dln = self.attention.backward(
            layout,
            params,
            &saved.attention,
            &dh.as_view()?,
            grads.as_deref_mut(),
        )?;
        let dh0 = layer_norm_backward(&saved.ln, &dln.as_view()?)?;
        let dx_mod = modulate_backward(&x, &m, &dh0.as_view()?, &mut dm.as_view_mut()?)?;
        if let Some(g) = grads {
            self.modulation
                .backward_params(layout, params, emb, &saved.modulation, &dm.as_view()?, g)?;
        }
        add(&dx_res, &dx_mod)
    }
}
