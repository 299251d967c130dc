#!/usr/bin/env bash
# Installs Open MPI (the library, its headers and mpirun) and libclang (rsmpi's bindgen reads
# mpi.h with it) from Debian's packages, for `cargo build --release --features mpi`.
# Idempotent: does nothing when they are already installed. Needs root (apt-get).
set -euo pipefail
packages=(libopenmpi-dev openmpi-bin libclang-dev)
if dpkg -s "${packages[@]}" >/dev/null 2>&1 && command -v mpirun >/dev/null; then
  echo "install-mpi: $(mpirun --version | head -1) and libclang already installed"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${packages[@]}" >/dev/null
echo "install-mpi: $(mpirun --version | head -1)"
