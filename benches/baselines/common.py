"""Shared, framework-free pieces of the Python peers (torch_workloads.py, jax_workloads.py).

The workload constants of WORKLOADS.md, the network configurations with the parameter counts
emprior prints (`emprior model --preset ...`), the forward multiply-add counts emprior uses for
its FLOP column (UNet::forward_macs, TimeMlp::forward_macs), the JSON-line record and the table.
Standard library only.
"""

import json
import math
import statistics

# ----------------------------------------------------------------------------------------------
# Networks (method.md §3, src/nn/): the parameter count each peer must reproduce.

NETWORKS = {
    # The manifold TimeMLP: concat(c_in x [5], emb [64]) -> 3 x [Linear, SiLU, LayerNorm] ->
    # Linear(256 -> 5).
    "timemlp": {
        "kind": "mlp",
        "features": 5,
        "hidden": (256, 256, 256),
        "emb": 64,
        "params": 150_789,
    },
    # The CIFAR-10 quick preset.
    "unet_small": {
        "kind": "unet",
        "in_channels": 3,
        "out_channels": 3,
        "channels": (16, 32),
        "blocks": (1, 1),
        "attention": {},  # level -> heads
        "emb": 64,
        "dropout": 0.1,
        "resolution": (32, 32),
        "params": 93_699,
    },
    # The CIFAR-10 paper network (UNetConfig::cifar10).
    "unet_cifar10": {
        "kind": "unet",
        "in_channels": 3,
        "out_channels": 3,
        "channels": (128, 256, 384),
        "blocks": (5, 5, 5),
        "attention": {1: 4},
        "emb": 256,
        "dropout": 0.1,
        "resolution": (32, 32),
        "params": 57_560_451,
    },
}

# Layer constants shared by every network.
LN_EPS = 1e-5
EMB_MAX_PERIOD_EXPONENT = 1e-4  # freqs_j = 1e-4 ** (j / (E/2 - 1))
MODULATION_OUT_SCALE = 0.1

# Adam (optax defaults) with the paper's global-norm clipping.
ADAM = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "clip": 1.0}

# ----------------------------------------------------------------------------------------------
# Workloads (WORKLOADS.md; our side: src/bench/peers.rs).

WORKLOADS = {
    "timemlp_train_step": {
        "net": "timemlp",
        "kind": "train",
        "batch": 1024,
        "lr": 1e-3,
        "ema": 0.999,
        "sigma_min": 1e-3,
        "sigma_max": 1e1,
        "gpu_only": False,
    },
    "pc_mmps_step": {
        "net": "timemlp",
        "kind": "pc_mmps",
        "batch": 8192,
        "obs_dim": 2,
        "sigma_y": 0.01,
        "cg_iters": 3,
        # The step's two noise levels (sigmas, as src/bench/peers.rs uses them) and LMC size.
        "sigma_t": 1.0,
        "sigma_s": 0.9,
        "tau": 0.1,
        "gpu_only": False,
    },
    "unet_small_train_step": {
        "net": "unet_small",
        "kind": "train",
        "batch": 32,
        "lr": 1e-3,
        "ema": 0.99,
        "sigma_min": 1e-3,
        "sigma_max": 1e2,
        "gpu_only": False,
    },
    "unet_small_forward_vjp": {
        "net": "unet_small",
        "kind": "forward_vjp",
        "batch": 64,
        "sigma": 1.0,
        "gpu_only": False,
    },
    "unet_cifar10_train_step": {
        "net": "unet_cifar10",
        "kind": "train",
        "batch": 256,
        "lr": 2e-4,
        "ema": 0.9999,
        "sigma_min": 1e-3,
        "sigma_max": 1e2,
        "gpu_only": True,
    },
    "unet_cifar10_forward_vjp": {
        "net": "unet_cifar10",
        "kind": "forward_vjp",
        "batch": 256,
        "sigma": 1.0,
        "gpu_only": True,
    },
    "unet_cifar10_mmps": {
        "net": "unet_cifar10",
        "kind": "mmps_mask",
        "batch": 64,
        "keep": 0.25,  # a pixel is observed with probability 0.25 (75% masked)
        "sigma_y": 1e-3,
        "cg_iters": 1,
        "sigma": 1.0,
        "gpu_only": True,
    },
}


def default_workloads(device):
    """All workloads on a GPU; the small ones on the CPU."""
    return [w for w, c in WORKLOADS.items() if device == "cuda" or not c["gpu_only"]]


# ----------------------------------------------------------------------------------------------
# FLOPs: the same count emprior reports (GEMM-shaped work only; FLOPs = 2 x multiply-adds).


def forward_macs(net):
    """Multiply-adds of one forward for one sample (mirrors TimeMlp / UNet::forward_macs)."""
    cfg = NETWORKS[net]
    if cfg["kind"] == "mlp":
        widths = [cfg["features"] + cfg["emb"], *cfg["hidden"], cfg["features"]]
        return sum(a * b for a, b in zip(widths, widths[1:]))
    c, e = cfg["channels"], cfg["emb"]
    h0, w0 = cfg["resolution"]

    def pixels(i):
        return (h0 >> i) * (w0 >> i)

    def conv(cin, cout, i):
        return 9 * cin * cout * pixels(i)

    def modulation(ch):
        return e * e + e * 3 * ch

    def blocks(i):
        res = 2 * conv(c[i], c[i], i) + modulation(c[i])
        att = 0
        if i in cfg["attention"]:
            t = pixels(i)
            att = 4 * c[i] * c[i] * t + 2 * t * t * c[i] + modulation(c[i])
        return cfg["blocks"][i] * (res + att)

    macs = conv(cfg["in_channels"], c[0], 0)
    for i in range(len(c)):
        if i > 0:
            macs += conv(c[i - 1], c[i], i)
        macs += 2 * blocks(i)
        if i + 1 < len(c):
            macs += conv(c[i] + c[i + 1], c[i], i)
    return macs + c[0] * cfg["out_channels"] * pixels(0)


def workload_flops(workload):
    """FLOPs of one unit (network passes only), counted as src/bench/peers.rs counts them:
    a training step or a forward + VJP as 3 forwards, an MMPS call with k CG iterations as
    1 + 2 (k + 1) forwards (a VJP as two), a PC step as two such calls."""
    w = WORKLOADS[workload]
    fwd = 2.0 * forward_macs(w["net"]) * w["batch"]
    if w["kind"] in ("train", "forward_vjp"):
        return 3.0 * fwd
    if w["kind"] == "pc_mmps":
        return 2.0 * (1 + 2 * (w["cg_iters"] + 1)) * fwd
    if w["kind"] == "mmps_mask":
        return (1 + 2 * (w["cg_iters"] + 1)) * fwd
    raise ValueError(workload)


# ----------------------------------------------------------------------------------------------
# Output.


def median(values):
    return float(statistics.median(values))


def record(impl, workload, device, median_ms, repeats, note="", **extra):
    """One JSON-line record of WORKLOADS.md (median_ms None when the variant could not run)."""
    w = WORKLOADS[workload]
    rec = {
        "impl": impl,
        "workload": workload,
        "device": device,
        "median_ms": None if median_ms is None or not math.isfinite(median_ms) else round(median_ms, 6),
        "repeats": repeats,
        "params": NETWORKS[w["net"]]["params"],
        "batch": w["batch"],
        "flops": workload_flops(workload),
        "note": note,
    }
    rec.update(extra)
    return rec


def append_json(path, records):
    """Appends one JSON object per line to `path`."""
    with open(path, "a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def format_table(records):
    """A readable table: one row per workload, one column per impl (median ms)."""
    impls = []
    for r in records:
        if r["impl"] not in impls:
            impls.append(r["impl"])
    workloads = []
    for r in records:
        if r["workload"] not in workloads:
            workloads.append(r["workload"])
    cell = {(r["workload"], r["impl"]): r["median_ms"] for r in records}
    head = ["workload", "batch"] + impls
    rows = []
    for wl in workloads:
        row = [wl, str(WORKLOADS[wl]["batch"])]
        for im in impls:
            v = cell.get((wl, im), "")
            row.append("" if v == "" else ("null" if v is None else f"{v:.3f}"))
        rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cols: "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)
