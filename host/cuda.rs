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
