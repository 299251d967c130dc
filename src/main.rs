//! The `emprior` command line: parses arguments and calls the library; no logic of its own.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use emprior::device::{probe_cuda, Device, DeviceRequest, Kernels};
use emprior::{bench, kernels};

#[derive(Parser)]
#[command(
    name = "emprior",
    version,
    about = "Diffusion priors from incomplete observations by EM, on CUDA"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the build (embedded kernels, architectures, toolkit) and the devices found.
    Info {
        /// Require this device (auto, cpu, cuda, cuda:N); exits non-zero if it cannot be used.
        #[arg(long, default_value = "auto")]
        device: DeviceRequest,
        /// Also list every kernel function.
        #[arg(long)]
        kernels: bool,
    },
    /// Print a preset network: architecture, parameter count, forward cost and, with --batch,
    /// the activation memory one forward keeps for the VJPs (MMPS) or the backward.
    Model {
        /// manifold (TimeMLP), cifar10 or mri (U-Nets).
        #[arg(long)]
        preset: String,
        /// Report the activation memory for this batch size (measured from a one-sample forward
        /// on the CPU; every saved tensor scales with the batch).
        #[arg(long)]
        batch: Option<usize>,
    },
    /// Time the kernels (CUDA events on a GPU) and print a markdown table with throughput against
    /// ceilings measured in the same run.
    Bench {
        #[arg(long, default_value = "auto")]
        device: DeviceRequest,
        /// Fewer shapes and repeats (about a minute on a GPU).
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Info { device, kernels } => info(device, kernels),
        Command::Bench { device, quick } => bench(device, quick),
        Command::Model { preset, batch } => model(&preset, batch),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn info(request: DeviceRequest, list_kernels: bool) -> Result<()> {
    println!("emprior {}", env!("CARGO_PKG_VERSION"));
    println!("build: {}", kernels::build_summary());
    if list_kernels {
        for (module, func) in Kernels::names() {
            println!("  kernel {module}.cu :: {func}");
        }
    }
    match probe_cuda() {
        Ok(n) => {
            println!("CUDA devices: {n}");
            for i in 0..n {
                match Device::cuda(i) {
                    Ok(d) => println!("  {d:?}: ready"),
                    Err(e) => println!("  cuda:{i}: {e}"),
                }
            }
        }
        Err(reason) => println!("GPU unavailable: {reason}"),
    }
    println!(
        "cpu: {} threads available",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let device = match request {
        DeviceRequest::Auto => {
            let (d, why) = Device::auto();
            if let Some(why) = why {
                println!("selected: cpu (auto; GPU unavailable: {why})");
            } else {
                println!("selected: {d:?} (auto)");
            }
            return Ok(());
        }
        r => Device::open(r),
    };
    match device {
        Ok(d) => println!("selected: {d:?}"),
        Err(e) => bail!("--device {request}: {e}"),
    }
    Ok(())
}

fn bench(request: DeviceRequest, quick: bool) -> Result<()> {
    let device = Device::open(request)?;
    let (title, rows) = match &device {
        Device::Cuda(dev) => (
            format!("GPU kernels on {dev:?}"),
            bench::run_gpu(dev, &device, quick)?,
        ),
        Device::Cpu => ("CPU (wall clock)".to_string(), bench::run_cpu(quick)?),
    };
    print!("{}", bench::format_table(&title, &rows));
    Ok(())
}

fn model(name: &str, batch: Option<usize>) -> Result<()> {
    use emprior::diffusion::{preset, Denoiser, Network};
    use emprior::nn::unet::fmt_count;
    use emprior::nn::Mode;
    use emprior::{AsView, DType, Tensor};

    let net = preset(name)?;
    print!("{}", net.describe());
    let params = net.layout().len();
    let macs = net.forward_macs();
    println!(
        "parameters: {} ({} in f32)",
        fmt_count(params),
        fmt_bytes(params as f64 * 4.0)
    );
    println!(
        "forward cost: {} per sample (GEMM-shaped work only)",
        fmt_flops(2.0 * macs as f64)
    );
    if let Some(n) = batch {
        let den = Denoiser::new(net);
        let weights = den.layout().init(0, DType::F32, &Device::Cpu)?;
        let mut shape = vec![1];
        shape.extend(den.net.sample_shape());
        let x = Tensor::zeros(&shape, DType::F32, &Device::Cpu)?;
        let (_, saved) = den.denoise(&weights.as_view()?, &x.as_view()?, &[1.0], Mode::Eval)?;
        let per_sample = saved.bytes() as f64;
        println!(
            "activations kept by one forward for the VJPs (f32): {} per sample, {} at batch {n}",
            fmt_bytes(per_sample),
            fmt_bytes(per_sample * n as f64)
        );
        if let Network::UNet(u) = &den.net {
            let cols = u.largest_column_buffer() as f64 * 4.0;
            println!(
                "largest transient (im2col columns of one convolution): {} per sample, {} at batch {n}",
                fmt_bytes(cols),
                fmt_bytes(cols * n as f64)
            );
        }
    }
    Ok(())
}

fn fmt_bytes(b: f64) -> String {
    match b {
        b if b >= (1u64 << 30) as f64 => format!("{:.2} GiB", b / (1u64 << 30) as f64),
        b if b >= (1u64 << 20) as f64 => format!("{:.2} MiB", b / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b / 1024.0),
    }
}

fn fmt_flops(f: f64) -> String {
    match f {
        f if f >= 1e9 => format!("{:.3} GFLOP", f / 1e9),
        f if f >= 1e6 => format!("{:.3} MFLOP", f / 1e6),
        f => format!("{:.1} kFLOP", f / 1e3),
    }
}
