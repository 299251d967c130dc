//! GPU kernels under criterion: GEMM (TFLOP/s as elem/s), the level-0 convolution of the CIFAR-10
//! U-Net at batch 256 in its three passes, bf16 tensor cores (version 2) beside the f32 im2col
//! path (version 1), and elementwise/reduction kernels (bytes moved as B/s), each timed with CUDA
//! events around the launch. Without a GPU every
//! bench prints `skipped: GPU unavailable: <reason>` and measures nothing.

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use emprior::bench::device_time;
use emprior::device::CudaDevice;
use emprior::ops::{self, GemmSpec, Philox};
use emprior::{DType, Device, Tensor};

fn gpu() -> Option<(Device, std::sync::Arc<CudaDevice>)> {
    match Device::cuda(0) {
        Ok(d) => {
            let Device::Cuda(dev) = &d else { unreachable!() };
            let dev = dev.clone();
            Some((d, dev))
        }
        Err(e) => {
            println!("gpu_kernels: skipped: {e}");
            None
        }
    }
}

fn gemm_gpu(c: &mut Criterion) {
    let Some((device, dev)) = gpu() else { return };
    let mut group = c.benchmark_group("gemm_gpu_f32");
    for (label, batch, m, n, k, tb) in [
        ("square", 1usize, 2048usize, 2048usize, 2048usize, false),
        ("square", 1, 4096, 4096, 4096, false),
        ("linear_xWt", 1, 65536, 256, 256, true),
        ("batched", 256, 256, 256, 256, false),
    ] {
        let sh = |r: usize, c: usize| if batch == 1 { vec![r, c] } else { vec![batch, r, c] };
        let a = ops::uniform(&sh(m, k), Philox::new(1, 1), 0, &device).unwrap();
        let b = ops::uniform(
            &if tb { sh(n, k) } else { sh(k, n) },
            Philox::new(1, 2),
            0,
            &device,
        )
        .unwrap();
        let mut out = Tensor::uninit(&sh(m, n), DType::F32, &device).unwrap();
        group.throughput(Throughput::Elements((2 * batch * m * n * k) as u64));
        group.bench_function(BenchmarkId::new(label, format!("{batch}x{m}x{n}x{k}")), |bench| {
            bench.iter_custom(|iters| {
                device_time(&dev, iters, || {
                    ops::gemm_into(&a, &b, &mut out, GemmSpec::new(false, tb)).unwrap()
                })
            })
        });
    }
    group.finish();
}

fn conv_gpu(c: &mut Criterion) {
    use emprior::nn::conv::bf16 as conv_bf16;
    use emprior::nn::conv::{col2im_into, im2col, ConvGeometry};
    use emprior::ops::precision::to_bf16;
    use emprior::{AsView, AsViewMut};
    let Some((device, dev)) = gpu() else { return };
    let (n, side, ch) = (256usize, 32usize, 128usize);
    let g = ConvGeometry::new(n, side, side, ch, 1);
    let pixels = n * side * side;
    let x = ops::uniform(&[pixels, ch], Philox::new(4, 1), 0, &device).unwrap();
    let w = ops::uniform(&[9 * ch, ch], Philox::new(4, 2), 0, &device).unwrap();
    let dy = ops::uniform(&[pixels, ch], Philox::new(4, 3), 0, &device).unwrap();
    let (xb, wb, dyb) = (to_bf16(&x).unwrap(), to_bf16(&w).unwrap(), to_bf16(&dy).unwrap());
    let mut y = Tensor::uninit(&[pixels, ch], DType::F32, &device).unwrap();
    let mut dw = Tensor::uninit(&[9 * ch, ch], DType::F32, &device).unwrap();
    let mut group = c.benchmark_group("conv3x3_level0_batch256");
    group.throughput(Throughput::Elements((2 * pixels * ch * 9 * ch) as u64));
    let mut run = |name: &str, f: &mut dyn FnMut()| {
        group.bench_function(name, |bench| {
            bench.iter_custom(|iters| device_time(&dev, iters, &mut *f))
        });
    };
    run("forward_bf16_v2", &mut || {
        conv_bf16::forward(&xb, &wb, None, &g, ch, Some(&mut y.as_view_mut().unwrap()), None).unwrap()
    });
    run("forward_f32_v1_im2col", &mut || {
        let col = im2col(&x.as_view().unwrap(), &g).unwrap();
        ops::gemm_into(&col, &w, &mut y, GemmSpec::default()).unwrap()
    });
    run("input_grad_bf16_v2", &mut || {
        conv_bf16::input_grad(&dyb, &wb, &g, ch, &mut y.as_view_mut().unwrap(), 0.0).unwrap()
    });
    run("input_grad_f32_v1_col2im", &mut || {
        let mut dcol = Tensor::uninit(&[pixels, 9 * ch], DType::F32, &device).unwrap();
        ops::gemm_into(&dy, &w, &mut dcol, GemmSpec::new(false, true)).unwrap();
        col2im_into(&dcol.as_view().unwrap(), &g, &mut y.as_view_mut().unwrap()).unwrap()
    });
    run("weight_grad_bf16_v2", &mut || {
        conv_bf16::weight_grad(&xb, &dyb, &g, ch, &mut dw.as_view_mut().unwrap(), 0.0).unwrap()
    });
    run("weight_grad_f32_v1_im2col", &mut || {
        let col = im2col(&x.as_view().unwrap(), &g).unwrap();
        ops::gemm_into(&col, &dy, &mut dw, GemmSpec::new(true, false)).unwrap()
    });
    group.finish();
}

fn elementwise_gpu(c: &mut Criterion) {
    let Some((device, dev)) = gpu() else { return };
    let n = 1usize << 26;
    let a = ops::uniform(&[n], Philox::new(2, 1), 0, &device).unwrap();
    let b = ops::uniform(&[n], Philox::new(2, 2), 0, &device).unwrap();
    let mut out = Tensor::uninit(&[n], DType::F32, &device).unwrap();
    let mut rows = Tensor::uninit(&[4096], DType::F32, &device).unwrap();
    let a2 = a.to_device(&device).unwrap().reshape(&[4096, n / 4096]).unwrap();
    let b2 = b.to_device(&device).unwrap().reshape(&[4096, n / 4096]).unwrap();
    let mut group = c.benchmark_group("elementwise_gpu_f32");
    let mut run = |name: &str, bytes: usize, f: &mut dyn FnMut()| {
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(BenchmarkId::new(name, n), |bench| {
            bench.iter_custom(|iters| device_time(&dev, iters, &mut *f))
        });
    };
    run("add", 12 * n, &mut || ops::add_into(&a, &b, &mut out).unwrap());
    run("silu", 8 * n, &mut || ops::silu_into(&a, &mut out).unwrap());
    run("silu_backward", 12 * n, &mut || {
        ops::silu_backward_into(&a, &b, &mut out).unwrap()
    });
    run("philox_normal", 4 * n, &mut || {
        Philox::new(3, 0).normal_into(&mut out, 0).unwrap()
    });
    run("row_dot_4096_rows", 8 * n, &mut || {
        ops::row_dot_into(&a2, &b2, &mut rows).unwrap()
    });
    group.finish();
}

criterion_group!(benches, gemm_gpu, conv_gpu, elementwise_gpu);
/// criterion_main!, with poison mode off first: cargo runs benches with EMPRIOR_POISON=1, and the
/// timings must be of the kernels, not of the memsets that poison every fresh buffer.
fn main() {
    emprior::set_poison(false);
    benches();
    Criterion::default().configure_from_args().final_summary();
}
