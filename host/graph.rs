//! The network graph: a DAG of named nodes, each holding an [`Operator`] and the ids of the nodes
//! that feed it, executed in topological order.
//!
//! Passes such as `optimize` walk the nodes and edges, downcast operators to inspect them, and
//! rewrite the graph with [`Graph::replace_op`] and [`Graph::remove_node`]. Node ids stay stable
//! across rewrites.
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use crate::cuda::DeviceTensor;
use crate::error::{Error, Result};
use crate::impl_as_any;
use crate::ops::Operator;
use crate::tensor::Tensor;

pub type NodeId = usize;

/// A node: its name (a PyTorch module path such as `layer1.0.conv1`, which prefixes its
/// parameter names), its operator and its inputs, in order.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub op: Box<dyn Operator>,
    pub inputs: Vec<NodeId>,
}

/// The graph's input: checks the rank and any fixed dimensions of what is fed in.
#[derive(Clone, Debug, PartialEq)]
pub struct Input {
    /// One entry per dimension; `Some(n)` fixes its size (e.g. the image channels).
    pub dims: Vec<Option<usize>>,
}

impl Input {
    fn check(&self, shape: &[usize]) -> Result<()> {
        let pattern = || {
            self.dims
                .iter()
                .map(|d| d.map_or("*".to_string(), |n| n.to_string()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if shape.len() != self.dims.len() {
            return Err(Error::Shape(format!(
                "the model takes a rank-{} input [{}], got {shape:?}",
                self.dims.len(),
                pattern()
            )));
        }
        for (i, (&got, want)) in shape.iter().zip(&self.dims).enumerate() {
            if want.is_some_and(|w| w != got) || got == 0 {
                return Err(Error::Shape(format!(
                    "the model takes an input [{}], got {shape:?} (dimension {i})",
                    pattern()
                )));
            }
        }
        Ok(())
    }
}

impl Operator for Input {
    fn type_name(&self) -> &'static str {
        "Input"
    }
    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = crate::ops::expect_inputs::<1, _>("Input", inputs)?;
        self.check(x.shape())?;
        Ok(x.clone())
    }
    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [x] = crate::ops::expect_inputs::<1, _>("Input", inputs)?;
        self.check(x.shape())?;
        x.try_clone()
    }
    fn describe(&self) -> String {
        format!("{:?}", self.dims)
    }
    impl_as_any!();
}

/// What an observer of [`Graph::forward_observed`] (host tensors) or
/// [`Graph::forward_cuda_observed`] (device tensors) sees for each executed node.
pub struct NodeRun<'a, V = Tensor> {
    pub id: NodeId,
    pub node: &'a Node,
    pub inputs: &'a [&'a V],
    pub output: &'a V,
    /// Wall time on the CPU; GPU time between CUDA events on the GPU.
    pub elapsed: Duration,
}

/// A node's run on the GPU.
pub type DeviceNodeRun<'a> = NodeRun<'a, DeviceTensor>;

type DeviceObserver<'a> = dyn FnMut(&DeviceNodeRun) -> Result<()> + 'a;

#[derive(Debug)]
pub struct Graph {
    nodes: Vec<Option<Node>>,
    input: NodeId,
    output: NodeId,
}

impl Graph {
    /// A graph with one input node named `input`; add nodes with [`Graph::add`], then
    /// [`Graph::set_output`].
    pub fn new(input: Input) -> Self {
        let node = Node {
            name: "input".into(),
            op: Box::new(input),
            inputs: Vec::new(),
        };
        Self {
            nodes: vec![Some(node)],
            input: 0,
            output: 0,
        }
    }

    /// Appends a node fed by `inputs` (which must exist) and returns its id.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        op: impl Operator,
        inputs: &[NodeId],
    ) -> Result<NodeId> {
        self.add_boxed(name.into(), Box::new(op), inputs)
    }

    pub fn add_boxed(
        &mut self,
        name: String,
        op: Box<dyn Operator>,
        inputs: &[NodeId],
    ) -> Result<NodeId> {
        if let Some(&bad) = inputs.iter().find(|&&i| self.get(i).is_none()) {
            return Err(Error::InvalidArgument(format!(
                "node `{name}` refers to missing node {bad}"
            )));
        }
        self.nodes.push(Some(Node {
            name,
            op,
            inputs: inputs.to_vec(),
        }));
        Ok(self.nodes.len() - 1)
    }

    pub fn set_output(&mut self, id: NodeId) -> Result<()> {
        self.node(id)?;
        self.output = id;
        Ok(())
    }

    pub fn input_id(&self) -> NodeId {
        self.input
    }

    pub fn output_id(&self) -> NodeId {
        self.output
    }

    fn get(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id).and_then(Option::as_ref)
    }

    pub fn node(&self, id: NodeId) -> Result<&Node> {
        self.get(id)
            .ok_or_else(|| Error::InvalidArgument(format!("no node {id}")))
    }

    pub fn node_mut(&mut self, id: NodeId) -> Result<&mut Node> {
        self.nodes
            .get_mut(id)
            .and_then(Option::as_mut)
            .ok_or_else(|| Error::InvalidArgument(format!("no node {id}")))
    }

    /// The node named `name`, if any.
    pub fn find(&self, name: &str) -> Option<NodeId> {
        self.nodes().find(|(_, n)| n.name == name).map(|(id, _)| id)
    }

    /// Every node with its id, in insertion order.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(id, n)| n.as_ref().map(|n| (id, n)))
    }

    /// Every edge `(from, to)`.
    pub fn edges(&self) -> impl Iterator<Item = (NodeId, NodeId)> + '_ {
        self.nodes()
            .flat_map(|(to, n)| n.inputs.iter().map(move |&from| (from, to)))
    }

    /// The nodes that read `id`'s output.
    pub fn consumers(&self, id: NodeId) -> Vec<NodeId> {
        self.nodes()
            .filter(|(_, n)| n.inputs.contains(&id))
            .map(|(c, _)| c)
            .collect()
    }

    /// Replaces a node's operator with `wrap(old operator)` (for fusing it into a larger one).
    pub fn map_op(
        &mut self,
        id: NodeId,
        wrap: impl FnOnce(Box<dyn Operator>) -> Box<dyn Operator>,
    ) -> Result<()> {
        let node = self.node_mut(id)?;
        // A placeholder stands in while `wrap` owns the old operator.
        let old = std::mem::replace(&mut node.op, Box::new(Input { dims: Vec::new() }));
        node.op = wrap(old);
        Ok(())
    }

    /// Whether `consumer` alone reads `producer`, which is not the graph's output: the producer's
    /// work can then be fused into the consumer, or the consumer's into the producer.
    pub fn read_only_by(&self, producer: NodeId, consumer: NodeId) -> bool {
        self.consumers(producer) == [consumer] && producer != self.output
    }

    /// Swaps a node's operator, returning the old one.
    pub fn replace_op(&mut self, id: NodeId, op: Box<dyn Operator>) -> Result<Box<dyn Operator>> {
        Ok(std::mem::replace(&mut self.node_mut(id)?.op, op))
    }

    /// Removes a single-input node, feeding its consumers from its input instead.
    pub fn remove_node(&mut self, id: NodeId) -> Result<Node> {
        let node = self.node(id)?;
        let [source] = node.inputs[..] else {
            return Err(Error::InvalidArgument(format!(
                "only single-input nodes can be removed; `{}` has {}",
                node.name,
                node.inputs.len()
            )));
        };
        for n in self.nodes.iter_mut().flatten() {
            for i in n.inputs.iter_mut().filter(|i| **i == id) {
                *i = source;
            }
        }
        if self.output == id {
            self.output = source;
        }
        Ok(self.nodes[id].take().expect("checked above"))
    }

    /// Removes `producer`, which only `consumer` reads, and feeds `consumer` from the producer's
    /// inputs in its place (for fusing the producer's work into the consumer's operator).
    pub fn absorb_input(&mut self, consumer: NodeId, producer: NodeId) -> Result<Node> {
        let name = |g: &Self, id| g.node(id).map(|n| n.name.clone());
        if !self.read_only_by(producer, consumer) || producer == self.input {
            return Err(Error::InvalidArgument(format!(
                "`{}` is not read by `{}` alone",
                name(self, producer)?,
                name(self, consumer)?
            )));
        }
        let sources = self.node(producer)?.inputs.clone();
        let inputs = &mut self.node_mut(consumer)?.inputs;
        *inputs = inputs
            .iter()
            .flat_map(|&i| {
                if i == producer {
                    sources.clone()
                } else {
                    vec![i]
                }
            })
            .collect();
        Ok(self.nodes[producer].take().expect("checked above"))
    }

    /// Node ids in an order where every node comes after its inputs.
    pub fn topo_order(&self) -> Result<Vec<NodeId>> {
        let mut pending: BTreeMap<NodeId, usize> =
            self.nodes().map(|(id, n)| (id, n.inputs.len())).collect();
        // Lowest id first among the ready nodes: insertion order where the edges allow it.
        let mut ready: std::collections::BTreeSet<NodeId> = pending
            .iter()
            .filter(|(_, &k)| k == 0)
            .map(|(&id, _)| id)
            .collect();
        let mut order = Vec::with_capacity(pending.len());
        let mut consumers: BTreeMap<NodeId, Vec<NodeId>> = BTreeMap::new();
        for (from, to) in self.edges() {
            consumers.entry(from).or_default().push(to);
        }
        while let Some(id) = ready.pop_first() {
            order.push(id);
            for &c in consumers.get(&id).into_iter().flatten() {
                let k = pending.get_mut(&c).expect("consumer exists");
                *k -= 1;
                if *k == 0 {
                    ready.insert(c);
                }
            }
        }
        if order.len() != pending.len() {
            return Err(Error::InvalidArgument("the graph has a cycle".into()));
        }
        Ok(order)
    }

    /// Runs the graph on `input`.
    ///
    /// A model whose input is `[T, N, …]` also accepts a single-step `[N, …]` input, run as T = 1
    /// with the T dimension dropped from the output.
    pub fn forward(&self, input: &Tensor) -> Result<Tensor> {
        self.forward_observed(input, &mut |_| Ok(()))
    }

    /// [`forward`](Self::forward), calling `observe` after every node with its inputs, output and
    /// run time.
    pub fn forward_observed(
        &self,
        input: &Tensor,
        observe: &mut dyn FnMut(&NodeRun) -> Result<()>,
    ) -> Result<Tensor> {
        let plan = self.plan()?;
        with_single_step(self.single_step_input(input.shape()), input, |input| {
            plan.execute(input, &mut |id, args| {
                let node = self.get(id).expect("planned nodes exist");
                let start = Instant::now();
                let output = run_node(id == self.input, node, args)?;
                observe(&NodeRun {
                    id,
                    node,
                    inputs: args,
                    output: &output,
                    elapsed: start.elapsed(),
                })?;
                Ok(output)
            })
        })
    }

    /// Runs the graph on a CUDA tensor; every node runs on the device and only the output is
    /// returned (still on the device). Single-step inputs work as in [`forward`](Self::forward).
    pub fn forward_cuda(&self, input: &DeviceTensor) -> Result<DeviceTensor> {
        self.forward_cuda_inner(input, None)
    }

    /// [`forward_cuda`](Self::forward_cuda), calling `observe` after every node with its inputs,
    /// output and GPU time (CUDA events around the node; the host waits for each node, so the
    /// total is a little above an unobserved forward's).
    pub fn forward_cuda_observed(
        &self,
        input: &DeviceTensor,
        observe: &mut dyn FnMut(&DeviceNodeRun) -> Result<()>,
    ) -> Result<DeviceTensor> {
        self.forward_cuda_inner(input, Some(observe))
    }

    fn forward_cuda_inner(
        &self,
        input: &DeviceTensor,
        mut observe: Option<&mut DeviceObserver>,
    ) -> Result<DeviceTensor> {
        let plan = self.plan()?;
        let single_step = self.single_step_input(input.shape());
        let stepped;
        let input = if single_step {
            let mut shape = vec![1];
            shape.extend_from_slice(input.shape());
            stepped = input.try_clone()?.reshape(shape)?;
            &stepped
        } else {
            input
        };
        let timer = match observe {
            Some(_) => Some(crate::cuda::GpuTimer::new(input.backend())?),
            None => None,
        };
        // Nodes some reader of which packs channel masks: a neuron there marks them as it fires.
        let marking: HashSet<NodeId> = self
            .nodes()
            .filter(|(_, n)| n.op.reads_spike_masks())
            .flat_map(|(_, n)| n.inputs.iter().copied())
            .collect();
        let output = plan.execute(input, &mut |id, args| {
            let node = self.get(id).expect("planned nodes exist");
            let mark = marking.contains(&id);
            let run = || {
                let output = node.op.forward_cuda_marking(args, mark);
                with_node_context(id == self.input, node, output)
            };
            let (Some(observe), Some(timer)) = (observe.as_mut(), timer.as_ref()) else {
                return run();
            };
            let (output, ms) = timer.time(run)?;
            observe(&DeviceNodeRun {
                id,
                node,
                inputs: args,
                output: &output,
                elapsed: Duration::from_secs_f64(ms / 1e3),
            })?;
            Ok(output)
        })?;
        if single_step {
            let shape = output.shape()[1..].to_vec();
            output.reshape(shape)
        } else {
            Ok(output)
        }
    }

    /// Runs the graph, letting `prepare` modify each node just before it runs, given the inputs
    /// it is about to see (used by calibration, which sets BatchNorm statistics on the fly).
    pub fn forward_prepared(
        &mut self,
        input: &Tensor,
        prepare: &mut dyn FnMut(&mut Node, &[&Tensor]) -> Result<()>,
    ) -> Result<Tensor> {
        let plan = self.plan()?;
        let input_id = self.input;
        with_single_step(self.single_step_input(input.shape()), input, |input| {
            plan.execute(input, &mut |id, args| {
                let node = self.node_mut(id)?;
                prepare(node, args)?;
                run_node(id == input_id, node, args)
            })
        })
    }

    fn plan(&self) -> Result<Plan> {
        let mut uses = vec![0; self.nodes.len()];
        for (from, _) in self.edges() {
            uses[from] += 1;
        }
        uses[self.output] += 1;
        Ok(Plan {
            order: self.topo_order()?,
            inputs: self
                .nodes
                .iter()
                .map(|n| n.as_ref().map_or(Vec::new(), |n| n.inputs.clone()))
                .collect(),
            uses,
            input: self.input,
            output: self.output,
        })
    }

    fn single_step_input(&self, shape: &[usize]) -> bool {
        let Some(input) = self
            .get(self.input)
            .and_then(|n| n.op.as_any().downcast_ref::<Input>())
        else {
            return false;
        };
        shape.len() + 1 == input.dims.len() && input.dims.len() >= 2
    }

    /// Every parameter by its full name (`<node name>.<local name>`), like a `state_dict`.
    pub fn params(&self) -> Vec<(String, &Tensor)> {
        self.nodes()
            .flat_map(|(_, n)| {
                n.op.params()
                    .into_iter()
                    .map(move |(local, t)| (format!("{}.{local}", n.name), t))
            })
            .collect()
    }

    /// Loads parameters by full name. Every parameter of the graph must be present with its exact
    /// shape, and every tensor given must be a parameter; the error names the offenders.
    pub fn load_params(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        self.load_params_inner(tensors, true).map(|_| ())
    }

    /// Loads the parameters present in `tensors` (shapes still checked); others keep their value.
    pub fn load_params_partial(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<usize> {
        self.load_params_inner(tensors, false)
    }

    fn load_params_inner(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        strict: bool,
    ) -> Result<usize> {
        let mut missing = Vec::new();
        let mut misshaped = Vec::new();
        let mut used = 0;
        for node in self.nodes.iter_mut().flatten() {
            for (local, param) in node.op.params_mut() {
                let name = format!("{}.{local}", node.name);
                match tensors.get(&name) {
                    None => missing.push(name),
                    Some(t) if t.shape() != param.shape() => misshaped.push(format!(
                        "{name}: expected {:?}, file has {:?}",
                        param.shape(),
                        t.shape()
                    )),
                    Some(t) => {
                        *param = t.clone();
                        used += 1;
                    }
                }
            }
        }
        let known: std::collections::HashSet<String> =
            self.params().into_iter().map(|(n, _)| n).collect();
        let unexpected: Vec<&String> = tensors.keys().filter(|k| !known.contains(*k)).collect();
        let mut problems = Vec::new();
        if !misshaped.is_empty() {
            problems.push(format!("mis-shaped: {}", misshaped.join("; ")));
        }
        if strict && !missing.is_empty() {
            problems.push(format!("missing: {}", list(&missing)));
        }
        if strict && !unexpected.is_empty() {
            problems.push(format!("unexpected: {}", list(&unexpected)));
        }
        if !problems.is_empty() {
            return Err(Error::Weights(problems.join("; ")));
        }
        Ok(used)
    }

    /// A table of the nodes: id, name, type, inputs, configuration.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let width = self
            .nodes()
            .map(|(_, n)| n.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let _ = writeln!(
            out,
            "{:>4}  {:width$}  {:18}  {:12}  config",
            "id", "name", "op", "inputs"
        );
        for (id, n) in self.nodes() {
            let inputs = n
                .inputs
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let _ = writeln!(
                out,
                "{id:>4}  {:width$}  {:18}  {:12}  {}",
                n.name,
                n.op.type_name(),
                inputs,
                n.op.describe()
            );
        }
        let params: usize = self.params().iter().map(|(_, t)| t.len()).sum();
        let _ = writeln!(out, "{} nodes, {} parameters", self.nodes().count(), params);
        out
    }
}

/// The execution schedule of a graph, detached from the nodes so that a step may borrow them
/// mutably.
struct Plan {
    order: Vec<NodeId>,
    inputs: Vec<Vec<NodeId>>,
    uses: Vec<usize>,
    input: NodeId,
    output: NodeId,
}

impl Plan {
    /// Runs `step` on every node in order, keeping each value until its last consumer has run.
    fn execute<V>(&self, input: &V, step: &mut dyn FnMut(NodeId, &[&V]) -> Result<V>) -> Result<V> {
        let mut uses = self.uses.clone();
        let mut values: Vec<Option<V>> = (0..uses.len()).map(|_| None).collect();
        for &id in &self.order {
            let output = {
                let args: Vec<&V> = if id == self.input {
                    vec![input]
                } else {
                    self.inputs[id]
                        .iter()
                        .map(|&i| values[i].as_ref().expect("inputs run first"))
                        .collect()
                };
                step(id, &args)?
            };
            for &i in &self.inputs[id] {
                uses[i] -= 1;
                if uses[i] == 0 {
                    values[i] = None;
                }
            }
            if uses[id] > 0 {
                values[id] = Some(output);
            }
        }
        Ok(values[self.output].take().expect("output computed"))
    }
}

/// Runs one node, naming it in shape errors.
fn run_node(is_input: bool, node: &Node, args: &[&Tensor]) -> Result<Tensor> {
    with_node_context(is_input, node, node.op.forward(args))
}

/// Names the node in a shape error of its run.
fn with_node_context<T>(is_input: bool, node: &Node, result: Result<T>) -> Result<T> {
    result.map_err(|e| match e {
        Error::Shape(m) if !is_input => Error::Shape(format!(
            "node `{}` ({}): {m}",
            node.name,
            node.op.type_name()
        )),
        other => other,
    })
}

/// Runs `run` on `input`, or, for a single-step input, on it with a T = 1 dimension added and
/// dropped again from the output.
fn with_single_step(
    single_step: bool,
    input: &Tensor,
    run: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if single_step {
        drop_step_dim(run(&add_step_dim(input)?)?)
    } else {
        run(input)
    }
}

fn add_step_dim(x: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1];
    shape.extend_from_slice(x.shape());
    x.clone().reshape(shape)
}

fn drop_step_dim(x: Tensor) -> Result<Tensor> {
    let shape = x.shape()[1..].to_vec();
    x.reshape(shape)
}

fn list<T: AsRef<str>>(names: &[T]) -> String {
    const SHOWN: usize = 8;
    let mut s = names
        .iter()
        .take(SHOWN)
        .map(|n| n.as_ref())
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        let _ = write!(s, " and {} more", names.len() - SHOWN);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::connect::Add;
    use crate::ops::flatten::Flatten;
    use crate::ops::neuron::{Firing, IFNode};

    fn diamond() -> Graph {
        let mut g = Graph::new(Input {
            dims: vec![None, None, Some(2)],
        });
        let a = g.add("a", IFNode::new(Firing::default()), &[0]).unwrap();
        let b = g.add("b", Flatten { start_dim: 2 }, &[0]).unwrap();
        let c = g.add("sum", Add, &[a, b]).unwrap();
        g.set_output(c).unwrap();
        g
    }

    #[test]
    fn runs_in_topological_order_and_observes_every_node() {
        let g = diamond();
        let x = Tensor::new(vec![2, 1, 2], vec![0.5, 1.5, 0.7, 0.1]).unwrap();
        let mut seen = Vec::new();
        let y = g
            .forward_observed(&x, &mut |r| {
                seen.push(r.node.name.clone());
                Ok(())
            })
            .unwrap();
        // IF: t0 h=[0.5,1.5] s=[0,1]; t1 h=[1.2,0.1] s=[1,0]. Flatten keeps x.
        assert_eq!(y.data(), &[0.5, 2.5, 1.7, 0.1]);
        assert_eq!(seen, vec!["input", "a", "b", "sum"]);
        assert_eq!(g.consumers(0), vec![1, 2]);
        assert_eq!(g.edges().count(), 4);
    }

    #[test]
    fn wrong_input_rank_or_size_is_an_error() {
        let g = diamond();
        assert!(matches!(
            g.forward(&Tensor::zeros(vec![2, 1, 3])),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            g.forward(&Tensor::zeros(vec![1, 1, 1, 2])),
            Err(Error::Shape(_))
        ));
        // Single step: [N, C] runs as T = 1.
        assert_eq!(
            g.forward(&Tensor::zeros(vec![3, 2])).unwrap().shape(),
            &[3, 2]
        );
    }

    #[test]
    fn remove_node_rewires_consumers() {
        let mut g = diamond();
        let b = g.find("b").unwrap();
        g.remove_node(b).unwrap();
        assert_eq!(g.node(g.find("sum").unwrap()).unwrap().inputs, vec![1, 0]);
        assert!(g.remove_node(g.find("sum").unwrap()).is_err());
        assert!(g.summary().contains("IFNode"));
    }

    #[test]
    fn a_producer_read_by_one_node_is_absorbed_into_it() {
        let mut g = Graph::new(Input { dims: vec![None] });
        let a = g.add("a", Flatten { start_dim: 0 }, &[0]).unwrap();
        let b = g.add("b", Flatten { start_dim: 0 }, &[0]).unwrap();
        let sum = g.add("sum", Add, &[a, b]).unwrap();
        let out = g.add("out", Add, &[sum, a]).unwrap();
        g.set_output(out).unwrap();
        // `a` has two readers, and the output has none to be absorbed into.
        assert!(g.absorb_input(sum, a).is_err());
        assert!(g.absorb_input(sum, out).is_err());
        let removed = g.absorb_input(out, sum).unwrap();
        assert_eq!(removed.name, "sum");
        assert_eq!(g.node(out).unwrap().inputs, vec![a, b, a]);
        assert!(g.find("sum").is_none());
    }
}
