//! The `sparseflow` command line: run, benchmark and profile spiking networks.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod bench;
mod bench_layer;
mod profile_models;
use sparseflow::cuda::{CudaBackend, DeviceTensor};
use sparseflow::model::{self, ModelConfig, NeuronConfig, NeuronKind};
use sparseflow::ops::connect::ConnectFunction;
use sparseflow::ops::neuron::Firing;
use sparseflow::ops::sparse_conv2d::CudaDispatch;
use sparseflow::ops::ValueKind;
use sparseflow::optimize::{optimize, tune_cuda, Decision, OptimizeOptions};
use sparseflow::profile::{profile, ProfileOptions};
use sparseflow::{weights, Device, Error, Result};

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
    /// Run a zoo model on an input tensor file and write its output.
    Run(RunArgs),
    /// Print a zoo model's graph and, with --optimize, what optimize does to it.
    Inspect {
        #[command(flatten)]
        model: ModelArgs,
        /// Run optimize and print its report
        #[arg(long)]
        optimize: bool,
        /// Input height and width, to fix each sparse conv's block size
        #[arg(long, default_value_t = 224)]
        size: usize,
    },
    /// Benchmark a zoo network, dense against optimized (the default command).
    Bench(bench::BenchArgs),
    /// Time one layer, dense against sparse, on the same synthetic spikes.
    BenchLayer(bench_layer::BenchLayerArgs),
    /// Sparsity of zoo models: average input sparsity and zero-block ratios of the sparse layers.
    Profile(profile_models::ProfileArgs),
    /// Show the selected device and the kernel module.
    Info,
}

#[derive(Clone, Copy, ValueEnum)]
enum NeuronArg {
    Lif,
    If,
    Plif,
}

#[derive(Clone, Copy, ValueEnum)]
enum ConnectArg {
    Add,
    And,
    Iand,
}

/// The model and its neuron, as spikingjelly's constructor arguments.
#[derive(Args)]
struct ModelArgs {
    /// spiking_resnet18/34/50/101/152 or sew_resnet18/34/50/101/152
    #[arg(long)]
    model: String,
    #[arg(long, value_enum, default_value = "lif")]
    neuron: NeuronArg,
    /// LIF tau, or PLIF's initial tau
    #[arg(long, default_value_t = 2.0)]
    tau: f32,
    /// LIF/PLIF: decay the membrane without decaying the input
    #[arg(long)]
    no_decay_input: bool,
    #[arg(long, default_value_t = 1.0)]
    v_threshold: f32,
    /// A number (hard reset to it) or `none` (soft reset)
    #[arg(long, default_value = "0")]
    v_reset: String,
    /// Accepted for fidelity with spikingjelly; it only affects training
    #[arg(long)]
    detach_reset: bool,
    /// SEW ResNets' connect function
    #[arg(long, value_enum, default_value = "add")]
    connect: ConnectArg,
    #[arg(long, default_value_t = 1000)]
    num_classes: usize,
}

impl ModelArgs {
    fn config(&self) -> Result<ModelConfig> {
        let v_reset = match self.v_reset.as_str() {
            "none" | "None" => None,
            v => Some(v.parse::<f32>().map_err(|_| {
                Error::InvalidArgument(format!("--v-reset {v}: expected a number or `none`"))
            })?),
        };
        let decay_input = !self.no_decay_input;
        let kind = match self.neuron {
            NeuronArg::If => NeuronKind::If,
            NeuronArg::Lif => NeuronKind::Lif {
                tau: self.tau,
                decay_input,
            },
            NeuronArg::Plif => NeuronKind::Plif {
                init_tau: self.tau,
                decay_input,
            },
        };
        Ok(ModelConfig {
            neuron: NeuronConfig {
                kind,
                firing: Firing {
                    v_threshold: self.v_threshold,
                    v_reset,
                    detach_reset: self.detach_reset,
                },
            },
            num_classes: self.num_classes,
            connect: match self.connect {
                ConnectArg::Add => ConnectFunction::Add,
                ConnectArg::And => ConnectFunction::And,
                ConnectArg::Iand => ConnectFunction::Iand,
            },
        })
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// safetensors file with the model's state_dict
    #[arg(long, required_unless_present = "seed")]
    weights: Option<PathBuf>,
    /// Without --weights: seeded weights, BatchNorm calibrated on the input (a live network)
    #[arg(long)]
    seed: Option<u64>,
    /// safetensors file with a tensor `input` [T, N, C, H, W] (or [N, C, H, W] for one step)
    #[arg(long)]
    input: PathBuf,
    /// where to write the tensor `output` [T, N, num_classes]
    #[arg(long)]
    output: PathBuf,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// Replace the convolutions fed by spikes with sparse operators before running (on CUDA,
    /// each then keeps whichever of its sparse kernels and the dense engine is faster on the input)
    #[arg(long)]
    optimize: bool,
    /// Print each node's time and its input's element sparsity
    #[arg(long)]
    profile: bool,
    /// Run the forward this many times after a warm-up and report the median time
    #[arg(long, default_value_t = 1)]
    repeats: usize,
}

/// Keep freed memory for reuse instead of returning it to the OS: on the VMs this was measured
/// on, first-touch page faults cost ~3 µs per 4 KiB page, so a 12.8 MB activation that is
/// mapped afresh for every layer costs ~10 ms in faults alone, more than most sparse layers.
fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

fn main() {
    retain_freed_memory();
    let cli = Cli::parse();
    let result = match cli
        .command
        .or_else(|| Cli::parse_from(["sparseflow", "bench"]).command)
        .expect("`bench` parses")
    {
        Command::Run(args) => run(&args),
        Command::Inspect {
            model,
            optimize,
            size,
        } => inspect(&model, optimize, size),
        Command::Bench(args) => bench::bench(&args),
        Command::BenchLayer(args) => bench_layer::bench_layer(&args),
        Command::Profile(args) => profile_models::profile_models(&args),
        Command::Info => info(),
    };
    if let Err(err) = result {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

fn run(args: &RunArgs) -> Result<()> {
    let selection = Device::from_name(&args.device)?;
    let device = selection.device;
    let config = args.model.config()?;
    let mut graph = model::build(&args.model.model, &config)?;
    let input_file = weights::read(&args.input)?;
    let input = input_file.get("input", &args.input)?;
    match (&args.weights, args.seed) {
        (Some(path), _) => graph.load_params(&weights::read(path)?.tensors)?,
        (None, Some(seed)) => {
            model::init::init_seeded(&mut graph, seed)?;
            model::init::calibrate_batchnorm(&mut graph, input)?;
        }
        (None, None) => unreachable!("clap requires one of them"),
    }
    if args.optimize {
        let shape = input.shape();
        let options = OptimizeOptions {
            input_hw: (shape.len() >= 2).then(|| (shape[shape.len() - 2], shape[shape.len() - 1])),
            // An input of spikes (e.g. Poisson-encoded images) lets the stem conv go sparse too.
            input_kind: ValueKind::of_tensor(input),
            device,
            ..OptimizeOptions::default()
        };
        let report = optimize(&mut graph, &options)?;
        eprintln!(
            "optimize: {} replaced, {} folded, {} kept",
            report.count(Decision::Replaced),
            report.count(Decision::Folded),
            report.count(Decision::Kept)
        );
        if let Device::Cuda(ordinal) = device {
            // Measure each sparse conv against the dense engine on this input.
            let x = DeviceTensor::upload(&CudaBackend::get(ordinal)?, input)?;
            let tuned = tune_cuda(&graph, &x)?;
            let count = |d: CudaDispatch| tuned.iter().filter(|t| t.tuning.choice == d).count();
            eprintln!(
                "tune_cuda: of {} sparse convs, {} run the dense engine and {} the tensor-core kernel (measured faster)",
                tuned.len(),
                count(CudaDispatch::Dense),
                count(CudaDispatch::TensorCore)
            );
        }
    }
    let (output, ms, note) = if args.profile || args.repeats > 1 {
        let options = ProfileOptions {
            repeats: args.repeats,
            ..ProfileOptions::default()
        };
        let p = profile(&graph, input, device, &options, &mut || {})?;
        if args.profile {
            for n in &p.nodes {
                eprintln!(
                    "{:24} {:18} input {:6.2}% zeros {:9.3} ms",
                    n.name,
                    n.op,
                    100.0 * n.input_zeros,
                    n.time.as_secs_f64() * 1e3
                );
            }
        }
        let note = format!(" (median of {} after a warm-up)", args.repeats.max(1));
        (p.output, p.total.as_secs_f64() * 1e3, note)
    } else {
        let start = Instant::now();
        let output = match device {
            Device::Cpu => graph.forward(input)?,
            Device::Cuda(ordinal) => {
                let backend = CudaBackend::get(ordinal)?;
                let x = DeviceTensor::upload(&backend, input)?;
                graph.forward_cuda(&x)?.download()?
            }
        };
        let ms = start.elapsed().as_secs_f64() * 1e3;
        (output, ms, " (one cold run, uploads included)".to_string())
    };
    eprintln!(
        "{}: input {:?} -> output {:?} in {ms:.1} ms on {device}{note}",
        args.model.model,
        input.shape(),
        output.shape(),
    );
    weights::write(
        &args.output,
        [("output".to_string(), &output)],
        &BTreeMap::new(),
    )
}

fn inspect(args: &ModelArgs, optimize_it: bool, size: usize) -> Result<()> {
    let mut graph = model::build(&args.model, &args.config()?)?;
    if optimize_it {
        let options = OptimizeOptions {
            input_hw: Some((size, size)),
            ..OptimizeOptions::default()
        };
        let report = optimize(&mut graph, &options)?;
        println!("{}", graph.summary());
        println!("{report}");
    } else {
        println!("{}", graph.summary());
    }
    Ok(())
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
