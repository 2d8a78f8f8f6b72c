//! `NeuronConnect`: a SEW block's last neuron and the connect function that alone reads its
//! spikes, as one operator, which `optimize` swaps in (see `optimize::fuse_neuron_connects`).
//!
//! Every SEW ResNet block ends with `connect(identity, sn2(branch))`. Run apart, the neuron
//! writes its spikes and the connect reads them back with the shortcut; on the GPU one kernel
//! (`neuron_multi_step_connect`) joins each spike with its shortcut as it fires, so the spike map
//! never goes to memory. The result is the two operators' own, bit for bit: the kernel applies
//! the connect's own function to the neuron's own spikes.
use crate::cuda::DeviceTensor;
use crate::error::Result;
use crate::impl_as_any;
use crate::ops::connect::{ConnectFunction, SewConnect};
use crate::ops::neuron::forward_cuda_connected;
use crate::ops::{expect_inputs, Operator, ValueKind};
use crate::tensor::Tensor;

/// `function(shortcut, neuron(x))` (or `function(neuron(x), shortcut)` when `spikes_first`) on
/// inputs `[x, shortcut]`.
#[derive(Debug)]
pub struct NeuronConnect {
    /// A neuron that acts element by element over `[T, ...]` (`NeuronMaxPool::fusable`).
    pub neuron: Box<dyn Operator>,
    pub function: ConnectFunction,
    /// Whether the spikes are the connect function's first argument.
    pub spikes_first: bool,
}

impl NeuronConnect {
    pub const TYPE_NAME: &'static str = "NeuronConnect";

    /// The connect function's arguments in its order.
    fn ordered<'a, T>(&self, spikes: &'a T, shortcut: &'a T) -> [&'a T; 2] {
        if self.spikes_first {
            [spikes, shortcut]
        } else {
            [shortcut, spikes]
        }
    }

    fn connect(&self) -> SewConnect {
        SewConnect {
            function: self.function,
        }
    }
}

impl Operator for NeuronConnect {
    fn type_name(&self) -> &'static str {
        Self::TYPE_NAME
    }

    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x, shortcut] = expect_inputs::<2, _>(Self::TYPE_NAME, inputs)?;
        let spikes = self.neuron.forward(&[x])?;
        self.connect().forward(&self.ordered(&spikes, shortcut))
    }

    /// One kernel for a built-in neuron (the spikes never written), else the two operators'
    /// kernels one after the other.
    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [x, shortcut] = expect_inputs::<2, _>(Self::TYPE_NAME, inputs)?;
        let function = self.function.kernel_function();
        match forward_cuda_connected(
            self.neuron.as_ref(),
            x,
            shortcut,
            function,
            self.spikes_first,
        ) {
            Some(out) => out,
            None => {
                let spikes = self.neuron.forward_cuda(&[x])?;
                self.connect()
                    .forward_cuda(&self.ordered(&spikes, shortcut))
            }
        }
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        self.neuron.params()
    }

    fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        self.neuron.params_mut()
    }

    fn output_kind(&self, inputs: &[ValueKind]) -> ValueKind {
        let &[_, shortcut] = inputs else {
            return ValueKind::Dense;
        };
        let spikes = ValueKind::Binary;
        let [a, b] = self.ordered(&spikes, &shortcut);
        self.connect().output_kind(&[*a, *b])
    }

    fn describe(&self) -> String {
        format!(
            "{} ({}) -> {}",
            self.neuron.type_name(),
            self.neuron.describe(),
            self.function.name()
        )
    }

    impl_as_any!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::neuron::{Firing, IFNode, LIFNode};
    use crate::testing::{random_sparse, random_uniform};

    #[test]
    fn equals_the_neuron_then_the_connect() {
        let x = random_uniform(&[3, 2, 32, 5, 7], -1.0, 2.5, 1);
        let shortcut = random_sparse(&[3, 2, 32, 5, 7], 0.4, true, 2);
        for function in [
            ConnectFunction::Add,
            ConnectFunction::And,
            ConnectFunction::Iand,
        ] {
            for spikes_first in [false, true] {
                let neuron = LIFNode::new(2.0, true, Firing::default()).unwrap();
                let spikes = neuron.forward(&[&x]).unwrap();
                let connect = SewConnect { function };
                let want = if spikes_first {
                    connect.forward(&[&spikes, &shortcut])
                } else {
                    connect.forward(&[&shortcut, &spikes])
                }
                .unwrap();
                let fused = NeuronConnect {
                    neuron: Box::new(neuron),
                    function,
                    spikes_first,
                };
                assert_eq!(fused.forward(&[&x, &shortcut]).unwrap(), want);
            }
        }
    }

    #[test]
    fn output_kinds_follow_the_connect_function() {
        let fused = |function, spikes_first| NeuronConnect {
            neuron: Box::new(IFNode::new(Firing::default())),
            function,
            spikes_first,
        };
        let kinds = [ValueKind::Dense, ValueKind::Binary];
        assert_eq!(
            fused(ConnectFunction::Add, false).output_kind(&kinds),
            ValueKind::SparseInteger
        );
        // shortcut · (1 − spikes) keeps the shortcut's kind; spikes · (1 − shortcut) does only
        // when the shortcut is binary.
        assert_eq!(
            fused(ConnectFunction::Iand, false).output_kind(&kinds),
            ValueKind::Binary
        );
        let integer = [ValueKind::Dense, ValueKind::SparseInteger];
        assert_eq!(
            fused(ConnectFunction::Iand, true).output_kind(&integer),
            ValueKind::Dense
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let fused = NeuronConnect {
            neuron: Box::new(IFNode::new(Firing::default())),
            function: ConnectFunction::Add,
            spikes_first: false,
        };
        let (a, b) = (Tensor::zeros(vec![2, 3]), Tensor::zeros(vec![2, 4]));
        assert!(fused.forward(&[&a, &b]).is_err());
        assert!(fused.forward(&[&a]).is_err());
    }
}
