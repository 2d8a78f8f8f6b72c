//! Dense convolution as an implicit GEMM: `out[co, p] = Σ_k W[co, k] · X[k, p]`, where `p` runs
//! over the output pixels of the whole batch and `k` over `(ci, r, s)` taps. `X` is never
//! materialised: each CTA gathers its `TILE_K × TILE_P` slice of the im2col matrix straight from
//! the NCHW input into shared memory, next to a `TILE_K × TILE_M` slice of the weights, and each
//! thread accumulates a 4 × 4 block of outputs with FMAs.
//!
//! It serves the layers that see dense input (the stem, and any conv not fed by spikes) and, with
//! `1 × 1` geometry, `Linear`. Any stride, padding, dilation and group count.

/// Output channels per CTA.
pub const TILE_M: u32 = 64;
/// Output pixels per CTA.
pub const TILE_P: u32 = 64;
/// Reduction depth staged per step.
pub const TILE_K: u32 = 16;
/// Threads per CTA: a 16 × 16 grid of 4 × 4 output blocks.
pub const DENSE_CONV_THREADS: u32 = 256;
/// Dynamic shared memory per CTA: one `TILE_K × TILE_M` and one `TILE_K × TILE_P` tile.
pub const DENSE_CONV_SHARED_BYTES: u32 = TILE_K * (TILE_M + TILE_P) * 4;

/// The geometry of one convolution launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct ConvGeometry {
    pub n: u32,
    pub cin: u32,
    pub h: u32,
    pub w: u32,
    pub cout: u32,
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
    pub groups: u32,
}

impl ConvGeometry {
    /// Output pixels over the batch: the GEMM's `P`.
    pub const fn pixels(&self) -> u32 {
        self.n * self.oh * self.ow
    }

    /// The reduction length of one group: `Cin / groups · kh · kw`.
    pub const fn k_dim(&self) -> u32 {
        self.cin / self.groups * self.kh * self.kw
    }

    /// The grid: pixel tiles × output-channel tiles of a group × groups (or, with one group,
    /// × the `splits` of [`split_k`]).
    pub const fn grid(&self, splits: u32) -> (u32, u32, u32) {
        (
            self.pixels().div_ceil(TILE_P),
            (self.cout / self.groups).div_ceil(TILE_M),
            if self.groups > 1 { self.groups } else { splits },
        )
    }

    /// `(image, output row, output column)` of GEMM column `p`.
    #[inline(always)]
    pub const fn pixel(&self, p: u32) -> (u32, u32, u32) {
        let plane = self.oh * self.ow;
        (p / plane, (p % plane) / self.ow, p % self.ow)
    }

    /// The input element (offset within the group's first channel plane of the image, or `None`
    /// in the zero padding) that im2col entry `(k, output pixel (oy, ox))` reads.
    #[inline(always)]
    pub const fn tap_offset(&self, k: u32, oy: u32, ox: u32) -> Option<u32> {
        let taps = self.kh * self.kw;
        let ci = k / taps;
        let r = (k % taps) / self.kw;
        let s = k % self.kw;
        let iy = (oy * self.sh + r * self.dh) as i32 - self.ph as i32;
        let ix = (ox * self.sw + s * self.dw) as i32 - self.pw as i32;
        if iy < 0 || ix < 0 || iy >= self.h as i32 || ix >= self.w as i32 {
            return None;
        }
        Some((ci * self.h + iy as u32) * self.w + ix as u32)
    }
}

/// CTAs below which a one-group launch splits its reduction: a small GEMM with a long `K` (a
/// classifier's `Linear` over a few hundred rows) would otherwise run on a fraction of the SMs,
/// each CTA stepping through the whole `K` alone.
pub const SPLIT_K_MIN_CTAS: u32 = 256;

/// `(splits, k per split)` for `g`: the reduction cut into `splits` runs of whole `TILE_K`
/// steps, at least four steps each, when the grid is smaller than [`SPLIT_K_MIN_CTAS`] and the
/// layer has one group; `(1, K)` otherwise.
pub const fn split_k(g: &ConvGeometry) -> (u32, u32) {
    let k_dim = g.k_dim();
    let (px, py, _) = g.grid(1);
    let ctas = px * py;
    if g.groups != 1 || ctas >= SPLIT_K_MIN_CTAS {
        return (1, k_dim);
    }
    let by_grid = SPLIT_K_MIN_CTAS.div_ceil(ctas);
    let by_depth = k_dim / (4 * TILE_K);
    let splits = if by_grid < by_depth {
        by_grid
    } else {
        by_depth
    };
    if splits < 2 {
        return (1, k_dim);
    }
    let chunk = k_dim.div_ceil(splits).div_ceil(TILE_K) * TILE_K;
    (k_dim.div_ceil(chunk), chunk)
}

/// Four floats, 16-byte aligned, so that shared-memory reads are one vector load.
#[cfg(target_arch = "nvptx64")]
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct F4([f32; 4]);

/// `out = conv(input, weight) + bias` (NCHW; weight `[cout, cin/groups, kh, kw]`); `bias` is
/// read only when `has_bias != 0`. With `k_chunk < K` (one group; see [`split_k`]), CTA `z`
/// sums taps `z · k_chunk ..` only and writes its partial output to `out + z · len` (the bias in
/// split 0's); `sum_partials` then adds the splits.
///
/// # Safety
/// The buffers hold the elements `g` implies (`out`: one output per split); launch with
/// [`ConvGeometry::grid`]`(splits)`, [`DENSE_CONV_THREADS`] threads and
/// [`DENSE_CONV_SHARED_BYTES`] of dynamic shared memory; `k_chunk` a multiple of [`TILE_K`] or
/// `K`.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn dense_conv2d(
    input: *const f32,
    weight: *const f32,
    bias: *const f32,
    has_bias: u32,
    out: *mut f32,
    g: ConvGeometry,
    k_chunk: u32,
) {
    use crate::gpu;
    let tid = gpu::thread_x();
    let (group, split) = if g.groups > 1 {
        (gpu::block_z(), 0)
    } else {
        (0, gpu::block_z())
    };
    let p0 = gpu::block_x() * TILE_P;
    let m0 = gpu::block_y() * TILE_M;
    let (cin_g, cout_g) = (g.cin / g.groups, g.cout / g.groups);
    let k_dim = g.k_dim();
    let pixels = g.pixels();
    let a_tile = gpu::dynamic_shared_f32();
    let b_tile = a_tile.add((TILE_K * TILE_M) as usize);

    // The im2col column this thread stages: fixed for the whole reduction.
    let load_p = tid % TILE_P;
    let load_k = tid / TILE_P;
    let p = p0 + load_p;
    let (img, oy, ox) = g.pixel(p);
    let column_base = input.add(((img * g.cin + group * cin_g) * g.h * g.w) as usize);
    // The weight rows this thread stages.
    let a_k = tid % TILE_K;
    let a_m = tid / TILE_K;
    let weight_base = weight.add((group * cout_g) as usize * k_dim as usize);

    let (tx, ty) = (tid % 16, tid / 16);
    let mut acc = [[0.0f32; 4]; 4];
    let mut k0 = split * k_chunk;
    let k_end = if k0 + k_chunk < k_dim {
        k0 + k_chunk
    } else {
        k_dim
    };
    let out = out.add(split as usize * (g.n * g.cout * g.oh * g.ow) as usize);
    while k0 < k_end {
        for j in 0..4 {
            let m = a_m + 16 * j;
            let k = k0 + a_k;
            let value = if m0 + m < cout_g && k < k_dim {
                *weight_base.add(((m0 + m) * k_dim + k) as usize)
            } else {
                0.0
            };
            *a_tile.add((a_k * TILE_M + m) as usize) = value;
        }
        for j in 0..4 {
            let kk = load_k + 4 * j;
            let k = k0 + kk;
            let mut value = 0.0;
            if p < pixels && k < k_dim {
                if let Some(offset) = g.tap_offset(k, oy, ox) {
                    value = *column_base.add(offset as usize);
                }
            }
            *b_tile.add((kk * TILE_P + load_p) as usize) = value;
        }
        gpu::sync_threads();
        for kk in 0..TILE_K {
            let a = *(a_tile.add((kk * TILE_M + ty * 4) as usize) as *const F4);
            let b = *(b_tile.add((kk * TILE_P + tx * 4) as usize) as *const F4);
            for i in 0..4 {
                for j in 0..4 {
                    acc[i][j] = gpu::fma_f32(a.0[i], b.0[j], acc[i][j]);
                }
            }
        }
        gpu::sync_threads();
        k0 += TILE_K;
    }

    for (i, row) in acc.iter().enumerate() {
        let m = m0 + ty * 4 + i as u32;
        if m >= cout_g {
            continue;
        }
        let co = group * cout_g + m;
        let b = if has_bias != 0 && split == 0 {
            *bias.add(co as usize)
        } else {
            0.0
        };
        for (j, &value) in row.iter().enumerate() {
            let p = p0 + tx * 4 + j as u32;
            if p >= pixels {
                continue;
            }
            let (img, oy, ox) = g.pixel(p);
            let at = ((img * g.cout + co) * g.oh + oy) * g.ow + ox;
            *out.add(at as usize) = value + b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direct convolution through `tap_offset` equals the textbook loop nest.
    #[test]
    fn tap_offsets_reproduce_a_direct_convolution() {
        let g = ConvGeometry {
            n: 2,
            cin: 4,
            h: 7,
            w: 6,
            cout: 6,
            oh: 4,
            ow: 2,
            kh: 3,
            kw: 2,
            sh: 2,
            sw: 3,
            ph: 1,
            pw: 1,
            dh: 1,
            dw: 2,
            groups: 2,
        };
        let input: Vec<f32> = (0..g.n * g.cin * g.h * g.w)
            .map(|i| (i % 13) as f32)
            .collect();
        let (cin_g, cout_g) = (g.cin / g.groups, g.cout / g.groups);
        let weight: Vec<f32> = (0..g.cout * g.k_dim())
            .map(|i| (i % 7) as f32 - 3.0)
            .collect();
        for p in 0..g.pixels() {
            let (img, oy, ox) = g.pixel(p);
            for co in 0..g.cout {
                let group = co / cout_g;
                let base = (img * g.cin + group * cin_g) * g.h * g.w;
                let gemm: f32 = (0..g.k_dim())
                    .filter_map(|k| {
                        g.tap_offset(k, oy, ox).map(|o| {
                            weight[(co * g.k_dim() + k) as usize] * input[(base + o) as usize]
                        })
                    })
                    .sum();
                let mut direct = 0.0f32;
                for ci in 0..cin_g {
                    for r in 0..g.kh {
                        for s in 0..g.kw {
                            let iy = (oy * g.sh + r * g.dh) as i32 - g.ph as i32;
                            let ix = (ox * g.sw + s * g.dw) as i32 - g.pw as i32;
                            if iy < 0 || ix < 0 || iy >= g.h as i32 || ix >= g.w as i32 {
                                continue;
                            }
                            let x = input[(((img * g.cin + group * cin_g + ci) * g.h + iy as u32)
                                * g.w
                                + ix as u32) as usize];
                            let k = (ci * g.kh + r) * g.kw + s;
                            direct += weight[(co * g.k_dim() + k) as usize] * x;
                        }
                    }
                }
                assert_eq!(gemm, direct, "pixel {p} channel {co}");
            }
        }
    }
}
