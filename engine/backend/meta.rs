//! The shape-only backend: allocations hand out fake, non-overlapping addresses and ops compute
//! nothing. Tracing a step on it gives the planner every buffer's size and lifetime without
//! touching memory, so `titan plan` works for a 405B model on a laptop.

use super::{
    AdamW, AdamWBufs, AttnBwd, AttnFwd, Backend, Buf, CrossEntropy, DeviceMem, Gemm, RmsNorm,
    RmsNormBwd, RmsNormResidual, RopeShape,
};
use crate::error::Result;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct MetaBackend {
    next: AtomicU64,
    allocs: AtomicU64,
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
        }
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
    fn fill(&self, _: Buf, _: f32) -> Result<()> {
        Ok(())
    }
    fn copy(&self, _: Buf, _: Buf) -> Result<()> {
        Ok(())
    }
    fn cast(&self, _: Buf, _: Buf) -> Result<()> {
        Ok(())
    }
    fn add(&self, _: Buf, _: Buf, _: Buf) -> Result<()> {
        Ok(())
    }
    fn scale(&self, _: Buf, _: f32) -> Result<()> {
        Ok(())
    }
    fn gemm(&self, _: &Gemm, _: Buf, _: Buf, _: Buf) -> Result<()> {
        Ok(())
    }
    fn embedding_fwd(&self, _: Buf, _: Buf, _: Buf, _: usize) -> Result<()> {
        Ok(())
    }
    fn embedding_bwd(&self, _: Buf, _: Buf, _: Buf, _: usize) -> Result<()> {
        Ok(())
    }
    fn rmsnorm_fwd(&self, _: &RmsNorm) -> Result<()> {
        Ok(())
    }
    fn rmsnorm_residual_fwd(&self, _: &RmsNormResidual) -> Result<()> {
        Ok(())
    }
    fn rmsnorm_bwd(&self, _: &RmsNormBwd) -> Result<()> {
        Ok(())
    }
    fn rope_fwd(&self, _: Buf, _: Buf, _: Buf, _: Buf, _: RopeShape) -> Result<()> {
        Ok(())
    }
    fn rope_bwd(&self, _: Buf, _: Buf, _: Buf, _: Buf, _: RopeShape) -> Result<()> {
        Ok(())
    }
    fn attention_fwd(&self, _: &AttnFwd) -> Result<()> {
        Ok(())
    }
    fn attention_bwd(&self, _: &AttnBwd) -> Result<()> {
        Ok(())
    }
    fn swiglu_fwd(&self, _: Buf, _: Buf, _: Buf) -> Result<()> {
        Ok(())
    }
    fn swiglu_bwd(&self, _: Buf, _: Buf, _: Buf, _: Buf, _: Buf) -> Result<()> {
        Ok(())
    }
    fn cross_entropy(&self, _: &CrossEntropy) -> Result<()> {
        Ok(())
    }
    fn sum(&self, _: Buf, _: Buf) -> Result<()> {
        Ok(())
    }
    fn sum_squares(&self, _: &[Buf], _: Buf) -> Result<()> {
        Ok(())
    }
    fn clip_coef(&self, _: Buf, _: f32, _: Buf) -> Result<()> {
        Ok(())
    }
    fn adamw(&self, _: &AdamWBufs, _: &AdamW) -> Result<()> {
        Ok(())
    }
}
