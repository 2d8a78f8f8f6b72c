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
        self.forward_cuda_marking(inputs, false)
    }

    /// With `mark_masks`, the kernel also marks its outputs' two bit planes for an integer
    /// spike convolution that reads them (see `forward_cuda_connected`).
    fn forward_cuda_marking(
        &self,
        inputs: &[&DeviceTensor],
        mark_masks: bool,
    ) -> Result<DeviceTensor> {
        let [x, shortcut] = expect_inputs::<2, _>(Self::TYPE_NAME, inputs)?;
        let function = self.function.kernel_function();
        let neuron = self.neuron.as_ref();
        match forward_cuda_connected(neuron, x, shortcut, function, self.spikes_first, mark_masks) {
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
    use crate::tensor::Tensor;
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

    /// On the GPU a marking NeuronConnect's bit planes are those of the packing pass over its
    /// output, word for word, with the flags of sums in range; the integer spike kernel then
    /// computes a conv on them equal to the CPU's. Sums past 3 raise the out-of-range flag and
    /// the f32 kernel computes the conv. One neuron per thread and four; outputs poisoned.
    #[test]
    fn gpu_marked_planes_feed_the_integer_kernel() {
        use crate::cuda::{set_poison_new_tensors, DeviceTensor};
        use crate::ops::connect::Add;
        use crate::ops::conv2d::Conv2d;
        use crate::ops::sparse_conv2d::SpikeMasks;
        use crate::ops::tensor_conv::{tensor_conv_cuda, TensorConvWeights};
        use crate::testing::{assert_close_elementwise, gpu_or_skip, random_spikes};
        let Some(backend) = gpu_or_skip("gpu_marked_planes_feed_the_integer_kernel") else {
            return;
        };
        set_poison_new_tensors(true);
        let stream = backend.stream();
        let conv = Conv2d::new(
            random_uniform(&[48, 64, 3, 3], -1.0, 1.0, 5),
            Some(random_uniform(&[48], -1.0, 1.0, 6)),
            (1, 1),
            (1, 1),
            (1, 1),
            1,
        )
        .unwrap();
        let weights = TensorConvWeights::upload(&conv, &backend).unwrap();
        // [T, B, C, H, W]: 8192 neurons a step (one per thread), then 2^22 (four per thread).
        for (i, shape) in [vec![3, 2, 64, 8, 8], vec![2, 16, 64, 64, 64]]
            .iter()
            .enumerate()
        {
            let seed = 100 + 10 * i as u64;
            let x = random_uniform(shape, -1.0, 2.5, seed);
            let sum =
                |a, b| Add.forward(&[&random_spikes(shape, 0.3, a), &random_spikes(shape, 0.2, b)]);
            for (shortcut, in_range) in [
                (sum(seed + 1, seed + 2).unwrap(), true),
                (random_sparse(shape, 0.3, true, seed + 3), false),
            ] {
                let op = NeuronConnect {
                    neuron: Box::new(LIFNode::new(2.0, true, Firing::default()).unwrap()),
                    function: ConnectFunction::Add,
                    spikes_first: false,
                };
                let (dx, ds) = (
                    DeviceTensor::upload(&backend, &x).unwrap(),
                    DeviceTensor::upload(&backend, &shortcut).unwrap(),
                );
                let out = op.forward_cuda_marking(&[&dx, &ds], true).unwrap();
                let host = out.download().unwrap();
                assert_eq!(host, op.forward(&[&x, &shortcut]).unwrap(), "case {i}");
                let masks = out.spike_masks().expect("planes marked").clone();
                assert_eq!(masks.planes, 2);
                let n = (shape[0] * shape[1]) as u32;
                let dims = (n, 64, (shape[3] * shape[4]) as u32);
                let packed = SpikeMasks::pack(&out, dims, 2).unwrap();
                let flag = stream.clone_dtoh(&*masks.non_binary).unwrap();
                assert_eq!(flag, [!in_range as u32], "case {i}");
                if in_range {
                    assert_eq!(
                        stream.clone_dtoh(&masks.words).unwrap(),
                        stream.clone_dtoh(&packed.words).unwrap(),
                        "case {i}"
                    );
                    assert_eq!(stream.clone_dtoh(&*packed.non_binary).unwrap(), [0]);
                }
                // The conv over [T · B, C, H, W].
                let folded = Tensor::new(
                    vec![shape[0] * shape[1], 64, shape[3], shape[4]],
                    host.into_data(),
                )
                .unwrap();
                let want = conv.forward(&[&folded]).unwrap();
                let mut got = DeviceTensor::uninit(&backend, want.shape().to_vec()).unwrap();
                got.fill(f32::NAN).unwrap();
                // The kernels fold `[T, B]` themselves; a reshape would drop the masks.
                tensor_conv_cuda(&conv, &weights, &out, &mut got).unwrap();
                assert_close_elementwise(&got.download().unwrap(), &want, &format!("case {i}"));
            }
        }
        set_poison_new_tensors(false);
    }
}
