//! CUDA backend: kernels from the fatbins that build.rs embeds (kernels/*.cu), cuBLAS for GEMMs.
//!
//! One context, one non-blocking stream; every op is enqueued on that stream and returns without
//! waiting (only `upload`, `download` and `synchronize` block). cudarc's per-buffer event tracking
//! is switched off: buffers are raw device addresses planned by the engine, and ordering comes from
//! the single stream. A `CudaBackend` is driven by one host thread at a time (the tape's); its
//! methods are `Sync` only so that it can live in shared structures.
//!
//! The library is loaded at run time (cudarc `dynamic-loading`), so the binary starts on machines
//! without CUDA; `CudaBackend::new` then returns a clean `Error::Backend`.

mod attention;
mod elementwise;
mod gemm;
mod loss;
mod norm;
mod optim;

use super::{
    AdamW, AdamWBufs, AttnBwd, AttnFwd, Backend, Buf, Copy2d, CrossEntropy, CrossEntropyShard,
    CrossEntropyStats, DeviceMem, EmbeddingShard, Gemm, RmsNorm, RmsNormBwd, RmsNormResidual,
    RopeShape,
};
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{result as dr, sys, CudaContext, CudaFunction, CudaModule, CudaStream};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

mod fatbins {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Names of the embedded fatbins (one per kernels/*.cu), for diagnostics.
pub fn embedded_modules() -> Vec<&'static str> {
    fatbins::FATBINS.iter().map(|(n, _)| *n).collect()
}

/// Whether an embedded fatbin defines kernel `name` (its NUL-terminated symbol is in a cubin's
/// string table), so a machine without a GPU can check what the binary carries.
pub fn embeds_kernel(name: &str) -> bool {
    let sym: Vec<u8> = name.bytes().chain([0]).collect();
    fatbins::FATBINS
        .iter()
        .any(|(_, bin)| bin.windows(sym.len()).any(|w| w == sym.as_slice()))
}

/// The CUDA backend for one device.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    modules: Vec<(&'static str, Arc<CudaModule>)>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    scratch: Mutex<Option<CudaMem>>,
    allocs: AtomicU64,
    sm_count: u32,
    /// Largest dynamic shared memory a block may opt into (bytes).
    smem_optin: usize,
    /// Per kernel, the dynamic shared-memory limit already raised with cuFuncSetAttribute.
    smem_limits: Mutex<HashMap<String, usize>>,
}

/// One `cuMemAlloc` allocation (zeroed on the stream), freed after the stream drains on drop.
struct CudaMem {
    ptr: u64,
    bytes: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl DeviceMem for CudaMem {
    fn ptr(&self) -> u64 {
        self.ptr
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for CudaMem {
    fn drop(&mut self) {
        // Kernels already queued may still read or write this memory: drain the stream first.
        // Errors cannot be reported from drop; the context records them for the next call.
        self.ctx.record_err(self.ctx.bind_to_thread());
        self.ctx.record_err(self.stream.synchronize());
        self.ctx.record_err(unsafe { dr::free_sync(self.ptr) });
    }
}

/// A kernel argument. Each is passed to `cuLaunchKernel` through its own 8-byte slot; the kernel
/// reads as many bytes as its parameter type has (little-endian, so 4-byte values sit first).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    /// A device pointer (`Buf::ptr`).
    P(u64),
    /// `long long` (element counts).
    I64(i64),
    /// `int`.
    I32(i32),
    /// `float`.
    F32(f32),
}

impl Arg {
    fn slot(self) -> u64 {
        match self {
            Arg::P(p) => p,
            Arg::I64(v) => v as u64,
            Arg::I32(v) => v as u32 as u64,
            Arg::F32(v) => v.to_bits() as u64,
        }
    }
}

pub(crate) fn backend_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Backend(format!("cuda: {what}: {e}"))
}

impl CudaBackend {
    /// Opens device `ordinal`: context, stream, cuBLAS handle and every embedded kernel module.
    /// Returns `Error::Backend` (never panics) when the driver, cuBLAS or the device is missing.
    pub fn new(ordinal: usize) -> Result<Self> {
        // cudarc panics on first use of a missing library: probe the shared objects first.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Backend(
                "cuda: no NVIDIA driver found (libcuda.so could not be loaded); use the CPU backend \
                 or run on a machine with an NVIDIA GPU and driver >= 580"
                    .into(),
            ));
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() }
            || !unsafe { cudarc::cublaslt::sys::is_culib_present() }
        {
            return Err(Error::Backend(
                "cuda: cuBLAS / cuBLASLt (libcublas.so.13, libcublasLt.so.13) not found; add their \
                 directory (e.g. site-packages/nvidia/cu13/lib) to LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let count =
            CudaContext::device_count().map_err(|e| backend_err("cuInit / device count", e))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Backend(format!(
                "cuda: device {ordinal} requested but {count} device(s) visible"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| backend_err(&format!("create context on device {ordinal}"), e))?;
        // Buffers are raw addresses ordered by one stream; cudarc's per-slice events are not used.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| backend_err("create stream", e))?;
        let blas =
            CudaBlas::new(stream.clone()).map_err(|e| backend_err("create cuBLAS handle", e))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| backend_err("query SM count", e))?
            .max(1) as u32;
        let smem_optin = ctx
            .attribute(
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
            )
            .map_err(|e| backend_err("query shared memory limit", e))?
            .max(48 * 1024) as usize;
        let mut modules = Vec::new();
        for (name, bytes) in fatbins::FATBINS {
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(bytes.to_vec()))
                .map_err(|e| backend_err(&format!("load kernels/{name}.cu fatbin"), e))?;
            modules.push((*name, module));
        }
        Ok(CudaBackend {
            ctx,
            stream,
            blas,
            modules,
            functions: Mutex::new(HashMap::new()),
            scratch: Mutex::new(None),
            allocs: AtomicU64::new(0),
            sm_count,
            smem_optin,
            smem_limits: Mutex::new(HashMap::new()),
        })
    }

    /// The device's marketing name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> String {
        self.ctx
            .name()
            .unwrap_or_else(|_| "unknown CUDA device".into())
    }

    /// Number of streaming multiprocessors.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Total device memory in bytes.
    pub fn total_memory(&self) -> Result<usize> {
        self.ctx
            .total_mem()
            .map_err(|e| backend_err("query memory", e))
    }

    /// The stream every op of this backend runs on (the communicators order theirs against it).
    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The device's context (the communicators create their streams and events in it).
    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| backend_err("bind context to thread", e))
    }

    /// A kernel by its `extern "C"` name, searched in every embedded module (cached).
    pub(crate) fn function(&self, name: &str) -> Result<CudaFunction> {
        let mut cache = self
            .functions
            .lock()
            .map_err(|_| Error::Backend("cuda: kernel cache poisoned".into()))?;
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        self.bind()?;
        for (_, module) in &self.modules {
            if let Ok(f) = module.load_function(name) {
                cache.insert(name.to_string(), f.clone());
                return Ok(f);
            }
        }
        let mods: Vec<&str> = self.modules.iter().map(|(n, _)| *n).collect();
        Err(Error::Backend(format!(
            "cuda: kernel `{name}` not found in the embedded modules {mods:?}"
        )))
    }

    /// The most dynamic shared memory one block can use (after `allow_dynamic_smem`).
    pub(crate) fn smem_optin(&self) -> usize {
        self.smem_optin
    }

    /// Lets kernel `name` launch with up to `bytes` of dynamic shared memory (needed above 48 KB).
    pub(crate) fn allow_dynamic_smem(&self, name: &str, bytes: usize) -> Result<()> {
        if bytes <= 48 * 1024 {
            return Ok(());
        }
        let mut set = self
            .smem_limits
            .lock()
            .map_err(|_| Error::Backend("cuda: smem lock poisoned".into()))?;
        if set.get(name).is_some_and(|&b| b >= bytes) {
            return Ok(());
        }
        let f = self.function(name)?;
        self.bind()?;
        f.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .map_err(|e| {
            backend_err(
                &format!("{name}: allow {bytes} bytes of dynamic shared memory"),
                e,
            )
        })?;
        set.insert(name.to_string(), bytes);
        Ok(())
    }

    /// A device scratch area of at least `bytes`, owned by the backend and reused by every op
    /// (ops run in stream order, so one op's scratch use ends before the next op's begins). It
    /// only grows; each growth is one allocation counted by `alloc_count`.
    pub(crate) fn scratch(&self, bytes: usize) -> Result<u64> {
        let mut s = self
            .scratch
            .lock()
            .map_err(|_| Error::Backend("cuda: scratch lock poisoned".into()))?;
        if let Some(m) = s.as_ref() {
            if m.bytes >= bytes {
                return Ok(m.ptr);
            }
        }
        let want = bytes.max(1 << 20).next_power_of_two();
        *s = None; // drains the stream and frees the old area before the new one is taken
        let m = self.raw_alloc(want)?;
        let ptr = m.ptr;
        *s = Some(m);
        Ok(ptr)
    }

    fn raw_alloc(&self, bytes: usize) -> Result<CudaMem> {
        self.bind()?;
        let ptr = unsafe { dr::malloc_sync(bytes.max(256)) }
            .map_err(|e| backend_err(&format!("cuMemAlloc of {bytes} bytes"), e))?;
        self.allocs.fetch_add(1, Ordering::Relaxed);
        let mem = CudaMem {
            ptr,
            bytes,
            ctx: self.ctx.clone(),
            stream: self.stream.clone(),
        };
        // Zeroed like the CPU backend's memory, so no caller can depend on a difference.
        unsafe { dr::memset_d8_async(ptr, 0, bytes.max(256), self.stream.cu_stream()) }
            .map_err(|e| backend_err(&format!("zero {bytes} new bytes"), e))?;
        Ok(mem)
    }

    /// Launches kernel `name` on the backend's stream with a 1-D block of `block` threads.
    pub(crate) fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        let f = self.function(name)?;
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 || grid.1 > 65535 || grid.2 > 65535 {
            return Err(Error::Backend(format!(
                "cuda: kernel {name}: invalid grid {grid:?}"
            )));
        }
        let mut slots: Vec<u64> = args.iter().map(|a| a.slot()).collect();
        let mut params: Vec<*mut std::ffi::c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut std::ffi::c_void)
            .collect();
        self.bind()?;
        unsafe {
            dr::launch_kernel(
                f.cu_function(),
                grid,
                (block, 1, 1),
                smem,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| backend_err(&format!("launch {name} grid {grid:?} block {block}"), e))
    }

    /// A 1-D grid for a grid-stride loop over `work` items with `block` threads: enough blocks to
    /// fill the device several times over, never more than the work needs.
    pub(crate) fn grid_for(&self, work: usize, block: u32) -> u32 {
        let need = work.div_ceil(block as usize).max(1);
        need.min(self.sm_count as usize * 16).min(i32::MAX as usize) as u32
    }

    /// Times `f` with CUDA events on the backend's stream: runs it `warmup` times, then `iters`
    /// times between two events, and returns the mean milliseconds per call.
    pub fn time_ms(
        &self,
        warmup: usize,
        iters: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<f64> {
        for _ in 0..warmup {
            f()?;
        }
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = self
            .ctx
            .new_event(flags)
            .map_err(|e| backend_err("create event", e))?;
        let end = self
            .ctx
            .new_event(flags)
            .map_err(|e| backend_err("create event", e))?;
        start
            .record(&self.stream)
            .map_err(|e| backend_err("record event", e))?;
        for _ in 0..iters {
            f()?;
        }
        end.record(&self.stream)
            .map_err(|e| backend_err("record event", e))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| backend_err("event elapsed time", e))?;
        Ok(ms as f64 / iters.max(1) as f64)
    }

    /// Device-to-device copy of `bytes` bytes (the bandwidth baseline in the benches).
    pub fn memcpy_dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        unsafe { dr::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(|e| backend_err(&format!("cuMemcpyDtoD of {bytes} bytes"), e))
    }
}

pub(crate) use super::check::{
    check_disjoint, check_dtype, check_len, check_same, overlaps, FLOATS,
};

/// "f32" / "bf16": the suffix of dtype-specialised kernel names.
pub(crate) fn sfx(d: DType) -> &'static str {
    d.name()
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device_description(&self) -> String {
        self.device_name()
    }

    fn alloc(&self, bytes: usize) -> Result<Box<dyn DeviceMem>> {
        Ok(Box::new(self.raw_alloc(bytes)?))
    }
    fn alloc_count(&self) -> u64 {
        self.allocs.load(Ordering::Relaxed)
    }
    fn upload(&self, dst: Buf, src: &[u8]) -> Result<()> {
        if src.len() > dst.bytes() {
            return Err(Error::Shape {
                op: "upload",
                msg: format!("{} bytes into a buffer of {}", src.len(), dst.bytes()),
            });
        }
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        unsafe { dr::memcpy_htod_async(dst.ptr, src, self.stream.cu_stream()) }
            .map_err(|e| backend_err("upload (cuMemcpyHtoD)", e))?;
        // `src` is pageable host memory borrowed only for this call.
        self.synchronize()
    }
    fn download(&self, src: Buf, dst: &mut [u8]) -> Result<()> {
        if dst.len() > src.bytes() {
            return Err(Error::Shape {
                op: "download",
                msg: format!("{} bytes from a buffer of {}", dst.len(), src.bytes()),
            });
        }
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        unsafe { dr::memcpy_dtoh_async(dst, src.ptr, self.stream.cu_stream()) }
            .map_err(|e| backend_err("download (cuMemcpyDtoH)", e))?;
        self.synchronize()
    }
    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.stream
            .synchronize()
            .map_err(|e| backend_err("stream synchronize (an earlier kernel failed)", e))
    }

    fn fill(&self, dst: Buf, value: f32) -> Result<()> {
        self.fill_impl(dst, value)
    }
    fn copy(&self, src: Buf, dst: Buf) -> Result<()> {
        self.copy_impl(src, dst)
    }
    fn copy_2d(&self, a: &Copy2d) -> Result<()> {
        self.copy_2d_impl(a)
    }
    fn cast(&self, src: Buf, dst: Buf) -> Result<()> {
        self.cast_impl(src, dst)
    }
    fn add(&self, a: Buf, b: Buf, out: Buf) -> Result<()> {
        self.add_impl(a, b, out)
    }
    fn scale(&self, x: Buf, alpha: f32) -> Result<()> {
        self.scale_impl(x, alpha)
    }

    fn gemm(&self, g: &Gemm, a: Buf, b: Buf, c: Buf) -> Result<()> {
        self.gemm_impl(g, a, b, c)
    }

    fn embedding_fwd(&self, table: Buf, ids: Buf, out: Buf, dim: usize) -> Result<()> {
        self.embedding_fwd_impl(table, ids, out, dim)
    }
    fn embedding_bwd(&self, dout: Buf, ids: Buf, dtable: Buf, dim: usize) -> Result<()> {
        self.embedding_bwd_impl(dout, ids, dtable, dim)
    }
    fn embedding_shard_fwd(&self, a: &EmbeddingShard) -> Result<()> {
        self.embedding_shard_fwd_impl(a)
    }
    fn embedding_shard_bwd(&self, a: &EmbeddingShard) -> Result<()> {
        self.embedding_shard_bwd_impl(a)
    }

    fn rmsnorm_fwd(&self, a: &RmsNorm) -> Result<()> {
        self.rmsnorm_fwd_impl(a, None)
    }
    fn rmsnorm_residual_fwd(&self, a: &RmsNormResidual) -> Result<()> {
        let (norm, res) = a.split();
        self.rmsnorm_fwd_impl(&norm, Some(res))
    }
    fn rmsnorm_bwd(&self, a: &RmsNormBwd) -> Result<()> {
        self.rmsnorm_bwd_impl(a)
    }

    fn rope_fwd(&self, x: Buf, out: Buf, cos: Buf, sin: Buf, s: RopeShape) -> Result<()> {
        self.rope_impl("rope_fwd", x, out, cos, sin, s)
    }
    fn rope_bwd(&self, dout: Buf, dx: Buf, cos: Buf, sin: Buf, s: RopeShape) -> Result<()> {
        self.rope_impl("rope_bwd", dout, dx, cos, sin, s)
    }

    fn attention_fwd(&self, a: &AttnFwd) -> Result<()> {
        self.flash_attention_fwd(a)
    }
    fn attention_bwd(&self, a: &AttnBwd) -> Result<()> {
        self.flash_attention_bwd(a)
    }

    fn swiglu_fwd(&self, gate: Buf, up: Buf, out: Buf) -> Result<()> {
        self.swiglu_fwd_impl(gate, up, out)
    }
    fn swiglu_bwd(&self, dout: Buf, gate: Buf, up: Buf, dgate: Buf, dup: Buf) -> Result<()> {
        self.swiglu_bwd_impl(dout, gate, up, dgate, dup)
    }

    fn cross_entropy(&self, a: &CrossEntropy) -> Result<()> {
        self.cross_entropy_impl(a)
    }
    fn cross_entropy_stats(&self, a: &CrossEntropyStats) -> Result<()> {
        self.cross_entropy_stats_impl(a)
    }
    fn cross_entropy_shard(&self, a: &CrossEntropyShard) -> Result<()> {
        self.cross_entropy_shard_impl(a)
    }

    fn sum(&self, x: Buf, out: Buf) -> Result<()> {
        self.sum_impl(x, out)
    }
    fn sum_squares(&self, xs: &[Buf], out: Buf) -> Result<()> {
        self.sum_squares_impl(xs, out)
    }
    fn clip_coef(&self, norm_sq: Buf, max_norm: f32, coef: Buf) -> Result<()> {
        self.clip_coef_impl(norm_sq, max_norm, coef)
    }
    fn adamw(&self, b: &AdamWBufs, hp: &AdamW) -> Result<()> {
        self.adamw_impl(b, hp)
    }
}
