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

/// The neuron over `x + y` (`AddNeuron`: a residual add fused into the neuron after it): the
/// sum is formed as `Add` forms it and never written. Arguments as [`neuron_multi_step`]'s, `y`
/// shaped as `x`.
///
/// # Safety
/// As [`neuron_multi_step`]; `y` holds as many floats as `x`.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn neuron_multi_step_add(
    x: *const f32,
    y: *const f32,
    spikes: *mut f32,
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
        Some(y),
        spikes,
        steps,
        per_step,
        mode,
        k,
        v_threshold,
        v_reset,
        hard_reset,
    )
}

/// Where a neuron kernel writes its spikes: f32 maps, or one byte per spike for a consumer that
/// reads bytes (`neuron_multi_step_u8` into `max_pool2d_u8`).
#[cfg(target_arch = "nvptx64")]
trait SpikeSink: Copy {
    unsafe fn write(self, idx: usize, spike: f32);
}

#[cfg(target_arch = "nvptx64")]
impl SpikeSink for *mut f32 {
    #[inline(always)]
    unsafe fn write(self, idx: usize, spike: f32) {
        *self.add(idx) = spike;
    }
}

#[cfg(target_arch = "nvptx64")]
impl SpikeSink for *mut u8 {
    #[inline(always)]
    unsafe fn write(self, idx: usize, spike: f32) {
        *self.add(idx) = spike as u8;
    }
}

/// One thread's neuron through every step, on `x` or on `x + y`.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn step_neuron<S: SpikeSink>(
    x: *const f32,
    y: Option<*const f32>,
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
    if i >= per_step {
        return;
    }
    let hard = hard_reset != 0;
    let v_r = if hard { v_reset } else { 0.0 };
    let mut v = v_r;
    let mut idx = i as usize;
    for _ in 0..steps {
        let input = match y {
            Some(y) => *x.add(idx) + *y.add(idx),
            None => *x.add(idx),
        };
        let h = charge(mode, v, input, k, v_r);
        let (s, next) = fire(h, v_threshold, hard, v_r);
        spikes.write(idx, s);
        v = next;
        idx += per_step as usize;
    }
}

/// The plain neuron entry points, one per spike type (`step_neuron` on `x` alone).
macro_rules! neuron_entries {
    ($($(#[$doc:meta])* $entry:ident => $spike:ty;)+) => {
        $(
            $(#[$doc])*
            #[cfg(target_arch = "nvptx64")]
            #[no_mangle]
            #[allow(clippy::too_many_arguments)]
            pub unsafe extern "ptx-kernel" fn $entry(
                x: *const f32,
                spikes: *mut $spike,
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
                    None,
                    spikes,
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
    /// `x` and `spikes` hold `steps · per_step` floats; launch with `per_step` threads or more.
    neuron_multi_step => f32;
    /// [`neuron_multi_step`] writing each spike as one byte (0 or 1): for a max-pool that alone
    /// reads them (`NeuronMaxPool`), a quarter of the f32 map's traffic out and back in.
    ///
    /// # Safety
    /// As [`neuron_multi_step`], `spikes` holding `steps · per_step` bytes.
    neuron_multi_step_u8 => u8;
}
