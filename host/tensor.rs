//! Host tensors: a shape and a contiguous row-major `f32` buffer.
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    /// The elements are `storage[offset..]`. Buffers the library fills itself start on a
    /// 64-byte cache line (`offset` < 16 zeros skip to it), so its 512-bit stores never split
    /// one; a `Vec` handed in is kept as it is (`offset` 0).
    storage: Vec<f32>,
    offset: usize,
}

/// Floats in a cache line: an aligned buffer's prefix is shorter.
const LINE_FLOATS: usize = 16;

/// An output buffer whose elements start on a cache line, for a kernel that writes every
/// element through a raw pointer before it becomes a [`Tensor`].
pub(crate) struct AlignedOutput {
    storage: Vec<f32>,
    offset: usize,
    len: usize,
}

impl AlignedOutput {
    pub(crate) fn new(len: usize) -> Self {
        let mut storage: Vec<f32> = Vec::with_capacity(len + LINE_FLOATS - 1);
        let misaligned = (storage.as_ptr() as usize / 4) % LINE_FLOATS;
        let offset = (LINE_FLOATS - misaligned) % LINE_FLOATS;
        storage.resize(offset, 0.0);
        Self {
            storage,
            offset,
            len,
        }
    }

    /// The first of the `len` elements, on a cache line.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut f32 {
        // SAFETY: the capacity holds `offset + len` floats.
        unsafe { self.storage.as_mut_ptr().add(self.offset) }
    }

    /// # Safety
    /// Every one of the `len` elements was written through [`Self::as_mut_ptr`].
    pub(crate) unsafe fn assume_written(mut self, shape: Vec<usize>) -> Result<Tensor> {
        let expected: usize = shape.iter().product();
        if expected != self.len {
            return Err(Error::Shape(format!(
                "shape {shape:?} holds {expected} elements, the buffer {}",
                self.len
            )));
        }
        // SAFETY: the prefix was zeroed, the caller wrote the rest, the capacity holds both.
        self.storage.set_len(self.offset + self.len);
        Ok(Tensor {
            shape,
            storage: self.storage,
            offset: self.offset,
        })
    }
}

impl PartialEq for Tensor {
    fn eq(&self, other: &Self) -> bool {
        self.shape == other.shape && self.data() == other.data()
    }
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
        Ok(Self {
            shape,
            storage: data,
            offset: 0,
        })
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            shape,
            storage: vec![0.0; n],
            offset: 0,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn data(&self) -> &[f32] {
        &self.storage[self.offset..]
    }

    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.storage[self.offset..]
    }

    /// The elements as a `Vec` (which moves them down when the buffer was cache-line aligned).
    pub fn into_data(mut self) -> Vec<f32> {
        self.storage.drain(..self.offset);
        self.storage
    }

    pub fn len(&self) -> usize {
        self.storage.len() - self.offset
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
            .data()
            .iter()
            .fold(0f64, |m, &v| m.max(v.abs() as f64));
        let err = self
            .data()
            .iter()
            .zip(reference.data())
            .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
        Ok(err / scale.max(f64::MIN_POSITIVE))
    }

    /// Fraction of elements that are exactly zero.
    pub fn zero_fraction(&self) -> f64 {
        if self.is_empty() {
            return 0.0;
        }
        self.data().iter().filter(|&&v| v == 0.0).count() as f64 / self.len() as f64
    }
}

impl Tensor {
    /// The same data under another shape with the same element count.
    pub fn reshape(self, shape: Vec<usize>) -> Result<Self> {
        let expected: usize = shape.iter().product();
        if expected != self.len() {
            return Err(Error::Shape(format!(
                "cannot reshape {:?} ({} elements) to {shape:?}",
                self.shape,
                self.len()
            )));
        }
        Ok(Self { shape, ..self })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A kernel's aligned output starts on a cache line and behaves like any tensor: equality,
    /// reshape and `into_data` see only the elements, never the prefix.
    #[test]
    fn aligned_output_is_a_plain_tensor() {
        for len in [1usize, 15, 16, 17, 1000] {
            let mut out = AlignedOutput::new(len);
            let ptr = out.as_mut_ptr();
            assert_eq!(ptr as usize % 64, 0, "len {len}");
            for i in 0..len {
                // SAFETY: `len` elements, each written once.
                unsafe { *ptr.add(i) = i as f32 + 0.5 };
            }
            // SAFETY: every element was written above.
            let t = unsafe { out.assume_written(vec![len]) }.unwrap();
            let want: Vec<f32> = (0..len).map(|i| i as f32 + 0.5).collect();
            assert_eq!(t.data(), &want[..]);
            assert_eq!(t.len(), len);
            assert_eq!(t, Tensor::new(vec![len], want.clone()).unwrap());
            assert_eq!(t.clone().reshape(vec![1, len]).unwrap().data(), &want[..]);
            assert!(t.clone().reshape(vec![len + 1]).is_err());
            assert_eq!(t.into_data(), want);
        }
        let out = AlignedOutput::new(4);
        // SAFETY: the shape's check fails before anything is read.
        assert!(unsafe { out.assume_written(vec![5]) }.is_err());
    }
}
