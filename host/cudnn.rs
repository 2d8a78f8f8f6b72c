//! cuDNN's forward convolution through cudarc's bindings (libcudnn is loaded at run time when
//! present; point `LD_LIBRARY_PATH` at it). Dense `Conv2d` layers on CUDA run here when cuDNN can
//! be loaded, in fp32 with TF32 off (`SPARSEFLOW_DENSE_CONV=rust` selects the Rust kernel
//! instead); `bench-layer` also times it in TF32 as the baseline of the sparse kernels.
use std::sync::{Arc, OnceLock};

use cudarc::cudnn::{sys, ConvDescriptor, ConvForward, Cudnn, FilterDescriptor, TensorDescriptor};
use cudarc::driver::CudaSlice;

use crate::cuda::CudaBackend;
use crate::error::{Error, Result};
use crate::ops::conv2d::Conv2d;

/// fp32 (FMA math, TF32 off) or TF32 tensor-core math.
#[derive(Clone, Copy, Debug)]
pub enum Precision {
    Fp32,
    Tf32,
}

fn cudnn_err(e: impl std::fmt::Debug) -> Error {
    Error::NoGpu(format!("cuDNN: {e:?}"))
}

/// Whether libcudnn can be loaded.
pub fn available() -> bool {
    // SAFETY: only probes for the library.
    unsafe { cudarc::cudnn::sys::is_culib_present() }
}

/// Which kernel dense convolutions use on CUDA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseConvEngine {
    /// cuDNN, fp32 math (TF32 off): the fastest dense path where libcudnn is present.
    Cudnn,
    /// The Rust implicit-GEMM kernel of `kernels-gpu/src/dense_conv.rs`: always available.
    Rust,
}

/// The engine for dense convolutions: `SPARSEFLOW_DENSE_CONV=rust|cudnn`, else cuDNN when it
/// can be loaded. Read once per process.
pub fn dense_conv_engine() -> DenseConvEngine {
    static ENGINE: OnceLock<DenseConvEngine> = OnceLock::new();
    *ENGINE.get_or_init(|| match std::env::var("SPARSEFLOW_DENSE_CONV").as_deref() {
        Ok("rust") => DenseConvEngine::Rust,
        _ if available() => DenseConvEngine::Cudnn,
        _ => DenseConvEngine::Rust,
    })
}

/// A ready-to-launch cuDNN convolution for one geometry and precision: descriptors, algorithm
/// and workspace are set up once, so a timed `run` is one cuDNN call.
pub struct CudnnConv {
    x: TensorDescriptor<f32>,
    y: TensorDescriptor<f32>,
    w: FilterDescriptor<f32>,
    conv: ConvDescriptor<f32>,
    algo: sys::cudnnConvolutionFwdAlgo_t,
    workspace: Option<CudaSlice<u8>>,
}

// SAFETY: the descriptors are host structs that are not changed after `new`, and the cuDNN handle
// is only used through `run(&mut self)`, so one thread at a time (users keep plans behind a
// `Mutex`); cuDNN allows a handle to move between threads.
unsafe impl Send for CudnnConv {}

impl CudnnConv {
    pub fn new(
        backend: &CudaBackend,
        conv: &Conv2d,
        n: usize,
        h: usize,
        w: usize,
        precision: Precision,
    ) -> Result<Self> {
        // cudarc panics when a symbol is missing from the libcudnn it found: report that as an
        // unusable cuDNN instead.
        let stream = backend.stream().clone();
        let handle: Arc<Cudnn> = std::panic::catch_unwind(move || Cudnn::new(stream))
            .map_err(|_| Error::NoGpu("cuDNN: the loaded libcudnn lacks a needed symbol".into()))?
            .map_err(cudnn_err)?;
        let (kh, kw) = conv.kernel_size();
        let (oh, ow) = conv.output_hw(h, w)?;
        let fmt = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let dims = |v: [usize; 4]| v.map(|d| d as i32);
        let x = handle
            .create_4d_tensor::<f32>(fmt, dims([n, conv.in_channels(), h, w]))
            .map_err(cudnn_err)?;
        let y = handle
            .create_4d_tensor::<f32>(fmt, dims([n, conv.out_channels(), oh, ow]))
            .map_err(cudnn_err)?;
        let wd = handle
            .create_4d_filter::<f32>(
                fmt,
                dims([
                    conv.out_channels(),
                    conv.in_channels() / conv.groups,
                    kh,
                    kw,
                ]),
            )
            .map_err(cudnn_err)?;
        let mut cd = handle
            .create_conv2d::<f32>(
                [conv.padding.0 as i32, conv.padding.1 as i32],
                [conv.stride.0 as i32, conv.stride.1 as i32],
                [conv.dilation.0 as i32, conv.dilation.1 as i32],
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(cudnn_err)?;
        cd.set_group_count(conv.groups as i32).map_err(cudnn_err)?;
        cd.set_math_type(match precision {
            Precision::Fp32 => sys::cudnnMathType_t::CUDNN_FMA_MATH,
            Precision::Tf32 => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        })
        .map_err(cudnn_err)?;
        let op = ConvForward {
            conv: &cd,
            x: &x,
            w: &wd,
            y: &y,
        };
        let algo = op.pick_algorithm().map_err(cudnn_err)?;
        let bytes = op.get_workspace_size(algo).map_err(cudnn_err)?;
        let workspace = if bytes > 0 {
            Some(backend.stream().alloc_zeros::<u8>(bytes)?)
        } else {
            None
        };
        Ok(Self {
            x,
            y,
            w: wd,
            conv: cd,
            algo,
            workspace,
        })
    }

    /// `y = conv(x)` (no bias) with the layer's weights `w` (`[Cout, Cin/groups, kh, kw]`, on
    /// the same device), asynchronously on the backend's stream.
    pub fn run(
        &mut self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let op = ConvForward {
            conv: &self.conv,
            x: &self.x,
            w: &self.w,
            y: &self.y,
        };
        // SAFETY: the buffers match the descriptors built from the same shapes.
        unsafe { op.launch(self.algo, self.workspace.as_mut(), (1.0, 0.0), x, w, y) }
            .map_err(cudnn_err)
    }
}
