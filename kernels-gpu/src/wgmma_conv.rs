//! The spike kernel of [`crate::tensor_conv`] on Hopper's warpgroup MMA (`wgmma`, sm_90a).
//!
//! Same product, same accuracy: spikes (or SEW sums 0–3, as two bit planes) build the A
//! fragments in registers straight from the mask words, and the weights are the same `hi + lo`
//! half pairs. What changes is who reads the weights: `mma.sync` makes every warp load its B
//! fragments from shared memory into registers, `wgmma` has the tensor cores read them from
//! shared memory once per warpgroup of four warps.
//!
//! A CTA is two warpgroups (eight warps) and owns 128 output pixels × 64 output channels, as the
//! `mma.sync` kernel does; warp `w` owns pixels `16·w..16·w + 16` (two per lane). Per stage of
//! 32 channels of one tap (its weights copied three stages ahead) each warpgroup multiplies two
//! `k16` steps of A against the stage's `hi` and `lo` weights (`m64n64k16` each), summed on the
//! tensor cores over [`WGMMA_RUN_STAGES`] stages and then added to the totals in f32.
//!
//! The weights are packed per (stage, 64-channel tile) in the canonical K-major layout without
//! swizzling ([`wgmma_half`]): 8 KB a stage, copied to shared memory by `cp.async`.
//!
//! These entry points exist only in the sm_90a module (`--cfg sparseflow_sm90`), which the host
//! loads on devices of compute capability 9.0.
//!
//! # The integer kernel
//!
//! `wgmma_int_conv2d_spikes` / `_spike_planes` compute the same product exactly: the inputs are
//! bytes (spikes 0/1, SEW sums 0–3, [`int_fragment`] spreads a lane's mask bits into them), the
//! weights are scaled by a power of two to integers of at most 2²² and split into three signed
//! byte limbs ([`wgmma_limb_byte`]), and `m64n64k32.s32.u8.s8` sums each limb's products in
//! s32 over the whole reduction (one `m64n192` over the three limbs side by side made ptxas
//! serialize the MMAs, C7513). Only the
//! final conversion (`hi·2¹⁶ + mid·2⁸ + lo`, times the scale) rounds, so no run-length bound
//! and no f32 additions per stage: a stage is one tap's 64 channels (two `k32` steps), and its
//! MMAs stay in flight while the next stage decodes into a second A register set. 96 registers
//! of accumulators.
//!
//! Two launch shapes: `wgmma_resident_conv2d_spikes` copies a CTA's whole channel tile of
//! weights to shared memory once (where it fits: `Cin · taps` up to 1152) and its three
//! warpgroups then stream 64-pixel tiles with no barrier or copy per stage, one CTA per SM;
//! `wgmma_int_conv2d_spikes` streams the weights stage by stage for longer reductions.
//!
//! # What bounds it, and what was tried (H100, batch 128, 5% spikes)
//!
//! ncu: the tensor pipe is 40% busy and issue slots 58%; the stalls are fixed-latency waits,
//! the CTA barrier and the math pipes of the per-stage decode, not the MMAs. A stage costs a
//! warp ~140 instructions (mask loads, decode, copies, barrier, descriptors) against four MMAs.
//! Against this kernel (256→256 @14: 0.184 ms; 512 @7: 0.183 ms; the `mma.sync` kernel 0.233 /
//! 0.238 ms), each measured in one run:
//! - fresh f32 partial sums every stage (no runs): 0.201 / 0.193 ms;
//! - four warpgroups of 64 pixels sharing each stage's weights: 0.211 / 0.247 (one CTA per SM);
//! - a stage's MMAs left in flight while the next decodes (two A register sets, totals in shared
//!   memory): 0.210 / 0.211;
//! - 128 channels a CTA, the whole reduction accumulated on the tensor cores: 0.161 / 0.174, but
//!   errors of 4e-6 of the largest output at K = 4608 (the truncating accumulation), enough
//!   for the network's spikes to flip at thresholds; with runs of four and the totals in shared
//!   memory 0.194 / 0.221; with one warpgroup a CTA and the totals in registers 0.191 / 0.175
//!   (small spills at 168 registers) — on the network no faster than this kernel.
//!
//! The lever left is the per-stage instruction count: a producer warp issuing the copies (TMA,
//! with an mbarrier instead of the CTA barrier) and A fragments shared across channel tiles.
//!
//! # The integer kernels: what bounds them, and what was tried (stop 20, same shapes)
//!
//! The resident kernel at 3×3 64→64 @56 (ncu): tensor pipe 37% busy, issue slots 52%, 12 warps
//! an SM; the top stall is the fixed-latency wait inside the per-stage decode, then the math
//! pipes and dispatch. A stage costs a warp about 150 instructions (four mask loads and their
//! bounds, the byte spreading of eight A registers, six MMAs and their descriptors), the tile's
//! epilogue about as much as three stages. Measured against it (tensor-core column of
//! `bench-layer`, one run each), and dropped:
//! - the integer kernel streaming weights stage by stage at 64 @56 (what the resident one
//!   replaced there): 0.274–0.289 ms against 0.195–0.201; the half-precision kernel 0.25;
//! - a stream of mask loads continuing across a warpgroup's tiles (each pixel's in-image kernel
//!   rows and columns as bits, one add and bit test per load): 212 registers, and capped at 168
//!   slower (0.214 ms), the instruction count unchanged;
//! - masks one stage ahead instead of two: 0.202 against 0.195 ms (128 @28: 0.158 / 0.160);
//! - one `m64n192k32` per step over the three limbs side by side: ptxas serializes the MMAs
//!   (C7513) whatever the fences and operand order;
//! - an epilogue loop specialised for whole channel tiles (no per-element channel test): the
//!   main loop's allocation at the 168-register cap got worse, 0.194 → 0.206 ms, and the
//!   networks 3.93 → 4.20 ms.
//!
//! # The window kernel (stop 21)
//!
//! `wgmma_window_conv2d` takes an unmarked f32 input on the resident layers whose windows fit
//! its producer (3×3 stride 1, 1×1; 64 channels): no packing pass, no masks. 3×3 64→64 @56,
//! batch 128, 5%, H100: 0.145 ms for the whole tensor-core path against 0.19–0.20 for the
//! packing pass and the resident kernel. Measured on the way, each one run, and dropped:
//! - every warpgroup reading its own next window (one round per stage, loads converted a stage
//!   later): 0.203–0.228 ms, the per-round index arithmetic and exposed load latency;
//! - the producer's reads by `cp.async` into three f32 staging windows (two in flight): 0.203
//!   ms, its shared-memory traffic delays the consumers' A loads;
//! - an L2 prefetch of the window after the next: no faster (0.213 ms in a slower run);
//! - the consumers' epilogue through a staging area in shared memory with 16-byte stores:
//!   0.163–0.183 ms (ptxas spills at 168 registers, one more barrier per tile);
//! - windows stored twice, as pairs of adjacent pixels interleaved four channels at a time (an
//!   even and an odd pairing), so that one 16-byte load gives a lane a whole A step: the stage
//!   loop lost a third of its instructions, but the producer's four stores an item made it the
//!   bound, 0.226 against 0.143 ms (A/B in one run);
//! - the epilogue's biases from a copy in shared memory instead of 16 global loads a tile:
//!   0.140–0.144 ms either way (three A/B rounds in one run).
//!
//! What it waits on now (ncu): the consumers' epilogue and stage loop (~1000 instructions a tile
//! a warp), then the producer (~760 a window); the tensor pipe is ~35% busy.

use crate::tensor_conv::TENSOR_TILE_M;

/// Threads per CTA: two warpgroups, which share each stage's weights.
pub const WGMMA_CONV_THREADS: u32 = 256;
/// Output pixels per CTA: 64 per warpgroup.
pub const WGMMA_TILE_P: u32 = WGMMA_CONV_THREADS / 2;
/// Halves of one stage's weights for one 64-channel tile: two `k16` steps × (`hi`, `lo`) × 16
/// × 64.
pub const WGMMA_CHUNK_HALVES: usize = 2 * 2 * 16 * TENSOR_TILE_M as usize;
/// Bytes of one `k16` step's `hi` (or `lo`) weights: eight core-matrix pairs of 256 bytes.
pub const WGMMA_OPERAND_BYTES: u32 = 16 * TENSOR_TILE_M * 2;
/// Bytes between the two core matrices of a row group along K (the descriptor's leading
/// dimension offset) and between row groups of 8 channels (its stride dimension offset).
pub const WGMMA_LEADING_BYTES: u32 = 128;
pub const WGMMA_STRIDE_BYTES: u32 = 256;
/// Stage buffers of weights in shared memory: while the tensor cores work on one stage, the
/// copies of the next three are in flight (an L2 round trip takes longer than a stage's MMAs).
pub const WGMMA_BUFFERS: u32 = 4;
/// Stages whose products a warpgroup sums on the tensor cores before adding them to its totals
/// in f32. The tensor cores truncate as they accumulate (see `tensor_conv`), so runs stay short;
/// one stage per run spent more issue slots on the f32 additions than on the MMAs' operands.
pub const WGMMA_RUN_STAGES: u32 = 4;
/// 16-byte pieces of a stage's weights each thread copies.
const COPIES_PER_THREAD: u32 = WGMMA_CHUNK_HALVES as u32 * 2 / 16 / WGMMA_CONV_THREADS;
const _: () = assert!(
    COPIES_PER_THREAD == 2,
    "copy_weights copies two pieces a thread"
);

/// Dynamic shared memory per CTA: the stage buffers.
pub const WGMMA_SHARED_BYTES: u32 = WGMMA_BUFFERS * WGMMA_CHUNK_HALVES as u32 * 2;

/// The index, in the packed weights, of the half holding weight `(k, co)` (`lo` 0: its `hi`
/// half; 1: its `lo` half), `k` in the spike kernel's stage order (32 per stage, permuted by
/// [`crate::tensor_conv::spike_stage_channel`] as the host packs them).
///
/// Chunks of [`WGMMA_CHUNK_HALVES`] are `[stage][cout / 64]`; within one, `[step][lo]` operands
/// of [`WGMMA_OPERAND_BYTES`], each `[co / 8][k / 8][co % 8][k % 8]` (8 × 8 core matrices of 16
/// bytes a row).
pub const fn wgmma_half(k: u32, co: u32, lo: u32, cout_padded: u32) -> usize {
    let (stage, step, kk) = (k / 32, k % 32 / 16, k % 16);
    let (tile, c) = (co / TENSOR_TILE_M, co % TENSOR_TILE_M);
    let chunk = stage as usize * (cout_padded / TENSOR_TILE_M) as usize + tile as usize;
    let operand = step * 2 + lo;
    let within = ((operand * 8 + c / 8) * 2 + kk / 8) * 64 + (c % 8) * 8 + kk % 8;
    chunk * WGMMA_CHUNK_HALVES + within as usize
}

/// A shared-memory matrix descriptor of `wgmma` (PTX ISA "Matrix Descriptor Format") for a
/// K-major operand without swizzling: core matrices of 8 rows × 16 bytes at shared address
/// `addr`, `leading` bytes apart along K and `stride` bytes apart along M/N.
pub const fn wgmma_descriptor(addr: u32, leading: u32, stride: u32) -> u64 {
    const fn encode(x: u32) -> u64 {
        ((x & 0x3FFFF) >> 4) as u64
    }
    encode(addr) | encode(leading) << 16 | encode(stride) << 32
}

/// The launch grid: pixel tiles of [`WGMMA_TILE_P`] × output-channel tiles of 64.
pub const fn wgmma_conv_grid(g: &crate::dense_conv::ConvGeometry) -> (u32, u32, u32) {
    (
        g.pixels().div_ceil(WGMMA_TILE_P),
        g.cout.div_ceil(TENSOR_TILE_M),
        1,
    )
}

spike_conv_entries! {
    #[cfg(all(target_arch = "nvptx64", sparseflow_sm90))] wgmma_conv_spikes;
    /// `tensor_conv2d_spikes` on `wgmma`: the same arguments but `weights`, packed by
    /// [`wgmma_half`] (two halves a word, the lower index in the low bits).
    ///
    /// # Safety
    /// As `tensor_conv2d_spikes`; launch with `tensor_conv_grid`, [`WGMMA_CONV_THREADS`] threads
    /// and [`WGMMA_SHARED_BYTES`] of dynamic shared memory, on a device of compute capability 9.0.
    wgmma_conv2d_spikes => planes 1;
    /// `tensor_conv2d_spike_planes` on `wgmma` (see [`wgmma_conv2d_spikes`]).
    ///
    /// # Safety
    /// As [`wgmma_conv2d_spikes`]; `masks` holds both planes.
    wgmma_conv2d_spike_planes => planes 2;
}

#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
#[inline(always)]
unsafe fn wgmma_conv_spikes<const PLANES: usize>(
    masks: *const u32,
    weights: *const u32,
    bias: *const f32,
    has_bias: u32,
    out: *mut f32,
    g: crate::dense_conv::ConvGeometry,
    scale: f32,
) {
    use crate::gpu;
    use crate::tensor_conv::{
        integer_lane_bits, padded_cout, stage_fragment, store_tile, PixelMasks,
    };
    let tid = gpu::thread_x();
    let (warp, lane) = (tid / 32, tid % 32);
    let shared = gpu::dynamic_shared_base();
    let pixels = PixelMasks::<2>::new(
        masks,
        &g,
        gpu::block_x() * WGMMA_TILE_P + warp * 16 + lane / 4,
    );
    let words = g.cin / 32;
    let stages = g.kh * g.kw * words;
    let tiles = padded_cout(g.cout) / TENSOR_TILE_M;
    let chunk_bytes = WGMMA_CHUNK_HALVES as u32 * 2;
    let buffer = |stage: u32| shared + (stage % WGMMA_BUFFERS) * chunk_bytes;
    // Starts the copies of `stage`'s weights (if there is such a stage) and commits them as one
    // group, so that every stage owns exactly one group to wait for.
    let copy_weights = |stage: u32| {
        if stage < stages {
            let chunk = (stage * tiles + gpu::block_y()) as usize * WGMMA_CHUNK_HALVES / 2;
            // The stage's 16-byte pieces, spread over the threads.
            unroll!(i in [0, 1] {
                let piece = tid + i as u32 * WGMMA_CONV_THREADS;
                gpu::async_copy_16(buffer(stage) + piece * 16, weights.add(chunk + piece as usize * 4));
            });
        }
        gpu::async_copy_commit();
    };
    // The masks of a stage are loaded two stages ahead: `(r, s, word)` is the next stage to load,
    // stepped word-fastest.
    let (mut r, mut s, mut word) = (0u32, 0u32, 0u32);
    let mut load_next = || {
        let m = if r < g.kh {
            pixels.load::<PLANES>(r, s, word)
        } else {
            [[0; PLANES]; 2]
        };
        word += 1;
        if word == words {
            word = 0;
            s += 1;
            if s == g.kw {
                s = 0;
                r += 1;
            }
        }
        if PLANES == 1 {
            return m.map(|planes| planes[0]);
        }
        m.map(|planes| integer_lane_bits(planes[0], planes[PLANES - 1], lane % 4))
    };

    let mut acc = [[[0.0f32; 4]; 8]; 1];
    // Overwritten by each run's first MMA: never read before it.
    let mut partial = [0.0f32; 32];
    let mut now = load_next();
    let mut next = load_next();
    // Copies run `WGMMA_BUFFERS - 1` stages ahead: the buffer a copy overwrites held the
    // previous stage, whose MMAs every warpgroup has waited for.
    const AHEAD: u32 = WGMMA_BUFFERS - 1;
    for stage in 0..AHEAD {
        copy_weights(stage);
    }
    // The descriptor of the first buffer's first operand; the others are whole 16-byte units on.
    let descriptor0 = wgmma_descriptor(buffer(0), WGMMA_LEADING_BYTES, WGMMA_STRIDE_BYTES);
    let mut stage = 0;
    // Runs of `WGMMA_RUN_STAGES` stages (nested loops: ptxas serializes the MMAs when `partial`
    // is read in a branch).
    while stage < stages {
        let run_start = stage;
        let run_end = if stage + WGMMA_RUN_STAGES < stages {
            stage + WGMMA_RUN_STAGES
        } else {
            stages
        };
        while stage < run_end {
            gpu::async_copy_wait_pending::<{ AHEAD - 1 }>();
            gpu::fence_proxy_async_shared();
            // This stage's weights are visible to the tensor cores, and no warpgroup still reads
            // the buffer the next copy overwrites.
            gpu::sync_threads();
            copy_weights(stage + AHEAD);
            let after = load_next();
            let a = [
                stage_fragment::<PLANES, 2>(&now, 0, 0),
                stage_fragment::<PLANES, 2>(&now, 0, 1),
            ];
            let buffer_units = (stage % WGMMA_BUFFERS * WGMMA_CHUNK_HALVES as u32 * 2 / 16) as u64;
            gpu::wgmma_fence();
            unroll!(operand in [0, 1, 2, 3] {
                let units = buffer_units + (operand as u32 * WGMMA_OPERAND_BYTES / 16) as u64;
                let accumulate = stage != run_start || operand != 0;
                gpu::wgmma_m64n64k16_f16(&mut partial, a[operand / 2], descriptor0 + units, accumulate);
            });
            gpu::wgmma_commit();
            // The MMAs read the A registers asynchronously, and the next stage rewrites them.
            gpu::wgmma_wait_pending::<0>(&mut partial);
            now = next;
            next = after;
            stage += 1;
        }
        unroll!(tile in [0, 1, 2, 3, 4, 5, 6, 7] {
            unroll!(i in [0, 1, 2, 3] {
                acc[0][tile][i] += partial[4 * tile + i];
            });
        });
    }
    store_tile(&acc, bias, has_bias, out, &g, scale);
}

/// Channels a stage of the integer kernel covers: one tap's 64 channels, two `k32` steps.
pub const WGMMA_INT_STAGE_CHANNELS: u32 = 64;
/// Byte limbs of each scaled weight: `q = hi·2¹⁶ + mid·2⁸ + lo`, each a signed byte (balanced
/// base-256 digits), `|q| <= 2²²`.
pub const WGMMA_LIMBS: u32 = 3;
/// Bytes of one `k32` step of one limb for one 64-channel tile.
pub const WGMMA_INT_OPERAND_BYTES: u32 = 32 * TENSOR_TILE_M;
/// Bytes of one stage's weights for one 64-channel tile: limbs × steps × operand.
pub const WGMMA_INT_CHUNK_BYTES: u32 = WGMMA_LIMBS * 2 * WGMMA_INT_OPERAND_BYTES;
/// Stage buffers of the integer kernel: copies run three stages ahead, and a stage's MMAs may
/// still read its buffer while the next stage's are issued.
pub const WGMMA_INT_BUFFERS: u32 = 5;
/// Dynamic shared memory of the integer kernel: the stage buffers.
pub const WGMMA_INT_SHARED_BYTES: u32 = WGMMA_INT_BUFFERS * WGMMA_INT_CHUNK_BYTES;
/// 16-byte pieces of a stage's weights each thread copies.
const INT_COPIES_PER_THREAD: u32 = WGMMA_INT_CHUNK_BYTES / 16 / WGMMA_CONV_THREADS;
const _: () = assert!(INT_COPIES_PER_THREAD == 3);

/// The channel, within a word of 32, that column `kk` (0..32) of an integer `k32` step
/// carries: lane quad `t` holds columns `4t..4t + 4` and `16 + 4t..16 + 4t + 4` of A, which
/// are then channels `8t..8t + 8`, byte `t` of the mask word.
pub const fn wgmma_int_stage_channel(kk: u32) -> u32 {
    8 * (kk % 16 / 4) + 4 * (kk / 16) + kk % 4
}

/// The byte, in the integer kernel's packed weights, of limb `limb` (0: `hi`, 1: `mid`,
/// 2: `lo`) of weight `(k, co)`, `k` in stage order (64 a stage, column `kk` of step `k / 32 % 2`
/// carrying channel [`wgmma_int_stage_channel`]`(kk)` of that step's word, as the host packs).
///
/// Chunks of [`WGMMA_INT_CHUNK_BYTES`] are `[stage][cout / 64]`; within one, `[step][limb]`
/// operands of [`WGMMA_INT_OPERAND_BYTES`], each `[co / 8][kk / 16][co % 8][kk % 16]` (8 × 16-byte
/// core matrices, the same strides as [`wgmma_half`]'s).
pub const fn wgmma_limb_byte(k: u32, co: u32, limb: u32, cout_padded: u32) -> usize {
    let (stage, step, kk) = (k / 64, k % 64 / 32, k % 32);
    let (tile, c) = (co / TENSOR_TILE_M, co % TENSOR_TILE_M);
    let chunk = stage as usize * (cout_padded / TENSOR_TILE_M) as usize + tile as usize;
    let operand = step * WGMMA_LIMBS + limb;
    let within =
        operand * WGMMA_INT_OPERAND_BYTES + ((c / 8) * 2 + kk / 16) * 128 + (c % 8) * 16 + kk % 16;
    chunk * WGMMA_INT_CHUNK_BYTES as usize + within as usize
}

/// Four bits `b3 b2 b1 b0` spread to the low bit of each byte (`b3·2²⁴ + b2·2¹⁶ + b1·2⁸ + b0`):
/// the shifted copies of `x · 0x204081` land at disjoint bits.
#[inline(always)]
pub const fn spread_nibble(x: u32) -> u32 {
    (x & 0xF).wrapping_mul(0x0020_4081) & 0x0101_0101
}

/// The A register of four consecutive channels from a lane's byte pair `bits` (see
/// [`lane_byte_pair`]): the value of each channel (0–3) in its byte.
#[inline(always)]
pub const fn int_fragment(bits: u32, nibble: u32) -> u32 {
    spread_nibble(bits >> (4 * nibble)) | spread_nibble(bits >> (8 + 4 * nibble)) << 1
}

/// Byte `quad` of a pixel's mask word (bits 0–7) and of its high plane (bits 8–15; 0 for
/// spikes): the eight channels a lane quad's A columns carry.
#[inline(always)]
pub const fn lane_byte_pair(low: u32, high: u32, quad: u32) -> u32 {
    (low >> (8 * quad) & 0xFF) | (high >> (8 * quad) & 0xFF) << 8
}

spike_conv_entries! {
    #[cfg(all(target_arch = "nvptx64", sparseflow_sm90))] wgmma_int_conv;
    /// `tensor_conv2d_spikes` on `wgmma` in exact integer arithmetic: the inputs as bytes, the
    /// weights scaled to 23-bit integers in three byte limbs (packed by [`wgmma_limb_byte`],
    /// four bytes a word), summed over the whole reduction in s32, so the only rounding is the
    /// final conversion. `Cin` a multiple of 64.
    ///
    /// # Safety
    /// As `tensor_conv2d_spikes`; launch with [`wgmma_conv_grid`], [`WGMMA_CONV_THREADS`]
    /// threads and [`WGMMA_INT_SHARED_BYTES`] of dynamic shared memory, on a device of compute
    /// capability 9.0.
    wgmma_int_conv2d_spikes => planes 1;
    /// [`wgmma_int_conv2d_spikes`] on the two bit planes of small integers.
    ///
    /// # Safety
    /// As [`wgmma_int_conv2d_spikes`]; `masks` holds both planes.
    wgmma_int_conv2d_spike_planes => planes 2;
}

/// The lane's mask bits of the integer kernels' stages, in order: `(r, s, pair)` stepped
/// pair-fastest, each stage one tap's two words of 32 channels.
#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
struct StageMasks {
    pixels: crate::tensor_conv::PixelMasks<2>,
    r: u32,
    s: u32,
    pair: u32,
}

#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
impl StageMasks {
    /// The stages of the lane's two pixels (rows `lane / 4` and `+ 8` of the warp's `m16` tile
    /// starting at pixel `first`).
    #[inline(always)]
    unsafe fn new(masks: *const u32, g: &crate::dense_conv::ConvGeometry, first: u32) -> Self {
        let lane = crate::gpu::thread_x() % 32;
        Self {
            pixels: crate::tensor_conv::PixelMasks::<2>::new(masks, g, first + lane / 4),
            r: 0,
            s: 0,
            pair: 0,
        }
    }

    /// The next stage's [`lane_byte_pair`]s, `[pixel][word]` (zeros past the last stage).
    #[inline(always)]
    unsafe fn next<const PLANES: usize>(
        &mut self,
        g: &crate::dense_conv::ConvGeometry,
    ) -> [[u32; 2]; 2] {
        let quad = crate::gpu::thread_x() % 4;
        let mut bits = [[0u32; 2]; 2];
        if self.r < g.kh {
            unroll!(word in [0, 1] {
                let m = self.pixels.load::<PLANES>(self.r, self.s, 2 * self.pair + word as u32);
                unroll!(pixel in [0, 1] {
                    let high = if PLANES == 1 { 0 } else { m[pixel][PLANES - 1] };
                    bits[pixel][word] = lane_byte_pair(m[pixel][0], high, quad);
                });
            });
        }
        self.pair += 1;
        if self.pair == g.cin / WGMMA_INT_STAGE_CHANNELS {
            self.pair = 0;
            self.s += 1;
            if self.s == g.kw {
                self.s = 0;
                self.r += 1;
            }
        }
        bits
    }
}

/// `descriptor` moved `units` 16-byte units on: the address field (the low 14 bits) never
/// carries into the upper word, so a 32-bit add does.
#[inline(always)]
pub const fn descriptor_plus(descriptor: u64, units: u32) -> u64 {
    (descriptor & !0xFFFF_FFFF) | (descriptor as u32).wrapping_add(units) as u64
}

/// One stage of the integer kernels: the A registers of both `k32` steps decoded from the
/// lane's byte pairs `bits` into `a` (rows: pixel 0, pixel 1; columns `4·quad..` then
/// `16 + 4·quad..`), then their six MMAs against the stage's limbs at `descriptor`, committed as
/// one group.
#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
#[inline(always)]
unsafe fn int_stage(
    acc: &mut [[u32; 32]; 3],
    a: &mut [[u32; 4]; 2],
    bits: &[[u32; 2]; 2],
    descriptor: u64,
    accumulate: bool,
) {
    unroll!(word in [0, 1] {
        a[word] = [
            int_fragment(bits[0][word], 0),
            int_fragment(bits[1][word], 0),
            int_fragment(bits[0][word], 1),
            int_fragment(bits[1][word], 1),
        ];
    });
    stage_mmas(acc, a, descriptor, accumulate);
}

/// The six MMAs of one stage of the integer kernels on the A registers `a` of both `k32` steps,
/// against the stage's limbs at `descriptor`, committed as one group.
#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
#[inline(always)]
unsafe fn stage_mmas(
    acc: &mut [[u32; 32]; 3],
    a: &[[u32; 4]; 2],
    descriptor: u64,
    accumulate: bool,
) {
    use crate::gpu;
    gpu::wgmma_fence();
    unroll!(step in [0, 1] {
        let later = accumulate || step != 0;
        unroll!(limb in [0, 1, 2] {
            let units = (step as u32 * WGMMA_LIMBS + limb as u32) * WGMMA_INT_OPERAND_BYTES / 16;
            gpu::wgmma_m64n64k32_u8_s8(&mut acc[limb], a[step], descriptor_plus(descriptor, units), later);
        });
    });
    gpu::wgmma_commit();
}

/// The limbs' sums combined, `hi·2¹⁶ + (mid·2⁸ + lo)` (exact in s32 below the conversion), in
/// the f32 fragment layout `store_tile` writes.
#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
#[inline(always)]
fn limb_totals(acc: &[[u32; 32]; 3]) -> [[[f32; 4]; 8]; 1] {
    let mut total = [[[0.0f32; 4]; 8]; 1];
    unroll!(tile in [0, 1, 2, 3, 4, 5, 6, 7] {
        unroll!(i in [0, 1, 2, 3] {
            let e = 4 * tile + i;
            let low = (acc[1][e] as i32).wrapping_mul(256).wrapping_add(acc[2][e] as i32);
            total[0][tile][i] = (acc[0][e] as i32) as f32 * 65536.0 + low as f32;
        });
    });
    total
}

#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
#[inline(always)]
unsafe fn wgmma_int_conv<const PLANES: usize>(
    masks: *const u32,
    weights: *const u32,
    bias: *const f32,
    has_bias: u32,
    out: *mut f32,
    g: crate::dense_conv::ConvGeometry,
    scale: f32,
) {
    use crate::gpu;
    use crate::tensor_conv::{padded_cout, store_tile};
    let tid = gpu::thread_x();
    let shared = gpu::dynamic_shared_base();
    let first = gpu::block_x() * WGMMA_TILE_P + tid / 32 * 16;
    let mut stage_masks = StageMasks::new(masks, &g, first);
    let stages = g.kh * g.kw * (g.cin / WGMMA_INT_STAGE_CHANNELS);
    let tiles = padded_cout(g.cout) / TENSOR_TILE_M;
    // A buffer is refilled once every warpgroup has waited for the MMAs that read it, which
    // stay in flight one stage longer than the stage: copies run three stages ahead of five
    // buffers.
    const AHEAD: u32 = WGMMA_INT_BUFFERS - 2;
    let buffer = |stage: u32| shared + (stage % WGMMA_INT_BUFFERS) * WGMMA_INT_CHUNK_BYTES;
    let copy_weights = |stage: u32| {
        if stage < stages {
            let chunk =
                (stage * tiles + gpu::block_y()) as usize * (WGMMA_INT_CHUNK_BYTES / 4) as usize;
            unroll!(i in [0, 1, 2] {
                let piece = tid + i as u32 * WGMMA_CONV_THREADS;
                gpu::async_copy_16(buffer(stage) + piece * 16, weights.add(chunk + piece as usize * 4));
            });
        }
        gpu::async_copy_commit();
    };

    let mut acc = [[0u32; 32]; 3];
    let mut a = [[[0u32; 4]; 2]; 2];
    let mut now = stage_masks.next::<PLANES>(&g);
    let mut next = stage_masks.next::<PLANES>(&g);
    for stage in 0..AHEAD {
        copy_weights(stage);
    }
    let descriptor0 = wgmma_descriptor(buffer(0), WGMMA_LEADING_BYTES, WGMMA_STRIDE_BYTES);
    let mut stage = 0;
    while stage < stages {
        // Two stages a turn, so that each A register set is a fixed one.
        unroll!(set in [0, 1] {
            if stage < stages {
                gpu::async_copy_wait_pending::<{ AHEAD - 1 }>();
                gpu::fence_proxy_async_shared();
                gpu::sync_threads();
                copy_weights(stage + AHEAD);
                let after = stage_masks.next::<PLANES>(&g);
                let units = stage % WGMMA_INT_BUFFERS * WGMMA_INT_CHUNK_BYTES / 16;
                let descriptor = descriptor_plus(descriptor0, units);
                int_stage(&mut acc, &mut a[set], &now, descriptor, stage != 0);
                // This stage's MMAs stay in flight while the next decodes into the other register
                // set; the set is rewritten two stages on, after this wait for the stage before.
                gpu::wgmma_wait_pending_3::<1>(&mut acc);
                now = next;
                next = after;
                stage += 1;
            }
        });
    }
    gpu::wgmma_wait_pending_3::<0>(&mut acc);
    store_tile(&limb_totals(&acc), bias, has_bias, out, &g, scale);
}

spike_conv_entries! {
    #[cfg(all(target_arch = "nvptx64", sparseflow_sm90))] wgmma_resident_conv;
    /// [`wgmma_int_conv2d_spikes`] with the CTA's whole channel tile of weights resident in
    /// shared memory (`stages · WGMMA_INT_CHUNK_BYTES`, copied once): persistent CTAs whose
    /// warpgroups each take 64-pixel tiles (`blockIdx.x · groups + group`, striding by the
    /// grid's), with no barrier or copy per stage, so one warpgroup's epilogue overlaps the
    /// others' MMAs.
    ///
    /// # Safety
    /// As [`wgmma_int_conv2d_spikes`]; launch with a multiple of 128 threads, grid `(any, cout
    /// tiles, 1)` and [`wgmma_resident_shared_bytes`] of dynamic shared memory.
    wgmma_resident_conv2d_spikes => planes 1;
    /// [`wgmma_resident_conv2d_spikes`] on the two bit planes of small integers.
    ///
    /// # Safety
    /// As [`wgmma_resident_conv2d_spikes`]; `masks` holds both planes.
    wgmma_resident_conv2d_spike_planes => planes 2;
}

/// Pixels a warpgroup of the resident kernel computes per tile.
pub const WGMMA_RESIDENT_TILE_P: u32 = 64;

/// Dynamic shared memory of the resident kernel: every stage of one channel tile.
pub const fn wgmma_resident_shared_bytes(cin: u32, taps: u32) -> u32 {
    taps * (cin / WGMMA_INT_STAGE_CHANNELS) * WGMMA_INT_CHUNK_BYTES
}

/// Copies every stage of the CTA's channel tile (`block_y`) of limb weights to shared memory at
/// `shared`, once, and makes them visible to the tensor cores.
#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
#[inline(always)]
unsafe fn copy_resident_weights(shared: u32, weights: *const u32, stages: u32, tiles: u32) {
    use crate::gpu;
    let pieces_per_stage = WGMMA_INT_CHUNK_BYTES / 16;
    let mut piece = gpu::thread_x();
    while piece < stages * pieces_per_stage {
        let (stage, within) = (piece / pieces_per_stage, piece % pieces_per_stage);
        let chunk =
            (stage * tiles + gpu::block_y()) as usize * (WGMMA_INT_CHUNK_BYTES / 4) as usize;
        gpu::async_copy_16(
            shared + piece * 16,
            weights.add(chunk + within as usize * 4),
        );
        piece += gpu::block_dim_x();
    }
    gpu::async_copy_commit();
    gpu::async_copy_wait_pending::<0>();
    gpu::fence_proxy_async_shared();
    gpu::sync_threads();
}

#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
#[inline(always)]
unsafe fn wgmma_resident_conv<const PLANES: usize>(
    masks: *const u32,
    weights: *const u32,
    bias: *const f32,
    has_bias: u32,
    out: *mut f32,
    g: crate::dense_conv::ConvGeometry,
    scale: f32,
) {
    use crate::gpu;
    use crate::tensor_conv::{padded_cout, store_warp_tile};
    let tid = gpu::thread_x();
    let threads = gpu::block_dim_x();
    let warp = tid / 32;
    let shared = gpu::dynamic_shared_base();
    let stages = g.kh * g.kw * (g.cin / WGMMA_INT_STAGE_CHANNELS);
    let tiles = padded_cout(g.cout) / TENSOR_TILE_M;
    copy_resident_weights(shared, weights, stages, tiles);

    let descriptor0 = wgmma_descriptor(shared, WGMMA_LEADING_BYTES, WGMMA_STRIDE_BYTES);
    let groups = threads / 128;
    let pixel_tiles = g.pixels().div_ceil(WGMMA_RESIDENT_TILE_P);
    let mut tile = gpu::block_x() * groups + warp / 4;
    let tiles_step = gpu::grid_dim_x() * groups;
    let mut acc = [[0u32; 32]; 3];
    let mut a = [[[0u32; 4]; 2]; 2];
    // Warpgroup-uniform: every warp of a group takes the same tiles.
    while tile < pixel_tiles {
        let first = tile * WGMMA_RESIDENT_TILE_P + warp % 4 * 16;
        let mut stage_masks = StageMasks::new(masks, &g, first);
        let mut now = stage_masks.next::<PLANES>(&g);
        let mut next = stage_masks.next::<PLANES>(&g);
        let mut stage = 0;
        while stage < stages {
            unroll!(set in [0, 1] {
                if stage < stages {
                    let after = stage_masks.next::<PLANES>(&g);
                    let descriptor = descriptor_plus(descriptor0, stage * WGMMA_INT_CHUNK_BYTES / 16);
                    int_stage(&mut acc, &mut a[set], &now, descriptor, stage != 0);
                    gpu::wgmma_wait_pending_3::<1>(&mut acc);
                    now = next;
                    next = after;
                    stage += 1;
                }
            });
        }
        gpu::wgmma_wait_pending_3::<0>(&mut acc);
        let m0 = gpu::block_y() * TENSOR_TILE_M;
        store_warp_tile(
            &limb_totals(&acc),
            first,
            m0,
            bias,
            has_bias,
            out,
            &g,
            scale,
        );
        tile += tiles_step;
    }
}

/// Output rows and columns of the window kernel's tile: 8 × 8 = a warpgroup's 64 pixels.
pub const WINDOW_TILE: u32 = 8;

/// Rows (or columns) of input a window-kernel tile reads: `WINDOW_TILE` outputs `stride` apart,
/// each `kernel` taps `dilation` apart.
pub const fn window_extent(stride: u32, kernel: u32, dilation: u32) -> u32 {
    (WINDOW_TILE - 1) * stride + (kernel - 1) * dilation + 1
}

/// Input pixels a window-kernel tile reads: its window's rows × columns.
pub const fn window_pixels(kernel: (u32, u32), stride: (u32, u32), dilation: (u32, u32)) -> u32 {
    window_extent(stride.0, kernel.0, dilation.0) * window_extent(stride.1, kernel.1, dilation.1)
}

/// Bytes between window pixels in shared memory: `Cin` bytes and 32 more, an odd multiple of
/// 32 (`Cin` a multiple of 64), so that the eight pixels × four lane quads of a warp's 8-byte
/// loads fall on distinct banks in each half-warp.
pub const fn window_pixel_bytes(cin: u32) -> u32 {
    cin + 32
}

/// Shared memory of one window, `[window pixel][channel]` bytes, for `Cin` channels
/// and a kernel of `(rows, columns)` taps at that stride and dilation.
pub const fn window_bytes(
    cin: u32,
    kernel: (u32, u32),
    stride: (u32, u32),
    dilation: (u32, u32),
) -> u32 {
    let pixels = window_pixels(kernel, stride, dilation);
    (pixels * window_pixel_bytes(cin)).next_multiple_of(16)
}

/// The most stages the window kernel's table of stage offsets holds.
pub const WINDOW_MAX_STAGES: u32 = 32;
/// Bytes of that table: a word a stage.
pub const WINDOW_TABLE_BYTES: u32 = 4 * WINDOW_MAX_STAGES;

/// Dynamic shared memory of the window kernel: the resident weights, the table of stage
/// offsets, then two windows for each consumer warpgroup (arguments as [`window_bytes`]).
pub const fn wgmma_window_shared_bytes(
    cin: u32,
    kernel: (u32, u32),
    stride: (u32, u32),
    dilation: (u32, u32),
) -> u32 {
    wgmma_resident_shared_bytes(cin, kernel.0 * kernel.1)
        + WINDOW_TABLE_BYTES
        + 2 * WINDOW_CONSUMERS * window_bytes(cin, kernel, stride, dilation)
}

/// The window kernel's tiles: `WINDOW_TILE²` output blocks of every image.
pub const fn window_tiles(g: &crate::dense_conv::ConvGeometry) -> u32 {
    g.n * g.oh.div_ceil(WINDOW_TILE) * g.ow.div_ceil(WINDOW_TILE)
}

/// The bytes of four input values `v` (each must be an integer in `0..=3`) and the evidence
/// for that test: `(bytes, v + 2²³ as bits OR-ed, (v + 2²³ − 2²³) − v as bits OR-ed)`. Adding
/// 2²³ rounds `v` to an integer in the low mantissa bits, exact for the values that pass:
/// they leave the first OR within `0x4B00_0000..=0x4B00_0003` and the second zero; negative,
/// fractional, large, infinite or NaN inputs do not.
#[inline(always)]
pub fn window_bytes_of(v: [f32; 4]) -> (u32, u32, u32) {
    const SHIFT: f32 = 8_388_608.0;
    let t = v.map(|x| x + SHIFT);
    let mut rounded = 0;
    let mut error = 0;
    let mut i = 0;
    while i < 4 {
        rounded |= t[i].to_bits();
        error |= ((t[i] - SHIFT) - v[i]).to_bits();
        i += 1;
    }
    let bits = t.map(f32::to_bits);
    // The low byte of each: the value.
    let bytes =
        (bits[0] & 0xFF) | (bits[1] & 0xFF) << 8 | (bits[2] & 0xFF) << 16 | (bits[3] & 0xFF) << 24;
    (bytes, rounded, error)
}

/// Whether the evidence OR-ed over [`window_bytes_of`] says every value was in `0..=3`.
#[inline(always)]
pub const fn window_values_in_range(rounded: u32, error: u32) -> bool {
    error == 0 && (rounded == 0 || rounded.wrapping_sub(0x4B00_0000) <= 3)
}

/// Rounds of window reading the producer warpgroup of the window kernel takes per tile: items
/// of eight channels at one window pixel, one per thread a round (128 a round).
pub const fn window_rounds(
    cin: u32,
    kernel: (u32, u32),
    stride: (u32, u32),
    dilation: (u32, u32),
) -> u32 {
    let pixels = window_pixels(kernel, stride, dilation);
    (pixels * (cin / 8)).div_ceil(128)
}

/// The most rounds of window reading the window kernel takes per tile (its producer holds
/// each thread's items, and two windows' values, in registers; with eight, ptxas spills):
/// enough for 3×3 stride-1 and 1×1 convs of 64 channels.
pub const WINDOW_MAX_ROUNDS: u32 = 7;

/// Warpgroups of the window kernel that multiply (the third reads the windows).
pub const WINDOW_CONSUMERS: u32 = 2;
/// Threads of the window kernel: the consumers and the producer.
pub const WINDOW_THREADS: u32 = 128 * (WINDOW_CONSUMERS + 1);
const _: () = assert!(
    WINDOW_CONSUMERS == 2,
    "produce_windows unrolls over two consumers"
);

/// The spike convolution straight from the f32 input, on the resident weights. Two consumer
/// warpgroups take `WINDOW_TILE × WINDOW_TILE` output blocks in turn and multiply as
/// [`wgmma_resident_conv2d_spikes`] does, their A registers loaded as they are from the block's
/// input window in shared memory (bytes `[pixel][channel]`, zeros in the padding: no masks, no
/// decoding, no bounds per tap). The third warpgroup produces the windows: it reads each
/// block's `[Cin, rows, columns]` window of the f32 input (many loads in flight, a round of
/// eight channels a thread at a time) and converts it to bytes, into two buffers per consumer,
/// handed over with named barriers. The input read overlaps the tensor cores and replaces the
/// packing pass over the input.
///
/// Inputs must be integers in `0..=3` (spikes, SEW sums); where one is not, the kernel raises
/// `*out_of_range` and its output is not to be used (the host then runs the f32 kernel).
///
/// # Safety
/// `input` holds `n · Cin · H · W` floats, `Cin` a multiple of 64, at most
/// [`WINDOW_MAX_STAGES`] stages and [`WINDOW_MAX_ROUNDS`] rounds, `weights` the limbs of
/// [`wgmma_limb_byte`] for `g`, `out` `n · cout · OH · OW` floats, `out_of_range` one u32.
/// Launch with [`WINDOW_THREADS`] threads, grid `(any, cout tiles, 1)` and
/// [`wgmma_window_shared_bytes`] of dynamic shared memory, on a device of compute capability
/// 9.0.
#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn wgmma_window_conv2d(
    input: *const f32,
    out_of_range: *mut u32,
    weights: *const u32,
    bias: *const f32,
    has_bias: u32,
    out: *mut f32,
    g: crate::dense_conv::ConvGeometry,
    scale: f32,
) {
    use crate::gpu;
    use crate::tensor_conv::padded_cout;
    let tid = gpu::thread_x();
    let group = tid / 128;
    let shared = gpu::dynamic_shared_base();
    let pairs = g.cin / WGMMA_INT_STAGE_CHANNELS;
    let stages = g.kh * g.kw * pairs;
    let layout = WindowLayout::new(&g);
    // Each stage's byte offset in a window, `(r, s, pair)` stepped pair-fastest: a table, so
    // that no tap counters stay live across the stage loop.
    let offsets = shared + wgmma_resident_shared_bytes(g.cin, g.kh * g.kw);
    if tid < stages {
        let (tap, pair) = (tid / pairs, tid % pairs);
        let (r, s) = (tap / g.kw, tap % g.kw);
        let offset = (r * g.dh * layout.win_w + s * g.dw) * layout.pixel_bytes
            + pair * WGMMA_INT_STAGE_CHANNELS;
        gpu::store_shared_u32(offsets + 4 * tid, offset);
    }
    copy_resident_weights(shared, weights, stages, padded_cout(g.cout) / TENSOR_TILE_M);
    let windows = offsets + WINDOW_TABLE_BYTES;
    // Consumer `c`'s tiles: `block_x · 2 + c`, striding by the grid's consumers.
    let first = gpu::block_x() * WINDOW_CONSUMERS;
    let step = gpu::grid_dim_x() * WINDOW_CONSUMERS;
    if group == WINDOW_CONSUMERS {
        produce_windows(input, out_of_range, &g, &layout, windows, first, step);
    } else {
        consume_windows(
            &g,
            &layout,
            shared,
            offsets,
            windows,
            group,
            first + group,
            step,
            bias,
            has_bias,
            out,
            scale,
        );
    }
}

/// Named barriers of the window kernel's hand-over (0 is the CTA's): buffer `b` of consumer `c`
/// is full (`FULL + 2c + b`) or empty again (`EMPTY + 2c + b`); each joins the producer's 128
/// threads and the consumer's.
#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
const WINDOW_FULL: u32 = 1;
#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
const WINDOW_EMPTY: u32 = 1 + 2 * WINDOW_CONSUMERS;

/// Where the window kernel's windows are: geometry of one window and of the buffers.
#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
struct WindowLayout {
    win_w: u32,
    win_pixels: u32,
    pixel_bytes: u32,
    buffer_bytes: u32,
    tiles: u32,
}

#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
impl WindowLayout {
    #[inline(always)]
    fn new(g: &crate::dense_conv::ConvGeometry) -> Self {
        let win_w = window_extent(g.sw, g.kw, g.dw);
        Self {
            win_w,
            win_pixels: window_pixels((g.kh, g.kw), (g.sh, g.sw), (g.dh, g.dw)),
            pixel_bytes: window_pixel_bytes(g.cin),
            buffer_bytes: window_bytes(g.cin, (g.kh, g.kw), (g.sh, g.sw), (g.dh, g.dw)),
            tiles: window_tiles(g),
        }
    }

    /// Buffer `b` of consumer `c`.
    #[inline(always)]
    fn buffer(&self, windows: u32, c: u32, b: u32) -> u32 {
        windows + (2 * c + b) * self.buffer_bytes
    }
}

/// `(image, first output row, first output column)` of a window-kernel tile.
#[inline(always)]
pub const fn window_tile_origin(g: &crate::dense_conv::ConvGeometry, tile: u32) -> (u32, u32, u32) {
    let (tiles_y, tiles_x) = (g.oh.div_ceil(WINDOW_TILE), g.ow.div_ceil(WINDOW_TILE));
    (
        tile / (tiles_y * tiles_x),
        tile / tiles_x % tiles_y * WINDOW_TILE,
        tile % tiles_x * WINDOW_TILE,
    )
}

/// The producer warpgroup: every consumer's tiles in order (consumer 0's first, consumer 1's
/// first, consumer 0's second, ...), each window read into the buffer its consumer emptied two
/// tiles before. The loads of the next window are issued before the current one is converted,
/// so their latency overlaps the conversion.
#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
#[inline(always)]
unsafe fn produce_windows(
    input: *const f32,
    out_of_range: *mut u32,
    g: &crate::dense_conv::ConvGeometry,
    layout: &WindowLayout,
    windows: u32,
    first: u32,
    step: u32,
) {
    use crate::gpu;
    let items = ProducerItems::new(input, g, layout, first, step);
    let mut in_range = true;
    // Two value sets, so that a turn of two windows loads and converts with no copies.
    let mut values = [items.load(0), [[0.0f32; 8]; WINDOW_MAX_ROUNDS as usize]];
    let mut n = 0;
    while items.tile(n) < layout.tiles {
        unroll!(set in [0, 1] {
            if items.tile(n) < layout.tiles {
                values[1 - set] = items.load(n + 1);
                let (c, k) = (n % 2, n / 2);
                let b = k % 2;
                if k >= 2 {
                    gpu::sync_named(WINDOW_EMPTY + 2 * c + b, 256);
                }
                in_range &= items.convert(&values[set], layout.buffer(windows, c, b));
                gpu::arrive_named(WINDOW_FULL + 2 * c + b, 256);
                n += 1;
            }
        });
    }
    if !in_range {
        gpu::atomic_or_u32(out_of_range, 1);
    }
}

/// A producer thread's items of every window, the same in every tile: round `j`'s item is
/// `thread + 128·j` of `window pixels × Cin / 8`, eight channels at one window pixel (at most
/// [`WINDOW_MAX_ROUNDS`] rounds, the host checks).
#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
struct ProducerItems {
    input: *const f32,
    g: crate::dense_conv::ConvGeometry,
    tiles: u32,
    first: u32,
    step: u32,
    /// Each round's window byte offset | row << 16 | column << 24 (`u32::MAX`: no item).
    places: [u32; WINDOW_MAX_ROUNDS as usize],
    /// Each round's input offset of its first channel from the window's corner.
    sources: [u32; WINDOW_MAX_ROUNDS as usize],
}

/// A window's f32 values as a producer thread loads them: eight channels per round.
#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
type ProducerValues = [[f32; 8]; WINDOW_MAX_ROUNDS as usize];

#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
impl ProducerItems {
    #[inline(always)]
    fn new(
        input: *const f32,
        g: &crate::dense_conv::ConvGeometry,
        layout: &WindowLayout,
        first: u32,
        step: u32,
    ) -> Self {
        let t = crate::gpu::thread_x() % 128;
        let rounds = window_rounds(g.cin, (g.kh, g.kw), (g.sh, g.sw), (g.dh, g.dw));
        let items = layout.win_pixels * (g.cin / 8);
        let mut places = [u32::MAX; WINDOW_MAX_ROUNDS as usize];
        let mut sources = [0u32; WINDOW_MAX_ROUNDS as usize];
        unroll!(j in [0, 1, 2, 3, 4, 5, 6] {
            let item = t + 128 * j as u32;
            let (q, octet) = (item % layout.win_pixels, item / layout.win_pixels);
            if (j as u32) < rounds && item < items {
                let (wy, wx) = (q / layout.win_w, q % layout.win_w);
                places[j] = (q * layout.pixel_bytes + 8 * octet) | wy << 16 | wx << 24;
                sources[j] = 8 * octet * g.h * g.w + wy * g.w + wx;
            }
        });
        Self {
            input,
            g: *g,
            tiles: layout.tiles,
            first,
            step,
            places,
            sources,
        }
    }

    /// The tile of sequence number `n`: consumer `n % 2`'s `n / 2`-th.
    #[inline(always)]
    fn tile(&self, n: u32) -> u32 {
        self.first + n % 2 + n / 2 * self.step
    }

    /// The window corner of tile `tile`: its input row, column and offset in the input.
    #[inline(always)]
    fn corner(&self, tile: u32) -> (i32, i32, i32) {
        let g = &self.g;
        let (img, oy0, ox0) = window_tile_origin(g, tile);
        let iy0 = (oy0 * g.sh) as i32 - g.ph as i32;
        let ix0 = (ox0 * g.sw) as i32 - g.pw as i32;
        (
            iy0,
            ix0,
            (img * g.cin * g.h * g.w) as i32 + iy0 * g.w as i32 + ix0,
        )
    }

    /// The thread's values of window `n` (zeros in the padding and past its items, and for a
    /// tile past the last).
    #[inline(always)]
    unsafe fn load(&self, n: u32) -> ProducerValues {
        let g = &self.g;
        let mut v = [[0.0f32; 8]; WINDOW_MAX_ROUNDS as usize];
        let tile = self.tile(n);
        if tile < self.tiles {
            let plane = (g.h * g.w) as usize;
            let (iy0, ix0, corner) = self.corner(tile);
            unroll!(j in [0, 1, 2, 3, 4, 5, 6] {
                let iy = iy0 + (self.places[j] >> 16 & 0xFF) as i32;
                let ix = ix0 + (self.places[j] >> 24) as i32;
                if self.places[j] != u32::MAX && (iy as u32) < g.h && (ix as u32) < g.w {
                    let at = self.input.add((corner + self.sources[j] as i32) as usize);
                    unroll!(ch in [0, 1, 2, 3, 4, 5, 6, 7] {
                        v[j][ch] = crate::gpu::load_nc_f32(at.add(ch * plane));
                    });
                }
            });
        }
        v
    }

    /// Converts the thread's values `v` of a window to bytes in the window at `window`; whether
    /// every value was in `0..=3`.
    #[inline(always)]
    unsafe fn convert(&self, v: &ProducerValues, window: u32) -> bool {
        let mut in_range = true;
        unroll!(j in [0, 1, 2, 3, 4, 5, 6] {
            if self.places[j] != u32::MAX {
                let v = &v[j];
                let (low, r0, e0) = window_bytes_of([v[0], v[1], v[2], v[3]]);
                let (high, r1, e1) = window_bytes_of([v[4], v[5], v[6], v[7]]);
                in_range &= window_values_in_range(r0 | r1, e0 | e1);
                crate::gpu::store_shared_u32x2(window + (self.places[j] & 0xFFFF), [low, high]);
            }
        });
        in_range
    }
}

/// A consumer warpgroup: its tiles' MMAs on the windows the producer hands over, and their
/// epilogues.
#[cfg(all(target_arch = "nvptx64", sparseflow_sm90))]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn consume_windows(
    g: &crate::dense_conv::ConvGeometry,
    layout: &WindowLayout,
    shared: u32,
    offsets: u32,
    windows: u32,
    c: u32,
    first: u32,
    step: u32,
    bias: *const f32,
    has_bias: u32,
    out: *mut f32,
    scale: f32,
) {
    use crate::gpu;
    use crate::tensor_conv::LaneChannels;
    let (warp, lane) = (gpu::thread_x() / 32 % 4, gpu::thread_x() % 32);
    let stages = g.kh * g.kw * (g.cin / WGMMA_INT_STAGE_CHANNELS);
    let descriptor0 = wgmma_descriptor(shared, WGMMA_LEADING_BYTES, WGMMA_STRIDE_BYTES);
    // The lane's two pixels: rows 2·warp and the next of the tile, column lane / 4; each loads
    // the eight channels `8·quad..` of a 32-channel step (its A columns).
    let (row, column) = (2 * warp, lane / 4);
    let lane_offset =
        (row * g.sh * layout.win_w + column * g.sw) * layout.pixel_bytes + 8 * (lane % 4);
    let next_row = g.sh * layout.win_w * layout.pixel_bytes;
    let mut acc = [[0u32; 32]; 3];
    let mut a = [[[0u32; 4]; 2]; 2];
    let mut k = 0;
    let mut tile = first;
    while tile < layout.tiles {
        let b = k % 2;
        gpu::sync_named(WINDOW_FULL + 2 * c + b, 256);
        let window = layout.buffer(windows, c, b) + lane_offset;
        // The A registers of `stage`: both pixels' bytes of both `k32` steps.
        let load = |stage: u32| {
            let at = window + gpu::load_shared_u32(offsets + 4 * stage);
            let mut regs = [[0u32; 4]; 2];
            unroll!(step in [0, 1] {
                let p0 = gpu::load_shared_u32x2(at + 32 * step as u32);
                let p1 = gpu::load_shared_u32x2(at + next_row + 32 * step as u32);
                regs[step] = [p0[0], p1[0], p0[1], p1[1]];
            });
            regs
        };
        a[0] = load(0);
        let mut stage = 0;
        while stage < stages {
            unroll!(set in [0, 1] {
                if stage < stages {
                    let descriptor = descriptor_plus(descriptor0, stage * WGMMA_INT_CHUNK_BYTES / 16);
                    stage_mmas(&mut acc, &a[set], descriptor, stage != 0);
                    // The stage before, which read the other register set, is done: the next
                    // stage's loads may overwrite it (loading earlier, into registers a
                    // `wgmma` in flight reads, makes ptxas serialize the MMAs).
                    gpu::wgmma_wait_pending_3::<1>(&mut acc);
                    if stage + 1 < stages {
                        a[1 - set] = load(stage + 1);
                    }
                    stage += 1;
                }
            });
        }
        // Every load from the window is done: the producer may refill it (it waits only where
        // it has a tile for it).
        if tile + 2 * step < layout.tiles {
            gpu::arrive_named(WINDOW_EMPTY + 2 * c + b, 256);
        }
        gpu::wgmma_wait_pending_3::<0>(&mut acc);
        let (img, oy0, ox0) = window_tile_origin(g, tile);
        let (oy, ox) = (oy0 + row, ox0 + column);
        let pixels = [0, 1].map(|i| (oy + i < g.oh && ox < g.ow).then_some((img, oy + i, ox)));
        // Biases loaded per tile: held across the loop they take registers the MMAs need.
        let channels = LaneChannels::new(gpu::block_y() * TENSOR_TILE_M, bias, has_bias, g);
        channels.store(&limb_totals(&acc)[0], pixels, bias, has_bias, out, g, scale);
        k += 1;
        tile += step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_layout_is_a_bijection_onto_whole_chunks() {
        let (k_padded, cout_padded) = (96u32, 128u32);
        let total = (k_padded * cout_padded * 2) as usize;
        let mut seen = vec![false; total];
        for k in 0..k_padded {
            for co in 0..cout_padded {
                for lo in 0..2 {
                    let at = wgmma_half(k, co, lo, cout_padded);
                    assert!(at < total && !seen[at], "({k}, {co}, {lo}) -> {at}");
                    seen[at] = true;
                }
            }
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn core_matrices_follow_the_descriptor_strides() {
        // Row `co % 8` of a core matrix is 16 bytes on from the row before; the second k8 half
        // is WGMMA_LEADING_BYTES on, the next 8 channels WGMMA_STRIDE_BYTES on.
        let at = |k, co, lo| wgmma_half(k, co, lo, 64) * 2;
        assert_eq!(at(0, 1, 0) - at(0, 0, 0), 16);
        assert_eq!(at(1, 0, 0) - at(0, 0, 0), 2);
        assert_eq!(at(8, 0, 0) - at(0, 0, 0), WGMMA_LEADING_BYTES as usize);
        assert_eq!(at(0, 8, 0) - at(0, 0, 0), WGMMA_STRIDE_BYTES as usize);
        assert_eq!(at(0, 0, 1) - at(0, 0, 0), WGMMA_OPERAND_BYTES as usize);
        assert_eq!(at(16, 0, 0) - at(0, 0, 0), 2 * WGMMA_OPERAND_BYTES as usize);
        assert_eq!(
            at(32, 0, 0) - at(0, 0, 0),
            (WGMMA_SHARED_BYTES / WGMMA_BUFFERS) as usize
        );
    }

    #[test]
    fn limb_layout_is_a_bijection_onto_whole_chunks() {
        let (k_padded, cout_padded) = (192u32, 128u32);
        let total = (k_padded * cout_padded * WGMMA_LIMBS) as usize;
        let mut seen = vec![false; total];
        for k in 0..k_padded {
            for co in 0..cout_padded {
                for limb in 0..WGMMA_LIMBS {
                    let at = wgmma_limb_byte(k, co, limb, cout_padded);
                    assert!(at < total && !seen[at], "({k}, {co}, {limb}) -> {at}");
                    seen[at] = true;
                }
            }
        }
        assert!(seen.iter().all(|&s| s));
        // Rows 16 bytes apart, the second k16 half LBO on, the next 8 channels SBO on.
        let at = |k, co| wgmma_limb_byte(k, co, 0, 64);
        assert_eq!(at(0, 1) - at(0, 0), 16);
        assert_eq!(at(16, 0) - at(0, 0), WGMMA_LEADING_BYTES as usize);
        assert_eq!(at(0, 8) - at(0, 0), WGMMA_STRIDE_BYTES as usize);
    }

    #[test]
    fn lane_quads_read_their_channels_as_bytes() {
        // Spikes on channels c of a word, or integer values v(c) = low bit + 2 · high bit.
        let low = 0xA5C3_0F96u32;
        let high = 0x3C5A_F00Fu32;
        for quad in 0..4 {
            let bits = lane_byte_pair(low, high, quad);
            for nibble in 0..2 {
                let reg = int_fragment(bits, nibble);
                for byte in 0..4 {
                    // Column 4·quad + byte (nibble 0) or 16 + 4·quad + byte (nibble 1).
                    let kk = 16 * nibble + 4 * quad + byte;
                    let c = wgmma_int_stage_channel(kk);
                    let want = (low >> c & 1) + 2 * (high >> c & 1);
                    assert_eq!(reg >> (8 * byte) & 0xFF, want, "quad {quad} kk {kk}");
                }
            }
        }
        // A permutation of the word's channels.
        let mut seen = [false; 32];
        for kk in 0..32 {
            seen[wgmma_int_stage_channel(kk) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn window_bytes_hold_values_up_to_three_and_reject_the_rest() {
        let (bytes, rounded, error) = window_bytes_of([0.0, 1.0, 2.0, 3.0]);
        assert_eq!(bytes, 0x0302_0100);
        assert!(window_values_in_range(rounded, error));
        let (bytes, rounded, error) = window_bytes_of([-0.0, 0.0, 1.0, 0.0]);
        assert_eq!(bytes, 0x0001_0000);
        assert!(window_values_in_range(rounded, error));
        // Nothing read (a window entirely in the padding).
        assert!(window_values_in_range(0, 0));
        for bad in [
            4.0,
            5.0,
            255.0,
            256.0,
            -1.0,
            -0.25,
            0.5,
            1.5,
            2.999,
            -1e-30,
            1e-45,
            -1e-45,
            1e9,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ] {
            let (_, rounded, error) = window_bytes_of([1.0, bad, 0.0, 3.0]);
            assert!(!window_values_in_range(rounded, error), "{bad} passed");
        }
    }

    #[test]
    fn window_extents_cover_every_tap_of_a_tile() {
        // 3 × 3 at stride 1: 10 rows; at stride 2: 17; 1 × 1: 8; dilation 2: 12.
        assert_eq!(window_extent(1, 3, 1), 10);
        assert_eq!(window_extent(2, 3, 1), 17);
        assert_eq!(window_extent(1, 1, 1), 8);
        assert_eq!(window_extent(1, 3, 2), 12);
        // Odd multiples of 32 bytes between pixels.
        for cin in [64, 128, 192, 256, 512] {
            assert_eq!(window_pixel_bytes(cin) % 64, 32);
        }
        assert_eq!(window_bytes(64, (3, 3), (1, 1), (1, 1)), 100 * 96);
    }

    #[test]
    fn descriptor_plus_moves_the_address_only() {
        let d = wgmma_descriptor(0x1000, 128, 256);
        let moved = descriptor_plus(d, WGMMA_INT_CHUNK_BYTES * 17 / 16);
        assert_eq!(
            moved,
            wgmma_descriptor(0x1000 + WGMMA_INT_CHUNK_BYTES * 17, 128, 256)
        );
    }

    #[test]
    fn descriptor_fields_sit_where_ptx_reads_them() {
        // Address bits 4..18 at 0, leading offset at 16, stride offset at 32, no swizzle.
        let d = wgmma_descriptor(0x1_2340, 128, 256);
        assert_eq!(d & 0x3FFF, 0x1234);
        assert_eq!(d >> 16 & 0x3FFF, 8);
        assert_eq!(d >> 32 & 0x3FFF, 16);
        assert_eq!(d >> 62, 0);
    }
}
