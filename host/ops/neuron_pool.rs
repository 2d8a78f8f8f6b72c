//! `NeuronMaxPool`: a spiking neuron and the max-pool that alone reads its spikes, as one
//! operator, which `optimize` swaps in (see `optimize::fuse_neuron_pools`). On the GPU the
//! neuron hands the pool its spikes as bytes, a quarter of the f32 map's traffic.
//!
//! In spiking ResNets the stem's neuron emits the largest map of the network (`[T, N, 64, 112,
//! 112]`, 12.8 MB at T=4, N=1) and only the max-pool reads it. Run apart, the spikes are written
//! to memory and read back; here each task runs the neuron over a few channel planes for all T
//! steps and pools them while they are in cache, so only the input and the pooled output go
//! through memory. The result is the two operators' own results, bit for bit: the task calls them.
use rayon::prelude::*;

use crate::cuda::DeviceTensor;
use crate::error::Result;
use crate::impl_as_any;
use crate::ops::neuron::{as_spiking_neuron, neuron_max_pool_cuda};
use crate::ops::pool::MaxPool2d;
use crate::ops::spike_gather::DisjointWrites;
use crate::ops::{expect_inputs, Operator, ValueKind};
use crate::tensor::Tensor;

/// Input bytes per task (all T steps of its planes): the spikes made from them stay in L2.
const TASK_BYTES: usize = 256 * 1024;

#[derive(Debug)]
pub struct NeuronMaxPool {
    /// A neuron that acts element by element over `[T, ...]` ([`NeuronMaxPool::fusable`]).
    pub neuron: Box<dyn Operator>,
    pub pool: MaxPool2d,
}

impl NeuronMaxPool {
    pub const TYPE_NAME: &'static str = "NeuronMaxPool";

    /// Whether `op` may run on a part of its input at a time: the built-in IF, LIF and PLIF
    /// neurons, whose every element steps over T on its own. A user's registered neuron might not
    /// (per-channel state).
    pub fn fusable(op: &dyn Operator) -> bool {
        as_spiking_neuron(op).is_some()
    }
}

impl Operator for NeuronMaxPool {
    fn type_name(&self) -> &'static str {
        Self::TYPE_NAME
    }

    /// `x`: `[T, ..., H, W]`; the output is `[T, ..., OH, OW]`.
    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = expect_inputs::<1, _>(Self::TYPE_NAME, inputs)?;
        let shape = x.shape();
        let rank = shape.len();
        if rank < 3 || x.is_empty() {
            // The operators themselves word the shape errors (or compute the empty result).
            return self.pool.forward(&[&self.neuron.forward(&[x])?]);
        }
        let (steps, h, w) = (shape[0], shape[rank - 2], shape[rank - 1]);
        let planes: usize = shape[1..rank - 2].iter().product();
        let (oh, ow) = self.pool.output_hw(h, w)?;
        let (plane, out_plane) = (h * w, oh * ow);
        let group = (TASK_BYTES / (4 * steps * plane)).clamp(1, planes);
        let mut out_shape = shape[..rank - 2].to_vec();
        out_shape.extend([oh, ow]);
        let len = steps * planes * out_plane;
        let mut out = Vec::<f32>::with_capacity(len);
        let dst = DisjointWrites(out.as_mut_ptr());
        (0..planes.div_ceil(group))
            .into_par_iter()
            .try_for_each(|task| -> Result<()> {
                let first = task * group;
                let count = group.min(planes - first);
                let mut local = Vec::with_capacity(steps * count * plane);
                for t in 0..steps {
                    local.extend_from_slice(
                        &x.data()[(t * planes + first) * plane..][..count * plane],
                    );
                }
                let local = Tensor::new(vec![steps, count, h, w], local)?;
                let pooled = self.pool.forward(&[&self.neuron.forward(&[&local])?])?;
                for (t, step) in pooled.data().chunks_exact(count * out_plane).enumerate() {
                    // SAFETY: task `task` alone writes planes first..first + count of every step,
                    // which lie inside the `len` elements allocated.
                    unsafe { dst.copy_from((t * planes + first) * out_plane, step) };
                }
                Ok(())
            })?;
        // SAFETY: the tasks wrote every element: each plane of each step once.
        unsafe { out.set_len(len) };
        Tensor::new(out_shape, out)
    }

    /// A built-in neuron writes its spikes as bytes and the pool reads them
    /// (`neuron_max_pool_cuda`); another neuron runs the two operators one after the other.
    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [x] = expect_inputs::<1, _>(Self::TYPE_NAME, inputs)?;
        if let Some(out) = neuron_max_pool_cuda(self.neuron.as_ref(), &self.pool, x) {
            return out;
        }
        let spikes = self.neuron.forward_cuda(&[x])?;
        self.pool.forward_cuda(&[&spikes])
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        self.neuron.params()
    }

    fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        self.neuron.params_mut()
    }

    /// The max of spikes is a spike.
    fn output_kind(&self, _inputs: &[ValueKind]) -> ValueKind {
        ValueKind::Binary
    }

    fn describe(&self) -> String {
        format!(
            "{} ({}) -> MaxPool2d {}",
            self.neuron.type_name(),
            self.neuron.describe(),
            self.pool.describe()
        )
    }

    impl_as_any!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::neuron::{Firing, LIFNode};
    use crate::testing::random_uniform;

    fn lif() -> LIFNode {
        LIFNode::new(2.0, true, Firing::default()).unwrap()
    }

    #[test]
    fn equals_the_neuron_then_the_pool() {
        // Plane groups of several sizes: 1 plane per task at 112², many at 9².
        for (shape, pool) in [
            (
                vec![3, 2, 5, 9, 9],
                MaxPool2d::new((3, 3), (2, 2), (1, 1)).unwrap(),
            ),
            (
                vec![2, 1, 3, 112, 112],
                MaxPool2d::new((3, 3), (2, 2), (1, 1)).unwrap(),
            ),
            (
                vec![4, 3, 8, 7],
                MaxPool2d::new((2, 2), (2, 2), (0, 0)).unwrap(),
            ),
        ] {
            let x = random_uniform(&shape, -1.0, 3.0, shape.len() as u64);
            let fused = NeuronMaxPool {
                neuron: Box::new(lif()),
                pool: pool.clone(),
            };
            let want = pool.forward(&[&lif().forward(&[&x]).unwrap()]).unwrap();
            let got = fused.forward(&[&x]).unwrap();
            assert_eq!(got, want, "{shape:?}");
            assert!(got.data().contains(&1.0), "{shape:?}: some spikes");
        }
    }

    #[test]
    fn bad_inputs_are_the_operators_errors() {
        let fused = NeuronMaxPool {
            neuron: Box::new(lif()),
            pool: MaxPool2d::new((3, 3), (2, 2), (0, 0)).unwrap(),
        };
        // Smaller than the window, and no H, W at all.
        assert!(fused.forward(&[&Tensor::zeros(vec![2, 1, 2, 2])]).is_err());
        assert!(fused.forward(&[&Tensor::zeros(vec![2, 4])]).is_err());
        assert!(fused.forward(&[]).is_err());
    }
}
