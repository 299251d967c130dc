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

verified() {
  for f in "${!files[@]}"; do
    [ -f "$dest/$f" ] || return 1
    echo "${files[$f]}  $dest/$f" | sha256sum --check --status || return 1
  done
}

if verified; then
  echo "fetch-fashion-mnist: verified copy in $dest"
  exit 0
fi
for tool in apt-get dpkg-deb sha256sum; do
  command -v "$tool" >/dev/null ||
    { echo "fetch-fashion-mnist: $tool not found (needs a Debian-based system)" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

download() { (cd "$work" && apt-get download -q "$package" >"$work/apt.log" 2>&1); }

echo "fetch-fashion-mnist: apt-get download $package (31 MB)"
if ! download; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "fetch-fashion-mnist: apt-get download failed (package lists missing?); running apt-get update as root"
    apt-get update -q >/dev/null ||
      { echo "fetch-fashion-mnist: apt-get update failed" >&2; exit 1; }
    download || {
      cat "$work/apt.log" >&2
      echo "fetch-fashion-mnist: apt-get download $package failed after apt-get update" >&2
      exit 1
    }
  else
    cat "$work/apt.log" >&2
    echo "fetch-fashion-mnist: apt-get download $package failed; if the package lists are missing," \
      "run 'apt-get update' as root (not done here: not running as root) and try again" >&2
    exit 1
  fi
fi
debs=("$work"/"$package"_*_all.deb)
[ -f "${debs[0]}" ] ||
  { echo "fetch-fashion-mnist: apt-get download produced no $package .deb" >&2; exit 1; }
deb=${debs[0]}
echo "$deb_sha  $deb" | sha256sum --check --status ||
  { echo "fetch-fashion-mnist: checksum mismatch for $(basename "$deb")" \
      "(expected the bookworm package 0.0~git20200523.55506a9-1)" >&2; exit 1; }
dpkg-deb -x "$deb" "$work/root"
mkdir -p "$dest"
for f in "${!files[@]}"; do
  echo "${files[$f]}  $work/root/$src_dir/$f" | sha256sum --check --status ||
    { echo "fetch-fashion-mnist: checksum mismatch for $f" >&2; exit 1; }
  cp "$work/root/$src_dir/$f" "$dest/$f.tmp" && mv "$dest/$f.tmp" "$dest/$f"
done
verified || { echo "fetch-fashion-mnist: the copies in $dest do not verify" >&2; exit 1; }
echo "fetch-fashion-mnist: Fashion-MNIST verified and copied into $dest"
