//! `Flatten`: merges the dimensions from `start_dim` on (spikingjelly's multi-step ResNets use
//! `flatten(x, 2)` on `[T, N, C, 1, 1]`).
use crate::cuda::DeviceTensor;
use crate::error::{Error, Result};
use crate::impl_as_any;
use crate::ops::{expect_inputs, Operator, ValueKind};
use crate::tensor::Tensor;

#[derive(Clone, Debug, PartialEq)]
pub struct Flatten {
    pub start_dim: usize,
}

impl Flatten {
    fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        if self.start_dim > input.len() {
            return Err(Error::Shape(format!(
                "Flatten from dim {} of a rank-{} tensor",
                self.start_dim,
                input.len()
            )));
        }
        let mut shape = input[..self.start_dim].to_vec();
        shape.push(input[self.start_dim..].iter().product());
        Ok(shape)
    }
}

impl Operator for Flatten {
    fn type_name(&self) -> &'static str {
        "Flatten"
    }
    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = expect_inputs::<1, _>("Flatten", inputs)?;
        x.clone().reshape(self.output_shape(x.shape())?)
    }
    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [x] = expect_inputs::<1, _>("Flatten", inputs)?;
        x.try_clone()?.reshape(self.output_shape(x.shape())?)
    }
    fn output_kind(&self, inputs: &[ValueKind]) -> ValueKind {
        inputs.first().copied().unwrap_or(ValueKind::Dense)
    }
    fn describe(&self) -> String {
        format!("start_dim={}", self.start_dim)
    }
    impl_as_any!();
}
