//! `sparseflow bench-layer`: one layer, dense against sparse, on the same synthetic spike input.
use std::time::Instant;

use clap::{Args, ValueEnum};
use serde_json::json;
use sparseflow::ops::conv2d::Conv2d;
use sparseflow::ops::linear::Linear;
use sparseflow::ops::prescan::prescan_cpu;
use sparseflow::ops::sparse_conv2d::{BlockChoice, SparseConv2d};
use sparseflow::ops::sparse_linear::SparseLinear;
use sparseflow::ops::Operator;
use sparseflow::optimize::block_selector::BlockSelector;
use sparseflow::testing::SplitMix64;
use sparseflow::{Device, Error, Result, Tensor};

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum LayerOp {
    Conv3x3,
    Conv1x1,
    Linear,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum Pattern {
    /// Every element fires independently with probability `density`.
    Iid,
    /// Activity in 8×8 patches: a quarter of the patches hold the spikes, as in live networks.
    Clustered,
}

#[derive(Args)]
pub struct BenchLayerArgs {
    #[arg(long, value_enum)]
    op: LayerOp,
    #[arg(long)]
    cin: usize,
    #[arg(long)]
    cout: usize,
    /// Input height and width (ignored for linear)
    #[arg(long, default_value_t = 56)]
    hw: usize,
    #[arg(long, default_value_t = 1)]
    stride: usize,
    /// Images (or rows for linear); T·N folded
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Fraction of non-zero input elements
    #[arg(long)]
    density: f64,
    #[arg(long, value_enum, default_value = "iid")]
    pattern: Pattern,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// Timed repetitions (after one warm-up); the median is reported
    #[arg(long, default_value_t = 7)]
    repeats: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of text
    #[arg(long)]
    json: bool,
}

fn spikes(shape: &[usize], density: f64, pattern: Pattern, rng: &mut SplitMix64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = match (pattern, shape) {
        (Pattern::Clustered, [.., h, w]) => {
            let (h, w) = (*h, *w);
            let patches_w = w.div_ceil(8);
            let patch_p = (4.0 * density).min(1.0);
            let inner = if patch_p > 0.0 {
                density / patch_p
            } else {
                0.0
            };
            let mut data = vec![0.0f32; n];
            for (plane_index, plane) in data.chunks_mut(h * w).enumerate() {
                let patches: Vec<bool> = (0..h.div_ceil(8) * patches_w)
                    .map(|_| (rng.next_f32() as f64) < patch_p)
                    .collect();
                let _ = plane_index;
                for (i, v) in plane.iter_mut().enumerate() {
                    let (y, x) = (i / w, i % w);
                    let on =
                        patches[(y / 8) * patches_w + x / 8] && (rng.next_f32() as f64) < inner;
                    *v = on as u8 as f32;
                }
            }
            data
        }
        _ => (0..n)
            .map(|_| ((rng.next_f32() as f64) < density) as u8 as f32)
            .collect(),
    };
    Tensor::new(shape.to_vec(), data)
}

fn random_tensor(shape: Vec<usize>, scale: f32, rng: &mut SplitMix64) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::new(
        shape,
        (0..n)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
            .collect(),
    )
}

/// Median wall time in ms of `repeats` runs after one warm-up.
fn time_ms(repeats: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<(f64, Tensor)> {
    let out = f()?;
    let mut times: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f().map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], out))
}

pub fn bench_layer(a: &BenchLayerArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&a.density) {
        return Err(Error::InvalidArgument("--density must be in [0, 1]".into()));
    }
    let selection = Device::from_name(&a.device)?;
    if let Device::Cuda(_) = selection.device {
        if a.device != "auto" {
            return Err(Error::InvalidArgument(
                "bench-layer on CUDA arrives with the GPU sparse kernels; use --device cpu".into(),
            ));
        }
    }
    let mut rng = SplitMix64::new(a.seed);
    let (dense, sparse, input, block): (
        Box<dyn Operator>,
        Box<dyn Operator>,
        Tensor,
        Option<usize>,
    ) = match a.op {
        LayerOp::Linear => {
            let weight = random_tensor(vec![a.cout, a.cin], 0.1, &mut rng)?;
            let bias = random_tensor(vec![a.cout], 0.1, &mut rng)?;
            let linear = Linear::new(weight, Some(bias))?;
            let x = spikes(&[a.batch, a.cin], a.density, Pattern::Iid, &mut rng)?;
            (
                Box::new(linear.clone()),
                Box::new(SparseLinear::from_dense(&linear)),
                x,
                None,
            )
        }
        LayerOp::Conv3x3 | LayerOp::Conv1x1 => {
            let k = if a.op == LayerOp::Conv3x3 { 3 } else { 1 };
            let weight = random_tensor(vec![a.cout, a.cin, k, k], 0.1, &mut rng)?;
            let bias = random_tensor(vec![a.cout], 0.1, &mut rng)?;
            let conv = Conv2d::new(
                weight,
                Some(bias),
                (a.stride, a.stride),
                (k / 2, k / 2),
                (1, 1),
                1,
            )?;
            let block = BlockSelector::default().select(a.hw);
            let x = spikes(
                &[a.batch, a.cin, a.hw, a.hw],
                a.density,
                a.pattern,
                &mut rng,
            )?;
            let sparse = SparseConv2d::from_dense(&conv, BlockChoice::Fixed(block));
            (Box::new(conv), Box::new(sparse), x, block)
        }
    };
    let zero_blocks = match (a.op, block) {
        (LayerOp::Linear, _) | (_, None) => None,
        (_, Some(b)) => Some(prescan_cpu(&input, b)?.zero_tile_ratio()),
    };
    let (dense_ms, want) = time_ms(a.repeats, || dense.forward(&[&input]))?;
    let (sparse_ms, got) = time_ms(a.repeats, || sparse.forward(&[&input]))?;
    let scale = want
        .data()
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let max_err = got
        .data()
        .iter()
        .zip(want.data())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale;
    let agree = got.shape() == want.shape() && max_err <= 1e-5;
    let sparsity = input.zero_fraction();
    let speedup = dense_ms / sparse_ms;
    let op = match a.op {
        LayerOp::Conv3x3 => "conv3x3",
        LayerOp::Conv1x1 => "conv1x1",
        LayerOp::Linear => "linear",
    };
    if a.json {
        println!(
            "{}",
            json!({
                "op": op, "cin": a.cin, "cout": a.cout, "hw": a.hw, "stride": a.stride,
                "batch": a.batch, "density": a.density, "device": "cpu",
                "threads": rayon::current_num_threads(),
                "element_sparsity": sparsity, "zero_block_ratio": zero_blocks, "block": block,
                "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": speedup,
                "max_rel_error": max_err, "agree": agree,
            })
        );
    } else {
        println!(
            "{op} {}->{} {}x{} stride {} batch {} on cpu ({} threads)",
            a.cin,
            a.cout,
            a.hw,
            a.hw,
            a.stride,
            a.batch,
            rayon::current_num_threads()
        );
        let blocks = zero_blocks.map_or("-".to_string(), |z| {
            format!("{:.1}% (block {})", 100.0 * z, block.unwrap())
        });
        println!(
            "input: {:.2}% zeros, zero blocks {blocks}",
            100.0 * sparsity
        );
        println!("dense  {dense_ms:9.3} ms   (im2col + GEMM)");
        println!("sparse {sparse_ms:9.3} ms   (every stage)");
        println!(
            "speedup {speedup:.2}x, outputs agree: {agree} (max error {max_err:.1e} of max |out|)"
        );
    }
    if !agree {
        return Err(Error::InvalidArgument(format!(
            "sparse and dense outputs disagree (max error {max_err:.2e})"
        )));
    }
    Ok(())
}
