//! The kernel benchmark table behind `emprior bench` and scripts/device-check.sh: each kernel's
//! median time over repeats (CUDA events on the GPU), its throughput, and how it stands against
//! a ceiling measured in the same run (device-to-device copy bandwidth for memory-bound kernels,
//! cuBLAS SGEMM for our GEMM) and against the datasheet FP32 rate.

pub mod peers;
pub mod tensor_cores;

use std::time::Instant;

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};

use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};
use crate::nn::Weights;
use crate::ops::{self, broadcast, gemm, reduce, GemmSpec, Philox};
use crate::tensor::{DType, Tensor};

/// One line of the table.
#[derive(Clone, Debug)]
pub struct BenchRow {
    /// The kernel or operation measured, e.g. "gemm f32 ..." or "cuMemcpyDtoD (ceiling)".
    pub what: String,
    /// Its problem size as text, e.g. "16777216 f32" or "batch x m x n x k".
    pub shape: String,
    /// Median time of one call over the repeats, in milliseconds.
    pub median_ms: f64,
    /// e.g. "3950 GB/s" or "21.3 TFLOP/s".
    pub throughput: String,
    /// e.g. "92% of copy" or "71% of cuBLAS, 32% of FP32 peak".
    pub versus: String,
}

/// The table as markdown.
pub fn format_table(title: &str, rows: &[BenchRow]) -> String {
    let mut s =
        format!("{title}\n\n| what | shape | median ms | throughput | versus |\n|---|---|---:|---:|---|\n");
    for r in rows {
        s += &format!(
            "| {} | {} | {:.4} | {} | {} |\n",
            r.what, r.shape, r.median_ms, r.throughput, r.versus
        );
    }
    s
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median milliseconds of `f` on the GPU, timed with CUDA events around each call after warm-up.
pub fn time_gpu(dev: &CudaDevice, repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let ctx = dev.context();
    let stream = dev.stream();
    let ev = || {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| Error::cuda("creating a timing event", e))
    };
    for _ in 0..2 {
        f()?;
    }
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let (start, end) = (ev()?, ev()?);
        start
            .record(stream)
            .map_err(|e| Error::cuda("recording an event", e))?;
        f()?;
        end.record(stream)
            .map_err(|e| Error::cuda("recording an event", e))?;
        end.synchronize()
            .map_err(|e| Error::cuda("waiting for an event", e))?;
        times.push(
            start
                .elapsed_ms(&end)
                .map_err(|e| Error::cuda("reading an event", e))? as f64,
        );
    }
    Ok(median(times))
}

/// Device time of `iters` back-to-back calls of `f`, between two CUDA events: the timing
/// criterion's `iter_custom` needs for GPU benches.
pub fn device_time(dev: &CudaDevice, iters: u64, mut f: impl FnMut()) -> std::time::Duration {
    let ev = || {
        dev.context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .expect("timing event")
    };
    let (start, end) = (ev(), ev());
    start.record(dev.stream()).expect("recording an event");
    for _ in 0..iters {
        f();
    }
    end.record(dev.stream()).expect("recording an event");
    end.synchronize().expect("waiting for an event");
    std::time::Duration::from_secs_f64(start.elapsed_ms(&end).expect("reading an event") as f64 * 1e-3)
}

/// Median milliseconds of `f` on the host clock.
pub fn time_cpu(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(times))
}

/// The datasheet FP32 (non-tensor) rate: SMs x FP32 lanes per SM x 2 (FMA) x clock.
pub fn fp32_peak_tflops(dev: &CudaDevice) -> Option<f64> {
    let lanes = match dev.compute_capability() {
        (8, 0) => 64.0, // A100
        (7, _) => 64.0, // Volta, Turing
        (m, _) if m >= 8 => 128.0,
        _ => return None,
    };
    let khz = dev
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE)
        .ok()? as f64;
    Some(dev.sm_count() as f64 * lanes * 2.0 * khz * 1e3 / 1e12)
}

fn gbs(bytes: f64, ms: f64) -> f64 {
    bytes / (ms * 1e-3) / 1e9
}

fn tflops(flops: f64, ms: f64) -> f64 {
    flops / (ms * 1e-3) / 1e12
}

/// The GEMM shapes of the table: (label, batch, m, n, k, trans_a, trans_b).
type GemmCase = (&'static str, usize, usize, usize, usize, bool, bool);

fn gemm_cases(quick: bool) -> Vec<GemmCase> {
    let mut v = vec![
        ("square", 1, 4096, 4096, 4096, false, false),
        ("square A^T", 1, 4096, 4096, 4096, true, false),
        ("square B^T", 1, 4096, 4096, 4096, false, true),
        ("linear layer x W^T", 1, 65536, 256, 256, false, true),
        ("batched 256x256", 256, 256, 256, 256, false, false),
    ];
    if quick {
        v.truncate(3);
    }
    v
}

/// Runs the whole table on a GPU.
pub fn run_gpu(dev: &CudaDevice, device: &Device, quick: bool) -> Result<Vec<BenchRow>> {
    let repeats = if quick { 5 } else { 20 };
    let mut rows = Vec::new();

    // Memory ceiling: a device-to-device copy, counting bytes read and written.
    let n: usize = if quick { 1 << 26 } else { 1 << 28 };
    let src = ops::uniform(&[n], Philox::new(1, 1), 0, device)?;
    let mut dst = Tensor::uninit(&[n], DType::F32, device)?;
    let copy_ms = time_gpu(dev, repeats, || {
        let s = src.cuda_f32()?;
        let mut d = dst.cuda_f32_mut()?;
        dev.stream()
            .memcpy_dtod(&s, &mut d)
            .map_err(|e| Error::cuda("device-to-device copy", e))
    })?;
    let copy_gbs = gbs(8.0 * n as f64, copy_ms);
    rows.push(BenchRow {
        what: "cuMemcpyDtoD (ceiling)".into(),
        shape: format!("{n} f32"),
        median_ms: copy_ms,
        throughput: format!("{copy_gbs:.0} GB/s"),
        versus: "measured memory ceiling".into(),
    });

    let b = ops::uniform(&[n], Philox::new(1, 2), 0, device)?;
    let mut out = Tensor::uninit(&[n], DType::F32, device)?;
    let mut y = ops::uniform(&[n], Philox::new(1, 3), 0, device)?;
    let mut memory_row = |what: &str, bytes_per_elem: f64, ms: f64| {
        let rate = gbs(bytes_per_elem * n as f64, ms);
        rows.push(BenchRow {
            what: what.into(),
            shape: format!("{n} f32"),
            median_ms: ms,
            throughput: format!("{rate:.0} GB/s"),
            versus: format!("{:.0}% of copy", 100.0 * rate / copy_gbs),
        });
    };
    let ms = time_gpu(dev, repeats, || ops::add_into(&src, &b, &mut out))?;
    memory_row("add", 12.0, ms);
    let ms = time_gpu(dev, repeats, || ops::axpy(0.5, &src, &mut y))?;
    memory_row("axpy (in place)", 12.0, ms);
    let ms = time_gpu(dev, repeats, || ops::silu_into(&src, &mut out))?;
    memory_row("silu", 8.0, ms);
    let ms = time_gpu(dev, repeats, || ops::silu_backward_into(&src, &b, &mut out))?;
    memory_row("silu_backward", 12.0, ms);
    let rng = Philox::new(7, 0);
    let ms = time_gpu(dev, repeats, || rng.normal_into(&mut out, 0))?;
    memory_row("philox normal (write only)", 4.0, ms);
    let mut total = Tensor::uninit(&[], DType::F32, device)?;
    let ms = time_gpu(dev, repeats, || ops::sum_into(&src, &mut total))?;
    memory_row(
        "sum (deterministic, f64 partials of 16,384-element chunks)",
        4.0,
        ms,
    );
    let rows_n = 4096;
    let a2 = src.reshape(&[rows_n, n / rows_n])?;
    let b2 = b.reshape(&[rows_n, n / rows_n])?;
    let mut dots = Tensor::uninit(&[rows_n], DType::F32, device)?;
    let ms = time_gpu(dev, repeats, || ops::row_dot_into(&a2, &b2, &mut dots))?;
    memory_row("row_dot (4096 rows)", 8.0, ms);
    let ms = time_gpu(dev, repeats, || reduce::row_dot_into_v1(&a2, &b2, &mut dots))?;
    memory_row("row_dot v1 (4096 rows)", 8.0, ms);
    let ms = time_gpu(dev, repeats, || reduce::sum_into_v1(&a2, &mut total))?;
    memory_row("sum v1 (deterministic, 1024 f64 partials)", 4.0, ms);
    drop((a2, b2, out, y, dst));

    // The reductions of a training or sampler step at their real shapes, version 1 (the kernel
    // each replaced) beside version 2.
    for (what, shape, bytes, v1, v2) in reduction_cases(device, quick)? {
        for (label, mut f) in [("v1", v1), ("v2", v2)] {
            let ms = time_gpu(dev, repeats, &mut f)?;
            rows.push(memory_bench_row(
                format!("{what} {label}"),
                shape.clone(),
                bytes,
                ms,
                copy_gbs,
            ));
        }
    }

    // GEMM against cuBLAS SGEMM (plain FP32: cuBLAS's default math mode uses no TF32).
    let peak = fp32_peak_tflops(dev);
    // SAFETY: only tries to dlopen the library.
    let blas = if unsafe { cudarc::cublas::sys::is_culib_present() } {
        CudaBlas::new(dev.stream().clone()).ok()
    } else {
        None
    };
    for (label, batch, m, nn, k, ta, tb) in gemm_cases(quick) {
        let spec = GemmSpec::new(ta, tb);
        let shape = |bt: usize, r: usize, c: usize| if bt == 1 { vec![r, c] } else { vec![bt, r, c] };
        let a_shape = if ta {
            shape(batch, k, m)
        } else {
            shape(batch, m, k)
        };
        let b_shape = if tb {
            shape(batch, nn, k)
        } else {
            shape(batch, k, nn)
        };
        let a = ops::uniform(&a_shape, Philox::new(2, 1), 0, device)?;
        let bm = ops::uniform(&b_shape, Philox::new(2, 2), 0, device)?;
        let (params, c_shape) = gemm::resolve(&a_shape, &b_shape, &spec)?;
        let mut c = Tensor::uninit(&c_shape, DType::F32, device)?;
        let flops = gemm::flops(&params);
        let ours = time_gpu(dev, repeats, || ops::gemm_into(&a, &bm, &mut c, spec))?;
        let ours_tf = tflops(flops, ours);
        let reference = match &blas {
            Some(blas) => Some(time_gpu(dev, repeats, || {
                cublas_sgemm(blas, &params, ta, tb, &a, &bm, &mut c)
            })?),
            None => None,
        };
        let mut versus = Vec::new();
        if let Some(r) = reference {
            versus.push(format!(
                "{:.0}% of cuBLAS ({:.1} TFLOP/s)",
                100.0 * r / ours,
                tflops(flops, r)
            ));
        } else {
            versus.push("cuBLAS not loadable".into());
        }
        if let Some(p) = peak {
            versus.push(format!("{:.0}% of FP32 peak {p:.1}", 100.0 * ours_tf / p));
        }
        rows.push(BenchRow {
            what: format!("gemm f32 {label}"),
            shape: format!("{batch}x{m}x{nn}x{k}"),
            median_ms: ours,
            throughput: format!("{ours_tf:.2} TFLOP/s"),
            versus: versus.join(", "),
        });
    }
    Ok(rows)
}

/// A memory-bound row of the table: `bytes` moved in `ms`, against the copy ceiling.
fn memory_bench_row(what: String, shape: String, bytes: f64, ms: f64, copy_gbs: f64) -> BenchRow {
    let rate = gbs(bytes, ms);
    BenchRow {
        what,
        shape,
        median_ms: ms,
        throughput: format!("{rate:.0} GB/s"),
        versus: format!("{:.0}% of copy", 100.0 * rate / copy_gbs),
    }
}

/// A reduction to time, twice: (what, shape, bytes read, version 1, version 2).
type ReductionCase<'a> = (
    &'static str,
    String,
    f64,
    Box<dyn FnMut() -> Result<()> + 'a>,
    Box<dyn FnMut() -> Result<()> + 'a>,
);

/// Bias gradients of a [262,144, 128] activation (a batch-256 step of a 32x32 U-Net level),
/// the global gradient norm over 57.6M parameters, and CG's per-observation dots at [8192, 10].
/// `quick` shrinks the first two 4x.
fn reduction_cases(device: &Device, quick: bool) -> Result<Vec<ReductionCase<'static>>> {
    use std::cell::RefCell;
    use std::rc::Rc;
    let shrink = if quick { 4 } else { 1 };
    let (rows, cols) = (262_144 / shrink, 128);
    let x = Rc::new(ops::uniform(&[rows, cols], Philox::new(5, 1), 0, device)?);
    let bias = Rc::new(RefCell::new(Tensor::uninit(&[cols], DType::F32, device)?));
    let n = 57_600_000 / shrink;
    let g = Rc::new(ops::uniform(&[1, n], Philox::new(5, 2), 0, device)?);
    let norm = Rc::new(RefCell::new(Tensor::uninit(&[1], DType::F32, device)?));
    let (cg_rows, cg_cols) = (8192, 10);
    let p = Rc::new(ops::uniform(&[cg_rows, cg_cols], Philox::new(5, 3), 0, device)?);
    let q = Rc::new(ops::uniform(&[cg_rows, cg_cols], Philox::new(5, 4), 0, device)?);
    let dots = Rc::new(RefCell::new(Tensor::uninit(&[cg_rows], DType::F32, device)?));
    let mut cases: Vec<ReductionCase> = Vec::new();
    {
        let (x1, b1, x2, b2) = (x.clone(), bias.clone(), x, bias);
        cases.push((
            "column sum (bias gradient)",
            format!("[{rows}, {cols}]"),
            4.0 * (rows * cols) as f64,
            Box::new(move || broadcast::sum_rows_into_v1(&*x1, 1, &mut *b1.borrow_mut(), false)),
            Box::new(move || broadcast::sum_rows_into(&*x2, 1, &mut *b2.borrow_mut(), false)),
        ));
    }
    {
        let (g1, o1, g2, o2) = (g.clone(), norm.clone(), g, norm);
        cases.push((
            "global gradient norm",
            format!("{n} f32"),
            4.0 * n as f64,
            Box::new(move || reduce::row_norm_into_v1(&*g1, &mut *o1.borrow_mut())),
            Box::new(move || reduce::row_norm_into(&*g2, &mut *o2.borrow_mut())),
        ));
    }
    {
        let (p1, q1, d1, p2, q2, d2) = (p.clone(), q.clone(), dots.clone(), p, q, dots);
        cases.push((
            "CG row dots",
            format!("[{cg_rows}, {cg_cols}]"),
            8.0 * (cg_rows * cg_cols) as f64,
            Box::new(move || reduce::row_dot_into_v1(&*p1, &*q1, &mut *d1.borrow_mut())),
            Box::new(move || reduce::row_dot_into(&*p2, &*q2, &mut *d2.borrow_mut())),
        ));
    }
    Ok(cases)
}

/// The CIFAR-10 U-Net under `precision`: forward, forward and one VJP (the MMPS pattern),
/// forward and backward with parameter gradients (training), and the MMPS posterior denoiser, in
/// images/s and model FLOP/s with the MFU against `peak` (a label and TFLOP/s: the FP32
/// datasheet rate, or the bf16 rate measured in the same run). FLOPs counted: forward = 2 x
/// `forward_macs` per image (19.44 GFLOP); a VJP or the parameter gradient each costs one more
/// forward's worth.
pub fn run_networks_gpu(
    dev: &CudaDevice,
    device: &Device,
    quick: bool,
    precision: crate::ops::Precision,
    peak: Option<(&str, f64)>,
) -> Result<Vec<BenchRow>> {
    use crate::diffusion::{preset, Denoiser};
    use crate::nn::Mode;
    use crate::tensor::{AsView, AsViewMut};

    let repeats = if quick { 3 } else { 10 };
    let mut den = Denoiser::new(preset("cifar10")?);
    den.net.set_precision(precision);
    let fwd_flops = 2.0 * den.net.forward_macs() as f64;
    let params = den.layout().init(0, DType::F32, device)?;
    let copy = den.layout().bf16_copy(&params)?;
    let mut grads = Tensor::zeros(&[den.layout().len()], DType::F32, device)?;
    let mut rows = Vec::new();
    let batches: &[usize] = if quick { &[64] } else { &[64, 256] };
    for &batch in batches {
        let x = ops::normal(&[batch, 32, 32, 3], Philox::new(2, 1), 0, device)?;
        let u = ops::normal(&[batch, 32, 32, 3], Philox::new(2, 2), 0, device)?;
        let sigmas = vec![0.5; batch];
        // The weights as training and sampling read them: with their bf16 copy under bf16.
        let pv = Weights::new(params.as_view()?, copy.as_ref())?;
        let mut row = |what: &str, passes: f64, ms: f64| {
            let tf = tflops(passes * fwd_flops * batch as f64, ms);
            rows.push(BenchRow {
                what: format!("cifar10 U-Net {what} ({})", precision.name()),
                shape: format!("batch {batch}"),
                median_ms: ms,
                throughput: format!("{:.0} img/s, {tf:.2} TFLOP/s", batch as f64 / (ms * 1e-3)),
                versus: peak.map_or("-".into(), |(label, p)| {
                    format!("MFU {:.1}% of {label} {p:.1}", 100.0 * tf / p)
                }),
            });
        };
        let ms = time_gpu(dev, repeats, || {
            den.denoise(&pv, &x.as_view()?, &sigmas, Mode::Eval).map(drop)
        })?;
        row("forward", 1.0, ms);
        let ms = time_gpu(dev, repeats, || {
            let (_, s) = den.denoise(&pv, &x.as_view()?, &sigmas, Mode::Eval)?;
            den.vjp(&pv, &s, &u.as_view()?).map(drop)
        })?;
        row("forward + VJP", 2.0, ms);
        let ms = time_gpu(dev, repeats, || {
            let mode = Mode::Train {
                rng: Philox::new(3, 3),
                first_row: 0,
            };
            let (_, s) = den.denoise(&pv, &x.as_view()?, &sigmas, mode)?;
            den.backward(&pv, &s, &u.as_view()?, Some(&mut grads.as_view_mut()?))
                .map(drop)
        })?;
        row("forward + backward", 3.0, ms);
        let step_ms = ms;

        // A whole training step (noise levels and noise drawn on the device, the DSM loss,
        // forward, backward, clipping, Adam, EMA) queued kernel by kernel, then replayed from a
        // captured CUDA graph: the same arithmetic (tests/cuda_posterior_parity.rs holds the two
        // to the same bits), so the difference is the host's launch cost.
        for graphs in [false, true] {
            let config = crate::train::AdamConfig {
                ema: Some(0.9999),
                ..crate::train::AdamConfig::new(crate::train::LrSchedule::Constant(2e-4))
            };
            let schedule = crate::diffusion::VeSchedule::new(1e-3, 1e2);
            let mut trainer =
                crate::train::Trainer::new(den.clone(), params.to_device(device)?, config, schedule, 5)?;
            trainer.set_cuda_graphs(graphs);
            let ms = time_gpu(dev, repeats, || trainer.step(&x.as_view()?))?;
            trainer.take_stats()?;
            // A failed capture leaves the run eager (its reason went to stderr): say so in the
            // row rather than end the table here.
            row(
                match (graphs, trainer.replaying_cuda_graph()) {
                    (false, _) => "training step, eager",
                    (true, true) => "training step, CUDA graph replay",
                    (true, false) => "training step, eager after a failed CUDA graph capture",
                },
                3.0,
                ms,
            );
        }

        // The MMPS posterior denoiser as the CIFAR E-step calls it: 75% of pixels masked out,
        // sigma_y = 1e-3, one CG iteration: one forward and two VJPs (counted as 3 forwards of
        // GEMM work; method.md's "about 5 forward-equivalents" counts a VJP as two).
        let bits: Vec<f32> = {
            let mut u = vec![0.0f32; batch * 1024];
            Philox::new(4, 4).fill_uniform(0, &mut u);
            u.iter().map(|&v| (v < 0.25) as u8 as f32).collect()
        };
        let mask =
            crate::posterior::MaskOperator::from_pixel_mask(&bits, batch, 1024, 3, DType::F32, device)?;
        let y = ops::normal(&[batch, 3072], Philox::new(2, 3), 0, device)?;
        let noise = crate::posterior::ObservationNoise::Scalar(1e-6);
        let prior = crate::posterior::NetworkPrior::new(&den, &params)?;
        let cg = crate::posterior::CgConfig {
            max_iters: 1,
            rtol: None,
        };
        let mut mmps = crate::posterior::Mmps::new(&prior, &mask, &y, &noise, cg);
        let ms = time_gpu(dev, repeats, || {
            use crate::diffusion::Denoise;
            mmps.denoise(&x, 0.5).map(drop)
        })?;
        row("MMPS posterior denoiser (1 CG iteration)", 3.0, ms);
        // A whole DDPM + MMPS sampler step as the CIFAR E-step takes it (that denoiser call and
        // the update), queued kernel by kernel, then replayed from a captured CUDA graph (its
        // first warm-up step eager, the second recorded): the same bits
        // (tests/cuda_posterior_parity.rs), so the difference is the host's launch cost.
        for graphs in [false, true] {
            use crate::diffusion::sampler::{BatchPart, Sampler, SamplerKind};
            let schedule = crate::diffusion::VeSchedule::new(1e-3, 1e2);
            let mut sampler = Sampler::new(SamplerKind::Ddpm, repeats + 3, schedule, Philox::new(4, 5));
            sampler.cuda_graphs = graphs;
            let mut call = sampler.begin(
                &mut mmps,
                &[batch, 32, 32, 3],
                BatchPart::whole(batch),
                None,
                DType::F32,
                device,
            )?;
            let ms = time_gpu(dev, repeats, || call.step())?;
            row(
                match (graphs, call.replaying()) {
                    (false, _) => "DDPM + MMPS sampler step, eager",
                    (true, true) => "DDPM + MMPS sampler step, CUDA graph replay",
                    (true, false) => "DDPM + MMPS sampler step, eager after a failed CUDA graph capture",
                },
                3.0,
                ms,
            );
        }
        // Memory: one more training step with the pool's peak restarted, against the walk of the
        // same step (`UNet::pool_estimate`: the network's own buffers in the pool's size
        // classes; the step adds a few image-sized ones around it).
        if let crate::diffusion::Network::UNet(unet) = &den.net {
            let before = dev.pool_stats().bytes_in_use;
            dev.reset_pool_peak();
            let mode = Mode::Train {
                rng: Philox::new(3, 3),
                first_row: 0,
            };
            let (_, s) = den.denoise(&pv, &x.as_view()?, &sigmas, mode)?;
            den.backward(&pv, &s, &u.as_view()?, Some(&mut grads.as_view_mut()?))?;
            drop(s);
            dev.synchronize()?;
            let gib = |b: f64| b / (1u64 << 30) as f64;
            let measured = gib(dev.pool_peak_bytes().saturating_sub(before) as f64);
            let estimated = gib(unet.pool_estimate(batch, u64::MAX).peak_in_use as f64);
            rows.push(BenchRow {
                what: format!(
                    "cifar10 U-Net training step, activation peak ({})",
                    precision.name()
                ),
                shape: format!("batch {batch}"),
                median_ms: step_ms,
                throughput: format!("{measured:.2} GiB in the pool"),
                versus: format!(
                    "{estimated:.2} GiB estimated ({:.0}%)",
                    100.0 * measured / estimated
                ),
            });
        }
    }
    Ok(rows)
}

/// Row-major C = op(A) op(B) through cuBLAS, as column-major C^T = op(B)^T op(A)^T.
fn cublas_sgemm(
    blas: &CudaBlas,
    p: &gemm::GemmParams,
    ta: bool,
    tb: bool,
    a: &Tensor,
    b: &Tensor,
    c: &mut Tensor,
) -> Result<()> {
    use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    let cfg = GemmConfig {
        transa: op(tb),
        transb: op(ta),
        m: p.n,
        n: p.m,
        k: p.k,
        alpha: 1.0f32,
        lda: p.ldb,
        ldb: p.lda,
        beta: 0.0f32,
        ldc: p.ldc,
    };
    let (av, bv) = (a.cuda_f32()?, b.cuda_f32()?);
    let mut cv = c.cuda_f32_mut()?;
    if p.batch == 1 {
        // SAFETY: the shapes were resolved from the tensors.
        unsafe { blas.gemm(cfg, &bv, &av, &mut cv) }.map_err(|e| Error::cuda("cublasSgemm", e))
    } else {
        let cfg = cudarc::cublas::StridedBatchedConfig {
            gemm: cfg,
            batch_size: p.batch,
            stride_a: p.stride_b,
            stride_b: p.stride_a,
            stride_c: p.stride_c,
        };
        // SAFETY: as above.
        unsafe { blas.gemm_strided_batched(cfg, &bv, &av, &mut cv) }
            .map_err(|e| Error::cuda("cublasSgemmStridedBatched", e))
    }
}

/// A small table on the CPU (wall clock), so `emprior bench` says something everywhere.
pub fn run_cpu(quick: bool) -> Result<Vec<BenchRow>> {
    let repeats = if quick { 3 } else { 10 };
    let cpu = Device::Cpu;
    let mut rows = Vec::new();
    let n = 1 << 22;
    let a = ops::uniform(&[n], Philox::new(1, 1), 0, &cpu)?;
    let b = ops::uniform(&[n], Philox::new(1, 2), 0, &cpu)?;
    let mut out = Tensor::uninit(&[n], DType::F32, &cpu)?;
    let ms = time_cpu(repeats, || ops::add_into(&a, &b, &mut out))?;
    rows.push(BenchRow {
        what: "add".into(),
        shape: format!("{n} f32"),
        median_ms: ms,
        throughput: format!("{:.1} GB/s", gbs(12.0 * n as f64, ms)),
        versus: "-".into(),
    });
    // The reductions' oracle at the GPU table's shapes (one version on the CPU).
    for (what, shape, bytes, _, mut f) in reduction_cases(&cpu, quick)? {
        let ms = time_cpu(repeats, &mut f)?;
        rows.push(BenchRow {
            what: what.into(),
            shape,
            median_ms: ms,
            throughput: format!("{:.1} GB/s", gbs(bytes, ms)),
            versus: "-".into(),
        });
    }
    for size in [256usize, 1024] {
        let a = ops::uniform(&[size, size], Philox::new(2, 1), 0, &cpu)?;
        let b = ops::uniform(&[size, size], Philox::new(2, 2), 0, &cpu)?;
        let mut c = Tensor::uninit(&[size, size], DType::F32, &cpu)?;
        let ms = time_cpu(repeats, || ops::gemm_into(&a, &b, &mut c, GemmSpec::default()))?;
        let flops = 2.0 * (size as f64).powi(3);
        rows.push(BenchRow {
            what: "gemm f32 (matrixmultiply)".into(),
            shape: format!("1x{size}x{size}x{size}"),
            median_ms: ms,
            throughput: format!("{:.1} GFLOP/s", flops / (ms * 1e-3) / 1e9),
            versus: "-".into(),
        });
    }
    Ok(rows)
}

// ---- Host traffic per step: synchronisations, kernel launches and op calls --------------------

/// What one step of a workload costs the host, from the process-wide counters
/// (`crate::device::Counts`), averaged over the measured steps.
#[derive(Clone, Debug)]
pub struct TrafficRow {
    /// The workload step measured.
    pub what: String,
    /// Host-device synchronisations per step.
    pub syncs: f64,
    /// Host-to-device copies per step (a captured step replays only when this is 0).
    pub uploads: f64,
    /// Kernel launches (GPU only; 0 on the CPU).
    pub launches: f64,
    /// Op calls (both backends; the CPU's stand-in for launches).
    pub ops: f64,
}

/// The host-traffic table (syncs, uploads, launches, op calls per step) as markdown.
pub fn format_traffic_table(title: &str, rows: &[TrafficRow]) -> String {
    let mut s =
        format!("{title}\n\n| per step | host syncs | uploads | kernel launches | op calls |\n|---|---:|---:|---:|---:|\n");
    for r in rows {
        s += &format!(
            "| {} | {:.2} | {:.2} | {:.1} | {:.1} |\n",
            r.what, r.syncs, r.uploads, r.launches, r.ops
        );
    }
    s
}

/// Counts per step of `f` over `steps` steps, after one untimed warm-up step.
fn per_step(what: String, steps: usize, mut f: impl FnMut() -> Result<()>) -> Result<TrafficRow> {
    use crate::device::Counts;
    f()?;
    let before = Counts::now();
    for _ in 0..steps {
        f()?;
    }
    let c = Counts::since(before);
    let per = |v: u64| v as f64 / steps as f64;
    Ok(TrafficRow {
        what,
        syncs: per(c.syncs),
        uploads: per(c.uploads),
        launches: per(c.launches),
        ops: per(c.ops),
    })
}

/// Host synchronisations, launches and op calls of a TimeMLP training step (manifold preset),
/// of reading its log, and of a predictor-corrector MMPS sampler step (manifold TimeMLP, dense
/// 2 x 5 operators; CG with a relative tolerance at 3 and at 10 iterations, and a fixed 3, also
/// replayed from a CUDA graph on a GPU).
pub fn run_host_traffic(device: &Device, quick: bool) -> Result<Vec<TrafficRow>> {
    use crate::diffusion::sampler::BatchPart;
    use crate::diffusion::{preset, Denoiser, Sampler, SamplerKind, VeSchedule};
    use crate::posterior::{CgConfig, DenseOperators, Mmps, NetworkPrior, ObservationNoise};
    use crate::tensor::AsView;
    use crate::train::{AdamConfig, LrSchedule, Trainer};

    let steps = if quick { 3 } else { 10 };
    let (batch, observations) = if device.is_cuda() {
        (1024, 8192)
    } else {
        (256, 1024)
    };
    let den = Denoiser::new(preset("manifold")?);
    let params = den.layout().init(0, DType::F32, device)?;
    let mut rows = Vec::new();

    let config = AdamConfig {
        ema: Some(0.999),
        ..AdamConfig::new(LrSchedule::Constant(1e-3))
    };
    let mut trainer = Trainer::new(den.clone(), params, config, VeSchedule::new(1e-3, 10.0), 0)?;
    let x = ops::normal(&[batch, 5], Philox::new(11, 1), 0, device)?;
    rows.push(per_step(
        format!("TimeMLP training step (manifold preset, batch {batch})"),
        steps,
        || trainer.step(&x.as_view()?),
    )?);
    rows.push(per_step(
        "reading the training log (once per log interval)".into(),
        steps,
        || {
            trainer.step(&x.as_view()?)?;
            trainer.take_stats().map(drop)
        },
    )?);
    // The log read's own cost: the row above less a training step.
    let read = rows.pop().expect("pushed above");
    let step = &rows[0];
    rows.push(TrafficRow {
        what: read.what,
        syncs: read.syncs - step.syncs,
        uploads: read.uploads - step.uploads,
        launches: read.launches - step.launches,
        ops: read.ops - step.ops,
    });

    if device.is_cuda() {
        // The same step replayed from a captured CUDA graph: one launch and one copy (the batch
        // into the graph's input) per step.
        let params = den.layout().init(0, DType::F32, device)?;
        let mut graphed = Trainer::new(den.clone(), params, config, VeSchedule::new(1e-3, 10.0), 0)?;
        graphed.set_cuda_graphs(true);
        // Its eager warm-up; per_step's own warm-up is then the capture.
        graphed.step(&x.as_view()?)?;
        rows.push(per_step(
            format!("TimeMLP training step, CUDA graph replay (batch {batch})"),
            steps,
            || graphed.step(&x.as_view()?),
        )?);
        graphed.take_stats()?;
    }

    let prior = NetworkPrior::new(&den, trainer.weights())?;
    let a = ops::normal(&[observations, 2, 5], Philox::new(11, 2), 0, device)?;
    let operator = DenseOperators::new(a)?;
    let y = ops::normal(&[observations, 2], Philox::new(11, 3), 0, device)?;
    let noise = ObservationNoise::Scalar(1e-4);
    // One sampler step (predictor and correction, both MMPS), the manifold's rtol checks at 3
    // and 10 CG iterations, then a fixed 3 (the image E-steps' kind of solve) eager and, on a
    // GPU, replayed from a CUDA graph.
    let mut solves = vec![(3, Some(1e-3), false), (10, Some(1e-3), false), (3, None, false)];
    if device.is_cuda() {
        solves.push((3, None, true));
    }
    for (iters, rtol, graphs) in solves {
        let mut mmps = Mmps::new(
            &prior,
            &operator,
            &y,
            &noise,
            CgConfig {
                max_iters: iters,
                rtol,
            },
        );
        let kind = SamplerKind::Pc {
            corrections: 1,
            tau: 0.1,
        };
        let mut sampler = Sampler::new(kind, steps + 3, VeSchedule::new(1e-3, 10.0), Philox::new(11, 5));
        sampler.cuda_graphs = graphs;
        let solve = match rtol {
            Some(r) => format!("rtol {r:e}, checked every {}", mmps.cg_check_every),
            None => "no tolerance".into(),
        };
        let mut call = sampler.begin(
            &mut mmps,
            &[observations, 5],
            BatchPart::whole(observations),
            None,
            DType::F32,
            device,
        )?;
        if graphs {
            // Its eager first step; per_step's own warm-up is then the capture.
            call.step()?;
        }
        let how = if graphs { ", CUDA graph replay" } else { "" };
        rows.push(per_step(
            format!(
                "PC + MMPS sampler step{how} ({observations} observations, CG {iters} iterations, {solve})"
            ),
            steps,
            || call.step(),
        )?);
        if graphs && !call.replaying() {
            rows.last_mut().expect("pushed above").what += " [capture failed: eager]";
        }
    }
    Ok(rows)
}
