//! The paper's U-Net (method.md §3.3), channels-last, configurable by [`UNetConfig`].
//!
//! Descent, level i: Conv3x3 (i = 0: in -> C0; i > 0: stride 2, C(i-1) -> Ci, then LayerNorm),
//! then B_i x [ResBlock, + AttBlock at attention levels]; the level's output is its skip.
//! Ascent, deepest first: at i < L-1, concat(upsampled deeper features, skip_i) and
//! Conv3x3(C(i+1) + Ci -> Ci); at the deepest level the skip is the current tensor. Then B_i
//! blocks; then LayerNorm + nearest x2 upsampling (i > 0) or a final Linear C0 -> out (i = 0).
//! Every block reads the same raw sinusoidal embedding. With `patch` > 1 the input is pixel-
//! unshuffled first and the output shuffled back (the MRI network's 4x4 patchify).

use std::fmt::Write as _;

use super::blocks::{AttBlock, AttCore, BankSaved, Modulation, ModulationBank, ResBlock, ResCore};
use super::conv::{samples_per_chunk, Conv3x3, ConvGeometry};
use super::linear::Linear;
use super::norm::{layer_norm_backward, layer_norm_backward_operand, layer_norm_kept};
use super::params::ParamLayout;
use super::params::Weights;
use super::resample::{
    concat_channels, pixel_shuffle, pixel_unshuffle, split_channels, upsample2x, upsample2x_backward,
    upsample_concat_bf16,
};
use super::{LnSaved, Mode};
use crate::device::{size_class, PoolStats};
use crate::error::{Error, Result};
use crate::ops::axpy;
use crate::ops::precision::{Bf16Ref, Operand, Precision};
use crate::tensor::{AsView, AsViewMut, Tensor, View, ViewMut};

/// The architecture: everything that changes the parameter layout or the shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    /// Image channels (before patchify).
    pub in_channels: usize,
    /// Output channels (before un-patchifying).
    pub out_channels: usize,
    /// Channels per level, C0 .. C(L-1).
    pub channels: Vec<usize>,
    /// Blocks per level, B0 .. B(L-1).
    pub blocks: Vec<usize>,
    /// (level, heads) for the levels with attention.
    pub attention: Vec<(usize, usize)>,
    /// Width of the sinusoidal embedding.
    pub emb: usize,
    /// Dropout probability inside every ResBlock (Train mode only).
    pub dropout: f32,
    /// Pixel-unshuffle factor (1 = none, 4 for the MRI network).
    pub patch: usize,
    /// Image height and width the network is used at (for shapes and memory accounting).
    pub resolution: (usize, usize),
}

impl UNetConfig {
    /// CIFAR-10: 32x32x3, C = (128, 256, 384), 5 blocks per level, 4 heads at 16x16.
    pub fn cifar10() -> Self {
        UNetConfig {
            in_channels: 3,
            out_channels: 3,
            channels: vec![128, 256, 384],
            blocks: vec![5, 5, 5],
            attention: vec![(1, 4)],
            emb: 256,
            dropout: 0.1,
            patch: 1,
            resolution: (32, 32),
        }
    }

    /// Accelerated MRI: 320x320x1 patchified 4x4 to 80x80x16, C = (128, 256, 384, 512),
    /// 3 blocks per level, 4 heads at 10x10.
    pub fn mri() -> Self {
        UNetConfig {
            in_channels: 1,
            out_channels: 1,
            channels: vec![128, 256, 384, 512],
            blocks: vec![3, 3, 3, 3],
            attention: vec![(3, 4)],
            emb: 256,
            dropout: 0.1,
            patch: 4,
            resolution: (320, 320),
        }
    }

    /// The number of attention heads at `level`, or None where it has no attention.
    pub fn heads_at(&self, level: usize) -> Option<usize> {
        self.attention.iter().find(|(l, _)| *l == level).map(|&(_, h)| h)
    }

    fn validate(&self) -> Result<()> {
        let l = self.channels.len();
        let bad = |why: String| Err(Error::Other(format!("invalid U-Net config: {why}")));
        if l == 0 || self.blocks.len() != l {
            return bad(format!(
                "{} channel widths but {} block counts",
                l,
                self.blocks.len()
            ));
        }
        if self.patch == 0 || self.emb < 4 || self.emb % 2 != 0 {
            return bad("patch must be >= 1 and the embedding even and >= 4".into());
        }
        for &(level, heads) in &self.attention {
            if level >= l || heads == 0 || self.channels[level] % heads != 0 {
                return bad(format!("attention at level {level} with {heads} heads"));
            }
        }
        let (h, w) = self.resolution;
        let factor = self.patch << (l - 1);
        if h % factor != 0 || w % factor != 0 {
            return bad(format!("resolution {h}x{w} must be divisible by {factor}"));
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum BlockKind {
    Res(ResBlock),
    Att(AttBlock),
}

#[derive(Clone, Debug)]
struct Block {
    kind: BlockKind,
    /// Its modulation's place in the network's [`ModulationBank`].
    slot: usize,
}

impl Block {
    fn modulation(&self) -> &Modulation {
        match &self.kind {
            BlockKind::Res(r) => &r.modulation,
            BlockKind::Att(a) => &a.modulation,
        }
    }
}

enum Core {
    Res(Box<ResCore>),
    Att(Box<AttCore>),
}

/// One block's saved state. Its modulation lives in the bank's state, and its input is the
/// previous block's output, kept here once (no block keeps its own output).
struct BlockSaved {
    /// The block's input; None where it is the level's skip (the deepest level's ascent starts
    /// from its own descent output), which the descent keeps.
    x: Option<Tensor>,
    core: Core,
}

impl BlockSaved {
    fn bytes(&self) -> usize {
        self.x.as_ref().map_or(0, Tensor::size_in_bytes)
            + match &self.core {
                Core::Res(c) => c.bytes(),
                Core::Att(c) => c.bytes(),
            }
    }
}

#[derive(Clone, Debug)]
struct Level {
    input: Conv3x3,
    down: Vec<Block>,
    /// Conv3x3(C(i+1) + Ci -> Ci) after the concatenation; None at the deepest level.
    merge: Option<Conv3x3>,
    up: Vec<Block>,
}

/// The paper's U-Net F(x, emb): x `[N, H, W, in]` and the embedding `[N, E]` to
/// `[N, H, W, out]`, built from a [`UNetConfig`], every parameter in one flat [`ParamLayout`].
/// `forward` returns the saved activations; `backward` is a VJP, or with a gradient buffer
/// also accumulates every parameter gradient.
///
/// ```
/// use emprior::nn::{embedding::sinusoidal_embedding, Mode, UNet, UNetConfig, Weights};
/// use emprior::{AsView, DType, Device, Tensor};
///
/// // A tiny two-level U-Net on 8x8 grayscale images, attention at the 4x4 level.
/// let net = UNet::new(UNetConfig {
///     in_channels: 1,
///     out_channels: 1,
///     channels: vec![8, 16],
///     blocks: vec![1, 1],
///     attention: vec![(1, 2)],
///     emb: 16,
///     dropout: 0.0,
///     patch: 1,
///     resolution: (8, 8),
/// })?;
/// assert_eq!(net.layout.len(), 22_465);
/// let params = net.layout.init(0, DType::F32, &Device::Cpu)?;
/// let x = Tensor::zeros(&[2, 8, 8, 1], DType::F32, &Device::Cpu)?;
/// let c_noise = Tensor::from_f32(&[-1.0, 0.5], &[2], &Device::Cpu)?; // ln sigma per sample
/// let emb = sinusoidal_embedding(&c_noise.as_view()?, 16)?;
/// // The flat parameters as the layers read them (no bf16 copy: this network runs in f32).
/// let weights = Weights::from(params.as_view()?);
/// let (y, saved) = net.forward(&weights, &x.as_view()?, &emb.as_view()?, Mode::Eval)?;
/// assert_eq!(y.shape(), [2, 8, 8, 1]);
/// // A VJP (no parameter gradients): the saved state serves any number of them.
/// let dx = net.backward(&weights, &emb.as_view()?, &saved, &y.as_view()?, None)?;
/// assert_eq!(dx.shape(), [2, 8, 8, 1]);
/// # Ok::<(), emprior::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct UNet {
    /// The architecture it was built from.
    pub config: UNetConfig,
    /// Names, shapes and offsets of every parameter (`down.{i}.*`, `up.{i}.*`, `out.*`).
    pub layout: ParamLayout,
    levels: Vec<Level>,
    out: Linear,
    bank: ModulationBank,
}

/// Per level of the descent: LayerNorm 1/std after the strided conv (levels > 0; its output is
/// the first block's saved input), the blocks, and the level's output (the skip).
struct DownSaved {
    ln_rstd: Option<Tensor>,
    blocks: Vec<BlockSaved>,
    skip: Tensor,
}

/// Per level of the ascent: the blocks, and the final LayerNorm (levels > 0, output kept for
/// the backward) or the final Linear's input (level 0). The merge conv's input, the
/// concatenation of the upsampled LayerNorm output below and the skip, is not kept: both halves
/// are kept already, and only the parameter gradient reads it (a VJP needs its shape alone).
struct UpSaved {
    blocks: Vec<BlockSaved>,
    ln: Option<LnSaved>,
    head_input: Option<Tensor>,
}

/// Everything the U-Net's backward needs, from one forward.
pub struct UNetSaved {
    input: Tensor,
    /// Boxed: it keeps the saved state small beside the MLP's in an enum.
    modulation: Box<BankSaved>,
    down: Vec<DownSaved>,
    /// Ascent levels in forward order (deepest first).
    up: Vec<UpSaved>,
    batch: usize,
}

impl UNetSaved {
    /// Bytes held for the backward: what one forward keeps for any number of VJPs.
    pub fn bytes(&self) -> usize {
        let mut b = self.input.size_in_bytes() + self.modulation.bytes();
        for d in &self.down {
            b += d.ln_rstd.as_ref().map_or(0, |t| t.size_in_bytes()) + d.skip.size_in_bytes();
            b += d.blocks.iter().map(BlockSaved::bytes).sum::<usize>();
        }
        for u in &self.up {
            b += u.blocks.iter().map(BlockSaved::bytes).sum::<usize>();
            b +=
                u.ln.as_ref()
                    .map_or(0, |l| l.y.size_in_bytes() + l.rstd.size_in_bytes());
            b += u.head_input.as_ref().map_or(0, |t| t.size_in_bytes());
        }
        b
    }
}

/// Each ResBlock draws dropout from its own range of the stream.
const DROPOUT_STRIDE: u64 = 1 << 40;

impl UNet {
    /// Builds the network and its parameter layout. Errors when the config is inconsistent:
    /// block counts not matching the widths, heads not dividing a level's channels, a resolution
    /// not divisible by `patch * 2^(L-1)`, or an odd or narrower than 4 embedding.
    pub fn new(config: UNetConfig) -> Result<Self> {
        config.validate()?;
        let mut layout = ParamLayout::new();
        let (c, e, p) = (&config.channels, config.emb, config.patch);
        let in_ch = config.in_channels * p * p;
        let blocks = |layout: &mut ParamLayout, name: &str, i: usize| -> Vec<Block> {
            let mut v = Vec::new();
            for j in 0..config.blocks[i] {
                let res = ResBlock::new(layout, &format!("{name}.{j}.res"), c[i], e, config.dropout);
                v.push(Block {
                    kind: BlockKind::Res(res),
                    slot: 0,
                });
                if let Some(heads) = config.heads_at(i) {
                    let att = AttBlock::new(layout, &format!("{name}.{j}.att"), c[i], heads, e);
                    v.push(Block {
                        kind: BlockKind::Att(att),
                        slot: 0,
                    });
                }
            }
            v
        };
        let mut levels = Vec::new();
        for i in 0..c.len() {
            let input = if i == 0 {
                Conv3x3::new(&mut layout, "down.0.conv", in_ch, c[0], 1)
            } else {
                Conv3x3::new(&mut layout, &format!("down.{i}.conv"), c[i - 1], c[i], 2)
            };
            let down = blocks(&mut layout, &format!("down.{i}"), i);
            levels.push(Level {
                input,
                down,
                merge: None,
                up: Vec::new(),
            });
        }
        for i in (0..c.len()).rev() {
            if i + 1 < c.len() {
                levels[i].merge = Some(Conv3x3::new(
                    &mut layout,
                    &format!("up.{i}.conv"),
                    c[i + 1] + c[i],
                    c[i],
                    1,
                ));
            }
            levels[i].up = blocks(&mut layout, &format!("up.{i}"), i);
        }
        let out = Linear::new(&mut layout, "out", c[0], config.out_channels * p * p, true);
        // Bank slots level by level (one width each), and within a level ResBlocks then
        // AttBlocks of the descent, then of the ascent: equally spaced in the parameters, so
        // each such run of weights is gathered by one strided copy.
        let mut order = Vec::new();
        for (i, level) in levels.iter().enumerate() {
            for (dir, blocks) in [(0, &level.down), (1, &level.up)] {
                for att in [false, true] {
                    for (k, b) in blocks.iter().enumerate() {
                        if matches!(b.kind, BlockKind::Att(_)) == att {
                            order.push((i, dir, k));
                        }
                    }
                }
            }
        }
        let mut mods = Vec::with_capacity(order.len());
        for &(i, dir, k) in &order {
            let blocks = if dir == 0 { &levels[i].down } else { &levels[i].up };
            mods.push(blocks[k].modulation());
        }
        let bank = ModulationBank::new(&layout, &mods)?;
        for (slot, &(i, dir, k)) in order.iter().enumerate() {
            let blocks = if dir == 0 {
                &mut levels[i].down
            } else {
                &mut levels[i].up
            };
            blocks[k].slot = slot;
        }
        Ok(UNet {
            config,
            layout,
            levels,
            out,
            bank,
        })
    }

    /// Runs `blocks` from `input` (owned, or the skip it starts from); returns the output and
    /// each block's saved state.
    #[allow(clippy::too_many_arguments)]
    fn run_blocks(
        &self,
        blocks: &[Block],
        params: &Weights,
        input: Option<Tensor>,
        skip: Option<&Operand>,
        modulation: &BankSaved,
        mode: Mode,
        counter: &mut u64,
        keep_last: bool,
    ) -> Result<(Tensor, Vec<BlockSaved>)> {
        let mut saved = Vec::with_capacity(blocks.len());
        let mut cur = input;
        let all_m = modulation.m.as_view()?;
        let n = modulation.batch();
        for (k, b) in blocks.iter().enumerate() {
            let m = self.bank.slot(&all_m, n, b.slot)?;
            // The next block's saved input (bf16 under the bf16 policy, written so by the
            // residual kernel); the last output is kept only when the caller keeps it (the skip,
            // the head's input).
            let kept = keep_last || k + 1 < blocks.len();
            let (out, core) = {
                let x = match (&cur, skip) {
                    (Some(t), _) => Operand::of(t)?,
                    (None, Some(v)) => v.clone(),
                    (None, None) => unreachable!("blocks start from a tensor or the skip"),
                };
                match &b.kind {
                    BlockKind::Res(r) => {
                        *counter += 1;
                        let offset = *counter * DROPOUT_STRIDE;
                        let (o, c) = r.forward_modulated(&self.layout, params, &x, &m, mode, offset, kept)?;
                        (o, Core::Res(Box::new(c)))
                    }
                    BlockKind::Att(a) => {
                        let (o, c) = a.forward_modulated(&self.layout, params, &x, &m, kept)?;
                        (o, Core::Att(Box::new(c)))
                    }
                }
            };
            saved.push(BlockSaved { x: cur.take(), core });
            cur = Some(out);
        }
        match (cur, skip) {
            (Some(out), _) => Ok((out, saved)),
            (None, Some(v)) => Ok((v.to_tensor()?, saved)),
            (None, None) => unreachable!("blocks start from a tensor or the skip"),
        }
    }

    /// The blocks' backward; each block's modulation gradient goes to its slot of `dm`.
    #[allow(clippy::too_many_arguments)]
    fn back_blocks(
        &self,
        blocks: &[Block],
        saved: &[BlockSaved],
        skip: Option<&Operand>,
        params: &Weights,
        modulation: &BankSaved,
        dm: &mut Tensor,
        mut d: Tensor,
        grads: &mut Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        let (all_m, n) = (modulation.m.as_view()?, modulation.batch());
        let mut all_dm = dm.as_view_mut()?;
        for (b, s) in blocks.iter().zip(saved).rev() {
            let m = self.bank.slot(&all_m, n, b.slot)?;
            let mut dmb = self.bank.slot_mut(&mut all_dm, n, b.slot)?;
            let x = match (&s.x, skip) {
                (Some(t), _) => Operand::of(t)?,
                (None, Some(v)) => v.clone(),
                (None, None) => unreachable!("a block without its input starts from the skip"),
            };
            let (l, p, g) = (&self.layout, params, grads.as_deref_mut());
            d = match (&b.kind, &s.core) {
                (BlockKind::Res(r), Core::Res(c)) => r.backward_modulated(l, p, &x, &m, c, d, &mut dmb, g)?,
                (BlockKind::Att(a), Core::Att(c)) => a.backward_modulated(l, p, &x, &m, c, d, &mut dmb, g)?,
                _ => unreachable!("saved state follows the block list"),
            };
        }
        Ok(d)
    }

    /// y = UNet(x, emb): x [N, H, W, in], emb [N, E] -> y [N, H, W, out].
    pub fn forward(&self, params: &Weights, x: &View, emb: &View, mode: Mode) -> Result<(Tensor, UNetSaved)> {
        let cfg = &self.config;
        let n = match *x.shape() {
            [n, h, w, c]
                if c == cfg.in_channels
                    && h % (cfg.patch << (cfg.channels.len() - 1)) == 0
                    && w % (cfg.patch << (cfg.channels.len() - 1)) == 0 =>
            {
                n
            }
            _ => {
                return Err(Error::shape(
                    "unet",
                    "input",
                    format!(
                        "[N, H, W, {}] with H, W divisible by {}",
                        cfg.in_channels,
                        cfg.patch << (cfg.channels.len() - 1)
                    ),
                    x.shape(),
                ))
            }
        };
        if emb.shape() != [n, cfg.emb] {
            return Err(Error::shape("unet", "embedding", [n, cfg.emb], emb.shape()));
        }
        let input = if cfg.patch > 1 {
            pixel_unshuffle(x, cfg.patch)?
        } else {
            x.to_tensor()?
        };
        let modulation = Box::new(self.bank.forward(params, emb)?);
        // Under the bf16 policy every activation kept for the backward is rounded to bf16 as it
        // is kept, and the forward goes on from the rounded values (`ops::precision::keep`).
        let p = self.layout.precision();
        let mut counter = 0u64;
        let mut down: Vec<DownSaved> = Vec::new();
        for (i, level) in self.levels.iter().enumerate() {
            let conv_in = if i == 0 {
                Operand::of(&input)?
            } else {
                Operand::of(&down[i - 1].skip)?
            };
            let (h, ln_rstd) = if i == 0 {
                (level.input.forward_kept(&self.layout, params, &conv_in)?, None)
            } else {
                let c = level.input.forward_operand(&self.layout, params, &conv_in)?;
                let ln = layer_norm_kept(&c.as_view()?, p)?;
                drop(c); // else it would live through the level (a conditional move)
                (ln.y, Some(ln.rstd))
            };
            let (skip, blocks) = self.run_blocks(
                &level.down,
                params,
                Some(h),
                None,
                &modulation,
                mode,
                &mut counter,
                true,
            )?;
            down.push(DownSaved {
                ln_rstd,
                blocks,
                skip,
            });
        }
        let last = self.levels.len() - 1;
        let mut up: Vec<UpSaved> = Vec::new();
        let mut carry: Option<Tensor> = None; // upsampled features from the level below
        let mut y = None;
        for i in (0..=last).rev() {
            let level = &self.levels[i];
            let skip = Operand::of(&down[i].skip)?;
            let h = match (&level.merge, carry.take()) {
                // Under bf16 the input is built from the kept values in bf16, in one pass.
                (Some(conv), None) if p == Precision::Bf16 => {
                    let below = up.last().and_then(|u| u.ln.as_ref());
                    let below = below.expect("levels > 0 end in LayerNorm");
                    let cat = self.merge_input(&below.y, &down[i].skip)?;
                    Some(conv.forward_kept(&self.layout, params, &Operand::of(&cat)?)?)
                }
                (Some(conv), Some(upsampled)) => {
                    let cat = concat_channels(&upsampled.as_view()?, &skip.widen()?.view()?)?;
                    drop(upsampled);
                    let h = conv.forward_kept(&self.layout, params, &Operand::F32(cat.as_view()?))?;
                    drop(cat);
                    Some(h)
                }
                // The deepest level continues from its own output.
                _ => None,
            };
            // Levels above 0 end in a LayerNorm: their last block's output is not kept.
            let (h, blocks) = self.run_blocks(
                &level.up,
                params,
                h,
                Some(&skip),
                &modulation,
                mode,
                &mut counter,
                i == 0,
            )?;
            if i > 0 {
                let ln = layer_norm_kept(&Operand::of(&h)?.widen()?.view()?, p)?;
                drop(h);
                if p != Precision::Bf16 {
                    carry = Some(upsample2x(&ln.y.as_view()?)?);
                }
                up.push(UpSaved {
                    blocks,
                    ln: Some(ln),
                    head_input: None,
                });
            } else {
                y = Some(
                    self.out
                        .forward_operand(&self.layout, params, &Operand::of(&h)?)?,
                );
                up.push(UpSaved {
                    blocks,
                    ln: None,
                    head_input: Some(h),
                });
            }
        }
        let y = y.expect("level 0 produces the output");
        let y = if cfg.patch > 1 {
            pixel_shuffle(&y.as_view()?, cfg.patch)?
        } else {
            y
        };
        Ok((
            y,
            UNetSaved {
                input,
                modulation,
                down,
                up,
                batch: n,
            },
        ))
    }

    /// The merge convolution's input under the bf16 policy: the level below's kept LayerNorm
    /// output upsampled and concatenated with the kept skip, in bf16 (one pass, the same
    /// values as in f32).
    fn merge_input(&self, below_y: &Tensor, skip: &Tensor) -> Result<Tensor> {
        upsample_concat_bf16(&Bf16Ref::new(below_y), &Bf16Ref::new(skip))
    }

    /// dx for dy (a VJP when `grads` is None; with `grads`, every parameter gradient too).
    pub fn backward(
        &self,
        params: &Weights,
        emb: &View,
        saved: &UNetSaved,
        dy: &View,
        mut grads: Option<&mut ViewMut>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let last = self.levels.len() - 1;
        let mut dy = Some(if cfg.patch > 1 {
            pixel_unshuffle(dy, cfg.patch)?
        } else {
            dy.to_tensor()?
        });
        // Every block's modulation gradient, in the bank's layout (a VJP discards it).
        let mut dm = Tensor::uninit(
            saved.modulation.m.shape(),
            saved.modulation.m.dtype(),
            &saved.modulation.m.device(),
        )?;
        let mut dskip: Vec<Option<Tensor>> = (0..=last).map(|_| None).collect();
        // Sums in place (the same rounding as a new sum, one tensor fewer).
        let accumulate = |slot: &mut Option<Tensor>, g: Tensor| -> Result<()> {
            match slot {
                Some(prev) => axpy(1.0, &g, prev),
                None => {
                    *slot = Some(g);
                    Ok(())
                }
            }
        };
        // Ascent, in reverse: level 0 first.
        let mut d_carry: Option<Tensor> = None;
        for (i, level) in self.levels.iter().enumerate() {
            let s = &saved.up[last - i];
            let skip = Operand::of(&saved.down[i].skip)?;
            let d = if i == 0 {
                let head = s.head_input.as_ref().expect("level 0 keeps the head input");
                let dy = dy.take().expect("one head");
                self.out.backward_operand(
                    &self.layout,
                    params,
                    &Operand::of(head)?,
                    &dy.as_view()?,
                    grads.as_deref_mut(),
                )?
            } else {
                let d_up = d_carry.take().expect("the level above passes its gradient down");
                let d_y = upsample2x_backward(&d_up.as_view()?)?;
                drop(d_up);
                layer_norm_backward(
                    s.ln.as_ref().expect("levels > 0 end in LayerNorm"),
                    &d_y.as_view()?,
                )?
            };
            let d = self.back_blocks(
                &level.up,
                &s.blocks,
                Some(&skip),
                params,
                &saved.modulation,
                &mut dm,
                d,
                &mut grads,
            )?;
            match &level.merge {
                Some(conv) => {
                    let c_up = cfg.channels[i + 1];
                    let below = saved.up[last - i - 1]
                        .ln
                        .as_ref()
                        .expect("levels > 0 end in LayerNorm");
                    let mut cat_shape = skip.shape().to_vec();
                    cat_shape[3] += c_up;
                    // Under bf16, d rounded once for the two passes (the input is rebuilt between).
                    let db = conv.dy_bf16(&self.layout, &cat_shape, &d.as_view()?)?;
                    if let Some(g) = grads.as_deref_mut() {
                        // The forward's concatenation, rebuilt from what it was made of.
                        if self.layout.precision() == Precision::Bf16 {
                            let cat = self.merge_input(&below.y, &saved.down[i].skip)?;
                            let cat = Operand::of(&cat)?;
                            conv.param_grads_with(&self.layout, &cat, &d.as_view()?, db.as_ref(), g)?;
                        } else {
                            let upsampled = upsample2x(&below.y.as_view()?)?;
                            let cat = concat_channels(&upsampled.as_view()?, &skip.widen()?.view()?)?;
                            drop(upsampled);
                            conv.param_grads(&self.layout, &cat.as_view()?, &d.as_view()?, g)?;
                        }
                    }
                    let d_cat = conv.backward_input_with(
                        &self.layout,
                        params,
                        &cat_shape,
                        &d.as_view()?,
                        db.as_ref(),
                    )?;
                    drop((d, db));
                    let (d_up, d_skip) = split_channels(&d_cat.as_view()?, c_up)?;
                    accumulate(&mut dskip[i], d_skip)?;
                    d_carry = Some(d_up);
                }
                None => accumulate(&mut dskip[i], d)?,
            }
        }
        // Descent, in reverse: deepest first.
        let mut dx = None;
        for i in (0..=last).rev() {
            let s = &saved.down[i];
            let level = &self.levels[i];
            let d = dskip[i].take().expect("every skip receives a gradient");
            let d = self.back_blocks(
                &level.down,
                &s.blocks,
                None,
                params,
                &saved.modulation,
                &mut dm,
                d,
                &mut grads,
            )?;
            let d = match &s.ln_rstd {
                Some(rstd) => {
                    // The LayerNorm's output is the first block's input (or, without blocks, the
                    // skip itself).
                    let y = match s.blocks.first().and_then(|b| b.x.as_ref()) {
                        Some(t) => Operand::of(t)?,
                        None => Operand::of(&s.skip)?,
                    };
                    let dn = layer_norm_backward_operand(&y, &rstd.as_view()?, &d.as_view()?)?;
                    drop(d); // else it would live through the conv's backward
                    dn
                }
                None => d,
            };
            let conv_in = if i == 0 {
                Operand::of(&saved.input)?
            } else {
                Operand::of(&saved.down[i - 1].skip)?
            };
            let d_in = level.input.backward_operand(
                &self.layout,
                params,
                &conv_in,
                &d.as_view()?,
                grads.as_deref_mut(),
            )?;
            if i == 0 {
                dx = Some(d_in);
            } else {
                accumulate(&mut dskip[i - 1], d_in)?;
            }
        }
        if let Some(g) = grads {
            self.bank
                .backward_params(params, emb, &saved.modulation, &dm.as_view()?, g)?;
        }
        let dx = dx.expect("level 0 yields the input gradient");
        debug_assert_eq!(dx.shape()[0], saved.batch);
        if cfg.patch > 1 {
            pixel_shuffle(&dx.as_view()?, cfg.patch)
        } else {
            Ok(dx)
        }
    }

    /// Multiply-adds of one forward for one image at the configured resolution: every GEMM-shaped
    /// product (convolutions, linears, the modulation MLPs, attention's q k^T and p v); the
    /// elementwise work is not counted. FLOPs are twice this.
    pub fn forward_macs(&self) -> u64 {
        let cfg = &self.config;
        let (c, e) = (&cfg.channels, cfg.emb as u64);
        let (h0, w0) = (
            (cfg.resolution.0 / cfg.patch) as u64,
            (cfg.resolution.1 / cfg.patch) as u64,
        );
        let pixels = |i: usize| (h0 >> i) * (w0 >> i);
        let conv = |cin: usize, cout: usize, i: usize| 9 * cin as u64 * cout as u64 * pixels(i);
        let modulation = |ch: usize| e * e + e * 3 * ch as u64;
        let blocks = |i: usize| -> u64 {
            let ch = c[i] as u64;
            let res = 2 * conv(c[i], c[i], i) + modulation(c[i]);
            let att = cfg.heads_at(i).map_or(0, |_| {
                let t = pixels(i);
                4 * ch * ch * t + 2 * t * t * ch + modulation(c[i])
            });
            cfg.blocks[i] as u64 * (res + att)
        };
        let mut macs = conv(cfg.in_channels * cfg.patch * cfg.patch, c[0], 0);
        for i in 0..c.len() {
            if i > 0 {
                macs += conv(c[i - 1], c[i], i);
            }
            macs += 2 * blocks(i);
            if i + 1 < c.len() {
                macs += conv(c[i] + c[i + 1], c[i], i);
            }
        }
        macs + c[0] as u64 * (cfg.out_channels * cfg.patch * cfg.patch) as u64 * pixels(0)
    }

    /// A human-readable summary: levels, blocks, shapes and parameter counts.
    pub fn describe(&self) -> String {
        let cfg = &self.config;
        let (h0, w0) = (cfg.resolution.0 / cfg.patch, cfg.resolution.1 / cfg.patch);
        let mut s = String::new();
        let count = |prefix: &str| -> usize {
            self.layout
                .specs()
                .iter()
                .filter(|p| p.name.starts_with(prefix))
                .map(|p| p.shape.iter().product::<usize>())
                .sum()
        };
        let _ = writeln!(
            s,
            "U-Net: input {}x{}x{}{}, embedding {}, dropout {}",
            cfg.resolution.0,
            cfg.resolution.1,
            cfg.in_channels,
            if cfg.patch > 1 {
                format!(
                    " (patchified {p}x{p} to {h0}x{w0}x{})",
                    cfg.in_channels * cfg.patch * cfg.patch,
                    p = cfg.patch
                )
            } else {
                String::new()
            },
            cfg.emb,
            cfg.dropout
        );
        for (i, &c) in cfg.channels.iter().enumerate() {
            let att = cfg.heads_at(i).map_or(String::new(), |hd| {
                format!(" + AttBlock({hd} heads x {})", c / hd)
            });
            let _ = writeln!(
                s,
                "  level {i}: {}x{}x{c}, {} x [ResBlock{att}]; params descent {} / ascent {}",
                h0 >> i,
                w0 >> i,
                cfg.blocks[i],
                fmt_count(count(&format!("down.{i}."))),
                fmt_count(count(&format!("up.{i}.")))
            );
        }
        let _ = writeln!(
            s,
            "  head: Linear({} -> {})",
            cfg.channels[0],
            cfg.out_channels * cfg.patch * cfg.patch
        );
        s
    }
}

/// Activation memory of one U-Net call at a batch size, in bytes at the layout's precision (under
/// bf16 the kept activations are bf16, and the casts to bf16 operands are counted): what the
/// forward keeps and the most that is live at once in each phase. Worked out by following the allocations and
/// frees of `forward` and `backward`, in their order, on a simulated allocator (each is one pool
/// buffer on the GPU, before size-class rounding; CPU-only scratch inside an op is not counted).
/// tests/memory_peak.rs holds it to the allocations of a real run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActivationMemory {
    /// Kept by one forward for any number of backwards (`UNetSaved::bytes`).
    pub saved: u64,
    /// The most live during the forward: what it has kept so far plus an op's transients.
    pub forward_peak: u64,
    /// The most live during a backward with parameter gradients: `saved` plus transients.
    pub backward_peak: u64,
    /// The same for a VJP (no parameter gradients).
    pub vjp_peak: u64,
}

/// A simulated allocator: live bytes and their peak, as requested or rounded to the GPU pool's
/// size classes, and the requests in order (for [`PoolStats::replay`]). A tensor is named by
/// its byte count.
#[derive(Default)]
struct Tally {
    pooled: bool,
    live: u64,
    peak: u64,
    /// (bytes, handed out or back), in order.
    events: Vec<(usize, bool)>,
    /// Byte counts of the tensors out, to hand them all back at the end.
    out: std::collections::BTreeMap<u64, u64>,
}

impl Tally {
    fn held(&self, bytes: u64) -> u64 {
        if self.pooled {
            size_class(bytes as usize) as u64
        } else {
            bytes
        }
    }

    fn alloc(&mut self, bytes: u64) -> u64 {
        self.live += self.held(bytes);
        if self.live > self.peak && std::env::var("WALKDBG").is_ok() {
            eprintln!(
                "peak {} at alloc {} ev {} bt {}",
                self.live,
                bytes,
                self.events.len(),
                std::backtrace::Backtrace::force_capture()
            );
        }
        self.peak = self.peak.max(self.live);
        self.events.push((bytes as usize, true));
        *self.out.entry(bytes).or_default() += 1;
        bytes
    }

    fn free(&mut self, bytes: u64) {
        self.live -= self.held(bytes);
        self.events.push((bytes as usize, false));
        let count = self.out.get_mut(&bytes).expect("freeing a tensor that is out");
        *count -= 1;
        if *count == 0 {
            self.out.remove(&bytes);
        }
    }

    /// Hands back everything still out (the end of a step).
    fn free_all(&mut self) {
        for (bytes, count) in std::mem::take(&mut self.out) {
            for _ in 0..count {
                self.live -= self.held(bytes);
                self.events.push((bytes as usize, false));
            }
        }
    }
}

/// The walk: shapes of one batch through `forward` and `backward`, on the GPU path (the bf16
/// policy's casts, implicit-GEMM convolutions and split weight-gradient partials included;
/// a CPU twin's own scratch is not).
struct Walk<'a> {
    net: &'a UNet,
    n: u64,
    t: Tally,
    /// Dropout active (Train mode with p > 0): conv2's input is a second tensor.
    dropout: bool,
    /// The bf16 policy: kept activations in bf16, layers on bf16 operands where they can.
    bf16: bool,
}

impl Walk<'_> {
    fn pixels(&self, i: usize) -> u64 {
        let (h, w) = self.dims(i);
        h * w
    }

    fn dims(&self, i: usize) -> (u64, u64) {
        let cfg = &self.net.config;
        let (h, w) = (cfg.resolution.0 / cfg.patch, cfg.resolution.1 / cfg.patch);
        ((h >> i) as u64, (w >> i) as u64)
    }

    fn c(&self, i: usize) -> u64 {
        self.net.config.channels[i] as u64
    }

    /// Elements of one activation of level i.
    fn act(&self, i: usize) -> u64 {
        self.n * self.pixels(i) * self.c(i)
    }

    fn image_in(&self) -> u64 {
        let cfg = &self.net.config;
        self.n * self.pixels(0) * (cfg.in_channels * cfg.patch * cfg.patch) as u64
    }

    fn image_out(&self) -> u64 {
        let cfg = &self.net.config;
        self.n * self.pixels(0) * (cfg.out_channels * cfg.patch * cfg.patch) as u64
    }

    /// An f32 tensor of `elems`.
    fn f32(&mut self, elems: u64) -> u64 {
        self.t.alloc(4 * elems)
    }

    /// A bf16 tensor of `elems`.
    fn half(&mut self, elems: u64) -> u64 {
        self.t.alloc(2 * elems)
    }

    fn free(&mut self, t: u64) {
        self.t.free(t)
    }

    /// `ops::precision::keep`: under bf16 the f32 tensor `t` of `elems` becomes a bf16 one.
    fn keep(&mut self, t: u64, elems: u64) -> u64 {
        if self.bf16 {
            let k = self.half(elems);
            self.free(t);
            k
        } else {
            t
        }
    }

    /// A kept activation of `elems` written in its kept type by the op that makes it.
    fn keep_new(&mut self, elems: u64) -> u64 {
        if self.bf16 {
            self.half(elems)
        } else {
            self.f32(elems)
        }
    }

    /// `Operand::widen` of a kept activation: an f32 copy under bf16, nothing under f32.
    fn widen(&mut self, elems: u64) -> Option<u64> {
        self.bf16.then(|| self.f32(elems))
    }

    fn unwiden(&mut self, w: Option<u64>) {
        if let Some(w) = w {
            self.free(w)
        }
    }

    /// True when a layer of these widths runs on the tensor cores (bf16 operands).
    fn tc(&self, a: u64, b: u64) -> bool {
        self.bf16 && a % 8 == 0 && b % 8 == 0
    }

    /// Column elements of each chunk of samples an f32 convolution builds in turn.
    fn column_chunks(&self, g: &ConvGeometry) -> Vec<u64> {
        let per = (g.oh * g.ow) as u64 * 9 * g.cin as u64;
        let k = samples_per_chunk(4 * per as usize) as u64;
        (0..self.n)
            .step_by(k as usize)
            .map(|s| k.min(self.n - s) * per)
            .collect()
    }

    /// Each chunk's f32 columns, built and dropped in turn.
    fn columns(&mut self, g: &ConvGeometry) {
        for col in self.column_chunks(g) {
            let c = self.f32(col);
            self.free(c);
        }
    }

    fn in_elems(g: &ConvGeometry) -> u64 {
        (g.n * g.h * g.w * g.cin) as u64
    }

    fn out_elems(g: &ConvGeometry, cout: u64) -> u64 {
        (g.n * g.oh * g.ow) as u64 * cout
    }

    /// A bf16 copy of an f32 operand (none for a kept one), which goes. The weight is read from
    /// the bf16 copy of the parameters that training and sampling keep (`nn::Weights`), outside
    /// the activations.
    fn narrow_operands(&mut self, x: Option<u64>) {
        if let Some(xb) = x.map(|e| self.half(e)) {
            self.free(xb);
        }
    }

    /// Conv3x3 forward: the output, then the bf16 casts or each chunk's columns.
    fn conv(&mut self, g: ConvGeometry, cout: u64, x_kept: bool) -> u64 {
        let x = Self::in_elems(&g);
        let y = self.f32(Self::out_elems(&g, cout));
        if self.tc(g.cin as u64, cout) {
            self.narrow_operands((!x_kept).then_some(x));
        } else {
            let xw = if x_kept { self.widen(x) } else { None };
            self.columns(&g);
            self.unwiden(xw);
        }
        y
    }

    /// Conv3x3 forward to a kept output (`Conv3x3::forward_kept`): on the tensor cores written
    /// in bf16 by the epilogue, else kept from the f32 output.
    fn conv_kept(&mut self, g: ConvGeometry, cout: u64, x_kept: bool) -> u64 {
        if self.tc(g.cin as u64, cout) {
            let y = self.half(Self::out_elems(&g, cout));
            self.narrow_operands((!x_kept).then_some(Self::in_elems(&g)));
            y
        } else {
            let y = self.conv(g, cout, x_kept);
            self.keep(y, Self::out_elems(&g, cout))
        }
    }

    /// Under bf16 on the tensor cores, dy rounded once by a caller that runs a convolution's two
    /// backward passes apart (`Conv3x3::dy_bf16`: conv2, the merge convolution).
    fn round_dy(&mut self, g: &ConvGeometry, cout: u64) -> Option<u64> {
        self.tc(g.cin as u64, cout)
            .then(|| self.half(Self::out_elems(g, cout)))
    }

    /// Conv3x3 parameter gradients: bf16 x (when not kept) and dy (unless `dy_rounded`), the
    /// split-K partials; or the columns.
    fn conv_param_grads(&mut self, g: ConvGeometry, cout: u64, x_kept: bool, dy_rounded: bool) {
        let x = Self::in_elems(&g);
        if self.tc(g.cin as u64, cout) {
            let xb = (!x_kept).then(|| self.half(x));
            let dyb = (!dy_rounded).then(|| self.half(Self::out_elems(&g, cout)));
            let splits = super::conv::bf16::wgrad_splits(&g, cout as usize) as u64;
            let parts = self.f32(splits * 9 * g.cin as u64 * cout);
            self.free(parts);
            if let Some(dyb) = dyb {
                self.free(dyb);
            }
            if let Some(xb) = xb {
                self.free(xb);
            }
        } else {
            let xw = if x_kept { self.widen(x) } else { None };
            self.columns(&g);
            self.unwiden(xw);
        }
    }

    /// `Conv3x3::backward_operand`: the parameter gradients (with `grads`) and the input
    /// gradient; on the tensor cores dy is rounded to bf16 once for both.
    fn conv_backward(&mut self, g: ConvGeometry, cout: u64, x_kept: bool, grads: bool) -> u64 {
        if !self.tc(g.cin as u64, cout) {
            if grads {
                self.conv_param_grads(g, cout, x_kept, false);
            }
            return self.conv_backward_input(g, cout, false);
        }
        let dyb = self.half(Self::out_elems(&g, cout));
        if grads {
            let xb = (!x_kept).then(|| self.half(Self::in_elems(&g)));
            let splits = super::conv::bf16::wgrad_splits(&g, cout as usize) as u64;
            let parts = self.f32(splits * 9 * g.cin as u64 * cout);
            self.free(parts);
            if let Some(xb) = xb {
                self.free(xb);
            }
        }
        let dx = self.f32(Self::in_elems(&g));
        self.free(dyb);
        dx
    }

    /// Conv3x3 input gradient: dx, and dy's bf16 copy unless `dy_rounded`; or the columns.
    fn conv_backward_input(&mut self, g: ConvGeometry, cout: u64, dy_rounded: bool) -> u64 {
        let dx = self.f32(Self::in_elems(&g));
        if self.tc(g.cin as u64, cout) {
            self.narrow_operands((!dy_rounded).then_some(Self::out_elems(&g, cout)));
        } else {
            self.columns(&g);
        }
        dx
    }

    /// The geometry of level i's convolutions: the blocks' (stride 1 on level i, `cin` in).
    fn geometry(&self, i: usize, cin: u64, stride: usize) -> ConvGeometry {
        let (h, w) = self.dims(i);
        ConvGeometry::new(self.n as usize, h as usize, w as usize, cin as usize, stride)
    }

    /// Linear forward on `rows` rows: the output, and under bf16 the casts (or a widened copy
    /// of a kept input the tensor cores cannot take).
    fn linear(&mut self, rows: u64, fan_in: u64, fan_out: u64, x_kept: bool) -> u64 {
        let y = self.f32(rows * fan_out);
        if self.tc(fan_in, fan_out) {
            self.narrow_operands((!x_kept).then_some(rows * fan_in));
        } else if x_kept {
            let xw = self.widen(rows * fan_in);
            self.unwiden(xw);
        }
        y
    }

    /// Linear forward to a kept output (`Linear::forward_kept`): on the tensor cores written in
    /// bf16 by the epilogue, else kept from the f32 output.
    fn linear_kept(&mut self, rows: u64, fan_in: u64, fan_out: u64, x_kept: bool) -> u64 {
        if self.tc(fan_in, fan_out) {
            let y = self.half(rows * fan_out);
            self.narrow_operands((!x_kept).then_some(rows * fan_in));
            y
        } else {
            let y = self.linear(rows, fan_in, fan_out, x_kept);
            self.keep(y, rows * fan_out)
        }
    }

    fn linear_backward(&mut self, rows: u64, fan_in: u64, fan_out: u64, x_kept: bool, grads: bool) -> u64 {
        let dx = self.f32(rows * fan_in);
        if self.tc(fan_in, fan_out) {
            let dyb = self.half(rows * fan_out);
            if grads && !x_kept {
                let xb = self.half(rows * fan_in);
                self.free(xb);
            }
            self.free(dyb);
        } else if grads && x_kept {
            let xw = self.widen(rows * fan_in);
            self.unwiden(xw);
        }
        dx
    }

    /// One of the attention's batched products (`gemm_operands_into`) on operands of these
    /// sizes, each kept in bf16 or not: under bf16 the f32 ones are rounded, or where the
    /// tensor cores cannot take the sizes the kept ones are widened.
    fn product(&mut self, tc: bool, operands: [(u64, bool); 2]) {
        if !self.bf16 {
            return;
        }
        let copies: Vec<u64> = operands
            .iter()
            .filter(|&&(_, kept)| kept != tc)
            .map(|&(e, _)| if tc { self.half(e) } else { self.f32(e) })
            .collect();
        for c in copies.into_iter().rev() {
            self.free(c);
        }
    }

    /// [x, 1] of a [rows, k] matrix: the ones, the result; the ones go.
    fn with_ones(&mut self, rows: u64, k: u64) -> u64 {
        let ones = self.f32(rows);
        let y = self.f32(rows * (k + 1));
        self.free(ones);
        y
    }

    fn bank_forward(&mut self) -> (u64, u64) {
        let bank = &self.net.bank;
        let (b, e, n) = (bank.len() as u64, self.net.config.emb as u64, self.n);
        let groups = bank.group_sizes();
        let m_width = bank.m_width() as u64;
        let w0 = self.f32(b * (e + 1) * e);
        let z = self.f32(b * n * e);
        let emb1 = self.with_ones(n, e);
        self.free(emb1);
        self.free(w0);
        let s = self.f32(b * n * e);
        let s1 = self.with_ones(b * n, e);
        self.free(s);
        let m = self.f32(n * m_width);
        for (k, c) in groups {
            let (k, c) = (k as u64, c as u64);
            let w2 = self.f32(k * (e + 1) * 3 * c);
            self.free(w2);
        }
        self.free(s1);
        (z, m)
    }

    fn bank_backward(&mut self) {
        let bank = &self.net.bank;
        let (b, e, n) = (bank.len() as u64, self.net.config.emb as u64, self.n);
        let groups = bank.group_sizes();
        let s = self.f32(b * n * e);
        let s1 = self.with_ones(b * n, e);
        self.free(s);
        let ds = self.f32(b * n * e);
        for (k, c) in groups {
            let (k, c) = (k as u64, c as u64);
            let w2 = self.f32(k * e * 3 * c);
            self.free(w2);
            let g2 = self.f32(k * (e + 1) * 3 * c);
            self.free(g2);
        }
        self.free(s1);
        let dz = self.f32(b * n * e);
        self.free(ds);
        let g0 = self.f32(b * (e + 1) * e);
        let emb1 = self.with_ones(n, e);
        self.free(emb1);
        self.free(g0);
        self.free(dz);
    }

    /// A ResBlock's conv2 input, Dropout(SiLU(c1)), of `a` elements: SiLU's output then
    /// dropout's, or under bf16 one kernel's (`nn::dropout::silu_dropout_to`), in bf16 when
    /// conv2 takes the tensor cores (`tc`; then conv2 reads it as it is).
    fn conv2_input(&mut self, a: u64, tc: bool) -> u64 {
        if tc {
            return self.half(a);
        }
        let s1 = self.f32(a);
        if self.dropout && !self.bf16 {
            let d1 = self.f32(a);
            self.free(s1);
            d1
        } else {
            s1
        }
    }

    /// The attention's score elements at level i, and whether its batched products run on
    /// the tensor cores (tokens and head width multiples of 8).
    fn attention_dims(&self, i: usize) -> (u64, bool) {
        let heads = self.net.config.heads_at(i).unwrap_or(1) as u64;
        let (t, d) = (self.pixels(i), self.c(i) / heads);
        (self.n * heads * t * t, self.tc(t, d))
    }

    /// A block's forward from its (already counted, kept) input; returns its output, kept when
    /// `keep_out`.
    fn block_forward(&mut self, i: usize, att: bool, keep_out: bool) -> u64 {
        // The blocks' elementwise kernels read kept bf16 activations as they are on a GPU (no
        // widened copies; the CPU's are its own scratch).
        let (a, p, c, n) = (self.act(i), self.pixels(i), self.c(i), self.n);
        self.keep_new(a); // the modulated LayerNorm's output, kept (written in bf16 under bf16)
        self.f32(n * p); // and its 1/std
        if att {
            let (s, tc) = self.attention_dims(i);
            // The projection as kept (bf16 from the epilogue), permuted as kept: q, k, v.
            let proj = self.linear_kept(n * p, c, 3 * c, true);
            self.keep_new(3 * a);
            self.free(proj);
            let scores = self.f32(s);
            self.product(tc, [(a, true), (a, true)]);
            self.keep_new(s); // probabilities, kept (under bf16 stored as bf16 by the softmax)
            self.free(scores);
            let heads_out = self.f32(a);
            self.product(tc, [(s, true), (a, true)]);
            self.keep_new(a); // merged heads, kept (rounded by the permute under bf16)
            self.free(heads_out);
            self.linear_kept(n * p, c, c, true); // the projection's output h, kept
        } else {
            let g = self.geometry(i, c, 1);
            self.conv_kept(g, c, true); // c1, kept
            let tc = self.tc(c, c);
            let d1 = self.conv2_input(a, tc);
            self.conv_kept(g, c, tc); // c2, the residual's h, kept
            self.free(d1);
        }
        // The residual's output: kept (under bf16 written in bf16 by its kernel), or f32.
        if keep_out {
            self.keep_new(a)
        } else {
            self.f32(a)
        }
    }

    /// A block's backward; frees dout and returns dx.
    fn block_backward(&mut self, i: usize, att: bool, dout: u64, grads: bool) -> u64 {
        let (a, p, c, n) = (self.act(i), self.pixels(i), self.c(i), self.n);
        let dx = self.f32(a);
        let dh = self.f32(a);
        self.free(dout);
        let dln = if att {
            let (s, tc) = self.attention_dims(i);
            let dmerged = self.linear_backward(n * p, c, c, true, grads);
            let dheads = self.keep_new(a); // rounded once by the permute under bf16
            self.free(dmerged);
            let dqkv = self.f32(3 * a);
            let dprobs = self.f32(s);
            self.product(tc, [(a, self.bf16), (a, true)]);
            // Under bf16 the softmax VJP overwrites dprobs with dscores (bf16 probabilities).
            let dscores = if self.bf16 {
                self.keep(dprobs, s)
            } else {
                let dscores = self.f32(s);
                self.free(dprobs);
                dscores
            };
            self.product(tc, [(s, self.bf16), (a, true)]);
            self.product(tc, [(s, self.bf16), (a, true)]);
            self.product(tc, [(s, true), (a, self.bf16)]);
            self.free(dscores);
            self.free(dheads);
            let dproj = self.f32(3 * a);
            self.free(dqkv);
            let dln = self.linear_backward(n * p, c, 3 * c, true, grads);
            self.free(dproj);
            self.free(dh);
            dln
        } else {
            let g = self.geometry(i, c, 1);
            let dhb = self.round_dy(&g, c);
            if grads {
                let tc = self.tc(c, c);
                let d1 = self.conv2_input(a, tc);
                self.conv_param_grads(g, c, tc, dhb.is_some());
                self.free(d1);
            }
            let dd1 = self.conv_backward_input(g, c, dhb.is_some());
            if let Some(dhb) = dhb {
                self.free(dhb);
            }
            self.free(dh);
            // dropout's and SiLU's VJPs: under bf16 one kernel in place in dd1.
            let dc1 = if self.bf16 {
                dd1
            } else {
                let ds1 = if self.dropout {
                    let ds1 = self.f32(a);
                    self.free(dd1);
                    ds1
                } else {
                    dd1
                };
                let dc1 = self.f32(a);
                self.free(ds1);
                dc1
            };
            let dln = self.conv_backward(g, c, true, grads);
            self.free(dc1);
            dln
        };
        let dh0 = self.f32(a);
        self.free(dln);
        let dx_mod = self.f32(a);
        self.free(dh0);
        self.free(dx_mod);
        dx
    }

    fn blocks(&self, i: usize, up: bool) -> Vec<bool> {
        let level = &self.net.levels[i];
        let blocks = if up { &level.up } else { &level.down };
        blocks
            .iter()
            .map(|b| matches!(b.kind, BlockKind::Att(_)))
            .collect()
    }

    /// The input convolution of level i: the image's (stride 1) or the down-sampling one.
    fn input_geometry(&self, i: usize) -> ConvGeometry {
        let cfg = &self.net.config;
        if i == 0 {
            self.geometry(0, (cfg.in_channels * cfg.patch * cfg.patch) as u64, 1)
        } else {
            self.geometry(i - 1, self.c(i - 1), 2)
        }
    }

    /// The forward; returns the bytes kept.
    fn forward(&mut self) -> u64 {
        let last = self.net.levels.len() - 1;
        self.f32(self.image_in()); // the (unshuffled) input, kept
        self.bank_forward();
        for i in 0..=last {
            let (a, n, p) = (self.act(i), self.n, self.pixels(i));
            if i > 0 {
                let c = self.conv(self.input_geometry(i), self.c(i), true);
                self.keep_new(a); // LayerNorm output (under bf16 written in bf16) and 1/std, kept
                self.f32(n * p);
                self.free(c);
            } else {
                self.conv_kept(self.input_geometry(0), self.c(0), false);
            }
            for att in self.blocks(i, false) {
                self.block_forward(i, att, true); // each output is kept (next input or the skip)
            }
        }
        let mut carry = 0;
        for i in (0..=last).rev() {
            let (a, n) = (self.act(i), self.n);
            let blocks = self.blocks(i, true);
            // The merge conv's output (the first block's input), else the skip itself (copied
            // only when there are no blocks to read it in place).
            let mut h = if i < last {
                let cat_c = self.c(i) + self.c(i + 1);
                let g = self.geometry(i, cat_c, 1);
                if self.bf16 {
                    // Built in bf16 from the kept values (`UNet::merge_input`).
                    let cat = self.half(n * self.pixels(i) * cat_c);
                    let h = self.conv_kept(g, self.c(i), true);
                    self.free(cat);
                    h
                } else {
                    let cat = self.f32(n * self.pixels(i) * cat_c);
                    self.free(carry);
                    let h = self.conv_kept(g, self.c(i), false);
                    self.free(cat);
                    h
                }
            } else if blocks.is_empty() {
                let copy = self.f32(a);
                self.keep(copy, a)
            } else {
                0
            };
            for (k, &att) in blocks.iter().enumerate() {
                // Kept as the next input; the last kept at level 0 only (the head's input).
                h = self.block_forward(i, att, i == 0 || k + 1 < blocks.len());
            }
            if i > 0 {
                // A kept h (no blocks: the merge's output or the skip's copy) is widened.
                let h_f32 = if blocks.is_empty() { self.widen(a) } else { None };
                self.keep_new(a); // LayerNorm output (under bf16 written in bf16) and 1/std, kept
                self.f32(n * self.pixels(i));
                self.unwiden(h_f32);
                self.free(h);
                if !self.bf16 {
                    carry = self.f32(n * self.pixels(i - 1) * self.c(i));
                }
            } else {
                let cfg = &self.net.config;
                let out = (cfg.out_channels * cfg.patch * cfg.patch) as u64;
                let y = self.linear(n * self.pixels(0), self.c(0), out, true);
                if cfg.patch > 1 {
                    self.f32(self.image_out());
                    self.free(y);
                }
            }
        }
        self.t.live - self.t.held(4 * self.image_out())
    }

    /// The backward from `live = kept`; the peak over it.
    fn backward(&mut self, grads: bool) {
        let last = self.net.levels.len() - 1;
        let n = self.n;
        let dm = self.f32(n * self.net.bank.m_width() as u64);
        let dy = self.f32(self.image_out());
        let mut dskip = Vec::with_capacity(last + 1);
        let mut d_carry = 0;
        for i in 0..=last {
            let a = self.act(i);
            let mut d = if i == 0 {
                let cfg = &self.net.config;
                let out = (cfg.out_channels * cfg.patch * cfg.patch) as u64;
                let d = self.linear_backward(n * self.pixels(0), self.c(0), out, true, grads);
                self.free(dy);
                d
            } else {
                let d_y = self.f32(a);
                self.free(d_carry);
                let d = self.f32(a);
                self.free(d_y);
                d
            };
            for &att in self.blocks(i, true).iter().rev() {
                d = self.block_backward(i, att, d, grads);
            }
            if i < last {
                let cat_c = self.c(i) + self.c(i + 1);
                let g = self.geometry(i, cat_c, 1);
                let db = self.round_dy(&g, self.c(i));
                if grads && self.bf16 {
                    let cat = self.half(n * self.pixels(i) * cat_c);
                    self.conv_param_grads(g, self.c(i), true, db.is_some());
                    self.free(cat);
                } else if grads {
                    let up = self.f32(n * self.pixels(i) * self.c(i + 1));
                    let cat = self.f32(n * self.pixels(i) * cat_c);
                    self.free(up);
                    self.conv_param_grads(g, self.c(i), false, db.is_some());
                    self.free(cat);
                }
                let d_cat = self.conv_backward_input(g, self.c(i), db.is_some());
                if let Some(db) = db {
                    self.free(db);
                }
                self.free(d);
                d_carry = self.f32(n * self.pixels(i) * self.c(i + 1));
                dskip.push(self.f32(a));
                self.free(d_cat);
            } else {
                dskip.push(d);
            }
        }
        for i in (0..=last).rev() {
            let a = self.act(i);
            let mut d = dskip[i];
            for &att in self.blocks(i, false).iter().rev() {
                d = self.block_backward(i, att, d, grads);
            }
            if i > 0 {
                let dn = self.f32(a);
                self.free(d);
                d = dn;
            }
            let d_in = self.conv_backward(self.input_geometry(i), self.c(i), i > 0, grads);
            self.free(d);
            if i > 0 {
                self.free(d_in); // summed into the skip's gradient in place
            }
        }
        if grads {
            self.bank_backward();
        }
        if self.net.config.patch > 1 {
            self.f32(self.image_in());
        }
        self.free(dm);
    }
}

/// A training step's activations in the GPU pool (f32, size classes), over two steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolEstimate {
    /// The most bytes handed out at once.
    pub peak_in_use: u64,
    /// What a pool without a limit holds from the driver: per size class, the most buffers
    /// ever out at once.
    pub unlimited_held: u64,
    /// With the limit asked for: the most held, and the driver allocations of the second step
    /// (the steady state; none without a limit).
    pub limited_held: u64,
    /// Driver allocations the second step still makes under the limit (0 in the steady state).
    pub allocations_per_step: u64,
}

impl UNet {
    fn walk(&self, n: usize, dropout: bool, pooled: bool, grads: bool) -> (u64, u64, u64, Tally) {
        let mut w = Walk {
            net: self,
            n: n as u64,
            t: Tally {
                pooled,
                ..Tally::default()
            },
            dropout: dropout && self.config.dropout > 0.0,
            bf16: self.layout.precision() == crate::ops::Precision::Bf16,
        };
        let kept = w.forward();
        let forward_peak = w.t.peak;
        // The caller turns the output into its own and lets it go before the backward.
        w.t.free(4 * w.image_out());
        w.t.peak = w.t.live;
        w.backward(grads);
        (kept, forward_peak, w.t.peak, w.t)
    }

    /// Activation memory of one call at batch `n` (bytes as requested), in training mode
    /// when `dropout` (conv2's input is then a second tensor while it exists).
    pub fn activation_memory(&self, n: usize, dropout: bool) -> ActivationMemory {
        let (saved, forward_peak, backward_peak, _) = self.walk(n, dropout, false, true);
        let (_, _, vjp_peak, _) = self.walk(n, dropout, false, false);
        ActivationMemory {
            saved,
            forward_peak,
            backward_peak,
            vjp_peak,
        }
    }

    /// A training step's forward and backward in the GPU pool at batch `n`, with the pool's
    /// bytes held limited to `limit` (its own buffers: what the rest of the step holds is the
    /// caller's to subtract).
    pub fn pool_estimate(&self, n: usize, limit: u64) -> PoolEstimate {
        let (_, forward_peak, backward_peak, mut t) = self.walk(n, true, true, true);
        t.free_all();
        let two: Vec<(usize, bool)> = t.events.iter().chain(&t.events).copied().collect();
        let unlimited = PoolStats::replay(&two, None);
        let limit = Some(limit as usize);
        let first = PoolStats::replay(&t.events, limit);
        let both = PoolStats::replay(&two, limit);
        PoolEstimate {
            peak_in_use: forward_peak.max(backward_peak),
            unlimited_held: unlimited.peak_bytes_held as u64,
            limited_held: both.peak_bytes_held as u64,
            allocations_per_step: both.device_allocations - first.device_allocations,
        }
    }
}

/// 57560451 -> "57,560,451".
pub fn fmt_count(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
