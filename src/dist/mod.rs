//! Beyond one process (issue 17): how a launcher placed this process (rank, world size, local
//! rank, from `RANK`/`WORLD_SIZE`/`LOCAL_RANK`, Slurm's `SLURM_PROCID`/`SLURM_NTASKS`/
//! `SLURM_LOCALID`, or Open MPI's `OMPI_COMM_WORLD_*`), and the communicator the data-parallel
//! EM goes through: [`SingleProcess`] (no dependency, the default) or MPI's world (`dist::mpi`,
//! with the `mpi` feature; `dist::nccl` adds NCCL for GPU tensors, with the `nccl` feature).
//!
//! The data-parallel EM is exact: a rank runs whole parts of each batch (the parts one process
//! runs on its cores), E-step samples are all-gathered in rank order, and the M-step's gradients
//! are summed part by part in rank order ([`ordered_sum`]), so on the CPU backend N processes
//! give the same bits as one, whatever N. A build without MPI refuses a launch of more than one
//! process before any work.

use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod threads;

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

/// What the data-parallel EM needs from a transport: point-to-point messages, a broadcast and an
/// all-gather of bytes, a barrier, and a way to stop every rank. Sums are built on these in a
/// fixed order ([`ordered_sum`]), never on the transport's own reductions, so that results do not
/// depend on its algorithm or timing, and match one process bit for bit on the CPU.
pub trait Communicator: Send + Sync {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// How many processes take part.
    fn world_size(&self) -> usize;
    /// The transport, for logs ("Open MPI v4.1.4", "single process").
    fn name(&self) -> String;
    /// Sends `bytes` to rank `to` (returns when the buffer may be reused).
    fn send(&self, to: usize, bytes: &[u8]) -> Result<()>;
    /// Receives exactly `bytes.len()` bytes from rank `from`.
    fn recv(&self, from: usize, bytes: &mut [u8]) -> Result<()>;
    /// Replaces `bytes` on every rank by rank `root`'s.
    fn broadcast(&self, root: usize, bytes: &mut [u8]) -> Result<()>;
    /// Every rank's `mine`, concatenated in rank order, on every rank; `counts[r]` is rank r's
    /// length in bytes (known to every rank beforehand).
    fn all_gather(&self, mine: &[u8], counts: &[usize]) -> Result<Vec<u8>>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Stops every rank of the job with `code` (after this rank printed why). One process alone
    /// has nobody else to stop: it returns, and the caller exits.
    fn abort(&self, code: i32);
    /// Point-to-point and broadcast of GPU tensors in the device's stream (NCCL), when the
    /// transport has them; [`ordered_sum`] goes through the host otherwise.
    fn device_collectives(&self) -> Option<&dyn DeviceCollectives> {
        None
    }
}

/// What [`ordered_sum`] needs to keep GPU tensors on the device: the same three steps as the
/// host chain, on f32 device buffers.
pub trait DeviceCollectives {
    /// Sends GPU tensor `t` to rank `to`.
    fn send(&self, t: &crate::tensor::Tensor, to: usize) -> Result<()>;
    /// Receives rank `from`'s tensor into `t` (same shape).
    fn recv(&self, t: &mut crate::tensor::Tensor, from: usize) -> Result<()>;
    /// Replaces `t` by rank `root`'s.
    fn broadcast(&self, t: &mut crate::tensor::Tensor, root: usize) -> Result<()>;
}

/// Replaces `buf` on every rank by the element-wise sum over ranks, added in rank order
/// (([r0 + r1] + r2) + ...): the same bits on every rank and on every run.
pub fn all_reduce_sum(comm: &dyn Communicator, buf: &mut [f64]) -> Result<()> {
    let mine = buf.to_vec();
    buf.fill(0.0);
    ordered_sum_host(comm, buf, |acc| {
        acc.iter_mut().zip(&mine).for_each(|(a, m)| *a += m);
        Ok(())
    })
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

    fn name(&self) -> String {
        "single process".into()
    }

    fn send(&self, to: usize, _bytes: &[u8]) -> Result<()> {
        Err(Error::Other(format!(
            "a single process has no rank {to} to send to"
        )))
    }

    fn recv(&self, from: usize, _bytes: &mut [u8]) -> Result<()> {
        Err(Error::Other(format!(
            "a single process has no rank {from} to receive from"
        )))
    }

    fn broadcast(&self, _root: usize, _bytes: &mut [u8]) -> Result<()> {
        Ok(())
    }

    fn all_gather(&self, mine: &[u8], _counts: &[usize]) -> Result<Vec<u8>> {
        Ok(mine.to_vec())
    }

    fn barrier(&self) -> Result<()> {
        Ok(())
    }

    fn abort(&self, _code: i32) {}
}

/// Adds every rank's contribution in rank order: rank 0 runs `add_mine` on `acc` as given (the
/// caller's starting value, zeros for a sum); rank r > 0 first receives the running result of
/// ranks 0..r into `acc`, then adds its own, then passes it on; the last rank's result is
/// broadcast. So every rank ends with the bits one process gets by running every rank's
/// `add_mine` in turn on one accumulator: the data-parallel M-step's gradients are those of
/// one process's step over the whole batch (its parts are added in the same order).
pub fn ordered_sum_host<C: Communicator + ?Sized, T: bytemuck::Pod>(
    comm: &C,
    acc: &mut [T],
    add_mine: impl FnOnce(&mut [T]) -> Result<()>,
) -> Result<()> {
    let (rank, world) = (comm.rank(), comm.world_size());
    if world == 1 {
        return add_mine(acc);
    }
    if rank > 0 {
        comm.recv(rank - 1, bytemuck::cast_slice_mut(acc))?;
    }
    add_mine(acc)?;
    if rank + 1 < world {
        comm.send(rank + 1, bytemuck::cast_slice(acc))?;
    }
    comm.broadcast(world - 1, bytemuck::cast_slice_mut(acc))
}

/// [`ordered_sum_host`] of tensors: `acc` (zeros on every rank, on any device) becomes
/// `acc + parts(rank 0) + parts(rank 1) + ...`, each rank's `parts` added in order with `axpy`
/// (the additions one process makes over all the parts). A GPU tensor goes through the host.
pub fn ordered_sum(
    comm: &dyn Communicator,
    acc: &mut crate::tensor::Tensor,
    parts: &[crate::tensor::Tensor],
) -> Result<()> {
    use crate::tensor::{DType, Tensor};
    let add_parts = |acc: &mut Tensor| parts.iter().try_for_each(|p| crate::ops::axpy(1.0, p, acc));
    if comm.world_size() == 1 {
        return add_parts(acc);
    }
    if let (Some(dev), true, DType::F32) = (comm.device_collectives(), acc.device().is_cuda(), acc.dtype()) {
        // The same chain on the device (NCCL): no copy through the host.
        let (rank, world) = (comm.rank(), comm.world_size());
        if rank > 0 {
            dev.recv(acc, rank - 1)?;
        }
        add_parts(acc)?;
        if rank + 1 < world {
            dev.send(acc, rank + 1)?;
        }
        return dev.broadcast(acc, world - 1);
    }
    match acc.dtype() {
        DType::F32 => chain_through_host(comm, acc, Tensor::to_vec_f32, Tensor::from_f32, &add_parts),
        DType::F64 => chain_through_host(comm, acc, Tensor::to_vec_f64, Tensor::from_f64, &add_parts),
        other => Err(Error::Other(format!(
            "data-parallel sums take f32 or f64 tensors, not {}",
            other.name()
        ))),
    }
}

/// [`ordered_sum_host`] of a tensor's values of type `T`, moved to the host by `to_host` and
/// back by `from_host`; `add_parts` adds this rank's parts to a tensor of the running sum.
fn chain_through_host<T: bytemuck::Pod>(
    comm: &dyn Communicator,
    acc: &mut crate::tensor::Tensor,
    to_host: fn(&crate::tensor::Tensor) -> Result<Vec<T>>,
    from_host: fn(&[T], &[usize], &crate::device::Device) -> Result<crate::tensor::Tensor>,
    add_parts: &dyn Fn(&mut crate::tensor::Tensor) -> Result<()>,
) -> Result<()> {
    let (shape, device) = (acc.shape().to_vec(), acc.device());
    let mut host = to_host(acc)?;
    ordered_sum_host(comm, &mut host, |h| {
        let mut t = from_host(h, &shape, &device)?;
        add_parts(&mut t)?;
        h.copy_from_slice(&to_host(&t)?);
        Ok(())
    })?;
    *acc = from_host(&host, &shape, &device)?;
    Ok(())
}

/// Every rank's f32 rows (`mine`, this rank's share of `shares`, each share's length in
/// values known to every rank), concatenated in rank order.
pub fn all_gather_f32(comm: &dyn Communicator, mine: &[f32], shares: &[usize]) -> Result<Vec<f32>> {
    if comm.world_size() == 1 {
        return Ok(mine.to_vec());
    }
    let counts: Vec<usize> = shares.iter().map(|&n| n * 4).collect();
    let bytes = comm.all_gather(bytemuck::cast_slice(mine), &counts)?;
    // The gathered bytes are not f32-aligned in general: copy them out value by value.
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The contiguous block of `parts` items (a batch's parts, in order) that `rank` of `world`
/// takes, `parts * r / world .. parts * (r + 1) / world`: blocks differ by at most one item,
/// and every rank computes every rank's block the same way.
pub fn share(parts: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    parts * rank / world..parts * (rank + 1) / world
}

/// The rows of a batch of `rows` that `rank` of `world` takes when the batch is cut into parts of
/// `part_rows` rows: whole parts, so each rank runs exactly the parts one process would.
pub fn share_rows(rows: usize, part_rows: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let part_rows = part_rows.max(1);
    let parts = share(rows.div_ceil(part_rows), rank, world);
    (parts.start * part_rows).min(rows)..(parts.end * part_rows).min(rows)
}

/// The communicator for `launch`: [`SingleProcess`] for one process; for more, MPI's world
/// (built with the `mpi` feature, started by an MPI launcher), else an error before any work
/// naming the launcher and what is missing.
pub fn communicator(launch: &Launch) -> Result<Arc<dyn Communicator>> {
    if launch.world_size == 1 && !launched_by_mpi() {
        return Ok(Arc::new(SingleProcess));
    }
    #[cfg(feature = "mpi")]
    {
        #[cfg(feature = "nccl")]
        let world = nccl::NcclWorld::start()?;
        #[cfg(not(feature = "nccl"))]
        let world = mpi::MpiWorld::start()?;
        if world.world_size() != launch.world_size || world.rank() != launch.rank {
            return Err(Error::Other(format!(
                "launch: {} says rank {} of {}, but MPI says rank {} of {}; launch every rank \
                 with the same launcher (mpirun -np N or srun -n N), or unset the other's variables",
                launch.source,
                launch.rank,
                launch.world_size,
                world.rank(),
                world.world_size()
            )));
        }
        Ok(Arc::new(world))
    }
    #[cfg(not(feature = "mpi"))]
    Err(Error::Other(format!(
        "launched as rank {} of {} ({}), but this build of emprior has no MPI transport: \
         rebuild with `cargo build --release --features mpi` (needs an MPI such as Debian's \
         libopenmpi-dev, and libclang-dev), or run one process",
        launch.rank, launch.world_size, launch.source
    )))
}

/// Whether an MPI launcher started this process (its variables are set even for one rank).
fn launched_by_mpi() -> bool {
    cfg!(feature = "mpi")
        && ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
            .iter()
            .any(|v| std::env::var_os(v).is_some())
}

static WORLD: OnceLock<Arc<dyn Communicator>> = OnceLock::new();

/// Installs the process's communicator (once, before any run; the second call is an error).
/// `emprior`'s binary installs the launcher's; a program embedding the library may install its
/// own transport.
pub fn install(comm: Arc<dyn Communicator>) -> Result<()> {
    WORLD
        .set(comm)
        .map_err(|_| Error::Other("dist::install: a communicator is already installed".into()))
}

/// The installed communicator ([`SingleProcess`] when none was).
pub fn world() -> Arc<dyn Communicator> {
    WORLD.get().cloned().unwrap_or_else(|| Arc::new(SingleProcess))
}

/// Whether this process writes the run's files (rank 0).
pub fn is_lead() -> bool {
    world().rank() == 0
}

/// The transports this build has, for `emprior info`.
pub fn transports() -> &'static str {
    if cfg!(feature = "nccl") {
        "one process; MPI (rsmpi) between processes; NCCL between GPUs (loaded at run time)"
    } else if cfg!(feature = "mpi") {
        "one process; MPI (rsmpi) between processes"
    } else {
        "one process (build with --features mpi or nccl for data-parallel runs)"
    }
}

/// Ends the transport's use (MPI_Finalize) once the run is over; a no-op for one process.
pub fn finish() {
    #[cfg(feature = "mpi")]
    mpi::finish();
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
    fn one_process_reduces_to_itself() {
        let c = communicator(&Launch::SINGLE).unwrap();
        let mut buf = [1.5, -2.0];
        all_reduce_sum(c.as_ref(), &mut buf).unwrap();
        c.barrier().unwrap();
        assert_eq!((c.rank(), c.world_size(), buf), (0, 1, [1.5, -2.0]));
    }

    /// Without the `mpi` feature, a launch of several processes is refused, naming the launcher.
    #[cfg(not(feature = "mpi"))]
    #[test]
    fn several_processes_without_mpi_are_refused() {
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

    /// Values whose sums depend on the order they are added in (f32 rounding).
    fn part_values(part: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((part * 7919 + i * 104_729) % 1000) as f32 * 1.37e-3 + 1e4 * (i % 3) as f32)
            .collect()
    }

    #[test]
    fn ranks_sum_their_parts_to_one_process_bits() {
        use crate::tensor::Tensor;
        let (parts, len) = (7, 33);
        let all: Vec<Tensor> = (0..parts)
            .map(|p| Tensor::from_f32(&part_values(p, len), &[len], &crate::device::Device::Cpu).unwrap())
            .collect();
        let mut alone =
            Tensor::zeros(&[len], crate::tensor::DType::F32, &crate::device::Device::Cpu).unwrap();
        ordered_sum(&SingleProcess, &mut alone, &all).unwrap();
        let alone = alone.to_vec_f32().unwrap();
        // Another association order gives other bits: the test can tell.
        let mut other = vec![0f32; len];
        for p in (0..parts).rev() {
            other
                .iter_mut()
                .zip(part_values(p, len))
                .for_each(|(o, v)| *o += v);
        }
        assert_ne!(other, alone, "the values must make the order visible");
        for world in 2..=4 {
            let results: Vec<Vec<f32>> = std::thread::scope(|s| {
                let handles: Vec<_> = threads::ranks(world)
                    .into_iter()
                    .map(|rank| {
                        s.spawn(move || {
                            let mine = share(parts, rank.rank(), world);
                            let local: Vec<Tensor> = mine
                                .map(|p| {
                                    Tensor::from_f32(
                                        &part_values(p, len),
                                        &[len],
                                        &crate::device::Device::Cpu,
                                    )
                                    .unwrap()
                                })
                                .collect();
                            let mut acc =
                                Tensor::zeros(&[len], crate::tensor::DType::F32, &crate::device::Device::Cpu)
                                    .unwrap();
                            ordered_sum(&rank, &mut acc, &local).unwrap();
                            acc.to_vec_f32().unwrap()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (r, got) in results.iter().enumerate() {
                assert_eq!(got, &alone, "world {world}, rank {r}");
            }
        }
    }

    #[test]
    fn shares_cover_the_batch_in_whole_parts_and_gather_in_order() {
        for (rows, part, world) in [
            (1024, 256, 2),
            (1000, 256, 3),
            (2048, 512, 4),
            (10, 4, 5),
            (7, 1, 3),
        ] {
            let shares: Vec<_> = (0..world).map(|r| share_rows(rows, part, r, world)).collect();
            assert_eq!(shares[0].start, 0);
            assert_eq!(shares[world - 1].end, rows);
            for w in shares.windows(2) {
                assert_eq!(w[0].end, w[1].start, "{rows} {part} {world}");
            }
            for s in &shares[..world - 1] {
                assert_eq!(s.start % part, 0);
                assert_eq!(s.end % part, 0);
            }
        }
        let world = 3;
        let gathered: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = threads::ranks(world)
                .into_iter()
                .map(|rank| {
                    s.spawn(move || {
                        let shares: Vec<usize> =
                            (0..world).map(|r| share_rows(10, 4, r, world).len()).collect();
                        let mine: Vec<f32> =
                            share_rows(10, 4, rank.rank(), world).map(|i| i as f32).collect();
                        all_gather_f32(&rank, &mine, &shares).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let want: Vec<f32> = (0..10).map(|i| i as f32).collect();
        assert!(gathered.iter().all(|g| g == &want), "{gathered:?}");
    }
}
