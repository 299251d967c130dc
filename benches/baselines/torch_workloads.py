#!/usr/bin/env python3
"""PyTorch peers of emprior's workloads (benches/baselines/WORKLOADS.md).

The networks follow src/nn/ layer for layer (method.md §3): the manifold TimeMLP and the paper's
U-Net with per-block modulation, LayerNorm over channels without affine, residual
(x + c h) / sqrt(1 + c^2), 4-head self-attention, strided-conv descent, one skip per level,
nearest upsampling, and EDM preconditioning with sigma_data = 1 and c_noise = ln sigma.
Each workload is timed in up to four variants: torch-eager, torch-compile, torch-bf16 (autocast
bf16, channels_last for U-Nets) and torch-compile-bf16.

    python3 torch_workloads.py --device cpu|cuda [--workloads a,b] [--variants v1,v2]
        [--repeats N] [--quick] [--threads N] [--json FILE] [--check-cifar10]
"""

import argparse
import math
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from common import ADAM, LN_EPS, NETWORKS, WORKLOADS  # noqa: E402

VARIANTS = ["torch-eager", "torch-compile", "torch-bf16", "torch-compile-bf16"]

# ----------------------------------------------------------------------------------------------
# Layers


def init_linear_(weight, bias, fan_in, scale=1.0):
    """inox / emprior init: W ~ U(+-1/sqrt(fan_in)) (times `scale`), b = 0."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        weight.uniform_(-bound, bound).mul_(scale)
        if bias is not None:
            bias.zero_()


def make_linear(fan_in, fan_out, bias=True, scale=1.0):
    lin = nn.Linear(fan_in, fan_out, bias=bias)
    init_linear_(lin.weight, lin.bias, fan_in, scale)
    return lin


def make_conv3x3(cin, cout, stride=1):
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
    init_linear_(conv.weight, conv.bias, 9 * cin)
    return conv


def channel_layer_norm(x):
    """LayerNorm over the channel axis of [N, C, H, W], no affine, eps 1e-5 (per pixel): F.layer_norm
    over the [N, H, W, C] view, returned in the input's memory format (a view for channels_last,
    one copy back to NCHW otherwise; faster in eager than a reduction over dim 1)."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=LN_EPS).permute(0, 3, 1, 2)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y
    return y.contiguous()


def sinusoidal_embedding(c_noise, width):
    """[N] -> [N, E]: sin(f_j c) for j < E/2, then cos; f_j = 1e-4 ** (j / (E/2 - 1))."""
    half = width // 2
    exponent = torch.linspace(0.0, 1.0, half, device=c_noise.device, dtype=torch.float32)
    freqs = torch.pow(torch.tensor(common.EMB_MAX_PERIOD_EXPONENT, device=c_noise.device), exponent)
    angle = c_noise.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


class Modulation(nn.Module):
    """emb -> Linear(E, E) -> SiLU -> Linear(E, 3C) (init x 0.1) -> (a, b, c), each [N, C, 1, 1]."""

    def __init__(self, channels, emb):
        super().__init__()
        self.hidden = make_linear(emb, emb)
        self.out = make_linear(emb, 3 * channels, scale=common.MODULATION_OUT_SCALE)

    def forward(self, emb):
        m = self.out(F.silu(self.hidden(emb)))
        a, b, c = m[:, :, None, None].chunk(3, dim=1)
        return a, b, c


def modulated_residual(x, h, c):
    return (x + c * h) * torch.rsqrt(1 + c * c)


class ResBlock(nn.Module):
    """h = Conv(Dropout(SiLU(Conv(LN((1 + a) x + b))))); out = (x + c h) / sqrt(1 + c^2)."""

    def __init__(self, channels, emb, dropout):
        super().__init__()
        self.modulation = Modulation(channels, emb)
        self.conv1 = make_conv3x3(channels, channels)
        self.conv2 = make_conv3x3(channels, channels)
        self.dropout = dropout

    def forward(self, x, emb):
        a, b, c = self.modulation(emb)
        h = channel_layer_norm((1 + a) * x + b)
        h = F.silu(self.conv1(h))
        h = F.dropout(h, p=self.dropout, training=self.training)
        h = self.conv2(h)
        return modulated_residual(x, h, c)


class AttBlock(nn.Module):
    """h = MHA(LN((1 + a) x + b)) over the H*W tokens; out = (x + c h) / sqrt(1 + c^2).

    q, k, v: one Linear(C -> 3C) with bias (q = the first C outputs, heads consecutive within
    each); output projection Linear(C -> C) without bias; softmax(q k^T / sqrt(C / heads)).
    """

    def __init__(self, channels, heads, emb):
        super().__init__()
        self.modulation = Modulation(channels, emb)
        self.qkv = make_linear(channels, 3 * channels)
        self.proj = make_linear(channels, channels, bias=False)
        self.heads = heads

    def forward(self, x, emb):
        a, b, c = self.modulation(emb)
        h = channel_layer_norm((1 + a) * x + b)
        n, ch, hh, ww = h.shape
        d = ch // self.heads
        tokens = h.permute(0, 2, 3, 1).reshape(n, hh * ww, ch)
        qkv = self.qkv(tokens).view(n, hh * ww, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [N, heads, T, d]
        o = F.scaled_dot_product_attention(q, k, v)
        o = self.proj(o.transpose(1, 2).reshape(n, hh * ww, ch))
        h = o.view(n, hh, ww, ch).permute(0, 3, 1, 2)
        return modulated_residual(x, h, c)


class UNet(nn.Module):
    """The paper's U-Net as src/nn/unet.rs builds it (one skip per level)."""

    def __init__(self, cfg):
        super().__init__()
        c, e = cfg["channels"], cfg["emb"]
        self.emb = e
        self.levels = len(c)

        def blocks(i):
            mods = []
            for _ in range(cfg["blocks"][i]):
                mods.append(ResBlock(c[i], e, cfg["dropout"]))
                if i in cfg["attention"]:
                    mods.append(AttBlock(c[i], cfg["attention"][i], e))
            return nn.ModuleList(mods)

        # Registration order follows ours (descent levels, then ascent deepest first).
        self.down_conv = nn.ModuleList()
        self.down_blocks = nn.ModuleList()
        for i in range(len(c)):
            cin = cfg["in_channels"] if i == 0 else c[i - 1]
            self.down_conv.append(make_conv3x3(cin, c[i], stride=1 if i == 0 else 2))
            self.down_blocks.append(blocks(i))
        merge, up = {}, {}
        for i in reversed(range(len(c))):
            if i + 1 < len(c):
                merge[i] = make_conv3x3(c[i + 1] + c[i], c[i])
            up[i] = blocks(i)
        self.merge = nn.ModuleList([merge[i] for i in range(len(c) - 1)])
        self.up_blocks = nn.ModuleList([up[i] for i in range(len(c))])
        self.head = make_linear(c[0], cfg["out_channels"])

    def forward(self, x, emb):
        skips = []
        h = x
        for i in range(self.levels):
            h = self.down_conv[i](h)
            if i > 0:
                h = channel_layer_norm(h)
            for blk in self.down_blocks[i]:
                h = blk(h, emb)
            skips.append(h)
        carry = None
        for i in reversed(range(self.levels)):
            if carry is not None:
                h = self.merge[i](torch.cat([carry, skips[i]], dim=1))
            else:
                h = skips[i]
            for blk in self.up_blocks[i]:
                h = blk(h, emb)
            if i > 0:
                carry = F.interpolate(channel_layer_norm(h), scale_factor=2, mode="nearest")
        # The final Linear C0 -> out over the channels, as a 1x1 convolution.
        return F.conv2d(h, self.head.weight[:, :, None, None], self.head.bias)


class TimeMLP(nn.Module):
    """concat(x, emb) -> [Linear, SiLU, LayerNorm] per hidden width -> Linear(-> features)."""

    def __init__(self, cfg):
        super().__init__()
        self.emb = cfg["emb"]
        widths = [cfg["features"] + cfg["emb"], *cfg["hidden"]]
        self.hidden = nn.ModuleList(make_linear(a, b) for a, b in zip(widths, widths[1:]))
        self.out = make_linear(widths[-1], cfg["features"])

    def forward(self, x, emb):
        h = torch.cat([x, emb], dim=1)
        for lin in self.hidden:
            h = F.layer_norm(F.silu(lin(h)), (lin.out_features,), eps=LN_EPS)
        return self.out(h)


class Denoiser(nn.Module):
    """EDM preconditioning, sigma_data = 1: d = c_skip x + c_out F(c_in x, emb(ln sigma)),
    one sigma per sample."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, sigma):
        shape = (-1,) + (1,) * (x.dim() - 1)
        s2 = sigma * sigma
        c_skip = (1.0 / (s2 + 1.0)).view(shape)
        c_out = (sigma * torch.rsqrt(s2 + 1.0)).view(shape)
        c_in = torch.rsqrt(s2 + 1.0).view(shape)
        emb = sinusoidal_embedding(torch.log(sigma), self.net.emb)
        return c_skip * x + c_out * self.net(c_in * x, emb)


def build_denoiser(net_name, device, channels_last=False):
    cfg = NETWORKS[net_name]
    net = TimeMLP(cfg) if cfg["kind"] == "mlp" else UNet(cfg)
    den = Denoiser(net).to(device)
    count = sum(p.numel() for p in den.parameters())
    assert count == cfg["params"], f"{net_name}: {count} parameters, emprior has {cfg['params']}"
    if channels_last and cfg["kind"] == "unet":
        den = den.to(memory_format=torch.channels_last)
    return den, count


def sample_shape(net_name):
    cfg = NETWORKS[net_name]
    if cfg["kind"] == "mlp":
        return (cfg["features"],)
    h, w = cfg["resolution"]
    return (cfg["in_channels"], h, w)


# ----------------------------------------------------------------------------------------------
# Variants


class Variant:
    def __init__(self, name, device, channels_last_f32=False):
        self.name = name
        self.device = device
        self.compile = "compile" in name
        self.bf16 = "bf16" in name
        self.channels_last = self.bf16 or channels_last_f32

    def autocast(self):
        if self.bf16:
            return torch.autocast(device_type=self.device, dtype=torch.bfloat16)
        return torch.autocast(device_type=self.device, enabled=False)

    def layout(self, t):
        if self.channels_last and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t


def compile_fn(fn):
    return torch.compile(fn, dynamic=False)


def batched_cg(matvec, b, iters):
    """Per-row CG for M v = b (b [B, m]) from v = 0, `iters` iterations, as src/posterior/cg.rs
    (r = b without an M 0 call; a zero p^T M p gives a zero step)."""
    x = torch.zeros_like(b)
    r = b
    p = b
    rr = (r * r).sum(dim=1, keepdim=True)
    for _ in range(iters):
        ap = matvec(p)
        pap = (p * ap).sum(dim=1, keepdim=True)
        alpha = torch.where(pap != 0, rr / pap, torch.zeros_like(rr))
        x = x + alpha * p
        r = r - alpha * ap
        rr_next = (r * r).sum(dim=1, keepdim=True)
        beta = torch.where(rr != 0, rr_next / rr, torch.zeros_like(rr))
        p = r + beta * p
        rr = rr_next
    return x


def mmps_denoise(den, x_t, sigma, apply_a, adjoint_a, y, sigma_y2, cg_iters, variant):
    """The MMPS posterior denoiser (method.md §5, src/posterior/mmps.rs): one forward kept for
    (cg_iters + 1) VJPs; V = sigma^2 J with J w computed as J^T w.

    y and the operators work on flattened rows [B, m]; apply_a / adjoint_a map [B, ...] <-> [B, m].
    """
    sig = torch.full((x_t.shape[0],), sigma, device=x_t.device, dtype=x_t.dtype)

    def f(x):
        with variant.autocast():
            return den(x, sig).to(x_t.dtype)

    x_hat, vjp_fn = torch.func.vjp(f, x_t)
    s2 = sigma * sigma
    residual = y - apply_a(x_hat)

    def matvec(v):
        return sigma_y2 * v + s2 * apply_a(vjp_fn(adjoint_a(v))[0])

    v = batched_cg(matvec, residual, cg_iters)
    score = vjp_fn(adjoint_a(v))[0]
    return x_hat + s2 * score


# ----------------------------------------------------------------------------------------------
# Workloads: each builder returns (step, note); step() runs one unit.


def build_train(workload, variant, device):
    w = WORKLOADS[workload]
    den, _ = build_denoiser(w["net"], device, variant.channels_last)
    den.train()
    b = w["batch"]
    gen = torch.Generator(device=device).manual_seed(7)
    x = variant.layout(torch.randn((b,) + sample_shape(w["net"]), device=device, generator=gen))
    params = [p for p in den.parameters()]
    log_min, log_max = math.log(w["sigma_min"]), math.log(w["sigma_max"])
    notes = []

    def loss_fn(x):
        # t ~ Beta(3, 3): the third smallest of five uniforms (as emprior draws it).
        t = torch.sort(torch.rand(x.shape[0], 5, device=x.device), dim=1).values[:, 2]
        sigma = torch.exp((1 - t) * log_min + t * log_max)
        shape = (-1,) + (1,) * (x.dim() - 1)
        x_t = x + sigma.view(shape) * torch.randn_like(x)
        with variant.autocast():
            d = den(x_t, sigma).float()
        weight = 1.0 / (sigma * sigma) + 1.0
        per_sample = ((d - x) ** 2).flatten(1).mean(dim=1)
        return (weight * per_sample).mean()

    adam_kw = dict(lr=w["lr"], betas=(ADAM["beta1"], ADAM["beta2"]), eps=ADAM["eps"])
    if variant.compile:
        opt = torch.optim.Adam(params, foreach=True, **adam_kw)
        notes.append("Adam foreach (compiled)")
    else:
        try:
            opt = torch.optim.Adam(params, fused=True, **adam_kw)
            notes.append("Adam fused")
        except (RuntimeError, TypeError) as e:  # no fused kernel for this device
            opt = torch.optim.Adam(params, foreach=True, **adam_kw)
            notes.append(f"Adam foreach (fused unavailable: {e})")
    with torch.no_grad():
        ema = [p.detach().clone() for p in params]
    ema_weight = 1.0 - w["ema"]

    def update():
        torch.nn.utils.clip_grad_norm_(params, ADAM["clip"], foreach=True)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], ema_weight)

    if variant.compile:
        loss_fn = compile_fn(loss_fn)
        update = compile_fn(update)
        notes.append("torch.compile(loss) + torch.compile(clip + Adam + EMA)")

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x)
        loss.backward()
        update()

    return step, "; ".join(notes)


def build_forward_vjp(workload, variant, device):
    w = WORKLOADS[workload]
    den, _ = build_denoiser(w["net"], device, variant.channels_last)
    den.eval().requires_grad_(False)
    b = w["batch"]
    gen = torch.Generator(device=device).manual_seed(8)
    shape = (b,) + sample_shape(w["net"])
    x = variant.layout(torch.randn(shape, device=device, generator=gen))
    u = variant.layout(torch.randn(shape, device=device, generator=gen))
    sig = torch.full((b,), w["sigma"], device=device)

    def f(x):
        with variant.autocast():
            return den(x, sig).float()

    def unit(x, u):
        _, vjp_fn = torch.func.vjp(f, x)
        return vjp_fn(u)[0]

    note = "torch.func.vjp"
    if variant.compile:
        unit = compile_fn(unit)
        note = "torch.compile(forward + torch.func.vjp)"
    return (lambda: unit(x, u)), note


def dense_operators(n, m, d, device):
    """Per-observation operators A [N, m, d] with unit-norm rows (as src/bench/peers.rs)."""
    gen = torch.Generator(device=device).manual_seed(9)
    a = torch.randn(n, m, d, device=device, generator=gen)
    return a / a.norm(dim=2, keepdim=True), gen


def build_pc_mmps(workload, variant, device):
    w = WORKLOADS[workload]
    den, _ = build_denoiser(w["net"], device, False)
    den.eval().requires_grad_(False)
    n, m = w["batch"], w["obs_dim"]
    d = NETWORKS[w["net"]]["features"]
    a, gen = dense_operators(n, m, d, device)
    y = torch.randn(n, m, device=device, generator=gen)
    state = {"x": torch.randn(n, d, device=device, generator=gen)}
    t, s, tau = w["sigma_t"], w["sigma_s"], w["tau"]
    sy2 = w["sigma_y"] ** 2

    def apply_a(x):
        return torch.bmm(a, x.unsqueeze(2)).squeeze(2)

    def adjoint_a(v):
        return torch.bmm(a.transpose(1, 2), v.unsqueeze(2)).squeeze(2)

    def pc_step(x):
        dd = mmps_denoise(den, x, t, apply_a, adjoint_a, y, sy2, w["cg_iters"], variant)
        x = x - (1 - s / t) * (x - dd)  # DDIM predictor, sigma t -> s
        dd = mmps_denoise(den, x, s, apply_a, adjoint_a, y, sy2, w["cg_iters"], variant)
        return x - tau * (x - dd) + s * math.sqrt(2 * tau) * torch.randn_like(x)  # one LMC step

    note = "torch.func.vjp once per MMPS call, its vjp_fn reused for the CG and score VJPs"
    fn = pc_step
    if variant.compile:
        fn = compile_fn(fn)
        note = "torch.compile(PC step with torch.func.vjp)"

    def step():
        state["x"] = fn(state["x"])

    return step, note


def build_mmps_mask(workload, variant, device):
    w = WORKLOADS[workload]
    den, _ = build_denoiser(w["net"], device, variant.channels_last)
    den.eval().requires_grad_(False)
    b = w["batch"]
    c, h, wd = sample_shape(w["net"])
    gen = torch.Generator(device=device).manual_seed(10)
    # One Bernoulli(keep) mask per pixel, shared by the channels; full-size observations.
    mask = (torch.rand(b, 1, h, wd, device=device, generator=gen) < w["keep"]).float()
    mask = variant.layout(mask.expand(b, c, h, wd).contiguous())
    y = torch.randn(b, c * h * wd, device=device, generator=gen)
    x = variant.layout(torch.randn(b, c, h, wd, device=device, generator=gen))
    sy2 = w["sigma_y"] ** 2

    # Rows flattened in the memory order of the layout (NHWC for channels_last), so the
    # reshapes are views.
    if variant.channels_last:

        def apply_a(x):
            return (mask * x).permute(0, 2, 3, 1).reshape(b, -1)

        def adjoint_a(v):
            return mask * v.view(b, h, wd, c).permute(0, 3, 1, 2)

    else:

        def apply_a(x):
            return (mask * x).reshape(b, -1)

        def adjoint_a(v):
            return mask * v.view(b, c, h, wd)

    def call(x):
        return mmps_denoise(den, x, w["sigma"], apply_a, adjoint_a, y, sy2, w["cg_iters"], variant)

    note = "torch.func.vjp once, its vjp_fn reused for the CG and score VJPs"
    if variant.compile:
        call = compile_fn(call)
        note = "torch.compile(MMPS call with torch.func.vjp)"
    return (lambda: call(x)), note


BUILDERS = {
    "train": build_train,
    "forward_vjp": build_forward_vjp,
    "pc_mmps": build_pc_mmps,
    "mmps_mask": build_mmps_mask,
}

# ----------------------------------------------------------------------------------------------
# Timing


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_unit(step, device, warmup, repeats, budget_s=None):
    """Median ms of the timed runs after `warmup` runs (CUDA events on a GPU, perf_counter on
    the CPU), how many were timed, and the seconds the warm-up took. With `budget_s`, the timed
    runs are cut to about that many seconds (judged by the last warm-up run), at least 3."""
    t0 = time.perf_counter()
    last = None
    for _ in range(warmup):
        t = time.perf_counter()
        step()
        sync(device)
        last = time.perf_counter() - t
    warm_s = time.perf_counter() - t0
    if budget_s is not None and last:
        repeats = max(min(repeats, 3), min(repeats, int(budget_s / last)))
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1e3)
    return common.median(times), repeats, warm_s


def bf16_supported(device):
    if device == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


def short_reason(e):
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:300]


def run_one(workload, variant_name, device, repeats, warmup, channels_last_f32, verbose, budget_s=None):
    variant = Variant(variant_name, device, channels_last_f32)
    base = []
    if device == "cpu":
        base.append(f"{torch.get_num_threads()} torch threads")
    else:
        base.append(torch.cuda.get_device_name())
    if variant.bf16:
        base.append("bf16 autocast")
    elif device == "cuda":
        base.append("f32, TF32 " + ("on" if torch.backends.cudnn.allow_tf32 else "off"))
    else:
        base.append("f32")
    if variant.channels_last and NETWORKS[WORKLOADS[workload]["net"]]["kind"] == "unet":
        base.append("channels_last")
    if variant.bf16 and not bf16_supported(device):
        return common.record(variant_name, workload, device, None, 0, "bf16 not supported on this device")
    torch._dynamo.reset()
    torch.manual_seed(0)
    try:
        step, note = BUILDERS[WORKLOADS[workload]["kind"]](workload, variant, device)
        ms, repeats, warm_s = time_unit(step, device, warmup, repeats, budget_s)
    except Exception as e:  # a variant that cannot run is reported, not fatal
        if verbose:
            traceback.print_exc()
        what = "compilation or run failed" if variant.compile else "run failed"
        return common.record(variant_name, workload, device, None, 0, f"{what}: {short_reason(e)}")
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    base.append(note)
    base.append(f"warm-up {warmup} runs in {warm_s:.1f} s")
    extra = {"torch": torch.__version__}
    if device == "cpu":
        extra["threads"] = torch.get_num_threads()
    return common.record(variant_name, workload, device, ms, repeats, "; ".join(base), **extra)


# ----------------------------------------------------------------------------------------------
# Self-check of the paper U-Net on the CPU (the GPU-only workloads' code path).


class overridden:
    """Temporarily sets fields of some WORKLOADS entries (for the self-check)."""

    def __init__(self, names, **fields):
        self.names, self.fields = names, fields

    def __enter__(self):
        self.saved = {n: dict(WORKLOADS[n]) for n in self.names}
        for n in self.names:
            WORKLOADS[n].update(self.fields)

    def __exit__(self, *exc):
        for n, v in self.saved.items():
            WORKLOADS[n].clear()
            WORKLOADS[n].update(v)


def check_compiled_paths(workloads):
    """The compiled variants of the cifar10 workloads' code on a tiny U-Net with attention (the
    small preset has none): a smoke test of torch.compile over SDPA, torch.func.vjp, the CG and
    the optimizer."""
    tiny = dict(NETWORKS["unet_cifar10"], channels=(16, 32), blocks=(1, 1), attention={1: 2}, emb=32)
    tiny["params"] = sum(p.numel() for p in UNet(tiny).parameters())
    NETWORKS["_tiny_attention"] = tiny
    try:
        with overridden(workloads, batch=2, net="_tiny_attention"):
            for name in workloads:
                for vname in ("torch-compile", "torch-compile-bf16"):
                    torch._dynamo.reset()
                    step, _ = BUILDERS[WORKLOADS[name]["kind"]](name, Variant(vname, "cpu"), "cpu")
                    for _ in range(3):
                        step()
                    print(f"{name} ({vname}, tiny U-Net with attention): compiled and ran 3 times")
    finally:
        del NETWORKS["_tiny_attention"]


def check_cifar10(with_compile):
    t0 = time.perf_counter()
    for channels_last in (False, True):
        den, count = build_denoiser("unet_cifar10", "cpu", channels_last)
        den.eval().requires_grad_(False)
        x = torch.randn(2, 3, 32, 32)
        u = torch.randn(2, 3, 32, 32)
        if channels_last:
            x, u = (t.contiguous(memory_format=torch.channels_last) for t in (x, u))
        sig = torch.full((2,), 1.0)
        y, vjp_fn = torch.func.vjp(lambda z: den(z, sig), x)
        g = vjp_fn(u)[0]
        assert y.shape == x.shape and g.shape == x.shape
        assert torch.isfinite(y).all() and torch.isfinite(g).all()
        # The VJP against a finite difference along a random direction: u . J v ~ (u . (D(x + e v) - D(x - e v))) / 2e.
        v = torch.randn_like(x)
        eps = 1e-2
        with torch.no_grad():
            fd = (u * (den(x + eps * v, sig) - den(x - eps * v, sig))).sum() / (2 * eps)
        ad = (g * v).sum()
        rel = abs(fd.item() - ad.item()) / max(abs(ad.item()), 1e-6)
        print(
            f"cifar10 U-Net ({'channels_last' if channels_last else 'NCHW'}): {count:,} parameters, "
            f"batch-2 forward + VJP ok, u.Jv by VJP {ad.item():.5f} vs finite difference "
            f"{fd.item():.5f} (rel. diff {rel:.1e})"
        )
        assert rel < 5e-2, "VJP disagrees with the finite difference"
    # The three cifar10 workloads at batch 2 through their builders, eager f32 and bf16.
    cifar = ("unet_cifar10_mmps", "unet_cifar10_train_step", "unet_cifar10_forward_vjp")
    with overridden(cifar, batch=2):
        for name in cifar:
            for vname in ("torch-eager", "torch-bf16"):
                step, _ = BUILDERS[WORKLOADS[name]["kind"]](name, Variant(vname, "cpu"), "cpu")
                step()
                print(f"{name} ({vname}): one batch-2 unit ran on the CPU")
    if with_compile:
        check_compiled_paths(cifar)
    macs = common.forward_macs("unet_cifar10")
    print(f"forward cost {2 * macs / 1e9:.3f} GFLOP per sample; check took {time.perf_counter() - t0:.1f} s")


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--workloads", help=f"comma-separated, from {', '.join(WORKLOADS)}")
    ap.add_argument("--variants", help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 10)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 2 eager, 3 compiled)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats; on the CPU only eager and compile")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: all cores)")
    ap.add_argument("--json", help="append one JSON line per measurement to this file")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="CPU: cut a variant's timed runs to about this many seconds, at least 3 runs "
        "(default 8 on the CPU, none on a GPU; 0 = no cut)",
    )
    ap.add_argument(
        "--channels-last-f32",
        action="store_true",
        help="also use channels_last in the f32 variants (default: NCHW, as a plain PyTorch model)",
    )
    ap.add_argument("--tf32", action="store_true", help="CUDA: let f32 matmuls and convolutions use TF32 (default: off)")
    ap.add_argument("--check-cifar10", action="store_true", help="build the paper U-Net on the CPU and check a batch-2 forward + VJP, then exit")
    ap.add_argument(
        "--check-compile",
        action="store_true",
        help="with --check-cifar10: also compile the cifar10 workloads' code on a tiny U-Net with attention (minutes)",
    )
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing variants")
    args = ap.parse_args(argv)

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if args.check_cifar10:
        check_cifar10(args.check_compile)
        return 0
    device = args.device
    if device == "cuda":
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device visible to torch")
        # f32 means f32 (as ours) unless --tf32: PyTorch's default lets cuDNN convolutions use TF32.
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = True
    workloads = args.workloads.split(",") if args.workloads else common.default_workloads(device)
    for wl in workloads:
        if wl not in WORKLOADS:
            ap.error(f"unknown workload {wl!r}")
    if args.variants:
        variants = args.variants.split(",")
    elif args.quick and device == "cpu":
        variants = ["torch-eager", "torch-compile"]
    else:
        variants = list(VARIANTS)
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}")
    repeats = args.repeats or (3 if args.quick else 10)
    budget_s = args.budget_s if args.budget_s is not None else (8.0 if device == "cpu" else 0.0)
    budget_s = budget_s or None

    print(
        f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else f", {threads} threads")
        + f", {repeats} repeats"
        + (f" (cut to about {budget_s:g} s of timed runs per variant)" if budget_s else ""),
        flush=True,
    )
    records = []
    t_all = time.perf_counter()
    for wl in workloads:
        for v in variants:
            warmup = args.warmup if args.warmup is not None else (3 if "compile" in v else 2)
            t0 = time.perf_counter()
            rec = run_one(wl, v, device, repeats, warmup, args.channels_last_f32, args.verbose, budget_s)
            ms = rec["median_ms"]
            shown = "null" if ms is None else f"{ms:.3f} ms"
            print(f"  {wl:26s} {v:20s} {shown:>14s}  ({time.perf_counter() - t0:.1f} s)  {rec['note']}", flush=True)
            records.append(rec)
            if args.json:
                common.append_json(args.json, [rec])
    print()
    print(common.format_table(records))
    print(f"\ntotal {time.perf_counter() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
