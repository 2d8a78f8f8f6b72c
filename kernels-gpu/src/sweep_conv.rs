//! The column sweep: the sparse 3×3 convolution (stride 1, padding 1) of up to 64 input and 64
//! output channels, ResNet's first stage at 56×56, where spikes are sparsest.
//!
//! The element gather ([`crate::sparse_conv`]) lists every output pixel's active (tap, channel)
//! pairs, so each non-zero input is found nine times, and its tiles fetch most of the 147 KB of
//! weights from L2. Here each non-zero input is found once and applied to every output it
//! feeds, with the weights in shared memory:
//!
//! - One CTA per multiprocessor copies the weights `[tap][64 channels][64 outputs]` (147 KB,
//!   rows past `Cin` zero) into shared memory once, by asynchronous copies (every piece of a
//!   thread in flight at once), then its warps take work items independently: no barrier after
//!   the copy. In the sm_90a module the kernel is launched as a programmatic dependent of the
//!   packing pass (`griddepcontrol`): its CTAs copy the weights while that pass's last CTAs
//!   run, and wait for the pass only before reading the masks.
//! - A work item is a column of [`SWEEP_PIXELS`] output pixels over a strip of output rows of
//!   one image. Its warp walks the input rows from one above the strip to one below. Twenty
//!   lanes load the row's channel masks (from `spike_mask_pack`, or from a marking neuron's
//!   bitmap): two words for each of the ten input pixels (the eight, and one either side), two
//!   rows ahead (the next item's first two rows load while this item's last two are swept). A
//!   vote finds the non-zero words; the ten pixels are then visited in a fixed order, each
//!   skipped by a warp-uniform test of the vote, and a visited pixel's two words are broadcast
//!   to code compiled for that pixel, whose loop over the set bits (warp-uniform, no
//!   divergence) adds each channel's weight rows to up to nine accumulators: three output rows
//!   (input row `iy` feeds rows `iy − 1 ..= iy + 1`) of eight pixels, each lane two output
//!   channels, 48 floats in registers. When an input row is done, output row `iy − 1` is
//!   complete: lanes `2j, 2j + 1` swap halves so that each holds 16 bytes of one channel's
//!   32-byte run.
//! - Where the map is 41 to 56 pixels wide ([`sweep_stage_groups`]), a CTA's warps form two
//!   groups of one warp per column and one storing warp, and a group takes whole row bands
//!   (every column of a strip). A column warp writes each finished row segment into its
//!   group's staging row (two slots) and arrives at the slot's named barrier without waiting;
//!   the storing warp waits there and stores the whole row, all 64 channels, with one
//!   `cp.async.bulk.tensor` through a tensor map of the output (sm_90; ordinary 16-byte stores
//!   of contiguous runs in the generic module), then frees the slot. The output stores so
//!   leave the load/store unit, where an 8-pixel column's store instruction touches 16 lines.
//!   Narrower or wider maps store each warp's 32-byte runs itself.
//!
//! Any float input is exact: when some non-zero is not 1 (SEW's integers) each is read back and
//! multiplied; binary spikes add.
//!
//! # What bounds it (H100, 3×3 64→64 @56, batch 128, 1% spikes, ncu)
//!
//! The packing pass reads the f32 input at 80% of DRAM bandwidth (40 µs); the sweep (72 µs at
//! ncu's clocks) is bound by the L1/shared-memory pipe (79%): each (input, tap) reads its
//! 64-channel weight row (256 bytes, two shared-memory wavefronts), and each stored output row
//! touches 64 channel rows of 32 bytes. Issue is 51% busy. Whole layer 0.115–0.122 ms against
//! the gather's 0.148 at stop 23; stop 24's asynchronous weight copy (0.118–0.121 → 0.112–0.114
//! ms, one A/B call) and programmatic launch (0.113–0.115 → 0.109–0.113) brought it to
//! 0.109–0.113 ms. Without stores at all (a timing probe) it ran 0.104–0.107 ms. Measured
//! against it and dropped:
//! - loading the f32 input in the sweep (lane = channel, a vote per pixel), no packing pass:
//!   0.188 ms, each load instruction touching 32 cache lines;
//! - packing inside the kernel, by four to eight warps of each CTA while the others sweep in
//!   image order: with a fence and a count per image, 0.20–0.24 ms (the fences wait behind
//!   the sweep's stores); with each mask word tagged by the launch in one 8-byte store and the
//!   sweeping warps helping to pack while they wait, 0.135–0.145 ms;
//! - 768 threads (80 registers, spilling): 0.13 against 0.123 ms;
//! - skipping the taps whose output row lies outside the strip (a fifth of them at 8-row
//!   strips, each tap guarded by a warp-uniform predicate): 0.119–0.123 against 0.113–0.117 ms;
//! - (stop 24) the batch in two to eight chunks, each chunk's packing pass on one stream
//!   overlapping the previous chunk's sweep on a second, higher-priority one (the sweep at 96
//!   registers so that packing CTAs fit beside it): 0.120–0.127 ms at two chunks, 0.139–0.147
//!   at four, against 0.113–0.118 (each chunk pays a launch, the weights' copy and a tail);
//! - (stop 24) one CTA per image packing its own masks into shared memory (a flag per row,
//!   released by the packing warps, polled with acquire loads and `nanosleep` by the sweeping
//!   ones, which join the sweep when packing is done): with 4 packing warps 0.134–0.140 ms
//!   (packing alone 70 µs: four warps keep 28 KB of loads in flight, a tenth of what the
//!   packing pass's 64 warps do), 8–12 warps 0.119–0.123 against 0.117–0.122; staging each row
//!   with `cp.async` instead (the weights leave room for four 14 KB rows), 0.177 ms with two
//!   packing warps, 0.316 with one: the copies' issue and the conversion bound one warp at
//!   5 µs a row;
//! - (stop 24) storing each finished row segment through shared memory with the tensor memory
//!   accelerator (`cp.async.bulk.tensor.4d`, box `[8 pixels, 1 row, 64 channels, 1 image]`
//!   from a staging row per warp, bank-conflict-free writes): 0.114–0.119 ms with one staging
//!   row a warp, 0.120–0.121 with two, against 0.110–0.114 in the same calls; the 32 to 64 KB
//!   of staging also shrink L1;
//! - (stop 24) the row loop unrolled three times so that the accumulator rows rotate by name
//!   instead of by moves (ncu: moves are a sixth of the sweep's instructions, the
//!   `acc = [acc[1], acc[2], bias]` at every row): 0.207 ms against 0.110–0.113, the tripled
//!   row code (the jump table's twenty arms each way) no longer fitting the instruction cache;
//!   with one copy instead, the rows staying in place and each taking its kernel row's weights
//!   through an offset rotated every row (`taps[r]`, three additions an input instead of the
//!   moves): 0.123–0.126 ms against 0.114–0.116 (register-offset addressing, and the row's
//!   store and reset chosen per row).
//! - (stop 25) the packing pass overlapped with the sweep, its masks written as 8-byte words
//!   tagged with a launch number (so that a sweeping warp reads each word as it lands, polling
//!   rows not yet packed, and nothing is cleared between launches) and work items taken from a
//!   counter: (a) as a separate persistent packing kernel on a few multiprocessors, the sweep
//!   its programmatic dependent on the rest: 0.32 / 0.25 / 0.19 / 0.16 / 0.15 ms at 12 / 16 /
//!   22 / 28 / 36 packing multiprocessors against 0.1155 apart, because one multiprocessor's
//!   loads fetch only 20–28 GB/s (the input needs all of them to stream at DRAM speed); (b)
//!   inside each sweep CTA, its last one to four warps copying 32-channel, 1–4-row units into
//!   the 64 KB the weights leave free with the bulk-copy engine (two buffers a warp), four
//!   pixels a lane converted: 0.20–0.24 ms with one packing warp, 0.129–0.151 with two, 0.131
//!   with four (one-row units), against 0.110–0.113 in the same calls. ncu (two warps): 43.9 M
//!   instructions against 35 M for the two kernels apart, the sweeping warps' third stall
//!   reason sleeping while they wait for masks: the staging room bounds the bytes in flight.
//! - (stop 25) binary rows one active input at a time, software-pipelined: the next input's
//!   lane and bit found (a shuffle) while jumping to an adds-only arm of this input's pixel,
//!   then the next input's weight rows loaded (predicated by the taps its pixel uses), so
//!   that shared-memory latency overlaps the jump: 0.118–0.127 ms against 0.110–0.115 at 1%,
//!   0.284 against 0.208 at 5% (a jump per input instead of per mask word).
//! - (stop 25) the packing pass four pixels a thread (16-byte loads, so that a warp's load
//!   reads 512 contiguous bytes of a plane, sixteen channels in flight): 40.8 µs at 78% of
//!   DRAM bandwidth against 40.3 µs at 79% (ncu), the layer unchanged (0.113–0.120 against
//!   0.114–0.116 ms). About 2.55 TB/s is what this machine's reads of the input reach, so the
//!   input and output alone (102.8 MB each at batch 128) take about 80 µs in any design.
//! - (stop 25) one output channel a lane, each item swept by a pair of warps (one for each 32
//!   outputs, 24 accumulators a lane), 1024 threads of 64 registers a CTA for twice the warps
//!   to hide latency with: 0.1207–0.1213 ms against 0.1103–0.1115 at 1%, 0.227 against 0.215
//!   at 5% (each row's masks, votes and jumps done twice).
//! - (stop 25) the strip's two halo rows compiled apart with only the kernel row that reaches
//!   the strip (a sixth of the weight reads saved at 8-row strips): 0.126–0.131 ms against
//!   0.110–0.124 at 1%, 0.241 against 0.216 at 5% (the binary row code two thirds larger).
//!
//! Stop 27 (H100, ncu at the boost clock, 1%): the sweep 60.5 → 55.1 µs. ncu's source view had
//! a fifth of the warps' samples on the jump table each non-zero word took (the table's
//! constant load, then the indirect branch resolving: 5.2 of them a row), so the pixels are
//! visited in a fixed order instead; the lowest set bit is found by one bit-find on `m & −m`
//! rather than a reversal and a bit-find; and each item's first masks load during the previous
//! item (a global load's latency had been waited out at every item's start). Layer, one call,
//! three rounds each: jump table 0.1112–0.1138 ms, fixed order 0.1058–0.1092, with the prefetch
//! 0.1077–0.1090 (0.0993–0.1005 against 0.1002–0.1011 with forwards queued back to back, where
//! the host's launch time is hidden: within the noise, kept). Measured and dropped on top of
//! it: 640 threads at 96 registers (0.115 against 0.110 ms), and 256-byte L2 fetches
//! (`ld.global.nc.L2::256B`) in the packing pass (38.9 → 39.0 µs, ncu), and a grid-stride
//! packing pass with the next word's 32 loads in flight (39.1 → 40.2–40.4 µs): reads of the
//! input stay at about 80% of DRAM bandwidth. The sweep is now L1-bound (81.6% of L1/TEX
//! throughput): 5.6 M shared-memory wavefronts for the weights and 3.2 M for the output stores;
//! of 26 M instructions, 3 M are the accumulators' rotation at each row, which only a row loop
//! unrolled three times would drop (see above).
//!
//! Stop 28 (H100, layer at 1%, docs/e2e-h100/ab-stop28.txt; 0.100–0.104 ms for this kernel in
//! the same calls). What bounds the sweep, by probes that drop one kind of work
//! (wrong outputs, timing only): without the output stores 0.082–0.083 ms; without the weight
//! reads (a register instead) 0.098–0.099; without both 0.078–0.079. At 5%: 0.192 → 0.170
//! (no stores), 0.152 (no weight reads), 0.141. At 1% the stores cost 18 µs, and it is the
//! lines they touch: the same stores aimed at 64-byte runs (8 lines an instruction instead of
//! 16) ran 0.096–0.098 ms, at whole 128-byte lines (4) 0.090. ncu (ncu's clocks): 66.4 µs, L1
//! 85% busy, 7.1 M shared-memory wavefronts, 200.7 K store instructions on 3.2 M sectors, DRAM
//! 39%. An eight-pixel column is one 32-byte sector of each channel row, so each store
//! instruction touches 16 lines whatever the lanes do; longer runs need wider items (more
//! accumulators than the registers hold) or a re-layout through shared memory, whose writes
//! and reads cost the L1 about what the lines save. Measured and dropped:
//! - the packing pass beside the sweep, one CTA of each on every multiprocessor (the sweep a
//!   programmatic dependent that starts at once, fewer registers; a count per image released
//!   by the packing warps, acquired by each item): 0.145 ms with twelve packing warps loading
//!   into registers (15 loads in flight a lane at 32 registers), 0.252–0.255 with four warps
//!   staging through the bulk-copy engine (one 128-byte run a lane), 0.226–0.227 through
//!   `cp.async` (16 KB in flight a warp). Alone, that packing ran 0.100 ms at four warps
//!   whatever the stages (4 × 1 to 4 × 4), 0.066 at eight, 0.053–0.058 at 16 to 32, against
//!   0.044 for the packing pass over the whole machine: a warp's misses in flight, not the
//!   bytes staged, set its rate, and beside the sweep the packing warps also wait on its L1;
//! - one output row at a time (three input rows read for each, no halo waste, 32
//!   accumulators, sixteen-pixel columns): 0.128–0.130 ms (three times the pixel tests, votes
//!   and broadcasts a row; its GPU test also failed on small maps, not pursued);
//! - the rows of all images laid end to end and cut into equal runs, one a group of
//!   column-adjacent warps (24–28 input rows for the busiest warp against 30): 0.1032–0.1040
//!   against 0.1019–0.1028 ms at 1%, 0.178 against 0.191 at 5% (first tried with a warp's run
//!   along one column instead of across: 0.173 ms, the sectors of a line then stored far apart
//!   in time);
//! - `st.global.cs` output stores: 0.1019–0.1028 against 0.1001–0.1011 ms;
//! - whole-line stores through shared memory: the warps of a CTA in groups of one warp a
//!   column (two groups of seven at 56 pixels, each with 29 KB of staging beside the
//!   weights), each warp writing its finished rows into its group's staging, and every two
//!   rows the group, between two barriers, storing each channel's two rows (one contiguous
//!   run, 4 lines instead of 14): 0.1115–0.1131 ms against 0.1027–0.1176 in the same call
//!   (the GPU tests pass on it). A probe of the same staging without the barriers (each warp
//!   storing its own staged rows as whole lines, to wrong places) ran 0.0904–0.0922 against
//!   0.1001–0.1005: the barriers' waits (a row's work varies from warp to warp with the spikes
//!   it holds) cost more than the lines save.
//!
//! Stop 29 (H100, layer at 1%, docs/e2e-h100/ab-stop29.txt): the staged rows above, stored by
//! the tensor memory accelerator, 0.0965–0.0987 → 0.0940–0.0956 ms in one call (5%: 0.188 →
//! 0.171), and 0.0916–0.0944 ms in eight runs on the final build with the packing pass's
//! evict-first loads (0.1017–0.1036 → 0.0983–0.0988 alone). Measured and dropped:
//! - the same staging with a count per slot, the last warp to arrive storing the row, ordered
//!   by `fence.acq_rel.cta` and acquire/release atomics: 0.135 ms. Each compiles to
//!   `MEMBAR.ALL.CTA`, which waits for the warp's outstanding loads (its mask prefetch);
//! - a storing warp with ordinary 16-byte stores of the staged row (about six lines an
//!   instruction instead of 16, but two fewer sweeping warps and the staging's extra shared
//!   traffic): 0.098–0.100 against 0.098–0.099;
//! - one `cp.async.bulk` per channel row (64 a row, each issued lane by lane): 0.114–0.119 at
//!   1%, where the storing warp cannot issue them as fast as rows finish (at 5%, 0.171);
//! - 14-row strips (two bands a group): 0.096 against 0.093–0.095; producers spinning without
//!   `nanosleep`: no difference.
//!
//! ncu at stop 24 (1%, ncu's clocks): the sweep 74 µs, L1 76% busy (shared-memory wavefronts
//! from the weight reads, 2 per read, and the stores' 64 line lookups a row), issue 43%; stalls
//! mostly short scoreboard (shared-memory results, 28%) and fixed-latency waits (27%).
//! ncu at stop 25 (1%, 116.7 K cycles a multiprocessor): 10.5 M L1 data-pipe wavefronts (68% of
//! the cycles): 6.0 M from the 2.9 M weight reads (0.4 M of them bank conflicts), 0.95 M from
//! the weights' copy, and the output stores, whose 201 K instructions write 3.2 M sectors on 16
//! lines each (an 8-pixel column is one 32-byte sector of each channel row); 26.9 M
//! instructions. At 5% the weight reads are 28.4 M wavefronts, L1 87% busy.

/// Output pixels of one row a warp computes: one 32-byte sector of each output row.
pub const SWEEP_PIXELS: u32 = 8;
/// Input pixels of a row a warp reads: its pixels and one either side.
pub const SWEEP_INPUTS: usize = SWEEP_PIXELS as usize + 2;
/// Input and output channels the shared weights hold (fewer are zero-padded).
pub const SWEEP_CHANNELS: u32 = 64;
/// Threads of a CTA; one CTA runs per multiprocessor (the weights fill its shared memory), 128
/// registers a thread (build.rs's launch bounds).
pub const SWEEP_THREADS: u32 = 512;
/// Dynamic shared memory: the weights `[9 taps][64 channels][64 outputs]` as f32.
pub const SWEEP_SHARED_BYTES: u32 = 9 * SWEEP_CHANNELS * SWEEP_CHANNELS * 4;
/// Staging groups a CTA forms on maps [`sweep_stage_groups`] stages: each is one warp a column
/// of [`SWEEP_PIXELS`] pixels, which together hold whole output rows, and one warp that stores
/// them.
pub const SWEEP_STAGE_GROUPS: u32 = 2;
/// Bytes of one staged output row: 64 channels of up to 60 pixels (see [`stage_pixels`]).
const STAGE_ROW_BYTES: u32 = SWEEP_CHANNELS * 60 * 4;
/// Bytes of a group's staging: two rows, then for each the sequence number that may be written
/// into it next (128 bytes kept, for the alignment of the next group).
const STAGE_GROUP_BYTES: u32 = 2 * STAGE_ROW_BYTES + 128;
/// Dynamic shared memory of a staged launch: the weights, then each group's staging.
pub const SWEEP_STAGED_SHARED_BYTES: u32 =
    SWEEP_SHARED_BYTES + SWEEP_STAGE_GROUPS * STAGE_GROUP_BYTES;

/// Staging groups for `w`-wide maps: [`SWEEP_STAGE_GROUPS`] where the groups, each a warp a
/// column and one that stores, fill 14 to 16 warps (6 or 7 columns: 41 to 56 pixels), else 0
/// (each warp stores its own 32-byte runs).
pub const fn sweep_stage_groups(w: u32) -> u32 {
    let columns = w.div_ceil(SWEEP_PIXELS);
    if columns >= 6 && SWEEP_STAGE_GROUPS * (columns + 1) <= SWEEP_THREADS / 32 {
        SWEEP_STAGE_GROUPS
    } else {
        0
    }
}

/// Pixels a staged channel row holds for `w`-wide maps: `w`, or `w + 4` where `w` is a multiple
/// of 8, so that channels `4j` of four consecutive `j` (an eight-lane phase of a staging store,
/// with two chunks each) fall on two bank halves rather than one. The tensor memory
/// accelerator stores the row as a box this wide (pixels past `w` are outside the tensor, not
/// written).
pub const fn stage_pixels(w: u32) -> u32 {
    if w.is_multiple_of(8) {
        w + 4
    } else {
        w
    }
}

/// Byte offset in a staged row of chunk `q` (pixels `4q..4q + 4`) of channel `c`, with
/// [`stage_pixels`] `pixels` a channel row.
#[inline(always)]
pub const fn stage_offset(c: u32, q: u32, pixels: u32) -> u32 {
    c * pixels * 4 + q * 16
}

/// Bytes between consecutive taps' weights in shared memory.
#[cfg(target_arch = "nvptx64")]
const TAP_BYTES: u32 = SWEEP_CHANNELS * SWEEP_CHANNELS * 4;

/// Whether the sweep computes a 3×3, stride-1, padding-1 convolution of `cin → cout` channels
/// on `w`-wide maps (the geometry itself is the caller's check): rows of whole 16-byte vectors.
pub const fn sweep_supports(cin: u32, cout: u32, w: u32) -> bool {
    cin >= 1
        && cin <= SWEEP_CHANNELS
        && cout >= 1
        && cout <= SWEEP_CHANNELS
        && w >= 4
        && w.is_multiple_of(4)
}

/// Output rows per work item for `n` images of `h × w` on `warps` resident warps: the strip
/// height whose busiest warp reads the fewest input rows (each item reads two rows more than it
/// computes, and items are dealt to warps round-robin).
pub const fn sweep_strip_rows(n: u32, h: u32, w: u32, warps: u32) -> u32 {
    let columns = n * w.div_ceil(SWEEP_PIXELS);
    let warps = if warps == 0 { 1 } else { warps };
    let (mut best, mut best_cost) = (1, u64::MAX);
    let mut rows = 1;
    while rows <= h {
        let items = columns as u64 * h.div_ceil(rows) as u64;
        let cost = items.div_ceil(warps as u64) * (rows as u64 + 2);
        if cost < best_cost {
            (best, best_cost) = (rows, cost);
        }
        rows += 1;
    }
    best
}

/// # Safety
/// `input` `[n, cin, h, w]` and `out` `[n, cout, h, w]`, with `n·64·h·w` < 2³²; `masks` what
/// `spike_mask_pack` (or `spike_bitmap_masks`) wrote for `input`, `[n][ceil(cin / 32)][h·w]`;
/// `non_binary` one word, non-zero when some input is neither 0 nor 1; `weights` in the gather
/// layout with 64 outputs a row (`[9·cin + 1, 64]`, row `(ky·3 + kx)·cin + c`, zero past
/// `cout`); `bias` 64 floats; [`sweep_supports`]`(cin, cout, w)`; `strip_rows ≥ 1`. Launch
/// [`SWEEP_THREADS`] threads, [`SWEEP_SHARED_BYTES`] of dynamic shared memory, any grid.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn sweep_conv3x3(
    input: *const f32,
    masks: *const u32,
    non_binary: *const u32,
    weights: *const f32,
    bias: *const f32,
    out: *mut f32,
    n: u32,
    cin: u32,
    cout: u32,
    h: u32,
    w: u32,
    strip_rows: u32,
    groups: u32,
    out_map: u64,
) {
    let s = Sweep::new(
        input,
        weights,
        bias,
        out,
        [n, cin, cout, h, w, strip_rows, groups],
        out_map,
    );
    // Launched as a programmatic dependent of the packing pass (sm_90), the weights' copy above
    // overlapped that pass's last CTAs; its masks are read only from here on.
    #[cfg(sparseflow_sm90)]
    crate::gpu::grid_dependency_wait();
    s.sweep_items(masks, *non_binary == 0);
}

/// What every warp of [`sweep_conv3x3`] shares (after the weights are in shared memory).
#[cfg(target_arch = "nvptx64")]
struct Sweep {
    input: *const f32,
    out: *mut f32,
    /// This lane's two output channels' biases.
    bias: [f32; 2],
    /// Shared-window address of this lane's two outputs of weight row (tap 0, channel 0).
    lane_weights: u32,
    lane: u32,
    cin: u32,
    cout: u32,
    h: u32,
    w: u32,
    strip_rows: u32,
    items: u32,
    /// Staging groups of the CTA (0: direct stores), and warps of each.
    groups: u32,
    columns: u32,
    /// Shared-window address of this warp's group staging.
    staging: u32,
    /// Pixels a staged channel row holds.
    stage_pixels: u32,
    /// Generic address of the output's tensor map (sm_90, staged), else 0.
    out_map: u64,
}

/// Accumulators of a warp: `[output row][pixel][channel pair]`, rows `iy − 1 ..= iy + 1` of the
/// input row `iy` being read.
#[cfg(target_arch = "nvptx64")]
type Rows = [[[f32; 2]; SWEEP_PIXELS as usize]; 3];

/// One work item's place: image, first output column, output rows `oy0..oy_end`, and the mask
/// word this lane loads for each input row (word `lane / 16` of input pixel `x0 − 1 + lane %
/// 16`, where `loads_mask`).
#[cfg(target_arch = "nvptx64")]
#[derive(Clone, Copy)]
struct Item {
    img: u32,
    x0: u32,
    oy0: u32,
    oy_end: u32,
    loads_mask: bool,
    lane_masks: *const u32,
}

#[cfg(target_arch = "nvptx64")]
impl Sweep {
    /// Copies the weights into shared memory (the whole CTA) and gathers the launch's geometry
    /// `[n, cin, cout, h, w, strip_rows]`.
    #[inline(always)]
    unsafe fn new(
        input: *const f32,
        weights: *const f32,
        bias: *const f32,
        out: *mut f32,
        [n, cin, cout, h, w, strip_rows, groups]: [u32; 7],
        out_map: u64,
    ) -> Self {
        use crate::gpu;
        let base = gpu::dynamic_shared_base();
        let tid = gpu::thread_x();
        // 16-byte pieces `[tap][c][16]`, zero for channels past `cin`, copied asynchronously: all
        // 18 of a thread in flight at once, no registers held.
        const PIECES: u32 = 9 * SWEEP_CHANNELS * SWEEP_CHANNELS / 4;
        let mut e = tid;
        while e < PIECES {
            let (tap, c, q) = (e / (16 * SWEEP_CHANNELS), e / 16 % SWEEP_CHANNELS, e % 16);
            if c < cin {
                let src = weights.add(((tap * cin + c) * SWEEP_CHANNELS + 4 * q) as usize);
                gpu::async_copy_16(base + 16 * e, src.cast());
            } else {
                gpu::store_shared_u32x4(base + 16 * e, [0; 4]);
            }
            e += SWEEP_THREADS;
        }
        // Each group's row slot `k` is free for sequence number `k`.
        if tid < 2 * groups {
            let (group, k) = (tid / 2, tid % 2);
            let free = base + SWEEP_SHARED_BYTES + group * STAGE_GROUP_BYTES + 2 * STAGE_ROW_BYTES;
            gpu::store_shared_u32(free + 4 * k, k);
        }
        gpu::async_copy_wait_all();
        gpu::sync_threads();
        let lane = tid % 32;
        let columns = w.div_ceil(SWEEP_PIXELS);
        let group = if groups > 0 {
            tid / 32 / (columns + 1)
        } else {
            0
        };
        let (b0, b1) = gpu::load_nc_f32x2(bias.add(2 * lane as usize));
        Self {
            input,
            out,
            bias: [b0, b1],
            lane_weights: base + 8 * lane,
            lane,
            cin,
            cout,
            h,
            w,
            strip_rows,
            items: n * h.div_ceil(strip_rows) * columns,
            groups,
            columns,
            staging: base + SWEEP_SHARED_BYTES + group * STAGE_GROUP_BYTES,
            stage_pixels: stage_pixels(w),
            out_map,
        }
    }

    /// This warp's work items, dealt round-robin over every warp of the grid, or when staging,
    /// row bands (all columns of a strip) dealt over the groups, a warp taking its column of
    /// each; `binary`: every input is 0 or 1.
    #[inline(always)]
    unsafe fn sweep_items(&self, masks: *const u32, binary: bool) {
        use crate::gpu;
        let warps = SWEEP_THREADS / 32;
        let warp = gpu::thread_x() / 32;
        let (mut item, stride) = if self.groups == 0 {
            (gpu::block_x() * warps + warp, gpu::grid_dim_x() * warps)
        } else {
            let (group, column) = (warp / (self.columns + 1), warp % (self.columns + 1));
            if group >= self.groups {
                return;
            }
            let (band, bands) = (
                gpu::block_x() * self.groups + group,
                gpu::grid_dim_x() * self.groups,
            );
            if column == self.columns {
                self.store_rows(band, bands);
                return;
            }
            (band * self.columns + column, bands * self.columns)
        };
        if item >= self.items {
            return;
        }
        // Rows this warp has staged: the same sequence in every warp of its group.
        let mut staged = 0;
        let mut it = self.item(masks, item);
        let mut first = [
            self.fetch(&it, it.oy0.wrapping_sub(1)),
            self.fetch(&it, it.oy0),
        ];
        loop {
            item += stride;
            let following = (item < self.items).then(|| self.item(masks, item));
            let ahead = self.sweep_item(binary, &it, first, following.as_ref(), &mut staged);
            match following {
                Some(f) => (it, first) = (f, ahead),
                None => break,
            }
        }
    }

    /// Where work item `item` lies, and this lane's mask pointer in it.
    #[inline(always)]
    unsafe fn item(&self, masks: *const u32, item: u32) -> Item {
        let (h, w) = (self.h, self.w);
        let words = self.cin.div_ceil(32);
        let columns = w.div_ceil(SWEEP_PIXELS);
        let strips = h.div_ceil(self.strip_rows);
        let (lane_word, lane_pixel) = (self.lane / 16, self.lane % 16);
        let column = item % columns;
        let strip = item / columns % strips;
        let img = item / (columns * strips);
        let x0 = column * SWEEP_PIXELS;
        let oy0 = strip * self.strip_rows;
        let x = (x0 + lane_pixel).wrapping_sub(1);
        Item {
            img,
            x0,
            oy0,
            oy_end: (oy0 + self.strip_rows).min(h),
            loads_mask: lane_word < words && lane_pixel < SWEEP_INPUTS as u32 && x < w,
            lane_masks: masks.wrapping_add(((img * words + lane_word) * h * w + x) as usize),
        }
    }

    /// This lane's mask word of input row `iy` in `it` (0 outside the image).
    #[inline(always)]
    unsafe fn fetch(&self, it: &Item, iy: u32) -> u32 {
        if it.loads_mask && iy < self.h {
            crate::gpu::load_nc_u32(it.lane_masks.add((iy * self.w) as usize))
        } else {
            0
        }
    }

    /// One work item: a column of eight output pixels over a strip of rows of one image;
    /// `first` holds its first two input rows' masks. Returns those of `following`.
    #[inline(always)]
    unsafe fn sweep_item(
        &self,
        binary: bool,
        it: &Item,
        first: [u32; 2],
        following: Option<&Item>,
        staged: &mut u32,
    ) -> [u32; 2] {
        let (h, w) = (self.h, self.w);
        let plane = h * w;
        // Lanes 2j and 2j + 1 store output channels 4j..4j + 4 (pixels 0..4 and 4..8 of each).
        let high = self.lane % 2 == 1;
        let Item {
            img,
            x0,
            oy0,
            oy_end,
            ..
        } = *it;
        let bias = [self.bias; SWEEP_PIXELS as usize];
        let mut acc: Rows = [bias; 3];
        let mut ahead = [0; 2];
        // Input rows oy0 − 1 ..= oy_end (wrapping: row −1 is u32::MAX, outside the image), the
        // masks of the next two already loading.
        let mut iy = oy0.wrapping_sub(1);
        let mut next = first;
        loop {
            let current = next[0];
            next = [next[1], 0];
            if iy.wrapping_add(1) != oy_end {
                next[1] = self.fetch(it, iy.wrapping_add(2));
            } else if let Some(f) = following {
                // Two rows before the end, the next item's first masks start loading.
                ahead = [self.fetch(f, f.oy0.wrapping_sub(1)), self.fetch(f, f.oy0)];
            }
            // Channel 0 of input pixel x0 − 1 in this row (values are read only when odd).
            let values = self
                .input
                .wrapping_add((img * self.cin * plane + iy.wrapping_mul(w) + x0) as usize)
                .wrapping_sub(1);
            // Binary spikes (the common case) add each weight as it is; the row is compiled
            // twice so that they carry no value reads.
            if binary {
                self.add_row::<true>(current, &mut acc, values);
            } else {
                self.add_row::<false>(current, &mut acc, values);
            }
            // Output row iy − 1 has had all three input rows.
            let oy = iy.wrapping_sub(1);
            if oy >= oy0 && oy < oy_end {
                let quads = RowQuads::new(&acc[0], high);
                if self.groups == 0 {
                    store_row(
                        &quads,
                        self.lane,
                        self.out,
                        (((img * self.cout) * h + oy) * w + x0, plane),
                        self.cout,
                        x0 + 4 < w,
                    );
                } else {
                    self.stage_row(&quads, x0, *staged);
                    *staged = staged.wrapping_add(1);
                }
            }
            if iy == oy_end {
                break;
            }
            acc = [acc[1], acc[2], bias];
            iy = iy.wrapping_add(1);
        }
        ahead
    }

    /// Writes a finished output row segment into its group's staging row for sequence number
    /// `seq` (rows alternate between two slots, so a warp waits only when its group's storing
    /// warp has not yet emptied the slot it wrote two rows before), then arrives at the slot's
    /// barrier without waiting.
    #[inline(always)]
    unsafe fn stage_row(&self, quads: &RowQuads, x0: u32, seq: u32) {
        use crate::gpu;
        let slot = seq % 2;
        let (row, free) = self.stage_slot(slot);
        while gpu::load_volatile_shared_u32(free) != seq {
            gpu::nanosleep(20);
        }
        let j = self.lane / 2;
        let q = x0 / 4 + quads.high as u32;
        if !quads.high || x0 + 4 < self.w {
            unroll!(s in [0, 1, 2, 3] {
                let (a, b, c, d) = quads.quad(s);
                let at = row + stage_offset(4 * j + s as u32, q, self.stage_pixels);
                gpu::store_shared_u32x4(at, [a, b, c, d].map(f32::to_bits));
            });
        }
        // The tensor store that writes the row reads it through the async proxy.
        #[cfg(sparseflow_sm90)]
        gpu::fence_proxy_async_shared();
        // The barrier orders these writes before the storing warp's reads.
        gpu::arrive_named(self.row_barrier(slot), 32 * (self.columns + 1));
    }

    /// Shared-window addresses of this warp's group's staging row `slot` and of its word
    /// holding the sequence number that may be written into it next.
    #[inline(always)]
    fn stage_slot(&self, slot: u32) -> (u32, u32) {
        (
            self.staging + slot * STAGE_ROW_BYTES,
            self.staging + 2 * STAGE_ROW_BYTES + 4 * slot,
        )
    }

    /// Named barrier of this warp's group for row slot `slot` (barrier 0 is the CTA's).
    #[inline(always)]
    fn row_barrier(&self, slot: u32) -> u32 {
        1 + 2 * (crate::gpu::thread_x() / 32 / (self.columns + 1)) + slot
    }

    /// The storing warp of a group: for each row its column warps stage (their row bands from
    /// `band`, every `stride`-th), waits for all of them at the slot's barrier and stores the
    /// whole row, with one tensor store where the host gave a tensor map of the output (sm_90),
    /// else with 16-byte stores of 512 contiguous bytes an instruction, then frees the slot.
    #[inline(always)]
    unsafe fn store_rows(&self, mut band: u32, stride: u32) {
        use crate::gpu;
        let (h, w) = (self.h, self.w);
        let strips = h.div_ceil(self.strip_rows);
        let chunks = w / 4;
        let plane = h * w;
        let (lane_c, lane_q) = (self.lane / chunks, self.lane % chunks);
        let (step_c, step_q) = (32 / chunks, 32 % chunks);
        let mut seq = 0u32;
        while band * self.columns < self.items {
            let (img, strip) = (band / strips, band % strips);
            let oy0 = strip * self.strip_rows;
            for oy in oy0..(oy0 + self.strip_rows).min(h) {
                let slot = seq % 2;
                let (row, free) = self.stage_slot(slot);
                gpu::sync_named(self.row_barrier(slot), 32 * (self.columns + 1));
                let first = (img * self.cout * h + oy) * w;
                // sm_90: the whole row by the tensor memory accelerator (one instruction); the
                // slot is free once it has read it.
                #[cfg(sparseflow_sm90)]
                let lsu = self.out_map == 0;
                #[cfg(not(sparseflow_sm90))]
                let lsu = true;
                #[cfg(sparseflow_sm90)]
                if !lsu && self.lane == 0 {
                    gpu::tensor_store_4d(self.out_map, row, [0, oy, 0, img]);
                    gpu::bulk_wait_read();
                }
                // Otherwise chunk `lane + 32·i` of the row's `cout · chunks`, channel-major;
                // every read has returned (its store took the value) before the slot is freed.
                if lsu {
                    let (mut c, mut q) = (lane_c, lane_q);
                    while c < self.cout {
                        let at = row + stage_offset(c, q, self.stage_pixels);
                        let v = gpu::load_shared_f32x4_at(at);
                        gpu::store_f32x4(self.out.add((first + c * plane + 4 * q) as usize), v);
                        c += step_c;
                        q += step_q;
                        if q >= chunks {
                            q -= chunks;
                            c += 1;
                        }
                    }
                }
                gpu::sync_warp();
                if self.lane == 0 {
                    gpu::store_volatile_shared_u32(free, seq.wrapping_add(2));
                }
                seq = seq.wrapping_add(1);
            }
            band += stride;
        }
        #[cfg(sparseflow_sm90)]
        if self.lane == 0 {
            gpu::bulk_wait_all();
        }
    }

    /// Adds one input row (this lane's mask word `current`: word `lane / 16` of input pixel
    /// `lane % 16`) to the accumulators. The ten pixels are visited in a fixed order, each
    /// skipped by a warp-uniform test of one vote unless one of its two words is non-zero; a
    /// visited pixel's words are broadcast from the lanes that hold them.
    #[inline(always)]
    unsafe fn add_row<const BINARY: bool>(&self, current: u32, acc: &mut Rows, values: *const f32) {
        use crate::gpu;
        let plane = self.h * self.w;
        let live = gpu::warp_ballot(current != 0);
        let (lw, p) = (self.lane_weights, plane);
        unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] {
            if live & ((1 << i) | (1 << (16 + i))) != 0 {
                let m0 = gpu::shfl_u32(current, i as u32);
                let m1 = gpu::shfl_u32(current, 16 + i as u32);
                let v = values.wrapping_add(i);
                add_pixel::<i, 0, BINARY>(m0, acc, lw, v, p);
                add_pixel::<i, 1, BINARY>(m1, acc, lw, v, p);
            }
        });
    }
}

/// Adds the weights of the channels set in `m` (mask word `WORD` of input pixel `I`, `x0 − 1 +
/// I`) to the outputs they feed; `values` points at channel 0 of that pixel (read unless
/// `BINARY`).
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
unsafe fn add_pixel<const I: usize, const WORD: u32, const BINARY: bool>(
    mut m: u32,
    acc: &mut Rows,
    lane_weights: u32,
    values: *const f32,
    plane: u32,
) {
    use crate::gpu;
    while m != 0 {
        let c = 32 * WORD + gpu::lowest_set_bit(m);
        m &= m - 1;
        let v = if BINARY {
            1.0
        } else {
            gpu::load_nc_f32(values.wrapping_add((c * plane) as usize))
        };
        let row = lane_weights + c * SWEEP_CHANNELS * 4;
        unroll!(ky in [0, 1, 2] {
            unroll!(kx in [0, 1, 2] {
                // Input pixel x0 − 1 + I feeds output x0 + I − kx of row iy + 1 − ky, which is
                // acc[2 − ky].
                let o = I.wrapping_sub(kx);
                if o < SWEEP_PIXELS as usize {
                    let tap = (ky * 3 + kx) as u32;
                    let [w0, w1] = gpu::load_shared_u32x2(row + tap * TAP_BYTES);
                    let a = &mut acc[2 - ky][o];
                    if BINARY {
                        a[0] += f32::from_bits(w0);
                        a[1] += f32::from_bits(w1);
                    } else {
                        a[0] = gpu::fma_f32(v, f32::from_bits(w0), a[0]);
                        a[1] = gpu::fma_f32(v, f32::from_bits(w1), a[1]);
                    }
                }
            });
        });
    }
}

/// A finished output row segment rearranged for 16-byte stores: lane `l` holds channels `2l,
/// 2l + 1` of eight pixels; lanes `2j, 2j + 1` swap halves so that each holds four pixels of
/// channels `4j..4j + 4` (pixels 0..4 on `2j`, 4..8 on `2j + 1`).
#[cfg(target_arch = "nvptx64")]
struct RowQuads {
    /// `mine[q][k]`: channel `2l + k` at pixel `4·high + q`; `theirs`: the partner's there.
    mine: [[f32; 2]; 4],
    theirs: [[f32; 2]; 4],
    high: bool,
}

#[cfg(target_arch = "nvptx64")]
impl RowQuads {
    #[inline(always)]
    fn new(acc: &[[f32; 2]; SWEEP_PIXELS as usize], high: bool) -> Self {
        use crate::gpu;
        let mut mine = [[0.0f32; 2]; 4];
        let mut theirs = [[0.0f32; 2]; 4];
        unroll!(q in [0, 1, 2, 3] {
            unroll!(k in [0, 1] {
                let (lo, hi) = (acc[q][k], acc[4 + q][k]);
                let (keep, give) = if high { (hi, lo) } else { (lo, hi) };
                mine[q][k] = keep;
                theirs[q][k] = f32::from_bits(gpu::shfl_xor_u32(give.to_bits(), 1));
            });
        });
        Self { mine, theirs, high }
    }

    /// This lane's four pixels of channel `4j + s`: the even lane's own channels for `s < 2`,
    /// the odd lane's for `s ≥ 2`.
    #[inline(always)]
    fn quad(&self, s: usize) -> (f32, f32, f32, f32) {
        let own = (s >= 2) == self.high;
        let k = s % 2;
        let v = |q: usize| {
            if own {
                self.mine[q][k]
            } else {
                self.theirs[q][k]
            }
        };
        (v(0), v(1), v(2), v(3))
    }
}

/// Stores a finished output row segment straight from the lanes: each 32-byte run of channel
/// `4j + s` is written by the pair `2j, 2j + 1`, 16 rows an instruction. `(first, plane)`:
/// offset of channel 0's first pixel, and channel stride.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
unsafe fn store_row(
    quads: &RowQuads,
    lane: u32,
    out: *mut f32,
    (first, plane): (u32, u32),
    cout: u32,
    second_half: bool,
) {
    use crate::gpu;
    let j = lane / 2;
    unroll!(s in [0, 1, 2, 3] {
        let co = 4 * j + s as u32;
        if co < cout && (!quads.high || second_half) {
            let at = out.add((first + co * plane + 4 * quads.high as u32) as usize);
            gpu::store_f32x4(at, quads.quad(s));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_balance_the_warps() {
        // ResNet's first stage, batch 128, 132 multiprocessors: 7 columns of 56 rows per image.
        let warps = 132 * SWEEP_THREADS / 32;
        let rows = sweep_strip_rows(128, 56, 56, warps);
        let items = 128 * 7 * 56u32.div_ceil(rows);
        let rounds = items.div_ceil(warps);
        // At most a third more input rows than a perfect split's 56·7·128 / warps.
        assert!(
            rounds * (rows + 2) * warps <= 56 * 7 * 128 * 4 / 3,
            "{rows} rows"
        );
        // One image on many warps: short strips; no warps: one strip.
        assert!(sweep_strip_rows(1, 56, 56, warps) <= 2);
        assert_eq!(sweep_strip_rows(4, 7, 8, 0), 7);
    }

    #[test]
    fn staging_layout_spreads_banks() {
        for w in (44..=56).step_by(4) {
            let pixels = stage_pixels(w);
            assert!(pixels >= w && SWEEP_CHANNELS * pixels * 4 <= STAGE_ROW_BYTES);
            // A staging store's eight-lane phase: lanes 2j, 2j + 1 for four consecutive j
            // write chunks x0 / 4 and x0 / 4 + 1 of channel 4j + s: at most two to a bank quad.
            for x0 in (0..w).step_by(SWEEP_PIXELS as usize) {
                for s in 0..4 {
                    for phase in 0..4 {
                        let mut quads = [0; 8];
                        for lane in 0..8 {
                            let j = 4 * phase + lane / 2;
                            let quad = stage_offset(4 * j + s, x0 / 4 + lane % 2, pixels) / 16 % 8;
                            quads[quad as usize] += 1;
                        }
                        assert!(quads.iter().all(|&k| k <= 2), "w {w} x0 {x0} s {s}");
                    }
                }
            }
        }
        assert_eq!(sweep_stage_groups(56), SWEEP_STAGE_GROUPS);
        assert_eq!(sweep_stage_groups(28), 0);
        assert_eq!(sweep_stage_groups(64), 0);
        assert_eq!(sweep_stage_groups(44), SWEEP_STAGE_GROUPS);
        const { assert!(SWEEP_STAGED_SHARED_BYTES <= 227 * 1024) };
        // Staged rows keep the tensor memory accelerator's 128-byte alignment.
        const { assert!(STAGE_ROW_BYTES.is_multiple_of(128) && SWEEP_SHARED_BYTES.is_multiple_of(128)) };
        const { assert!(STAGE_GROUP_BYTES.is_multiple_of(128)) };
    }

    #[test]
    fn supported_geometries() {
        assert!(sweep_supports(64, 64, 56));
        assert!(sweep_supports(3, 50, 12));
        assert!(!sweep_supports(65, 64, 56));
        assert!(!sweep_supports(64, 128, 56));
        assert!(!sweep_supports(64, 64, 14 + 1));
        const { assert!(SWEEP_SHARED_BYTES <= 227 * 1024) };
    }
}
