#!/usr/bin/env bash
# The CPU side-by-side, by one command: emprior, PyTorch and JAX on the workloads of WORKLOADS.md,
# on this machine, in one run, as one table.
#
#   benches/baselines/cpu-side-by-side.sh [--quick] [--out DIR] [--workloads a,b]
#
# Creates its own virtual environment (.baselines-venv, git-ignored) from PyPI with pinned
# versions the first time (about 3 GB: PyPI's torch wheel carries its CUDA libraries), builds
# emprior (release), runs the three, and writes DIR/ours.jsonl, torch.jsonl, jax.jsonl and
# table.md (default DIR: target/baselines-cpu). Every framework gets every core of the machine:
# torch.set_num_threads(nproc), JAX's default, and our GEMMs on matrixmultiply's threads (the rest
# of our CPU backend runs on one thread: that is part of what the table measures).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

# The GPU machine has torch 2.11.0 and jax 0.11.2; jax 0.11 is not on PyPI yet, 0.10.2 is the
# newest there.
pins=("torch==2.11.0" "jax[cpu]==0.10.2" "numpy==2.3.5")
venv="$root/.baselines-venv"
out="$root/target/baselines-cpu"
quick=()
workloads=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=(--quick) ;;
    --out) out="$2"; shift ;;
    --workloads) workloads="$2"; shift ;;
    *) echo "usage: $0 [--quick] [--out DIR] [--workloads a,b]" >&2; exit 2 ;;
  esac
  shift
done

if ! "$venv/bin/python" -c 'import torch, jax, numpy' 2>/dev/null; then
  echo "== creating $venv with ${pins[*]}"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${pins[@]}"
fi
versions="$("$venv/bin/python" -c 'import torch, jax, numpy; print(f"torch {torch.__version__}, jax {jax.__version__}, numpy {numpy.__version__}")')"
echo "== $versions"

echo "== building emprior (release)"
cargo build --release --quiet
mkdir -p "$out"
rm -f "$out"/ours.jsonl "$out"/torch.jsonl "$out"/jax.jsonl
threads="$(nproc)"
sel=()
[ -n "$workloads" ] && sel=(--workloads "$workloads")

echo "== emprior"
EMPRIOR_POISON=0 ./target/release/emprior bench --peers --device cpu "${quick[@]}" "${sel[@]}" \
  --json "$out/ours.jsonl" | tee "$out/ours.md"
echo "== PyTorch ($threads threads)"
"$venv/bin/python" benches/baselines/torch_workloads.py --device cpu --threads "$threads" "${quick[@]}" \
  "${sel[@]}" --json "$out/torch.jsonl"
echo "== JAX"
"$venv/bin/python" benches/baselines/jax_workloads.py --device cpu "${quick[@]}" "${sel[@]}" \
  --json "$out/jax.jsonl"

cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
title="CPU side-by-side, $(date -u '+%Y-%m-%d'), $cpu, $threads cores; $versions; emprior $(git rev-parse --short HEAD)"
python3 benches/baselines/compare.py "$out/ours.jsonl" "$out/torch.jsonl" "$out/jax.jsonl" \
  --title "$title" | tee "$out/table.md"
echo
echo "table in $out/table.md (ratios: peer / ours, above 1 = emprior faster)"
