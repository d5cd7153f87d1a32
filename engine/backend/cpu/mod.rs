//! CPU reference backend (f32 compute; bf16 storage converted at the boundary).
//!
//! Every op family lives in its own file as a pair: a slice-level kernel generic over [`Float`]
//! (so the gradient-check tests can run the very same code in f64) and a thin `Buf`-level wrapper
//! that checks dtypes and lengths, converts bf16 storage to f32 temporaries and rounds results
//! back (round-to-nearest-even).
//!
//! Memory model: a `Buf` on this backend is a raw host address. Turning it into a Rust slice is
//! sound because the memory planner guarantees that live buffers handed to one op do not
//! overlap, with two documented exceptions that the wrappers handle without ever holding a
//! shared and a mutable slice over the same bytes: `add` may write into one of its inputs and
//! `cross_entropy` may write dlogits over logits. Every wrapper also rejects (with
//! `Error::Shape`) outputs that overlap their inputs, so a planner bug cannot become UB here.
//!
//! Speed: GEMMs go to the `gemm` crate (AVX-512 at run time, rayon inside); attention, the loss
//! and the norms use the row primitives of `vecmath` (vectorised exp / max / sums, compiled per
//! CPU level). Big per-call temporaries come from a per-thread reusable scratch
//! (`with_scratch`). All reductions have a fixed order, so results are bitwise identical for any
//! thread count (tested).

pub mod adamw;
pub mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_x86;
mod copy;
pub mod cross_entropy;
pub mod elementwise;
pub mod embedding;
mod float;
pub mod gemm;
#[cfg(target_arch = "x86_64")]
mod gemm_x86;
pub mod reduce;
pub mod rmsnorm;
pub mod rope;
pub mod swiglu;
pub mod vecmath;

pub use float::Float;

use super::{
    AdamW, AdamWBufs, AttnBwd, AttnFwd, Backend, Buf, Copy2d, CrossEntropy, CrossEntropyShard,
    CrossEntropyStats, DeviceMem, EmbeddingShard, Gemm, RmsNorm, RmsNormBwd, RmsNormResidual,
    RopeShape,
};
use crate::error::{Error, Result};
use crate::tensor::DType;
use half::bf16;
use rayon::prelude::*;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

/// The CPU backend. Stateless apart from the allocation counter; uses rayon's global pool.
#[derive(Default)]
pub struct CpuBackend {
    allocs: AtomicU64,
}

impl CpuBackend {
    pub fn new() -> CpuBackend {
        CpuBackend {
            allocs: AtomicU64::new(0),
        }
    }
}

/// 256-byte aligned, zero-initialised host memory.
struct HostMem {
    ptr: *mut u8,
    bytes: usize,
    layout: Layout,
}

// The memory is plain bytes owned by this value; ops reach it through raw addresses.
unsafe impl Send for HostMem {}
unsafe impl Sync for HostMem {}

impl DeviceMem for HostMem {
    fn ptr(&self) -> u64 {
        self.ptr as u64
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        // SAFETY: allocated in `CpuBackend::alloc` with exactly this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

pub(crate) const ALIGN: usize = 256;
/// Allocations from this size up are huge-page aligned (2 MiB).
const HUGE: usize = 2 << 20;

// ---- views and checks shared by the op files ----------------------------------------------

/// A shared slice over a buffer. SAFETY (caller): `b` is a live host buffer of this backend with
/// `b.len` elements of `T`, and no mutable view of the same bytes is alive.
pub(crate) unsafe fn view<'a, T>(b: Buf) -> &'a [T] {
    if b.len == 0 {
        return &[];
    }
    std::slice::from_raw_parts(b.ptr as *const T, b.len)
}

/// A mutable slice over a buffer. SAFETY (caller): as `view`, and no other view of the bytes.
pub(crate) unsafe fn view_mut<'a, T>(b: Buf) -> &'a mut [T] {
    if b.len == 0 {
        return &mut [];
    }
    std::slice::from_raw_parts_mut(b.ptr as *mut T, b.len)
}

pub(crate) use super::check::{
    check_disjoint, check_dtype, check_len, overlaps, shape_err, FLOATS,
};

/// Work below this many elements stays on the calling thread (rayon overhead dominates).
pub(crate) const PAR_MIN: usize = 1 << 15;
/// Element chunk for parallel elementwise work; fixed so results never depend on thread count.
pub(crate) const CHUNK: usize = 1 << 14;

pub(crate) fn bf16_to_f32(src: &[bf16], dst: &mut [f32]) {
    let go = |(s, d): (&[bf16], &mut [f32])| vecmath::bf16_bits_to_f32(bytemuck::cast_slice(s), d);
    if src.len() >= PAR_MIN {
        src.par_chunks(CHUNK)
            .zip(dst.par_chunks_mut(CHUNK))
            .for_each(go);
    } else {
        go((src, dst));
    }
}

/// Round-to-nearest-even f32 -> bf16 (NaN stays NaN, quieted).
#[inline(always)]
pub(crate) fn f32_to_bf16_bits(x: f32) -> u16 {
    vecmath::round_bf16(x)
}

pub(crate) fn f32_to_bf16(src: &[f32], dst: &mut [bf16]) {
    let go = |(s, d): (&[f32], &mut [bf16])| {
        vecmath::f32_to_bf16_bits_slice(s, bytemuck::cast_slice_mut(d))
    };
    if src.len() >= PAR_MIN {
        src.par_chunks(CHUNK)
            .zip(dst.par_chunks_mut(CHUNK))
            .for_each(go);
    } else {
        go((src, dst));
    }
}

/// An f32 view of a float input: borrowed for f32, a converted copy for bf16.
/// SAFETY (caller): as `view`.
pub(crate) unsafe fn load<'a>(op: &'static str, what: &str, b: Buf) -> Result<Cow<'a, [f32]>> {
    check_dtype(op, what, b, FLOATS)?;
    Ok(match b.dtype {
        DType::F32 => Cow::Borrowed(view::<f32>(b)),
        _ => {
            let mut v = vec![0f32; b.len];
            bf16_to_f32(view::<bf16>(b), &mut v);
            Cow::Owned(v)
        }
    })
}

/// Runs `f` on an f32 view of a float output: the buffer itself for f32, a temporary rounded
/// into the buffer afterwards for bf16. `init` copies the current contents in first (for ops that
/// read their output, like gemm with beta != 0). SAFETY (caller): as `view_mut`.
pub(crate) unsafe fn store<R>(
    op: &'static str,
    what: &str,
    b: Buf,
    init: bool,
    f: impl FnOnce(&mut [f32]) -> R,
) -> Result<R> {
    check_dtype(op, what, b, FLOATS)?;
    Ok(match b.dtype {
        DType::F32 => f(view_mut::<f32>(b)),
        _ => {
            let mut tmp = vec![0f32; b.len];
            if init {
                bf16_to_f32(view::<bf16>(b), &mut tmp);
            }
            let r = f(&mut tmp);
            f32_to_bf16(&tmp, view_mut::<bf16>(b));
            r
        }
    })
}

thread_local! {
    /// Per-thread scratch reused across op calls: multi-megabyte temporaries allocated per call
    /// are fresh zero pages every time (page faults + kernel clearing, ~6 % of a CPU step).
    static SCRATCH: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `n` elements of this thread's reusable scratch. The contents are unspecified
/// (whatever the last op left): callers write before they read. Re-entrant use (not expected:
/// no op calls rayon while holding it) falls back to a fresh allocation.
pub(crate) fn with_scratch<T: Float, R>(n: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            let words = (n * std::mem::size_of::<T>()).div_ceil(8);
            if v.len() < words {
                v.resize(words, 0);
            }
            f(&mut bytemuck::cast_slice_mut::<u64, T>(&mut v[..words])[..n])
        }
        Err(_) => f(&mut vec![T::ZERO; n]),
    })
}

/// A raw pointer that may cross rayon tasks; each task writes a disjoint part (documented at use).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    #[inline(always)]
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn device_description(&self) -> String {
        format!("CPU ({} threads)", rayon::current_num_threads())
    }

    fn alloc(&self, bytes: usize) -> Result<Box<dyn DeviceMem>> {
        self.allocs.fetch_add(1, Ordering::Relaxed);
        // Arenas and parameter regions are large: 2 MiB-aligned and marked for transparent huge
        // pages, so that GEMM packing and the row-strided kernels do not thrash the TLB (4 KiB
        // pages cover 6 MiB with the whole second-level TLB).
        let align = if bytes >= HUGE { HUGE } else { ALIGN };
        let size = bytes.max(1).div_ceil(align) * align;
        let layout = Layout::from_size_align(size, align)
            .map_err(|e| Error::Backend(format!("cpu alloc of {bytes} bytes: {e}")))?;
        // SAFETY: layout has non-zero size.
        let ptr = unsafe {
            if align == HUGE {
                std::alloc::alloc(layout)
            } else {
                alloc_zeroed(layout)
            }
        };
        if ptr.is_null() {
            return Err(Error::Backend(format!(
                "cpu alloc of {bytes} bytes failed (out of memory)"
            )));
        }
        if align == HUGE {
            // SAFETY: [ptr, ptr + size) is this allocation. The advice comes before the first
            // touch (the zeroing), which then faults in huge pages; failing advice (no THP)
            // leaves ordinary pages, so its result is ignored.
            unsafe {
                #[cfg(target_os = "linux")]
                libc::madvise(ptr as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
                std::ptr::write_bytes(ptr, 0, size);
            }
        }
        Ok(Box::new(HostMem { ptr, bytes, layout }))
    }
    fn alloc_count(&self) -> u64 {
        self.allocs.load(Ordering::Relaxed)
    }
    fn upload(&self, dst: Buf, src: &[u8]) -> Result<()> {
        if src.len() != dst.bytes() {
            return Err(shape_err(
                "upload",
                format!("{} bytes into a buffer of {}", src.len(), dst.bytes()),
            ));
        }
        if src.is_empty() {
            return Ok(());
        }
        // SAFETY: dst is a live buffer of dst.bytes() bytes; src is ordinary host memory.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr as *mut u8, src.len()) };
        Ok(())
    }
    fn download(&self, src: Buf, dst: &mut [u8]) -> Result<()> {
        if dst.len() != src.bytes() {
            return Err(shape_err(
                "download",
                format!("{} bytes from a buffer of {}", dst.len(), src.bytes()),
            ));
        }
        if dst.is_empty() {
            return Ok(());
        }
        // SAFETY: src is a live buffer of src.bytes() bytes; dst is ordinary host memory.
        unsafe { std::ptr::copy_nonoverlapping(src.ptr as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn fill(&self, dst: Buf, value: f32) -> Result<()> {
        elementwise::fill(dst, value)
    }
    fn copy(&self, src: Buf, dst: Buf) -> Result<()> {
        elementwise::copy(src, dst)
    }
    fn copy_2d(&self, a: &Copy2d) -> Result<()> {
        copy::copy_2d_op(a)
    }
    fn cast(&self, src: Buf, dst: Buf) -> Result<()> {
        elementwise::cast(src, dst)
    }
    fn add(&self, a: Buf, b: Buf, out: Buf) -> Result<()> {
        elementwise::add(a, b, out)
    }
    fn scale(&self, x: Buf, alpha: f32) -> Result<()> {
        elementwise::scale(x, alpha)
    }

    fn gemm(&self, g: &Gemm, a: Buf, b: Buf, c: Buf) -> Result<()> {
        gemm::gemm_op(g, a, b, c)
    }

    fn embedding_fwd(&self, table: Buf, ids: Buf, out: Buf, dim: usize) -> Result<()> {
        embedding::embedding_fwd_op(table, ids, out, dim)
    }
    fn embedding_bwd(&self, dout: Buf, ids: Buf, dtable: Buf, dim: usize) -> Result<()> {
        embedding::embedding_bwd_op(dout, ids, dtable, dim)
    }
    fn embedding_shard_fwd(&self, a: &EmbeddingShard) -> Result<()> {
        embedding::embedding_shard_fwd_op(a)
    }
    fn embedding_shard_bwd(&self, a: &EmbeddingShard) -> Result<()> {
        embedding::embedding_shard_bwd_op(a)
    }

    fn rmsnorm_fwd(&self, a: &RmsNorm) -> Result<()> {
        rmsnorm::rmsnorm_fwd_op(a, None)
    }
    fn rmsnorm_residual_fwd(&self, a: &RmsNormResidual) -> Result<()> {
        let (norm, res) = a.split();
        rmsnorm::rmsnorm_fwd_op(&norm, Some(res))
    }
    fn rmsnorm_bwd(&self, a: &RmsNormBwd) -> Result<()> {
        rmsnorm::rmsnorm_bwd_op(a, None)
    }
    fn rmsnorm_bwd_add(&self, a: &RmsNormBwd, dres: Buf) -> Result<()> {
        rmsnorm::rmsnorm_bwd_op(a, Some(dres))
    }

    fn rope_fwd(&self, x: Buf, out: Buf, cos: Buf, sin: Buf, s: RopeShape) -> Result<()> {
        rope::rope_op("rope_fwd", x, out, cos, sin, s, false)
    }
    fn rope_bwd(&self, dout: Buf, dx: Buf, cos: Buf, sin: Buf, s: RopeShape) -> Result<()> {
        rope::rope_op("rope_bwd", dout, dx, cos, sin, s, true)
    }

    fn attention_fwd(&self, a: &AttnFwd) -> Result<()> {
        attention::attention_fwd_op(a)
    }
    fn attention_bwd(&self, a: &AttnBwd) -> Result<()> {
        attention::attention_bwd_op(a)
    }

    fn swiglu_fwd(&self, gate: Buf, up: Buf, out: Buf) -> Result<()> {
        swiglu::swiglu_fwd_op(gate, up, out)
    }
    fn swiglu_bwd(&self, dout: Buf, gate: Buf, up: Buf, dgate: Buf, dup: Buf) -> Result<()> {
        swiglu::swiglu_bwd_op(dout, gate, up, dgate, dup)
    }

    fn cross_entropy(&self, a: &CrossEntropy) -> Result<()> {
        cross_entropy::cross_entropy_op(a)
    }
    fn cross_entropy_stats(&self, a: &CrossEntropyStats) -> Result<()> {
        cross_entropy::cross_entropy_stats_op(a)
    }
    fn cross_entropy_shard(&self, a: &CrossEntropyShard) -> Result<()> {
        cross_entropy::cross_entropy_shard_op(a)
    }

    fn sum(&self, x: Buf, out: Buf) -> Result<()> {
        reduce::sum_op(x, out)
    }
    fn sum_squares(&self, xs: &[Buf], out: Buf) -> Result<()> {
        reduce::sum_squares_op(xs, out)
    }
    fn clip_coef(&self, norm_sq: Buf, max_norm: f32, coef: Buf) -> Result<()> {
        adamw::clip_coef_op(norm_sq, max_norm, coef)
    }
    fn adamw(&self, b: &AdamWBufs, hp: &AdamW) -> Result<()> {
        adamw::adamw_op(b, hp)
    }
}
