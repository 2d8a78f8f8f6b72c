//! Helpers shared by the unit tests, integration tests and benchmarks: GPU availability with the
//! skip / require policy, reproducible random spike tensors, and the GPU kernels' element-wise
//! comparison with the CPU reference.
use std::io::Write;
use std::sync::Arc;

use crate::cuda::CudaBackend;
use crate::ops::conv2d::Conv2d;
use crate::tensor::Tensor;

/// The CUDA backend for a GPU test, or `None` after printing a skip notice when no GPU is usable.
/// With `SPARSEFLOW_REQUIRE_GPU=1` a missing GPU fails the test instead.
pub fn gpu_or_skip(test: &str) -> Option<Arc<CudaBackend>> {
    match CudaBackend::get(0) {
        Ok(backend) => Some(backend),
        Err(err) if std::env::var("SPARSEFLOW_REQUIRE_GPU").as_deref() == Ok("1") => {
            panic!("{test}: SPARSEFLOW_REQUIRE_GPU=1 but no GPU is usable: {err}")
        }
        Err(err) => {
            // Straight to stderr: libtest captures `eprintln!`, and the notice must be seen.
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no GPU ({err})");
            None
        }
    }
}

/// A small, fast, reproducible generator (SplitMix64), so tests and benchmarks need no RNG crate
/// in the library.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// A spike tensor of `shape` whose elements are 1 with probability `density`, else 0.
pub fn random_spikes(shape: &[usize], density: f64, seed: u64) -> Tensor {
    let mut rng = SplitMix64::new(seed);
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|_| ((rng.next_f32() as f64) < density) as u32 as f32)
        .collect();
    Tensor::new(shape.to_vec(), data).expect("shape and data agree by construction")
}

/// A tensor of `shape` with elements uniform in `[lo, hi)`.
pub fn random_uniform(shape: &[usize], lo: f32, hi: f32, seed: u64) -> Tensor {
    let mut rng = SplitMix64::new(seed);
    let n: usize = shape.iter().product();
    let data = (0..n).map(|_| lo + (hi - lo) * rng.next_f32()).collect();
    Tensor::new(shape.to_vec(), data).expect("shape and data agree by construction")
}

/// A `k × k` conv of one group with weights (and, `with_bias`, a bias) uniform in [−1, 1) from
/// `seed` and `seed + 1`.
pub fn random_conv(
    [cout, cin, k]: [usize; 3],
    (stride, pad, dilation): (usize, usize, usize),
    with_bias: bool,
    seed: u64,
) -> Conv2d {
    Conv2d::new(
        random_uniform(&[cout, cin, k, k], -1.0, 1.0, seed),
        with_bias.then(|| random_uniform(&[cout], -1.0, 1.0, seed + 1)),
        (stride, stride),
        (pad, pad),
        (dilation, dilation),
        1,
    )
    .expect("a valid conv by construction")
}

/// Like [`random_spikes`], but with `integer` the non-zeros are 1, 2 or 3 (SEW sums of spikes).
pub fn random_sparse(shape: &[usize], density: f64, integer: bool, seed: u64) -> Tensor {
    let mut rng = SplitMix64::new(seed);
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|_| match ((rng.next_f32() as f64) < density, integer) {
            (false, _) => 0.0,
            (true, false) => 1.0,
            (true, true) => 1.0 + (rng.next_u64() % 3) as f32,
        })
        .collect();
    Tensor::new(shape.to_vec(), data).expect("shape and data agree by construction")
}

/// Asserts that every element of `got` (a GPU kernel's output) is within 1e-5 of `want` (the CPU
/// reference), relative to the larger of `want`'s largest magnitude and 1e-3; `what` names the
/// case in a failure.
pub fn assert_close_elementwise(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.shape(), want.shape(), "{what}: shapes");
    let scale = want.data().iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    for (i, (g, e)) in got.data().iter().zip(want.data()).enumerate() {
        assert!((g - e).abs() <= 1e-5 * scale, "{what}: [{i}] {g} vs {e}");
    }
}
