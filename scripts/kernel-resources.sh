#!/usr/bin/env bash
# Static resource check of every CUDA kernel, no GPU needed: compiles each kernels/*.cu to a cubin
# for every target architecture with the flags build.rs uses, reads ptxas's -v report and prints
# one markdown table (registers, spill stores and loads, stack frame, static shared memory,
# constant memory per kernel and architecture).
#
#   scripts/kernel-resources.sh [--arch 80,90] [--include DIR] [--out FILE] [--jobs N]
#
# Exit status: 1 when a kernel marked hot spills (spill stores or loads above 0 bytes on any
# architecture), when a kernel marked tensor-core lacks its tensor-core instructions in the PTX
# (mma.sync m16n8k16 bf16, ldmatrix, cp.async and its wait; for `// hot tensor-core wgmma`, the
# sm_90a warpgroup MMA m64n128k16, its fence, commit and wait, and the async-proxy fence) or has a
# stack frame, when a `// hot`
# marker is not directly above an `extern "C" __global__` line, or when a kernel of the sources is
# missing from ptxas's report; 2 on a usage or compile error.
#
# Marking a kernel hot: a line `// hot` directly above its `extern "C" __global__` line;
# `// hot tensor-core` also marks it as a tensor-core kernel.
#
# nvcc: $NVCC, else .cuda/nvidia/cu13/bin/nvcc (scripts/install-cuda-toolkit.sh), else
# $CUDA_HOME/bin, PATH, /usr/local/cuda/bin. Architectures: --arch, else $EMPRIOR_CUDA_ARCHS,
# else 80,90 (build.rs's default).
#
# Generated headers: build.rs may write headers the kernels include (kernel_layouts.cuh) into its
# OUT_DIR and pass `-I OUT_DIR`. The same directory is added here: --include DIR, else
# $EMPRIOR_KERNEL_INCLUDE, else the directory of the newest
# target/*/build/emprior-*/out/kernel_layouts.cuh (so run a cargo build first when the kernels
# need it); when none exists, no directory is added.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

usage() {
  sed -n '2,24p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

archs="${EMPRIOR_CUDA_ARCHS:-80,90}"
include="${EMPRIOR_KERNEL_INCLUDE:-}"
out_file=""
jobs="$(nproc 2>/dev/null || echo 2)"
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) archs="${2:?--arch needs a list such as 80,90}"; shift 2 ;;
    --include) include="${2:?--include needs a directory}"; shift 2 ;;
    --out) out_file="${2:?--out needs a file}"; shift 2 ;;
    --jobs) jobs="${2:?--jobs needs a number}"; shift 2 ;;
    -h | --help) usage ;;
    *) echo "kernel-resources: unknown argument '$1'" >&2; usage ;;
  esac
done

find_nvcc() {
  local c
  for c in "${NVCC:-}" "$root/.cuda/nvidia/cu13/bin/nvcc" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" \
    "$(command -v nvcc 2>/dev/null || true)" /usr/local/cuda/bin/nvcc; do
    if [ -n "$c" ] && [ -x "$c" ]; then
      echo "$c"
      return 0
    fi
  done
  return 1
}
nvcc="$(find_nvcc)" || {
  echo "kernel-resources: nvcc not found (set NVCC or run scripts/install-cuda-toolkit.sh)" >&2
  exit 2
}

if [ -z "$include" ]; then
  # The newest generated header of any profile's build of this crate, if there is one.
  newest="$(find target -maxdepth 5 -path '*/build/emprior-*/out/kernel_layouts.cuh' -printf '%T@ %p\n' 2>/dev/null |
    sort -rn | head -n 1 | cut -d' ' -f2- || true)"
  [ -n "$newest" ] && include="$(dirname "$newest")"
fi
if [ -n "$include" ] && [ ! -d "$include" ]; then
  echo "kernel-resources: include directory '$include' does not exist" >&2
  exit 2
fi

shopt -s nullglob
sources=(kernels/*.cu)
shopt -u nullglob
[ ${#sources[@]} -gt 0 ] || { echo "kernel-resources: no kernels/*.cu" >&2; exit 2; }
IFS=',' read -r -a arch_list <<<"$archs"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

flags=(-std=c++17 -O3 -lineinfo --expt-relaxed-constexpr -I kernels)
[ -n "$include" ] && flags+=(-I "$include")

# A module whose first line is `// build: sm_XXa only` (build.rs compiles it for that target
# alone, e.g. sm_90a for wgmma) is checked for that architecture only.
target_of() {
  sed -n '1s|^// build: sm_\([0-9]*a\) only$|\1|p' "$1"
}
archs_of() { # src: the architectures it is compiled for
  local t
  t="$(target_of "$1")"
  if [ -n "$t" ]; then echo "$t"; else echo "${arch_list[@]}"; fi
}

compile() { # src arch: the cubin and ptxas's report for one pair; the report ends in a status line
  local src="$1" arch="$2" name first
  name="$(basename "$src" .cu)"
  if "$nvcc" -cubin -gencode "arch=compute_$arch,code=sm_$arch" "${flags[@]}" -Xptxas -v "$src" \
    -o "$work/$name.sm_$arch.cubin" >"$work/$name.sm_$arch.log" 2>&1; then
    echo "ok" >"$work/$name.sm_$arch.status"
  else
    echo "failed" >"$work/$name.sm_$arch.status"
  fi
  first="$(archs_of "$src" | cut -d' ' -f1)"
  if [ "$arch" = "${first// /}" ]; then # one PTX per source, for the instruction check
    "$nvcc" -ptx -arch="compute_$arch" "${flags[@]}" "$src" -o "$work/$name.ptx" >>"$work/$name.sm_$arch.log" 2>&1 ||
      echo "failed" >"$work/$name.sm_$arch.status"
  fi
}

start=$(date +%s)
running=0
for src in "${sources[@]}"; do
  for arch in $(archs_of "$src"); do
    arch="${arch// /}"
    compile "$src" "$arch" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
      wait -n || true
      running=$((running - 1))
    fi
  done
done
wait

failed=0
for src in "${sources[@]}"; do
  for arch in $(archs_of "$src"); do
    arch="${arch// /}"
    name="$(basename "$src" .cu)"
    if [ "$(cat "$work/$name.sm_$arch.status" 2>/dev/null || echo missing)" != ok ]; then
      echo "kernel-resources: nvcc failed on $src for sm_$arch:" >&2
      cat "$work/$name.sm_$arch.log" >&2 || true
      if grep -q 'kernel_layouts.cuh' "$work/$name.sm_$arch.log" 2>/dev/null; then
        echo "kernel-resources: the generated header is missing: build first (cargo build) or pass --include DIR" >&2
      fi
      failed=1
    fi
  done
done
[ "$failed" = 0 ] || exit 2

python3 - "$work" "$out_file" "$nvcc" "$include" "$(($(date +%s) - start))" "${arch_list[*]}" "${sources[@]}" <<'PY'
import os
import re
import sys

work, out_file, nvcc, include, seconds, archs = sys.argv[1:7]
sources = sys.argv[7:]
archs = [a.strip() for a in archs.split() if a.strip()]
problems = []

def archs_of(src):
    """The architectures a source is compiled for: its `// build: sm_XXa only` target, or all."""
    with open(src, encoding="utf-8") as f:
        m = re.fullmatch(r"// build: sm_(\d+a) only", f.readline().strip())
    return [m.group(1)] if m else archs

src_archs = {os.path.basename(s): archs_of(s) for s in sources}
all_archs = sorted({a for v in src_archs.values() for a in v}, key=lambda a: (int(re.sub(r"\D", "", a)), a))

# Kernels in the sources, and which are marked hot.
kernel_file = {}
hot = set()
tensor_core = set()
wgmma = set()
global_re = re.compile(r'extern\s+"C"\s+__global__')
name_re = re.compile(r'\bvoid\s+(\w+)\s*\(')
for src in sources:
    lines = open(src, encoding="utf-8").read().split("\n")
    for i, line in enumerate(lines):
        if not global_re.search(line):
            continue
        # The name may sit on a later line, after __launch_bounds__(...).
        text = " ".join(lines[i:i + 4])
        text = re.sub(r'__launch_bounds__\s*\([^)]*\)', ' ', text)
        m = name_re.search(text)
        if not m:
            problems.append(f"{src}:{i + 1}: cannot read the kernel name of this __global__ line")
            continue
        kernel_file[m.group(1)] = os.path.basename(src)
        if i > 0 and re.fullmatch(r'\s*//\s*hot\b.*', lines[i - 1]):
            hot.add(m.group(1))
            if "tensor-core" in lines[i - 1]:
                (wgmma if "wgmma" in lines[i - 1] else tensor_core).add(m.group(1))
    for i, line in enumerate(lines):
        if re.fullmatch(r'\s*//\s*hot\b.*', line):
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if not global_re.search(nxt):
                problems.append(f'{src}:{i + 1}: "// hot" is not directly above an extern "C" __global__ line')

# ptxas -v: "Compiling entry function 'k' for 'sm_90'", then "Function properties for k",
# "N bytes stack frame, N bytes spill stores, N bytes spill loads", then
# "Used N registers, used N barriers, N bytes smem, N bytes cmem[0]" (the smem and cmem parts
# only when non-zero). Properties of non-entry functions are skipped.
rows = {}
warnings = []
for src in sources:
    base = os.path.splitext(os.path.basename(src))[0]
    for arch in src_archs[os.path.basename(src)]:
        log = open(os.path.join(work, f"{base}.sm_{arch}.log"), encoding="utf-8", errors="replace").read()
        entry = None
        props_for = None
        for line in log.splitlines():
            m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\w+)'", line)
            if m:
                entry = m.group(1)
                props_for = None
                rows[(entry, arch)] = {
                    "file": os.path.basename(src), "regs": None, "spill_st": 0, "spill_ld": 0,
                    "stack": 0, "smem": 0, "cmem": "",
                }
                continue
            m = re.search(r"Function properties for (\S+)", line)
            if m:
                props_for = m.group(1)
                continue
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and entry is not None and props_for == entry:
                r = rows[(entry, arch)]
                r["stack"], r["spill_st"], r["spill_ld"] = (int(g) for g in m.groups())
                continue
            m = re.search(r"Used (\d+) registers", line)
            if m and entry is not None:
                r = rows[(entry, arch)]
                r["regs"] = int(m.group(1))
                s = re.search(r"(\d+) bytes smem", line)
                r["smem"] = int(s.group(1)) if s else 0
                banks = re.findall(r"(\d+) bytes cmem\[(\d+)\]", line)
                if len(banks) == 1 and banks[0][1] == "0":
                    r["cmem"] = banks[0][0]
                else:
                    r["cmem"] = " ".join(f"c{b}:{n}" for n, b in banks)
                continue
            if "warning" in line.lower():
                warnings.append(f"{base} sm_{arch}: {line.strip()}")

# Tensor-core kernels: their PTX entry (device functions are inlined into it) must hold the
# instructions of the main loop in mma.cuh; a stack frame would put per-thread arrays in local
# memory inside that loop.
TC_INSTRUCTIONS = [
    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
    "ldmatrix.sync.aligned.m8n8.x4",
    "cp.async.cg.shared.global",
    "cp.async.wait_group",
]
# Hopper's (`// hot tensor-core wgmma`, sm_90a): the warpgroup MMA, its fences and waits, the
# proxy fence between cp.async's writes and wgmma's reads, and the same cp.async ring.
WG_INSTRUCTIONS = [
    "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16",
    "wgmma.fence.sync.aligned",
    "wgmma.commit_group.sync.aligned",
    "wgmma.wait_group.sync.aligned",
    "fence.proxy.async.shared::cta",
    "cp.async.cg.shared.global",
    "cp.async.wait_group",
]
for k in sorted(tensor_core | wgmma):
    base = os.path.splitext(kernel_file[k])[0]
    ptx = open(os.path.join(work, f"{base}.ptx"), encoding="utf-8", errors="replace").read()
    m = re.search(r"\.entry\s+" + re.escape(k) + r"\s*\(", ptx)
    if not m:
        problems.append(f"{kernel_file[k]}: tensor-core kernel {k} has no .entry in the PTX")
        continue
    nxt = ptx.find(".entry", m.end())
    body = ptx[m.end(): nxt if nxt >= 0 else len(ptx)]
    missing = [ins for ins in (WG_INSTRUCTIONS if k in wgmma else TC_INSTRUCTIONS) if ins not in body]
    if missing:
        problems.append(f"{kernel_file[k]}: tensor-core kernel {k} lacks in its PTX: {', '.join(missing)}")
    for arch in src_archs[kernel_file[k]]:
        r = rows.get((k, arch))
        if r and r["stack"] > 0:
            problems.append(f"{kernel_file[k]}: tensor-core kernel {k} has a {r['stack']}-byte stack frame on sm_{arch}")

for k in sorted(kernel_file):
    for arch in src_archs[kernel_file[k]]:
        if (k, arch) not in rows:
            problems.append(f"{kernel_file[k]}: kernel {k} missing from ptxas's report for sm_{arch}")
for (k, arch), r in rows.items():
    if r["regs"] is None:
        problems.append(f"{r['file']}: no 'Used N registers' line for {k} on sm_{arch}")

lines = []
lines.append("| kernel | file | arch | hot | registers | spill stores (B) | spill loads (B) | stack frame (B) | static smem (B) | cmem (B) |")
lines.append("|---|---|---|:-:|---:|---:|---:|---:|---:|---:|")
order = sorted(rows, key=lambda ka: (rows[ka]["file"], ka[0], int(re.sub(r"\D", "", ka[1]) or 0)))
hot_spills = []
cold_spills = []
for k, arch in order:
    r = rows[(k, arch)]
    is_hot = k in hot
    spill = r["spill_st"] > 0 or r["spill_ld"] > 0
    if spill:
        (hot_spills if is_hot else cold_spills).append(f"{k} (sm_{arch}: {r['spill_st']} B stores, {r['spill_ld']} B loads)")
    mark = lambda v: f"**{v}**" if spill and v else str(v)
    lines.append(
        f"| {k} | {r['file']} | sm_{arch} | {'hot' if is_hot else ''} | {r['regs'] if r['regs'] is not None else '?'} "
        f"| {mark(r['spill_st'])} | {mark(r['spill_ld'])} | {r['stack']} | {r['smem']} | {r['cmem'] or '-'} |"
    )
nk = len({k for k, _ in rows})
lines.append("")
lines.append(
    f"{nk} kernels on {', '.join('sm_' + a for a in all_archs)} (each on {', '.join('sm_' + a for a in archs)} "
    f"unless its module is built for one target alone), {len(hot)} marked hot; "
    f"nvcc {nvcc}{', -I ' + include if include else ''}; {seconds} s."
)
if tensor_core:
    lines.append(
        f"Tensor-core kernels ({len(tensor_core)}): PTX checked for " + ", ".join(TC_INSTRUCTIONS)
        + "; no stack frame."
    )
if wgmma:
    lines.append(
        f"Hopper wgmma kernels ({len(wgmma)}, sm_90a): PTX checked for " + ", ".join(WG_INSTRUCTIONS)
        + "; no stack frame."
    )
if hot_spills:
    lines.append("SPILLS IN HOT KERNELS: " + "; ".join(hot_spills))
else:
    lines.append("Hot kernels: no spills.")
if cold_spills:
    lines.append("Spills in kernels not marked hot (allowed): " + "; ".join(cold_spills))
for w in warnings:
    lines.append(f"ptxas: {w}")
for p in problems:
    lines.append(f"PROBLEM: {p}")
table = "\n".join(lines) + "\n"
sys.stdout.write(table)
if out_file:
    with open(out_file, "w", encoding="utf-8") as f:
        f.write(table)
sys.exit(1 if hot_spills or problems else 0)
PY
