//! SparseFlow's GPU kernels, written in Rust.
//!
//! For `nvptx64-nvidia-cuda` this crate compiles to one PTX module (build.rs at the repository
//! root does that and the host library embeds the result). For the host it compiles as an
//! ordinary `std` library that exposes the same index math, so the host's CPU twins and unit
//! tests use exactly the arithmetic the kernels use.
//!
//! Every kernel is generic Rust code instantiated into named entry points by a macro; adding a
//! variant is one macro line. Each instantiation also lands in a `*_VARIANTS` table that the host
//! reads to pick an entry point at run time.
#![cfg_attr(target_arch = "nvptx64", no_std)]
#![cfg_attr(
    target_arch = "nvptx64",
    feature(abi_ptx, stdarch_nvptx, asm_experimental_arch)
)]

pub mod dense_conv;
pub mod elementwise;
#[cfg(target_arch = "nvptx64")]
mod gpu;
pub mod neuron;
pub mod pool;
pub mod prescan;
pub mod sparse_conv;

#[cfg(target_arch = "nvptx64")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // A kernel that panics (an index bug) aborts the launch; the host sees a launch error.
    unsafe { core::arch::nvptx::trap() }
}
