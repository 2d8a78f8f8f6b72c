//! 2-D pooling with PyTorch semantics, on the CPU (f32): [`MaxPool2d`], [`AvgPool2d`] and
//! [`AdaptiveAvgPool2d`].
//!
//! Input `[..., C, H, W]`: every leading dimension is batch, and each `H × W` plane is pooled on
//! its own (in parallel over planes). Output sizes, padding rules and the float order of each
//! window follow PyTorch's CPU kernels for contiguous tensors (`MaxPoolKernel.cpp`,
//! `AvgPoolKernel.cpp`, `AdaptiveAvgPoolKernel.cpp` under `aten/src/ATen/native/cpu/`):
//! - max: padding is -inf and a value replaces the maximum when it is greater or NaN, so NaN
//!   propagates (the CPU reduces each window's rows first, then its columns: the same maximum,
//!   except that between +0 and -0 either may be returned);
//! - average: an f32 sum in row-major window order, then one division by the divisor as f32;
//! - adaptive average: the window `[floor(i·H/oh), ceil((i+1)·H/oh))`, an f32 sum in row-major
//!   order, then `sum / kh / kw` (two divisions). PyTorch computes a `(1, 1)` output with
//!   `input.mean((-1, -2))` instead, i.e. `sum / (H·W)` with one division, and so does this
//!   module; but `mean`'s vectorised summation order depends on the CPU's SIMD width, so there
//!   the result is bit-exact when the sum is exact in any order (spike inputs: sums of 0/1) and
//!   otherwise agrees to rounding (about 1 ulp).
use std::sync::Arc;

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use rayon::prelude::*;
use sparseflow_kernels::pool::{
    stem_pool_quads_fit, PoolWindow, POOL_THREADS, STEM_POOL_OUTPUTS_PER_THREAD,
};

use crate::cuda::{ByValue, CudaBackend, DeviceTensor};
use crate::error::{Error, Result};
use crate::ops::conv2d::pair;
use crate::ops::{expect_inputs, Operator, ValueKind};
use crate::tensor::Tensor;

/// `2-D max pooling (PyTorch `nn.MaxPool2d`, `return_indices=False`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaxPool2d {
    /// `(kh, kw)`, each ≥ 1.
    pub kernel: (usize, usize),
    /// `(h, w)`, each ≥ 1 (PyTorch's `stride=None` means `stride = kernel`).
    pub stride: (usize, usize),
    /// Implicit -inf padding on both sides; at most half the kernel.
    pub padding: (usize, usize),
    /// `(h, w)`, each ≥ 1.
    pub dilation: (usize, usize),
    /// Rounds the output size up instead of down.
    pub ceil_mode: bool,
}

impl MaxPool2d {
    /// Max pooling with dilation 1 and `ceil_mode=false`.
    pub fn new(
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Self> {
        let pool = Self {
            kernel,
            stride,
            padding,
            dilation: (1, 1),
            ceil_mode: false,
        };
        pool.validate()?;
        Ok(pool)
    }

    pub fn with_dilation(mut self, dilation: (usize, usize)) -> Result<Self> {
        self.dilation = dilation;
        self.validate()?;
        Ok(self)
    }

    pub fn with_ceil_mode(mut self, ceil_mode: bool) -> Self {
        self.ceil_mode = ceil_mode;
        self
    }

    pub fn validate(&self) -> Result<()> {
        check_window(
            "MaxPool2d",
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
        )
    }

    /// The GPU kernels' window geometry for an input shaped `[..., H, W]`.
    fn cuda_window(&self, shape: &[usize]) -> Result<PoolWindow> {
        let (h, w) = plane_hw("MaxPool2d", shape)?;
        let (oh, ow) = self.output_hw(h, w)?;
        Ok(
            pool_window((h, w), (oh, ow), self.kernel, self.stride, self.padding)
                .with_dilation(self.dilation),
        )
    }

    /// The pool on the GPU over a map of byte spikes (0 or 1) shaped `shape`, into f32: the
    /// f32 map's result bit for bit (`max_pool2d_u8`).
    pub(crate) fn forward_cuda_spike_bytes(
        &self,
        spikes: &CudaSlice<u8>,
        shape: &[usize],
        backend: &Arc<CudaBackend>,
    ) -> Result<DeviceTensor> {
        let window = self.cuda_window(shape)?;
        let (entry, per_thread) = if stem_pool_quads_fit(&window) {
            ("max_pool2d_u8_quads", STEM_POOL_OUTPUTS_PER_THREAD)
        } else {
            ("max_pool2d_u8", 1)
        };
        launch_pool_on(spikes, shape, backend, entry, window, &[], per_thread)
    }

    /// The output `(Hout, Wout)` for an `h × w` input (PyTorch's `pooling_output_shape`).
    pub fn output_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        self.validate()?;
        window_output_hw(
            "MaxPool2d",
            (h, w),
            self.kernel,
            self.stride,
            self.padding,
            self.dilation,
            self.ceil_mode,
        )
    }
}

impl Operator for MaxPool2d {
    fn type_name(&self) -> &'static str {
        "MaxPool2d"
    }

    /// The max of spikes is a spike; of non-negative integers, one of them.
    fn output_kind(&self, inputs: &[ValueKind]) -> ValueKind {
        inputs.first().copied().unwrap_or(ValueKind::Dense)
    }

    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [x] = expect_inputs::<1, _>("MaxPool2d", inputs)?;
        launch_pool(x, "max_pool2d", self.cuda_window(x.shape())?, &[])
    }

    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = expect_inputs::<1, _>("MaxPool2d", inputs)?;
        let (h, w) = plane_hw("MaxPool2d", x.shape())?;
        let (oh, ow) = self.output_hw(h, w)?;
        let (kh, kw) = self.kernel;
        let (sh, sw) = self.stride;
        let (ph, pw) = self.padding;
        let (dh, dw) = self.dilation;
        // Input column ix sits at padded position ix + pw; window column kx of output ox reads
        // padded position ox·sw + kx·dw. Positions outside the input hold −∞ (PyTorch's padding).
        let padded_w = ((ow.max(1) - 1) * sw + (kw - 1) * dw + 1).max(pw + w);
        pool_planes(x, (oh, ow), kh * kw, |xp, yp| {
            // Separable: the maximum over the window's rows for every column (a vectorisable pass
            // over whole rows), then over each window's columns. Max is order-free. A plane with a
            // NaN takes `max_nan` throughout so the NaN wins its windows, as in PyTorch; a plane
            // without (every spike map) takes plain comparisons, a quarter of the instructions.
            let has_nan = xp.iter().fold(false, |seen, v| seen | v.is_nan());
            let mut row_max = vec![f32::NEG_INFINITY; padded_w];
            for (o_h, yr) in yp.chunks_mut(ow).enumerate() {
                let (h0, h1) = dilated_window(o_h, sh, ph, kh, dh, h);
                let inner = &mut row_max[pw..pw + w];
                inner.fill(f32::NEG_INFINITY);
                for ih in (h0..h1).step_by(dh) {
                    max_into(inner, &xp[ih * w..(ih + 1) * w], has_nan);
                }
                if !has_nan && kw == 3 && dw == 1 {
                    // ResNet's 3-wide windows: three loads and two maxes per output.
                    for (ox, y) in yr.iter_mut().enumerate() {
                        let [a, b, c]: [f32; 3] =
                            row_max[ox * sw..ox * sw + 3].try_into().expect("3 columns");
                        let ab = if a > b { a } else { b };
                        *y = if c > ab { c } else { ab };
                    }
                    continue;
                }
                // Column by column of the window, each a strided pass over all outputs: no
                // dependency chain from one output to the next.
                yr.fill(f32::NEG_INFINITY);
                for kx in 0..kw {
                    max_into(yr, row_max[kx * dw..].iter().step_by(sw), has_nan);
                }
            }
        })
    }

    /// E.g. `"2x2 s2 p0"`, with `d2` and `ceil` when they apply.
    fn describe(&self) -> String {
        let mut s = format!(
            "{}x{} s{} p{}",
            self.kernel.0,
            self.kernel.1,
            pair(self.stride),
            pair(self.padding)
        );
        if self.dilation != (1, 1) {
            s += &format!(" d{}", pair(self.dilation));
        }
        if self.ceil_mode {
            s += " ceil";
        }
        s
    }

    crate::impl_as_any!();
}

/// 2-D average pooling (PyTorch `nn.AvgPool2d`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AvgPool2d {
    /// `(kh, kw)`, each ≥ 1.
    pub kernel: (usize, usize),
    /// `(h, w)`, each ≥ 1 (PyTorch's `stride=None` means `stride = kernel`).
    pub stride: (usize, usize),
    /// Implicit zero padding on both sides; at most half the kernel.
    pub padding: (usize, usize),
    /// Rounds the output size up instead of down.
    pub ceil_mode: bool,
    /// Divide by the window size including the padding (PyTorch's default, `true`).
    pub count_include_pad: bool,
    /// Divide by this instead of the window size.
    pub divisor_override: Option<usize>,
}

impl AvgPool2d {
    /// Average pooling with `ceil_mode=false`, `count_include_pad=true`, no divisor override.
    pub fn new(
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Self> {
        let pool = Self {
            kernel,
            stride,
            padding,
            ceil_mode: false,
            count_include_pad: true,
            divisor_override: None,
        };
        pool.validate()?;
        Ok(pool)
    }

    pub fn with_ceil_mode(mut self, ceil_mode: bool) -> Self {
        self.ceil_mode = ceil_mode;
        self
    }

    pub fn with_count_include_pad(mut self, count_include_pad: bool) -> Self {
        self.count_include_pad = count_include_pad;
        self
    }

    pub fn with_divisor_override(mut self, divisor: Option<usize>) -> Result<Self> {
        self.divisor_override = divisor;
        self.validate()?;
        Ok(self)
    }

    pub fn validate(&self) -> Result<()> {
        check_window("AvgPool2d", self.kernel, self.stride, self.padding, (1, 1))?;
        if let Some(d) = self.divisor_override {
            if d == 0 || d > i32::MAX as usize {
                return Err(Error::InvalidArgument(format!(
                    "AvgPool2d divisor_override must be in 1..=2^31-1, got {d}"
                )));
            }
        }
        Ok(())
    }

    /// The output `(Hout, Wout)` for an `h × w` input (PyTorch's `pooling_output_shape`).
    pub fn output_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        self.validate()?;
        window_output_hw(
            "AvgPool2d",
            (h, w),
            self.kernel,
            self.stride,
            self.padding,
            (1, 1),
            self.ceil_mode,
        )
    }
}

impl Operator for AvgPool2d {
    fn type_name(&self) -> &'static str {
        "AvgPool2d"
    }

    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [x] = expect_inputs::<1, _>("AvgPool2d", inputs)?;
        let (h, w) = plane_hw("AvgPool2d", x.shape())?;
        let (oh, ow) = self.output_hw(h, w)?;
        let window = pool_window((h, w), (oh, ow), self.kernel, self.stride, self.padding);
        let extra = [
            self.count_include_pad as u32,
            self.divisor_override.unwrap_or(0) as u32,
        ];
        launch_pool(x, "avg_pool2d", window, &extra)
    }

    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = expect_inputs::<1, _>("AvgPool2d", inputs)?;
        let (h, w) = plane_hw("AvgPool2d", x.shape())?;
        let (oh, ow) = self.output_hw(h, w)?;
        let (kh, kw) = (self.kernel.0 as isize, self.kernel.1 as isize);
        let (sh, sw) = (self.stride.0 as isize, self.stride.1 as isize);
        let (ph, pw) = (self.padding.0 as isize, self.padding.1 as isize);
        let (hi, wi) = (h as isize, w as isize);
        pool_planes(x, (oh, ow), self.kernel.0 * self.kernel.1, |xp, yp| {
            for (o_h, yr) in yp.chunks_mut(ow).enumerate() {
                // As AvgPoolKernel.cpp: the window clipped to the padded input gives pool_size,
                // then clipped to the input.
                let h0 = o_h as isize * sh - ph;
                let h1 = (h0 + kh).min(hi + ph);
                for (o_w, y) in yr.iter_mut().enumerate() {
                    let w0 = o_w as isize * sw - pw;
                    let w1 = (w0 + kw).min(wi + pw);
                    let pool_size = (h1 - h0) * (w1 - w0);
                    let (a0, a1) = (h0.max(0), h1.min(hi));
                    let (b0, b1) = (w0.max(0), w1.min(wi));
                    if a0 >= a1 || b0 >= b1 {
                        *y = 0.0;
                        continue;
                    }
                    let divisor = match self.divisor_override {
                        Some(d) => d as isize,
                        None if self.count_include_pad => pool_size,
                        None => (a1 - a0) * (b1 - b0),
                    };
                    let mut sum = 0.0f32;
                    for ih in a0 as usize..a1 as usize {
                        for &v in &xp[ih * w + b0 as usize..ih * w + b1 as usize] {
                            sum += v;
                        }
                    }
                    *y = sum / divisor as f32;
                }
            }
        })
    }

    /// E.g. `"2x2 s2 p0"`, with `ceil`, `exclude_pad` and `div=N` when they apply.
    fn describe(&self) -> String {
        let mut s = format!(
            "{}x{} s{} p{}",
            self.kernel.0,
            self.kernel.1,
            pair(self.stride),
            pair(self.padding)
        );
        if self.ceil_mode {
            s += " ceil";
        }
        if !self.count_include_pad {
            s += " exclude_pad";
        }
        if let Some(d) = self.divisor_override {
            s += &format!(" div={d}");
        }
        s
    }

    crate::impl_as_any!();
}

/// Adaptive average pooling to a fixed output size (PyTorch `nn.AdaptiveAvgPool2d`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdaptiveAvgPool2d {
    /// `(oh, ow)`, each ≥ 1.
    pub output: (usize, usize),
}

impl AdaptiveAvgPool2d {
    pub fn new(output: (usize, usize)) -> Result<Self> {
        let pool = Self { output };
        pool.validate()?;
        Ok(pool)
    }

    pub fn validate(&self) -> Result<()> {
        if self.output.0 == 0 || self.output.1 == 0 {
            return Err(Error::InvalidArgument(format!(
                "AdaptiveAvgPool2d output size must be >= 1, got {:?}",
                self.output
            )));
        }
        Ok(())
    }

    /// The input plane `(h, w)` of `shape`, after checking the pool and that the plane is not
    /// empty (every output window must hold at least one element).
    fn input_plane(&self, shape: &[usize]) -> Result<(usize, usize)> {
        self.validate()?;
        let (h, w) = plane_hw("AdaptiveAvgPool2d", shape)?;
        if h == 0 || w == 0 {
            return Err(Error::Shape(format!(
                "AdaptiveAvgPool2d needs a non-empty plane, got {shape:?}"
            )));
        }
        Ok((h, w))
    }
}

/// `floor(i · size / out)`, PyTorch's `start_index`.
fn adaptive_start(i: usize, out: usize, size: usize) -> usize {
    sparseflow_kernels::pool::adaptive_start(i as u32, out as u32, size as u32) as usize
}

/// `ceil((i + 1) · size / out)`, PyTorch's `end_index`.
fn adaptive_end(i: usize, out: usize, size: usize) -> usize {
    sparseflow_kernels::pool::adaptive_end(i as u32, out as u32, size as u32) as usize
}

impl Operator for AdaptiveAvgPool2d {
    fn type_name(&self) -> &'static str {
        "AdaptiveAvgPool2d"
    }

    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [x] = expect_inputs::<1, _>("AdaptiveAvgPool2d", inputs)?;
        let (h, w) = self.input_plane(x.shape())?;
        let window = pool_window((h, w), self.output, (1, 1), (1, 1), (0, 0));
        launch_pool(x, "adaptive_avg_pool2d", window, &[])
    }

    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = expect_inputs::<1, _>("AdaptiveAvgPool2d", inputs)?;
        let (h, w) = self.input_plane(x.shape())?;
        let (oh, ow) = self.output;
        let global = self.output == (1, 1);
        let window = h.div_ceil(oh) * w.div_ceil(ow) + 1;
        pool_planes(x, (oh, ow), window, |xp, yp| {
            for (o_h, yr) in yp.chunks_mut(ow).enumerate() {
                let (h0, h1) = (adaptive_start(o_h, oh, h), adaptive_end(o_h, oh, h));
                for (o_w, y) in yr.iter_mut().enumerate() {
                    let (w0, w1) = (adaptive_start(o_w, ow, w), adaptive_end(o_w, ow, w));
                    let mut sum = 0.0f32;
                    for ih in h0..h1 {
                        for &v in &xp[ih * w + w0..ih * w + w1] {
                            sum += v;
                        }
                    }
                    *y = if global {
                        // PyTorch: `input.mean((-1, -2))` = sum / (H·W), one division.
                        sum / (h * w) as f32
                    } else {
                        sum / (h1 - h0) as f32 / (w1 - w0) as f32
                    };
                }
            }
        })
    }

    /// E.g. `"1x1"`.
    fn describe(&self) -> String {
        format!("{}x{}", self.output.0, self.output.1)
    }

    crate::impl_as_any!();
}

/// PyTorch's max step: `v` replaces `m` when greater or NaN.
#[inline(always)]
fn max_nan(m: f32, v: f32) -> f32 {
    if v > m || v.is_nan() {
        v
    } else {
        m
    }
}

/// `dst[i] = max(dst[i], src[i])`: NaN-propagating ([`max_nan`]) when `nan`, else with plain
/// comparisons, which vectorise.
#[inline(always)]
fn max_into<'a>(dst: &mut [f32], src: impl IntoIterator<Item = &'a f32>, nan: bool) {
    if nan {
        for (m, &v) in dst.iter_mut().zip(src) {
            *m = max_nan(*m, v);
        }
    } else {
        for (m, &v) in dst.iter_mut().zip(src) {
            *m = if v > *m { v } else { *m };
        }
    }
}

/// The kernels' window description (dilation 1; see [`PoolWindowExt::with_dilation`]).
fn pool_window(
    (h, w): (usize, usize),
    (oh, ow): (usize, usize),
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
) -> PoolWindow {
    let u = |v: usize| v as u32;
    PoolWindow {
        h: u(h),
        w: u(w),
        oh: u(oh),
        ow: u(ow),
        kh: u(kernel.0),
        kw: u(kernel.1),
        sh: u(stride.0),
        sw: u(stride.1),
        ph: u(padding.0),
        pw: u(padding.1),
        dh: 1,
        dw: 1,
    }
}

trait PoolWindowExt {
    fn with_dilation(self, dilation: (usize, usize)) -> Self;
}

impl PoolWindowExt for PoolWindow {
    fn with_dilation(self, (dh, dw): (usize, usize)) -> Self {
        Self {
            dh: dh as u32,
            dw: dw as u32,
            ..self
        }
    }
}

/// Launches pooling kernel `entry` (`x, y, planes, window, extra…`) with one thread per output.
fn launch_pool(
    x: &DeviceTensor,
    entry: &'static str,
    window: PoolWindow,
    extra: &[u32],
) -> Result<DeviceTensor> {
    x.len_u32()?;
    launch_pool_on(x.slice(), x.shape(), x.backend(), entry, window, extra, 1)
}

/// [`launch_pool`] on any device buffer `x` of a map shaped `shape` (`[..., H, W]`), each
/// thread computing `outputs_per_thread` outputs.
fn launch_pool_on<T: DeviceRepr>(
    x: &CudaSlice<T>,
    shape: &[usize],
    backend: &Arc<CudaBackend>,
    entry: &'static str,
    window: PoolWindow,
    extra: &[u32],
    outputs_per_thread: u32,
) -> Result<DeviceTensor> {
    let planes: usize = shape[..shape.len() - 2].iter().product();
    let mut out_shape = shape[..shape.len() - 2].to_vec();
    out_shape.extend([window.oh as usize, window.ow as usize]);
    let mut out = DeviceTensor::uninit(backend, out_shape)?;
    let len = out.len_u32()?;
    if len == 0 {
        return Ok(out);
    }
    let function = backend.function(entry)?;
    let planes = planes as u32;
    let window = ByValue(window);
    let mut launch = backend.stream().launch_builder(&function);
    launch.arg(x).arg(out.slice_mut()).arg(&planes).arg(&window);
    for e in extra {
        launch.arg(e);
    }
    let threads = len.div_ceil(outputs_per_thread);
    // SAFETY: the arguments match the entry's signature (checked by the GPU tests); `threads`
    // as the entry needs; whole allocations, so aligned for its vector accesses.
    unsafe {
        launch.launch(LaunchConfig {
            grid_dim: (threads.div_ceil(POOL_THREADS), 1, 1),
            block_dim: (POOL_THREADS, 1, 1),
            shared_mem_bytes: 0,
        })?
    };
    Ok(out)
}

/// `(H, W)` of an input shaped `[..., C, H, W]` (host or device).
fn plane_hw(op: &str, shape: &[usize]) -> Result<(usize, usize)> {
    match shape {
        [.., _, h, w] if shape.len() >= 3 => Ok((*h, *w)),
        other => Err(Error::Shape(format!(
            "{op} expects [..., C, H, W] (e.g. [N, C, H, W] or [T, N, C, H, W]), got {other:?}"
        ))),
    }
}

/// PyTorch's `pool2d_shape_check` on the window parameters.
fn check_window(
    op: &str,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
) -> Result<()> {
    let positive = |name: &str, (a, b): (usize, usize)| {
        if a == 0 || b == 0 {
            Err(Error::InvalidArgument(format!(
                "{op} {name} must be >= 1, got {:?}",
                (a, b)
            )))
        } else {
            Ok(())
        }
    };
    positive("kernel", kernel)?;
    positive("stride", stride)?;
    positive("dilation", dilation)?;
    if padding.0 > kernel.0 / 2 || padding.1 > kernel.1 / 2 {
        return Err(Error::InvalidArgument(format!(
            "{op} padding {padding:?} must be at most half the kernel {kernel:?}"
        )));
    }
    Ok(())
}

/// PyTorch's `pooling_output_shape` for both dimensions; an error when an output is empty.
fn window_output_hw(
    op: &str,
    (h, w): (usize, usize),
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    ceil_mode: bool,
) -> Result<(usize, usize)> {
    let dim = |size: usize, k: usize, s: usize, p: usize, d: usize| -> i64 {
        let (size, k, s, p, d) = (size as i64, k as i64, s as i64, p as i64, d as i64);
        let num = size + 2 * p - d * (k - 1) - 1 + if ceil_mode { s - 1 } else { 0 };
        let mut out = num.div_euclid(s) + 1;
        // The last window must start inside the input or its left padding.
        if ceil_mode && (out - 1) * s >= size + p {
            out -= 1;
        }
        out
    };
    let oh = dim(h, kernel.0, stride.0, padding.0, dilation.0);
    let ow = dim(w, kernel.1, stride.1, padding.1, dilation.1);
    if oh < 1 || ow < 1 {
        return Err(Error::Shape(format!(
            "{op}: input {h}x{w} gives output {oh}x{ow}, too small (kernel {kernel:?}, stride \
             {stride:?}, padding {padding:?}, dilation {dilation:?})"
        )));
    }
    Ok((oh as usize, ow as usize))
}

/// The input rows (or columns) `[start, end)` of output index `o`, stepping by `d`, as
/// MaxPoolKernel.cpp computes them: the start is moved forward by whole dilations until it is
/// inside the input.
fn dilated_window(o: usize, s: usize, p: usize, k: usize, d: usize, size: usize) -> (usize, usize) {
    let u = |v: usize| v as u32;
    let (start, end) =
        sparseflow_kernels::pool::dilated_window(u(o), u(s), u(p), u(k), u(d), u(size));
    (start as usize, end as usize)
}

/// Runs `f(input_plane, output_plane)` over all planes of `x` (in parallel when the work is large
/// enough) and returns the `[..., C, oh, ow]` output.
fn pool_planes<F>(x: &Tensor, (oh, ow): (usize, usize), window: usize, f: F) -> Result<Tensor>
where
    F: Fn(&[f32], &mut [f32]) + Sync,
{
    let shape = x.shape();
    let (h, w) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    let planes: usize = shape[..shape.len() - 2].iter().product();
    let mut out_shape = shape[..shape.len() - 2].to_vec();
    out_shape.extend([oh, ow]);
    let mut out = vec![0.0f32; planes * oh * ow];
    if planes == 0 {
        return Tensor::new(out_shape, out);
    }
    let (in_plane, out_plane) = (h * w, oh * ow);
    // Small maps, and calls from inside a parallel task (`NeuronMaxPool`'s), stay on this thread.
    if planes * out_plane * window < 1 << 16 || rayon::current_thread_index().is_some() {
        out.chunks_mut(out_plane)
            .zip(x.data().chunks(in_plane))
            .for_each(|(y, xp)| f(xp, y));
    } else {
        out.par_chunks_mut(out_plane)
            .zip(x.data().par_chunks(in_plane))
            .for_each(|(y, xp)| f(xp, y));
    }
    Tensor::new(out_shape, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SplitMix64;

    fn rand_tensor(rng: &mut SplitMix64, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        Tensor::new(
            shape.to_vec(),
            (0..n).map(|_| rng.next_f32() * 8.0 - 4.0).collect(),
        )
        .unwrap()
    }

    /// PyTorch's output-size rule, written out independently: the number of window starts
    /// `o·s - p` with the (dilated) window ending inside the padded input, rounded up in ceil
    /// mode, but never starting past the input and its left padding.
    fn ref_out(size: usize, k: usize, s: usize, p: usize, d: usize, ceil: bool) -> usize {
        let span = d * (k - 1) + 1;
        let room = (size + 2 * p) as f64 - span as f64;
        let mut out = if ceil {
            (room / s as f64).ceil() as usize + 1
        } else {
            (room / s as f64).floor() as usize + 1
        };
        if ceil && (out - 1) * s >= size + p {
            out -= 1;
        }
        out
    }

    /// Direct f64 reference for max / avg pooling of one plane set.
    #[allow(clippy::too_many_arguments)]
    fn ref_pool(
        x: &Tensor,
        k: (usize, usize),
        s: (usize, usize),
        p: (usize, usize),
        d: (usize, usize),
        ceil: bool,
        max: bool,
        include_pad: bool,
    ) -> (Vec<usize>, Vec<f64>) {
        let sh = x.shape();
        let (h, w) = (sh[sh.len() - 2], sh[sh.len() - 1]);
        let planes: usize = sh[..sh.len() - 2].iter().product();
        let oh = ref_out(h, k.0, s.0, p.0, d.0, ceil);
        let ow = ref_out(w, k.1, s.1, p.1, d.1, ceil);
        let mut out = Vec::new();
        for q in 0..planes {
            for y in 0..oh {
                for xo in 0..ow {
                    let mut best = f64::NEG_INFINITY;
                    let (mut sum, mut count, mut padded) = (0f64, 0usize, 0usize);
                    for i in 0..k.0 {
                        for j in 0..k.1 {
                            let ih = (y * s.0 + i * d.0) as isize - p.0 as isize;
                            let iw = (xo * s.1 + j * d.1) as isize - p.1 as isize;
                            // Within the padded extent (counts for count_include_pad).
                            if ih < (h + p.0) as isize && iw < (w + p.1) as isize {
                                padded += 1;
                            }
                            if ih < 0 || iw < 0 || ih as usize >= h || iw as usize >= w {
                                continue;
                            }
                            let v = x.data()[(q * h + ih as usize) * w + iw as usize] as f64;
                            best = best.max(v);
                            sum += v;
                            count += 1;
                        }
                    }
                    out.push(if max {
                        best
                    } else if count == 0 {
                        0.0
                    } else {
                        sum / if include_pad { padded } else { count } as f64
                    });
                }
            }
        }
        let mut shape = sh[..sh.len() - 2].to_vec();
        shape.extend([oh, ow]);
        (shape, out)
    }

    fn assert_close(op: &str, got: &Tensor, shape: &[usize], want: &[f64]) {
        assert_eq!(got.shape(), shape, "{op}");
        for (i, (&g, &r)) in got.data().iter().zip(want).enumerate() {
            assert!(
                (g as f64 - r).abs() <= 1e-5 * (1.0 + r.abs()),
                "{op}[{i}]: {g} vs {r}"
            );
        }
    }

    #[test]
    fn max_and_avg_match_reference() {
        let mut rng = SplitMix64::new(31);
        let mut n = 0;
        for k in [1usize, 2, 3, 5] {
            for s in [1usize, 2, 3] {
                for p in 0..=k / 2 {
                    for d in [1usize, 2] {
                        for ceil in [false, true] {
                            for hw in [(7, 9), (8, 8), (11, 6)] {
                                let span = d * (k - 1) + 1;
                                if hw.0 + 2 * p < span || hw.1 + 2 * p < span {
                                    continue;
                                }
                                n += 1;
                                let shape = if n % 2 == 0 {
                                    vec![2, 3, hw.0, hw.1]
                                } else {
                                    vec![2, 1, 2, hw.0, hw.1]
                                };
                                let x = rand_tensor(&mut rng, &shape);
                                let mp = MaxPool2d::new((k, k), (s, s), (p, p))
                                    .unwrap()
                                    .with_dilation((d, d))
                                    .unwrap()
                                    .with_ceil_mode(ceil);
                                let (sh, want) =
                                    ref_pool(&x, (k, k), (s, s), (p, p), (d, d), ceil, true, true);
                                assert_close(
                                    &mp.describe(),
                                    &mp.forward(&[&x]).unwrap(),
                                    &sh,
                                    &want,
                                );
                                if d == 1 {
                                    for include in [true, false] {
                                        let ap = AvgPool2d::new((k, k), (s, s), (p, p))
                                            .unwrap()
                                            .with_ceil_mode(ceil)
                                            .with_count_include_pad(include);
                                        let (sh, want) = ref_pool(
                                            &x,
                                            (k, k),
                                            (s, s),
                                            (p, p),
                                            (1, 1),
                                            ceil,
                                            false,
                                            include,
                                        );
                                        assert_close(
                                            &ap.describe(),
                                            &ap.forward(&[&x]).unwrap(),
                                            &sh,
                                            &want,
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        // Rectangular windows.
        let x = rand_tensor(&mut rng, &[3, 2, 10, 13]);
        let mp = MaxPool2d::new((2, 3), (1, 2), (1, 1))
            .unwrap()
            .with_dilation((2, 1))
            .unwrap();
        let (sh, want) = ref_pool(&x, (2, 3), (1, 2), (1, 1), (2, 1), false, true, true);
        assert_close("rect max", &mp.forward(&[&x]).unwrap(), &sh, &want);
        let ap = AvgPool2d::new((3, 2), (2, 1), (1, 0))
            .unwrap()
            .with_ceil_mode(true);
        let (sh, want) = ref_pool(&x, (3, 2), (2, 1), (1, 0), (1, 1), true, false, true);
        assert_close("rect avg", &ap.forward(&[&x]).unwrap(), &sh, &want);
    }

    #[test]
    fn max_pool_nan_and_signed_zero_follow_pytorch() {
        let x = Tensor::new(
            vec![1, 1, 2, 4],
            vec![1.0, f32::NAN, -0.0, 0.0, 2.0, 3.0, 0.0, -0.0],
        )
        .unwrap();
        let y = MaxPool2d::new((2, 2), (2, 2), (0, 0))
            .unwrap()
            .forward(&[&x])
            .unwrap();
        assert!(y.data()[0].is_nan());
        // Equal values: the first one in row-major order wins.
        assert_eq!(y.data()[1].to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn avg_pool_exact_order_and_divisor() {
        // sum in row-major order in f32, then one division.
        let vals = [0.1f32, 0.7, 1e-3, 3.3, 2.9, 1e7, 0.25, 5.5, 9.0];
        let x = Tensor::new(vec![1, 1, 3, 3], vals.to_vec()).unwrap();
        let y = AvgPool2d::new((3, 3), (1, 1), (0, 0))
            .unwrap()
            .forward(&[&x])
            .unwrap();
        let sum = vals.iter().fold(0.0f32, |a, &v| a + v);
        assert_eq!(y.data(), &[sum / 9.0]);
        let y = AvgPool2d::new((3, 3), (1, 1), (0, 0))
            .unwrap()
            .with_divisor_override(Some(2))
            .unwrap()
            .forward(&[&x])
            .unwrap();
        assert_eq!(y.data(), &[sum / 2.0]);
        // count_include_pad: a corner window of a padded 2x2 input covers 1 real value of 4.
        let x = Tensor::new(vec![1, 1, 2, 2], vec![4.0, 8.0, 12.0, 16.0]).unwrap();
        let p = AvgPool2d::new((2, 2), (2, 2), (1, 1)).unwrap();
        assert_eq!(p.forward(&[&x]).unwrap().data(), &[1.0, 2.0, 3.0, 4.0]);
        let p = p.with_count_include_pad(false);
        assert_eq!(p.forward(&[&x]).unwrap().data(), &[4.0, 8.0, 12.0, 16.0]);
    }

    #[test]
    fn adaptive_avg_matches_reference() {
        let mut rng = SplitMix64::new(32);
        for (hw, out) in [
            ((7, 7), (1, 1)),
            ((10, 7), (3, 4)),
            ((5, 5), (5, 5)),
            ((4, 6), (7, 9)),
            ((13, 1), (2, 1)),
        ] {
            let x = rand_tensor(&mut rng, &[2, 3, 2, hw.0, hw.1]);
            let y = AdaptiveAvgPool2d::new(out).unwrap().forward(&[&x]).unwrap();
            assert_eq!(y.shape(), &[2, 3, 2, out.0, out.1]);
            for q in 0..12 {
                for i in 0..out.0 {
                    let (h0, h1) = ((i * hw.0) / out.0, ((i + 1) * hw.0).div_ceil(out.0));
                    for j in 0..out.1 {
                        let (w0, w1) = ((j * hw.1) / out.1, ((j + 1) * hw.1).div_ceil(out.1));
                        let mut sum = 0f64;
                        for a in h0..h1 {
                            for b in w0..w1 {
                                sum += x.data()[(q * hw.0 + a) * hw.1 + b] as f64;
                            }
                        }
                        let want = sum / ((h1 - h0) * (w1 - w0)) as f64;
                        let got = y.data()[(q * out.0 + i) * out.1 + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{hw:?}->{out:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn output_sizes_follow_pytorch() {
        // Known PyTorch results.
        let mp = MaxPool2d::new((3, 3), (2, 2), (1, 1)).unwrap();
        assert_eq!(mp.output_hw(112, 112).unwrap(), (56, 56)); // ResNet stem pool
        let mp = MaxPool2d::new((2, 2), (2, 2), (0, 0)).unwrap();
        assert_eq!(mp.output_hw(7, 7).unwrap(), (3, 3));
        assert_eq!(
            mp.clone().with_ceil_mode(true).output_hw(7, 7).unwrap(),
            (4, 4)
        );
        // ceil mode never starts a window in the right padding: 5 wide, k2 s2 p1 -> 3, not 4.
        let mp = MaxPool2d::new((2, 2), (2, 2), (1, 1))
            .unwrap()
            .with_ceil_mode(true);
        assert_eq!(mp.output_hw(5, 5).unwrap(), (3, 3));
        let ap = AvgPool2d::new((3, 3), (3, 3), (0, 0))
            .unwrap()
            .with_ceil_mode(true);
        assert_eq!(ap.output_hw(10, 9).unwrap(), (4, 3));
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(MaxPool2d::new((0, 2), (1, 1), (0, 0)).is_err());
        assert!(MaxPool2d::new((2, 2), (0, 1), (0, 0)).is_err());
        assert!(MaxPool2d::new((3, 3), (1, 1), (2, 0)).is_err()); // pad > kernel / 2
        assert!(MaxPool2d::new((3, 3), (1, 1), (1, 1))
            .unwrap()
            .with_dilation((0, 1))
            .is_err());
        assert!(AvgPool2d::new((2, 2), (2, 2), (0, 0))
            .unwrap()
            .with_divisor_override(Some(0))
            .is_err());
        assert!(AdaptiveAvgPool2d::new((0, 1)).is_err());
        let mp = MaxPool2d::new((3, 3), (1, 1), (0, 0)).unwrap();
        for shape in [vec![1, 1, 2, 5], vec![5, 5]] {
            match mp.forward(&[&Tensor::zeros(shape.clone())]) {
                Err(Error::Shape(_)) => {}
                other => panic!("{shape:?}: expected a shape error, got {other:?}"),
            }
        }
        assert!(mp.forward(&[]).is_err());
        let ad = AdaptiveAvgPool2d::new((2, 2)).unwrap();
        assert!(ad.forward(&[&Tensor::zeros(vec![1, 1, 0, 3])]).is_err());
        assert!(ad.forward(&[&Tensor::zeros(vec![4])]).is_err());
    }

    #[test]
    fn describe_and_no_params() {
        let mp = MaxPool2d::new((2, 2), (2, 2), (0, 0)).unwrap();
        assert_eq!(mp.describe(), "2x2 s2 p0");
        assert!(mp.params().is_empty());
        let ap = AvgPool2d::new((3, 3), (1, 2), (1, 1))
            .unwrap()
            .with_count_include_pad(false);
        assert_eq!(ap.describe(), "3x3 s(1,2) p1 exclude_pad");
        assert_eq!(AdaptiveAvgPool2d::new((1, 1)).unwrap().describe(), "1x1");
        assert_eq!(ap.type_name(), "AvgPool2d");
    }
}
