//! Host tensors: a shape and a contiguous row-major `f32` buffer.
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// A tensor of `shape` holding `data` (row-major); the lengths must agree.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(Error::Shape(format!(
                "shape {shape:?} holds {expected} elements, data has {}",
                data.len()
            )));
        }
        Ok(Self { shape, data })
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            shape,
            data: vec![0.0; n],
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Views a `[N, C, H, W]` or `[T, N, C, H, W]` tensor as `(planes, H, W)` with planes = (T·)N·C.
    pub fn as_planes(&self) -> Result<(usize, usize, usize)> {
        match self.shape.as_slice() {
            [n, c, h, w] => Ok((n * c, *h, *w)),
            [t, n, c, h, w] => Ok((t * n * c, *h, *w)),
            other => Err(Error::Shape(format!(
                "expected [N, C, H, W] or [T, N, C, H, W], got {other:?}"
            ))),
        }
    }

    /// Largest `|self − reference|` over the largest `|reference|`: the error relative to the
    /// reference's scale, in f64. The shapes must agree.
    pub fn relative_error(&self, reference: &Tensor) -> Result<f64> {
        if self.shape != reference.shape {
            return Err(Error::Shape(format!(
                "comparing {:?} with {:?}",
                self.shape, reference.shape
            )));
        }
        let scale = reference
            .data
            .iter()
            .fold(0f64, |m, &v| m.max(v.abs() as f64));
        let err = self
            .data
            .iter()
            .zip(&reference.data)
            .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
        Ok(err / scale.max(f64::MIN_POSITIVE))
    }

    /// Fraction of elements that are exactly zero.
    pub fn zero_fraction(&self) -> f64 {
        if self.data.is_empty() {
            return 0.0;
        }
        self.data.iter().filter(|&&v| v == 0.0).count() as f64 / self.data.len() as f64
    }
}

impl Tensor {
    /// The same data under another shape with the same element count.
    pub fn reshape(self, shape: Vec<usize>) -> Result<Self> {
        Self::new(shape, self.data)
    }

    /// Splits the shape into (batch = product of the leading dims, the last `k` dims).
    pub fn split_trailing(&self, k: usize) -> Result<(usize, &[usize])> {
        if self.shape.len() < k {
            return Err(Error::Shape(format!(
                "expected at least {k} dimensions, got {:?}",
                self.shape
            )));
        }
        let (lead, tail) = self.shape.split_at(self.shape.len() - k);
        Ok((lead.iter().product(), tail))
    }
}
