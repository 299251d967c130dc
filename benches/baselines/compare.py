#!/usr/bin/env python3
"""One side-by-side table from the JSON lines of emprior and its peers (WORKLOADS.md).

    compare.py RESULTS.jsonl [MORE.jsonl ...] [--peak-tflops T] [--title TEXT]

For each workload: our median, the best variant of each peer framework, and the ratio
peer / ours (above 1: we are faster). With --peak-tflops (a GPU's measured peak), the MFU of
ours and of the best peer from our FLOP count of the unit (the same work on both sides). A peer
whose network has another parameter count than ours is refused: it would not be the same work.
Standard library only, so it runs on the GPU machine as it is.
"""

import argparse
import json
import os
import sys


def load(paths):
    rows = []
    for path in paths:
        if not os.path.exists(path):
            print(f"(no results from {path})", file=sys.stderr)
            continue
        with open(path) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    sys.exit(f"{path}:{n}: not a JSON line ({e})")
    return rows


def framework(impl):
    return impl.split("-")[0]


def fmt_ms(ms):
    return "-" if ms is None else (f"{ms:.3f}" if ms < 100 else f"{ms:.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--title", default=None)
    args = ap.parse_args()

    rows = load(args.files)
    ours = {r["workload"]: r for r in rows if r.get("impl") == "ours"}
    peers = [r for r in rows if r.get("impl") != "ours"]
    frameworks = sorted({framework(r["impl"]) for r in peers})
    errors = []
    for r in peers:
        o = ours.get(r["workload"])
        if o and r.get("params") is not None and r["params"] != o["params"]:
            errors.append(
                f"{r['impl']} {r['workload']}: {r['params']} parameters, ours {o['params']}: not the same network"
            )
    if errors:
        sys.exit("refusing to compare:\n  " + "\n  ".join(errors))

    workloads = list(ours)
    workloads += [w for w in dict.fromkeys(r["workload"] for r in peers) if w not in ours]
    head = ["workload", "batch", "ours ms"]
    for fw in frameworks:
        head += [f"best {fw} (variant) ms", f"{fw} / ours"]
    if args.peak_tflops:
        head += ["MFU ours", "MFU best peer"]
    out = []
    if args.title:
        out += [args.title, ""]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    notes = []
    for w in workloads:
        o = ours.get(w)
        o_ms = o["median_ms"] if o else None
        batch = (o or next(r for r in peers if r["workload"] == w)).get("batch", "-")
        cells = [w, str(batch), fmt_ms(o_ms)]
        best_peer_ms = None
        for fw in frameworks:
            cands = [r for r in peers if r["workload"] == w and framework(r["impl"]) == fw]
            timed = [r for r in cands if r.get("median_ms") is not None]
            for r in cands:
                if r.get("median_ms") is None:
                    notes.append(f"{r['impl']} {w}: not run ({r.get('note', 'no reason given')})")
            if not timed:
                cells += ["-", "-"]
                continue
            best = min(timed, key=lambda r: r["median_ms"])
            cells.append(f"{fmt_ms(best['median_ms'])} ({best['impl']})")
            cells.append(f"{best['median_ms'] / o_ms:.2f}" if o_ms else "-")
            if best_peer_ms is None or best["median_ms"] < best_peer_ms:
                best_peer_ms = best["median_ms"]
        if args.peak_tflops:
            flops = o.get("flops") if o else None
            mfu = lambda ms: "-" if not (flops and ms) else f"{100 * flops / (ms * 1e-3) / (args.peak_tflops * 1e12):.1f}%"
            cells += [mfu(o_ms), mfu(best_peer_ms)]
        out.append("| " + " | ".join(cells) + " |")
    print("\n".join(out))
    if notes:
        print()
        for n in notes:
            print(f"- {n}")


if __name__ == "__main__":
    main()
