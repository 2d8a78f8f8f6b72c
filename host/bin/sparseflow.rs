//! The `sparseflow` command line: run, benchmark and profile spiking networks.
use clap::{Parser, Subcommand};
use sparseflow::ops::prescan::{prescan_cpu, DevicePrescan};
use sparseflow::testing::random_spikes;
use sparseflow::{Device, Result};

#[derive(Parser)]
#[command(
    name = "sparseflow",
    version,
    about = "Sparse inference for spiking neural networks"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmark SparseFlow on this machine (the default command).
    Bench {
        /// auto, cpu, cuda or cuda:N
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Show the selected device and the kernel module.
    Info,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Bench {
        device: "auto".into(),
    }) {
        Command::Bench { device } => bench(&device),
        Command::Info => info(),
    };
    if let Err(err) = result {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

fn info() -> Result<()> {
    let sel = Device::best_available();
    println!("device: {} ({})", sel.device, sel.reason);
    println!(
        "kernels: {} bytes of PTX ({}), prescan variants: {:?}",
        sparseflow::cuda::PTX.len(),
        sparseflow::cuda::PTX_ORIGIN,
        sparseflow::ops::prescan::PRESCAN_VARIANTS
    );
    Ok(())
}

/// Until the network engine lands, the benchmark exercises the one operator that exists: the
/// prescan, on a synthetic spike tensor of a ResNet-18 layer1 shape.
fn bench(device: &str) -> Result<()> {
    let sel = Device::from_name(device)?;
    println!("device: {} ({})", sel.device, sel.reason);
    println!(
        "note: whole-network benchmarks arrive with the engine; this times the prescan stage only"
    );
    let shape = [4, 8, 64, 56, 56];
    let input = random_spikes(&shape, 0.05, 7);
    let t0 = std::time::Instant::now();
    let cpu = prescan_cpu(&input, 16)?;
    let cpu_ms = t0.elapsed().as_secs_f64() * 1e3;
    println!(
        "prescan {:?}, block 16: {:.1}% zeros, {:.1}% zero tiles, cpu {:.2} ms",
        shape,
        100.0 * input.zero_fraction(),
        100.0 * cpu.zero_tile_ratio(),
        cpu_ms
    );
    if let Device::Cuda(ordinal) = sel.device {
        let backend = sparseflow::cuda::CudaBackend::get(ordinal)?;
        let device_input = backend.stream().clone_htod(input.data())?;
        let mut scan = DevicePrescan::new(&backend, cpu.grid)?;
        scan.run(&backend, &device_input)?;
        let got = scan.download(&backend)?;
        println!("gpu prescan equals cpu: {}", got == cpu);
    }
    Ok(())
}
