//! Which operators emit spikes.
//!
//! The analyzer asks the registry, by operator type name, whether a node's output is spikes.
//! spikingjelly's IF, LIF and ParametricLIF neurons are built in; a user's own neuron type is one
//! call to [`SpikeRegistry::register`].
use std::collections::BTreeSet;

use crate::ops::neuron::{IFNode, LIFNode, ParametricLIFNode};
use crate::ops::Operator;

#[derive(Clone, Debug)]
pub struct SpikeRegistry {
    spiking: BTreeSet<&'static str>,
}

impl Default for SpikeRegistry {
    fn default() -> Self {
        let mut registry = Self::empty();
        for name in [
            IFNode::TYPE_NAME,
            LIFNode::TYPE_NAME,
            ParametricLIFNode::TYPE_NAME,
        ] {
            registry.register(name);
        }
        registry
    }
}

impl SpikeRegistry {
    /// A registry that knows no spiking operator.
    pub fn empty() -> Self {
        Self {
            spiking: BTreeSet::new(),
        }
    }

    /// Declares that operators whose [`Operator::type_name`] is `type_name` output binary spikes.
    pub fn register(&mut self, type_name: &'static str) -> &mut Self {
        self.spiking.insert(type_name);
        self
    }

    pub fn is_spiking(&self, op: &dyn Operator) -> bool {
        self.spiking.contains(op.type_name())
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.spiking.iter().copied()
    }
}
