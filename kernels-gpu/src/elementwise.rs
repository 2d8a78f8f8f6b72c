//! Element-wise kernels: BatchNorm's per-channel affine map and the two-input functions of
//! residual blocks (`Add`, SEW's ADD / AND / IAND). Each thread handles elements in a grid-stride
//! loop.

/// Threads per block of the element-wise kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;

/// The two-input functions, numbered as the host passes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum BinaryFunction {
    /// `a + b`
    Add = 0,
    /// `a · b` (SEW AND)
    Mul = 1,
    /// `a · (1 − b)` (SEW IAND)
    AndNot = 2,
}

#[inline(always)]
pub fn apply_binary(function: u32, a: f32, b: f32) -> f32 {
    match function {
        0 => a + b,
        1 => a * b,
        _ => a * (1.0 - b),
    }
}

/// Calls `f(i, c)` for this thread's elements `i` (a grid-stride loop) of a `[planes, hw]`
/// tensor whose plane `p` has channel `c = p % channels`.
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
unsafe fn for_each_channel_element(
    planes: u32,
    channels: u32,
    hw: u32,
    mut f: impl FnMut(usize, usize),
) {
    use crate::gpu;
    let len = planes as usize * hw as usize;
    let stride = (gpu::grid_dim_x() * ELEMENTWISE_THREADS) as usize;
    let mut i = (gpu::block_x() * ELEMENTWISE_THREADS + gpu::thread_x()) as usize;
    while i < len {
        f(i, (i / hw as usize) % channels as usize);
        i += stride;
    }
}

/// Calls `f(i)` for this thread's elements `i` of `0..len` (a grid-stride loop).
#[cfg(target_arch = "nvptx64")]
#[inline(always)]
unsafe fn for_each_element(len: u64, mut f: impl FnMut(usize)) {
    use crate::gpu;
    let stride = (gpu::grid_dim_x() * ELEMENTWISE_THREADS) as u64;
    let mut i = (gpu::block_x() * ELEMENTWISE_THREADS + gpu::thread_x()) as u64;
    while i < len {
        f(i as usize);
        i += stride;
    }
}

/// `y = fma(x, alpha[c], beta[c])` over `[planes, hw]` where plane `p` has channel `p % channels`
/// (BatchNorm in inference).
///
/// # Safety
/// `x` and `y` hold `planes · hw` floats; `alpha` and `beta` hold `channels`.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn channel_affine(
    x: *const f32,
    y: *mut f32,
    alpha: *const f32,
    beta: *const f32,
    planes: u32,
    channels: u32,
    hw: u32,
) {
    for_each_channel_element(planes, channels, hw, |i, c| {
        *y.add(i) = crate::gpu::fma_f32(*x.add(i), *alpha.add(c), *beta.add(c));
    });
}

/// `y = f(a, b)` element-wise over `len` elements; `function` is a [`BinaryFunction`].
///
/// # Safety
/// `a`, `b` and `y` hold `len` floats.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn binary_map(
    a: *const f32,
    b: *const f32,
    y: *mut f32,
    len: u64,
    function: u32,
) {
    for_each_element(len, |k| {
        *y.add(k) = apply_binary(function, *a.add(k), *b.add(k))
    });
}

/// `y += bias[c]` in place over `[planes, hw]`, plane `p` having channel `p % channels` (the bias
/// of a convolution whose product came from a library without one).
///
/// # Safety
/// `y` holds `planes · hw` floats and `bias` holds `channels`.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn channel_bias_add(
    y: *mut f32,
    bias: *const f32,
    planes: u32,
    channels: u32,
    hw: u32,
) {
    for_each_channel_element(planes, channels, hw, |i, c| *y.add(i) += *bias.add(c));
}

/// `y[i] = Σ_z parts[z · len + i]` for `z` in `0..splits`, in that order (the split-K partial
/// outputs of `dense_conv2d`).
///
/// # Safety
/// `parts` holds `splits · len` floats and `y` holds `len`.
#[cfg(target_arch = "nvptx64")]
#[no_mangle]
pub unsafe extern "ptx-kernel" fn sum_partials(
    parts: *const f32,
    y: *mut f32,
    len: u64,
    splits: u32,
) {
    for_each_element(len, |i| {
        let mut sum = *parts.add(i);
        for z in 1..splits as usize {
            sum += *parts.add(z * len as usize + i);
        }
        *y.add(i) = sum;
    });
}
