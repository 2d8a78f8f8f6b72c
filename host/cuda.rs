//! The CUDA backend: one context and stream per device, the embedded PTX module loaded once per
//! context, and kernel entry points looked up by name.
//!
//! `libcuda` is loaded at run time (cudarc's `dynamic-loading`), so the library builds and runs on
//! machines without a GPU; [`CudaBackend::get`] reports why CUDA is unusable instead of panicking.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig};

use crate::error::{Error, Result};
use crate::ops::sparse_conv2d::SpikeMasks;

/// The PTX of `kernels-gpu/`, built by build.rs (or the committed copy when the nvptx toolchain is
/// absent).
#[cfg(not(sparseflow_ptx_from_kernels_crate))]
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sparseflow_kernels.ptx"));
/// The PTX of `kernels-gpu/` (a packaged build without the kernel sources: the copy committed in
/// the `sparseflow-kernels` crate).
#[cfg(sparseflow_ptx_from_kernels_crate)]
pub const PTX: &str = sparseflow_kernels::COMMITTED_PTX;
/// The same kernels built for sm_90a, plus the `wgmma` ones (`kernels-gpu/src/wgmma_conv.rs`):
/// the module loaded on devices of compute capability 9.0.
#[cfg(not(sparseflow_ptx_from_kernels_crate))]
pub const PTX_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/sparseflow_kernels_sm90.ptx"));
#[cfg(sparseflow_ptx_from_kernels_crate)]
pub const PTX_SM90: &str = sparseflow_kernels::COMMITTED_PTX_SM90;
/// Set to `sm80` to load the generic module on a Hopper GPU too (no `wgmma` kernels): for A/B
/// timings and for checking one path against the other.
pub const KERNEL_ARCH_VAR: &str = "SPARSEFLOW_KERNEL_ARCH";
/// `built` when build.rs compiled the kernels, `committed` when it used the committed PTX.
pub const PTX_ORIGIN: &str = env!("SPARSEFLOW_PTX_ORIGIN");

/// One CUDA device ready to run SparseFlow's kernels.
pub struct CudaBackend {
    ordinal: usize,
    name: String,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    /// Whether `module` is the sm_90a one, with the `wgmma` kernels.
    hopper: bool,
    /// The column sweep's packing output, reused by every forward on this device.
    pub(crate) sweep_scratch: Mutex<crate::ops::sparse_conv2d::SweepScratch>,
    /// Loaded entry points, with the dynamic shared memory each is allowed so far.
    functions: Mutex<HashMap<&'static str, (CudaFunction, u32)>>,
    max_shared_memory_per_block: usize,
    multiprocessors: usize,
    /// One `u32` zero: the "no non-binary input" flag of masks built from spike bitmaps
    /// (read-only to every kernel).
    zero_word: Arc<cudarc::driver::CudaSlice<u32>>,
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
    /// A device `u32` that is 0 and stays 0 (kernels only read it), shared by its users.
    pub(crate) fn zero_word(&self) -> Arc<cudarc::driver::CudaSlice<u32>> {
        self.zero_word.clone()
    }

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
        // Every launch on this device is ordered on its one stream, so buffers need no events
        // to order their uses across streams; tracking would create two events for every
        // allocation and destroy them at every free (host time before the launches).
        // SAFETY: no slice of this context is used on another stream.
        unsafe { ctx.disable_event_tracking() };
        if ctx.has_async_alloc() {
            keep_pool_memory(ctx.cu_device())?;
        }
        let max_shared_memory_per_block = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )? as usize;
        let multiprocessors = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as usize;
        let capability = ctx.compute_capability()?;
        let wants_hopper = capability == (9, 0)
            && std::env::var(KERNEL_ARCH_VAR).map_or(true, |arch| arch != "sm80");
        // A driver too old for the sm_90a module's PTX version still runs the generic one.
        let hopper_module = wants_hopper
            .then(|| ctx.load_module(cudarc::nvrtc::Ptx::from_src(PTX_SM90)).ok())
            .flatten();
        let hopper = hopper_module.is_some();
        let module = match hopper_module {
            Some(module) => module,
            None => ctx.load_module(cudarc::nvrtc::Ptx::from_src(PTX))?,
        };
        let stream = ctx.default_stream();
        let zero_word = Arc::new(stream.alloc_zeros::<u32>(1)?);
        Ok(Self {
            ordinal,
            name,
            stream,
            module,
            hopper,
            functions: Mutex::new(HashMap::new()),
            sweep_scratch: Mutex::default(),
            zero_word,
            max_shared_memory_per_block,
            multiprocessors,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the loaded module has the Hopper (`wgmma`) kernels.
    pub fn has_wgmma(&self) -> bool {
        self.hopper
    }

    /// The most dynamic shared memory one block may opt into (bytes).
    pub fn max_shared_memory_per_block(&self) -> usize {
        self.max_shared_memory_per_block
    }

    /// The device's streaming multiprocessors (what persistent kernels size their grids by).
    pub fn multiprocessors(&self) -> usize {
        self.multiprocessors
    }

    /// The stream every SparseFlow launch on this device is ordered on. Buffers carry no
    /// cross-stream events (cudarc's tracking is off): work queued on another stream of this
    /// context must synchronize with this one before it touches them.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The kernel entry point `entry` of the embedded module.
    pub fn function(&self, entry: &'static str) -> Result<CudaFunction> {
        self.function_with_shared(entry, 0)
    }

    /// [`Self::function`], allowed `bytes` of dynamic shared memory. Launches above 48 KB need
    /// the function's limit raised; it is raised once for each larger size, not at every launch
    /// (each `cuFuncSetAttribute` is host time before the launch).
    pub(crate) fn function_with_shared(
        &self,
        entry: &'static str,
        bytes: u32,
    ) -> Result<CudaFunction> {
        let mut functions = self
            .functions
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((f, allowed)) = functions.get_mut(entry) {
            if bytes > *allowed {
                allow_shared_memory(f, bytes)?;
                *allowed = bytes;
            }
            return Ok(f.clone());
        }
        let f = self
            .module
            .load_function(entry)
            .map_err(|e| Error::MissingKernelVariant(format!("{entry} ({e})")))?;
        allow_shared_memory(&f, bytes)?;
        functions.insert(entry, (f.clone(), bytes));
        Ok(f)
    }
}

static POISON_NEW_TENSORS: AtomicBool = AtomicBool::new(false);

/// While on, every [`DeviceTensor::uninit`] (so every op's output) starts as NaN: a kernel that
/// leaves an element unwritten shows up as a NaN in the result. For tests; off by default.
pub fn set_poison_new_tensors(on: bool) {
    POISON_NEW_TENSORS.store(on, Ordering::Relaxed);
}

/// A pair of CUDA events that times work queued on a backend's stream.
pub struct GpuTimer {
    start: cudarc::driver::CudaEvent,
    end: cudarc::driver::CudaEvent,
    stream: Arc<CudaStream>,
}

impl GpuTimer {
    pub fn new(backend: &CudaBackend) -> Result<Self> {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        let ctx = backend.stream().context();
        Ok(Self {
            start: ctx.new_event(Some(CU_EVENT_DEFAULT))?,
            end: ctx.new_event(Some(CU_EVENT_DEFAULT))?,
            stream: backend.stream().clone(),
        })
    }

    /// Runs `f` (which queues work on the stream) and returns its result with the GPU time in
    /// milliseconds between the events recorded before and after it; waits for the work.
    pub fn time<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
        self.start.record(&self.stream)?;
        let value = f()?;
        self.end.record(&self.stream)?;
        self.end.synchronize()?;
        Ok((value, self.start.elapsed_ms(&self.end)? as f64))
    }
}

/// A tensor in CUDA device memory: a shape and a contiguous `f32` buffer on one backend.
pub struct DeviceTensor {
    shape: Vec<usize>,
    data: cudarc::driver::CudaSlice<f32>,
    backend: Arc<CudaBackend>,
    /// The channel masks of these spikes, when the neuron that wrote them marked them too (see
    /// [`crate::ops::sparse_conv2d::pack_spike_masks`]); dropped by any change to the data or
    /// shape.
    spike_masks: Option<Arc<SpikeMasks>>,
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
            spike_masks: None,
        })
    }

    /// A tensor whose contents are unspecified until a kernel writes them (NaN while
    /// [`set_poison_new_tensors`] is on).
    pub fn uninit(backend: &Arc<CudaBackend>, shape: Vec<usize>) -> Result<Self> {
        let n = shape.iter().product::<usize>().max(1);
        // SAFETY: callers write every element before reading (each op documents it).
        let data = unsafe { backend.stream().alloc::<f32>(n)? };
        let mut t = Self {
            shape,
            data,
            backend: backend.clone(),
            spike_masks: None,
        };
        if POISON_NEW_TENSORS.load(Ordering::Relaxed) {
            t.poison()?;
        }
        Ok(t)
    }

    /// Sets every byte to 0xFF, which makes every element a NaN.
    pub fn poison(&mut self) -> Result<()> {
        use cudarc::driver::DevicePtrMut;
        self.spike_masks = None;
        let stream = self.backend.stream().clone();
        let bytes = self.data.len() * std::mem::size_of::<f32>();
        let (ptr, _record) = self.data.device_ptr_mut(&stream);
        // SAFETY: `ptr` is this tensor's allocation of `bytes` bytes, ordered on `stream`.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream())? };
        Ok(())
    }

    /// Fills every element with `value` (tests poison outputs with NaN this way).
    pub fn fill(&mut self, value: f32) -> Result<()> {
        self.spike_masks = None;
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
        self.spike_masks = None;
        &mut self.data
    }

    /// The channel masks the neuron that wrote these spikes marked, if it did.
    pub(crate) fn spike_masks(&self) -> Option<&Arc<SpikeMasks>> {
        self.spike_masks.as_ref()
    }

    /// Attaches the channel masks of this tensor's spikes (written by the same kernel).
    pub(crate) fn with_spike_masks(self, masks: SpikeMasks) -> Self {
        Self {
            spike_masks: Some(Arc::new(masks)),
            ..self
        }
    }

    /// The same elements under another shape with as many elements (no copy).
    pub fn reshape(self, shape: Vec<usize>) -> Result<Self> {
        if shape.iter().product::<usize>() != self.len() {
            return Err(Error::Shape(format!(
                "cannot reshape {:?} to {shape:?}",
                self.shape
            )));
        }
        Ok(Self {
            shape,
            spike_masks: None,
            ..self
        })
    }

    /// A copy on the same device (device to device).
    pub fn try_clone(&self) -> Result<Self> {
        Ok(Self {
            shape: self.shape.clone(),
            data: self.backend.stream().clone_dtod(&self.data)?,
            backend: self.backend.clone(),
            spike_masks: None,
        })
    }

    /// The element count as the `u32` the kernels index with, or a shape error.
    pub(crate) fn len_u32(&self) -> Result<u32> {
        u32::try_from(self.len()).map_err(|_| {
            Error::Shape(format!(
                "{:?} has more elements than the GPU kernels index ({})",
                self.shape,
                u32::MAX
            ))
        })
    }
}

/// One grid-stride launch over `n` elements with `threads` per block.
pub(crate) fn elementwise_config(n: usize, threads: u32) -> LaunchConfig {
    // Enough blocks to fill any current GPU; the kernels loop over the rest.
    let blocks = n.div_ceil(threads as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A kernel parameter passed by value as a `#[repr(C)]` struct of the kernel crate.
#[repr(transparent)]
pub(crate) struct ByValue<T>(pub T);
// SAFETY: all are `#[repr(C)]` structs of 4-byte fields (`u32`, `f32`), the layout the kernels
// declare.
unsafe impl DeviceRepr for ByValue<sparseflow_kernels::pool::PoolWindow> {}
unsafe impl DeviceRepr for ByValue<sparseflow_kernels::neuron::NeuronParams> {}
unsafe impl DeviceRepr for ByValue<sparseflow_kernels::dense_conv::ConvGeometry> {}
unsafe impl DeviceRepr for ByValue<sparseflow_kernels::pattern_conv::PatternGeometry> {}

/// An operator's device copy of some of its host tensors (weights in a kernel's layout), made on
/// the first CUDA forward. It is remade when the device changes or when any source tensor is no
/// longer the one it was made from (small tensors: other content; large ones: another buffer,
/// length or content sample), and operators clear it when their parameters are borrowed
/// mutably (`Operator::params_mut`, which weight loading uses). An in-place edit of a large
/// tensor through a public field, bypassing `params_mut`, may go unseen: call
/// [`DeviceCache::clear`] through the operator's `params_mut` after such edits. Cloning an operator gives the clone
/// an empty cache.
pub struct DeviceCache<T> {
    slot: Mutex<Option<(CacheKey, Arc<T>)>>,
}

#[derive(PartialEq)]
struct CacheKey {
    ordinal: usize,
    sources: Vec<(usize, usize, u64)>,
}

impl CacheKey {
    fn new(ordinal: usize, sources: &[&crate::Tensor]) -> Self {
        // Small tensors are hashed whole (their buffer may be rebuilt on every call); large ones
        // by buffer address, length and a strided sample.
        const HASHED_WHOLE: usize = 1 << 14;
        let fingerprint = |t: &crate::Tensor| {
            let data = t.data();
            let whole = data.len() <= HASHED_WHOLE;
            let step = if whole { 1 } else { data.len() / 61 };
            let hash = data
                .iter()
                .step_by(step)
                .fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
                    (h ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3)
                });
            let address = if whole { 0 } else { data.as_ptr() as usize };
            (address, data.len(), hash)
        };
        Self {
            ordinal,
            sources: sources.iter().map(|t| fingerprint(t)).collect(),
        }
    }
}

impl<T> Default for DeviceCache<T> {
    fn default() -> Self {
        Self {
            slot: Mutex::new(None),
        }
    }
}

impl<T> Clone for DeviceCache<T> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<T> std::fmt::Debug for DeviceCache<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceCache")
    }
}

impl<T> DeviceCache<T> {
    /// Drops the device copy (operators call this when their parameters are handed out for
    /// writing, so in-place edits through `params_mut` are never missed).
    pub fn clear(&mut self) {
        *self.slot.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Drops the device copy through a shared reference (an operator freeing the memory of a
    /// path it measured and will not take).
    pub fn evict(&self) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The device copy for `backend` made from `sources`, building it with `upload` when there is
    /// none yet or it is stale.
    pub fn get(
        &self,
        backend: &CudaBackend,
        sources: &[&crate::Tensor],
        upload: impl FnOnce() -> Result<T>,
    ) -> Result<Arc<T>> {
        let key = CacheKey::new(backend.ordinal(), sources);
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, value)) = slot.as_ref() {
            if *k == key {
                return Ok(value.clone());
            }
        }
        let value = Arc::new(upload()?);
        *slot = Some((key, value.clone()));
        Ok(value)
    }
}

/// Lets the device's default memory pool (which serves every `DeviceTensor`, allocated on the
/// stream) keep freed memory instead of returning it to the driver at each synchronisation: a
/// forward frees and reallocates hundreds of MB of activations, and re-mapping them every time
/// costs as much as some layers.
fn keep_pool_memory(device: cudarc::driver::sys::CUdevice) -> Result<()> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on a valid device with valid out-pointers.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, device).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
        .result()?;
    }
    Ok(())
}

/// Launches with more than 48 KB of dynamic shared memory need the function's limit raised.
fn allow_shared_memory(function: &CudaFunction, bytes: u32) -> Result<()> {
    if bytes > 48 * 1024 {
        function.set_attribute(
            cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )?;
    }
    Ok(())
}

/// One kernel argument for [`launch_kernel`]: a device buffer's address or a `u32`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum KernelArg {
    Pointer(cudarc::driver::sys::CUdeviceptr),
    U32(u32),
}

/// Launches `function` on `stream` (`cuLaunchKernelEx`). With `programmatic`, as a programmatic
/// dependent of the kernel before it on the stream: its CTAs may start while that kernel's last
/// CTAs run, so the kernel must wait (`griddepcontrol.wait`) before it reads anything that
/// kernel writes, and before it writes anything that kernel reads.
///
/// # Safety
/// `args` match `function`'s parameters in order and type, the buffers they point to are valid
/// for the launch, and with `programmatic` `function` keeps the waiting rule above.
pub(crate) unsafe fn launch_kernel(
    stream: &CudaStream,
    function: &CudaFunction,
    cfg: LaunchConfig,
    args: &[KernelArg],
    programmatic: bool,
) -> Result<()> {
    use cudarc::driver::sys;
    // The values the parameter pointers point at, alive until the launch returns.
    let mut values: Vec<u64> = args
        .iter()
        .map(|a| match a {
            KernelArg::Pointer(p) => *p,
            KernelArg::U32(v) => *v as u64,
        })
        .collect();
    let mut params: Vec<*mut std::ffi::c_void> =
        values.iter_mut().map(|v| (v as *mut u64).cast()).collect();
    // SAFETY: a zeroed launch attribute is valid plain data; id and value are set below.
    let mut attribute: sys::CUlaunchAttribute = std::mem::zeroed();
    attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: if programmatic {
            &mut attribute
        } else {
            std::ptr::null_mut()
        },
        numAttrs: programmatic as u32,
    };
    stream.context().bind_to_thread()?;
    // SAFETY: the caller vouches for the arguments; `params` points at `values`, both alive here;
    // a `u32` parameter reads the low 4 bytes of its little-endian u64.
    sys::cuLaunchKernelEx(
        &config,
        function.cu_function(),
        params.as_mut_ptr(),
        std::ptr::null_mut(),
    )
    .result()?;
    Ok(())
}
