#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer through cargo fuzz) of every reader of untrusted bytes:
# .npy arrays, safetensors checkpoints with their metadata, configurations, PNG images, NIfTI-1 volumes.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 60 s each, every target)
#
# Needs the nightly toolchain (rustup toolchain install nightly) and cargo-fuzz, installed from
# crates.io when missing. Each target starts from the committed seeds in fuzz/seeds/TARGET and
# keeps its corpus in fuzz/corpus/TARGET (ignored by git); a crash is saved in
# fuzz/artifacts/TARGET and the run stops with its path: turn it into a regression test in
# tests/fuzz_readers.rs. CI runs that deterministic mutation run, not this script.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(npy checkpoint config png nifti)
fi
if ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz: needs a nightly toolchain: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz from crates.io" >&2
    cargo +nightly install cargo-fuzz --locked
fi
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    echo "fuzz: $t for ${seconds}s" >&2
    cargo +nightly fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -malloc_limit_mb=2048 -print_final_stats=1
done
