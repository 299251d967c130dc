//! Beyond one process (issue 17, first part): how a launcher placed this process (rank, world
//! size, local rank, from `RANK`/`WORLD_SIZE`/`LOCAL_RANK`, Slurm's `SLURM_PROCID`/`SLURM_NTASKS`/
//! `SLURM_LOCALID`, or Open MPI's `OMPI_COMM_WORLD_*`), and the communicator the data-parallel EM
//! will reduce through. Only the single-process communicator exists so far: a launch of more
//! than one process is refused before any work, with a message that says so, instead of N
//! independent copies of the same run racing for one run directory.

use crate::error::{Error, Result};

/// Where this process sits among the processes of one job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// This process's index, `0..world_size`; rank 0 writes checkpoints, metrics and plots.
    pub rank: usize,
    /// How many processes the job has.
    pub world_size: usize,
    /// This process's index among those on its node: the GPU ordinal it takes.
    pub local_rank: usize,
    /// Which launcher's variables said so ("single process" when none did).
    pub source: &'static str,
}

impl Launch {
    /// One process alone (no launcher variables).
    pub const SINGLE: Launch = Launch {
        rank: 0,
        world_size: 1,
        local_rank: 0,
        source: "single process",
    };
}

/// The launchers' variables, in the order they are trusted: torchrun-style first (set explicitly
/// by a user or a wrapper), then Open MPI's (`mpirun`), then Slurm's (`srun`; under `srun` with
/// an MPI, the MPI's own variables are the more specific).
const FAMILIES: [(&str, [&str; 3]); 3] = [
    ("RANK/WORLD_SIZE/LOCAL_RANK", ["RANK", "WORLD_SIZE", "LOCAL_RANK"]),
    (
        "Open MPI (OMPI_COMM_WORLD_*)",
        [
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
        ],
    ),
    (
        "Slurm (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID)",
        ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"],
    ),
];

/// Reads the launch from variables looked up by `var` (the environment, or a map in tests): the
/// first family with its rank or size set decides; its rank and size must both be set, be
/// integers and satisfy rank < size; the local rank defaults to the rank when absent. No family
/// set: [`Launch::SINGLE`].
pub fn detect(var: impl Fn(&str) -> Option<String>) -> Result<Launch> {
    for (source, [rank_var, size_var, local_var]) in FAMILIES {
        let (rank, size) = (var(rank_var), var(size_var));
        if rank.is_none() && size.is_none() {
            continue;
        }
        let number = |name: &str, value: Option<String>| -> Result<usize> {
            let value = value.ok_or_else(|| {
                Error::Other(format!(
                    "launch: {name} is not set but {} is ({source}); set both, or neither for one process",
                    if name == rank_var { size_var } else { rank_var }
                ))
            })?;
            value.trim().parse::<usize>().map_err(|_| {
                Error::Other(format!(
                    "launch: {name} = '{value}' is not a non-negative integer ({source})"
                ))
            })
        };
        let rank = number(rank_var, rank)?;
        let world_size = number(size_var, size)?;
        if world_size == 0 || rank >= world_size {
            return Err(Error::Other(format!(
                "launch: {rank_var} = {rank} with {size_var} = {world_size}: the rank must be below the world size ({source})"
            )));
        }
        let local_rank = match var(local_var) {
            Some(v) => v.trim().parse::<usize>().map_err(|_| {
                Error::Other(format!(
                    "launch: {local_var} = '{v}' is not a non-negative integer ({source})"
                ))
            })?,
            None => rank,
        };
        return Ok(Launch {
            rank,
            world_size,
            local_rank,
            source,
        });
    }
    Ok(Launch::SINGLE)
}

/// The launch of this process, from its environment.
pub fn launch() -> Result<Launch> {
    detect(|name| std::env::var(name).ok())
}

/// What the data-parallel EM needs from a transport: sums over every rank of host buffers (the
/// Gaussian initialisation's moments, gradients on the CPU backend), in a fixed order so results
/// do not depend on timing, and a barrier.
pub trait Communicator {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// How many processes take part.
    fn world_size(&self) -> usize;
    /// Replaces `buf` on every rank by the element-wise sum over ranks.
    fn all_reduce_sum(&self, buf: &mut [f64]) -> Result<()>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
}

/// World size 1: every collective is the identity. No dependency; the default.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Communicator for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}

/// The communicator for `launch`: [`SingleProcess`] for one process; for more, an error before
/// any work (this build has no MPI or NCCL transport yet), naming the launcher.
pub fn communicator(launch: &Launch) -> Result<Box<dyn Communicator>> {
    if launch.world_size == 1 {
        return Ok(Box::new(SingleProcess));
    }
    Err(Error::Other(format!(
        "launched as rank {} of {} ({}), but this build of emprior runs one process only: the \
         MPI and NCCL transports of the data-parallel EM do not exist yet. Run one process \
         (without mpirun/srun -n N, or with the launcher's variables unset)",
        launch.rank, launch.world_size, launch.source
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn no_launcher_is_one_process() {
        assert_eq!(detect(env(&[])).unwrap(), Launch::SINGLE);
    }

    #[test]
    fn each_launcher_family_is_read() {
        let l = detect(env(&[("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "1")])).unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (3, 8, 1));
        let l = detect(env(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ]))
        .unwrap();
        assert_eq!((l.rank, l.world_size, l.local_rank), (1, 2, 1));
        assert!(l.source.starts_with("Open MPI"));
        let l = detect(env(&[("SLURM_PROCID", "5"), ("SLURM_NTASKS", "6")])).unwrap();
        assert_eq!(
            (l.rank, l.world_size, l.local_rank),
            (5, 6, 5),
            "local rank defaults to the rank"
        );
        // torchrun's variables win over Slurm's (a wrapper set them on purpose).
        let l = detect(env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "4"),
        ]))
        .unwrap();
        assert_eq!(l.world_size, 1);
    }

    #[test]
    fn inconsistent_launches_are_named() {
        let e = detect(env(&[("RANK", "1")])).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE is not set"), "{e}");
        let e = detect(env(&[("RANK", "x"), ("WORLD_SIZE", "2")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK = 'x'"), "{e}");
        let e = detect(env(&[("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("below the world size"), "{e}");
        let e = detect(env(&[("RANK", "0"), ("WORLD_SIZE", "0")]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("below the world size"), "{e}");
    }

    #[test]
    fn one_process_reduces_to_itself_and_more_are_refused() {
        let c = communicator(&Launch::SINGLE).unwrap();
        let mut buf = [1.5, -2.0];
        c.all_reduce_sum(&mut buf).unwrap();
        c.barrier().unwrap();
        assert_eq!((c.rank(), c.world_size(), buf), (0, 1, [1.5, -2.0]));
        let two = detect(env(&[
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
        ]))
        .unwrap();
        let Err(e) = communicator(&two) else {
            panic!("two processes must be refused")
        };
        let e = e.to_string();
        assert!(e.contains("rank 0 of 2") && e.contains("Open MPI"), "{e}");
    }
}
