#!/bin/bash
# The manifold experiment at the paper's scale as a Slurm job: one rank per GPU, 2 nodes of 4.
# Build first with `cargo build --release --features mpi` against the cluster's MPI; submit with
# `sbatch scripts/slurm-em.sh` from the checkout. The run directory must be on a file system every
# node sees; rank 0 writes it. Resume after a lost node with --resume on the same directory.
#SBATCH --job-name=emprior-em
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --time=04:00:00
set -euo pipefail
run="${SCRATCH:-$PWD/runs}/manifold-paper"
if [ -f "$run/lap-000/DONE" ]; then
  srun --mpi=pmix target/release/emprior em manifold --resume "$run"
else
  srun --mpi=pmix target/release/emprior em manifold --preset paper --out "$run"
fi
