//! Launching kernels: the typed launchers generated from the kernels' CUDA signatures
//! (build/interface.rs: `Kernels` has one `unsafe fn` per kernel, `params` the `#[repr(C)]`
//! structs they take), and the few launch-configuration rules every launch site shares.

use cudarc::driver::LaunchConfig;

use super::CudaDevice;
use crate::error::{Error, Result};

include!(concat!(env!("OUT_DIR"), "/launchers.rs"));

impl Kernels {
    /// Called by every launcher once its kernel is queued.
    fn after_launch(&self, kernel: &str, module: &str) -> Result<()> {
        super::note_launch();
        // While a graph is captured nothing runs yet: the replay is waited for instead.
        if super::check_each_launch() && !super::graph::capturing() {
            super::note_sync();
            self.stream
                .synchronize()
                .map_err(|e| Error::cuda(format!("kernel {kernel} (kernels/{module}.cu) failed"), e))?;
        }
        Ok(())
    }
}

/// Threads per block of the grid-stride and warp-per-row kernels.
pub const THREADS: u32 = 256;

/// A grid-stride launch over `items` work items (elements, or float4s for vectorised kernels),
/// 256 threads per block, with enough blocks to cover them up to 16 per SM (the loop does the rest).
pub fn grid_stride(dev: &CudaDevice, items: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (dev.grid_for(items, THREADS), 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per row, grid-stride over the rows (the row kernels of norm.cu and attention.cu).
pub fn warp_per_row(dev: &CudaDevice, rows: usize) -> LaunchConfig {
    grid_stride(dev, rows * 32)
}

/// An explicit grid of blocks of `threads` threads (kernels whose blocks map to data: per-channel
/// columns, reduction partials, GEMM tiles).
pub fn blocks(grid: (u32, u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}
