//! The model zoo: spikingjelly's spiking ResNets and SEW ResNets as [`Graph`]s whose node names
//! are the PyTorch module paths, so a spikingjelly `state_dict` (saved as safetensors) loads by
//! name.
//!
//! - [`build`] makes a model from its name and a [`ModelConfig`];
//! - [`init`] gives it reproducible seeded weights and calibrates BatchNorm so it is alive.
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::ops::connect::ConnectFunction;
use crate::ops::neuron::{Firing, IFNode, LIFNode, ParametricLIFNode};
use crate::ops::Operator;

pub mod init;
mod resnet;

/// Which spiking neuron a model uses, with its type-specific parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NeuronKind {
    If,
    Lif { tau: f32, decay_input: bool },
    Plif { init_tau: f32, decay_input: bool },
}

/// A neuron type and its firing parameters: what spikingjelly's `spiking_neuron=` and neuron
/// keyword arguments say.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NeuronConfig {
    pub kind: NeuronKind,
    pub firing: Firing,
}

impl Default for NeuronConfig {
    /// `LIFNode()` with spikingjelly's defaults: tau 2, decay_input, threshold 1, hard reset to 0.
    fn default() -> Self {
        Self {
            kind: NeuronKind::Lif {
                tau: 2.0,
                decay_input: true,
            },
            firing: Firing::default(),
        }
    }
}

impl NeuronConfig {
    pub fn build(&self) -> Result<Box<dyn Operator>> {
        Ok(match self.kind {
            NeuronKind::If => Box::new(IFNode::new(self.firing)),
            NeuronKind::Lif { tau, decay_input } => {
                Box::new(LIFNode::new(tau, decay_input, self.firing)?)
            }
            NeuronKind::Plif {
                init_tau,
                decay_input,
            } => Box::new(ParametricLIFNode::new(init_tau, decay_input, self.firing)?),
        })
    }
}

/// Everything a zoo model is built from besides its name.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModelConfig {
    pub neuron: NeuronConfig,
    pub num_classes: usize,
    /// The SEW connect function (`cnf`); ignored by spiking ResNets.
    pub connect: ConnectFunction,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            neuron: NeuronConfig::default(),
            num_classes: 1000,
            connect: ConnectFunction::Add,
        }
    }
}

/// The names [`build`] knows.
pub const MODEL_NAMES: &[&str] = &[
    "spiking_resnet18",
    "spiking_resnet34",
    "spiking_resnet50",
    "spiking_resnet101",
    "spiking_resnet152",
    "sew_resnet18",
    "sew_resnet34",
    "sew_resnet50",
    "sew_resnet101",
    "sew_resnet152",
];

/// Builds the zoo model `name` (one of [`MODEL_NAMES`]) with default-initialised parameters
/// (conv/linear weights zero, BatchNorm the identity); see [`init`] for useful values.
pub fn build(name: &str, config: &ModelConfig) -> Result<Graph> {
    if config.num_classes == 0 {
        return Err(Error::InvalidArgument("num_classes must be > 0".into()));
    }
    let (family, depth) = if let Some(d) = name.strip_prefix("spiking_resnet") {
        (resnet::Family::Spiking, d)
    } else if let Some(d) = name.strip_prefix("sew_resnet") {
        (resnet::Family::Sew(config.connect), d)
    } else {
        return Err(unknown(name));
    };
    let depth: usize = depth.parse().map_err(|_| unknown(name))?;
    resnet::build(family, depth, config).ok_or_else(|| unknown(name))?
}

fn unknown(name: &str) -> Error {
    Error::InvalidArgument(format!(
        "unknown model `{name}`; known: {}",
        MODEL_NAMES.join(", ")
    ))
}
