//! The EM driver (method.md §8): a Gaussian prior fitted by EM first, then laps of E-step
//! (a posterior sample for every observation, batched, with MMPS under the current prior) and
//! M-step (denoising score matching on those samples, warm-started, optimizer state reset).
//!
//! Every lap ends with its results written atomically into `lap-XXX/` of the run directory and
//! a `DONE` marker last; `resume` continues after the last lap that has one. All randomness is
//! Philox keyed by (seed, lap, purpose), so on the CPU a resumed run reproduces an
//! uninterrupted one bit for bit.

pub mod config;
pub mod manifold;

pub use config::Config;
pub use manifold::{run_manifold, LapMetrics};

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A seed for one purpose in one lap, derived from the run's seed (splitmix64).
pub fn derive_seed(seed: u64, lap: usize, purpose: u64) -> u64 {
    let mut z = seed ^ ((lap as u64) << 20) ^ purpose.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `lap-XXX` inside the run directory.
pub fn lap_dir(run: &Path, lap: usize) -> PathBuf {
    run.join(format!("lap-{lap:03}"))
}

/// The last lap whose directory holds a DONE marker (None: not even the initialisation).
pub fn last_complete_lap(run: &Path) -> Option<usize> {
    let mut lap = None;
    for k in 0.. {
        if lap_dir(run, k).join("DONE").is_file() {
            lap = Some(k);
        } else {
            break;
        }
    }
    lap
}

/// Creates the run directory (or checks an existing one) and fails early, naming the path, when
/// it cannot be written.
pub fn prepare_run_dir(run: &Path) -> Result<()> {
    fs::create_dir_all(run)
        .map_err(|e| Error::Other(format!("cannot create the run directory {}: {e}", run.display())))?;
    let probe = run.join(".write-test");
    fs::write(&probe, b"ok").map_err(|e| {
        Error::Other(format!(
            "the run directory {} is not writable: {e}",
            run.display()
        ))
    })?;
    let _ = fs::remove_file(probe);
    Ok(())
}

/// Marks a lap complete (the last write of a lap).
pub fn mark_done(run: &Path, lap: usize) -> Result<()> {
    crate::io::write_atomically(&lap_dir(run, lap).join("DONE"), b"complete\n")
}
