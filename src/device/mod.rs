//! Where tensors live and ops run: the CPU (always there; the oracle) or a CUDA GPU.

mod clock;
mod cuda;
mod graph;
pub mod launch;
mod poison;
mod pool;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

pub use clock::{ClockLink, StepClock};
pub use cuda::{probe as probe_cuda, CudaDevice};
pub use graph::{cuda_graphs_from_env, CapturedGraph};
pub use launch::{params, Kernels};
pub use poison::{poison_enabled, set_poison, POISON_BYTE};
pub use pool::{size_class, GraphArena, PhaseStats, PoolStats, PooledBuffer};

use crate::error::{Error, Result};

/// A compute device. Cloning is cheap (the CUDA device is shared).
#[derive(Clone)]
pub enum Device {
    /// The host, running the plain-Rust op bodies: always available, and the oracle.
    Cpu,
    /// A CUDA GPU, opened once per ordinal and shared by every handle to it.
    Cuda(Arc<CudaDevice>),
}

/// What the user asked for: `auto` (a GPU when one is usable, else the CPU), `cpu`, `cuda` or
/// `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// A GPU (ordinal 0) when one is usable, else the CPU; the default.
    #[default]
    Auto,
    /// The CPU, even when a GPU is present.
    Cpu,
    /// The GPU of this ordinal (`cuda` alone means 0); opening it fails when it is not usable.
    Cuda(usize),
}

impl FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceRequest::Cuda)
                .ok_or_else(|| format!("unknown device '{s}' (expected auto, cpu, cuda or cuda:N)")),
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Auto => f.write_str("auto"),
            DeviceRequest::Cpu => f.write_str("cpu"),
            DeviceRequest::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

// ---- Counters of host synchronisations, kernel launches and op calls ---------------------------
//
// Process-wide and cheap (one relaxed atomic add each), so that a test or `emprior bench` can
// count what a training or sampler step costs the host. A synchronisation is anything that makes
// the host wait for the device: a device-to-host read or an explicit stream synchronisation on a
// GPU, and on the CPU backend each place that would be one on a GPU (reading a tensor's values
// into host memory: `to_vec_f32`, `to_vec_f64`). A launch is one kernel queued by a generated
// launcher (GPU only); an op call is one call of an op of `crate::ops` or of a layer's kernel
// family that checks its operands' device (either backend: the CPU's stand-in for launches).

static SYNCS: AtomicU64 = AtomicU64::new(0);
static UPLOADS: AtomicU64 = AtomicU64::new(0);
static LAUNCHES: AtomicU64 = AtomicU64::new(0);
static OPS: AtomicU64 = AtomicU64::new(0);

/// Host synchronisations so far in this process (see the counters' notes above).
pub fn sync_count() -> u64 {
    SYNCS.load(Ordering::Relaxed)
}

/// Host-to-device copies so far in this process: a tensor made from host values (on either
/// backend: on the CPU, where it would be an upload on a GPU) or copied to a GPU, and a step
/// clock set from the host. A step that makes none (and no synchronisation) takes nothing from
/// the host that changes from step to step, which is what replaying a captured step needs.
pub fn upload_count() -> u64 {
    UPLOADS.load(Ordering::Relaxed)
}

/// Counts one host-to-device copy (see [`upload_count`]).
pub(crate) fn note_upload() {
    UPLOADS.fetch_add(1, Ordering::Relaxed);
}

/// Kernel launches so far in this process (GPU only).
pub fn launch_count() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

/// Op calls so far in this process (either backend).
pub fn op_count() -> u64 {
    OPS.load(Ordering::Relaxed)
}

/// Counts one host synchronisation (or, on the CPU, one place that would be one on a GPU).
pub fn note_sync() {
    SYNCS.fetch_add(1, Ordering::Relaxed);
}

/// Counts one op call.
pub fn note_op() {
    OPS.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn note_launch() {
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
}

/// Whether the switch `name` is set in the environment: `1`, `true`, `yes` or `on` (spaces
/// around ignored); anything else, or unset, is off. Every `EMPRIOR_*` on/off switch reads this.
pub fn env_flag(name: &str) -> bool {
    matches!(
        std::env::var(name).as_deref().map(str::trim),
        Ok("1") | Ok("true") | Ok("yes") | Ok("on")
    )
}

/// `EMPRIOR_CHECK_LAUNCHES=1`: wait for every kernel right after its launch, so an asynchronous
/// fault (an illegal address, a trap) is reported with the name of the kernel that caused it
/// rather than at some later synchronisation. Slow; for a first run on a new GPU and debugging.
pub fn check_each_launch() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| env_flag("EMPRIOR_CHECK_LAUNCHES"))
}

/// The three counters at one moment; `since` gives what happened between two of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Host synchronisations (see [`sync_count`]).
    pub syncs: u64,
    /// Host-to-device copies (see [`upload_count`]).
    pub uploads: u64,
    /// Kernel launches, GPU only (see [`launch_count`]).
    pub launches: u64,
    /// Op calls on either backend (see [`op_count`]).
    pub ops: u64,
}

impl Counts {
    /// The process-wide counters as they are now.
    pub fn now() -> Counts {
        Counts {
            syncs: sync_count(),
            uploads: upload_count(),
            launches: launch_count(),
            ops: op_count(),
        }
    }

    /// What was counted from `earlier` to now.
    pub fn since(earlier: Counts) -> Counts {
        let now = Counts::now();
        Counts {
            syncs: now.syncs - earlier.syncs,
            uploads: now.uploads - earlier.uploads,
            launches: now.launches - earlier.launches,
            ops: now.ops - earlier.ops,
        }
    }
}

/// Opened GPUs, one per ordinal for the life of the process: a context, its loaded kernels and
/// its memory pool are shared by every `Device::cuda(n)`.
fn opened() -> &'static Mutex<HashMap<usize, Arc<CudaDevice>>> {
    static OPENED: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
    OPENED.get_or_init(Default::default)
}

impl Device {
    /// Marks the start of a phase of a run for the GPU pool (`CudaDevice::set_pool_phase`):
    /// the previous phase's cached buffers are released and peaks are kept per phase. Nothing
    /// on the CPU.
    pub fn set_memory_phase(&self, name: &'static str) {
        if let Device::Cuda(dev) = self {
            dev.set_pool_phase(name)
        }
    }

    /// "phase: peak GiB in use, GiB held" for every phase so far (empty on the CPU).
    pub fn memory_phase_summary(&self) -> String {
        match self {
            Device::Cpu => String::new(),
            Device::Cuda(dev) => dev
                .pool_phases()
                .iter()
                .map(|p| {
                    format!(
                        "{}: peak {:.2} GiB in use, {:.2} GiB held",
                        p.name,
                        p.peak_bytes_in_use as f64 / (1u64 << 30) as f64,
                        p.peak_bytes_held as f64 / (1u64 << 30) as f64
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        }
    }

    /// GPU `ordinal`, opened once per process. Fails with `Error::GpuUnavailable(reason)`.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        let mut map = opened().lock().unwrap();
        if let Some(dev) = map.get(&ordinal) {
            return Ok(Device::Cuda(dev.clone()));
        }
        let dev = CudaDevice::open(ordinal)?;
        map.insert(ordinal, dev.clone());
        Ok(Device::Cuda(dev))
    }

    /// The first GPU when one is usable, else the CPU, with the reason the GPU was passed over.
    pub fn auto() -> (Device, Option<String>) {
        Device::auto_at(0)
    }

    /// [`Device::auto`] with the GPU of this ordinal (a data-parallel rank's local rank).
    pub fn auto_at(ordinal: usize) -> (Device, Option<String>) {
        match Device::cuda(ordinal) {
            Ok(d) => (d, None),
            Err(Error::GpuUnavailable(reason)) => (Device::Cpu, Some(reason)),
            Err(e) => (Device::Cpu, Some(e.to_string())),
        }
    }

    /// Resolves a request; an explicit `cuda` request fails when no GPU is usable.
    pub fn open(request: DeviceRequest) -> Result<Device> {
        match request {
            DeviceRequest::Auto => Ok(Device::auto().0),
            DeviceRequest::Cpu => Ok(Device::Cpu),
            DeviceRequest::Cuda(n) => Device::cuda(n),
        }
    }

    /// Memory a run can still allocate: on a GPU the driver's free memory less the pool's
    /// headroom (`pool::headroom`), plus what the pool holds idle; on the CPU the host's
    /// MemAvailable. None when it cannot be read.
    pub fn memory_available(&self) -> Option<usize> {
        match self {
            Device::Cpu => crate::host_pool::available_bytes(),
            Device::Cuda(dev) => {
                let (free, total) = dev.context().mem_get_info().ok()?;
                Some(free.saturating_sub(pool::headroom(total)) + dev.pool_stats().bytes_cached)
            }
        }
    }

    /// True for a GPU.
    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// Both are the CPU, or both are the same GPU.
    pub fn same_as(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Cuda(a), Device::Cuda(b)) => a.ordinal() == b.ordinal(),
            _ => false,
        }
    }

    /// Waits for queued GPU work (a no-op on the CPU).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(d) => d.synchronize(),
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(d) => write!(f, "{d:?}"),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(d) => write!(f, "cuda:{}", d.ordinal()),
        }
    }
}
