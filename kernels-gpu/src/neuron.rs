//! Spiking neurons over T (spikingjelly's multi-step mode): one thread per neuron carries the
//! membrane through every time step, so the membrane never leaves a register.
//!
//! The charge equations are the CPU's (`host/ops/neuron.rs`) operation for operation, with no
//! contraction into FMA: a spike is an exact comparison, and the GPU must fire where the CPU does.

/// Threads per block of [`neuron_multi_step`].
pub const NEURON_THREADS: u32 = 256;

/// Which charge equation a launch uses (`k` is `tau` for the LIF forms, `sigmoid(w)` for PLIF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Charge {
    /// `H = V + X`
    If = 0,
    /// `H = V + (X − (V − v_r)) / tau`
    LifDecayInput = 1,
    /// `H = V − (V − v_r) / tau + X`
    Lif = 2,
    /// `H = V + (X − (V − v_r)) · k`
    PlifDecayInput = 3,
    /// `H = V − (V − v_r) · k + X`
    Plif = 4,
}

/// A neuron as a kernel argument (passed by value): what the neuron entries take after their
/// buffers, for kernels that fire a neuron in their epilogue (`tensor_conv2d_neuron`).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
pub struct NeuronParams {
    /// T: the leading dimension of the `[T, B, ...]` map.
    pub steps: u32,
    /// A [`Charge`] as `u32`.
    pub mode: u32,
    /// `tau` for the LIF forms, `sigmoid(w)` for PLIF.
    pub k: f32,
    pub v_threshold: f32,
    pub v_reset: f32,
    /// Hard reset (to `v_reset`, where the membrane starts) when non-zero, else soft (from 0).
    pub hard_reset: u32,
}

/// One charge step; `mode` is a [`Charge`] as `u32`.
#[inline(always)]
pub fn charge(mode: u32, v: f32, x: f32, k: f32, v_r: f32) -> f32 {
    match mode {
        0 => v + x,
        1 => v + (x - (v - v_r)) / k,
        2 => v - (v - v_r) / k + x,
        3 => v + (x - (v - v_r)) * k,
        _ => v - (v - v_r) * k + x,
    }
}

/// Fires and resets: returns `(spike, new membrane)`.
#[inline(always)]
pub fn fire(h: f32, v_threshold: f32, hard_reset: bool, v_reset: f32) -> (f32, f32) {
    let spike = if h >= v_threshold { 1.0f32 } else { 0.0 };
    let v = if hard_reset {
        spike * v_reset + (1.0 - spike) * h
    } else {
        h - spike * v_threshold
    };
    (spike, v)
}

/// Where a neuron kernel writes its spikes: f32 maps, or one byte per spike for a consumer that
/// reads bytes (`neuron_multi_step_u8` into `max_pool2d_u8`).
#[cfg(target_arch = "nvptx64")]
trait SpikeSink: Copy {
    unsafe fn write(self, idx: usize, spike: f32);
    /// Spikes `idx..idx + 4` with one store (`idx` a multiple of 4).
    unsafe fn write4(self, idx: usize, spikes: [f32; 4]);
}

#[cfg(target_arch = "nvptx64")]
impl SpikeSink for *mut f32 {
    #[inline(always)]
    unsafe fn write(self, idx: usize, spike: f32) {
        *self.add(idx) = spike;
    }
    #[inline(always)]
    unsafe fn write4(self, idx: usize, [a, b, c, d]: [f32; 4]) {
        crate::gpu::store_f32x4(self.add(idx), (a, b, c, d));
    }
}

#[cfg(target_arch = "nvptx64")]
impl SpikeSink for *mut u8 {
    #[inline(always)]
    unsafe fn write(self, idx: usize, spike: f32) {
        *self.add(idx) = spike as u8;
    }
    #[inline(always)]
    unsafe fn write4(self, idx: usize, s: [f32; 4]) {
        let word = s[0] as u32 | (s[1] as u32) << 8 | (s[2] as u32) << 16 | (s[3] as u32) << 24;
        *(self.add(idx) as *mut u32) = word;
    }
}

/// [`neuron_multi_step`]'s f32 spikes, also set in a bitmap of the map (bit `i` of the flat
/// `[steps · per_step]` index, word `i / 32`) by warp votes as the warp writes them: the spike
/// convolution that reads them then builds its channel masks from 1/32 of the bytes
/// (`spike_bitmap_masks`) instead of the f32 map (`spike_mask_pack`). A warp's 32 (or 128)
/// consecutive neurons are one (or four) whole words, so every word is written once, whole: no
/// atomics and no zeroing.
#[cfg(target_arch = "nvptx64")]
#[derive(Clone, Copy)]
struct MarkedSpikes {
    spikes: *mut f32,
    bitmap: *mut u32,
}

/// The four bits of a thread's neuron quad, neuron `e` at bit `e`.
#[inline(always)]
pub fn quad_nibble(spikes: [f32; 4]) -> u32 {
    let mut nibble = 0;
    for (e, &s) in spikes.iter().enumerate() {
        nibble |= ((s != 0.0) as u32) << e;
    }
    nibble
}

#[cfg(target_arch = "nvptx64")]
impl SpikeSink for MarkedSpikes {
    #[inline(always)]
    unsafe fn write(self, idx: usize, spike: f32) {
        use crate::gpu;
        SpikeSink::write(self.spikes, idx, spike);
        let word = gpu::warp_ballot(spike != 0.0);
        if gpu::thread_x() % gpu::WARP_SIZE == 0 {
            *self.bitmap.add(idx / 32) = word;
        }
    }
    #[inline(always)]
    unsafe fn write4(self, idx: usize, s: [f32; 4]) {
        use crate::gpu;
        SpikeSink::write4(self.spikes, idx, s);
        // Lanes 8m..8m+8 hold the 32 neurons of word m: their nibbles, OR-ed over the eight.
        let lane = gpu::thread_x() % gpu::WARP_SIZE;
        let mut word = quad_nibble(s) << (4 * (lane % 8));
        word |= gpu::shfl_xor_u32(word, 1);
        word |= gpu::shfl_xor_u32(word, 2);
        word |= gpu::shfl_xor_u32(word, 4);
        if lane % 8 == 0 {
            *self.bitmap.add(idx / 32) = word;
        }
    }
}

/// [`MarkedSpikes`] for small integers (a SEW ADD's sums): bit 0 of each value in the bitmap
/// at `bitmaps`, bit 1 in the one `plane_words` words on (the integer spike kernel's two bit
/// planes, transposed by `spike_bitmap_planes`); `*out_of_range` is raised where a value is not
/// an integer in `0..=MAX_PLANE_VALUE` (then the f32 kernel computes the conv).
#[cfg(target_arch = "nvptx64")]
#[derive(Clone, Copy)]
struct MarkedPlanes {
    out: *mut f32,
    bitmaps: *mut u32,
    plane_words: usize,
    out_of_range: *mut u32,
}

#[cfg(target_arch = "nvptx64")]
impl MarkedPlanes {
    /// Raises the flag if any lane's value is out of the planes' range; every lane calls it.
    #[inline(always)]
    unsafe fn flag(self, outside: bool) {
        use crate::gpu;
        if gpu::warp_any(outside) && gpu::thread_x() % gpu::WARP_SIZE == 0 {
            gpu::atomic_or_u32(self.out_of_range, 1);
        }
    }
}

#[cfg(target_arch = "nvptx64")]
impl SpikeSink for MarkedPlanes {
    #[inline(always)]
    unsafe fn write(self, idx: usize, value: f32) {
        use crate::gpu;
        SpikeSink::write(self.out, idx, value);
        let (v, exact) = crate::tensor_conv::plane_value(value);
        let (low, high) = (gpu::warp_ballot(v & 1 != 0), gpu::warp_ballot(v & 2 != 0));
        if gpu::thread_x() % gpu::WARP_SIZE == 0 {
            *self.bitmaps.add(idx / 32) = low;
            *self.bitmaps.add(self.plane_words + idx / 32) = high;
        }
        self.flag(!exact);
    }
    #[inline(always)]
    unsafe fn write4(self, idx: usize, values: [f32; 4]) {
        use crate::gpu;
        SpikeSink::write4(self.out, idx, values);
        let lane = gpu::thread_x() % gpu::WARP_SIZE;
        let (mut low, mut high, mut out_of_range) = (0u32, 0u32, false);
        for (e, &value) in values.iter().enumerate() {
            let (v, exact) = crate::tensor_conv::plane_value(value);
            low |= (v & 1) << e;
            high |= (v >> 1 & 1) << e;
            out_of_range |= !exact;
        }
        // As `MarkedSpikes::write4`, once per plane.
        let (mut low, mut high) = (low << (4 * (lane % 8)), high << (4 * (lane % 8)));
        for mask in [1, 2, 4] {
            low |= gpu::shfl_xor_u32(low, mask);
            high |= gpu::shfl_xor_u32(high, mask);
        }
        if lane % 8 == 0 {
            *self.bitmaps.add(idx / 32) = low;
            *self.bitmaps.add(self.plane_words + idx / 32) = high;
        }
        self.flag(out_of_range);
    }
}

/// Whether a step of `per_step` neurons can be marked in a bitmap: every warp of the launch
/// whole (no lane returns early) and on whole words, one neuron or four per thread.
pub const fn neuron_marking_fits(per_step: u32) -> bool {
    per_step.is_multiple_of(32 * NEURONS_PER_THREAD)
}

/// Neurons per thread of the neuron kernels on large maps whose step's neuron count is a
/// multiple of it: one 16-byte load per step and neuron quad (else one neuron per thread).
pub const NEURONS_PER_THREAD: u32 = 4;

/// The fewest neurons per step that take four per thread: below, a quarter as many threads
/// leave the GPU short of loads in flight (H100, T=4 B=32: LIF at 64 × 56² 0.092 → 0.084 ms
/// with quads, at 128 × 28² no change, at 512 × 7² 0.015 → 0.020).
pub const QUAD_MIN_NEURONS: u32 = 1 << 22;

/// Whether a step of `per_step` neurons runs four per thread.
pub const fn neuron_quads(per_step: u32) -> bool {
    per_step.is_multiple_of(NEURONS_PER_THREAD) && per_step >= QUAD_MIN_NEURONS
}

/// Steps whose inputs a thread loads before it computes any of them: the loads are in flight
/// together (the spike stores could alias the inputs, so the compiler would not hoist them).
#[cfg(target_arch = "nvptx64")]
const STEPS_IN_FLIGHT: u32 = 4;
// The quad loop's `unroll!` lists four steps.
#[cfg(target_arch = "nvptx64")]
const _: () = assert!(STEPS_IN_FLIGHT == 4);

/// The threads a neuron launch over `per_step` neurons per step needs.
pub const fn neuron_threads(per_step: u32) -> u32 {
    if neuron_quads(per_step) {
        per_step / NEURONS_PER_THREAD
    } else {
        per_step
    }
}

/// A SEW connect function applied to a neuron's spikes and a shortcut as it writes them
/// (`NeuronConnect`): `function(shortcut, spike)`, or `function(spike, shortcut)` when
/// `spikes_first`; `function` is an `elementwise::BinaryFunction` as `u32`.
#[cfg(target_arch = "nvptx64")]
#[derive(Clone, Copy)]
struct Connect {
    shortcut: *const f32,
    function: u32,
    spikes_first: bool,
}

#[cfg(target_arch = "nvptx64")]
impl Connect {
    #[inline(always)]
    fn apply(self, spike: f32, shortcut: f32) -> f32 {
        use crate::elementwise::apply_binary;
        if self.spikes_first {
            apply_binary(self.function, spike, shortcut)
        } else {
            apply_binary(self.function, shortcut, spike)
        }
    }
}

/// One thread's neurons through every step, on `x` or on `x + y`, each spike joined with a
/// shortcut when `connect` is given: four neurons with vector loads and stores when
/// [`neuron_quads`], else one, step after step.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn step_neuron<S: SpikeSink>(
    x: *const f32,
    y: Option<*const f32>,
    connect: Option<Connect>,
    spikes: S,
    steps: u32,
    per_step: u32,
    mode: u32,
    k: f32,
    v_threshold: f32,
    v_reset: f32,
    hard_reset: u32,
) {
    use crate::gpu;
    let i = gpu::block_x() * NEURON_THREADS + gpu::thread_x();
    if i >= neuron_threads(per_step) {
        return;
    }
    let hard = hard_reset != 0;
    let v_r = if hard { v_reset } else { 0.0 };
    if !neuron_quads(per_step) {
        let mut v = v_r;
        let mut idx = i as usize;
        for _ in 0..steps {
            let input = match y {
                Some(y) => *x.add(idx) + *y.add(idx),
                None => *x.add(idx),
            };
            let shortcut = connect.map(|c| *c.shortcut.add(idx));
            let h = charge(mode, v, input, k, v_r);
            let (s, next) = fire(h, v_threshold, hard, v_r);
            match (connect, shortcut) {
                (Some(c), Some(shortcut)) => spikes.write(idx, c.apply(s, shortcut)),
                _ => spikes.write(idx, s),
            }
            v = next;
            idx += per_step as usize;
        }
        return;
    }
    // Four neurons, `STEPS_IN_FLIGHT` steps loaded before any is computed.
    let first = (NEURONS_PER_THREAD * i) as usize;
    let load = |idx: usize| -> [f32; 4] {
        let (a, b, c, d) = gpu::load_nc_f32x4(x.add(idx));
        match y {
            Some(y) => {
                let (e, f, g, h) = gpu::load_nc_f32x4(y.add(idx));
                [a + e, b + f, c + g, d + h]
            }
            None => [a, b, c, d],
        }
    };
    let mut v = [v_r; 4];
    let mut t0 = 0;
    while t0 < steps {
        // Unrolled by hand: a loop left to LLVM kept `inputs` in local memory once the marking
        // sink's warp votes were in it.
        let mut inputs = [[0.0f32; 4]; STEPS_IN_FLIGHT as usize];
        let mut shortcuts = [[0.0f32; 4]; STEPS_IN_FLIGHT as usize];
        unroll!(j in [0, 1, 2, 3] {
            if t0 + (j as u32) < steps {
                let idx = first + (t0 as usize + j) * per_step as usize;
                inputs[j] = load(idx);
                if let Some(c) = connect {
                    let (a, b, c, d) = gpu::load_nc_f32x4(c.shortcut.add(idx));
                    shortcuts[j] = [a, b, c, d];
                }
            }
        });
        unroll!(j in [0, 1, 2, 3] {
            let t = t0 + j as u32;
            if t < steps {
                let mut s = [0.0f32; 4];
                for e in 0..4 {
                    let h = charge(mode, v[e], inputs[j][e], k, v_r);
                    (s[e], v[e]) = fire(h, v_threshold, hard, v_r);
                    if let Some(c) = connect {
                        s[e] = c.apply(s[e], shortcuts[j][e]);
                    }
                }
                spikes.write4(first + t as usize * per_step as usize, s);
            }
        });
        t0 += STEPS_IN_FLIGHT;
    }
}

/// The neuron entry points: `step_neuron` on `x` (and `y`, for the fused add; a shortcut, for
/// the fused connect) with a spike sink. Each entry's own parameters come between `x` and the
/// common tail.
macro_rules! neuron_entries {
    ($($(#[$doc:meta])* $entry:ident($($param:ident: $ty:ty),*)
        => ($y:expr, $connect:expr, $sink:expr);)+) => {
        $(
            $(#[$doc])*
            #[cfg(target_arch = "nvptx64")]
            #[no_mangle]
            #[allow(clippy::too_many_arguments)]
            pub unsafe extern "ptx-kernel" fn $entry(
                x: *const f32,
                $($param: $ty,)*
                steps: u32,
                per_step: u32,
                mode: u32,
                k: f32,
                v_threshold: f32,
                v_reset: f32,
                hard_reset: u32,
            ) {
                step_neuron(
                    x,
                    $y,
                    $connect,
                    $sink,
                    steps,
                    per_step,
                    mode,
                    k,
                    v_threshold,
                    v_reset,
                    hard_reset,
                )
            }
        )+
    };
}

neuron_entries! {
    /// `x` and `spikes` are `[steps, per_step]`. Hard reset when `hard_reset != 0` (the membrane
    /// starts at `v_reset`), soft reset otherwise (it starts at 0).
    ///
    /// # Safety
    /// `x` and `spikes` hold `steps · per_step` floats, 16-byte aligned; launch with
    /// [`neuron_threads`]`(per_step)` threads or more.
    neuron_multi_step(spikes: *mut f32) => (None, None, spikes);
    /// [`neuron_multi_step`] writing each spike as one byte (0 or 1): for a max-pool that alone
    /// reads them (`NeuronMaxPool`), a quarter of the f32 map's traffic out and back in.
    ///
    /// # Safety
    /// As [`neuron_multi_step`], `spikes` holding `steps · per_step` bytes.
    neuron_multi_step_u8(spikes: *mut u8) => (None, None, spikes);
    /// The neuron over `x + y` (`AddNeuron`: a residual add fused into the neuron after it): the
    /// sum is formed as `Add` forms it and never written.
    ///
    /// # Safety
    /// As [`neuron_multi_step`]; `y` holds as many floats as `x`.
    neuron_multi_step_add(y: *const f32, spikes: *mut f32) => (Some(y), None, spikes);
    /// [`neuron_multi_step`] that also sets every spike's bit in `bitmap` (see `MarkedSpikes`).
    ///
    /// # Safety
    /// As [`neuron_multi_step`]; `bitmap` holds `steps · per_step / 32` words;
    /// [`neuron_marking_fits`]`(per_step)`.
    neuron_multi_step_marked(spikes: *mut f32, bitmap: *mut u32)
        => (None, None, MarkedSpikes { spikes, bitmap });
    /// [`neuron_multi_step_add`] that also sets every spike's bit in `bitmap`.
    ///
    /// # Safety
    /// As [`neuron_multi_step_marked`]; `y` holds as many floats as `x`.
    neuron_multi_step_add_marked(y: *const f32, spikes: *mut f32, bitmap: *mut u32)
        => (Some(y), None, MarkedSpikes { spikes, bitmap });
    /// [`neuron_multi_step`] joined with `shortcut` by a SEW connect function as it writes
    /// (`NeuronConnect`): `out = function(shortcut, spike)`, or `function(spike, shortcut)` when
    /// `spikes_first != 0`; the spikes themselves are never written.
    ///
    /// # Safety
    /// As [`neuron_multi_step`]; `shortcut` holds as many floats as `x`, 16-byte aligned.
    neuron_multi_step_connect(shortcut: *const f32, function: u32, spikes_first: u32, out: *mut f32)
        => (None, Some(Connect { shortcut, function, spikes_first: spikes_first != 0 }), out);
    /// [`neuron_multi_step_connect`] that also sets the two bit planes of each output in
    /// `bitmaps` and raises `out_of_range` (see `MarkedPlanes`).
    ///
    /// # Safety
    /// As [`neuron_multi_step_connect`]; `bitmaps` holds two bitmaps of `plane_words` =
    /// `steps · per_step / 32 + 1` words, `out_of_range` one word (zeroed by the host);
    /// [`neuron_marking_fits`]`(per_step)`.
    neuron_multi_step_connect_marked(
        shortcut: *const f32,
        function: u32,
        spikes_first: u32,
        out: *mut f32,
        bitmaps: *mut u32,
        plane_words: u32,
        out_of_range: *mut u32
    ) => (
        None,
        Some(Connect { shortcut, function, spikes_first: spikes_first != 0 }),
        MarkedPlanes { out, bitmaps, plane_words: plane_words as usize, out_of_range }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A warp's quads OR-ed over each aligned group of eight lanes (the butterfly of
    /// `MarkedSpikes::write4`) are the bitmap words of its 128 consecutive neurons.
    #[test]
    fn quad_nibbles_make_whole_bitmap_words() {
        let spike = |i: usize| {
            if (i * 40503).is_multiple_of(5) {
                1.0f32
            } else {
                0.0
            }
        };
        let shifted: Vec<u32> = (0..32)
            .map(|lane: usize| {
                let quad = [0, 1, 2, 3].map(|e| spike(4 * lane + e));
                quad_nibble(quad) << (4 * (lane % 8))
            })
            .collect();
        let mut words = shifted.clone();
        for mask in [1, 2, 4] {
            words = (0..32).map(|l| words[l] | words[l ^ mask]).collect();
        }
        for m in 0..4 {
            let expected = (0..32).fold(0u32, |w, b| w | ((spike(32 * m + b) != 0.0) as u32) << b);
            assert_eq!(words[8 * m], expected, "word {m}");
        }
        assert!(neuron_marking_fits(128 * 3) && !neuron_marking_fits(32 * 3));
    }
}
