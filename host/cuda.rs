//! The CUDA backend: one context and stream per device, the embedded PTX module loaded once per
//! context, and kernel entry points looked up by name.
//!
//! `libcuda` is loaded at run time (cudarc's `dynamic-loading`), so the library builds and runs on
//! machines without a GPU; [`CudaBackend::get`] reports why CUDA is unusable instead of panicking.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

use crate::error::{Error, Result};

/// The PTX of `kernels-gpu/`, built by build.rs (or the committed copy when the nvptx toolchain is
/// absent).
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sparseflow_kernels.ptx"));
/// `built` when build.rs compiled the kernels, `committed` when it used the committed PTX.
pub const PTX_ORIGIN: &str = env!("SPARSEFLOW_PTX_ORIGIN");

/// One CUDA device ready to run SparseFlow's kernels.
pub struct CudaBackend {
    ordinal: usize,
    name: String,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .finish()
    }
}

type BackendCache = Mutex<HashMap<usize, Arc<CudaBackend>>>;

impl CudaBackend {
    /// The backend of device `ordinal`, created (context, stream, module load) on first use and
    /// shared afterwards.
    pub fn get(ordinal: usize) -> Result<Arc<CudaBackend>> {
        static BACKENDS: OnceLock<BackendCache> = OnceLock::new();
        let mut cache = BACKENDS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(backend) = cache.get(&ordinal) {
            return Ok(backend.clone());
        }
        let backend = Arc::new(Self::open(ordinal)?);
        cache.insert(ordinal, backend.clone());
        Ok(backend)
    }

    fn open(ordinal: usize) -> Result<Self> {
        // cudarc panics when it calls into a libcuda that is not there: ask first.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoGpu("libcuda could not be loaded".into()));
        }
        let count = CudaContext::device_count()
            .map_err(|e| Error::NoGpu(format!("the CUDA driver found no device ({e})")))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoGpu(format!(
                "CUDA device {ordinal} requested, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::NoGpu(format!("CUDA device {ordinal} did not open ({e})")))?;
        let name = ctx.name()?;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(PTX))?;
        let stream = ctx.default_stream();
        Ok(Self {
            ordinal,
            name,
            stream,
            module,
            functions: Mutex::new(HashMap::new()),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stream every SparseFlow launch on this device is ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The kernel entry point `entry` of the embedded module.
    pub fn function(&self, entry: &'static str) -> Result<CudaFunction> {
        let mut functions = self
            .functions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(f) = functions.get(entry) {
            return Ok(f.clone());
        }
        let f = self
            .module
            .load_function(entry)
            .map_err(|e| Error::MissingKernelVariant(format!("{entry} ({e})")))?;
        functions.insert(entry, f.clone());
        Ok(f)
    }
}

/// A tensor in CUDA device memory: a shape and a contiguous `f32` buffer on one backend.
pub struct DeviceTensor {
    shape: Vec<usize>,
    data: cudarc::driver::CudaSlice<f32>,
    backend: Arc<CudaBackend>,
}

impl std::fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTensor")
            .field("shape", &self.shape)
            .field("device", &self.backend.ordinal)
            .finish()
    }
}

impl DeviceTensor {
    /// Copies a host tensor to the device.
    pub fn upload(backend: &Arc<CudaBackend>, t: &crate::Tensor) -> Result<Self> {
        let data = backend.stream().clone_htod(t.data())?;
        Ok(Self {
            shape: t.shape().to_vec(),
            data,
            backend: backend.clone(),
        })
    }

    /// A tensor whose contents are unspecified until a kernel writes them.
    pub fn uninit(backend: &Arc<CudaBackend>, shape: Vec<usize>) -> Result<Self> {
        let n = shape.iter().product::<usize>().max(1);
        // SAFETY: callers write every element before reading (each op documents it).
        let data = unsafe { backend.stream().alloc::<f32>(n)? };
        Ok(Self {
            shape,
            data,
            backend: backend.clone(),
        })
    }

    /// Fills every element with `value` (tests poison outputs with NaN this way).
    pub fn fill(&mut self, value: f32) -> Result<()> {
        let host = vec![value; self.data.len()];
        self.backend.stream().memcpy_htod(&host, &mut self.data)?;
        Ok(())
    }

    /// Copies the tensor to the host (waiting for the stream).
    pub fn download(&self) -> Result<crate::Tensor> {
        let mut data = self.backend.stream().clone_dtoh(&self.data)?;
        data.truncate(self.shape.iter().product());
        crate::Tensor::new(self.shape.clone(), data)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn backend(&self) -> &Arc<CudaBackend> {
        &self.backend
    }

    pub fn slice(&self) -> &cudarc::driver::CudaSlice<f32> {
        &self.data
    }

    pub fn slice_mut(&mut self) -> &mut cudarc::driver::CudaSlice<f32> {
        &mut self.data
    }
}

/// Launches with more than 48 KB of dynamic shared memory need the function's limit raised.
pub(crate) fn allow_shared_memory(function: &CudaFunction, bytes: u32) -> Result<()> {
    if bytes > 48 * 1024 {
        function.set_attribute(
            cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )?;
    }
    Ok(())
}
