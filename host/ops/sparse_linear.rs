//! `SparseLinear`: a fully connected layer whose input is spikes `[T, N, F]`, computed from the
//! active input features only.
//!
//! ```
//! use sparseflow::ops::linear::Linear;
//! use sparseflow::ops::sparse_linear::SparseLinear;
//! use sparseflow::ops::Operator;
//! use sparseflow::testing::random_spikes;
//! use sparseflow::Tensor;
//!
//! let weight = Tensor::new(vec![3, 16], (0..48).map(|i| (i % 5) as f32 * 0.5).collect())?;
//! let dense = Linear::new(weight, Some(Tensor::new(vec![3], vec![0.1, 0.2, 0.3])?))?;
//! let sparse = SparseLinear::from_dense(&dense);
//! let x = random_spikes(&[4, 2, 16], 0.2, 7);
//! assert_eq!(sparse.forward(&[&x])?, dense.forward(&[&x])?);
//! # Ok::<(), sparseflow::Error>(())
//! ```
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{LaunchConfig, PushKernelArg};
use rayon::prelude::*;
use sparseflow_kernels::sparse_conv::{CONV_THREADS, COUT_PER_PASS};

use crate::cuda::{CudaBackend, DeviceTensor};
use crate::error::{Error, Result};
use crate::impl_as_any;
use crate::ops::linear::Linear;
use crate::ops::spike_gather::{
    accumulate, cached_upload, has_avx2, DeviceGatherWeights, GatherWeights,
};
use crate::ops::{expect_inputs, Operator};
use crate::tensor::Tensor;

#[derive(Debug)]
pub struct SparseLinear {
    /// The weights, as a dense layer.
    pub linear: Linear,
    /// Inputs denser than this fraction of non-zeros take the dense path
    /// ([`DENSE_ABOVE_DENSITY`] by default; `f64::INFINITY` forces the sparse kernel).
    pub dense_above_density: f64,
    last_forward: Mutex<Option<Duration>>,
    gather: Mutex<Option<Arc<GatherWeights>>>,
    device: Mutex<Option<Arc<DeviceGatherWeights>>>,
}

impl SparseLinear {
    /// A sparse twin of `linear`, carrying the same weights (laid out for gathering now).
    pub fn from_dense(linear: &Linear) -> Self {
        let op = Self {
            linear: linear.clone(),
            dense_above_density: DENSE_ABOVE_DENSITY,
            last_forward: Mutex::new(None),
            gather: Mutex::new(None),
            device: Mutex::new(None),
        };
        op.gather_weights();
        op
    }

    /// From weights `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self::from_dense(&Linear::new(weight, bias)?))
    }

    /// The layer on a CUDA tensor `[..., F]`, staying on the device: one warp per row and 64
    /// outputs votes which inputs are non-zero and gathers only their weight rows.
    pub fn forward_cuda(&self, x: &DeviceTensor) -> Result<DeviceTensor> {
        let mut out = DeviceTensor::uninit(x.backend(), self.output_shape(x)?)?;
        self.forward_cuda_into(x, &mut out)?;
        Ok(out)
    }

    fn output_shape(&self, x: &DeviceTensor) -> Result<Vec<usize>> {
        let features = self.linear.in_features();
        if x.shape().last().copied() != Some(features) {
            return Err(Error::Shape(format!(
                "SparseLinear takes [..., {features}], got {:?}",
                x.shape()
            )));
        }
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("rank >= 1") = self.linear.out_features();
        Ok(shape)
    }

    /// [`forward_cuda`](Self::forward_cuda) into a preallocated output of the right shape.
    pub fn forward_cuda_into(&self, x: &DeviceTensor, out: &mut DeviceTensor) -> Result<()> {
        let start = Instant::now();
        let shape = self.output_shape(x)?;
        if out.shape() != shape.as_slice() {
            return Err(Error::Shape(format!(
                "output is {:?}, expected {shape:?}",
                out.shape()
            )));
        }
        let features = self.linear.in_features();
        let outputs = self.linear.out_features();
        let rows: usize = x.shape()[..x.shape().len() - 1].iter().product();
        x.len_u32()?;
        out.len_u32()?;
        let widest = features.max(outputs.div_ceil(64) * 64);
        if rows
            .checked_mul(widest)
            .is_none_or(|v| v > u32::MAX as usize)
        {
            return Err(Error::Shape(format!(
                "{:?} is too large for the GPU kernels",
                x.shape()
            )));
        }
        let backend = x.backend().clone();
        if rows == 0 || outputs == 0 {
            return Ok(());
        }
        let device = self.device_weights(&backend)?;
        let (weights, bias, out_pad) = (&device.weights, &device.bias, device.padded_outputs);
        let chunks = (out_pad / COUT_PER_PASS as usize) as u32;
        let warps = rows as u32 * chunks;
        let blocks = (warps * 32).div_ceil(CONV_THREADS);
        let function = backend.function("sparse_linear")?;
        let dims = [rows, features, outputs, out_pad].map(|v| v as u32);
        let stream = backend.stream();
        let mut launch = stream.launch_builder(&function);
        launch
            .arg(x.slice())
            .arg(weights)
            .arg(bias)
            .arg(out.slice_mut());
        for d in &dims {
            launch.arg(d);
        }
        // SAFETY: the arguments match `sparse_linear`'s signature and contract.
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (CONV_THREADS, 1, 1),
                shared_mem_bytes: 0,
            })?
        };
        *self.last_forward.lock().unwrap_or_else(|p| p.into_inner()) = Some(start.elapsed());
        Ok(())
    }

    /// Weights `[F, out_pad]` and bias `[out_pad]` on `backend`'s device, uploaded on first use.
    fn device_weights(&self, backend: &Arc<CudaBackend>) -> Result<Arc<DeviceGatherWeights>> {
        cached_upload(
            &self.device,
            backend,
            |_| true,
            || {
                self.gather_weights().upload(
                    backend,
                    self.linear.bias.as_ref(),
                    COUT_PER_PASS as usize,
                    0,
                )
            },
        )
    }

    /// Wall time of the last forward.
    pub fn last_forward_time(&self) -> Option<Duration> {
        *self.last_forward.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn compute(&self, x: &Tensor) -> Result<Tensor> {
        let features = self.linear.in_features();
        let (rows, tail) = x.split_trailing(1)?;
        if tail != [features] {
            return self.linear.forward(&[x]); // the dense layer words the shape error
        }
        let nonzeros = x.data().iter().filter(|&&v| v != 0.0).count();
        if nonzeros as f64 > self.dense_above_density * x.len() as f64 {
            return self.linear.forward(&[x]);
        }
        let weights = self.gather_weights();
        let outputs = self.linear.out_features();
        let bias: Vec<f32> = match &self.linear.bias {
            Some(b) => {
                let mut b = b.data().to_vec();
                b.resize(weights.padded_outputs, 0.0);
                b
            }
            None => vec![0.0; weights.padded_outputs],
        };
        let chunks = weights.chunks();
        let avx2 = has_avx2();
        let mut out = vec![0.0f32; rows * outputs];
        out.par_chunks_mut(outputs.max(1))
            .zip(x.data().par_chunks(features.max(1)))
            .for_each_init(
                || (Vec::new(), vec![0.0f32; weights.padded_outputs]),
                |(active, padded_row), (out_row, in_row)| {
                    active.clear();
                    active.extend(
                        in_row
                            .iter()
                            .enumerate()
                            .filter(|(_, &v)| v != 0.0)
                            .map(|(f, &v)| (f, v)),
                    );
                    let job = LinearRow {
                        weights: &weights,
                        bias: &bias,
                        chunks: &chunks,
                        active,
                    };
                    #[cfg(target_arch = "x86_64")]
                    if avx2 {
                        // SAFETY: AVX2 and FMA were detected.
                        unsafe { job.run_avx2(padded_row) };
                    } else {
                        job.run(padded_row);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    {
                        let _ = avx2;
                        job.run(padded_row);
                    }
                    out_row.copy_from_slice(&padded_row[..outputs]);
                },
            );
        let mut shape = x.shape().to_vec();
        *shape.last_mut().expect("rank >= 1") = outputs;
        Tensor::new(shape, out)
    }

    /// The weights as `[in, out]` rows, built on first use.
    fn gather_weights(&self) -> Arc<GatherWeights> {
        let mut cached = self.gather.lock().unwrap_or_else(|p| p.into_inner());
        cached
            .get_or_insert_with(|| {
                Arc::new(GatherWeights::from_output_major(
                    self.linear.weight.data(),
                    self.linear.out_features(),
                    self.linear.in_features(),
                    |k| k,
                ))
            })
            .clone()
    }
}

/// Above this fraction of non-zero inputs the dense GEMM is faster.
pub const DENSE_ABOVE_DENSITY: f64 = 0.25;

/// One output row: bias plus the weight rows of the row's active features.
struct LinearRow<'a> {
    weights: &'a GatherWeights,
    bias: &'a [f32],
    chunks: &'a [(usize, usize)],
    active: &'a [(usize, f32)],
}

impl LinearRow<'_> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,popcnt,bmi1,bmi2")]
    unsafe fn run_avx2(&self, out: &mut [f32]) {
        self.run(out)
    }

    #[inline(always)]
    fn run(&self, out: &mut [f32]) {
        for &(start, width) in self.chunks {
            match width {
                64 => self.chunk::<64>(out, start),
                32 => self.chunk::<32>(out, start),
                16 => self.chunk::<16>(out, start),
                _ => self.chunk::<8>(out, start),
            }
        }
    }

    #[inline(always)]
    fn chunk<const CH: usize>(&self, out: &mut [f32], start: usize) {
        let mut acc = [0.0f32; CH];
        acc.copy_from_slice(&self.bias[start..start + CH]);
        let base = self.weights.chunk(start).as_ptr();
        for &(f, value) in self.active {
            // SAFETY: f < in_features rows of CH lanes in this chunk.
            unsafe { accumulate::<CH, false>(&mut acc, base.add(f * CH), value) };
        }
        out[start..start + CH].copy_from_slice(&acc);
    }
}

impl Operator for SparseLinear {
    fn type_name(&self) -> &'static str {
        "SparseLinear"
    }

    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [x] = expect_inputs::<1, _>("SparseLinear", inputs)?;
        self.forward_cuda(x)
    }

    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = expect_inputs::<1, _>("SparseLinear", inputs)?;
        let start = Instant::now();
        let out = self.compute(x)?;
        *self.last_forward.lock().unwrap_or_else(|p| p.into_inner()) = Some(start.elapsed());
        Ok(out)
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        self.linear.params()
    }

    fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        *self.gather.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
        *self.device.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
        self.linear.params_mut()
    }

    fn describe(&self) -> String {
        self.linear.describe()
    }

    impl_as_any!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close_elementwise, gpu_or_skip, SplitMix64};

    /// The GPU kernel against the CPU dense layer on fresh random inputs, binary and integer,
    /// output poisoned (NaN) before the launch, every element checked.
    #[test]
    fn gpu_sparse_linear_matches_cpu() {
        let Some(backend) = gpu_or_skip("gpu_sparse_linear_matches_cpu") else {
            return;
        };
        let mut rng = SplitMix64::new(77);
        let mut random = |n: usize, scale: f32| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
                .collect()
        };
        for &(rows, features, outputs) in
            &[(1, 1, 1), (8, 512, 10), (3, 100, 130), (64, 2048, 1000)]
        {
            for &density in &[0.0, 0.05, 0.5, 1.0] {
                let linear = Linear::new(
                    Tensor::new(vec![outputs, features], random(outputs * features, 0.1)).unwrap(),
                    Some(Tensor::new(vec![outputs], random(outputs, 0.1)).unwrap()),
                )
                .unwrap();
                let x: Vec<f32> = random(rows * features, 1.0)
                    .into_iter()
                    .map(|u| {
                        if (u.abs() as f64) < density {
                            (u.abs() * 3.0).ceil()
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let x = Tensor::new(vec![rows, features], x).unwrap();
                let want = linear.forward(&[&x]).unwrap();
                let sparse = SparseLinear::from_dense(&linear);
                let mut out = DeviceTensor::uninit(&backend, want.shape().to_vec()).unwrap();
                out.fill(f32::NAN).unwrap();
                sparse
                    .forward_cuda_into(&DeviceTensor::upload(&backend, &x).unwrap(), &mut out)
                    .unwrap();
                let got = out.download().unwrap();
                assert_close_elementwise(
                    &got,
                    &want,
                    &format!("{rows}x{features}->{outputs} density {density}"),
                );
            }
        }
    }
}
