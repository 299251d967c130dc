//! The bf16 precision policy's conversions and its rule for tensor-core operands.
//!
//! Policy (issue 11): GEMM and convolution operands in bf16, accumulation and everything after
//! it (bias, normalisation statistics, softmax, the loss, CG scalars, Adam, EMA) in f32. f32 ->
//! bf16 rounds to nearest even, NaN stays NaN and infinities are kept, on both backends
//! (`half::bf16::from_f32` on the CPU, `__float2bfloat16_rn` on a GPU: the same bits); bf16 ->
//! f32 is exact. So a CPU twin that converts the same bf16 operands to f32 and runs the f32
//! oracle sees exactly the values a tensor core multiplies: only the order of the f32 additions
//! differs (kernels/mma.cuh adds 16-wide blocks), which is what the parity tolerances cover.

use half::bf16;

use super::{mismatch, one_device};
use crate::device::launch::grid_stride;
use crate::error::{Error, Result};
use crate::tensor::{AsView, AsViewMut, DType, Data, Tensor};
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

/// A bf16 tensor's values as f32 (exact), on the same device.
pub fn to_f32(x: &Tensor) -> Result<Tensor> {
    let device = x.device();
    let mut y = Tensor::uninit(x.shape(), DType::F32, &device)?;
    match &device {
        Device::Cuda(dev) => {
            crate::device::note_op();
            let cfg = grid_stride(dev, x.numel());
            let (xv, mut yv) = (x.cuda_bf16()?, y.cuda_f32_mut()?);
            // SAFETY: x and y both hold numel values.
            unsafe {
                dev.kernels()
                    .cast_bf16_to_f32(cfg, &xv, &mut yv, x.numel() as i64)
            }?;
        }
        Device::Cpu => {
            let src = x.cpu_bf16()?;
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
