//! `Flatten`: merges the dimensions from `start_dim` on (spikingjelly's multi-step ResNets use
//! `flatten(x, 2)` on `[T, N, C, 1, 1]`).
use crate::error::{Error, Result};
use crate::impl_as_any;
use crate::ops::{expect_inputs, Operator, ValueKind};
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq)]
pub struct Flatten {
    pub start_dim: usize,
}

impl Operator for Flatten {
    fn type_name(&self) -> &'static str {
        "Flatten"
    }
    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = expect_inputs::<1>("Flatten", inputs)?;
        if self.start_dim > x.shape().len() {
            return Err(Error::Shape(format!(
                "Flatten from dim {} of a rank-{} tensor",
                self.start_dim,
                x.shape().len()
            )));
        }
        let mut shape = x.shape()[..self.start_dim].to_vec();
        shape.push(x.shape()[self.start_dim..].iter().product());
        x.clone().reshape(shape)
    }
    fn output_kind(&self, inputs: &[ValueKind]) -> ValueKind {
        inputs.first().copied().unwrap_or(ValueKind::Dense)
    }
    fn describe(&self) -> String {
        format!("start_dim={}", self.start_dim)
    }
    impl_as_any!();
}
