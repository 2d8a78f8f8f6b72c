//! The pattern-table path of [`SparseConv2d`](super::sparse_conv2d::SparseConv2d): a
//! convolution of binary spikes by table lookups, for wide kernels on dense-ish spikes.
//!
//! One row of a `kh × kw` window covers `kw` inputs of one channel; on binary spikes they form a
//! `kw`-bit pattern. A table built once from the weights holds, for every pattern, the sum of the
//! weights its set bits select, for every output channel. An output pixel then costs one vector
//! lookup per kernel row, channel and segment instead of `kh · kw · Cin` multiply-adds, whatever
//! the density.
//!
//! On the CPU a window row of up to 8 bits is one segment and one lookup (the 7×7 stem: 128 rows
//! per kernel row and channel), where the tables fit [`MAX_TABLE_FLOATS`]; else, and always on
//! the GPU (whose CTAs hold a table slice in shared memory), rows wider than 4 bits are split
//! into two segments, one table each (7 bits: 16 + 8 rows instead of 128), at twice the lookups.
//! The ResNet stem (7×7, 3 channels) on Poisson-encoded images then takes 21 lookups per pixel on
//! the CPU (42 on the GPU) instead of 147 multiply-adds (dense) or about 74 weight rows (the
//! element gather at 50% spikes); its tables, 172 KB, stay in L2. (Two segments, the tables in
//! L1, took 7.9 ms for the stem's conv, LIF and pool at T=4, N=1 on the 2-core Xeon; one
//! segment 6.3–6.6 ms.) The lookups are branch-free: pattern 0 is a row of zeros like any other.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use sparseflow_kernels::pattern_conv::{
    PatternGeometry, PatternSegments, MAX_PATTERN_BITS, PACK_ROW_THREADS, PATTERN_CHUNK,
    PATTERN_THREADS, PATTERN_TILE, SEGMENT_BITS,
};

/// The widest segment of the CPU's tables: a whole window row of up to 8 bits, one lookup.
pub const CPU_SEGMENT_BITS: u32 = 8;

use crate::cuda::{ByValue, CudaBackend, DeviceCache, DeviceTensor};
use crate::error::{Error, Result};
use crate::ops::conv2d::Conv2d;
use crate::ops::spike_gather::{accumulate, has_avx2, AlignedFloats, GatherWeights};
use crate::ops::Operator;

use super::sparse_conv2d::{for_each_band, Band};

/// Output pixels whose accumulators stay in L1 while one kernel row's tables serve them.
const PIXEL_BLOCK: usize = 32;

/// Tables larger than this many floats are not built: their lookups would come from memory, and
/// the element gather or the dense GEMM does better.
const MAX_TABLE_FLOATS: usize = 1 << 20;

/// `kw` times the input density from which the tables beat the element gather: a pixel costs
/// `kh · Cin` lookups against about `kh · kw · Cin · density` gathered rows, and a lookup (two
/// segments, a table bigger than L1) costs more than a row. Measured on the 2-core CI machine,
/// batch 8 / T·N 4, binary spikes, one process alternating: 3×3 64→64 @56 at 50% (1.5 rows per
/// lookup) gather 15.9 ms, tables 18.2 ms; at 70% tables 16.5 ms, dense 21.9 ms; the 7×7 stem
/// at 35% (2.45) tables 11.0 ms, gather 21.8 ms.
pub const MIN_ROWS_PER_LOOKUP: f64 = 2.0;

/// The pattern tables of one convolution.
#[derive(Debug)]
pub struct PatternTables {
    /// `[kh][Cin][block][padded]`: for each segment `s`, rows `offsets[s] + p` for its
    /// patterns `p` (`2^bits` of them), the sum of the weight columns `kx` of the segment whose
    /// bit is set in `p`, for every output channel (padded like the gather weights).
    data: AlignedFloats,
    kh: usize,
    cin: usize,
    padded: usize,
    /// How a window row splits into segments (the GPU kernel's split); `segments.block` table
    /// rows per (kernel row, channel).
    segments: PatternSegments,
}

impl PatternTables {
    /// Whether [`PatternTables::new`] builds tables for `conv` (outputs padded to `padded`,
    /// segments of at most `segment_bits`).
    pub fn supports(conv: &Conv2d, padded: usize, segment_bits: u32) -> bool {
        let (kh, kw) = conv.kernel_size();
        let segments = PatternSegments::with_max_bits(kw as u32, segment_bits);
        conv.groups == 1
            && conv.dilation == (1, 1)
            && (2..=MAX_PATTERN_BITS as usize).contains(&kw)
            && kh * conv.in_channels() * segments.block as usize * padded <= MAX_TABLE_FLOATS
    }

    /// The CPU's tables of `conv`: one segment per window row ([`CPU_SEGMENT_BITS`]) where
    /// those fit [`MAX_TABLE_FLOATS`], else the GPU's split.
    pub fn for_cpu(conv: &Conv2d, padded: usize) -> Option<Self> {
        Self::new(conv, padded, CPU_SEGMENT_BITS).or_else(|| Self::new(conv, padded, SEGMENT_BITS))
    }

    /// The tables of `conv` with segments of at most `segment_bits`, when its geometry allows
    /// them: one group, dilation 1, `kw` of 2..=8 and a table of at most [`MAX_TABLE_FLOATS`].
    pub fn new(conv: &Conv2d, padded: usize, segment_bits: u32) -> Option<Self> {
        if !Self::supports(conv, padded, segment_bits) {
            return None;
        }
        let (kh, kw) = conv.kernel_size();
        let cin = conv.in_channels();
        let cout = conv.out_channels();
        let segments = PatternSegments::with_max_bits(kw as u32, segment_bits);
        let block = segments.block as usize;
        let rows = kh * cin * block;
        let w = conv.weight.data();
        let mut data = AlignedFloats::zeros(rows * padded);
        for ky in 0..kh {
            for c in 0..cin {
                for (first, bits, offset) in segments.iter() {
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
                // Eight values per step (one vector compare), their bits shifted into place.
                for (k, chunk) in values.chunks(8).enumerate() {
                    let mut bits = 0u16;
                    for (j, &v) in chunk.iter().enumerate() {
                        binary &= v == 0.0 || v == 1.0;
                        bits |= u16::from(v == 1.0) << j;
                    }
                    let at = pad + 8 * k;
                    let bits = bits << (at % 8);
                    // The row's spare bytes keep at / 8 + 1 in bounds.
                    row[at / 8] |= bits as u8;
                    row[at / 8 + 1] |= (bits >> 8) as u8;
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
        let per_channel = t.segments.count as usize;
        let lookups = t.cin * per_channel;
        let mut offsets = vec![0u32; h * ow * lookups];
        for iy in 0..h {
            for c in 0..t.cin {
                for (s, (first, width, offset)) in t.segments.iter().enumerate() {
                    let mask = (1u64 << width) - 1;
                    let at = iy * ow * lookups + c * per_channel + s;
                    for ox in 0..ow {
                        let pattern = bits.window(c * h + iy, ox * stride + first, mask) as usize;
                        // Fits: the tables hold at most MAX_TABLE_FLOATS floats.
                        offsets[at + ox * lookups] =
                            ((c * t.segments.block as usize + offset + pattern) * t.padded) as u32;
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
    #[target_feature(enable = "avx2,fma,popcnt,bmi1,bmi2")]
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
        let ky_tables = t.cin * t.segments.block as usize * t.padded;
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

/// The tables and bias on one CUDA device, outputs padded to [`PATTERN_CHUNK`] (the kernel's
/// channels per CTA).
#[derive(Debug)]
pub struct DevicePatternTables {
    table: CudaSlice<f32>,
    bias: CudaSlice<f32>,
    padded: u32,
}

impl DevicePatternTables {
    /// The copy in `cache` for `backend`, built from `conv`'s weights and bias when missing or
    /// stale; `None` inside when `conv`'s geometry allows no tables.
    pub(crate) fn cached(
        cache: &DeviceCache<Option<Self>>,
        conv: &Conv2d,
        backend: &CudaBackend,
    ) -> Result<Arc<Option<Self>>> {
        let mut sources = vec![&conv.weight];
        sources.extend(conv.bias.as_ref());
        cache.get(backend, &sources, || Self::upload(conv, backend))
    }

    /// `None` when `conv`'s geometry allows no tables.
    pub fn upload(conv: &Conv2d, backend: &CudaBackend) -> Result<Option<Self>> {
        let cout = conv.out_channels();
        let padded = cout.div_ceil(PATTERN_CHUNK as usize) * PATTERN_CHUNK as usize;
        let Some(tables) = PatternTables::new(conv, padded, SEGMENT_BITS) else {
            return Ok(None);
        };
        let mut bias = vec![0.0f32; padded];
        if let Some(b) = &conv.bias {
            bias[..cout].copy_from_slice(b.data());
        }
        let stream = backend.stream();
        Ok(Some(Self {
            table: stream.clone_htod(&tables.data[..])?,
            bias: stream.clone_htod(&bias)?,
            padded: padded as u32,
        }))
    }
}

/// The pattern-table convolution of `x` (`[..., Cin, H, W]` on the device) into `out`: the
/// packing kernel, then the table kernel. Any input is computed exactly (when some value is
/// neither 0 nor 1 the whole launch takes multiply-adds); binary spikes are the fast case.
/// [`Error::MissingKernelVariant`] when the tables' slice does not fit in shared memory.
pub(crate) fn pattern_conv_cuda(
    conv: &Conv2d,
    tables: &DevicePatternTables,
    x: &DeviceTensor,
    out: &mut DeviceTensor,
) -> Result<()> {
    let backend = x.backend().clone();
    let g = PatternGeometry::new(conv.kernel_geometry(x.shape())?, tables.padded);
    let (c, words) = (g.conv, g.words);
    let rows = c.n as usize * c.cin as usize * c.h as usize;
    let packed_threads = u32::try_from(rows * words as usize * 32)
        .map_err(|_| Error::Shape(format!("{:?} is too large for the GPU kernels", x.shape())))?;
    out.len_u32()?;
    let shared = g.shared_bytes();
    if shared as usize > backend.max_shared_memory_per_block() {
        return Err(Error::MissingKernelVariant(format!(
            "pattern_conv for {}: {shared} bytes of shared memory (the device allows {})",
            conv.describe(),
            backend.max_shared_memory_per_block()
        )));
    }
    let pixels = c.n * c.oh * c.ow;
    if pixels == 0 || c.cout == 0 {
        return Ok(());
    }
    let stream = backend.stream();
    let packed = (rows * words as usize).max(1);
    // SAFETY: the packing kernel writes every word.
    let mut bits = unsafe { stream.alloc::<u32>(packed)? };
    let mut non_binary = stream.alloc_zeros::<u32>(1)?;
    let pack = backend.function("pattern_pack_rows")?;
    let rows32 = rows as u32;
    let mut launch = stream.launch_builder(&pack);
    launch
        .arg(x.slice())
        .arg(&mut bits)
        .arg(&mut non_binary)
        .arg(&rows32)
        .arg(&c.w)
        .arg(&c.pw)
        .arg(&words);
    // SAFETY: arguments match `pattern_pack_rows`' signature and contract.
    unsafe {
        launch.launch(LaunchConfig {
            grid_dim: (packed_threads.div_ceil(PACK_ROW_THREADS), 1, 1),
            block_dim: (PACK_ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        })?
    };
    let weights = conv.device_weights(&backend)?;
    let kernel = backend.function_with_shared("pattern_conv", shared)?;
    // A grid-stride loop over pixel tiles: each CTA loads its table slice once.
    let tiles = pixels.div_ceil(PATTERN_TILE);
    let geometry = ByValue(g);
    let mut launch = stream.launch_builder(&kernel);
    launch
        .arg(&bits)
        .arg(&non_binary)
        .arg(x.slice())
        .arg(&tables.table)
        .arg(&weights.weight)
        .arg(&tables.bias)
        .arg(out.slice_mut())
        .arg(&geometry);
    // SAFETY: arguments match `pattern_conv`'s signature and contract.
    unsafe {
        launch.launch(LaunchConfig {
            grid_dim: (tiles.min(1024), tables.padded / PATTERN_CHUNK, 1),
            block_dim: (PATTERN_THREADS, 1, 1),
            shared_mem_bytes: shared,
        })?
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::cuda::DeviceTensor;
    use crate::ops::conv2d::Conv2d;
    use crate::ops::sparse_conv2d::{BlockChoice, SparseConv2d};
    use crate::ops::Operator;
    use crate::testing::{assert_close_elementwise, gpu_or_skip, random_sparse, random_uniform};

    /// The GPU pattern kernels against the CPU dense conv, on fresh random inputs: binary spikes
    /// of several densities (the table path), integer and arbitrary values (the multiply-add
    /// path), channel counts that do and do not fill a 32-channel CTA; outputs NaN-poisoned before
    /// each launch and every element checked.
    #[test]
    fn gpu_pattern_conv_matches_cpu() {
        let Some(backend) = gpu_or_skip("gpu_pattern_conv_matches_cpu") else {
            return;
        };
        let mut seed = 0xA11;
        let mut checked = 0;
        // (N, Cin, Cout, H, W, kernel, stride, padding)
        for &(n, cin, cout, h, w, k, s, p) in &[
            (2, 3, 64, 30, 28, 7, 2, 3),
            (1, 3, 33, 40, 70, 7, 2, 3),
            (1, 5, 40, 17, 13, 5, 1, 2),
            (3, 4, 8, 9, 11, 2, 1, 0),
            (1, 2, 70, 12, 12, 3, 2, 1),
            (2, 1, 32, 5, 37, 8, 3, 4),
        ] {
            for input in [
                "binary 0",
                "binary 0.3",
                "binary 0.6",
                "binary 1",
                "integer",
                "any",
            ] {
                seed += 3;
                let conv = Conv2d::new(
                    random_uniform(&[cout, cin, k, k], -1.0, 1.0, seed),
                    Some(random_uniform(&[cout], -1.0, 1.0, seed + 1)),
                    (s, s),
                    (p, p),
                    (1, 1),
                    1,
                )
                .unwrap();
                let shape = [n, cin, h, w];
                let x = match input {
                    "integer" => random_sparse(&shape, 0.4, true, seed + 2),
                    "any" => random_uniform(&shape, -2.0, 2.0, seed + 2),
                    _ => {
                        let density = input[7..].parse().unwrap();
                        random_sparse(&shape, density, false, seed + 2)
                    }
                };
                let want = conv.forward(&[&x]).unwrap();
                let sparse = SparseConv2d::from_dense(&conv, BlockChoice::Fixed(None));
                let dx = DeviceTensor::upload(&backend, &x).unwrap();
                let mut out = DeviceTensor::uninit(&backend, want.shape().to_vec()).unwrap();
                out.fill(f32::NAN).unwrap();
                sparse.forward_cuda_pattern(&dx, &mut out).unwrap();
                let got = out.download().unwrap();
                assert_close_elementwise(
                    &got,
                    &want,
                    &format!("{n}x{cin}->{cout} {h}x{w} k{k} s{s} p{p} {input}"),
                );
                checked += 1;
            }
        }
        println!(
            "gpu_pattern_conv_matches_cpu: {checked} cases equal on {}",
            backend.name()
        );
    }
}
