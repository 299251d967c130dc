//! `Tensor`: a shape, a dtype and contiguous row-major storage on one device.
//!
//! Ops work in f32 on both backends and in f64 on the CPU (the oracle). bf16 tensors are the
//! tensor-core operands of the bf16 precision policy (`ops::precision`, `ops::gemm_bf16_into`,
//! `nn::conv::bf16`): no view holds them, the ops that take them read the tensor itself
//! ([`Tensor::cuda_bf16`], [`Tensor::cpu_bf16`]).

use cudarc::driver::{CudaView, CudaViewMut};
use half::bf16;

use crate::device::{CudaDevice, Device, PooledBuffer};
use crate::error::{Error, Result};
use crate::real::Real;
use std::sync::Arc;

pub use crate::dtype::DType;

/// Host storage, one variant per dtype.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    /// f32 elements, row-major.
    F32(Vec<f32>),
    /// bf16 elements, row-major.
    BF16(Vec<bf16>),
    /// f64 elements, row-major.
    F64(Vec<f64>),
}

/// Device storage: a buffer lent by the GPU's memory pool (its size class, at least the tensor's
/// bytes) and the GPU it lives on. The buffer goes back to the pool when this is dropped.
pub struct CudaStorage {
    buf: PooledBuffer,
    device: Arc<CudaDevice>,
}

/// Where a tensor's elements live.
pub enum Storage {
    /// In host memory.
    Cpu(CpuStorage),
    /// In the device memory of one GPU.
    Cuda(CudaStorage),
}

/// An owned n-dimensional array: a shape, a [`DType`] and contiguous row-major storage on one
/// [`Device`]. A scalar has shape `[]`. Ops read and write tensors through [`AsView`] and
/// [`AsViewMut`]; there is no `Clone` (copy with [`Tensor::to_device`]).
///
/// ```
/// use emprior::{DType, Device, Tensor};
///
/// let t = Tensor::from_f32(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3], &Device::Cpu)?;
/// assert_eq!(t.shape(), &[2, 3]);
/// assert_eq!((t.dtype(), t.numel()), (DType::F32, 6));
/// let t = t.reshape(&[3, 2])?; // same data, row-major
/// assert_eq!(t.to_vec_f32()?, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
///
/// let z = Tensor::zeros(&[4], DType::F64, &Device::Cpu)?;
/// assert_eq!(z.to_vec_f64()?, [0.0; 4]);
/// // The data must match the shape.
/// assert!(Tensor::from_f32(&[1.0, 2.0], &[3], &Device::Cpu).is_err());
/// # Ok::<(), emprior::Error>(())
/// ```
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

impl Tensor {
    // ---- construction -------------------------------------------------------------------

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n = checked_numel(shape, dtype)?;
        let storage = match device {
            Device::Cpu => Storage::Cpu(CpuStorage::zeroed(dtype, n)?),
            Device::Cuda(dev) => {
                let mut buf = dev.alloc(n * dtype.size_in_bytes())?;
                dev.stream()
                    .memset_zeros(buf.slice_mut())
                    .map_err(|e| Error::cuda("zeroing a tensor", e))?;
                Storage::Cuda(CudaStorage {
                    buf,
                    device: dev.clone(),
                })
            }
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage,
        })
    }

    /// A tensor for an op to write before anything reads it. Its contents are undefined: recycled
    /// memory on both backends (`host_pool` on the CPU, zeros when none is free), or NaN on both
    /// in poison mode
    /// ([`crate::device::poison_enabled`]), so a read before the write shows in every test.
    pub fn uninit(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n = checked_numel(shape, dtype)?;
        let storage = match device {
            Device::Cpu => Storage::Cpu(CpuStorage::uninit(dtype, n, crate::device::poison_enabled())?),
            Device::Cuda(dev) => Storage::Cuda(CudaStorage {
                buf: dev.alloc(n * dtype.size_in_bytes())?,
                device: dev.clone(),
            }),
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            storage,
        })
    }

    /// An f32 tensor filled with `value` (made on the host and copied to a GPU: a constructor
    /// for tests and setup; `ops::fill` fills a tensor in place on its device).
    pub fn full(shape: &[usize], value: f32, device: &Device) -> Result<Tensor> {
        Tensor::from_f32(&vec![value; numel(shape)], shape, device)
    }

    /// An f32 tensor from host data (copied to the device when it is a GPU).
    pub fn from_f32(data: &[f32], shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::from_host(CpuStorage::F32(data.to_vec()), data.len(), shape, device)
    }

    /// A bf16 tensor from host data (copied to the device when it is a GPU).
    pub fn from_bf16(data: &[bf16], shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::from_host(CpuStorage::BF16(data.to_vec()), data.len(), shape, device)
    }

    /// An f64 tensor from host data.
    pub fn from_f64(data: &[f64], shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::from_host(CpuStorage::F64(data.to_vec()), data.len(), shape, device)
    }

    /// A tensor of `dtype` from f64 host values (rounded for f32), on `device`.
    pub fn from_f64_as(data: &[f64], shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        match dtype {
            DType::F64 => Tensor::from_f64(data, shape, device),
            DType::F32 => {
                Tensor::from_f32(&data.iter().map(|&v| v as f32).collect::<Vec<_>>(), shape, device)
            }
            DType::BF16 => Err(Error::DType {
                op: "from_f64_as",
                expected: "f32 or f64",
                actual: "bf16",
            }),
        }
    }

    fn from_host(storage: CpuStorage, len: usize, shape: &[usize], device: &Device) -> Result<Tensor> {
        if numel(shape) != len {
            return Err(Error::shape(
                "Tensor::from_host",
                "data",
                format!("{len} elements"),
                shape,
            ));
        }
        let host = Tensor {
            shape: shape.to_vec(),
            dtype: storage.dtype(),
            storage: Storage::Cpu(storage),
        };
        match device {
            // Where a GPU would copy (to_device counts that one).
            Device::Cpu => {
                crate::device::note_upload();
                Ok(host)
            }
            Device::Cuda(_) => host.to_device(device),
        }
    }

    // ---- inspection ---------------------------------------------------------------------

    /// The dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The number of elements: the product of the shape (1 for shape `[]`).
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// The bytes the elements take, `numel * dtype.size_in_bytes()` (a GPU buffer may be larger).
    pub fn size_in_bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }

    /// The device holding the data (a cheap handle clone).
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.device.clone()),
        }
    }

    /// The underlying storage, for code that needs the raw host vector or device buffer.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    // ---- moving data --------------------------------------------------------------------

    /// A copy on `device` (host <-> device, or a plain copy on the same device).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        let storage = match (&self.storage, device) {
            (Storage::Cpu(c), Device::Cpu) => Storage::Cpu(c.clone()),
            (Storage::Cpu(c), Device::Cuda(dev)) => {
                crate::device::note_upload();
                let mut buf = dev.alloc(self.size_in_bytes())?;
                let bytes = c.as_bytes();
                let mut dst = buf.slice_mut().slice_mut(0..bytes.len());
                dev.stream()
                    .memcpy_htod(bytes, &mut dst)
                    .map_err(|e| Error::cuda("copying a tensor to the GPU", e))?;
                Storage::Cuda(CudaStorage {
                    buf,
                    device: dev.clone(),
                })
            }
            (Storage::Cuda(s), Device::Cpu) => Storage::Cpu(s.to_host(self.dtype, self.numel())?),
            (Storage::Cuda(s), Device::Cuda(dev)) => {
                if s.device.ordinal() != dev.ordinal() {
                    let host = Storage::Cpu(s.to_host(self.dtype, self.numel())?);
                    let t = Tensor {
                        shape: self.shape.clone(),
                        dtype: self.dtype,
                        storage: host,
                    };
                    return t.to_device(device);
                }
                let mut buf = dev.alloc(self.size_in_bytes())?;
                let n = self.size_in_bytes();
                let src = s.buf.slice().slice(0..n);
                let mut dst = buf.slice_mut().slice_mut(0..n);
                dev.stream()
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(|e| Error::cuda("copying a tensor on the GPU", e))?;
                Storage::Cuda(CudaStorage {
                    buf,
                    device: dev.clone(),
                })
            }
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            dtype: self.dtype,
            storage,
        })
    }

    /// The f32 contents, copied to the host (waits for queued GPU work).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        self.count_host_read();
        match &mut self.to_device(&Device::Cpu)?.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(std::mem::take(v)),
            _ => Err(self.dtype_error("to_vec_f32", "f32")),
        }
    }

    /// The f64 contents, copied to the host.
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        self.count_host_read();
        match &mut self.to_device(&Device::Cpu)?.storage {
            Storage::Cpu(CpuStorage::F64(v)) => Ok(std::mem::take(v)),
            _ => Err(self.dtype_error("to_vec_f64", "f64")),
        }
    }

    /// The same data under another shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            return Err(Error::shape(
                "reshape",
                "target shape",
                format!("{} elements", self.numel()),
                shape,
            ));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// On the CPU backend, counts a read of values into host memory as the synchronisation it
    /// would be on a GPU (where `CudaDevice::synchronize` counts it).
    fn count_host_read(&self) {
        if matches!(self.storage, Storage::Cpu(_)) {
            crate::device::note_sync();
        }
    }

    // ---- typed access for op bodies -----------------------------------------------------

    pub(crate) fn dtype_error(&self, op: &'static str, expected: &'static str) -> Error {
        Error::DType {
            op,
            expected,
            actual: self.dtype.name(),
        }
    }

    /// A device view of the f32 data (the tensor must be an f32 tensor on a GPU).
    pub fn cuda_f32(&self) -> Result<CudaView<'_, f32>> {
        let n = self.numel();
        match &self.storage {
            Storage::Cuda(s) if self.dtype == DType::F32 => {
                // SAFETY: the buffer holds at least n f32 values (allocated for this shape).
                Ok(unsafe { s.buf.slice().transmute::<f32>(n) }.expect("buffer sized for the tensor"))
            }
            Storage::Cuda(_) => Err(self.dtype_error("cuda_f32", "f32")),
            Storage::Cpu(_) => Err(Error::DeviceMismatch {
                op: "cuda_f32",
                detail: "tensor is on the CPU".into(),
            }),
        }
    }

    /// A mutable device view of the f32 data (the tensor must be an f32 tensor on a GPU; errors
    /// with `DeviceMismatch` on the CPU and `DType` otherwise).
    pub fn cuda_f32_mut(&mut self) -> Result<CudaViewMut<'_, f32>> {
        let n = self.numel();
        let dtype = self.dtype;
        match &mut self.storage {
            Storage::Cuda(s) if dtype == DType::F32 => {
                // SAFETY: as in cuda_f32.
                Ok(
                    unsafe { s.buf.slice_mut().transmute_mut::<f32>(n) }
                        .expect("buffer sized for the tensor"),
                )
            }
            Storage::Cuda(_) => Err(Error::DType {
                op: "cuda_f32_mut",
                expected: "f32",
                actual: dtype.name(),
            }),
            Storage::Cpu(_) => Err(Error::DeviceMismatch {
                op: "cuda_f32_mut",
                detail: "tensor is on the CPU".into(),
            }),
        }
    }
}

impl Tensor {
    // ---- bf16 data (tensor-core operands; no view holds them, ops take the tensor) ----------

    /// The host bf16 data (errors unless a bf16 tensor on the CPU).
    pub fn cpu_bf16(&self) -> Result<&[bf16]> {
        match &self.storage {
            Storage::Cpu(CpuStorage::BF16(v)) => Ok(&v[..]),
            _ => Err(self.bf16_error("cpu_bf16", false)),
        }
    }

    /// The host bf16 data, mutably (errors unless a bf16 tensor on the CPU).
    pub fn cpu_bf16_mut(&mut self) -> Result<&mut [bf16]> {
        let err = self.bf16_error("cpu_bf16_mut", false);
        match &mut self.storage {
            Storage::Cpu(CpuStorage::BF16(v)) => Ok(&mut v[..]),
            _ => Err(err),
        }
    }

    /// A device view of the bf16 data (errors unless a bf16 tensor on a GPU).
    pub fn cuda_bf16(&self) -> Result<CudaView<'_, bf16>> {
        let n = self.numel();
        match &self.storage {
            // SAFETY: the buffer holds at least n bf16 values (allocated for this shape).
            Storage::Cuda(s) if self.dtype == DType::BF16 => {
                Ok(unsafe { s.buf.slice().transmute::<bf16>(n) }.expect("buffer sized for the tensor"))
            }
            _ => Err(self.bf16_error("cuda_bf16", true)),
        }
    }

    /// A mutable device view of the bf16 data (errors unless a bf16 tensor on a GPU).
    pub fn cuda_bf16_mut(&mut self) -> Result<CudaViewMut<'_, bf16>> {
        let n = self.numel();
        let err = self.bf16_error("cuda_bf16_mut", true);
        match &mut self.storage {
            Storage::Cuda(s) if self.dtype == DType::BF16 => {
                // SAFETY: as in cuda_bf16.
                Ok(unsafe { s.buf.slice_mut().transmute_mut::<bf16>(n) }
                    .expect("buffer sized for the tensor"))
            }
            _ => Err(err),
        }
    }

    fn bf16_error(&self, op: &'static str, on_gpu: bool) -> Error {
        if self.dtype != DType::BF16 {
            return self.dtype_error(op, "bf16");
        }
        Error::DeviceMismatch {
            op,
            detail: format!(
                "wanted bf16 data {}, the tensor is on {}",
                if on_gpu { "on a GPU" } else { "on the host" },
                self.device()
            ),
        }
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?}, {}, {})",
            self.shape,
            self.dtype.name(),
            self.device()
        )
    }
}

/// A dropped buffer goes back to the host pool for the next `Tensor::uninit` of its length.
impl Drop for CpuStorage {
    fn drop(&mut self) {
        match self {
            CpuStorage::F32(v) => crate::host_pool::give(std::mem::take(v)),
            CpuStorage::F64(v) => crate::host_pool::give(std::mem::take(v)),
            CpuStorage::BF16(_) => {}
        }
    }
}

impl CpuStorage {
    /// A dropped buffer of `n` elements of `dtype` from the host pool (stale contents), if any.
    fn recycled(dtype: DType, n: usize) -> Option<CpuStorage> {
        match dtype {
            DType::F32 => crate::host_pool::take::<f32>(n).map(CpuStorage::F32),
            DType::F64 => crate::host_pool::take::<f64>(n).map(CpuStorage::F64),
            DType::BF16 => None,
        }
    }

    /// `n` elements of `dtype` for an op to overwrite: a recycled buffer when one is free (stale
    /// contents), zeros otherwise; all NaN with `poison`.
    fn uninit(dtype: DType, n: usize, poison: bool) -> Result<CpuStorage> {
        match Self::recycled(dtype, n) {
            Some(mut s) if poison => {
                s.fill(f64::NAN);
                Ok(s)
            }
            Some(s) => Ok(s),
            None => CpuStorage::filled(dtype, n, if poison { f64::NAN } else { 0.0 }),
        }
    }

    /// `n` zeros of `dtype`: a recycled buffer cleared when one is free (a training step's
    /// per-part gradients come and go every step), else a fresh one.
    fn zeroed(dtype: DType, n: usize) -> Result<CpuStorage> {
        match Self::recycled(dtype, n) {
            Some(mut s) => {
                s.fill(0.0);
                Ok(s)
            }
            None => CpuStorage::filled(dtype, n, 0.0),
        }
    }

    /// Every element set to `value` (NaN stays NaN in every type).
    fn fill(&mut self, value: f64) {
        match self {
            CpuStorage::F32(v) => v.fill(value as f32),
            CpuStorage::BF16(v) => v.fill(bf16::from_f64(value)),
            CpuStorage::F64(v) => v.fill(value),
        }
    }

    /// `n` elements of `dtype`, all equal to `value` (NaN stays NaN in every type).
    /// A request past the memory the system has left is an error that says how much was asked
    /// and how much is available, never an allocator abort.
    fn filled(dtype: DType, n: usize, value: f64) -> Result<CpuStorage> {
        fn vec_of<T: Clone>(n: usize, value: T, dtype: DType) -> Result<Vec<T>> {
            let bytes = n.saturating_mul(dtype.size_in_bytes());
            // Only large requests read /proc/meminfo (a small one cannot be what exhausts it).
            let available = if bytes >= 1 << 26 {
                crate::host_pool::available_bytes()
            } else {
                None
            };
            let refuse = || {
                Error::Other(format!(
                    "cannot allocate {:.2} GB on the host for a tensor of {n} {} values ({} available)",
                    bytes as f64 / 1e9,
                    dtype.name(),
                    available.map_or("unknown".to_string(), |a| format!("{:.2} GB", a as f64 / 1e9))
                ))
            };
            if available.is_some_and(|a| bytes > a) {
                return Err(refuse());
            }
            let mut v = Vec::new();
            v.try_reserve_exact(n).map_err(|_| refuse())?;
            v.resize(n, value);
            Ok(v)
        }
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(vec_of(n, value as f32, dtype)?),
            DType::BF16 => CpuStorage::BF16(vec_of(n, bf16::from_f64(value), dtype)?),
            DType::F64 => CpuStorage::F64(vec_of(n, value, dtype)?),
        })
    }

    /// The dtype of the elements held.
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F64(_) => DType::F64,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::F64(v) => bytemuck::cast_slice(v),
        }
    }
}

impl CudaStorage {
    /// The GPU the buffer belongs to.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    fn to_host(&self, dtype: DType, n: usize) -> Result<CpuStorage> {
        let bytes = n * dtype.size_in_bytes();
        let mut host = vec![0u8; bytes];
        let src = self.buf.slice().slice(0..bytes);
        self.device
            .stream()
            .memcpy_dtoh(&src, &mut host)
            .map_err(|e| Error::cuda("copying a tensor to the host", e))?;
        self.device.synchronize()?;
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(from_bytes(&host)),
            DType::BF16 => CpuStorage::BF16(from_bytes(&host)),
            DType::F64 => CpuStorage::F64(from_bytes(&host)),
        })
    }
}

/// Copies bytes into a typed vector (the byte buffer is only 1-byte aligned, so no cast in place).
fn from_bytes<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<T> {
    let mut v = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
    bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
    v
}

/// The number of elements of a shape (1 for a scalar, shape `[]`).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// The element count of a new tensor, or an error when the shape cannot be addressed.
fn checked_numel(shape: &[usize], dtype: DType) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .filter(|n| {
            n.checked_mul(dtype.size_in_bytes())
                .is_some_and(|b| b <= isize::MAX as usize)
        })
        .ok_or_else(|| Error::Other(format!("a tensor of shape {shape:?} is too large to address")))
}

// ---- borrowed views ---------------------------------------------------------------------------
//
// Ops work on views: a shape plus borrowed contiguous data. A whole tensor is one view; a named
// parameter is a view into the flat parameter buffer (no copy). Rust's borrow rules keep a mutable
// view exclusive.

/// Borrowed data of a view.
pub enum Data<'a> {
    /// f32 elements in host memory.
    F32(&'a [f32]),
    /// f64 elements in host memory.
    F64(&'a [f64]),
    /// f32 elements in device memory, with the GPU they are on (views on a GPU are f32 only).
    Cuda(CudaView<'a, f32>, &'a Arc<CudaDevice>),
}

impl Clone for Data<'_> {
    fn clone(&self) -> Self {
        match self {
            Data::F32(v) => Data::F32(v),
            Data::F64(v) => Data::F64(v),
            Data::Cuda(v, dev) => Data::Cuda(v.slice(..), dev),
        }
    }
}

/// Mutably borrowed data of a view.
pub enum DataMut<'a> {
    /// f32 elements in host memory.
    F32(&'a mut [f32]),
    /// f64 elements in host memory.
    F64(&'a mut [f64]),
    /// f32 elements in device memory, with the GPU they are on (views on a GPU are f32 only).
    Cuda(CudaViewMut<'a, f32>, &'a Arc<CudaDevice>),
}

/// The host slice of view data as `T`, if it holds `T`'s dtype on the host.
fn host_slice<'a, T: Real>(data: &Data<'a>) -> Option<&'a [T]> {
    match data {
        Data::F32(v) if T::DTYPE == DType::F32 => Some(bytemuck::cast_slice(v)),
        Data::F64(v) if T::DTYPE == DType::F64 => Some(bytemuck::cast_slice(v)),
        _ => None,
    }
}

/// The mutable host slice of view data as `T`, if it holds `T`'s dtype on the host.
fn host_slice_mut<'b, T: Real>(data: &'b mut DataMut<'_>) -> Option<&'b mut [T]> {
    match data {
        DataMut::F32(v) if T::DTYPE == DType::F32 => Some(bytemuck::cast_slice_mut(v)),
        DataMut::F64(v) if T::DTYPE == DType::F64 => Some(bytemuck::cast_slice_mut(v)),
        _ => None,
    }
}

/// A read-only view: a shape over contiguous row-major data.
#[derive(Clone)]
pub struct View<'a> {
    shape: Vec<usize>,
    /// The borrowed elements, exactly `numel()` of them; ops match on it to dispatch.
    pub data: Data<'a>,
}

/// A mutable view.
pub struct ViewMut<'a> {
    shape: Vec<usize>,
    /// The mutably borrowed elements, exactly `numel()` of them; ops match on it to dispatch.
    pub data: DataMut<'a>,
}

fn check_sub(len: usize, offset: usize, shape: &[usize]) -> Result<()> {
    if offset + numel(shape) > len {
        return Err(Error::shape(
            "view",
            format!("sub-view at offset {offset}"),
            format!("at most {} elements", len.saturating_sub(offset)),
            shape,
        ));
    }
    Ok(())
}

impl<'a> View<'a> {
    /// The dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements: the product of the shape.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// `F32` or `F64` (always `F32` on a GPU).
    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) | Data::Cuda(..) => DType::F32,
            Data::F64(_) => DType::F64,
        }
    }

    /// The device the data lives on.
    pub fn device(&self) -> Device {
        match &self.data {
            Data::Cuda(_, dev) => Device::Cuda((*dev).clone()),
            _ => Device::Cpu,
        }
    }

    /// The host data as `T` (errors when it is another dtype or on a GPU).
    pub fn cpu<T: Real>(&self) -> Result<&'a [T]> {
        host_slice::<T>(&self.data).ok_or_else(|| Error::DeviceMismatch {
            op: "cpu view",
            detail: format!(
                "wanted {} host data, have {:?} on {}",
                T::DTYPE.name(),
                self.dtype(),
                self.device()
            ),
        })
    }

    /// The GPU this view's data lives on, if any.
    pub fn cuda_device(&self) -> Option<&'a Arc<CudaDevice>> {
        match &self.data {
            Data::Cuda(_, dev) => Some(dev),
            _ => None,
        }
    }

    /// The elements `offset .. offset + numel(shape)` under `shape`.
    pub fn sub(&self, offset: usize, shape: &[usize]) -> Result<View<'a>> {
        check_sub(self.numel(), offset, shape)?;
        let end = offset + numel(shape);
        let data = match &self.data {
            Data::F32(v) => Data::F32(&v[offset..end]),
            Data::F64(v) => Data::F64(&v[offset..end]),
            Data::Cuda(v, dev) => Data::Cuda(v.slice(offset..end), dev),
        };
        Ok(View {
            shape: shape.to_vec(),
            data,
        })
    }

    /// The same data under another shape with as many elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<View<'a>> {
        if numel(shape) != self.numel() {
            return Err(Error::shape(
                "reshape",
                "target shape",
                format!("{} elements", self.numel()),
                shape,
            ));
        }
        self.sub(0, shape)
    }

    /// A new tensor holding a copy of the data, on the same device.
    pub fn to_tensor(&self) -> Result<Tensor> {
        match &self.data {
            // A copy on the device it lives on (no upload, unlike from_f32 on the CPU).
            Data::F32(v) => Ok(Tensor {
                shape: self.shape.clone(),
                dtype: DType::F32,
                storage: Storage::Cpu(CpuStorage::F32(v.to_vec())),
            }),
            Data::F64(v) => Ok(Tensor {
                shape: self.shape.clone(),
                dtype: DType::F64,
                storage: Storage::Cpu(CpuStorage::F64(v.to_vec())),
            }),
            Data::Cuda(v, dev) => {
                let device = Device::Cuda((*dev).clone());
                let mut t = Tensor::uninit(&self.shape, DType::F32, &device)?;
                let mut dst = t.cuda_f32_mut()?;
                dev.stream()
                    .memcpy_dtod(v, &mut dst)
                    .map_err(|e| Error::cuda("copying a view on the GPU", e))?;
                Ok(t)
            }
        }
    }

    /// The values as f64 on the host (for tests and diagnostics).
    pub fn to_vec_f64(&self) -> Result<Vec<f64>> {
        if !matches!(self.data, Data::Cuda(..)) {
            // Counted as on a GPU, where the copy below counts it (see Tensor::to_vec_f32).
            crate::device::note_sync();
        }
        match &self.data {
            Data::F32(v) => Ok(v.iter().map(|&x| x as f64).collect()),
            Data::F64(v) => Ok(v.to_vec()),
            Data::Cuda(..) => Ok(self
                .to_tensor()?
                .to_vec_f32()?
                .iter()
                .map(|&x| x as f64)
                .collect()),
        }
    }
}

impl<'a> ViewMut<'a> {
    /// The dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements: the product of the shape.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// `F32` or `F64` (always `F32` on a GPU).
    pub fn dtype(&self) -> DType {
        self.as_view().dtype()
    }

    /// The host data as `T`, mutably (errors when it is another dtype or on a GPU).
    pub fn cpu_mut<T: Real>(&mut self) -> Result<&mut [T]> {
        let dtype = self.dtype();
        let on_gpu = matches!(self.data, DataMut::Cuda(..));
        host_slice_mut::<T>(&mut self.data).ok_or_else(|| Error::DeviceMismatch {
            op: "cpu view",
            detail: format!(
                "wanted mutable {} host data, have {:?} (on GPU: {on_gpu})",
                T::DTYPE.name(),
                dtype
            ),
        })
    }

    /// A read-only view of the same data.
    pub fn as_view(&self) -> View<'_> {
        let data = match &self.data {
            DataMut::F32(v) => Data::F32(v),
            DataMut::F64(v) => Data::F64(v),
            DataMut::Cuda(v, dev) => Data::Cuda(v.slice(..), dev),
        };
        View {
            shape: self.shape.clone(),
            data,
        }
    }

    /// A shorter-lived mutable view of the same data.
    pub fn reborrow(&mut self) -> ViewMut<'_> {
        let data = match &mut self.data {
            DataMut::F32(v) => DataMut::F32(v),
            DataMut::F64(v) => DataMut::F64(v),
            DataMut::Cuda(v, dev) => DataMut::Cuda(v.slice_mut(..), dev),
        };
        ViewMut {
            shape: self.shape.clone(),
            data,
        }
    }

    /// The elements `offset .. offset + numel(shape)` under `shape`, mutably.
    pub fn sub_mut(&mut self, offset: usize, shape: &[usize]) -> Result<ViewMut<'_>> {
        check_sub(self.numel(), offset, shape)?;
        let end = offset + numel(shape);
        let data = match &mut self.data {
            DataMut::F32(v) => DataMut::F32(&mut v[offset..end]),
            DataMut::F64(v) => DataMut::F64(&mut v[offset..end]),
            DataMut::Cuda(v, dev) => DataMut::Cuda(v.slice_mut(offset..end), dev),
        };
        Ok(ViewMut {
            shape: shape.to_vec(),
            data,
        })
    }

    /// The same data under another shape with as many elements.
    pub fn reshape(self, shape: &[usize]) -> Result<ViewMut<'a>> {
        if numel(shape) != self.numel() {
            return Err(Error::shape(
                "reshape",
                "target shape",
                format!("{} elements", self.numel()),
                shape,
            ));
        }
        Ok(ViewMut {
            shape: shape.to_vec(),
            data: self.data,
        })
    }
}

/// Anything an op can read: a tensor or a view.
pub trait AsView {
    /// A read-only view of all the data; errors for data no view can hold (bf16, or f64 on a
    /// GPU).
    fn as_view(&self) -> Result<View<'_>>;
}

/// Anything an op can write: a tensor or a mutable view.
pub trait AsViewMut {
    /// A mutable view of all the data; errors for data no view can hold (bf16, or f64 on a
    /// GPU).
    fn as_view_mut(&mut self) -> Result<ViewMut<'_>>;
}

impl AsView for Tensor {
    fn as_view(&self) -> Result<View<'_>> {
        let data = match &self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Data::F32(v),
            Storage::Cpu(CpuStorage::F64(v)) => Data::F64(v),
            Storage::Cuda(s) if self.dtype == DType::F32 => Data::Cuda(self.cuda_f32()?, &s.device),
            _ => return Err(self.dtype_error("view", "f32 (or f64 on the CPU)")),
        };
        Ok(View {
            shape: self.shape.clone(),
            data,
        })
    }
}

impl AsView for View<'_> {
    fn as_view(&self) -> Result<View<'_>> {
        Ok(self.clone())
    }
}

impl AsViewMut for Tensor {
    fn as_view_mut(&mut self) -> Result<ViewMut<'_>> {
        let shape = self.shape.clone();
        let dtype = self.dtype;
        let data = match &mut self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => DataMut::F32(v),
            Storage::Cpu(CpuStorage::F64(v)) => DataMut::F64(v),
            Storage::Cuda(s) if dtype == DType::F32 => {
                let n = numel(&shape);
                // SAFETY: the buffer holds at least n f32 values (allocated for this shape).
                let v = unsafe { s.buf.slice_mut().transmute_mut::<f32>(n) }
                    .expect("buffer sized for the tensor");
                DataMut::Cuda(v, &s.device)
            }
            _ => {
                return Err(Error::DType {
                    op: "view_mut",
                    expected: "f32 (or f64 on the CPU)",
                    actual: dtype.name(),
                })
            }
        };
        Ok(ViewMut { shape, data })
    }
}

impl AsViewMut for ViewMut<'_> {
    fn as_view_mut(&mut self) -> Result<ViewMut<'_>> {
        Ok(self.reborrow())
    }
}
