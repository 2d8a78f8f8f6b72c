//! `SparseConv2d`: a convolution whose input is spikes (binary, or small non-negative integers
//! for SEW ResNets), computed with work proportional to the number of non-zero inputs.
//!
//! `optimize` swaps it in for every `Conv2d` fed by spiking neurons; it can also be built directly
//! from a dense layer ([`SparseConv2d::from_dense`]) or from weights and geometry
//! ([`SparseConv2d::new`]). It computes the same function as the dense [`Conv2d`] it carries, on
//! any input.
//!
//! ```
//! use sparseflow::ops::conv2d::Conv2d;
//! use sparseflow::ops::sparse_conv2d::{BlockChoice, SparseConv2d};
//! use sparseflow::ops::Operator;
//! use sparseflow::testing::random_spikes;
//! use sparseflow::Tensor;
//!
//! let weight = Tensor::new(vec![8, 4, 3, 3], (0..288).map(|i| (i % 7) as f32 - 3.0).collect())?;
//! let dense = Conv2d::new(weight, None, (1, 1), (1, 1), (1, 1), 1)?;
//! let sparse = SparseConv2d::from_dense(&dense, BlockChoice::Fixed(Some(8)));
//! // [T, N, C, H, W] spikes at 10% density.
//! let x = random_spikes(&[2, 1, 4, 16, 16], 0.1, 42);
//! let y = sparse.forward(&[&x])?;
//! assert_eq!(y, dense.forward(&[&x])?);
//! assert!(sparse.last_forward_time().is_some());
//! # Ok::<(), sparseflow::Error>(())
//! ```
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::impl_as_any;
use crate::ops::conv2d::Conv2d;
use crate::ops::{expect_inputs, Operator};
use crate::optimize::block_selector::{BlockSelector, BlockSize};
use crate::tensor::Tensor;

/// How the prescan block size is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockChoice {
    /// From the input's height at each forward.
    Auto(BlockSelector),
    /// Chosen ahead (by `optimize` from a known input size, or by the user).
    Fixed(BlockSize),
}

impl BlockChoice {
    pub fn resolve(&self, height: usize) -> BlockSize {
        match self {
            BlockChoice::Auto(selector) => selector.select(height),
            BlockChoice::Fixed(block) => *block,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            BlockChoice::Auto(_) => "auto".into(),
            BlockChoice::Fixed(Some(b)) => b.to_string(),
            BlockChoice::Fixed(None) => "none".into(),
        }
    }
}

#[derive(Debug)]
pub struct SparseConv2d {
    /// The weights and geometry, as a dense layer.
    pub conv: Conv2d,
    pub block: BlockChoice,
    last_forward: Mutex<Option<Duration>>,
}

impl SparseConv2d {
    /// A sparse twin of `conv`, carrying the same weights.
    pub fn from_dense(conv: &Conv2d, block: BlockChoice) -> Self {
        Self {
            conv: conv.clone(),
            block,
            last_forward: Mutex::new(None),
        }
    }

    /// From weights `[Cout, Cin/groups, kh, kw]`, an optional bias `[Cout]` and the geometry.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
        groups: usize,
        block: BlockChoice,
    ) -> Result<Self> {
        let conv = Conv2d::new(weight, bias, stride, padding, dilation, groups)?;
        Ok(Self::from_dense(&conv, block))
    }

    /// Wall time of the last forward, every stage included.
    pub fn last_forward_time(&self) -> Option<Duration> {
        *self.last_forward.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn compute(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&[x])
    }
}

impl Operator for SparseConv2d {
    fn type_name(&self) -> &'static str {
        "SparseConv2d"
    }

    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = expect_inputs::<1>("SparseConv2d", inputs)?;
        let start = Instant::now();
        let out = self.compute(x)?;
        *self.last_forward.lock().unwrap_or_else(|p| p.into_inner()) = Some(start.elapsed());
        Ok(out)
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        self.conv.params()
    }

    fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        self.conv.params_mut()
    }

    fn describe(&self) -> String {
        format!("{} block={}", self.conv.describe(), self.block.describe())
    }

    impl_as_any!();
}
