//! The CUDA device: one context, one stream, every kernel loaded once at start-up, and the memory
//! pool. Probing never panics: cudarc panics when libcuda cannot be loaded, so we check for the
//! library first and also guard the driver calls against unwinding.

use std::panic::catch_unwind;
use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::launch::Kernels;
use super::pool::{DevicePool, PoolStats, PooledBuffer};
use crate::error::{Error, Result};
use crate::kernels;

/// Loads `kernels/<name>.cu` from the fatbin (SASS for the device, or its PTX JIT-compiled by the
/// driver), falling back to the stand-alone PTX. A module built for one architecture alone
/// (`target`, e.g. `sm_90a`) is loaded only on a GPU of that compute capability (`None`
/// elsewhere); if it fails to load there the device opens without it, saying so once.
fn load_module(
    ctx: &Arc<CudaContext>,
    name: &str,
    target: Option<&str>,
    compute_capability: (i32, i32),
) -> Result<Option<Arc<CudaModule>>> {
    let Some(target) = target else {
        return load_any(ctx, name).map(Some);
    };
    let (major, minor) = compute_capability;
    if target.trim_start_matches("sm_").trim_end_matches('a') != format!("{major}{minor}") {
        return Ok(None);
    }
    match load_any(ctx, name) {
        Ok(m) => Ok(Some(m)),
        Err(e) => {
            eprintln!(
                "emprior: kernels/{name}.cu ({target}) did not load on this GPU; going on without it: {e}"
            );
            Ok(None)
        }
    }
}

fn load_any(ctx: &Arc<CudaContext>, name: &str) -> Result<Arc<CudaModule>> {
    let module = kernels::module(name).ok_or_else(|| {
        Error::GpuUnavailable(format!("kernel module {name} is not embedded in this build"))
    })?;
    match ctx.load_module(Ptx::from_binary(module.fatbin.to_vec())) {
        Ok(m) => Ok(m),
        Err(fatbin_err) => ctx.load_module(Ptx::from_src(module.ptx)).map_err(|ptx_err| {
            Error::cuda(
                format!(
                    "loading {name}.cu (fatbin: {fatbin_err:?}; PTX ISA {})",
                    module.ptx_isa
                ),
                ptx_err,
            )
        }),
    }
}

/// Counts CUDA devices, or says why none can be used. Never panics.
pub fn probe() -> std::result::Result<usize, String> {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(
            "no CUDA driver: libcuda.so could not be loaded (no NVIDIA driver on this machine)".into(),
        );
    }
    match catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) if n > 0 => Ok(n as usize),
        Ok(Ok(_)) => Err("the CUDA driver reports no devices".into()),
        Ok(Err(e)) => Err(format!("CUDA driver present but unusable: {e:?}")),
        Err(_) => Err("the CUDA driver library could not be initialised (cudarc panicked)".into()),
    }
}

/// A GPU ready to run kernels.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    sm_count: u32,
    total_memory: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pub(super) pool: Arc<DevicePool>,
    kernels: Kernels,
    /// Whether the convolutions' forward and input gradient run on Hopper's wgmma kernels
    /// (kernels/conv_sm90a.cu) instead of mma.sync; off until the tensor-core check turns it on
    /// (`EMPRIOR_WGMMA=1`, and the kernels gave the CPU's bits on this GPU).
    wgmma: std::sync::atomic::AtomicBool,
}

impl CudaDevice {
    /// Opens device `ordinal`: context, stream, all kernels. Errors are `GpuUnavailable`.
    pub fn open(ordinal: usize) -> Result<Arc<CudaDevice>> {
        let count = probe().map_err(Error::GpuUnavailable)?;
        if ordinal >= count {
            return Err(Error::GpuUnavailable(format!(
                "cuda:{ordinal} requested but the driver reports {count} device(s)"
            )));
        }
        if !kernels::kernels_embedded() {
            return Err(Error::GpuUnavailable(
                "this binary was built without CUDA kernels (no nvcc at build time; run \
                 scripts/install-cuda-toolkit.sh and rebuild)"
                    .into(),
            ));
        }
        let ctx = catch_unwind(|| CudaContext::new(ordinal))
            .map_err(|_| Error::GpuUnavailable("creating the CUDA context panicked".into()))?
            .map_err(|e| {
                Error::GpuUnavailable(format!("creating a context on cuda:{ordinal} failed: {e:?}"))
            })?;
        // One stream for everything: stream order is our synchronisation, so cudarc's per-buffer
        // event tracking is pure overhead (and gets in the way of graph capture). Must precede
        // every allocation.
        // SAFETY: no buffer exists yet, and all work goes to the one stream below.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| Error::cuda("creating the stream", e))?;
        let attr = |a| {
            ctx.attribute(a)
                .map_err(|e| Error::cuda("reading device attributes", e))
        };
        let sm_count = attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let compute_capability = ctx
            .compute_capability()
            .map_err(|e| Error::cuda("reading the compute capability", e))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown CUDA device".into());
        let total_memory = ctx.total_mem().unwrap_or(0);
        let kernels = Kernels::load(stream.clone(), |module, target| {
            load_module(&ctx, module, target, compute_capability)
        })?;
        let pool = Arc::new(DevicePool::new(stream.clone()));
        Ok(Arc::new(CudaDevice {
            ordinal,
            name,
            compute_capability,
            sm_count,
            total_memory,
            ctx,
            stream,
            pool,
            kernels,
            wgmma: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The CUDA device index it was opened with (`cuda:N`).
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    /// The driver's name for the device, e.g. `"NVIDIA H200"`.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// `(major, minor)`, e.g. `(9, 0)` for sm_90.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }
    /// The number of streaming multiprocessors (grid-stride launches size their grids by it).
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }
    /// Total device memory in bytes (0 when the driver could not say).
    pub fn total_memory(&self) -> usize {
        self.total_memory
    }
    /// The cudarc context, for driver queries such as free memory.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The one stream every copy and kernel is queued on: stream order is what orders ops.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// The launchers of every embedded kernel, loaded when the device was opened.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// Whether this GPU can run the wgmma kernels: their sm_90a module loaded (compute
    /// capability 9.0: H100, H200).
    pub fn has_wgmma(&self) -> bool {
        self.kernels.module_loaded("conv_sm90a")
    }

    /// Whether the convolutions' forward and input gradient run on the wgmma kernels now.
    pub fn wgmma(&self) -> bool {
        self.wgmma.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Chooses wgmma (`true`) or mma.sync for the convolutions' forward and input gradient.
    /// Turning it on where the sm_90a module did not load is an error. The tensor-core check
    /// (`nn::tensor_cores`) is what turns it on in a run; tests and benchmarks choose directly.
    pub fn set_wgmma(&self, on: bool) -> Result<()> {
        if on && !self.has_wgmma() {
            return Err(Error::GpuUnavailable(format!(
                "wgmma kernels need an sm_90a GPU (H100, H200) with kernels/conv_sm90a.cu loaded; {} is \
                 compute capability {}.{}",
                self.name, self.compute_capability.0, self.compute_capability.1
            )));
        }
        self.wgmma.store(on, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Device memory from the pool, contents undefined.
    pub fn alloc(&self, bytes: usize) -> Result<PooledBuffer> {
        self.pool.alloc(bytes)
    }

    /// A snapshot of the memory pool's counters.
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// The most pool bytes lent out at once since the last `reset_pool_peak`.
    pub fn pool_peak_bytes(&self) -> usize {
        self.pool.peak_bytes()
    }

    /// Restarts [`CudaDevice::pool_peak_bytes`] from the bytes handed out now.
    pub fn reset_pool_peak(&self) {
        self.pool.reset_peak()
    }

    /// Enters a phase of a run (e.g. "m-step", "e-step"): the previous phase's cached buffers
    /// go back to the driver, and peaks are kept per phase.
    pub fn set_pool_phase(&self, name: &'static str) {
        self.pool.set_phase(name)
    }

    /// Every phase's peaks so far.
    pub fn pool_phases(&self) -> Vec<super::pool::PhaseStats> {
        self.pool.phases()
    }

    /// Returns the pool's cached buffers to the driver.
    pub fn trim_pool(&self) {
        self.pool.trim()
    }

    /// Waits for all queued work; surfaces asynchronous kernel errors. Every device-to-host
    /// read ends here, so this is where the GPU's synchronisations are counted.
    pub fn synchronize(&self) -> Result<()> {
        super::note_sync();
        self.stream
            .synchronize()
            .map_err(|e| Error::cuda("synchronizing the stream", e))
    }

    /// A grid for a grid-stride elementwise kernel over `n` items with `threads` per block:
    /// enough blocks to cover `n`, capped at 16 blocks per SM (the grid-stride loop covers the rest).
    pub(crate) fn grid_for(&self, n: usize, threads: u32) -> u32 {
        let needed = n.div_ceil(threads as usize).max(1);
        needed.min(self.sm_count as usize * 16) as u32
    }
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuda:{} ({}, sm_{}{}, {} SMs, {:.1} GiB)",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.sm_count,
            self.total_memory as f64 / (1u64 << 30) as f64
        )
    }
}
