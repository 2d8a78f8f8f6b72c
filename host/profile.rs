//! The profiler: per-node latency and sparsity of any graph (dense or optimized) on the CPU or a
//! GPU, and the whole forward's latency.
//!
//! One [`profile`] call runs the graph `1 + 2·repeats` times on the same input:
//! 1. a statistics pass (also the warm-up): every node's input and output are inspected on the
//!    host for element sparsity and for the ratio of all-zero `block × block` tiles;
//! 2. `repeats` plain forwards, timed as a whole (CUDA events on the GPU) — the total latency;
//! 3. `repeats` observed forwards, timed node by node — the per-node latency (on the GPU the
//!    host waits after each node, so these add up to a little more than the total).
//!
//! Times are medians over the repeats.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::cuda::{CudaBackend, DeviceTensor, GpuTimer};
use crate::device::Device;
use crate::error::Result;
use crate::graph::Graph;
use crate::ops::prescan::prescan_cpu;
use crate::ops::sparse_conv2d::SparseConv2d;
use crate::tensor::Tensor;

/// What to measure.
#[derive(Clone, Debug)]
pub struct ProfileOptions {
    /// Timed forwards per measurement (the median is kept); 0 runs the statistics pass only
    /// (its observed times are then the ones reported).
    pub repeats: usize,
    /// Tile sizes at which the zero-block ratio of every node's input is measured.
    pub blocks: Vec<usize>,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        Self {
            repeats: 3,
            blocks: vec![8, 16],
        }
    }
}

/// One node's measurements.
#[derive(Clone, Debug)]
pub struct NodeProfile {
    pub name: String,
    /// Operator type, e.g. `"SparseConv2d"`.
    pub op: String,
    /// The operator's configuration, e.g. `"3x3 s1 p1 64->64"`.
    pub config: String,
    pub input_shape: Vec<usize>,
    pub output_shape: Vec<usize>,
    /// Fraction of zeros in the first input.
    pub input_zeros: f64,
    pub output_zeros: f64,
    /// `(block, fraction of all-zero tiles)` of the first input, for 4-D and 5-D inputs.
    pub input_zero_blocks: Vec<(usize, f64)>,
    /// For a sparse convolution: the tile size it runs with at this input, and that tile size's
    /// zero-block ratio.
    pub chosen_block: Option<(usize, f64)>,
    /// Median time of the node.
    pub time: Duration,
}

/// A graph's profile on one device.
#[derive(Clone, Debug)]
pub struct Profile {
    pub device: Device,
    /// `"CPU (N threads)"` or the GPU's name.
    pub device_name: String,
    /// In execution order.
    pub nodes: Vec<NodeProfile>,
    /// Median time of a whole forward, unobserved.
    pub total: Duration,
    /// The graph's output (from the statistics pass).
    pub output: Tensor,
}

impl Profile {
    pub fn node(&self, name: &str) -> Option<&NodeProfile> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// Profiles `graph` on `input` (a host tensor; on a GPU it is uploaded once, outside the timed
/// region). `progress` is called after every forward.
pub fn profile(
    graph: &Graph,
    input: &Tensor,
    device: Device,
    options: &ProfileOptions,
    progress: &mut dyn FnMut(),
) -> Result<Profile> {
    let repeats = options.repeats;
    match device {
        Device::Cpu => {
            let (nodes, output) = statistics_pass(options, |observe| {
                graph.forward_observed(input, &mut |run| {
                    observe(run.node, run.inputs, run.output, run.elapsed)
                })
            })?;
            progress();
            let (totals, per_node) = timed_passes(
                repeats,
                progress,
                || {
                    let start = Instant::now();
                    graph.forward(input)?;
                    Ok(start.elapsed())
                },
                |record| {
                    graph.forward_observed(input, &mut |run| {
                        record(&run.node.name, run.elapsed);
                        Ok(())
                    })?;
                    Ok(())
                },
            )?;
            let name = format!("CPU ({} threads)", rayon::current_num_threads());
            Ok(finish(device, name, nodes, per_node, totals, output))
        }
        Device::Cuda(ordinal) => {
            let backend = CudaBackend::get(ordinal)?;
            let x = DeviceTensor::upload(&backend, input)?;
            let (nodes, output) = statistics_pass(options, |observe| {
                let out = graph.forward_cuda_observed(&x, &mut |run| {
                    let inputs = run
                        .inputs
                        .iter()
                        .map(|t| t.download())
                        .collect::<Result<Vec<_>>>()?;
                    observe(
                        run.node,
                        &inputs.iter().collect::<Vec<_>>(),
                        &run.output.download()?,
                        run.elapsed,
                    )
                })?;
                out.download()
            })?;
            progress();
            let timer = GpuTimer::new(&backend)?;
            let (totals, per_node) = timed_passes(
                repeats,
                progress,
                || {
                    let (_, ms) = timer.time(|| graph.forward_cuda(&x))?;
                    Ok(Duration::from_secs_f64(ms / 1e3))
                },
                |record| {
                    graph.forward_cuda_observed(&x, &mut |run| {
                        record(&run.node.name, run.elapsed);
                        Ok(())
                    })?;
                    Ok(())
                },
            )?;
            let name = backend.name().to_string();
            Ok(finish(device, name, nodes, per_node, totals, output))
        }
    }
}

type NodeTimes = BTreeMap<String, Vec<Duration>>;

/// `repeats` whole forwards timed by `total`, then `repeats` observed forwards whose per-node
/// times `observed` hands to its recorder.
fn timed_passes(
    repeats: usize,
    progress: &mut dyn FnMut(),
    mut total: impl FnMut() -> Result<Duration>,
    mut observed: impl FnMut(&mut dyn FnMut(&str, Duration)) -> Result<()>,
) -> Result<(Vec<Duration>, NodeTimes)> {
    let mut totals = Vec::new();
    for _ in 0..repeats {
        totals.push(total()?);
        progress();
    }
    let mut per_node = NodeTimes::new();
    for _ in 0..repeats {
        observed(&mut |name, elapsed| per_node.entry(name.to_string()).or_default().push(elapsed))?;
        progress();
    }
    Ok((totals, per_node))
}

type Observe<'a> = dyn FnMut(&crate::graph::Node, &[&Tensor], &Tensor, Duration) -> Result<()> + 'a;

/// Runs `forward` with an observer that records each node's statistics.
fn statistics_pass(
    options: &ProfileOptions,
    forward: impl FnOnce(&mut Observe) -> Result<Tensor>,
) -> Result<(Vec<NodeProfile>, Tensor)> {
    let mut nodes = Vec::new();
    let output = forward(&mut |node, inputs, output, elapsed| {
        let first = inputs.first().copied();
        let zero_blocks = |block: usize| -> Result<Option<f64>> {
            match first {
                Some(x) if (4..=5).contains(&x.shape().len()) => {
                    Ok(Some(prescan_cpu(x, block)?.zero_tile_ratio()))
                }
                _ => Ok(None),
            }
        };
        let mut input_zero_blocks = Vec::new();
        for &block in &options.blocks {
            if let Some(r) = zero_blocks(block)? {
                input_zero_blocks.push((block, r));
            }
        }
        let chosen_block = match node.op.as_any().downcast_ref::<SparseConv2d>() {
            Some(conv) => {
                let h = first.map_or(0, |x| x.shape()[x.shape().len() - 2]);
                let block = conv.gpu_tile(h);
                zero_blocks(block)?.map(|r| (block, r))
            }
            None => None,
        };
        nodes.push(NodeProfile {
            name: node.name.clone(),
            op: node.op.type_name().to_string(),
            config: node.op.describe(),
            input_shape: first.map_or(Vec::new(), |x| x.shape().to_vec()),
            output_shape: output.shape().to_vec(),
            input_zeros: first.map_or(0.0, |x| x.zero_fraction()),
            output_zeros: output.zero_fraction(),
            input_zero_blocks,
            chosen_block,
            time: elapsed,
        });
        Ok(())
    })?;
    Ok((nodes, output))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn finish(
    device: Device,
    device_name: String,
    mut nodes: Vec<NodeProfile>,
    mut per_node: NodeTimes,
    totals: Vec<Duration>,
    output: Tensor,
) -> Profile {
    let totals = if totals.is_empty() {
        vec![nodes.iter().map(|n| n.time).sum()]
    } else {
        totals
    };
    for node in nodes.iter_mut() {
        if let Some(times) = per_node.remove(&node.name) {
            node.time = median(times);
        }
    }
    Profile {
        device,
        device_name,
        nodes,
        total: median(totals),
        output,
    }
}
