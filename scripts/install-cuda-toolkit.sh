#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler toolchain from PyPI into .cuda/ (git-ignored), so that
# build.rs can compile kernels/*.cu on machines without a system CUDA (CI, laptops, this box).
#
# Why these pins: nvidia-cuda-nvcc 13.0.88 leaves its companions unpinned, and pip then pulls the
# 13.5 nvvm/crt/runtime, whose PTX (ISA 9.5) the 580 driver (CUDA 13.0) on our GPU hosts refuses.
# All five wheels are pinned to the 13.0 release. See ../shared/docs/cuda-toolchain.md.
#
# Idempotent: when .cuda/ already holds nvcc 13.0 it does nothing but re-touch build.rs.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.cuda"
nvcc="$dest/nvidia/cu13/bin/nvcc"
want="13.0"

wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)

installed_version() {
  [ -x "$nvcc" ] || return 1
  "$nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p'
}

if [ "$(installed_version || true)" = "$want" ] && [ -x "$dest/nvidia/cu13/nvvm/bin/cicc" ]; then
  echo "install-cuda-toolkit: nvcc $want already in $dest"
else
  python=${PYTHON:-python3}
  command -v "$python" >/dev/null || { echo "install-cuda-toolkit: $python not found (needed for pip)" >&2; exit 1; }
  echo "install-cuda-toolkit: installing CUDA $want toolchain wheels into $dest"
  rm -rf "$dest"
  "$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-cache-dir --target "$dest" "${wheels[@]}"
  got="$(installed_version || true)"
  if [ "$got" != "$want" ]; then
    echo "install-cuda-toolkit: expected nvcc $want in $nvcc, found '${got:-nothing}'" >&2
    exit 1
  fi
  echo "install-cuda-toolkit: nvcc $got ready at $nvcc"
fi

# build.rs cannot watch a toolkit that did not exist when it last ran: touching it makes cargo
# rerun it, find nvcc and embed the kernels.
touch "$root/build.rs"
