//! The MPI transport: rsmpi over the system's MPI (Open MPI from Debian's packages in CI),
//! started at `MPI_THREAD_SERIALIZED` because the runs call it from a pool thread, one call at a
//! time (a mutex makes sure of it). Errors are MPI's default, fatal: a failed call, or a rank
//! that died, ends the job through the launcher, which names the rank.

use std::sync::Mutex;

use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;

use super::Communicator;
use crate::error::{Error, Result};

/// MPI's world communicator.
pub struct MpiWorld {
    comm: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    library: String,
}

// SAFETY: the handle is only used under the mutex, one call at a time, which is what
// MPI_THREAD_SERIALIZED (checked at start) allows from any thread.
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

/// The MPI environment, finalised by [`finish`].
struct Environment {
    _universe: mpi::environment::Universe,
}
// SAFETY: only moved into and out of the static below, and dropped (MPI_Finalize) once.
unsafe impl Send for Environment {}

static ENVIRONMENT: Mutex<Option<Environment>> = Mutex::new(None);

impl MpiWorld {
    /// Initialises MPI (once per process) and returns its world.
    pub fn start() -> Result<MpiWorld> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| Error::Other("MPI was already initialised in this process".into()))?;
        if threading < Threading::Serialized {
            return Err(Error::Other(format!(
                "the MPI library offers thread level {threading:?}; emprior needs Serialized"
            )));
        }
        let world = universe.world();
        let library = mpi::environment::library_version()
            .unwrap_or_default()
            .trim_end_matches('\0')
            .split(',')
            .next()
            .unwrap_or("MPI")
            .to_string();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        *ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(Environment { _universe: universe });
        Ok(MpiWorld {
            comm: Mutex::new(world),
            rank,
            size,
            library,
        })
    }

    fn with<R>(&self, f: impl FnOnce(&SimpleCommunicator) -> R) -> R {
        f(&self.comm.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn check_rank(&self, what: &str, r: usize) -> Result<i32> {
        if r >= self.size || r == self.rank {
            return Err(Error::Other(format!(
                "MPI {what}: rank {r} is not another rank of {} (this is rank {})",
                self.size, self.rank
            )));
        }
        Ok(r as i32)
    }
}

/// MPI counts are C ints: a message of 2 GiB or more is refused with the size named.
fn count(bytes: usize) -> Result<i32> {
    i32::try_from(bytes).map_err(|_| {
        Error::Other(format!(
            "an MPI message of {bytes} bytes is over MPI's 2 GiB count limit"
        ))
    })
}

impl Communicator for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn name(&self) -> String {
        self.library.clone()
    }

    fn send(&self, to: usize, bytes: &[u8]) -> Result<()> {
        let to = self.check_rank("send", to)?;
        count(bytes.len())?;
        self.with(|w| w.process_at_rank(to).send(bytes));
        Ok(())
    }

    fn recv(&self, from: usize, bytes: &mut [u8]) -> Result<()> {
        let from = self.check_rank("receive", from)?;
        count(bytes.len())?;
        let status = self.with(|w| w.process_at_rank(from).receive_into(bytes));
        let got = status.count(u8::equivalent_datatype()) as usize;
        if got != bytes.len() {
            return Err(Error::Other(format!(
                "MPI receive from rank {from}: {got} bytes arrived, {} expected",
                bytes.len()
            )));
        }
        Ok(())
    }

    fn broadcast(&self, root: usize, bytes: &mut [u8]) -> Result<()> {
        if root >= self.size {
            return Err(Error::Other(format!(
                "MPI broadcast: no rank {root} of {}",
                self.size
            )));
        }
        count(bytes.len())?;
        self.with(|w| w.process_at_rank(root as i32).broadcast_into(bytes));
        Ok(())
    }

    fn all_gather(&self, mine: &[u8], counts: &[usize]) -> Result<Vec<u8>> {
        if counts.len() != self.size || counts[self.rank] != mine.len() {
            return Err(Error::Other(format!(
                "MPI all-gather: {} counts for {} ranks, this rank's {:?} for {} bytes",
                counts.len(),
                self.size,
                counts.get(self.rank),
                mine.len()
            )));
        }
        let total: usize = counts.iter().sum();
        let ints = counts.iter().map(|&c| count(c)).collect::<Result<Vec<i32>>>()?;
        count(total)?;
        let displs: Vec<i32> = ints
            .iter()
            .scan(0i32, |at, &c| {
                let d = *at;
                *at += c;
                Some(d)
            })
            .collect();
        let mut out = vec![0u8; total];
        {
            let mut part = mpi::datatype::PartitionMut::new(&mut out[..], &ints[..], &displs[..]);
            self.with(|w| w.all_gather_varcount_into(mine, &mut part));
        }
        Ok(out)
    }

    fn barrier(&self) -> Result<()> {
        self.with(|w| w.barrier());
        Ok(())
    }

    fn abort(&self, code: i32) {
        self.with(|w| w.abort(code))
    }
}

/// MPI_Finalize, after the last collective of the run (every rank calls it; Open MPI's launcher
/// reports a rank that exits without it as failed).
pub fn finish() {
    let env = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(env);
}
