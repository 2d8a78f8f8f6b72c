//! `optimize`: turns a spiking network into its sparse-accelerated twin, and says what it did.
//!
//! The passes, in order:
//! 1. **BatchNorm folding**: a `BatchNorm2d` whose input is a convolution read by nothing else is
//!    folded into that convolution's weights and bias (inference only).
//! 2. **Analysis** ([`analyzer`]): every value gets a kind — binary spikes, non-negative integers,
//!    or dense — from the [`registry`] of spiking operators and each operator's propagation rule.
//! 3. **Replacement**: every `Conv2d` / `Linear` whose input is binary or integer-valued becomes
//!    a [`SparseConv2d`] / [`SparseLinear`] with the same weights; the [`block_selector`] picks
//!    each sparse conv's prescan block size.
//! 4. **Neuron fusion**: a built-in neuron that alone reads a residual `Add` becomes one
//!    [`AddNeuron`] node, and one whose spikes only a `MaxPool2d` reads becomes one
//!    [`NeuronMaxPool`] node, and a SEW connect with its branch's last neuron becomes one
//!    [`NeuronConnect`] node (all keep the neuron's name, so its parameters keep theirs); the
//!    add, the max-pool or the connect is reported as folded into it.
//! 5. On CUDA, optionally, **measurement** ([`tune_cuda`]): on a sample input each sparse conv times
//!    its sparse kernels against the dense engine and keeps the faster (the CPU path makes the
//!    same choice per input from its density, `SparseConv2d::dense_above_density`).
//!
//! ```
//! use sparseflow::model::{self, ModelConfig};
//! use sparseflow::optimize::{optimize, Decision, OptimizeOptions};
//!
//! let mut net = model::build("spiking_resnet18", &ModelConfig::default())?;
//! let report = optimize(&mut net, &OptimizeOptions::default())?;
//! println!("{report}");
//! assert_eq!(report.count(Decision::Replaced), 19); // every conv but the stem
//! # Ok::<(), sparseflow::Error>(())
//! ```
use std::collections::BTreeMap;
use std::fmt;

use crate::cuda::DeviceTensor;
use crate::device::Device;
use crate::error::Result;
use crate::graph::{Graph, Input, NodeId};
use crate::ops::add_neuron::AddNeuron;
use crate::ops::batch_norm::BatchNorm2d;
use crate::ops::connect::Add;
use crate::ops::connect::{ConnectFunction, SewConnect};
use crate::ops::conv2d::Conv2d;
use crate::ops::conv_neuron_pool::ConvNeuronPool;
use crate::ops::linear::Linear;
use crate::ops::neuron_connect::NeuronConnect;
use crate::ops::neuron_pool::NeuronMaxPool;
use crate::ops::pool::MaxPool2d;
use crate::ops::sparse_conv2d::{BlockChoice, CudaKernel, CudaTuning, SparseConv2d};
use crate::ops::sparse_linear::SparseLinear;
use crate::ops::ValueKind;
use crate::tensor::Tensor;

pub mod analyzer;
pub mod block_selector;
pub mod registry;

use analyzer::ValueKinds;
use block_selector::{BlockSelector, BlockSize};
pub use registry::SpikeRegistry;

/// What `optimize` may do.
#[derive(Clone, Debug)]
pub struct OptimizeOptions {
    /// Which operators emit spikes.
    pub registry: SpikeRegistry,
    /// The kind of the graph's input (dense images by default; binary for pre-encoded spikes).
    pub input_kind: ValueKind,
    pub replace_conv: bool,
    pub replace_linear: bool,
    pub fold_batchnorm: bool,
    /// Fuse add + neuron pairs and neuron + max-pool pairs.
    pub fuse_neurons: bool,
    /// The device the sparse operators are meant for: on CUDA, convolutions whose geometry has no
    /// GPU kernel variant are kept dense (and the report says so).
    pub device: Device,
    pub block_selector: BlockSelector,
    /// Per-node block sizes (by node name) that override the selector.
    pub block_overrides: BTreeMap<String, BlockSize>,
    /// The input's (H, W), when known: block sizes are then fixed now; otherwise each sparse
    /// conv selects its block from its input at run time.
    pub input_hw: Option<(usize, usize)>,
}

impl Default for OptimizeOptions {
    fn default() -> Self {
        Self {
            registry: SpikeRegistry::default(),
            input_kind: ValueKind::Dense,
            replace_conv: true,
            replace_linear: true,
            fold_batchnorm: true,
            fuse_neurons: true,
            device: Device::Cpu,
            block_selector: BlockSelector::default(),
            block_overrides: BTreeMap::new(),
            input_hw: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Replaced,
    Folded,
    Kept,
}

/// One Conv2d, Linear or BatchNorm2d and what became of it.
#[derive(Clone, Debug)]
pub struct ReportEntry {
    pub node: String,
    pub op: &'static str,
    pub decision: Decision,
    /// The prescan block of a replaced conv (`auto`, `16`, `8`, `none`).
    pub block: Option<String>,
    pub reason: String,
}

#[derive(Clone, Debug, Default)]
pub struct OptimizeReport {
    pub entries: Vec<ReportEntry>,
    /// Remarks about the whole graph (e.g. that it holds no spiking operator).
    pub notes: Vec<String>,
}

impl OptimizeReport {
    pub fn count(&self, decision: Decision) -> usize {
        self.entries
            .iter()
            .filter(|e| e.decision == decision)
            .count()
    }

    pub fn entry(&self, node: &str) -> Option<&ReportEntry> {
        self.entries.iter().find(|e| e.node == node)
    }
}

impl fmt::Display for OptimizeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .entries
            .iter()
            .map(|e| e.node.len())
            .max()
            .unwrap_or(4)
            .max(4);
        writeln!(
            f,
            "{:width$}  {:12}  {:9}  {:5}  reason",
            "node", "op", "decision", "block"
        )?;
        for e in &self.entries {
            let decision = match e.decision {
                Decision::Replaced => "replaced",
                Decision::Folded => "folded",
                Decision::Kept => "kept",
            };
            writeln!(
                f,
                "{:width$}  {:12}  {:9}  {:5}  {}",
                e.node,
                e.op,
                decision,
                e.block.as_deref().unwrap_or("-"),
                e.reason
            )?;
        }
        writeln!(
            f,
            "{} replaced, {} folded, {} kept",
            self.count(Decision::Replaced),
            self.count(Decision::Folded),
            self.count(Decision::Kept)
        )?;
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

/// Rewrites `graph` in place (see the module docs) and reports every decision.
pub fn optimize(graph: &mut Graph, options: &OptimizeOptions) -> Result<OptimizeReport> {
    let mut entries: BTreeMap<NodeId, ReportEntry> = BTreeMap::new();
    fold_batchnorms(graph, options, &mut entries)?;
    let kinds = analyzer::analyze(graph, &options.registry, options.input_kind)?;
    let heights = match options.input_hw {
        Some(hw) => Some(conv_input_heights(graph, hw)?),
        None => None,
    };
    let mut notes = Vec::new();
    if !graph
        .nodes()
        .any(|(_, n)| options.registry.is_spiking(n.op.as_ref()))
    {
        notes.push(format!(
            "the graph has no spiking operator (registered: {}), so no value is sparse and nothing was replaced",
            options.registry.names().collect::<Vec<_>>().join(", ")
        ));
    }
    let ids: Vec<NodeId> = graph.nodes().map(|(id, _)| id).collect();
    for id in ids {
        if let Some(entry) = replace(graph, id, &kinds, heights.as_ref(), options)? {
            entries.insert(id, entry);
        }
    }
    if options.fuse_neurons {
        fuse_neuron_pools(graph, &mut entries)?;
        fuse_conv_neuron_pools(graph, &mut entries)?;
        fuse_add_neurons(graph, &mut entries)?;
        fuse_neuron_connects(graph, &mut entries)?;
    }
    Ok(OptimizeReport {
        entries: entries.into_values().collect(),
        notes,
    })
}

/// Fuses every residual `Add` that only a built-in neuron reads into that neuron's node
/// ([`AddNeuron`]).
fn fuse_add_neurons(graph: &mut Graph, entries: &mut BTreeMap<NodeId, ReportEntry>) -> Result<()> {
    let neurons: Vec<NodeId> = graph
        .nodes()
        .filter(|(_, n)| NeuronMaxPool::fusable(n.op.as_ref()) && n.inputs.len() == 1)
        .map(|(id, _)| id)
        .collect();
    for id in neurons {
        let source = graph.node(id)?.inputs[0];
        if !graph.node(source)?.op.as_any().is::<Add>() || !graph.read_only_by(source, id) {
            continue;
        }
        let neuron_name = graph.node(id)?.name.clone();
        let add = graph.absorb_input(id, source)?;
        graph.map_op(id, |neuron| Box::new(AddNeuron { neuron }))?;
        let reason = format!("into `{neuron_name}`: summed as its neuron reads it");
        entries.insert(source, fused_entry(add.name, "Add", reason));
    }
    Ok(())
}

/// Fuses into every SEW connect one built-in neuron among its inputs that nothing else reads
/// ([`NeuronConnect`]); of two (a downsampling block's shortcut fires too), the later one, the
/// block's branch. The fused node takes the neuron's name, so its parameters keep theirs.
fn fuse_neuron_connects(
    graph: &mut Graph,
    entries: &mut BTreeMap<NodeId, ReportEntry>,
) -> Result<()> {
    let connects: Vec<(NodeId, ConnectFunction)> = graph
        .nodes()
        .filter_map(|(id, n)| Some((id, n.op.as_any().downcast_ref::<SewConnect>()?.function)))
        .collect();
    for (id, function) in connects {
        let inputs = graph.node(id)?.inputs.clone();
        let fusable = |&(_, input): &(usize, NodeId)| -> bool {
            graph
                .node(input)
                .is_ok_and(|n| NeuronMaxPool::fusable(n.op.as_ref()) && n.inputs.len() == 1)
                && graph.read_only_by(input, id)
        };
        let Some((position, neuron_id)) = inputs
            .iter()
            .copied()
            .enumerate()
            .filter(fusable)
            .max_by_key(|&(_, input)| input)
        else {
            continue;
        };
        let neuron = graph.absorb_input(id, neuron_id)?;
        let node = graph.node_mut(id)?;
        // `NeuronConnect` reads `[x, shortcut]`, whichever side the neuron joined.
        if position == 1 {
            node.inputs.swap(0, 1);
        }
        let connect_name = std::mem::replace(&mut node.name, neuron.name.clone());
        graph.replace_op(
            id,
            Box::new(NeuronConnect {
                neuron: neuron.op,
                function,
                spikes_first: position == 0,
            }),
        )?;
        let reason = format!("into `{}`: joined as its neuron fires", neuron.name);
        entries.insert(neuron_id, fused_entry(connect_name, "SewConnect", reason));
    }
    Ok(())
}

/// Fuses every `MaxPool2d` whose input is a built-in neuron read by nothing else into that
/// neuron's node ([`NeuronMaxPool`]).
fn fuse_neuron_pools(graph: &mut Graph, entries: &mut BTreeMap<NodeId, ReportEntry>) -> Result<()> {
    let pools: Vec<NodeId> = graph
        .nodes()
        .filter(|(_, n)| n.op.as_any().is::<MaxPool2d>())
        .map(|(id, _)| id)
        .collect();
    for id in pools {
        let source = graph.node(id)?.inputs[0];
        let neuron = graph.node(source)?;
        if !NeuronMaxPool::fusable(neuron.op.as_ref()) || !graph.read_only_by(source, id) {
            continue;
        }
        let neuron_name = neuron.name.clone();
        let pool_node = graph.remove_node(id)?;
        let pool = pool_node
            .op
            .as_any()
            .downcast_ref::<MaxPool2d>()
            .expect("filtered above")
            .clone();
        graph.map_op(source, |neuron| Box::new(NeuronMaxPool { neuron, pool }))?;
        let reason = format!("into `{neuron_name}`: pooled while its spikes are in cache");
        entries.insert(id, fused_entry(pool_node.name, "MaxPool2d", reason));
    }
    Ok(())
}

/// Fuses every sparse convolution that only a [`NeuronMaxPool`] reads into that node
/// ([`ConvNeuronPool`], under the neuron's name): on the GPU the conv's kernel fires the neuron
/// in its epilogue. The conv's report entry says so.
fn fuse_conv_neuron_pools(
    graph: &mut Graph,
    entries: &mut BTreeMap<NodeId, ReportEntry>,
) -> Result<()> {
    let pools: Vec<NodeId> = graph
        .nodes()
        .filter(|(_, n)| n.op.as_any().is::<NeuronMaxPool>() && n.inputs.len() == 1)
        .map(|(id, _)| id)
        .collect();
    for id in pools {
        let source = graph.node(id)?.inputs[0];
        if !graph.node(source)?.op.as_any().is::<SparseConv2d>() || !graph.read_only_by(source, id)
        {
            continue;
        }
        let conv = graph.absorb_input(id, source)?;
        graph.map_op(id, |neuron_pool| {
            Box::new(ConvNeuronPool {
                conv: conv.op,
                neuron_pool,
            })
        })?;
        let name = &graph.node(id)?.name;
        let reason = format!("into `{name}`: its neuron fires in the conv's epilogue");
        entries.insert(source, fused_entry(conv.name, "SparseConv2d", reason));
    }
    Ok(())
}

/// The report's entry for a node fused into its neighbour.
fn fused_entry(node: String, op: &'static str, reason: String) -> ReportEntry {
    ReportEntry {
        node,
        op,
        decision: Decision::Folded,
        block: None,
        reason,
    }
}

/// Folds every BatchNorm2d that directly follows a convolution read only by it.
fn fold_batchnorms(
    graph: &mut Graph,
    options: &OptimizeOptions,
    entries: &mut BTreeMap<NodeId, ReportEntry>,
) -> Result<()> {
    let bns: Vec<NodeId> = graph
        .nodes()
        .filter(|(_, n)| n.op.as_any().is::<BatchNorm2d>())
        .map(|(id, _)| id)
        .collect();
    for id in bns {
        let node = graph.node(id)?;
        let name = node.name.clone();
        let source = node.inputs[0];
        let source_name = graph.node(source)?.name.clone();
        let entry = |decision, reason: String| ReportEntry {
            node: name.clone(),
            op: "BatchNorm2d",
            decision,
            block: None,
            reason,
        };
        let is_conv = conv_of(graph, source).is_some();
        let reason = if !options.fold_batchnorm {
            Some("folding disabled".to_string())
        } else if !is_conv {
            Some(format!("its input `{source_name}` is not a convolution"))
        } else if graph.consumers(source).len() > 1 {
            Some(format!("`{source_name}` is read by other nodes too"))
        } else {
            None
        };
        if let Some(reason) = reason {
            entries.insert(id, entry(Decision::Kept, reason));
            continue;
        }
        let bn = graph
            .node(id)?
            .op
            .as_any()
            .downcast_ref::<BatchNorm2d>()
            .expect("filtered above")
            .clone();
        let conv = conv_of_mut(graph, source).expect("checked above");
        fold_into(conv, &bn)?;
        graph.remove_node(id)?;
        entries.insert(id, entry(Decision::Folded, format!("into `{source_name}`")));
    }
    Ok(())
}

fn conv_of(graph: &Graph, id: NodeId) -> Option<&Conv2d> {
    let op = graph.node(id).ok()?.op.as_any();
    op.downcast_ref::<Conv2d>()
        .or_else(|| op.downcast_ref::<SparseConv2d>().map(|s| &s.conv))
}

fn conv_of_mut(graph: &mut Graph, id: NodeId) -> Option<&mut Conv2d> {
    let op = graph.node_mut(id).ok()?.op.as_any_mut();
    if op.is::<Conv2d>() {
        return op.downcast_mut::<Conv2d>();
    }
    op.downcast_mut::<SparseConv2d>().map(|s| s.conv_mut())
}

/// `bn(conv(x)) = conv'(x)` with `W'[o] = W[o]·alpha[o]`, `b'[o] = b[o]·alpha[o] + beta[o]`.
fn fold_into(conv: &mut Conv2d, bn: &BatchNorm2d) -> Result<()> {
    let (alpha, beta) = bn.scale_shift()?;
    let cout = conv.out_channels();
    if alpha.len() != cout {
        return Err(crate::Error::Shape(format!(
            "BatchNorm over {} channels after a convolution with {cout}",
            alpha.len()
        )));
    }
    let per_out = conv.weight.len() / cout;
    for (o, w) in conv.weight.data_mut().chunks_exact_mut(per_out).enumerate() {
        w.iter_mut().for_each(|v| *v *= alpha[o]);
    }
    let bias: Vec<f32> = (0..cout)
        .map(|o| {
            let b = conv.bias.as_ref().map_or(0.0, |b| b.data()[o]);
            b.mul_add(alpha[o], beta[o])
        })
        .collect();
    conv.bias = Some(Tensor::new(vec![cout], bias)?);
    Ok(())
}

/// The decision for one node, if it is a Conv2d or Linear.
fn replace(
    graph: &mut Graph,
    id: NodeId,
    kinds: &ValueKinds,
    heights: Option<&BTreeMap<NodeId, usize>>,
    options: &OptimizeOptions,
) -> Result<Option<ReportEntry>> {
    let node = graph.node(id)?;
    let name = node.name.clone();
    let Some(&source) = node.inputs.first() else {
        return Ok(None);
    };
    let kind = kinds.of(source);
    let source_name = graph.node(source)?.name.clone();
    let feeds = match kind {
        ValueKind::Binary => format!("input is binary spikes from `{source_name}`"),
        ValueKind::SparseInteger => format!("input is integer-valued spikes from `{source_name}`"),
        ValueKind::Dense => format!("input from `{source_name}` is dense"),
    };
    let op = node.op.as_any();
    let entry = |op: &'static str, decision, block, reason| ReportEntry {
        node: name.clone(),
        op,
        decision,
        block,
        reason,
    };
    if let Some(conv) = op.downcast_ref::<Conv2d>() {
        let keep = if !options.replace_conv {
            Some("conv replacement disabled".to_string())
        } else if !kind.is_sparse() {
            Some(feeds.clone())
        } else if conv.groups != 1 {
            Some(format!(
                "{feeds}, but grouped convolutions have no sparse kernel"
            ))
        } else {
            None
        };
        if let Some(reason) = keep {
            return Ok(Some(entry("Conv2d", Decision::Kept, None, reason)));
        }
        let block = match (options.block_overrides.get(&name), heights) {
            (Some(&b), _) => BlockChoice::Fixed(b),
            (None, Some(h)) => BlockChoice::Fixed(options.block_selector.select(h[&id])),
            (None, None) => BlockChoice::Auto(options.block_selector),
        };
        let sparse = SparseConv2d::from_dense(conv, block);
        if let Device::Cuda(_) = options.device {
            let reason = match sparse.cuda_kernel(heights.map_or(8, |h| h[&id])) {
                Err(e) => Some(format!("{feeds}, but the GPU has no kernel for it ({e})")),
                // The tables need binary spikes to be fast.
                Ok(CudaKernel::PatternTables) if kind != ValueKind::Binary => Some(format!(
                    "{feeds}, but its only GPU kernel (pattern tables) needs binary spikes"
                )),
                Ok(_) => None,
            };
            if let Some(reason) = reason {
                return Ok(Some(entry("Conv2d", Decision::Kept, None, reason)));
            }
        }
        graph.replace_op(id, Box::new(sparse))?;
        return Ok(Some(entry(
            "Conv2d",
            Decision::Replaced,
            Some(block.describe()),
            feeds,
        )));
    }
    if let Some(linear) = op.downcast_ref::<Linear>() {
        if !options.replace_linear {
            let reason = "linear replacement disabled".to_string();
            return Ok(Some(entry("Linear", Decision::Kept, None, reason)));
        }
        if !kind.is_sparse() {
            return Ok(Some(entry("Linear", Decision::Kept, None, feeds)));
        }
        let sparse = SparseLinear::from_dense(linear);
        graph.replace_op(id, Box::new(sparse))?;
        return Ok(Some(entry("Linear", Decision::Replaced, None, feeds)));
    }
    Ok(None)
}

/// The input height of every convolution for an input of spatial size `hw`, by running one
/// sample of that size through the graph.
fn conv_input_heights(graph: &Graph, hw: (usize, usize)) -> Result<BTreeMap<NodeId, usize>> {
    let input = graph.node(graph.input_id())?;
    let dims = match input.op.as_any().downcast_ref::<Input>() {
        Some(input) if input.dims.len() >= 2 => input.dims.clone(),
        _ => return Ok(BTreeMap::new()),
    };
    let rank = dims.len();
    let shape: Vec<usize> = dims
        .iter()
        .enumerate()
        .map(|(i, d)| match i {
            _ if i == rank - 2 => hw.0,
            _ if i == rank - 1 => hw.1,
            _ => d.unwrap_or(1),
        })
        .collect();
    // Shapes do not depend on values; a constant input keeps the run cheap and deterministic.
    let sample = Tensor::new(shape.clone(), vec![0.5; shape.iter().product()])?;
    let mut heights = BTreeMap::new();
    graph.forward_observed(&sample, &mut |run| {
        if conv_of(graph, run.id).is_some() {
            let s = run.inputs[0].shape();
            heights.insert(run.id, s[s.len() - 2]);
        }
        Ok(())
    })?;
    Ok(heights)
}

/// One sparse convolution's measured CUDA paths, from [`tune_cuda`].
#[derive(Clone, Debug)]
pub struct TuningEntry {
    pub node: String,
    pub tuning: CudaTuning,
}

/// The measured pass for CUDA: runs the optimized `graph` on a representative `sample` and lets
/// every `SparseConv2d` time its sparse kernels against the dense engine on the input it actually
/// sees, keeping the faster for later forwards. Spike density varies by layer (a max-pool's or a
/// SEW ADD's output is far denser than a neuron's), so which path wins is measured, not guessed.
pub fn tune_cuda(graph: &Graph, sample: &DeviceTensor) -> Result<Vec<TuningEntry>> {
    let mut entries = Vec::new();
    graph.forward_cuda_observed(sample, &mut |run| {
        if let Some(conv) = run.node.op.as_any().downcast_ref::<SparseConv2d>() {
            let tuning = conv.tune_cuda(run.inputs[0], 5)?;
            entries.push(TuningEntry {
                node: run.node.name.clone(),
                tuning,
            });
        }
        Ok(())
    })?;
    Ok(entries)
}
