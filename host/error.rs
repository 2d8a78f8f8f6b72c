//! The library's one error type.
use std::path::PathBuf;

/// Everything a caller of SparseFlow can recover from.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor's shape does not fit the operation.
    #[error("shape error: {0}")]
    Shape(String),
    /// An argument is out of its valid range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// CUDA was asked for but cannot be used on this machine.
    #[error("no usable CUDA device: {0}")]
    NoGpu(String),
    /// The CUDA driver reported an error (allocation, copy, launch, module load).
    #[error("CUDA driver error: {0}")]
    Cuda(#[from] cudarc::driver::DriverError),
    /// The PTX module has no entry point for the requested kernel variant.
    #[error("no GPU kernel variant for {0}")]
    MissingKernelVariant(String),
    /// A set of weights does not fit the model: missing, unexpected or mis-shaped tensors.
    #[error("weights do not match the model: {0}")]
    Weights(String),
    /// A file is not what it claims to be (corrupt or truncated safetensors, wrong dtype, …).
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
