//! `AddNeuron`: a residual [`Add`] and the spiking neuron that alone reads the sum, as one
//! operator, which `optimize` swaps in (see `optimize::fuse_add_neurons`).
//!
//! Every block of a spiking ResNet ends with `sn2(bn2(conv2(x)) + shortcut)`. Run apart, the sum
//! goes to memory and the neuron reads it back; here each task adds a range of neurons for all T
//! steps into a buffer that stays in cache and runs the neuron on it. The result is the two
//! operators' own, bit for bit: the task computes `a + b` as `Add` does and calls the neuron.
//! On the GPU one kernel (`neuron_multi_step_add`) adds as it reads, with the neuron's own steps.
use rayon::prelude::*;

use crate::cuda::DeviceTensor;
use crate::error::{Error, Result};
use crate::impl_as_any;
use crate::ops::connect::Add;
use crate::ops::neuron::forward_cuda_added;
use crate::ops::spike_gather::DisjointWrites;
use crate::ops::{expect_inputs, Operator, ValueKind};
use crate::tensor::Tensor;

/// Input bytes per task (both operands, all T steps of its neurons): the sum stays in L2.
const TASK_BYTES: usize = 256 * 1024;

/// Below this many elements the two operators simply run in turn (ResNet's 14² and 7² maps at
/// N=1: the fused tasks measured slower there, 0.16 against 0.11 ms at 512 × 7²).
const SMALL_ELEMENTS: usize = 1 << 17;

#[derive(Debug)]
pub struct AddNeuron {
    /// A neuron that acts element by element over `[T, ...]` (`NeuronMaxPool::fusable`).
    pub neuron: Box<dyn Operator>,
}

impl AddNeuron {
    pub const TYPE_NAME: &'static str = "AddNeuron";
}

impl Operator for AddNeuron {
    fn type_name(&self) -> &'static str {
        Self::TYPE_NAME
    }

    /// `neuron(a + b)` for `a`, `b` of the same shape `[T, ...]`.
    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [a, b] = expect_inputs::<2, _>(Self::TYPE_NAME, inputs)?;
        if a.shape() != b.shape() {
            return Err(Error::Shape(format!(
                "{}: input shapes differ: {:?} vs {:?}",
                Self::TYPE_NAME,
                a.shape(),
                b.shape()
            )));
        }
        let Some(&steps) = a
            .shape()
            .first()
            .filter(|&&t| t > 0 && a.len() >= SMALL_ELEMENTS)
        else {
            // Small maps fit in cache anyway, so tasks would only add overhead; and the operators
            // themselves word the errors (or compute the empty result).
            return self.neuron.forward(&[&Add.forward(&[a, b])?]);
        };
        let per_step = a.len() / steps;
        let chunk = (TASK_BYTES / (8 * steps)).clamp(1, per_step);
        let mut out = Vec::<f32>::with_capacity(a.len());
        let dst = DisjointWrites(out.as_mut_ptr());
        (0..per_step.div_ceil(chunk))
            .into_par_iter()
            .try_for_each(|task| -> Result<()> {
                let first = task * chunk;
                let count = chunk.min(per_step - first);
                let mut sum = Vec::with_capacity(steps * count);
                for t in 0..steps {
                    let at = t * per_step + first;
                    let (xs, ys) = (&a.data()[at..at + count], &b.data()[at..at + count]);
                    sum.extend(xs.iter().zip(ys).map(|(&x, &y)| x + y));
                }
                let spikes = self
                    .neuron
                    .forward(&[&Tensor::new(vec![steps, count], sum)?])?;
                for (t, step) in spikes.data().chunks_exact(count).enumerate() {
                    // SAFETY: task `task` alone writes neurons first..first + count of every
                    // step, which lie inside the `a.len()` elements allocated.
                    unsafe { dst.copy_from(t * per_step + first, step) };
                }
                Ok(())
            })?;
        // SAFETY: the tasks wrote every element: each neuron of each step once.
        unsafe { out.set_len(a.len()) };
        Tensor::new(a.shape().to_vec(), out)
    }

    /// One kernel for a built-in neuron (`neuron_multi_step_add`: the sum never written), else
    /// the two operators' kernels one after the other.
    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        self.forward_cuda_marking(inputs, false)
    }

    fn forward_cuda_marking(
        &self,
        inputs: &[&DeviceTensor],
        mark_masks: bool,
    ) -> Result<DeviceTensor> {
        let [a, b] = expect_inputs::<2, _>(Self::TYPE_NAME, inputs)?;
        match forward_cuda_added(self.neuron.as_ref(), a, b, mark_masks) {
            Some(spikes) => spikes,
            None => self
                .neuron
                .forward_cuda_marking(&[&Add.forward_cuda(inputs)?], mark_masks),
        }
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        self.neuron.params()
    }

    fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        self.neuron.params_mut()
    }

    fn output_kind(&self, _inputs: &[ValueKind]) -> ValueKind {
        ValueKind::Binary
    }

    fn describe(&self) -> String {
        format!(
            "Add -> {} ({})",
            self.neuron.type_name(),
            self.neuron.describe()
        )
    }

    impl_as_any!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::neuron::{Firing, LIFNode, ParametricLIFNode};
    use crate::testing::random_uniform;

    #[test]
    fn equals_the_add_then_the_neuron() {
        // Tasks of one, several, and a ragged last range of neurons; and a small map.
        for (i, shape) in [vec![4, 1, 64, 56, 56], vec![2, 3, 100, 7, 99], vec![2, 7]]
            .into_iter()
            .enumerate()
        {
            let a = random_uniform(&shape, -1.0, 2.0, i as u64);
            let b = random_uniform(&shape, -0.5, 1.0, 10 + i as u64);
            let neurons: [Box<dyn Operator>; 2] = [
                Box::new(LIFNode::new(2.0, true, Firing::default()).unwrap()),
                Box::new(ParametricLIFNode::new(2.5, false, Firing::default()).unwrap()),
            ];
            for neuron in neurons {
                let want = neuron.forward(&[&Add.forward(&[&a, &b]).unwrap()]).unwrap();
                let fused = AddNeuron { neuron };
                let got = fused.forward(&[&a, &b]).unwrap();
                assert_eq!(got, want, "{shape:?} {}", fused.describe());
                assert!(got.data().contains(&1.0) && got.data().contains(&0.0));
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let fused = AddNeuron {
            neuron: Box::new(LIFNode::new(2.0, true, Firing::default()).unwrap()),
        };
        let (a, b) = (Tensor::zeros(vec![2, 3]), Tensor::zeros(vec![2, 4]));
        assert!(fused.forward(&[&a, &b]).is_err());
        assert!(fused.forward(&[&a]).is_err());
    }
}
