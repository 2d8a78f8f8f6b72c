//! The CPU inner loop shared by the sparse operators: accumulate, into a register-resident
//! vector of outputs, the weight rows of the active inputs only.
//!
//! Weights are stored input-major with the outputs contiguous (`[taps·inputs, outputs]`, the
//! output dimension padded to a multiple of 8), so an active input contributes one contiguous,
//! vectorised row: `acc[..] += value · W[input][..]`, or `acc[..] += W[input][..]` for binary
//! spikes. Outputs are processed in chunks of 64/32/16/8 lanes so the accumulator fits in
//! registers.

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;

use crate::cuda::CudaBackend;
use crate::error::Result;
use crate::tensor::Tensor;

/// Output lanes are padded to a multiple of this.
pub const LANES: usize = 8;

/// Weights transposed for gathering: row `r` holds the weights of input `r` for every output.
#[derive(Clone, Debug, Default)]
pub struct GatherWeights {
    /// `[rows, padded_outputs]`.
    pub data: Vec<f32>,
    pub outputs: usize,
    pub padded_outputs: usize,
}

impl GatherWeights {
    /// From a row-major `[outputs, rows]` matrix (PyTorch's layout for Linear, and for a conv's
    /// `[Cout, Cin·kh·kw]` after `row_of` maps its column index).
    pub fn from_output_major(
        w: &[f32],
        outputs: usize,
        rows: usize,
        row_of: impl Fn(usize) -> usize,
    ) -> Self {
        let padded = outputs.div_ceil(LANES) * LANES;
        let mut data = vec![0.0f32; rows * padded];
        // Blocks of 64 outputs keep both the reads and the writes within a few cache lines.
        for o0 in (0..outputs).step_by(64) {
            for k in 0..rows {
                let dst = row_of(k) * padded;
                for o in o0..(o0 + 64).min(outputs) {
                    data[dst + o] = w[o * rows + k];
                }
            }
        }
        Self {
            data,
            outputs,
            padded_outputs: padded,
        }
    }

    /// The output chunks `(start, width)` that cover the padded outputs, widest first.
    pub fn chunks(&self) -> Vec<(usize, usize)> {
        let mut chunks = Vec::new();
        let mut start = 0;
        for width in [64, 32, 16, 8] {
            while self.padded_outputs - start >= width {
                chunks.push((start, width));
                start += width;
            }
        }
        chunks
    }
}

/// `acc += value · src[..CH]` (`acc += src[..CH]` for binary spikes).
///
/// # Safety
/// `src` points to `CH` readable floats.
#[inline(always)]
pub unsafe fn accumulate<const CH: usize, const BINARY: bool>(
    acc: &mut [f32; CH],
    src: *const f32,
    value: f32,
) {
    for (i, a) in acc.iter_mut().enumerate() {
        if BINARY {
            *a += *src.add(i);
        } else {
            *a += value * *src.add(i);
        }
    }
}

/// Gather weights and bias on one CUDA device, for the GPU kernels: outputs padded to a multiple
/// of `lanes` (the kernels' output chunk), `zero_rows` rows of zeros appended.
#[derive(Debug)]
pub struct DeviceGatherWeights {
    pub ordinal: usize,
    /// `[rows + zero_rows, padded_outputs]`.
    pub weights: CudaSlice<f32>,
    /// `[padded_outputs]`.
    pub bias: CudaSlice<f32>,
    pub padded_outputs: usize,
}

impl GatherWeights {
    /// Uploads the weights and `bias` (`[outputs]`, zero when absent) in the GPU layout.
    pub fn upload(
        &self,
        backend: &CudaBackend,
        bias: Option<&Tensor>,
        lanes: usize,
        zero_rows: usize,
    ) -> Result<DeviceGatherWeights> {
        let padded = self.outputs.div_ceil(lanes) * lanes;
        let rows = self.data.len() / self.padded_outputs.max(1);
        let mut weights = vec![0.0f32; (rows + zero_rows) * padded];
        for (dst, src) in weights
            .chunks_exact_mut(padded)
            .zip(self.data.chunks_exact(self.padded_outputs))
        {
            dst[..self.outputs].copy_from_slice(&src[..self.outputs]);
        }
        let mut padded_bias = vec![0.0f32; padded];
        if let Some(b) = bias {
            padded_bias[..self.outputs].copy_from_slice(b.data());
        }
        let stream = backend.stream();
        Ok(DeviceGatherWeights {
            ordinal: backend.ordinal(),
            weights: stream.clone_htod(&weights)?,
            bias: stream.clone_htod(&padded_bias)?,
            padded_outputs: padded,
        })
    }
}

/// The cached device weights for `backend`, uploaded with `upload` on first use, after a switch
/// of device, or when `fits` rejects the cached layout (e.g. another padding).
pub fn cached_upload(
    cache: &Mutex<Option<Arc<DeviceGatherWeights>>>,
    backend: &CudaBackend,
    fits: impl Fn(&DeviceGatherWeights) -> bool,
    upload: impl FnOnce() -> Result<DeviceGatherWeights>,
) -> Result<Arc<DeviceGatherWeights>> {
    let mut cached = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(w) = cached
        .as_ref()
        .filter(|w| w.ordinal == backend.ordinal() && fits(w))
    {
        return Ok(w.clone());
    }
    let w = Arc::new(upload()?);
    *cached = Some(w.clone());
    Ok(w)
}

/// True when the CPU can run the AVX2+FMA builds of the sparse kernels (their accumulators then
/// live in ymm registers).
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A raw output pointer that parallel tasks write through, each to its own disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct DisjointWrites(pub *mut f32);
// SAFETY: users guarantee that concurrent tasks write disjoint elements.
unsafe impl Send for DisjointWrites {}
unsafe impl Sync for DisjointWrites {}

impl DisjointWrites {
    /// Writes `value` at element `i`.
    ///
    /// # Safety
    /// `i` is in bounds and no other task writes or reads element `i` concurrently.
    #[inline(always)]
    pub(crate) unsafe fn write(&self, i: usize, value: f32) {
        *self.0.add(i) = value;
    }

    /// Elements `start..start + len` as a slice.
    ///
    /// # Safety
    /// The range is in bounds and no other task touches it while the slice lives.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice<'a>(&self, start: usize, len: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}
