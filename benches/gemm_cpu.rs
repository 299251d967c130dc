//! CPU GEMM (the oracle's matrixmultiply path) at the shapes the CPU fallback meets: square
//! problems and an MLP layer over a batch. Throughput is in FLOP (criterion prints elem/s =
//! FLOP/s).

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use emprior::ops::{self, GemmSpec, Philox};
use emprior::{DType, Device, Tensor};

fn gemm_cpu(c: &mut Criterion) {
    let cpu = Device::Cpu;
    let mut group = c.benchmark_group("gemm_cpu_f32");
    // (label, m, n, k, trans_b): square, and x[1024, 256] * W[256, 256]^T (a TimeMLP layer).
    for (label, m, n, k, tb) in [
        ("square", 256usize, 256usize, 256usize, false),
        ("square", 512, 512, 512, false),
        ("mlp_layer_xWt", 1024, 256, 256, true),
    ] {
        let a = ops::uniform(&[m, k], Philox::new(1, 1), 0, &cpu).unwrap();
        let b_shape = if tb { [n, k] } else { [k, n] };
        let b = ops::uniform(&b_shape, Philox::new(1, 2), 0, &cpu).unwrap();
        let mut out = Tensor::uninit(&[m, n], DType::F32, &cpu).unwrap();
        group.throughput(Throughput::Elements((2 * m * n * k) as u64));
        group.bench_function(BenchmarkId::new(label, format!("{m}x{n}x{k}")), |bench| {
            bench.iter(|| ops::gemm_into(&a, &b, &mut out, GemmSpec::new(false, tb)).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, gemm_cpu);
/// criterion_main!, with poison mode off first: cargo runs benches with EMPRIOR_POISON=1, and the
/// timings must be of the kernels, not of the memsets that poison every fresh buffer.
fn main() {
    emprior::set_poison(false);
    benches();
    Criterion::default().configure_from_args().final_summary();
}
