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
