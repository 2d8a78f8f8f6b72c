//! Spiking neurons in spikingjelly's multi-step mode: `IFNode`, `LIFNode`, `ParametricLIFNode`.
//!
//! The input is `[T, ...]`; the membrane starts at `v_reset` (0 for soft reset) for every sample
//! and the neuron steps over T. Each step charges `H` from the membrane `V` and the input `X`,
//! fires `S = (H >= v_threshold)`, and resets: hard (`v_reset` set) `V = S·v_reset + (1 − S)·H`,
//! soft `V = H − S·v_threshold`. The charge expressions follow spikingjelly 2.0's CPU code
//! (`_ops/{if_,lif,plif}/cpu.py`) operation for operation, because a spike is decided by an exact
//! comparison and a reordered expression can flip one:
//!
//! - IF: `H = V + X`
//! - LIF, `decay_input`: `H = V + (X − (V − v_r)) / tau`; otherwise `H = V − (V − v_r) / tau + X`
//! - PLIF: the same with `· sigmoid(w)` in place of `/ tau`
//!
//! where `v_r` is `v_reset`, or 0 under soft reset. `detach_reset` only changes gradients and is
//! kept for fidelity of the configuration.
use std::mem::MaybeUninit;

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use rayon::prelude::*;
use sparseflow_kernels::elementwise::BinaryFunction;
use sparseflow_kernels::neuron::{
    neuron_marking_fits, neuron_threads, Charge, NeuronParams, NEURON_THREADS,
};

use crate::cuda::DeviceTensor;
use crate::error::{Error, Result};
use crate::impl_as_any;
use crate::ops::pool::MaxPool2d;
use crate::ops::sparse_conv2d::SpikeMasks;
use crate::ops::spike_gather::DisjointWrites;
use crate::ops::{expect_inputs, Operator};
use crate::tensor::Tensor;

/// Firing and reset parameters shared by every neuron type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Firing {
    pub v_threshold: f32,
    /// `Some(v)`: hard reset to `v`; `None`: soft reset (subtract the threshold).
    pub v_reset: Option<f32>,
    pub detach_reset: bool,
}

impl Default for Firing {
    /// spikingjelly's defaults: threshold 1, hard reset to 0.
    fn default() -> Self {
        Self {
            v_threshold: 1.0,
            v_reset: Some(0.0),
            detach_reset: false,
        }
    }
}

impl Firing {
    fn reset_value(&self) -> f32 {
        self.v_reset.unwrap_or(0.0)
    }

    fn describe(&self) -> String {
        match self.v_reset {
            Some(r) => format!("v_th={} v_reset={r}", self.v_threshold),
            None => format!("v_th={} soft reset", self.v_threshold),
        }
    }
}

/// Elements per parallel task: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 16 * 1024;

/// Runs a neuron over `x = [T, ...]`. `charge(v, x) -> h` is the neuron's charge equation.
/// Returns the spikes and, when `keep_charge`, the charged membrane `H` of every step.
fn multi_step<F>(
    op: &str,
    x: &Tensor,
    firing: &Firing,
    charge: F,
    keep_charge: bool,
) -> Result<(Tensor, Option<Tensor>)>
where
    F: Fn(f32, f32) -> f32 + Sync,
{
    let Some((&steps, rest)) = x.shape().split_first() else {
        return Err(Error::Shape(format!(
            "{op} needs a [T, ...] input, got a scalar"
        )));
    };
    let per_step: usize = rest.iter().product();
    // Every element is written below: no zero-fill first (12.8 MB for ResNet's first neuron).
    let mut spikes = Vec::<f32>::with_capacity(x.len());
    let mut charged = Vec::<f32>::with_capacity(if keep_charge { x.len() } else { 0 });
    let (threshold, hard_reset) = (firing.v_threshold, firing.v_reset);
    // Each task owns a range of neurons for all T steps, so its membranes stay in cache and each
    // input and output element is touched once.
    let spike_out = DisjointWrites(spikes.as_mut_ptr());
    let charge_out = DisjointWrites(charged.as_mut_ptr());
    (0..per_step.div_ceil(CHUNK)).into_par_iter().for_each(|c| {
        let start = c * CHUNK;
        let len = CHUNK.min(per_step - start);
        let mut v = vec![firing.reset_value(); len];
        for t in 0..steps {
            let at = t * per_step + start;
            let x_t = &x.data()[at..at + len];
            // SAFETY: tasks own disjoint neuron ranges, so the (step, range) slices of different
            // tasks never overlap; both buffers hold `steps · per_step` elements (`charged` when
            // `keep_charge`).
            let s = unsafe { spike_out.slice_uninit(at, len) };
            let h = keep_charge.then(|| unsafe { charge_out.slice_uninit(at, len) });
            match (hard_reset, h) {
                (Some(reset), None) => {
                    step::<_, true>(&charge, s, &mut v, x_t, None, threshold, reset)
                }
                (None, None) => step::<_, false>(&charge, s, &mut v, x_t, None, threshold, 0.0),
                (Some(reset), Some(h)) => {
                    step::<_, true>(&charge, s, &mut v, x_t, Some(h), threshold, reset)
                }
                (None, Some(h)) => {
                    step::<_, false>(&charge, s, &mut v, x_t, Some(h), threshold, 0.0)
                }
            }
        }
    });
    // SAFETY: the tasks wrote every element of `spikes`, and of `charged` when `keep_charge`.
    unsafe {
        spikes.set_len(x.len());
        if keep_charge {
            charged.set_len(x.len());
        }
    }
    let spikes = Tensor::new(x.shape().to_vec(), spikes)?;
    let charged = if keep_charge {
        Some(Tensor::new(x.shape().to_vec(), charged)?)
    } else {
        None
    };
    Ok((spikes, charged))
}

/// The GPU twin of [`multi_step`] (spikes only): `neuron_multi_step` of `kernels-gpu`, whose
/// charge equations are these, operation for operation; with `operand`, its `_add` or
/// `_connect` kernel. With `mark_masks`, on a map of whole words of 32 channels (and steps of
/// whole 128-neuron warps), the kernel also sets each spike's bit in a bitmap by warp votes (a
/// connect's sums: their two bit planes in two bitmaps), and `spike_bitmap_masks`
/// (`spike_bitmap_planes`) turns that into the masks attached to the output
/// ([`DeviceTensor::spike_masks`]): a spike convolution reading it then skips its packing pass
/// over the f32 map.
#[allow(clippy::too_many_arguments)]
fn multi_step_cuda(
    op: &str,
    x: &DeviceTensor,
    operand: SecondOperand,
    firing: &Firing,
    charge: Charge,
    k: f32,
    mark_masks: bool,
) -> Result<DeviceTensor> {
    let second = match operand {
        SecondOperand::None => None,
        SecondOperand::Addend(y) | SecondOperand::Shortcut(y, ..) => Some(y),
    };
    if let Some(y) = second.filter(|y| y.shape() != x.shape()) {
        return Err(Error::Shape(format!(
            "{op}: input shapes differ: {:?} vs {:?}",
            x.shape(),
            y.shape()
        )));
    }
    let mut spikes = DeviceTensor::uninit(x.backend(), x.shape().to_vec())?;
    spikes.len_u32()?;
    let per_step = x.shape().iter().skip(1).product::<usize>() as u32;
    let backend = x.backend();
    let dims = mask_dims(x.shape()).filter(|_| mark_masks && neuron_marking_fits(per_step));
    // A connect's sums mark two bit planes (and a flag for sums past them), spikes one.
    let planes = if matches!(operand, SecondOperand::Shortcut(..)) {
        2
    } else {
        1
    };
    let stream = backend.stream();
    let plane_words = x.len() / 32 + 1;
    // The bitmaps and the out-of-range flag the marking entries fill, where they run.
    let mut marking = match dims {
        // SAFETY: the marking kernels write every word of each bitmap but its last, which only
        // feeds bits past the map (see `spike_bitmap_masks`).
        Some(_) => Some((
            unsafe { stream.alloc::<u32>(planes * plane_words)? },
            stream.alloc_zeros::<u32>(1)?,
        )),
        None => None,
    };
    let (entry, marks) = match (operand, marking.as_mut()) {
        (SecondOperand::None, None) => ("neuron_multi_step", Marks::None),
        (SecondOperand::Addend(_), None) => ("neuron_multi_step_add", Marks::None),
        (SecondOperand::Shortcut(..), None) => ("neuron_multi_step_connect", Marks::None),
        (SecondOperand::None, Some((bitmaps, _))) => {
            ("neuron_multi_step_marked", Marks::Bitmap(bitmaps))
        }
        (SecondOperand::Addend(_), Some((bitmaps, _))) => {
            ("neuron_multi_step_add_marked", Marks::Bitmap(bitmaps))
        }
        (SecondOperand::Shortcut(..), Some((bitmaps, out_of_range))) => (
            "neuron_multi_step_connect_marked",
            Marks::Planes(bitmaps, plane_words as u32, out_of_range),
        ),
    };
    launch_neuron(
        op,
        entry,
        x,
        operand,
        spikes.slice_mut(),
        marks,
        firing,
        charge,
        k,
    )?;
    let (Some(dims), Some((bitmaps, out_of_range))) = (dims, marking) else {
        return Ok(spikes);
    };
    let masks = if planes == 2 {
        SpikeMasks::from_plane_bitmaps(backend, &bitmaps, plane_words, out_of_range, dims)?
    } else {
        SpikeMasks::from_bitmap(backend, &bitmaps, dims)?
    };
    Ok(spikes.with_spike_masks(masks))
}

/// `(n, C, H·W)` of a `[..., C, H, W]` map whose channel masks a neuron can mark: `C` whole
/// words of 32 and every mask word indexable in `u32`.
fn mask_dims(shape: &[usize]) -> Option<(u32, u32, u32)> {
    let [lead @ .., c, h, w] = shape else {
        return None;
    };
    if *c == 0 || c % 32 != 0 {
        return None;
    }
    let n: usize = lead.iter().product();
    // The mask words are fewer than the elements, which the kernels index in u32.
    u32::try_from(n * c * h * w).ok()?;
    Some((n as u32, *c as u32, (h * w) as u32))
}

/// Launches neuron kernel `entry` over `x` (`[T, ...]`, plus `addend` for the `_add` kernels)
/// into `spikes`, a buffer of `x.len()` elements of the entry's output type (and `bitmap`, a bit
/// per element, for the `_marked` kernels).
#[allow(clippy::too_many_arguments)]
fn launch_neuron<T: DeviceRepr>(
    op: &str,
    entry: &'static str,
    x: &DeviceTensor,
    operand: SecondOperand,
    spikes: &mut CudaSlice<T>,
    marks: Marks,
    firing: &Firing,
    charge: Charge,
    k: f32,
) -> Result<()> {
    let Some((&steps, rest)) = x.shape().split_first() else {
        return Err(Error::Shape(format!(
            "{op} needs a [T, ...] input, got a scalar"
        )));
    };
    let per_step: usize = rest.iter().product();
    x.len_u32()?;
    if per_step == 0 || steps == 0 {
        return Ok(());
    }
    let backend = x.backend();
    let function = backend.function(entry)?;
    let (steps, per_step) = (steps as u32, per_step as u32);
    let (hard, reset) = kernel_reset(firing);
    let mode = charge as u32;
    let mut launch = backend.stream().launch_builder(&function);
    launch.arg(x.slice());
    let (function_number, spikes_first);
    match operand {
        SecondOperand::None => {}
        SecondOperand::Addend(y) => {
            launch.arg(y.slice());
        }
        SecondOperand::Shortcut(shortcut, function, first) => {
            (function_number, spikes_first) = (function as u32, first as u32);
            launch
                .arg(shortcut.slice())
                .arg(&function_number)
                .arg(&spikes_first);
        }
    }
    launch.arg(spikes);
    let plane_words;
    match marks {
        Marks::None => {}
        Marks::Bitmap(bitmap) => {
            launch.arg(bitmap);
        }
        Marks::Planes(bitmaps, words, flags) => {
            plane_words = words;
            launch.arg(bitmaps).arg(&plane_words).arg(flags);
        }
    }
    launch
        .arg(&steps)
        .arg(&per_step)
        .arg(&mode)
        .arg(&k)
        .arg(&firing.v_threshold)
        .arg(&reset)
        .arg(&hard);
    // SAFETY: the arguments match the entry's signature (`neuron_multi_step` and `_u8`, or
    // `_add` with `y` (`_connect` with a shortcut) of x's shape, checked by the caller;
    // `_marked` with a bitmap of a bit per element (`_connect_marked`: two, and a flag word)
    // and `neuron_marking_fits`, checked by the caller); `spikes` holds `x.len()`
    // elements of the entry's output type; whole allocations, so 16-byte aligned;
    // `neuron_threads` threads.
    unsafe {
        launch.launch(LaunchConfig {
            grid_dim: (neuron_threads(per_step).div_ceil(NEURON_THREADS), 1, 1),
            block_dim: (NEURON_THREADS, 1, 1),
            shared_mem_bytes: 0,
        })?
    };
    Ok(())
}

/// The kernels' reset arguments: `(1, v_reset)` for a hard reset, `(0, 0.0)` for a soft one.
fn kernel_reset(firing: &Firing) -> (u32, f32) {
    match firing.v_reset {
        Some(r) => (1, r),
        None => (0, 0.0),
    }
}

/// What a marking neuron kernel writes besides its output, after it in the entry's parameters.
enum Marks<'a> {
    None,
    /// A bit per spike (`_marked` entries).
    Bitmap(&'a mut CudaSlice<u32>),
    /// Two bit planes per value, `plane_words` apart, and the out-of-range flag
    /// (`_connect_marked`).
    Planes(&'a mut CudaSlice<u32>, u32, &'a mut CudaSlice<u32>),
}

/// What a neuron kernel reads besides `x`, after it in the entry's parameters.
#[derive(Clone, Copy)]
enum SecondOperand<'a> {
    None,
    /// Added to `x` before the neuron (`_add` entries).
    Addend(&'a DeviceTensor),
    /// Joined with the spikes by a connect function, spikes first when `true` (`_connect`).
    Shortcut(&'a DeviceTensor, BinaryFunction, bool),
}

/// One time step over a chunk of neurons: the AVX2 build of [`step_portable`] when the CPU has
/// it (IEEE operations only, no contraction: the same bits either way).
#[inline(always)]
fn step<F: Fn(f32, f32) -> f32, const HARD: bool>(
    charge: &F,
    spikes: &mut [MaybeUninit<f32>],
    v: &mut [f32],
    x: &[f32],
    charged: Option<&mut [MaybeUninit<f32>]>,
    threshold: f32,
    reset: f32,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::ops::spike_gather::has_avx2() {
        #[target_feature(enable = "avx2,fma,popcnt,bmi1,bmi2")]
        unsafe fn avx2<F: Fn(f32, f32) -> f32, const HARD: bool>(
            charge: &F,
            spikes: &mut [MaybeUninit<f32>],
            v: &mut [f32],
            x: &[f32],
            charged: Option<&mut [MaybeUninit<f32>]>,
            threshold: f32,
            reset: f32,
        ) {
            step_portable::<F, HARD>(charge, spikes, v, x, charged, threshold, reset)
        }
        // SAFETY: AVX2 and FMA were detected.
        return unsafe { avx2::<F, HARD>(charge, spikes, v, x, charged, threshold, reset) };
    }
    step_portable::<F, HARD>(charge, spikes, v, x, charged, threshold, reset)
}

/// One time step over a chunk of neurons, branch-free so it vectorises: charge, fire, reset.
#[inline(always)]
fn step_portable<F: Fn(f32, f32) -> f32, const HARD: bool>(
    charge: &F,
    spikes: &mut [MaybeUninit<f32>],
    v: &mut [f32],
    x: &[f32],
    charged: Option<&mut [MaybeUninit<f32>]>,
    threshold: f32,
    reset: f32,
) {
    let fire = |v: &mut f32, x: f32| -> (f32, f32) {
        let h = charge(*v, x);
        let spike = if h >= threshold { 1.0f32 } else { 0.0 };
        *v = if HARD {
            spike * reset + (1.0 - spike) * h
        } else {
            h - spike * threshold
        };
        (spike, h)
    };
    match charged {
        None => {
            for ((s, v), &x) in spikes.iter_mut().zip(v.iter_mut()).zip(x) {
                s.write(fire(v, x).0);
            }
        }
        Some(charged) => {
            for (((s, v), &x), c) in spikes.iter_mut().zip(v.iter_mut()).zip(x).zip(charged) {
                let (spike, h) = fire(v, x);
                s.write(spike);
                c.write(h);
            }
        }
    }
}

/// What every neuron type offers beyond [`Operator`]: its firing parameters and the charged
/// membrane, so tests can tell a genuine spike mismatch from a threshold tie.
pub trait SpikingNeuron: Operator {
    fn firing(&self) -> &Firing;
    /// Spikes and the charged membrane `H` of every step, `[T, ...]` each.
    fn forward_with_charge(&self, x: &Tensor) -> Result<(Tensor, Tensor)>;
}

macro_rules! neuron_operator {
    ($ty:ident, $name:literal) => {
        impl $ty {
            /// The operator type name, as the optimize registry knows it.
            pub const TYPE_NAME: &'static str = $name;
        }
        impl Operator for $ty {
            fn type_name(&self) -> &'static str {
                $name
            }
            fn forward(&self, inputs: &[&Tensor]) -> Result<Tensor> {
                let [x] = expect_inputs::<1, _>($name, inputs)?;
                Ok(self.run(x, false)?.0)
            }
            fn forward_cuda(&self, inputs: &[&DeviceTensor]) -> Result<DeviceTensor> {
                self.forward_cuda_marking(inputs, false)
            }
            fn forward_cuda_marking(
                &self,
                inputs: &[&DeviceTensor],
                mark_masks: bool,
            ) -> Result<DeviceTensor> {
                let [x] = expect_inputs::<1, _>($name, inputs)?;
                let (charge, k) = self.cuda_charge();
                multi_step_cuda(
                    $name,
                    x,
                    SecondOperand::None,
                    &self.firing,
                    charge,
                    k,
                    mark_masks,
                )
            }
            fn params(&self) -> Vec<(&'static str, &Tensor)> {
                self.param_list()
            }
            fn params_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
                self.param_list_mut()
            }
            fn describe(&self) -> String {
                self.description()
            }
            impl_as_any!();
        }
        impl SpikingNeuron for $ty {
            fn firing(&self) -> &Firing {
                &self.firing
            }
            fn forward_with_charge(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
                let (s, h) = self.run(x, true)?;
                Ok((s, h.expect("charge requested")))
            }
        }
        impl BuiltinNeuron for $ty {
            fn kernel_charge(&self) -> (Charge, f32) {
                self.cuda_charge()
            }
            fn spiking(&self) -> &dyn SpikingNeuron {
                self
            }
        }
    };
}

/// What the crate's own code needs of a built-in neuron beyond [`SpikingNeuron`].
trait BuiltinNeuron: SpikingNeuron {
    /// The GPU kernels' charge equation and its constant.
    fn kernel_charge(&self) -> (Charge, f32);
    fn spiking(&self) -> &dyn SpikingNeuron;
}

/// The operator when it is one of the built-in neuron types.
fn as_builtin_neuron(op: &dyn Operator) -> Option<&dyn BuiltinNeuron> {
    let any = op.as_any();
    if let Some(n) = any.downcast_ref::<IFNode>() {
        return Some(n);
    }
    if let Some(n) = any.downcast_ref::<LIFNode>() {
        return Some(n);
    }
    any.downcast_ref::<ParametricLIFNode>()
        .map(|n| n as &dyn BuiltinNeuron)
}

/// Integrate-and-fire: `H = V + X`.
#[derive(Clone, Debug, PartialEq)]
pub struct IFNode {
    pub firing: Firing,
}

impl IFNode {
    pub fn new(firing: Firing) -> Self {
        Self { firing }
    }
    fn run(&self, x: &Tensor, keep: bool) -> Result<(Tensor, Option<Tensor>)> {
        multi_step("IFNode", x, &self.firing, |v, x| v + x, keep)
    }
    fn cuda_charge(&self) -> (Charge, f32) {
        (Charge::If, 0.0)
    }
    fn param_list(&self) -> Vec<(&'static str, &Tensor)> {
        Vec::new()
    }
    fn param_list_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        Vec::new()
    }
    fn description(&self) -> String {
        self.firing.describe()
    }
}
neuron_operator!(IFNode, "IFNode");

/// Leaky integrate-and-fire with time constant `tau`.
#[derive(Clone, Debug, PartialEq)]
pub struct LIFNode {
    pub tau: f32,
    pub decay_input: bool,
    pub firing: Firing,
}

impl LIFNode {
    /// `tau` must be greater than 1, as spikingjelly requires.
    pub fn new(tau: f32, decay_input: bool, firing: Firing) -> Result<Self> {
        if tau.is_nan() || tau <= 1.0 {
            return Err(Error::InvalidArgument(format!(
                "LIF tau must be > 1, got {tau}"
            )));
        }
        Ok(Self {
            tau,
            decay_input,
            firing,
        })
    }
    fn cuda_charge(&self) -> (Charge, f32) {
        match self.decay_input {
            true => (Charge::LifDecayInput, self.tau),
            false => (Charge::Lif, self.tau),
        }
    }
    fn run(&self, x: &Tensor, keep: bool) -> Result<(Tensor, Option<Tensor>)> {
        let (tau, v_r) = (self.tau, self.firing.reset_value());
        if self.decay_input {
            multi_step(
                "LIFNode",
                x,
                &self.firing,
                |v, x| v + (x - (v - v_r)) / tau,
                keep,
            )
        } else {
            multi_step(
                "LIFNode",
                x,
                &self.firing,
                |v, x| v - (v - v_r) / tau + x,
                keep,
            )
        }
    }
    fn param_list(&self) -> Vec<(&'static str, &Tensor)> {
        Vec::new()
    }
    fn param_list_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        Vec::new()
    }
    fn description(&self) -> String {
        format!(
            "tau={} decay_input={} {}",
            self.tau,
            self.decay_input,
            self.firing.describe()
        )
    }
}
neuron_operator!(LIFNode, "LIFNode");

/// LIF with a learned time constant: `1/tau = sigmoid(w)`, `w` a scalar parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct ParametricLIFNode {
    /// Shape `[]` (one element), as spikingjelly's `w` parameter.
    pub w: Tensor,
    pub decay_input: bool,
    pub firing: Firing,
}

impl ParametricLIFNode {
    /// Starts at `w = -ln(init_tau - 1)`, spikingjelly's initialisation.
    pub fn new(init_tau: f32, decay_input: bool, firing: Firing) -> Result<Self> {
        if init_tau.is_nan() || init_tau <= 1.0 {
            return Err(Error::InvalidArgument(format!(
                "PLIF init_tau must be > 1, got {init_tau}"
            )));
        }
        let w = -((init_tau - 1.0) as f64).ln() as f32;
        Ok(Self {
            w: Tensor::new(vec![], vec![w])?,
            decay_input,
            firing,
        })
    }

    /// `sigmoid(w)`, the reciprocal time constant.
    pub fn inverse_tau(&self) -> f32 {
        let w = self.w.data()[0];
        1.0 / (1.0 + (-w).exp())
    }

    fn cuda_charge(&self) -> (Charge, f32) {
        match self.decay_input {
            true => (Charge::PlifDecayInput, self.inverse_tau()),
            false => (Charge::Plif, self.inverse_tau()),
        }
    }
    fn run(&self, x: &Tensor, keep: bool) -> Result<(Tensor, Option<Tensor>)> {
        let (q, v_r) = (self.inverse_tau(), self.firing.reset_value());
        if self.decay_input {
            multi_step(
                "ParametricLIFNode",
                x,
                &self.firing,
                |v, x| v + (x - (v - v_r)) * q,
                keep,
            )
        } else {
            multi_step(
                "ParametricLIFNode",
                x,
                &self.firing,
                |v, x| v - (v - v_r) * q + x,
                keep,
            )
        }
    }
    fn param_list(&self) -> Vec<(&'static str, &Tensor)> {
        vec![("w", &self.w)]
    }
    fn param_list_mut(&mut self) -> Vec<(&'static str, &mut Tensor)> {
        vec![("w", &mut self.w)]
    }
    fn description(&self) -> String {
        format!(
            "tau={:.4} decay_input={} {}",
            1.0 / self.inverse_tau(),
            self.decay_input,
            self.firing.describe()
        )
    }
}
neuron_operator!(ParametricLIFNode, "ParametricLIFNode");

/// A built-in neuron over `x + y` on the GPU, in one kernel (the sum never written); `None`
/// for another operator.
pub(crate) fn forward_cuda_added(
    op: &dyn Operator,
    x: &DeviceTensor,
    y: &DeviceTensor,
    mark_masks: bool,
) -> Option<Result<DeviceTensor>> {
    let neuron = as_builtin_neuron(op)?;
    let (charge, k) = neuron.kernel_charge();
    Some(multi_step_cuda(
        op.type_name(),
        x,
        SecondOperand::Addend(y),
        neuron.firing(),
        charge,
        k,
        mark_masks,
    ))
}

/// A built-in neuron on `x` whose spikes are joined with `shortcut` by a SEW connect function,
/// on the GPU in one kernel (`neuron_multi_step_connect`: the spikes never written): `function
/// (shortcut, spikes)`, or `function(spikes, shortcut)` when `spikes_first`. `None` for another
/// operator. With `mark_masks`, on a map of whole words of 32 channels (and steps of whole
/// 128-neuron warps), the kernel also sets the two bit planes of every output in bitmaps
/// (`_connect_marked`) and `spike_bitmap_planes` turns them into the integer spike kernel's
/// masks, attached to the output: a spike convolution reading it skips its packing pass.
pub(crate) fn forward_cuda_connected(
    op: &dyn Operator,
    x: &DeviceTensor,
    shortcut: &DeviceTensor,
    function: BinaryFunction,
    spikes_first: bool,
    mark_masks: bool,
) -> Option<Result<DeviceTensor>> {
    let neuron = as_builtin_neuron(op)?;
    let (charge, k) = neuron.kernel_charge();
    let operand = SecondOperand::Shortcut(shortcut, function, spikes_first);
    Some(multi_step_cuda(
        op.type_name(),
        x,
        operand,
        neuron.firing(),
        charge,
        k,
        mark_masks,
    ))
}

/// A built-in neuron as a kernel argument for a map of `steps` time steps (for kernels that
/// fire it in their epilogue); `None` for another operator.
pub(crate) fn kernel_neuron_params(op: &dyn Operator, steps: u32) -> Option<NeuronParams> {
    let neuron = as_builtin_neuron(op)?;
    let (charge, k) = neuron.kernel_charge();
    let firing = neuron.firing();
    let (hard_reset, v_reset) = kernel_reset(firing);
    Some(NeuronParams {
        steps,
        mode: charge as u32,
        k,
        v_threshold: firing.v_threshold,
        v_reset,
        hard_reset,
    })
}

/// A built-in neuron and the max-pool `pool` that alone reads its spikes, on the GPU: the neuron
/// writes its spikes as bytes (`neuron_multi_step_u8`) and the pool reads bytes
/// (`max_pool2d_u8`), so the map costs a quarter of its f32 traffic out and back in; the result
/// is the two f32 kernels' bit for bit. `None` for another operator.
pub(crate) fn neuron_max_pool_cuda(
    op: &dyn Operator,
    pool: &MaxPool2d,
    x: &DeviceTensor,
) -> Option<Result<DeviceTensor>> {
    let neuron = as_builtin_neuron(op)?;
    if x.shape().len() < 3 {
        // The operators word the shape errors themselves.
        return None;
    }
    Some((|| {
        let backend = x.backend();
        // SAFETY: the neuron kernel writes every byte before the pool reads it.
        let mut spikes = unsafe { backend.stream().alloc::<u8>(x.len().max(1))? };
        let (charge, k) = neuron.kernel_charge();
        let entry = "neuron_multi_step_u8";
        launch_neuron(
            op.type_name(),
            entry,
            x,
            SecondOperand::None,
            &mut spikes,
            Marks::None,
            neuron.firing(),
            charge,
            k,
        )?;
        pool.forward_cuda_spike_bytes(&spikes, x.shape(), backend)
    })())
}

/// The operator as a [`SpikingNeuron`] when it is one of the built-in neuron types.
pub fn as_spiking_neuron(op: &dyn Operator) -> Option<&dyn SpikingNeuron> {
    as_builtin_neuron(op).map(BuiltinNeuron::spiking)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::sparse_conv2d::pack_spike_masks;
    use crate::testing::{gpu_or_skip, random_uniform, SplitMix64};
    use std::sync::Arc;

    /// The masks a neuron marks as it fires (warp votes into a bitmap, then
    /// `spike_bitmap_masks`) equal the packing pass over its spikes, word for word, and marking
    /// changes no spike: LIF and the fused add, one neuron per thread and four (a step of
    /// 2^22), 32 to 96 channels, planes that are not whole words, 3 steps; every mask word and
    /// spike compared. A map whose steps are not whole 128-neuron warps is not marked.
    #[test]
    fn gpu_marked_masks_equal_the_packing_pass() {
        let Some(backend) = gpu_or_skip("gpu_marked_masks_equal_the_packing_pass") else {
            return;
        };
        let lif = LIFNode::new(2.0, true, Firing::default()).unwrap();
        let (charge, k) = lif.cuda_charge();
        let mut checked = 0;
        for (i, shape) in [
            vec![3, 4, 32, 9, 11],
            vec![2, 4, 96, 7, 5],
            vec![3, 1, 64, 256, 256],
        ]
        .into_iter()
        .enumerate()
        {
            let x = random_uniform(&shape, -1.0, 2.5, 40 + i as u64);
            let y = random_uniform(&shape, -1.0, 1.0, 50 + i as u64);
            let dx = DeviceTensor::upload(&backend, &x).unwrap();
            let dy = DeviceTensor::upload(&backend, &y).unwrap();
            for addend in [None, Some(&dy)] {
                let run = |mark| {
                    let operand = addend.map_or(SecondOperand::None, SecondOperand::Addend);
                    multi_step_cuda("LIF", &dx, operand, &lif.firing, charge, k, mark).unwrap()
                };
                let (marked, plain) = (run(true), run(false));
                assert!(plain.spike_masks().is_none());
                let masks = marked.spike_masks().expect("masks marked").clone();
                let spikes = marked.download().unwrap();
                assert_eq!(spikes, plain.download().unwrap(), "{shape:?}: spikes");
                let ones = spikes.data().iter().filter(|&&v| v == 1.0).count();
                assert!(ones > 0 && ones < spikes.len(), "{shape:?}: {ones} spikes");
                let packed = pack_spike_masks(&plain, masks.dims).unwrap();
                let stream = backend.stream();
                let got = stream.clone_dtoh(&masks.words).unwrap();
                assert_eq!(got, stream.clone_dtoh(&packed.words).unwrap(), "{shape:?}");
                assert_eq!(stream.clone_dtoh(&*masks.non_binary).unwrap(), [0]);
                // A reader of the marked tensor gets its masks, not a new pass.
                let reused = pack_spike_masks(&marked, masks.dims).unwrap();
                assert!(Arc::ptr_eq(&reused, &masks));
                checked += 1;
            }
        }
        let x = DeviceTensor::upload(&backend, &random_uniform(&[2, 1, 32, 3, 3], -1.0, 2.5, 7))
            .unwrap();
        let unmarked =
            multi_step_cuda("LIF", &x, SecondOperand::None, &lif.firing, charge, k, true).unwrap();
        assert!(
            unmarked.spike_masks().is_none(),
            "288 neurons per step: not marked"
        );
        println!(
            "gpu_marked_masks_equal_the_packing_pass: {checked} cases equal on {}",
            backend.name()
        );
    }

    fn random(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let mut rng = SplitMix64::new(seed);
        let n = shape.iter().product();
        let data = (0..n)
            .map(|_| (rng.next_f32() * 2.0 - 0.5) * scale)
            .collect();
        Tensor::new(shape.to_vec(), data).unwrap()
    }

    /// A float64 transcription of the update rules, stepped one element at a time.
    fn reference(x: &Tensor, firing: Firing, charge: impl Fn(f64, f64, f64) -> f64) -> Vec<f32> {
        let steps = x.shape()[0];
        let m = x.len() / steps;
        let v_r = firing.v_reset.unwrap_or(0.0) as f64;
        let th = firing.v_threshold as f64;
        let mut out = vec![0.0; x.len()];
        for i in 0..m {
            let mut v = v_r;
            for t in 0..steps {
                let h = charge(v, x.data()[t * m + i] as f64, v_r);
                let s = (h >= th) as u8 as f64;
                v = match firing.v_reset {
                    Some(r) => {
                        if s > 0.0 {
                            r as f64
                        } else {
                            h
                        }
                    }
                    None => h - s * th,
                };
                out[t * m + i] = s as f32;
            }
        }
        out
    }

    fn assert_matches(got: &Tensor, h: &Tensor, want: &[f32], th: f32) {
        for ((g, w), h) in got.data().iter().zip(want).zip(h.data()) {
            // A float32 / float64 disagreement is only possible right at the threshold.
            assert!(g == w || (h - th).abs() < 1e-4, "spike {g} vs {w}, H = {h}");
        }
        assert!(got.data().contains(&1.0) && got.data().contains(&0.0));
    }

    #[test]
    fn lif_if_plif_match_a_float64_reference() {
        let x = random(&[6, 3, 4, 5, 7], 11, 2.0);
        for firing in [
            Firing::default(),
            Firing {
                v_threshold: 0.7,
                v_reset: None,
                detach_reset: true,
            },
            Firing {
                v_threshold: 1.2,
                v_reset: Some(-0.3),
                detach_reset: false,
            },
        ] {
            let th = firing.v_threshold;
            let if_node = IFNode::new(firing);
            let (s, h) = if_node.forward_with_charge(&x).unwrap();
            assert_matches(&s, &h, &reference(&x, firing, |v, x, _| v + x), th);
            for decay_input in [true, false] {
                let lif = LIFNode::new(1.7, decay_input, firing).unwrap();
                let (s, h) = lif.forward_with_charge(&x).unwrap();
                let tau = 1.7f32 as f64;
                let want = if decay_input {
                    reference(&x, firing, |v, x, r| v + (x - (v - r)) / tau)
                } else {
                    reference(&x, firing, |v, x, r| v - (v - r) / tau + x)
                };
                assert_matches(&s, &h, &want, th);
                let plif = ParametricLIFNode::new(2.5, decay_input, firing).unwrap();
                let q = plif.inverse_tau() as f64;
                assert!((q - 1.0 / 2.5).abs() < 1e-6);
                let (s, h) = plif.forward_with_charge(&x).unwrap();
                let want = if decay_input {
                    reference(&x, firing, |v, x, r| v + (x - (v - r)) * q)
                } else {
                    reference(&x, firing, |v, x, r| v - (v - r) * q + x)
                };
                assert_matches(&s, &h, &want, th);
            }
        }
    }

    #[test]
    fn membrane_restarts_for_every_forward() {
        let x = random(&[3, 2, 50], 5, 2.0);
        let lif = LIFNode::new(2.0, true, Firing::default()).unwrap();
        assert_eq!(lif.forward(&[&x]).unwrap(), lif.forward(&[&x]).unwrap());
    }

    #[test]
    fn bad_parameters_and_inputs_are_errors() {
        assert!(LIFNode::new(1.0, true, Firing::default()).is_err());
        assert!(ParametricLIFNode::new(0.5, true, Firing::default()).is_err());
        let node = IFNode::new(Firing::default());
        let scalar = Tensor::new(vec![], vec![1.0]).unwrap();
        assert!(node.forward(&[&scalar]).is_err());
        assert!(node.forward(&[]).is_err());
    }
}
