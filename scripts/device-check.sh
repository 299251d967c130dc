#!/usr/bin/env bash
# The one GPU check: prepared here, run in a single call on a lent GPU machine, recorded here.
#
#   scripts/device-check.sh prepare [--dry-run] [--resources FILE]
#       here: build with kernels required and bundle what the GPU machine needs in .device/ (the
#       cuda_* test binaries, the benches, the emprior binary, a 1,024-image CIFAR-10 subset, the
#       kernel resource table). --dry-run skips the toolkit install when nvcc is already there and
#       the stripping, and reuses the builds CI has made; --resources FILE copies an existing
#       scripts/kernel-resources.sh table instead of compiling the kernels again.
#   scripts/device-check.sh run [--quick] [--dry-run] [--budget S] [--steps LIST] [--tests REGEX]
#       there (device tool, carry [".device"], timeout_s above the budget): the checks below, in
#       this order, so a run cut short has recorded correctness first. Results under $OUT
#       (default .device/out): summary.md, console.log, logs.tar.gz (every per-test log, the
#       sanitizer reports, the bench and EM logs) and kernel-resources.md; at most 8 files come
#       back from the device machine, so the many small logs travel as one archive.
#       --dry-run: the whole script on this machine, every GPU step replaced by the CPU (CI).
#       --tests REGEX: a focused rerun, only tests whose "binary::name" matches (awk regex), in
#       the serial, fast and sanitizer steps, e.g. --steps serial,sanitize --tests 'gemm'.
#   scripts/device-check.sh record DIR
#       here: append DIR/summary.md (the files_at folder of the run) to benches/RESULTS.md.
#
# Steps (LIST: a comma-separated subset of these names) and their time caps in seconds, quick /
# full. Each step is also cut to what is left of the budget (default 480 s quick, 570 s full;
# give the device call timeout_s >= budget + 30), and a step with under 10 s left is skipped and
# says so in the summary.
#   info      nvidia-smi, emprior info --device cuda                                  20 / 20
#   serial    every test of every GPU test binary ONE AT A TIME, each in its own process,
#             CUDA_LAUNCH_BLOCKING=1 EMPRIOR_CHECK_LAUNCHES=1 EMPRIOR_POISON=1 RUST_BACKTRACE=1,
#             so the first fault names its test and its kernel (every launcher waits for its
#             kernel and reports "kernel <k> (kernels/<f>.cu) failed"); in a dry run with
#             EMPRIOR_GPU_TESTS_ON_CPU=1, so the GPU trials' code runs on the CPU;
#             per test 60 / 120                                                      150 / 240
#   fast      each GPU test binary whole, --test-threads=4, EMPRIOR_POISON=1; tests that
#             crashed or hung one at a time are skipped here (--skip); per binary 60 / 150   90 / 180
#   sanitize  compute-sanitizer memcheck, initcheck, racecheck and synccheck, each over a
#             quick subset of the parity tests (one process per test); per tool   40 / 75 (x4)
#   bench     emprior bench --device cuda [--quick]                                  60 / 120
#             (on sm_90a its tensor-core table has the wgmma rows, version 4, either way;
#             EMPRIOR_WGMMA=1 in the environment puts the U-Net rows on wgmma too)
#   peers     (full only) emprior bench --peers, then benches/baselines' PyTorch and JAX versions
#             of the same workloads, one table with ratios and MFU against the bf16 rate
#             measured in the run, and the projected paper laps (dry run: one workload on
#             the CPU, the peers where installed); eager and bf16 variants        - / 300
#   em        (full only) a paper-scale manifold lap cut 16x (projected back), then the
#             CIFAR-10 and MRI smoke presets (paper U-Nets), each with a projected paper lap
#                                                                                     - / 180 + 300 + 300
#   criterion (full only) the criterion benches, short                              - / 60 each
# Worst case with --quick: 20 + 150 + 90 + 4 x 40 + 60 = 480 s, the budget; a clean quick run
# should take a few minutes.
#
# The sanitizer subset: tests whose "binary::name" matches $EMPRIOR_SANITIZE_TESTS (an extended
# regex, default below) and not $EMPRIOR_SANITIZE_SKIP, at most $EMPRIOR_SANITIZE_MAX (11). Each
# tool runs with --error-exitcode, --print-limit 25, --check-exit-code no (the test's own outcome
# is read from its output) and --require-cuda-init no; initcheck runs without EMPRIOR_POISON,
# whose NaN fill would count as initialisation. The pool rounds allocations up to a size class,
# so memcheck cannot see an overrun within that slack, and initcheck sees a recycled pool buffer
# as initialised: poison mode covers those on the CPU and in the test passes.
#
# --dry-run (CI, and here before spending GPU time): the same passes over the same binaries on
# the CPU, with EMPRIOR_REQUIRE_GPU unset (GPU tests report ignored or print "skipped:"), the
# sanitizer step replaced by the same subset run without a sanitizer, emprior bench --device cpu
# --quick, tiny CPU EM runs through the same presets and the projection, and criterion --list. It
# writes the same summary, marked as a dry run, and exits non-zero if a test fails or the script
# breaks. Verdict and exit status: FAIL (1) on any failed, hung, crashed or (with a GPU) ignored
# or skipped test, any sanitizer error, or a failed step; else INCOMPLETE (3) when a time cap or
# the budget left something unchecked or compute-sanitizer is missing; else PASS (0).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bundle=.device

die() {
  echo "device-check: $*" >&2
  exit 1
}

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

# `cargo ARGS --message-format=json` -> "name kind path" lines on stdout; cargo's stderr only on
# failure.
cargo_executables() {
  local err rc=0
  err="$(mktemp)"
  cargo "$@" --message-format=json 2>"$err" | executables || rc=$?
  if [ "$rc" -ne 0 ]; then
    cat "$err" >&2
    rm -f "$err"
    die "cargo $* failed"
  fi
  rm -f "$err"
}

prepare() {
  local dry=0 resources=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) dry=1; shift ;;
      --resources) resources="${2:?--resources needs a file}"; shift 2 ;;
      *) die "prepare: unknown argument '$1'" ;;
    esac
  done
  if [ "$dry" = 0 ] || [ ! -x .cuda/nvidia/cu13/bin/nvcc ]; then
    scripts/install-cuda-toolkit.sh
  fi
  export EMPRIOR_REQUIRE_KERNELS=1
  cargo build --release --locked
  rm -rf "$bundle" && mkdir -p "$bundle/tests" "$bundle/benches"
  local lists
  lists="$(mktemp -d)"
  cargo_executables test --release --locked --no-run >"$lists/tests"
  cargo_executables bench --locked --no-run >"$lists/benches"
  # Only the GPU test binaries travel: the CPU tests run in CI, and some of them read files
  # through paths fixed at compile time on this machine.
  local name kind exe
  while read -r name kind exe; do
    case "$kind:$name" in
      test:cuda_*) cp "$exe" "$bundle/tests/$name" ;;
    esac
  done <"$lists/tests"
  while read -r name kind exe; do
    # The CPU benches (gemm_cpu) stay here.
    if [ "$kind" = bench ] && [[ "$name" != *_cpu ]]; then cp "$exe" "$bundle/benches/$name"; fi
  done <"$lists/benches"
  rm -rf "$lists"
  [ -n "$(ls -A "$bundle/tests")" ] || die "no cuda_* test binary was built"
  cp target/release/emprior "$bundle/emprior"
  # The PyTorch and JAX versions of our workloads (the GPU machine has both, and no registry).
  mkdir -p "$bundle/baselines"
  cp benches/baselines/*.py benches/baselines/WORKLOADS.md "$bundle/baselines/"
  # The device machine reaches no registry: the CIFAR-10 smoke run takes the first 1,024
  # training and 64 test images along (about 3 MB).
  scripts/fetch-cifar10.sh
  target/release/emprior cifar10-subset --train 1024 --test 64 --out "$bundle/cifar10"
  # And the MRI smoke run the Colin27 head (3.5 MB).
  scripts/fetch-mri.sh
  mkdir -p "$bundle/mri"
  cp "${EMPRIOR_DATA:-$HOME/.cache/emprior}/mri/ch2.nii.gz" "$bundle/mri/"
  if [ -n "$resources" ]; then
    cp "$resources" "$bundle/kernel-resources.md"
  elif ! scripts/kernel-resources.sh --out "$bundle/kernel-resources.md" >/dev/null; then
    echo "device-check: kernel-resources.sh reported a problem (see $bundle/kernel-resources.md); bundling anyway" >&2
  fi
  if [ "$dry" = 0 ]; then
    # Debug line tables are for local profiling; the trip has a 64 MiB limit.
    find "$bundle" -type f -perm -u+x -exec strip --strip-debug {} \;
  fi
  git rev-parse --short HEAD >"$bundle/COMMIT" 2>/dev/null || echo unknown >"$bundle/COMMIT"
  if git status --porcelain | grep -q .; then echo "(uncommitted changes)" >>"$bundle/COMMIT"; fi
  if [ "$dry" = 1 ]; then echo dry-run >"$bundle/MODE"; else echo gpu >"$bundle/MODE"; fi
  du -sh "$bundle"
  ls -l "$bundle" "$bundle/tests" "$bundle/benches"
  local mib
  mib="$(du -sm "$bundle" | cut -f1)"
  if [ "$dry" = 0 ] && [ "$mib" -gt 60 ]; then
    die "the bundle is $mib MiB; the device call carries at most 64 MiB with the working tree"
  fi
}

# ---------------------------------------------------------------------------------------------
# run

# Writes $out/summary.md from the state files in $work, and prints PASS or FAIL.
summarize() {
  python3 - "$work" "$out" <<'PY'
import os
import re
import sys

work, out = sys.argv[1], sys.argv[2]


def rows(name):
    path = os.path.join(work, name)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


meta = {}
for r in rows("meta.tsv"):
    meta[r[0]] = r[1] if len(r) > 1 else ""
dry = meta.get("dry") == "1"
fail = []  # a correctness failure or a broken step: FAIL
incomplete = []  # something not checked (time cap, budget, tool missing): INCOMPLETE
notes = []
md = []
md.append(f"## {meta.get('date', '?')} UTC: device check{' DRY RUN on the CPU (not a GPU result)' if dry else ''}, "
          f"{meta.get('mode', '?')} (commit {meta.get('commit', '?')})")
if dry:
    md.append("<!-- device-check dry run -->")
md.append("")
md.append("| | |")
md.append("|---|---|")
md.append(f"| GPU | {meta.get('gpu', '?')} |")
md.append(f"| driver | {meta.get('driver', '?')} |")
md.append(f"| commit | {meta.get('commit', '?')} |")
md.append(f"| mode | {meta.get('mode', '?')}; steps {meta.get('steps', '?')} |")
md.append(f"| environment | {meta.get('env', '')} |")
result_row = len(md)
md.append("")  # replaced by the result row below
md.append("")

# Tests: one row per binary and pass.
serial = rows("serial.tsv")  # group test status secs kernel error skips note
fast = rows("fast.tsv")  # group status passed failed ignored secs skips failing skipped_by_script
listing = rows("listing.tsv")  # group count status
groups = [r[0] for r in listing]
md.append("### Tests")
md.append("")
md.append("| test binary | pass | passed | failed | ignored | skipped (printed) | not run | time (s) |")
md.append("|---|---|---:|---:|---:|---:|---:|---:|")
failing = []
for g in groups:
    rs = [r for r in serial if r[0] == g]
    if rs:
        count = lambda s: sum(1 for r in rs if r[2] == s)
        bad = [r for r in rs if r[2] not in ("passed", "ignored", "not-run")]
        skips = sum(int(r[6] or 0) for r in rs)
        secs = sum(float(r[3] or 0) for r in rs)
        md.append(f"| {g} | one at a time | {count('passed')} | {len(bad)} | {count('ignored')} | {skips} | {count('not-run')} | {secs:.0f} |")
        for r in bad:
            failing.append((g, r[1], "one at a time", r[2], r[4], r[5], r[7] if len(r) > 7 else ""))
        if not dry and count("ignored"):
            fail.append(f"{g}: {count('ignored')} tests ignored with a GPU present (one at a time)")
        if not dry and skips:
            fail.append(f"{g}: {skips} 'skipped:' lines with a GPU present (one at a time)")
        if count("not-run"):
            incomplete.append(f"{g}: {count('not-run')} tests not run one at a time (time cap)")
    for r in (x for x in fast if x[0] == g):
        _, status, p, f, i, secs, skips, names, skipped = (r + [""] * 9)[:9]
        label = "fast (4 threads)" + ("" if status == "ok" else f", {status}")
        md.append(f"| {g} | {label} | {p} | {f} | {i} | {skips} | {skipped or 0} | {float(secs or 0):.0f} |")
        for n in names.split():
            failing.append((g, n, "fast", "failed", "", "", ""))
        if status == "not-run":
            incomplete.append(f"{g}: fast pass not run (time cap)")
        elif status not in ("ok", "failed"):
            fail.append(f"{g}: fast pass {status}")
        if not dry and int(i or 0):
            fail.append(f"{g}: {i} tests ignored with a GPU present (fast pass)")
    if not rs and not any(x[0] == g for x in fast):
        md.append(f"| {g} | (not run) | | | | | | |")
for g, count, status in listing:
    if status != "ok":
        fail.append(f"{g}: listing its tests failed ({status})")
md.append("")
if failing:
    # One line per test: where it failed, the kernel and CUDA error its log names, the panic.
    by_test = {}
    for g, t, pas, st, kernel, err, note in failing:
        e = by_test.setdefault((g, t), {"runs": [], "kernel": "", "err": "", "note": ""})
        e["runs"].append(f"{pas}: {st}")
        e["kernel"] = e["kernel"] or kernel
        e["err"] = e["err"] or err
        e["note"] = e["note"] or note
    md.append(f"Failing tests ({len(by_test)}):")
    for i, ((g, t), e) in enumerate(by_test.items()):
        if i == 40:
            md.append(f"- ... and {len(by_test) - 40} more (logs.tar.gz: serial/, fast/)")
            break
        where = ", ".join(x for x in (f"launching {e['kernel']}" if e["kernel"] else "", e["err"]) if x)
        md.append(f"- `{g}::{t}` ({'; '.join(e['runs'])}){': ' + where if where else ''}"
                  f"{' | ' + e['note'].strip() if e['note'].strip() else ''}")
    fail.append(f"{len(by_test)} failing tests")
else:
    md.append("Failing tests: none.")
md.append("")

# Sanitizers.
san = rows("sanitizer.tsv")  # tool group test errors status secs
subset = rows("sanitize-subset.tsv")
md.append("### Sanitizers")
md.append("")
if subset:
    md.append("Subset: " + ", ".join(f"`{g}::{t}`" for g, t in subset))
    md.append("")
if san:
    md.append("| tool | tests run | errors | tests failed or hung | not run | time (s) |")
    md.append("|---|---:|---:|---:|---:|---:|")
    below = []
    tools = []
    for r in san:
        if r[0] not in tools:
            tools.append(r[0])
    for tool in tools:
        rs = [r for r in san if r[0] == tool]
        ran = [r for r in rs if r[4] != "not-run"]
        errs = [int(r[3]) for r in ran if r[3].isdigit()]
        unknown = [r for r in ran if not r[3].isdigit()]
        bad = [r for r in ran if r[4] not in ("passed", "ignored")]
        secs = sum(float(r[5] or 0) for r in rs)
        err_text = str(sum(errs)) + (f" (+{len(unknown)} without a summary)" if unknown and tool != "none" else "")
        label = "none: dry run, subset without a sanitizer" if tool == "none" else tool
        if tool == "none":
            err_text = "-"
        md.append(f"| {label} | {len(ran)} | {err_text} | {len(bad)} | {len(rs) - len(ran)} | {secs:.0f} |")
        if len(rs) > len(ran):
            incomplete.append(f"{tool}: {len(rs) - len(ran)} tests not run (time cap)")
        if sum(errs):
            fail.append(f"{tool}: {sum(errs)} errors")
        if unknown and tool != "none":
            # Cut by its time cap (the sanitizer slows kernels 10-100x): not checked, not failed.
            cut = [r for r in unknown if r[4] == "timeout"]
            if cut:
                incomplete.append(f"{tool}: {len(cut)} runs cut by the time cap before an ERROR SUMMARY")
            if len(unknown) > len(cut):
                fail.append(f"{tool}: {len(unknown) - len(cut)} runs without an ERROR SUMMARY")
        for r in bad:
            below.append(f"- {label}: `{r[1]}::{r[2]}` {r[4]}")
        if bad:
            notes.append(f"{tool}: {len(bad)} tests failed or hung under it")
    if below:
        md.append("")
        md.append("Tests that failed or hung under a sanitizer (their own result is in the test table):")
        md.extend(below)
    errs_by_test = [r for r in san if r[3].isdigit() and int(r[3]) > 0]
    if errs_by_test:
        md.append("")
        md.append("Sanitizer errors (reports in logs.tar.gz: sanitizer/TOOL/):")
        md.extend(f"- {r[0]}: `{r[1]}::{r[2]}`: {r[3]} errors" for r in errs_by_test)
else:
    md.append("Not run.")
md.append("")

# Steps and their outputs.
steps = rows("steps.tsv")  # step status secs note
for s in steps:
    name, status, secs, note = (s + [""] * 4)[:4]
    if status == "error":
        fail.append(f"step {name}: {note}")
    elif status == "skipped" and note.startswith("not in --steps"):
        notes.append(f"step {name}: {status} ({note})")
    elif status not in ("ok", "dry"):
        incomplete.append(f"step {name}: {status}{' (' + note + ')' if note else ''}")
for frag in ("bench.md", "peers.md", "em.md", "criterion.md"):
    path = os.path.join(work, frag)
    if os.path.exists(path):
        md.append(open(path, encoding="utf-8", errors="replace").read().rstrip("\n"))
        md.append("")
res = os.path.join(work, "kernel-resources.md")
if os.path.exists(res):
    tail = [l for l in open(res, encoding="utf-8").read().splitlines() if l and not l.startswith("|")]
    md.append("### Kernel resources (ptxas, kernel-resources.md)")
    md.append("")
    md.extend(f"- {l}" for l in tail)
    md.append("")
md.append("### Steps")
md.append("")
md.append("| step | status | time (s) | note |")
md.append("|---|---|---:|---|")
for s in steps:
    name, status, secs, note = (s + [""] * 4)[:4]
    md.append(f"| {name} | {status} | {secs} | {note} |")
md.append("")
md.append(f"Logs: logs.tar.gz (serial/, fast/, sanitizer/, bench and EM logs); took {meta.get('elapsed', '?')} s of a {meta.get('budget', '?')} s budget.")
verdict = "FAIL" if fail else "INCOMPLETE" if incomplete else "PASS"
reasons = fail + incomplete
text = f"| result | **{verdict}**" + (": " + "; ".join(reasons[:12]) + (f"; and {len(reasons) - 12} more" if len(reasons) > 12 else "") if reasons else "")
if notes:
    text += "<br>notes: " + "; ".join(notes)
md[result_row] = text + " |"
with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(md) + "\n")
print(verdict)
PY
}

run_checks() {
  local quick=0 dry=0 budget="" steps="" tests=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --quick) quick=1; shift ;;
      --tests) tests="${2:?--tests needs a regex}"; shift 2 ;;
      --dry-run) dry=1; shift ;;
      --budget) budget="${2:?--budget needs seconds}"; shift 2 ;;
      --steps) steps="${2:?--steps needs a list}"; shift 2 ;;
      *) die "run: unknown argument '$1'" ;;
    esac
  done
  [ -n "$budget" ] || { if [ "$quick" = 1 ]; then budget=480; else budget=570; fi; }
  if [ -z "$steps" ]; then
    steps="info,serial,fast,sanitize,bench"
    [ "$quick" = 1 ] || steps="$steps,peers,em,criterion"
  fi
  local s
  for s in ${steps//,/ }; do
    case "$s" in info | serial | fast | sanitize | bench | peers | em | criterion) ;; *) die "run: unknown step '$s'" ;; esac
  done
  [ -d "$bundle/tests" ] && [ -x "$bundle/emprior" ] && [ -f "$bundle/COMMIT" ] ||
    die "no bundle in $bundle: run scripts/device-check.sh prepare$([ "$dry" = 1 ] && echo ' --dry-run') first"
  out="${OUT:-$root/$bundle/out}"
  mkdir -p "$out"
  rm -f "$out/summary.md" "$out/console.log" "$out/logs.tar.gz" "$out/kernel-resources.md"
  work="$(mktemp -d "${TMPDIR:-/tmp}/emprior-devcheck.XXXXXX")"
  local rc=0
  set +e
  run_steps "$quick" "$dry" "$budget" "$steps" "$tests" 2>&1 | tee "$out/console.log"
  rc=${PIPESTATUS[0]}
  set -e
  rm -rf "$work"
  return "$rc"
}

# Runs in the pipeline's subshell: errexit is on, and the ERR trap names a line that broke.
run_steps() {
  set -Eeuo pipefail
  trap 'echo "device-check: SCRIPT ERROR at line $LINENO: $BASH_COMMAND" >&2' ERR
  local quick="$1" dry="$2" budget="$3" steps="$4" only="$5"
  local t_start deadline reserve=10
  t_start=$(date +%s)
  deadline=$((t_start + budget))
  mkdir -p "$work/serial" "$work/fast" "$work/sanitizer"
  : >"$work/steps.tsv"

  # Time caps (seconds), quick / full; see the header.
  local cap_info=20 cap_serial cap_test cap_fast cap_bin cap_tool cap_san_test cap_bench cap_peers=300
  if [ "$quick" = 1 ]; then
    cap_serial=150 cap_test=60 cap_fast=90 cap_bin=60 cap_tool=40 cap_san_test=40 cap_bench=60
  else
    cap_serial=240 cap_test=120 cap_fast=180 cap_bin=150 cap_tool=75 cap_san_test=60 cap_bench=120
  fi
  cap_test="${EMPRIOR_TEST_TIMEOUT:-$cap_test}"

  local us=$'\x1f'
  now() { date +%s; }
  min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
  # The seconds a step may take: its cap, cut to what is left of the budget.
  cap() {
    local left=$((deadline - $(now) - reserve))
    if [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
  }
  want() { [[ ",$steps," == *",$1,"* ]]; }
  step_row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$work/steps.tsv"; }
  meta() { printf '%s\t%s\n' "$1" "$2" >>"$work/meta.tsv"; }
  safe() { printf '%s' "$1" | tr -c 'A-Za-z0-9._-' '_'; }
  # Packs the logs and rewrites summary.md; after every step, so a run cut off still returns both.
  pack() {
    meta elapsed "$(($(now) - t_start))"
    tar -czf "$out/logs.tar.gz.part" -C "$work" --exclude='*.png' --exclude='*.safetensors' \
      --exclude='*.npy' --exclude='*.bin' . && mv "$out/logs.tar.gz.part" "$out/logs.tar.gz"
    summarize >"$work/verdict"
  }
  # "status kernel error skips note", separated by $us (not a tab: read would merge empty
  # fields), for one test process's log and exit status.
  classify() {
    local log="$1" rc="$2" line p=0 f=0 i=0 status kernel err skips note
    line="$(grep -E '^test result: ' "$log" | tail -n 1 || true)"
    if [[ "$line" =~ ([0-9]+)\ passed\;\ ([0-9]+)\ failed\;\ ([0-9]+)\ ignored ]]; then
      p="${BASH_REMATCH[1]}" f="${BASH_REMATCH[2]}" i="${BASH_REMATCH[3]}"
    fi
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
      status=timeout
    elif [ -z "$line" ] && [ "$rc" -gt 128 ]; then
      status="crashed-signal-$((rc - 128))"
    elif [ -z "$line" ]; then
      status="no-result-rc-$rc"
    elif [ "$f" -gt 0 ]; then
      status=failed
    elif [ "$p" -gt 0 ]; then
      status=passed
    elif [ "$i" -gt 0 ]; then
      status=ignored
    else
      status=not-found
    fi
    if [ "$status" = passed ] && [ "$rc" != 0 ]; then status="failed-rc-$rc"; fi
    # The generated launchers name their kernel: "launching <k> (kernels/<f>.cu)" when the launch
    # fails, "kernel <k> (kernels/<f>.cu) failed" when EMPRIOR_CHECK_LAUNCHES catches its fault.
    kernel="$(grep -oE '(launching|kernel) [A-Za-z_][A-Za-z0-9_]* \(kernels/' "$log" | head -n 1 | cut -d' ' -f2 || true)"
    err="$(grep -oE 'CUDA_ERROR_[A-Z_]+' "$log" | head -n 1 || true)"
    skips="$(grep -c 'skipped:' "$log" || true)"
    # The panic message: the lines after "panicked at", up to the backtrace.
    note="$(awk 'p && (/^stack backtrace:/ || /^note: / || /^$/ || ++k > 3) { exit } p { printf "%s ", $0 } /panicked at/ { p = 1 }' "$log" |
      tr '\t' ' ' | cut -c 1-240 || true)"
    printf "%s$us%s$us%s$us%s$us%s" "$status" "$kernel" "$err" "${skips:-0}" "$note"
  }

  # Environment of every test process.
  export EMPRIOR_POISON=1
  local incl=() stand_in=(env) bench_env=(env)
  if [ "$dry" = 1 ]; then
    unset EMPRIOR_REQUIRE_GPU
    # The one-at-a-time pass runs the GPU trials' code with the CPU standing in for the GPU (they
    # still report ignored), so a broken trial shows here before a GPU is spent on it.
    stand_in=(env EMPRIOR_GPU_TESTS_ON_CPU=1)
  else
    export EMPRIOR_REQUIRE_GPU=1
    incl=(--include-ignored)
    # cuBLAS (the GEMM yardstick of emprior bench) comes from PyTorch's CUDA 13 wheels there;
    # only emprior bench gets it on its path, so torch and JAX keep their own libraries.
    local blas
    blas=$(find /opt /usr/local /usr/lib -name 'libcublas.so.13*' 2>/dev/null | head -n 1 || true)
    if [ -n "$blas" ]; then
      bench_env=(env "LD_LIBRARY_PATH=$(dirname "$blas")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
    fi
  fi
  local mode
  if [ "$quick" = 1 ]; then mode=quick; else mode=full; fi
  if [ "$dry" = 1 ]; then mode="$mode, dry run"; fi
  meta date "$(date -u '+%Y-%m-%d %H:%M')"
  meta dry "$dry"
  meta mode "$mode"
  meta steps "$steps"
  meta budget "$budget"
  meta commit "$(head -n 1 "$bundle/COMMIT")$(sed -n 2p "$bundle/COMMIT" | sed 's/^/ /')"
  meta env "EMPRIOR_POISON=1, one at a time with CUDA_LAUNCH_BLOCKING=1 EMPRIOR_CHECK_LAUNCHES=1$([ "$dry" = 0 ] && echo ', EMPRIOR_REQUIRE_GPU=1, --include-ignored'); bundle $(cat "$bundle/MODE" 2>/dev/null || echo '?')"
  if [ -f "$bundle/kernel-resources.md" ]; then
    cp "$bundle/kernel-resources.md" "$out/kernel-resources.md"
    cp "$bundle/kernel-resources.md" "$work/kernel-resources.md"
  fi
  echo "device-check: mode $mode, budget ${budget}s, steps $steps, results in $out"

  # -- info ------------------------------------------------------------------------------------
  local t rc t0
  if [ "$dry" = 1 ]; then
    meta gpu "none (dry run on the CPU: $(uname -m), $(nproc) cores)"
    meta driver "none"
  else
    meta gpu "$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || echo 'nvidia-smi failed')"
    meta driver "$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1 || echo '?')"
  fi
  if want info; then
    t0=$(now)
    t=$(cap "$cap_info")
    rc=0
    if [ "$t" -lt 5 ]; then
      rc=skipped
    elif [ "$dry" = 1 ]; then
      timeout -k 5 "$t" "$bundle/emprior" info --kernels >"$work/info.txt" 2>&1 </dev/null || rc=$?
    else
      nvidia-smi >"$work/nvidia-smi.txt" 2>&1 </dev/null || true
      # Without persistence mode every test process pays the GPU's initialisation: say so.
      timeout -k 5 20 nvidia-smi -q 2>/dev/null </dev/null | grep -i -m 1 'persistence mode' || true
      timeout -k 5 "$t" "$bundle/emprior" info --device cuda --kernels >"$work/info.txt" 2>&1 </dev/null || rc=$?
    fi
    if [ "$rc" = skipped ]; then
      step_row info skipped 0 "budget spent"
    elif [ "$rc" = 0 ]; then
      head -n 4 "$work/info.txt"
      step_row info ok "$(($(now) - t0))" ""
    else
      grep -v '^  kernel ' "$work/info.txt" || true
      step_row info error "$(($(now) - t0))" "emprior info exited $rc"
    fi
  fi

  # -- the tests of every GPU binary -------------------------------------------------------------
  local bin group n
  : >"$work/tests.tsv"
  : >"$work/listing.tsv"
  for bin in "$bundle"/tests/*; do
    group="$(basename "$bin")"
    rc=0
    timeout -k 5 60 "$bin" --list >"$work/$group.list" 2>"$work/$group.list.err" </dev/null || rc=$?
    # libtest and libtest-mimic print "name: test" ("[kind] name: test" with a kind); the whole
    # string before ": test" is what --exact takes.
    sed -n 's/: test$//p' "$work/$group.list" >"$work/$group.names"
    n=$(wc -l <"$work/$group.names")
    if [ "$rc" != 0 ]; then
      printf '%s\t%s\t%s\n' "$group" "$n" "rc-$rc" >>"$work/listing.tsv"
    elif [ "$n" = 0 ]; then
      printf '%s\t%s\t%s\n' "$group" 0 "no-tests-listed" >>"$work/listing.tsv"
    else
      printf '%s\t%s\t%s\n' "$group" "$n" ok >>"$work/listing.tsv"
    fi
    sed "s/^/$group\t/" "$work/$group.names" >>"$work/tests.tsv"
  done
  if [ -n "$only" ]; then
    # --tests: a focused rerun; only the matching tests, and only their binaries in the fast pass.
    awk -F'\t' -v re="$only" '($1 "::" $2) ~ re' "$work/tests.tsv" >"$work/tests.only"
    mv "$work/tests.only" "$work/tests.tsv"
    meta steps "$steps; tests matching /$only/"
  fi
  echo "device-check: $(wc -l <"$work/tests.tsv") tests in $(wc -l <"$work/listing.tsv") GPU test binaries"
  pack

  local name log line status kernel err skips note secs end
  if want serial; then
    echo "== one test at a time (CUDA_LAUNCH_BLOCKING=1, EMPRIOR_CHECK_LAUNCHES=1, EMPRIOR_POISON=1)"
    t0=$(now)
    t=$(cap "$cap_serial")
    end=$(($(now) + t))
    : >"$work/serial.tsv"
    while IFS=$'\t' read -r group name; do
      mkdir -p "$work/serial/$group"
      local left=$((end - $(now)))
      if [ "$left" -lt 5 ]; then
        printf '%s\t%s\tnot-run\t0\t\t\t0\t\n' "$group" "$name" >>"$work/serial.tsv"
        continue
      fi
      left=$(min "$left" "$cap_test")
      log="$work/serial/$group/$(safe "$name").log"
      local ts
      ts=$(date +%s.%N)
      rc=0
      CUDA_LAUNCH_BLOCKING=1 EMPRIOR_CHECK_LAUNCHES=1 RUST_BACKTRACE=1 "${stand_in[@]}" \
        timeout -k 5 "$left" "$bundle/tests/$group" --exact "$name" \
        --test-threads=1 --color never "${incl[@]}" >"$log" 2>&1 </dev/null || rc=$?
      secs=$(awk -v a="$ts" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
      line="$(classify "$log" "$rc")"
      IFS="$us" read -r status kernel err skips note <<<"$line"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$group" "$name" "$status" "$secs" "$kernel" "$err" "$skips" "$note" >>"$work/serial.tsv"
      printf '  %-64s %-10s %6ss%s\n' "$group::$name" "$status" "$secs" \
        "$([ -n "$kernel$err" ] && echo "  ${kernel:+launching $kernel }$err")"
      case "$status" in
        passed | ignored) ;;
        *) echo "  ---- last lines of $group::$name ----"; tail -n 25 "$log" | awk '{ print "  | " $0 }' ;;
      esac
    done < <(cat "$work/tests.tsv")
    n=$(awk -F'\t' '$3 == "not-run"' "$work/serial.tsv" | wc -l)
    if [ "$n" -gt 0 ]; then
      step_row serial cut "$(($(now) - t0))" "$n tests not run within the cap of ${t}s"
    else
      step_row serial ok "$(($(now) - t0))" "cap ${t}s, per test ${cap_test}s"
    fi
    pack
  fi

  if want fast; then
    echo "== whole binaries, --test-threads=4 (EMPRIOR_POISON=1)"
    t0=$(now)
    t=$(cap "$cap_fast")
    end=$(($(now) + t))
    : >"$work/fast.tsv"
    for bin in "$bundle"/tests/*; do
      group="$(basename "$bin")"
      if ! cut -f1 "$work/tests.tsv" | grep -qxF "$group"; then continue; fi
      local left=$((end - $(now)))
      if [ "$left" -lt 5 ]; then
        printf '%s\tnot-run\t0\t0\t0\t0\t0\t\t\n' "$group" >>"$work/fast.tsv"
        continue
      fi
      left=$(min "$left" "$cap_bin")
      # A test that crashed or hung alone would take the whole binary with it here.
      local skip=() nskip=0
      if [ -f "$work/serial.tsv" ]; then
        while IFS=$'\t' read -r g name status _; do
          if [ "$g" = "$group" ]; then
            case "$status" in timeout | crashed-* | no-result-*) skip+=(--skip "$name"); nskip=$((nskip + 1)) ;; esac
          fi
        done <"$work/serial.tsv"
      fi
      if [ "$nskip" -gt 0 ]; then skip=(--exact "${skip[@]}"); fi
      log="$work/fast/$group.log"
      local ts
      ts=$(date +%s.%N)
      rc=0
      timeout -k 5 "$left" "$bin" --test-threads=4 --color never "${incl[@]}" "${skip[@]}" >"$log" 2>&1 </dev/null || rc=$?
      secs=$(awk -v a="$ts" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
      line="$(grep -E '^test result: ' "$log" | tail -n 1 || true)"
      local p=0 f=0 i=0 names fstatus
      if [[ "$line" =~ ([0-9]+)\ passed\;\ ([0-9]+)\ failed\;\ ([0-9]+)\ ignored ]]; then
        p="${BASH_REMATCH[1]}" f="${BASH_REMATCH[2]}" i="${BASH_REMATCH[3]}"
      else
        p=$(grep -cE '\.\.\. ok$' "$log" || true)
      fi
      if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        fstatus=timeout
      elif [ -z "$line" ]; then
        fstatus="crashed-rc-$rc"
      elif [ "$f" -gt 0 ] || [ "$rc" != 0 ]; then
        fstatus=failed
      else
        fstatus=ok
      fi
      # The names listed under the last "failures:" heading.
      names="$(awk '/^failures:$/ { n = NR; delete seen; k = 0 } n && NR > n && /^    [^ ]/ { sub(/^    /, ""); l[++k] = $0 } END { for (j = 1; j <= k; j++) printf "%s ", l[j] }' "$log")"
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$group" "$fstatus" "$p" "$f" "$i" "$secs" \
        "$(grep -c 'skipped:' "$log" || true)" "$names" "$nskip" >>"$work/fast.tsv"
      printf '  %-40s %-10s passed %s, failed %s, ignored %s, %ss%s\n' "$group" "$fstatus" "$p" "$f" "$i" "$secs" \
        "$([ "$nskip" -gt 0 ] && echo ", $nskip skipped (crashed or hung alone)")"
      if [ -n "$names" ]; then echo "    failing: $names"; fi
    done
    n=$(awk -F'\t' '$2 == "not-run"' "$work/fast.tsv" | wc -l)
    if [ "$n" -gt 0 ]; then
      step_row fast cut "$(($(now) - t0))" "$n binaries not run within the cap of ${t}s"
    else
      step_row fast ok "$(($(now) - t0))" "cap ${t}s, per binary ${cap_bin}s"
    fi
    pack
  fi

  if want sanitize; then
    t0=$(now)
    # The subset: small parity tests, no U-Net, no large GEMM or OOM path, no harness self-check.
    # Small and varied by default: elementwise (aligned and misaligned), the reductions, a GEMM
    # with its bias epilogue, the conv, norm and attention layers, the block maps reading bf16
    # activations, the fused Adam step, and the tensor-core GEMM and convolutions at ragged shapes
    # (cp.async, ldmatrix and barriers: racecheck).
    local k='(\[[^]]*\] )?'
    local pat="${EMPRIOR_SANITIZE_TESTS:-^cuda_parity::${k}(elementwise::aligned|misaligned::elementwise|reductions::|gemm::bias)|^cuda_nn_parity::${k}layers::(conv3x3|layer_norm|self_attention|bf16_kept_inputs|bf16_stored_outputs)|^cuda_posterior_parity::${k}train::adam|^cuda_tensor_core_parity::${k}tc_(gemm|conv)::ragged}"
    local nopat="${EMPRIOR_SANITIZE_SKIP:-unet|large|big|huge|oom|grid_?z|262144|harness|cpu_against_cpu}"
    local max="${EMPRIOR_SANITIZE_MAX:-11}"
    : >"$work/sanitize-subset.tsv"
    while IFS=$'\t' read -r group name; do
      if [[ "$group::$name" =~ $pat ]] && ! [[ "$group::$name" =~ $nopat ]]; then
        # A test that hung alone would hang under every tool.
        if [ -f "$work/serial.tsv" ] &&
          awk -F'\t' -v g="$group" -v n="$name" '$1 == g && $2 == n && $3 == "timeout" { f = 1 } END { exit !f }' "$work/serial.tsv"; then
          continue
        fi
        if [ "$(wc -l <"$work/sanitize-subset.tsv")" -lt "$max" ]; then
          printf '%s\t%s\n' "$group" "$name" >>"$work/sanitize-subset.tsv"
        fi
      fi
    done < <(cat "$work/tests.tsv")
    : >"$work/sanitizer.tsv"
    local sanitizer="" tools=(memcheck initcheck racecheck synccheck)
    if [ "$dry" = 1 ]; then
      tools=(none)
      echo "== sanitizer subset WITHOUT a sanitizer (dry run): $(wc -l <"$work/sanitize-subset.tsv") tests"
    else
      sanitizer="$(command -v compute-sanitizer || true)"
      local c
      for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
        if [ -z "$sanitizer" ] && [ -x "$c" ]; then sanitizer="$c"; fi
      done
      if [ -z "$sanitizer" ]; then
        sanitizer="$(find /usr/local /opt -maxdepth 6 -type f -name compute-sanitizer 2>/dev/null | head -n 1 || true)"
      fi
      echo "== compute-sanitizer (${sanitizer:-not found}) over $(wc -l <"$work/sanitize-subset.tsv") tests"
    fi
    if [ "$dry" = 0 ] && [ -z "$sanitizer" ]; then
      step_row sanitize unavailable 0 "compute-sanitizer not found"
    elif [ ! -s "$work/sanitize-subset.tsv" ]; then
      step_row sanitize error 0 "the subset is empty (EMPRIOR_SANITIZE_TESTS=$pat)"
    else
      local tool errors report
      for tool in "${tools[@]}"; do
        mkdir -p "$work/sanitizer/$tool"
        t=$(cap "$cap_tool")
        end=$(($(now) + t))
        while IFS=$'\t' read -r group name; do
          local left=$((end - $(now)))
          if [ "$left" -lt 5 ]; then
            printf '%s\t%s\t%s\t\tnot-run\t0\n' "$tool" "$group" "$name" >>"$work/sanitizer.tsv"
            continue
          fi
          left=$(min "$left" "$cap_san_test")
          log="$work/sanitizer/$tool/$(safe "$group::$name").out"
          report="$work/sanitizer/$tool/$(safe "$group::$name").txt"
          local ts
          ts=$(date +%s.%N)
          rc=0
          if [ "$tool" = none ]; then
            timeout -k 5 "$left" "$bundle/tests/$group" --exact "$name" --test-threads=1 --color never \
              "${incl[@]}" >"$log" 2>&1 </dev/null || rc=$?
            errors=""
          else
            local envcmd=(env)
            if [ "$tool" = initcheck ]; then envcmd=(env -u EMPRIOR_POISON); fi
            "${envcmd[@]}" timeout -k 5 "$left" "$sanitizer" --tool "$tool" --error-exitcode 86 \
              --print-limit 25 --check-exit-code no --require-cuda-init no --log-file "$report" \
              "$bundle/tests/$group" --exact "$name" --test-threads=1 --color never "${incl[@]}" \
              >"$log" 2>&1 </dev/null || rc=$?
            # memcheck, initcheck and synccheck end with "ERROR SUMMARY: N errors"; racecheck with
            # "RACECHECK SUMMARY: H hazards displayed (E errors, W warnings)": take E.
            errors="$(grep -oE 'ERROR SUMMARY: [0-9]+|RACECHECK SUMMARY: [0-9]+ hazards? displayed \([0-9]+ error' "$report" 2>/dev/null |
              tail -n 1 | grep -oE '[0-9]+' | tail -n 1 || true)"
          fi
          secs=$(awk -v a="$ts" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
          # The test's own outcome (rc 86 is the sanitizer's: read the test's summary line).
          if [ "$rc" = 86 ]; then rc=0; fi
          line="$(classify "$log" "$rc")"
          IFS="$us" read -r status kernel err skips note <<<"$line"
          printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$group" "$name" "${errors:-?}" "$status" "$secs" >>"$work/sanitizer.tsv"
          printf '  %-10s %-60s errors %-4s test %-10s %6ss\n' "$tool" "$group::$name" "${errors:--}" "$status" "$secs"
          if [ -n "$errors" ] && [ "$errors" != 0 ]; then
            grep -E '^=========  *(Invalid|Uninitialized|Race|Barrier|Error|Program hit|.*hazard)|^=========     at ' "$report" | head -n 12 | sed 's/^/    /' || true
          fi
        done < <(cat "$work/sanitize-subset.tsv")
        pack
      done
      if [ "$dry" = 1 ]; then step_row sanitize dry "$(($(now) - t0))" "no sanitizer on the CPU: the subset ran plain"; else step_row sanitize ok "$(($(now) - t0))" "per tool cap ${cap_tool}s"; fi
    fi
    pack
  fi

  local device=cuda
  if [ "$dry" = 1 ]; then device=cpu; fi
  if want bench; then
    echo "== emprior bench --device $device"
    t0=$(now)
    t=$(cap "$cap_bench")
    if [ "$t" -lt 10 ]; then
      step_row bench skipped 0 "budget spent"
    else
      local bench_args=()
      if [ "$quick" = 1 ] || [ "$dry" = 1 ]; then bench_args+=(--quick); fi
      rc=0
      "${bench_env[@]}" timeout -k 5 "$t" "$bundle/emprior" bench --device "$device" "${bench_args[@]}" >"$work/bench.log" 2>&1 </dev/null || rc=$?
      { echo "### Benchmarks (emprior bench --device $device ${bench_args[*]})"; echo; cat "$work/bench.log"; } >"$work/bench.md"
      cat "$work/bench.log"
      if [ "$rc" = 0 ]; then
        step_row bench ok "$(($(now) - t0))" ""
      elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        step_row bench timeout "$(($(now) - t0))" "cap ${t}s"
      else
        step_row bench error "$(($(now) - t0))" "emprior bench exited $rc"
      fi
    fi
    pack
  fi

  if want peers; then
    echo "== beside the peers: emprior, PyTorch and JAX on the same workloads (benches/baselines)"
    t0=$(now)
    t=$(cap "$cap_peers")
    # On a GPU the compiled variants would spend minutes compiling the paper U-Net on an empty
    # cache: eager and bf16 (and JAX's jit, which compiles once per workload) fit the cap;
    # EMPRIOR_TORCH_VARIANTS / EMPRIOR_JAX_VARIANTS choose others for a focused rerun.
    local pdir="$work/peers" py=python3 pargs=(--repeats 5) jdev=gpu peak=()
    local tv=(--variants "${EMPRIOR_TORCH_VARIANTS:-torch-eager,torch-bf16}")
    local jv=(--variants "${EMPRIOR_JAX_VARIANTS:-jax-jit,jax-jit-bf16}")
    mkdir -p "$pdir"
    if [ "$dry" = 1 ]; then
      # One small workload on the CPU; the peers only where this machine has them.
      pargs=(--quick --workloads timemlp_train_step)
      tv=(--variants torch-eager)
      jv=(--variants jax-jit)
      jdev=cpu
      [ -x "$root/.baselines-venv/bin/python" ] && py="$root/.baselines-venv/bin/python"
    fi
    if [ "$t" -lt 30 ]; then
      step_row peers skipped 0 "budget spent"
    else
      # Each run gets what is left of the step's time when it starts, shared with the runs after
      # it; a run cut by its time is INCOMPLETE, a crash is an error.
      local pend=$(($(now) + t)) status=ok notes=() files=() fw script left
      slice() { local l=$((pend - $(now))); echo $((l / $1)); }
      rc=0
      timeout -k 5 "$(slice 3)" "$bundle/emprior" bench --peers --device "$device" "${pargs[@]}" \
        --json "$pdir/ours.jsonl" >"$pdir/ours.log" 2>&1 </dev/null || rc=$?
      case "$rc" in
        0) ;;
        124 | 137) status=timeout; notes+=("emprior bench --peers cut by its time") ;;
        *) status=error; notes+=("emprior bench --peers exited $rc") ;;
      esac
      [ -s "$pdir/ours.jsonl" ] && files+=("$pdir/ours.jsonl")
      local remaining=2
      for fw in torch jax; do
        script="$bundle/baselines/${fw}_workloads.py"
        if ! timeout -k 5 60 "$py" -c "import $fw" >/dev/null 2>&1; then
          notes+=("$fw is not installed here")
          [ "$dry" = 0 ] && [ "$status" = ok ] && status=incomplete
          remaining=$((remaining - 1))
          continue
        fi
        local dev_arg="$device" extra=()
        [ "$fw" = jax ] && dev_arg="$jdev"
        if [ "$fw" = torch ]; then extra=("${tv[@]}"); else extra=("${jv[@]}"); fi
        left=$(slice "$remaining")
        remaining=$((remaining - 1))
        if [ "$left" -lt 10 ]; then
          notes+=("$fw: no time left")
          [ "$status" = ok ] && status=timeout
          continue
        fi
        rc=0
        timeout -k 5 "$left" "$py" "$script" --device "$dev_arg" "${pargs[@]}" "${extra[@]}" \
          --json "$pdir/$fw.jsonl" >"$pdir/$fw.log" 2>&1 </dev/null || rc=$?
        case "$rc" in
          0) ;;
          124 | 137) notes+=("$fw cut at ${left}s (its finished workloads are in the table)"); [ "$status" = ok ] && status=timeout ;;
          *) notes+=("$fw exited $rc (see peers/$fw.log)"); status=error ;;
        esac
        [ -s "$pdir/$fw.jsonl" ] && files+=("$pdir/$fw.jsonl")
      done
      if [ "$dry" = 0 ]; then
        # MFU against the bf16 tensor-core rate measured in this run (an 8192^3 product).
        local p
        p=$(timeout -k 5 60 "$py" -c '
import torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
s.record()
for _ in range(10): a @ b
e.record(); torch.cuda.synchronize()
print(f"{10 * 2 * 8192**3 / (s.elapsed_time(e) * 1e-3) / 1e12:.1f}")' 2>/dev/null || true)
        [ -n "$p" ] && peak=(--peak-tflops "$p")
      fi
      {
        echo "### Beside the peers (benches/baselines; ratio = peer / ours, above 1 = emprior faster)"
        echo
        [ "${#peak[@]}" -gt 0 ] && { echo "MFU against the bf16 rate measured in this run: ${peak[1]} TFLOP/s."; echo; }
        if [ "${#files[@]}" -gt 0 ]; then
          timeout -k 5 30 python3 "$bundle/baselines/compare.py" "${files[@]}" "${peak[@]}" || echo "(compare.py failed)"
        else
          echo "(no measurements)"
        fi
        echo
        sed -n '/^Projected/,$p' "$pdir/ours.log" 2>/dev/null || true
        for n in "${notes[@]}"; do echo "- $n"; done
      } >"$work/peers.md" 2>&1
      cat "$work/peers.md"
      # A dry run on a machine without the peer frameworks is still a pass of the script.
      if [ "$dry" = 1 ] && [ "$status" != error ]; then status=ok; fi
      step_row peers "$status" "$(($(now) - t0))" "${notes[*]:-}"
    fi
    pack
  fi

  if want em; then
    echo "== EM runs"
    t0=$(now)
    local em="$work/em.md" sets_m=() sets_c=() sets_r=() cap_m=180 cap_c=300 cap_r=300
    : >"$em"
    if [ "$dry" = 1 ]; then
      # The same presets and paths, at toy sizes on the CPU.
      sets_m=(--set laps=1 --set observations=256 --set eval_samples=64 --set init_rounds=1 --set init_steps=4
        --set estep_steps=4 --set estep_batch=256 --set mstep_steps=20 --set mstep_batch=64 --set "hidden=32,32"
        --set emb=16 --set cg_iters=2)
      sets_c=(--set observations=32 --set init_observations=32 --set heldout=4 --set heldout_samples=1
        --set estep_steps=2 --set prior_steps=2 --set mstep_epochs=1 --set mstep_batch=16 --set estep_batch=16
        --set grid=4 --set "channels=8,16" --set "blocks=1,1" --set attention=1:2 --set init_rounds=1
        --set init_steps=4 --set init_rank=4 --set emb=16 --set init_cg_iters=2)
      sets_r=(--set slice_size=32 --set observations=8 --set init_observations=8 --set heldout=2
        --set estep_steps=2 --set prior_steps=2 --set mstep_epochs=1 --set mstep_batch=8 --set estep_batch=8
        --set grid=4 --set "channels=8,16" --set "blocks=1,1" --set attention=1:2 --set init_rounds=1
        --set init_steps=4 --set init_rank=4 --set emb=16)
      cap_m=60 cap_c=60 cap_r=60
      echo "### EM (dry run: toy sizes on the CPU, not timings)" >>"$em"
    else
      # A paper-scale lap cut 16x in both halves (256 of 4,096 PC steps, 4,096 of 65,536 Adam
      # steps: the whole lap would not fit the cap), projected back below; the Sinkhorn metric
      # runs on the host, so it is evaluated on 1,024 points.
      sets_m=(--set laps=1 --set eval_samples=1024 --set estep_steps=256 --set mstep_steps=4096)
      echo "### EM" >>"$em"
    fi
    local em_status=ok em_note=""
    # The EM runs are timed (their rates project a paper lap): no poison memsets in them.
    t=$(cap "$cap_m")
    if [ "$t" -lt 30 ]; then
      echo "manifold EM, paper preset, one lap: skipped (budget spent)" >>"$em"
      em_status=skipped em_note="budget spent"
    else
      rc=0
      EMPRIOR_POISON=0 timeout -k 10 "$t" "$bundle/emprior" em manifold --preset paper "${sets_m[@]}" --device "$device" \
        --out "$work/em-paper" >"$work/em-paper.log" 2>&1 </dev/null || rc=$?
      { echo; echo "manifold EM, paper preset, one lap (${sets_m[*]}; cap ${t}s, exit $rc):"; } >>"$em"
      if [ "$rc" = 0 ]; then
        { echo '```'; cat "$work/em-paper/metrics.jsonl" || true; echo '```'; } >>"$em"
        if [ "$dry" = 0 ]; then
          python3 - "$work/em-paper/metrics.jsonl" >>"$em" <<'PY' || true
import json, sys
lap = [json.loads(l) for l in open(sys.argv[1])][-1]
e, m = 16 * lap["estep_seconds"], 16 * lap["mstep_seconds"]
print(f"Projected paper manifold lap on this device (16x the cut lap): E-step {e/3600:.2f} h + M-step {m/3600:.2f} h = {(e+m)/3600:.2f} h; 32 laps {32*(e+m)/3600:.1f} h")
PY
        fi
      else
        { echo '```'; grep -E '^lap|E-step|M-step|rror' "$work/em-paper.log" | tail -n 8; echo '```'; } >>"$em" || true
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then em_status=timeout em_note="manifold cut at ${t}s"; else em_status=error em_note="manifold exited $rc"; fi
      fi
    fi
    # The smoke presets: the paper's U-Net through Gaussian init, one M-step and one E-step;
    # the lap line gives E-step image-steps/s and M-step images/s, from which a paper lap is
    # projected (the python snippet reads the last lap of metrics.jsonl).
    # em_smoke EXPERIMENT LABEL CAP PROJECTION SETS...
    em_smoke() {
      local experiment=$1 label=$2 limit=$3 projection=$4 rc=0
      shift 4
      t=$(cap "$limit")
      if [ "$t" -lt 30 ]; then
        { echo; echo "$label: skipped (budget spent)"; } >>"$em"
        if [ "$em_status" = ok ]; then em_status=skipped em_note="budget spent"; fi
        return
      fi
      EMPRIOR_POISON=0 timeout -k 10 "$t" "$bundle/emprior" em "$experiment" --preset smoke "$@" \
        --device "$device" --out "$work/em-$experiment" >"$work/em-$experiment.log" 2>&1 </dev/null || rc=$?
      { echo; echo "$label (cap ${t}s, exit $rc):"; } >>"$em"
      if [ "$rc" = 0 ]; then
        { echo '```'; cat "$work/em-$experiment/metrics.jsonl" || true; echo '```'; } >>"$em"
        python3 -c "$projection" "$work/em-$experiment/metrics.jsonl" >>"$em" || true
      else
        { echo '```'; grep -E '^lap|E-step|M-step|rror' "$work/em-$experiment.log" | tail -n 8; echo '```'; } >>"$em" || true
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
          if [ "$em_status" = ok ]; then em_status=timeout em_note="$experiment cut at ${t}s"; fi
        else
          em_status=error em_note="${em_note:+$em_note; }$experiment exited $rc"
        fi
      fi
    }
    # CIFAR-10: 4 epochs of 1,024, DDPM 16 steps with 1 CG iteration, batch 256; a paper lap is
    # 50,000 observations x 256 steps and 256 epochs of 195 batches of 256.
    em_smoke cifar10 "CIFAR-10 EM, smoke preset (paper U-Net)" "$cap_c" '
import json, sys
lap = [json.loads(l) for l in open(sys.argv[1])][-1]
e = 50000 * 256 / lap["estep_image_steps_per_s"]
m = 256 * 195 * 256 / lap["mstep_images_per_s"]
print(f"Projected paper lap on this device: E-step {e/3600:.2f} h + M-step {m/3600:.2f} h = {(e+m)/3600:.2f} h; 32 laps {32*(e+m)/86400:.1f} days")
' --set data_dir="$bundle/cifar10" "${sets_c[@]}"
    # MRI: the paper's 77.6M-parameter U-Net at 320 x 320 on 64 slices of the Colin27 head, 2
    # samples each, DDPM 16 steps with 3 CG iterations; a paper lap (method.md §10) is about
    # 66,000 posterior samples x 64 steps and 64 epochs of about 60,000 samples.
    em_smoke mri "MRI EM, smoke preset (paper U-Net, 320 x 320)" "$cap_r" '
import json, sys
lap = [json.loads(l) for l in open(sys.argv[1])][-1]
e = 66000 * 64 / lap["estep_image_steps_per_s"]
m = 64 * 60000 / lap["mstep_images_per_s"]
print(f"Projected paper MRI lap on this device (fastMRI sizes): E-step {e/3600:.2f} h + M-step {m/3600:.2f} h = {(e+m)/3600:.2f} h; 16 laps {16*(e+m)/86400:.1f} days")
' --set data_dir="$bundle/mri" "${sets_r[@]}"
    cat "$em"
    step_row em "$em_status" "$(($(now) - t0))" "$em_note"
    pack
  fi

  if want criterion; then
    echo "== criterion benches"
    t0=$(now)
    local crit="$work/criterion.md" b crit_status=ok crit_note=""
    echo "### Criterion benches$([ "$dry" = 1 ] && echo ' (dry run: --list only)')" >"$crit"
    echo >>"$crit"
    for b in "$bundle"/benches/*; do
      [ -x "$b" ] || continue
      t=$(cap 60)
      if [ "$t" -lt 15 ]; then
        echo "- $(basename "$b"): skipped (budget spent)" >>"$crit"
        crit_status=skipped crit_note="budget spent"
        continue
      fi
      rc=0
      if [ "$dry" = 1 ]; then
        timeout -k 5 "$t" "$b" --bench --list >"$work/criterion-$(basename "$b").txt" 2>&1 </dev/null || rc=$?
      else
        # networks: the GPU group at batch 64 only (its own 10-sample setting would take minutes
        # at 256; the CPU groups are measured here, not there).
        local filter=()
        [ "$(basename "$b")" = networks ] && filter=('unet_cifar10_gpu_f32/.*/64')
        timeout -k 5 "$t" "$b" --bench --warm-up-time 1 --measurement-time 3 "${filter[@]}" \
          >"$work/criterion-$(basename "$b").txt" 2>&1 </dev/null || rc=$?
      fi
      echo "- $(basename "$b"): exit $rc" >>"$crit"
      grep -E 'time:|thrpt:' "$work/criterion-$(basename "$b").txt" | head -n 40 | sed 's/^/    /' >>"$crit" || true
      if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        if [ "$crit_status" = ok ]; then crit_status=timeout crit_note="$(basename "$b") cut at ${t}s"; fi
      elif [ "$rc" != 0 ]; then
        crit_status=error crit_note="$(basename "$b") exited $rc"
      fi
    done
    cat "$crit"
    step_row criterion "$crit_status" "$(($(now) - t0))" "$crit_note"
    pack
  fi

  local s
  for s in info serial fast sanitize bench em criterion; do
    want "$s" || step_row "$s" skipped 0 "not in --steps$([ "$quick" = 1 ] && echo ' (--quick)')"
  done
  pack
  echo
  cat "$out/summary.md"
  echo
  echo "device-check: $(cat "$work/verdict") ($(($(now) - t_start)) s); summary in $out/summary.md, logs in $out/logs.tar.gz"
  # exit, not a failing test: the ERR trap is for the script's own breakage.
  case "$(cat "$work/verdict")" in
    PASS) exit 0 ;;
    INCOMPLETE) exit 3 ;;
    *) exit 1 ;;
  esac
}

record() {
  local dir="${1:?usage: device-check.sh record DIR (the files_at folder of the run)}"
  local file=benches/RESULTS.md
  [ -f "$dir/summary.md" ] || die "no $dir/summary.md"
  if grep -q 'device-check dry run' "$dir/summary.md"; then
    die "$dir/summary.md is from a dry run on the CPU, not a GPU result; not recorded"
  fi
  [ -f "$file" ] || printf '# GPU results\n\nEvery GPU run of scripts/device-check.sh, newest last. A GPU claim not recorded here does not exist.\n' >"$file"
  { echo; cat "$dir/summary.md"; } >>"$file"
  echo "appended $dir/summary.md to $file"
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) shift; run_checks "$@" ;;
  record) shift; record "$@" ;;
  *) echo "usage: $0 prepare [--dry-run] [--resources FILE] | run [--quick] [--dry-run] [--budget S] [--steps LIST] [--tests REGEX] | record DIR" >&2; exit 2 ;;
esac
