//! Token embedding lookup and its (deterministic, scatter-add) backward.

use super::{
    check_disjoint, check_dtype, load, shape_err, store, view, view_mut, Float, SendPtr, FLOATS,
};
use crate::backend::{Buf, EmbeddingShard};
use crate::error::Result;
use crate::tensor::DType;
use half::bf16;
use rayon::prelude::*;

fn check_ids(op: &'static str, ids: &[i32], vocab: usize) -> Result<()> {
    if let Some((n, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id < 0 || id as usize >= vocab)
    {
        return Err(shape_err(
            op,
            format!("ids[{n}] = {id} is outside the vocabulary [0, {vocab})"),
        ));
    }
    Ok(())
}

fn check_sizes(
    op: &'static str,
    table: usize,
    rows: usize,
    out: usize,
    dim: usize,
) -> Result<usize> {
    if dim == 0 || !table.is_multiple_of(dim) {
        return Err(shape_err(
            op,
            format!("table of {table} elements is not [vocab, {dim}]"),
        ));
    }
    if out != rows * dim {
        return Err(shape_err(
            op,
            format!("{rows} ids × dim {dim} != {out} output elements"),
        ));
    }
    Ok(table / dim)
}

/// out[n, :] = table[ids[n], :].
pub fn embedding_fwd<T: Copy + Send + Sync>(
    table: &[T],
    ids: &[i32],
    out: &mut [T],
    dim: usize,
) -> Result<()> {
    let vocab = check_sizes("embedding_fwd", table.len(), ids.len(), out.len(), dim)?;
    check_ids("embedding_fwd", ids, vocab)?;
    out.par_chunks_mut(dim)
        .zip(ids.par_iter())
        .for_each(|(o, &id)| {
            let r = id as usize * dim;
            o.copy_from_slice(&table[r..r + dim]);
        });
    Ok(())
}

/// Columns per task in the backward: each task owns a band of columns of every table row and
/// walks the ids in order, so every sum is formed in the same order whatever the thread count.
const COLS: usize = 64;

/// dtable[ids[n], :] += dout[n, :], deterministic.
pub fn embedding_bwd<T: Float>(
    dout: &[T],
    ids: &[i32],
    dtable: &mut [T],
    dim: usize,
) -> Result<()> {
    let vocab = check_sizes("embedding_bwd", dtable.len(), ids.len(), dout.len(), dim)?;
    check_ids("embedding_bwd", ids, vocab)?;
    let pt = SendPtr(dtable.as_mut_ptr());
    (0..dim.div_ceil(COLS)).into_par_iter().for_each(|band| {
        let (c0, c1) = (band * COLS, ((band + 1) * COLS).min(dim));
        for (n, &id) in ids.iter().enumerate() {
            let src = &dout[n * dim + c0..n * dim + c1];
            // SAFETY: ids are in range (checked), and column bands are disjoint across tasks.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(pt.get().add(id as usize * dim + c0), c1 - c0)
            };
            for (d, s) in dst.iter_mut().zip(src) {
                *d += *s;
            }
        }
    });
    Ok(())
}

pub(super) fn embedding_fwd_op(table: Buf, ids: Buf, out: Buf, dim: usize) -> Result<()> {
    const OP: &str = "embedding_fwd";
    check_dtype(OP, "table", table, FLOATS)?;
    check_dtype(OP, "ids", ids, &[DType::I32])?;
    check_dtype(OP, "out", out, FLOATS)?;
    check_sizes(OP, table.len, ids.len, out.len, dim)?;
    check_disjoint(OP, "out", out, &[("table", table), ("ids", ids)])?;
    // SAFETY: live buffers of the checked dtypes; out overlaps no input.
    unsafe {
        let idv = view::<i32>(ids);
        match (table.dtype, out.dtype) {
            (DType::F32, DType::F32) => {
                embedding_fwd(view::<f32>(table), idv, view_mut::<f32>(out), dim)
            }
            (DType::BF16, DType::BF16) => {
                embedding_fwd(view::<bf16>(table), idv, view_mut::<bf16>(out), dim)
            }
            // Mixed dtypes: gather rows in the table's dtype, then convert only those rows.
            _ => {
                let vocab = table.len / dim;
                check_ids(OP, idv, vocab)?;
                let t = match table.dtype {
                    DType::F32 => None,
                    _ => Some(view::<bf16>(table)),
                };
                store(OP, "out", out, false, |o| {
                    o.par_chunks_mut(dim)
                        .zip(idv.par_iter())
                        .for_each(|(o, &id)| {
                            let r = id as usize * dim;
                            match t {
                                Some(t) => o
                                    .iter_mut()
                                    .zip(&t[r..r + dim])
                                    .for_each(|(o, x)| *o = x.to_f32()),
                                None => o.copy_from_slice(&view::<f32>(table)[r..r + dim]),
                            }
                        })
                })?;
                Ok(())
            }
        }
    }
}

pub(super) fn embedding_bwd_op(dout: Buf, ids: Buf, dtable: Buf, dim: usize) -> Result<()> {
    const OP: &str = "embedding_bwd";
    check_dtype(OP, "dout", dout, FLOATS)?;
    check_dtype(OP, "ids", ids, &[DType::I32])?;
    check_dtype(OP, "dtable", dtable, &[DType::F32])?;
    check_sizes(OP, dtable.len, ids.len, dout.len, dim)?;
    check_disjoint(OP, "dtable", dtable, &[("dout", dout), ("ids", ids)])?;
    // SAFETY: live buffers of the checked dtypes; dtable overlaps no input.
    unsafe {
        let d = load(OP, "dout", dout)?;
        embedding_bwd(&d, view::<i32>(ids), view_mut::<f32>(dtable), dim)
    }
}

/// Every id is in the vocabulary and the shard's rows are inside it.
fn check_shard(
    op: &'static str,
    ids: &[i32],
    row0: usize,
    rows: usize,
    vocab: usize,
) -> Result<()> {
    check_ids(op, ids, vocab)?;
    if row0 + rows > vocab {
        return Err(shape_err(
            op,
            format!(
                "rows {row0}..{} exceed the vocabulary of {vocab}",
                row0 + rows
            ),
        ));
    }
    Ok(())
}

/// `Backend::embedding_shard_fwd`: out[n] = table[ids[n] - row0] for ids this shard holds, zeros
/// for the others.
pub(super) fn embedding_shard_fwd_op(a: &EmbeddingShard) -> Result<()> {
    const OP: &str = "embedding_shard_fwd";
    let EmbeddingShard {
        table,
        ids,
        out,
        dim,
        row0,
        vocab,
    } = *a;
    check_dtype(OP, "table", table, FLOATS)?;
    check_dtype(OP, "ids", ids, &[DType::I32])?;
    let rows = check_sizes(OP, table.len, ids.len, out.len, dim)?;
    check_disjoint(OP, "out", out, &[("table", table), ("ids", ids)])?;
    // SAFETY: live buffers of the checked dtypes; out overlaps no input.
    unsafe {
        let idv = view::<i32>(ids);
        check_shard(OP, idv, row0, rows, vocab)?;
        let t = load(OP, "table", table)?;
        store(OP, "out", out, false, |o| {
            o.par_chunks_mut(dim)
                .zip(idv.par_iter())
                .for_each(|(o, &id)| {
                    let id = id as usize;
                    if (row0..row0 + rows).contains(&id) {
                        let r = (id - row0) * dim;
                        o.copy_from_slice(&t[r..r + dim]);
                    } else {
                        o.fill(0.0);
                    }
                })
        })
    }
}

/// `Backend::embedding_shard_bwd`: table[ids[n] - row0] += out[n] (f32 table) for the ids this
/// shard holds, in token order per column band (deterministic).
pub(super) fn embedding_shard_bwd_op(a: &EmbeddingShard) -> Result<()> {
    const OP: &str = "embedding_shard_bwd";
    let EmbeddingShard {
        table: dtable,
        ids,
        out: dout,
        dim,
        row0,
        vocab,
    } = *a;
    check_dtype(OP, "dout", dout, FLOATS)?;
    check_dtype(OP, "ids", ids, &[DType::I32])?;
    check_dtype(OP, "dtable", dtable, &[DType::F32])?;
    let rows = check_sizes(OP, dtable.len, ids.len, dout.len, dim)?;
    check_disjoint(OP, "dtable", dtable, &[("dout", dout), ("ids", ids)])?;
    // SAFETY: live buffers of the checked dtypes; dtable overlaps no input; column bands are
    // disjoint across tasks.
    unsafe {
        let idv = view::<i32>(ids);
        check_shard(OP, idv, row0, rows, vocab)?;
        let d = load(OP, "dout", dout)?;
        let pt = SendPtr(view_mut::<f32>(dtable).as_mut_ptr());
        (0..dim.div_ceil(COLS)).into_par_iter().for_each(|band| {
            let (c0, c1) = (band * COLS, ((band + 1) * COLS).min(dim));
            for (n, &id) in idv.iter().enumerate() {
                let id = id as usize;
                if !(row0..row0 + rows).contains(&id) {
                    continue;
                }
                let src = &d[n * dim + c0..n * dim + c1];
                let dst =
                    std::slice::from_raw_parts_mut(pt.get().add((id - row0) * dim + c0), c1 - c0);
                for (x, s) in dst.iter_mut().zip(src) {
                    *x += *s;
                }
            }
        });
    }
    Ok(())
}
