//! The 3x3 convolution's three passes under the bf16 policy: implicit GEMM on the tensor cores
//! (kernels/conv.cu, version 2: no column buffer; on an H100 or H200 with wgmma turned on
//! ([`crate::device::CudaDevice::set_wgmma`]), the forward and input gradient of
//! kernels/conv_sm90a.cu, version 4) and their CPU twins. Layouts as in
//! [`super`]: x `[N, H, W, Cin]`, weight `[3, 3, Cin, Cout]` (= `[9 Cin, Cout]`), bias
//! `[Cout]`, y `[N, OH, OW, Cout]`. Operands (x, the weight, dy) are bf16 tensors; accumulation,
//! bias and every f32 output are f32.
//!
//! The CPU twins widen the same bf16 values to f32 (exact) and run the f32 oracle of
//! [`super`] (im2col and GEMM), so a GPU result differs from its twin only by the order of
//! the f32 additions. The weight gradient on a GPU is split over the output pixels into a fixed
//! number of parts that depends only on the shape ([`wgrad_splits`]), summed in part order: the
//! same bits run to run and on every GPU of a given kernel build.

use super::{col2im_into, im2col, ConvGeometry};
use crate::device::launch::{self, Kernels};
use crate::error::{Error, Result};
use crate::ops::precision::{tensor_core_refusal, to_f32, Bf16Ref};
use crate::ops::{gemm_bias_into, gemm_into, GemmSpec};
use crate::tensor::{AsView, AsViewMut, DType, Data, DataMut, Tensor, View, ViewMut};
use crate::Device;

const TILE: u32 = 128;
const THREADS: u32 = 256;

/// Why the tensor-core convolution cannot take this geometry (`None` when it can): channel
/// counts must be multiples of 8, and a GPU must be sm_80 or newer. The U-Net's first
/// convolution (3 input channels) stays on the f32 path.
pub fn refusal(g: &ConvGeometry, cout: usize, device: &Device) -> Option<String> {
    tensor_core_refusal(&[("Cin", g.cin as usize), ("Cout", cout)], device)
}

fn pixels_out(g: &ConvGeometry) -> usize {
    g.n as usize * g.oh as usize * g.ow as usize
}
fn pixels_in(g: &ConvGeometry) -> usize {
    g.n as usize * g.h as usize * g.w as usize
}

/// The checks of one pass, before any work: the geometry (tensor-core sizes, 32-bit tile
/// indices), then each operand's dtype, element count and device, by name.
struct Checks {
    op: &'static str,
    device: Device,
}

impl Checks {
    fn new(op: &'static str, g: &ConvGeometry, cout: usize, device: Device) -> Result<Checks> {
        if let Some(why) = refusal(g, cout, &device) {
            return Err(Error::Other(format!("{op}: {why}")));
        }
        let rows = pixels_in(g).max(pixels_out(g)) as u64;
        if rows.div_ceil(TILE as u64) > i32::MAX as u64 / 2 || g.cin as usize * 9 * cout > i32::MAX as usize {
            return Err(Error::Other(format!(
                "{op}: the problem is too large for 32-bit tile indices"
            )));
        }
        crate::device::note_op();
        Ok(Checks { op, device })
    }

    fn operand(
        &self,
        what: &str,
        dtype: DType,
        numel: usize,
        device: &Device,
        want: (DType, usize),
    ) -> Result<()> {
        if dtype != want.0 || numel != want.1 || !device.same_as(&self.device) {
            return Err(Error::Other(format!(
                "{}: {what} must be {} with {} elements on {}; it is {} with {numel} on {device}",
                self.op,
                want.0.name(),
                want.1,
                self.device,
                dtype.name()
            )));
        }
        Ok(())
    }

    fn bf16(&self, what: &str, t: &Bf16Ref, numel: usize) -> Result<()> {
        t.check_tensor_core_alignment(self.op, what)?;
        self.operand(
            what,
            t.tensor.dtype(),
            t.numel(),
            &t.tensor.device(),
            (DType::BF16, numel),
        )
    }

    fn f32_out(&self, what: &str, v: &ViewMut, numel: usize) -> Result<()> {
        self.operand(
            what,
            v.dtype(),
            v.numel(),
            &v.as_view().device(),
            (DType::F32, numel),
        )
    }
}

/// `y = conv(x) + bias`: f32 into `y` and/or bf16 into `y_bf16` (each `[N, OH, OW, Cout]`).
pub fn forward<'x, 'w>(
    x: impl Into<Bf16Ref<'x>>,
    weight: impl Into<Bf16Ref<'w>>,
    bias: Option<&View>,
    g: &ConvGeometry,
    cout: usize,
    y: Option<&mut ViewMut>,
    y_bf16: Option<&mut Tensor>,
) -> Result<()> {
    forward_impl(x.into(), weight.into(), bias, g, cout, y, y_bf16, None)
}

/// The residual of the paper's ResBlock, `out = (x + c h) / sqrt(1 + c^2)`, computed from a
/// convolution's output h ([`forward_residual`]).
pub struct Residual<'a, 'v> {
    /// The block's input x, bf16, the shape of h.
    pub x: Bf16Ref<'a>,
    /// The block's modulation `[N, 3 Cout]`, f32; c is its last third.
    pub m: &'a View<'v>,
    /// Where out goes: an f32 or bf16 tensor the shape of h (bf16 when the next block keeps it).
    pub out: &'a mut Tensor,
}

/// The forward of a ResBlock's conv2 with the block's residual in its epilogue: h = conv(x) +
/// bias kept in bf16 (`h_bf16`), and `out = (x + c h) / sqrt(1 + c^2)` from the rounded h, on a GPU
/// from the same registers (one pass fewer over h than the two ops), with the bits of
/// [`forward`] followed by `nn::blocks::residual_kept` / `residual_operand` on bf16 x and h. The
/// CPU twin is that composition.
pub fn forward_residual<'x, 'w>(
    x: impl Into<Bf16Ref<'x>>,
    weight: impl Into<Bf16Ref<'w>>,
    bias: Option<&View>,
    g: &ConvGeometry,
    cout: usize,
    h_bf16: &mut Tensor,
    residual: Residual,
) -> Result<()> {
    forward_impl(
        x.into(),
        weight.into(),
        bias,
        g,
        cout,
        None,
        Some(h_bf16),
        Some(residual),
    )
}

#[allow(clippy::too_many_arguments)]
fn forward_impl(
    x: Bf16Ref,
    weight: Bf16Ref,
    bias: Option<&View>,
    g: &ConvGeometry,
    cout: usize,
    y: Option<&mut ViewMut>,
    y_bf16: Option<&mut Tensor>,
    residual: Option<Residual>,
) -> Result<()> {
    let device = x.tensor.device();
    let c = Checks::new("conv3x3 forward (bf16)", g, cout, device.clone())?;
    let (in_n, out_n) = (pixels_in(g) * g.cin as usize, pixels_out(g) * cout);
    c.bf16("x", &x, in_n)?;
    c.bf16("the weight", &weight, 9 * g.cin as usize * cout)?;
    if let Some(b) = bias {
        c.operand("the bias", b.dtype(), b.numel(), &b.device(), (DType::F32, cout))?;
    }
    if let Some(y) = &y {
        c.f32_out("y", y, out_n)?;
    }
    if let Some(y) = &y_bf16 {
        c.bf16("y (bf16)", &Bf16Ref::new(y), out_n)?;
    }
    if let Some(r) = &residual {
        if y_bf16.is_none() {
            return Err(Error::Other(
                "conv3x3 forward (bf16): a residual needs h kept in bf16 (y_bf16)".into(),
            ));
        }
        c.bf16("the residual's x", &r.x, out_n)?;
        let m_n = g.n as usize * 3 * cout;
        c.operand(
            "the modulation",
            r.m.dtype(),
            r.m.numel(),
            &r.m.device(),
            (DType::F32, m_n),
        )?;
        let want = if r.out.dtype() == DType::BF16 {
            DType::BF16
        } else {
            DType::F32
        };
        c.operand(
            "the residual's out",
            r.out.dtype(),
            r.out.numel(),
            &r.out.device(),
            (want, out_n),
        )?;
    }
    match &device {
        Device::Cpu => {
            let (xf, wf) = (to_f32(x)?, to_f32(weight)?);
            let col = im2col(&xf.as_view()?.reshape(&[in_n])?, g)?;
            let wm = wf.as_view()?.reshape(&[9 * g.cin as usize, cout])?;
            let mut out = Tensor::uninit(&[pixels_out(g), cout], DType::F32, &device)?;
            match bias {
                Some(b) => gemm_bias_into(&col, &wm, b, &mut out, GemmSpec::default())?,
                None => gemm_into(&col, &wm, &mut out, GemmSpec::default())?,
            }
            let Some(r) = residual else {
                return store_cpu(&out, y, y_bf16);
            };
            let h = y_bf16.ok_or_else(|| {
                Error::Other("conv3x3 forward (bf16): a residual needs h kept in bf16 (y_bf16)".into())
            })?;
            store_cpu(&out, None, Some(&mut *h))?;
            // The twin: the residual's CPU body on the widened bf16 x and h (exact widenings).
            let (xw, hw) = (to_f32(r.x)?, to_f32(Bf16Ref::new(h))?);
            let mut o = Tensor::uninit(&[out_n], DType::F32, &device)?;
            crate::ops::elementwise::cpu::residual::<f32>(
                xw.as_view()?.cpu()?,
                hw.as_view()?.cpu()?,
                r.m.cpu()?,
                o.as_view_mut()?.cpu_mut()?,
                pixels_out(g) / g.n as usize,
                cout,
            );
            if r.out.dtype() == DType::BF16 {
                store_cpu(&o, None, Some(r.out))
            } else {
                store_cpu(&o, Some(&mut r.out.as_view_mut()?), None)
            }
        }
        Device::Cuda(dev) => {
            let cfg = launch::blocks(
                (
                    (pixels_out(g) as u32).div_ceil(TILE),
                    (cout as u32).div_ceil(TILE),
                    1,
                ),
                THREADS,
            );
            let (xv, wv) = (x.cuda()?, weight.cuda()?);
            let bv = bias.map(cuda_f32_view).transpose()?;
            let mut yv = y.map(|y| cuda_f32(y)).transpose()?;
            let mut ybv = y_bf16.map(|t| t.cuda_bf16_mut()).transpose()?;
            let (res_x, res_m, res_out) = match residual {
                Some(r) => (Some(r.x), Some(r.m), Some(r.out)),
                None => (None, None, None),
            };
            let rxv = res_x.map(|r| r.cuda()).transpose()?;
            let rmv = res_m.map(cuda_f32_view).transpose()?;
            let (mut rof, mut rob) = match res_out {
                Some(o) if o.dtype() == DType::BF16 => (None, Some(o.cuda_bf16_mut()?)),
                Some(o) => (Some(o.cuda_f32_mut()?), None),
                None => (None, None),
            };
            // Hopper: the weight as [tap][Cout][Cin] (K-major for wgmma), then version 4.
            let taps_cout_cin = match dev.wgmma() {
                true => Some(weight_taps_cout_cin(&device, dev, &wv, g, cout)?),
                false => None,
            };
            let (launch, wv) = match &taps_cout_cin {
                Some(wt) => (Kernels::conv3x3_fprop_wgmma as FpropLaunch, wt.cuda_bf16()?),
                None => (Kernels::conv3x3_fprop_bf16 as FpropLaunch, wv),
            };
            // SAFETY: every operand's size was checked against the geometry; channel counts are
            // multiples of 8 (16-byte chunks); the grid covers the output tiles; a residual's
            // x and out have y's size and m N x 3 Cout values, with h kept in bf16; the weight
            // is in the order the chosen kernel reads.
            unsafe {
                launch(
                    dev.kernels(),
                    cfg,
                    &xv,
                    &wv,
                    bv.as_ref(),
                    yv.as_mut(),
                    ybv.as_mut(),
                    *g,
                    cout as i32,
                    rxv.as_ref(),
                    rmv.as_ref(),
                    rof.as_mut(),
                    rob.as_mut(),
                )
            }
        }
    }
}

/// The launcher both forward kernels share (version 2, mma.sync; version 4, wgmma).
type FpropLaunch = unsafe fn(
    &Kernels,
    cudarc::driver::LaunchConfig,
    &cudarc::driver::CudaView<'_, half::bf16>,
    &cudarc::driver::CudaView<'_, half::bf16>,
    Option<&cudarc::driver::CudaView<'_, f32>>,
    Option<&mut cudarc::driver::CudaViewMut<'_, f32>>,
    Option<&mut cudarc::driver::CudaViewMut<'_, half::bf16>>,
    crate::device::params::ConvGeometry,
    i32,
    Option<&cudarc::driver::CudaView<'_, half::bf16>>,
    Option<&cudarc::driver::CudaView<'_, f32>>,
    Option<&mut cudarc::driver::CudaViewMut<'_, f32>>,
    Option<&mut cudarc::driver::CudaViewMut<'_, half::bf16>>,
) -> Result<()>;

/// `w[tap][ci][co]` as `[tap][co][ci]` in a new bf16 tensor (what the wgmma forward reads).
fn weight_taps_cout_cin(
    device: &Device,
    dev: &crate::device::CudaDevice,
    w: &cudarc::driver::CudaView<'_, half::bf16>,
    g: &ConvGeometry,
    cout: usize,
) -> Result<Tensor> {
    let wn = 9 * g.cin as usize * cout;
    let mut wt = Tensor::uninit(&[wn], DType::BF16, device)?;
    {
        let mut wtv = wt.cuda_bf16_mut()?;
        // SAFETY: w and wt hold 9 Cin Cout values each.
        unsafe {
            dev.kernels().conv3x3_weight_taps_cout_cin_bf16(
                launch::grid_stride(dev, wn),
                w,
                &mut wtv,
                g.cin,
                cout as i32,
            )
        }?;
    }
    Ok(wt)
}

/// The GPU kernel of the input gradient (the CPU twin is the same either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputGradKernel {
    /// Version 2, `conv3x3_dgrad_bf16`: K = 9 Cout for every input pixel; at stride 2 the taps
    /// that land between output pixels are zero filled (their MMAs wasted).
    AllTaps,
    /// Version 3 at stride 2, `conv3x3_dgrad_s2_bf16`: one parity class of input pixels per
    /// grid z, K = its 1, 2 or 4 live taps x Cout (4 Cout at most; 2.25 Cout on average, a
    /// quarter of the 9-tap kernel's work). At stride 1 every tap is live and this is `AllTaps`.
    ByParity,
}

/// `dx = beta dx + the input gradient` for `dy` (`[N, OH, OW, Cout]`, bf16), f32 into `dx`
/// (`[N, H, W, Cin]`; beta 0 never reads it). On a GPU by parity class at stride 2.
pub fn input_grad<'d, 'w>(
    dy: impl Into<Bf16Ref<'d>>,
    weight: impl Into<Bf16Ref<'w>>,
    g: &ConvGeometry,
    cout: usize,
    dx: &mut ViewMut,
    beta: f32,
) -> Result<()> {
    input_grad_with(dy, weight, g, cout, dx, beta, InputGradKernel::ByParity)
}

/// [`input_grad`] with the GPU kernel chosen: the benchmark and the parity tests run both.
pub fn input_grad_with<'d, 'w>(
    dy: impl Into<Bf16Ref<'d>>,
    weight: impl Into<Bf16Ref<'w>>,
    g: &ConvGeometry,
    cout: usize,
    dx: &mut ViewMut,
    beta: f32,
    kernel: InputGradKernel,
) -> Result<()> {
    let (dy, weight) = (dy.into(), weight.into());
    let device = dy.tensor.device();
    let c = Checks::new("conv3x3 input gradient (bf16)", g, cout, device.clone())?;
    let in_n = pixels_in(g) * g.cin as usize;
    c.bf16("dy", &dy, pixels_out(g) * cout)?;
    c.bf16("the weight", &weight, 9 * g.cin as usize * cout)?;
    c.f32_out("dx", dx, in_n)?;
    match &device {
        Device::Cpu => {
            let (dyf, wf) = (to_f32(dy)?, to_f32(weight)?);
            let dy2 = dyf.as_view()?.reshape(&[pixels_out(g), cout])?;
            let wm = wf.as_view()?.reshape(&[9 * g.cin as usize, cout])?;
            let mut dcol = Tensor::uninit(&[pixels_out(g), 9 * g.cin as usize], DType::F32, &device)?;
            gemm_into(&dy2, &wm, &mut dcol, GemmSpec::new(false, true))?;
            let mut fresh = Tensor::uninit(&[in_n], DType::F32, &device)?;
            col2im_into(&dcol.as_view()?, g, &mut fresh.as_view_mut()?)?;
            let out = dx.cpu_mut::<f32>()?;
            for (o, &v) in out.iter_mut().zip(fresh.as_view()?.cpu::<f32>()?) {
                *o = if beta != 0.0 { beta.mul_add(*o, v) } else { v };
            }
            Ok(())
        }
        Device::Cuda(dev) => {
            let (dyv, wv) = (dy.cuda()?, weight.cuda()?);
            let mut dxv = cuda_f32(dx)?;
            let cin_tiles = (g.cin as u32).div_ceil(TILE);
            if g.stride == 2 && kernel == InputGradKernel::ByParity {
                // Grid z: the four parity classes; x: the tiles of the largest, (even, even)
                // (blocks past a smaller class's pixels return at once).
                let class0 = g.n as u32 * (g.h as u32).div_ceil(2) * (g.w as u32).div_ceil(2);
                let cfg = launch::blocks((class0.div_ceil(TILE), cin_tiles, 4), THREADS);
                let k = dev.kernels();
                let launch = if dev.wgmma() {
                    Kernels::conv3x3_dgrad_s2_wgmma
                } else {
                    Kernels::conv3x3_dgrad_s2_bf16
                };
                // SAFETY: as in `forward`; the classes partition dx's pixels, so each is
                // written by one block.
                return unsafe { launch(k, cfg, &dyv, &wv, Some(&mut dxv), None, *g, cout as i32, beta) };
            }
            let cfg = launch::blocks(((pixels_in(g) as u32).div_ceil(TILE), cin_tiles, 1), THREADS);
            let launch = if dev.wgmma() {
                Kernels::conv3x3_dgrad_wgmma
            } else {
                Kernels::conv3x3_dgrad_bf16
            };
            // SAFETY: as in `forward`.
            unsafe {
                launch(
                    dev.kernels(),
                    cfg,
                    &dyv,
                    &wv,
                    Some(&mut dxv),
                    None,
                    *g,
                    cout as i32,
                    beta,
                )
            }
        }
    }
}

/// The number of parts the GPU's weight gradient is split into over the output pixels: enough
/// blocks to fill a large GPU (about 512 with the output tiles), each part at least 8 K tiles
/// (256 pixels). A function of the shape alone, so the bits do not depend on the GPU.
pub fn wgrad_splits(g: &ConvGeometry, cout: usize) -> usize {
    let tiles = (9 * g.cin as usize).div_ceil(TILE as usize) * cout.div_ceil(TILE as usize);
    let k_tiles = pixels_out(g).div_ceil(32);
    (512 / tiles.max(1)).clamp(1, (k_tiles / 8).max(1))
}

/// `dw = beta dw + col(x)^T dy`, the weight gradient `[9 Cin, Cout]` in f32 (beta 0 never reads
/// it), from bf16 `x` and `dy`.
pub fn weight_grad<'x, 'd>(
    x: impl Into<Bf16Ref<'x>>,
    dy: impl Into<Bf16Ref<'d>>,
    g: &ConvGeometry,
    cout: usize,
    dw: &mut ViewMut,
    beta: f32,
) -> Result<()> {
    let (x, dy) = (x.into(), dy.into());
    let device = x.tensor.device();
    let c = Checks::new("conv3x3 weight gradient (bf16)", g, cout, device.clone())?;
    let wn = 9 * g.cin as usize * cout;
    c.bf16("x", &x, pixels_in(g) * g.cin as usize)?;
    c.bf16("dy", &dy, pixels_out(g) * cout)?;
    c.f32_out("dw", dw, wn)?;
    match &device {
        Device::Cpu => {
            let (xf, dyf) = (to_f32(x)?, to_f32(dy)?);
            let col = im2col(&xf.as_view()?.reshape(&[pixels_in(g) * g.cin as usize])?, g)?;
            let dy2 = dyf.as_view()?.reshape(&[pixels_out(g), cout])?;
            let mut dwm = dw.reborrow().reshape(&[9 * g.cin as usize, cout])?;
            let spec = GemmSpec {
                beta,
                ..GemmSpec::new(true, false)
            };
            gemm_into(&col, &dy2, &mut dwm, spec)
        }
        Device::Cuda(dev) => {
            let splits = wgrad_splits(g, cout);
            let mut partials = Tensor::uninit(&[splits, wn], DType::F32, &device)?;
            let cfg = launch::blocks(
                (
                    (9 * g.cin as u32).div_ceil(TILE),
                    (cout as u32).div_ceil(TILE),
                    splits as u32,
                ),
                THREADS,
            );
            let (xv, dyv) = (x.cuda()?, dy.cuda()?);
            {
                let mut pv = partials.cuda_f32_mut()?;
                // SAFETY: as in `forward`; the partials hold splits * 9 Cin * Cout values.
                unsafe {
                    dev.kernels()
                        .conv3x3_wgrad_bf16(cfg, &xv, &dyv, &mut pv, *g, cout as i32, splits as i32)
                }?;
            }
            let pv = partials.cuda_f32()?;
            let mut dwv = cuda_f32(dw)?;
            // SAFETY: the partials hold splits * wn values, dw wn.
            unsafe {
                dev.kernels().conv3x3_wgrad_sum_f32(
                    launch::grid_stride(dev, wn),
                    &pv,
                    &mut dwv,
                    splits as i32,
                    wn as i64,
                    beta,
                )
            }
        }
    }
}

fn cuda_f32_view<'a>(v: &'a View) -> Result<cudarc::driver::CudaView<'a, f32>> {
    match &v.data {
        Data::Cuda(o, _) => Ok(o.slice(..)),
        _ => Err(Error::DeviceMismatch {
            op: "conv3x3 (bf16)",
            detail: "an f32 operand on the CPU was given for a GPU convolution".into(),
        }),
    }
}

fn cuda_f32<'a>(v: &'a mut ViewMut) -> Result<cudarc::driver::CudaViewMut<'a, f32>> {
    match &mut v.data {
        DataMut::Cuda(o, _) => Ok(o.slice_mut(..)),
        _ => Err(Error::DeviceMismatch {
            op: "conv3x3 (bf16)",
            detail: "an f32 output on the CPU was given for a GPU convolution".into(),
        }),
    }
}

/// Writes the twin's f32 result to the outputs asked for (bf16 rounded to nearest even).
fn store_cpu(out: &Tensor, y: Option<&mut ViewMut>, y_bf16: Option<&mut Tensor>) -> Result<()> {
    let v = out.as_view()?;
    let src = v.cpu::<f32>()?;
    if let Some(y) = y {
        y.cpu_mut::<f32>()?.copy_from_slice(src);
    }
    if let Some(yb) = y_bf16 {
        for (o, &a) in yb.cpu_bf16_mut()?.iter_mut().zip(src) {
            *o = half::bf16::from_f32(a);
        }
    }
    Ok(())
}
