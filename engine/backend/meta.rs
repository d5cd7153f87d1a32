//! The shape-only backend: allocations hand out fake, non-overlapping addresses and ops compute
//! nothing. Tracing a step on it gives the planner every buffer's size and lifetime without
//! touching memory, so `titan plan` works for a 405B model on a laptop.

use super::{
    AdamW, AdamWBufs, AttnBwd, AttnFwd, Backend, Buf, Copy2d, CrossEntropy, CrossEntropyShard,
    CrossEntropyStats, DeviceMem, EmbeddingShard, Gemm, RmsNorm, RmsNormBwd, RmsNormResidual,
    RopeShape,
};
use crate::error::Result;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the roofline of a kernel is measured against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum KernelClass {
    Gemm,
    Attention,
    /// Elementwise, norms, rope, embedding, loss, optimizer: bytes at memory bandwidth.
    Memory,
}

/// One collective a meta communicator was asked for (see `dist::meta`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum CollKind {
    AllGather,
    ReduceScatter,
    AllReduce,
    Broadcast,
}

/// One entry of a traced step, in issue order: a kernel launch, a collective, or a point where
/// compute (or the host) waits for the collectives issued so far.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaEvent {
    Kernel {
        name: &'static str,
        class: KernelClass,
        flops: f64,
        /// Bytes read + written.
        bytes: f64,
    },
    Collective {
        kind: CollKind,
        /// The group's size, how many consecutive ranks it spans (whether it fits in a node),
        /// and which communicator it is ("dp_shard", "dp_replicate", "world").
        group: usize,
        span: usize,
        comm: &'static str,
        /// The whole (gathered / unscattered / reduced) buffer in bytes.
        bytes: f64,
        /// Issued with a `_start` call: compute is not ordered after it until `OrderCompute`.
        started: bool,
    },
    OrderCompute,
    Wait,
}

/// The event log a meta backend and its communicators append to.
pub type EventLog = Arc<Mutex<Vec<MetaEvent>>>;

#[derive(Default)]
pub struct MetaBackend {
    next: AtomicU64,
    allocs: AtomicU64,
    log: EventLog,
}

struct MetaMem {
    ptr: u64,
    bytes: usize,
}

impl DeviceMem for MetaMem {
    fn ptr(&self) -> u64 {
        self.ptr
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
}

impl MetaBackend {
    pub fn new() -> Self {
        MetaBackend {
            next: AtomicU64::new(1 << 20),
            allocs: AtomicU64::new(0),
            log: EventLog::default(),
        }
    }

    /// The log of every kernel launched so far (and of the collectives of meta communicators
    /// given this handle): what the step-time model walks.
    pub fn log(&self) -> EventLog {
        self.log.clone()
    }

    /// Takes the events recorded so far.
    pub fn take_events(&self) -> Vec<MetaEvent> {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn record(&self, name: &'static str, class: KernelClass, flops: f64, bytes: usize) {
        let e = MetaEvent::Kernel {
            name,
            class,
            flops,
            bytes: bytes as f64,
        };
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push(e);
    }

    /// A memory-bound kernel over these buffers (each read or written once).
    fn mem(&self, name: &'static str, bufs: &[Buf]) {
        let bytes = bufs.iter().map(|b| b.bytes()).sum();
        self.record(name, KernelClass::Memory, 0.0, bytes);
    }
}

impl Backend for MetaBackend {
    fn name(&self) -> &'static str {
        "meta"
    }
    fn is_meta(&self) -> bool {
        true
    }
    fn alloc(&self, bytes: usize) -> Result<Box<dyn DeviceMem>> {
        self.allocs.fetch_add(1, Ordering::Relaxed);
        let padded = (bytes as u64).div_ceil(256) * 256 + 256;
        let ptr = self.next.fetch_add(padded, Ordering::Relaxed);
        Ok(Box::new(MetaMem { ptr, bytes }))
    }
    fn alloc_count(&self) -> u64 {
        self.allocs.load(Ordering::Relaxed)
    }
    fn upload(&self, _: Buf, _: &[u8]) -> Result<()> {
        Ok(())
    }
    fn download(&self, _: Buf, dst: &mut [u8]) -> Result<()> {
        dst.fill(0);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn fill(&self, dst: Buf, _: f32) -> Result<()> {
        self.mem("fill", &[dst]);
        Ok(())
    }
    fn copy(&self, src: Buf, dst: Buf) -> Result<()> {
        self.mem("copy", &[src, dst]);
        Ok(())
    }
    fn copy_2d(&self, a: &Copy2d) -> Result<()> {
        let block = Buf::new(0, a.rows * a.cols, a.src.dtype);
        self.mem("copy_2d", &[block, block]);
        Ok(())
    }
    fn cast(&self, src: Buf, dst: Buf) -> Result<()> {
        self.mem("cast", &[src, dst]);
        Ok(())
    }
    fn add(&self, a: Buf, b: Buf, out: Buf) -> Result<()> {
        self.mem("add", &[a, b, out]);
        Ok(())
    }
    fn scale(&self, x: Buf, _: f32) -> Result<()> {
        self.mem("scale", &[x, x]);
        Ok(())
    }
    fn gemm(&self, g: &Gemm, a: Buf, b: Buf, c: Buf) -> Result<()> {
        // beta != 0 reads C as well as writing it.
        let c_bytes = c.bytes() * if g.beta != 0.0 { 2 } else { 1 };
        let bytes = a.bytes() + b.bytes() + c_bytes;
        self.record("gemm", KernelClass::Gemm, g.flops(), bytes);
        Ok(())
    }
    fn embedding_fwd(&self, _: Buf, ids: Buf, out: Buf, _: usize) -> Result<()> {
        // Only the rows named by ids are read: as many bytes as the output.
        self.mem("embedding_fwd", &[ids, out, out]);
        Ok(())
    }
    fn embedding_bwd(&self, dout: Buf, ids: Buf, dtable: Buf, _: usize) -> Result<()> {
        // dout read, the touched f32 rows of dtable read and written.
        let rows = Buf::new(0, dout.len, dtable.dtype);
        self.mem("embedding_bwd", &[dout, ids, rows, rows]);
        Ok(())
    }
    fn embedding_shard_fwd(&self, a: &EmbeddingShard) -> Result<()> {
        self.mem("embedding_shard_fwd", &[a.ids, a.out, a.out]);
        Ok(())
    }
    fn embedding_shard_bwd(&self, a: &EmbeddingShard) -> Result<()> {
        let rows = Buf::new(0, a.out.len, a.table.dtype);
        self.mem("embedding_shard_bwd", &[a.out, a.ids, rows, rows]);
        Ok(())
    }
    fn rmsnorm_fwd(&self, a: &RmsNorm) -> Result<()> {
        self.mem("rmsnorm_fwd", &[a.x, a.w, a.out, a.rstd]);
        Ok(())
    }
    fn rmsnorm_residual_fwd(&self, a: &RmsNormResidual) -> Result<()> {
        self.mem(
            "rmsnorm_residual_fwd",
            &[a.x, a.residual, a.w, a.h, a.out, a.rstd],
        );
        Ok(())
    }
    fn rmsnorm_bwd(&self, a: &RmsNormBwd) -> Result<()> {
        self.mem("rmsnorm_bwd", &[a.dout, a.x, a.w, a.rstd, a.dx, a.dw, a.dw]);
        Ok(())
    }
    fn rmsnorm_bwd_add(&self, a: &RmsNormBwd, dres: Buf) -> Result<()> {
        // Fused (as the CPU and CUDA backends do): dres is one more read.
        let bufs = [a.dout, a.x, a.w, a.rstd, a.dx, a.dw, a.dw, dres];
        self.mem("rmsnorm_bwd_add", &bufs);
        Ok(())
    }
    fn rope_fwd(&self, x: Buf, out: Buf, cos: Buf, sin: Buf, _: RopeShape) -> Result<()> {
        self.mem("rope_fwd", &[x, out, cos, sin]);
        Ok(())
    }
    fn rope_bwd(&self, dout: Buf, dx: Buf, cos: Buf, sin: Buf, _: RopeShape) -> Result<()> {
        self.mem("rope_bwd", &[dout, dx, cos, sin]);
        Ok(())
    }
    fn attention_fwd(&self, a: &AttnFwd) -> Result<()> {
        let bytes = [a.q, a.k, a.v, a.out, a.lse]
            .iter()
            .map(|b| b.bytes())
            .sum();
        self.record(
            "attention_fwd",
            KernelClass::Attention,
            a.shape.fwd_flops(),
            bytes,
        );
        Ok(())
    }
    fn attention_bwd(&self, a: &AttnBwd) -> Result<()> {
        let bufs = [a.q, a.k, a.v, a.out, a.dout, a.lse, a.dq, a.dk, a.dv];
        let bytes = bufs.iter().map(|b| b.bytes()).sum();
        // Flash-attention convention: the backward's five tile products against the forward's
        // two (scores recomputed from the saved log-sum-exp).
        let flops = 2.5 * a.shape.fwd_flops();
        self.record("attention_bwd", KernelClass::Attention, flops, bytes);
        Ok(())
    }
    fn swiglu_fwd(&self, gate: Buf, up: Buf, out: Buf) -> Result<()> {
        self.mem("swiglu_fwd", &[gate, up, out]);
        Ok(())
    }
    fn swiglu_bwd(&self, dout: Buf, gate: Buf, up: Buf, dg: Buf, du: Buf) -> Result<()> {
        self.mem("swiglu_bwd", &[dout, gate, up, dg, du]);
        Ok(())
    }
    fn cross_entropy(&self, a: &CrossEntropy) -> Result<()> {
        self.mem("cross_entropy", &[a.logits, a.targets, a.losses, a.dlogits]);
        Ok(())
    }
    fn cross_entropy_stats(&self, a: &CrossEntropyStats) -> Result<()> {
        self.mem("cross_entropy_stats", &[a.logits, a.targets, a.stats]);
        Ok(())
    }
    fn cross_entropy_shard(&self, a: &CrossEntropyShard) -> Result<()> {
        let io = [a.logits, a.targets, a.stats, a.losses, a.dlogits];
        self.mem("cross_entropy_shard", &io);
        Ok(())
    }
    fn sum(&self, x: Buf, out: Buf) -> Result<()> {
        self.mem("sum", &[x, out]);
        Ok(())
    }
    fn sum_squares(&self, xs: &[Buf], out: Buf) -> Result<()> {
        self.mem("sum_squares", xs);
        self.mem("sum_squares", &[out]);
        Ok(())
    }
    fn clip_coef(&self, norm_sq: Buf, _: f32, coef: Buf) -> Result<()> {
        self.mem("clip_coef", &[norm_sq, coef]);
        Ok(())
    }
    fn adamw(&self, b: &AdamWBufs, _: &AdamW) -> Result<()> {
        // param, m, v read and written; grad read; the compute copy written.
        let mut bufs = vec![b.param, b.param, b.m, b.m, b.v, b.v, b.grad];
        bufs.extend(b.compute);
        self.mem("adamw", &bufs);
        Ok(())
    }
}
