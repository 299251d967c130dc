#!/usr/bin/env python3
"""The workloads of WORKLOADS.md in pure JAX (jax, jax.numpy, numpy and the standard library).

    python3 jax_workloads.py --device cpu|gpu [--workloads a,b,...] [--variants jax-jit,jax-jit-bf16]
                             [--repeats N] [--quick] [--json FILE] [--check-cifar10]

Written from the specification (method.md §3-§5, WORKLOADS.md) and from emprior's own code
(src/nn, src/diffusion, src/train, src/posterior), so that the networks, the preconditioning, the
loss, the optimizer and the posterior denoiser do the same work as ours:

- TimeMLP: concat(c_in x, emb) -> [Linear, SiLU, LayerNorm] x 3 -> Linear (150,789 parameters).
- U-Net (channels-last, NHWC): per level a 3x3 conv (stride 2 + LayerNorm below level 0), blocks
  ResBlock [+ AttBlock]; one skip per level; the ascent concatenates (upsampled, skip) and convs;
  LayerNorm + nearest x2 upsampling between levels; a final Linear. Blocks are modulated by
  Linear(E, E) -> SiLU -> Linear(E, 3C) of the raw sinusoidal embedding, LayerNorm without affine
  (eps 1e-5), residual (x + c h) / sqrt(1 + c^2); attention with a fused q/k/v projection (bias)
  and an output projection without bias.
- EDM preconditioning with sigma_data = 1, c_noise = ln sigma, one sigma per sample.
- DSM loss with lambda = 1/sigma^2 + 1; sigma from the log-linear VE schedule at t ~ Beta(3, 3)
  (the third smallest of five uniforms, as ours); Adam with optax semantics after global-norm
  clipping, then an EMA of the parameters; written by hand (no optax, no flax).
- MMPS: one forward through jax.vjp, then the returned VJP function (CG iterations + 1) times;
  batched CG from v = 0 without the call on M 0, 0 step where a denominator is 0 (as ours).

Every unit is one jax.jit-compiled function (state buffers donated where it helps). Variants:
`jax-jit` (f32; on a GPU dots and convs at lax.Precision.HIGHEST, i.e. no TF32, as our FP32
GEMMs; on the CPU at the default precision, which is exact f32 there) and
`jax-jit-bf16` (bf16 operands for every dot and conv with f32 accumulation and f32 outputs via
preferred_element_type; parameters, activations, LayerNorm statistics, softmax, the loss and the
optimizer stay f32). Timing: warm-up calls (compilation excluded), then `repeats` timed calls with
a monotonic clock around the call and block_until_ready (JAX has no device-event API, so on a GPU
this is host time around a synchronised call); the median is reported.
"""

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np

# jax, jax.numpy and jax.lax are imported in main(), after the platform is chosen.
jax = None
jnp = None
lax = None

VARIANTS = ["jax-jit", "jax-jit-bf16"]

# The workloads, the networks (with the parameter counts ours has) and the FLOP count are the
# ones torch_workloads.py uses too.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import LN_EPS, NETWORKS, WORKLOADS, append_json, default_workloads, forward_macs  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Numerics of one variant: how dots and convs are computed.

class Compute:
    """f32 (HIGHEST precision) or bf16 operands with f32 accumulation and outputs.

    `bf16_mode` is "preferred" (lax ops with preferred_element_type=f32) or, where this JAX cannot
    differentiate mixed-precision ops, "cast" (the op in bf16, its output cast back to f32)."""

    def __init__(self, bf16, bf16_mode="preferred", f32_precision="highest"):
        self.bf16 = bf16
        self.bf16_mode = bf16_mode
        if bf16:
            self.precision = None
        else:
            self.precision = {"highest": lax.Precision.HIGHEST, "default": None}[f32_precision]

    def _in(self, a):
        return a.astype(jnp.bfloat16) if self.bf16 else a

    def _pet(self):
        if self.bf16 and self.bf16_mode == "cast":
            return None
        return jnp.float32

    def _out(self, y):
        return y.astype(jnp.float32) if y.dtype != jnp.float32 else y

    def dot(self, x, w):
        """x [..., k] @ w [k, n]."""
        y = lax.dot_general(self._in(x), self._in(w), (((x.ndim - 1,), (0,)), ((), ())),
                            precision=self.precision, preferred_element_type=self._pet())
        return self._out(y)

    def einsum(self, spec, a, b):
        y = jnp.einsum(spec, self._in(a), self._in(b), precision=self.precision,
                       preferred_element_type=self._pet())
        return self._out(y)

    def conv3x3(self, x, w, stride):
        """x [N, H, W, Cin], w [3, 3, Cin, Cout], padding 1."""
        y = lax.conv_general_dilated(self._in(x), self._in(w), (stride, stride), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=self.precision, preferred_element_type=self._pet())
        return self._out(y)


def probe_bf16_mode():
    """'preferred' when the gradient of bf16 dots/convs with f32 outputs compiles here."""
    bf = jnp.bfloat16

    def f(x, w, k):
        y = lax.dot_general(x.astype(bf), w.astype(bf), (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32)
        z = lax.conv_general_dilated(y.reshape(1, 2, 2, 2).astype(bf), k.astype(bf), (1, 1),
                                     ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     preferred_element_type=jnp.float32)
        return jnp.sum(z * z)

    try:
        g = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(jnp.ones((1, 3)), jnp.ones((3, 8)),
                                                    jnp.ones((3, 3, 2, 2)))
        jax.block_until_ready(g)
        return "preferred"
    except Exception:  # noqa: BLE001 - any failure means: use the portable form
        return "cast"


# ------------------------------------------------------------------------------------------------
# Layers. Parameters are nested dicts/lists of f32 arrays; initialisation as ours (U(+-1/sqrt(fan_in))
# weights, zero biases, modulation output weights x 0.1). Values do not affect the timing.

def init_linear(rng, fan_in, fan_out, bias=True, scale=1.0):
    bound = 1.0 / math.sqrt(fan_in)
    p = {"w": (rng.uniform(-bound, bound, (fan_in, fan_out)) * scale).astype(np.float32)}
    if bias:
        p["b"] = np.zeros((fan_out,), np.float32)
    return p


def init_conv(rng, cin, cout):
    bound = 1.0 / math.sqrt(9 * cin)
    return {"w": rng.uniform(-bound, bound, (3, 3, cin, cout)).astype(np.float32),
            "b": np.zeros((cout,), np.float32)}


def linear(p, x, cp):
    y = cp.dot(x, p["w"])
    return y + p["b"] if "b" in p else y


def conv3x3(p, x, stride, cp):
    return cp.conv3x3(x, p["w"], stride) + p["b"]


def silu(x):
    return x * jax.nn.sigmoid(x)


def layer_norm(x):
    """Over the last axis, no affine parameters, statistics in f32."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    return xc * lax.rsqrt(var + LN_EPS)


def sinusoidal_embedding(c_noise, e):
    """[N] -> [N, E]: sin(f_j c) for j < E/2, then cos; f_j = 1e-4^(j / (E/2 - 1))."""
    half = e // 2
    freq = np.exp(np.log(1e-4) * np.arange(half) / (half - 1)).astype(np.float32)
    arg = c_noise[:, None] * jnp.asarray(freq)[None, :]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


def upsample2x(x):
    n, h, w, c = x.shape
    y = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c))
    return y.reshape(n, 2 * h, 2 * w, c)


def count_params(tree):
    return int(sum(np.size(a) for a in jax.tree_util.tree_leaves(tree)))


# ------------------------------------------------------------------------------------------------
# TimeMLP (src/nn/mlp.rs).

def init_timemlp(rng, features, hidden, emb):
    layers, width = [], features + emb
    for h in hidden:
        layers.append(init_linear(rng, width, h))
        width = h
    layers.append(init_linear(rng, width, features))
    return {"layers": layers}


def timemlp_apply(p, x, emb, cp, dropout_key=None):
    del dropout_key  # the TimeMLP has no dropout
    h = jnp.concatenate([x, emb], axis=-1)
    for layer in p["layers"][:-1]:
        h = layer_norm(silu(linear(layer, h, cp)))
    return linear(p["layers"][-1], h, cp)


# ------------------------------------------------------------------------------------------------
# U-Net (src/nn/unet.rs, blocks.rs, attention.rs).

def init_modulation(rng, c, e):
    return {"hidden": init_linear(rng, e, e), "out": init_linear(rng, e, 3 * c, scale=0.1)}


def init_resblock(rng, c, e):
    return {"mod": init_modulation(rng, c, e), "conv1": init_conv(rng, c, c),
            "conv2": init_conv(rng, c, c)}


def init_attblock(rng, c, e):
    return {"mod": init_modulation(rng, c, e), "qkv": init_linear(rng, c, 3 * c),
            "out": init_linear(rng, c, c, bias=False)}


def init_level_blocks(rng, cfg, i):
    c, e = cfg["channels"][i], cfg["emb"]
    blocks = []
    for _ in range(cfg["blocks"][i]):
        blocks.append(init_resblock(rng, c, e))
        if i in cfg["attention"]:
            blocks.append(init_attblock(rng, c, e))
    return blocks


def init_unet(rng, cfg):
    ch = cfg["channels"]
    levels = len(ch)
    down, up = [], [None] * levels
    for i in range(levels):
        conv = init_conv(rng, cfg["in_channels"] if i == 0 else ch[i - 1], ch[i])
        down.append({"conv": conv, "blocks": init_level_blocks(rng, cfg, i)})
    for i in reversed(range(levels)):
        level = {}
        if i + 1 < levels:
            level["conv"] = init_conv(rng, ch[i + 1] + ch[i], ch[i])
        level["blocks"] = init_level_blocks(rng, cfg, i)
        up[i] = level
    return {"down": down, "up": up, "out": init_linear(rng, ch[0], cfg["out_channels"])}


def modulation(p, emb, cp):
    m = linear(p["out"], silu(linear(p["hidden"], emb, cp)), cp)  # [N, 3C]
    a, b, c = jnp.split(m[:, None, None, :], 3, axis=-1)
    return a, b, c


def residual(x, h, c):
    return (x + c * h) / jnp.sqrt(1.0 + c * c)


def resblock(p, x, emb, cp, dropout, key):
    a, b, c = modulation(p["mod"], emb, cp)
    h = layer_norm((1.0 + a) * x + b)
    h = silu(conv3x3(p["conv1"], h, 1, cp))
    if key is not None and dropout > 0.0:
        keep = jax.random.bernoulli(key, 1.0 - dropout, h.shape)
        h = jnp.where(keep, h * (1.0 / (1.0 - dropout)), 0.0)
    h = conv3x3(p["conv2"], h, 1, cp)
    return residual(x, h, c)


def attblock(p, x, emb, heads, cp):
    a, b, c = modulation(p["mod"], emb, cp)
    h = layer_norm((1.0 + a) * x + b)
    n, hh, ww, ch = h.shape
    t, d = hh * ww, ch // heads
    qkv = linear(p["qkv"], h.reshape(n, t, ch), cp).reshape(n, t, 3, heads, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [N, T, heads, d]
    scores = cp.einsum("nthd,nshd->nhts", q, k) * (1.0 / math.sqrt(d))
    probs = jax.nn.softmax(scores, axis=-1)
    o = cp.einsum("nhts,nshd->nthd", probs, v).reshape(n, t, ch)
    y = linear(p["out"], o, cp).reshape(n, hh, ww, ch)
    return residual(x, y, c)


def run_blocks(blocks, h, emb, cfg, level, cp, keys):
    for bp in blocks:
        if "conv1" in bp:
            key = next(keys) if keys is not None else None
            h = resblock(bp, h, emb, cp, cfg["dropout"], key)
        else:
            h = attblock(bp, h, emb, cfg["attention"][level], cp)
    return h


def unet_apply(p, x, emb, cp, cfg, dropout_key=None):
    """x [N, H, W, in], emb [N, E] -> [N, H, W, out]; dropout on when dropout_key is given."""
    levels = len(cfg["channels"])
    keys = None
    if dropout_key is not None:
        n_res = 2 * sum(cfg["blocks"])
        keys = iter(jax.random.split(dropout_key, n_res))
    skips = []
    h = x
    for i in range(levels):
        lv = p["down"][i]
        h = conv3x3(lv["conv"], x if i == 0 else skips[i - 1], 1 if i == 0 else 2, cp)
        if i > 0:
            h = layer_norm(h)
        h = run_blocks(lv["blocks"], h, emb, cfg, i, cp, keys)
        skips.append(h)
    carry = None
    y = None
    for i in reversed(range(levels)):
        lv = p["up"][i]
        if "conv" in lv:
            h = conv3x3(lv["conv"], jnp.concatenate([carry, skips[i]], axis=-1), 1, cp)
        else:
            h = skips[i]
        h = run_blocks(lv["blocks"], h, emb, cfg, i, cp, keys)
        if i > 0:
            carry = upsample2x(layer_norm(h))
        else:
            y = linear(p["out"], h, cp)
    return y


# ------------------------------------------------------------------------------------------------
# EDM preconditioning (src/diffusion/precond.rs), DSM loss (loss.rs), Adam/clipping/EMA (adam.rs).

def denoise(net, params, x_t, sigma, cp, emb_width, dropout_key=None):
    """d(x_t, sigma) = c_skip x_t + c_out F(c_in x_t, emb(ln sigma)); sigma [N]."""
    bshape = (-1,) + (1,) * (x_t.ndim - 1)
    s2 = sigma * sigma
    c_skip = (1.0 / (s2 + 1.0)).reshape(bshape)
    c_out = (sigma / jnp.sqrt(s2 + 1.0)).reshape(bshape)
    c_in = (1.0 / jnp.sqrt(s2 + 1.0)).reshape(bshape)
    emb = sinusoidal_embedding(jnp.log(sigma), emb_width)
    f = net(params, c_in * x_t, emb, cp, dropout_key)
    return c_skip * x_t + c_out * f


def make_train_step(net, emb_width, cp, sigma_min, sigma_max, lr, ema_decay, dropout,
                    clip=1.0, beta1=0.9, beta2=0.999, eps=1e-8):
    ln_min, ln_max = math.log(sigma_min), math.log(sigma_max)

    def loss_fn(params, x, sigma, z, dkey):
        bshape = (-1,) + (1,) * (x.ndim - 1)
        x_t = x + sigma.reshape(bshape) * z
        d = denoise(net, params, x_t, sigma, cp, emb_width, dkey)
        err = jnp.mean(((d - x) ** 2).reshape(x.shape[0], -1), axis=1)
        weight = 1.0 / (sigma * sigma) + 1.0
        return jnp.mean(weight * err)

    def step(state, x, base_key):
        params, m, v, ema, count = state
        key = jax.random.fold_in(base_key, count)
        k_t, k_z, k_d = jax.random.split(key, 3)
        b = x.shape[0]
        t = jnp.sort(jax.random.uniform(k_t, (b, 5)), axis=1)[:, 2]  # Beta(3, 3)
        sigma = jnp.exp((1.0 - t) * ln_min + t * ln_max)
        z = jax.random.normal(k_z, x.shape)
        loss, g = jax.value_and_grad(loss_fn)(params, x, sigma, z, k_d if dropout > 0 else None)
        leaves = jax.tree_util.tree_leaves(g)
        norm = jnp.sqrt(sum(jnp.sum(a * a) for a in leaves))
        scale = jnp.where(norm > clip, clip / norm, 1.0)
        tt = (count + 1).astype(jnp.float32)
        bias1 = 1.0 - beta1 ** tt
        bias2 = 1.0 - beta2 ** tt
        g = jax.tree_util.tree_map(lambda a: a * scale, g)
        m = jax.tree_util.tree_map(lambda mi, gi: beta1 * mi + (1.0 - beta1) * gi, m, g)
        v = jax.tree_util.tree_map(lambda vi, gi: beta2 * vi + (1.0 - beta2) * gi * gi, v, g)
        params = jax.tree_util.tree_map(
            lambda p, mi, vi: p - lr * (mi / bias1) / (jnp.sqrt(vi / bias2) + eps), params, m, v)
        ema = jax.tree_util.tree_map(lambda e, p: e + (1.0 - ema_decay) * (p - e), ema, params)
        return (params, m, v, ema, count + 1), loss, norm

    return step


# ------------------------------------------------------------------------------------------------
# MMPS posterior denoiser (src/posterior/mmps.rs, cg.rs) and the PC step (sampler.rs).

def _rowdot(a, b):
    return jnp.sum(a * b, axis=-1)


def _guarded(num, den):
    """num / den with 0 where den == 0 (ops::div_guarded)."""
    safe = jnp.where(den == 0, 1.0, den)
    return jnp.where(den == 0, 0.0, num / safe)


def cg(matvec, b, iters):
    """Batched CG from v = 0 (r = b, no call on M 0), fixed iterations."""
    x = jnp.zeros_like(b)
    r, p = b, b
    rr = _rowdot(r, r)
    for _ in range(iters):
        ap = matvec(p)
        alpha = _guarded(rr, _rowdot(p, ap))[:, None]
        x = x + alpha * p
        r = r - alpha * ap
        rr_next = _rowdot(r, r)
        p = r + _guarded(rr_next, rr)[:, None] * p
        rr = rr_next
    return x


def mmps(den_fn, x_t, sigma, apply_a, adjoint_a, y, noise_var, cg_iters):
    """x_hat + sigma^2 J^T A^T v, (Sigma_y + sigma^2 A J A^T) v = y - A x_hat.

    One forward through jax.vjp; its pullback is then called cg_iters + 1 times."""
    x_hat, pullback = jax.vjp(den_fn, x_t)
    s2 = sigma * sigma

    def matvec(w):
        (jt,) = pullback(adjoint_a(w))
        return noise_var * w + s2 * apply_a(jt)

    v = cg(matvec, y - apply_a(x_hat), cg_iters)
    (score,) = pullback(adjoint_a(v))
    return x_hat + s2 * score


# ------------------------------------------------------------------------------------------------
# Workloads: each returns a callable that runs one unit and blocks, plus its metadata.

def _key(seed):
    return jax.random.key(seed) if hasattr(jax.random, "key") else jax.random.PRNGKey(seed)


def _normal(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def _put(tree, device):
    return jax.device_put(jax.tree_util.tree_map(jnp.asarray, tree), device)


def _check_params(params, expected, name):
    n = count_params(params)
    assert n == expected, f"{name}: {n} parameters, ours {expected}"
    return n


def build_train_step(kind, batch, cp, device):
    rng = np.random.default_rng(0)
    if kind == "timemlp":
        cfg = NETWORKS["timemlp"]
        params = init_timemlp(rng, cfg["features"], cfg["hidden"], cfg["emb"])
        n = _check_params(params, cfg["params"], "TimeMLP")
        net, emb_w, shape = timemlp_apply, cfg["emb"], (batch, cfg["features"])
        smin, smax, lr, ema, dropout = 1e-3, 1e1, 1e-3, 0.999, 0.0
    else:
        cfg = NETWORKS[kind]
        params = init_unet(rng, cfg)
        n = _check_params(params, cfg["params"], kind)
        net = lambda p, x, e, c, k: unet_apply(p, x, e, c, cfg, k)  # noqa: E731
        emb_w, dropout = cfg["emb"], cfg["dropout"]
        shape = (batch, *cfg["resolution"], cfg["in_channels"])
        smin, smax = 1e-3, 1e2
        lr, ema = (1e-3, 0.99) if kind == "unet_small" else (2e-4, 0.9999)
    macs = forward_macs(kind)
    step = make_train_step(net, emb_w, cp, smin, smax, lr, ema, dropout)
    jstep = jax.jit(step, donate_argnums=(0,))
    p = _put(params, device)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, p)
    # Everything committed to the device, as the step's outputs are (else the second call
    # recompiles).
    state = [jax.device_put((p, zeros, jax.tree_util.tree_map(jnp.zeros_like, p),
                             jax.tree_util.tree_map(jnp.copy, p), jnp.zeros((), jnp.int32)), device)]
    x = jax.device_put(jnp.asarray(_normal(rng, shape)), device)
    key = _key(0)

    def run():
        new_state, loss, norm = jstep(state[0], x, key)
        jax.block_until_ready((new_state, loss, norm))
        state[0] = new_state
        return float(loss)

    return run, n, 3.0 * 2.0 * macs * batch


def build_pc_mmps(batch, cp, device, cg_iters=3):
    rng = np.random.default_rng(0)
    cfg = NETWORKS["timemlp"]
    params = init_timemlp(rng, cfg["features"], cfg["hidden"], cfg["emb"])
    n = _check_params(params, cfg["params"], "TimeMLP")
    a = _normal(rng, (batch, 2, cfg["features"]))
    a /= np.linalg.norm(a, axis=-1, keepdims=True)  # unit-norm rows, as ours
    y = _normal(rng, (batch, 2))
    x0 = _normal(rng, (batch, cfg["features"]))
    noise_var = 0.01 ** 2
    t, s, tau = 1.0, 0.9, 0.1

    def step(params, x, a, y, key, count):
        # A_i [2, 5] per observation: tiny, so elementwise products and sums (exact f32).
        apply_a = lambda u: jnp.sum(a * u[:, None, :], axis=2)  # noqa: E731
        adjoint_a = lambda w: jnp.sum(a * w[:, :, None], axis=1)  # noqa: E731

        def post(x, sigma):
            sig = jnp.full((x.shape[0],), sigma, jnp.float32)
            den = lambda xx: denoise(timemlp_apply, params, xx, sig, cp, cfg["emb"])  # noqa: E731
            return mmps(den, x, sigma, apply_a, adjoint_a, y, noise_var, cg_iters)

        d = post(x, t)
        x = x - (1.0 - s / t) * (x - d)
        d = post(x, s)
        eps = jax.random.normal(jax.random.fold_in(key, count), x.shape)
        return x - tau * (x - d) + s * math.sqrt(2.0 * tau) * eps, count + 1

    jstep = jax.jit(step, donate_argnums=(1,))
    p = _put(params, device)
    a_d, y_d = jax.device_put(jnp.asarray(a), device), jax.device_put(jnp.asarray(y), device)
    state = [jax.device_put(jnp.asarray(x0), device), jax.device_put(jnp.zeros((), jnp.int32), device)]
    key = _key(1)

    def run():
        x, c = jstep(p, state[0], a_d, y_d, key, state[1])
        jax.block_until_ready(x)
        state[0], state[1] = x, c

    macs = forward_macs("timemlp")
    return run, n, 2.0 * 9.0 * 2.0 * macs * batch


def _unet(kind):
    cfg = NETWORKS[kind]
    rng = np.random.default_rng(0)
    params = init_unet(rng, cfg)
    n = _check_params(params, cfg["params"], kind)
    return cfg, params, n, rng


def build_forward_vjp(kind, batch, cp, device):
    cfg, params, n, rng = _unet(kind)
    shape = (batch, *cfg["resolution"], cfg["in_channels"])

    def unit(params, x, u):
        sig = jnp.ones((x.shape[0],), jnp.float32)
        den = lambda xx: denoise(lambda p, a, e, c, k: unet_apply(p, a, e, c, cfg, k),  # noqa: E731
                                 params, xx, sig, cp, cfg["emb"])
        x_hat, pullback = jax.vjp(den, x)
        (jt_u,) = pullback(u)
        return x_hat, jt_u

    junit = jax.jit(unit)
    p = _put(params, device)
    x = jax.device_put(jnp.asarray(_normal(rng, shape)), device)
    u = jax.device_put(jnp.asarray(_normal(rng, shape)), device)

    def run():
        jax.block_until_ready(junit(p, x, u))

    return run, n, 3.0 * 2.0 * forward_macs(kind) * batch


def build_unet_mmps(kind, batch, cp, device, cg_iters=1, sigma=1.0, noise_std=1e-3):
    cfg, params, n, rng = _unet(kind)
    h, w = cfg["resolution"]
    ch = cfg["in_channels"]
    shape = (batch, h, w, ch)
    keep = (rng.uniform(size=(batch, h * w)) < 0.25).astype(np.float32)  # 75% of pixels masked
    mask = np.repeat(keep[:, :, None], ch, axis=2).reshape(batch, h * w * ch)
    y = _normal(rng, (batch, h * w * ch))
    x0 = _normal(rng, shape)

    def unit(params, x, mask, y):
        sig = jnp.full((x.shape[0],), sigma, jnp.float32)
        den = lambda xx: denoise(lambda p, a, e, c, k: unet_apply(p, a, e, c, cfg, k),  # noqa: E731
                                 params, xx, sig, cp, cfg["emb"])
        apply_a = lambda u: u.reshape(u.shape[0], -1) * mask  # noqa: E731
        adjoint_a = lambda v: (v * mask).reshape(x.shape)  # noqa: E731
        return mmps(den, x, sigma, apply_a, adjoint_a, y, noise_std ** 2, cg_iters)

    junit = jax.jit(unit)
    p = _put(params, device)
    args = [jax.device_put(jnp.asarray(a), device) for a in (x0, mask, y)]

    def run():
        jax.block_until_ready(junit(p, *args))

    return run, n, (1 + 2 * (cg_iters + 1)) * 2.0 * forward_macs(kind) * batch


def build(workload, batch, cp, device):
    if workload == "timemlp_train_step":
        return build_train_step("timemlp", batch, cp, device)
    if workload == "pc_mmps_step":
        return build_pc_mmps(batch, cp, device)
    if workload == "unet_small_train_step":
        return build_train_step("unet_small", batch, cp, device)
    if workload == "unet_small_forward_vjp":
        return build_forward_vjp("unet_small", batch, cp, device)
    if workload == "unet_cifar10_train_step":
        return build_train_step("unet_cifar10", batch, cp, device)
    if workload == "unet_cifar10_forward_vjp":
        return build_forward_vjp("unet_cifar10", batch, cp, device)
    if workload == "unet_cifar10_mmps":
        return build_unet_mmps("unet_cifar10", batch, cp, device)
    raise ValueError(f"unknown workload {workload!r} (expected one of {', '.join(WORKLOADS)})")


# ------------------------------------------------------------------------------------------------
# Timing and reporting.

def measure(run, repeats, warmup, budget_s=None, min_repeats=3):
    """Median ms of `repeats` timed calls after `warmup` calls (the first one compiles).

    With `budget_s`, the repeats are cut so that the timed calls take about that long (at least
    `min_repeats`), estimated from the last warm-up call. Returns (median ms, repeats, compile s)."""
    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    last = compile_s
    for _ in range(max(warmup - 1, 0)):
        t0 = time.perf_counter()
        run()
        last = time.perf_counter() - t0
    if budget_s is not None and last > 0:
        repeats = max(min_repeats, min(repeats, int(budget_s / last)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), repeats, compile_s


def variant_note(variant, device_kind, bf16_mode, f32_precision, jax_version, backend):
    if variant == "jax-jit":
        if f32_precision == "highest":
            prec = "f32, dots/convs at lax.Precision.HIGHEST (no TF32)"
        elif device_kind == "cpu":
            prec = "f32, dots/convs at JAX's default precision (exact f32 on the CPU)"
        else:
            prec = "f32, dots/convs at JAX's default precision (TF32 on recent GPUs)"
    elif bf16_mode == "preferred":
        prec = ("bf16 operands for every dot/conv (incl. attention) with f32 accumulation and f32 "
                "outputs (preferred_element_type); params, LayerNorm/softmax, loss, Adam in f32")
    else:
        prec = ("bf16 dots/convs (operands cast to bf16, outputs cast back to f32; this JAX cannot "
                "differentiate preferred_element_type); params, LayerNorm/softmax, loss, Adam in f32")
    timing = ("host clock around the call + block_until_ready (JAX has no device-event API)"
              if device_kind == "cuda" else "monotonic clock around the call + block_until_ready")
    return (f"jax {jax_version} ({backend}); whole unit under jax.jit; {prec}; dropout masks from "
            f"jax.random (threefry); timing: {timing}")


def fmt_table(rows):
    head = ["workload", "variant", "batch", "params", "median ms", "repeats", "compile s", "GFLOP/s"]
    out = ["| " + " | ".join(head) + " |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = r["median_ms"]
        gf = "-" if ms is None or not r.get("flops") else f"{r['flops'] / (ms * 1e-3) / 1e9:.1f}"
        out.append("| " + " | ".join([
            r["workload"], r["impl"], str(r["batch"]), str(r["params"]),
            "-" if ms is None else (f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"),
            str(r["repeats"]), "-" if r.get("_compile_s") is None else f"{r['_compile_s']:.1f}", gf,
        ]) + " |")
    return "\n".join(out)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "gpu"], required=True)
    ap.add_argument("--workloads", default=None,
                    help="comma-separated (default: the CPU four on cpu, all on gpu)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs (default 10; on the CPU cut to a time budget for slow units)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up calls (the first compiles)")
    ap.add_argument("--quick", action="store_true", help="3 timed runs, 1 warm-up call")
    ap.add_argument("--json", default=None, help="append one JSON line per measurement here")
    ap.add_argument("--f32-precision", choices=["auto", "highest", "default"], default="auto",
                    help="precision of f32 dots/convs in jax-jit; auto (the default): HIGHEST on a "
                         "GPU (no TF32, as our FP32 GEMMs), DEFAULT on the CPU (already exact f32 "
                         "there, while HIGHEST sends XLA:CPU's dots to a much slower path)")
    ap.add_argument("--cpu-budget-s", type=float, default=15.0,
                    help="on the CPU without --repeats: timed seconds per unit and variant")
    ap.add_argument("--check-cifar10", action="store_true",
                    help="build the paper U-Net (assert 57,560,451 parameters) and run the three "
                         "cifar10 units once at batch 2 (a CPU check of the GPU code paths)")
    ap.add_argument("--check-batch", type=int, default=2)
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r} (expected {', '.join(VARIANTS)})")
    if args.workloads:
        args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
        for w in args.workloads:
            if w not in WORKLOADS:
                ap.error(f"unknown workload {w!r} (expected {', '.join(WORKLOADS)})")
    return args


def main(argv=None):
    global jax, jnp, lax
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax as _jax  # noqa: E402 - after the platform is chosen
    import jax.numpy as _jnp
    from jax import lax as _lax
    jax, jnp, lax = _jax, _jnp, _lax

    backend = jax.default_backend()
    if args.device == "gpu" and backend != "gpu":
        sys.exit(f"--device gpu: JAX's backend is {backend!r} (devices {jax.devices()})")
    device = jax.devices()[0]
    device_kind = "cuda" if args.device == "gpu" else "cpu"
    if args.f32_precision == "auto":
        args.f32_precision = "highest" if args.device == "gpu" else "default"
    bf16_mode = probe_bf16_mode() if "jax-jit-bf16" in args.variants else "preferred"
    print(f"jax {jax.__version__}, backend {backend}, device {device}"
          + (f", bf16 mode {bf16_mode}" if "jax-jit-bf16" in args.variants else ""), flush=True)

    if args.check_cifar10:
        return check_cifar10(args, device, bf16_mode)

    workloads = args.workloads or default_workloads("cpu" if args.device == "cpu" else "cuda")
    if args.quick:
        repeats, warmup, budget = 3, 1, None
    else:
        repeats = args.repeats or 10
        warmup = args.warmup
        budget = args.cpu_budget_s if (args.device == "cpu" and args.repeats is None) else None

    rows = []
    t_all = time.perf_counter()
    for w in workloads:
        for variant in args.variants:
            cp = Compute(variant == "jax-jit-bf16", bf16_mode, args.f32_precision)
            note = variant_note(variant, device_kind, bf16_mode, args.f32_precision,
                                jax.__version__, backend)
            row = {"impl": variant, "workload": w, "device": device_kind, "median_ms": None,
                   "repeats": 0, "params": None, "batch": WORKLOADS[w]["batch"], "flops": None, "note": note}
            try:
                run, n_params, flops = build(w, WORKLOADS[w]["batch"], cp, device)
                row["params"], row["flops"] = n_params, flops
                ms, reps, compile_s = measure(run, repeats, warmup, budget)
                row["median_ms"], row["repeats"], row["_compile_s"] = ms, reps, compile_s
            except AssertionError:
                raise
            except Exception as e:  # noqa: BLE001 - reported as a null measurement
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                row["note"] = f"failed: {msg}; " + note
                print(f"{w} {variant}: {msg}", file=sys.stderr, flush=True)
            rows.append(row)
            ms = row["median_ms"]
            print(f"  {w:26s} {variant:13s} "
                  + ("failed" if ms is None else f"{ms:10.3f} ms  ({row['repeats']} runs, "
                     f"compile+first {row['_compile_s']:.1f} s)"), flush=True)
            if args.json:
                append_json(args.json, [{k: v for k, v in row.items() if not k.startswith("_")}])
            run = None  # noqa: F841 - release the unit's buffers before the next one
    print()
    print(fmt_table(rows))
    print(f"\ntotal {time.perf_counter() - t_all:.1f} s")
    return 0


def check_cifar10(args, device, bf16_mode):
    """The paper U-Net on this device: parameter count, and each cifar10 unit once at a small batch."""
    cfg = NETWORKS["unet_cifar10"]
    params = init_unet(np.random.default_rng(0), cfg)
    n = count_params(params)
    assert n == cfg["params"], f"cifar10 U-Net: {n} parameters, ours {cfg['params']}"
    macs = forward_macs("unet_cifar10")
    print(f"cifar10 U-Net: {n:,} parameters (ours {cfg['params']:,}); "
          f"forward {2 * macs / 1e9:.3f} GFLOP per sample")
    del params
    b = args.check_batch
    units = args.workloads or [w for w in WORKLOADS if "cifar10" in w]
    for w in units:
        for variant in args.variants:
            cp = Compute(variant == "jax-jit-bf16", bf16_mode, args.f32_precision)
            t0 = time.perf_counter()
            run, _, _ = build(w, b, cp, device)
            out = run()
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            run()
            again = time.perf_counter() - t0
            extra = f", loss {out:.4f}" if isinstance(out, float) else ""
            if isinstance(out, float) and not math.isfinite(out):
                sys.exit(f"{w} {variant}: non-finite loss {out}")
            print(f"  {w} {variant} batch {b}: build+compile+first {first:.1f} s, "
                  f"second call {again * 1e3:.1f} ms{extra}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
