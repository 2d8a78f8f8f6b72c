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
    pub op: LayerOp,
    #[arg(long)]
    pub cin: usize,
    #[arg(long)]
    pub cout: usize,
    /// Input height and width (ignored for linear)
    #[arg(long, default_value_t = 56)]
    pub hw: usize,
    #[arg(long, default_value_t = 1)]
    pub stride: usize,
    /// Images (or rows for linear); T·N folded
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Fraction of non-zero input elements
    #[arg(long)]
    pub density: f64,
    #[arg(long, value_enum, default_value = "iid")]
    pattern: Pattern,
    /// auto, cpu, cuda or cuda:N
    #[arg(long, default_value = "auto")]
    device: String,
    /// Timed repetitions (after one warm-up); the median is reported
    #[arg(long, default_value_t = 7)]
    pub repeats: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Prescan / tile block size (default: the block selector's choice for --hw)
    #[arg(long)]
    block: Option<usize>,
    /// Override the sparse op's dense-fallback density (e.g. 1 to time the sparse kernel alone)
    #[arg(long)]
    dense_above: Option<f64>,
    /// Print one JSON object instead of text
    #[arg(long)]
    pub json: bool,
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
                Box::new({
                    let mut sparse = SparseLinear::from_dense(&linear);
                    if let Some(d) = a.dense_above {
                        sparse.dense_above_density = d;
                    }
                    sparse
                }),
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
            let block = a.block.or(BlockSelector::default().select(a.hw));
            let x = spikes(
                &[a.batch, a.cin, a.hw, a.hw],
                a.density,
                a.pattern,
                &mut rng,
            )?;
            let mut sparse = SparseConv2d::from_dense(&conv, BlockChoice::Fixed(block));
            if let Some(d) = a.dense_above {
                sparse.dense_above_density = d;
            }
            (Box::new(conv), Box::new(sparse), x, block)
        }
    };
    let zero_blocks = match (a.op, block) {
        (LayerOp::Linear, _) | (_, None) => None,
        (_, Some(b)) => Some(prescan_cpu(&input, b)?.zero_tile_ratio()),
    };
    if let Device::Cuda(ordinal) = selection.device {
        return cuda::bench(
            a,
            ordinal,
            dense.as_ref(),
            sparse.as_ref(),
            &input,
            zero_blocks,
            block,
        );
    }
    let (dense_ms, want) = time_ms(a.repeats, || dense.forward(&[&input]))?;
    let (sparse_ms, got) = time_ms(a.repeats, || sparse.forward(&[&input]))?;
    let max_err = got.relative_error(&want)?;
    let agree = max_err <= 1e-5;
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

/// The CUDA side: the sparse operator (every stage) against cuDNN fp32 and TF32, timed with CUDA
/// events in the same process on the same input.
mod cuda {
    use cudarc::driver::sys::CUevent_flags;
    use serde_json::json;
    use sparseflow::cuda::{CudaBackend, DeviceTensor};
    use sparseflow::ops::conv2d::Conv2d;
    use sparseflow::ops::sparse_conv2d::SparseConv2d;
    use sparseflow::ops::sparse_linear::SparseLinear;
    use sparseflow::ops::Operator;
    use sparseflow::{Error, Result, Tensor};

    use super::BenchLayerArgs;
    use sparseflow::cudnn::{self as cudnn_baseline, CudnnConv, Precision};

    /// Median milliseconds of `repeats` runs of `f` between two events, after three warm-ups.
    fn time_events(
        backend: &CudaBackend,
        repeats: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        let stream = backend.stream();
        let ctx = stream.context();
        let (start, end) = (
            ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?,
            ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?,
        );
        for _ in 0..3 {
            f()?;
        }
        let mut times = Vec::new();
        for _ in 0..repeats.max(1) {
            start.record(stream)?;
            f()?;
            end.record(stream)?;
            end.synchronize()?;
            times.push(start.elapsed_ms(&end)? as f64);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    /// Device-to-device copy bandwidth (bytes read + written per second), the ceiling for an op
    /// that must write its output.
    fn copy_bandwidth(backend: &CudaBackend) -> Result<f64> {
        let n = 256 << 20; // 1 GiB of f32
        let stream = backend.stream();
        let src = stream.alloc_zeros::<f32>(n)?;
        let mut dst = stream.alloc_zeros::<f32>(n)?;
        let ms = time_events(backend, 5, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
        Ok(2.0 * 4.0 * n as f64 / (ms * 1e-3))
    }

    pub fn bench(
        a: &BenchLayerArgs,
        ordinal: usize,
        dense: &dyn Operator,
        sparse: &dyn Operator,
        input: &Tensor,
        zero_blocks: Option<f64>,
        block: Option<usize>,
    ) -> Result<()> {
        let backend = CudaBackend::get(ordinal)?;
        let dx = DeviceTensor::upload(&backend, input)?;
        let sparsity = input.zero_fraction();
        if let Some(linear) = sparse.as_any().downcast_ref::<SparseLinear>() {
            let want = dense.forward(&[input])?;
            let ms = time_events(&backend, a.repeats, || linear.forward_cuda(&dx).map(|_| ()))?;
            let err = linear
                .forward_cuda(&dx)?
                .download()?
                .relative_error(&want)?;
            println!(
                "linear {}->{} rows {} on {}: {:.2}% zeros, sparse {ms:.4} ms, max error {err:.1e}",
                a.cin,
                a.cout,
                a.batch,
                backend.name(),
                100.0 * sparsity
            );
            return if err <= 1e-5 {
                Ok(())
            } else {
                Err(Error::InvalidArgument(format!(
                    "GPU output differs by {err:.2e}"
                )))
            };
        }
        let sparse = sparse
            .as_any()
            .downcast_ref::<SparseConv2d>()
            .expect("conv bench");
        let conv: &Conv2d = &sparse.conv;
        let out_shape = conv.output_shape(input.shape())?;
        let mut out = DeviceTensor::uninit(&backend, out_shape.clone())?;
        out.fill(f32::NAN)?;
        let sparse_ms = time_events(&backend, a.repeats, || {
            sparse.forward_cuda_into(&dx, &mut out)
        })?;
        let got = out.download()?;
        // The element gather, where the column sweep took this layer (for comparison).
        let gather_ms = if sparse.sweep_applies(&dx) {
            out.fill(f32::NAN)?;
            let ms = time_events(&backend, a.repeats, || {
                sparse.forward_cuda_gather_into(&dx, &mut out)
            })?;
            let err = out.download()?.relative_error(&got)?;
            Some((ms, err))
        } else {
            None
        };
        // The tensor-core path (dense product of the spikes at fp32 accuracy), for comparison.
        out.fill(f32::NAN)?;
        let tensor_ms = time_events(&backend, a.repeats, || {
            sparse.forward_cuda_tensor_into(&dx, &mut out)
        })?;
        let tensor_got = out.download()?;
        let (n, h, w) = (input.shape()[0], input.shape()[2], input.shape()[3]);
        let baseline = |p: Precision| -> Result<Option<(f64, Tensor)>> {
            if !cudnn_baseline::available() {
                return Ok(None);
            }
            let mut c = CudnnConv::new(&backend, conv, n, h, w, p)?;
            let weights = DeviceTensor::upload(&backend, &conv.weight)?;
            let mut y = DeviceTensor::uninit(&backend, out_shape.clone())?;
            let ms = time_events(&backend, a.repeats, || {
                c.run(dx.slice(), weights.slice(), y.slice_mut())
            })?;
            // cuDNN's convolution has no bias: add it on the host for the comparison.
            let mut t = y.download()?;
            let plane = out_shape[2] * out_shape[3];
            if let Some(b) = &conv.bias {
                for (i, v) in t.data_mut().iter_mut().enumerate() {
                    *v += b.data()[(i / plane) % out_shape[1]];
                }
            }
            Ok(Some((ms, t)))
        };
        let fp32 = baseline(Precision::Fp32)?;
        let tf32 = baseline(Precision::Tf32)?;
        let reference = match &fp32 {
            Some((_, t)) => t.clone(),
            None => dense.forward(&[input])?,
        };
        let err = got.relative_error(&reference)?;
        let tensor_err = tensor_got.relative_error(&reference)?;
        let agree = err <= 1e-5
            && tensor_err <= 1e-5
            && got
                .data()
                .iter()
                .chain(tensor_got.data())
                .all(|v| v.is_finite());
        let copy = copy_bandwidth(&backend)?;
        let written = 4.0 * out_shape.iter().product::<usize>() as f64;
        let write_bw = written / (sparse_ms * 1e-3);
        let ratio = |b: &Option<(f64, Tensor)>| b.as_ref().map(|(ms, _)| ms / sparse_ms);
        let ms_of = |b: &Option<(f64, Tensor)>| b.as_ref().map(|(ms, _)| *ms);
        if a.json {
            println!(
                "{}",
                json!({
                    "op": format!("conv{}x{}", conv.kernel_size().0, conv.kernel_size().1), "cin": a.cin, "cout": a.cout,
                    "hw": a.hw, "stride": a.stride, "batch": a.batch, "density": a.density, "device": backend.name(),
                    "element_sparsity": sparsity, "zero_block_ratio": zero_blocks, "block": block,
                    "sparse_ms": sparse_ms, "cudnn_fp32_ms": ms_of(&fp32), "cudnn_tf32_ms": ms_of(&tf32),
                    "speedup_vs_fp32": ratio(&fp32), "speedup_vs_tf32": ratio(&tf32),
                    "tensor_core_ms": tensor_ms, "tensor_core_max_rel_error": tensor_err,
                    "tensor_core_speedup_vs_fp32": ms_of(&fp32).map(|ms| ms / tensor_ms),
                    "tensor_core_speedup_vs_tf32": ms_of(&tf32).map(|ms| ms / tensor_ms),
                    "gather_ms": gather_ms.map(|g| g.0), "gather_rel_diff": gather_ms.map(|g| g.1),
                    "output_write_tb_s": write_bw / 1e12, "copy_tb_s": copy / 1e12,
                    "write_fraction_of_copy_bw": write_bw / copy, "max_rel_error": err, "agree": agree,
                })
            );
        } else {
            println!(
                "{} {}->{} {}x{} stride {} batch {} on {}",
                conv.describe(),
                a.cin,
                a.cout,
                a.hw,
                a.hw,
                a.stride,
                a.batch,
                backend.name()
            );
            let blocks = zero_blocks.map_or("-".to_string(), |z| format!("{:.1}%", 100.0 * z));
            println!(
                "input: {:.2}% zeros, zero blocks {blocks} (block {:?})",
                100.0 * sparsity,
                block
            );
            println!("sparse       {sparse_ms:8.4} ms (pack + compute), output written at {:.2} TB/s = {:.0}% of the {:.2} TB/s copy bandwidth", write_bw / 1e12, 100.0 * write_bw / copy, copy / 1e12);
            if let Some((ms, diff)) = gather_ms {
                println!("(the sparse path is the column sweep; the element gather takes {ms:.4} ms, outputs within {diff:.1e})");
            }
            for (name, b) in [("cuDNN fp32", &fp32), ("cuDNN tf32", &tf32)] {
                match b {
                    Some((ms, _)) => println!(
                        "{name}   {ms:8.4} ms -> sparse is {:.2}x faster",
                        ms / sparse_ms
                    ),
                    None => println!("{name}   unavailable (libcudnn not found)"),
                }
            }
            let versus = |b: &Option<(f64, Tensor)>| {
                b.as_ref()
                    .map_or("-".into(), |(ms, _)| format!("{:.2}x", ms / tensor_ms))
            };
            println!(
                "tensor cores {tensor_ms:8.4} ms (dense product of the spikes, fp32 accuracy): {} vs cuDNN fp32, {} vs tf32",
                versus(&fp32),
                versus(&tf32)
            );
            println!("outputs agree: {agree} (max error {err:.1e} sparse, {tensor_err:.1e} tensor cores, of max |out|)");
        }
        if !agree {
            return Err(Error::InvalidArgument(format!(
                "GPU output differs from the reference by {err:.2e}"
            )));
        }
        Ok(())
    }
}
