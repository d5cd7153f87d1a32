//! Fused cross-entropy (kernels/cross_entropy.cu): one block per row.

use super::norm::check_i32;
use super::{check_dtype, check_len, check_same, sfx, Arg, CudaBackend, FLOATS};
use crate::backend::CrossEntropy;
use crate::error::{Error, Result};
use crate::tensor::DType;

impl CudaBackend {
    pub(crate) fn cross_entropy_impl(&self, a: &CrossEntropy) -> Result<()> {
        const OP: &str = "cross_entropy";
        let CrossEntropy {
            logits,
            targets,
            losses,
            dlogits,
            rows,
            vocab,
            ignore_index,
            grad_scale,
        } = *a;
        check_dtype(OP, "logits", logits, FLOATS)?;
        check_len(OP, "logits", logits, rows * vocab)?;
        check_same(OP, ("logits", "dlogits"), logits, dlogits)?;
        check_dtype(OP, "targets", targets, &[DType::I32])?;
        check_len(OP, "targets", targets, rows)?;
        check_dtype(OP, "losses", losses, &[DType::F32])?;
        check_len(OP, "losses", losses, rows)?;
        let (l0, l1) = (logits.ptr, logits.ptr + logits.bytes() as u64);
        let (d0, d1) = (dlogits.ptr, dlogits.ptr + dlogits.bytes() as u64);
        if d0 != l0 && d0 < l1 && l0 < d1 {
            return Err(Error::Shape {
                op: OP,
                msg: "dlogits overlaps logits without being the same buffer".into(),
            });
        }
        if rows == 0 || vocab == 0 {
            return Ok(());
        }
        check_i32(OP, &[("vocab", vocab), ("rows", rows)])?;
        let w = if vocab.is_multiple_of(16 / logits.dtype.size())
            && logits.ptr.is_multiple_of(16)
            && dlogits.ptr.is_multiple_of(16)
        {
            16 / logits.dtype.size()
        } else {
            1
        };
        let nvec = vocab / w;
        let threads = nvec.div_ceil(32).clamp(1, 32) as u32 * 32;
        let name = format!("cross_entropy_{}_w{w}", sfx(logits.dtype));
        // Park as much of each row in shared memory as fits (see kernels/cross_entropy.cu); keep
        // 1 KB for the kernel's static shared memory.
        let slot = if w == 1 { logits.dtype.size() } else { 16 };
        let cache_vecs = nvec.min(self.smem_optin().saturating_sub(1024) / slot);
        let smem = cache_vecs * slot;
        self.allow_dynamic_smem(&name, smem)?;
        let args = [
            Arg::P(logits.ptr),
            Arg::P(targets.ptr),
            Arg::P(losses.ptr),
            Arg::P(dlogits.ptr),
            Arg::I32(vocab as i32),
            Arg::I32(ignore_index),
            Arg::F32(grad_scale),
            Arg::I32(cache_vecs as i32),
        ];
        self.launch(&name, (rows as u32, 1, 1), threads, smem as u32, &args)
    }
}
