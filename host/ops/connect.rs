//! Joining a residual branch with its shortcut: the plain `Add` of spiking ResNets and the SEW
//! connect functions of SEW ResNets (ADD, AND, IAND).
use cudarc::driver::PushKernelArg;
use rayon::prelude::*;
use sparseflow_kernels::elementwise::{BinaryFunction, ELEMENTWISE_THREADS};

use crate::cuda::{elementwise_config, DeviceTensor};
use crate::error::{Error, Result};
use crate::impl_as_any;
use crate::ops::{expect_inputs, Operator, ValueKind};
use crate::tensor::Tensor;

/// spikingjelly's `cnf` argument of SEW ResNets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFunction {
    /// `a + b`: spikes summed into small non-negative integers.
    Add,
    /// `a · b`
    And,
    /// `a · (1 − b)`: the first input passes where the second did not fire.
    Iand,
}

impl ConnectFunction {
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "add" => Ok(Self::Add),
            "and" => Ok(Self::And),
            "iand" => Ok(Self::Iand),
            other => Err(Error::InvalidArgument(format!(
                "unknown connect function `{other}`: expected add, and or iand"
            ))),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::And => "AND",
            Self::Iand => "IAND",
        }
    }

    /// The same function in the kernel crate, which both devices evaluate.
    pub(crate) fn kernel_function(&self) -> BinaryFunction {
        match self {
            Self::Add => BinaryFunction::Add,
            Self::And => BinaryFunction::Mul,
            Self::Iand => BinaryFunction::AndNot,
        }
    }

    fn apply(&self, a: f32, b: f32) -> f32 {
        sparseflow_kernels::elementwise::apply_binary(self.kernel_function() as u32, a, b)
    }
}

fn zip_same_shape(
    op: &str,
    a: &Tensor,
    b: &Tensor,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<Tensor> {
    if a.shape() != b.shape() {
        return Err(Error::Shape(format!(
            "{op}: input shapes differ: {:?} vs {:?}",
            a.shape(),
            b.shape()
        )));
    }
    // Large maps are split over the rayon threads in chunks big enough to amortise scheduling.
    const CHUNK: usize = 1 << 15;
    let mut data = vec![0.0f32; a.len()];
    data.par_chunks_mut(CHUNK)
        .zip(a.data().par_chunks(CHUNK).zip(b.data().par_chunks(CHUNK)))
        .for_each(|(out, (xs, ys))| {
            for ((o, &x), &y) in out.iter_mut().zip(xs).zip(ys) {
                *o = f(x, y);
            }
        });
    Tensor::new(a.shape().to_vec(), data)
}

/// `f(a, b)` element-wise on the GPU (`binary_map`).
fn zip_same_shape_cuda(
    op: &str,
    a: &DeviceTensor,
    b: &DeviceTensor,
    function: BinaryFunction,
) -> Result<DeviceTensor> {
    if a.shape() != b.shape() {
        return Err(Error::Shape(format!(
            "{op}: input shapes differ: {:?} vs {:?}",
            a.shape(),
            b.shape()
        )));
    }
    if a.backend().ordinal() != b.backend().ordinal() {
        return Err(Error::InvalidArgument(format!(
            "{op}: inputs on CUDA devices {} and {}",
            a.backend().ordinal(),
            b.backend().ordinal()
        )));
    }
    let mut out = DeviceTensor::uninit(a.backend(), a.shape().to_vec())?;
    let len = out.len() as u64;
    if len == 0 {
        return Ok(out);
    }
    let backend = a.backend();
    let kernel = backend.function("binary_map")?;
    let function = function as u32;
    let mut launch = backend.stream().launch_builder(&kernel);
    launch
        .arg(a.slice())
        .arg(b.slice())
        .arg(out.slice_mut())
        .arg(&len)
        .arg(&function);
    // SAFETY: the arguments match `binary_map`'s signature; all three hold `len` elements.
    unsafe { launch.launch(elementwise_config(len as usize, ELEMENTWISE_THREADS))? };
    Ok(out)
}

/// A sum of non-negative integers is one; a sum of spikes is no longer binary.
fn sum_kind(inputs: &[ValueKind]) -> ValueKind {
    if inputs.iter().all(|k| k.is_sparse()) {
        ValueKind::SparseInteger
    } else {
        ValueKind::Dense
    }
}

/// The residual sum of spiking ResNets: `branch + shortcut`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Add;

impl Operator for Add {
    fn type_name(&self) -> &'static str {
        "Add"
    }
    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [a, b] = expect_inputs::<2, _>("Add", inputs)?;
        zip_same_shape("Add", a, b, |x, y| x + y)
    }
    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [a, b] = expect_inputs::<2, _>("Add", inputs)?;
        zip_same_shape_cuda("Add", a, b, BinaryFunction::Add)
    }
    fn output_kind(&self, inputs: &[ValueKind]) -> ValueKind {
        sum_kind(inputs)
    }
    impl_as_any!();
}

/// A SEW connect function applied to `(inputs[0], inputs[1])` in that order.
#[derive(Clone, Debug, PartialEq)]
pub struct SewConnect {
    pub function: ConnectFunction,
}

impl Operator for SewConnect {
    fn type_name(&self) -> &'static str {
        "SewConnect"
    }
    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [a, b] = expect_inputs::<2, _>("SewConnect", inputs)?;
        let f = self.function;
        zip_same_shape("SewConnect", a, b, |x, y| f.apply(x, y))
    }
    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [a, b] = expect_inputs::<2, _>("SewConnect", inputs)?;
        zip_same_shape_cuda("SewConnect", a, b, self.function.kernel_function())
    }
    fn output_kind(&self, inputs: &[ValueKind]) -> ValueKind {
        let &[a, b] = inputs else {
            return ValueKind::Dense;
        };
        match self.function {
            ConnectFunction::Add => sum_kind(inputs),
            // A product of non-negative integers is one; of spikes, a spike.
            ConnectFunction::And => a.join(b),
            // a·(1 − b) keeps a's kind only when b is a spike (else 1 − b can be negative).
            ConnectFunction::Iand if b == ValueKind::Binary => a,
            ConnectFunction::Iand => ValueKind::Dense,
        }
    }
    fn describe(&self) -> String {
        self.function.name().into()
    }
    impl_as_any!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_functions_follow_spikingjelly() {
        let a = Tensor::new(vec![4], vec![0.0, 0.0, 1.0, 1.0]).unwrap();
        let b = Tensor::new(vec![4], vec![0.0, 1.0, 0.0, 1.0]).unwrap();
        let run = |f| {
            SewConnect { function: f }
                .forward(&[&a, &b])
                .unwrap()
                .into_data()
        };
        assert_eq!(run(ConnectFunction::Add), vec![0.0, 1.0, 1.0, 2.0]);
        assert_eq!(run(ConnectFunction::And), vec![0.0, 0.0, 0.0, 1.0]);
        assert_eq!(run(ConnectFunction::Iand), vec![0.0, 0.0, 1.0, 0.0]);
        assert_eq!(
            Add.forward(&[&a, &b]).unwrap().into_data(),
            vec![0.0, 1.0, 1.0, 2.0]
        );
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let a = Tensor::zeros(vec![2, 3]);
        let b = Tensor::zeros(vec![3, 2]);
        assert!(matches!(Add.forward(&[&a, &b]), Err(Error::Shape(_))));
        assert!(ConnectFunction::parse("xor").is_err());
    }
}
