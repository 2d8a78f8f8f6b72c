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
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::impl_as_any;
use crate::ops::linear::Linear;
use crate::ops::{expect_inputs, Operator};
use crate::tensor::Tensor;

#[derive(Debug)]
pub struct SparseLinear {
    /// The weights, as a dense layer.
    pub linear: Linear,
    last_forward: Mutex<Option<Duration>>,
}

impl SparseLinear {
    pub fn from_dense(linear: &Linear) -> Self {
        Self {
            linear: linear.clone(),
            last_forward: Mutex::new(None),
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
        self.linear.forward(&[x])
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
        self.linear.params_mut()
    }

    fn describe(&self) -> String {
        self.linear.describe()
    }

    impl_as_any!();
}
