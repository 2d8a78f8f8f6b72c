//! Data-flow analysis: the [`ValueKind`] of every node's output, following the graph's edges in
//! topological order. Spiking operators (per the registry) output binary spikes; every other
//! operator says what it outputs given its inputs' kinds ([`crate::ops::Operator::output_kind`]).
use crate::error::Result;
use crate::graph::{Graph, NodeId};
use crate::ops::ValueKind;

use super::registry::SpikeRegistry;

/// The kind of each node's output, indexed by node id (`None` for removed ids).
#[derive(Clone, Debug)]
pub struct ValueKinds(Vec<Option<ValueKind>>);

impl ValueKinds {
    pub fn of(&self, id: NodeId) -> ValueKind {
        self.0
            .get(id)
            .copied()
            .flatten()
            .unwrap_or(ValueKind::Dense)
    }
}

/// Assigns a kind to every node's output. The graph input is `input_kind` (dense for images;
/// binary when the caller feeds already-encoded spikes).
pub fn analyze(
    graph: &Graph,
    registry: &SpikeRegistry,
    input_kind: ValueKind,
) -> Result<ValueKinds> {
    let mut kinds = vec![None; graph.nodes().map(|(id, _)| id + 1).max().unwrap_or(0)];
    for id in graph.topo_order()? {
        let node = graph.node(id)?;
        let kind = if id == graph.input_id() {
            input_kind
        } else if registry.is_spiking(node.op.as_ref()) {
            ValueKind::Binary
        } else {
            let inputs: Vec<ValueKind> = node
                .inputs
                .iter()
                .map(|&i| kinds[i].unwrap_or(ValueKind::Dense))
                .collect();
            node.op.output_kind(&inputs)
        };
        kinds[id] = Some(kind);
    }
    Ok(ValueKinds(kinds))
}
