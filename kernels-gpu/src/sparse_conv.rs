//! Stage 1 and 2 of the sparse convolution on the GPU.
//!
//! - `spike_mask_pack` (stage 1, the prescan): bit-packs the input `[N, Cin, H, W]` into per-pixel
//!   masks of active channels, `[N, words, H·W]` with `words = ceil(Cin / 32)`, and raises a flag
//!   when any non-zero is not exactly 1 (integer-valued SEW inputs).
//! - `sparse_conv_k{K}_s{S}_b{B}` (stage 2): one CTA per `B × B` output tile of one image. It
//!   first checks its input window's masks and, when the window is silent, writes the bias and
//!   stops. Otherwise each warp takes output pixels in turn; for each pixel it walks the set bits
//!   of the masks under the receptive field (warp-uniform), and every lane accumulates two output
//!   channels from one contiguous weight row `[tap, c, :]`. Results are staged in shared memory
//!   and written to NCHW in rows.
//!
//! Weights come in gather layout `[K·K·Cin, cout_pad]` (`cout_pad` a multiple of 64), bias padded
//! to `cout_pad`. Padding is `K / 2`, dilation 1, one group.

/// Output channels one pass of a CTA computes: 32 lanes × 2.
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
    pub entry: &'static str,
}

/// Dynamic shared memory of the compute kernel for tile side `block`: the staged outputs
/// `[64][block² + 1]` (the +1 staggers banks).
pub const fn conv_shared_bytes(block: u32) -> u32 {
    COUT_PER_PASS * (block * block + 1) * 4
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

/// # Safety
/// Buffers as in the module docs; `out` holds `n·cout·oh·ow` floats. Launch with grid
/// `(tiles_x · tiles_y, n)`, `CONV_THREADS` threads and `conv_shared_bytes(B)` bytes of dynamic
/// shared memory.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn sparse_conv<const K: u32, const S: u32, const B: u32>(
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
    let (warp, lane) = (tid / gpu::WARP_SIZE, tid % gpu::WARP_SIZE);
    let hw = h * w;
    let words = mask_words(cin);
    let image_masks = masks.add((img * words * hw) as usize);

    // Is any input under this tile's receptive field active? (Rows/cols clipped to the image.)
    let y_lo = (ty0 * S).saturating_sub(pad);
    let y_hi = ((ty0 + B - 1) * S + K - 1).saturating_sub(pad).min(h - 1);
    let x_lo = (tx0 * S).saturating_sub(pad);
    let x_hi = ((tx0 + B - 1) * S + K - 1).saturating_sub(pad).min(w - 1);
    let (win_h, win_w) = (y_hi + 1 - y_lo, x_hi + 1 - x_lo);
    let mut any = false;
    let mut i = tid;
    while i < win_h * win_w * words {
        let word = i / (win_h * win_w);
        let r = i % (win_h * win_w);
        let p = (y_lo + r / win_w) * w + x_lo + r % win_w;
        any |= *image_masks.add((word * hw + p) as usize) != 0;
        i += CONV_THREADS;
    }
    let active = gpu::sync_threads_or(any) && ty0 < oh && tx0 < ow;
    let binary = *non_binary == 0;

    let stage = gpu::dynamic_shared_f32();
    let bb = B * B;
    let mut chunk = 0;
    while chunk < cout_pad {
        let co = chunk + 2 * lane;
        let (b0, b1) = (*bias.add(co as usize), *bias.add(co as usize + 1));
        let mut p = warp;
        while p < bb {
            let (oy, ox) = (ty0 + p / B, tx0 + p % B);
            let (mut acc0, mut acc1) = (b0, b1);
            if active && oy < oh && ox < ow {
                let mut ky = 0;
                while ky < K {
                    if let Some(iy) = source(oy, ky, S, pad, h) {
                        let mut kx = 0;
                        while kx < K {
                            if let Some(ix) = source(ox, kx, S, pad, w) {
                                let pixel = iy * w + ix;
                                let tap = (ky * K + kx) * cin;
                                let mut word = 0;
                                while word < words {
                                    let mut m = *image_masks.add((word * hw + pixel) as usize);
                                    while m != 0 {
                                        let c = word * 32 + m.trailing_zeros();
                                        m &= m - 1;
                                        let row = weights.add(((tap + c) * cout_pad + co) as usize);
                                        let (w0, w1) = gpu::load_nc_f32x2(row);
                                        if binary {
                                            acc0 += w0;
                                            acc1 += w1;
                                        } else {
                                            let v =
                                                *input.add(((img * cin + c) * hw + pixel) as usize);
                                            acc0 += v * w0;
                                            acc1 += v * w1;
                                        }
                                    }
                                    word += 1;
                                }
                            }
                            kx += 1;
                        }
                    }
                    ky += 1;
                }
            }
            *stage.add((2 * lane * (bb + 1) + p) as usize) = acc0;
            *stage.add(((2 * lane + 1) * (bb + 1) + p) as usize) = acc1;
            p += CONV_THREADS / gpu::WARP_SIZE;
        }
        gpu::sync_threads();
        let mut i = tid;
        while i < COUT_PER_PASS * bb {
            let (local, p) = (i / bb, i % bb);
            let (co, oy, ox) = (chunk + local, ty0 + p / B, tx0 + p % B);
            if co < cout && oy < oh && ox < ow {
                *out.add((((img * cout + co) * oh + oy) * ow + ox) as usize) =
                    *stage.add((local * (bb + 1) + p) as usize);
            }
            i += CONV_THREADS;
        }
        gpu::sync_threads();
        chunk += COUT_PER_PASS;
    }
}

macro_rules! sparse_conv_variants {
    ($($entry:ident => kernel $k:literal, stride $s:literal, block $b:literal);+ $(;)?) => {
        $(
            #[cfg(target_arch = "nvptx64")]
            #[no_mangle]
            pub unsafe extern "ptx-kernel" fn $entry(
                input: *const f32, masks: *const u32, non_binary: *const u32,
                weights: *const f32, bias: *const f32, out: *mut f32,
                cin: u32, h: u32, w: u32, cout: u32, cout_pad: u32, oh: u32, ow: u32, tiles_x: u32,
            ) {
                sparse_conv::<$k, $s, $b>(
                    input, masks, non_binary, weights, bias, out,
                    cin, h, w, cout, cout_pad, oh, ow, tiles_x,
                )
            }
        )+
        /// Every compute-kernel entry point in the PTX module.
        pub const SPARSE_CONV_VARIANTS: &[SparseConvVariant] = &[
            $(SparseConvVariant { kernel: $k, stride: $s, block: $b, entry: stringify!($entry) }),+
        ];
    };
}

sparse_conv_variants! {
    sparse_conv_k3_s1_b8 => kernel 3, stride 1, block 8;
    sparse_conv_k3_s1_b16 => kernel 3, stride 1, block 16;
    sparse_conv_k3_s2_b8 => kernel 3, stride 2, block 8;
    sparse_conv_k3_s2_b16 => kernel 3, stride 2, block 16;
    sparse_conv_k1_s1_b8 => kernel 1, stride 1, block 8;
    sparse_conv_k1_s1_b16 => kernel 1, stride 1, block 16;
    sparse_conv_k1_s2_b8 => kernel 1, stride 2, block 8;
    sparse_conv_k1_s2_b16 => kernel 1, stride 2, block 16;
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
    fn variants_are_distinct() {
        for (i, a) in SPARSE_CONV_VARIANTS.iter().enumerate() {
            for b in &SPARSE_CONV_VARIANTS[i + 1..] {
                assert!((a.kernel, a.stride, a.block) != (b.kernel, b.stride, b.block));
            }
        }
    }
}
