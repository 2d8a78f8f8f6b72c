//! `SparseConv2d`: a convolution whose input is spikes (binary, or small non-negative integers
//! for SEW ResNets), computed with work proportional to the number of non-zero inputs.
//!
//! `optimize` swaps it in for every `Conv2d` fed by spiking neurons; it can also be built directly
//! from a dense layer ([`SparseConv2d::from_dense`]) or from weights and geometry
//! ([`SparseConv2d::new`]). It computes the same function as the dense [`Conv2d`] it carries, on
//! any input.
//!
//! ```
//! use sparseflow::ops::conv2d::Conv2d;
//! use sparseflow::ops::sparse_conv2d::{BlockChoice, SparseConv2d};
//! use sparseflow::ops::Operator;
//! use sparseflow::testing::random_spikes;
//! use sparseflow::Tensor;
//!
//! let weight = Tensor::new(vec![8, 4, 3, 3], (0..288).map(|i| (i % 7) as f32 - 3.0).collect())?;
//! let dense = Conv2d::new(weight, None, (1, 1), (1, 1), (1, 1), 1)?;
//! let sparse = SparseConv2d::from_dense(&dense, BlockChoice::Fixed(Some(8)));
//! // [T, N, C, H, W] spikes at 10% density.
//! let x = random_spikes(&[2, 1, 4, 16, 16], 0.1, 42);
//! let y = sparse.forward(&[&x])?;
//! assert_eq!(y, dense.forward(&[&x])?);
//! assert!(sparse.last_forward_time().is_some());
//! # Ok::<(), sparseflow::Error>(())
//! ```
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use rayon::prelude::*;
use sparseflow_kernels::sparse_conv::{
    bitmap_masks_blocks, conv_shared_bytes, mask_words, preferred_shapes, SparseConvVariant,
    CONV_THREADS, PACK_THREADS, SPARSE_CONV_VARIANTS,
};

use crate::cuda::{launch_kernel, CudaBackend, DeviceCache, DeviceTensor, GpuTimer, KernelArg};
use crate::error::{Error, Result};
use crate::impl_as_any;
use crate::ops::conv2d::Conv2d;
use crate::ops::pattern_conv::{
    pattern_conv_cpu, pattern_conv_cuda, DevicePatternTables, PatternTables, MIN_ROWS_PER_LOOKUP,
};
use crate::ops::spike_gather::{
    accumulate, cached_upload, has_avx2, has_avx512, has_avx512_vbmi2, AlignedFloats,
    DeviceGatherWeights, DisjointWrites, GatherWeights,
};
use crate::ops::tensor_conv::{self, tensor_conv_cuda, TensorConvWeights};
use crate::ops::{expect_inputs, Operator};
use crate::optimize::block_selector::{BlockSelector, BlockSize};
use crate::tensor::{AlignedOutput, Tensor};
use sparseflow_kernels::pattern_conv::SEGMENT_BITS;
use sparseflow_kernels::sweep_conv::{
    stage_pixels, sweep_stage_groups, sweep_strip_rows, sweep_supports, SWEEP_CHANNELS,
    SWEEP_PIXELS, SWEEP_SHARED_BYTES, SWEEP_STAGED_SHARED_BYTES, SWEEP_THREADS,
};

/// How the prescan block size is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockChoice {
    /// From the input's height at each forward.
    Auto(BlockSelector),
    /// Chosen ahead (by `optimize` from a known input size, or by the user).
    Fixed(BlockSize),
}

impl BlockChoice {
    pub fn resolve(&self, height: usize) -> BlockSize {
        match self {
            BlockChoice::Auto(selector) => selector.select(height),
            BlockChoice::Fixed(block) => *block,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            BlockChoice::Auto(_) => "auto".into(),
            BlockChoice::Fixed(Some(b)) => b.to_string(),
            BlockChoice::Fixed(None) => "none".into(),
        }
    }
}

#[derive(Debug)]
pub struct SparseConv2d {
    /// The weights and geometry, as a dense layer.
    pub conv: Conv2d,
    pub block: BlockChoice,
    /// Inputs denser than this fraction of non-zeros take the dense path
    /// ([`dense_above_density`] by default; `f64::INFINITY` forces the sparse kernel).
    pub dense_above_density: f64,
    /// Binary inputs whose density times the kernel width reaches this take the pattern-table
    /// path ([`crate::ops::pattern_conv`]; [`MIN_ROWS_PER_LOOKUP`] by default, `f64::INFINITY`
    /// never, 0 always where the geometry allows).
    pub pattern_above: f64,
    last_forward: Mutex<Option<Duration>>,
    /// The weights in gather layout, built on first use.
    gather: Mutex<Option<std::sync::Arc<GatherWeights>>>,
    /// The pattern tables for binary inputs, built on first use (`Some(None)`: the geometry
    /// allows none).
    patterns: Mutex<Option<Option<Arc<PatternTables>>>>,
    /// The same, padded for the GPU kernels and uploaded, on first CUDA use.
    device: Mutex<Option<Arc<DeviceGatherWeights>>>,
    /// The pattern tables on the GPU, on first CUDA use of that path.
    device_patterns: DeviceCache<Option<DevicePatternTables>>,
    /// The weights laid out for the tensor-core path, on first CUDA use of that path.
    device_tensor: DeviceCache<TensorConvWeights>,
    /// Which path CUDA forwards take at the measured input shape, once
    /// [`SparseConv2d::tune_cuda`] has timed them.
    cuda_dispatch: Mutex<Option<(Vec<usize>, CudaDispatch)>>,
}

/// Which GPU kernels compute a sparse convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaKernel {
    /// Mask packing + the element gather, in this compiled variant.
    Gather(SparseConvVariant),
    /// Row packing + the pattern tables ([`crate::ops::pattern_conv`]).
    PatternTables,
}

/// The path a sparse convolution's CUDA forwards take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaDispatch {
    /// The sparse kernels (mask packing + gather).
    Sparse,
    /// The dense engine (cuDNN or the Rust implicit GEMM): measured faster on this layer's input,
    /// e.g. after a max-pool or a SEW ADD, where the input is far from 95% zeros.
    Dense,
    /// The spikes' dense product on the tensor cores at fp32 accuracy
    /// ([`crate::ops::tensor_conv`]): measured faster than both on this layer's input.
    TensorCore,
}

/// What [`SparseConv2d::tune_cuda`] measured.
#[derive(Clone, Copy, Debug)]
pub struct CudaTuning {
    pub sparse_ms: Option<f64>,
    pub dense_ms: f64,
    /// The tensor-core path (`None` where it does not apply: grouped convolutions).
    pub tensor_ms: Option<f64>,
    pub choice: CudaDispatch,
}

impl SparseConv2d {
    /// A sparse twin of `conv`, carrying the same weights (laid out for gathering now, so the
    /// first forward does not pay for it).
    pub fn from_dense(conv: &Conv2d, block: BlockChoice) -> Self {
        let op = Self {
            conv: conv.clone(),
            block,
            dense_above_density: dense_above_density(conv),
            pattern_above: MIN_ROWS_PER_LOOKUP,
            last_forward: Mutex::new(None),
            gather: Mutex::new(None),
            patterns: Mutex::new(None),
            device: Mutex::new(None),
            device_patterns: DeviceCache::default(),
            device_tensor: DeviceCache::default(),
            cuda_dispatch: Mutex::new(None),
        };
        if op.conv.groups == 1 {
            op.gather_weights();
        }
        op
    }

    /// From weights `[Cout, Cin/groups, kh, kw]`, an optional bias `[Cout]` and the geometry.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
        groups: usize,
        block: BlockChoice,
    ) -> Result<Self> {
        let conv = Conv2d::new(weight, bias, stride, padding, dilation, groups)?;
        Ok(Self::from_dense(&conv, block))
    }

    /// Times the sparse kernels and the dense engine on `x` (a representative input: spike
    /// densities differ from layer to layer, and the crossover depends on the GPU) and makes
    /// later CUDA forwards through [`Operator::forward_cuda`] take the faster. Median of
    /// `repeats` after a warm-up, CUDA events.
    pub fn tune_cuda(&self, x: &DeviceTensor, repeats: usize) -> Result<CudaTuning> {
        let timer = GpuTimer::new(x.backend())?;
        let time = |f: &dyn Fn() -> Result<DeviceTensor>| -> Result<f64> {
            f()?;
            let mut times = Vec::new();
            for _ in 0..repeats.max(1) {
                times.push(timer.time(f)?.1);
            }
            times.sort_by(f64::total_cmp);
            Ok(times[times.len() / 2])
        };
        let h = x.shape().iter().rev().nth(1).copied().unwrap_or(0);
        let dense_ms = time(&|| self.conv.forward_cuda(x))?;
        let sparse_ms = match self.cuda_kernel(h) {
            Ok(_) => Some(time(&|| self.forward_cuda(x))?),
            Err(Error::MissingKernelVariant(_)) => None,
            Err(e) => return Err(e),
        };
        let tensor_ms = if tensor_conv::supports(&self.conv) {
            Some(time(&|| self.forward_cuda_tensor(x))?)
        } else {
            None
        };
        let candidates = [
            (Some(dense_ms), CudaDispatch::Dense),
            (sparse_ms, CudaDispatch::Sparse),
            (tensor_ms, CudaDispatch::TensorCore),
        ];
        let choice = candidates
            .iter()
            .filter_map(|&(ms, d)| ms.map(|ms| (ms, d)))
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .map_or(CudaDispatch::Dense, |(_, d)| d);
        if choice != CudaDispatch::TensorCore {
            // Its weights (two halves and an f32 copy per weight) would only hold memory.
            self.device_tensor.evict();
        }
        *self.cuda_dispatch.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((x.shape().to_vec(), choice));
        Ok(CudaTuning {
            sparse_ms,
            dense_ms,
            tensor_ms,
            choice,
        })
    }

    /// The tile side the GPU kernels use for inputs `h` rows high: the block choice, or the
    /// smallest compiled tile when it says no block prescan.
    pub fn gpu_tile(&self, h: usize) -> usize {
        self.block.resolve(h).unwrap_or(4)
    }

    /// The tuned CUDA path, if [`tune_cuda`](Self::tune_cuda) ran (for the input shape it
    /// measured).
    pub fn cuda_dispatch(&self) -> Option<CudaDispatch> {
        self.cuda_dispatch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, d)| *d)
    }

    /// The tuned path for an input of `shape`: a choice measured at another shape does not apply.
    fn cuda_dispatch_for(&self, shape: &[usize]) -> Option<CudaDispatch> {
        self.cuda_dispatch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(s, _)| s == shape)
            .map(|(_, d)| *d)
    }

    /// Mutable access to the dense layer; every derived copy (gather layout, device weights,
    /// tuned path) is dropped and rebuilt on the next forward.
    pub fn conv_mut(&mut self) -> &mut Conv2d {
        *self.gather.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
        *self.patterns.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
        *self.device.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
        self.device_patterns.clear();
        self.device_tensor.clear();
        *self
            .cuda_dispatch
            .get_mut()
            .unwrap_or_else(|p| p.into_inner()) = None;
        &mut self.conv
    }

    /// The convolution on a CUDA tensor `[..., Cin, H, W]`, staying on the device: stage 1 packs
    /// the spikes into per-pixel channel masks (the prescan), stage 2 gathers the active inputs'
    /// weights for each output tile, skipping silent tiles. 3×3 (padding 1) and 1×1 (padding 0)
    /// kernels with stride 1 or 2 run that way, except 3×3 stride-1 layers of up to 64 channels,
    /// which take the column sweep ([`sparseflow_kernels::sweep_conv`]: each non-zero input adds
    /// its weights to the nine outputs it feeds); other kernels 2 to 8 wide (one group, dilation
    /// 1) take the pattern tables ([`CudaKernel`]); other geometries are an error.
    pub fn forward_cuda(&self, x: &DeviceTensor) -> Result<DeviceTensor> {
        let shape = self.conv.output_shape(x.shape())?;
        let mut out = DeviceTensor::uninit(x.backend(), shape)?;
        self.forward_cuda_into(x, &mut out)?;
        Ok(out)
    }

    /// [`forward_cuda`](Self::forward_cuda) into a preallocated output of the right shape.
    pub fn forward_cuda_into(&self, x: &DeviceTensor, out: &mut DeviceTensor) -> Result<()> {
        match self.forward_cuda_sweep(x, out) {
            // Not a sweep layer, or its weights are cached for a wider gather variant.
            Err(Error::MissingKernelVariant(_)) => self.forward_cuda_gather_into(x, out),
            done => done,
        }
    }

    /// [`forward_cuda_into`](Self::forward_cuda_into) without the column sweep: the element
    /// gather, or the pattern tables where no gather variant is compiled.
    pub fn forward_cuda_gather_into(&self, x: &DeviceTensor, out: &mut DeviceTensor) -> Result<()> {
        let h = x.shape().iter().rev().nth(1).copied().unwrap_or(0);
        match self.cuda_kernel(h)? {
            CudaKernel::Gather(variant) => self.forward_cuda_variant(x, out, variant),
            CudaKernel::PatternTables => self.forward_cuda_pattern(x, out),
        }
    }

    /// The GPU kernels for inputs `h` rows high: the element gather where a variant is compiled
    /// for the geometry, else the pattern tables (wide kernels; fast on binary spikes only).
    pub fn cuda_kernel(&self, h: usize) -> Result<CudaKernel> {
        match self.cuda_variant(h) {
            Ok(variant) => Ok(CudaKernel::Gather(variant)),
            Err(Error::MissingKernelVariant(_))
                if PatternTables::supports(&self.conv, 32, SEGMENT_BITS) =>
            {
                Ok(CudaKernel::PatternTables)
            }
            Err(e) => Err(e),
        }
    }

    /// The pattern-table kernels into a preallocated output (see [`crate::ops::pattern_conv`]).
    pub(crate) fn forward_cuda_pattern(
        &self,
        x: &DeviceTensor,
        out: &mut DeviceTensor,
    ) -> Result<()> {
        let start = Instant::now();
        self.check_cuda_output(x, out)?;
        let tables = DevicePatternTables::cached(&self.device_patterns, &self.conv, x.backend())?;
        let tables = tables.as_ref().as_ref().ok_or_else(|| {
            Error::MissingKernelVariant(format!("pattern tables for {}", self.conv.describe()))
        })?;
        pattern_conv_cuda(&self.conv, tables, x, out)?;
        *self.last_forward.lock().unwrap_or_else(|p| p.into_inner()) = Some(start.elapsed());
        Ok(())
    }

    /// The tensor-core kernel (see [`crate::ops::tensor_conv`]) into a new device tensor.
    pub fn forward_cuda_tensor(&self, x: &DeviceTensor) -> Result<DeviceTensor> {
        let shape = self.conv.output_shape(x.shape())?;
        let mut out = DeviceTensor::uninit(x.backend(), shape)?;
        self.forward_cuda_tensor_into(x, &mut out)?;
        Ok(out)
    }

    /// The tensor-core kernel into a preallocated output (see [`crate::ops::tensor_conv`]); any
    /// one-group geometry.
    pub fn forward_cuda_tensor_into(&self, x: &DeviceTensor, out: &mut DeviceTensor) -> Result<()> {
        let start = Instant::now();
        self.check_cuda_output(x, out)?;
        let weights = TensorConvWeights::cached(&self.device_tensor, &self.conv, x.backend())?;
        tensor_conv_cuda(&self.conv, &weights, x, out)?;
        *self.last_forward.lock().unwrap_or_else(|p| p.into_inner()) = Some(start.elapsed());
        Ok(())
    }

    /// The weights laid out for the tensor-core kernels on `backend`, uploaded on first use.
    pub(crate) fn tensor_weights(&self, backend: &CudaBackend) -> Result<Arc<TensorConvWeights>> {
        TensorConvWeights::cached(&self.device_tensor, &self.conv, backend)
    }

    /// `out` has this conv's output shape for `x` and lives on `x`'s device.
    fn check_cuda_output(&self, x: &DeviceTensor, out: &DeviceTensor) -> Result<()> {
        let shape = self.conv.output_shape(x.shape())?;
        if out.shape() != shape.as_slice() {
            return Err(Error::Shape(format!(
                "output is {:?}, expected {shape:?}",
                out.shape()
            )));
        }
        if out.backend().ordinal() != x.backend().ordinal() {
            return Err(Error::InvalidArgument(format!(
                "input on CUDA device {}, output on device {}",
                x.backend().ordinal(),
                out.backend().ordinal()
            )));
        }
        Ok(())
    }

    /// [`forward_cuda_into`](Self::forward_cuda_into) with a chosen kernel variant (tests run
    /// every compiled variant this way).
    pub(crate) fn forward_cuda_variant(
        &self,
        x: &DeviceTensor,
        out: &mut DeviceTensor,
        variant: SparseConvVariant,
    ) -> Result<()> {
        let start = Instant::now();
        self.check_cuda_output(x, out)?;
        let backend = x.backend().clone();
        let (n, cin, h, w) = nchw(x.shape());
        let (oh, ow) = self.conv.output_hw(h, w)?;
        let cout = self.conv.out_channels();
        let shared = conv_shared_bytes(
            variant.block,
            variant.kernel,
            variant.stride,
            u32::try_from(cin).unwrap_or(u32::MAX),
            variant.pass(),
        );
        // Launch limits the dense engine does not have: the caller falls back to it.
        if shared as usize > backend.max_shared_memory_per_block() || n > 65_535 {
            return Err(Error::MissingKernelVariant(format!(
                "{} for {:?}: {shared} bytes of shared memory (the device allows {}) or more \
                 than 65535 images",
                variant.entry,
                x.shape(),
                backend.max_shared_memory_per_block()
            )));
        }
        let weights = self.device_weights(&backend, variant.pass() as usize)?;
        let stream = backend.stream();
        let words = mask_words(cin as u32) as usize;
        let hw = h * w;
        let to_u32 = |v: usize| {
            u32::try_from(v).map_err(|_| {
                Error::Shape(format!("{:?} is too large for the GPU kernels", x.shape()))
            })
        };
        let (n32, cin32, hw32) = (to_u32(n)?, to_u32(cin)?, to_u32(hw)?);
        to_u32(n * words * hw)?;
        to_u32(n * cout.max(cin) * hw.max(oh * ow))?;
        if n * hw == 0 || cout == 0 {
            return Ok(());
        }
        // Stage 1 runs inside the compute kernel, except at stride 1 with 8 channels per lane
        // (the wide 1×1 layers), where a packing pass of its own measured faster (H100, batch
        // 128, 5% spikes, one process: 1×1 64→256 @56 0.424 against 0.494 ms): those CTAs
        // cover 256 output channels, fewer fit on a multiprocessor and each one's window read
        // is exposed. Every other ResNet shape measured faster with the prescan inside (3×3
        // 64→64 @56 0.252 against 0.299 ms).
        let packed = variant.stride == 1 && variant.couts_per_lane == 8;
        let masks = if packed {
            Some(pack_spike_masks(x, (n32, cin32, hw32))?)
        } else {
            None
        };

        let b = variant.block;
        let (tiles_y, tiles_x) = ((oh as u32).div_ceil(b), (ow as u32).div_ceil(b));
        let conv = backend.function_with_shared(variant.entry, shared)?;
        let dims = [h, w, cout, weights.padded_outputs, oh, ow].map(|v| v as u32);
        let mut launch = stream.launch_builder(&conv);
        launch.arg(x.slice());
        // Null pointers: the kernel packs its windows itself.
        let null = 0u64;
        match &masks {
            Some(m) => launch.arg(&m.words).arg(&*m.non_binary),
            None => launch.arg(&null).arg(&null),
        };
        launch
            .arg(&weights.weights)
            .arg(&weights.bias)
            .arg(out.slice_mut())
            .arg(&cin32);
        for d in &dims {
            launch.arg(d);
        }
        launch.arg(&tiles_x);
        // SAFETY: arguments match `sparse_conv_k*_s*_b*`'s signature and contract.
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (
                    tiles_x * tiles_y,
                    n32,
                    (weights.padded_outputs as u32) / variant.pass(),
                ),
                block_dim: (CONV_THREADS, 1, 1),
                shared_mem_bytes: shared,
            })?
        };
        *self.last_forward.lock().unwrap_or_else(|p| p.into_inner()) = Some(start.elapsed());
        Ok(())
    }

    /// Whether the column sweep ([`sparseflow_kernels::sweep_conv`]) computes this layer on `x`:
    /// 3×3, stride 1, padding 1, up to 64 channels in and out, rows a multiple of 4 wide, and
    /// shared memory for the weights.
    pub fn sweep_applies(&self, x: &DeviceTensor) -> bool {
        if x.shape().len() < 3 {
            return false;
        }
        let c = &self.conv;
        let (_, cin, _, w) = nchw(x.shape());
        c.kernel_size() == (3, 3)
            && c.stride == (1, 1)
            && c.padding == (1, 1)
            && c.dilation == (1, 1)
            && c.groups == 1
            && sweep_supports(
                u32::try_from(cin).unwrap_or(u32::MAX),
                u32::try_from(c.out_channels()).unwrap_or(u32::MAX),
                u32::try_from(w).unwrap_or(u32::MAX),
            )
            && x.backend().max_shared_memory_per_block() >= SWEEP_SHARED_BYTES as usize
    }

    /// The column sweep into a preallocated output; [`Error::MissingKernelVariant`] where
    /// [`Self::sweep_applies`] does not hold.
    pub(crate) fn forward_cuda_sweep(
        &self,
        x: &DeviceTensor,
        out: &mut DeviceTensor,
    ) -> Result<()> {
        let start = Instant::now();
        if !self.sweep_applies(x) {
            return Err(Error::MissingKernelVariant(format!(
                "column sweep for {} on {:?}",
                self.conv.describe(),
                x.shape()
            )));
        }
        self.check_cuda_output(x, out)?;
        let (n, cin, h, w) = nchw(x.shape());
        let channels = SWEEP_CHANNELS as usize;
        let too_large =
            || Error::Shape(format!("{:?} is too large for the GPU kernels", x.shape()));
        let elements = n.checked_mul(channels * h * w).ok_or_else(too_large)?;
        u32::try_from(elements).map_err(|_| too_large())?;
        if n * h * w == 0 {
            return Ok(());
        }
        let backend = x.backend().clone();
        let weights = self.device_weights(&backend, channels)?;
        if weights.padded_outputs != channels {
            return Err(Error::MissingKernelVariant(format!(
                "column sweep with weights padded to {} outputs",
                weights.padded_outputs
            )));
        }
        // Below 2³² by the check above.
        let geometry @ [n32, cin32, _, h32, w32] =
            [n, cin, self.conv.out_channels(), h, w].map(|v| v as u32);
        let dims = (n32, cin32, h32 * w32);
        let stream = backend.stream();
        // Held until the sweep is queued: the scratch's masks are this forward's until then.
        let mut scratch = backend
            .sweep_scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let groups = sweep_stage_groups(w32);
        let (o, _o_use) = out.slice_mut().device_ptr_mut(stream);
        // The sm_90a module stores staged rows through a tensor map of the output.
        let out_map = if groups > 0 && backend.has_wgmma() {
            // Without a map (the driver refused it) the storing warps use ordinary stores.
            scratch
                .output_map(o, [n32, geometry[2], h32, w32], stream)
                .unwrap_or(0)
        } else {
            0
        };
        // Masks a marking neuron left on the input, else a packing pass's.
        let (words, flag) = match marked_spike_masks(x, dims) {
            Some(m) => (
                m.words.device_ptr(stream).0,
                m.non_binary.device_ptr(stream).0,
            ),
            None => scratch.pack(x, dims)?,
        };
        let ctas = backend.multiprocessors().max(1) as u32;
        // Where a CTA's warps form groups that store whole rows, only theirs take items.
        let (warps, shared) = match groups {
            0 => (SWEEP_THREADS / 32, SWEEP_SHARED_BYTES),
            g => (g * w32.div_ceil(SWEEP_PIXELS), SWEEP_STAGED_SHARED_BYTES),
        };
        let strip_rows = sweep_strip_rows(n32, h32, w32, ctas * warps);
        let function = backend.function_with_shared("sweep_conv3x3", shared)?;
        let config = LaunchConfig {
            grid_dim: (ctas, 1, 1),
            block_dim: (SWEEP_THREADS, 1, 1),
            shared_mem_bytes: shared,
        };
        let (input, _input_use) = x.slice().device_ptr(stream);
        let (w, _w_use) = weights.weights.device_ptr(stream);
        let (b, _b_use) = weights.bias.device_ptr(stream);
        let mut args = [input, words, flag, w, b, o]
            .map(KernelArg::Pointer)
            .to_vec();
        args.extend(
            geometry
                .iter()
                .chain([&strip_rows, &groups])
                .map(|&d| KernelArg::U32(d)),
        );
        args.push(KernelArg::Pointer(out_map));
        // The sm_90a module's sweep waits for the packing pass in the kernel, so its CTAs may
        // start (and copy the weights) while that pass's last CTAs still run.
        let programmatic = backend.has_wgmma();
        // SAFETY: the arguments are `sweep_conv3x3`'s, in order, under its contract
        // (`sweep_applies`, sizes below 2³², weights padded to 64 outputs, masks of `x`); the
        // launch is programmatic only for the sm_90a build, which waits for the previous kernel
        // before touching the masks, input or output.
        unsafe { launch_kernel(stream, &function, config, &args, programmatic)? };
        drop(scratch);
        *self.last_forward.lock().unwrap_or_else(|p| p.into_inner()) = Some(start.elapsed());
        Ok(())
    }

    /// The compiled variant for this geometry and the block the selector picks at height `h`
    /// (no block prescan means the smallest tile).
    pub(crate) fn cuda_variant(&self, h: usize) -> Result<SparseConvVariant> {
        let c = &self.conv;
        let (kh, kw) = c.kernel_size();
        let supported = kh == kw
            && c.padding == (kh / 2, kw / 2)
            && c.dilation == (1, 1)
            && c.groups == 1
            && c.stride.0 == c.stride.1;
        let block = self.gpu_tile(h) as u32;
        preferred_shapes(c.out_channels() as u32, kh as u32)
            .iter()
            .find_map(|&(lanes, pixels)| {
                SPARSE_CONV_VARIANTS.iter().copied().find(|v| {
                    supported
                        && v.kernel as usize == kh
                        && v.stride as usize == c.stride.0
                        && v.block == block
                        && v.couts_per_lane == lanes
                        && v.pixels_per_warp == pixels
                })
            })
            .ok_or_else(|| {
                Error::MissingKernelVariant(format!(
                    "sparse conv {} block {block} on CUDA",
                    c.describe()
                ))
            })
    }

    /// The weights in gather layout on `backend`'s device (outputs padded to the kernel's pass
    /// of `pass` channels, one zero row appended for lanes without a row), uploaded on first use.
    fn device_weights(
        &self,
        backend: &Arc<CudaBackend>,
        pass: usize,
    ) -> Result<Arc<DeviceGatherWeights>> {
        cached_upload(
            &self.device,
            backend,
            |w| w.padded_outputs % pass == 0,
            || {
                self.gather_weights()
                    .upload(backend, self.conv.bias.as_ref(), pass, 1)
            },
        )
    }

    /// Wall time of the last forward, every stage included.
    pub fn last_forward_time(&self) -> Option<Duration> {
        *self.last_forward.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn compute(&self, x: &Tensor) -> Result<Tensor> {
        let out_shape = self.conv.output_shape(x.shape())?;
        if self.conv.groups != 1 || self.conv.kernel_size().0 > MAX_KERNEL_ROWS {
            return self.conv.forward(&[x]);
        }
        let (n, cin, h, w) = nchw(x.shape());
        let image = cin * h * w;
        // Decide on a sample before paying for the full scan, so a dense input costs the dense
        // path and little more.
        let density = sampled_density(x.data());
        let weights = self.gather_weights();
        // On a cache line, so the transposes' stores of each output run never split one.
        let mut out = AlignedOutput::new(out_shape.iter().product());
        if density * self.conv.kernel_size().1 as f64 >= self.pattern_above {
            if let Some(tables) = self.pattern_tables(weights.padded_outputs) {
                if pattern_conv_cpu(
                    &self.conv,
                    &weights,
                    &tables,
                    x.data(),
                    (n, h, w),
                    out.as_mut_ptr(),
                ) {
                    // SAFETY: pattern_conv_cpu wrote every element of the output.
                    return unsafe { out.assume_written(out_shape) };
                }
            }
        }
        if density > self.dense_above_density {
            return self.conv.forward(&[x]);
        }
        let stride = self.conv.stride.1;
        let used = UsedInputs::new(&self.conv, (h, w), self.conv.output_hw(h, w)?);
        // One image's active inputs, and whether all of its non-zeros are 1.
        let list = |img: &[f32]| {
            let scan = ActiveChannels::scan(img, cin, h, w);
            let source = ListSource {
                scan: &scan,
                image: img,
                hw: (h, w),
                stride,
                binary: scan.binary,
                used: &used,
            };
            (ActiveInputs::new(source), scan.binary)
        };
        let plan = BandPlan::new(&self.conv, &weights, (n, h, w), out.as_mut_ptr());
        let geometry = RowGeometry::new(&self.conv, h, w);
        if plan.group == 1 && n >= 2 * rayon::current_num_threads() {
            // Enough images for every thread: each task scans and lists one image, then fills
            // and writes its bands while the lists are in cache, and one thread's scan (waiting
            // on memory) runs beside another's gather. 3×3 64→64 @56, batch 8, 5%, in one
            // process on the 2-core Xeon: 1.21 → 1.10 ms against lists for all images first.
            // Prefetching the next image's input into L2 during the bands: 1.14–1.18 ms.
            let per_image = plan.bands * plan.chunks.len();
            (0..n).into_par_iter().for_each_init(
                || plan.buffer(),
                |buffer, i| {
                    let (lists, binary) = list(&x.data()[i * image..(i + 1) * image]);
                    for task in i * per_image..(i + 1) * per_image {
                        let band = plan.band(task);
                        let buffer = &mut buffer[..band.rows * plan.ow * band.width];
                        let images = (std::slice::from_ref(&lists), binary);
                        fill_band(&geometry, &weights, &plan.bias, images, &band, buffer);
                        // SAFETY: this is the band's own task.
                        unsafe { plan.write(&band, buffer) };
                    }
                },
            );
            // SAFETY: every band of every image was written.
            return unsafe { out.assume_written(out_shape) };
        }
        // Each image scanned and listed in one task, while its input is still in cache: 3×3
        // 64→64 @56, batch 8, 5%, in one process on the 2-core Xeon, 1.50 → 1.43 ms against a
        // parallel pass for each.
        let mut actives: Vec<(ActiveInputs, bool)> =
            x.data().par_chunks(image.max(1)).map(list).collect();
        // One image with a non-binary value makes the whole batch take the multiplying path, in
        // which a binary image's values are ones.
        let binary = actives.iter().all(|(_, b)| *b);
        if !binary {
            for (lists, _) in actives.iter_mut().filter(|(_, b)| *b) {
                lists.values = vec![1.0; lists.rows.len()];
            }
        }
        let actives: Vec<ActiveInputs> = actives.into_iter().map(|(lists, _)| lists).collect();
        plan.for_each(|band, bias, buffer| {
            let images = (&actives[band.images.clone()], binary);
            fill_band(&geometry, &weights, bias, images, band, buffer);
        });
        // SAFETY: the bands cover every element of the [n, Cout, OH, OW] output.
        unsafe { out.assume_written(out_shape) }
    }

    /// The pattern tables, built on first use; `None` when the geometry allows none.
    fn pattern_tables(&self, padded: usize) -> Option<Arc<PatternTables>> {
        let mut cached = self.patterns.lock().unwrap_or_else(|p| p.into_inner());
        cached
            .get_or_insert_with(|| PatternTables::for_cpu(&self.conv, padded).map(Arc::new))
            .clone()
    }

    /// The weights as `[kh·kw·Cin, Cout]` rows, built on first use.
    fn gather_weights(&self) -> std::sync::Arc<GatherWeights> {
        let mut cached = self.gather.lock().unwrap_or_else(|p| p.into_inner());
        cached
            .get_or_insert_with(|| {
                let (kh, kw) = self.conv.kernel_size();
                let cin = self.conv.in_channels();
                let taps = kh * kw;
                // PyTorch's column index k = (c·kh + ky)·kw + kx; our row is (ky·kw + kx)·Cin + c.
                let row_of = |k: usize| (k % taps) * cin + k / taps;
                std::sync::Arc::new(GatherWeights::from_output_major(
                    self.conv.weight.data(),
                    self.conv.out_channels(),
                    cin * taps,
                    row_of,
                ))
            })
            .clone()
    }
}

/// The column sweep's packing output on one device, kept between forwards: the mask words and
/// two non-binary flags. Each forward's packing pass raises one flag and zeroes the other, the
/// one the next forward raises, so that a forward makes no allocation and no memset (each a
/// driver call the packing pass waits for). Every launch is ordered on the device's one stream,
/// and a forward queues its pass and its sweep under the backend's lock on this scratch.
#[derive(Default)]
pub(crate) struct SweepScratch {
    /// Mask words (grown to the largest map packed so far) and the two flags.
    buffers: Option<(CudaSlice<u32>, CudaSlice<u32>)>,
    /// Forwards packed so far: their parity picks the flag.
    forwards: u64,
    /// The output tensor maps the staged sweep stored through lately, on the device, with their
    /// bytes, most recent last: a network's forwards reuse a few output buffers, so a map is
    /// uploaded again only when its buffer is new.
    output_maps: Vec<(CudaSlice<u64>, [u64; 16])>,
}

/// Output tensor maps [`SweepScratch`] keeps on the device.
const KEPT_OUTPUT_MAPS: usize = 16;

impl SweepScratch {
    /// The device address of a tensor map of `out` (`[n, cout, h, w]` on the device) whose box
    /// is one staged output row, `[stage_pixels(w), 1, cout, 1]`, for the staged sweep's
    /// tensor stores. Queued on the stream before the forward's kernels.
    fn output_map(
        &mut self,
        out: u64,
        [n, cout, h, w]: [u32; 4],
        stream: &Arc<cudarc::driver::CudaStream>,
    ) -> Result<u64> {
        use cudarc::driver::sys;
        let dims = [w, h, cout, n].map(u64::from);
        let strides = [w, w * h, w * h * cout].map(|s| 4 * u64::from(s));
        let boxed = [stage_pixels(w), 1, cout, 1];
        let unit = [1u32; 4];
        // SAFETY: a zeroed tensor map is plain data, overwritten by the encoding.
        let mut map: sys::CUtensorMap = unsafe { std::mem::zeroed() };
        // SAFETY: every array has the rank's entries; `out` is a device address 16-byte
        // aligned (an allocation), its strides multiples of 16 (`w` a multiple of 4).
        unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
                4,
                out as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxed.as_ptr(),
                unit.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_NONE,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
            .result()?;
        }
        let bytes = map.opaque;
        let entry = match self.output_maps.iter().position(|(_, b)| *b == bytes) {
            Some(i) => self.output_maps.remove(i),
            None => {
                // The oldest map's buffer is rewritten in stream order, after the launches
                // that read it.
                let mut device = if self.output_maps.len() >= KEPT_OUTPUT_MAPS {
                    self.output_maps.remove(0).0
                } else {
                    stream.alloc_zeros::<u64>(16)?
                };
                stream.memcpy_htod(&bytes, &mut device)?;
                (device, bytes)
            }
        };
        let address = entry.0.device_ptr(stream).0;
        self.output_maps.push(entry);
        Ok(address)
    }

    /// Queues `spike_mask_pack` over `x` (`(n, cin, hw)`, the caller has checked that `n ·
    /// ceil(cin / 32) · hw` fits a `u32`) and returns the device addresses of its masks and
    /// non-binary flag, valid for the work queued before the next call.
    fn pack(&mut self, x: &DeviceTensor, (n, cin, hw): (u32, u32, u32)) -> Result<(u64, u64)> {
        let backend = x.backend();
        let stream = backend.stream();
        let total = (n * mask_words(cin) * hw).max(1) as usize;
        let (words, flags) = match self.buffers.take() {
            Some((words, flags)) if words.len() >= total => (words, flags),
            old => {
                // SAFETY: the packing pass writes every mask word a sweep reads.
                let words = unsafe { stream.alloc::<u32>(total)? };
                let flags = match old {
                    Some((_, flags)) => flags,
                    None => stream.alloc_zeros::<u32>(2)?,
                };
                (words, flags)
            }
        };
        let buffers = self.buffers.insert((words, flags));
        let words = buffers.0.device_ptr(stream).0;
        let flags = buffers.1.device_ptr(stream).0;
        let slot = self.forwards % 2;
        self.forwards += 1;
        let (flag, clear) = (flags + 4 * slot, flags + 4 * (1 - slot));
        // SAFETY: `words` holds `total` words, `flag` is zero (raised by no pass since the one
        // before last cleared it), `clear` is the other flag, which no queued consumer of this
        // pass reads.
        unsafe { queue_pack(x, (n, cin, hw), 1, [words, flag, clear])? };
        Ok((words, flag))
    }

    /// The non-binary flag the last packing pass raised or left at zero.
    #[cfg(test)]
    fn last_flag(&self, stream: &Arc<cudarc::driver::CudaStream>) -> Result<u32> {
        let (_, flags) = self.buffers.as_ref().expect("a forward packed");
        let slot = (self.forwards + 1) % 2;
        Ok(stream.clone_dtoh(flags)?[slot as usize])
    }
}

/// Stage 1 as a pass of its own (`spike_mask_pack`): the input's channel masks and whether some
/// non-zero is not 1.
#[derive(Debug)]
pub(crate) struct SpikeMasks {
    /// `[n][ceil(Cin / 32)][H·W]` words, bit `j` of word `w` set when channel `32·w + j` is
    /// non-zero.
    pub words: CudaSlice<u32>,
    /// One word, non-zero when some input is neither 0 nor 1 (the backend's shared zero word for
    /// masks from a neuron's bitmap: spikes are binary).
    pub non_binary: Arc<CudaSlice<u32>>,
    /// `(n, Cin, H·W)` of the map they describe.
    pub dims: (u32, u32, u32),
    /// 1: `words` are channel masks of spikes; 2: each pixel's two bit-plane words of small
    /// integers side by side (`tensor_conv2d_spike_planes`), `non_binary` then being set where
    /// some value is out of the planes' range.
    pub planes: u32,
}

impl SpikeMasks {
    /// The masks of a `(n, Cin, H·W)` map (`Cin` a multiple of 32) from the bitmap of its
    /// spikes a marking neuron wrote (`spike_bitmap_masks`; `bitmap` holds `n · Cin · H·W / 32
    /// + 1` words).
    pub(crate) fn from_bitmap(
        backend: &CudaBackend,
        bitmap: &CudaSlice<u32>,
        dims: (u32, u32, u32),
    ) -> Result<Self> {
        Self::transposed(backend, bitmap, None, backend.zero_word(), dims)
    }

    /// The integer kernel's masks of a `(n, Cin, H·W)` map from the two bit-plane bitmaps a
    /// marking neuron wrote (`spike_bitmap_planes`; `bitmaps` holds two of `plane_words` words)
    /// and its out-of-range flag.
    pub(crate) fn from_plane_bitmaps(
        backend: &CudaBackend,
        bitmaps: &CudaSlice<u32>,
        plane_words: usize,
        out_of_range: CudaSlice<u32>,
        dims: (u32, u32, u32),
    ) -> Result<Self> {
        let plane_words = u32::try_from(plane_words)
            .map_err(|_| Error::Shape(format!("{dims:?} is too large for the GPU kernels")))?;
        let flag = Arc::new(out_of_range);
        Self::transposed(backend, bitmaps, Some(plane_words), flag, dims)
    }

    /// `spike_bitmap_masks` over one bitmap, or `spike_bitmap_planes` over two `plane_words`
    /// apart.
    fn transposed(
        backend: &CudaBackend,
        bitmaps: &CudaSlice<u32>,
        plane_words: Option<u32>,
        non_binary: Arc<CudaSlice<u32>>,
        dims: (u32, u32, u32),
    ) -> Result<Self> {
        let (n, cin, hw) = dims;
        let stream = backend.stream();
        let planes = if plane_words.is_some() { 2 } else { 1 };
        let total = n as usize * mask_words(cin) as usize * hw as usize;
        // SAFETY: the transpose writes every word of every plane.
        let mut words = unsafe { stream.alloc::<u32>(planes * total.max(1))? };
        let entry = match plane_words {
            Some(_) => "spike_bitmap_planes",
            None => "spike_bitmap_masks",
        };
        let transpose = backend.function(entry)?;
        let mut launch = stream.launch_builder(&transpose);
        launch
            .arg(bitmaps)
            .arg(&mut words)
            .arg(&n)
            .arg(&cin)
            .arg(&hw);
        if let Some(plane_words) = &plane_words {
            launch.arg(plane_words);
        }
        // SAFETY: arguments match the entry's signature and contract (the caller's map has
        // whole words of channels and each bitmap is one word longer than its bits).
        unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (bitmap_masks_blocks(n, cin, hw).max(1), 1, 1),
                block_dim: (PACK_THREADS, 1, 1),
                shared_mem_bytes: 0,
            })?
        };
        Ok(Self {
            words,
            non_binary,
            dims,
            planes: planes as u32,
        })
    }
}

/// The channel masks of `x` (`[n, cin, hw]` on the device): the ones the neuron that wrote `x`
/// marked, when it did, else a `spike_mask_pack` launch over it; the caller has checked that
/// `n · ceil(cin / 32) · hw` fits a `u32`.
pub(crate) fn pack_spike_masks(x: &DeviceTensor, dims: (u32, u32, u32)) -> Result<Arc<SpikeMasks>> {
    if let Some(masks) = marked_spike_masks(x, dims) {
        return Ok(masks.clone());
    }
    Ok(Arc::new(SpikeMasks::pack(x, dims, 1)?))
}

/// The channel masks a marking neuron left on `x`, where they describe it as `dims`.
fn marked_spike_masks(x: &DeviceTensor, dims: (u32, u32, u32)) -> Option<&Arc<SpikeMasks>> {
    x.spike_masks().filter(|m| m.dims == dims && m.planes == 1)
}

/// Queues a packing pass over `x` (`(n, cin, hw)`, `n · ceil(cin / 32) · hw` below 2³²):
/// `spike_mask_pack` with `planes` 1, `spike_plane_pack` with 2.
///
/// # Safety
/// `words` holds `planes · n · ceil(cin / 32) · hw` words and `flag` one zero word, both alive
/// until the pass has run; `clear` (the mask pass only) is 0 or one word no consumer of this
/// pass reads, which it zeroes.
unsafe fn queue_pack(
    x: &DeviceTensor,
    (n, cin, hw): (u32, u32, u32),
    planes: u32,
    [words, flag, clear]: [u64; 3],
) -> Result<()> {
    let backend = x.backend();
    let stream = backend.stream();
    // The plane pass has no `clear` argument.
    let (entry, clear) = if planes == 2 {
        ("spike_plane_pack", None)
    } else {
        ("spike_mask_pack", Some(clear))
    };
    let function = backend.function(entry)?;
    let args = [x.slice().device_ptr(stream).0, words, flag]
        .into_iter()
        .chain(clear)
        .map(KernelArg::Pointer)
        .chain([n, cin, hw].map(KernelArg::U32))
        .collect::<Vec<_>>();
    let config = LaunchConfig {
        grid_dim: (
            (n * mask_words(cin) * hw).div_ceil(PACK_THREADS).max(1),
            1,
            1,
        ),
        block_dim: (PACK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments are both packing kernels' in order, under their contracts (the
    // caller's part above).
    unsafe { launch_kernel(stream, &function, config, &args, false) }
}

impl SpikeMasks {
    /// A packing pass over `x` (`(n, cin, hw)`): with `planes` 1, `spike_mask_pack` (channel
    /// masks, the flag raised where a value is not 0 or 1); with 2, `spike_plane_pack` (each
    /// pixel's two bit-plane words side by side, the flag raised where a value is not an
    /// integer in `0..=3`; `cin` a multiple of 32).
    pub(crate) fn pack(x: &DeviceTensor, dims: (u32, u32, u32), planes: u32) -> Result<Self> {
        let (n, cin, hw) = dims;
        let backend = x.backend();
        let stream = backend.stream();
        let total = n * mask_words(cin) * hw;
        // SAFETY: the packing kernels write every mask word.
        let mut words = unsafe { stream.alloc::<u32>((planes * total).max(1) as usize)? };
        let mut flag = stream.alloc_zeros::<u32>(1)?;
        let pointers = [
            words.device_ptr_mut(stream).0,
            flag.device_ptr_mut(stream).0,
            0,
        ];
        // SAFETY: `words` holds `planes · total` words, `flag` one zero word, both kept in
        // the masks returned; no `clear`.
        unsafe { queue_pack(x, dims, planes, pointers)? };
        Ok(Self {
            words,
            non_binary: Arc::new(flag),
            dims,
            planes,
        })
    }
}

/// The input density above which the dense GEMM beats the sparse gather on this kind of layer.
///
/// Measured with `sparseflow bench-layer --dense-above 2` (sparse kernel forced) against the
/// im2col + GEMM path in the same run, batch 8, binary spikes, on the 2-core Xeon (AVX-512) at
/// stop 26 (README, "Dense fallback"). 1×1 convs: sparse/dense 1.84–2.80× at 45% on 2048→512
/// @7, 1024→256 @14, 512→128 @28, 256→64 @56, 128→256 @28 stride 2 and 64→256 @56; 1.41–2.22×
/// at 55%; 1024→256 @14 0.99× at 60% (the others 1.2–2.3× up to 70–100%). At 5% the 1×1 convs
/// with 1024 and 2048 inputs run 7–10× faster sparse, which the rule before (dense above
/// 40 / Cin, from an earlier stop's Zen 3 machine and gather) sent to the dense GEMM. 3×3 convs:
/// 1.8–3.0× at 60%, 1.0–1.7× at 100% on binary input (the pattern tables above 67%); kept at
/// 60%, as integer-valued (SEW) input has no pattern path.
pub fn dense_above_density(conv: &Conv2d) -> f64 {
    match conv.kernel_size() {
        (1, 1) => 0.5,
        _ => 0.6,
    }
}

/// The fraction of non-zeros in a sample of `data`: 128 runs of 64 elements spread evenly over
/// it (the whole tensor when it is small), each run's lines requested a few runs ahead.
///
/// 8192 elements estimate a density to about ±0.5% (one standard deviation), far finer than
/// the thresholds it is compared with need. Every 64th run instead (390 runs of a 6.4 MB
/// input) took 44 µs, a fortieth of the 5% 3×3 64→64 @56 layer at batch 8 on the 2-core Xeon:
/// each run waits on the L3.
fn sampled_density(data: &[f32]) -> f64 {
    const RUN: usize = 64;
    const RUNS: usize = 128;
    const AHEAD: usize = 8;
    if data.len() < 4 * RUNS * RUN {
        return data.iter().filter(|&&v| v != 0.0).count() as f64 / data.len().max(1) as f64;
    }
    // Run starts on 16-element (cache-line) steps of the slice, evenly spread.
    let start = |k: usize| (k * (data.len() - RUN) / (RUNS - 1)) & !15;
    let mut nonzero = 0usize;
    for k in 0..RUNS {
        #[cfg(target_arch = "x86_64")]
        if k + AHEAD < RUNS {
            let ahead = start(k + AHEAD);
            for line in (ahead..ahead + RUN).step_by(16) {
                // SAFETY: a prefetch of an in-bounds address has no effect on memory.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        data.as_ptr().add(line).cast(),
                    )
                };
            }
        }
        let at = start(k);
        nonzero += data[at..at + RUN].iter().filter(|&&v| v != 0.0).count();
    }
    nonzero as f64 / (RUNS * RUN) as f64
}

/// Kernels taller than this take the dense path.
const MAX_KERNEL_ROWS: usize = 16;

fn nchw(shape: &[usize]) -> (usize, usize, usize, usize) {
    let r = shape.len();
    (
        shape[..r - 3].iter().product(),
        shape[r - 3],
        shape[r - 2],
        shape[r - 1],
    )
}

/// Which input channels are non-zero at each pixel of one image, as bitmasks.
#[derive(Debug)]
struct ActiveChannels {
    /// `u64` words per pixel: `ceil(Cin / 64)`.
    words: usize,
    /// `[H·W·words]`: bit `c % 64` of word `c / 64` is set when channel `c` is non-zero.
    masks: Vec<u64>,
    /// Every non-zero is exactly 1: the gather can skip the multiply.
    binary: bool,
}

impl ActiveChannels {
    fn scan(image: &[f32], cin: usize, h: usize, w: usize) -> Self {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 and FMA were detected.
            return unsafe { Self::scan_avx2(image, cin, h, w) };
        }
        Self::scan_portable(image, cin, h, w)
    }

    /// The same as [`Self::scan_portable`], with no branch per non-zero: each channel plane is
    /// compared 8 pixels at a time into one byte of bits, stored at `[pixel group][channel]`;
    /// then each group's bytes (64 channels per word) are transposed into its 8 pixels' words,
    /// bit by bit with a shift and a movemask.
    ///
    /// An AVX-512 form (sixteen pixels a compare, straight into mask registers: half the
    /// instructions) measured the same in one process (3×3 64→64 @56, batch 8, 5%, 2-core Xeon:
    /// 1.23–1.25 ms either way; 256→256 @14 0.82): the scan waits on reading the input.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,popcnt,bmi1,bmi2")]
    unsafe fn scan_avx2(image: &[f32], cin: usize, h: usize, w: usize) -> Self {
        use std::arch::x86_64::*;
        let hw = h * w;
        let words = cin.div_ceil(64).max(1);
        let groups = hw.div_ceil(8);
        let stride = words * 64;
        // `[groups][words·64]`: bit j of byte c is pixel 8·group + j of channel c.
        let mut bytes = vec![0u8; groups * stride];
        let (zero, one) = (_mm256_setzero_ps(), _mm256_set1_ps(1.0));
        // Lanes of some non-zero other than 1, tested once at the end.
        let mut non_binary = _mm256_setzero_ps();
        let mut classify = |v: __m256| {
            let nz = _mm256_cmp_ps::<_CMP_NEQ_UQ>(v, zero);
            let not_one = _mm256_cmp_ps::<_CMP_NEQ_UQ>(v, one);
            non_binary = _mm256_or_ps(non_binary, _mm256_and_ps(nz, not_one));
            _mm256_movemask_ps(nz) as u8
        };
        for (c, plane) in image.chunks_exact(hw.max(1)).enumerate() {
            let whole = plane.chunks_exact(8);
            let tail = whole.remainder();
            for (g, values) in whole.enumerate() {
                *bytes.get_unchecked_mut(g * stride + c) =
                    classify(_mm256_loadu_ps(values.as_ptr()));
            }
            if !tail.is_empty() {
                let mut padded = [0.0f32; 8];
                padded[..tail.len()].copy_from_slice(tail);
                bytes[(groups - 1) * stride + c] = classify(_mm256_loadu_ps(padded.as_ptr()));
            }
        }
        let mut masks = vec![0u64; groups * 8 * words];
        for (g, group) in bytes.chunks_exact(stride).enumerate() {
            for (word, channels) in group.chunks_exact(64).enumerate() {
                let lo = _mm256_loadu_si256(channels.as_ptr().cast());
                let hi = _mm256_loadu_si256(channels.as_ptr().add(32).cast());
                // Shifting 16-bit lanes left by 7 − j moves bit j of both bytes to their sign
                // bits (the low byte's high bits land below the high byte's sign bit).
                macro_rules! pixel {
                    ($j:literal) => {{
                        let l = _mm256_slli_epi16::<{ 7 - $j }>(lo);
                        let h = _mm256_slli_epi16::<{ 7 - $j }>(hi);
                        let m = _mm256_movemask_epi8(l) as u32 as u64
                            | (_mm256_movemask_epi8(h) as u32 as u64) << 32;
                        *masks.get_unchecked_mut((g * 8 + $j) * words + word) = m;
                    }};
                }
                pixel!(0);
                pixel!(1);
                pixel!(2);
                pixel!(3);
                pixel!(4);
                pixel!(5);
                pixel!(6);
                pixel!(7);
            }
        }
        masks.truncate(hw * words);
        Self {
            words,
            masks,
            binary: _mm256_movemask_ps(non_binary) == 0,
        }
    }

    #[inline(always)]
    fn scan_portable(image: &[f32], cin: usize, h: usize, w: usize) -> Self {
        let hw = h * w;
        let words = cin.div_ceil(64).max(1);
        let mut masks = vec![0u64; hw * words];
        let mut binary = true;
        for (c, plane) in image.chunks_exact(hw.max(1)).enumerate() {
            let (word, bit) = (c / 64, 1u64 << (c % 64));
            // Most 16-element runs of a spike plane are silent: test each with one branch-free
            // (vectorised) OR of the magnitude bits, so ±0 both count as silent.
            for (block, values) in plane.chunks(16).enumerate() {
                // One branch-free (vectorised) pass builds the block's non-zero bitmask.
                let mut nz = 0u32;
                let mut non_binary = false;
                for (i, &v) in values.iter().enumerate() {
                    nz |= ((v != 0.0) as u32) << i;
                    non_binary |= v != 0.0 && v != 1.0;
                }
                binary &= !non_binary;
                while nz != 0 {
                    let p = block * 16 + nz.trailing_zeros() as usize;
                    nz &= nz - 1;
                    masks[p * words + word] |= bit;
                }
            }
        }
        Self {
            words,
            masks,
            binary,
        }
    }
}

/// The active inputs of one image as lists the gather walks without testing bits: each input
/// row's active pixels per stride residue, each with its range of entries.
///
/// The pixels stay in column order. Visiting them fewest inputs first, so the inner loop's exit
/// branch would repeat, was measured 1–4% slower (the sort, and the scattered accumulator
/// accesses, cost more than the branch misses it saved).
#[derive(Debug)]
struct ActiveInputs {
    /// Each active channel `c` as `64·c`: its weight row's offset within a tap of a 64-lane chunk
    /// (a narrower chunk shifts it right), so the common case adds it with no multiply.
    rows: Vec<u32>,
    /// The non-zero values, for integer-valued inputs; empty when every non-zero is 1.
    values: Vec<f32>,
    /// For input row `y` and residue `r < stride`: its active pixels `x ≡ r (mod stride)`, in
    /// column order, at `spans[span_starts[y·stride + r]..span_starts[y·stride + r + 1]]`.
    spans: Vec<Span>,
    span_starts: Vec<u32>,
}

/// An active input pixel `x = r + stride·column` of residue class `r`, and its inputs: entries
/// `first..last` (never empty) of [`ActiveInputs::rows`] and `values`.
///
/// Keeping the column (not `x`) lets every tap find its output column by one addition, and the
/// range here (not in a per-pixel table) spares the gather a dependent load per (pixel, tap):
/// 3×3 64→64 @56, batch 8, 5%, in one process on the 2-core Xeon, 1.79–1.88 → 1.68–1.75 ms.
#[derive(Clone, Copy, Debug)]
struct Span {
    column: u32,
    first: u32,
    last: u32,
}

/// Entries a pixel's mask word writes before testing whether it holds more: a 5% spike word of
/// 64 channels holds about 3, so the unrolled stores almost always finish it, with no branch on
/// the count (whose misprediction dominated the list building).
const UNROLLED_BITS: usize = 8;

/// What listing one image's active inputs reads.
#[derive(Clone, Copy)]
struct ListSource<'a> {
    scan: &'a ActiveChannels,
    image: &'a [f32],
    hw: (usize, usize),
    stride: usize,
    /// Whether every non-zero of this image is 1; when not, the values are kept.
    binary: bool,
    /// Pixels no output reads (e.g. the odd rows and columns under a strided 1×1 conv) get no
    /// entries.
    used: &'a UsedInputs,
}

impl ActiveInputs {
    fn new(source: ListSource) -> Self {
        #[cfg(target_arch = "x86_64")]
        if has_avx512_vbmi2() {
            // SAFETY: the features were detected.
            return unsafe { Self::new_avx512(source) };
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the features were detected.
            return unsafe { Self::new_avx2(source) };
        }
        Self::build::<false>(source)
    }

    /// [`Self::build`] writing each mask word's entries with one byte compress
    /// (`vpcompressb`) instead of a bit loop: 3×3 64→64 @56, batch 8, 5%, in one process on the
    /// 2-core Xeon, the layer 1.16–1.19 → 1.14–1.16 ms.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,avx2,fma,popcnt,bmi1,bmi2")]
    unsafe fn new_avx512(source: ListSource) -> Self {
        Self::build::<true>(source)
    }

    /// [`Self::build`] with hardware `popcnt` and `tzcnt`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,popcnt,bmi1,bmi2")]
    unsafe fn new_avx2(source: ListSource) -> Self {
        Self::build::<false>(source)
    }

    #[inline(always)]
    fn build<const COMPRESS: bool>(
        ListSource {
            scan,
            image,
            hw: (h, w),
            stride,
            binary,
            used,
        }: ListSource,
    ) -> Self {
        let hw = h * w;
        let words = scan.words;
        let total: usize = scan.masks.iter().map(|m| m.count_ones() as usize).sum();
        // Slack for the unrolled stores past the last entry.
        let mut rows = vec![0u32; total + ENTRY_SLACK];
        let mut values = Vec::new();
        let mut len = 0usize;
        let mut spans = Vec::with_capacity(hw);
        let mut span_starts = Vec::with_capacity(h * stride + 1);
        span_starts.push(0u32);
        // Pixels in the order the gather walks them: each row's residue classes in turn.
        for y in 0..h {
            for residue in 0..stride {
                for x in (residue..w).step_by(stride) {
                    if !(used.rows[y] && used.cols[x]) {
                        continue;
                    }
                    let p = y * w + x;
                    let first = len;
                    for (word, &mask) in scan.masks[p * words..(p + 1) * words].iter().enumerate() {
                        let first_row = (word * 64) as u32;
                        if !binary {
                            let mut m = mask;
                            while m != 0 {
                                let c = word * 64 + m.trailing_zeros() as usize;
                                m &= m - 1;
                                values.push(image[c * hw + p]);
                            }
                        }
                        let count = mask.count_ones() as usize;
                        #[cfg(target_arch = "x86_64")]
                        if COMPRESS {
                            // SAFETY: `rows` holds ENTRY_SLACK entries past the last, and
                            // COMPRESS is only instantiated where VBMI2 was detected.
                            unsafe {
                                compress_entries(mask, first_row, rows.as_mut_ptr().add(len))
                            };
                            len += count;
                            continue;
                        }
                        let mut m = mask;
                        // One block of stores even for an empty word, so the loop runs once for
                        // almost every word (a predictable branch). `rows` holds `total +
                        // UNROLLED_BITS` entries, so every block that starts at or below `len +
                        // count <= total` fits.
                        for at in (len..len + count.max(1)).step_by(UNROLLED_BITS) {
                            // Bits past the last write slack entries that the next word
                            // overwrites.
                            for slot in &mut rows[at..at + UNROLLED_BITS] {
                                *slot = (first_row + m.trailing_zeros()) * 64;
                                m &= m.wrapping_sub(1);
                            }
                        }
                        len += count;
                    }
                    if len > first {
                        spans.push(Span {
                            column: (x / stride) as u32,
                            first: first as u32,
                            last: len as u32,
                        });
                    }
                }
                span_starts.push(spans.len() as u32);
            }
        }
        rows.truncate(len);
        Self {
            rows,
            values,
            spans,
            span_starts,
        }
    }
}

/// Entries `rows` holds past the last: the unrolled stores' and the compress's overshoot.
const ENTRY_SLACK: usize = 64;

/// Writes `(first_row + c)·64` for each set bit `c` of `mask`, in order, at `dst`, 16 at a time
/// (up to 15 past the last, and 16 for an empty mask).
///
/// # Safety
/// `dst` has room for `count + 16` entries rounded to 16; the CPU has AVX-512 VBMI2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2")]
#[inline]
unsafe fn compress_entries(mask: u64, first_row: u32, dst: *mut u32) {
    use std::arch::x86_64::*;
    static IOTA: [u8; 64] = {
        let mut bytes = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            bytes[i] = i as u8;
            i += 1;
        }
        bytes
    };
    let positions = _mm512_maskz_compress_epi8(mask, _mm512_loadu_si512(IOTA.as_ptr().cast()));
    let base = _mm512_set1_epi32(first_row as i32);
    let count = mask.count_ones() as usize;
    let quarter = |bytes: __m128i| {
        _mm512_slli_epi32::<6>(_mm512_add_epi32(_mm512_cvtepu8_epi32(bytes), base))
    };
    _mm512_storeu_si512(dst.cast(), quarter(_mm512_castsi512_si128(positions)));
    if count > 16 {
        _mm512_storeu_si512(
            dst.add(16).cast(),
            quarter(_mm512_extracti32x4_epi32::<1>(positions)),
        );
        if count > 32 {
            _mm512_storeu_si512(
                dst.add(32).cast(),
                quarter(_mm512_extracti32x4_epi32::<2>(positions)),
            );
            _mm512_storeu_si512(
                dst.add(48).cast(),
                quarter(_mm512_extracti32x4_epi32::<3>(positions)),
            );
        }
    }
}

/// Which input rows and columns some output reads through some tap.
struct UsedInputs {
    rows: Vec<bool>,
    cols: Vec<bool>,
}

impl UsedInputs {
    fn new(conv: &Conv2d, (h, w): (usize, usize), (oh, ow): (usize, usize)) -> Self {
        let (kh, kw) = conv.kernel_size();
        let mark = |size: usize, out: usize, k: usize, s: usize, p: usize, d: usize| {
            let mut used = vec![false; size];
            for o in 0..out {
                for t in 0..k {
                    if let Some(i) = RowGeometry::source(o, t, s, p, d, size) {
                        used[i] = true;
                    }
                }
            }
            used
        };
        Self {
            rows: mark(h, oh, kh, conv.stride.0, conv.padding.0, conv.dilation.0),
            cols: mark(w, ow, kw, conv.stride.1, conv.padding.1, conv.dilation.1),
        }
    }
}

/// Weight bytes a group of taps of one kernel row may take for the gather to walk each active
/// pixel's inputs once for all of them: L1's 48 KiB on the 2-core Xeon. Measured there in one
/// process (batch 8, 5%): 3×3 64→64 @56 1.40–1.49 → 1.27–1.34 ms with three taps (48 KiB)
/// against one; 128→128 @28 0.95–0.96 either way; 256→256 @14 0.78 → 0.79–0.83 with two or
/// three (128–192 KiB).
const GROUPED_TAP_BYTES: usize = 48 << 10;

/// Output pixels per band task (whole output rows, at least one).
///
/// Each band loads every tap's weight slice once and fills and transposes its own buffer, so
/// larger bands spread that over more pixels even though their accumulators (`pixels × 64`
/// floats, 112 KB at 448) outgrow L1. Measured in one binary (the size read from the
/// environment), 2-core Xeon (AVX-512, 48 KB L1), batch 8, 5%, three rounds: 3×3 64→64 @56
/// 1.84–1.89 ms at 96 pixels (one row), 1.77–2.03 at 224, 1.67–1.73 at 448; 3×3 128→128 @28
/// 1.13–1.20 / 1.09–1.12 / 1.09–1.14.
const BAND_PIXELS: usize = 448;

/// Maps of at most this many output pixels (ResNet's 14² and 7²) go whole, several images a
/// task: their taps' weight slices (`Cin × 64` floats, 64–128 KiB) outgrow L1 and L2 anyway,
/// and a slice fetched once then serves every image of the group. 28² maps measured slower whole
/// than in bands (2-core Xeon, batch 8, 5%: 3×3 128→128 @28 1.21–1.26 against 1.07–1.08 ms).
const WHOLE_MAP_PIXELS: usize = 256;

/// Images a task of whole maps takes: up to about this many pixels, while the tasks still
/// outnumber the threads. Measured on the 2-core Xeon, batch 8, 5%, with cache-line-aligned
/// buffers: 3×3 256→256 @14 0.89–0.96 → 0.80–0.89 ms and 512→512 @7 0.98–1.04 → 0.83–0.84
/// against 256 pixels (two images a task; an image alone was 10–25% slower still).
const GROUP_PIXELS: usize = 1024;

/// Output rows per band, and images per task (a divisor of `n`, so tasks stay equal), for
/// `chunks` output chunks a band.
fn band_shape(oh: usize, ow: usize, n: usize, chunks: usize) -> (usize, usize) {
    let plane = (oh * ow).max(1);
    if plane > WHOLE_MAP_PIXELS {
        return ((BAND_PIXELS / ow.max(1)).clamp(1, oh.max(1)), 1);
    }
    let target = GROUP_PIXELS.div_ceil(plane);
    let threads = rayon::current_num_threads();
    let group = (1..=target.min(n.max(1)))
        .rev()
        .find(|&g| n.is_multiple_of(g) && (g == 1 || n / g * chunks >= threads))
        .unwrap_or(1);
    (oh.max(1), group)
}

/// Fills one band's buffer from its images' lists: a group of taps of one kernel row at a time
/// over the band, so their weight slices (`Cin × chunk` each, together within L1) are reused
/// across the whole band.
///
/// Measured at stop 25 against the tap-by-tap order of then (2-core Xeon, 3×3 64→64 @56,
/// batch 8, 5%, the sparse forward alone: 1.86–1.95 ms) and dropped: sweeping each output row
/// left to right with the three outputs an input column feeds in registers (every tap of an
/// input added where it is read, each output stored once) ran the same, 1.86 ms, bound by the
/// 147 KB of all nine taps' weights coming from L2; split into 32- or 16-lane passes that fit
/// L1, 2.08 / 2.39 ms (a list walk per pass); with each column's three rows merged into one
/// list first, 2.16 ms.
/// Exactly three inputs per pixel instead of a varying count (a timing probe, wrong output) was
/// only 10% faster then; at stop 26, with the kernel row's taps together, 8% (1.51 → 1.38 ms):
/// the loops' mispredicted exits cost about that much. Sorting each row's pixels by input count
/// so that exits repeat: 1.44–1.47 → 1.58–1.61 ms (the sort, and the accumulators visited out
/// of order). Writing rows out (transposed) as the last kernel row finishes them, instead of the
/// band at the end: 1.31–1.34 → 1.39–1.52 ms for 1 to 4 rows at a time (a whole band equal).
/// Prefetching the band's output lines for ownership during its gather, spread over its rows:
/// 1.43 → 1.49 ms. (All in one process each, the layer's median.)
fn fill_band(
    geometry: &RowGeometry,
    weights: &GatherWeights,
    bias: &[f32],
    (images, binary): (&[ActiveInputs], bool),
    band: &Band,
    buffer: &mut [f32],
) {
    let job = BandJob {
        g: geometry,
        weights,
        bias,
        images,
        binary,
        oy0: band.oy0,
        rows: band.rows,
        start: band.start,
    };
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: AVX-512F, AVX2 and FMA were detected.
        unsafe { job.run_avx512(buffer, band.width) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA were detected.
        unsafe { job.run_avx2(buffer, band.width) };
        return;
    }
    job.run(buffer, band.width);
}

/// One parallel task of [`for_each_band`]: output rows `oy0..oy0 + rows` of `images`, output
/// channels `start..start + width`.
pub(crate) struct Band {
    pub images: std::ops::Range<usize>,
    pub oy0: usize,
    pub rows: usize,
    pub start: usize,
    pub width: usize,
}

/// How [`for_each_band`] splits an `[n, Cout, OH, OW]` output into band tasks, and where each
/// finished band goes.
pub(crate) struct BandPlan {
    n: usize,
    oh: usize,
    ow: usize,
    cout: usize,
    /// The conv's bias padded to the weights' outputs.
    bias: Vec<f32>,
    chunks: Vec<(usize, usize)>,
    band_rows: usize,
    /// Images a task takes.
    group: usize,
    bands: usize,
    dst: DisjointWrites,
    avx2: bool,
}

impl BandPlan {
    pub(crate) fn new(
        conv: &Conv2d,
        weights: &GatherWeights,
        (n, h, w): (usize, usize, usize),
        out: *mut f32,
    ) -> Self {
        let (oh, ow) = conv.output_hw(h, w).expect("validated by output_shape");
        let cout = conv.out_channels();
        let mut bias = conv
            .bias
            .as_ref()
            .map_or(vec![0.0; cout], |b| b.data().to_vec());
        bias.resize(weights.padded_outputs, 0.0);
        let chunks = weights.chunks();
        let (band_rows, group) = band_shape(oh, ow, n, chunks.len());
        Self {
            n,
            oh,
            ow,
            cout,
            bias,
            band_rows,
            group,
            bands: oh.div_ceil(band_rows),
            chunks,
            dst: DisjointWrites(out),
            avx2: has_avx2(),
        }
    }

    /// Tasks: image groups × bands × output chunks, a group's tasks consecutive.
    fn tasks(&self) -> usize {
        self.n.div_ceil(self.group) * self.bands * self.chunks.len()
    }

    fn band(&self, task: usize) -> Band {
        let (start, width) = self.chunks[task % self.chunks.len()];
        let oy0 = (task / self.chunks.len()) % self.bands * self.band_rows;
        let first_img = task / (self.chunks.len() * self.bands) * self.group;
        Band {
            images: first_img..(first_img + self.group).min(self.n),
            oy0,
            rows: self.band_rows.min(self.oh - oy0),
            start,
            width,
        }
    }

    /// A zeroed buffer that holds any band's `[images][rows·OW][width]`.
    fn buffer(&self) -> AlignedFloats {
        AlignedFloats::zeros(self.group * self.band_rows * self.ow * 64)
    }

    /// [`for_each_band`] on this plan.
    fn for_each<F>(&self, fill: F)
    where
        F: Fn(&Band, &[f32], &mut [f32]) + Sync,
    {
        (0..self.tasks()).into_par_iter().for_each_init(
            || self.buffer(),
            |buffer, task| {
                let band = self.band(task);
                let buffer = &mut buffer[..band.images.len() * band.rows * self.ow * band.width];
                fill(&band, &self.bias, buffer);
                // SAFETY: this is the band's own task.
                unsafe { self.write(&band, buffer) };
            },
        );
    }

    /// Transposes a filled band buffer into the output.
    ///
    /// # Safety
    /// Only `band`'s own task calls it, once.
    unsafe fn write(&self, band: &Band, buffer: &[f32]) {
        let (plane, pixels, width) = (self.oh * self.ow, band.rows * self.ow, band.width);
        for (img, band_out) in band.images.clone().zip(buffer.chunks_exact(pixels * width)) {
            // This task alone writes channels start..start+width of rows oy0..oy0+rows of image
            // img: a contiguous segment of each of those planes.
            write_row_nchw(
                band_out,
                width,
                self.dst,
                (img * self.cout + band.start) * plane + band.oy0 * self.ow,
                plane,
                width.min(self.cout.saturating_sub(band.start)),
                pixels,
                self.avx2,
            )
        }
    }
}

/// Runs `fill(band, bias, buffer)` for every band of the `[n, Cout, OH, OW]` output, in parallel,
/// then transposes each filled buffer (`[images][rows·OW][width]`, pixel-major) into `out`:
/// every element of `out` is written. `bias` is the conv's bias padded to the weights' outputs.
pub(crate) fn for_each_band<F>(
    conv: &Conv2d,
    weights: &GatherWeights,
    (n, h, w): (usize, usize, usize),
    out: *mut f32,
    fill: F,
) where
    F: Fn(&Band, &[f32], &mut [f32]) + Sync,
{
    BandPlan::new(conv, weights, (n, h, w), out).for_each(fill);
}

/// Transposes a finished band `[pixels, padded]` into a contiguous segment of every channel
/// plane: `out[first + co·plane + p] = row[p·padded + co]` for `co < cout`, `p < ow`.
///
/// # Safety
/// The caller alone writes those output elements, and they are in bounds.
#[allow(clippy::too_many_arguments)]
unsafe fn write_row_nchw(
    row: &[f32],
    padded: usize,
    dst: DisjointWrites,
    first: usize,
    plane: usize,
    cout: usize,
    ow: usize,
    avx2: bool,
) {
    let (mut co0, mut ox0) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        (co0, ox0) = transpose_8x8_blocks(row, padded, dst, first, plane, cout, ow);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = avx2;
    // What the 8×8 blocks did not cover: the channel tail for every pixel, then the pixel tail.
    for co in 0..cout {
        let from = if co < co0 { ox0 } else { 0 };
        for ox in from..ow {
            dst.write(first + co * plane + ox, row[ox * padded + co]);
        }
    }
}

/// The 8×8-block part of [`write_row_nchw`]; returns how many channels and pixels it covered.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,popcnt,bmi1,bmi2")]
unsafe fn transpose_8x8_blocks(
    row: &[f32],
    padded: usize,
    dst: DisjointWrites,
    first: usize,
    plane: usize,
    cout: usize,
    ow: usize,
) -> (usize, usize) {
    use std::arch::x86_64::*;
    let (co_end, ox_end) = (cout / 8 * 8, ow / 8 * 8);
    // Channel blocks outside: each output plane's run is then written in one go.
    for co in (0..co_end).step_by(8) {
        for ox in (0..ox_end).step_by(8) {
            let r: [__m256; 8] =
                std::array::from_fn(|j| _mm256_loadu_ps(row.as_ptr().add((ox + j) * padded + co)));
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let cols = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (k, col) in cols.iter().enumerate() {
                _mm256_storeu_ps(dst.0.add(first + (co + k) * plane + ox), *col);
            }
        }
    }
    (co_end, ox_end)
}

struct RowGeometry {
    cin: usize,
    h: usize,
    ow: usize,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
}

impl RowGeometry {
    fn new(conv: &Conv2d, h: usize, w: usize) -> Self {
        let (_, ow) = conv.output_hw(h, w).expect("validated by output_shape");
        Self {
            cin: conv.in_channels(),
            h,
            ow,
            kernel: conv.kernel_size(),
            stride: conv.stride,
            padding: conv.padding,
            dilation: conv.dilation,
        }
    }

    /// The input coordinate of output coordinate `o` at tap `k`, if inside the image.
    #[inline(always)]
    fn source(
        o: usize,
        k: usize,
        stride: usize,
        pad: usize,
        dil: usize,
        size: usize,
    ) -> Option<usize> {
        (o * stride + k * dil)
            .checked_sub(pad)
            .filter(|&i| i < size)
    }
}

/// One band of output rows of one image, for output channels `start..start + width`.
struct BandJob<'a> {
    g: &'a RowGeometry,
    weights: &'a GatherWeights,
    bias: &'a [f32],
    /// The images this task computes, taps group by group, so each group's weights serve all of
    /// them.
    images: &'a [ActiveInputs],
    /// Every non-zero of the batch is 1: no values to multiply by.
    binary: bool,
    oy0: usize,
    rows: usize,
    start: usize,
}

impl BandJob<'_> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,popcnt,bmi1,bmi2")]
    unsafe fn run_avx2(&self, buffer: &mut [f32], width: usize) {
        self.run(buffer, width)
    }

    /// [`Self::run`] with 512-bit vectors: a 64-lane accumulator is four registers, and each
    /// active input's row four additions instead of eight (2-core Xeon, 3×3 64→64 @56, batch 8,
    /// 5%: sparse 2.23 → 2.04 ms, medians of four runs each).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma,popcnt,bmi1,bmi2")]
    unsafe fn run_avx512(&self, buffer: &mut [f32], width: usize) {
        self.run(buffer, width)
    }

    /// Fills `buffer` `[rows·OW, width]`.
    #[inline(always)]
    fn run(&self, buffer: &mut [f32], width: usize) {
        match (width, self.binary) {
            (64, true) => self.band::<64, true>(buffer),
            (64, false) => self.band::<64, false>(buffer),
            (32, true) => self.band::<32, true>(buffer),
            (32, false) => self.band::<32, false>(buffer),
            (16, true) => self.band::<16, true>(buffer),
            (16, false) => self.band::<16, false>(buffer),
            (_, true) => self.band::<8, true>(buffer),
            (_, false) => self.band::<8, false>(buffer),
        }
    }

    /// Taps group by group: a group's weights for this chunk (Cin rows of CH lanes a tap) stay
    /// in L1 while every output pixel of the band takes their contributions.
    #[inline(always)]
    fn band<const CH: usize, const BINARY: bool>(&self, buffer: &mut [f32]) {
        let g = self.g;
        let (kh, kw) = g.kernel;
        // Taps of a kernel row read the same input pixels (one residue class) when the stride
        // divides the dilation (stride 1: ResNet's 3×3 convs); as many go together as their
        // weight slices fit L1.
        let together = if g.dilation.1.is_multiple_of(g.stride.1) {
            (GROUPED_TAP_BYTES / (g.cin * CH * 4).max(1)).clamp(1, 3)
        } else {
            1
        };
        for ky in 0..kh {
            let mut kx = 0;
            while kx < kw {
                match together.min(kw - kx) {
                    3 => self.taps::<CH, BINARY, 3>(buffer, ky, kx),
                    2 => self.taps::<CH, BINARY, 2>(buffer, ky, kx),
                    _ => self.taps::<CH, BINARY, 1>(buffer, ky, kx),
                }
                kx += together.min(kw - kx);
            }
        }
    }

    /// Taps `(ky, kx .. kx + T)`, whose input pixels are one residue class: each active pixel's
    /// inputs are walked once and added through all `T` taps.
    #[inline(always)]
    fn taps<const CH: usize, const BINARY: bool, const T: usize>(
        &self,
        buffer: &mut [f32],
        ky: usize,
        kx: usize,
    ) {
        let g = self.g;
        let kw = g.kernel.1;
        let (stride, pad) = (g.stride.1 as isize, g.padding.1 as isize);
        let ow = g.ow as isize;
        let taps_base = self.weights.chunk(self.start).as_ptr();
        // Input column x = residue + stride·column feeds output column
        // (x + pad − kx·dil) / stride = column + delta where that divides exactly.
        let shift = |t: usize| pad - ((kx + t) * g.dilation.1) as isize;
        let residue = (-shift(0)).rem_euclid(stride);
        let deltas: [isize; T] = std::array::from_fn(|t| (residue + shift(t)) / stride);
        // SAFETY: the chunk holds kh·kw taps of Cin rows of CH lanes.
        let taps: [*const f32; T] =
            std::array::from_fn(|t| unsafe { taps_base.add((ky * kw + kx + t) * g.cin * CH) });
        // Three taps whose output columns are adjacent carry partial sums from pixel to pixel.
        let sliding = T == 3 && (1..T).all(|t| deltas[t] == deltas[0] - t as isize);
        let bias: &[f32; CH] = self.bias[self.start..self.start + CH]
            .try_into()
            .expect("CH lanes");
        for r in 0..self.images.len() * self.rows {
            if ky == 0 && kx == 0 {
                // The band's first taps: each row starts from the bias just before it is used,
                // in L1 (filling the whole band first: 1.16–1.17 → 1.18–1.20 ms, 3×3 64→64 @56,
                // batch 8, 5%, in one process).
                for px in buffer[r * g.ow * CH..(r + 1) * g.ow * CH].chunks_exact_mut(CH) {
                    px.copy_from_slice(bias);
                }
            }
            let a = &self.images[r / self.rows];
            let oy = self.oy0 + r % self.rows;
            let Some(iy) = RowGeometry::source(oy, ky, g.stride.0, g.padding.0, g.dilation.0, g.h)
            else {
                continue;
            };
            let class = iy * g.stride.1 + residue as usize;
            let spans = &a.spans[a.span_starts[class] as usize..a.span_starts[class + 1] as usize];
            // Sorted by column: per tap, those whose output column lies in 0..ow.
            let ranges: [(usize, usize); T] = std::array::from_fn(|t| {
                let lo = spans.partition_point(|s| (s.column as isize) < -deltas[t]);
                let hi = spans.partition_point(|s| (s.column as isize) < ow - deltas[t]);
                (lo, hi.max(lo))
            });
            let (both_lo, both_hi) = ranges
                .iter()
                .fold((0, spans.len()), |(lo, hi), &(l, h)| (lo.max(l), hi.min(h)));
            let both_hi = both_hi.max(both_lo);
            let out_row = buffer[r * g.ow * CH..(r + 1) * g.ow * CH].as_mut_ptr();
            let inputs = (a.rows.as_ptr(), a.values.as_ptr());
            // SAFETY (both loops): each span's output column is in 0..ow for the taps it is
            // added through; its entries index `rows` (and `values` when not binary); every
            // entry is 64·c for a channel c < Cin, so row c·CH of each tap lies in the chunk.
            if sliding {
                let taps3 = [taps[0], taps[1], taps[T - 1]];
                unsafe {
                    add_spans_sliding::<CH, BINARY>(
                        &spans[both_lo..both_hi],
                        inputs,
                        taps3,
                        out_row,
                        deltas[0],
                    )
                };
            } else {
                for s in &spans[both_lo..both_hi] {
                    let outs = std::array::from_fn(|t| unsafe {
                        out_row.add((s.column as isize + deltas[t]) as usize * CH)
                    });
                    unsafe { add_span::<CH, BINARY, T>(s, inputs, taps, outs) };
                }
            }
            // Where only some taps land inside the row (its first and last columns).
            for t in 0..T {
                let (lo, hi) = ranges[t];
                let edges = (lo..hi).filter(|i| !(both_lo..both_hi).contains(i));
                for s in edges.map(|i| &spans[i]) {
                    let out = unsafe { out_row.add((s.column as isize + deltas[t]) as usize * CH) };
                    unsafe { add_span::<CH, BINARY, 1>(s, inputs, [taps[t]], [out]) };
                }
            }
        }
    }
}

/// [`add_span`] through three taps whose output columns are `column + delta`, `− 1`, `− 2`
/// (dilation equal to the stride: 1 in ResNets), over spans sorted by column: an output pixel
/// takes its three contributions from three adjacent spans, so two partial sums ride along in
/// registers and each span stores one finished pixel instead of adding to three.
///
/// # Safety
/// As [`add_span`], for every span and the three output pixels of each.
#[inline(always)]
unsafe fn add_spans_sliding<const CH: usize, const BINARY: bool>(
    spans: &[Span],
    inputs: (*const u32, *const f32),
    taps: [*const f32; 3],
    out_row: *mut f32,
    delta: isize,
) {
    let add_to = |ox: isize, sum: &[f32; CH]| {
        let out = out_row.offset(ox * CH as isize);
        for (j, v) in sum.iter().enumerate() {
            *out.add(j) += v;
        }
    };
    // After a span at column c (output base = c + delta): `next` is pixel base's partial sum,
    // `mid` pixel base − 1's; `base` is None before the first span.
    let mut base: Option<isize> = None;
    let (mut next, mut mid) = ([0.0f32; CH], [0.0f32; CH]);
    for s in spans {
        let here = s.column as isize + delta;
        if base != Some(here - 1) {
            // Not adjacent to the last span: its partial sums are final.
            if let Some(b) = base {
                add_to(b, &next);
                add_to(b - 1, &mid);
            }
            next = [0.0; CH];
            mid = [0.0; CH];
        }
        // Pixel here − 2 is finished by this span's third tap, starting from its partial sum;
        // here − 1 continues from `next`; `here` starts.
        let [s0, s1, s2] =
            span_sums::<CH, BINARY, 3>(s, inputs, taps, [None, Some(&next), Some(&mid)]);
        add_to(here - 2, &s2);
        next = s0;
        mid = s1;
        base = Some(here);
    }
    if let Some(b) = base {
        add_to(b, &next);
        add_to(b - 1, &mid);
    }
}

/// `outs[t] += Σ value · tap_t[row]` over the span's inputs, for each tap `t`.
///
/// # Safety
/// The span's entries index `rows` (and `values`, unless binary), every row lies inside each
/// tap, and each `outs[t]` points to `CH` writable floats.
#[inline(always)]
unsafe fn add_span<const CH: usize, const BINARY: bool, const T: usize>(
    s: &Span,
    inputs: (*const u32, *const f32),
    taps: [*const f32; T],
    outs: [*mut f32; T],
) {
    let sums = span_sums::<CH, BINARY, T>(s, inputs, taps, [None; T]);
    for (sum, out) in sums.iter().zip(outs) {
        for (j, v) in sum.iter().enumerate() {
            *out.add(j) += v;
        }
    }
}

/// For each tap `t`: `carried[t]` (or nothing) plus `Σ value · tap_t[row]` over the span's
/// inputs. The sums start from the first input, not from a stored accumulator, so no load
/// heads the chain of additions.
///
/// # Safety
/// The span's entries index `rows` (and `values`, unless binary), and every row lies inside
/// each tap.
#[inline(always)]
unsafe fn span_sums<const CH: usize, const BINARY: bool, const T: usize>(
    s: &Span,
    (rows, values): (*const u32, *const f32),
    taps: [*const f32; T],
    carried: [Option<&[f32; CH]>; T],
) -> [[f32; CH]; T] {
    let shift_64 = (64 / CH).trailing_zeros();
    let (first, last) = (s.first as usize, s.last as usize);
    let value = |i: usize| if BINARY { 1.0 } else { *values.add(i) };
    let row = |i: usize| *rows.add(i) as usize >> shift_64;
    let mut sums = [[0.0f32; CH]; T];
    for ((sum, tap), carried) in sums.iter_mut().zip(taps).zip(carried) {
        let src = tap.add(row(first));
        for (j, v) in sum.iter_mut().enumerate() {
            let w = value(first) * *src.add(j);
            *v = carried.map_or(w, |c| c[j] + w);
        }
    }
    for i in first + 1..last {
        for (sum, tap) in sums.iter_mut().zip(taps) {
            accumulate::<CH, BINARY>(sum, tap.add(row(i)), value(i));
        }
    }
    sums
}

impl Operator for SparseConv2d {
    fn type_name(&self) -> &'static str {
        "SparseConv2d"
    }

    /// The sparse kernels where a variant exists for the geometry, else the dense conv kernel;
    /// after [`SparseConv2d::tune_cuda`], whichever it measured faster.
    fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
        let [x] = expect_inputs::<1, _>("SparseConv2d", inputs)?;
        match self.cuda_dispatch_for(x.shape()) {
            Some(CudaDispatch::Dense) => return self.conv.forward_cuda(x),
            Some(CudaDispatch::TensorCore) => return self.forward_cuda_tensor(x),
            Some(CudaDispatch::Sparse) | None => {}
        }
        match self.forward_cuda(x) {
            // No compiled variant fits this geometry, shared memory or grid: the dense engine.
            Err(Error::MissingKernelVariant(_)) => self.conv.forward_cuda(x),
            other => other,
        }
    }

    /// Tuned to the tensor-core path with the spike kernel, which packs its input's masks.
    fn reads_spike_masks(&self) -> bool {
        self.cuda_dispatch() == Some(CudaDispatch::TensorCore)
            && tensor_conv::spike_path_supports(&self.conv)
    }

    fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
        let [x] = expect_inputs::<1, _>("SparseConv2d", inputs)?;
        let start = Instant::now();
        let out = self.compute(x)?;
        *self.last_forward.lock().unwrap_or_else(|p| p.into_inner()) = Some(start.elapsed());
        Ok(out)
    }

    fn params(&self) -> Vec<(&'static str, &Tensor)> {
        self.conv.params()
    }

    fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        self.conv_mut().params_mut()
    }

    fn describe(&self) -> String {
        let dispatch = match self.cuda_dispatch() {
            Some(CudaDispatch::Dense) => " cuda=dense (tuned)",
            Some(CudaDispatch::Sparse) => " cuda=sparse (tuned)",
            Some(CudaDispatch::TensorCore) => " cuda=tensor-core (tuned)",
            None => "",
        };
        format!(
            "{} block={}{dispatch}",
            self.conv.describe(),
            self.block.describe()
        )
    }

    impl_as_any!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        assert_close_elementwise, gpu_or_skip, random_conv, random_sparse, random_uniform,
    };

    /// The vectorised mask scan (taken on this CPU when it has AVX2) against the portable one:
    /// the same masks and the same binary flag, down to a single non-binary value.
    #[test]
    fn mask_scans_agree() {
        // Whole 8-pixel groups, then maps whose last group is partial.
        for (seed, cin, density, integer, (h, w)) in [
            (1, 3, 0.3, false, (4, 24)),
            (2, 70, 0.05, false, (4, 24)),
            (3, 64, 0.5, true, (4, 24)),
            (4, 130, 1.0, false, (4, 24)),
            (5, 64, 0.2, false, (3, 7)),
            (6, 65, 0.3, true, (5, 13)),
            (7, 20, 1.0, false, (1, 1)),
        ] {
            let mut image = random_sparse(&[cin, h, w], density, integer, seed)
                .data()
                .to_vec();
            let mut cases = vec![image.clone()];
            if !integer {
                image[cin * h * w / 2 + 5] = 2.0;
                cases.push(image);
            }
            for image in cases {
                let fast = ActiveChannels::scan(&image, cin, h, w);
                let portable = ActiveChannels::scan_portable(&image, cin, h, w);
                assert_eq!(fast.masks, portable.masks, "seed {seed}");
                assert_eq!(fast.binary, portable.binary, "seed {seed}");
            }
        }
    }

    /// Every build of the entry lists (portable, AVX2, AVX-512 compress) lists the same entries,
    /// values and spans, for binary and integer inputs, one and two mask words, strides 1 and 2.
    #[test]
    fn entry_list_builds_agree() {
        for (seed, cin, density, integer, stride) in [
            (1, 64, 0.05, false, 1),
            (2, 70, 0.3, true, 2),
            (3, 130, 1.0, false, 1),
            (4, 17, 0.5, true, 1),
        ] {
            let (h, w) = (6, 11);
            let image = random_sparse(&[cin, h, w], density, integer, seed);
            let conv = Conv2d::new(
                random_uniform(&[4, cin, 3, 3], -1.0, 1.0, seed),
                None,
                (stride, stride),
                (1, 1),
                (1, 1),
                1,
            )
            .unwrap();
            let used = UsedInputs::new(&conv, (h, w), conv.output_hw(h, w).unwrap());
            let scan = ActiveChannels::scan_portable(image.data(), cin, h, w);
            let build = |lists: ActiveInputs| {
                let spans: Vec<(u32, u32, u32)> = lists
                    .spans
                    .iter()
                    .map(|s| (s.column, s.first, s.last))
                    .collect();
                (lists.rows, lists.values, spans, lists.span_starts)
            };
            let source = ListSource {
                scan: &scan,
                image: image.data(),
                hw: (h, w),
                stride,
                binary: scan.binary,
                used: &used,
            };
            let portable = build(ActiveInputs::build::<false>(source));
            assert!(!portable.0.is_empty(), "seed {seed}");
            #[cfg(target_arch = "x86_64")]
            {
                let mut fast = Vec::new();
                if has_avx2() {
                    // SAFETY: the features were detected.
                    fast.push(unsafe { ActiveInputs::new_avx2(source) });
                }
                if has_avx512_vbmi2() {
                    // SAFETY: the features were detected.
                    fast.push(unsafe { ActiveInputs::new_avx512(source) });
                }
                for lists in fast {
                    assert_eq!(build(lists), portable, "seed {seed}");
                }
            }
        }
    }

    /// A batch whose images differ in kind (binary spikes beside one integer-valued image) equals
    /// the dense conv, both where the lists of all images come first (3 images on 2 threads) and
    /// where each image is listed and gathered in one task (8 images).
    #[test]
    fn mixed_binary_and_integer_images_equal_dense() {
        let conv = random_conv([24, 20, 3], (1, 1, 1), true, 5);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for n in [3, 8] {
            // 17 × 19 output pixels: more than a whole-map task takes, so bands.
            let mut x = random_sparse(&[n, 20, 17, 19], 0.2, false, 7);
            let image = 20 * 17 * 19;
            // The second image gets integer values; the others stay binary.
            for v in &mut x.data_mut()[image..2 * image] {
                *v *= 3.0;
            }
            let want = conv.forward(&[&x]).unwrap();
            let mut sparse = SparseConv2d::from_dense(&conv, BlockChoice::Fixed(None));
            sparse.dense_above_density = f64::INFINITY;
            sparse.pattern_above = f64::INFINITY;
            let got = pool.install(|| sparse.forward(&[&x])).unwrap();
            assert!(got.relative_error(&want).unwrap() <= 1e-5, "batch {n}");
        }
    }

    /// Every GPU variant against the CPU dense reference, on fresh random inputs of several
    /// shapes and densities, binary and integer-valued, with the output poisoned (NaN) before
    /// each launch and every element checked.
    #[test]
    fn gpu_sparse_conv_matches_cpu() {
        let Some(backend) = gpu_or_skip("gpu_sparse_conv_matches_cpu") else {
            return;
        };
        let mut seed = 0x5EED;
        let mut checked = 0;
        for v in SPARSE_CONV_VARIANTS {
            let k = v.kernel as usize;
            let s = v.stride as usize;
            // (T·N, Cin, Cout, H, W): tiles that do and do not divide the map, channel counts
            // that fill the variant's pass of 32·V outputs or leave it ragged.
            let couts: [usize; 4] = match v.pass() {
                64 => [8, 64, 50, 5],
                128 => [72, 128, 100, 65],
                _ => [136, 256, 130, 200],
            };
            for &(n, cin, cout, h, w) in &[
                (2, 16, couts[0], 9, 13),
                (3, 64, couts[1], 20, 20),
                (1, 70, couts[2], 17, 11),
                (2, 3, couts[3], 1, 1),
            ] {
                for &density in &[0.0, 0.01, 0.05, 0.5, 1.0] {
                    for integer in [false, true] {
                        seed += 3;
                        let conv = Conv2d::new(
                            random_uniform(&[cout, cin, k, k], -1.0, 1.0, seed),
                            Some(random_uniform(&[cout], -1.0, 1.0, seed + 1)),
                            (s, s),
                            (k / 2, k / 2),
                            (1, 1),
                            1,
                        )
                        .unwrap();
                        let x = random_sparse(&[n, cin, h, w], density, integer, seed + 2);
                        let want = conv.forward(&[&x]).unwrap();
                        let block = BlockChoice::Fixed(Some(v.block as usize));
                        let sparse = SparseConv2d::from_dense(&conv, block);
                        let dx = DeviceTensor::upload(&backend, &x).unwrap();
                        let mut out =
                            DeviceTensor::uninit(&backend, want.shape().to_vec()).unwrap();
                        out.fill(f32::NAN).unwrap();
                        sparse.forward_cuda_variant(&dx, &mut out, *v).unwrap();
                        let got = out.download().unwrap();
                        assert_close_elementwise(
                            &got,
                            &want,
                            &format!(
                                "{} {n}x{cin}->{cout} {h}x{w} density {density} integer {integer}",
                                v.entry
                            ),
                        );
                        checked += 1;
                    }
                }
            }
        }
        println!(
            "gpu_sparse_conv_matches_cpu: {checked} cases equal on {}",
            backend.name()
        );
    }

    /// The column sweep against the CPU dense reference: channel counts below, at and across
    /// one mask word, ragged output channels, maps from one row to several strips per warp,
    /// every density from silent to full, binary and integer-valued; poisoned outputs, every
    /// element checked.
    #[test]
    fn gpu_sweep_conv_matches_cpu() {
        let Some(backend) = gpu_or_skip("gpu_sweep_conv_matches_cpu") else {
            return;
        };
        let mut seed = 0xC0FFEE;
        let mut checked = 0;
        for &(n, cin, cout, h, w) in &[
            (2, 64, 64, 20, 20),
            (3, 16, 50, 9, 12),
            (1, 33, 5, 17, 4),
            (2, 32, 64, 1, 8),
            (1, 1, 1, 3, 4),
            (40, 64, 64, 12, 28),
            (5, 64, 64, 56, 56),
            // Staged whole-row stores: a half column at the right edge, ragged outputs, fewer
            // row bands than staging groups.
            (3, 40, 36, 13, 44),
            (1, 64, 64, 3, 48),
        ] {
            for &density in &[0.0, 0.01, 0.05, 0.5, 1.0] {
                for integer in [false, true] {
                    seed += 3;
                    let conv = Conv2d::new(
                        random_uniform(&[cout, cin, 3, 3], -1.0, 1.0, seed),
                        Some(random_uniform(&[cout], -1.0, 1.0, seed + 1)),
                        (1, 1),
                        (1, 1),
                        (1, 1),
                        1,
                    )
                    .unwrap();
                    let x = random_sparse(&[n, cin, h, w], density, integer, seed + 2);
                    let want = conv.forward(&[&x]).unwrap();
                    let sparse = SparseConv2d::from_dense(&conv, BlockChoice::Fixed(Some(8)));
                    let dx = DeviceTensor::upload(&backend, &x).unwrap();
                    assert!(sparse.sweep_applies(&dx));
                    let mut out = DeviceTensor::uninit(&backend, want.shape().to_vec()).unwrap();
                    out.fill(f32::NAN).unwrap();
                    sparse.forward_cuda_sweep(&dx, &mut out).unwrap();
                    assert_close_elementwise(
                        &out.download().unwrap(),
                        &want,
                        &format!(
                            "sweep {n}x{cin}->{cout} {h}x{w} density {density} integer {integer}"
                        ),
                    );
                    checked += 1;
                }
            }
        }
        println!(
            "gpu_sweep_conv_matches_cpu: {checked} cases equal on {}",
            backend.name()
        );
    }

    /// Forwards reuse the sweep's packing scratch: each raises the non-binary flag exactly when
    /// its own input holds a value other than 0 or 1, whatever the forwards before it held (a
    /// flag left raised would send binary spikes down the slower exact path; one left low,
    /// integers down the adds-only one), and each equals the CPU reference.
    #[test]
    fn gpu_sweep_flags_follow_each_forward() {
        let Some(backend) = gpu_or_skip("gpu_sweep_flags_follow_each_forward") else {
            return;
        };
        let conv = random_conv([64, 64, 3], (1, 1, 1), true, 91);
        let sparse = SparseConv2d::from_dense(&conv, BlockChoice::Fixed(Some(8)));
        let inputs = [false, true, true, false, false, true, false, true];
        for (k, &integer) in inputs.iter().enumerate() {
            let x = random_sparse(&[2, 64, 12, 16], 0.05, integer, 100 + k as u64);
            let want = conv.forward(&[&x]).unwrap();
            let dx = DeviceTensor::upload(&backend, &x).unwrap();
            let mut out = DeviceTensor::uninit(&backend, want.shape().to_vec()).unwrap();
            out.fill(f32::NAN).unwrap();
            sparse.forward_cuda_sweep(&dx, &mut out).unwrap();
            let what = format!("forward {k}, integer {integer}");
            assert_close_elementwise(&out.download().unwrap(), &want, &what);
            let scratch = backend.sweep_scratch.lock().unwrap();
            let flag = scratch.last_flag(backend.stream()).unwrap();
            assert_eq!(flag != 0, integer, "{what}: flag {flag}");
        }
    }

    #[test]
    fn unsupported_gpu_geometry_is_an_error() {
        let conv = Conv2d::new(
            Tensor::zeros(vec![4, 4, 5, 5]),
            None,
            (1, 1),
            (2, 2),
            (1, 1),
            1,
        )
        .unwrap();
        let sparse = SparseConv2d::from_dense(&conv, BlockChoice::Fixed(None));
        assert!(matches!(
            sparse.cuda_variant(10),
            Err(Error::MissingKernelVariant(_))
        ));
    }
}
