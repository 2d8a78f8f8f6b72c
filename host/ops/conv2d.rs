//! Dense 2-D convolution with PyTorch's `nn.Conv2d` semantics, on the CPU (f32).
//!
//! Any kernel size, stride, padding, dilation and group count (depthwise included), with or
//! without bias. Input `[..., C, H, W]`: every leading dimension is batch, so `[T, N, C, H, W]`
//! and `[N, C, H, W]` both work (a 3-D `[C, H, W]` input is one image).
//!
//! How it runs:
//! - **GEMM path** (the general case): im2col + GEMM through the `gemm` crate. The output pixels of
//!   all images form one column space that is cut into *column blocks* of about
//!   [`COL_BLOCK`] columns (a block is part of one image, or several whole images when the images
//!   are small). Each block is lowered into a small im2col buffer that stays in cache and
//!   multiplied by the group's weight `[Cout/g, Cin/g·kh·kw]`; blocks run in parallel on rayon,
//!   each GEMM single-threaded. Blocks of several images go through a small staging buffer and
//!   are scattered into NCHW. 1×1 stride-1 padding-0 convolutions skip im2col: the input image is
//!   already the GEMM's right-hand matrix.
//! - **Direct path** for one input channel per group (depthwise, or `Cin = groups`): a GEMM of
//!   `K = kh·kw` would be all overhead, so each output plane is accumulated tap by tap.
//!
//! The bias is written into the output first and the GEMM accumulates onto it.
//! [`Conv2d::forward_nchw`] is the slice-level core, for kernels that fall back to the dense path.
//!
//! On CUDA, [`Conv2d::forward_cuda`] runs the implicit-GEMM kernel of
//! `kernels-gpu/src/dense_conv.rs` (any geometry); `Linear` runs through the same kernel as a
//! `1 × 1` convolution.
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use rayon::prelude::*;
use sparseflow_kernels::dense_conv::{
    split_k, ConvGeometry, DENSE_CONV_SHARED_BYTES, DENSE_CONV_THREADS,
};
use sparseflow_kernels::elementwise::ELEMENTWISE_THREADS;

use crate::cuda::{elementwise_config, ByValue, CudaBackend, DeviceCache, DeviceTensor};
use crate::cudnn::{dense_conv_engine, CudnnConv, DenseConvEngine, Precision};

use crate::error::{Error, Result};
use crate::ops::{expect_inputs, Operator};
use crate::tensor::Tensor;

/// Target number of output columns (pixels) per GEMM block. Large enough that packing the weight
/// once per block is cheap next to the block's FLOPs, small enough that the block's im2col buffer
/// stays near the core's L2.
pub const COL_BLOCK: usize = 512;

/// A 2-D convolution layer (PyTorch `nn.Conv2d`, `padding_mode="zeros"`).
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// `[Cout, Cin / groups, kh, kw]`.
    pub weight: Tensor,
    /// `[Cout]`, or `None` for `bias=False`.
    pub bias: Option<Tensor>,
    /// `(h, w)`, each ≥ 1.
    pub stride: (usize, usize),
    /// Zero padding `(h, w)` on both sides.
    pub padding: (usize, usize),
    /// `(h, w)`, each ≥ 1.
    pub dilation: (usize, usize),
    /// ≥ 1; divides both `Cin` and `Cout`.
    pub groups: usize,
    /// The weights on the GPU, uploaded on the first CUDA forward.
    device: DeviceCache<DenseDeviceWeights>,
    /// cuDNN's set-up per input geometry `(n, h, w)`, made on first use.
    cudnn: DeviceCache<CudnnPlans>,
}

impl Conv2d {
    /// A convolution with the given weight `[Cout, Cin / groups, kh, kw]` and optional bias
    /// `[Cout]`; the shapes and the geometry are validated.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
        groups: usize,
    ) -> Result<Self> {
        let conv = Self {
            weight,
            bias,
            stride,
            padding,
            dilation,
            groups,
            device: DeviceCache::default(),
            cudnn: DeviceCache::default(),
        };
        conv.validate()?;
        Ok(conv)
    }

    /// Checks the weight and bias shapes and the geometry (the fields are public, so
    /// [`Operator::forward`] checks again).
    pub fn validate(&self) -> Result<()> {
        let ws = self.weight.shape();
        if ws.len() != 4 || ws.contains(&0) {
            return Err(Error::Shape(format!(
                "Conv2d weight must be [Cout, Cin/groups, kh, kw] with non-zero sizes, got {ws:?}"
            )));
        }
        if self.groups == 0 {
            return Err(Error::InvalidArgument("Conv2d groups must be >= 1".into()));
        }
        if !ws[0].is_multiple_of(self.groups) {
            return Err(Error::Shape(format!(
                "Conv2d out_channels {} is not divisible by groups {}",
                ws[0], self.groups
            )));
        }
        if self.stride.0 == 0 || self.stride.1 == 0 {
            return Err(Error::InvalidArgument(format!(
                "Conv2d stride must be >= 1, got {:?}",
                self.stride
            )));
        }
        if self.dilation.0 == 0 || self.dilation.1 == 0 {
            return Err(Error::InvalidArgument(format!(
                "Conv2d dilation must be >= 1, got {:?}",
                self.dilation
            )));
        }
        if let Some(bias) = &self.bias {
            if bias.shape() != [ws[0]] {
                return Err(Error::Shape(format!(
                    "Conv2d bias must be [{}], got {:?}",
                    ws[0],
                    bias.shape()
                )));
            }
        }
        Ok(())
    }

    /// `Cin` = `weight.shape[1] · groups`.
    pub fn in_channels(&self) -> usize {
        self.weight.shape().get(1).copied().unwrap_or(0) * self.groups
    }

    /// `Cout` = `weight.shape[0]`.
    pub fn out_channels(&self) -> usize {
        self.weight.shape().first().copied().unwrap_or(0)
    }

    /// `(kh, kw)`.
    pub fn kernel_size(&self) -> (usize, usize) {
        match self.weight.shape() {
            [_, _, kh, kw] => (*kh, *kw),
            _ => (0, 0),
        }
    }

    /// The output `(Hout, Wout)` for an `h × w` input, PyTorch's formula
    /// `(h + 2p - d·(k-1) - 1) / s + 1`; an error when the dilated kernel does not fit the padded
    /// input.
    pub fn output_hw(&self, h: usize, w: usize) -> Result<(usize, usize)> {
        let (kh, kw) = self.kernel_size();
        let dim = |size: usize, k: usize, s: usize, p: usize, d: usize| -> Option<usize> {
            let padded = size.checked_add(2 * p)?;
            let span = d.checked_mul(k.checked_sub(1)?)?.checked_add(1)?;
            Some(padded.checked_sub(span)? / s.max(1) + 1)
        };
        match (
            dim(h, kh, self.stride.0, self.padding.0, self.dilation.0),
            dim(w, kw, self.stride.1, self.padding.1, self.dilation.1),
        ) {
            (Some(oh), Some(ow)) => Ok((oh, ow)),
            _ => Err(Error::Shape(format!(
                "Conv2d: padded input {}x{} is smaller than the dilated {}x{} kernel \
                 (padding {:?}, dilation {:?})",
                h + 2 * self.padding.0,
                w + 2 * self.padding.1,
                self.dilation.0 * (kh.max(1) - 1) + 1,
                self.dilation.1 * (kw.max(1) - 1) + 1,
                self.padding,
                self.dilation
            ))),
        }
    }

    /// The output shape for an input shape `[..., Cin, H, W]`.
    pub fn output_shape(&self, input: &[usize]) -> Result<Vec<usize>> {
        self.validate()?;
        if input.len() < 3 {
            return Err(Error::Shape(format!(
                "Conv2d expects [..., C, H, W] (e.g. [N, C, H, W] or [T, N, C, H, W]), got {input:?}"
            )));
        }
        let (lead, chw) = input.split_at(input.len() - 3);
        if chw[0] != self.in_channels() {
            return Err(Error::Shape(format!(
                "Conv2d {} expects {} input channels (dim -3), got input {input:?}",
                self.describe(),
                self.in_channels()
            )));
        }
        let (oh, ow) = self.output_hw(chw[1], chw[2])?;
        let mut shape = lead.to_vec();
        shape.extend([self.out_channels(), oh, ow]);
        Ok(shape)
    }

    /// The convolution on a CUDA tensor `[..., Cin, H, W]`, staying on the device, with the
    /// process's dense engine ([`dense_conv_engine`]: cuDNN when present, else the Rust kernel).
    pub fn forward_cuda(&self, x: &DeviceTensor) -> Result<DeviceTensor> {
        match dense_conv_engine() {
            DenseConvEngine::Rust => self.forward_cuda_with(x, DenseConvEngine::Rust),
            DenseConvEngine::Cudnn => {
                match self.forward_cuda_with(x, DenseConvEngine::Cudnn) {
                    Err(Error::NoGpu(why)) => {
                        // A libcudnn that loads but does not work: the Rust kernel computes the same.
                        static WARNED: std::sync::Once = std::sync::Once::new();
                        WARNED.call_once(|| {
                        eprintln!("warning: cuDNN failed ({why}); dense convolutions use the Rust kernel")
                    });
                        self.forward_cuda_with(x, DenseConvEngine::Rust)
                    }
                    other => other,
                }
            }
        }
    }

    /// The weight and bias on `backend`'s device, in PyTorch's layout (uploaded on first use).
    pub(crate) fn device_weights(
        &self,
        backend: &Arc<CudaBackend>,
    ) -> Result<Arc<DenseDeviceWeights>> {
        DenseDeviceWeights::cached(&self.device, backend, &self.weight, self.bias.as_ref())
    }

    /// The GPU kernels' description of this convolution on an input of `shape`
    /// (`[..., Cin, H, W]`); an error when a size does not fit the kernels' 32-bit indices.
    pub(crate) fn kernel_geometry(&self, shape: &[usize]) -> Result<ConvGeometry> {
        let out = self.output_shape(shape)?;
        let r = shape.len();
        let n: usize = shape[..r - 3].iter().product();
        let too_large = || Error::Shape(format!("{shape:?} is too large for the GPU kernels"));
        let u = |v: usize| u32::try_from(v).map_err(|_| too_large());
        u32::try_from(n * shape[r - 3] * shape[r - 2] * shape[r - 1]).map_err(|_| too_large())?;
        Ok(ConvGeometry {
            n: u(n)?,
            cin: u(self.in_channels())?,
            h: u(shape[r - 2])?,
            w: u(shape[r - 1])?,
            cout: u(self.out_channels())?,
            oh: u(out[out.len() - 2])?,
            ow: u(out[out.len() - 1])?,
            kh: u(self.kernel_size().0)?,
            kw: u(self.kernel_size().1)?,
            sh: u(self.stride.0)?,
            sw: u(self.stride.1)?,
            ph: u(self.padding.0)?,
            pw: u(self.padding.1)?,
            dh: u(self.dilation.0)?,
            dw: u(self.dilation.1)?,
            groups: u(self.groups)?,
        })
    }

    /// [`forward_cuda`](Self::forward_cuda) with a chosen engine.
    pub fn forward_cuda_with(
        &self,
        x: &DeviceTensor,
        engine: DenseConvEngine,
    ) -> Result<DeviceTensor> {
        let geometry = self.kernel_geometry(x.shape())?;
        let mut out = DeviceTensor::uninit(x.backend(), self.output_shape(x.shape())?)?;
        out.len_u32()?;
        let weights = self.device_weights(x.backend())?;
        match engine {
            DenseConvEngine::Cudnn if !crate::cudnn::available() => {
                return Err(Error::NoGpu("cuDNN (libcudnn) could not be loaded".into()))
            }
            DenseConvEngine::Rust => launch_dense_conv(x, &weights, geometry, &mut out)?,
            DenseConvEngine::Cudnn => self.forward_cudnn(x, &weights, geometry, &mut out)?,
        }
        Ok(out)
    }

    /// cuDNN's convolution (fp32, TF32 off), then the bias.
    fn forward_cudnn(
        &self,
        x: &DeviceTensor,
        weights: &DenseDeviceWeights,
        g: ConvGeometry,
        out: &mut DeviceTensor,
    ) -> Result<()> {
        if g.pixels() == 0 || g.cout == 0 {
            return Ok(());
        }
        let backend = x.backend();
        let plans = self
            .cudnn
            .get(backend, &[&self.weight], || Ok(Mutex::new(HashMap::new())))?;
        let mut plans = plans.lock().unwrap_or_else(|p| p.into_inner());
        let (n, h, w) = (g.n as usize, g.h as usize, g.w as usize);
        let key = (
            [n, h, w],
            [self.stride, self.padding, self.dilation],
            self.groups,
        );
        if plans.len() >= MAX_CUDNN_PLANS && !plans.contains_key(&key) {
            plans.clear();
        }
        let plan = match plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(CudnnConv::new(backend, self, n, h, w, Precision::Fp32)?),
        };
        plan.run(x.slice(), &weights.weight, out.slice_mut())?;
        if let Some(bias) = &weights.bias {
            let function = backend.function("channel_bias_add")?;
            let config = elementwise_config(out.len(), ELEMENTWISE_THREADS);
            let [planes, channels, hw] = [g.n * g.cout, g.cout, g.oh * g.ow];
            let mut launch = backend.stream().launch_builder(&function);
            launch
                .arg(out.slice_mut())
                .arg(bias)
                .arg(&planes)
                .arg(&channels)
                .arg(&hw);
            // SAFETY: the arguments match `channel_bias_add`; `out` holds `planes · hw` floats.
            unsafe { launch.launch(config)? };
        }
        Ok(())
    }

    /// The dense core on raw slices: `input` is `[n, Cin, h, w]` and `out` is
    /// `[n, Cout, Hout, Wout]` (see [`Conv2d::output_hw`]), both contiguous. Every element of `out`
    /// is overwritten.
    pub fn forward_nchw(
        &self,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
        out: &mut [f32],
    ) -> Result<()> {
        self.validate()?;
        let (oh, ow) = self.output_hw(h, w)?;
        let cin = self.in_channels();
        let cout = self.out_channels();
        let in_len = n * cin * h * w;
        let out_len = n * cout * oh * ow;
        if input.len() != in_len {
            return Err(Error::Shape(format!(
                "Conv2d::forward_nchw: input has {} elements, [{n}, {cin}, {h}, {w}] needs {in_len}",
                input.len()
            )));
        }
        if out.len() != out_len {
            return Err(Error::Shape(format!(
                "Conv2d::forward_nchw: out has {} elements, [{n}, {cout}, {oh}, {ow}] needs {out_len}",
                out.len()
            )));
        }
        if n == 0 {
            return Ok(());
        }
        let (kh, kw) = self.kernel_size();
        let geom = Geom {
            n,
            groups: self.groups,
            cin_g: cin / self.groups,
            cout_g: cout / self.groups,
            h,
            w,
            kh,
            kw,
            sh: self.stride.0,
            sw: self.stride.1,
            ph: self.padding.0,
            pw: self.padding.1,
            dh: self.dilation.0,
            dw: self.dilation.1,
            oh,
            ow,
        };
        let bias = self.bias.as_ref().map(|b| b.data());
        if geom.cin_g == 1 {
            conv_direct(&geom, input, self.weight.data(), bias, out);
        } else {
            conv_gemm(&geom, input, self.weight.data(), bias, out);
        }
        Ok(())
    }
}

/// cuDNN set-ups by the full geometry they were built for.
type CudnnPlans = Mutex<HashMap<PlanKey, CudnnConv>>;

/// `(n, h, w)` of the input and the layer's stride, padding, dilation and groups (public fields
/// that may change between calls).
type PlanKey = ([usize; 3], [(usize, usize); 3], usize);

/// Plans kept per layer: enough for a few batch sizes; beyond, the oldest set is dropped.
const MAX_CUDNN_PLANS: usize = 4;

/// A dense layer's weight and bias on one device, in PyTorch's layout.
pub(crate) struct DenseDeviceWeights {
    pub(crate) weight: CudaSlice<f32>,
    bias: Option<CudaSlice<f32>>,
}

impl DenseDeviceWeights {
    /// The copy in `cache` for `backend`, uploaded when missing or stale.
    pub(crate) fn cached(
        cache: &DeviceCache<Self>,
        backend: &Arc<CudaBackend>,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Arc<Self>> {
        let mut sources = vec![weight];
        sources.extend(bias);
        cache.get(backend, &sources, || Self::upload(backend, weight, bias))
    }

    fn upload(backend: &CudaBackend, weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let stream = backend.stream();
        Ok(Self {
            weight: stream.clone_htod(weight.data())?,
            bias: bias.map(|b| stream.clone_htod(b.data())).transpose()?,
        })
    }
}

/// Launches `dense_conv2d` for geometry `g` (`x` and `out` hold the elements `g` implies).
pub(crate) fn launch_dense_conv(
    x: &DeviceTensor,
    weights: &DenseDeviceWeights,
    g: ConvGeometry,
    out: &mut DeviceTensor,
) -> Result<()> {
    x.len_u32()?;
    out.len_u32()?;
    if g.pixels() == 0 || g.cout == 0 {
        return Ok(());
    }
    let backend = x.backend();
    let function = backend.function("dense_conv2d")?;
    let stream = backend.stream();
    let has_bias = weights.bias.is_some() as u32;
    // Without a bias the kernel never reads the pointer; any valid one will do.
    let bias = weights.bias.as_ref().unwrap_or(&weights.weight);
    let geometry = ByValue(g);
    let (splits, k_chunk) = split_k(&g);
    // A split reduction writes one partial output per split, summed in split order below.
    let mut partials = if splits > 1 {
        // SAFETY: every split's CTAs write every element of their partial output.
        Some(unsafe { stream.alloc::<f32>(splits as usize * out.len())? })
    } else {
        None
    };
    let mut launch = stream.launch_builder(&function);
    launch
        .arg(x.slice())
        .arg(&weights.weight)
        .arg(bias)
        .arg(&has_bias);
    match partials.as_mut() {
        Some(p) => launch.arg(p),
        None => launch.arg(out.slice_mut()),
    };
    launch.arg(&geometry).arg(&k_chunk);
    // SAFETY: the arguments match `dense_conv2d`'s signature; the buffers hold what `g` implies
    // (the partials one output per split); `split_k` gave the chunk and the grid's depth.
    unsafe {
        launch.launch(LaunchConfig {
            grid_dim: g.grid(splits),
            block_dim: (DENSE_CONV_THREADS, 1, 1),
            shared_mem_bytes: DENSE_CONV_SHARED_BYTES,
        })?
    };
    if let Some(partials) = partials {
        let sum = backend.function("sum_partials")?;
        let len = out.len() as u64;
        let mut launch = stream.launch_builder(&sum);
        launch
            .arg(&partials)
            .arg(out.slice_mut())
            .arg(&len)
            .arg(&splits);
        // SAFETY: `partials` holds `splits · len` floats and `out` holds `len`.
        unsafe { launch.launch(elementwise_config(len as usize, ELEMENTWISE_THREADS))? };
    }
    Ok(())
}

impl Operator for Conv2d {
    fn type_name(&self) -> &'static str {
        "Conv2d"
    }

    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [x] = expect_inputs::<1, _>("Conv2d", inputs)?;
        self.forward_cuda(x)
    }

    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = expect_inputs::<1, _>("Conv2d", inputs)?;
        let out_shape = self.output_shape(x.shape())?;
        let dims = x.shape();
        let (h, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let n: usize = dims[..dims.len() - 3].iter().product();
        let mut out = vec![0.0f32; out_shape.iter().product()];
        self.forward_nchw(x.data(), n, h, w, &mut out)?;
        Tensor::new(out_shape, out)
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        let mut p = vec![("weight", &self.weight)];
        if let Some(b) = &self.bias {
            p.push(("bias", b));
        }
        p
    }

    fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        self.device.clear();
        self.cudnn.clear();
        let mut p = vec![("weight", &mut self.weight)];
        if let Some(b) = &mut self.bias {
            p.push(("bias", b));
        }
        p
    }

    /// E.g. `"3x3 s1 p1 64->64"`, with `d2`, `g32` and `nobias` appended when they apply.
    fn describe(&self) -> String {
        let (kh, kw) = self.kernel_size();
        let mut s = format!(
            "{kh}x{kw} s{} p{} {}->{}",
            pair(self.stride),
            pair(self.padding),
            self.in_channels(),
            self.out_channels()
        );
        if self.dilation != (1, 1) {
            s += &format!(" d{}", pair(self.dilation));
        }
        if self.groups != 1 {
            s += &format!(" g{}", self.groups);
        }
        if self.bias.is_none() {
            s += " nobias";
        }
        s
    }

    crate::impl_as_any!();
}

/// `"2"` for `(2, 2)`, `"(1,2)"` otherwise.
pub(crate) fn pair((a, b): (usize, usize)) -> String {
    if a == b {
        a.to_string()
    } else {
        format!("({a},{b})")
    }
}

/// The geometry of one `forward_nchw` call.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    groups: usize,
    cin_g: usize,
    cout_g: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    dh: usize,
    dw: usize,
    oh: usize,
    ow: usize,
}

impl Geom {
    /// Output pixels per image.
    fn p(&self) -> usize {
        self.oh * self.ow
    }

    /// GEMM depth: `Cin/g · kh · kw`.
    fn k(&self) -> usize {
        self.cin_g * self.kh * self.kw
    }

    /// 1×1, stride 1, no padding: the input plane is the GEMM operand as it is.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.ph == 0 && self.pw == 0
    }

    /// For kernel column `j`: the output columns `[lo, hi)` whose input column
    /// `ow·sw + j·dw - pw` lies inside `[0, w)`.
    fn ow_range(&self, j: usize) -> (usize, usize) {
        Self::valid_range(self.ow, self.w, self.sw, j * self.dw, self.pw)
    }

    /// For kernel row `i`: the output rows whose input row lies inside `[0, h)`.
    fn oh_range(&self, i: usize) -> (usize, usize) {
        Self::valid_range(self.oh, self.h, self.sh, i * self.dh, self.ph)
    }

    /// The `o` in `[0, out)` with `0 <= o·s + off - pad < size`.
    fn valid_range(out: usize, size: usize, s: usize, off: usize, pad: usize) -> (usize, usize) {
        let lo = if off >= pad {
            0
        } else {
            (pad - off).div_ceil(s)
        };
        let hi = if size + pad > off {
            ((size + pad - off - 1) / s + 1).min(out)
        } else {
            0
        };
        (lo.min(hi), hi)
    }
}

/// A raw output pointer shared by the parallel blocks. Each block writes a region of the output
/// that no other block touches (its image range × its group's channels × its column range).
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the pointer is only used to write disjoint regions, one per block (see `conv_gemm`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// How the column space (all images' output pixels) is cut into GEMM blocks.
#[derive(Clone, Copy, Debug)]
enum Blocking {
    /// Each image's `P` columns are split into `per_image` blocks.
    WithinImage { per_image: usize },
    /// Blocks of `images` whole images (the last may hold fewer).
    Images { images: usize },
}

impl Blocking {
    fn choose(g: &Geom, threads: usize) -> (Blocking, usize) {
        let p = g.p();
        if p >= COL_BLOCK || g.n == 1 {
            let mut per_image = p.div_ceil(COL_BLOCK).max(1);
            // With few blocks, split images further until every thread gets as many blocks (but
            // not below 64 columns a block).
            let total = |pi: usize| pi * g.n * g.groups;
            while total(per_image) < 8 * threads
                && total(per_image) % threads != 0
                && p / (per_image + 1) >= 64
            {
                per_image += 1;
            }
            (Blocking::WithinImage { per_image }, g.n * per_image)
        } else {
            // Small images: batch whole images into one GEMM, with at least `threads` blocks.
            let want = (g.n * p)
                .div_ceil(COL_BLOCK)
                .max(threads.div_ceil(g.groups))
                .min(g.n);
            let images = g.n.div_ceil(want.max(1));
            (Blocking::Images { images }, g.n.div_ceil(images))
        }
    }
}

/// The im2col + GEMM convolution (see the module docs).
fn conv_gemm(g: &Geom, input: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    let threads = rayon::current_num_threads();
    let (blocking, blocks) = Blocking::choose(g, threads);
    let tasks = blocks * g.groups;
    // Only when there are too few blocks to share out does the GEMM itself go parallel.
    let par = if tasks >= threads || threads == 1 {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    };
    let out_ptr = OutPtr(out.as_mut_ptr());
    let (p, k) = (g.p(), g.k());
    let img_in = g.groups * g.cin_g * g.h * g.w;
    let img_out = g.groups * g.cout_g * p;
    let run = |bufs: &mut (Vec<f32>, Vec<f32>), task: usize| {
        let (col, stage) = bufs;
        let (block, grp) = (task / g.groups, task % g.groups);
        let w_g = &weight[grp * g.cout_g * k..][..g.cout_g * k];
        let b_g = bias.map(|b| &b[grp * g.cout_g..][..g.cout_g]);
        let in_g =
            |img: usize| &input[img * img_in + grp * g.cin_g * g.h * g.w..][..g.cin_g * g.h * g.w];
        match blocking {
            Blocking::WithinImage { per_image } => {
                let (img, cb) = (block / per_image, block % per_image);
                let (p0, p1) = (cb * p / per_image, (cb + 1) * p / per_image);
                let cols = p1 - p0;
                let x = in_g(img);
                let (rhs, rhs_rs): (&[f32], usize) = if g.pointwise() {
                    (&x[p0..], p)
                } else {
                    col.resize(k * cols, 0.0);
                    im2col(g, x, p0, p1, col, cols, 0);
                    (col, cols)
                };
                // SAFETY: rows [grp·cout_g, (grp+1)·cout_g) × columns [p0, p1) of image `img`
                // belong to this task alone, and lie inside `out` (checked by the caller).
                unsafe {
                    let dst = out_ptr.get().add(img * img_out + grp * g.cout_g * p + p0);
                    if let Some(b) = b_g {
                        for (co, &bv) in b.iter().enumerate() {
                            std::slice::from_raw_parts_mut(dst.add(co * p), cols).fill(bv);
                        }
                    }
                    sgemm(
                        g.cout_g,
                        cols,
                        k,
                        dst,
                        p,
                        b_g.is_some(),
                        w_g.as_ptr(),
                        k,
                        rhs.as_ptr(),
                        rhs_rs,
                        par,
                    );
                }
            }
            Blocking::Images { images } => {
                let i0 = block * images;
                let i1 = (i0 + images).min(g.n);
                let cols = (i1 - i0) * p;
                col.resize(k * cols, 0.0);
                for img in i0..i1 {
                    let x = in_g(img);
                    if g.pointwise() {
                        for c in 0..g.cin_g {
                            col[c * cols + (img - i0) * p..][..p].copy_from_slice(&x[c * p..][..p]);
                        }
                    } else {
                        im2col(g, x, 0, p, col, cols, (img - i0) * p);
                    }
                }
                stage.resize(g.cout_g * cols, 0.0);
                if let Some(b) = b_g {
                    for (co, &bv) in b.iter().enumerate() {
                        stage[co * cols..][..cols].fill(bv);
                    }
                }
                // SAFETY: `stage` is [cout_g, cols], `w_g` [cout_g, k], `col` [k, cols].
                unsafe {
                    sgemm(
                        g.cout_g,
                        cols,
                        k,
                        stage.as_mut_ptr(),
                        cols,
                        b_g.is_some(),
                        w_g.as_ptr(),
                        k,
                        col.as_ptr(),
                        cols,
                        par,
                    );
                }
                for img in i0..i1 {
                    for co in 0..g.cout_g {
                        let src = &stage[co * cols + (img - i0) * p..][..p];
                        // SAFETY: channel grp·cout_g + co of image `img` belongs to this task.
                        unsafe {
                            let dst = out_ptr.get().add(img * img_out + (grp * g.cout_g + co) * p);
                            std::ptr::copy_nonoverlapping(src.as_ptr(), dst, p);
                        }
                    }
                }
            }
        }
    };
    if tasks == 1 || threads == 1 {
        let mut bufs = (Vec::new(), Vec::new());
        (0..tasks).for_each(|t| run(&mut bufs, t));
    } else {
        (0..tasks)
            .into_par_iter()
            .with_max_len(1)
            .for_each_init(|| (Vec::new(), Vec::new()), run);
    }
}

/// Lowers output columns `[p0, p1)` of one image and group (`x` is `[cin_g, h, w]`) into `dst`:
/// row `(c·kh + i)·kw + j` gets, at `dst[row·ld + off ..][.. p1 - p0]`, the input values that
/// kernel tap `(c, i, j)` meets at those output pixels (0 in the padding).
fn im2col(g: &Geom, x: &[f32], p0: usize, p1: usize, dst: &mut [f32], ld: usize, off: usize) {
    let plane = g.h * g.w;
    let ow_ranges: Vec<(usize, usize)> = (0..g.kw).map(|j| g.ow_range(j)).collect();
    for c in 0..g.cin_g {
        let xc = &x[c * plane..][..plane];
        for i in 0..g.kh {
            let row0 = (c * g.kh + i) * g.kw;
            // One output row (a segment of the block's columns) at a time.
            let mut pix = p0;
            while pix < p1 {
                let (oh, ow0) = (pix / g.ow, pix % g.ow);
                let ow1 = g.ow.min(ow0 + (p1 - pix));
                let at = off + pix - p0;
                let ih = (oh * g.sh + i * g.dh) as isize - g.ph as isize;
                if ih < 0 || ih as usize >= g.h {
                    for j in 0..g.kw {
                        dst[(row0 + j) * ld + at..][..ow1 - ow0].fill(0.0);
                    }
                } else {
                    let xr = &xc[ih as usize * g.w..][..g.w];
                    for (j, &(lo, hi)) in ow_ranges.iter().enumerate() {
                        let seg = &mut dst[(row0 + j) * ld + at..][..ow1 - ow0];
                        let a = lo.clamp(ow0, ow1);
                        let b = hi.clamp(a, ow1);
                        let (head, rest) = seg.split_at_mut(a - ow0);
                        let (inner, tail) = rest.split_at_mut(b - a);
                        head.fill(0.0);
                        tail.fill(0.0);
                        if a < b {
                            // ow ≥ lo, so the input column is ≥ 0.
                            let src = &xr[a * g.sw + j * g.dw - g.pw..];
                            gather(inner, src, g.sw);
                        }
                    }
                }
                pix += ow1 - ow0;
            }
        }
    }
}

/// `dst[t] = src[t·stride]` for every `t` (the caller guarantees `src` is long enough).
#[inline]
fn gather(dst: &mut [f32], src: &[f32], stride: usize) {
    match stride {
        1 => dst.copy_from_slice(&src[..dst.len()]),
        2 => {
            let n = dst.len();
            let src = &src[..2 * n - 1];
            let (body, last) = dst.split_at_mut(n - 1);
            for (o, pair) in body.iter_mut().zip(src.chunks_exact(2)) {
                *o = pair[0];
            }
            last[0] = src[2 * n - 2];
        }
        _ => {
            for (o, &v) in dst.iter_mut().zip(src.iter().step_by(stride)) {
                *o = v;
            }
        }
    }
}

/// One input channel per group (depthwise and friends): each output plane is accumulated tap by
/// tap, in parallel over (image, output channel) planes.
fn conv_direct(g: &Geom, input: &[f32], weight: &[f32], bias: Option<&[f32]>, out: &mut [f32]) {
    let p = g.p();
    let cout = g.groups * g.cout_g;
    let plane = g.h * g.w;
    let taps = g.kh * g.kw;
    let ow_ranges: Vec<(usize, usize)> = (0..g.kw).map(|j| g.ow_range(j)).collect();
    let one = |(idx, y): (usize, &mut [f32])| {
        let (img, co) = (idx / cout, idx % cout);
        let ci = co / g.cout_g; // the group's one input channel
        let x = &input[(img * g.groups + ci) * plane..][..plane];
        let wk = &weight[co * taps..][..taps];
        y.fill(bias.map_or(0.0, |b| b[co]));
        for i in 0..g.kh {
            let (oh_lo, oh_hi) = g.oh_range(i);
            for oh in oh_lo..oh_hi {
                let ih = oh * g.sh + i * g.dh - g.ph;
                let xr = &x[ih * g.w..][..g.w];
                let yr = &mut y[oh * g.ow..][..g.ow];
                for (j, &(lo, hi)) in ow_ranges.iter().enumerate() {
                    if lo >= hi {
                        continue;
                    }
                    let wv = wk[i * g.kw + j];
                    let first = lo * g.sw + j * g.dw - g.pw;
                    if g.sw == 1 {
                        for (o, &v) in yr[lo..hi].iter_mut().zip(&xr[first..first + (hi - lo)]) {
                            *o += wv * v;
                        }
                    } else {
                        for (t, o) in yr[lo..hi].iter_mut().enumerate() {
                            *o += wv * xr[first + t * g.sw];
                        }
                    }
                }
            }
        }
    };
    let work = g.n * cout * p * taps;
    if work < 1 << 15 {
        out.chunks_mut(p).enumerate().for_each(one);
    } else {
        out.par_chunks_mut(p).enumerate().for_each(one);
    }
}

/// Row-major f32 GEMM through the `gemm` crate: `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`, where row `r`
/// of each matrix starts `r·*_rs` elements after its pointer and columns are contiguous. With
/// `accumulate`, the product is added to what `dst` holds; otherwise `dst` is overwritten.
///
/// # Safety
/// As for [`sgemm_strided`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    par: gemm::Parallelism,
) {
    sgemm_strided(
        m,
        n,
        k,
        dst,
        (dst_rs as isize, 1),
        accumulate,
        lhs,
        (lhs_rs as isize, 1),
        rhs,
        (rhs_rs as isize, 1),
        par,
    );
}

/// f32 GEMM through the `gemm` crate with arbitrary strides: `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`,
/// each matrix given by its pointer and `(row stride, column stride)` in elements. With
/// `accumulate`, the product is added to what `dst` holds; otherwise `dst` is overwritten.
///
/// # Safety
/// The three pointers must address matrices of those shapes and strides, `dst` writable and not
/// overlapping the others.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    (dst_rs, dst_cs): (isize, isize),
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (isize, isize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (isize, isize),
    par: gemm::Parallelism,
) {
    // gemm computes dst = alpha·dst + beta·lhs·rhs (alpha ignored unless dst is read).
    gemm::gemm(
        m, n, k, dst, dst_cs, dst_rs, accumulate, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, 1.0,
        1.0, false, false, false, par,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::SplitMix64;

    fn rand_vec(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
    }

    /// The textbook definition, in f64.
    fn reference(conv: &Conv2d, x: &Tensor) -> Vec<f64> {
        let s = x.shape();
        let (c, h, w) = (s[s.len() - 3], s[s.len() - 2], s[s.len() - 1]);
        let n: usize = s[..s.len() - 3].iter().product();
        let (kh, kw) = conv.kernel_size();
        let (oh, ow) = conv.output_hw(h, w).unwrap();
        let cout = conv.out_channels();
        let cin_g = c / conv.groups;
        let cout_g = cout / conv.groups;
        let (xd, wd) = (x.data(), conv.weight.data());
        let mut out = vec![0f64; n * cout * oh * ow];
        for b in 0..n {
            for co in 0..cout {
                let grp = co / cout_g;
                for y in 0..oh {
                    for xo in 0..ow {
                        let mut acc = conv.bias.as_ref().map_or(0.0, |bs| bs.data()[co] as f64);
                        for ci in 0..cin_g {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let ih = (y * conv.stride.0 + i * conv.dilation.0) as isize
                                        - conv.padding.0 as isize;
                                    let iw = (xo * conv.stride.1 + j * conv.dilation.1) as isize
                                        - conv.padding.1 as isize;
                                    if ih < 0 || iw < 0 || ih as usize >= h || iw as usize >= w {
                                        continue;
                                    }
                                    let xv = xd[((b * c + grp * cin_g + ci) * h + ih as usize) * w
                                        + iw as usize]
                                        as f64;
                                    let wv = wd[((co * cin_g + ci) * kh + i) * kw + j] as f64;
                                    acc += xv * wv;
                                }
                            }
                        }
                        out[((b * cout + co) * oh + y) * ow + xo] = acc;
                    }
                }
            }
        }
        out
    }

    /// Normwise relative error `max|got - ref| / max|ref|`.
    fn rel_err(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        got.iter()
            .zip(want)
            .fold(0f64, |m, (&g, &r)| m.max((g as f64 - r).abs()))
            / scale
    }

    struct Case {
        lead: Vec<usize>,
        cin: usize,
        cout: usize,
        hw: (usize, usize),
        k: (usize, usize),
        s: (usize, usize),
        p: (usize, usize),
        d: (usize, usize),
        groups: usize,
        bias: bool,
    }

    fn check(case: &Case, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let wshape = vec![case.cout, case.cin / case.groups, case.k.0, case.k.1];
        let weight =
            Tensor::new(wshape.clone(), rand_vec(&mut rng, wshape.iter().product())).unwrap();
        let bias = case
            .bias
            .then(|| Tensor::new(vec![case.cout], rand_vec(&mut rng, case.cout)).unwrap());
        let conv = Conv2d::new(weight, bias, case.s, case.p, case.d, case.groups).unwrap();
        let mut shape = case.lead.clone();
        shape.extend([case.cin, case.hw.0, case.hw.1]);
        let x = Tensor::new(shape.clone(), rand_vec(&mut rng, shape.iter().product())).unwrap();
        let y = conv.forward(&[&x]).unwrap();
        let want = reference(&conv, &x);
        let err = rel_err(y.data(), &want);
        let (oh, ow) = conv.output_hw(case.hw.0, case.hw.1).unwrap();
        let mut want_shape = case.lead.clone();
        want_shape.extend([case.cout, oh, ow]);
        assert_eq!(y.shape(), want_shape.as_slice(), "{}", conv.describe());
        assert!(
            err < 1e-5,
            "{} on {shape:?}: relative error {err:e}",
            conv.describe()
        );
    }

    #[test]
    fn matches_reference_over_many_geometries() {
        let mut seed = 1;
        for &k in &[1usize, 3, 5, 7] {
            for &s in &[1usize, 2] {
                for &p in &[0usize, 1, 3] {
                    for &d in &[1usize, 2] {
                        for &(cin, cout, groups) in &[(3, 4, 1), (4, 6, 2), (4, 4, 4), (4, 8, 4)] {
                            let hw = (9 + k % 3, 11 - s);
                            let span = d * (k - 1) + 1;
                            if hw.0 + 2 * p < span || hw.1 + 2 * p < span {
                                continue;
                            }
                            seed += 1;
                            let case = Case {
                                lead: if seed % 3 == 0 { vec![2, 3] } else { vec![2] },
                                cin,
                                cout,
                                hw,
                                k: (k, k),
                                s: (s, s),
                                p: (p, p),
                                d: (d, d),
                                groups,
                                bias: seed % 2 == 0,
                            };
                            check(&case, seed);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rectangular_and_asymmetric_geometry() {
        let cases = [
            ((3, 5), (1, 2), (0, 2), (2, 1), (13, 10)),
            ((5, 1), (2, 1), (2, 0), (1, 1), (12, 7)),
            ((1, 1), (2, 3), (0, 0), (1, 1), (11, 13)),
            ((1, 1), (1, 1), (1, 0), (1, 1), (5, 6)),
            ((2, 4), (3, 2), (1, 3), (2, 3), (9, 14)),
        ];
        for (seed, &(k, s, p, d, hw)) in cases.iter().enumerate() {
            for groups in [1, 3] {
                let case = Case {
                    lead: vec![3],
                    cin: 6,
                    cout: 9,
                    hw,
                    k,
                    s,
                    p,
                    d,
                    groups,
                    bias: true,
                };
                check(&case, 100 + seed as u64);
            }
        }
    }

    #[test]
    fn blockings_all_agree() {
        // Large planes (split within an image), small planes (several images per GEMM), one
        // image, 5-D input, 1x1 pointwise with and without batching.
        let cases = [
            (vec![2], 8, 16, (40, 40), 3, 1, 1, 1),
            (vec![1], 8, 16, (40, 30), 3, 2, 1, 2),
            (vec![3, 4], 16, 8, (5, 6), 3, 1, 1, 1),
            (vec![7], 12, 10, (7, 7), 1, 1, 0, 1),
            (vec![2], 12, 10, (33, 31), 1, 1, 0, 2),
            (vec![5], 6, 4, (9, 9), 1, 2, 0, 1),
            (vec![1], 5, 7, (3, 3), 3, 1, 1, 1),
        ];
        for (i, (lead, cin, cout, hw, k, s, p, groups)) in cases.into_iter().enumerate() {
            let case = Case {
                lead,
                cin,
                cout,
                hw,
                k: (k, k),
                s: (s, s),
                p: (p, p),
                d: (1, 1),
                groups,
                bias: i % 2 == 1,
            };
            check(&case, 200 + i as u64);
        }
    }

    #[test]
    fn depthwise_with_channel_multiplier() {
        for (i, &(k, s, p, d)) in [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 2), (7, 2, 3, 1)]
            .iter()
            .enumerate()
        {
            let case = Case {
                lead: vec![2, 2],
                cin: 6,
                cout: 12,
                hw: (15, 12),
                k: (k, k),
                s: (s, s),
                p: (p, p),
                d: (d, d),
                groups: 6,
                bias: i % 2 == 0,
            };
            check(&case, 300 + i as u64);
        }
    }

    #[test]
    fn forward_nchw_matches_forward() {
        let mut rng = SplitMix64::new(7);
        let weight = Tensor::new(vec![5, 3, 3, 3], rand_vec(&mut rng, 135)).unwrap();
        let conv = Conv2d::new(weight, None, (1, 1), (1, 1), (1, 1), 1).unwrap();
        let x = Tensor::new(vec![2, 3, 6, 6], rand_vec(&mut rng, 216)).unwrap();
        let y = conv.forward(&[&x]).unwrap();
        let mut out = vec![f32::NAN; y.len()];
        conv.forward_nchw(x.data(), 2, 6, 6, &mut out).unwrap();
        assert_eq!(out, y.data());
        assert!(conv.forward_nchw(x.data(), 2, 6, 6, &mut out[1..]).is_err());
        assert!(conv
            .forward_nchw(&x.data()[1..], 2, 6, 6, &mut out)
            .is_err());
    }

    #[test]
    fn bad_shapes_are_errors() {
        let w = |s: Vec<usize>| Tensor::zeros(s);
        // Weight rank, groups, bias shape, stride, dilation.
        assert!(Conv2d::new(w(vec![4, 3, 3]), None, (1, 1), (0, 0), (1, 1), 1).is_err());
        assert!(Conv2d::new(w(vec![5, 2, 3, 3]), None, (1, 1), (0, 0), (1, 1), 2).is_err());
        assert!(Conv2d::new(w(vec![4, 2, 3, 3]), None, (1, 1), (0, 0), (1, 1), 0).is_err());
        let bad_bias = Some(Tensor::zeros(vec![3]));
        assert!(Conv2d::new(w(vec![4, 2, 3, 3]), bad_bias, (1, 1), (0, 0), (1, 1), 1).is_err());
        assert!(Conv2d::new(w(vec![4, 2, 3, 3]), None, (0, 1), (0, 0), (1, 1), 1).is_err());
        assert!(Conv2d::new(w(vec![4, 2, 3, 3]), None, (1, 1), (0, 0), (1, 0), 1).is_err());

        let conv = Conv2d::new(w(vec![4, 2, 3, 3]), None, (1, 1), (0, 0), (1, 1), 2).unwrap();
        assert_eq!(conv.in_channels(), 4);
        // Wrong channel count, too few dims, input smaller than the kernel, input count.
        for shape in [vec![2, 3, 8, 8], vec![8, 8], vec![1, 4, 2, 8]] {
            let x = Tensor::zeros(shape.clone());
            match conv.forward(&[&x]) {
                Err(Error::Shape(msg)) => assert!(!msg.is_empty()),
                other => panic!("{shape:?}: expected a shape error, got {other:?}"),
            }
        }
        let x = Tensor::zeros(vec![1, 4, 8, 8]);
        assert!(conv.forward(&[&x, &x]).is_err());
        assert!(conv.forward(&[]).is_err());
        // An empty batch is fine.
        let y = conv.forward(&[&Tensor::zeros(vec![0, 4, 8, 8])]).unwrap();
        assert_eq!(y.shape(), &[0, 4, 6, 6]);
    }

    #[test]
    fn params_and_describe() {
        let mut conv = Conv2d::new(
            Tensor::zeros(vec![64, 64, 3, 3]),
            Some(Tensor::zeros(vec![64])),
            (1, 1),
            (1, 1),
            (1, 1),
            1,
        )
        .unwrap();
        assert_eq!(conv.describe(), "3x3 s1 p1 64->64");
        let names: Vec<_> = conv.params().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["weight", "bias"]);
        assert_eq!(conv.params_mut().len(), 2);
        conv.bias = None;
        conv.groups = 2;
        conv.stride = (1, 2);
        assert_eq!(conv.describe(), "3x3 s(1,2) p1 128->64 g2 nobias");
        assert_eq!(conv.type_name(), "Conv2d");
        assert!(conv.as_any().downcast_ref::<Conv2d>().is_some());
    }
}
