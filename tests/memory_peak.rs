//! `UNet::activation_memory` against the allocations of a real forward and backward on the CPU,
//! counted by this binary's global allocator. The estimate follows the pool buffers of the GPU
//! path; the CPU adds its own scratch inside a few ops (the modulated LayerNorm's pre-norm
//! values, dropout's uniforms, the GEMM's packing), which the comparison allows for.
//!
//! One test in this binary: the counter (and the column budget) is global, so nothing may run
//! beside it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use emprior::nn::conv::set_column_budget;
use emprior::nn::{Mode, UNet, UNetConfig, Weights};
use emprior::ops::{Philox, Precision};
use emprior::{AsView, AsViewMut, DType, Device, Tensor};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Runs `f` and returns its result and the most bytes live during it beyond those live before.
fn peak_during<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = LIVE.load(Relaxed);
    PEAK.store(before, Relaxed);
    let r = f();
    (r, (PEAK.load(Relaxed) - before) as u64)
}

struct Measured {
    saved: u64,
    forward_peak: u64,
    backward_peak: u64,
    vjp_peak: u64,
}

fn unet(cfg: &UNetConfig, precision: Precision) -> UNet {
    let mut unet = UNet::new(cfg.clone()).unwrap();
    unet.layout.set_precision(precision);
    unet
}

fn measure(cfg: &UNetConfig, n: usize, mode: Mode, precision: Precision) -> Measured {
    let unet = unet(cfg, precision);
    let cpu = Device::Cpu;
    let p = unet.layout.init(1, DType::F32, &cpu).unwrap();
    let (h, w) = cfg.resolution;
    let x = Tensor::full(&[n, h, w, cfg.in_channels], 0.5, &cpu).unwrap();
    let e = Tensor::full(&[n, cfg.emb], 0.25, &cpu).unwrap();
    let dy = Tensor::full(&[n, h, w, cfg.out_channels], 1.0, &cpu).unwrap();
    let mut g = Tensor::zeros(&[unet.layout.len()], DType::F32, &cpu).unwrap();
    // The weights as training and sampling pass them: with their bf16 copy under bf16, made
    // before the measurement (the walk counts activations only).
    let copy = unet.layout.bf16_copy(&p).unwrap();
    let pv = Weights::new(p.as_view().unwrap(), copy.as_ref()).unwrap();
    let ev = e.as_view().unwrap();
    let ((y, saved), forward_peak) =
        peak_during(|| unet.forward(&pv, &x.as_view().unwrap(), &ev, mode).unwrap());
    let saved_bytes = saved.bytes() as u64;
    let (_, vjp) = peak_during(|| {
        unet.backward(&pv, &ev, &saved, &dy.as_view().unwrap(), None)
            .unwrap()
    });
    let (_, bwd) = peak_during(|| {
        let mut gv = g.as_view_mut().unwrap();
        unet.backward(&pv, &ev, &saved, &dy.as_view().unwrap(), Some(&mut gv))
            .unwrap()
    });
    drop(y);
    Measured {
        saved: saved_bytes,
        forward_peak,
        backward_peak: saved_bytes + bwd,
        vjp_peak: saved_bytes + vjp,
    }
}

#[test]
fn activation_memory_estimate_follows_real_allocations() {
    // Recycled host buffers would hide the allocations being counted.
    emprior::host_pool::set_enabled(false);
    let mid = UNetConfig {
        in_channels: 3,
        out_channels: 3,
        channels: vec![16, 24, 32],
        blocks: vec![2, 1, 2],
        attention: vec![(1, 2)],
        emb: 32,
        dropout: 0.1,
        patch: 2,
        resolution: (32, 32),
    };
    let train = Mode::Train {
        rng: Philox::new(3, 4),
        first_row: 0,
    };
    // The mid network also with convolutions in chunks of samples (a 200 KB column budget).
    for precision in [Precision::F32, Precision::Bf16] {
        for (name, cfg, n, budget) in [
            ("mid", mid.clone(), 3, 1 << 30),
            ("mid chunked", mid.clone(), 3, 200_000),
            ("cifar10", UNetConfig::cifar10(), 2, 1 << 30),
        ] {
            set_column_budget(budget);
            for (mode_name, mode) in [("eval", Mode::Eval), ("train", train)] {
                let est = unet(&cfg, precision).activation_memory(n, mode != Mode::Eval);
                let got = measure(&cfg, n, mode, precision);
                // CPU scratch: at most two level-0 activations (pre-norm values, uniforms) at
                // once, and the GEMM's packing buffers; under bf16 also a CPU twin's widened
                // operands, full-batch columns and result (the GPU kernels need none of them).
                let (h, w) = (cfg.resolution.0 / cfg.patch, cfg.resolution.1 / cfg.patch);
                let mut slack = (2 * n * h * w * cfg.channels[0] * 4 + (8 << 20)) as u64;
                if precision == Precision::Bf16 {
                    slack += twin_scratch(&cfg, n);
                }
                println!("{name} {mode_name} {} batch {n}: saved {} / {}, forward {} / {}, backward {} / {}, vjp {} / {} (estimate / measured)",
                    precision.name(), est.saved, got.saved, est.forward_peak, got.forward_peak,
                    est.backward_peak, got.backward_peak, est.vjp_peak, got.vjp_peak);
                assert_eq!(est.saved, got.saved, "{name} {mode_name}: saved");
                for (what, e, m) in [
                    ("forward", est.forward_peak, got.forward_peak),
                    ("backward", est.backward_peak, got.backward_peak),
                    ("vjp", est.vjp_peak, got.vjp_peak),
                ] {
                    assert!(
                        e <= m && m <= e + slack,
                        "{name} {mode_name} {}: {what} peak estimated {e}, measured {m} (slack {slack})",
                        precision.name()
                    );
                }
            }
        }
    }
    bf16_keeps_half_the_activations();
}

/// The most a bf16 CPU twin of a convolution holds besides what the GPU path allocates: x and
/// the weight widened to f32, the whole batch's columns and the f32 result, for the widest
/// convolution of each level (the merge's, or the blocks').
fn twin_scratch(cfg: &UNetConfig, n: usize) -> u64 {
    let (h, w) = (cfg.resolution.0 / cfg.patch, cfg.resolution.1 / cfg.patch);
    let c = &cfg.channels;
    (0..c.len())
        .map(|i| {
            let p = n * (h >> i) * (w >> i);
            let cin = if i + 1 < c.len() { c[i] + c[i + 1] } else { c[i] };
            4 * (p * cin + 9 * cin * c[i] + 9 * p * cin + 2 * p * c[i]) as u64
        })
        .max()
        .unwrap_or(0)
}

/// Run by the one test, after the measurements (nothing may allocate beside them).
fn bf16_keeps_half_the_activations() {
    // Every activation a forward keeps is bf16 under the bf16 policy except the input image,
    // the LayerNorms' 1/std and the modulation state, which stay f32 (small beside the rest).
    let cfg = UNetConfig::cifar10();
    let f32 = unet(&cfg, Precision::F32).activation_memory(256, true);
    let bf16 = unet(&cfg, Precision::Bf16).activation_memory(256, true);
    let ratio = bf16.saved as f64 / f32.saved as f64;
    println!(
        "cifar10 batch 256: kept {} (f32) -> {} (bf16), ratio {ratio:.3}; backward peak {} -> {}",
        f32.saved, bf16.saved, f32.backward_peak, bf16.backward_peak
    );
    assert!(ratio > 0.5 && ratio < 0.51, "bf16 keeps {ratio} of the f32 bytes");
    // Issue 11's target: at most half of the f32 figure when it was filed, 19.1 GiB (today's
    // f32 peak is lower: 17.3 GiB; bf16 reaches 51% of it, the f32 transients of the backward
    // staying f32).
    let peak = bf16.backward_peak.max(bf16.forward_peak) as f64 / (1u64 << 30) as f64;
    assert!(peak <= 19.1 / 2.0, "bf16 activation peak {peak:.2} GiB");
}
