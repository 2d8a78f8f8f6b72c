//! Thin wrappers over the PTX instructions the kernels use that `core::arch::nvptx` does not wrap.
use core::arch::asm;
use core::arch::nvptx;

pub const WARP_SIZE: u32 = 32;

#[inline(always)]
pub fn thread_x() -> u32 {
    unsafe { nvptx::_thread_idx_x() as u32 }
}

#[inline(always)]
pub fn block_x() -> u32 {
    unsafe { nvptx::_block_idx_x() as u32 }
}

#[inline(always)]
pub fn block_dim_x() -> u32 {
    unsafe { nvptx::_block_dim_x() as u32 }
}

/// True on every lane of the (fully active) warp when `pred` holds on any lane.
#[inline(always)]
pub fn warp_any(pred: bool) -> bool {
    let input = pred as u32;
    let out: u32;
    unsafe {
        asm!(
            "{{ .reg .pred %p_in, %p_out;",
            "setp.ne.u32 %p_in, {input}, 0;",
            "vote.sync.any.pred %p_out, %p_in, 0xffffffff;",
            "selp.u32 {out}, 1, 0, %p_out; }}",
            input = in(reg32) input,
            out = out(reg32) out,
        );
    }
    out != 0
}

/// `atomicAdd` on a global `u32`, returning the old value.
///
/// # Safety
/// `ptr` must point to device memory valid for the whole launch.
#[inline(always)]
pub unsafe fn atomic_add_u32(ptr: *mut u32, value: u32) -> u32 {
    let old: u32;
    asm!(
        "atom.global.add.u32 {old}, [{ptr}], {value};",
        old = out(reg32) old,
        ptr = in(reg64) ptr,
        value = in(reg32) value,
    );
    old
}
