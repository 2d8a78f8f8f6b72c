//! Operators, one module each: the CPU code, the GPU launch and the tests of an operator live
//! together in its file.
//!
//! Every graph node holds a `Box<dyn Operator>`: plain data (weights, geometry, neuron parameters)
//! that the optimize passes can inspect by downcasting (`as_any`) and replace.
//!
//! Tensor conventions (spikingjelly's multi-step mode): activations are `[T, N, C, H, W]` or
//! `[T, N, F]`. Stateless operators treat every leading dimension before the ones they act on as
//! batch (so T folds into N); neurons iterate over dimension 0 (T).
use std::any::Any;
use std::fmt::Debug;

use crate::cuda::DeviceTensor;
use crate::error::Result;
use crate::tensor::Tensor;

pub mod add_neuron;
pub mod batch_norm;
pub mod connect;
pub mod conv2d;
pub mod conv_neuron_pool;
pub mod flatten;
pub mod linear;
pub mod neuron;
pub mod neuron_connect;
pub mod neuron_pool;
pub mod pattern_conv;
pub mod pool;
pub mod prescan;
pub mod sparse_conv2d;
pub mod sparse_linear;
pub mod spike_gather;
pub mod tensor_conv;

/// What the values of a tensor are known to be, from the graph's structure alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ValueKind {
    /// Every element is 0 or 1 (spikes).
    Binary,
    /// Every element is a small non-negative integer (e.g. the SEW ADD of spikes).
    SparseInteger,
    /// Anything.
    Dense,
}

impl ValueKind {
    /// The kind of a value that may come from either input: the weaker guarantee.
    pub fn join(self, other: ValueKind) -> ValueKind {
        self.max(other)
    }

    /// What `t`'s values are: [`ValueKind::Binary`] when every element is 0 or 1 (e.g. images
    /// already encoded as Poisson spikes), [`ValueKind::SparseInteger`] when every element is a
    /// non-negative integer, else dense. For a graph input, this is what
    /// [`crate::optimize::OptimizeOptions::input_kind`] can be set to.
    pub fn of_tensor(t: &Tensor) -> ValueKind {
        let data = t.data();
        if data.iter().all(|&v| v == 0.0 || v == 1.0) {
            ValueKind::Binary
        } else if data.iter().all(|&v| v >= 0.0 && v.fract() == 0.0) {
            ValueKind::SparseInteger
        } else {
            ValueKind::Dense
        }
    }

    /// Binary or integer-valued: the values a sparse operator exploits.
    pub fn is_sparse(self) -> bool {
        self != ValueKind::Dense
    }
}

/// A graph operator.
pub trait Operator: Debug + Send + Sync + 'static {
    /// The operator's type name, e.g. `"Conv2d"` or `"LIFNode"`.
    fn type_name(&self) -> &'static str;

    /// Computes the output from the inputs, in the order of the node's input edges.
    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor>;

    /// The same computation on CUDA tensors: inputs and output stay on the device. Operators
    /// without a GPU kernel say so with [`Error::MissingKernelVariant`](crate::Error).
    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let _ = inputs;
        Err(crate::Error::MissingKernelVariant(format!(
            "{} on CUDA",
            self.type_name()
        )))
    }

    /// [`forward_cuda`](Self::forward_cuda) when some reader of the output
    /// [`reads_spike_masks`](Self::reads_spike_masks): a spiking neuron then also marks its
    /// spikes in channel masks attached to the output. Other operators ignore the request.
    fn forward_cuda_marking(
        &self,
        inputs: &[&DeviceTensor],
        mark_masks: bool,
    ) -> Result<DeviceTensor> {
        let _ = mark_masks;
        self.forward_cuda(inputs)
    }

    /// Whether the CUDA forward packs its input into channel masks (a spike convolution on the
    /// tensor cores), and so gains from masks its producer marked.
    fn reads_spike_masks(&self) -> bool {
        false
    }

    /// Parameters by local name (`"weight"`, `"running_mean"`, …), as in a PyTorch `state_dict`.
    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        Vec::new()
    }

    /// Mutable access to the same parameters, for loading weights.
    fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        Vec::new()
    }

    /// What kind of values this operator outputs given its inputs' kinds; the optimize analyzer
    /// propagates kinds through the graph with it. Spiking neurons are not asked: the analyzer's
    /// registry knows them. The default, `Dense`, is always safe.
    fn output_kind(&self, inputs: &[ValueKind]) -> ValueKind {
        let _ = inputs;
        ValueKind::Dense
    }

    /// A one-line description of the configuration, e.g. `"3x3 s1 p1 64->64"`.
    fn describe(&self) -> String {
        String::new()
    }

    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Implements the `as_any` boilerplate of [`Operator`].
#[macro_export]
macro_rules! impl_as_any {
    () => {
        fn as_any(&self) -> &dyn ::std::any::Any {
            self
        }
        fn as_any_mut(&mut self) -> &mut dyn ::std::any::Any {
            self
        }
    };
}

/// Checks an operator's input count (host or device tensors).
pub(crate) fn expect_inputs<'a, const K: usize, T>(
    op: &str,
    inputs: &[&'a T],
) -> Result<[&'a T; K]> {
    <[&T; K]>::try_from(inputs).map_err(|_| {
        crate::Error::InvalidArgument(format!("{op} takes {K} input(s), got {}", inputs.len()))
    })
}
