//! Cross-entropy (kernels/cross_entropy.cu): the fused whole-vocabulary op and the two passes of
//! the vocabulary-parallel one, each one block per row.

use super::norm::check_i32;
use super::FLOATS;
use super::{check_disjoint, check_dtype, check_len, check_same, overlaps, sfx, Arg, CudaBackend};
use crate::backend::{Buf, CrossEntropy, CrossEntropyShard, CrossEntropyStats};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// The 16-byte vector width over rows of `vocab` elements of these buffers, or 1.
fn row_width(vocab: usize, dtype: DType, bufs: &[Buf]) -> usize {
    let w = 16 / dtype.size();
    if vocab.is_multiple_of(w) && bufs.iter().all(|b| b.ptr.is_multiple_of(16)) {
        w
    } else {
        1
    }
}

/// Threads for one row of `nvec` vectors: one per vector up to 1024, a multiple of 32.
fn row_threads(nvec: usize) -> u32 {
    nvec.div_ceil(32).clamp(1, 32) as u32 * 32
}

/// dlogits is logits itself or shares no byte with it.
fn check_alias(op: &'static str, logits: Buf, dlogits: Buf) -> Result<()> {
    if overlaps(logits, dlogits) && logits.ptr != dlogits.ptr {
        return Err(Error::Shape {
            op,
            msg: "dlogits overlaps logits without being the same buffer".into(),
        });
    }
    Ok(())
}

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
        check_alias(OP, logits, dlogits)?;
        if rows == 0 || vocab == 0 {
            return Ok(());
        }
        check_i32(OP, &[("vocab", vocab), ("rows", rows)])?;
        let w = row_width(vocab, logits.dtype, &[logits, dlogits]);
        let nvec = vocab / w;
        let threads = row_threads(nvec);
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

    pub(crate) fn cross_entropy_stats_impl(&self, a: &CrossEntropyStats) -> Result<()> {
        const OP: &str = "cross_entropy_stats";
        let CrossEntropyStats {
            logits,
            targets,
            stats,
            rows,
            vocab,
            col0,
            ignore_index,
        } = *a;
        check_dtype(OP, "logits", logits, FLOATS)?;
        check_len(OP, "logits", logits, rows * vocab)?;
        check_dtype(OP, "targets", targets, &[DType::I32])?;
        check_len(OP, "targets", targets, rows)?;
        check_dtype(OP, "stats", stats, &[DType::F32])?;
        check_len(OP, "stats", stats, rows * 3)?;
        check_disjoint(
            OP,
            "stats",
            stats,
            &[("logits", logits), ("targets", targets)],
        )?;
        if rows == 0 {
            return Ok(());
        }
        check_i32(OP, &[("vocab", vocab), ("rows", rows), ("col0", col0)])?;
        let w = row_width(vocab, logits.dtype, &[logits]);
        let name = format!("cross_entropy_stats_{}_w{w}", sfx(logits.dtype));
        let args = [
            Arg::P(logits.ptr),
            Arg::P(targets.ptr),
            Arg::P(stats.ptr),
            Arg::I32(vocab as i32),
            Arg::I32(col0 as i32),
            Arg::I32(ignore_index),
        ];
        let grid = (rows as u32, 1, 1);
        self.launch(&name, grid, row_threads(vocab / w), 0, &args)
    }

    pub(crate) fn cross_entropy_shard_impl(&self, a: &CrossEntropyShard) -> Result<()> {
        const OP: &str = "cross_entropy_shard";
        let CrossEntropyShard {
            logits,
            targets,
            stats,
            losses,
            dlogits,
            rows,
            vocab,
            col0,
            shards,
            vocab_total,
            ignore_index,
            grad_scale,
        } = *a;
        check_dtype(OP, "logits", logits, FLOATS)?;
        check_len(OP, "logits", logits, rows * vocab)?;
        check_same(OP, ("logits", "dlogits"), logits, dlogits)?;
        check_dtype(OP, "targets", targets, &[DType::I32])?;
        check_len(OP, "targets", targets, rows)?;
        check_dtype(OP, "stats", stats, &[DType::F32])?;
        check_len(OP, "stats", stats, shards * rows * 3)?;
        check_dtype(OP, "losses", losses, &[DType::F32])?;
        check_len(OP, "losses", losses, rows)?;
        check_shard_cols(OP, shards, col0, vocab, vocab_total)?;
        check_alias(OP, logits, dlogits)?;
        let ins = [
            ("logits", logits),
            ("targets", targets),
            ("stats", stats),
            ("dlogits", dlogits),
        ];
        check_disjoint(OP, "losses", losses, &ins)?;
        check_disjoint(OP, "dlogits", dlogits, &ins[1..3])?;
        if rows == 0 {
            return Ok(());
        }
        check_i32(
            OP,
            &[
                ("vocab_total", vocab_total),
                ("rows", rows),
                ("shards", shards),
            ],
        )?;
        // stats is indexed (k * rows + r) * 3 in int64 on the device; the sizes above bound it.
        let w = row_width(vocab, logits.dtype, &[logits, dlogits]);
        let name = format!("cross_entropy_shard_{}_w{w}", sfx(logits.dtype));
        let args = [
            Arg::P(logits.ptr),
            Arg::P(targets.ptr),
            Arg::P(stats.ptr),
            Arg::P(losses.ptr),
            Arg::P(dlogits.ptr),
            Arg::I32(rows as i32),
            Arg::I32(vocab as i32),
            Arg::I32(col0 as i32),
            Arg::I32(shards as i32),
            Arg::I32(vocab_total as i32),
            Arg::I32(ignore_index),
            Arg::F32(grad_scale),
        ];
        let grid = (rows as u32, 1, 1);
        self.launch(&name, grid, row_threads(vocab / w), 0, &args)
    }
}

/// At least one shard, and this rank's columns `col0 .. col0 + vocab` lie inside the vocabulary.
fn check_shard_cols(
    op: &'static str,
    shards: usize,
    col0: usize,
    vocab: usize,
    vocab_total: usize,
) -> Result<()> {
    if shards == 0 || col0 + vocab > vocab_total {
        return Err(Error::Shape {
            op,
            msg: format!(
                "columns {col0}..{} of {shards} shard(s) do not fit a vocabulary of {vocab_total}",
                col0 + vocab
            ),
        });
    }
    Ok(())
}
