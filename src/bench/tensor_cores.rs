//! The tensor-core table of `emprior bench` (GPU only): every distinct convolution of the
//! CIFAR-10 U-Net at batch 256 (64 with --quick) in its three passes, and the attention
//! projections' GEMMs, each timed against a cuBLAS bf16 GEMM (f32 compute) of the same M, N and
//! K measured in the same run, and against the bf16 peak measured here (cuBLAS on an 8192^3
//! product), with the f32 version 1 (im2col + SIMT GEMM) beside the forward pass; then the whole
//! U-Net (forward, forward + VJP, training step, MMPS denoiser) under bf16 and f32, its MFU
//! against that measured bf16 peak.
//!
//! On an H100 or H200 the forward and input gradient also run on the wgmma kernels (version 4,
//! kernels/conv_sm90a.cu) whatever `EMPRIOR_WGMMA` says; the U-Net rows use what the run chose.
//!
//! FLOPs are the useful ones, 2 M N K of the pass as a GEMM: for a stride-2 input gradient the
//! 9-tap kernel (version 2, shown beside the default by parity class, version 3) also runs the
//! taps that land between pixels (zero filled), which count as waste, not work.

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};

use super::{tflops, time_gpu, BenchRow};
use crate::device::{CudaDevice, Device};
use crate::error::{Error, Result};
use crate::nn::conv::bf16 as conv_bf16;
use crate::nn::conv::{im2col, ConvGeometry};
use crate::ops::{self, precision::to_bf16, GemmSpec, Philox};
use crate::tensor::{AsView, AsViewMut, DType, Tensor};

/// (label, H = W, Cin, Cout, stride) of the U-Net's convolutions but the first (3 channels).
const CONVS: &[(&str, usize, usize, usize, usize)] = &[
    ("level 0 resblock", 32, 128, 128, 1),
    ("down 1", 32, 128, 256, 2),
    ("level 1 resblock", 16, 256, 256, 1),
    ("down 2", 16, 256, 384, 2),
    ("level 2 resblock", 8, 384, 384, 1),
    ("merge 1", 16, 640, 256, 1),
    ("merge 0", 32, 384, 128, 1),
];

fn bf16_uniform(shape: &[usize], stream: u64, device: &Device) -> Result<Tensor> {
    to_bf16(&ops::uniform(shape, Philox::new(11, stream), 0, device)?)
}

/// A timed cuBLAS bf16 GEMM of row-major [m, k] x [k, n] -> [m, n] (bf16 out, f32 compute).
struct CublasBf16 {
    a: Tensor,
    b: Tensor,
    c: Tensor,
    m: usize,
    n: usize,
    k: usize,
}

impl CublasBf16 {
    fn new(m: usize, n: usize, k: usize, device: &Device) -> Result<Self> {
        Ok(CublasBf16 {
            a: bf16_uniform(&[m, k], 1, device)?,
            b: bf16_uniform(&[k, n], 2, device)?,
            c: Tensor::uninit(&[m, n], DType::BF16, device)?,
            m,
            n,
            k,
        })
    }

    /// Median ms of one product; row-major C = A B is column-major C^T = B^T A^T.
    fn time(&mut self, blas: &CudaBlas, dev: &CudaDevice, repeats: usize) -> Result<f64> {
        use cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N;
        let cfg = GemmConfig {
            transa: CUBLAS_OP_N,
            transb: CUBLAS_OP_N,
            m: self.n as i32,
            n: self.m as i32,
            k: self.k as i32,
            alpha: half::bf16::ONE,
            lda: self.n as i32,
            ldb: self.k as i32,
            beta: half::bf16::ZERO,
            ldc: self.n as i32,
        };
        let (a, b, c) = (&self.a, &self.b, &mut self.c);
        time_gpu(dev, repeats, || {
            let (av, bv) = (a.cuda_bf16()?, b.cuda_bf16()?);
            let mut cv = c.cuda_bf16_mut()?;
            // SAFETY: the tensors were made for these shapes.
            unsafe { blas.gemm(cfg, &bv, &av, &mut cv) }.map_err(|e| Error::cuda("cublasGemmEx (bf16)", e))
        })
    }

    fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// `f` with the convolutions on Hopper's wgmma kernels, the device's choice restored after;
/// `None` on a GPU without them (no rows).
fn on_wgmma<T>(dev: &CudaDevice, f: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
    if !dev.has_wgmma() {
        return Ok(None);
    }
    let was = dev.wgmma();
    dev.set_wgmma(true)?;
    let out = f();
    dev.set_wgmma(was)?;
    out.map(Some)
}

/// The table's rows. Errors when cuBLAS cannot be loaded (the comparison is the point).
pub fn run(dev: &CudaDevice, device: &Device, quick: bool) -> Result<Vec<BenchRow>> {
    let repeats = if quick { 3 } else { 10 };
    let batch = if quick { 64 } else { 256 };
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(Error::Other(
            "the tensor-core table compares with cuBLAS, which cannot be loaded here".into(),
        ));
    }
    let blas = CudaBlas::new(dev.stream().clone()).map_err(|e| Error::cuda("creating a cuBLAS handle", e))?;
    let mut rows = Vec::new();

    // The bf16 peak of this GPU, measured: cuBLAS on a large square product.
    let side = if quick { 4096 } else { 8192 };
    let mut peak_gemm = CublasBf16::new(side, side, side, device)?;
    let peak_ms = peak_gemm.time(&blas, dev, repeats)?;
    let peak = tflops(peak_gemm.flops(), peak_ms);
    drop(peak_gemm);
    rows.push(BenchRow {
        what: "cuBLAS bf16 GEMM (the measured peak)".into(),
        shape: format!("{side}^3"),
        median_ms: peak_ms,
        throughput: format!("{peak:.1} TFLOP/s"),
        versus: "100% of measured peak".into(),
    });
    let mut row = |what: String, shape: String, flops: f64, ms: f64, cublas: Option<(f64, f64)>| {
        let rate = tflops(flops, ms);
        let mut versus = Vec::new();
        if let Some((ref_ms, ref_flops)) = cublas {
            versus.push(format!(
                "{:.0}% of cuBLAS bf16 same M N K ({:.1} TFLOP/s)",
                100.0 * rate / tflops(ref_flops, ref_ms),
                tflops(ref_flops, ref_ms)
            ));
        }
        versus.push(format!("{:.0}% of measured bf16 peak", 100.0 * rate / peak));
        rows.push(BenchRow {
            what,
            shape,
            median_ms: ms,
            throughput: format!("{rate:.1} TFLOP/s"),
            versus: versus.join(", "),
        });
    };

    // cuBLAS on the same M, N, K: (median ms, FLOPs), its buffers freed before the next case.
    let cublas = |m: usize, n: usize, k: usize| -> Result<(f64, f64)> {
        let mut reference = CublasBf16::new(m, n, k, device)?;
        Ok((reference.time(&blas, dev, repeats)?, reference.flops()))
    };

    for &(label, side, cin, cout, s) in CONVS {
        let g = ConvGeometry::new(batch, side, side, cin, s);
        let p_in = batch * side * side;
        let p_out = (g.n * g.oh * g.ow) as usize;
        let x = bf16_uniform(&[p_in * cin], 3, device)?;
        let w = bf16_uniform(&[9 * cin * cout], 4, device)?;
        let dy = bf16_uniform(&[p_out * cout], 5, device)?;
        let bias = ops::uniform(&[cout], Philox::new(11, 6), 0, device)?;
        let shape = format!("{batch}x{side}x{side}x{cin} -> {cout}, stride {s}");
        let flops = 2.0 * p_out as f64 * cout as f64 * 9.0 * cin as f64;

        // Forward: M = output pixels, N = Cout, K = 9 Cin, bf16 out (as cuBLAS's).
        let mut y = Tensor::uninit(&[p_out * cout], DType::BF16, device)?;
        let bv = bias.as_view()?;
        let ms = time_gpu(dev, repeats, || {
            conv_bf16::forward(&x, &w, Some(&bv), &g, cout, None, Some(&mut y))
        })?;
        let reference = cublas(p_out, cout, 9 * cin)?;
        row(
            format!("conv {label} forward (bf16 v2)"),
            shape.clone(),
            flops,
            ms,
            Some(reference),
        );
        if let Some(ms) = on_wgmma(dev, || {
            time_gpu(dev, repeats, || {
                conv_bf16::forward(&x, &w, Some(&bv), &g, cout, None, Some(&mut y))
            })
        })? {
            row(
                format!("conv {label} forward (bf16 v4, wgmma)"),
                shape.clone(),
                flops,
                ms,
                Some(reference),
            );
        }
        drop(y);

        // Version 1 beside it: im2col + the f32 SIMT GEMM (columns of the whole batch).
        let xf = ops::to_f32(&x)?;
        let wf = ops::to_f32(&w)?.reshape(&[9 * cin, cout])?;
        let mut yf = Tensor::uninit(&[p_out, cout], DType::F32, device)?;
        let ms = time_gpu(dev, repeats, || {
            let col = im2col(&xf.as_view()?, &g)?;
            ops::gemm_bias_into(&col, &wf, &bias, &mut yf, GemmSpec::default())
        })?;
        row(
            format!("conv {label} forward (f32 v1, im2col)"),
            shape.clone(),
            flops,
            ms,
            None,
        );
        drop((xf, wf, yf));

        // Input gradient: M = input pixels, N = Cin, K = 9 Cout / stride^2 useful. At stride 2
        // the default kernel by parity class (v3), then the 9-tap one (v2) it replaced.
        let mut dx = Tensor::uninit(&[p_in * cin], DType::F32, device)?;
        let reference = cublas(p_in, cin, 9 * cout / (s * s))?;
        let kernels: &[(conv_bf16::InputGradKernel, &str)] = if s == 2 {
            &[
                (conv_bf16::InputGradKernel::ByParity, "bf16 v3, by parity class"),
                (conv_bf16::InputGradKernel::AllTaps, "bf16 v2, all 9 taps"),
            ]
        } else {
            &[(conv_bf16::InputGradKernel::AllTaps, "bf16 v2")]
        };
        for &(kernel, name) in kernels {
            let ms = time_gpu(dev, repeats, || {
                conv_bf16::input_grad_with(&dy, &w, &g, cout, &mut dx.as_view_mut()?, 0.0, kernel)
            })?;
            row(
                format!("conv {label} input grad ({name})"),
                shape.clone(),
                flops,
                ms,
                Some(reference),
            );
        }
        let default = conv_bf16::InputGradKernel::ByParity;
        if let Some(ms) = on_wgmma(dev, || {
            time_gpu(dev, repeats, || {
                conv_bf16::input_grad_with(&dy, &w, &g, cout, &mut dx.as_view_mut()?, 0.0, default)
            })
        })? {
            let name = if s == 2 {
                "bf16 v4, wgmma by parity class"
            } else {
                "bf16 v4, wgmma"
            };
            row(
                format!("conv {label} input grad ({name})"),
                shape.clone(),
                flops,
                ms,
                Some(reference),
            );
        }
        drop(dx);

        // Weight gradient: M = 9 Cin, N = Cout, K = output pixels (split-K and the ordered sum).
        let mut dw = Tensor::uninit(&[9 * cin * cout], DType::F32, device)?;
        let ms = time_gpu(dev, repeats, || {
            conv_bf16::weight_grad(&x, &dy, &g, cout, &mut dw.as_view_mut()?, 0.0)
        })?;
        let reference = cublas(9 * cin, cout, p_out)?;
        row(
            format!(
                "conv {label} weight grad (bf16 v2, {} parts)",
                conv_bf16::wgrad_splits(&g, cout)
            ),
            shape,
            flops,
            ms,
            Some(reference),
        );
    }

    // The level-1 attention projections (256 tokens per image, 256 channels -> qkv 768).
    let tokens = batch * 256;
    for (label, m, n, k, ta, tb) in [
        ("attention qkv forward (nn)", tokens, 768, 256, false, false),
        ("attention qkv input vjp (nt)", tokens, 256, 768, false, true),
        ("attention qkv weight grad (tn)", 256, 768, tokens, true, false),
    ] {
        let a = bf16_uniform(&if ta { [k, m] } else { [m, k] }, 7, device)?;
        let b = bf16_uniform(&if tb { [n, k] } else { [k, n] }, 8, device)?;
        let mut c = Tensor::uninit(&[m, n], DType::BF16, device)?;
        let spec = GemmSpec::new(ta, tb);
        let ms = time_gpu(dev, repeats, || {
            ops::gemm_bf16_into(&a, &b, None, None, Some(&mut c), spec)
        })?;
        let reference = cublas(m, n, k)?;
        row(
            format!("gemm {label} (bf16 v2)"),
            format!("{m}x{n}x{k}"),
            2.0 * (m * n * k) as f64,
            ms,
            Some(reference),
        );
    }

    // The whole network, MFU against the measured bf16 peak: bf16, then (not with --quick, whose
    // cap is short) f32 at batch 64 only, where at about 1% of the peak a batch-256 step would
    // take most of the device check's bench cap.
    use crate::ops::Precision;
    let measured = Some(("measured bf16 peak", peak));
    rows.extend(super::run_networks_gpu(
        dev,
        device,
        quick,
        Precision::Bf16,
        measured,
    )?);
    if !quick {
        rows.extend(super::run_networks_gpu(
            dev,
            device,
            true,
            Precision::F32,
            measured,
        )?);
    }
    Ok(rows)
}
