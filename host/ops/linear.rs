//! Fully connected layer with PyTorch's `nn.Linear` semantics, on the CPU (f32):
//! `y = x · Wᵀ + b` on the last dimension; every leading dimension is batch (`[T, N, F]`,
//! `[N, F]` and a plain `[F]` all work). One GEMM through the `gemm` crate, multithreaded on
//! rayon when the product is large.
use sparseflow_kernels::dense_conv::ConvGeometry;

use crate::cuda::{DeviceCache, DeviceTensor};
use crate::error::{Error, Result};
use crate::ops::conv2d::{launch_dense_conv, sgemm_strided, DenseDeviceWeights};
use crate::ops::{expect_inputs, Operator};
use crate::tensor::Tensor;

/// Products of at least this many multiply-adds run the GEMM on all rayon threads.
pub const PARALLEL_MACS: usize = 1 << 18;

/// A fully connected layer (PyTorch `nn.Linear`).
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`, or `None` for `bias=False`.
    pub bias: Option<Tensor>,
    /// The weights on the GPU, uploaded on the first CUDA forward.
    device: DeviceCache<DenseDeviceWeights>,
}

impl Linear {
    /// A layer with weight `[out, in]` and optional bias `[out]`; the shapes are validated.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let linear = Self {
            weight,
            bias,
            device: DeviceCache::default(),
        };
        linear.validate()?;
        Ok(linear)
    }

    /// The layer on a CUDA tensor `[..., F]`, staying on the device: the dense convolution kernel
    /// with `1 × 1` geometry, one "pixel" per row.
    pub fn forward_cuda(&self, x: &DeviceTensor) -> Result<DeviceTensor> {
        let (rows, out_shape) = self.rows_and_output_shape(x.shape())?;
        let mut out = DeviceTensor::uninit(x.backend(), out_shape)?;
        out.len_u32()?;
        let geometry = ConvGeometry {
            n: rows as u32,
            cin: self.in_features() as u32,
            h: 1,
            w: 1,
            cout: self.out_features() as u32,
            oh: 1,
            ow: 1,
            kh: 1,
            kw: 1,
            sh: 1,
            sw: 1,
            ph: 0,
            pw: 0,
            dh: 1,
            dw: 1,
            groups: 1,
        };
        let weights = DenseDeviceWeights::cached(
            &self.device,
            x.backend(),
            &self.weight,
            self.bias.as_ref(),
        )?;
        launch_dense_conv(x, &weights, geometry, &mut out)?;
        Ok(out)
    }

    /// `(rows, output shape)` for an input `[..., in_features]`.
    fn rows_and_output_shape(&self, shape: &[usize]) -> Result<(usize, Vec<usize>)> {
        self.validate()?;
        if shape.last() != Some(&self.in_features()) {
            return Err(Error::Shape(format!(
                "Linear {} expects input [..., {}], got {shape:?}",
                self.describe(),
                self.in_features()
            )));
        }
        let rows: usize = shape[..shape.len() - 1].iter().product();
        let mut out_shape = shape[..shape.len() - 1].to_vec();
        out_shape.push(self.out_features());
        Ok((rows, out_shape))
    }

    /// Checks the weight and bias shapes.
    pub fn validate(&self) -> Result<()> {
        let ws = self.weight.shape();
        if ws.len() != 2 {
            return Err(Error::Shape(format!(
                "Linear weight must be [out_features, in_features], got {ws:?}"
            )));
        }
        if let Some(bias) = &self.bias {
            if bias.shape() != [ws[0]] {
                return Err(Error::Shape(format!(
                    "Linear bias must be [{}], got {:?}",
                    ws[0],
                    bias.shape()
                )));
            }
        }
        Ok(())
    }

    pub fn in_features(&self) -> usize {
        self.weight.shape().get(1).copied().unwrap_or(0)
    }

    pub fn out_features(&self) -> usize {
        self.weight.shape().first().copied().unwrap_or(0)
    }

    /// The slice-level core: `input` is `[rows, in_features]`, `out` is `[rows, out_features]`
    /// (row-major); every element of `out` is overwritten.
    pub fn forward_rows(&self, input: &[f32], rows: usize, out: &mut [f32]) -> Result<()> {
        self.validate()?;
        let (fin, fout) = (self.in_features(), self.out_features());
        if input.len() != rows * fin || out.len() != rows * fout {
            return Err(Error::Shape(format!(
                "Linear::forward_rows: {rows} rows need {} input and {} output elements, got {} \
                 and {}",
                rows * fin,
                rows * fout,
                input.len(),
                out.len()
            )));
        }
        if rows == 0 || fout == 0 {
            return Ok(());
        }
        match &self.bias {
            Some(b) => out
                .chunks_exact_mut(fout)
                .for_each(|row| row.copy_from_slice(b.data())),
            None => out.fill(0.0),
        }
        if fin == 0 {
            return Ok(());
        }
        let threads = rayon::current_num_threads();
        let par = if rows * fin * fout >= PARALLEL_MACS && threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // out[rows × fout] += x[rows × fin] · Wᵀ, where Wᵀ[k][j] = W[j][k] sits at j·fin + k.
        // SAFETY: the slices have exactly these shapes (checked above) and do not overlap.
        unsafe {
            sgemm_strided(
                rows,
                fout,
                fin,
                out.as_mut_ptr(),
                (fout as isize, 1),
                true,
                input.as_ptr(),
                (fin as isize, 1),
                self.weight.data().as_ptr(),
                (1, fin as isize),
                par,
            );
        }
        Ok(())
    }
}

impl Operator for Linear {
    fn type_name(&self) -> &'static str {
        "Linear"
    }

    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [x] = expect_inputs::<1, _>("Linear", inputs)?;
        self.forward_cuda(x)
    }

    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = expect_inputs::<1, _>("Linear", inputs)?;
        let (rows, out_shape) = self.rows_and_output_shape(x.shape())?;
        let mut out = vec![0.0f32; rows * self.out_features()];
        self.forward_rows(x.data(), rows, &mut out)?;
        Tensor::new(out_shape, out)
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        let mut p = vec![("weight", &self.weight)];
        if let Some(b) = &self.bias {
            p.push(("bias", b));
        }
        p
    }

    fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        self.device.clear();
        let mut p = vec![("weight", &mut self.weight)];
        if let Some(b) = &mut self.bias {
            p.push(("bias", b));
        }
        p
    }

    /// E.g. `"512->10"`, `"512->10 nobias"`.
    fn describe(&self) -> String {
        let nobias = if self.bias.is_none() { " nobias" } else { "" };
        format!("{}->{}{nobias}", self.in_features(), self.out_features())
    }

    crate::impl_as_any!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SplitMix64;

    fn rand_vec(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
    }

    fn reference(l: &Linear, x: &[f32], rows: usize) -> Vec<f64> {
        let (fin, fout) = (l.in_features(), l.out_features());
        let w = l.weight.data();
        let mut out = vec![0f64; rows * fout];
        for r in 0..rows {
            for j in 0..fout {
                let mut acc = l.bias.as_ref().map_or(0.0, |b| b.data()[j] as f64);
                for k in 0..fin {
                    acc += x[r * fin + k] as f64 * w[j * fin + k] as f64;
                }
                out[r * fout + j] = acc;
            }
        }
        out
    }

    #[test]
    fn matches_reference() {
        let mut rng = SplitMix64::new(11);
        // (leading dims, in, out): tiny, odd, 3-D, 1-D, and one large enough to go parallel.
        let cases: [(Vec<usize>, usize, usize); 6] = [
            (vec![1], 1, 1),
            (vec![5], 7, 3),
            (vec![4, 3], 33, 17),
            (vec![], 10, 6),
            (vec![2, 2, 2], 64, 10),
            (vec![96], 300, 130),
        ];
        for (i, (lead, fin, fout)) in cases.into_iter().enumerate() {
            let w = Tensor::new(vec![fout, fin], rand_vec(&mut rng, fout * fin)).unwrap();
            let b =
                (i % 2 == 0).then(|| Tensor::new(vec![fout], rand_vec(&mut rng, fout)).unwrap());
            let l = Linear::new(w, b).unwrap();
            let mut shape = lead.clone();
            shape.push(fin);
            let rows: usize = lead.iter().product();
            let x = Tensor::new(shape, rand_vec(&mut rng, rows * fin)).unwrap();
            let y = l.forward(&[&x]).unwrap();
            let mut want_shape = lead.clone();
            want_shape.push(fout);
            assert_eq!(y.shape(), want_shape.as_slice());
            let want = reference(&l, x.data(), rows);
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let err = y
                .data()
                .iter()
                .zip(&want)
                .fold(0f64, |m, (&g, &r)| m.max((g as f64 - r).abs()))
                / scale;
            assert!(err < 1e-5, "{}: relative error {err:e}", l.describe());
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(Linear::new(Tensor::zeros(vec![3]), None).is_err());
        assert!(Linear::new(Tensor::zeros(vec![3, 4]), Some(Tensor::zeros(vec![4]))).is_err());
        let l = Linear::new(Tensor::zeros(vec![3, 4]), Some(Tensor::zeros(vec![3]))).unwrap();
        for shape in [vec![2, 5], vec![], vec![4, 3]] {
            match l.forward(&[&Tensor::zeros(shape.clone())]) {
                Err(Error::Shape(_)) => {}
                other => panic!("{shape:?}: expected a shape error, got {other:?}"),
            }
        }
        assert!(l.forward(&[]).is_err());
        let mut out = vec![0.0; 6];
        assert!(l.forward_rows(&[0.0; 7], 2, &mut out).is_err());
        // Empty batch.
        let y = l.forward(&[&Tensor::zeros(vec![0, 4])]).unwrap();
        assert_eq!(y.shape(), &[0, 3]);
    }

    #[test]
    fn params_and_describe() {
        let l = Linear::new(Tensor::zeros(vec![10, 512]), Some(Tensor::zeros(vec![10]))).unwrap();
        assert_eq!(l.describe(), "512->10");
        let names: Vec<_> = l.params().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["weight", "bias"]);
        assert_eq!(l.type_name(), "Linear");
    }
}
