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

use rayon::prelude::*;

use crate::error::Result;
use crate::impl_as_any;
use crate::ops::linear::Linear;
use crate::ops::spike_gather::{accumulate, has_avx2, GatherWeights};
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
}

impl SparseLinear {
    pub fn from_dense(linear: &Linear) -> Self {
        Self {
            linear: linear.clone(),
            dense_above_density: DENSE_ABOVE_DENSITY,
            last_forward: Mutex::new(None),
            gather: Mutex::new(None),
        }
    }

    /// From weights `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self::from_dense(&Linear::new(weight, bias)?))
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
    #[target_feature(enable = "avx2,fma")]
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
        let base = self.weights.data[start..].as_ptr();
        for &(f, value) in self.active {
            // SAFETY: f < in_features rows and start + CH <= padded outputs.
            unsafe {
                accumulate::<CH, false>(&mut acc, base.add(f * self.weights.padded_outputs), value)
            };
        }
        out[start..start + CH].copy_from_slice(&acc);
    }
}

impl Operator for SparseLinear {
    fn type_name(&self) -> &'static str {
        "SparseLinear"
    }

    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = expect_inputs::<1>("SparseLinear", inputs)?;
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
        self.linear.params_mut()
    }

    fn describe(&self) -> String {
        self.linear.describe()
    }

    impl_as_any!();
}
