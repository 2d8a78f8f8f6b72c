//! `ConvNeuronPool`: a sparse convolution, the spiking neuron that alone reads its output and
//! the max-pool that alone reads the spikes ([`NeuronMaxPool`]), as one operator, which
//! `optimize` swaps in (see `optimize::fuse_conv_neuron_pools`): the stem of spiking ResNets on
//! spike-encoded images.
//!
//! The stem's convolution writes the largest map of the network (`[T, B, 64, 112, 112]`, 411 MB
//! in f32 at T=4, B=32) and only the neuron reads it back. On the GPU the tensor-core kernel
//! instead gives each CTA the T steps of its pixels and fires the neuron over T in its
//! epilogue (`tensor_conv2d_neuron`), writing spikes as bytes that the pool reads: the f32 map
//! never goes to memory. The spikes are those of the conv kernel followed by the neuron kernel,
//! bit for bit. On the CPU, and where the kernel does not apply, the operators run in turn.
use sparseflow_kernels::tensor_conv::TENSOR_TILE_P;

use crate::cuda::DeviceTensor;
use crate::error::Result;
use crate::impl_as_any;
use crate::ops::neuron::kernel_neuron_params;
use crate::ops::neuron_pool::NeuronMaxPool;
use crate::ops::sparse_conv2d::SparseConv2d;
use crate::ops::tensor_conv::{supports, tensor_conv_neuron_cuda};
use crate::ops::{expect_inputs, Operator, ValueKind};
use crate::tensor::Tensor;

#[derive(Debug)]
pub struct ConvNeuronPool {
    /// A [`SparseConv2d`] (another operator always runs apart).
    pub conv: Box<dyn Operator>,
    /// A [`NeuronMaxPool`].
    pub neuron_pool: Box<dyn Operator>,
}

impl ConvNeuronPool {
    pub const TYPE_NAME: &'static str = "ConvNeuronPool";

    /// The fused kernel, when the conv is a one-group [`SparseConv2d`], the neuron a built-in
    /// one and T (the input's leading dimension) divides the CTA's 128 pixels; `None` otherwise.
    fn forward_cuda_fused(&self, x: &DeviceTensor) -> Option<Result<DeviceTensor>> {
        let conv = self.conv.as_any().downcast_ref::<SparseConv2d>()?;
        let pooled = self.neuron_pool.as_any().downcast_ref::<NeuronMaxPool>()?;
        let steps = u32::try_from(*x.shape().first()?).ok()?;
        let neuron = kernel_neuron_params(pooled.neuron.as_ref(), steps)?;
        let fits = x.shape().len() == 5 && steps > 0 && TENSOR_TILE_P.is_multiple_of(steps);
        if !fits || !supports(&conv.conv) {
            return None;
        }
        Some((|| {
            let backend = x.backend();
            let shape = conv.conv.output_shape(x.shape())?;
            let len = shape.iter().product::<usize>();
            // SAFETY: the kernel writes a byte for every output before the pool reads them.
            let mut spikes = unsafe { backend.stream().alloc::<u8>(len.max(1))? };
            let weights = conv.tensor_weights(backend)?;
            tensor_conv_neuron_cuda(&conv.conv, &weights, x, neuron, &mut spikes)?;
            pooled
                .pool
                .forward_cuda_spike_bytes(&spikes, &shape, backend)
        })())
    }
}

impl Operator for ConvNeuronPool {
    fn type_name(&self) -> &'static str {
        Self::TYPE_NAME
    }

    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = expect_inputs::<1, _>(Self::TYPE_NAME, inputs)?;
        self.neuron_pool.forward(&[&self.conv.forward(&[x])?])
    }

    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [x] = expect_inputs::<1, _>(Self::TYPE_NAME, inputs)?;
        match self.forward_cuda_fused(x) {
            Some(out) => out,
            None => self
                .neuron_pool
                .forward_cuda(&[&self.conv.forward_cuda(&[x])?]),
        }
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        let mut params = self.conv.params();
        params.extend(self.neuron_pool.params());
        params
    }

    fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        let mut params = self.conv.params_mut();
        params.extend(self.neuron_pool.params_mut());
        params
    }

    fn output_kind(&self, _inputs: &[ValueKind]) -> ValueKind {
        ValueKind::Binary
    }

    fn describe(&self) -> String {
        format!(
            "{} -> {}",
            self.conv.describe(),
            self.neuron_pool.describe()
        )
    }

    impl_as_any!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv2d::Conv2d;
    use crate::ops::neuron::{Firing, IFNode, LIFNode, ParametricLIFNode};
    use crate::ops::pool::MaxPool2d;
    use crate::ops::sparse_conv2d::BlockChoice;
    use crate::testing::{gpu_or_skip, random_spikes, random_uniform};

    fn fused(conv: &Conv2d, neuron: Box<dyn Operator>) -> ConvNeuronPool {
        ConvNeuronPool {
            conv: Box::new(SparseConv2d::from_dense(conv, BlockChoice::Fixed(None))),
            neuron_pool: Box::new(NeuronMaxPool {
                neuron,
                pool: MaxPool2d::new((3, 3), (2, 2), (1, 1)).unwrap(),
            }),
        }
    }

    /// On the GPU the fused kernel's spikes, pooled, equal those of the tensor-core conv
    /// followed by the neuron and the pool, bit for bit (the same sums and charge equations):
    /// the 7×7 stride-2 stem and a 3×3 conv, T of 1, 2 and 4 (3 does not divide the CTA's 128
    /// pixels and runs apart), IF / LIF / PLIF with both resets, on fresh spikes; pixels past a
    /// whole CTA and channels past a whole tile included.
    #[test]
    fn gpu_fused_stem_equals_the_conv_then_the_neuron() {
        let Some(backend) = gpu_or_skip("gpu_fused_stem_equals_the_conv_then_the_neuron") else {
            return;
        };
        let mut cases = 0;
        // (T, B, Cin, Cout, H, kernel, stride, padding)
        for (i, &(t, b, cin, cout, h, k, s, p)) in [
            (4, 2, 3, 64, 30, 7, 2, 3),
            (2, 3, 3, 70, 23, 7, 2, 3),
            (1, 2, 16, 64, 17, 3, 1, 1),
            (3, 2, 3, 64, 20, 7, 2, 3),
        ]
        .iter()
        .enumerate()
        {
            let seed = 40 + 10 * i as u64;
            let conv = Conv2d::new(
                random_uniform(&[cout, cin, k, k], -0.3, 0.3, seed),
                Some(random_uniform(&[cout], -0.5, 0.0, seed + 1)),
                (s, s),
                (p, p),
                (1, 1),
                1,
            )
            .unwrap();
            let x = random_spikes(&[t, b, cin, h, h], 0.5, seed + 2);
            let neurons: [Box<dyn Operator>; 3] = [
                Box::new(IFNode::new(Firing::default())),
                Box::new(
                    LIFNode::new(
                        2.0,
                        true,
                        Firing {
                            v_reset: None,
                            ..Firing::default()
                        },
                    )
                    .unwrap(),
                ),
                Box::new(ParametricLIFNode::new(1.5, false, Firing::default()).unwrap()),
            ];
            for neuron in neurons {
                let op = fused(&conv, neuron);
                let dx = crate::cuda::DeviceTensor::upload(&backend, &x).unwrap();
                let got = op.forward_cuda(&[&dx]).unwrap().download().unwrap();
                let sparse = op.conv.as_any().downcast_ref::<SparseConv2d>().unwrap();
                // T = 3 runs apart: the conv's own dispatch.
                let conv_out = if t == 3 {
                    sparse.forward_cuda(&dx).unwrap()
                } else {
                    sparse.forward_cuda_tensor(&dx).unwrap()
                };
                let want = op.neuron_pool.forward_cuda(&[&conv_out]).unwrap();
                let want = want.download().unwrap();
                assert_eq!(got, want, "case {i}: {}", op.describe());
                assert!(
                    got.data().contains(&1.0) && got.data().contains(&0.0),
                    "case {i}"
                );
                cases += 1;
            }
        }
        println!(
            "gpu_fused_stem_equals_the_conv_then_the_neuron: {cases} cases on {}",
            backend.name()
        );
    }
}
