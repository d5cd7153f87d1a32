//! Fused log-softmax + cross-entropy + its gradient, one pass over each row.

use super::{
    check_dtype, check_len, f32_to_bf16_bits, overlaps, shape_err, view, view_mut, with_scratch,
    Float, SendPtr, FLOATS,
};
use crate::backend::{Buf, CrossEntropy, CrossEntropyShard, CrossEntropyStats};
use crate::error::Result;
use crate::tensor::DType;
use rayon::prelude::*;

/// On entry `x` holds one row of logits; on exit it holds (softmax − onehot(target)) ·
/// grad_scale. Returns the loss logsumexp(x) − x[target].
pub fn cross_entropy_row<T: Float>(x: &mut [T], target: usize, grad_scale: T) -> T {
    let mx = T::max_slice(x);
    let xt = x[target] - mx;
    let sum = T::exp_sub_sum(x, mx);
    T::scale_slice(x, grad_scale / sum);
    x[target] -= grad_scale;
    sum.ln() - xt
}

fn check_targets(op: &'static str, targets: &[i32], vocab: usize, ignore_index: i32) -> Result<()> {
    let bad = targets
        .iter()
        .enumerate()
        .find(|(_, &t)| t != ignore_index && (t < 0 || t as usize >= vocab));
    if let Some((r, t)) = bad {
        return Err(shape_err(
            op,
            format!(
                "targets[{r}] = {t} is outside [0, {vocab}) and is not ignore_index {ignore_index}"
            ),
        ));
    }
    Ok(())
}

/// Slice form of the op (the gradient checks use it in f64).
pub fn cross_entropy<T: Float>(
    logits: &[T],
    targets: &[i32],
    losses: &mut [T],
    dlogits: &mut [T],
    vocab: usize,
    ignore_index: i32,
    grad_scale: T,
) -> Result<()> {
    let rows = targets.len();
    if logits.len() != rows * vocab || dlogits.len() != rows * vocab || losses.len() != rows {
        return Err(shape_err(
            "cross_entropy",
            format!(
                "logits {} dlogits {} losses {} for rows {rows} × vocab {vocab}",
                logits.len(),
                dlogits.len(),
                losses.len()
            ),
        ));
    }
    check_targets("cross_entropy", targets, vocab, ignore_index)?;
    for (r, &t) in targets.iter().enumerate() {
        let d = &mut dlogits[r * vocab..(r + 1) * vocab];
        if t == ignore_index {
            d.fill(T::ZERO);
            losses[r] = T::ZERO;
        } else {
            d.copy_from_slice(&logits[r * vocab..(r + 1) * vocab]);
            losses[r] = cross_entropy_row(d, t as usize, grad_scale);
        }
    }
    Ok(())
}

/// The buffers of a fused loss: dtypes, lengths, and dlogits either disjoint from logits or
/// logits itself.
fn check_loss_buffers(
    op: &'static str,
    logits: Buf,
    targets: Buf,
    losses: Buf,
    dlogits: Buf,
    (rows, vocab): (usize, usize),
) -> Result<()> {
    check_dtype(op, "logits", logits, FLOATS)?;
    check_dtype(op, "targets", targets, &[DType::I32])?;
    check_dtype(op, "losses", losses, &[DType::F32])?;
    check_dtype(op, "dlogits", dlogits, FLOATS)?;
    check_len(op, "logits", logits, rows * vocab)?;
    check_len(op, "dlogits", dlogits, rows * vocab)?;
    check_len(op, "targets", targets, rows)?;
    check_len(op, "losses", losses, rows)?;
    if overlaps(logits, dlogits) && (logits.ptr != dlogits.ptr || logits.dtype != dlogits.dtype) {
        return Err(shape_err(
            op,
            "dlogits overlaps logits without being the same buffer".into(),
        ));
    }
    Ok(())
}

pub(super) fn cross_entropy_op(a: &CrossEntropy) -> Result<()> {
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
    check_loss_buffers(OP, a.logits, a.targets, a.losses, a.dlogits, (rows, vocab))?;
    for (what, b) in [
        ("logits", logits),
        ("targets", targets),
        ("dlogits", dlogits),
    ] {
        if overlaps(losses, b) {
            return Err(shape_err(OP, format!("losses overlaps {what}")));
        }
    }
    if overlaps(targets, dlogits) {
        return Err(shape_err(OP, "dlogits overlaps targets".into()));
    }
    // SAFETY: targets and losses are disjoint from everything else (checked).
    let (tg, ls) = unsafe { (view::<i32>(targets), view_mut::<f32>(losses)) };
    check_targets(OP, tg, vocab, ignore_index)?;
    let (src, dst) = (
        SendPtr(logits.ptr as *mut u8),
        SendPtr(dlogits.ptr as *mut u8),
    );
    let (src_bf16, dst_bf16) = (logits.dtype == DType::BF16, dlogits.dtype == DType::BF16);
    ls.par_iter_mut().enumerate().for_each(|(r, loss)| {
        let t = tg[r];
        let live = t != ignore_index;
        // The row's loss, its logits turned into dlogits in place (zeros for an ignored row).
        let finish = |row: &mut [f32]| {
            if live {
                cross_entropy_row(row, t as usize, grad_scale)
            } else {
                row.fill(0.0);
                0.0
            }
        };
        if !src_bf16 && !dst_bf16 {
            // f32: the row is worked on in dlogits itself (copied there first unless the op
            // runs in place), no scratch round trip.
            // SAFETY: only this task touches row r of either buffer; when they are distinct
            // they do not overlap (checked above).
            unsafe {
                let d =
                    std::slice::from_raw_parts_mut(dst.get().cast::<f32>().add(r * vocab), vocab);
                if live && src.get() != dst.get() {
                    let s =
                        std::slice::from_raw_parts(src.get().cast::<f32>().add(r * vocab), vocab);
                    d.copy_from_slice(s);
                }
                *loss = finish(d);
            }
            return;
        }
        with_scratch::<f32, _>(vocab, |row| {
            // SAFETY: row r of logits is read completely into `row` before row r of dlogits is
            // written, and no other task touches row r, so aliasing logits == dlogits is fine.
            unsafe {
                if live && src_bf16 {
                    let s =
                        std::slice::from_raw_parts(src.get().cast::<u16>().add(r * vocab), vocab);
                    row.iter_mut()
                        .zip(s)
                        .for_each(|(d, &b)| *d = f32::from_bits((b as u32) << 16));
                } else if live {
                    let s =
                        std::slice::from_raw_parts(src.get().cast::<f32>().add(r * vocab), vocab);
                    row.copy_from_slice(s);
                }
                *loss = finish(row);
                if dst_bf16 {
                    let d = std::slice::from_raw_parts_mut(
                        dst.get().cast::<u16>().add(r * vocab),
                        vocab,
                    );
                    d.iter_mut()
                        .zip(row.iter())
                        .for_each(|(d, &x)| *d = f32_to_bf16_bits(x));
                } else {
                    let d = std::slice::from_raw_parts_mut(
                        dst.get().cast::<f32>().add(r * vocab),
                        vocab,
                    );
                    d.copy_from_slice(row);
                }
            }
        })
    });
    Ok(())
}

/// The stats row of one logits row: (max, sum of exp(x - max), x[target - col0] or 0).
fn stats_row(x: &[f32], target: i32, col0: usize, ignore_index: i32) -> [f32; 3] {
    let mx = f32::max_slice(x);
    // The vectorised exp-and-sum of the whole-vocabulary op, on a scratch copy of the row.
    let s = with_scratch::<f32, _>(x.len(), |row| {
        row.copy_from_slice(x);
        f32::exp_sub_sum(row, mx)
    });
    let t = target as i64 - col0 as i64;
    let xt = if target != ignore_index && (0..x.len() as i64).contains(&t) {
        x[t as usize]
    } else {
        0.0
    };
    [mx, s, xt]
}

/// `Backend::cross_entropy_stats` (pass 1 of the vocabulary-parallel loss).
pub(super) fn cross_entropy_stats_op(a: &CrossEntropyStats) -> Result<()> {
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
    check_dtype(OP, "targets", targets, &[DType::I32])?;
    check_dtype(OP, "stats", stats, &[DType::F32])?;
    check_len(OP, "logits", logits, rows * vocab)?;
    check_len(OP, "targets", targets, rows)?;
    check_len(OP, "stats", stats, rows * 3)?;
    if overlaps(stats, logits) || overlaps(stats, targets) {
        return Err(shape_err(OP, "stats overlaps an input".into()));
    }
    // SAFETY: live buffers of the checked dtypes; stats overlaps no input.
    unsafe {
        let x = super::load(OP, "logits", logits)?;
        let tg = view::<i32>(targets);
        view_mut::<f32>(stats)
            .par_chunks_mut(3)
            .enumerate()
            .for_each(|(r, st)| {
                st.copy_from_slice(&stats_row(
                    &x[r * vocab..(r + 1) * vocab],
                    tg[r],
                    col0,
                    ignore_index,
                ))
            });
    }
    Ok(())
}

/// `Backend::cross_entropy_shard` (pass 2 of the vocabulary-parallel loss).
pub(super) fn cross_entropy_shard_op(a: &CrossEntropyShard) -> Result<()> {
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
    check_loss_buffers(OP, logits, targets, losses, dlogits, (rows, vocab))?;
    check_dtype(OP, "stats", stats, &[DType::F32])?;
    check_len(OP, "stats", stats, shards * rows * 3)?;
    if shards == 0 || col0 + vocab > vocab_total {
        return Err(shape_err(
            OP,
            format!(
                "columns {col0}..{} of {shards} shard(s) do not fit a vocabulary of {vocab_total}",
                col0 + vocab
            ),
        ));
    }
    for (what, b) in [("logits", logits), ("targets", targets), ("stats", stats)] {
        if overlaps(losses, b) || (what != "logits" && overlaps(dlogits, b)) {
            return Err(shape_err(OP, format!("an output overlaps {what}")));
        }
    }
    // SAFETY: live buffers of the checked dtypes; the outputs overlap no input but dlogits may be
    // logits itself, which is read in full (into `x`) before dlogits is written.
    unsafe {
        let tg = view::<i32>(targets);
        check_targets(OP, tg, vocab_total, ignore_index)?;
        let st = view::<f32>(stats);
        let x = super::load(OP, "logits", logits)?.into_owned();
        let ls = view_mut::<f32>(losses);
        super::store(OP, "dlogits", dlogits, false, |d| {
            d.par_chunks_mut(vocab)
                .zip(ls.par_iter_mut())
                .enumerate()
                .for_each(|(r, (d, loss))| {
                    let t = tg[r];
                    if t == ignore_index {
                        d.fill(0.0);
                        *loss = 0.0;
                        return;
                    }
                    // Combined in rank order, the same on every rank.
                    let row = |k: usize| &st[(k * rows + r) * 3..(k * rows + r) * 3 + 3];
                    let m = (0..shards)
                        .map(|k| row(k)[0])
                        .fold(f32::NEG_INFINITY, f32::max);
                    let s: f32 = (0..shards).map(|k| row(k)[1] * (row(k)[0] - m).exp()).sum();
                    let xt: f32 = (0..shards).map(|k| row(k)[2]).sum();
                    *loss = s.ln() + m - xt;
                    d.copy_from_slice(&x[r * vocab..(r + 1) * vocab]);
                    f32::exp_sub_sum(d, m);
                    f32::scale_slice(d, grad_scale / s);
                    if let Some(o) = (t as usize).checked_sub(col0).and_then(|j| d.get_mut(j)) {
                        *o -= grad_scale;
                    }
                })
        })
    }
}
