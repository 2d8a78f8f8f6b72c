//! `NeuronMaxPool`: a spiking neuron and the max-pool that alone reads its spikes, as one
//! operator, which `optimize` swaps in on the CPU (see `optimize::fuse_neuron_pools`).
//!
//! In spiking ResNets the stem's neuron emits the largest map of the network (`[T, N, 64, 112,
//! 112]`, 12.8 MB at T=4, N=1) and only the max-pool reads it. Run apart, the spikes are written
//! to memory and read back; here each task runs the neuron over a few channel planes for all T
//! steps and pools them while they are in cache, so only the input and the pooled output go
//! through memory. The result is the two operators' own results, bit for bit: the task calls them.
//! On the GPU one kernel does the same (`kernels-gpu/src/neuron_pool.rs`).
use std::mem::MaybeUninit;

use cudarc::driver::{LaunchConfig, PushKernelArg};
use rayon::prelude::*;
use sparseflow_kernels::neuron::Charge;
use sparseflow_kernels::neuron_pool::{
    shared_bytes, MAX_STRIDE, MAX_WINDOW, NEURON_POOL_THREADS, TILE,
};

use crate::cuda::{ByValue, DeviceTensor};
use crate::error::{Error, Result};
use crate::impl_as_any;
use crate::ops::neuron::{cuda_neuron, cuda_reset, Firing, IFNode, LIFNode, ParametricLIFNode};
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

    /// Whether `op` may run plane by plane: the built-in IF, LIF and PLIF neurons, whose every
    /// element steps over T on its own. A user's registered neuron might not (per-channel state).
    pub fn fusable(op: &dyn Operator) -> bool {
        [
            IFNode::TYPE_NAME,
            LIFNode::TYPE_NAME,
            ParametricLIFNode::TYPE_NAME,
        ]
        .contains(&op.type_name())
    }
}

impl NeuronMaxPool {
    /// `neuron_max_pool` from `x` (`[T, ..., H, W]`, rank 3 or more) into `out`
    /// (`[T, ..., OH, OW]`), every element of which it writes.
    fn launch_fused(
        &self,
        x: &DeviceTensor,
        (charge, k, firing): (Charge, f32, Firing),
        out: &mut DeviceTensor,
    ) -> Result<()> {
        let window = self.pool.cuda_window(x.shape())?;
        x.len_u32()?;
        let len = out.len_u32()?;
        let steps = x.shape()[0] as u32;
        if len == 0 {
            return Ok(());
        }
        let planes = len / steps / (window.oh * window.ow);
        let blocks = window.oh.div_ceil(TILE) * window.ow.div_ceil(TILE);
        let blocks = blocks.checked_mul(planes).ok_or_else(|| {
            Error::Shape(format!(
                "{}: {:?} is too large for one launch",
                Self::TYPE_NAME,
                x.shape()
            ))
        })?;
        let (hard, reset) = cuda_reset(&firing);
        let backend = x.backend();
        let function = backend.function("neuron_max_pool")?;
        let (window, mode) = (ByValue(window), charge as u32);
        let mut launch = backend.stream().launch_builder(&function);
        launch
            .arg(x.slice())
            .arg(out.slice_mut())
            .arg(&steps)
            .arg(&planes)
            .arg(&window)
            .arg(&mode)
            .arg(&k)
            .arg(&firing.v_threshold)
            .arg(&reset)
            .arg(&hard);
        // SAFETY: the arguments match `neuron_max_pool`'s signature and launch shape; the window
        // is at most MAX_WINDOW wide, its stride at most MAX_STRIDE, with dilation 1 (checked by
        // the caller).
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (NEURON_POOL_THREADS, 1, 1),
                shared_mem_bytes: shared_bytes(&window.0),
            })?
        };
        Ok(())
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
                    let dst =
                        unsafe { dst.slice_uninit((t * planes + first) * out_plane, step.len()) };
                    for (d, &v) in dst.iter_mut().zip(step) {
                        *d = MaybeUninit::new(v);
                    }
                }
                Ok(())
            })?;
        // SAFETY: the tasks wrote every element: each plane of each step once.
        unsafe { out.set_len(len) };
        Tensor::new(out_shape, out)
    }

    /// One kernel (`neuron_max_pool`) for a built-in neuron and a dilation-1 window of at most
    /// 3 × 3 with strides up to 3; otherwise the two operators' own kernels one after the other.
    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [x] = expect_inputs::<1, _>(Self::TYPE_NAME, inputs)?;
        let (kernel, stride) = (self.pool.kernel, self.pool.stride);
        let fits = kernel.0.max(kernel.1) <= MAX_WINDOW as usize
            && stride.0.max(stride.1) <= MAX_STRIDE as usize
            && self.pool.dilation == (1, 1);
        match cuda_neuron(self.neuron.as_ref()) {
            Some(neuron) if fits && x.shape().len() >= 3 => {
                let window = self.pool.cuda_window(x.shape())?;
                let mut shape = x.shape().to_vec();
                shape.truncate(shape.len() - 2);
                shape.extend([window.oh as usize, window.ow as usize]);
                let mut out = DeviceTensor::uninit(x.backend(), shape)?;
                self.launch_fused(x, neuron, &mut out)?;
                Ok(out)
            }
            _ => self.pool.forward_cuda(&[&self.neuron.forward_cuda(&[x])?]),
        }
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
    use crate::testing::{gpu_or_skip, random_uniform};

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

    /// The fused kernel against the CPU's neuron then max-pool, every neuron type and reset, on
    /// windows that do and do not divide the map, the output poisoned (NaN) before each launch
    /// and every element compared bit for bit.
    #[test]
    fn gpu_fused_kernel_matches_cpu() {
        let Some(backend) = gpu_or_skip("gpu_fused_kernel_matches_cpu") else {
            return;
        };
        let firings = [
            Firing::default(),
            Firing {
                v_threshold: 0.7,
                v_reset: None,
                detach_reset: false,
            },
        ];
        let neuron = |i: usize| -> Box<dyn Operator> {
            let f = firings[i / 3];
            match i % 3 {
                0 => Box::new(IFNode::new(f)),
                1 => Box::new(LIFNode::new(1.7, f.v_reset.is_some(), f).unwrap()),
                _ => Box::new(ParametricLIFNode::new(2.3, f.v_reset.is_none(), f).unwrap()),
            }
        };
        let pools = [
            MaxPool2d::new((3, 3), (2, 2), (1, 1)).unwrap(),
            MaxPool2d::new((2, 2), (2, 2), (0, 0)).unwrap(),
            MaxPool2d::new((3, 3), (1, 1), (1, 1)).unwrap(),
            MaxPool2d::new((3, 2), (2, 3), (1, 0))
                .unwrap()
                .with_ceil_mode(true),
        ];
        let mut cases = 0;
        // One tile per plane, and several with ragged edges (40 × 35 outputs at stride 1).
        for (i, shape) in
            (0..3 * firings.len()).flat_map(|i| [(i, [3, 2, 5, 13, 11]), (i, [2, 1, 3, 40, 35])])
        {
            let x = random_uniform(&shape, -1.0, 2.5, i as u64);
            let dx = DeviceTensor::upload(&backend, &x).unwrap();
            for pool in &pools {
                let fused = NeuronMaxPool {
                    neuron: neuron(i),
                    pool: pool.clone(),
                };
                let params = cuda_neuron(fused.neuron.as_ref()).expect("a built-in neuron");
                let want = fused.forward(&[&x]).unwrap();
                let mut out = DeviceTensor::uninit(&backend, want.shape().to_vec()).unwrap();
                out.fill(f32::NAN).unwrap();
                fused.launch_fused(&dx, params, &mut out).unwrap();
                let got = out.download().unwrap();
                for (e, (g, w)) in got.data().iter().zip(want.data()).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "{}: element {e}",
                        fused.describe()
                    );
                }
                assert!(want.data().contains(&1.0) && want.data().contains(&0.0));
                cases += 1;
            }
        }
        eprintln!(
            "gpu_fused_kernel_matches_cpu: {cases} cases equal on {}",
            backend.name()
        );
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
