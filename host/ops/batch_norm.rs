//! Inference batch normalisation with PyTorch's `nn.BatchNorm2d` (eval mode) semantics, on the CPU
//! (f32), bit for bit.
//!
//! Input `[..., C, H, W]`: every leading dimension is batch (`[T, N, C, H, W]`, `[N, C, H, W]`).
//!
//! # Rounding: what is matched
//! PyTorch's CPU kernel (`aten/src/ATen/native/cpu/batch_norm_kernel.cpp`,
//! `batch_norm_cpu_collect_linear_and_constant_terms` and `batch_norm_cpu_contiguous_impl` /
//! `batch_norm_cpu_channels_last_impl`) folds the statistics into one scale and shift per channel,
//! in f32 for f32 tensors:
//!
//! ```text
//! invstd = 1 / sqrt(running_var + (float)eps)
//! alpha  = invstd * weight
//! beta   = bias - mean * alpha
//! y      = x * alpha + beta            (Vectorized<float>: data_vec * alpha_vec + beta_vec)
//! ```
//!
//! The official PyTorch binaries compile the AVX2 and AVX-512 copies of that kernel with `-mfma`
//! and floating-point contraction on, so on any CPU with FMA, `beta` and `y` are each **one fused
//! multiply-add** (a single rounding), not a multiply then an add. This was checked against
//! PyTorch 2.11.0 on an AMD EPYC (AVX2): `torch.nn.functional.batch_norm(..., training=False)`
//! equals `fma(x, alpha, fma(-mean, alpha, bias))` on every element of 25,632 random ones, while
//! the unfused formula differs on about a third of them. (PyTorch forced to
//! `ATEN_CPU_CAPABILITY=default` — no SIMD — rounds the multiply and the add separately instead;
//! that mode is not matched.) This module therefore computes exactly:
//!
//! ```text
//! invstd = 1.0f32 / (running_var + eps as f32).sqrt()
//! alpha  = invstd * weight
//! beta   = (-mean).mul_add(alpha, bias)
//! y      = x.mul_add(alpha, beta)
//! ```
//!
//! `f32::mul_add` is an exact fused multiply-add on every target; on x86-64 the loop is compiled
//! for FMA hardware and selected at run time, so it is also fast.
use cudarc::driver::{CudaSlice, PushKernelArg};
use rayon::prelude::*;
use sparseflow_kernels::elementwise::ELEMENTWISE_THREADS;

use crate::cuda::{elementwise_config, DeviceCache, DeviceTensor};
use crate::error::{Error, Result};
use crate::ops::{expect_inputs, Operator};
use crate::tensor::Tensor;

/// Inference-mode batch normalisation over dimension -3 (PyTorch `nn.BatchNorm2d` in `eval()`).
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    /// `[C]` (γ). Use ones for `affine=False`.
    pub weight: Tensor,
    /// `[C]` (β). Use zeros for `affine=False`.
    pub bias: Tensor,
    /// `[C]`.
    pub running_mean: Tensor,
    /// `[C]`.
    pub running_var: Tensor,
    /// Added to the variance; PyTorch's default is [`BatchNorm2d::DEFAULT_EPS`]. Kept as f64 and
    /// rounded to f32 in use, as PyTorch does.
    pub eps: f64,
    /// `(alpha, beta)` of [`BatchNorm2d::scale_shift`] on the GPU.
    device: DeviceCache<(CudaSlice<f32>, CudaSlice<f32>)>,
}

impl BatchNorm2d {
    /// PyTorch's default `eps`.
    pub const DEFAULT_EPS: f64 = 1e-5;

    /// A layer from its four `[C]` tensors; the shapes are validated.
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        eps: f64,
    ) -> Result<Self> {
        let bn = Self {
            weight,
            bias,
            running_mean,
            running_var,
            eps,
            device: DeviceCache::default(),
        };
        bn.validate()?;
        Ok(bn)
    }

    /// A fresh PyTorch layer of `c` channels: weight 1, bias 0, mean 0, var 1, the default eps.
    /// Load real values through [`Operator::params_mut`].
    pub fn with_channels(c: usize) -> Self {
        Self {
            weight: Tensor::new(vec![c], vec![1.0; c]).expect("lengths agree"),
            bias: Tensor::zeros(vec![c]),
            running_mean: Tensor::zeros(vec![c]),
            running_var: Tensor::new(vec![c], vec![1.0; c]).expect("lengths agree"),
            eps: Self::DEFAULT_EPS,
            device: DeviceCache::default(),
        }
    }

    /// `(n, h·w)` of an input `[..., C, H, W]` with this layer's `C`.
    fn check_input(&self, shape: &[usize]) -> Result<(usize, usize)> {
        if shape.len() < 3 {
            return Err(Error::Shape(format!(
                "BatchNorm2d expects [..., C, H, W] (e.g. [N, C, H, W] or [T, N, C, H, W]), got \
                 {shape:?}"
            )));
        }
        let c = shape[shape.len() - 3];
        if c != self.num_features() {
            return Err(Error::Shape(format!(
                "BatchNorm2d has {} channels, input {shape:?} has {c} (dim -3)",
                self.num_features()
            )));
        }
        let hw = shape[shape.len() - 2] * shape[shape.len() - 1];
        Ok((shape[..shape.len() - 3].iter().product(), hw))
    }

    /// The channel count `C`.
    pub fn num_features(&self) -> usize {
        self.running_mean.len()
    }

    /// Checks that the four tensors are all `[C]` and eps is finite and non-negative.
    pub fn validate(&self) -> Result<()> {
        let c = self.running_mean.len();
        for (name, t) in self.params() {
            if t.shape() != [c] {
                return Err(Error::Shape(format!(
                    "BatchNorm2d {name} must be [{c}] like running_mean, got {:?}",
                    t.shape()
                )));
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "BatchNorm2d eps must be finite and >= 0, got {}",
                self.eps
            )));
        }
        Ok(())
    }

    /// The per-channel scale and shift `(alpha, beta)` with `y = x·alpha + beta` (one fused
    /// multiply-add), computed exactly as PyTorch does (see the module docs). Useful for folding
    /// the normalisation into a preceding convolution.
    pub fn scale_shift(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        self.validate()?;
        let eps = self.eps as f32;
        let (w, b) = (self.weight.data(), self.bias.data());
        let (m, v) = (self.running_mean.data(), self.running_var.data());
        let alpha: Vec<f32> = (0..m.len())
            .map(|c| {
                let invstd = 1.0f32 / (v[c] + eps).sqrt();
                invstd * w[c]
            })
            .collect();
        let beta = (0..m.len())
            .map(|c| (-m[c]).mul_add(alpha[c], b[c]))
            .collect();
        Ok((alpha, beta))
    }

    /// The slice-level core: `input` and `out` are `[n, C, hw]` (row-major); every element of
    /// `out` is overwritten.
    pub fn forward_slices(
        &self,
        input: &[f32],
        n: usize,
        hw: usize,
        out: &mut [f32],
    ) -> Result<()> {
        let (alpha, beta) = self.scale_shift()?;
        let c = alpha.len();
        let len = n * c * hw;
        if input.len() != len || out.len() != len {
            return Err(Error::Shape(format!(
                "BatchNorm2d::forward_slices: [{n}, {c}, {hw}] needs {len} elements, got {} in \
                 and {} out",
                input.len(),
                out.len()
            )));
        }
        if len == 0 {
            return Ok(());
        }
        // Planes of at least ~16K elements per task.
        let per_task = (1usize << 14).div_ceil(hw).max(1) * hw;
        let run = |(t, (y, x)): (usize, (&mut [f32], &[f32]))| {
            let first_plane = t * (per_task / hw);
            for (q, (yp, xp)) in y.chunks_mut(hw).zip(x.chunks(hw)).enumerate() {
                let ch = (first_plane + q) % c;
                affine(xp, yp, alpha[ch], beta[ch]);
            }
        };
        if len <= per_task {
            run((0, (out, input)));
        } else {
            out.par_chunks_mut(per_task)
                .zip(input.par_chunks(per_task))
                .enumerate()
                .for_each(run);
        }
        Ok(())
    }
}

/// `y[i] = fma(x[i], a, b)`.
fn affine(x: &[f32], y: &mut [f32], a: f32, b: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has the features the function is compiled for.
        unsafe { affine_fma(x, y, a, b) };
        return;
    }
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v.mul_add(a, b);
    }
}

/// [`affine`] compiled for AVX + FMA, so that `mul_add` becomes a vector `vfmadd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,fma")]
unsafe fn affine_fma(x: &[f32], y: &mut [f32], a: f32, b: f32) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v.mul_add(a, b);
    }
}

impl Operator for BatchNorm2d {
    fn type_name(&self) -> &'static str {
        "BatchNorm2d"
    }

    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [x] = expect_inputs::<1, _>("BatchNorm2d", inputs)?;
        let (n, hw) = self.check_input(x.shape())?;
        let (alpha, beta) = self.scale_shift()?;
        let c = alpha.len();
        let backend = x.backend();
        let sources = [&Tensor::new(vec![c], alpha)?, &Tensor::new(vec![c], beta)?];
        let device = self.device.get(backend, &sources, || {
            let stream = backend.stream();
            Ok((
                stream.clone_htod(sources[0].data())?,
                stream.clone_htod(sources[1].data())?,
            ))
        })?;
        let mut out = DeviceTensor::uninit(backend, x.shape().to_vec())?;
        let len = out.len_u32()?;
        if len == 0 {
            return Ok(out);
        }
        let function = backend.function("channel_affine")?;
        let [planes, c, hw] = [n * c, c, hw].map(|v| v as u32);
        let mut launch = backend.stream().launch_builder(&function);
        launch
            .arg(x.slice())
            .arg(out.slice_mut())
            .arg(&device.0)
            .arg(&device.1)
            .arg(&planes)
            .arg(&c)
            .arg(&hw);
        // SAFETY: the arguments match `channel_affine`'s signature; the buffers hold the elements.
        unsafe { launch.launch(elementwise_config(len as usize, ELEMENTWISE_THREADS))? };
        Ok(out)
    }

    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = expect_inputs::<1, _>("BatchNorm2d", inputs)?;
        let shape = x.shape();
        let (n, hw) = self.check_input(shape)?;
        let mut out = vec![0.0f32; x.len()];
        self.forward_slices(x.data(), n, hw, &mut out)?;
        Tensor::new(shape.to_vec(), out)
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            ("weight", &self.weight),
            ("bias", &self.bias),
            ("running_mean", &self.running_mean),
            ("running_var", &self.running_var),
        ]
    }

    fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![
            ("weight", &mut self.weight),
            ("bias", &mut self.bias),
            ("running_mean", &mut self.running_mean),
            ("running_var", &mut self.running_var),
        ]
    }

    /// E.g. `"64"`, or `"64 eps=0.001"` for a non-default eps.
    fn describe(&self) -> String {
        if self.eps == Self::DEFAULT_EPS {
            format!("{}", self.num_features())
        } else {
            format!("{} eps={}", self.num_features(), self.eps)
        }
    }

    crate::impl_as_any!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SplitMix64;

    fn rand_vec(rng: &mut SplitMix64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| lo + rng.next_f32() * (hi - lo)).collect()
    }

    fn layer(rng: &mut SplitMix64, c: usize, eps: f64) -> BatchNorm2d {
        let t = |v: Vec<f32>| Tensor::new(vec![c], v).unwrap();
        BatchNorm2d::new(
            t(rand_vec(rng, c, -2.0, 2.0)),
            t(rand_vec(rng, c, -1.0, 1.0)),
            t(rand_vec(rng, c, -1.0, 1.0)),
            t(rand_vec(rng, c, 0.01, 3.0)),
            eps,
        )
        .unwrap()
    }

    #[test]
    fn matches_f64_reference() {
        let mut rng = SplitMix64::new(21);
        for (shape, eps) in [
            (vec![2, 5, 7, 9], 1e-5),
            (vec![3, 2, 4, 6, 6], 1e-3),
            (vec![4, 3, 1, 1], 1e-5),
            (vec![6, 40, 40], 0.0),
            (vec![2, 16, 33, 35], 1e-5),
        ] {
            let c = shape[shape.len() - 3];
            let bn = layer(&mut rng, c, eps);
            let x = Tensor::new(
                shape.clone(),
                rand_vec(&mut rng, shape.iter().product(), -3.0, 3.0),
            )
            .unwrap();
            let y = bn.forward(&[&x]).unwrap();
            assert_eq!(y.shape(), shape.as_slice());
            let hw = shape[shape.len() - 2] * shape[shape.len() - 1];
            let (w, b) = (bn.weight.data(), bn.bias.data());
            let (m, v) = (bn.running_mean.data(), bn.running_var.data());
            for (i, (&got, &xv)) in y.data().iter().zip(x.data()).enumerate() {
                let ch = (i / hw) % c;
                let want = (xv as f64 - m[ch] as f64) / (v[ch] as f64 + eps).sqrt() * w[ch] as f64
                    + b[ch] as f64;
                let tol = 1e-5 * (1.0 + want.abs());
                assert!(
                    (got as f64 - want).abs() < tol,
                    "{shape:?}[{i}]: {got} vs {want}"
                );
            }
        }
    }

    /// The exact PyTorch float order (module docs), element by element.
    #[test]
    fn is_bitwise_pytorch_fma_order() {
        let mut rng = SplitMix64::new(22);
        let c = 32;
        let bn = layer(&mut rng, c, 1e-5);
        let x = Tensor::new(vec![3, c, 5, 7], rand_vec(&mut rng, 3 * c * 35, -4.0, 4.0)).unwrap();
        let y = bn.forward(&[&x]).unwrap();
        let (w, b) = (bn.weight.data(), bn.bias.data());
        let (m, v) = (bn.running_mean.data(), bn.running_var.data());
        for (i, (&got, &xv)) in y.data().iter().zip(x.data()).enumerate() {
            let ch = (i / 35) % c;
            let invstd = 1.0f32 / (v[ch] + 1e-5f64 as f32).sqrt();
            let alpha = invstd * w[ch];
            // Fused: one rounding of the exact (f64-representable) product-sum.
            let beta = (b[ch] as f64 - m[ch] as f64 * alpha as f64) as f32;
            let want = (xv as f64 * alpha as f64 + beta as f64) as f32;
            assert_eq!(got.to_bits(), want.to_bits(), "element {i}");
        }
    }

    #[test]
    fn known_values() {
        // (x - 1) / sqrt(4) * 2 + 0.5, all exact.
        let t = |v: f32| Tensor::new(vec![1], vec![v]).unwrap();
        let bn = BatchNorm2d::new(t(2.0), t(0.5), t(1.0), t(4.0), 0.0).unwrap();
        let x = Tensor::new(vec![1, 1, 1, 3], vec![1.0, 3.0, -1.0]).unwrap();
        assert_eq!(bn.forward(&[&x]).unwrap().data(), &[0.5, 2.5, -1.5]);
        let fresh = BatchNorm2d::with_channels(1);
        assert_eq!(
            fresh.forward(&[&x]).unwrap().data()[1],
            3.0 * (1.0 / (1.0f32 + 1e-5).sqrt())
        );
    }

    #[test]
    fn bad_shapes_are_errors() {
        let c3 = Tensor::zeros(vec![3]);
        let c4 = Tensor::zeros(vec![4]);
        assert!(BatchNorm2d::new(c3.clone(), c3.clone(), c3.clone(), c4.clone(), 1e-5).is_err());
        assert!(BatchNorm2d::new(c3.clone(), c3.clone(), c3.clone(), c3.clone(), -1.0).is_err());
        let bn = BatchNorm2d::with_channels(3);
        for shape in [vec![2, 4, 5, 5], vec![3, 5], vec![1, 2, 3]] {
            match bn.forward(&[&Tensor::zeros(shape.clone())]) {
                Err(Error::Shape(_)) => {}
                other => panic!("{shape:?}: expected a shape error, got {other:?}"),
            }
        }
        assert!(bn.forward(&[]).is_err());
        assert!(bn.forward_slices(&[0.0; 5], 1, 2, &mut [0.0; 6]).is_err());
    }

    #[test]
    fn params_and_describe() {
        let mut bn = BatchNorm2d::with_channels(64);
        let names: Vec<_> = bn.params().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["weight", "bias", "running_mean", "running_var"]);
        assert_eq!(bn.params_mut().len(), 4);
        assert_eq!(bn.describe(), "64");
        bn.eps = 1e-3;
        assert_eq!(bn.describe(), "64 eps=0.001");
        assert_eq!(bn.type_name(), "BatchNorm2d");
    }
}
