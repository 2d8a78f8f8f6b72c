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

#[inline(always)]
pub fn block_y() -> u32 {
    unsafe { nvptx::_block_idx_y() as u32 }
}

#[inline(always)]
pub fn grid_dim_x() -> u32 {
    unsafe { nvptx::_grid_dim_x() as u32 }
}

#[inline(always)]
pub fn sync_threads() {
    unsafe { nvptx::_syncthreads() }
}

/// `__syncthreads_or`: a barrier that returns true on every thread when `pred` held on any.
#[inline(always)]
pub fn sync_threads_or(pred: bool) -> bool {
    let input = pred as u32;
    let out: u32;
    unsafe {
        asm!(
            "{{ .reg .pred %p_in, %p_out;",
            "setp.ne.u32 %p_in, {input}, 0;",
            "bar.red.or.pred %p_out, 0, %p_in;",
            "selp.u32 {out}, 1, 0, %p_out; }}",
            input = in(reg32) input,
            out = out(reg32) out,
        );
    }
    out != 0
}

/// The 32-bit mask of lanes whose `pred` holds (`__ballot_sync` over the full warp).
#[inline(always)]
pub fn warp_ballot(pred: bool) -> u32 {
    let input = pred as u32;
    let out: u32;
    unsafe {
        asm!(
            "{{ .reg .pred %p_in;",
            "setp.ne.u32 %p_in, {input}, 0;",
            "vote.sync.ballot.b32 {out}, %p_in, 0xffffffff; }}",
            input = in(reg32) input,
            out = out(reg32) out,
        );
    }
    out
}

/// Two consecutive floats through the read-only data cache.
///
/// # Safety
/// `ptr` is 8-byte aligned global memory, valid and unchanged for the whole launch.
#[inline(always)]
pub unsafe fn load_nc_f32x2(ptr: *const f32) -> (f32, f32) {
    let (a, b): (f32, f32);
    asm!(
        "ld.global.nc.v2.f32 {{{a}, {b}}}, [{ptr}];",
        a = out(reg32) a,
        b = out(reg32) b,
        ptr = in(reg64) ptr,
    );
    (a, b)
}

/// Two consecutive `u32` through the read-only data cache.
///
/// # Safety
/// `ptr` is 8-byte aligned global memory, valid and unchanged for the whole launch.
#[inline(always)]
pub unsafe fn load_nc_u32x2(ptr: *const u32) -> [u32; 2] {
    let (a, b): (u32, u32);
    asm!(
        "ld.global.nc.v2.u32 {{{a}, {b}}}, [{ptr}];",
        a = out(reg32) a,
        b = out(reg32) b,
        ptr = in(reg64) ptr,
    );
    [a, b]
}

/// Four consecutive floats through the read-only data cache.
///
/// # Safety
/// `ptr` is 16-byte aligned global memory, valid and unchanged for the whole launch.
#[inline(always)]
pub unsafe fn load_nc_f32x4(ptr: *const f32) -> (f32, f32, f32, f32) {
    let (a, b, c, d): (f32, f32, f32, f32);
    asm!(
        "ld.global.nc.v4.f32 {{{a}, {b}, {c}, {d}}}, [{ptr}];",
        a = out(reg32) a,
        b = out(reg32) b,
        c = out(reg32) c,
        d = out(reg32) d,
        ptr = in(reg64) ptr,
    );
    (a, b, c, d)
}

/// A dynamic shared memory array of `f32` (declared once for the module).
#[inline(always)]
pub fn dynamic_shared_f32() -> *mut f32 {
    let p: u64;
    unsafe {
        asm!("cvta.shared.u64 {p}, SPARSEFLOW_DYNAMIC_SMEM;", p = out(reg64) p);
    }
    p as *mut f32
}

core::arch::global_asm!(".extern .shared .align 16 .b8 SPARSEFLOW_DYNAMIC_SMEM[];");

/// `atomicOr` on a global `u32`.
///
/// # Safety
/// `ptr` must point to device memory valid for the whole launch.
#[inline(always)]
pub unsafe fn atomic_or_u32(ptr: *mut u32, value: u32) {
    asm!(
        "red.global.or.b32 [{ptr}], {value};",
        ptr = in(reg64) ptr,
        value = in(reg32) value,
    );
}

/// `__shfl_sync(0xffffffff, value, lane)`: `value` as held by `lane`.
#[inline(always)]
pub fn shfl_u32(value: u32, lane: u32) -> u32 {
    let out: u32;
    unsafe {
        asm!(
            "shfl.sync.idx.b32 {out}, {v}, {l}, 0x1f, 0xffffffff;",
            out = out(reg32) out,
            v = in(reg32) value,
            l = in(reg32) lane,
        );
    }
    out
}

#[inline(always)]
pub fn block_z() -> u32 {
    unsafe { nvptx::_block_idx_z() as u32 }
}

/// `a · b + c` with one rounding (`fma.rn.f32`), as the CPU's `f32::mul_add`.
#[inline(always)]
pub fn fma_f32(a: f32, b: f32, c: f32) -> f32 {
    let out: f32;
    unsafe {
        asm!(
            "fma.rn.f32 {out}, {a}, {b}, {c};",
            out = out(reg32) out,
            a = in(reg32) a,
            b = in(reg32) b,
            c = in(reg32) c,
        );
    }
    out
}

/// `__shfl_xor_sync(0xffffffff, value, mask)`.
#[inline(always)]
pub fn shfl_xor_u32(value: u32, mask: u32) -> u32 {
    let out: u32;
    unsafe {
        asm!(
            "shfl.sync.bfly.b32 {out}, {v}, {m}, 0x1f, 0xffffffff;",
            out = out(reg32) out,
            v = in(reg32) value,
            m = in(reg32) mask,
        );
    }
    out
}

/// Inclusive prefix sum of `value` over each aligned segment of `width` lanes (a power of two);
/// the whole warp must call it.
#[inline(always)]
pub fn scan_add_u32(value: u32, width: u32) -> u32 {
    let segment = (WARP_SIZE - width) << 8;
    let lane = thread_x() % width;
    let mut sum = value;
    let mut delta = 1;
    while delta < width {
        let up: u32;
        unsafe {
            asm!(
                "shfl.sync.up.b32 {out}, {v}, {d}, {c}, 0xffffffff;",
                out = out(reg32) up,
                v = in(reg32) sum,
                d = in(reg32) delta,
                c = in(reg32) segment,
            );
        }
        if lane >= delta {
            sum += up;
        }
        delta *= 2;
    }
    sum
}

/// `__syncwarp()`: orders the warp's shared-memory writes before its later reads.
#[inline(always)]
pub fn sync_warp() {
    unsafe { asm!("bar.warp.sync 0xffffffff;") }
}

/// Sleeps about `ns` nanoseconds (a polling warp leaves the issue slots to the others).
#[inline(always)]
pub fn nanosleep(ns: u32) {
    unsafe { asm!("nanosleep.u32 {ns};", ns = in(reg32) ns) }
}

/// The `u32` at shared-window address `addr`, read again each time (a flag another warp sets).
///
/// # Safety
/// `addr` is a 4-byte aligned address inside the CTA's shared memory.
#[inline(always)]
pub unsafe fn load_volatile_shared_u32(addr: u32) -> u32 {
    let out: u32;
    asm!(
        "ld.volatile.shared.u32 {out}, [{addr}];",
        addr = in(reg32) addr,
        out = out(reg32) out,
    );
    out
}

/// Writes `value` at shared-window address `addr` (a flag other warps poll).
///
/// # Safety
/// `addr` is a 4-byte aligned address inside the CTA's shared memory.
#[inline(always)]
pub unsafe fn store_volatile_shared_u32(addr: u32, value: u32) {
    asm!(
        "st.volatile.shared.u32 [{addr}], {v};",
        addr = in(reg32) addr,
        v = in(reg32) value,
    );
}

/// Stores four consecutive floats with one 16-byte store.
///
/// # Safety
/// `ptr` is 16-byte aligned global memory.
#[inline(always)]
pub unsafe fn store_f32x4(ptr: *mut f32, (a, b, c, d): (f32, f32, f32, f32)) {
    asm!(
        "st.global.v4.f32 [{ptr}], {{{a}, {b}, {c}, {d}}};",
        ptr = in(reg64) ptr,
        a = in(reg32) a,
        b = in(reg32) b,
        c = in(reg32) c,
        d = in(reg32) d,
    );
}

/// Stores four consecutive floats to shared memory with one 16-byte shared store.
///
/// # Safety
/// `ptr` is a generic pointer into shared memory, 16-byte aligned.
#[inline(always)]
pub unsafe fn store_shared_f32x4(ptr: *mut f32, (a, b, c, d): (f32, f32, f32, f32)) {
    asm!(
        "{{ .reg .u64 %s;",
        "cvta.to.shared.u64 %s, {ptr};",
        "st.shared.v4.f32 [%s], {{{a}, {b}, {c}, {d}}}; }}",
        ptr = in(reg64) ptr,
        a = in(reg32) a,
        b = in(reg32) b,
        c = in(reg32) c,
        d = in(reg32) d,
    );
}

/// The shared-window address (for `ld.shared`) of a generic pointer into shared memory.
#[inline(always)]
pub fn shared_address(ptr: *const f32) -> u32 {
    let out: u32;
    unsafe {
        asm!(
            "{{ .reg .u64 %s;",
            "cvta.to.shared.u64 %s, {ptr};",
            "cvt.u32.u64 {out}, %s; }}",
            ptr = in(reg64) ptr,
            out = out(reg32) out,
        );
    }
    out
}

/// Four consecutive floats at shared-window address `addr`, with one 16-byte shared load.
///
/// # Safety
/// `addr` is a 16-byte aligned address inside the CTA's shared memory.
#[inline(always)]
pub unsafe fn load_shared_f32x4_at(addr: u32) -> (f32, f32, f32, f32) {
    let [a, b, c, d] = load_shared_u32x4(addr).map(f32::from_bits);
    (a, b, c, d)
}

/// The shared-window address of the module's dynamic shared memory (for `ld.shared`/`st.shared`,
/// which take 32-bit addresses and need no generic-to-shared conversion per access).
#[inline(always)]
pub fn dynamic_shared_base() -> u32 {
    let out: u32;
    unsafe {
        asm!("mov.u32 {out}, SPARSEFLOW_DYNAMIC_SMEM;", out = out(reg32) out);
    }
    out
}

/// One `u32` at shared-window address `addr`.
///
/// # Safety
/// `addr` is a 4-byte aligned address inside the CTA's shared memory.
#[inline(always)]
pub unsafe fn load_shared_u32(addr: u32) -> u32 {
    let out: u32;
    asm!("ld.shared.u32 {out}, [{addr}];", addr = in(reg32) addr, out = out(reg32) out);
    out
}

/// One `f32` at shared-window address `addr`.
///
/// # Safety
/// As [`load_shared_u32`].
#[inline(always)]
pub unsafe fn load_shared_f32(addr: u32) -> f32 {
    f32::from_bits(load_shared_u32(addr))
}

/// Four consecutive `u32` at shared-window address `addr`, with one 16-byte shared load.
///
/// # Safety
/// `addr` is a 16-byte aligned address inside the CTA's shared memory.
#[inline(always)]
pub unsafe fn load_shared_u32x4(addr: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!(
        "ld.shared.v4.u32 {{{a}, {b}, {c}, {d}}}, [{addr}];",
        addr = in(reg32) addr,
        a = out(reg32) a,
        b = out(reg32) b,
        c = out(reg32) c,
        d = out(reg32) d,
    );
    [a, b, c, d]
}

/// Two consecutive `u32` at shared-window address `addr`, with one 8-byte shared load.
///
/// # Safety
/// `addr` is an 8-byte aligned address inside the CTA's shared memory.
#[inline(always)]
pub unsafe fn load_shared_u32x2(addr: u32) -> [u32; 2] {
    let (a, b): (u32, u32);
    asm!(
        "ld.shared.v2.u32 {{{a}, {b}}}, [{addr}];",
        addr = in(reg32) addr,
        a = out(reg32) a,
        b = out(reg32) b,
    );
    [a, b]
}

/// Stores two consecutive `u32` at shared-window address `addr` with one 8-byte store.
///
/// # Safety
/// `addr` is an 8-byte aligned address inside the CTA's shared memory.
#[inline(always)]
pub unsafe fn store_shared_u32x2(addr: u32, [a, b]: [u32; 2]) {
    asm!(
        "st.shared.v2.u32 [{addr}], {{{a}, {b}}};",
        addr = in(reg32) addr,
        a = in(reg32) a,
        b = in(reg32) b,
    );
}

/// `bar.sync id, threads`: a barrier among the `threads` threads (a multiple of 32) of the CTA
/// that name barrier `id` (1..16; 0 is [`sync_threads`]'), e.g. one warpgroup's.
#[inline(always)]
pub fn sync_named(id: u32, threads: u32) {
    unsafe {
        asm!("bar.sync {id}, {threads};", id = in(reg32) id, threads = in(reg32) threads);
    }
}

/// `bar.arrive id, threads`: arrives at named barrier `id` without waiting (the producer's
/// side of a hand-over whose consumers [`sync_named`] on it).
#[inline(always)]
pub fn arrive_named(id: u32, threads: u32) {
    unsafe {
        asm!("bar.arrive {id}, {threads};", id = in(reg32) id, threads = in(reg32) threads);
    }
}

/// Stores one `u32` at shared-window address `addr`.
///
/// # Safety
/// `addr` is a 4-byte aligned address inside the CTA's shared memory.
#[inline(always)]
pub unsafe fn store_shared_u32(addr: u32, value: u32) {
    asm!("st.shared.u32 [{addr}], {v};", addr = in(reg32) addr, v = in(reg32) value);
}

/// Stores one `f32` at shared-window address `addr`.
///
/// # Safety
/// As [`store_shared_u32`].
#[inline(always)]
pub unsafe fn store_shared_f32(addr: u32, value: f32) {
    store_shared_u32(addr, value.to_bits());
}

/// One float from global memory that this CTA reads once: cached in L2 only (`.cg`), so a
/// streamed input does not evict from L1 the weight rows the gather reuses.
///
/// # Safety
/// `ptr` is 4-byte aligned global memory, valid and unchanged for the whole launch.
#[inline(always)]
pub unsafe fn load_streaming_f32(ptr: *const f32) -> f32 {
    let out: f32;
    asm!(
        "ld.global.cg.f32 {out}, [{ptr}];",
        ptr = in(reg64) ptr,
        out = out(reg32) out,
    );
    out
}

/// Index of the lowest set bit of `m` (`m` non-zero): the bit isolated (`m & −m`), then found.
/// One bit-find; a bit reversal before it cost the column sweep 2–3% at 1% spikes (H100).
#[inline(always)]
pub fn lowest_set_bit(m: u32) -> u32 {
    let out: u32;
    unsafe {
        asm!(
            "bfind.u32 {out}, {m};",
            m = in(reg32) m & m.wrapping_neg(),
            out = out(reg32) out,
        );
    }
    out
}

/// A cache policy under which the lines a load brings into L2 are evicted first: for a pass
/// that streams its input once, so that the dirty lines the previous kernel left in L2 are
/// written back later, while the next kernel keeps DRAM less busy.
#[inline(always)]
pub fn l2_evict_first_policy() -> u64 {
    let policy: u64;
    // PTX ISA 7.4: the sm_80 module (ISA 7.0) streams without the hint.
    #[cfg(sparseflow_sm90)]
    unsafe {
        asm!(
            "createpolicy.fractional.L2::evict_first.b64 {p}, 1.0;",
            p = out(reg64) policy,
            options(pure, nomem, nostack),
        );
    }
    #[cfg(not(sparseflow_sm90))]
    {
        policy = 0;
    }
    policy
}

/// One float from global memory, read once: through the read-only path, under L2 cache
/// `policy` (see [`l2_evict_first_policy`]).
///
/// # Safety
/// `ptr` is 4-byte aligned global memory, valid and unchanged for the whole launch.
#[inline(always)]
pub unsafe fn load_once_f32(ptr: *const f32, policy: u64) -> f32 {
    let out: f32;
    #[cfg(not(sparseflow_sm90))]
    {
        let _ = policy;
        out = load_nc_f32(ptr);
    }
    #[cfg(sparseflow_sm90)]
    asm!(
        "ld.global.nc.L2::cache_hint.f32 {out}, [{ptr}], {policy};",
        ptr = in(reg64) ptr,
        policy = in(reg64) policy,
        out = out(reg32) out,
        options(pure, readonly, nostack),
    );
    out
}

/// One float from global memory through the read-only data cache (L1).
///
/// # Safety
/// `ptr` is 4-byte aligned global memory, valid and unchanged for the whole launch.
#[inline(always)]
pub unsafe fn load_nc_f32(ptr: *const f32) -> f32 {
    let out: f32;
    asm!(
        "ld.global.nc.f32 {out}, [{ptr}];",
        ptr = in(reg64) ptr,
        out = out(reg32) out,
    );
    out
}

/// One `u32` from global memory through the read-only data cache (L1).
///
/// # Safety
/// `ptr` is 4-byte aligned global memory, valid and unchanged for the whole launch.
#[inline(always)]
pub unsafe fn load_nc_u32(ptr: *const u32) -> u32 {
    let out: u32;
    asm!(
        "ld.global.nc.u32 {out}, [{ptr}];",
        ptr = in(reg64) ptr,
        out = out(reg32) out,
    );
    out
}

/// Four consecutive `u32` from global memory through the read-only data cache.
///
/// # Safety
/// `ptr` is 16-byte aligned global memory, valid and unchanged for the whole launch.
#[inline(always)]
pub unsafe fn load_nc_u32x4(ptr: *const u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!(
        "ld.global.nc.v4.u32 {{{a}, {b}, {c}, {d}}}, [{ptr}];",
        a = out(reg32) a,
        b = out(reg32) b,
        c = out(reg32) c,
        d = out(reg32) d,
        ptr = in(reg64) ptr,
    );
    [a, b, c, d]
}

/// Stores four `u32` at shared-window address `addr` with one 16-byte shared store.
///
/// # Safety
/// `addr` is a 16-byte aligned address inside the CTA's shared memory.
#[inline(always)]
pub unsafe fn store_shared_u32x4(addr: u32, [a, b, c, d]: [u32; 4]) {
    asm!(
        "st.shared.v4.u32 [{addr}], {{{a}, {b}, {c}, {d}}};",
        addr = in(reg32) addr,
        a = in(reg32) a,
        b = in(reg32) b,
        c = in(reg32) c,
        d = in(reg32) d,
    );
}

/// `a − b` on the two halves of each word (`sub.rn.f16x2`).
#[inline(always)]
pub fn sub_f16x2(a: u32, b: u32) -> u32 {
    let out: u32;
    unsafe {
        asm!(
            "sub.rn.f16x2 {out}, {a}, {b};",
            a = in(reg32) a,
            b = in(reg32) b,
            out = out(reg32) out,
        );
    }
    out
}

/// `lo` and `hi` rounded to half precision and packed (`lo` in the low 16 bits), and whether
/// both converted exactly (false for NaN, for values out of half range and for any value with
/// more than 11 significant bits).
#[inline(always)]
pub fn pack_f16x2_exact(lo: f32, hi: f32) -> (u32, bool) {
    let (word, exact): (u32, u32);
    unsafe {
        asm!(
            "{{ .reg .b16 %h_lo, %h_hi; .reg .f32 %f_lo, %f_hi; .reg .pred %p_lo, %p_both;",
            "cvt.rn.f16x2.f32 {word}, {hi}, {lo};",
            "mov.b32 {{%h_lo, %h_hi}}, {word};",
            "cvt.f32.f16 %f_lo, %h_lo;",
            "cvt.f32.f16 %f_hi, %h_hi;",
            "setp.eq.f32 %p_lo, %f_lo, {lo};",
            "setp.eq.and.f32 %p_both, %f_hi, {hi}, %p_lo;",
            "selp.u32 {exact}, 1, 0, %p_both; }}",
            lo = in(reg32) lo,
            hi = in(reg32) hi,
            word = out(reg32) word,
            exact = out(reg32) exact,
        );
    }
    (word, exact != 0)
}

/// `ldmatrix.x4`: four 8×8 half matrices from shared memory, lanes `8i..8i+8` giving the row
/// addresses of matrix `i`; register `i` of each lane holds its two elements of matrix `i`, in
/// the layout of an `mma` operand fragment.
///
/// # Safety
/// Every lane's `addr` is a 16-byte aligned shared-window address of 16 readable bytes; the
/// whole warp executes it.
#[inline(always)]
pub unsafe fn load_matrix_x4(addr: u32) -> [u32; 4] {
    let (a, b, c, d): (u32, u32, u32, u32);
    asm!(
        "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{a}, {b}, {c}, {d}}}, [{addr}];",
        addr = in(reg32) addr,
        a = out(reg32) a,
        b = out(reg32) b,
        c = out(reg32) c,
        d = out(reg32) d,
    );
    [a, b, c, d]
}

/// `d = a · b + c` on the tensor cores: `a` a 16×16 half fragment (row major), `b` a 16×8 half
/// fragment (column major), `c`/`d` 16×8 f32 fragments, in the layouts of PTX's
/// `mma.m16n8k16`. The whole warp executes it.
#[inline(always)]
pub fn mma_m16n8k16_f16_f32(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
    let [mut d0, mut d1, mut d2, mut d3] = c;
    unsafe {
        asm!(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {{{d0}, {d1}, {d2}, {d3}}}, {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, {{{d0}, {d1}, {d2}, {d3}}};",
            a0 = in(reg32) a[0],
            a1 = in(reg32) a[1],
            a2 = in(reg32) a[2],
            a3 = in(reg32) a[3],
            b0 = in(reg32) b[0],
            b1 = in(reg32) b[1],
            d0 = inout(reg32) d0,
            d1 = inout(reg32) d1,
            d2 = inout(reg32) d2,
            d3 = inout(reg32) d3,
            options(pure, nomem, nostack),
        );
    }
    [d0, d1, d2, d3]
}

/// Starts an asynchronous 16-byte copy from global to shared memory (`cp.async.cg`, L2 only);
/// complete it with [`async_copy_wait_all`].
///
/// # Safety
/// `dst` is a 16-byte aligned shared-window address and `src` 16-byte aligned global memory,
/// valid and unchanged for the whole launch.
#[inline(always)]
pub unsafe fn async_copy_16(dst: u32, src: *const u32) {
    asm!(
        "cp.async.cg.shared.global [{dst}], [{src}], 16;",
        dst = in(reg32) dst,
        src = in(reg64) src,
    );
}

/// Commits this thread's started [`async_copy_16`]s and waits for all of them.
#[inline(always)]
pub fn async_copy_wait_all() {
    unsafe {
        asm!("cp.async.commit_group;", "cp.async.wait_group 0;");
    }
}

/// `wgmma.fence`: orders this warpgroup's register accesses before the warpgroup MMAs that
/// follow (required before the first `wgmma` and after registers they read were written).
#[inline(always)]
pub fn wgmma_fence() {
    unsafe { asm!("wgmma.fence.sync.aligned;") }
}

/// Stores the box at shared-window address `src` (128-byte aligned, laid out as the tensor map
/// describes) into the 4-d tensor that `map` (the generic address of a `CUtensorMap` in
/// global memory) describes, at coordinates `[x, y, z, w]` (innermost first), with the tensor
/// memory accelerator, in this thread's current bulk group. Shared writes of other threads
/// must be fenced ([`fence_proxy_async_shared`]) and synchronised before.
///
/// # Safety
/// `map` is a valid tensor map whose box fits at `src` in the CTA's shared memory, which does
/// not change until [`bulk_wait_read`] returns.
#[cfg(sparseflow_sm90)]
#[inline(always)]
pub unsafe fn tensor_store_4d(map: u64, src: u32, [x, y, z, w]: [u32; 4]) {
    asm!(
        "cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [{map}, {{{x}, {y}, {z}, {w}}}], [{src}];",
        map = in(reg64) map,
        src = in(reg32) src,
        x = in(reg32) x,
        y = in(reg32) y,
        z = in(reg32) z,
        w = in(reg32) w,
    );
}

/// Closes this thread's bulk group and waits until every bulk copy it issued has read its
/// shared memory (the source may then be overwritten; the writes may still be in flight).
#[cfg(sparseflow_sm90)]
#[inline(always)]
pub fn bulk_wait_read() {
    unsafe {
        asm!("cp.async.bulk.commit_group;");
        asm!("cp.async.bulk.wait_group.read 0;");
    }
}

/// Waits until every bulk copy this thread issued has completed, writes included.
#[cfg(sparseflow_sm90)]
#[inline(always)]
pub fn bulk_wait_all() {
    unsafe { asm!("cp.async.bulk.wait_group 0;") }
}

/// `fence.proxy.async.shared::cta`: makes this thread's writes to shared memory (stores and
/// `cp.async` copies) visible to the asynchronous proxy that `wgmma` reads shared memory through.
#[inline(always)]
pub fn fence_proxy_async_shared() {
    unsafe { asm!("fence.proxy.async.shared::cta;") }
}

/// The `m64n64` warpgroup MMAs with A in registers: `$shape` (`.kN.dtype.atype.btype`) and the
/// operands after the accumulate predicate (`$tail`) differ, the 32 accumulator registers, four
/// A registers, B descriptor and predicate do not.
macro_rules! wgmma_m64n64 {
    ($(#[$doc:meta])* $name:ident, $acc:ty, $shape:literal, $tail:literal) => {
        $(#[$doc])*
        #[inline(always)]
        pub unsafe fn $name(d: &mut [$acc; 32], a: [u32; 4], b: u64, accumulate: bool) {
            asm!(
                "{{ .reg .pred p;",
                "setp.ne.u32 p, {37}, 0;",
                concat!("wgmma.mma_async.sync.aligned.m64n64", $shape, " {{{0}, {1}, {2}, {3}, {4}, {5}, {6}, {7}, {8}, {9}, {10}, {11}, {12}, {13}, {14}, {15}, {16}, {17}, {18}, {19}, {20}, {21}, {22}, {23}, {24}, {25}, {26}, {27}, {28}, {29}, {30}, {31}}}, {{{32}, {33}, {34}, {35}}}, {36}, p", $tail, "; }}"),
                inout(reg32) d[0],
                inout(reg32) d[1],
                inout(reg32) d[2],
                inout(reg32) d[3],
                inout(reg32) d[4],
                inout(reg32) d[5],
                inout(reg32) d[6],
                inout(reg32) d[7],
                inout(reg32) d[8],
                inout(reg32) d[9],
                inout(reg32) d[10],
                inout(reg32) d[11],
                inout(reg32) d[12],
                inout(reg32) d[13],
                inout(reg32) d[14],
                inout(reg32) d[15],
                inout(reg32) d[16],
                inout(reg32) d[17],
                inout(reg32) d[18],
                inout(reg32) d[19],
                inout(reg32) d[20],
                inout(reg32) d[21],
                inout(reg32) d[22],
                inout(reg32) d[23],
                inout(reg32) d[24],
                inout(reg32) d[25],
                inout(reg32) d[26],
                inout(reg32) d[27],
                inout(reg32) d[28],
                inout(reg32) d[29],
                inout(reg32) d[30],
                inout(reg32) d[31],
                in(reg32) a[0],
                in(reg32) a[1],
                in(reg32) a[2],
                in(reg32) a[3],
                in(reg64) b,
                in(reg32) accumulate as u32,
            );
        }
    };
}

wgmma_m64n64!(
    /// `d = a · b (+ d when accumulate)` on the warpgroup's tensor cores: `a` this warp's 16 rows
    /// of a 64×16 half tile in registers (the layout of `mma.m16n8k16`'s A), `b` a 16×64 half
    /// tile in shared memory given by its descriptor, `d` the warp's 16×64 f32 accumulator
    /// fragment (`mma.m16n8k16`'s C layout for each of the eight n8 tiles, `d[4·tile + i]`).
    /// Asynchronous: `d` is not valid until [`wgmma_commit`] and [`wgmma_wait_pending`].
    ///
    /// # Safety
    /// The four warps of an aligned warpgroup execute it together, after [`wgmma_fence`]; `b`
    /// describes shared memory this CTA wrote and fenced with [`fence_proxy_async_shared`].
    wgmma_m64n64k16_f16,
    f32,
    "k16.f32.f16.f16",
    ", 1, 1, 0"
);

wgmma_m64n64!(
    /// `d = a · b (+ d when accumulate)` on the warpgroup's tensor cores in exact integer
    /// arithmetic: `a` this warp's 16 rows of a 64×32 tile of unsigned bytes in registers (the
    /// layout of `mma.m16n8k32`'s A), `b` a 32×64 tile of signed bytes in shared memory given by
    /// its descriptor, `d` the warp's 16×64 s32 accumulator fragment (the layout of
    /// [`wgmma_m64n64k16_f16`]'s `d`). Asynchronous, as that one.
    ///
    /// # Safety
    /// As [`wgmma_m64n64k16_f16`].
    wgmma_m64n64k32_u8_s8,
    u32,
    "k32.s32.u8.s8",
    ""
);

/// `wgmma.commit_group`: closes the warpgroup MMAs issued since the last commit into a group.
#[inline(always)]
pub fn wgmma_commit() {
    unsafe { asm!("wgmma.commit_group.sync.aligned;") }
}

/// Waits until at most `PENDING` committed warpgroup MMA groups are in flight; with `PENDING`
/// 0, `d` (their accumulator) is valid after it. Taking `d` keeps the compiler from reading or
/// writing it across the wait.
#[inline(always)]
pub fn wgmma_wait_pending<const PENDING: u32>(d: &mut [f32; 32]) {
    unsafe { asm!("wgmma.wait_group.sync.aligned {n};", n = const PENDING) };
    // SAFETY: `[f32; 32]` and `[u32; 32]` have the same size and alignment.
    fence_operands(unsafe { &mut *(d as *mut [f32; 32]).cast::<[u32; 32]>() });
}

/// [`wgmma_wait_pending`] for three integer accumulators at once.
#[inline(always)]
pub fn wgmma_wait_pending_3<const PENDING: u32>(d: &mut [[u32; 32]; 3]) {
    unsafe { asm!("wgmma.wait_group.sync.aligned {n};", n = const PENDING) };
    for d in d {
        fence_operands(d);
    }
}

/// Makes each register of `d` an operand of an empty `asm!` after an asynchronous writer's wait
/// (asm statements keep their order), so the compiler neither reads `d` before the wait nor
/// keeps a copy from before it (CUTLASS's `warpgroup_fence_operand`).
#[inline(always)]
fn fence_operands(d: &mut [u32; 32]) {
    unroll!(i in [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
        22, 23, 24, 25, 26, 27, 28, 29, 30, 31] {
        unsafe { asm!("// {0}", inout(reg32) d[i]) };
    });
}

/// Closes this thread's [`async_copy_16`]s started since the last commit into a group.
#[inline(always)]
pub fn async_copy_commit() {
    unsafe { asm!("cp.async.commit_group;") }
}

/// Waits until at most `PENDING` of this thread's committed copy groups are still in flight
/// (the older ones are complete).
#[inline(always)]
pub fn async_copy_wait_pending<const PENDING: u32>() {
    unsafe { asm!("cp.async.wait_group {n};", n = const PENDING) }
}

/// `griddepcontrol.wait`: when this grid was launched as a programmatic dependent of the
/// previous kernel on its stream, waits until that kernel has completed and its writes are
/// visible; otherwise returns at once.
#[cfg(sparseflow_sm90)]
#[inline(always)]
pub fn grid_dependency_wait() {
    unsafe { asm!("griddepcontrol.wait;") }
}

/// `griddepcontrol.launch_dependents`: lets the next kernel on the stream, when launched as a
/// programmatic dependent, start its CTAs (which wait for this grid's results themselves).
#[cfg(sparseflow_sm90)]
#[inline(always)]
pub fn launch_dependents() {
    unsafe { asm!("griddepcontrol.launch_dependents;") }
}
