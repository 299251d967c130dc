//! The bf16 precision policy's conversions and its rule for tensor-core operands.
//!
//! Policy (issue 11): GEMM and convolution operands in bf16, accumulation and everything after
//! it (bias, normalisation statistics, softmax, the loss, CG scalars, Adam, EMA) in f32. f32 ->
//! bf16 rounds to nearest even, NaN stays NaN and infinities are kept, on both backends
//! (`half::bf16::from_f32` on the CPU, `__float2bfloat16_rn` on a GPU: the same bits); bf16 ->
//! f32 is exact. So a CPU twin that converts the same bf16 operands to f32 and runs the f32
//! oracle sees exactly the values a tensor core multiplies: only the order of the f32 additions
//! differs (kernels/mma.cuh adds 16-wide blocks), which is what the parity tolerances cover.
//!
//! Under bf16 a U-Net also keeps its activations in bf16 ([`keep`]): the forward rounds each
//! tensor it keeps for the backward and goes on from the rounded values. Layers take their
//! input as an [`Operand`] (an f32 view or kept bf16 values): a tensor-core layer reads kept
//! values as they are ([`Operand::narrow`] borrows), any other op widens them, exactly
//! ([`Operand::widen`]), so an op that later reads bf16 natively gives the same bits.

use half::bf16;

use super::{mismatch, one_device};
use crate::device::launch::grid_stride;
use crate::error::{Error, Result};
use crate::tensor::{AsView, AsViewMut, DType, Data, Tensor, View};
use crate::Device;

/// Which arithmetic a network's GEMMs and convolutions use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 operands and accumulation: the exact reference path.
    #[default]
    F32,
    /// bf16 operands, f32 accumulation (tensor cores on a GPU).
    Bf16,
}

impl Precision {
    /// `"f32"` or `"bf16"`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The dtype an f32 activation is kept in ([`keep`]): bf16 under bf16, else f32.
    pub fn kept_dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// Bytes of the bf16 copy of `f32_bytes` of f32 weights a run keeps under this precision
    /// (`nn::Weights`: none under f32, half the f32 bytes under bf16), for memory estimates.
    pub fn weight_copy_bytes(self, f32_bytes: f64) -> f64 {
        match self {
            Precision::F32 => 0.0,
            Precision::Bf16 => f32_bytes / 2.0,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(Error::Other(format!(
                "unknown precision '{other}': use f32 (exact) or bf16 (bf16 operands, f32 accumulation)"
            ))),
        }
    }
}

/// What a command line asks for: `auto` (bf16 on a GPU with tensor cores, compute capability
/// 8.0 or newer; f32 on the CPU, where the bf16 twins only add conversions), `f32` or `bf16`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrecisionRequest {
    /// bf16 on a tensor-core GPU, f32 elsewhere.
    #[default]
    Auto,
    /// This precision on any device.
    Fixed(Precision),
}

impl PrecisionRequest {
    /// The precision to run with on `device`.
    pub fn resolve(self, device: &Device) -> Precision {
        match (self, device) {
            (PrecisionRequest::Fixed(p), _) => p,
            (PrecisionRequest::Auto, Device::Cuda(dev)) if dev.compute_capability().0 >= 8 => Precision::Bf16,
            (PrecisionRequest::Auto, _) => Precision::F32,
        }
    }
}

impl std::str::FromStr for PrecisionRequest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "auto" => Ok(PrecisionRequest::Auto),
            other => other.parse().map(PrecisionRequest::Fixed).map_err(|_| {
                Error::Other(format!(
                    "unknown precision '{other}': use auto (bf16 on a GPU with tensor cores, else f32), \
                     f32 (exact) or bf16 (bf16 operands, f32 accumulation)"
                ))
            }),
        }
    }
}

impl std::fmt::Display for PrecisionRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrecisionRequest::Auto => f.write_str("auto"),
            PrecisionRequest::Fixed(p) => f.write_str(p.name()),
        }
    }
}

/// One line for a command's header: the precision and where it came from.
pub fn describe(request: PrecisionRequest, precision: Precision) -> String {
    let what = match precision {
        Precision::F32 => "f32 (exact: f32 operands and accumulation)",
        Precision::Bf16 => {
            "bf16 operands, f32 accumulation (GEMMs and convolutions whose widths are multiples of 8; \
             the rest f32)"
        }
    };
    match request {
        PrecisionRequest::Auto => format!("{what}; --precision auto"),
        PrecisionRequest::Fixed(_) => what.to_string(),
    }
}

/// The values as bf16 (round to nearest even), on the same device.
pub fn to_bf16(x: &impl AsView) -> Result<Tensor> {
    let x = x.as_view()?;
    one_device("to_bf16", &[&x], &[])?;
    let mut y = Tensor::uninit(x.shape(), DType::BF16, &x.device())?;
    match &x.data {
        Data::Cuda(xv, dev) => {
            let cfg = grid_stride(dev, x.numel());
            let mut yv = y.cuda_bf16_mut()?;
            // SAFETY: x and y both hold numel values.
            unsafe { dev.kernels().cast_f32_to_bf16(cfg, xv, &mut yv, x.numel() as i64) }?;
        }
        Data::F32(v) => {
            for (o, &a) in y.cpu_bf16_mut()?.iter_mut().zip(v.iter()) {
                *o = bf16::from_f32(a);
            }
        }
        Data::F64(_) => return Err(mismatch("to_bf16", &[&x], &[])),
    }
    Ok(y)
}

/// bf16 values as an f32 tensor (exact) of their shape, on the same device.
pub fn to_f32<'a>(x: impl Into<Bf16Ref<'a>>) -> Result<Tensor> {
    let x = x.into();
    let device = x.tensor.device();
    let mut y = Tensor::uninit(x.shape(), DType::F32, &device)?;
    let n = x.numel();
    match &device {
        Device::Cuda(dev) => {
            crate::device::note_op();
            let cfg = grid_stride(dev, n);
            let (xv, mut yv) = (x.cuda()?, y.cuda_f32_mut()?);
            // SAFETY: x and y both hold n values.
            unsafe { dev.kernels().cast_bf16_to_f32(cfg, &xv, &mut yv, n as i64) }?;
        }
        Device::Cpu => {
            let src = x.cpu()?;
            let mut yv = y.as_view_mut()?;
            for (o, a) in yv.cpu_mut::<f32>()?.iter_mut().zip(src) {
                *o = a.to_f32();
            }
        }
    }
    Ok(y)
}

/// The f32 values rounded through bf16 (round to nearest even), on the host: what a tensor core
/// reads for them. For oracles and tests.
pub fn round_to_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&a| bf16::from_f32(a).to_f32()).collect()
}

/// Why a tensor-core kernel cannot take a problem, or `None` when it can: every dimension and
/// leading dimension a multiple of 8 (16-byte chunks of bf16), and a GPU of compute capability
/// 8.0 or newer. Callers (the layers) fall back to the f32 path or report it.
pub fn tensor_core_refusal(dims: &[(&str, usize)], device: &Device) -> Option<String> {
    if let Some((name, v)) = dims.iter().find(|(_, v)| v % 8 != 0) {
        return Some(format!(
            "{name} = {v} is not a multiple of 8 (the tensor-core kernels move 8 bf16 at a time)"
        ));
    }
    if let Device::Cuda(dev) = device {
        let (major, minor) = dev.compute_capability();
        if major < 8 {
            return Some(format!(
                "the GPU has compute capability {major}.{minor}; bf16 tensor cores need 8.0 or newer"
            ));
        }
    }
    None
}

/// A bf16 tensor, or a contiguous part of one, read under a shape of its own: how a layer sees
/// an activation kept as `[N, H, W, C]` as the `[rows, C]` matrix its GEMM wants, or one of
/// the q, k, v blocks of a kept projection, without a copy.
#[derive(Clone)]
pub struct Bf16Ref<'a> {
    /// The data.
    pub tensor: &'a Tensor,
    offset: usize,
    shape: Vec<usize>,
}

impl<'a> Bf16Ref<'a> {
    /// The whole tensor under its own shape.
    pub fn new(tensor: &'a Tensor) -> Bf16Ref<'a> {
        Bf16Ref {
            tensor,
            offset: 0,
            shape: tensor.shape().to_vec(),
        }
    }

    /// The shape the reader sees.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements read.
    pub fn numel(&self) -> usize {
        crate::tensor::numel(&self.shape)
    }

    /// Where the values start in the tensor, in elements.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Refuses a part the tensor-core kernels cannot load: their 16-byte `cp.async` chunks
    /// need the first element at a multiple of 8 bf16 from the (256-byte aligned) allocation.
    /// Checked on every device, so a misaligned part fails on the CPU too.
    pub fn check_tensor_core_alignment(&self, op: &str, what: &str) -> Result<()> {
        if self.offset % 8 == 0 {
            return Ok(());
        }
        Err(Error::Other(format!(
            "{op}: {what} starts at element {} of its buffer, not a multiple of 8 (the \
             tensor-core kernels load 16-byte chunks)",
            self.offset
        )))
    }

    /// The elements `offset .. offset + numel(shape)` of this reference, under `shape`.
    pub fn sub(&self, offset: usize, shape: &[usize]) -> Result<Bf16Ref<'a>> {
        let n = crate::tensor::numel(shape);
        if offset + n > self.numel() {
            return Err(Error::shape(
                "bf16 view",
                format!("part at offset {offset}"),
                format!("at most {} elements", self.numel().saturating_sub(offset)),
                shape,
            ));
        }
        Ok(Bf16Ref {
            tensor: self.tensor,
            offset: self.offset + offset,
            shape: shape.to_vec(),
        })
    }

    /// The GPU holding the values, when they are on one and `others` are on the same one: where
    /// an op runs its kernel that reads bf16 itself (elsewhere it widens, exactly).
    pub fn gpu_with(&self, others: &[&View]) -> Option<std::sync::Arc<crate::device::CudaDevice>> {
        match self.tensor.device() {
            Device::Cuda(dev)
                if others
                    .iter()
                    .all(|v| v.device().same_as(&Device::Cuda(dev.clone()))) =>
            {
                Some(dev)
            }
            _ => None,
        }
    }

    /// The host values read (errors unless the tensor is bf16 on the CPU).
    pub fn cpu(&self) -> Result<&'a [bf16]> {
        Ok(&self.tensor.cpu_bf16()?[self.offset..self.offset + self.numel()])
    }

    /// The device values read (errors unless the tensor is bf16 on a GPU).
    pub fn cuda(&self) -> Result<cudarc::driver::CudaView<'a, bf16>> {
        Ok(self
            .tensor
            .cuda_bf16()?
            .slice(self.offset..self.offset + self.numel()))
    }
}

impl<'a> From<&'a Tensor> for Bf16Ref<'a> {
    fn from(t: &'a Tensor) -> Self {
        Bf16Ref::new(t)
    }
}

/// A layer's input: f32 values in a view, or bf16 values (an activation kept rounded to bf16
/// under the bf16 policy, see [`keep`]). Layers whose arithmetic is bf16 read a bf16 operand
/// as it is (no cast), the others widen it (exact).
#[derive(Clone)]
pub enum Operand<'a> {
    /// f32 (or f64 on the CPU) values.
    F32(View<'a>),
    /// bf16 values.
    Bf16(Bf16Ref<'a>),
}

impl<'a> Operand<'a> {
    /// The tensor as an operand: bf16 when it holds bf16, else its view.
    pub fn of(t: &'a Tensor) -> Result<Operand<'a>> {
        Ok(match t.dtype() {
            DType::BF16 => Operand::Bf16(Bf16Ref::new(t)),
            _ => Operand::F32(t.as_view()?),
        })
    }

    /// The shape the reader sees.
    pub fn shape(&self) -> &[usize] {
        match self {
            Operand::F32(v) => v.shape(),
            Operand::Bf16(r) => r.shape(),
        }
    }

    /// The device holding the values.
    pub fn device(&self) -> Device {
        match self {
            Operand::F32(v) => v.device(),
            Operand::Bf16(r) => r.tensor.device(),
        }
    }

    /// The values' type (`BF16` for a kept bf16 activation).
    pub fn dtype(&self) -> DType {
        match self {
            Operand::F32(v) => v.dtype(),
            Operand::Bf16(_) => DType::BF16,
        }
    }

    /// The elements `offset .. offset + numel(shape)` under `shape`.
    pub fn sub(&self, offset: usize, shape: &[usize]) -> Result<Operand<'a>> {
        Ok(match self {
            Operand::F32(v) => Operand::F32(v.sub(offset, shape)?),
            Operand::Bf16(r) => Operand::Bf16(r.sub(offset, shape)?),
        })
    }

    /// The same values under another shape with as many elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<Operand<'a>> {
        let n = crate::tensor::numel(self.shape());
        if crate::tensor::numel(shape) != n {
            return Err(Error::shape(
                "reshape",
                "target shape",
                format!("{n} elements"),
                shape,
            ));
        }
        self.sub(0, shape)
    }

    /// A copy in a tensor of its own, of the same type (for a level without blocks, whose
    /// output is its input).
    pub fn to_tensor(&self) -> Result<Tensor> {
        match self {
            Operand::F32(v) => v.to_tensor(),
            Operand::Bf16(r) => to_bf16(&to_f32(r.clone())?),
        }
    }

    /// The values as f32: the view itself, or a widened copy of the bf16 values (exact).
    pub fn widen(&self) -> Result<Wide<'a>> {
        Ok(match self {
            Operand::F32(v) => Wide::View(v.clone()),
            Operand::Bf16(r) => Wide::Owned(to_f32(r.clone())?),
        })
    }

    /// The values as bf16: the kept values themselves, or a rounded copy of the f32 view.
    pub fn narrow(&self) -> Result<Narrow<'a>> {
        Ok(match self {
            Operand::F32(v) => Narrow::Owned(to_bf16(v)?),
            Operand::Bf16(r) => Narrow::Kept(r.clone()),
        })
    }
}

/// An operand's f32 values ([`Operand::widen`]).
pub enum Wide<'a> {
    /// The operand's own view.
    View(View<'a>),
    /// A widened copy, freed with this value.
    Owned(Tensor),
}

impl Wide<'_> {
    /// The values.
    pub fn view(&self) -> Result<View<'_>> {
        match self {
            Wide::View(v) => Ok(v.clone()),
            Wide::Owned(t) => t.as_view(),
        }
    }
}

/// An operand's bf16 values ([`Operand::narrow`]).
pub enum Narrow<'a> {
    /// The kept bf16 values.
    Kept(Bf16Ref<'a>),
    /// A rounded copy, freed with this value.
    Owned(Tensor),
}

impl Narrow<'_> {
    /// The values for a bf16 GEMM or convolution.
    pub fn as_ref(&self) -> Bf16Ref<'_> {
        match self {
            Narrow::Kept(r) => r.clone(),
            Narrow::Owned(t) => Bf16Ref::new(t),
        }
    }
}

/// An activation a forward keeps for its backward: under the bf16 policy rounded to bf16 (half
/// the memory; the forward goes on from the rounded values, so its backward is the exact VJP
/// of what it computed), else as it is.
pub fn keep(t: Tensor, precision: Precision) -> Result<Tensor> {
    match (precision, t.dtype()) {
        (Precision::Bf16, DType::F32) => to_bf16(&t),
        _ => Ok(t),
    }
}
