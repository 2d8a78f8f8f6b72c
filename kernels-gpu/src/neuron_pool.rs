//! A spiking neuron and the max-pool that reads its spikes, in one kernel (`NeuronMaxPool` on the
//! host), so the neuron's spike map (ResNet's largest) is never written to memory.
//!
//! One CTA per `TILE × TILE` pooled outputs of one plane. Its threads own the neurons of the
//! input region those outputs read (the tile's windows and their halo), at most
//! [`MAX_SLOTS`] each, with the membranes in registers across every time step. Each step they
//! charge and fire their neurons into shared memory, then each thread takes the max over its
//! output's window there. The charge and fire steps are `neuron`'s own, so the spikes are the
//! neuron kernel's. Pixels of the region outside the image hold 0: a window always holds an input
//! (PyTorch's output size rule), and a max of spikes over it is never below 0, so the `-inf`
//! padding never shows.

/// Pooled outputs per CTA side: one thread each.
pub const TILE: u32 = 16;
/// Threads per CTA.
pub const NEURON_POOL_THREADS: u32 = TILE * TILE;
/// The widest window and the largest stride the kernel takes.
pub const MAX_WINDOW: u32 = 3;
pub const MAX_STRIDE: u32 = 3;
/// Neurons per thread: the largest region, `((TILE − 1)·MAX_STRIDE + MAX_WINDOW)²`, over the
/// threads.
pub const MAX_SLOTS: usize = (region_side(MAX_STRIDE, MAX_WINDOW)
    * region_side(MAX_STRIDE, MAX_WINDOW))
.div_ceil(NEURON_POOL_THREADS) as usize;

/// Runs `$body` with `$s` = 0, 1, … [`MAX_SLOTS`] − 1 as constants: the per-slot arrays then
/// live in registers (a loop, even a short one, left them in local memory).
#[cfg(target_arch = "nvptx64")]
macro_rules! for_each_slot {
    ($s:ident => $body:block) => {
        for_each_slot!(@ $s $body 0 1 2 3 4 5 6 7 8)
    };
    (@ $s:ident $body:block $($n:literal)*) => {
        $({
            const $s: usize = $n;
            $body
        })*
    };
}
#[cfg(target_arch = "nvptx64")]
const _: () = assert!(MAX_SLOTS == 9, "for_each_slot! unrolls nine slots");

/// Side of the input region a tile's windows read along one axis.
pub const fn region_side(stride: u32, window: u32) -> u32 {
    (TILE - 1) * stride + window
}

/// Dynamic shared memory of a launch: the region's spikes.
pub const fn shared_bytes(g: &crate::pool::PoolWindow) -> u32 {
    4 * region_side(g.sh, g.kh) * region_side(g.sw, g.kw)
}

/// `x` is `[steps, planes, h, w]`, `y` is `[steps, planes, oh, ow]`; `g` is a dilation-1 window of
/// at most [`MAX_WINDOW`] with strides of at most [`MAX_STRIDE`]. The neuron's arguments are
/// `neuron_multi_step`'s.
///
/// # Safety
/// `x` and `y` hold those elements. Launch with `planes · ceil(oh / TILE) · ceil(ow / TILE)`
/// blocks of [`NEURON_POOL_THREADS`] threads and [`shared_bytes`] of dynamic shared memory.
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
    let tid = gpu::thread_x();
    let tiles_x = g.ow.div_ceil(TILE);
    let tiles = tiles_x * g.oh.div_ceil(TILE);
    let (plane, tile) = (gpu::block_x() / tiles, gpu::block_x() % tiles);
    if plane >= planes {
        return;
    }
    let (oy0, ox0) = ((tile / tiles_x) * TILE, (tile % tiles_x) * TILE);
    let (side_h, side_w) = (region_side(g.sh, g.kh), region_side(g.sw, g.kw));
    let region = side_h * side_w;
    // The region's first pixel in the image (negative inside the padding).
    let (iy0, ix0) = (
        (oy0 * g.sh) as i32 - g.ph as i32,
        (ox0 * g.sw) as i32 - g.pw as i32,
    );
    // Each slot's pixel within the plane, or -1 outside the image (or past the region).
    let mut pixel = [-1i32; MAX_SLOTS];
    for_each_slot!(s => {
        let r = s as u32 * NEURON_POOL_THREADS + tid;
        let (iy, ix) = (iy0 + (r / side_w) as i32, ix0 + (r % side_w) as i32);
        if r < region && iy >= 0 && ix >= 0 && (iy as u32) < g.h && (ix as u32) < g.w {
            pixel[s] = iy * g.w as i32 + ix;
        }
    });
    let hard = hard_reset != 0;
    let v_r = if hard { v_reset } else { 0.0 };
    let mut v = [v_r; MAX_SLOTS];
    let spikes = gpu::dynamic_shared_f32();
    let (ty, tx) = (tid / TILE, tid % TILE);
    let (oy, ox) = (oy0 + ty, ox0 + tx);
    let in_step = planes as usize * (g.h * g.w) as usize;
    let out_step = planes as usize * (g.oh * g.ow) as usize;
    // Wrapping: a thread past the map's edge never writes through `yp`, and `xp` ends one step
    // past its plane.
    let mut xp = x.wrapping_add(plane as usize * (g.h * g.w) as usize);
    let mut yp =
        y.wrapping_add(plane as usize * (g.oh * g.ow) as usize + (oy * g.ow + ox) as usize);
    let window = spikes.add((ty * g.sh * side_w + tx * g.sw) as usize);
    for _ in 0..steps {
        for_each_slot!(s => {
            let r = s as u32 * NEURON_POOL_THREADS + tid;
            if r < region {
                let mut spike = 0.0;
                if pixel[s] >= 0 {
                    let h = charge(mode, v[s], *xp.add(pixel[s] as usize), k, v_r);
                    let (fired, next) = fire(h, v_threshold, hard, v_r);
                    (spike, v[s]) = (fired, next);
                }
                *spikes.add(r as usize) = spike;
            }
        });
        gpu::sync_threads();
        if oy < g.oh && ox < g.ow {
            let mut max = 0.0f32;
            for ky in 0..MAX_WINDOW {
                for kx in 0..MAX_WINDOW {
                    if ky < g.kh && kx < g.kw {
                        let spike = *window.add((ky * side_w + kx) as usize);
                        if spike > max {
                            max = spike;
                        }
                    }
                }
            }
            *yp = max;
        }
        // The next step overwrites the spikes only once every window has been read.
        gpu::sync_threads();
        xp = xp.wrapping_add(in_step);
        yp = yp.wrapping_add(out_step);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_region_fits_the_slots() {
        assert_eq!(region_side(MAX_STRIDE, MAX_WINDOW), 48);
        assert_eq!(MAX_SLOTS, 9);
        assert!(MAX_SLOTS as u32 * NEURON_POOL_THREADS >= 48 * 48);
    }
}
