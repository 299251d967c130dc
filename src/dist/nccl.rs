//! NCCL between GPUs (the `nccl` feature, on top of `mpi`): the M-step's ordered gradient sum
//! runs on device buffers, in the device's own stream, instead of through host memory. NCCL is
//! loaded at run time through cudarc (the binary never links it); its communicator is made at
//! the first sum of a GPU tensor, its unique id broadcast from rank 0 over MPI. A missing
//! libnccl is a clear error at that point (or set `EMPRIOR_NCCL=0` to go through the host).
//! CPU tensors, and every other collective, go through MPI.

use std::sync::Mutex;

use cudarc::nccl::safe::{Comm, Id};

use super::mpi::MpiWorld;
use super::{Communicator, DeviceCollectives};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// MPI's world, with an NCCL communicator over the ranks' GPUs made on first use.
pub struct NcclWorld {
    mpi: MpiWorld,
    nccl: Mutex<Option<NcclComm>>,
    enabled: bool,
}

/// One NCCL communicator and the GPU (ordinal) it was made on.
struct NcclComm {
    comm: Comm,
    ordinal: usize,
}

// SAFETY: the NCCL communicator is only used under the mutex, one call at a time, in the stream
// it was made with.
unsafe impl Send for NcclComm {}

impl NcclWorld {
    /// MPI's world; NCCL unless `EMPRIOR_NCCL=0`.
    pub fn start() -> Result<NcclWorld> {
        Ok(NcclWorld {
            mpi: MpiWorld::start()?,
            nccl: Mutex::new(None),
            enabled: std::env::var("EMPRIOR_NCCL").as_deref() != Ok("0"),
        })
    }

    /// Runs `f` with the NCCL communicator of GPU `device`, making it first (a collective over
    /// every rank: they all reach it at the same sum).
    fn with_comm<R>(&self, device: &Device, f: impl FnOnce(&Comm) -> Result<R>) -> Result<R> {
        let Device::Cuda(dev) = device else {
            return Err(Error::Other("NCCL sums take GPU tensors".into()));
        };
        let mut slot = self.nccl.lock().unwrap_or_else(|e| e.into_inner());
        // NCCL takes the GPU from the thread's current context (this may be a pool thread).
        dev.context()
            .bind_to_thread()
            .map_err(|e| Error::Other(format!("binding GPU {} for NCCL: {e:?}", dev.ordinal())))?;
        if slot.is_none() {
            // SAFETY: probing whether the library can be loaded; nothing is called yet.
            if !unsafe { cudarc::nccl::sys::is_culib_present() } {
                return Err(Error::Other(
                    "NCCL (libnccl.so.2) cannot be loaded: install NCCL, put it on \
                     LD_LIBRARY_PATH, or set EMPRIOR_NCCL=0 to sum GPU gradients through the host"
                        .into(),
                ));
            }
            let mut internal = [0u8; 128];
            if self.mpi.rank() == 0 {
                let id = Id::new().map_err(|e| Error::Other(format!("ncclGetUniqueId: {e:?}")))?;
                for (b, c) in internal.iter_mut().zip(id.internal()) {
                    *b = *c as u8;
                }
            }
            self.mpi.broadcast(0, &mut internal)?;
            let id = Id::uninit(internal.map(|b| b as core::ffi::c_char));
            let comm = Comm::from_rank(dev.stream().clone(), self.mpi.rank(), self.mpi.world_size(), id)
                .map_err(|e| Error::Other(format!("ncclCommInitRank: {e:?}")))?;
            *slot = Some(NcclComm {
                comm,
                ordinal: dev.ordinal(),
            });
        }
        let nccl = slot.as_ref().expect("made above");
        if nccl.ordinal != dev.ordinal() {
            return Err(Error::Other(format!(
                "NCCL was set up on GPU {}, and a tensor on GPU {} came to it",
                nccl.ordinal,
                dev.ordinal()
            )));
        }
        f(&nccl.comm)
    }
}

fn peer(r: usize) -> i32 {
    r as i32
}

impl DeviceCollectives for NcclWorld {
    fn send(&self, t: &Tensor, to: usize) -> Result<()> {
        self.with_comm(&t.device(), |c| {
            c.send(&t.cuda_f32()?, peer(to))
                .map_err(|e| Error::Other(format!("ncclSend to rank {to}: {e:?}")))
        })
    }

    fn recv(&self, t: &mut Tensor, from: usize) -> Result<()> {
        self.with_comm(&t.device(), |c| {
            c.recv(&mut t.cuda_f32_mut()?, peer(from))
                .map(drop)
                .map_err(|e| Error::Other(format!("ncclRecv from rank {from}: {e:?}")))
        })
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.with_comm(&t.device(), |c| {
            c.broadcast_in_place(&mut t.cuda_f32_mut()?, peer(root))
                .map(drop)
                .map_err(|e| Error::Other(format!("ncclBroadcast from rank {root}: {e:?}")))
        })
    }
}

impl Communicator for NcclWorld {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }

    fn world_size(&self) -> usize {
        self.mpi.world_size()
    }

    fn name(&self) -> String {
        if self.enabled {
            format!("{} with NCCL for GPU sums", self.mpi.name())
        } else {
            format!("{}; NCCL off (EMPRIOR_NCCL=0)", self.mpi.name())
        }
    }

    fn send(&self, to: usize, bytes: &[u8]) -> Result<()> {
        self.mpi.send(to, bytes)
    }

    fn recv(&self, from: usize, bytes: &mut [u8]) -> Result<()> {
        self.mpi.recv(from, bytes)
    }

    fn broadcast(&self, root: usize, bytes: &mut [u8]) -> Result<()> {
        self.mpi.broadcast(root, bytes)
    }

    fn all_gather(&self, mine: &[u8], counts: &[usize]) -> Result<Vec<u8>> {
        self.mpi.all_gather(mine, counts)
    }

    fn barrier(&self) -> Result<()> {
        self.mpi.barrier()
    }

    fn abort(&self, code: i32) {
        self.mpi.abort(code)
    }

    fn device_collectives(&self) -> Option<&dyn DeviceCollectives> {
        self.enabled.then_some(self as &dyn DeviceCollectives)
    }
}
