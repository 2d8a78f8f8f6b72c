//! Which device runs the work.
//!
//! [`Device::best_available`] picks CUDA when `libcuda` loads and a device opens, and the CPU
//! otherwise, with the reason for its choice; it never panics, so a program can call it
//! unconditionally on any machine.
use std::fmt;

use crate::cuda::CudaBackend;
use crate::error::{Error, Result};

/// Where tensors live and operators run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(usize),
}

/// The outcome of device selection: the device and why it was chosen.
#[derive(Clone, Debug)]
pub struct DeviceSelection {
    pub device: Device,
    pub reason: String,
}

impl Device {
    /// CUDA device 0 when it can be used, else the CPU.
    pub fn best_available() -> DeviceSelection {
        match CudaBackend::get(0) {
            Ok(backend) => DeviceSelection {
                device: Device::Cuda(0),
                reason: format!("CUDA device 0 opened: {}", backend.name()),
            },
            Err(err) => DeviceSelection {
                device: Device::Cpu,
                reason: format!("CPU chosen: {err}"),
            },
        }
    }

    /// Parses `auto`, `cpu`, `cuda` or `cuda:N`; `auto` picks [`Device::best_available`].
    /// Asking for CUDA explicitly fails with [`Error::NoGpu`] when it cannot be used.
    pub fn from_name(name: &str) -> Result<DeviceSelection> {
        let cuda = |ordinal: usize| -> Result<DeviceSelection> {
            let backend = CudaBackend::get(ordinal)?;
            Ok(DeviceSelection {
                device: Device::Cuda(ordinal),
                reason: format!("requested; CUDA device {ordinal}: {}", backend.name()),
            })
        };
        match name {
            "auto" => Ok(Self::best_available()),
            "cpu" => Ok(DeviceSelection {
                device: Device::Cpu,
                reason: "requested".into(),
            }),
            "cuda" => cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => cuda(ordinal),
                _ => Err(Error::InvalidArgument(format!(
                    "unknown device `{other}`: expected auto, cpu, cuda or cuda:N"
                ))),
            },
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_available_never_panics_and_explains_itself() {
        let sel = Device::best_available();
        assert!(!sel.reason.is_empty());
    }

    #[test]
    fn device_names_parse() {
        assert_eq!(Device::from_name("cpu").unwrap().device, Device::Cpu);
        assert!(matches!(
            Device::from_name("tpu"),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Device::from_name("cuda:x"),
            Err(Error::InvalidArgument(_))
        ));
    }
}
