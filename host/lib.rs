//! SparseFlow: sparse inference for spiking neural networks.
//!
//! Spiking networks are mostly silent: the tensors between their layers are spikes, 0 or 1, and
//! typically 95% zeros. SparseFlow runs such networks computing only where spikes are, on the CPU
//! (always available) and on NVIDIA GPUs through kernels written in Rust (`kernels-gpu/`, compiled
//! to PTX and embedded in this library).
//!
//! Where things live:
//! - [`model`]: the zoo (spikingjelly's spiking ResNets and SEW ResNets), seeded init, calibration;
//! - [`graph`]: the network as a DAG of named operator nodes, executed in topological order;
//! - [`optimize`]: the passes that swap spike-fed Conv2d / Linear for their sparse twins;
//! - [`profile`]: per-node latency and sparsity of any graph, on the CPU or a GPU;
//! - [`ops`]: one module per operator, holding its CPU code, its GPU launch and its tests;
//! - [`weights`]: safetensors in and out; [`encode`]: Poisson and direct encoders;
//! - [`device`]: which device runs the work ([`Device::best_available`] never panics);
//! - [`cuda`]: the CUDA backend (context, stream, the PTX module loaded once per context) and
//!   device tensors;
//! - [`tensor`]: host tensors; [`testing`]: GPU skip policy and random tensors for tests.
pub mod cuda;
pub mod cudnn;
pub mod device;
pub mod encode;
pub mod error;
pub mod graph;
pub mod model;
pub mod ops;
pub mod optimize;
pub mod profile;
pub mod tensor;
pub mod testing;
pub mod weights;

pub use device::{Device, DeviceSelection};
pub use error::{Error, Result};
pub use tensor::Tensor;
