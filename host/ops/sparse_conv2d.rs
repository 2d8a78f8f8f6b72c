//! `SparseConv2d`: a convolution whose input is spikes (binary, or small non-negative integers
//! for SEW ResNets), computed with work proportional to the number of non-zero inputs.
//!
//! `optimize` swaps it in for every `Conv2d` fed by spiking neurons; it can also be built directly
//! from a dense layer ([`SparseConv2d::from_dense`]) or from weights and geometry
//! ([`SparseConv2d::new`]). It computes the same function as the dense [`Conv2d`] it carries, on
//! any input.
//!
//! ```
//! use sparseflow::ops::conv2d::Conv2d;
//! use sparseflow::ops::sparse_conv2d::{BlockChoice, SparseConv2d};
//! use sparseflow::ops::Operator;
//! use sparseflow::testing::random_spikes;
//! use sparseflow::Tensor;
//!
//! let weight = Tensor::new(vec![8, 4, 3, 3], (0..288).map(|i| (i % 7) as f32 - 3.0).collect())?;
//! let dense = Conv2d::new(weight, None, (1, 1), (1, 1), (1, 1), 1)?;
//! let sparse = SparseConv2d::from_dense(&dense, BlockChoice::Fixed(Some(8)));
//! // [T, N, C, H, W] spikes at 10% density.
//! let x = random_spikes(&[2, 1, 4, 16, 16], 0.1, 42);
//! let y = sparse.forward(&[&x])?;
//! assert_eq!(y, dense.forward(&[&x])?);
//! assert!(sparse.last_forward_time().is_some());
//! # Ok::<(), sparseflow::Error>(())
//! ```
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use crate::error::Result;
use crate::impl_as_any;
use crate::ops::conv2d::Conv2d;
use crate::ops::spike_gather::{accumulate, has_avx2, DisjointWrites, GatherWeights};
use crate::ops::{expect_inputs, Operator};
use crate::optimize::block_selector::{BlockSelector, BlockSize};
use crate::tensor::Tensor;

/// How the prescan block size is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockChoice {
    /// From the input's height at each forward.
    Auto(BlockSelector),
    /// Chosen ahead (by `optimize` from a known input size, or by the user).
    Fixed(BlockSize),
}

impl BlockChoice {
    pub fn resolve(&self, height: usize) -> BlockSize {
        match self {
            BlockChoice::Auto(selector) => selector.select(height),
            BlockChoice::Fixed(block) => *block,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            BlockChoice::Auto(_) => "auto".into(),
            BlockChoice::Fixed(Some(b)) => b.to_string(),
            BlockChoice::Fixed(None) => "none".into(),
        }
    }
}

#[derive(Debug)]
pub struct SparseConv2d {
    /// The weights and geometry, as a dense layer.
    pub conv: Conv2d,
    pub block: BlockChoice,
    /// Inputs denser than this fraction of non-zeros take the dense path
    /// ([`DENSE_ABOVE_DENSITY`] by default; `f64::INFINITY` forces the sparse kernel).
    pub dense_above_density: f64,
    last_forward: Mutex<Option<Duration>>,
    /// The weights in gather layout, built on first use.
    gather: Mutex<Option<std::sync::Arc<GatherWeights>>>,
}

impl SparseConv2d {
    /// A sparse twin of `conv`, carrying the same weights.
    pub fn from_dense(conv: &Conv2d, block: BlockChoice) -> Self {
        Self {
            conv: conv.clone(),
            block,
            dense_above_density: DENSE_ABOVE_DENSITY,
            last_forward: Mutex::new(None),
            gather: Mutex::new(None),
        }
    }

    /// From weights `[Cout, Cin/groups, kh, kw]`, an optional bias `[Cout]` and the geometry.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
        groups: usize,
        block: BlockChoice,
    ) -> Result<Self> {
        let conv = Conv2d::new(weight, bias, stride, padding, dilation, groups)?;
        Ok(Self::from_dense(&conv, block))
    }

    /// Wall time of the last forward, every stage included.
    pub fn last_forward_time(&self) -> Option<Duration> {
        *self.last_forward.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn compute(&self, x: &Tensor) -> Result<Tensor> {
        let out_shape = self.conv.output_shape(x.shape())?;
        if self.conv.groups != 1 || self.conv.kernel_size().0 > MAX_KERNEL_ROWS {
            return self.conv.forward(&[x]);
        }
        let (n, cin, h, w) = nchw(x.shape());
        let image = cin * h * w;
        let scans: Vec<ActiveChannels> = x
            .data()
            .par_chunks(image.max(1))
            .map(|img| ActiveChannels::scan(img, cin, h, w))
            .collect();
        let nonzeros: usize = scans.iter().map(|s| s.nonzeros).sum();
        let density = nonzeros as f64 / x.len().max(1) as f64;
        if density > self.dense_above_density {
            return self.conv.forward(&[x]);
        }
        let weights = self.gather_weights();
        let mut out = vec![0.0f32; out_shape.iter().product()];
        sparse_conv_cpu(&self.conv, &weights, x.data(), &scans, (n, h, w), &mut out);
        Tensor::new(out_shape, out)
    }

    /// The weights as `[kh·kw·Cin, Cout]` rows, built on first use.
    fn gather_weights(&self) -> std::sync::Arc<GatherWeights> {
        let mut cached = self.gather.lock().unwrap_or_else(|p| p.into_inner());
        cached
            .get_or_insert_with(|| {
                let (kh, kw) = self.conv.kernel_size();
                let cin = self.conv.in_channels();
                let taps = kh * kw;
                // PyTorch's column index k = (c·kh + ky)·kw + kx; our row is (ky·kw + kx)·Cin + c.
                let row_of = |k: usize| (k % taps) * cin + k / taps;
                std::sync::Arc::new(GatherWeights::from_output_major(
                    self.conv.weight.data(),
                    self.conv.out_channels(),
                    cin * taps,
                    row_of,
                ))
            })
            .clone()
    }
}

/// Above this fraction of non-zero inputs the dense GEMM path is faster than gathering
/// (measured with `sparseflow bench-layer`; see the README's results).
pub const DENSE_ABOVE_DENSITY: f64 = 0.25;

/// Kernels taller than this take the dense path (the row kernel keeps its taps on the stack).
const MAX_KERNEL_ROWS: usize = 16;

fn nchw(shape: &[usize]) -> (usize, usize, usize, usize) {
    let r = shape.len();
    (
        shape[..r - 3].iter().product(),
        shape[r - 3],
        shape[r - 2],
        shape[r - 1],
    )
}

/// Which input channels are non-zero at each pixel of one image, as bitmasks.
#[derive(Debug)]
struct ActiveChannels {
    /// `u64` words per pixel: `ceil(Cin / 64)`.
    words: usize,
    /// `[H·W·words]`: bit `c % 64` of word `c / 64` is set when channel `c` is non-zero.
    masks: Vec<u64>,
    /// Whether input row `y` has any non-zero element (a silent row is skipped whole).
    row_active: Vec<bool>,
    nonzeros: usize,
    /// Every non-zero is exactly 1: the gather can skip the multiply.
    binary: bool,
}

impl ActiveChannels {
    fn scan(image: &[f32], cin: usize, h: usize, w: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 and FMA were detected.
            return unsafe { Self::scan_avx2(image, cin, h, w) };
        }
        Self::scan_portable(image, cin, h, w)
    }

    /// The same as [`Self::scan_portable`], 32 elements per step with compare + movemask.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scan_avx2(image: &[f32], cin: usize, h: usize, w: usize) -> Self {
        use std::arch::x86_64::*;
        let hw = h * w;
        if hw % 32 != 0 {
            return Self::scan_portable(image, cin, h, w);
        }
        let words = cin.div_ceil(64).max(1);
        let mut masks = vec![0u64; hw * words];
        let mut nonzeros = 0;
        let mut non_binary = 0u32;
        let (zero, one) = (_mm256_setzero_ps(), _mm256_set1_ps(1.0));
        for (c, plane) in image.chunks_exact(hw).enumerate() {
            let (word, bit) = (c / 64, 1u64 << (c % 64));
            for (block, values) in plane.chunks_exact(32).enumerate() {
                let mut nz = 0u32;
                for k in 0..4 {
                    let v = _mm256_loadu_ps(values.as_ptr().add(8 * k));
                    let is_nz = _mm256_cmp_ps::<_CMP_NEQ_UQ>(v, zero);
                    let not_one = _mm256_cmp_ps::<_CMP_NEQ_UQ>(v, one);
                    nz |= (_mm256_movemask_ps(is_nz) as u32) << (8 * k);
                    non_binary |= _mm256_movemask_ps(_mm256_and_ps(is_nz, not_one)) as u32;
                }
                nonzeros += nz.count_ones() as usize;
                while nz != 0 {
                    let p = block * 32 + nz.trailing_zeros() as usize;
                    nz &= nz - 1;
                    *masks.get_unchecked_mut(p * words + word) |= bit;
                }
            }
        }
        let row_active = (0..h)
            .map(|y| {
                masks[y * w * words..(y + 1) * w * words]
                    .iter()
                    .any(|&m| m != 0)
            })
            .collect();
        Self {
            words,
            masks,
            row_active,
            nonzeros,
            binary: non_binary == 0,
        }
    }

    #[inline(always)]
    fn scan_portable(image: &[f32], cin: usize, h: usize, w: usize) -> Self {
        let hw = h * w;
        let words = cin.div_ceil(64).max(1);
        let mut masks = vec![0u64; hw * words];
        let mut row_active = vec![false; h];
        let mut nonzeros = 0;
        let mut binary = true;
        for (c, plane) in image.chunks_exact(hw.max(1)).enumerate() {
            let (word, bit) = (c / 64, 1u64 << (c % 64));
            // Most 16-element runs of a spike plane are silent: test each with one branch-free
            // (vectorised) OR of the magnitude bits, so ±0 both count as silent.
            for (block, values) in plane.chunks(16).enumerate() {
                // One branch-free (vectorised) pass builds the block's non-zero bitmask.
                let mut nz = 0u32;
                let mut non_binary = false;
                for (i, &v) in values.iter().enumerate() {
                    nz |= ((v != 0.0) as u32) << i;
                    non_binary |= v != 0.0 && v != 1.0;
                }
                binary &= !non_binary;
                nonzeros += nz.count_ones() as usize;
                while nz != 0 {
                    let p = block * 16 + nz.trailing_zeros() as usize;
                    nz &= nz - 1;
                    masks[p * words + word] |= bit;
                }
            }
        }
        for (y, active) in row_active.iter_mut().enumerate() {
            *active = masks[y * w * words..(y + 1) * w * words]
                .iter()
                .any(|&m| m != 0);
        }
        Self {
            words,
            masks,
            row_active,
            nonzeros,
            binary,
        }
    }
}

/// The sparse convolution of `n` images `[Cin, H, W]` into `out` `[n, Cout, OH, OW]`: every
/// output row of every image is one parallel task that walks the active inputs under each output
/// pixel's receptive field.
fn sparse_conv_cpu(
    conv: &Conv2d,
    weights: &GatherWeights,
    input: &[f32],
    scans: &[ActiveChannels],
    (n, h, w): (usize, usize, usize),
    out: &mut [f32],
) {
    let (oh, ow) = conv.output_hw(h, w).expect("validated by output_shape");
    let cin = conv.in_channels();
    let cout = conv.out_channels();
    let bias: Vec<f32> = match &conv.bias {
        Some(b) => b.data().to_vec(),
        None => vec![0.0; cout],
    };
    let mut padded_bias = bias.clone();
    padded_bias.resize(weights.padded_outputs, 0.0);
    let geometry = RowGeometry {
        cin,
        h,
        w,
        ow,
        kernel: conv.kernel_size(),
        stride: conv.stride,
        padding: conv.padding,
        dilation: conv.dilation,
    };
    let chunks = weights.chunks();
    let dst = DisjointWrites(out.as_mut_ptr());
    let avx2 = has_avx2();
    (0..n * oh).into_par_iter().for_each_init(
        || vec![0.0f32; ow * weights.padded_outputs],
        |row, task| {
            let (img, oy) = (task / oh, task % oh);
            let image = &input[img * cin * h * w..(img + 1) * cin * h * w];
            let job = RowJob {
                g: &geometry,
                weights,
                bias: &padded_bias,
                chunks: &chunks,
                scan: &scans[img],
                image,
                oy,
            };
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 and FMA were detected.
                unsafe { job.run_avx2(row) };
            } else {
                job.run(row);
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = avx2;
                job.run(row);
            }
            // SAFETY: task (img, oy) alone writes output row oy of image img, for every channel.
            unsafe {
                write_row_nchw(
                    row,
                    weights.padded_outputs,
                    dst,
                    (img * cout) * oh * ow + oy * ow,
                    oh * ow,
                    cout,
                    ow,
                    avx2,
                )
            };
        },
    );
}

/// Transposes a finished row `[OW, padded]` into output row `oy` of every channel plane:
/// `out[first + co·plane + ox] = row[ox·padded + co]`.
///
/// # Safety
/// The caller alone writes those output elements, and they are in bounds.
#[allow(clippy::too_many_arguments)]
unsafe fn write_row_nchw(
    row: &[f32],
    padded: usize,
    dst: DisjointWrites,
    first: usize,
    plane: usize,
    cout: usize,
    ow: usize,
    avx2: bool,
) {
    let (mut co0, mut ox0) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        (co0, ox0) = transpose_8x8_blocks(row, padded, dst, first, plane, cout, ow);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = avx2;
    // What the 8×8 blocks did not cover: the channel tail for every pixel, then the pixel tail.
    for co in 0..cout {
        let from = if co < co0 { ox0 } else { 0 };
        for ox in from..ow {
            dst.write(first + co * plane + ox, row[ox * padded + co]);
        }
    }
}

/// The 8×8-block part of [`write_row_nchw`]; returns how many channels and pixels it covered.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose_8x8_blocks(
    row: &[f32],
    padded: usize,
    dst: DisjointWrites,
    first: usize,
    plane: usize,
    cout: usize,
    ow: usize,
) -> (usize, usize) {
    use std::arch::x86_64::*;
    let (co_end, ox_end) = (cout / 8 * 8, ow / 8 * 8);
    for ox in (0..ox_end).step_by(8) {
        for co in (0..co_end).step_by(8) {
            let r: [__m256; 8] =
                std::array::from_fn(|j| _mm256_loadu_ps(row.as_ptr().add((ox + j) * padded + co)));
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let cols = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (k, col) in cols.iter().enumerate() {
                _mm256_storeu_ps(dst.0.add(first + (co + k) * plane + ox), *col);
            }
        }
    }
    (co_end, ox_end)
}

struct RowGeometry {
    cin: usize,
    h: usize,
    w: usize,
    ow: usize,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
}

impl RowGeometry {
    /// The input coordinate of output coordinate `o` at tap `k`, if inside the image.
    #[inline(always)]
    fn source(
        o: usize,
        k: usize,
        stride: usize,
        pad: usize,
        dil: usize,
        size: usize,
    ) -> Option<usize> {
        (o * stride + k * dil)
            .checked_sub(pad)
            .filter(|&i| i < size)
    }
}

/// One output row of one image.
struct RowJob<'a> {
    g: &'a RowGeometry,
    weights: &'a GatherWeights,
    bias: &'a [f32],
    chunks: &'a [(usize, usize)],
    scan: &'a ActiveChannels,
    image: &'a [f32],
    oy: usize,
}

impl RowJob<'_> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, row: &mut [f32]) {
        self.run(row)
    }

    /// Fills `row` `[OW, padded Cout]`.
    #[inline(always)]
    fn run(&self, row: &mut [f32]) {
        for &(start, width) in self.chunks {
            match (width, self.scan.binary) {
                (64, true) => self.chunk::<64, true>(row, start),
                (64, false) => self.chunk::<64, false>(row, start),
                (32, true) => self.chunk::<32, true>(row, start),
                (32, false) => self.chunk::<32, false>(row, start),
                (16, true) => self.chunk::<16, true>(row, start),
                (16, false) => self.chunk::<16, false>(row, start),
                (_, true) => self.chunk::<8, true>(row, start),
                (_, false) => self.chunk::<8, false>(row, start),
            }
        }
    }

    /// Output lanes `start..start + CH` of the row: per output pixel, the accumulator stays in
    /// registers while the active inputs under its receptive field add their weight rows.
    #[inline(always)]
    fn chunk<const CH: usize, const BINARY: bool>(&self, row: &mut [f32], start: usize) {
        let g = self.g;
        let (kh, kw) = g.kernel;
        let hw = g.h * g.w;
        let padded = self.weights.padded_outputs;
        let (masks, words) = (&self.scan.masks[..], self.scan.words);
        let mut bias = [0.0f32; CH];
        bias.copy_from_slice(&self.bias[start..start + CH]);
        // The active input rows under this output row (kh <= MAX_KERNEL_ROWS).
        let mut rows = [(0usize, 0usize); MAX_KERNEL_ROWS];
        let mut n_rows = 0;
        for ky in 0..kh {
            if let Some(iy) =
                RowGeometry::source(self.oy, ky, g.stride.0, g.padding.0, g.dilation.0, g.h)
            {
                if self.scan.row_active[iy] {
                    rows[n_rows] = (ky, iy);
                    n_rows += 1;
                }
            }
        }
        for ox in 0..g.ow {
            row[ox * padded + start..ox * padded + start + CH].copy_from_slice(&bias);
        }
        let base = self.weights.data[start..].as_ptr();
        // Tap by tap: one tap's weights (Cin rows of CH lanes) stay in L1 while the whole output
        // row takes their contributions.
        for &(ky, iy) in &rows[..n_rows] {
            for kx in 0..kw {
                let tap_row = (ky * kw + kx) * g.cin;
                for ox in 0..g.ow {
                    let Some(ix) =
                        RowGeometry::source(ox, kx, g.stride.1, g.padding.1, g.dilation.1, g.w)
                    else {
                        continue;
                    };
                    let p = iy * g.w + ix;
                    let out = &mut row[ox * padded + start..ox * padded + start + CH];
                    let mut acc: [f32; CH] = out.try_into().expect("CH lanes");
                    let mut touched = false;
                    for word in 0..words {
                        // SAFETY: p < H·W, so the mask index is in bounds; every set bit is a
                        // channel c < Cin, so the weight row (tap·Cin + c) < kh·kw·Cin and the
                        // input index c·H·W + p is in the image; start + CH <= padded.
                        let mut m = unsafe { *masks.get_unchecked(p * words + word) };
                        touched |= m != 0;
                        while m != 0 {
                            let c = word * 64 + m.trailing_zeros() as usize;
                            m &= m - 1;
                            unsafe {
                                let src = base.add((tap_row + c) * padded);
                                let value = if BINARY {
                                    1.0
                                } else {
                                    *self.image.get_unchecked(c * hw + p)
                                };
                                accumulate::<CH, BINARY>(&mut acc, src, value);
                            }
                        }
                    }
                    if touched {
                        out.copy_from_slice(&acc);
                    }
                }
            }
        }
    }
}

impl Operator for SparseConv2d {
    fn type_name(&self) -> &'static str {
        "SparseConv2d"
    }

    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = expect_inputs::<1>("SparseConv2d", inputs)?;
        let start = Instant::now();
        let out = self.compute(x)?;
        *self.last_forward.lock().unwrap_or_else(|p| p.into_inner()) = Some(start.elapsed());
        Ok(out)
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        self.conv.params()
    }

    fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        // The weights may change: rebuild the gather layout on the next forward.
        *self.gather.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
        self.conv.params_mut()
    }

    fn describe(&self) -> String {
        format!("{} block={}", self.conv.describe(), self.block.describe())
    }

    impl_as_any!();
}
