//! 2-D pooling with PyTorch's semantics (see `host/ops/pool.rs`): one thread per output element,
//! each window scanned in the CPU's row-major order so that both devices give the same bits.
//! The window arithmetic lives here and the CPU operators use it too.

/// Threads per block of the pooling kernels.
pub const POOL_THREADS: u32 = 256;

/// The input rows (or columns) `start..end` that output `o` of a dilated window reads, stepping
/// by `d` from `start`; the first in-bounds tap of the window comes first.
#[inline(always)]
pub fn dilated_window(o: u32, s: u32, p: u32, k: u32, d: u32, size: u32) -> (u32, u32) {
    let mut start = o as i64 * s as i64 - p as i64;
    let end = (start + (k as i64 - 1) * d as i64 + 1).min(size as i64);
    while start < 0 {
        start += d as i64;
    }
    (start as u32, end.max(start) as u32)
}

/// `floor(i · size / out)`, PyTorch's `start_index`.
#[inline(always)]
pub fn adaptive_start(i: u32, out: u32, size: u32) -> u32 {
    let (i, out, size) = (i as u64, out as u64, size as u64);
    ((i / out) * size + ((i % out) * size) / out) as u32
}

/// `ceil((i + 1) · size / out)`, PyTorch's `end_index`.
#[inline(always)]
pub fn adaptive_end(i: u32, out: u32, size: u32) -> u32 {
    let (i, out, size) = (i as u64, out as u64, size as u64);
    (1 + ((i + 1) * size - 1) / out) as u32
}

/// The window geometry of a pooling launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct PoolWindow {
    pub h: u32,
    pub w: u32,
    pub oh: u32,
    pub ow: u32,
    pub kh: u32,
    pub kw: u32,
    pub sh: u32,
    pub sw: u32,
    pub ph: u32,
    pub pw: u32,
    pub dh: u32,
    pub dw: u32,
}

/// This thread's output: `(flat index, plane, index within the plane)`, or `None` past the end.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
fn output_position(planes: u32, g: &PoolWindow) -> Option<(usize, usize, u32)> {
    use crate::gpu;
    let out_plane = (g.oh * g.ow) as usize;
    let i = (gpu::block_x() * POOL_THREADS + gpu::thread_x()) as usize;
    if i >= planes as usize * out_plane {
        return None;
    }
    Some((i, i / out_plane, (i % out_plane) as u32))
}

/// Max pooling over `[planes, h, w]` → `[planes, oh, ow]`: padding is -inf and NaN propagates.
///
/// # Safety
/// `x` holds `planes · h · w` floats and `y` holds `planes · oh · ow`.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn max_pool2d(
    x: *const f32,
    y: *mut f32,
    planes: u32,
    g: PoolWindow,
) {
    max_pool(x, y, planes, g)
}

/// [`max_pool2d`] over a map of byte spikes (`neuron_multi_step_u8`'s), into f32: the values
/// are 0 and 1, so the result is the f32 map's bit for bit.
///
/// # Safety
/// `x` holds `planes · h · w` bytes and `y` holds `planes · oh · ow` floats.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn max_pool2d_u8(
    x: *const u8,
    y: *mut f32,
    planes: u32,
    g: PoolWindow,
) {
    max_pool(x, y, planes, g)
}

/// Outputs each thread of [`max_pool2d_u8_quads`] computes (one output row's quad).
pub const STEM_POOL_OUTPUTS_PER_THREAD: u32 = 4;

/// Whether [`max_pool2d_u8_quads`] serves a window: PyTorch's ResNet stem pool (3 × 3, stride 2,
/// padding 1) on a map of even size whose rows are whole 8-byte words, with outputs in fours.
pub const fn stem_pool_quads_fit(g: &PoolWindow) -> bool {
    g.kh == 3
        && g.kw == 3
        && g.sh == 2
        && g.sw == 2
        && g.ph == 1
        && g.pw == 1
        && g.dh == 1
        && g.dw == 1
        && g.h == 2 * g.oh
        && g.w == 2 * g.ow
        && g.w.is_multiple_of(8)
        && g.ow.is_multiple_of(STEM_POOL_OUTPUTS_PER_THREAD)
}

/// The four pooled spikes of one output quad from `rows`, the OR of its window rows' eight bytes
/// from column `2 · ox0`, and `left`, the OR of their bytes at column `2 · ox0 − 1` (0 at the
/// map's edge). Output `j` covers columns `2j − 1 ..= 2j + 1`: bytes `2j` and `2j + 1` of `rows`
/// and byte `2j − 1` (or `left`).
#[inline(always)]
pub const fn stem_pool_quad(rows: u64, left: u32) -> [u32; 4] {
    let pairs = rows | (rows >> 8);
    let before = (rows << 8) | left as u64;
    let any = pairs | before;
    [
        (any & 1) as u32,
        ((any >> 16) & 1) as u32,
        ((any >> 32) & 1) as u32,
        ((any >> 48) & 1) as u32,
    ]
}

/// [`max_pool2d_u8`] for the windows of [`stem_pool_quads_fit`], four outputs per thread: three
/// 8-byte row loads and three byte loads make four outputs, stored as one 16-byte vector. The
/// bytes are spikes (0 or 1) and every window holds at least one input, so the max is an OR.
///
/// # Safety
/// As [`max_pool2d_u8`]; `stem_pool_quads_fit(&g)`, `x` 8-byte and `y` 16-byte aligned; launch
/// with `planes · oh · ow / STEM_POOL_OUTPUTS_PER_THREAD` threads or more.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn max_pool2d_u8_quads(
    x: *const u8,
    y: *mut f32,
    planes: u32,
    g: PoolWindow,
) {
    use crate::gpu;
    let quads = g.ow / STEM_POOL_OUTPUTS_PER_THREAD;
    let i = gpu::block_x() * POOL_THREADS + gpu::thread_x();
    if i >= planes * g.oh * quads {
        return;
    }
    let (plane, rest) = (i / (g.oh * quads), i % (g.oh * quads));
    let (oy, ox0) = (rest / quads, STEM_POOL_OUTPUTS_PER_THREAD * (rest % quads));
    let column = 2 * ox0;
    let mut rows = 0u64;
    let mut left = 0u32;
    for r in 0..3u32 {
        let iy = (2 * oy + r) as i32 - 1;
        if iy >= 0 && (iy as u32) < g.h {
            let row = x.add(((plane * g.h + iy as u32) * g.w + column) as usize);
            rows |= *(row as *const u64);
            if column > 0 {
                left |= *row.sub(1) as u32;
            }
        }
    }
    let [a, b, c, d] = stem_pool_quad(rows, left);
    let at = (plane * g.oh + oy) * g.ow + ox0;
    gpu::store_f32x4(y.add(at as usize), (a as f32, b as f32, c as f32, d as f32));
}

/// A pooled map's element type.
#[cfg(target_arch = "nvptx64")]
trait PoolInput: Copy {
    fn value(self) -> f32;
}

#[cfg(target_arch = "nvptx64")]
impl PoolInput for f32 {
    #[inline(always)]
    fn value(self) -> f32 {
        self
    }
}

#[cfg(target_arch = "nvptx64")]
impl PoolInput for u8 {
    #[inline(always)]
    fn value(self) -> f32 {
        self as f32
    }
}

#[cfg(target_arch = "nvptx64")]
#[inline(always)]
unsafe fn max_pool<T: PoolInput>(x: *const T, y: *mut f32, planes: u32, g: PoolWindow) {
    let Some((i, plane, o)) = output_position(planes, &g) else {
        return;
    };
    let (o_h, o_w) = (o / g.ow, o % g.ow);
    let (h0, h1) = dilated_window(o_h, g.sh, g.ph, g.kh, g.dh, g.h);
    let (w0, w1) = dilated_window(o_w, g.sw, g.pw, g.kw, g.dw, g.w);
    let xp = x.add(plane * (g.h * g.w) as usize);
    let mut max = f32::NEG_INFINITY;
    let mut ih = h0;
    while ih < h1 {
        let mut iw = w0;
        while iw < w1 {
            let v = (*xp.add((ih * g.w + iw) as usize)).value();
            if v > max || v.is_nan() {
                max = v;
            }
            iw += g.dw;
        }
        ih += g.dh;
    }
    *y.add(i) = max;
}

/// Average pooling (PyTorch `AvgPool2d`, dilation 1): `divisor_override == 0` means none.
///
/// # Safety
/// As [`max_pool2d`].
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn avg_pool2d(
    x: *const f32,
    y: *mut f32,
    planes: u32,
    g: PoolWindow,
    count_include_pad: u32,
    divisor_override: u32,
) {
    let Some((i, plane, o)) = output_position(planes, &g) else {
        return;
    };
    let (o_h, o_w) = ((o / g.ow) as i32, (o % g.ow) as i32);
    let (hi, wi) = (g.h as i32, g.w as i32);
    // As AvgPoolKernel.cpp: the window clipped to the padded input gives pool_size, then clipped
    // to the input.
    let h0 = o_h * g.sh as i32 - g.ph as i32;
    let h1 = (h0 + g.kh as i32).min(hi + g.ph as i32);
    let w0 = o_w * g.sw as i32 - g.pw as i32;
    let w1 = (w0 + g.kw as i32).min(wi + g.pw as i32);
    let pool_size = (h1 - h0) * (w1 - w0);
    let (a0, a1) = (h0.max(0), h1.min(hi));
    let (b0, b1) = (w0.max(0), w1.min(wi));
    if a0 >= a1 || b0 >= b1 {
        *y.add(i) = 0.0;
        return;
    }
    let divisor = if divisor_override != 0 {
        divisor_override as i32
    } else if count_include_pad != 0 {
        pool_size
    } else {
        (a1 - a0) * (b1 - b0)
    };
    let xp = x.add(plane * (g.h * g.w) as usize);
    let mut sum = 0.0f32;
    for ih in a0..a1 {
        for iw in b0..b1 {
            sum += *xp.add((ih * wi + iw) as usize);
        }
    }
    *y.add(i) = sum / divisor as f32;
}

/// Adaptive average pooling to `oh × ow` (the kernel fields of `g` are unused). A `1 × 1` output
/// divides once by `h · w`, as PyTorch's `mean` does.
///
/// # Safety
/// As [`max_pool2d`]; `h` and `w` are non-zero.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn adaptive_avg_pool2d(
    x: *const f32,
    y: *mut f32,
    planes: u32,
    g: PoolWindow,
) {
    let Some((i, plane, o)) = output_position(planes, &g) else {
        return;
    };
    let (o_h, o_w) = (o / g.ow, o % g.ow);
    let (h0, h1) = (adaptive_start(o_h, g.oh, g.h), adaptive_end(o_h, g.oh, g.h));
    let (w0, w1) = (adaptive_start(o_w, g.ow, g.w), adaptive_end(o_w, g.ow, g.w));
    let xp = x.add(plane * (g.h * g.w) as usize);
    let mut sum = 0.0f32;
    for ih in h0..h1 {
        for iw in w0..w1 {
            sum += *xp.add((ih * g.w + iw) as usize);
        }
    }
    *y.add(i) = if g.oh == 1 && g.ow == 1 {
        sum / (g.h * g.w) as f32
    } else {
        sum / (h1 - h0) as f32 / (w1 - w0) as f32
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quad OR equals the max over each 3-wide window, for every byte pattern of a row pair.
    #[test]
    fn stem_pool_quad_is_the_window_max() {
        for pattern in 0u32..1 << 9 {
            let bytes: Vec<u64> = (0..9).map(|b| ((pattern >> b) & 1) as u64).collect();
            let (left, row) = (bytes[0] as u32, &bytes[1..]);
            let rows = row
                .iter()
                .enumerate()
                .fold(0u64, |acc, (b, &v)| acc | v << (8 * b));
            let got = stem_pool_quad(rows, left);
            for (j, &g) in got.iter().enumerate() {
                let want = (2 * j..2 * j + 3).map(|c| bytes[c] as u32).max().unwrap();
                assert_eq!(g, want, "pattern {pattern:09b} output {j}");
            }
        }
    }
}
