//! Convolution of spikes on the tensor cores, at fp32 accuracy.
//!
//! Spikes are 0 or 1 and SEW sums small integers: half precision holds them exactly. The weights
//! do not fit in a half, but their sum of two halves does to 22 bits: `w · s = hi + lo`, with a
//! power-of-two scale `s` that keeps the largest weight in half range. So
//! `Σ x · w = (Σ x · hi + Σ x · lo) / s` is two half-precision tensor-core products, exact but
//! for the f32 accumulation and that 22-bit split: fp32 accuracy at tensor-core speed.
//!
//! The kernel is an implicit GEMM like [`crate::dense_conv`]: `out[p, co] = Σ_k X[p, k] · W[k,
//! co]` over output pixels `p` and taps `k = (ci, r, s)`. A CTA of four warps owns 128 pixels and
//! 64 output channels. Per stage of 32 taps, each thread gathers its pixel's 32 inputs from the
//! NCHW tensor into shared memory as halves (the next stage's loads in flight while the warps
//! multiply this one); each warp then feeds 32 pixels × 64 channels through `mma.m16n8k16`, its
//! A fragments by `ldmatrix`, its B fragments (host-packed in fragment order, see
//! [`fragment_entry`]) copied to shared memory by `cp.async`. Each stage sums into fresh
//! registers that are added to the totals in f32 (the tensor cores truncate as they accumulate).
//!
//! Any input is computed correctly: a stage where some input is not exactly a half (a
//! direct-encoded image, a membrane potential) is restaged as f32 and summed with FMAs against
//! the f32 weights. Spikes never take that path.

use crate::dense_conv::ConvGeometry;

/// Output pixels per CTA (one per thread when staging, 32 per warp in the GEMM).
pub const TENSOR_TILE_P: u32 = 128;
/// Output channels per CTA: eight `n8` fragments per warp.
pub const TENSOR_TILE_M: u32 = 64;
/// Taps staged per step: two `k16` fragments.
pub const TENSOR_STAGE_K: u32 = 32;
/// Threads per CTA: four warps.
pub const TENSOR_CONV_THREADS: u32 = 128;
/// Bytes between two pixels' staged rows: 32 halves and 16 bytes of padding, so that the eight
/// rows one `ldmatrix` phase reads fall in distinct banks.
pub const TENSOR_ROW_BYTES: u32 = TENSOR_STAGE_K * 2 + 16;
/// Bytes of one stage's inputs: a row per pixel.
pub const TENSOR_A_BYTES: u32 = TENSOR_TILE_P * TENSOR_ROW_BYTES;
/// Bytes of one `n8` tile's weight fragments for one `k16` step: 32 lanes × 16 bytes.
pub const TENSOR_TILE_FRAGMENT_BYTES: u32 = 32 * FRAGMENT_WORDS as u32 * 4;
/// Bytes of one `k16` step's weights for the CTA's eight `n8` tiles.
pub const TENSOR_STEP_FRAGMENT_BYTES: u32 = TENSOR_TILE_M / 8 * TENSOR_TILE_FRAGMENT_BYTES;
/// Bytes of one stage's weights: two `k16` steps.
pub const TENSOR_B_BYTES: u32 = 2 * TENSOR_STEP_FRAGMENT_BYTES;
/// One stage buffer: its inputs, then its weights (the f32 fallback reuses it whole).
pub const TENSOR_BUFFER_BYTES: u32 = TENSOR_A_BYTES + TENSOR_B_BYTES;
/// The most taps (`kh · kw`) a kernel may have: one bit each in a `u64`, bit 63 kept clear.
pub const MAX_TENSOR_TAPS: u32 = 63;
/// The most taps `tensor_conv2d` takes (a `u32` mask; more take `tensor_conv2d_wide`).
pub const NARROW_TENSOR_TAPS: u32 = 32;
/// The tap-table entry of `k` past `K`: never inside.
pub const NO_TAP: u32 = 63;

/// Dynamic shared memory per CTA for a reduction of `k_dim`: two stage buffers and the tap table
/// (8 bytes per padded `k`).
pub const fn tensor_conv_shared_bytes(k_dim: u32) -> u32 {
    2 * TENSOR_BUFFER_BYTES + 8 * padded_k(k_dim)
}
/// `u32` words per lane per (`k16` step, `n8` tile): the `hi` fragment's two registers, then
/// `lo`'s.
pub const FRAGMENT_WORDS: usize = 4;

/// The reduction length rounded up to whole stages (the packed weights' padded `K`).
pub const fn padded_k(k_dim: u32) -> u32 {
    k_dim.div_ceil(TENSOR_STAGE_K) * TENSOR_STAGE_K
}

/// The output channel count rounded up to whole CTA tiles (the packed weights' padded `N`).
pub const fn padded_cout(cout: u32) -> u32 {
    cout.div_ceil(TENSOR_TILE_M) * TENSOR_TILE_M
}

/// The launch grid: pixel tiles × output-channel tiles.
pub const fn tensor_conv_grid(g: &ConvGeometry) -> (u32, u32, u32) {
    (
        g.pixels().div_ceil(TENSOR_TILE_P),
        g.cout.div_ceil(TENSOR_TILE_M),
        1,
    )
}

/// The `(k, co)` of the weight that half `half` (0 = low) of register `register` (0 or 1) of
/// lane `lane`'s B fragment holds, for the `k16` step `step` and the `n8` tile `tile`: PTX's
/// `mma.m16n8k16` layout (`k = 2 · (lane % 4) + half`, plus 8 for register 1; `co = lane / 4`).
/// The packed weights are `[step][tile][lane][hi 0, hi 1, lo 0, lo 1]` words.
pub const fn fragment_entry(
    step: u32,
    tile: u32,
    lane: u32,
    register: u32,
    half: u32,
) -> (u32, u32) {
    let k = step * 16 + 2 * (lane % 4) + half + 8 * register;
    (k, tile * 8 + lane / 4)
}

/// The index of the first of the four words of (`step`, `tile`, `lane`) in the packed weights.
pub const fn fragment_word(step: u32, tile: u32, lane: u32, cout_padded: u32) -> usize {
    ((step as usize * (cout_padded / 8) as usize + tile as usize) * 32 + lane as usize)
        * FRAGMENT_WORDS
}

/// Every half of the packed weights: `(word, shift, k, co)`, the index of the `hi` word that
/// holds it (its `lo` twin is two words later), its bit offset there, and the weight `(k, co)`
/// it carries. The host packs through this and the tests unpack through it.
pub fn fragment_halves(
    k_padded: u32,
    cout_padded: u32,
) -> impl Iterator<Item = (usize, u32, u32, u32)> {
    (0..k_padded / 16).flat_map(move |step| {
        (0..cout_padded / 8).flat_map(move |tile| {
            (0..32).flat_map(move |lane| {
                let at = fragment_word(step, tile, lane, cout_padded);
                (0..4).map(move |i| {
                    let (register, half) = (i / 2, i % 2);
                    let (k, co) = fragment_entry(step, tile, lane, register, half);
                    (at + register as usize, 16 * half, k, co)
                })
            })
        })
    })
}

/// The entry points: `$entry` runs [`tensor_conv`] with 64-bit tap masks when `$wide`.
macro_rules! tensor_conv_entries {
    ($($(#[$doc:meta])* $entry:ident => wide $wide:literal;)+) => {
        $(
            $(#[$doc])*
            #[cfg(target_arch = "nvptx64")]
            #[no_mangle]
            #[allow(clippy::too_many_arguments)]
            pub unsafe extern "ptx-kernel" fn $entry(
                input: *const f32,
                fragments: *const u32,
                weight: *const f32,
                bias: *const f32,
                has_bias: u32,
                out: *mut f32,
                g: ConvGeometry,
                scale: f32,
                only_if: *const u32,
            ) {
                // After `tensor_conv2d_spikes`: its input was not binary, so this kernel runs.
                if !only_if.is_null() && *only_if == 0 {
                    return;
                }
                tensor_conv::<$wide>(input, fragments, weight, g, 1, |acc| {
                    store_tile(acc, bias, has_bias, out, &g, scale)
                })
            }
        )+
    };
}

/// The entry points whose epilogue fires a neuron over T on the output (`ConvNeuronPool`):
/// `$entry` runs [`tensor_conv`] with 64-bit tap masks when `$wide`.
macro_rules! tensor_conv_neuron_entries {
    ($($(#[$doc:meta])* $entry:ident => wide $wide:literal;)+) => {
        $(
            $(#[$doc])*
            #[cfg(target_arch = "nvptx64")]
            #[no_mangle]
            #[allow(clippy::too_many_arguments)]
            pub unsafe extern "ptx-kernel" fn $entry(
                input: *const f32,
                fragments: *const u32,
                weight: *const f32,
                bias: *const f32,
                has_bias: u32,
                spikes: *mut u8,
                g: ConvGeometry,
                scale: f32,
                neuron: crate::neuron::NeuronParams,
            ) {
                tensor_conv::<$wide>(input, fragments, weight, g, neuron.steps, |acc| {
                    neuron_tile(acc, bias, has_bias, spikes, &g, scale, &neuron)
                })
            }
        )+
    };
}

tensor_conv_neuron_entries! {
    /// [`tensor_conv2d`] whose CTAs take their 128 pixels as the T steps of `128 / T` positions
    /// ([`tile_step_pixel`]) and, instead of writing
    /// the output, run `neuron` over T on it in shared memory and write the spikes as bytes
    /// (`[N, cout, oh, ow]`, N = T · B): a conv that only a neuron reads (the stem) never writes
    /// its f32 map, and the neuron never reads it back. The spikes are the neuron kernel's on
    /// the output of [`tensor_conv2d`], bit for bit: the same sums, the same charge equations.
    ///
    /// # Safety
    /// As [`tensor_conv2d`]; `spikes` holds `N · cout · oh · ow` bytes; `neuron.steps` divides
    /// both 128 and `N`.
    tensor_conv2d_neuron => wide false;
    /// [`tensor_conv2d_neuron`] for kernels of more than [`NARROW_TENSOR_TAPS`] taps (the 7×7
    /// stem).
    ///
    /// # Safety
    /// As [`tensor_conv2d_neuron`].
    tensor_conv2d_wide_neuron => wide true;
}

/// `(image, output row, output column)` of GEMM column `p` when each CTA tile of 128 columns
/// holds all `steps` time steps of `128 / steps` positions (a batch folded `[T, B]`, positions
/// numbered over `B` images): column `r` of tile `c` is step `r / (128 / steps)` of position
/// `c · 128 / steps + r % (128 / steps)`, so a warp still stages 32 consecutive positions of one
/// image. `None` past the last position. With `steps` 1 it is [`ConvGeometry::pixel`].
#[inline(always)]
pub const fn tile_step_pixel(g: &ConvGeometry, p: u32, steps: u32) -> Option<(u32, u32, u32)> {
    if steps == 1 {
        // Folded away in the plain entries, which pass a constant 1.
        return if p < g.pixels() {
            Some(g.pixel(p))
        } else {
            None
        };
    }
    let positions = TENSOR_TILE_P / steps;
    let (tile, r) = (p / TENSOR_TILE_P, p % TENSOR_TILE_P);
    let (t, position) = (r / positions, tile * positions + r % positions);
    let (images, plane) = (g.n / steps, g.oh * g.ow);
    if position >= images * plane {
        return None;
    }
    let (b, at) = (position / plane, position % plane);
    Some((t * images + b, at / g.ow, at % g.ow))
}

/// Floats between two output channels' rows of the staged tile in [`neuron_tile`]: 128 pixels
/// and 4 of padding, so that the accumulator stores of a warp fall in 32 distinct banks.
pub const NEURON_STAGE_STRIDE: u32 = TENSOR_TILE_P + 4;

tensor_conv_entries! {
    /// `out = conv(input, weight) + bias` (NCHW, one group), `fragments` the weights times `scale`
    /// split into half pairs and packed by [`fragment_word`], `weight` the f32 weights times `scale`
    /// `[padded_cout, K]` (zero rows past `cout`; read by stages whose input is not exactly half),
    /// `bias` read when `has_bias != 0`. With `only_if` non-null, it does nothing unless
    /// `*only_if` is non-zero (the non-binary flag of the spike path's packing pass).
    ///
    /// # Safety
    /// The buffers hold the elements `g` implies (`fragments`: `padded_k · padded_cout · 2` words);
    /// launch with [`tensor_conv_grid`], [`TENSOR_CONV_THREADS`] threads and
    /// [`tensor_conv_shared_bytes`] of dynamic shared memory; `kh · kw` at most
    /// [`NARROW_TENSOR_TAPS`] (`tensor_conv2d_wide`: at most [`MAX_TENSOR_TAPS`]).
    tensor_conv2d => wide false;
    /// [`tensor_conv2d`] for kernels of more than [`NARROW_TENSOR_TAPS`] taps (the 7×7 stem).
    ///
    /// # Safety
    /// As [`tensor_conv2d`].
    tensor_conv2d_wide => wide true;
}

/// The kernel; `WIDE` keeps a 64-bit tap mask per pixel and tap indices in the table, else a
/// 32-bit mask and each tap's bit (one AND to test).
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
unsafe fn tensor_conv<const WIDE: bool>(
    input: *const f32,
    fragments: *const u32,
    weight: *const f32,
    g: ConvGeometry,
    steps: u32,
    epilogue: impl FnOnce(&[[[f32; 4]; 8]; 2]),
) {
    use crate::gpu;
    let tid = gpu::thread_x();
    let (warp, lane) = (tid / 32, tid % 32);
    let (row_in_tile, quad) = (lane / 4, lane % 4);
    let p0 = gpu::block_x() * TENSOR_TILE_P;
    let m0 = gpu::block_y() * TENSOR_TILE_M;
    let k_dim = g.k_dim();
    let k_padded = padded_k(k_dim);
    let cout_padded = padded_cout(g.cout);
    let shared = gpu::dynamic_shared_base();

    // The tap table: for every `k`, the input's offset from the window's corner in the image
    // and its tap `r · kw + s` (`WIDE`; 63, never inside, past `K`) or that tap's bit (0 past
    // `K`). Built once; the gather then costs a table read, a bit test and a load per input.
    let table = shared + 2 * TENSOR_BUFFER_BYTES;
    let taps = g.kh * g.kw;
    let mut k = tid;
    while k < k_padded {
        let (offset, tap) = if k < k_dim {
            let (ci, tap) = (k / taps, k % taps);
            let (r, s) = (tap / g.kw, tap % g.kw);
            let tap = if WIDE { tap } else { 1 << tap };
            ((ci * g.h + r * g.dh) * g.w + s * g.dw, tap)
        } else {
            (0, if WIDE { NO_TAP } else { 0 })
        };
        gpu::store_shared_u32(table + 8 * k, offset);
        gpu::store_shared_u32(table + 8 * k + 4, tap);
        k += TENSOR_CONV_THREADS;
    }

    // The pixel this thread stages, and which of its taps fall inside the image.
    let pixel_at = tile_step_pixel(&g, p0 + tid, steps);
    let (img, oy, ox) = match pixel_at {
        Some(at) => at,
        None => (0, 0, 0),
    };
    let iy0 = (oy * g.sh) as i32 - g.ph as i32;
    let ix0 = (ox * g.sw) as i32 - g.pw as i32;
    let mut inside = 0u64;
    if pixel_at.is_some() {
        for r in 0..g.kh {
            for s in 0..g.kw {
                let iy = iy0 + (r * g.dh) as i32;
                let ix = ix0 + (s * g.dw) as i32;
                if (iy as u32) < g.h && (ix as u32) < g.w {
                    inside |= 1 << (r * g.kw + s);
                }
            }
        }
    }
    let pixel = PixelTaps::<WIDE> {
        corner: input.offset(
            (img * g.cin * g.h * g.w) as isize + iy0 as isize * g.w as isize + ix0 as isize,
        ),
        inside,
        table,
    };
    gpu::sync_threads();

    let mut acc = [[[0.0f32; 4]; 8]; 2];
    // Two stage buffers: while the warps multiply one, the next stage's loads are in flight.
    let buffer = |stage: u32| shared + (stage % 2) * TENSOR_BUFFER_BYTES;
    // ldmatrix: lanes 0-7 address rows 0-7 at k 0, 8-15 rows 8-15 at k 0, 16-31 the same at k 8.
    let matrix_row = warp * 32 + lane % 16;
    let matrix_col = (lane / 16) * 16;
    let stages = k_padded / TENSOR_STAGE_K;
    // This CTA's eight tiles of one k16 step are 4 KB in a row of the packed weights.
    let cta_fragments = fragments.add(fragment_word(0, m0 / 8, 0, cout_padded));
    let step_words = (cout_padded / 8 * 32) as usize * FRAGMENT_WORDS;
    let copy_weights = |stage: u32| {
        copy_stage_weights(
            buffer(stage) + TENSOR_A_BYTES,
            cta_fragments,
            stage,
            step_words,
        )
    };
    let mut inputs = [0.0f32; 32];
    pixel.load_stage(0, &mut inputs);
    copy_weights(0);
    for stage in 0..stages {
        let k0 = stage * TENSOR_STAGE_K;
        let base = buffer(stage);
        let mut exact = true;
        unroll!(q in [0, 1, 2, 3] {
            let mut words = [0u32; 4];
            unroll!(e in [0, 1, 2, 3] {
                let (word, ok) =
                    gpu::pack_f16x2_exact(inputs[8 * q + 2 * e], inputs[8 * q + 2 * e + 1]);
                words[e] = word;
                exact &= ok;
            });
            gpu::store_shared_u32x4(base + tid * TENSOR_ROW_BYTES + 16 * q as u32, words);
        });
        gpu::async_copy_wait_all();
        let fallback = gpu::sync_threads_or(!exact);
        if stage + 1 < stages {
            pixel.load_stage(k0 + TENSOR_STAGE_K, &mut inputs);
            copy_weights(stage + 1);
        }
        if !fallback {
            // Each stage sums into fresh registers, added to the totals in f32: the tensor
            // cores truncate when they accumulate, and over a long `K` that bias, not the
            // weights' split, would be the largest error.
            unroll!(m_tile in [0, 1] {
                let mut partial = [[0.0f32; 4]; 8];
                let row = matrix_row + 16 * m_tile as u32;
                for step in 0..2 {
                    let a = gpu::load_matrix_x4(
                        base + step * 32 + matrix_col + row * TENSOR_ROW_BYTES,
                    );
                    let b_base = base + TENSOR_A_BYTES + step * TENSOR_STEP_FRAGMENT_BYTES + lane * 16;
                    partial = step_products(a, b_base, partial);
                }
                unroll!(tile in [0, 1, 2, 3, 4, 5, 6, 7] {
                    unroll!(i in [0, 1, 2, 3] {
                        acc[m_tile][tile][i] += partial[tile][i];
                    });
                });
            });
        } else {
            // Some input of the stage is not a half: restage it as f32, `[k][pixel]`, in this
            // stage's buffer (nothing reads it any more), and sum exactly.
            for kk in 0..TENSOR_STAGE_K {
                let x = pixel.input(k0 + kk);
                gpu::store_shared_f32(base + (kk * TENSOR_TILE_P + tid) * 4, x);
            }
            gpu::sync_threads();
            let k_end = if k0 + TENSOR_STAGE_K < k_dim {
                k0 + TENSOR_STAGE_K
            } else {
                k_dim
            };
            for k in k0..k_end {
                let mut x = [[0.0f32; 2]; 2];
                unroll!(m_tile in [0, 1] {
                    unroll!(half in [0, 1] {
                        let pixel = warp * 32 + m_tile as u32 * 16 + row_in_tile + 8 * half as u32;
                        x[m_tile][half] =
                            gpu::load_shared_f32(base + ((k - k0) * TENSOR_TILE_P + pixel) * 4);
                    });
                });
                let column = weight.add(((m0 + 2 * quad) * k_dim + k) as usize);
                unroll!(tile in [0, 1, 2, 3, 4, 5, 6, 7] {
                    let w0 = *column.add(tile * 8 * k_dim as usize);
                    let w1 = *column.add((tile * 8 + 1) * k_dim as usize);
                    unroll!(m_tile in [0, 1] {
                        let (c, x) = (&mut acc[m_tile][tile], x[m_tile]);
                        c[0] = gpu::fma_f32(x[0], w0, c[0]);
                        c[1] = gpu::fma_f32(x[0], w1, c[1]);
                        c[2] = gpu::fma_f32(x[1], w0, c[2]);
                        c[3] = gpu::fma_f32(x[1], w1, c[3]);
                    });
                });
            }
        }
    }

    epilogue(&acc);
}

/// One `k16` step of a warp's `m16` tile: the eight `n8` weight fragments at `b_base` in shared
/// memory (this lane's 16 bytes of each), times the A fragment `a`, added to `partial`. All
/// `hi` products, then all `lo`: consecutive MMAs are independent.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
unsafe fn step_products(a: [u32; 4], b_base: u32, mut partial: [[f32; 4]; 8]) -> [[f32; 4]; 8] {
    use crate::gpu;
    let mut b = [[0u32; 4]; 8];
    unroll!(tile in [0, 1, 2, 3, 4, 5, 6, 7] {
        b[tile] = gpu::load_shared_u32x4(b_base + tile as u32 * TENSOR_TILE_FRAGMENT_BYTES);
    });
    unroll!(tile in [0, 1, 2, 3, 4, 5, 6, 7] {
        partial[tile] = gpu::mma_m16n8k16_f16_f32(a, [b[tile][0], b[tile][1]], partial[tile]);
    });
    unroll!(tile in [0, 1, 2, 3, 4, 5, 6, 7] {
        partial[tile] = gpu::mma_m16n8k16_f16_f32(a, [b[tile][2], b[tile][3]], partial[tile]);
    });
    partial
}

/// Starts the `cp.async` copies of stage `stage`'s weight fragments (two `k16` steps of the
/// CTA's eight `n8` tiles) to `dst` in shared memory; each thread copies two 16-byte chunks.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
unsafe fn copy_stage_weights(dst: u32, cta_fragments: *const u32, stage: u32, step_words: usize) {
    let tid = crate::gpu::thread_x();
    for step in 0..2u32 {
        for chunk in [tid, tid + TENSOR_CONV_THREADS] {
            let src = (stage * 2 + step) as usize * step_words + chunk as usize * 4;
            crate::gpu::async_copy_16(
                dst + step * TENSOR_STEP_FRAGMENT_BYTES + chunk * 16,
                cta_fragments.add(src),
            );
        }
    }
}

/// Dynamic shared memory of `tensor_conv2d_spikes`: two stages of weights.
pub const TENSOR_SPIKES_SHARED_BYTES: u32 = 2 * TENSOR_B_BYTES;

/// The channel, within a spike-kernel stage of 32, that element `kk` (0..16) of `k16` step
/// `step` carries. Channels are permuted so that each A-fragment register pairs channel `c` (low
/// half, even `kk`) with `c + 16` (high half): mask bits `c` and `c + 16`. The host packs the
/// weights through this same map.
pub const fn spike_stage_channel(step: u32, kk: u32) -> u32 {
    8 * step + kk / 2 + 16 * (kk % 2)
}

/// The A-fragment register for stage channels `shift` and `shift + 16` (see
/// [`spike_stage_channel`]): half-precision 1.0 (`0x3C00`) where the mask bit is set. (The
/// smallest subnormal, bit pattern 1, would save the multiply, but the tensor cores then
/// summed to only about 17 bits: 7.6e-6 of max |out| against 4e-7, H100.)
#[inline(always)]
pub const fn spike_pair(mask: u32, shift: u32) -> u32 {
    ((mask >> shift) & 0x0001_0001) * 0x3C00
}

/// The bits of a pixel's two plane words (`low`: bit 0 of each value, `high`: bit 1) that lane
/// quad `quad` of the integer kernel reads, in one word: the lane's channels are `quad + 4·i`
/// (see [`spike_stage_channel`]), so channel `quad + 4·i` keeps its low bit at `4·i` and its
/// high bit at `4·i + 1`. One word per pixel, as for spikes, keeps the kernel within the spike
/// kernel's registers (two words per pixel cost it a CTA per SM on the H100).
#[inline(always)]
pub const fn integer_lane_bits(low: u32, high: u32, quad: u32) -> u32 {
    ((low >> quad) & 0x1111_1111) | (((high >> quad) & 0x1111_1111) << 1)
}

/// The A-fragment register for the lane's stage channels at `shift` and `shift + 16` of
/// [`integer_lane_bits`], before the subtraction: each half holds `0x6400 | v`, which is half
/// precision's `1024 + v` for `v < 4` (the spacing of halves at 1024 is 1). Subtracting 1024 from
/// both halves (`sub.f16x2`, exact) leaves `v`.
#[inline(always)]
pub const fn integer_pair_biased(bits: u32, shift: u32) -> u32 {
    ((bits >> shift) & 0x0003_0003) | INTEGER_BIAS_PAIR
}

/// Two halves of 1024.0, the bias [`integer_pair_biased`] adds.
pub const INTEGER_BIAS_PAIR: u32 = 0x6400_6400;

/// The largest value a two-plane input may hold.
pub const MAX_PLANE_VALUE: u32 = 3;

/// The kernel's A-fragment registers for `m16` tile `m_tile` and `k16` step `step`, from its
/// pixels' words `now` (mask words, or [`integer_lane_bits`] when `PLANES` is 2; two pixels per
/// `m16` tile, see [`PixelMasks`]).
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
pub(crate) fn stage_fragment<const PLANES: usize, const PIXELS: usize>(
    now: &[u32; PIXELS],
    m_tile: usize,
    step: u32,
) -> [u32; 4] {
    // Columns 2·quad (+ 1) and 2·quad + 8 (+ 1): channels 8·step + quad (+ 4), each with its
    // + 16 twin (the integer words are already shifted by quad).
    let pair = |pixel: usize, offset: u32| {
        if PLANES == 1 {
            spike_pair(now[pixel], 8 * step + crate::gpu::thread_x() % 4 + offset)
        } else {
            let biased = integer_pair_biased(now[pixel], 8 * step + offset);
            crate::gpu::sub_f16x2(biased, INTEGER_BIAS_PAIR)
        }
    };
    let (upper, lower) = (2 * m_tile, 2 * m_tile + 1);
    [
        pair(upper, 0),
        pair(lower, 0),
        pair(upper, 4),
        pair(lower, 4),
    ]
}

/// Entry points of a spike kernel (`$kernel`, this module's or `wgmma_conv`'s): `PLANES` bit
/// planes of the input, 1 for spikes, 2 for small integers (SEW sums); each entry returns at
/// once where the masks' flag says the input is not what they describe (the f32 kernel launched
/// after it computes the output).
macro_rules! spike_conv_entries {
    (
        #[cfg($cfg:meta)] $kernel:ident;
        $($(#[$doc:meta])* $entry:ident => planes $planes:literal;)+
    ) => {
        $(
            $(#[$doc])*
            #[cfg($cfg)]
            #[no_mangle]
            #[allow(clippy::too_many_arguments)]
            pub unsafe extern "ptx-kernel" fn $entry(
                masks: *const u32,
                flags: *const u32,
                fragments: *const u32,
                bias: *const f32,
                has_bias: u32,
                out: *mut f32,
                g: $crate::dense_conv::ConvGeometry,
                scale: f32,
            ) {
                // The input is not what the masks describe: the f32 kernel computes it.
                if *flags != 0 {
                    return;
                }
                $kernel::<$planes>(masks, fragments, bias, has_bias, out, g, scale)
            }
        )+
    };
}

spike_conv_entries! {
    #[cfg(target_arch = "nvptx64")] tensor_conv_spikes;
    /// `out = conv(spikes, weight) + bias` on the tensor cores, the spikes given as the channel
    /// masks of `spike_mask_pack` or `spike_bitmap_masks` (`masks`: `[n][Cin / 32][H·W]`, bit `j` of word `w` is channel `32·w + j`). No input is
    /// gathered or converted: each lane builds its A fragments from the mask words of its four
    /// pixels, so a stage costs four loads and a few integer operations per lane against 64 MMAs
    /// per warp. `fragments` holds the weights in tap-major order (`k = tap · Cin + ci`, see the
    /// host's packing), stages of 32 channels of one tap.
    ///
    /// When the packing pass found a non-binary input (`*flags != 0`), it does nothing: the f32
    /// kernel launched after it computes the output.
    ///
    /// # Safety
    /// `Cin` is a multiple of 32 and `kh · kw · Cin / 32` stages fit `fragments`; the buffers hold
    /// what `g` implies; launch with [`tensor_conv_grid`], [`TENSOR_CONV_THREADS`] threads and
    /// [`TENSOR_SPIKES_SHARED_BYTES`] of dynamic shared memory.
    tensor_conv2d_spikes => planes 1;
    /// [`tensor_conv2d_spikes`] on integers `0..=MAX_PLANE_VALUE` (spikes among them) given as
    /// the two bit planes of `spike_plane_pack` or `spike_bitmap_planes` (`masks`: `[n][Cin /
    /// 32][H·W][2]`, plane 0 then plane 1); it does nothing when some value was out of that
    /// range (`*flags != 0`).
    ///
    /// # Safety
    /// As [`tensor_conv2d_spikes`]; `masks` holds both planes.
    tensor_conv2d_spike_planes => planes 2;
}

/// Packs an input of `Cin` (a multiple of 32) channels into the two bit planes of
/// [`tensor_conv2d_spike_planes`]: thread `idx` of `n · Cin / 32 · hw` reads the 32 channels of
/// one word at one pixel and writes bit 0 of each value to `planes[2 · idx]`, bit 1 to
/// `planes[2 · idx + 1]` (a pixel's planes side by side: one load in the kernel), and raises
/// `*out_of_range` where a value is not an integer in `0..=MAX_PLANE_VALUE`.
///
/// # Safety
/// `input` holds `n · cin · hw` floats, `planes` `2 · n · cin / 32 · hw` u32, `out_of_range`
/// one u32 (zeroed by the host). Launch with `PACK_THREADS` threads and `ceil(total /
/// PACK_THREADS)` blocks.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn spike_plane_pack(
    input: *const f32,
    planes: *mut u32,
    out_of_range: *mut u32,
    n: u32,
    cin: u32,
    hw: u32,
) {
    use crate::gpu;
    let words = cin / 32;
    let total = n * words * hw;
    let idx = gpu::block_x() * crate::sparse_conv::PACK_THREADS + gpu::thread_x();
    let mut outside = false;
    if idx < total {
        let pixel = idx % hw;
        let word = (idx / hw) % words;
        let img = idx / (hw * words);
        let first = input.add(((img * cin + word * 32) * hw + pixel) as usize);
        // All 32 loads are issued before any is tested; the input is read once, first evicted
        // from L2 (as in `spike_mask_pack`).
        let policy = gpu::l2_evict_first_policy();
        let mut v = [0.0f32; 32];
        for (j, v) in v.iter_mut().enumerate() {
            *v = gpu::load_once_f32(first.add(j * hw as usize), policy);
        }
        let (mut low, mut high) = (0u32, 0u32);
        for (j, &v) in v.iter().enumerate() {
            let (value, exact) = plane_value(v);
            low |= (value & 1) << j;
            high |= (value >> 1 & 1) << j;
            outside |= !exact;
        }
        *planes.add(2 * idx as usize) = low;
        *planes.add(2 * idx as usize + 1) = high;
    }
    // Every thread reaches the vote (none returned early), so the warp is complete.
    if gpu::warp_any(outside) && gpu::thread_x() % gpu::WARP_SIZE == 0 {
        gpu::atomic_or_u32(out_of_range, 1);
    }
}

/// `v` as an integer for the bit planes, and whether it is exactly that integer in
/// `0..=MAX_PLANE_VALUE` (else the value returned is meaningless).
#[inline(always)]
pub fn plane_value(v: f32) -> (u32, bool) {
    // `as` saturates: negatives and NaN give 0, which then differs from `v` (but -0.0).
    let value = v as u32;
    (value, value as f32 == v && value <= MAX_PLANE_VALUE)
}

/// The spike kernel: `PLANES` bit planes of mask words, `[n][Cin / 32][H·W][PLANES]`.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
unsafe fn tensor_conv_spikes<const PLANES: usize>(
    masks: *const u32,
    fragments: *const u32,
    bias: *const f32,
    has_bias: u32,
    out: *mut f32,
    g: ConvGeometry,
    scale: f32,
) {
    use crate::gpu;
    let tid = gpu::thread_x();
    let (warp, lane) = (tid / 32, tid % 32);
    let m0 = gpu::block_y() * TENSOR_TILE_M;
    let cout_padded = padded_cout(g.cout);
    let shared = gpu::dynamic_shared_base();
    let pixels = PixelMasks::<4>::new(
        masks,
        &g,
        gpu::block_x() * TENSOR_TILE_P + warp * 32 + lane / 4,
    );

    let words = g.cin / 32;
    let stages = g.kh * g.kw * words;
    let buffer = |stage: u32| shared + (stage % 2) * TENSOR_B_BYTES;
    let cta_fragments = fragments.add(fragment_word(0, m0 / 8, 0, cout_padded));
    let step_words = (cout_padded / 8 * 32) as usize * FRAGMENT_WORDS;
    let load = |r: u32, s: u32, word: u32| {
        let m = pixels.load::<PLANES>(r, s, word);
        if PLANES == 1 {
            return m.map(|planes| planes[0]);
        }
        m.map(|planes| integer_lane_bits(planes[0], planes[PLANES - 1], lane % 4))
    };

    let mut acc = [[[0.0f32; 4]; 8]; 2];
    // The stage's tap row, column and channel word, stepped word-fastest.
    let (mut r, mut s, mut word) = (0u32, 0u32, 0u32);
    let mut now = load(r, s, word);
    copy_stage_weights(buffer(0), cta_fragments, 0, step_words);
    for stage in 0..stages {
        gpu::async_copy_wait_all();
        // This stage's weights are visible, and every warp is done with the other buffer.
        gpu::sync_threads();
        word += 1;
        if word == words {
            word = 0;
            s += 1;
            if s == g.kw {
                s = 0;
                r += 1;
            }
        }
        let next = if stage + 1 < stages {
            copy_stage_weights(buffer(stage + 1), cta_fragments, stage + 1, step_words);
            load(r, s, word)
        } else {
            [0; 4]
        };
        let base = buffer(stage);
        // Fresh partial sums per stage, added in f32 (see `tensor_conv`).
        unroll!(m_tile in [0, 1] {
            let mut partial = [[0.0f32; 4]; 8];
            unroll!(step in [0, 1] {
                let a = stage_fragment::<PLANES, 4>(&now, m_tile, step as u32);
                let b_base = base + step as u32 * TENSOR_STEP_FRAGMENT_BYTES + lane * 16;
                partial = step_products(a, b_base, partial);
            });
            unroll!(tile in [0, 1, 2, 3, 4, 5, 6, 7] {
                unroll!(i in [0, 1, 2, 3] {
                    acc[m_tile][tile][i] += partial[tile][i];
                });
            });
        });
        now = next;
    }
    store_tile(&acc, bias, has_bias, out, &g, scale);
}

/// The output pixels whose A-fragment rows a lane of a spike kernel builds (`PIXELS`, 2 or 4):
/// pixel `i` is row `lane / 4 + 8 · (i % 2)` of the warp's `m16` tile `i / 2`.
#[cfg(target_arch = "nvptx64")]
pub(crate) struct PixelMasks<const PIXELS: usize> {
    masks: *const u32,
    /// Each pixel's window corner (input row and column of tap (0, 0)); far outside the image
    /// for pixels past the batch.
    corner_y: [i32; PIXELS],
    corner_x: [i32; PIXELS],
    /// Each pixel's image's first mask word.
    image: [u32; PIXELS],
    h: u32,
    w: u32,
    dh: u32,
    dw: u32,
}

#[cfg(target_arch = "nvptx64")]
impl<const PIXELS: usize> PixelMasks<PIXELS> {
    /// `first` is pixel 0's index in the batch.
    #[inline(always)]
    pub(crate) unsafe fn new(masks: *const u32, g: &ConvGeometry, first: u32) -> Self {
        let mut this = Self {
            masks,
            corner_y: [i32::MIN / 2; PIXELS],
            corner_x: [0; PIXELS],
            image: [0; PIXELS],
            h: g.h,
            w: g.w,
            dh: g.dh,
            dw: g.dw,
        };
        unroll!(i in [0, 1, 2, 3] {
            let p = first + (i as u32 / 2) * 16 + 8 * (i as u32 % 2);
            if i < PIXELS && p < g.pixels() {
                let (img, oy, ox) = g.pixel(p);
                this.corner_y[i] = (oy * g.sh) as i32 - g.ph as i32;
                this.corner_x[i] = (ox * g.sw) as i32 - g.pw as i32;
                this.image[i] = img * (g.cin / 32) * g.h * g.w;
            }
        });
        this
    }

    /// The mask words of channel word `word` at tap `(r, s)` of the pixels, each pixel's
    /// `PLANES` planes side by side (0 in the padding): one load per pixel.
    #[inline(always)]
    pub(crate) unsafe fn load<const PLANES: usize>(
        &self,
        r: u32,
        s: u32,
        word: u32,
    ) -> [[u32; PLANES]; PIXELS] {
        let mut m = [[0u32; PLANES]; PIXELS];
        let plane_size = self.h * self.w;
        unroll!(i in [0, 1, 2, 3] {
            let iy = self.corner_y[i % PIXELS] + (r * self.dh) as i32;
            let ix = self.corner_x[i % PIXELS] + (s * self.dw) as i32;
            if i < PIXELS && (iy as u32) < self.h && (ix as u32) < self.w {
                let at = self.image[i] + word * plane_size + iy as u32 * self.w + ix as u32;
                let words = self.masks.add(PLANES * at as usize);
                if PLANES == 1 {
                    m[i][0] = crate::gpu::load_nc_u32(words);
                } else {
                    let [low, high] = crate::gpu::load_nc_u32x2(words);
                    m[i][0] = low;
                    m[i][PLANES - 1] = high;
                }
            }
        });
        m
    }
}

/// Writes a CTA's `[M_TILES][8][4]` accumulator fragments per warp (warp `w`'s `m16` tiles
/// are pixels `16 · M_TILES · w` on from the CTA's first, `block_x` tiles of all warps' pixels),
/// divided by `scale` and plus the bias, to the NCHW output (pixels past the batch and channels
/// past `cout` skipped).
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
pub(crate) unsafe fn store_tile<const M_TILES: usize>(
    acc: &[[[f32; 4]; 8]; M_TILES],
    bias: *const f32,
    has_bias: u32,
    out: *mut f32,
    g: &ConvGeometry,
    scale: f32,
) {
    use crate::gpu;
    let warp = gpu::thread_x() / 32;
    // The CTA's tile: its warps' pixels, one after the other.
    let p0 = gpu::block_x() * (gpu::block_dim_x() / 32) * 16 * M_TILES as u32;
    let first = p0 + warp * 16 * M_TILES as u32;
    store_warp_tile(
        acc,
        first,
        gpu::block_y() * TENSOR_TILE_M,
        bias,
        has_bias,
        out,
        g,
        scale,
    )
}

/// Writes one warp's `[M_TILES][8][4]` accumulator fragments (`m16` tile `i` holds pixels
/// `first + 16 · i..`, the `n8` tiles channels `m0..m0 + 64`), divided by `scale` and plus the
/// bias, to the NCHW output (pixels past the batch and channels past `cout` skipped).
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn store_warp_tile<const M_TILES: usize>(
    acc: &[[[f32; 4]; 8]; M_TILES],
    first: u32,
    m0: u32,
    bias: *const f32,
    has_bias: u32,
    out: *mut f32,
    g: &ConvGeometry,
    scale: f32,
) {
    let row_in_tile = crate::gpu::thread_x() % 32 / 4;
    let channels = LaneChannels::new(m0, bias, has_bias, g);
    unroll!(m_tile in [0, 1] {
        if m_tile < M_TILES {
            let pixels = [0, 8].map(|half| {
                let p = first + m_tile as u32 * 16 + row_in_tile + half;
                (p < g.pixels()).then(|| g.pixel(p))
            });
            channels.store(&acc[m_tile], pixels, bias, has_bias, out, g, scale);
        }
    });
}

/// A lane's output channels in a warp's epilogue, `m0 + 8·tile + 2·quad + e`, and their
/// biases where the warp's 64 channels all exist (the common case: one bias load each and no
/// per-channel test).
#[cfg(target_arch = "nvptx64")]
pub(crate) struct LaneChannels {
    first: u32,
    whole: bool,
    biases: [[f32; 2]; 8],
}

#[cfg(target_arch = "nvptx64")]
impl LaneChannels {
    #[inline(always)]
    pub(crate) unsafe fn new(m0: u32, bias: *const f32, has_bias: u32, g: &ConvGeometry) -> Self {
        let first = m0 + 2 * (crate::gpu::thread_x() % 4);
        let whole = m0 + TENSOR_TILE_M <= g.cout;
        let mut biases = [[0.0f32; 2]; 8];
        if whole && has_bias != 0 {
            unroll!(tile in [0, 1, 2, 3, 4, 5, 6, 7] {
                unroll!(e in [0, 1] {
                    biases[tile][e] = *bias.add((first + tile as u32 * 8 + e as u32) as usize);
                });
            });
        }
        Self {
            first,
            whole,
            biases,
        }
    }

    /// Writes one `m16` fragment (`acc[tile][2·half + e]`: pixel `pixels[half]`, channel
    /// `8·tile + e` of the lane's), divided by `scale` and plus the bias, to the NCHW output at
    /// each pixel `(image, row, column)` given (`None`: skipped).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn store(
        &self,
        acc: &[[f32; 4]; 8],
        pixels: [Option<(u32, u32, u32)>; 2],
        bias: *const f32,
        has_bias: u32,
        out: *mut f32,
        g: &ConvGeometry,
        scale: f32,
    ) {
        let unscale = 1.0 / scale;
        let plane_out = g.oh * g.ow;
        unroll!(half in [0, 1] {
            if let Some((img, oy, ox)) = pixels[half] {
                // One pointer stepped eight channels per n8 tile, so few addresses are live.
                let mut at = out.add(((img * g.cout + self.first) * plane_out + oy * g.ow + ox) as usize);
                unroll!(tile in [0, 1, 2, 3, 4, 5, 6, 7] {
                    unroll!(e in [0, 1] {
                        let value = acc[tile][2 * half + e] * unscale;
                        if self.whole {
                            *at.add(e * plane_out as usize) = value + self.biases[tile][e];
                        } else {
                            let co = self.first + tile as u32 * 8 + e as u32;
                            if co < g.cout {
                                let b = if has_bias != 0 { *bias.add(co as usize) } else { 0.0 };
                                *at.add(e * plane_out as usize) = value + b;
                            }
                        }
                    });
                    at = at.add(8 * plane_out as usize);
                });
            }
        });
    }
}

/// [`tensor_conv2d_neuron`]'s epilogue: the CTA's outputs (divided by `scale`, plus the bias,
/// as [`store_tile`] computes them) staged in shared memory `[channel][pixel]`, then the neuron
/// over T for each (position, channel) of the tile, its spikes written as bytes.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
unsafe fn neuron_tile(
    acc: &[[[f32; 4]; 8]; 2],
    bias: *const f32,
    has_bias: u32,
    spikes: *mut u8,
    g: &ConvGeometry,
    scale: f32,
    neuron: &crate::neuron::NeuronParams,
) {
    use crate::gpu;
    use crate::neuron::{charge, fire};
    let tid = gpu::thread_x();
    let (warp, lane) = (tid / 32, tid % 32);
    let (row_in_tile, quad) = (lane / 4, lane % 4);
    let p0 = gpu::block_x() * TENSOR_TILE_P;
    let m0 = gpu::block_y() * TENSOR_TILE_M;
    let unscale = 1.0 / scale;
    let stage = gpu::dynamic_shared_base();
    // Every warp is done with the stage buffers this overwrites.
    gpu::sync_threads();
    unroll!(m_tile in [0, 1] {
        unroll!(half in [0, 1] {
            let pixel = warp * 32 + m_tile as u32 * 16 + row_in_tile + 8 * half as u32;
            unroll!(tile in [0, 1, 2, 3, 4, 5, 6, 7] {
                unroll!(e in [0, 1] {
                    let channel = tile as u32 * 8 + 2 * quad + e as u32;
                    let co = m0 + channel;
                    let b = if has_bias != 0 && co < g.cout { *bias.add(co as usize) } else { 0.0 };
                    let value = acc[m_tile][tile][2 * half + e] * unscale + b;
                    gpu::store_shared_f32(stage + 4 * (channel * NEURON_STAGE_STRIDE + pixel), value);
                });
            });
        });
    });
    gpu::sync_threads();

    let steps = neuron.steps;
    let positions = TENSOR_TILE_P / steps;
    let hard = neuron.hard_reset != 0;
    let v_r = if hard { neuron.v_reset } else { 0.0 };
    let plane_out = g.oh * g.ow;
    let image_step = ((g.n / steps) * g.cout * plane_out) as usize;
    // A thread keeps one position (consecutive threads take consecutive positions: conflict-free
    // shared reads, byte stores to consecutive addresses) and steps over channels; 128 threads
    // cover `128 / positions` = T channels at a time.
    let position = tid % positions;
    let Some((img, oy, ox)) = tile_step_pixel(g, p0 + position, steps) else {
        return;
    };
    // Channel `m0`'s spike at step 0; channel `co`'s is `co − m0` planes on, step t's `t · B`
    // images on.
    let base = ((img * g.cout + m0) * plane_out + oy * g.ow + ox) as usize;
    let mut channel = tid / positions;
    while channel < TENSOR_TILE_M && m0 + channel < g.cout {
        let mut at = base + (channel * plane_out) as usize;
        let row = stage + 4 * (channel * NEURON_STAGE_STRIDE + position);
        let mut v = v_r;
        for t in 0..steps {
            let x = gpu::load_shared_f32(row + 4 * t * positions);
            let h = charge(neuron.mode, v, x, neuron.k, v_r);
            let (spike, next) = fire(h, neuron.v_threshold, hard, v_r);
            v = next;
            *spikes.add(at) = spike as u8;
            at += image_step;
        }
        channel += steps;
    }
}

/// The inputs one output pixel's im2col row reads.
#[cfg(target_arch = "nvptx64")]
struct PixelTaps<const WIDE: bool> {
    /// Where the pixel's window would start in its image (outside it in the padding: only
    /// offsets of taps inside the image are added to it).
    corner: *const f32,
    /// Bit `r · kw + s` set when that tap falls inside the image.
    inside: u64,
    /// The CTA's tap table in shared memory.
    table: u32,
}

#[cfg(target_arch = "nvptx64")]
impl<const WIDE: bool> PixelTaps<WIDE> {
    /// The input of tap `k` (zero in the padding and past `K`).
    #[inline(always)]
    unsafe fn input(&self, k: u32) -> f32 {
        let offset = crate::gpu::load_shared_u32(self.table + 8 * k);
        let tap = crate::gpu::load_shared_u32(self.table + 8 * k + 4);
        self.input_at(offset, tap)
    }

    #[inline(always)]
    unsafe fn input_at(&self, offset: u32, tap: u32) -> f32 {
        let inside = if WIDE {
            (self.inside >> tap) & 1 != 0
        } else {
            self.inside as u32 & tap != 0
        };
        if inside {
            crate::gpu::load_nc_f32(self.corner.add(offset as usize))
        } else {
            0.0
        }
    }

    /// The inputs of taps `k0..k0 + 32`, all loads issued before any is used.
    #[inline(always)]
    unsafe fn load_stage(&self, k0: u32, inputs: &mut [f32; 32]) {
        unroll!(pair in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15] {
            let [o0, t0, o1, t1] =
                crate::gpu::load_shared_u32x4(self.table + 8 * (k0 + 2 * pair as u32));
            inputs[2 * pair] = self.input_at(o0, t0);
            inputs[2 * pair + 1] = self.input_at(o1, t1);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packed layout covers every `(k, co)` of the padded weights exactly once per half
    /// (hi and lo), so a product through it is the whole product.
    #[test]
    fn fragment_layout_covers_every_weight_once() {
        let (k_padded, cout_padded) = (64u32, 128u32);
        let mut seen = vec![0u32; (k_padded * cout_padded) as usize];
        for (word, shift, k, co) in fragment_halves(k_padded, cout_padded) {
            assert!(word % FRAGMENT_WORDS < 2 && shift % 16 == 0 && shift < 32);
            assert!(word + 2 < (k_padded * cout_padded * 2) as usize);
            assert!(k < k_padded && co < cout_padded);
            seen[(k * cout_padded + co) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n == 1));
    }

    /// Each A-fragment register holds mask bits `shift` and `shift + 16` as the halves 1.0 or
    /// 0.0, and the kernel's shifts read, for every lane and register, the
    /// channels `spike_stage_channel` assigns to its columns: each stage channel exactly once.
    #[test]
    fn spike_pairs_follow_the_stage_channel_map() {
        for mask in [0u32, 1, 0x1_0000, 0xFFFF_FFFF, 0xA5A5_5A5A, 0x8000_0001] {
            for shift in 0..16 {
                let word = spike_pair(mask, shift);
                let half = |bit: u32| (mask >> bit & 1) * 0x3C00;
                assert_eq!(word & 0xFFFF, half(shift), "{mask:#x} >> {shift}");
                assert_eq!(word >> 16, half(shift + 16), "{mask:#x} >> {shift}");
            }
        }
        let mut seen = [0; 32];
        for step in 0..2 {
            for quad in 0..4 {
                // Registers 0/1 hold columns 2·quad, 2·quad + 1; registers 2/3 add 8.
                for (column, shift) in [
                    (2 * quad, 8 * step + quad),
                    (2 * quad + 8, 8 * step + quad + 4),
                ] {
                    assert_eq!(spike_stage_channel(step, column), shift);
                    assert_eq!(spike_stage_channel(step, column + 1), shift + 16);
                    seen[shift as usize] += 1;
                    seen[shift as usize + 16] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&n| n == 1));
    }

    /// The two-plane A registers decode, after the kernel's `sub.f16x2` of 1024, to the
    /// integer `low + 2 · high` of the channels `spike_stage_channel` gives each lane (half
    /// precision: exponent 25, so `0x6400 | v` is `1024 + v`).
    #[test]
    fn integer_pairs_decode_to_the_plane_values() {
        let half_value = |bits: u32| {
            let exponent = (bits >> 10 & 0x1F) as i32 - 15;
            (1.0 + (bits & 0x3FF) as f64 / 1024.0) * 2f64.powi(exponent)
        };
        for (low, high) in [
            (0u32, 0u32),
            (u32::MAX, 0),
            (0xA5A5_5A5A, 0x0F0F_F0F0),
            (1, 1 << 16),
        ] {
            for quad in 0..4 {
                let bits = integer_lane_bits(low, high, quad);
                for step in 0..2 {
                    for (offset, column) in [(0, 2 * quad), (4, 2 * quad + 8)] {
                        let word = integer_pair_biased(bits, 8 * step + offset);
                        for (half, kk) in [(word & 0xFFFF, column), (word >> 16, column + 1)] {
                            let c = spike_stage_channel(step, kk);
                            let want = (low >> c & 1) + 2 * (high >> c & 1);
                            assert_eq!(half_value(half) - 1024.0, want as f64, "{low:#x} {c}");
                        }
                    }
                }
            }
        }
        assert_eq!(half_value(INTEGER_BIAS_PAIR & 0xFFFF), 1024.0);
        for (v, want) in [(0.0, Some(0)), (3.0, Some(3)), (-0.0, Some(0)), (4.0, None)] {
            assert_eq!(plane_value(v).1.then_some(plane_value(v).0), want, "{v}");
        }
        for v in [0.5f32, -1.0, f32::NAN, f32::INFINITY] {
            assert!(!plane_value(v).1, "{v}");
        }
    }

    /// The shared stage fits the fallback's f32 copy and keeps `ldmatrix` rows 16-byte aligned.
    #[test]
    fn stage_layout_is_aligned() {
        const {
            assert!(TENSOR_ROW_BYTES & 15 == 0);
            assert!(TENSOR_BUFFER_BYTES >= TENSOR_TILE_P * TENSOR_STAGE_K * 4);
            assert!(TENSOR_B_BYTES == 2 * 8 * 32 * 16);
            // Each thread copies two 16-byte chunks of every step (copy_weights).
            assert!(TENSOR_STEP_FRAGMENT_BYTES == 2 * TENSOR_CONV_THREADS * 16);
            assert!(tensor_conv_shared_bytes(576) & 15 == 0);
            assert!(TENSOR_TILE_P == TENSOR_CONV_THREADS);
        }
        assert_eq!(padded_k(33), 64);
        assert_eq!(padded_cout(65), 128);
    }
}
