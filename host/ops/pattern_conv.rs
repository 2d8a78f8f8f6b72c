//! The pattern-table path of [`SparseConv2d`](super::sparse_conv2d::SparseConv2d): a
//! convolution of binary spikes by table lookups, for wide kernels on dense-ish spikes.
//!
//! One row of a `kh × kw` window covers `kw` inputs of one channel; on binary spikes they form a
//! `kw`-bit pattern. A table built once from the weights holds, for every pattern, the sum of the
//! weights its set bits select, for every output channel. An output pixel then costs `kh · Cin`
//! vector lookups instead of `kh · kw · Cin` multiply-adds, whatever the density: the ResNet stem
//! (7×7, 3 channels) on Poisson-encoded images takes 21 lookups per pixel instead of 147
//! multiply-adds (dense) or about 74 weight rows (the element gather at 50% spikes).
//!
//! The lookups are branch-free: pattern 0 is a row of zeros like any other. Window rows wider
//! than [`SEGMENT_BITS`] are split into segments of at most that many bits, one table each (7 bits:
//! 16 + 8 rows instead of 128), so the stem's tables fit in L2: twice the lookups, but each one a
//! cache hit instead of a trip to L3.

use crate::ops::conv2d::Conv2d;
use crate::ops::spike_gather::{accumulate, has_avx2, GatherWeights};

use super::sparse_conv2d::{for_each_band, Band};

/// Output pixels whose accumulators stay in L1 while one kernel row's tables serve them.
const PIXEL_BLOCK: usize = 32;

/// Kernels at most this wide take the pattern path.
pub const MAX_PATTERN_BITS: usize = 8;

/// The widest pattern one table covers.
pub const SEGMENT_BITS: usize = 4;

/// Tables larger than this many floats are not built: their lookups would come from memory, and
/// the element gather or the dense GEMM does better.
const MAX_TABLE_FLOATS: usize = 1 << 20;

/// `kw` times the input density above which the tables beat the element gather: a pixel costs
/// `kh · Cin` lookups against about `kh · kw · Cin · density` gathered rows.
pub const MIN_ROWS_PER_LOOKUP: f64 = 1.5;

/// The pattern tables of one convolution.
#[derive(Debug)]
pub struct PatternTables {
    /// `[kh][Cin][block][padded]`: for each segment `s`, rows `offsets[s] + p` for its
    /// patterns `p` (`2^bits` of them), the sum of the weight columns `kx` of the segment whose
    /// bit is set in `p`, for every output channel (padded like the gather weights).
    data: Vec<f32>,
    kh: usize,
    cin: usize,
    padded: usize,
    /// `(first column, bits, first row within the block)` of each segment.
    segments: Vec<(usize, usize, usize)>,
    /// Table rows per (kernel row, channel).
    block: usize,
}

impl PatternTables {
    /// The tables of `conv`, when its geometry allows them: one group, dilation 1, `kw` of
    /// 2..=8 and a table of at most [`MAX_TABLE_FLOATS`].
    pub fn new(conv: &Conv2d, padded: usize) -> Option<Self> {
        let (kh, kw) = conv.kernel_size();
        let cin = conv.in_channels();
        let cout = conv.out_channels();
        let count = kw.div_ceil(SEGMENT_BITS);
        let mut segments = Vec::with_capacity(count);
        let (mut column, mut block) = (0, 0);
        for s in 0..count {
            let bits = (kw - column).div_ceil(count - s);
            segments.push((column, bits, block));
            column += bits;
            block += 1 << bits;
        }
        let rows = kh * cin * block;
        if conv.groups != 1
            || conv.dilation != (1, 1)
            || !(2..=MAX_PATTERN_BITS).contains(&kw)
            || rows * padded > MAX_TABLE_FLOATS
        {
            return None;
        }
        let w = conv.weight.data();
        let mut data = vec![0.0f32; rows * padded];
        for ky in 0..kh {
            for c in 0..cin {
                for &(first, bits, offset) in &segments {
                    for pattern in 1..1usize << bits {
                        let row = ((ky * cin + c) * block + offset + pattern) * padded;
                        for (o, out) in data[row..row + cout].iter_mut().enumerate() {
                            // f64 sums, rounded once: each entry is as exact as one weight.
                            let taps = &w[((o * cin + c) * kh + ky) * kw + first..][..bits];
                            let sum: f64 = (0..bits)
                                .filter(|b| pattern >> b & 1 == 1)
                                .map(|b| f64::from(taps[b]))
                                .sum();
                            *out = sum as f32;
                        }
                    }
                }
            }
        }
        Some(Self {
            data,
            kh,
            cin,
            padded,
            segments,
            block,
        })
    }
}

/// Binary images as bitmaps, one per (image, channel, input row): bit `pad + x` (little-endian
/// within bytes) is set when input column `x` fires, so a window row starting at padded column
/// `ox · stride` is `kw` consecutive bits. Each row has 8 spare zero bytes, so any window is one
/// unaligned 8-byte read.
struct RowBits {
    row_bytes: usize,
    bytes: Vec<u8>,
}

impl RowBits {
    /// `None` when some value is neither 0 nor 1.
    fn scan(x: &[f32], rows: usize, w: usize, pad: usize) -> Option<Self> {
        let row_bytes = (w + 2 * pad).div_ceil(8) + 8;
        let mut bytes = vec![0u8; rows * row_bytes];
        let ok = bytes
            .chunks_exact_mut(row_bytes)
            .zip(x.chunks_exact(w))
            .all(|(row, values)| {
                let mut binary = true;
                for (i, &v) in values.iter().enumerate() {
                    binary &= v == 0.0 || v == 1.0;
                    row[(pad + i) / 8] |= u8::from(v == 1.0) << ((pad + i) % 8);
                }
                binary
            });
        ok.then_some(Self { row_bytes, bytes })
    }

    /// The bits of `mask` (at most 57 wide) from bit `offset` of row `row`.
    #[inline(always)]
    fn window(&self, row: usize, offset: usize, mask: u64) -> u64 {
        let at = row * self.row_bytes + offset / 8;
        let word = u64::from_le_bytes(self.bytes[at..at + 8].try_into().expect("8 bytes"));
        (word >> (offset % 8)) & mask
    }
}

/// The table rows every window row of one image selects, found once per image (an input row
/// serves `kh / stride` output rows): for input row `iy` and output column `ox`, the offsets
/// (`row · padded`, within one kernel row's tables) of its `Cin × segments` lookups.
struct PatternRows {
    /// `[H][OW][lookups]`.
    offsets: Vec<u32>,
    lookups: usize,
}

impl PatternRows {
    fn new(bits: &RowBits, t: &PatternTables, (h, ow): (usize, usize), stride: usize) -> Self {
        let lookups = t.cin * t.segments.len();
        let mut offsets = vec![0u32; h * ow * lookups];
        for iy in 0..h {
            for c in 0..t.cin {
                for (s, &(first, width, offset)) in t.segments.iter().enumerate() {
                    let mask = (1u64 << width) - 1;
                    let at = iy * ow * lookups + c * t.segments.len() + s;
                    for ox in 0..ow {
                        let pattern = bits.window(c * h + iy, ox * stride + first, mask) as usize;
                        // Fits: the tables hold at most MAX_TABLE_FLOATS floats.
                        offsets[at + ox * lookups] =
                            ((c * t.block + offset + pattern) * t.padded) as u32;
                    }
                }
            }
        }
        Self { offsets, lookups }
    }
}

/// The convolution of `n` binary images `[Cin, H, W]` (`x`) into `out` `[n, Cout, OH, OW]`
/// through `tables`; `false`, with `out` untouched, when `x` is not binary.
pub(crate) fn pattern_conv_cpu(
    conv: &Conv2d,
    weights: &GatherWeights,
    tables: &PatternTables,
    x: &[f32],
    (n, h, w): (usize, usize, usize),
    out: *mut f32,
) -> bool {
    use rayon::prelude::*;
    let cin = tables.cin;
    let (_, ow) = conv.output_hw(h, w).expect("validated by output_shape");
    let Some(rows) = x
        .par_chunks(cin * h * w)
        .map(|image| {
            let bits = RowBits::scan(image, cin * h, w, conv.padding.1)?;
            Some(PatternRows::new(&bits, tables, (h, ow), conv.stride.1))
        })
        .collect::<Option<Vec<_>>>()
    else {
        return false;
    };
    let job = PatternJob {
        tables,
        rows: &rows,
        h,
        ow,
        stride: conv.stride,
        pad_h: conv.padding.0,
    };
    for_each_band(conv, weights, (n, h, w), out, |band, bias, buffer| {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 and FMA were detected.
            unsafe { job.run_avx2(band, bias, buffer) };
            return;
        }
        job.run(band, bias, buffer);
    });
    true
}

struct PatternJob<'a> {
    tables: &'a PatternTables,
    rows: &'a [PatternRows],
    h: usize,
    ow: usize,
    stride: (usize, usize),
    pad_h: usize,
}

impl PatternJob<'_> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, band: &Band, bias: &[f32], buffer: &mut [f32]) {
        self.run(band, bias, buffer)
    }

    #[inline(always)]
    fn run(&self, band: &Band, bias: &[f32], buffer: &mut [f32]) {
        match band.width {
            64 => self.band::<64>(band, bias, buffer),
            32 => self.band::<32>(band, bias, buffer),
            16 => self.band::<16>(band, bias, buffer),
            _ => self.band::<8>(band, bias, buffer),
        }
    }

    /// Kernel row by kernel row over blocks of [`PIXEL_BLOCK`] pixels: one kernel row's tables
    /// (`Cin · block` rows) and the block's accumulators stay in L1 together.
    #[inline(always)]
    fn band<const CH: usize>(&self, band: &Band, bias: &[f32], buffer: &mut [f32]) {
        let t = self.tables;
        let bias: [f32; CH] = bias[band.start..band.start + CH]
            .try_into()
            .expect("CH lanes");
        for px in buffer.chunks_exact_mut(CH) {
            px.copy_from_slice(&bias);
        }
        let base = t.data[band.start..].as_ptr();
        let ky_tables = t.cin * t.block * t.padded;
        let out_rows = buffer.chunks_exact_mut(self.ow * CH);
        let coords = band
            .images
            .clone()
            .flat_map(|img| (band.oy0..band.oy0 + band.rows).map(move |oy| (img, oy)));
        for (out_row, (img, oy)) in out_rows.zip(coords) {
            let rows = &self.rows[img];
            for x0 in (0..self.ow).step_by(PIXEL_BLOCK) {
                let x1 = (x0 + PIXEL_BLOCK).min(self.ow);
                for ky in 0..t.kh {
                    let Some(iy) = (oy * self.stride.0 + ky)
                        .checked_sub(self.pad_h)
                        .filter(|&iy| iy < self.h)
                    else {
                        continue;
                    };
                    for (ox, px) in (x0..x1).zip(out_row[x0 * CH..x1 * CH].chunks_exact_mut(CH)) {
                        let mut acc: [f32; CH] = (&*px).try_into().expect("CH lanes");
                        let at = (iy * self.ow + ox) * rows.lookups;
                        let tables = ky * ky_tables;
                        for &offset in &rows.offsets[at..at + rows.lookups] {
                            // SAFETY: offset is a row of one kernel row's Cin·block tables, and
                            // start + CH <= padded.
                            unsafe {
                                accumulate::<CH, true>(
                                    &mut acc,
                                    base.add(tables + offset as usize),
                                    1.0,
                                )
                            };
                        }
                        px.copy_from_slice(&acc);
                    }
                }
            }
        }
    }
}
