//! Row ops: embedding, rmsnorm (+ residual), rope, swiglu (kernels/{embedding,rmsnorm,rope,swiglu}.cu).
//!
//! Vector width W: the kernels move 16-byte vectors (8 bf16 / 4 f32) when the row length is a
//! multiple of W and every pointer is 16-byte aligned; otherwise the scalar (W = 1) variant runs.
//! Mixed dtypes are not supported here: x, w, out (and dout, dx) share one dtype.

use super::{check_disjoint, check_dtype, check_len, check_same, sfx, Arg, CudaBackend, FLOATS};
use crate::backend::{Buf, EmbeddingShard, RmsNorm, RmsNormBwd, RopeShape};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// 16-byte vector width of `d` in elements.
fn vec_width(d: DType) -> usize {
    16 / d.size()
}

/// The vector width usable for rows of `len` elements over these buffers (W or 1).
fn width_for(len: usize, dtype: DType, bufs: &[Buf]) -> usize {
    let w = vec_width(dtype);
    if len.is_multiple_of(w) && bufs.iter().all(|b| b.ptr.is_multiple_of(16)) {
        w
    } else {
        1
    }
}

/// Fixed block count for the rmsnorm backward (depends on the shape only, so dw is bitwise
/// reproducible on any device).
const RMS_BWD_BLOCKS: usize = 512;
const RMS_MAX_THREADS: usize = 512;

/// (K, threads) covering `nvec` vectors per row with at most 512 threads and K in {1, 2, 4, 8}.
fn rms_layout(op: &'static str, dim: usize, nvec: usize) -> Result<(usize, u32)> {
    for k in [1usize, 2, 4, 8] {
        let threads = nvec.div_ceil(k);
        if threads <= RMS_MAX_THREADS {
            return Ok((k, (threads.div_ceil(32) * 32).max(32) as u32));
        }
    }
    Err(Error::Shape {
        op,
        msg: format!(
            "dim {dim} is too large for the rmsnorm kernels (max {} vectors)",
            nvec
        ),
    })
}

impl CudaBackend {
    pub(crate) fn embedding_fwd_impl(
        &self,
        table: Buf,
        ids: Buf,
        out: Buf,
        dim: usize,
    ) -> Result<()> {
        let vocab = table_rows("embedding_fwd", "table", table, dim)?;
        let a = EmbeddingShard {
            table,
            ids,
            out,
            dim,
            row0: 0,
            vocab,
        };
        self.embedding_fwd_rows("embedding_fwd", &a)
    }

    pub(crate) fn embedding_shard_fwd_impl(&self, a: &EmbeddingShard) -> Result<()> {
        self.embedding_fwd_rows("embedding_shard_fwd", a)
    }

    /// The lookup over table rows `row0 ..` of `vocab` (the whole table when row0 = 0 and the
    /// table has `vocab` rows): one kernel family for both ops.
    fn embedding_fwd_rows(&self, op: &'static str, a: &EmbeddingShard) -> Result<()> {
        let EmbeddingShard {
            table,
            ids,
            out,
            dim,
            row0,
            vocab,
        } = *a;
        check_dtype(op, "table", table, FLOATS)?;
        check_dtype(op, "ids", ids, &[DType::I32])?;
        check_dtype(op, "out", out, &[table.dtype])?;
        let rows = table_rows(op, "table", table, dim)?;
        check_len(op, "out", out, ids.len * dim)?;
        check_shard_rows(op, row0, rows, vocab)?;
        check_disjoint(op, "out", out, &[("table", table), ("ids", ids)])?;
        if ids.len == 0 {
            return Ok(());
        }
        check_i32(op, &[("dim", dim), ("vocab", vocab), ("rows", ids.len)])?;
        let w = width_for(dim, table.dtype, &[table, out]);
        let name = format!("embedding_fwd_{}_w{w}", sfx(table.dtype));
        let threads = (dim / w).clamp(32, 256).div_ceil(32) as u32 * 32;
        let args = [
            Arg::P(table.ptr),
            Arg::P(ids.ptr),
            Arg::P(out.ptr),
            Arg::I32(dim as i32),
            Arg::I32(row0 as i32),
            Arg::I32(rows as i32),
            Arg::I32(vocab as i32),
        ];
        self.launch(&name, (ids.len as u32, 1, 1), threads, 0, &args)
    }

    pub(crate) fn embedding_bwd_impl(
        &self,
        dout: Buf,
        ids: Buf,
        dtable: Buf,
        dim: usize,
    ) -> Result<()> {
        let vocab = table_rows("embedding_bwd", "dtable", dtable, dim)?;
        let a = EmbeddingShard {
            table: dtable,
            ids,
            out: dout,
            dim,
            row0: 0,
            vocab,
        };
        self.embedding_bwd_rows("embedding_bwd", &a)
    }

    pub(crate) fn embedding_shard_bwd_impl(&self, a: &EmbeddingShard) -> Result<()> {
        self.embedding_bwd_rows("embedding_shard_bwd", a)
    }

    /// dtable[id - row0] += dout for the ids in `row0 .. row0 + dtable rows`.
    fn embedding_bwd_rows(&self, op: &'static str, a: &EmbeddingShard) -> Result<()> {
        let EmbeddingShard {
            table: dtable,
            ids,
            out: dout,
            dim,
            row0,
            vocab,
        } = *a;
        check_dtype(op, "dout", dout, FLOATS)?;
        check_dtype(op, "ids", ids, &[DType::I32])?;
        check_dtype(op, "dtable", dtable, &[DType::F32])?;
        let rows = table_rows(op, "dtable", dtable, dim)?;
        check_len(op, "dout", dout, ids.len * dim)?;
        check_shard_rows(op, row0, rows, vocab)?;
        check_disjoint(op, "dtable", dtable, &[("dout", dout), ("ids", ids)])?;
        if ids.len == 0 || rows == 0 {
            return Ok(());
        }
        check_i32(op, &[("dim", dim), ("vocab", vocab), ("rows", ids.len)])?;
        // Aim for ~1024 blocks in all; the partition depends on (rows, dim) only.
        let col_blocks = dim.div_ceil(256);
        let ranges = 1024usize.div_ceil(col_blocks).clamp(1, rows);
        let rows_per_range = rows.div_ceil(ranges);
        let ranges = rows.div_ceil(rows_per_range);
        if col_blocks > 65535 {
            return Err(Error::Shape {
                op,
                msg: format!("dim {dim} too large"),
            });
        }
        let name = format!("embedding_bwd_{}", sfx(dout.dtype));
        let args = [
            Arg::P(dout.ptr),
            Arg::P(ids.ptr),
            Arg::P(dtable.ptr),
            Arg::I32(ids.len as i32),
            Arg::I32(dim as i32),
            Arg::I32(row0 as i32),
            Arg::I32(rows as i32),
            Arg::I32(rows_per_range as i32),
        ];
        self.launch(&name, (ranges as u32, col_blocks as u32, 1), 256, 0, &args)
    }

    /// rmsnorm_fwd, or rmsnorm_residual_fwd when `res = Some((residual, h))`.
    pub(crate) fn rmsnorm_fwd_impl(&self, a: &RmsNorm, res: Option<(Buf, Buf)>) -> Result<()> {
        let RmsNorm {
            x,
            w,
            out,
            rstd,
            rows,
            dim,
            eps,
        } = *a;
        let op = if res.is_some() {
            "rmsnorm_residual_fwd"
        } else {
            "rmsnorm_fwd"
        };
        check_dtype(op, "x", x, FLOATS)?;
        check_len(op, "x", x, rows * dim)?;
        check_same(op, ("x", "out"), x, out)?;
        check_dtype(op, "w", w, &[x.dtype])?;
        check_len(op, "w", w, dim)?;
        check_dtype(op, "rstd", rstd, &[DType::F32])?;
        check_len(op, "rstd", rstd, rows)?;
        let mut bufs = vec![x, w, out];
        if let Some((r, h)) = res {
            check_same(op, ("x", "residual"), x, r)?;
            check_same(op, ("x", "h"), x, h)?;
            bufs.extend([r, h]);
        }
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        check_i32(op, &[("dim", dim), ("rows", rows)])?;
        let wd = width_for(dim, x.dtype, &bufs);
        let (k, threads) = rms_layout(op, dim, dim / wd)?;
        let t = sfx(x.dtype);
        let grid = (rows as u32, 1, 1);
        match res {
            Some((r, h)) => {
                let name = format!("rmsnorm_residual_fwd_{t}_w{wd}_k{k}");
                let args = [
                    Arg::P(x.ptr),
                    Arg::P(r.ptr),
                    Arg::P(w.ptr),
                    Arg::P(h.ptr),
                    Arg::P(out.ptr),
                    Arg::P(rstd.ptr),
                    Arg::I32(dim as i32),
                    Arg::F32(eps),
                ];
                self.launch(&name, grid, threads, 0, &args)
            }
            None => {
                let name = format!("rmsnorm_fwd_{t}_w{wd}_k{k}");
                let args = [
                    Arg::P(x.ptr),
                    Arg::P(w.ptr),
                    Arg::P(out.ptr),
                    Arg::P(rstd.ptr),
                    Arg::I32(dim as i32),
                    Arg::F32(eps),
                ];
                self.launch(&name, grid, threads, 0, &args)
            }
        }
    }

    pub(crate) fn rmsnorm_bwd_impl(&self, a: &RmsNormBwd) -> Result<()> {
        const OP: &str = "rmsnorm_bwd";
        let RmsNormBwd {
            dout,
            x,
            w,
            rstd,
            dx,
            dw,
            rows,
            dim,
        } = *a;
        check_dtype(OP, "x", x, FLOATS)?;
        check_len(OP, "x", x, rows * dim)?;
        check_same(OP, ("x", "dout"), x, dout)?;
        check_same(OP, ("x", "dx"), x, dx)?;
        check_dtype(OP, "w", w, &[x.dtype])?;
        check_len(OP, "w", w, dim)?;
        check_dtype(OP, "rstd", rstd, &[DType::F32])?;
        check_len(OP, "rstd", rstd, rows)?;
        check_dtype(OP, "dw", dw, &[DType::F32])?;
        check_len(OP, "dw", dw, dim)?;
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        check_i32(OP, &[("dim", dim), ("rows", rows)])?;
        let wd = width_for(dim, x.dtype, &[dout, x, w, dx]);
        let (k, threads) = rms_layout(OP, dim, dim / wd)?;
        let blocks = rows.min(RMS_BWD_BLOCKS);
        let partial = self.scratch(blocks * dim * 4)?;
        let name = format!("rmsnorm_bwd_{}_w{wd}_k{k}", sfx(x.dtype));
        let args = [
            Arg::P(dout.ptr),
            Arg::P(x.ptr),
            Arg::P(w.ptr),
            Arg::P(rstd.ptr),
            Arg::P(dx.ptr),
            Arg::P(partial),
            Arg::I32(rows as i32),
            Arg::I32(dim as i32),
        ];
        self.launch(&name, (blocks as u32, 1, 1), threads, 0, &args)?;
        let args = [
            Arg::P(partial),
            Arg::P(dw.ptr),
            Arg::I32(blocks as i32),
            Arg::I32(dim as i32),
        ];
        self.launch(
            "rmsnorm_dw_reduce",
            (dim.div_ceil(32) as u32, 1, 1),
            512,
            0,
            &args,
        )
    }

    /// rope_fwd / rope_bwd (`op` selects the kernel).
    pub(crate) fn rope_impl(
        &self,
        op: &'static str,
        x: Buf,
        out: Buf,
        cos: Buf,
        sin: Buf,
        s: RopeShape,
    ) -> Result<()> {
        check_dtype(op, "x", x, FLOATS)?;
        check_len(op, "x", x, s.batch * s.seq * s.heads * s.head_dim)?;
        check_same(op, ("x", "out"), x, out)?;
        if !s.head_dim.is_multiple_of(2) {
            return Err(Error::Shape {
                op,
                msg: format!("head_dim {} must be even", s.head_dim),
            });
        }
        let half = s.head_dim / 2;
        for (what, t) in [("cos", cos), ("sin", sin)] {
            check_dtype(op, what, t, &[DType::F32])?;
            if t.len < s.seq * half {
                return Err(Error::Shape {
                    op,
                    msg: format!(
                        "{what} has {} elements, needs [seq {}, head_dim/2 {half}]",
                        t.len, s.seq
                    ),
                });
            }
        }
        if x.len == 0 {
            return Ok(());
        }
        check_i32(
            op,
            &[("seq", s.seq), ("heads", s.heads), ("head_dim", s.head_dim)],
        )?;
        let w = width_for(half, x.dtype, &[x, out, cos, sin]);
        let rowheads = s.batch * s.seq * s.heads;
        let name = format!("{op}_{}_w{w}", sfx(x.dtype));
        let grid = self.grid_for(rowheads * (half / w), 256);
        let args = [
            Arg::P(x.ptr),
            Arg::P(out.ptr),
            Arg::P(cos.ptr),
            Arg::P(sin.ptr),
            Arg::I32(s.seq as i32),
            Arg::I32(s.heads as i32),
            Arg::I32(s.head_dim as i32),
            Arg::I64(rowheads as i64),
        ];
        self.launch(&name, (grid, 1, 1), 256, 0, &args)
    }

    pub(crate) fn swiglu_fwd_impl(&self, gate: Buf, up: Buf, out: Buf) -> Result<()> {
        const OP: &str = "swiglu_fwd";
        check_dtype(OP, "gate", gate, FLOATS)?;
        check_same(OP, ("gate", "up"), gate, up)?;
        check_same(OP, ("gate", "out"), gate, out)?;
        if gate.len == 0 {
            return Ok(());
        }
        let name = format!("swiglu_fwd_{}", sfx(gate.dtype));
        let grid = self.grid_for(gate.len.div_ceil(vec_width(gate.dtype)), 256);
        let args = [
            Arg::P(gate.ptr),
            Arg::P(up.ptr),
            Arg::P(out.ptr),
            Arg::I64(gate.len as i64),
        ];
        self.launch(&name, (grid, 1, 1), 256, 0, &args)
    }

    pub(crate) fn swiglu_bwd_impl(
        &self,
        dout: Buf,
        gate: Buf,
        up: Buf,
        dgate: Buf,
        dup: Buf,
    ) -> Result<()> {
        const OP: &str = "swiglu_bwd";
        check_dtype(OP, "gate", gate, FLOATS)?;
        for (what, b) in [("dout", dout), ("up", up), ("dgate", dgate), ("dup", dup)] {
            check_same(OP, ("gate", what), gate, b)?;
        }
        if gate.len == 0 {
            return Ok(());
        }
        let name = format!("swiglu_bwd_{}", sfx(gate.dtype));
        let grid = self.grid_for(gate.len.div_ceil(vec_width(gate.dtype)), 256);
        let args = [
            Arg::P(dout.ptr),
            Arg::P(gate.ptr),
            Arg::P(up.ptr),
            Arg::P(dgate.ptr),
            Arg::P(dup.ptr),
            Arg::I64(gate.len as i64),
        ];
        self.launch(&name, (grid, 1, 1), 256, 0, &args)
    }
}

/// Rows of a `[rows, dim]` table of `b.len` elements.
fn table_rows(op: &'static str, what: &str, b: Buf, dim: usize) -> Result<usize> {
    if dim == 0 || !b.len.is_multiple_of(dim) {
        return Err(Error::Shape {
            op,
            msg: format!("{what} of {} elements is not [rows, {dim}]", b.len),
        });
    }
    Ok(b.len / dim)
}

/// A shard's rows `row0 .. row0 + rows` lie inside the vocabulary.
fn check_shard_rows(op: &'static str, row0: usize, rows: usize, vocab: usize) -> Result<()> {
    if row0 + rows > vocab {
        return Err(Error::Shape {
            op,
            msg: format!(
                "rows {row0}..{} exceed the vocabulary of {vocab}",
                row0 + rows
            ),
        });
    }
    Ok(())
}

/// Kernel parameters that are C `int`s must fit.
pub(crate) fn check_i32(op: &'static str, vals: &[(&str, usize)]) -> Result<()> {
    for (what, v) in vals {
        if *v > i32::MAX as usize {
            return Err(Error::Shape {
                op,
                msg: format!("{what} = {v} exceeds the kernels' int range"),
            });
        }
    }
    Ok(())
}
