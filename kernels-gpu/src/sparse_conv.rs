//! The sparse convolution on the GPU: one kernel, `sparse_conv_k{K}_s{S}_b{B}_v{V}[h2]`, whose
//! CTAs each run both stages for one `B × B` output tile of one image.
//!
//! - Stage 1, the prescan: the CTA bit-packs its input window `[Cin, side, side]` into per-pixel
//!   masks of active channels in shared memory, `[words][side²]` with `words = ceil(Cin / 32)`,
//!   and notes whether any non-zero is not exactly 1 (integer-valued SEW inputs). A silent
//!   window writes the bias and stops. Most layers read the f32 window themselves (cached in L2
//!   only, so the streamed input does not evict the weight rows the gather reuses): a packing
//!   pass of its own reads the f32 input a second time, 40 µs at 3×3 64→64 @56, batch 128, on
//!   the H100, a sixth of the layer. Layers the host finds faster with that pass (stride 1 with
//!   8 channels per lane, measured) get the masks from `spike_mask_pack` instead.
//! - Stage 2, the gather: each warp owns `B²/8` output pixels with their accumulators in
//!   registers. For each pixel its lanes take the pixel's (tap, mask word) items, two per lane,
//!   and pop the set bits into a list of weight rows in shared memory (a prefix sum of the
//!   popcounts places each lane's rows); the warp then walks the list in a uniform loop, four
//!   rows at a time with the next four already loading, where every lane adds `V` output
//!   channels (2, 4 or 8, see [`preferred_shapes`]) of each contiguous weight row `[tap, c, :]`,
//!   so the work per active input is one list read and `V` adds per lane.
//!   64-channel layers run two pixels per warp (`H = 2`, a half-warp each, 4 channels per lane).
//!   Binary and non-binary tiles run separately compiled loops (the latter scales each row by
//!   its input value). Results are staged in shared memory and written to NCHW in rows. Each
//!   CTA computes `32 / H · V` output channels (grid z).
//!
//! Weights come in gather layout `[K·K·Cin + 1, cout_pad]` (`cout_pad` a multiple of `32·V`; the
//! last row is zeros, which pads the row lists), bias padded to `cout_pad`. Padding is
//! `K / 2`, dilation 1, one group.
//!
//! # What bounds it at 1% spikes, and what was tried (stop 22)
//!
//! Since stop 23, 3×3 stride-1 layers of up to 64 channels take the column sweep instead
//! ([`crate::sweep_conv`]: 0.113–0.122 ms on the layer below); the figures here are the gather's.
//!
//! 3×3 64→64 @56, batch 128, 1% spikes, H100 (ncu, `b8_v4h2`): L2 77% busy, DRAM 35%, issue
//! slots 63%, 50% occupancy; the tiles' 10×10 windows arrive in 40-byte pieces that straddle
//! sectors, and a tile's weight rows come mostly from L2 (L1 hit rate 30%). 0.148–0.152 ms,
//! about twice the 68 µs the input and output take at copy bandwidth. Measured against it
//! (`bench-layer --device cuda --batch 128 --density 0.01`, same process or the same machine),
//! and dropped:
//! - a persistent row-sweep kernel: the 147 KB of weights resident in shared memory, a CTA per
//!   multiprocessor walking strips of whole output rows (input rows read once, coalesced, into
//!   a four-row ring with per-pixel channel masks), each warp 8 pixels × 64 channels of one row,
//!   the non-zeros of its 3×10 input pixels listed by a warp prefix sum: 0.180 ms (0.185 with
//!   the masks walked in place), 0.29 ms at 5%. Its shared memory leaves room for one CTA of 14
//!   warps; at ~900 instructions a warp and step it was latency-bound (an instruction every 12
//!   cycles a warp, a fifth of the stalls at its two barriers a step);
//! - the same with two independent teams of 14 warps a CTA (a named barrier each), the float
//!   ring dropped and values read from L2 while listing: 0.282 ms (72 registers, spills);
//! - a smaller shared-memory carve-out so that the weights stay in L1 (3 CTAs an SM, 156 KB
//!   of L1): L1 hits 30 → 35%, 0.163 against 0.150 ms.

/// Output channels one warp pass of `sparse_linear` computes: 32 lanes × 2.
pub const COUT_PER_PASS: u32 = 64;
/// Threads per CTA of the compute kernel (8 warps).
pub const CONV_THREADS: u32 = 256;
/// Threads per CTA of the packing kernel.
pub const PACK_THREADS: u32 = 256;

/// A compute-kernel entry point and the geometry it was instantiated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseConvVariant {
    pub kernel: u32,
    pub stride: u32,
    pub block: u32,
    /// Output channels per lane (V).
    pub couts_per_lane: u32,
    /// Output pixels a warp computes at once (H): 1, or 2 with a half-warp each.
    pub pixels_per_warp: u32,
    pub entry: &'static str,
}

impl SparseConvVariant {
    /// Output channels one CTA computes: `32 / H` lanes per pixel × `V`.
    pub const fn pass(&self) -> u32 {
        32 / self.pixels_per_warp * self.couts_per_lane
    }
}

/// Entries of one warp's lists of active weight rows, shared by its `H` pixels.
pub const WARP_LIST_ENTRIES: u32 = 128;

/// Byte offsets, from the start of the compute kernel's dynamic shared memory, of every warp's
/// row lists and of the input window's masks, after the staged outputs `[pass][block² + 1]`
/// (the +1 staggers banks); the lists hold an offset and a value per entry.
pub const fn conv_shared_layout(block: u32, pass: u32) -> (u32, u32) {
    let lists = pass * (block * block + 1) * 4;
    (lists, lists + CONV_THREADS / 32 * WARP_LIST_ENTRIES * 8)
}

/// Dynamic shared memory of the compute kernel computing `pass` output channels: the layout of
/// [`conv_shared_layout`], then the input window's masks `[words][side²]`.
pub const fn conv_shared_bytes(block: u32, kernel: u32, stride: u32, cin: u32, pass: u32) -> u32 {
    let side = window_side(block, kernel, stride);
    conv_shared_layout(block, pass).1 + mask_words(cin) * side * side * 4
}

/// The `(V, H)` shapes a layer of `cout` output channels and `kernel × kernel` taps prefers, best
/// first: up to 64 channels two pixels per warp with 4 channels per lane (each instruction serves
/// two pixels), up to 128 one pixel with 4 per lane; beyond that 1×1 layers take 8 per lane and
/// 3×3 layers stay at 4, a CTA per 128 channels (H100, batch 128, 5% spikes, one process: 3×3
/// 512→512 @7 0.313 against 0.348 ms at 8 per lane, 256→256 @14 0.315 against 0.363, 128→256
/// s2 0.176 against 0.211; 1×1 64→256 @56 0.434 against 0.461, 256→512 s2 0.051 against
/// 0.055). `(2, 1)` always works.
pub const fn preferred_shapes(cout: u32, kernel: u32) -> &'static [(u32, u32)] {
    if cout <= 64 {
        &[(4, 2), (2, 1)]
    } else if cout <= 128 || kernel > 1 {
        &[(4, 1), (8, 1), (2, 1)]
    } else {
        &[(8, 1), (4, 1), (2, 1)]
    }
}

/// Input coordinate of output coordinate `o` at tap `k`, if inside `0..size`.
#[inline(always)]
pub const fn source(o: u32, k: u32, stride: u32, pad: u32, size: u32) -> Option<u32> {
    let i = o * stride + k;
    if i < pad || i - pad >= size {
        None
    } else {
        Some(i - pad)
    }
}

/// Words of 32 channels per pixel.
#[inline(always)]
pub const fn mask_words(cin: u32) -> u32 {
    cin.div_ceil(32)
}

/// # Safety
/// `input` holds `n·cin·hw` floats, `masks` `n·words·hw` u32, `non_binary` one u32 (zero
/// before the launch); `clear` null or one u32 that is neither `non_binary` nor read by this
/// launch's consumers: the launch zeroes it (the flag of the next forward, so that no memset
/// precedes each pass). Launch with `PACK_THREADS` threads and `ceil(n·words·hw /
/// PACK_THREADS)` blocks.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn spike_mask_pack(
    input: *const f32,
    masks: *mut u32,
    non_binary: *mut u32,
    clear: *mut u32,
    n: u32,
    cin: u32,
    hw: u32,
) {
    use crate::gpu;
    // A kernel launched after this one as a programmatic dependent (the column sweep) may start
    // its CTAs as this grid's last ones run: it waits for the masks itself.
    #[cfg(sparseflow_sm90)]
    gpu::launch_dependents();
    let words = mask_words(cin);
    // The input is read once: its lines are the first L2 evicts, so the dirty output lines the
    // previous forward's sweep left there stay, to be written back while the next sweep (bound
    // by its L1, not DRAM) runs, instead of during this DRAM-bound pass.
    let policy = gpu::l2_evict_first_policy();
    let idx = gpu::block_x() * PACK_THREADS + gpu::thread_x();
    if idx == 0 && !clear.is_null() {
        *clear = 0;
    }
    let total = n * words * hw;
    let mut odd = false;
    if idx < total {
        let pixel = idx % hw;
        let word = (idx / hw) % words;
        let img = idx / (hw * words);
        let first = input.add(((img * cin + word * 32) * hw + pixel) as usize);
        let channels = (cin - word * 32).min(32);
        let mut m = 0u32;
        let mut mark = |j: u32, v: f32| {
            m |= ((v != 0.0) as u32) << j;
            odd |= v != 0.0 && v != 1.0;
        };
        if channels == 32 {
            // A full word: all 32 loads are issued before any is tested.
            let mut v = [0.0f32; 32];
            for (j, v) in v.iter_mut().enumerate() {
                *v = gpu::load_once_f32(first.add(j * hw as usize), policy);
            }
            for (j, &v) in v.iter().enumerate() {
                mark(j as u32, v);
            }
        } else {
            for j in 0..channels {
                mark(j, gpu::load_once_f32(first.add((j * hw) as usize), policy));
            }
        }
        *masks.add(idx as usize) = m;
    }
    // Every thread reaches the vote (none returned early), so the warp is complete.
    if gpu::warp_any(odd) && gpu::thread_x() % gpu::WARP_SIZE == 0 {
        gpu::atomic_or_u32(non_binary, 1);
    }
}

/// Bits `shift..shift + 32` of the 64-bit pair `hi:lo` (`shift < 32`): 32 consecutive bits of
/// a bitmap that start inside word `lo`.
#[inline(always)]
pub const fn bitmap_bits(lo: u32, hi: u32, shift: u32) -> u32 {
    ((((hi as u64) << 32) | lo as u64) >> shift) as u32
}

/// Pixels per warp of [`spike_bitmap_masks`]: one mask word per lane.
pub const BITMAP_PIXELS_PER_WARP: u32 = 32;

/// The blocks of [`PACK_THREADS`] threads [`spike_bitmap_masks`] takes over `n` images of `cin`
/// channels and `hw` pixels: a warp per (image, channel word, 32 pixels).
pub const fn bitmap_masks_blocks(n: u32, cin: u32, hw: u32) -> u32 {
    let warps = n * mask_words(cin) * hw.div_ceil(BITMAP_PIXELS_PER_WARP);
    warps.div_ceil(PACK_THREADS / 32)
}

/// The channel masks of `spike_mask_pack` from the spike bitmap a marking neuron wrote (bit
/// `(img · cin + c) · hw + p` set where channel `c` of pixel `p` of image `img` spiked): a warp
/// takes 32 channels × 32 pixels, lane `j` reads channel `j`'s 32 pixel bits (two words, a
/// funnel shift), and 32 votes transpose them into lane `i`'s mask word of pixel `i`. It reads
/// and writes 1/32 of the bytes of the packing pass over f32 spikes.
///
/// # Safety
/// `cin` a multiple of 32; `bitmap` holds `n · cin · hw / 32 + 1` words (the last may be
/// garbage: it only feeds bits past the map), `masks` `n · cin / 32 · hw`; launch with
/// [`PACK_THREADS`] threads and [`bitmap_masks_blocks`] blocks.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn spike_bitmap_masks(
    bitmap: *const u32,
    masks: *mut u32,
    n: u32,
    cin: u32,
    hw: u32,
) {
    bitmap_masks::<1>(bitmap, masks, n, cin, hw, 0)
}

/// [`spike_bitmap_masks`] for the two bit-plane bitmaps of small integers (`bitmaps`: plane 0,
/// then plane 1 `plane_words` words on), into the integer kernel's masks: each pixel's two
/// plane words side by side (`masks`: `n · cin / 32 · hw · 2` words).
///
/// # Safety
/// As [`spike_bitmap_masks`], for each plane.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn spike_bitmap_planes(
    bitmaps: *const u32,
    masks: *mut u32,
    n: u32,
    cin: u32,
    hw: u32,
    plane_words: u32,
) {
    bitmap_masks::<2>(bitmaps, masks, n, cin, hw, plane_words)
}

/// The transpose of [`spike_bitmap_masks`] for `PLANES` bitmaps `plane_words` apart, mask word
/// `PLANES · idx + plane`.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
unsafe fn bitmap_masks<const PLANES: usize>(
    bitmap: *const u32,
    masks: *mut u32,
    n: u32,
    cin: u32,
    hw: u32,
    plane_words: u32,
) {
    use crate::gpu;
    let lane = gpu::thread_x() % gpu::WARP_SIZE;
    let warp = (gpu::block_x() * PACK_THREADS + gpu::thread_x()) / gpu::WARP_SIZE;
    let words = mask_words(cin);
    let blocks = hw.div_ceil(BITMAP_PIXELS_PER_WARP);
    // Whole warps exit together: the votes below need every lane.
    if warp >= n * words * blocks {
        return;
    }
    let (img, word, block) = (
        warp / (words * blocks),
        (warp / blocks) % words,
        warp % blocks,
    );
    let p0 = block * BITMAP_PIXELS_PER_WARP;
    let bit = ((img * cin + 32 * word + lane) * hw + p0) as usize;
    for plane in 0..PLANES {
        let bitmap = bitmap.add(plane * plane_words as usize);
        let lo = gpu::load_nc_u32(bitmap.add(bit / 32));
        let hi = if bit % 32 != 0 {
            gpu::load_nc_u32(bitmap.add(bit / 32 + 1))
        } else {
            0
        };
        let row = bitmap_bits(lo, hi, (bit % 32) as u32);
        let mut mine = 0;
        for i in 0..BITMAP_PIXELS_PER_WARP {
            let column = gpu::warp_ballot((row >> i) & 1 != 0);
            if lane == i {
                mine = column;
            }
        }
        if p0 + lane < hw {
            let idx = ((img * words + word) * hw + p0 + lane) as usize;
            *masks.add(PLANES * idx + plane) = mine;
        }
    }
}

/// `V` consecutive weights of one row through the read-only cache (`V` is 2, 4 or 8; the row
/// pointer is aligned to `4·V` bytes).
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
unsafe fn load_row<const V: usize>(ptr: *const f32) -> [f32; V] {
    use crate::gpu;
    let mut out = [0.0f32; V];
    let mut k = 0;
    while k < V {
        if V % 4 == 0 {
            let (a, b, c, d) = gpu::load_nc_f32x4(ptr.add(k));
            out[k] = a;
            out[k + 1] = b;
            out[k + 2] = c;
            out[k + 3] = d;
            k += 4;
        } else {
            let (a, b) = gpu::load_nc_f32x2(ptr.add(k));
            out[k] = a;
            out[k + 1] = b;
            k += 2;
        }
    }
    out
}

/// One (tap, mask word) item of a pixel, relative to the pixel.
#[cfg(target_arch = "nvptx64")]
#[derive(Clone, Copy)]
struct Item {
    /// False past the last item.
    live: bool,
    /// Byte offset of its mask in the window.
    window: u32,
    /// Offset of the weight row of bit 0 (channel `32·word` at this tap), `row · cout_pad`.
    row: u32,
    /// Input offset of bit 0 within the image (wraps for taps in the padding, whose masks are 0).
    input: u32,
}

/// Consumes a warp's lists of active weight rows (shared-window addresses `offsets` and
/// `values`, this lane's pixel's): every lane adds its `V` output channels of each listed row
/// (`offsets[j]` = row · `cout_pad`, scaled by `values[j]` unless `BINARY`) to its accumulators.
/// The lists of a warp's `H` pixels are first padded with the zero row to the longest one,
/// rounded up to 4, so the loop is warp-uniform and takes four rows per step (four weight loads
/// in flight, one 16-byte list read per four rows).
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn consume_list<const V: usize, const H: u32, const BINARY: bool>(
    offsets: u32,
    values: u32,
    count: u32,
    lane_in_pixel: u32,
    zero_offset: u32,
    lane_weights: *const f32,
    mut acc: [f32; V],
) -> [f32; V] {
    use crate::gpu;
    let lanes = 32 / H;
    let longest = if H == 1 {
        count
    } else {
        count.max(gpu::shfl_xor_u32(count, lanes))
    };
    let padded = longest.next_multiple_of(4);
    let mut j = count + lane_in_pixel;
    while j < padded {
        gpu::store_shared_u32(offsets + 4 * j, zero_offset);
        if !BINARY {
            gpu::store_shared_f32(values + 4 * j, 0.0);
        }
        j += lanes;
    }
    gpu::sync_warp();
    let row = |o: u32| load_row::<V>(lane_weights.add(o as usize));
    // Binary spikes: each of the four rows is added as it is.
    let add_rows =
        |acc: &mut [f32; V], r0: &[f32; V], r1: &[f32; V], r2: &[f32; V], r3: &[f32; V]| {
            for k in 0..V {
                acc[k] += r0[k];
                acc[k] += r1[k];
                acc[k] += r2[k];
                acc[k] += r3[k];
            }
        };
    if BINARY && V <= 4 {
        // Software-pipelined: the next four rows are in flight while these are added (at 8
        // channels per lane the second set of rows would cost too many registers).
        if padded > 0 {
            let o = gpu::load_shared_u32x4(offsets);
            let (mut r0, mut r1, mut r2, mut r3) = (row(o[0]), row(o[1]), row(o[2]), row(o[3]));
            let mut j = 4;
            while j < padded {
                let o = gpu::load_shared_u32x4(offsets + 4 * j);
                let next = (row(o[0]), row(o[1]), row(o[2]), row(o[3]));
                add_rows(&mut acc, &r0, &r1, &r2, &r3);
                (r0, r1, r2, r3) = next;
                j += 4;
            }
            add_rows(&mut acc, &r0, &r1, &r2, &r3);
        }
    } else {
        let mut j = 0;
        while j < padded {
            let o = gpu::load_shared_u32x4(offsets + 4 * j);
            let (r0, r1, r2, r3) = (row(o[0]), row(o[1]), row(o[2]), row(o[3]));
            if BINARY {
                add_rows(&mut acc, &r0, &r1, &r2, &r3);
            } else {
                let v = gpu::load_shared_u32x4(values + 4 * j).map(f32::from_bits);
                for k in 0..V {
                    acc[k] = gpu::fma_f32(v[0], r0[k], acc[k]);
                    acc[k] = gpu::fma_f32(v[1], r1[k], acc[k]);
                    acc[k] = gpu::fma_f32(v[2], r2[k], acc[k]);
                    acc[k] = gpu::fma_f32(v[3], r3[k], acc[k]);
                }
            }
            j += 4;
        }
    }
    // The lists are rewritten next; every lane must be done reading them.
    gpu::sync_warp();
    acc
}

/// Side of the input window a `B × B` output tile reads.
pub const fn window_side(block: u32, kernel: u32, stride: u32) -> u32 {
    (block - 1) * stride + kernel
}

/// What stage 2 of one CTA works on (stage 1 filled the window's masks).
#[cfg(target_arch = "nvptx64")]
struct Tile {
    /// The CTA's image of the input.
    image: *const f32,
    weights: *const f32,
    bias: *const f32,
    cin: u32,
    w: u32,
    hw: u32,
    cout_pad: u32,
    oh: u32,
    ow: u32,
    ty0: u32,
    tx0: u32,
    /// Window origin in input coordinates (may be negative: padding).
    wy0: i32,
    wx0: i32,
    /// False when the window is silent or the tile lies outside the output.
    active: bool,
    /// Shared-window addresses: staged outputs `[pass][B² + 1]`, the warps' row lists (offsets,
    /// then values) and the window's masks.
    stage: u32,
    lists: u32,
    window: u32,
}

/// Stage 2: every warp's pixels of the tile, each accumulated from its list of active rows and
/// staged in shared memory.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
unsafe fn gather_tile<
    const K: u32,
    const S: u32,
    const B: u32,
    const V: usize,
    const H: u32,
    const BINARY: bool,
>(
    t: &Tile,
) {
    use crate::gpu;
    const WARPS: u32 = CONV_THREADS / 32;
    let (cin, w, hw, cout_pad) = (t.cin, t.w, t.hw, t.cout_pad);
    let tid = gpu::thread_x();
    let (warp, lane) = (tid / gpu::WARP_SIZE, tid % gpu::WARP_SIZE);
    let side = window_side(B, K, S);
    let bb = B * B;
    let words = mask_words(cin);
    // Lanes per pixel, and the output channels one CTA computes.
    let lanes = 32 / H;
    let (half, hl) = (lane / lanes, lane % lanes);
    let pass = lanes * V as u32;
    let cap = WARP_LIST_ENTRIES / H;
    let offsets = t.lists + 4 * (warp * H + half) * cap;
    let values = t.lists + 4 * ((WARPS + warp) * WARP_LIST_ENTRIES + half * cap);

    // Each CTA computes one pass of `pass` output channels, `V` per lane: wide layers amortise
    // the finding of active rows over more useful adds, and deep layers (7×7 maps) with few
    // tiles still spread over the grid's z dimension.
    let co = gpu::block_z() * pass + V as u32 * hl;
    let lane_weights = t.weights.add(co as usize);
    let mut bias_v = [0.0f32; V];
    for (k, b) in bias_v.iter_mut().enumerate() {
        *b = *t.bias.add(co as usize + k);
    }
    // The weight rows end with one row of zeros, which pads the lists.
    let zero_offset = K * K * cin * cout_pad;
    let items = K * K * words;
    // Item `i` of a pixel, word-major (`i = word · K² + tap`, so the divisions are by a
    // constant).
    let place = |i: u32| -> Item {
        let (word, tap) = (i / (K * K), i % (K * K));
        let (ky, kx) = (tap / K, tap % K);
        let corner = (t.wy0 + ky as i32) * w as i32 + t.wx0 + kx as i32;
        Item {
            live: i < items,
            window: 4 * (word * side * side + ky * side + kx),
            row: (tap * cin + word * 32) * cout_pad,
            input: (word * 32 * hw).wrapping_add(corner as u32),
        }
    };
    // The first round's items are the same for every pixel.
    let first_items = (place(hl), place(lanes + hl));
    // Interior tiles (the common case) need no per-pixel bounds checks or votes.
    let full = t.active && t.ty0 + B <= t.oh && t.tx0 + B <= t.ow;
    let mut p0 = warp * H;
    while p0 < bb {
        let p = p0 + half;
        let (py, px) = (p / B, p % B);
        let valid = full || (t.active && t.ty0 + py < t.oh && t.tx0 + px < t.ow);
        let pixel_window = 4 * (py * S * side + px * S);
        let pixel_input = py * S * w + px * S;
        let mask = |at: &Item| -> u32 {
            if valid && at.live {
                gpu::load_shared_u32(t.window + at.window + pixel_window)
            } else {
                0
            }
        };
        // Writes the rows of `m`'s set bits (item `at`) from list slot `slot` on, stopping at
        // `end`; returns the next slot and the bits left.
        let list_rows = |mut m: u32, at: &Item, mut slot: u32, end: u32| -> (u32, u32) {
            while slot < end && m != 0 {
                let bit = gpu::lowest_set_bit(m);
                m &= m - 1;
                gpu::store_shared_u32(offsets + 4 * slot, at.row + bit * cout_pad);
                if !BINARY {
                    let input = at.input.wrapping_add(pixel_input + bit * hw);
                    gpu::store_shared_f32(values + 4 * slot, *t.image.add(input as usize));
                }
                slot += 1;
            }
            (slot, m)
        };
        let consume = |count: u32, acc: [f32; V]| {
            consume_list::<V, H, BINARY>(offsets, values, count, hl, zero_offset, lane_weights, acc)
        };
        let mut acc = bias_v;
        if full || (H == 1 && valid) || (H > 1 && gpu::warp_any(valid)) {
            // Rows listed for this pixel and not yet consumed (the same on its lanes).
            let mut count = 0u32;
            let mut base = 0;
            while base < items {
                let (a, b) = if base == 0 {
                    first_items
                } else {
                    (place(base + hl), place(base + lanes + hl))
                };
                let (mut ma, mut mb) = (mask(&a), mask(&b));
                loop {
                    // Slots of this lane's rows: after the rows of the pixel's lower lanes.
                    let bits = ma.count_ones() + mb.count_ones();
                    let inclusive = gpu::scan_add_u32(bits, lanes);
                    let total = gpu::shfl_u32(inclusive, half * lanes + lanes - 1);
                    let first = count + inclusive - bits;
                    if !gpu::warp_any(count + total > cap) {
                        // Every row fits: the common case.
                        let (slot, _) = list_rows(ma, &a, first, u32::MAX);
                        list_rows(mb, &b, slot, u32::MAX);
                        count += total;
                        break;
                    }
                    // Rows past the list's end stay in the masks for the next turn.
                    let end = (first + bits).min(cap);
                    let (slot, rest) = list_rows(ma, &a, first, end);
                    ma = rest;
                    mb = list_rows(mb, &b, slot, end).1;
                    count = (count + total).min(cap);
                    if gpu::warp_any(count == cap) {
                        acc = consume(count, acc);
                        count = 0;
                    }
                    if !gpu::warp_any(ma != 0 || mb != 0) {
                        break;
                    }
                }
                base += 2 * lanes;
            }
            // With no rows the list is empty and the loop below does not run.
            acc = consume(count, acc);
        }
        for (k, a) in acc.iter().enumerate() {
            gpu::store_shared_f32(
                t.stage + 4 * ((V as u32 * hl + k as u32) * (bb + 1) + p),
                *a,
            );
        }
        p0 += WARPS * H;
    }
}

/// # Safety
/// `input` holds `n·cin·h·w` floats, `out` `n·cout·oh·ow`, weights and bias as in the module
/// docs; `masks` and `non_binary` are null (the kernel bit-packs its windows itself) or what
/// `spike_mask_pack` wrote for `input`. Launch with grid `(tiles_x · tiles_y, n, cout_pad /
/// (32·V))`, `CONV_THREADS` threads and `conv_shared_bytes(B, K, S, Cin, 32 / H · V)` bytes of
/// dynamic shared memory; `cout_pad` is a multiple of `32·V`.
///
/// A pixel's list mixes every tap, so all `K²·Cin` weight rows are in use at once.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn sparse_conv<
    const K: u32,
    const S: u32,
    const B: u32,
    const V: usize,
    const H: u32,
>(
    input: *const f32,
    masks: *const u32,
    non_binary: *const u32,
    weights: *const f32,
    bias: *const f32,
    out: *mut f32,
    cin: u32,
    h: u32,
    w: u32,
    cout: u32,
    cout_pad: u32,
    oh: u32,
    ow: u32,
    tiles_x: u32,
) {
    use crate::gpu;
    let pad = K / 2;
    let img = gpu::block_y();
    let tile = gpu::block_x();
    let (ty0, tx0) = ((tile / tiles_x) * B, (tile % tiles_x) * B);
    let tid = gpu::thread_x();
    let hw = h * w;
    let words = mask_words(cin);
    let side = window_side(B, K, S);
    let bb = B * B;
    let pass = 32 / H * V as u32;
    let stage = gpu::dynamic_shared_base();
    let (lists, window) = conv_shared_layout(B, pass);
    let (lists, window) = (stage + lists, stage + window);
    let image = input.add((img * cin * hw) as usize);

    // Stage 1: the window's masks, one thread per (mask word, window pixel): from the packed
    // masks when the host ran `spike_mask_pack`, else from the input, all 32 loads of a full
    // word issued before any is tested.
    let wy0 = (ty0 * S) as i32 - pad as i32;
    let wx0 = (tx0 * S) as i32 - pad as i32;
    let packed = !masks.is_null();
    let (mut any, mut odd) = (false, false);
    let mut i = tid;
    while i < words * side * side {
        let (word, r) = (i / (side * side), i % (side * side));
        let (y, x) = (wy0 + (r / side) as i32, wx0 + (r % side) as i32);
        let mut m = 0u32;
        if y >= 0 && x >= 0 && (y as u32) < h && (x as u32) < w {
            let pixel = y as u32 * w + x as u32;
            if packed {
                m = *masks.add(((img * words + word) * hw + pixel) as usize);
            } else {
                // `spike_mask_pack`'s word loop, spelled out again: one helper shared by both
                // compiled this kernel 10–17% slower (H100, 3×3 64→64 @56, 5% and 1%).
                let first = image.add((word * 32 * hw + pixel) as usize);
                let channels = (cin - word * 32).min(32);
                let mut mark = |j: u32, v: f32| {
                    m |= ((v != 0.0) as u32) << j;
                    odd |= v != 0.0 && v != 1.0;
                };
                if channels == 32 {
                    let mut v = [0.0f32; 32];
                    for (j, v) in v.iter_mut().enumerate() {
                        *v = gpu::load_streaming_f32(first.add(j * hw as usize));
                    }
                    for (j, &v) in v.iter().enumerate() {
                        mark(j as u32, v);
                    }
                } else {
                    for j in 0..channels {
                        mark(j, gpu::load_streaming_f32(first.add((j * hw) as usize)));
                    }
                }
            }
        }
        gpu::store_shared_u32(window + 4 * i, m);
        any |= m != 0;
        i += CONV_THREADS;
    }
    if packed {
        odd = *non_binary != 0;
    }
    let active = gpu::sync_threads_or(any) && ty0 < oh && tx0 < ow;
    let binary = !gpu::sync_threads_or(odd);

    let tile = Tile {
        image,
        weights,
        bias,
        cin,
        w,
        hw,
        cout_pad,
        oh,
        ow,
        ty0,
        tx0,
        wy0,
        wx0,
        active,
        stage,
        lists,
        window,
    };
    if binary {
        gather_tile::<K, S, B, V, H, true>(&tile);
    } else {
        gather_tile::<K, S, B, V, H, false>(&tile);
    }
    gpu::sync_threads();
    let chunk = gpu::block_z() * pass;
    let staged = |local: u32, p: u32| gpu::load_shared_f32(stage + 4 * (local * (bb + 1) + p));
    if ow % 4 == 0 && ty0 + B <= oh && tx0 + B <= ow {
        // A whole tile on rows that are 16-byte aligned: four pixels per store.
        let mut i = tid;
        while i < pass * bb / 4 {
            let (local, p) = (i / (bb / 4), i % (bb / 4) * 4);
            let (co, oy, ox) = (chunk + local, ty0 + p / B, tx0 + p % B);
            if co < cout {
                gpu::store_f32x4(
                    out.add((((img * cout + co) * oh + oy) * ow + ox) as usize),
                    (
                        staged(local, p),
                        staged(local, p + 1),
                        staged(local, p + 2),
                        staged(local, p + 3),
                    ),
                );
            }
            i += CONV_THREADS;
        }
    } else {
        let mut i = tid;
        while i < pass * bb {
            let (local, p) = (i / bb, i % bb);
            let (co, oy, ox) = (chunk + local, ty0 + p / B, tx0 + p % B);
            if co < cout && oy < oh && ox < ow {
                *out.add((((img * cout + co) * oh + oy) * ow + ox) as usize) = staged(local, p);
            }
            i += CONV_THREADS;
        }
    }
}

macro_rules! sparse_conv_variants {
    ($([$($entry:ident: v $v:literal h $h:literal),+] => kernel $k:literal, stride $s:literal, block $b:literal);+ $(;)?) => {
        $($(
            #[cfg(target_arch = "nvptx64")]
            #[no_mangle]
            pub unsafe extern "ptx-kernel" fn $entry(
                input: *const f32, masks: *const u32, non_binary: *const u32,
                weights: *const f32, bias: *const f32, out: *mut f32,
                cin: u32, h: u32, w: u32, cout: u32, cout_pad: u32, oh: u32, ow: u32, tiles_x: u32,
            ) {
                sparse_conv::<$k, $s, $b, $v, $h>(
                    input, masks, non_binary, weights, bias, out,
                    cin, h, w, cout, cout_pad, oh, ow, tiles_x,
                )
            }
        )+)+
        /// Every compute-kernel entry point in the PTX module.
        pub const SPARSE_CONV_VARIANTS: &[SparseConvVariant] = &[
            $($(SparseConvVariant {
                kernel: $k, stride: $s, block: $b, couts_per_lane: $v, pixels_per_warp: $h,
                entry: stringify!($entry),
            },)+)+
        ];
    };
}

// 16×16 tiles stage 256 pixels' outputs in shared memory, too many for 8 channels per lane.
sparse_conv_variants! {
    [sparse_conv_k3_s1_b4_v2: v 2 h 1, sparse_conv_k3_s1_b4_v4h2: v 4 h 2, sparse_conv_k3_s1_b4_v4: v 4 h 1, sparse_conv_k3_s1_b4_v8: v 8 h 1] => kernel 3, stride 1, block 4;
    [sparse_conv_k3_s2_b4_v2: v 2 h 1, sparse_conv_k3_s2_b4_v4h2: v 4 h 2, sparse_conv_k3_s2_b4_v4: v 4 h 1, sparse_conv_k3_s2_b4_v8: v 8 h 1] => kernel 3, stride 2, block 4;
    [sparse_conv_k1_s1_b4_v2: v 2 h 1, sparse_conv_k1_s1_b4_v4h2: v 4 h 2, sparse_conv_k1_s1_b4_v4: v 4 h 1, sparse_conv_k1_s1_b4_v8: v 8 h 1] => kernel 1, stride 1, block 4;
    [sparse_conv_k1_s2_b4_v2: v 2 h 1, sparse_conv_k1_s2_b4_v4h2: v 4 h 2, sparse_conv_k1_s2_b4_v4: v 4 h 1, sparse_conv_k1_s2_b4_v8: v 8 h 1] => kernel 1, stride 2, block 4;
    [sparse_conv_k3_s1_b8_v2: v 2 h 1, sparse_conv_k3_s1_b8_v4h2: v 4 h 2, sparse_conv_k3_s1_b8_v4: v 4 h 1, sparse_conv_k3_s1_b8_v8: v 8 h 1] => kernel 3, stride 1, block 8;
    [sparse_conv_k3_s2_b8_v2: v 2 h 1, sparse_conv_k3_s2_b8_v4h2: v 4 h 2, sparse_conv_k3_s2_b8_v4: v 4 h 1, sparse_conv_k3_s2_b8_v8: v 8 h 1] => kernel 3, stride 2, block 8;
    [sparse_conv_k1_s1_b8_v2: v 2 h 1, sparse_conv_k1_s1_b8_v4h2: v 4 h 2, sparse_conv_k1_s1_b8_v4: v 4 h 1, sparse_conv_k1_s1_b8_v8: v 8 h 1] => kernel 1, stride 1, block 8;
    [sparse_conv_k1_s2_b8_v2: v 2 h 1, sparse_conv_k1_s2_b8_v4h2: v 4 h 2, sparse_conv_k1_s2_b8_v4: v 4 h 1, sparse_conv_k1_s2_b8_v8: v 8 h 1] => kernel 1, stride 2, block 8;
    [sparse_conv_k3_s1_b16_v2: v 2 h 1, sparse_conv_k3_s1_b16_v4h2: v 4 h 2, sparse_conv_k3_s1_b16_v4: v 4 h 1] => kernel 3, stride 1, block 16;
    [sparse_conv_k3_s2_b16_v2: v 2 h 1, sparse_conv_k3_s2_b16_v4h2: v 4 h 2, sparse_conv_k3_s2_b16_v4: v 4 h 1] => kernel 3, stride 2, block 16;
    [sparse_conv_k1_s1_b16_v2: v 2 h 1, sparse_conv_k1_s1_b16_v4h2: v 4 h 2, sparse_conv_k1_s1_b16_v4: v 4 h 1] => kernel 1, stride 1, block 16;
    [sparse_conv_k1_s2_b16_v2: v 2 h 1, sparse_conv_k1_s2_b16_v4h2: v 4 h 2, sparse_conv_k1_s2_b16_v4: v 4 h 1] => kernel 1, stride 2, block 16;
}

/// `SparseLinear`: one warp per (row, 64 outputs). The warp reads the row's inputs 32 at a time,
/// votes which are non-zero, and walks those lanes: each lane adds two outputs of the active
/// feature's weight row `[f, :]` (gather layout `[features, out_pad]`).
///
/// # Safety
/// `input` `[rows, features]`, `weights` `[features, out_pad]`, `bias` `[out_pad]`, `out`
/// `[rows, outputs]`; launch `ceil(rows · out_pad / 64 · 32 / CONV_THREADS)` blocks of
/// `CONV_THREADS`.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn sparse_linear(
    input: *const f32,
    weights: *const f32,
    bias: *const f32,
    out: *mut f32,
    rows: u32,
    features: u32,
    outputs: u32,
    out_pad: u32,
) {
    use crate::gpu;
    let chunks = out_pad / COUT_PER_PASS;
    let warp_id = (gpu::block_x() * CONV_THREADS + gpu::thread_x()) / gpu::WARP_SIZE;
    let lane = gpu::thread_x() % gpu::WARP_SIZE;
    if warp_id >= rows * chunks {
        return; // whole warps leave together
    }
    let (row, chunk) = (warp_id / chunks, warp_id % chunks);
    let co = chunk * COUT_PER_PASS + 2 * lane;
    let (mut acc0, mut acc1) = (*bias.add(co as usize), *bias.add(co as usize + 1));
    let x = input.add((row * features) as usize);
    let mut f0 = 0;
    while f0 < features {
        let v = if f0 + lane < features {
            *x.add((f0 + lane) as usize)
        } else {
            0.0
        };
        let mut m = gpu::warp_ballot(v != 0.0);
        while m != 0 {
            let f = f0 + m.trailing_zeros();
            m &= m - 1;
            let value = *x.add(f as usize);
            let (w0, w1) = gpu::load_nc_f32x2(weights.add((f * out_pad + co) as usize));
            acc0 += value * w0;
            acc1 += value * w1;
        }
        f0 += 32;
    }
    let o = out.add((row * outputs) as usize);
    if co < outputs {
        *o.add(co as usize) = acc0;
    }
    if co + 1 < outputs {
        *o.add(co as usize + 1) = acc1;
    }
}

#[cfg(test)]
mod tests {
    /// `spike_bitmap_masks` emulated warp by warp on the CPU (the funnel shift and the 32
    /// votes) gives, for maps whose planes are not whole words, every pixel's mask of its
    /// 32 channels.
    #[test]
    fn bitmap_transpose_gives_every_pixel_mask() {
        for (n, cin, hw) in [(2u32, 64u32, 49u32), (1, 32, 32), (3, 96, 13), (1, 32, 100)] {
            let bits = (n * cin * hw) as usize;
            let spiked = |i: usize| (i * 2654435761) % 7 < 2;
            let mut bitmap = vec![0u32; bits / 32 + 1];
            for i in (0..bits).filter(|&i| spiked(i)) {
                bitmap[i / 32] |= 1 << (i % 32);
            }
            let words = mask_words(cin);
            let blocks = hw.div_ceil(BITMAP_PIXELS_PER_WARP);
            let mut masks = vec![u32::MAX; (n * words * hw) as usize];
            for warp in 0..n * words * blocks {
                let (img, word, block) = (
                    warp / (words * blocks),
                    (warp / blocks) % words,
                    warp % blocks,
                );
                let p0 = block * BITMAP_PIXELS_PER_WARP;
                let rows: Vec<u32> = (0..32)
                    .map(|lane| {
                        let bit = ((img * cin + 32 * word + lane) * hw + p0) as usize;
                        let hi = if !bit.is_multiple_of(32) {
                            bitmap[bit / 32 + 1]
                        } else {
                            0
                        };
                        bitmap_bits(bitmap[bit / 32], hi, (bit % 32) as u32)
                    })
                    .collect();
                for lane in 0..32 {
                    let column = (0..32).fold(0, |w, j| w | ((rows[j] >> lane) & 1) << j);
                    if p0 + lane < hw {
                        masks[((img * words + word) * hw + p0 + lane) as usize] = column;
                    }
                }
            }
            for img in 0..n {
                for p in 0..hw {
                    for c in 0..cin {
                        let i = ((img * cin + c) * hw + p) as usize;
                        let m = masks[((img * words + c / 32) * hw + p) as usize];
                        assert_eq!(
                            (m >> (c % 32)) & 1 == 1,
                            spiked(i),
                            "{n} {cin} {hw}: {img} {c} {p}"
                        );
                    }
                }
            }
            assert!(bitmap_masks_blocks(n, cin, hw) * PACK_THREADS / 32 >= n * words * blocks);
        }
    }

    use super::*;

    #[test]
    fn source_clips_to_the_image() {
        assert_eq!(source(0, 0, 1, 1, 5), None);
        assert_eq!(source(0, 1, 1, 1, 5), Some(0));
        assert_eq!(source(4, 2, 1, 1, 5), None);
        assert_eq!(source(2, 2, 2, 1, 5), Some(5).filter(|_| false));
        assert_eq!(source(1, 0, 2, 0, 5), Some(2));
        assert_eq!(mask_words(64), 2);
        assert_eq!(mask_words(65), 3);
    }

    #[test]
    fn every_geometry_has_every_width_that_fits_shared_memory() {
        for (k, s) in [(1, 1), (1, 2), (3, 1), (3, 2)] {
            for block in [4, 8, 16] {
                for (v, h) in [(2, 1), (4, 2), (4, 1), (8, 1)] {
                    let compiled = SPARSE_CONV_VARIANTS.iter().any(|x| {
                        (
                            x.kernel,
                            x.stride,
                            x.block,
                            x.couts_per_lane,
                            x.pixels_per_warp,
                        ) == (k, s, block, v, h)
                    });
                    // The H100's per-block limit, with 512 input channels of masks.
                    let pass = 32 / h * v;
                    let fits = conv_shared_bytes(block, k, s, 512, pass) <= 227 * 1024;
                    assert_eq!(compiled, fits, "k{k} s{s} b{block} v{v} h{h}");
                }
            }
        }
    }

    #[test]
    fn wide_layers_prefer_the_measured_widths() {
        // Every preferred shape list ends with the one that always fits.
        for cout in [1, 64, 65, 128, 129, 512] {
            for kernel in [1, 3] {
                assert_eq!(preferred_shapes(cout, kernel).last(), Some(&(2, 1)));
            }
        }
        assert_eq!(preferred_shapes(64, 3)[0], (4, 2));
        assert_eq!(preferred_shapes(128, 1)[0], (4, 1));
        // Beyond 128 channels 3×3 layers stay at 4 per lane, 1×1 layers take 8.
        assert_eq!(preferred_shapes(512, 3)[0], (4, 1));
        assert_eq!(preferred_shapes(256, 1)[0], (8, 1));
    }

    #[test]
    fn variants_are_distinct() {
        for (i, a) in SPARSE_CONV_VARIANTS.iter().enumerate() {
            for b in &SPARSE_CONV_VARIANTS[i + 1..] {
                let key = |v: &SparseConvVariant| {
                    (
                        v.kernel,
                        v.stride,
                        v.block,
                        v.couts_per_lane,
                        v.pixels_per_warp,
                    )
                };
                assert!(
                    key(a) != key(b),
                    "{} and {} compile the same variant",
                    a.entry,
                    b.entry
                );
            }
        }
    }
}
