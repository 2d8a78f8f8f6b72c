//! `sparseflow bench`, the main job: a zoo network, dense against optimized, on synthetic
//! Poisson-encoded images, with a per-layer table.
use std::collections::BTreeMap;
use std::time::Duration;

use clap::Args;
use sparseflow::encode::Encoding;
use sparseflow::graph::Graph;
use sparseflow::model::{self, init, ModelConfig};
use sparseflow::optimize::{optimize, Decision, OptimizeOptions};
use sparseflow::testing::SplitMix64;
use sparseflow::{Device, Error, Result, Tensor};

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "spiking_resnet18")]
    model: String,
    #[arg(long, default_value_t = 4)]
    timesteps: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Image height and width
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// auto, cpu, cuda or cuda:N (whole networks run on the CPU for now)
    #[arg(long, default_value = "auto")]
    device: String,
    /// Timed forwards of each model after a warm-up; the median is reported
    #[arg(long, default_value_t = 3)]
    repeats: usize,
}

/// Per-node times (name → (op, input zeros, time)) of the median run, and the output.
type Timed = (BTreeMap<String, (String, f64, Duration)>, Duration, Tensor);

fn timed_runs(graph: &Graph, x: &Tensor, repeats: usize) -> Result<Timed> {
    let mut runs = Vec::new();
    for run in 0..=repeats.max(1) {
        let mut nodes = BTreeMap::new();
        let start = std::time::Instant::now();
        let out = graph.forward_observed(x, &mut |r| {
            let zeros = r.inputs.first().map_or(0.0, |t| t.zero_fraction());
            nodes.insert(
                r.node.name.clone(),
                (r.node.op.type_name().to_string(), zeros, r.elapsed),
            );
            Ok(())
        })?;
        if run > 0 {
            runs.push((nodes, start.elapsed(), out));
        }
    }
    runs.sort_by_key(|r| r.1);
    Ok(runs.swap_remove(runs.len() / 2))
}

pub fn bench(a: &BenchArgs) -> Result<()> {
    let selection = Device::from_name(&a.device)?;
    println!("device: {} ({})", selection.device, selection.reason);
    if let Device::Cuda(_) = selection.device {
        println!("note: whole networks run on the CPU until the GPU engine lands; `bench-layer --device cuda` times single layers on the GPU");
    }
    let config = ModelConfig::default();
    let mut rng = SplitMix64::new(7);
    let n = a.batch * 3 * a.size * a.size;
    let image = Tensor::new(
        vec![a.batch, 3, a.size, a.size],
        (0..n).map(|_| rng.next_f32()).collect(),
    )?;
    let x = Encoding::Poisson { seed: 11 }.encode(&image, a.timesteps)?;
    let build = || -> Result<Graph> {
        let mut g = model::build(&a.model, &config)?;
        init::init_seeded(&mut g, 1)?;
        init::calibrate_batchnorm(&mut g, &x)?;
        Ok(g)
    };
    let dense = build()?;
    let mut sparse = build()?;
    let options = OptimizeOptions {
        input_hw: Some((a.size, a.size)),
        ..OptimizeOptions::default()
    };
    let report = optimize(&mut sparse, &options)?;
    println!(
        "{}: T={} N={} {}x{} Poisson input, seeded weights, BatchNorm calibrated; optimize: {} replaced, {} folded",
        a.model, a.timesteps, a.batch, a.size, a.size,
        report.count(Decision::Replaced), report.count(Decision::Folded)
    );
    let (dense_nodes, dense_total, want) = timed_runs(&dense, &x, a.repeats)?;
    let (sparse_nodes, sparse_total, got) = timed_runs(&sparse, &x, a.repeats)?;
    let err = got.relative_error(&want)?;

    println!(
        "\n{:24} {:14} {:>8} {:>10} {:>10} {:>8}",
        "layer", "op (optimized)", "zeros", "dense ms", "sparse ms", "speedup"
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    for (name, (op, zeros, t)) in &sparse_nodes {
        if op != "SparseConv2d" && op != "SparseLinear" {
            continue;
        }
        // The dense twin is the conv plus the BatchNorm folded into it.
        let bn = report
            .entries
            .iter()
            .find(|e| e.decision == Decision::Folded && e.reason.contains(&format!("`{name}`")));
        let dense_t = dense_nodes.get(name).map(|d| d.2).unwrap_or_default()
            + bn.and_then(|e| dense_nodes.get(&e.node))
                .map(|d| d.2)
                .unwrap_or_default();
        println!(
            "{name:24} {op:14} {:7.2}% {:10.3} {:10.3} {:7.2}x",
            100.0 * zeros,
            ms(dense_t),
            ms(*t),
            ms(dense_t) / ms(*t)
        );
    }
    println!(
        "\ntotal: dense {:.1} ms, optimized {:.1} ms, speedup {:.2}x (median of {}, CPU, {} threads); outputs agree: {} (max error {err:.1e})",
        ms(dense_total), ms(sparse_total), ms(dense_total) / ms(sparse_total), a.repeats.max(1),
        rayon::current_num_threads(), err <= 1e-4
    );
    if err > 1e-4 {
        return Err(Error::InvalidArgument(format!(
            "optimized output differs by {err:.2e}"
        )));
    }
    Ok(())
}
