//! The tensor-core path of [`SparseConv2d`](super::sparse_conv2d::SparseConv2d): spikes are
//! exact in half precision, so a convolution of spikes runs on the tensor cores with the weights
//! split into two halves each (`w · s = hi + lo`) and keeps fp32 accuracy (see
//! `kernels-gpu/src/tensor_conv.rs`).
//!
//! It does not skip zeros: its time is the dense product's at tensor-core speed, whatever the
//! density. The element gather wins where spikes are rare enough; this path wins on dense-ish
//! spikes (after a max-pool, the stem's Poisson input, a SEW ADD). [`SparseConv2d::tune_cuda`]
//! times both on the layer's input and keeps the faster.
//!
//! [`SparseConv2d::tune_cuda`]: super::sparse_conv2d::SparseConv2d::tune_cuda

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::f16;
use sparseflow_kernels::neuron::NeuronParams;
use sparseflow_kernels::tensor_conv::{
    fragment_halves, padded_cout, padded_k, spike_stage_channel, tensor_conv_grid,
    tensor_conv_shared_bytes, FRAGMENT_WORDS, MAX_TENSOR_TAPS, NARROW_TENSOR_TAPS,
    TENSOR_CONV_THREADS, TENSOR_SPIKES_SHARED_BYTES, TENSOR_TILE_M, TENSOR_TILE_P,
};
use sparseflow_kernels::wgmma_conv::{
    wgmma_conv_grid, wgmma_half, wgmma_int_stage_channel, wgmma_limb_byte,
    wgmma_resident_shared_bytes, wgmma_window_shared_bytes, window_rounds, window_tiles,
    WGMMA_CONV_THREADS, WGMMA_INT_CHUNK_BYTES, WGMMA_INT_SHARED_BYTES, WGMMA_INT_STAGE_CHANNELS,
    WGMMA_RESIDENT_TILE_P, WGMMA_SHARED_BYTES, WINDOW_CONSUMERS, WINDOW_MAX_ROUNDS,
    WINDOW_MAX_STAGES, WINDOW_THREADS,
};

use crate::cuda::{ByValue, CudaBackend, DeviceCache, DeviceTensor};
use crate::error::{Error, Result};
use crate::ops::conv2d::Conv2d;
use crate::ops::sparse_conv2d::SpikeMasks;
use crate::ops::Operator;
use sparseflow_kernels::dense_conv::ConvGeometry;

/// The largest scaled weight: a power of two below half precision's maximum (65504), so that
/// `hi` never overflows.
const SCALED_MAX: f32 = 16384.0;

/// One convolution's weights, laid out for [`tensor_conv_cuda`].
#[derive(Debug)]
pub struct TensorConvWeights {
    /// `w · scale` as `hi + lo` half pairs in `mma` fragment order.
    fragments: CudaSlice<u32>,
    /// The weights of the spike kernels, in the layout of the family this device runs; present
    /// when `Cin` is a multiple of 32 (see [`spike_path_supports`]).
    spike_weights: Option<SpikeWeights>,
    /// `w · scale` in f32, `[padded_cout, K]`, for stages whose input is not exactly half.
    scaled: CudaSlice<f32>,
    bias: Option<CudaSlice<f32>>,
    scale: f32,
}

/// The spike kernels' weights, for one of their three families.
#[derive(Debug)]
enum SpikeWeights {
    /// `w · scale` as half pairs in `mma` fragment order, tap-major (`k = tap · Cin + ci`),
    /// for `tensor_conv2d_spikes` (devices without `wgmma`).
    Mma(CudaSlice<u32>),
    /// The same halves packed by `wgmma_half`, for `wgmma_conv2d_spikes`.
    WgmmaHalves(CudaSlice<u32>),
    /// Integers of at most 2²² in three signed byte limbs packed by `wgmma_limb_byte`, and
    /// their scale, for `wgmma_int_conv2d_spikes` (`resident: None`) or, where a channel tile
    /// fits shared memory, `wgmma_resident_conv2d_spikes` on masks and `wgmma_window_conv2d`
    /// on an unmarked f32 input (`window`, where its windows fit too), in the block shapes
    /// chosen at upload.
    WgmmaLimbs {
        packed: CudaSlice<u32>,
        scale: f32,
        resident: Option<BlockShape>,
        window: Option<BlockShape>,
    },
}

/// A persistent kernel's block for one layer: its threads (three warpgroups where their
/// registers fit, else two), how many such CTAs an SM holds, and their shared memory.
#[derive(Clone, Copy, Debug)]
struct BlockShape {
    threads: u32,
    per_sm: u32,
    shared: u32,
}

/// Hopper's integer kernels compute every spike conv with `Cin` a multiple of 64 whose weights
/// fit shared memory whole (the resident kernel: `Cin · taps` up to 1152) or whose reduction
/// is at least this long (the streaming one, one CTA per SM with 158 registers, whose prologue
/// and epilogue a short reduction does not hide); the half-precision `wgmma` kernel takes the
/// rest. H100, batch 128, 5%, one run each against the half-precision kernel: 3×3 64→64 @56
/// 0.254 → 0.195 ms (resident), 128 @28 0.214 → 0.160 (resident), 256 @14 0.189 → 0.179,
/// 512 @7 0.184 → 0.164 (streaming; at 64 @56 streaming took 0.289).
const LIMBS_FROM_K: usize = 2304;

/// The longest reduction the integer kernels take: their epilogue forms `mid·2⁸ + lo` in s32,
/// and each limb's sum is at most `K · 3 · 128` (inputs up to 3, limbs up to 128 in magnitude),
/// so `K · 3 · 128 · 257 < 2³¹` holds with room to spare (ResNets reach 4608).
const MAX_LIMBS_K: usize = 16384;

impl TensorConvWeights {
    /// The copy in `cache` for `backend`, built from `conv`'s weights and bias when missing or
    /// stale.
    pub(crate) fn cached(
        cache: &DeviceCache<Self>,
        conv: &Conv2d,
        backend: &CudaBackend,
    ) -> Result<std::sync::Arc<Self>> {
        let mut sources = vec![&conv.weight];
        sources.extend(conv.bias.as_ref());
        cache.get(backend, &sources, || Self::upload(conv, backend))
    }

    pub fn upload(conv: &Conv2d, backend: &CudaBackend) -> Result<Self> {
        if !supports(conv) {
            return Err(Error::MissingKernelVariant(format!(
                "tensor_conv2d for {} (grouped)",
                conv.describe()
            )));
        }
        let weight = conv.weight.data();
        let cout = conv.out_channels();
        let k_dim = weight.len() / cout.max(1);
        let scale = weight_scale(weight);
        let mut scaled = vec![0.0f32; padded_cout(cout as u32) as usize * k_dim];
        for (s, w) in scaled.iter_mut().zip(weight) {
            *s = w * scale;
        }
        let stream = backend.stream();
        let (cin, taps) = (
            conv.in_channels(),
            conv.kernel_size().0 * conv.kernel_size().1,
        );
        let mut spike_weights = None;
        if spike_path_supports(conv) {
            // Stage `s` holds channels `32·(s % words)..` of tap `s / words`, permuted within the
            // stage by `spike_stage_channel`; PyTorch's column is `ci · taps + tap`.
            let words = cin / 32;
            let column = |k: usize| {
                let (stage, step, kk) = (k / 32, (k % 32 / 16) as u32, (k % 16) as u32);
                let ci = stage % words * 32 + spike_stage_channel(step, kk) as usize;
                ci * taps + stage / words
            };
            let limbs = cin.is_multiple_of(WGMMA_INT_STAGE_CHANNELS as usize)
                && k_dim <= MAX_LIMBS_K
                && (k_dim >= LIMBS_FROM_K
                    || resident_bytes(conv) <= backend.max_shared_memory_per_block());
            spike_weights = Some(if backend.has_wgmma() && limbs {
                let (packed, scale) = pack_wgmma_limbs(weight, cout, cin, taps);
                SpikeWeights::WgmmaLimbs {
                    packed: stream.clone_htod(&packed)?,
                    scale,
                    resident: block_shape(
                        backend,
                        "wgmma_resident_conv2d_spikes",
                        &[384, 256],
                        resident_bytes(conv),
                    )?,
                    window: match window_shared_bytes(conv) {
                        Some(bytes) => {
                            block_shape(backend, "wgmma_window_conv2d", &[WINDOW_THREADS], bytes)?
                        }
                        None => None,
                    },
                }
            } else if backend.has_wgmma() {
                let packed = pack_wgmma_weights(weight, cout, k_dim, scale, column);
                SpikeWeights::WgmmaHalves(stream.clone_htod(&packed)?)
            } else {
                let packed = pack_fragments(weight, cout, k_dim, scale, column);
                SpikeWeights::Mma(stream.clone_htod(&packed)?)
            });
        }
        Ok(Self {
            fragments: stream.clone_htod(&pack_fragments(weight, cout, k_dim, scale, |k| k))?,
            spike_weights,
            scaled: stream.clone_htod(&scaled)?,
            bias: conv
                .bias
                .as_ref()
                .map(|b| stream.clone_htod(b.data()))
                .transpose()?,
            scale,
        })
    }
}

/// Whether the tensor-core kernel computes `conv` (one group; any kernel, stride, padding and
/// dilation).
pub fn supports(conv: &Conv2d) -> bool {
    conv.groups == 1
}

/// Whether binary inputs of `conv` take the spike kernel (`tensor_conv2d_spikes`): whole words
/// of 32 input channels, more than one tap and at most [`MAX_TENSOR_TAPS`]. A 1×1 conv reads
/// each input once, so the f32 kernel's gather costs no more than the packing pass, which is
/// then pure overhead (and packs every pixel where a stride skips three in four). H100, batch
/// 128, 5%: 1×1 256→64 @56 0.242 ms in the f32 kernel against 0.321 with the spike kernel, 64→128
/// stride 2 0.097 against 0.122; 3×3 256→256 @14 0.274 against 0.207.
pub fn spike_path_supports(conv: &Conv2d) -> bool {
    let (kh, kw) = conv.kernel_size();
    let taps = kh * kw;
    supports(conv)
        && conv.in_channels().is_multiple_of(32)
        && taps > 1
        && taps <= MAX_TENSOR_TAPS as usize
}

/// The power of two that brings the largest weight magnitude to at most [`SCALED_MAX`] (and
/// small weights up, away from half precision's subnormals). 1 for all-zero or non-finite
/// weights.
pub fn weight_scale(weight: &[f32]) -> f32 {
    power_of_two_scale(weight, SCALED_MAX)
}

/// The power of two that brings the largest weight magnitude to at most `limit`; 1 for all-zero
/// or non-finite weights.
fn power_of_two_scale(weight: &[f32], limit: f32) -> f32 {
    let max = weight.iter().fold(0.0f32, |m, w| m.max(w.abs()));
    if max == 0.0 || !max.is_finite() {
        return 1.0;
    }
    let exponent = (limit / max).log2().floor().clamp(-100.0, 100.0);
    let scale = 2f32.powi(exponent as i32);
    if max * scale > limit {
        scale / 2.0
    } else {
        scale
    }
}

/// The half pair `(hi, lo)` with `hi + lo` equal to `v` to 22 bits.
fn split(v: f32) -> (f16, f16) {
    let hi = f16::from_f32(v);
    (hi, f16::from_f32(v - hi.to_f32()))
}

/// The split halves of `weight[co][column(k)] · scale` (`weight` is `[cout, K]`) for any `(k,
/// co)` of the padded product, 0 in the padding: what both packings store.
fn scaled_halves<'a>(
    weight: &'a [f32],
    cout: usize,
    k_dim: usize,
    scale: f32,
    column: impl Fn(usize) -> usize + 'a,
) -> impl Fn(usize, usize) -> (f16, f16) + 'a {
    move |k, co| {
        if k < k_dim && co < cout {
            split(weight[co * k_dim + column(k)] * scale)
        } else {
            (f16::ZERO, f16::ZERO)
        }
    }
}

/// `weight` (`[cout, K]`) times `scale`, split into half pairs and packed in `mma` fragment
/// order (`sparseflow_kernels::tensor_conv::fragment_word`), zero-padded to whole stages and
/// channel tiles; the kernel's reduction index `k` reads weight column `column(k)`.
pub fn pack_fragments(
    weight: &[f32],
    cout: usize,
    k_dim: usize,
    scale: f32,
    column: impl Fn(usize) -> usize,
) -> Vec<u32> {
    let (k_padded, cout_padded) = (padded_k(k_dim as u32), padded_cout(cout as u32));
    let halves = scaled_halves(weight, cout, k_dim, scale, column);
    let mut words = vec![0u32; (k_padded * cout_padded * 2) as usize];
    for (word, shift, k, co) in fragment_halves(k_padded, cout_padded) {
        let (hi, lo) = halves(k as usize, co as usize);
        words[word] |= (hi.to_bits() as u32) << shift;
        words[word + FRAGMENT_WORDS / 2] |= (lo.to_bits() as u32) << shift;
    }
    words
}

/// `weight` (`[cout, K]`) times `scale`, split into half pairs and packed for the `wgmma`
/// kernels (`sparseflow_kernels::wgmma_conv::wgmma_half`, two halves a word), zero-padded as
/// [`pack_fragments`] pads; the kernel's reduction index `k` reads weight column `column(k)`.
pub fn pack_wgmma_weights(
    weight: &[f32],
    cout: usize,
    k_dim: usize,
    scale: f32,
    column: impl Fn(usize) -> usize,
) -> Vec<u32> {
    let (k_padded, cout_padded) = (padded_k(k_dim as u32), padded_cout(cout as u32));
    let split_at = scaled_halves(weight, cout, k_dim, scale, column);
    let mut halves = vec![0u16; (k_padded * cout_padded * 2) as usize];
    for k in 0..k_padded {
        for co in 0..cout_padded {
            let (hi, lo) = split_at(k as usize, co as usize);
            halves[wgmma_half(k, co, 0, cout_padded)] = hi.to_bits();
            halves[wgmma_half(k, co, 1, cout_padded)] = lo.to_bits();
        }
    }
    halves
        .chunks_exact(2)
        .map(|pair| pair[0] as u32 | (pair[1] as u32) << 16)
        .collect()
}

/// The shared memory the resident integer kernel takes to hold a channel tile of `conv`'s
/// weights (`Cin` a multiple of 64; it fits the H100's up to `Cin · taps` = 1152).
fn resident_bytes(conv: &Conv2d) -> usize {
    let (kh, kw) = conv.kernel_size();
    wgmma_resident_shared_bytes(conv.in_channels() as u32, (kh * kw) as u32) as usize
}

/// The shared memory of `wgmma_window_conv2d` for `conv`, or `None` where the kernel does not
/// take it: more stages than its offset table, or windows of more than
/// `WINDOW_MAX_ROUNDS` rounds a tile (strided convs, 1×1 convs of more than 128 channels:
/// H100, batch 128, 5% spikes, one run each, against the resident kernel on packed masks, 3×3
/// 64→128 s2 0.253 against 0.131 ms, 1×1 256→64 0.232 against 0.223).
fn window_shared_bytes(conv: &Conv2d) -> Option<usize> {
    let pair = |(a, b): (usize, usize)| (a as u32, b as u32);
    let (cin, kernel) = (conv.in_channels() as u32, pair(conv.kernel_size()));
    let (stride, dilation) = (pair(conv.stride), pair(conv.dilation));
    if kernel.0 * kernel.1 * cin / WGMMA_INT_STAGE_CHANNELS > WINDOW_MAX_STAGES
        || window_rounds(cin, kernel, stride, dilation) > WINDOW_MAX_ROUNDS
    {
        return None;
    }
    Some(wgmma_window_shared_bytes(cin, kernel, stride, dilation) as usize)
}

/// The block of persistent kernel `entry` on `backend` with `shared` bytes of shared memory:
/// the first of `threads` (multiples of 128) whose registers fit an SM beside it, `None` where
/// none does or the shared memory does not fit.
fn block_shape(
    backend: &CudaBackend,
    entry: &'static str,
    threads: &[u32],
    shared: usize,
) -> Result<Option<BlockShape>> {
    if shared > backend.max_shared_memory_per_block() {
        return Ok(None);
    }
    let function = backend.function_with_shared(entry, shared as u32)?;
    for &threads in threads {
        let per_sm = function
            .occupancy_max_active_blocks_per_multiprocessor(threads, shared, None)
            .map_or(0, |blocks| blocks);
        if per_sm >= 1 {
            return Ok(Some(BlockShape {
                threads,
                per_sm,
                shared: shared as u32,
            }));
        }
    }
    Ok(None)
}

/// The largest scaled weight of the integer kernels: three signed byte limbs hold up to
/// 127 · (2¹⁶ + 2⁸ + 1), so 2²² with room to spare.
const LIMB_SCALED_MAX: f32 = 4_194_304.0;

/// `q` (`|q| <= 2²²`) as balanced base-256 digits `[hi, mid, lo]`, each in `-128..=127`, with
/// `q = hi·2¹⁶ + mid·2⁸ + lo`.
fn balanced_digits(q: i32) -> [i8; 3] {
    let digit = |v: i32| ((v + 128) & 0xFF) - 128;
    let lo = digit(q);
    let mid = digit((q - lo) >> 8);
    let hi = (q - lo - (mid << 8)) >> 16;
    [hi as i8, mid as i8, lo as i8]
}

/// `weight` (`[cout, Cin · taps]`, PyTorch's order) times a power of two that brings its largest
/// magnitude to at most 2²², rounded to integers `q = hi·2¹⁶ + mid·2⁸ + lo` of signed byte
/// limbs and packed for the integer `wgmma` kernels (`wgmma_limb_byte`, four bytes a word),
/// zero-padded to whole 64-channel tiles; with that scale. Stage `s` holds
/// channels `64·(s % (Cin / 64))..` of tap `s / (Cin / 64)`, each word of 32 permuted by
/// `wgmma_int_stage_channel`.
pub fn pack_wgmma_limbs(weight: &[f32], cout: usize, cin: usize, taps: usize) -> (Vec<u32>, f32) {
    let scale = power_of_two_scale(weight, LIMB_SCALED_MAX);
    let k_dim = cin * taps;
    let pairs = cin / WGMMA_INT_STAGE_CHANNELS as usize;
    let cout_padded = padded_cout(cout as u32);
    let stages = taps * pairs;
    let tiles = cout_padded as usize / TENSOR_TILE_M as usize;
    let mut bytes = vec![0u8; stages * tiles * WGMMA_INT_CHUNK_BYTES as usize];
    for k in 0..(stages * WGMMA_INT_STAGE_CHANNELS as usize) as u32 {
        let (stage, step, kk) = (k as usize / 64, k as usize % 64 / 32, k % 32);
        let ci = stage % pairs * 64 + step * 32 + wgmma_int_stage_channel(kk) as usize;
        let column = ci * taps + stage / pairs;
        for co in 0..cout {
            let q = (weight[co * k_dim + column] * scale).round() as i32;
            for (limb, digit) in balanced_digits(q).into_iter().enumerate() {
                bytes[wgmma_limb_byte(k, co as u32, limb as u32, cout_padded)] = digit as u8;
            }
        }
    }
    let words = bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (words, scale)
}

/// A persistent kernel's grid for `g` with `pixel_tiles` tiles, `tiles_per_round` taken by a
/// CTA at a time: one CTA per SM (`per_sm` of them) for each channel tile's share of the SMs,
/// no more CTAs than the pixel tiles keep busy.
fn persistent_grid(
    backend: &CudaBackend,
    g: &ConvGeometry,
    shape: BlockShape,
    pixel_tiles: u32,
    tiles_per_round: u32,
) -> (u32, u32, u32) {
    let channel_tiles = padded_cout(g.cout) / TENSOR_TILE_M;
    let ctas = (backend.multiprocessors() as u32 * shape.per_sm)
        .div_ceil(channel_tiles)
        .min(pixel_tiles.div_ceil(tiles_per_round))
        .max(1);
    (ctas, channel_tiles, 1)
}

/// The dynamic shared memory the f32 tensor-core kernels take for `g`, or an error where no
/// entry computes it (too many taps, or more shared memory than the device has).
fn checked_shared_bytes(conv: &Conv2d, g: &ConvGeometry, backend: &CudaBackend) -> Result<u32> {
    let shared = tensor_conv_shared_bytes(g.k_dim());
    if g.kh * g.kw > MAX_TENSOR_TAPS || shared as usize > backend.max_shared_memory_per_block() {
        return Err(Error::MissingKernelVariant(format!(
            "tensor_conv2d for {}: {} taps, {shared} bytes of shared memory (at most {MAX_TENSOR_TAPS} taps and {} bytes)",
            conv.describe(),
            g.kh * g.kw,
            backend.max_shared_memory_per_block()
        )));
    }
    Ok(shared)
}

/// The convolution of `x` (`[..., Cin, H, W]` on the device) into `out` on the tensor cores.
/// Exact-half inputs (spikes, small integers) take the tensor cores; a stage of 32 taps holding
/// any other value is summed with f32 FMAs instead, so every input is computed to fp32 accuracy.
pub(crate) fn tensor_conv_cuda(
    conv: &Conv2d,
    weights: &TensorConvWeights,
    x: &DeviceTensor,
    out: &mut DeviceTensor,
) -> Result<()> {
    let g = conv.kernel_geometry(x.shape())?;
    out.len_u32()?;
    if g.pixels() == 0 || g.cout == 0 {
        return Ok(());
    }
    let backend = x.backend();
    let shared = checked_shared_bytes(conv, &g, backend)?;
    let stream = backend.stream();
    let has_bias = weights.bias.is_some() as u32;
    // Without a bias the kernel never reads the pointer; any valid one will do.
    let bias = weights.bias.as_ref().unwrap_or(&weights.scaled);
    let geometry = ByValue(g);
    let grid_dim = tensor_conv_grid(&g);

    // Spikes and small integers take a spike kernel on masks: the spike masks or integer bit
    // planes a marking neuron left on `x`, else the bit planes of a packing pass. The kernel
    // returns at once where the masks' flag says some value is not what they describe, and the
    // f32 kernel launched after it then computes the output (it returns at once otherwise).
    // An unmarked input on Hopper's resident layers takes the window kernel instead, which reads
    // the f32 input itself (no packing pass) and raises its own flag.
    let mut only_if = None;
    let packed_masks;
    let window_flag;
    let marked = x
        .spike_masks()
        .filter(|m| m.dims == (g.n, g.cin, g.h * g.w));
    // (Its producer offsets into the input in i32.)
    let window = match (marked, &weights.spike_weights) {
        (
            None,
            Some(SpikeWeights::WgmmaLimbs {
                packed,
                scale,
                window: Some(shape),
                ..
            }),
        ) if x.len() <= i32::MAX as usize => Some((packed, scale, shape)),
        _ => None,
    };
    if let Some((packed, scale, shape)) = window {
        window_flag = stream.alloc_zeros::<u32>(1)?;
        let function = backend.function_with_shared("wgmma_window_conv2d", shape.shared)?;
        let mut launch = stream.launch_builder(&function);
        launch
            .arg(x.slice())
            .arg(&window_flag)
            .arg(packed)
            .arg(bias)
            .arg(&has_bias)
            .arg(out.slice_mut())
            .arg(&geometry)
            .arg(scale);
        // SAFETY: the arguments match `wgmma_window_conv2d`'s signature; the weights are this
        // conv's limbs (Cin a multiple of 64), the sm_90a module is loaded (limbs exist only
        // there), the block and its shared memory come from `block_shape` for this conv (whose
        // stages and rounds `window_shared_bytes` bounded), and the input's offsets fit i32.
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: persistent_grid(backend, &g, *shape, window_tiles(&g), WINDOW_CONSUMERS),
                block_dim: (shape.threads, 1, 1),
                shared_mem_bytes: shape.shared,
            })?
        };
        only_if = Some(&window_flag);
    } else if let Some(spike_weights) = &weights.spike_weights {
        // Fewer mask words than input elements, which the kernels index in u32.
        x.len_u32()?;
        let dims = (g.n, g.cin, g.h * g.w);
        let wgmma = (wgmma_conv_grid(&g), WGMMA_CONV_THREADS);
        // (binary entry, two-plane entry, weights, scale, (grid, threads), shared memory)
        let (binary, integer, packed, spike_scale, (grid, threads), shared_mem_bytes) =
            match spike_weights {
                SpikeWeights::WgmmaLimbs {
                    packed,
                    scale,
                    resident: Some(shape),
                    ..
                } => (
                    "wgmma_resident_conv2d_spikes",
                    "wgmma_resident_conv2d_spike_planes",
                    packed,
                    *scale,
                    (
                        persistent_grid(
                            backend,
                            &g,
                            *shape,
                            g.pixels().div_ceil(WGMMA_RESIDENT_TILE_P),
                            shape.threads / 128,
                        ),
                        shape.threads,
                    ),
                    shape.shared,
                ),
                SpikeWeights::WgmmaLimbs {
                    packed,
                    scale,
                    resident: None,
                    ..
                } => (
                    "wgmma_int_conv2d_spikes",
                    "wgmma_int_conv2d_spike_planes",
                    packed,
                    *scale,
                    wgmma,
                    WGMMA_INT_SHARED_BYTES,
                ),
                SpikeWeights::WgmmaHalves(packed) => (
                    "wgmma_conv2d_spikes",
                    "wgmma_conv2d_spike_planes",
                    packed,
                    weights.scale,
                    wgmma,
                    WGMMA_SHARED_BYTES,
                ),
                SpikeWeights::Mma(packed) => (
                    "tensor_conv2d_spikes",
                    "tensor_conv2d_spike_planes",
                    packed,
                    weights.scale,
                    (grid_dim, TENSOR_CONV_THREADS),
                    TENSOR_SPIKES_SHARED_BYTES,
                ),
            };
        let masks = match marked {
            Some(marked) => marked,
            None => {
                packed_masks = SpikeMasks::pack(x, dims, 2)?;
                &packed_masks
            }
        };
        let entry = if masks.planes == 2 { integer } else { binary };
        let flag = &*masks.non_binary;
        let spikes = backend.function_with_shared(entry, shared_mem_bytes)?;
        let mut launch = stream.launch_builder(&spikes);
        launch
            .arg(&masks.words)
            .arg(flag)
            .arg(packed)
            .arg(bias)
            .arg(&has_bias)
            .arg(out.slice_mut())
            .arg(&geometry)
            .arg(&spike_scale);
        // SAFETY: the arguments match the eight entries' signature; Cin is a multiple of 32 (64
        // for the limbs: the spike weights exist only then), the weights were packed for this
        // conv's taps and channels in the layout of the entry's family (the `wgmma` layouts only
        // with the sm_90a module loaded; the resident kernel's shared memory and block from
        // `resident_shape`), and `masks` holds the planes the entry reads.
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: grid,
                block_dim: (threads, 1, 1),
                shared_mem_bytes,
            })?
        };
        // Masks a neuron marked from its own spikes carry the backend's zero word as their flag:
        // nothing for the f32 kernel to do, and its launch (a full grid that returns at once)
        // costs about 5 µs on the H100.
        if std::sync::Arc::ptr_eq(&masks.non_binary, &backend.zero_word()) {
            return Ok(());
        }
        only_if = Some(flag);
    }

    let entry = if g.kh * g.kw <= NARROW_TENSOR_TAPS {
        "tensor_conv2d"
    } else {
        "tensor_conv2d_wide"
    };
    let function = backend.function_with_shared(entry, shared)?;
    let always = 0u64;
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(x.slice())
        .arg(&weights.fragments)
        .arg(&weights.scaled)
        .arg(bias)
        .arg(&has_bias)
        .arg(out.slice_mut())
        .arg(&geometry)
        .arg(&weights.scale);
    match only_if {
        Some(flag) => launch.arg(flag),
        // A null `only_if`: run.
        None => launch.arg(&always),
    };
    // SAFETY: the arguments match the signature of both entries; the buffers hold what `g` implies
    // (the weights were packed for this conv's `K` and `cout`).
    unsafe {
        launch.launch(LaunchConfig {
            grid_dim,
            block_dim: (TENSOR_CONV_THREADS, 1, 1),
            shared_mem_bytes: shared,
        })?
    };
    // The masks are freed here, in stream order, after the kernels that read them.
    Ok(())
}

/// The convolution of `x` (`[T, B, Cin, H, W]` on the device) on the tensor cores with `neuron`
/// fired over T in the kernel's epilogue, the spikes written as bytes into `spikes` (`[T, B,
/// Cout, OH, OW]`): `tensor_conv2d_neuron`. The spikes equal those of [`tensor_conv_cuda`]'s
/// f32 kernel followed by the neuron kernel, bit for bit. `neuron.steps` must divide 128 and
/// the batch (the caller checks).
pub(crate) fn tensor_conv_neuron_cuda(
    conv: &Conv2d,
    weights: &TensorConvWeights,
    x: &DeviceTensor,
    neuron: NeuronParams,
    spikes: &mut CudaSlice<u8>,
) -> Result<()> {
    let g = conv.kernel_geometry(x.shape())?;
    let outputs = g.pixels() as usize * g.cout as usize;
    if spikes.len() < outputs || neuron.steps == 0 || !TENSOR_TILE_P.is_multiple_of(neuron.steps) {
        return Err(Error::InvalidArgument(format!(
            "tensor_conv2d_neuron for {}: {} spike bytes for {outputs} outputs, T = {}",
            conv.describe(),
            spikes.len(),
            neuron.steps
        )));
    }
    if g.pixels() == 0 || g.cout == 0 {
        return Ok(());
    }
    let backend = x.backend();
    let shared = checked_shared_bytes(conv, &g, backend)?;
    let entry = if g.kh * g.kw <= NARROW_TENSOR_TAPS {
        "tensor_conv2d_neuron"
    } else {
        "tensor_conv2d_wide_neuron"
    };
    let function = backend.function_with_shared(entry, shared)?;
    let has_bias = weights.bias.is_some() as u32;
    let bias = weights.bias.as_ref().unwrap_or(&weights.scaled);
    let (geometry, neuron) = (ByValue(g), ByValue(neuron));
    let mut launch = backend.stream().launch_builder(&function);
    launch
        .arg(x.slice())
        .arg(&weights.fragments)
        .arg(&weights.scaled)
        .arg(bias)
        .arg(&has_bias)
        .arg(spikes)
        .arg(&geometry)
        .arg(&weights.scale)
        .arg(&neuron);
    // SAFETY: the arguments match both entries' signature; the buffers hold what `g` implies
    // (checked above for the spikes), and `steps` divides 128 (checked) and the batch (the
    // caller's contract).
    unsafe {
        launch.launch(LaunchConfig {
            grid_dim: tensor_conv_grid(&g),
            block_dim: (TENSOR_CONV_THREADS, 1, 1),
            shared_mem_bytes: shared,
        })?
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::DeviceTensor;
    use crate::tensor::Tensor;
    use crate::testing::{assert_close_elementwise, gpu_or_skip, random_sparse, random_uniform};

    /// Unpacking the fragments gives back every weight times the scale to 22 bits: the layout
    /// and the split the kernel relies on, checked on the CPU.
    #[test]
    fn packed_fragments_hold_the_scaled_weights() {
        let (cout, k_dim) = (70, 45);
        let weight = random_uniform(&[cout, k_dim], -0.3, 0.3, 11);
        let weight = weight.data();
        let scale = weight_scale(weight);
        let max = weight.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        assert!(max * scale <= SCALED_MAX && max * scale > SCALED_MAX / 2.0);
        let words = pack_fragments(weight, cout, k_dim, scale, |k| k);
        let (k_padded, cout_padded) = (padded_k(k_dim as u32), padded_cout(cout as u32));
        let half_at = |word: u32, shift: u32| f16::from_bits((word >> shift) as u16).to_f32();
        for (word, shift, k, co) in fragment_halves(k_padded, cout_padded) {
            let (k, co) = (k as usize, co as usize);
            let hi = half_at(words[word], shift);
            let lo = half_at(words[word + FRAGMENT_WORDS / 2], shift);
            let want = if k < k_dim && co < cout {
                weight[co * k_dim + k] as f64 * scale as f64
            } else {
                0.0
            };
            let got = hi as f64 + lo as f64;
            assert!(
                (got - want).abs() <= want.abs() * 2f64.powi(-21) + 1e-6,
                "k {k} co {co}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn wgmma_weights_hold_the_scaled_weights_of_their_columns() {
        let (cout, k_dim) = (70, 64);
        let weight = random_uniform(&[cout, k_dim], -0.3, 0.3, 12);
        let weight = weight.data();
        let scale = weight_scale(weight);
        // A column map like the spike kernels' (a permutation of K).
        let column = |k: usize| (k * 5 + 3) % k_dim;
        let halves = pack_wgmma_weights(weight, cout, k_dim, scale, column);
        let (k_padded, cout_padded) = (padded_k(k_dim as u32), padded_cout(cout as u32));
        assert_eq!(halves.len() as u32, k_padded * cout_padded);
        let half =
            |at: usize| f16::from_bits((halves[at / 2] >> (16 * (at % 2))) as u16).to_f32() as f64;
        for k in 0..k_padded {
            for co in 0..cout_padded {
                let got = half(wgmma_half(k, co, 0, cout_padded))
                    + half(wgmma_half(k, co, 1, cout_padded));
                let (k, co) = (k as usize, co as usize);
                let want = if co < cout {
                    weight[co * k_dim + column(k)] as f64 * scale as f64
                } else {
                    0.0
                };
                assert!(
                    (got - want).abs() <= want.abs() * 2f64.powi(-21) + 1e-6,
                    "k {k} co {co}: {got} vs {want}"
                );
            }
        }
    }

    /// Every weight comes back from its limbs to within half a unit of the scaled weight, read
    /// at the kernel's `(k, co)` for its channel and tap.
    #[test]
    fn wgmma_limbs_hold_the_scaled_weights() {
        let (cout, cin, taps) = (72, 128, 9);
        let w = random_uniform(&[cout, cin * taps], -0.3, 0.3, 17);
        let weight = w.data();
        let (words, scale) = pack_wgmma_limbs(weight, cout, cin, taps);
        let max = weight.iter().fold(0.0f32, |m, w| m.max(w.abs()));
        assert!(max * scale <= LIMB_SCALED_MAX && max * scale > LIMB_SCALED_MAX / 2.0);
        let byte = |at: usize| (words[at / 4] >> (8 * (at % 4))) as u8;
        let cout_padded = padded_cout(cout as u32);
        for k in 0..(cin * taps) as u32 {
            let (stage, step, kk) = (k as usize / 64, k as usize % 64 / 32, k % 32);
            let ci = stage % 2 * 64 + step * 32 + wgmma_int_stage_channel(kk) as usize;
            let tap = stage / 2;
            for co in 0..cout_padded {
                let at = |limb| wgmma_limb_byte(k, co, limb, cout_padded);
                let q = (byte(at(0)) as i8 as i64) * 65536
                    + (byte(at(1)) as i8 as i64) * 256
                    + byte(at(2)) as i8 as i64;
                let want = if (co as usize) < cout {
                    weight[co as usize * cin * taps + ci * taps + tap] as f64 * scale as f64
                } else {
                    0.0
                };
                assert!(
                    (q as f64 - want).abs() <= 0.5,
                    "k {k} co {co}: {q} vs {want}"
                );
            }
        }
    }

    #[test]
    fn limb_sums_fit_the_epilogue_s32() {
        let sum = MAX_LIMBS_K as i64 * 3 * 128;
        assert!(sum * 256 + sum < i32::MAX as i64);
        // hi · 2¹⁶ is exact in f32 below 2²⁴ · 2¹⁶.
        assert!(sum < 1 << 24);
    }

    #[test]
    fn window_kernel_takes_the_layers_its_producer_holds() {
        let conv = |cin, k, stride, dilation| {
            Conv2d::new(
                random_uniform(&[64, cin, k, k], -1.0, 1.0, 7),
                None,
                (stride, stride),
                (k / 2 * dilation, k / 2 * dilation),
                (dilation, dilation),
                1,
            )
            .unwrap()
        };
        // 3×3 stride 1 and 1×1 of 64 channels: 7 and 4 rounds of window reading a tile.
        let layer1 = window_shared_bytes(&conv(64, 3, 1, 1)).unwrap();
        assert!(layer1 < 227 * 1024, "{layer1}");
        assert!(window_shared_bytes(&conv(64, 1, 1, 1)).unwrap() < 227 * 1024);
        // Strided, dilated or wider windows: more rounds than the producer holds.
        for (cin, k, stride, dilation) in
            [(64, 3, 2, 1), (64, 1, 2, 1), (64, 3, 1, 2), (256, 1, 1, 1)]
        {
            assert_eq!(
                window_shared_bytes(&conv(cin, k, stride, dilation)),
                None,
                "{cin} ch {k}x{k} s{stride} d{dilation}"
            );
        }
    }

    #[test]
    fn balanced_digits_rebuild_every_limb_value() {
        let max = LIMB_SCALED_MAX as i32;
        for q in [
            0,
            1,
            -1,
            127,
            128,
            -128,
            -129,
            32767,
            65535,
            -65536,
            max,
            -max,
            max - 1,
        ]
        .into_iter()
        .chain((-max..=max).step_by(9973))
        {
            let [hi, mid, lo] = balanced_digits(q);
            assert_eq!(hi as i32 * 65536 + mid as i32 * 256 + lo as i32, q, "{q}");
        }
    }

    #[test]
    fn weight_scale_is_a_power_of_two_in_range() {
        for max in [1e-30f32, 1e-3, 0.7, 1.0, 3.0, 16384.0, 1e30] {
            let s = weight_scale(&[0.1 * max, -max]);
            assert_eq!(s.log2().fract(), 0.0, "{max}");
            assert!(max * s <= SCALED_MAX, "{max}");
        }
        assert_eq!(weight_scale(&[0.0; 4]), 1.0);
    }

    /// The kernels against the CPU dense reference on fresh random inputs: spikes at several
    /// densities (the spike kernel where Cin is a multiple of 32), SEW integers up to 3 (the
    /// integer kernel there) and beyond, and real values (the f32 kernel, with its f32 fallback), for 3×3, strided, 1×1 and 7×7 geometries with
    /// ragged channel and pixel counts; outputs poisoned first and every element checked.
    #[test]
    fn gpu_tensor_conv_matches_cpu() {
        let Some(backend) = gpu_or_skip("gpu_tensor_conv_matches_cpu") else {
            return;
        };
        let mut seed = 0x7E45;
        let mut checked = 0;
        // (N, Cin, Cout, H, W, kernel, stride, padding)
        for &(n, cin, cout, h, w, k, s, p) in &[
            (2, 16, 64, 9, 13, 3, 1, 1),
            (3, 64, 70, 20, 20, 3, 1, 1),
            (1, 70, 130, 17, 11, 3, 2, 1),
            (2, 3, 64, 30, 30, 7, 2, 3),
            (2, 64, 256, 8, 8, 1, 1, 0),
            (2, 128, 64, 9, 9, 1, 2, 0),
            (2, 32, 70, 15, 13, 3, 2, 1),
            (1, 64, 64, 12, 12, 7, 2, 3),
            (1, 5, 3, 1, 1, 3, 1, 1),
            (2, 128, 64, 10, 10, 3, 1, 1),
            // Hopper's integer kernel (K >= LIMBS_FROM_K): an even and an odd stage count.
            (2, 256, 72, 6, 6, 3, 1, 1),
            (1, 320, 64, 5, 7, 3, 2, 1),
            // Enough 64-pixel tiles (784) that each warpgroup of the resident kernel's persistent
            // grid takes several on the H100 (132 CTAs of three).
            (16, 64, 64, 56, 56, 3, 1, 1),
            // The window kernel at stride 2 (17 × 17 windows), ragged 8 × 8 tiles.
            (2, 64, 128, 15, 13, 3, 2, 1),
        ] {
            for &(density, kind) in &[
                (0.0, "binary"),
                (0.05, "binary"),
                (0.5, "binary"),
                (1.0, "binary"),
                (0.3, "integer"),
                (0.9, "integer"),
                (0.3, "integer past 3"),
                (1.0, "real"),
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
                let x = match kind {
                    "real" => random_uniform(&[n, cin, h, w], -2.0, 2.0, seed + 2),
                    _ => random_sparse(&[n, cin, h, w], density, kind != "binary", seed + 2),
                };
                // One 5 among sums of at most 3: past the integer kernel's two bit planes.
                let x = if kind == "integer past 3" {
                    let mut data = x.into_data();
                    let at = seed as usize % data.len();
                    data[at] = 5.0;
                    Tensor::new(vec![n, cin, h, w], data).unwrap()
                } else {
                    x
                };
                let want = conv.forward(&[&x]).unwrap();
                let weights = TensorConvWeights::upload(&conv, &backend).unwrap();
                let dx = DeviceTensor::upload(&backend, &x).unwrap();
                let mut out = DeviceTensor::uninit(&backend, want.shape().to_vec()).unwrap();
                out.fill(f32::NAN).unwrap();
                tensor_conv_cuda(&conv, &weights, &dx, &mut out).unwrap();
                let got = out.download().unwrap();
                assert_close_elementwise(
                    &got,
                    &want,
                    &format!("{n}x{cin}->{cout} {h}x{w} k{k} s{s} {kind} {density}"),
                );
                checked += 1;
            }
        }
        println!(
            "gpu_tensor_conv_matches_cpu: {checked} cases equal on {}",
            backend.name()
        );
    }
}
