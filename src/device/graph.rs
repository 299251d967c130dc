//! CUDA graphs: a fixed-shape piece of work (a training step) recorded once from the stream and
//! replayed with one launch, so the host queues one graph instead of hundreds of kernels. What a
//! replay varies by must live on the device (the step clock, the training log's header); the
//! capture refuses work that synchronises with or uploads from the host, and the pool is frozen
//! while it records (device/pool.rs), so every address a replay touches stays the graph's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaStream};

use super::pool::GraphArena;
use super::{Counts, CudaDevice};
use crate::error::{Error, Result};

/// Whether a capture is recording now (its launches run later, at replays, so
/// `EMPRIOR_CHECK_LAUNCHES` waits for the replay instead of for each kernel).
static CAPTURING: AtomicBool = AtomicBool::new(false);

/// See [`CAPTURING`].
pub(crate) fn capturing() -> bool {
    CAPTURING.load(Ordering::Relaxed)
}

/// `EMPRIOR_CUDA_GRAPHS=1`: trainers and samplers on a GPU replay their steps from CUDA graphs
/// (`Trainer::set_cuda_graphs`, `Sampler::cuda_graphs`; their default). Off by default until
/// the device check has compared replays with eager steps on a GPU (scripts/device-check.sh).
pub fn cuda_graphs_from_env() -> bool {
    super::env_flag("EMPRIOR_CUDA_GRAPHS")
}

/// A captured graph and the pool buffers its replays use.
pub struct CapturedGraph {
    graph: CudaGraph,
    stream: Arc<CudaStream>,
    /// Held, not read: the buffers go back to the pool when the graph is dropped.
    _arena: GraphArena,
}

// SAFETY: the driver's graph handles may be used from any thread as long as no two threads use
// one at once (CUDA's "graph objects are not internally synchronized"); a CapturedGraph is owned
// by one value (not Sync), so moving it between threads never shares it, and each launch binds
// the device's context to the calling thread first (cudarc's launch does).
unsafe impl Send for CapturedGraph {}

impl CapturedGraph {
    /// Queues one replay on the device's stream (one launch, no synchronisation).
    pub fn replay(&self) -> Result<()> {
        self.graph
            .launch()
            .map_err(|e| Error::cuda("launching a captured CUDA graph", e))?;
        super::note_launch();
        if super::check_each_launch() {
            super::note_sync();
            self.stream
                .synchronize()
                .map_err(|e| Error::cuda("a replay of a captured CUDA graph failed", e))?;
        }
        Ok(())
    }
}

/// A capture in progress on a device: [`Recording::end`] ends it; dropped unended (a panic in
/// the work being recorded), it still ends it and thaws the pool.
struct Recording<'a> {
    dev: &'a CudaDevice,
}

type Ended = (
    std::result::Result<Option<CudaGraph>, cudarc::driver::DriverError>,
    Result<GraphArena>,
);

impl Recording<'_> {
    /// Ends the stream's capture (so it takes eager work again) and the pool's.
    fn end(self) -> Ended {
        let ended = end_recording(self.dev);
        std::mem::forget(self);
        ended
    }
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        drop(end_recording(self.dev));
    }
}

fn end_recording(dev: &CudaDevice) -> Ended {
    CAPTURING.store(false, Ordering::Relaxed);
    (
        dev.stream().end_capture(CUgraphInstantiate_flags(0)),
        dev.pool.end_capture(),
    )
}

impl CudaDevice {
    /// Records what `work` queues on the stream into a graph, without running it (launch
    /// [`CapturedGraph::replay`] to run it, the first time included). Run the same work once
    /// eagerly before, so the pool holds every buffer it needs: a buffer the pool does not have
    /// cached, a host synchronisation or an upload inside `work` makes the capture fail (and
    /// `work`'s kernels did not run). Host-side effects of `work` happen once, here. Nothing
    /// else may queue work on the device (from another thread) while it records: the device
    /// has one stream, and the capture would take that work in.
    pub fn capture(&self, work: impl FnOnce() -> Result<()>) -> Result<CapturedGraph> {
        self.pool.begin_capture()?;
        if let Err(e) = self
            .stream()
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        {
            drop(self.pool.end_capture());
            return Err(Error::cuda("starting a CUDA graph capture", e));
        }
        let before = Counts::now();
        let recording = Recording { dev: self };
        CAPTURING.store(true, Ordering::Relaxed);
        let ran = work();
        let captured = Counts::since(before);
        let (ended, arena) = recording.end();
        ran?;
        let graph = ended
            .map_err(|e| Error::cuda("ending a CUDA graph capture", e))?
            .ok_or_else(|| Error::Other("the CUDA graph capture recorded nothing".into()))?;
        let arena = arena?;
        if captured.syncs > 0 || captured.uploads > 0 {
            return Err(Error::Other(format!(
                "the captured work synchronised with the host {} time(s) and uploaded {} time(s): \
                 a replay would reuse those values",
                captured.syncs, captured.uploads
            )));
        }
        graph
            .upload()
            .map_err(|e| Error::cuda("uploading a captured CUDA graph", e))?;
        Ok(CapturedGraph {
            graph,
            stream: self.stream().clone(),
            _arena: arena,
        })
    }
}
