//! `sparseflow bench`, the main job: a zoo network, dense against optimized, on the best device,
//! with a per-layer table (see the README's "The main command").
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use sparseflow::cudnn::{dense_conv_engine, DenseConvEngine};
use sparseflow::encode::Encoding;
use sparseflow::graph::Graph;
use sparseflow::model::{self, init, ModelConfig};
use sparseflow::ops::sparse_conv2d::CudaDispatch;
use sparseflow::ops::ValueKind;
use sparseflow::optimize::{
    optimize, tune_cuda, Decision, OptimizeOptions, OptimizeReport, TuningEntry,
};
use sparseflow::profile::{profile, NodeProfile, Profile, ProfileOptions};
use sparseflow::testing::SplitMix64;
use sparseflow::{weights, Device, Error, Result, Tensor};

#[derive(Clone, Copy, ValueEnum)]
pub enum EncodingArg {
    Poisson,
    Direct,
}

#[derive(Args)]
pub struct BenchArgs {
    /// spiking_resnet18/34/50/101/152 or sew_resnet18/34/50/101/152
    #[arg(long, default_value = "spiking_resnet18")]
    model: String,
    /// safetensors state_dict; without it, seeded weights with BatchNorm calibrated on the input
    #[arg(long)]
    weights: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    timesteps: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Image height and width
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// How the synthetic images become T steps of input
    #[arg(long, value_enum, default_value = "poisson")]
    encoding: EncodingArg,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// Timed forwards per measurement after a warm-up; medians are reported
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Print one JSON object instead of the table
    #[arg(long)]
    json: bool,
    /// Also write DIR/weights.safetensors (the dense model's state_dict, as calibrated) and
    /// DIR/input.safetensors (`input`, `dense_output`, `optimized_output`), for comparisons with
    /// other frameworks (scripts/compare-spikingjelly.py)
    #[arg(long, value_name = "DIR")]
    export: Option<PathBuf>,
}

/// The two profiles and how they relate.
struct Comparison {
    dense: Profile,
    sparse: Profile,
    report: OptimizeReport,
    agreement: Agreement,
    /// On CUDA: each sparse conv's measured sparse and dense times, and its choice.
    tuned: Vec<TuningEntry>,
}

/// How closely the optimized model's logits follow the dense model's. The two sum in different
/// orders (BatchNorm folded, sparse gathers), so a membrane that lands within rounding of the
/// threshold can fire in one and not the other, and the flip propagates to later layers: exact
/// agreement is expected on small inputs, close agreement on large batches.
struct Agreement {
    /// Largest |difference| over the largest |logit|.
    max_error: f64,
    /// Σ|difference| / Σ|logit|.
    mean_error: f64,
    /// Fraction of samples whose T-averaged top-1 class is the same.
    top1: f64,
}

impl Agreement {
    /// Beyond this mean error the difference is not tie flips but a wrong result.
    const MEAN_ERROR_LIMIT: f64 = 0.05;

    fn measure(got: &Tensor, want: &Tensor) -> Result<Self> {
        let max_error = got.relative_error(want)?;
        let (g, w) = (got.data(), want.data());
        let diff: f64 = g.iter().zip(w).map(|(a, b)| (a - b).abs() as f64).sum();
        let norm: f64 = w.iter().map(|b| b.abs() as f64).sum();
        let mean_error = if norm > 0.0 { diff / norm } else { diff };
        // Logits [T, N, classes]: average over T, then compare each sample's top class.
        let shape = want.shape();
        let classes = *shape.last().unwrap_or(&1);
        let (steps, samples) = match shape {
            [t, n, _] => (*t, *n),
            _ => (1, want.len() / classes.max(1)),
        };
        let top = |x: &[f32], n: usize| {
            let mean: Vec<f32> = (0..classes)
                .map(|c| (0..steps).map(|t| x[(t * samples + n) * classes + c]).sum())
                .collect();
            (0..classes).max_by(|&a, &b| mean[a].total_cmp(&mean[b]))
        };
        let same = (0..samples).filter(|&n| top(g, n) == top(w, n)).count();
        Ok(Self {
            max_error,
            mean_error,
            top1: same as f64 / samples.max(1) as f64,
        })
    }

    fn exact(&self) -> bool {
        self.max_error <= 1e-4
    }

    fn acceptable(&self) -> bool {
        self.exact() || self.mean_error <= Self::MEAN_ERROR_LIMIT
    }
}

pub fn bench(a: &BenchArgs) -> Result<()> {
    let selection = Device::from_name(&a.device)?;
    let device = selection.device;
    let x = synthetic_input(a)?;
    let build = || -> Result<Graph> {
        let mut g = model::build(&a.model, &ModelConfig::default())?;
        match &a.weights {
            Some(path) => g.load_params(&weights::read(path)?.tensors)?,
            None => {
                init::init_seeded(&mut g, 1)?;
                init::calibrate_batchnorm(&mut g, &x)?;
            }
        }
        Ok(g)
    };
    let dense = build()?;
    let mut sparse = build()?;
    let dense_params: Vec<(String, Tensor)> = dense
        .params()
        .into_iter()
        .map(|(name, t)| (name, t.clone()))
        .collect();
    let options = OptimizeOptions {
        input_hw: Some((a.size, a.size)),
        // Poisson-encoded images are spikes already: the stem conv can take them sparsely.
        input_kind: ValueKind::of_tensor(&x),
        device,
        ..OptimizeOptions::default()
    };
    let report = optimize(&mut sparse, &options)?;
    let tuned = match device {
        // The measured pass, on another sample of the same distribution than the timed input.
        Device::Cuda(ordinal) => {
            let backend = sparseflow::cuda::CudaBackend::get(ordinal)?;
            let sample = synthetic_input_seeded(a, 12)?;
            let sample = sparseflow::cuda::DeviceTensor::upload(&backend, &sample)?;
            tune_cuda(&sparse, &sample)?
        }
        Device::Cpu => Vec::new(),
    };

    let forwards = 2 * (1 + 2 * a.repeats.max(1)) as u64;
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(forwards)
    };
    bar.set_style(
        ProgressStyle::with_template("{msg:>9} [{bar:30}] {pos}/{len} forwards, {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let profile_options = ProfileOptions {
        repeats: a.repeats,
        ..ProfileOptions::default()
    };
    bar.set_message("dense");
    let dense = profile(&dense, &x, device, &profile_options, &mut || bar.inc(1))?;
    bar.set_message("optimized");
    let sparse = profile(&sparse, &x, device, &profile_options, &mut || bar.inc(1))?;
    bar.finish_and_clear();
    let agreement = Agreement::measure(&sparse.output, &dense.output)?;
    if let Some(dir) = &a.export {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let meta = BTreeMap::from([("model".to_string(), a.model.clone())]);
        weights::write(
            dir.join("weights.safetensors"),
            dense_params.iter().map(|(n, t)| (n.clone(), t)),
            &meta,
        )?;
        weights::write(
            dir.join("input.safetensors"),
            [
                ("input".to_string(), &x),
                ("dense_output".to_string(), &dense.output),
                ("optimized_output".to_string(), &sparse.output),
            ],
            &meta,
        )?;
    }
    let c = Comparison {
        dense,
        sparse,
        report,
        agreement,
        tuned,
    };
    if a.json {
        println!("{:#}", to_json(a, &c));
    } else {
        print_table(a, &c, &selection.reason);
    }
    let agreement = &c.agreement;
    if !agreement.acceptable() {
        return Err(Error::InvalidArgument(format!(
            "the optimized model's output differs from the dense model's: mean error {:.2e}, \
             largest {:.2e}",
            agreement.mean_error, agreement.max_error
        )));
    }
    Ok(())
}

/// Seeded uniform images `[N, 3, size, size]`, encoded over T steps.
fn synthetic_input(a: &BenchArgs) -> Result<Tensor> {
    synthetic_input_seeded(a, 11)
}

/// The synthetic input with another Poisson seed (the image is the same).
fn synthetic_input_seeded(a: &BenchArgs, seed: u64) -> Result<Tensor> {
    let encoding = match a.encoding {
        EncodingArg::Poisson => Encoding::Poisson { seed },
        EncodingArg::Direct => Encoding::Direct,
    };
    synthetic_images(a.batch, a.size, a.timesteps, encoding)
}

/// Seeded uniform images `[batch, 3, size, size]` encoded over `timesteps` (the same for every
/// command, so `bench` and `profile` see the same input).
pub fn synthetic_images(
    batch: usize,
    size: usize,
    timesteps: usize,
    encoding: Encoding,
) -> Result<Tensor> {
    let mut rng = SplitMix64::new(7);
    let n = batch * 3 * size * size;
    let image = Tensor::new(
        vec![batch, 3, size, size],
        (0..n).map(|_| rng.next_f32()).collect(),
    )?;
    encoding.encode(&image, timesteps)
}

/// One row per node of the optimized model; a convolution's dense time includes the BatchNorm
/// that optimize folded into it.
struct Row<'a> {
    node: &'a NodeProfile,
    dense: Option<Duration>,
}

fn rows(c: &Comparison) -> Vec<Row<'_>> {
    c.sparse
        .nodes
        .iter()
        .filter(|n| n.op != "Input")
        .map(|node| {
            let folded = c.report.entries.iter().filter(|e| {
                e.decision == Decision::Folded && e.reason.contains(&format!("`{}`", node.name))
            });
            let dense = c.dense.node(&node.name).map(|d| {
                d.time
                    + folded
                        .filter_map(|e| c.dense.node(&e.node))
                        .map(|bn| bn.time)
                        .sum::<Duration>()
            });
            Row { node, dense }
        })
        .collect()
}

/// Which engine ran the dense convolutions: `cpu`, `cudnn` or `rust`.
fn dense_conv_label(device: Device) -> &'static str {
    match (device, dense_conv_engine()) {
        (Device::Cpu, _) => "cpu",
        (_, DenseConvEngine::Cudnn) => "cudnn",
        (_, DenseConvEngine::Rust) => "rust",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print_table(a: &BenchArgs, c: &Comparison, reason: &str) {
    let engine = match dense_conv_label(c.sparse.device) {
        "cudnn" => "cuDNN fp32 (TF32 off)",
        "rust" => "Rust implicit GEMM",
        _ => "im2col + gemm crate",
    };
    println!(
        "{} on {} ({reason}); dense convolutions: {engine}\ninput: T={} N={} 3x{}x{} {} encoding; {}; optimize: {} replaced, {} folded, {} kept",
        a.model,
        c.sparse.device_name,
        a.timesteps,
        a.batch,
        a.size,
        a.size,
        match a.encoding {
            EncodingArg::Poisson => "Poisson",
            EncodingArg::Direct => "direct",
        },
        match &a.weights {
            Some(p) => format!("weights {}", p.display()),
            None => "seeded weights, BatchNorm calibrated".into(),
        },
        c.report.count(Decision::Replaced),
        c.report.count(Decision::Folded),
        c.report.count(Decision::Kept),
    );
    println!(
        "\n{:26} {:18} {:22} {:>7} {:>12} {:>9} {:>9} {:>8}",
        "layer",
        "op (optimized)",
        "input shape",
        "zeros",
        "zero blocks",
        "dense ms",
        "sparse ms",
        "speedup"
    );
    for row in rows(c) {
        let n = row.node;
        let blocks = n
            .chosen_block
            .map_or("-".to_string(), |(b, r)| format!("{:.1}% @{b}", 100.0 * r));
        let dense = row
            .dense
            .map_or("-".to_string(), |d| format!("{:.3}", ms(d)));
        let speedup = row
            .dense
            .map_or("-".to_string(), |d| format!("{:.2}x", ms(d) / ms(n.time)));
        let choice = c
            .tuned
            .iter()
            .find(|t| t.node == n.name)
            .map(|t| t.tuning.choice);
        let op = match choice {
            Some(CudaDispatch::Dense) => format!("{} (dense)", n.op),
            Some(CudaDispatch::TensorCore) => format!("{} (tc)", n.op),
            _ => n.op.clone(),
        };
        println!(
            "{:26} {:18} {:22} {:6.2}% {:>12} {:>9} {:9.3} {:>8}",
            n.name,
            op,
            format!("{:?}", n.input_shape),
            100.0 * n.input_zeros,
            blocks,
            dense,
            ms(n.time),
            speedup
        );
    }
    if !c.tuned.is_empty() {
        let count = |d: CudaDispatch| c.tuned.iter().filter(|t| t.tuning.choice == d).count();
        println!(
            "\n(dense): {} and (tc): {} of {} sparse convs run the dense engine and the tensor-core \
             kernel: on a separate sample input they measured faster than the sparse kernels \
             (optimize::tune_cuda)",
            count(CudaDispatch::Dense),
            count(CudaDispatch::TensorCore),
            c.tuned.len()
        );
    }
    let sum = |p: &Profile| p.nodes.iter().map(|n| n.time).sum::<Duration>();
    println!(
        "\nsum of layers: dense {:.2} ms, optimized {:.2} ms",
        ms(sum(&c.dense)),
        ms(sum(&c.sparse))
    );
    println!(
        "total (one forward, median of {}): dense {:.2} ms, optimized {:.2} ms, speedup {:.2}x",
        a.repeats.max(1),
        ms(c.dense.total),
        ms(c.sparse.total),
        ms(c.dense.total) / ms(c.sparse.total)
    );
    let g = &c.agreement;
    let verdict = if g.exact() {
        "yes, within 1e-4"
    } else if g.acceptable() {
        "closely (spikes at threshold ties flip and propagate)"
    } else {
        "NO"
    };
    println!(
        "outputs agree: {verdict}: largest difference {:.1e} of the largest logit, mean {:.1e}, \
         top-1 class the same for {:.1}% of samples",
        g.max_error,
        g.mean_error,
        100.0 * g.top1
    );
}

fn to_json(a: &BenchArgs, c: &Comparison) -> serde_json::Value {
    let layers: Vec<_> = rows(c)
        .iter()
        .map(|row| {
            let n = row.node;
            json!({
                "layer": n.name, "op": n.op, "config": n.config,
                "input_shape": n.input_shape, "output_shape": n.output_shape,
                "input_sparsity": n.input_zeros,
                "block": n.chosen_block.map(|b| b.0),
                "zero_block_ratio": n.chosen_block.map(|b| b.1),
                "dense_ms": row.dense.map(ms), "sparse_ms": ms(n.time),
                "speedup": row.dense.map(|d| ms(d) / ms(n.time)),
            })
        })
        .collect();
    json!({
        "model": a.model, "device": c.sparse.device_name,
        "dense_conv_engine": dense_conv_label(c.sparse.device),
        "timesteps": a.timesteps, "batch": a.batch, "size": a.size,
        "encoding": match a.encoding { EncodingArg::Poisson => "poisson", EncodingArg::Direct => "direct" },
        "weights": a.weights.as_ref().map(|p| p.display().to_string()),
        "repeats": a.repeats.max(1),
        "replaced": c.report.count(Decision::Replaced),
        "folded": c.report.count(Decision::Folded),
        "dense_ms": ms(c.dense.total), "optimized_ms": ms(c.sparse.total),
        "speedup": ms(c.dense.total) / ms(c.sparse.total),
        "output_max_relative_error": c.agreement.max_error,
        "output_mean_relative_error": c.agreement.mean_error,
        "top1_agreement": c.agreement.top1,
        "outputs_agree": c.agreement.acceptable(),
        "layers": layers,
        "tuned_dense": c.tuned.iter().filter(|t| t.tuning.choice == CudaDispatch::Dense).map(|t| t.node.clone()).collect::<Vec<_>>(),
        "tuned_tensor_core": c.tuned.iter().filter(|t| t.tuning.choice == CudaDispatch::TensorCore).map(|t| t.node.clone()).collect::<Vec<_>>(),
    })
}
