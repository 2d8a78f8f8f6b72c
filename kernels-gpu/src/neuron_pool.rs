//! A spiking neuron and the max-pool that reads its spikes, in one kernel (`NeuronMaxPool` on the
//! host): one thread per pooled output carries the membranes of its window's neurons through
//! every time step and writes only the pooled spike, so the neuron's spike map (ResNet's largest)
//! is never written.
//!
//! Windows overlap (3×3 stride 2: an input pixel sits in up to four), so a neuron is stepped once
//! per window that holds it: the same operations on the same input, so the same spikes, and the
//! extra reads hit L1. The charge and fire steps are `neuron`'s own; the max of spikes is the
//! max of 0s and 1s over a window that always holds an input (PyTorch's output size rule), so
//! the `-inf` padding never shows.

/// Threads per block of [`neuron_max_pool`].
pub const NEURON_POOL_THREADS: u32 = 256;

/// The largest window side the kernel takes: its membranes live in registers, one per tap.
pub const MAX_WINDOW: u32 = 3;

/// `x` is `[steps, planes, h, w]`, `y` is `[steps, planes, oh, ow]`; `g` is a dilation-1 window of
/// at most [`MAX_WINDOW`] × [`MAX_WINDOW`]. The neuron's arguments are `neuron_multi_step`'s.
///
/// # Safety
/// `x` and `y` hold those elements; launch with `planes · oh · ow` threads or more.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "ptx-kernel" fn neuron_max_pool(
    x: *const f32,
    y: *mut f32,
    steps: u32,
    planes: u32,
    g: crate::pool::PoolWindow,
    mode: u32,
    k: f32,
    v_threshold: f32,
    v_reset: f32,
    hard_reset: u32,
) {
    use crate::gpu;
    use crate::neuron::{charge, fire};
    use crate::pool::dilated_window;
    const SIDE: usize = MAX_WINDOW as usize;
    let out_plane = (g.oh * g.ow) as usize;
    let i = (gpu::block_x() * NEURON_POOL_THREADS + gpu::thread_x()) as usize;
    if i >= planes as usize * out_plane {
        return;
    }
    let (plane, o) = (i / out_plane, (i % out_plane) as u32);
    let (h0, h1) = dilated_window(o / g.ow, g.sh, g.ph, g.kh, 1, g.h);
    let (w0, w1) = dilated_window(o % g.ow, g.sw, g.pw, g.kw, 1, g.w);
    let hard = hard_reset != 0;
    let v_r = if hard { v_reset } else { 0.0 };
    let mut v = [v_r; SIDE * SIDE];
    let in_step = planes as usize * (g.h * g.w) as usize;
    let out_step = planes as usize * out_plane;
    let mut xp = x.add(plane * (g.h * g.w) as usize);
    let mut yp = y.add(i);
    for _ in 0..steps {
        let mut max = 0.0f32;
        // Constant bounds: the loops unroll and `v` stays in registers.
        for dy in 0..SIDE {
            for dx in 0..SIDE {
                let (ih, iw) = (h0 + dy as u32, w0 + dx as u32);
                if ih < h1 && iw < w1 {
                    let h = charge(
                        mode,
                        v[dy * SIDE + dx],
                        *xp.add((ih * g.w + iw) as usize),
                        k,
                        v_r,
                    );
                    let (spike, next) = fire(h, v_threshold, hard, v_r);
                    v[dy * SIDE + dx] = next;
                    if spike > max {
                        max = spike;
                    }
                }
            }
        }
        *yp = max;
        xp = xp.add(in_step);
        yp = yp.add(out_step);
    }
}
