#!/usr/bin/env bash
# Fetches the real Fashion-MNIST (60,000 train + 10,000 test 28x28 grayscale images, Zalando SE,
# MIT) from the Debian bookworm package dataset-fashion-mnist 0.0~git20200523.55506a9-1 (see
# ../shared/docs/data.md §2a), verifies every checksum, and copies the four gzip IDX files into
# $EMPRIOR_DATA/fashion-mnist (default ~/.cache/emprior/fashion-mnist), outside the repository.
# Needs apt-get and dpkg-deb, not root (apt-get download, dpkg-deb -x). Idempotent: does nothing
# when the verified files are already there.
set -euo pipefail

dest="${EMPRIOR_DATA:-$HOME/.cache/emprior}/fashion-mnist"
package=dataset-fashion-mnist
deb_sha=39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0
src_dir=usr/share/datasets/fashion-mnist
declare -A files=(
  [train-images-idx3-ubyte.gz]=b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
  [train-labels-idx1-ubyte.gz]=0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056
  [t10k-images-idx3-ubyte.gz]=cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
  [t10k-labels-idx1-ubyte.gz]=8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
)

me=fetch-fashion-mnist
spec="$package"
expected="the bookworm package 0.0~git20200523.55506a9-1"
# shellcheck source=lib/debian-dataset.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/debian-dataset.sh"
fetch_dataset
