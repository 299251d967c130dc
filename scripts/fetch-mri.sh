#!/usr/bin/env bash
# Fetches real T1 MRI head volumes from the Debian bookworm package mricron-data
# 1.2.20211006+dfsg-4 (see ../shared/docs/data.md §3: no reachable registry ships fastMRI or
# k-space), verifies every checksum, and copies the NIfTI volumes into $EMPRIOR_DATA/mri (default
# ~/.cache/emprior/mri), outside the repository:
#   mri/ch2.nii.gz               Colin27 T1, full head with skull, 181x217x181 at 1 mm, uint8: the
#                                volume src/data/mri.rs loads by default (every .nii/.nii.gz in mri/)
#   mri/extra/ch2bet.nii.gz      the same subject, skull-stripped, 181x217x181 at 1 mm, uint8
#   mri/extra/ch2better.nii.gz   the same subject, skull-stripped, 301x370x316 at 0.5 mm, uint8
#   mri/extra/inia19-t1-brain.nii.gz  the INIA19 macaque T1 template (CC-BY), 168x206x128 at
#                                0.5 mm, float32
# The extra volumes are kept apart (not read by default): the first two are the same head as
# ch2, the last is a macaque brain. The package's other NIfTI files are label atlases (AAL,
# Brodmann, AICHA, HarvardOxford, JHU, NatBrainLab, NeuroMaps), not images, and are not copied.
# Needs apt-get and dpkg-deb; root only to run 'apt-get update' when the package lists are
# missing. Idempotent: does nothing when the verified files are already there.
set -euo pipefail

dest="${EMPRIOR_DATA:-$HOME/.cache/emprior}/mri"
package=mricron-data
version=1.2.20211006+dfsg-4
deb_sha=d40aa0ed66cf89bf6cafa049ad3884703c9d975c2ee2737525b7196528df9d6f
src_dir=usr/share/mricron/templates
declare -A files=(
  [ch2.nii.gz]=a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309
  [extra/ch2bet.nii.gz]=592a2d20abdf36eefcb540ca8958428040edffc1bc1a18ba1dcfbabac77c5dd1
  [extra/ch2better.nii.gz]=a094f3ccf383c495c9569625bd0c06993fd4b02d2a8d9966da5fea7d7e530e8d
  [extra/inia19-t1-brain.nii.gz]=3f0707f4999a0c6b56d6c9a0145310cba17753e2b4612f577d8dbfe65a89e231
)

verified() {
  for f in "${!files[@]}"; do
    [ -f "$dest/$f" ] || return 1
    echo "${files[$f]}  $dest/$f" | sha256sum --check --status || return 1
  done
}

if verified; then
  echo "fetch-mri: verified copy in $dest (${!files[*]})"
  exit 0
fi
for tool in apt-get dpkg-deb sha256sum; do
  command -v "$tool" >/dev/null ||
    { echo "fetch-mri: $tool not found (needs a Debian-based system)" >&2; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

download() { (cd "$work" && apt-get download -q "$package=$version" >"$work/apt.log" 2>&1); }

echo "fetch-mri: apt-get download $package=$version (16 MB)"
if ! download; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "fetch-mri: apt-get download failed (package lists missing?); running apt-get update as root"
    apt-get update -q >/dev/null ||
      { echo "fetch-mri: apt-get update failed" >&2; exit 1; }
    download || {
      cat "$work/apt.log" >&2
      echo "fetch-mri: apt-get download $package=$version failed after apt-get update" >&2
      exit 1
    }
  else
    cat "$work/apt.log" >&2
    echo "fetch-mri: apt-get download $package failed; if the package lists are missing," \
      "run 'apt-get update' as root (not done here: not running as root) and try again" >&2
    exit 1
  fi
fi
debs=("$work"/"$package"_*_all.deb)
[ -f "${debs[0]}" ] ||
  { echo "fetch-mri: apt-get download produced no $package .deb" >&2; exit 1; }
deb=${debs[0]}
echo "$deb_sha  $deb" | sha256sum --check --status ||
  { echo "fetch-mri: checksum mismatch for $(basename "$deb") (expected the bookworm package $version)" >&2
    exit 1; }
echo "fetch-mri: $(basename "$deb") verified; extracting"
dpkg-deb -x "$deb" "$work/root"
mkdir -p "$dest/extra"
for f in "${!files[@]}"; do
  src="$work/root/$src_dir/$(basename "$f")"
  echo "${files[$f]}  $src" | sha256sum --check --status ||
    { echo "fetch-mri: checksum mismatch for $(basename "$f")" >&2; exit 1; }
  cp "$src" "$dest/$f.tmp" && mv "$dest/$f.tmp" "$dest/$f"
  echo "fetch-mri: $f ($(stat -c %s "$dest/$f") bytes) verified"
done
verified || { echo "fetch-mri: the copies in $dest do not verify" >&2; exit 1; }
echo "fetch-mri: MRI volumes verified and copied into $dest"
