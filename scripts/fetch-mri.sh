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

me=fetch-mri
spec="$package=$version"
expected="the bookworm package $version"
# shellcheck source=lib/debian-dataset.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/debian-dataset.sh"
fetch_dataset
