#!/usr/bin/env bash
# The one GPU check: prepared here, run in a single call on a lent GPU machine, recorded here.
#
#   scripts/device-check.sh prepare          # here: build with kernels required, bundle .device/
#   scripts/device-check.sh run [--quick]    # there (device tool, carry [".device"]): every CUDA
#                                            # parity test, then the benchmark table; logs in $OUT
#   scripts/device-check.sh record DIR       # here: append DIR/summary.md to benches/RESULTS.md
#
# The GPU machine has the driver but no Rust, so everything runs from prebuilt binaries. With
# EMPRIOR_REQUIRE_GPU=1 a parity test that cannot reach the GPU fails instead of skipping.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bundle=.device

# Paths of the executables cargo built for a `cargo <cmd> --no-run --message-format=json`.
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["target"]["kind"][0], m["executable"])'
}

prepare() {
  scripts/install-cuda-toolkit.sh
  export EMPRIOR_REQUIRE_KERNELS=1
  cargo build --release
  rm -rf "$bundle" && mkdir -p "$bundle/tests" "$bundle/benches"
  # Only the GPU test binaries travel: the CPU tests run in CI, and some of them read files
  # through paths fixed at compile time on this machine.
  cargo test --release --no-run --message-format=json 2>/dev/null | executables |
    while read -r name kind exe; do
      case "$kind:$name" in
        test:cuda_*) cp "$exe" "$bundle/tests/$name" ;;
      esac
    done
  cargo bench --no-run --message-format=json 2>/dev/null | executables |
    while read -r name kind exe; do [ "$kind" = bench ] && cp "$exe" "$bundle/benches/$name"; done
  cp target/release/emprior "$bundle/emprior"
  # The device machine reaches no registry: the CIFAR-10 smoke run takes the first 1,024
  # training and 64 test images along (about 3 MB).
  scripts/fetch-cifar10.sh
  target/release/emprior cifar10-subset --train 1024 --test 64 --out "$bundle/cifar10"
  # Debug line tables are for local profiling; the trip has a 64 MiB limit.
  find "$bundle" -type f -perm -u+x -exec strip --strip-debug {} \;
  git rev-parse --short HEAD >"$bundle/COMMIT" 2>/dev/null || echo unknown >"$bundle/COMMIT"
  git status --porcelain | grep -q . && echo "(uncommitted changes)" >>"$bundle/COMMIT" || true
  du -sh "$bundle"
  ls -l "$bundle" "$bundle/tests" "$bundle/benches"
}

run_checks() {
  local quick=0
  [ "${1:-}" = "--quick" ] && quick=1
  local out="${OUT:-$root/.device/out}"
  mkdir -p "$out"
  export EMPRIOR_REQUIRE_GPU=1
  # cuBLAS (the GEMM yardstick) comes from PyTorch's CUDA 13 wheels on the GPU image.
  local blas
  blas=$(find /opt /usr/local /usr/lib -name 'libcublas.so.13*' 2>/dev/null | head -n 1 || true)
  [ -n "$blas" ] && export LD_LIBRARY_PATH="$(dirname "$blas")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

  local summary="$out/summary.md"
  {
    echo "## $(date -u +%Y-%m-%d\ %H:%M) UTC: device check (commit $(head -n 1 $bundle/COMMIT)$(sed -n 2p $bundle/COMMIT | sed 's/^/ /'))"
    echo
    echo "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi failed')"
    echo
  } >"$summary"
  nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
  "$bundle/emprior" info --device cuda >"$out/info.txt" 2>&1 || true
  cat "$out/info.txt"

  echo "| test binary | passed | failed | skipped lines |" >>"$summary"
  echo "|---|---:|---:|---:|" >>"$summary"
  local failed=0
  : >"$out/tests.log"
  for t in "$bundle"/tests/*; do
    local name log rc
    name=$(basename "$t")
    log=$(mktemp)
    set +e
    "$t" --test-threads=4 >"$log" 2>&1
    rc=$?
    set -e
    cat "$log" >>"$out/tests.log"
    local passed fails skips
    passed=$(grep -o '[0-9]* passed' "$log" | awk '{s+=$1} END {print s+0}')
    fails=$(grep -o '[0-9]* failed' "$log" | awk '{s+=$1} END {print s+0}')
    skips=$(grep -c 'skipped:' "$log" || true)
    echo "| $name | $passed | $fails | $skips |" >>"$summary"
    echo "$name: rc=$rc passed=$passed failed=$fails skipped=$skips"
    grep -E 'parity:|cuda pool:|relative error|panicked|FAILED' "$log" | head -n 60 || true
    [ "$rc" -ne 0 ] && failed=1
    rm -f "$log"
  done
  echo >>"$summary"
  grep -E 'parity: .* passed' "$out/tests.log" | sed 's/^/- /' >>"$summary" || true
  echo >>"$summary"

  local bench_args=()
  [ "$quick" = 1 ] && bench_args+=(--quick)
  if ! "$bundle/emprior" bench --device cuda "${bench_args[@]}" >"$out/bench.md" 2>&1; then
    failed=1
    echo "**emprior bench failed:**" >>"$summary"
  fi
  cat "$out/bench.md"
  cat "$out/bench.md" >>"$summary"
  if [ "$quick" = 0 ]; then
    # One lap of the manifold experiment at the paper's scale (the Sinkhorn metric runs on the
    # host, so it is evaluated on 1,024 points here), capped so the check stays in budget.
    echo "## manifold EM, paper preset, one lap" >>"$summary"
    if timeout 420 "$bundle/emprior" em manifold --preset paper --set laps=1 --set eval_samples=1024 \
      --device cuda --out "$out/em-paper" >"$out/em-paper.log" 2>&1; then
      echo '```' >>"$summary"; cat "$out/em-paper/metrics.jsonl" >>"$summary"; echo '```' >>"$summary"
    else
      echo "did not finish within 420 s (see em-paper.log):" >>"$summary"
      echo '```' >>"$summary"; grep -E '^lap|E-step|M-step|error' "$out/em-paper.log" | tail -n 8 >>"$summary"; echo '```' >>"$summary"
    fi
    # The CIFAR-10 smoke preset: the paper's U-Net through Gaussian init, one M-step (4 epochs
    # of 1,024) and one E-step (DDPM 16 steps, MMPS, 1 CG iteration, batch 256); its lap line
    # gives E-step image-steps/s and M-step images/s, from which a paper lap is projected.
    echo "## CIFAR-10 EM, smoke preset (paper U-Net)" >>"$summary"
    if timeout 300 "$bundle/emprior" em cifar10 --preset smoke --set data_dir="$bundle/cifar10" \
      --device cuda --out "$out/em-cifar10" >"$out/em-cifar10.log" 2>&1; then
      echo '```' >>"$summary"; cat "$out/em-cifar10/metrics.jsonl" >>"$summary"; echo '```' >>"$summary"
      python3 - "$out/em-cifar10/metrics.jsonl" >>"$summary" <<'PY' || true
import json, sys
lap = [json.loads(l) for l in open(sys.argv[1])][-1]
e = 50000 * 256 / lap["estep_image_steps_per_s"]
m = 256 * 195 * 256 / lap["mstep_images_per_s"]
print(f"Projected paper lap on this GPU: E-step {e/3600:.2f} h + M-step {m/3600:.2f} h = {(e+m)/3600:.2f} h; 32 laps {32*(e+m)/86400:.1f} days")
PY
    else
      echo "did not finish within 300 s (see em-cifar10.log):" >>"$summary"
      echo '```' >>"$summary"; grep -E '^lap|E-step|M-step|rror' "$out/em-cifar10.log" | tail -n 8 >>"$summary"; echo '```' >>"$summary"
    fi
    for b in gpu_kernels networks; do
      "$bundle/benches/$b" --bench --warm-up-time 1 --measurement-time 3 2>&1 | tee "$out/criterion-$b.txt" |
        grep -E 'time:|thrpt:|^[a-z0-9_]+/' || true
    done
  fi
  echo
  cat "$summary"
  return $failed
}

record() {
  local dir="${1:?usage: device-check.sh record DIR (the files_at folder of the run)}"
  local file=benches/RESULTS.md
  [ -f "$file" ] || printf '# GPU results\n\nEvery GPU run of scripts/device-check.sh, newest last. A GPU claim not recorded here does not exist.\n' >"$file"
  { echo; cat "$dir/summary.md"; } >>"$file"
  echo "appended $dir/summary.md to $file"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; run_checks "$@" ;;
  record) shift; record "$@" ;;
  *) echo "usage: $0 prepare | run [--quick] | record DIR" >&2; exit 2 ;;
esac
