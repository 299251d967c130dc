//! A step clock: the index of the current step, kept on the device where the step's kernels read
//! it (its random streams, its learning rate, its log record), so that a step captured once in a
//! CUDA graph replays as the next step and not as the same one again. Whatever ends a step
//! advances it on the device (the Adam update's norm finish, kernels/adam.cu); the host keeps a
//! mirror it advances at the same place in program order, which on the CPU backend is the clock.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaViewMut, DevicePtr};

use super::{CudaDevice, Device};
use crate::error::{Error, Result};

/// A u64 step index on a device, with its host mirror.
pub struct StepClock {
    step: u64,
    cuda: Option<(CudaSlice<u64>, Arc<CudaDevice>)>,
}

impl std::fmt::Debug for StepClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StepClock(step {}, {})",
            self.step,
            if self.cuda.is_some() { "cuda" } else { "cpu" }
        )
    }
}

/// How a random stream moves with a step clock (see [`crate::ops::Philox::moving`]): at step s
/// the stream index is `stream + s * stream_per_step` and the first element
/// `offset + s * offset_per_step`. It names the clock by its device address, read by the kernel
/// when it runs, and by the host mirror's value when the link was made, which the CPU bodies
/// use. A link is made for one step's ops ([`StepClock::link`]) and must not outlive the clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClockLink {
    pub(crate) address: u64,
    pub(crate) step: u64,
    /// Stream indices added per step.
    pub stream_per_step: u64,
    /// Elements added to the first element's offset per step.
    pub offset_per_step: u64,
}

impl StepClock {
    /// A clock at `step` on `device` (on a GPU one u64 of device memory, written once here).
    pub fn new(step: u64, device: &Device) -> Result<Self> {
        let cuda = match device {
            Device::Cpu => None,
            Device::Cuda(dev) => {
                super::note_upload();
                let buf = dev
                    .stream()
                    .clone_htod(&[step])
                    .map_err(|e| Error::cuda("creating a step clock", e))?;
                Some((buf, dev.clone()))
            }
        };
        Ok(StepClock { step, cuda })
    }

    /// The step index, as the host mirrors it (the device's value once the queued work is done).
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Moves the host mirror to the next step: called where the kernel that advances the
    /// device's value was queued (on the CPU, where its body ran).
    pub(crate) fn advanced(&mut self) {
        self.step += 1;
    }

    /// Ends a step: the device's value moves to the next step (a one-thread kernel queued after
    /// the step's work, so a captured step advances it at every replay) and so does the mirror.
    /// What ends a training step advances its clock itself (the Adam update's norm finish); a
    /// sampler step calls this.
    pub fn advance(&mut self) -> Result<()> {
        if let Some((buf, dev)) = &mut self.cuda {
            // SAFETY: the clock is one live u64 of device memory; one thread adds 1 to it.
            unsafe {
                dev.kernels()
                    .step_clock_advance(super::launch::blocks((1, 1, 1), 1), &mut buf.as_view_mut())
            }?;
        }
        self.advanced();
        Ok(())
    }

    /// Sets the host mirror back to `step`: for a step whose kernels never ran (an abandoned
    /// capture), so the device's value did not move.
    pub(crate) fn rewind_mirror(&mut self, step: u64) {
        self.step = step;
    }

    /// The device's value, for a kernel that reads and advances it (None on the CPU).
    pub(crate) fn cuda_mut(&mut self) -> Option<CudaViewMut<'_, u64>> {
        self.cuda.as_mut().map(|(b, _)| b.as_view_mut())
    }

    /// A link for this step's random streams: they move by `stream_per_step` streams and
    /// `offset_per_step` elements per step.
    pub fn link(&self, stream_per_step: u64, offset_per_step: u64) -> ClockLink {
        let address = match &self.cuda {
            Some((buf, dev)) => {
                let (ptr, _sync) = buf.device_ptr(dev.stream());
                ptr
            }
            None => 0,
        };
        ClockLink {
            address,
            step: self.step,
            stream_per_step,
            offset_per_step,
        }
    }
}
