//! The CPU inner loop shared by the sparse operators: accumulate, into a register-resident
//! vector of outputs, the weight rows of the active inputs only.
//!
//! Weights are stored input-major with the outputs contiguous (`[taps·inputs, outputs]`, the
//! output dimension padded to a multiple of 8), so an active input contributes one contiguous,
//! vectorised row: `acc[..] += value · W[input][..]`, or `acc[..] += W[input][..]` for binary
//! spikes. Outputs are processed in chunks of 64/32/16/8 lanes so the accumulator fits in
//! registers, and each chunk's rows are stored together ([`GatherWeights`]).

use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;

use crate::cuda::CudaBackend;
use crate::error::Result;
use crate::tensor::Tensor;

/// Output lanes are padded to a multiple of this.
pub const LANES: usize = 8;

/// Floats in memory aligned to 64-byte cache lines, so that the gather's 512-bit loads and
/// stores of whole weight rows and accumulator rows never straddle two lines.
///
/// A `Vec<f32>` is only 4-byte aligned (16 in practice): whether its rows split lines then
/// depends on where the allocator puts it, and two builds of the same code differed by 10–15%
/// in the sparse conv (2-core Xeon, 3×3 64→64 @56, 5%: 1.81–1.85 against 2.00–2.06 ms) with the
/// hot loop at the same addresses.
#[derive(Clone, Debug, Default)]
pub struct AlignedFloats {
    lines: Vec<CacheLine>,
    len: usize,
}

#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
struct CacheLine([f32; 16]);

impl AlignedFloats {
    /// `len` zeros.
    pub fn zeros(len: usize) -> Self {
        Self {
            lines: vec![CacheLine::default(); len.div_ceil(16)],
            len,
        }
    }
}

impl std::ops::Deref for AlignedFloats {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `lines` holds at least `len` contiguous, initialized f32s (`CacheLine` is
        // `repr(C)` around `[f32; 16]`, its alignment a multiple of f32's).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedFloats {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

/// Weights transposed for gathering: row `r` holds the weights of input `r` for every output,
/// stored chunk-major.
///
/// The outputs are split into chunks of 64/32/16/8 lanes ([`GatherWeights::chunks`]), and each
/// chunk's rows are contiguous (`[rows, width]`), so the rows a gather reads for one chunk fill
/// whole cache lines and every cache set. Row-major `[rows, padded]` rows would leave a chunk of
/// 64 lanes of a 512-output layer reading a quarter of each 2 KiB row: a quarter of the sets, and
/// a tap's weights that should fit L2 spilling to L3.
#[derive(Clone, Debug, Default)]
pub struct GatherWeights {
    /// Chunk `(start, width)`'s rows at `start · rows + r · width`, for `r < rows`.
    pub data: AlignedFloats,
    pub rows: usize,
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
        let mut data = AlignedFloats::zeros(rows * padded);
        for (start, width) in output_chunks(padded) {
            let chunk = &mut data[start * rows..(start + width) * rows];
            for k in 0..rows {
                let dst = &mut chunk[row_of(k) * width..][..width];
                for (lane, d) in dst.iter_mut().enumerate() {
                    let o = start + lane;
                    if o < outputs {
                        *d = w[o * rows + k];
                    }
                }
            }
        }
        Self {
            data,
            rows,
            outputs,
            padded_outputs: padded,
        }
    }

    /// The output chunks `(start, width)` that cover the padded outputs, widest first.
    pub fn chunks(&self) -> Vec<(usize, usize)> {
        output_chunks(self.padded_outputs)
    }

    /// The rows of the chunk that starts at output `start` (`[rows, width]`).
    pub fn chunk(&self, start: usize) -> &[f32] {
        &self.data[start * self.rows..]
    }
}

/// Chunks of 64, then 32, 16 and 8 lanes covering `padded` (a multiple of 8) outputs.
fn output_chunks(padded: usize) -> Vec<(usize, usize)> {
    let mut chunks = Vec::new();
    let mut start = 0;
    for width in [64, 32, 16, 8] {
        while padded - start >= width {
            chunks.push((start, width));
            start += width;
        }
    }
    chunks
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
        let mut weights = vec![0.0f32; (self.rows + zero_rows) * padded];
        for (start, width) in self.chunks() {
            let chunk = self.chunk(start);
            for (r, dst) in weights.chunks_exact_mut(padded).take(self.rows).enumerate() {
                let lanes = width.min(self.outputs.saturating_sub(start));
                dst[start..start + lanes].copy_from_slice(&chunk[r * width..][..lanes]);
            }
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

/// Whether this CPU has AVX-512F on top of [`has_avx2`]'s features.
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx2() && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU also has AVX-512 VBMI2 (byte compress), on top of [`has_avx512`]'s.
pub fn has_avx512_vbmi2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        has_avx512() && std::arch::is_x86_feature_detected!("avx512vbmi2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when the CPU can run the AVX2 builds of the sparse kernels: AVX2 and FMA (their
/// accumulators then live in ymm registers), plus POPCNT and BMI1/2, which every AVX2 CPU has
/// and without which `count_ones` and `trailing_zeros` are bit-twiddling loops.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx2") && has!("fma") && has!("popcnt") && has!("bmi1") && has!("bmi2")
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

    /// Copies `values` to elements `start..start + values.len()`.
    ///
    /// # Safety
    /// The range is in bounds (of the allocation) and no other task touches it meanwhile.
    #[inline(always)]
    pub(crate) unsafe fn copy_from(&self, start: usize, values: &[f32]) {
        std::ptr::copy_nonoverlapping(values.as_ptr(), self.0.add(start), values.len());
    }

    /// Elements `start..start + len`, possibly not yet initialised, as a slice to write.
    ///
    /// # Safety
    /// The range is in bounds (of the allocation) and no other task touches it while the slice
    /// lives.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn slice_uninit<'a>(
        &self,
        start: usize,
        len: usize,
    ) -> &'a mut [std::mem::MaybeUninit<f32>] {
        std::slice::from_raw_parts_mut(self.0.add(start).cast(), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_floats_start_on_a_cache_line_and_keep_their_length() {
        for len in [0, 1, 15, 16, 17, 1000] {
            let mut a = AlignedFloats::zeros(len);
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|&v| v == 0.0));
            a.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
            // A clone is a new allocation: aligned too, same content.
            let b = a.clone();
            for x in [&a, &b] {
                assert_eq!(x.as_ptr() as usize % 64, 0, "len {len}");
                assert!(x.iter().enumerate().all(|(i, &v)| v == i as f32));
            }
        }
    }

    #[test]
    fn chunk_major_rows_hold_every_weight_once() {
        // 75 outputs pad to 80: a chunk of 64 and one of 16, the last 5 lanes zero.
        let (outputs, rows) = (75, 7);
        let w: Vec<f32> = (0..outputs * rows).map(|i| i as f32 + 1.0).collect();
        let g = GatherWeights::from_output_major(&w, outputs, rows, |k| (k * 3) % rows);
        assert_eq!(g.chunks(), vec![(0, 64), (64, 16)]);
        assert_eq!(g.data.len(), rows * 80);
        for (start, width) in g.chunks() {
            for k in 0..rows {
                let row = &g.chunk(start)[(k * 3) % rows * width..][..width];
                for (lane, &v) in row.iter().enumerate() {
                    let o = start + lane;
                    let want = if o < outputs { w[o * rows + k] } else { 0.0 };
                    assert_eq!(v, want, "row {k} output {o}");
                }
            }
        }
    }
}
