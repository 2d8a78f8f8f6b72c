//! Stage 1 and 2 of the sparse convolution on the GPU.
//!
//! - `spike_mask_pack` (stage 1, the prescan): bit-packs the input `[N, Cin, H, W]` into per-pixel
//!   masks of active channels, `[N, words, H·W]` with `words = ceil(Cin / 32)`, and raises a flag
//!   when any non-zero is not exactly 1 (integer-valued SEW inputs).
//! - `sparse_conv_k{K}_s{S}_b{B}` (stage 2): one CTA per `B × B` output tile of one image. It
//!   stages its input window's masks in shared memory and, when the window is silent, writes the
//!   bias and stops. Otherwise each warp owns `B²/8` output pixels with their accumulators in
//!   registers; its lanes scan the pixel's (tap, mask word) items in parallel, pop one active
//!   channel each per round (ballot), and the warp consumes the popped weight rows together
//!   (shuffle): every lane adds `V` output channels (2, 4 or 8 by layer width) of each contiguous
//!   weight row `[tap, c, :]`; 64-channel layers run two pixels per warp (`H = 2`, a half-warp
//!   each, 4 channels per lane). Results are staged in shared memory and written to NCHW in rows.
//!   Each CTA computes `32 / H · V` output channels (grid z).
//!
//! Weights come in gather layout `[K·K·Cin + 1, cout_pad]` (`cout_pad` a multiple of `32·V`; the
//! last row is zeros, read for lanes without a row), bias padded to `cout_pad`. Padding is
//! `K / 2`, dilation 1, one group.

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

/// Dynamic shared memory of the compute kernel computing `pass` output channels: the staged
/// outputs `[pass][block² + 1]` (the +1 staggers banks) and the input window's masks
/// `[words][side²]`.
pub const fn conv_shared_bytes(block: u32, kernel: u32, stride: u32, cin: u32, pass: u32) -> u32 {
    let side = window_side(block, kernel, stride);
    pass * (block * block + 1) * 4 + mask_words(cin) * side * side * 4
}

/// The `(V, H)` shapes a layer of `cout` output channels prefers, best first: up to 64 channels
/// two pixels per warp with 4 channels per lane (each instruction serves two pixels), up to 128
/// one pixel with 4 per lane, beyond that 8 per lane; `(2, 1)` always works.
pub const fn preferred_shapes(cout: u32) -> &'static [(u32, u32)] {
    if cout <= 64 {
        &[(4, 2), (2, 1)]
    } else if cout <= 128 {
        &[(4, 1), (2, 1)]
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
/// `input` holds `n·cin·hw` floats, `masks` `n·words·hw` u32, `non_binary` one u32 (zeroed by the
/// host). Launch with `PACK_THREADS` threads and `ceil(n·words·hw / PACK_THREADS)` blocks.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn spike_mask_pack(
    input: *const f32,
    masks: *mut u32,
    non_binary: *mut u32,
    n: u32,
    cin: u32,
    hw: u32,
) {
    use crate::gpu;
    let words = mask_words(cin);
    let idx = gpu::block_x() * PACK_THREADS + gpu::thread_x();
    let total = n * words * hw;
    let mut odd = false;
    if idx < total {
        let pixel = idx % hw;
        let word = (idx / hw) % words;
        let img = idx / (hw * words);
        let mut m = 0u32;
        let mut j = 0;
        while j < 32 && word * 32 + j < cin {
            let c = word * 32 + j;
            let v = *input.add(((img * cin + c) * hw + pixel) as usize);
            if v != 0.0 {
                m |= 1 << j;
                odd |= v != 1.0;
            }
            j += 1;
        }
        *masks.add(idx as usize) = m;
    }
    // Every thread reaches the vote (none returned early), so the warp is complete.
    if gpu::warp_any(odd) && gpu::thread_x() % gpu::WARP_SIZE == 0 {
        gpu::atomic_or_u32(non_binary, 1);
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

/// Adds the weight rows that the lanes in `popped` hold in `row` (with their input `value` when
/// not binary) to this lane's `V` outputs, two rows per step so two loads are in flight. With
/// `H = 2` pixels per warp each half-warp consumes the rows its own lanes popped, in lockstep
/// (the shorter half reads the zero row `zero_row` until the longer one is done).
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn consume<const V: usize, const H: u32>(
    popped: u32,
    row: u32,
    value: f32,
    binary: bool,
    weights: *const f32,
    cout_pad: u32,
    co: u32,
    zero_row: u32,
    acc: &mut [f32; V],
) {
    use crate::gpu;
    let lanes = 32 / H;
    let shift = if H == 1 {
        0
    } else {
        lanes * (gpu::thread_x() % 32 / lanes)
    };
    let mut mine = if H == 1 {
        popped
    } else {
        (popped >> shift) & ((1u32 << lanes) - 1)
    };
    loop {
        // Warp-uniform: with one pixel per warp every lane holds the same `mine`.
        let more = if H == 1 {
            mine != 0
        } else {
            gpu::warp_any(mine != 0)
        };
        if !more {
            break;
        }
        let take0 = mine != 0;
        let j0 = if take0 { mine.trailing_zeros() } else { 0 };
        mine &= mine.wrapping_sub(1);
        let take1 = mine != 0;
        let j1 = if take1 { mine.trailing_zeros() } else { 0 };
        mine &= mine.wrapping_sub(1);
        let s0 = gpu::shfl_u32(row, shift + j0);
        let s1 = gpu::shfl_u32(row, shift + j1);
        let r0 = if take0 { s0 } else { zero_row };
        let a = load_row::<V>(weights.add((r0 * cout_pad + co) as usize));
        let b = if take1 {
            load_row::<V>(weights.add((s1 * cout_pad + co) as usize))
        } else {
            [0.0; V]
        };
        if binary {
            if take0 {
                for k in 0..V {
                    acc[k] += a[k];
                }
            }
            if take1 {
                for k in 0..V {
                    acc[k] += b[k];
                }
            }
        } else {
            let v0 = f32::from_bits(gpu::shfl_u32(value.to_bits(), shift + j0));
            let v1 = f32::from_bits(gpu::shfl_u32(value.to_bits(), shift + j1));
            if take0 {
                for k in 0..V {
                    acc[k] += v0 * a[k];
                }
            }
            if take1 {
                for k in 0..V {
                    acc[k] += v1 * b[k];
                }
            }
        }
    }
}

/// Side of the input window a `B × B` output tile reads.
pub const fn window_side(block: u32, kernel: u32, stride: u32) -> u32 {
    (block - 1) * stride + kernel
}

/// # Safety
/// Buffers as in the module docs; `out` holds `n·cout·oh·ow` floats. Launch with grid
/// `(tiles_x · tiles_y, n, cout_pad / (32·V))`, `CONV_THREADS` threads and
/// `conv_shared_bytes(B, K, S, Cin, V)` bytes of dynamic shared memory; `cout_pad` is a multiple
/// of `32·V`.
///
/// Each warp owns `B²/8` output pixels of the tile, their accumulators in registers. The CTA
/// stages the tile's input window of masks in shared memory, then walks the taps outermost, so
/// one tap's weights (`Cin` rows) stay hot in L1 while every pixel takes its contributions.
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
    const WARPS: u32 = CONV_THREADS / 32;
    let pad = K / 2;
    let img = gpu::block_y();
    let tile = gpu::block_x();
    let (ty0, tx0) = ((tile / tiles_x) * B, (tile % tiles_x) * B);
    let tid = gpu::thread_x();
    let (warp, lane) = (tid / gpu::WARP_SIZE, tid % gpu::WARP_SIZE);
    let hw = h * w;
    let words = mask_words(cin);
    let image_masks = masks.add((img * words * hw) as usize);
    let side = window_side(B, K, S);
    let bb = B * B;
    let stage = gpu::dynamic_shared_f32();
    // Lanes per pixel, and the output channels one CTA computes.
    let lanes = 32 / H;
    let (half, hl) = (lane / lanes, lane % lanes);
    let pass = lanes * V as u32;
    // Shared memory: the staged outputs [pass][bb + 1], then the window's masks [words][side²].
    let window = stage.add((pass * (bb + 1)) as usize) as *mut u32;

    // Window origin in input coordinates (may be negative: padding).
    let wy0 = (ty0 * S) as i32 - pad as i32;
    let wx0 = (tx0 * S) as i32 - pad as i32;
    let mut any = false;
    let mut i = tid;
    while i < words * side * side {
        let (word, r) = (i / (side * side), i % (side * side));
        let (y, x) = (wy0 + (r / side) as i32, wx0 + (r % side) as i32);
        let m = if y >= 0 && x >= 0 && (y as u32) < h && (x as u32) < w {
            *image_masks.add((word * hw + y as u32 * w + x as u32) as usize)
        } else {
            0
        };
        *window.add(i as usize) = m;
        any |= m != 0;
        i += CONV_THREADS;
    }
    let active = gpu::sync_threads_or(any) && ty0 < oh && tx0 < ow;
    let binary = *non_binary == 0;

    // Each CTA computes one pass of `32·V` output channels, `V` per lane: wide layers amortise
    // the popping of active rows over more useful adds, and deep layers (7×7 maps) with few
    // tiles still spread over the grid's z dimension.
    let chunk = gpu::block_z() * pass;
    {
        let co = chunk + V as u32 * hl;
        let mut bias_v = [0.0f32; V];
        for (k, b) in bias_v.iter_mut().enumerate() {
            *b = *bias.add(co as usize + k);
        }
        // The weight rows end with one row of zeros, read by lanes without a row.
        let zero_row = K * K * cin;
        let mut p0 = warp * H;
        while p0 < bb {
            let p = p0 + half;
            let (py, px) = (p / B, p % B);
            let mut acc = bias_v;
            let valid = active && ty0 + py < oh && tx0 + px < ow;
            if (H == 1 && valid) || (H > 1 && gpu::warp_any(valid)) {
                // Lane `i` of a pixel's lanes owns item (tap, word) = base + i; each round, every
                // lane with bits left pops one weight row, and the warp consumes them together.
                let items = K * K * words;
                let mut base = 0;
                while base < items {
                    let item = base + hl;
                    let (mut m, row_base, channel_base, pixel) = if valid && item < items {
                        let (tap, word) = (item / words, item % words);
                        let (ky, kx) = (tap / K, tap % K);
                        let r = (py * S + ky) * side + px * S + kx;
                        let iy = (wy0 + (py * S + ky) as i32) as u32;
                        let ix = (wx0 + (px * S + kx) as i32) as u32;
                        let m = *window.add((word * side * side + r) as usize);
                        (m, tap * cin + word * 32, word * 32, iy * w + ix)
                    } else {
                        (0, 0, 0, 0)
                    };
                    loop {
                        let popped = gpu::warp_ballot(m != 0);
                        if popped == 0 {
                            break;
                        }
                        let mut row = zero_row;
                        let mut value = 0.0f32;
                        if m != 0 {
                            let bit = m.trailing_zeros();
                            m &= m - 1;
                            row = row_base + bit;
                            if !binary {
                                let channel = channel_base + bit;
                                value = *input.add(((img * cin + channel) * hw + pixel) as usize);
                            }
                        }
                        consume::<V, H>(
                            popped, row, value, binary, weights, cout_pad, co, zero_row, &mut acc,
                        );
                    }
                    base += lanes;
                }
            }
            for (k, a) in acc.iter().enumerate() {
                *stage.add(((V as u32 * hl + k as u32) * (bb + 1) + p) as usize) = *a;
            }
            p0 += WARPS * H;
        }
        gpu::sync_threads();
        let mut i = tid;
        while i < pass * bb {
            let (local, p) = (i / bb, i % bb);
            let (co, oy, ox) = (chunk + local, ty0 + p / B, tx0 + p % B);
            if co < cout && oy < oh && ox < ow {
                *out.add((((img * cout + co) * oh + oy) * ow + ox) as usize) =
                    *stage.add((local * (bb + 1) + p) as usize);
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
