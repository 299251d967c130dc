#!/usr/bin/env bash
# The CPU targets of issue 12, measured back to back: two emprior binaries (a baseline build and
# this one) run the same EM phases alternately (A B A B ...), and each phase's time is read from
# the run's metrics.jsonl (lap 1), so start-up, data loading and evaluation are not counted.
#
#   benches/cpu-em-targets.sh BASE_BIN NEW_BIN [--repeats N] [--only LIST] [--out DIR]
#
# Workloads (LIST is comma-separated; default all):
#   mstep    manifold M-step, TimeMLP (256,256,256), Adam at batch 1024: steps/s
#   estep    manifold E-step, PC sampler 256 steps, MMPS with the Gaussian (PPCA) covariance,
#            8,192 observations in one batch: seconds per lap
#   estep1k  the same with the quick preset's E-step batch of 1,024
#   cifar    CIFAR-10 quick preset (needs scripts/fetch-cifar10.sh): E-step image-steps/s and
#            M-step images/s
# Build a baseline with: git worktree add /tmp/base <commit> && (cd /tmp/base && cargo build --release)
set -euo pipefail
base=${1:?usage: $0 BASE_BIN NEW_BIN [--repeats N] [--only LIST] [--out DIR]}
new=${2:?usage: $0 BASE_BIN NEW_BIN [--repeats N] [--only LIST] [--out DIR]}
shift 2
repeats=3 only=mstep,estep,estep1k,cifar out=$(mktemp -d /tmp/em-targets.XXXX)
while [ $# -gt 0 ]; do
    case $1 in
        --repeats) repeats=$2; shift 2 ;;
        --only) only=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$out"
for b in "$base" "$new"; do [ -x "$b" ] || { echo "not an executable: $b" >&2; exit 2; }; done
export EMPRIOR_POISON=0

common_manifold=(--set laps=1 --set init_rounds=1 --set init_steps=8 --set eval_samples=64)
args_for() {
    case $1 in
        mstep) echo em manifold "${common_manifold[@]}" --set observations=2048 --set estep_steps=2 \
                   --set estep_batch=2048 --set mstep_steps=1000 --set mstep_batch=1024 ;;
        estep) echo em manifold "${common_manifold[@]}" --set observations=8192 --set estep_steps=256 \
                   --set estep_batch=8192 --set mstep_steps=200 --set mstep_batch=256 ;;
        estep1k) echo em manifold "${common_manifold[@]}" --set observations=8192 --set estep_steps=256 \
                   --set estep_batch=1024 --set mstep_steps=200 --set mstep_batch=256 ;;
        cifar) echo em cifar10 --set laps=1 --set init_rounds=1 --set init_steps=8 ;;
    esac
}

# One run; prints the lap-1 metric line.
run_once() {
    local bin=$1 work=$2 dir=$3
    rm -rf "$dir"
    # shellcheck disable=SC2046
    "$bin" $(args_for "$work") --device cpu --out "$dir" >"$dir.log" 2>&1 || { cat "$dir.log" >&2; exit 1; }
    grep '"lap": 1' "$dir/metrics.jsonl"
}

results=$out/results.tsv
: >"$results"
IFS=, read -ra works <<<"$only"
for work in "${works[@]}"; do
    for r in $(seq 1 "$repeats"); do
        for side in base new; do
            bin=$base; [ $side = new ] && bin=$new
            line=$(run_once "$bin" "$work" "$out/$work-$side-$r")
            printf '%s\t%s\t%s\t%s\n' "$work" "$side" "$r" "$line" >>"$results"
            echo "$work $side #$r: $line" >&2
        done
    done
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [l.rstrip("\n").split("\t", 3) for l in open(sys.argv[1])]
def metric(work, m):
    if work == "mstep":
        return [("M-step Adam steps/s (batch 1024)", 1000 / m["mstep_seconds"], True)]
    if work in ("estep", "estep1k"):
        b = 8192 if work == "estep" else 1024
        return [(f"E-step s/lap (PC 256, 8192 obs, batch {b})", m["estep_seconds"], False)]
    return [("CIFAR-10 quick E-step image-steps/s", 384 * 24 / m["estep_seconds"], True),
            ("CIFAR-10 quick M-step images/s", 20 * 384 / m["mstep_seconds"], True)]
table = {}
for work, side, _, line in rows:
    for name, v, higher in metric(work, json.loads(line)):
        table.setdefault(name, {"higher": higher, "base": [], "new": []})[side].append(v)
print("| workload | baseline (median) | this build (median) | speed-up |")
print("|---|---:|---:|---:|")
for name, t in table.items():
    b, n = statistics.median(t["base"]), statistics.median(t["new"])
    up = n / b if t["higher"] else b / n
    print(f"| {name} | {b:.4g} | {n:.4g} | {up:.2f}x |")
PY
echo "runs and logs: $out" >&2
