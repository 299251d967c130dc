#!/usr/bin/env python
"""POT's log-domain Sinkhorn on a few point sets: the fixtures tests/sinkhorn.rs checks against.

The paper's metric (method.md §9.1, `manifold/utils.py`) is

    ot.sinkhorn2(a=(), b=(), M=ot.dist(u, v), reg=1e-3, numItermax=1024, stopThr=1e-3,
                 method="sinkhorn_log")

so every case below calls exactly that (with its own reg / numItermax / stopThr), in float64, and
records the value sinkhorn2 returns, with the iteration count and last marginal error from the
log it returns with log=True (`niter` is the loop index at the exit, so the number of potential
updates is niter + 1; err is the last column-marginal error it checked).

Writes tests/fixtures/sinkhorn/<case>_a.npy, <case>_b.npy (float32 point values, so the files stay
small; POT gets them widened to float64, exactly as the Rust test reads them) and pot.jsonl, one
JSON line per case.

    python benches/baselines/sinkhorn_fixtures.py [--manifold DIR] [--out DIR]

`--manifold DIR` adds cases on the manifold experiment's ground truth, read from DIR/u1.npy and
DIR/u2.npy as `cargo bench --bench sinkhorn_cpu -- 4096 --dump DIR` writes them; those points are not
stored (the Rust test regenerates them from the seed). The 4,096-point case runs on POT's torch
backend in float64 when torch is importable (the same POT code; 31 minutes on a busy 2-core
machine), otherwise on NumPy (slower). The stored cases take about 4 minutes on NumPy.

Needs POT (tested with 0.9.7.post1) and NumPy; `pip install POT` into any venv.
"""

import argparse
import json
import os
import time

import numpy as np
import ot

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PAPER = dict(reg=1e-3, max_iters=1024, tol=1e-3)


def blobs(rng, n, d, centres, scale):
    """n points from an equal mixture of Gaussian blobs at `centres` with std `scale`."""
    k = rng.integers(0, len(centres), size=n)
    return centres[k] + scale * rng.standard_normal((n, d))


def ring(rng, n, radius, noise):
    angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
    r = radius + noise * rng.standard_normal(n)
    return np.stack([r * np.cos(angle), r * np.sin(angle)], axis=1)


def drawn_cases():
    """(name, a, b, settings) for the stored cases; float32-representable float64 values."""
    rng = np.random.default_rng(20260601)
    f32 = lambda x: x.astype(np.float32).astype(np.float64)
    centres = rng.uniform(-1.5, 1.5, size=(3, 5))
    cases = []
    # Two draws of one distribution (the paper's OT(u1, u2) situation) and its self-transport.
    a, b = blobs(rng, 256, 5, centres, 0.3), blobs(rng, 256, 5, centres, 0.3)
    cases.append(("blobs_256_5d", f32(a), f32(b), PAPER))
    cases.append(("self_256_5d", f32(a), f32(a), PAPER))
    # Two different distributions.
    a, b = 0.5 * rng.standard_normal((256, 5)), 0.3 + 0.5 * rng.standard_normal((256, 5))
    cases.append(("shift_256_5d", f32(a), f32(b), PAPER))
    # A larger reg that converges well inside the cap: the iteration count is then a real check.
    cases.append(("shift_256_5d_reg0.05", f32(a), f32(b), dict(reg=0.05, max_iters=5000, tol=1e-9)))
    # The paper's size class, scaled down.
    a, b = blobs(rng, 1024, 5, centres, 0.3), blobs(rng, 1024, 5, centres, 0.3)
    cases.append(("blobs_1024_5d", f32(a), f32(b), PAPER))
    # 2-D: a noisy ring against a Gaussian, unequal sizes.
    a, b = ring(rng, 1024, 1.0, 0.05), 0.6 * rng.standard_normal((768, 2))
    cases.append(("ring_1024_768_2d", f32(a), f32(b), PAPER))
    return cases


def solve(a, b, settings, nx="numpy"):
    """POT's value, iterations and last error for uniform clouds a, b."""
    if nx == "torch":
        import torch

        a, b = torch.from_numpy(a), torch.from_numpy(b)
        empty = torch.zeros(0, dtype=torch.float64)
    else:
        empty = np.asarray((), dtype=np.float64)
    M = ot.dist(a, b)
    start = time.time()
    # sinkhorn2 with log=True returns <P, M> and sinkhorn_log's log of the same solve.
    value, log = ot.sinkhorn2(
        a=empty,
        b=empty,
        M=M,
        reg=settings["reg"],
        numItermax=settings["max_iters"],
        stopThr=settings["tol"],
        method="sinkhorn_log",
        log=True,
    )
    seconds = time.time() - start
    err = float(log["err"][-1])
    return dict(
        value=float(value),
        iterations=int(log["niter"]) + 1,
        converged=int(err < settings["tol"]),
        marginal_error=err,
        seconds=round(seconds, 3),
        backend=nx,
    )


def line(case, source, a, b, settings, result):
    fields = dict(case=case, source=source, n=len(a), m=len(b), d=a.shape[1], **settings, **result)
    return json.dumps(fields)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "sinkhorn"))
    p.add_argument("--manifold", help="a directory with u1.npy and u2.npy (4096 x 5)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    lines = []
    for name, a, b, settings in drawn_cases():
        np.save(os.path.join(args.out, f"{name}_a.npy"), a.astype(np.float32))
        np.save(os.path.join(args.out, f"{name}_b.npy"), b.astype(np.float32))
        result = solve(a, b, settings)
        lines.append(line(name, "npy", a, b, settings, result))
        print(lines[-1], flush=True)
    if args.manifold:
        u1 = np.load(os.path.join(args.manifold, "u1.npy"))
        u2 = np.load(os.path.join(args.manifold, "u2.npy"))
        try:
            import torch  # noqa: F401

            big = "torch"
        except ImportError:
            big = "numpy"
        for n, nx in [(1024, "numpy"), (4096, big)]:
            a, b = u1[:n], u2[:n]
            result = solve(a, b, PAPER, nx)
            lines.append(line(f"manifold_{n}", "manifold seed 0, streams 1 and 2", a, b, PAPER, result))
            print(lines[-1], flush=True)
    meta = json.dumps(dict(case="versions", pot=ot.__version__, numpy=np.__version__))
    with open(os.path.join(args.out, "pot.jsonl"), "w") as f:
        f.write("\n".join([meta] + lines) + "\n")


if __name__ == "__main__":
    main()
