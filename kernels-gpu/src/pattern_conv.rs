//! The pattern-table convolution of binary spikes, the GPU twin of `host/ops/pattern_conv.rs`
//! (which explains the tables): for a wide kernel on dense-ish spikes, such as the ResNet stem's
//! 7×7 on Poisson-encoded images, each window row of each channel is a `kw`-bit pattern, and one
//! table lookup adds the weights of all its set bits, for 32 output channels at once.
//!
//! Two kernels:
//! 1. [`pattern_pack_rows`] packs every input row into bits (bit `pw + x` for column `x`, so the
//!    padding is zeros), one warp ballot per 32 columns, and raises a flag when any value is
//!    neither 0 nor 1.
//! 2. [`pattern_conv`] keeps one 32-channel slice of the tables in shared memory and walks the
//!    output pixels, 8 lanes per pixel (4 channels each): the lanes first find the pixel's table
//!    rows between them (one window read each, not eight), then all add every row, each offset
//!    passed by shuffle. When the flag is up the kernel computes every pixel with multiply-adds
//!    from the raw weights instead, so any input gives the dense conv's result.

use crate::dense_conv::ConvGeometry;

/// Bits per table segment, and the widest kernel row the tables cover (two segments).
pub const SEGMENT_BITS: u32 = 4;
pub const MAX_PATTERN_BITS: u32 = 2 * SEGMENT_BITS;

/// Output channels per CTA: one 128-byte table row in shared memory.
pub const PATTERN_CHUNK: u32 = 32;
/// Threads per CTA of [`pattern_conv`]; each warp covers 4 pixels × 8 channel quads per step.
pub const PATTERN_THREADS: u32 = 256;
/// Output pixels per CTA step: each lane computes two.
pub const PATTERN_TILE: u32 = PATTERN_THREADS / 8 * 2;
/// Row stride (floats) of the output staging tile: 33 keeps both its writes and its
/// column-wise reads free of bank conflicts.
const STAGE_STRIDE: u32 = PATTERN_CHUNK + 1;
/// Threads per CTA of [`pattern_pack_rows`].
pub const PACK_ROW_THREADS: u32 = 256;

/// How a window row of `kw` bits splits into table segments: `(first column, bits, first row
/// within the block)` for each, the segment count and the rows per (kernel row, channel) block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct PatternSegments {
    pub first: [u32; 2],
    pub bits: [u32; 2],
    pub offset: [u32; 2],
    pub count: u32,
    pub block: u32,
}

impl PatternSegments {
    /// `kw` in `1..=MAX_PATTERN_BITS`: one segment up to [`SEGMENT_BITS`], else two near-halves.
    pub const fn new(kw: u32) -> Self {
        Self::with_max_bits(kw, SEGMENT_BITS)
    }

    /// `kw` in `1..=2 · max_bits`: one segment up to `max_bits`, else two near-halves.
    pub const fn with_max_bits(kw: u32, max_bits: u32) -> Self {
        let count = kw.div_ceil(max_bits);
        let lo = kw.div_ceil(count);
        let hi = kw - lo;
        if count == 1 {
            Self {
                first: [0, 0],
                bits: [kw, 0],
                offset: [0, 0],
                count,
                block: 1 << kw,
            }
        } else {
            Self {
                first: [0, lo],
                bits: [lo, hi],
                offset: [0, 1 << lo],
                count,
                block: (1 << lo) + (1 << hi),
            }
        }
    }
}

impl PatternSegments {
    /// `(first column, bits, first row within the block)` of each segment, as `usize` (the host's
    /// view; the kernel selects fields without a dynamic index).
    pub fn iter(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        (0..self.count as usize).map(|s| {
            (
                self.first[s] as usize,
                self.bits[s] as usize,
                self.offset[s] as usize,
            )
        })
    }
}

/// Words (of 32 columns) per packed input row: the padded row plus a spare word, so a window
/// read always finds the word after the one it starts in.
pub const fn row_words(w: u32, pw: u32) -> u32 {
    (w + 2 * pw).div_ceil(32) + 1
}

/// The geometry of one [`pattern_conv`] launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct PatternGeometry {
    /// The convolution (dilation 1, one group).
    pub conv: ConvGeometry,
    /// [`row_words`] of the packed rows.
    pub words: u32,
    /// Output channels of the table rows (a multiple of [`PATTERN_CHUNK`]).
    pub padded: u32,
    pub segments: PatternSegments,
}

impl PatternGeometry {
    /// Table rows: `kh · Cin · block`.
    pub const fn table_rows(&self) -> u32 {
        self.conv.kh * self.conv.cin * self.segments.block
    }

    /// Dynamic shared memory of one CTA: the table slice, the output staging tile and the
    /// lookup plans.
    pub const fn shared_bytes(&self) -> u32 {
        (self.table_rows() * PATTERN_CHUNK + PATTERN_TILE * STAGE_STRIDE + 4 * self.lookups()) * 4
    }

    /// The `kw` window bits of packed row `row` starting at padded column `column`, from its words
    /// `row_bits` (`words` of them).
    #[inline(always)]
    pub fn window(&self, row_bits: &[u32], column: u32) -> u32 {
        let (word, shift) = ((column / 32) as usize, column % 32);
        let pair = row_bits[word] as u64 | (row_bits[word + 1] as u64) << 32;
        (pair >> shift) as u32 & ((1 << self.conv.kw) - 1)
    }
}

/// # Safety
/// `input` holds `rows · w` floats, `bits` `rows · words` u32; `non_binary` is one u32 the host
/// zeroed. Launch with [`PACK_ROW_THREADS`] threads and `ceil(rows · words · 32 /
/// PACK_ROW_THREADS)` blocks.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn pattern_pack_rows(
    input: *const f32,
    bits: *mut u32,
    non_binary: *mut u32,
    rows: u32,
    w: u32,
    pw: u32,
    words: u32,
) {
    use crate::gpu;
    let thread = gpu::block_x() * PACK_ROW_THREADS + gpu::thread_x();
    // One warp per word: every lane of a warp is in range or none is.
    let word = thread / gpu::WARP_SIZE;
    if word >= rows * words {
        return;
    }
    let (row, column) = (word / words, (word % words) * 32 + thread % gpu::WARP_SIZE);
    let v = if column >= pw && column - pw < w {
        *input.add((row * w + column - pw) as usize)
    } else {
        0.0
    };
    let set = gpu::warp_ballot(v != 0.0);
    let other = gpu::warp_ballot(v != 0.0 && v != 1.0);
    if thread % gpu::WARP_SIZE == 0 {
        *bits.add(word as usize) = set;
        if other != 0 {
            gpu::atomic_or_u32(non_binary, 1);
        }
    }
}

impl PatternGeometry {
    /// The launch geometry of `conv` (dilation 1, one group) with tables padded to `padded`
    /// output channels.
    pub const fn new(conv: ConvGeometry, padded: u32) -> Self {
        Self {
            conv,
            words: row_words(conv.w, conv.pw),
            padded,
            segments: PatternSegments::new(conv.kw),
        }
    }

    /// Table lookups per output pixel.
    pub const fn lookups(&self) -> u32 {
        self.conv.kh * self.conv.cin * self.segments.count
    }

    /// What lookup `j` of every pixel shares, computed once per CTA so the pixel loop does no
    /// division: lookup `j` is kernel row `ky`, channel `c` and segment `s` (`j = (ky·cin + c)·
    /// segments + s`), and this is `[ky, c·h + ky, offset of the segment's first table row, first
    /// column | bits << 8]`.
    #[inline(always)]
    pub fn plan(&self, j: u32) -> [u32; 4] {
        let seg = self.segments;
        let s = j % seg.count;
        let c = (j / seg.count) % self.conv.cin;
        let ky = j / (seg.count * self.conv.cin);
        let pick = |v: [u32; 2]| if s == 0 { v[0] } else { v[1] };
        [
            ky,
            c * self.conv.h + ky,
            ((ky * self.conv.cin + c) * seg.block + pick(seg.offset)) * PATTERN_CHUNK,
            pick(seg.first) | pick(seg.bits) << 8,
        ]
    }

    /// Where output pixel `(img, oy, ox)`'s windows start: packed row `img·cin·h + oy·sh − ph`
    /// and input row `oy·sh − ph` (both signed: the top rows may be padding), padded column
    /// `ox·sw`.
    #[inline(always)]
    pub const fn window_origin(&self, (img, oy, ox): (u32, u32, u32)) -> (i32, i32, u32) {
        let top = (oy * self.conv.sh) as i32 - self.conv.ph as i32;
        (
            (img * self.conv.cin * self.conv.h) as i32 + top,
            top,
            ox * self.conv.sw,
        )
    }

    /// The offset (in floats, within a `PATTERN_CHUNK`-wide table slice) of the table row that
    /// lookup `plan(j)` of the pixel at `origin` ([`window_origin`](Self::window_origin)) adds,
    /// reading the window's bits from the packed rows `bits`; row 0 (all zeros) for a window row
    /// in the padding.
    #[inline(always)]
    pub fn planned_offset(
        &self,
        bits: &[u32],
        plan: [u32; 4],
        (first_row, top, column): (i32, i32, u32),
    ) -> u32 {
        let iy = top + plan[0] as i32;
        if iy < 0 || iy >= self.conv.h as i32 {
            return 0;
        }
        let row = (first_row + plan[1] as i32) as u32 * self.words;
        let window = self.window(&bits[row as usize..], column);
        let pattern = (window >> (plan[3] & 0xff)) & ((1 << (plan[3] >> 8)) - 1);
        plan[2] + pattern * PATTERN_CHUNK
    }
}

/// # Safety
/// `bits`/`non_binary` are [`pattern_pack_rows`]' output for `input` (`n · cin · h · w`
/// floats); `table` holds `table_rows · padded` floats, `bias` `padded`, `weight` PyTorch's
/// `[cout, cin, kh, kw]`, `out` `n · cout · oh · ow`. Launch with
/// [`PATTERN_THREADS`] threads, grid `(any, padded / PATTERN_CHUNK)` and
/// [`PatternGeometry::shared_bytes`].
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn pattern_conv(
    bits: *const u32,
    non_binary: *const u32,
    input: *const f32,
    table: *const f32,
    weight: *const f32,
    bias: *const f32,
    out: *mut f32,
    g: PatternGeometry,
) {
    use crate::gpu;
    let smem = gpu::dynamic_shared_f32();
    let tid = gpu::thread_x();
    let co0 = gpu::block_y() * PATTERN_CHUNK;
    // This CTA's 32-channel slice of every table row, 16 bytes per thread per step.
    let quads = g.table_rows() * (PATTERN_CHUNK / 4);
    let mut i = tid;
    while i < quads {
        let (row, quad) = (i / 8, i % 8);
        let v = gpu::load_nc_f32x4(table.add((row * g.padded + co0 + quad * 4) as usize));
        gpu::store_shared_f32x4(smem.add((row * PATTERN_CHUNK + quad * 4) as usize), v);
        i += PATTERN_THREADS;
    }
    let stage = smem.add((g.table_rows() * PATTERN_CHUNK) as usize);
    // Each lookup's plan, after the staging tile.
    let plans = stage.add((PATTERN_TILE * STAGE_STRIDE) as usize) as *mut u32;
    let mut j = tid;
    while j < g.lookups() {
        let plan = g.plan(j);
        for (k, &v) in plan.iter().enumerate() {
            *plans.add((j * 4) as usize + k) = v;
        }
        j += PATTERN_THREADS;
    }
    gpu::sync_threads();

    let lane = tid % gpu::WARP_SIZE;
    let (quad, slot) = (lane % 8, lane / 8);
    let warp = tid / gpu::WARP_SIZE;
    let b = gpu::load_nc_f32x4(bias.add((co0 + quad * 4) as usize));
    let pixels = g.conv.n * g.conv.oh * g.conv.ow;
    let plane = g.conv.oh * g.conv.ow;
    let bits =
        core::slice::from_raw_parts(bits, (g.conv.n * g.conv.cin * g.conv.h * g.words) as usize);
    // Uniform over the launch: any value other than 0 and 1 sends every pixel through the
    // multiply-adds, which compute the dense conv for any input.
    let binary = *non_binary == 0;
    let ctx = PixelJob {
        g,
        table: gpu::shared_address(smem),
        plans: gpu::shared_address(plans as *const f32),
        bits,
        input,
        weight,
        bias: [b.0, b.1, b.2, b.3],
        co0,
        quad,
        slot,
    };
    let mut tile = gpu::block_x();
    while tile * PATTERN_TILE < pixels {
        // Pixel slots warp·8 + {0, 4} + slot of the tile.
        let first = warp * 8 + slot;
        let p = tile * PATTERN_TILE + first;
        let acc = if binary {
            ctx.table_pixels([p, p + 4])
        } else {
            [ctx.multiply_pixel(p), ctx.multiply_pixel(p + 4)]
        };
        // Stage the tile channel-major, then write each channel's pixels contiguously.
        gpu::sync_threads();
        for (j, acc) in acc.iter().enumerate() {
            let local = first + 4 * j as u32;
            for (k, &a) in acc.iter().enumerate() {
                *stage.add((local * STAGE_STRIDE + quad * 4 + k as u32) as usize) = a;
            }
        }
        gpu::sync_threads();
        // Thread t writes pixel t % TILE of the tile, channels t / TILE + 4k.
        let local = tid % PATTERN_TILE;
        let p = tile * PATTERN_TILE + local;
        if p < pixels {
            let (img, rest) = (p / plane, p % plane);
            let mut c = tid / PATTERN_TILE;
            while c < PATTERN_CHUNK && co0 + c < g.conv.cout {
                let v = *stage.add((local * STAGE_STRIDE + c) as usize);
                *out.add(((img * g.conv.cout + co0 + c) * plane + rest) as usize) = v;
                c += PATTERN_THREADS / PATTERN_TILE;
            }
        }
        tile += gpu::grid_dim_x();
    }
}

/// What one lane needs to compute its 4 channels of an output pixel.
#[cfg(target_arch = "nvptx64")]
struct PixelJob<'a> {
    g: PatternGeometry,
    /// Shared-window address of the table slice.
    table: u32,
    /// Shared-window address of [`PatternGeometry::plan`] of every lookup (16 bytes each).
    plans: u32,
    bits: &'a [u32],
    input: *const f32,
    weight: *const f32,
    bias: [f32; 4],
    co0: u32,
    quad: u32,
    slot: u32,
}

#[cfg(target_arch = "nvptx64")]
impl PixelJob<'_> {
    /// Output pixels `p`'s channels `co0 + quad·4 ..` from the tables (the bias alone past the
    /// last pixel); the whole warp calls this. Each pixel's 8 lanes first find 8 of its table
    /// rows (lookup j on lane j % 8), then all add every row, each offset passed by shuffle;
    /// the two pixels go through the rounds together, for twice the loads in flight.
    #[inline(always)]
    unsafe fn table_pixels(&self, p: [u32; 2]) -> [[f32; 4]; 2] {
        use crate::gpu;
        let g = &self.g;
        let (quad, slot) = (self.quad, self.slot);
        let pixels = g.conv.n * g.conv.oh * g.conv.ow;
        let lookups = g.lookups();
        let at = p.map(|p| {
            (
                p < pixels,
                g.window_origin(g.conv.pixel(if p < pixels { p } else { 0 })),
            )
        });
        let mut acc = [self.bias; 2];
        let lane_table = self.table + quad * 16;
        // Round r: lane quad finds lookup r·8 + quad of each pixel, then the lanes add all 8.
        let mut r = 0;
        while r * 8 < lookups {
            let j = r * 8 + quad;
            let plan = if j < lookups {
                let v = gpu::load_shared_f32x4_at(self.plans + j * 16);
                [v.0.to_bits(), v.1.to_bits(), v.2.to_bits(), v.3.to_bits()]
            } else {
                [0; 4]
            };
            let o = at.map(|(valid, origin)| {
                if valid && j < lookups {
                    g.planned_offset(self.bits, plan, origin)
                } else {
                    0
                }
            });
            // No guard: a lookup past the last is row 0, all zeros, so the loads are
            // straight-line code the compiler issues back to back.
            for src in 0..8 {
                for (acc, &o) in acc.iter_mut().zip(&o) {
                    let row = gpu::shfl_u32(o, slot * 8 + src);
                    let t = gpu::load_shared_f32x4_at(lane_table + row * 4);
                    acc[0] += t.0;
                    acc[1] += t.1;
                    acc[2] += t.2;
                    acc[3] += t.3;
                }
            }
            r += 1;
        }
        acc
    }

    /// Output pixel `p`'s channels by multiply-adds from the raw weights: the dense conv, for
    /// inputs that are not binary (the bias alone past the last pixel).
    #[inline(always)]
    unsafe fn multiply_pixel(&self, p: u32) -> [f32; 4] {
        use crate::gpu;
        let g = &self.g;
        let quad = self.quad;
        let mut acc = self.bias;
        let valid = p < g.conv.n * g.conv.oh * g.conv.ow;
        let at = g.conv.pixel(if valid { p } else { 0 });
        if !valid {
            return acc;
        }
        let (img, oy, ox) = at;
        for ky in 0..g.conv.kh {
            let iy = (oy * g.conv.sh + ky) as i32 - g.conv.ph as i32;
            if iy < 0 || iy >= g.conv.h as i32 {
                continue;
            }
            for c in 0..g.conv.cin {
                let row = (img * g.conv.cin + c) * g.conv.h + iy as u32;
                for kx in 0..g.conv.kw {
                    let ix = (ox * g.conv.sw + kx) as i32 - g.conv.pw as i32;
                    if ix < 0 || ix >= g.conv.w as i32 {
                        continue;
                    }
                    let x = *self.input.add((row * g.conv.w + ix as u32) as usize);
                    for (k, a) in acc.iter_mut().enumerate() {
                        let co = self.co0 + quad * 4 + k as u32;
                        if co < g.conv.cout {
                            let wi = ((co * g.conv.cin + c) * g.conv.kh + ky) * g.conv.kw + kx;
                            *a = gpu::fma_f32(x, *self.weight.add(wi as usize), *a);
                        }
                    }
                }
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[n, cin, h, w, cout, oh, ow, kh, kw, sh, sw, ph, pw]`, dilation 1, one group.
    fn geometry([n, cin, h, w, cout, oh, ow, kh, kw, sh, sw, ph, pw]: [u32; 13]) -> ConvGeometry {
        ConvGeometry {
            n,
            cin,
            h,
            w,
            cout,
            oh,
            ow,
            kh,
            kw,
            sh,
            sw,
            ph,
            pw,
            dh: 1,
            dw: 1,
            groups: 1,
        }
    }

    #[test]
    fn segments_cover_the_kernel_row_once() {
        for kw in 1..=MAX_PATTERN_BITS {
            let s = PatternSegments::new(kw);
            let covered: u32 = (0..s.count as usize).map(|i| s.bits[i]).sum();
            assert_eq!(covered, kw, "kw {kw}");
            assert!(s.bits.iter().all(|&b| b <= SEGMENT_BITS));
            if s.count == 2 {
                assert_eq!(s.first[1], s.bits[0]);
                assert_eq!(s.block, (1 << s.bits[0]) + (1 << s.bits[1]));
            }
        }
    }

    #[test]
    fn planned_offsets_equal_the_direct_ones() {
        // Lookup j of pixel (img, oy, ox), straight from its definition: kernel row, channel and
        // segment of j, the window's bits, the segment's pattern row; row 0 in the padding.
        let direct = |g: &PatternGeometry, bits: &[u32], (img, oy, ox): (u32, u32, u32), j: u32| {
            let (seg, c) = (g.segments, &g.conv);
            let s = (j % seg.count) as usize;
            let ch = (j / seg.count) % c.cin;
            let ky = j / (seg.count * c.cin);
            let iy = (oy * c.sh + ky) as i32 - c.ph as i32;
            if iy < 0 || iy >= c.h as i32 {
                return 0;
            }
            let row = ((img * c.cin + ch) * c.h + iy as u32) * g.words;
            let window = g.window(&bits[row as usize..], ox * c.sw);
            let pattern = (window >> seg.first[s]) & ((1 << seg.bits[s]) - 1);
            ((ky * c.cin + ch) * seg.block + seg.offset[s] + pattern) * PATTERN_CHUNK
        };
        let g = PatternGeometry::new(geometry([2, 3, 9, 11, 40, 5, 6, 5, 7, 2, 2, 2, 3]), 64);
        let bits: Vec<u32> = (0..g.conv.n * g.conv.cin * g.conv.h * g.words)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        for p in 0..g.conv.n * g.conv.oh * g.conv.ow {
            let at = g.conv.pixel(p);
            for j in 0..g.lookups() {
                assert_eq!(
                    g.planned_offset(&bits, g.plan(j), g.window_origin(at)),
                    direct(&g, &bits, at, j),
                    "pixel {p} lookup {j}"
                );
            }
        }
    }

    #[test]
    fn a_window_reads_the_padded_columns_of_its_output() {
        let g = PatternGeometry::new(geometry([1, 1, 1, 40, 1, 1, 20, 1, 7, 1, 2, 0, 3]), 32);
        // Columns 0, 5 and 33 fire.
        let mut row = vec![0u32; g.words as usize];
        for x in [0u32, 5, 33] {
            let at = x + g.conv.pw;
            row[(at / 32) as usize] |= 1 << (at % 32);
        }
        for ox in 0..g.conv.ow {
            let want: u32 = (0..g.conv.kw)
                .filter(|&kx| {
                    let x = (ox * g.conv.sw + kx) as i32 - g.conv.pw as i32;
                    [0, 5, 33].contains(&x)
                })
                .map(|kx| 1 << kx)
                .sum();
            assert_eq!(g.window(&row, ox * g.conv.sw), want, "ox {ox}");
        }
    }
}
