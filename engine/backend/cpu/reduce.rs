//! Deterministic reductions: fixed chunks (independent of the thread count), f64 partials summed
//! in chunk order, so the result is bitwise reproducible on any machine.

use super::{check_dtype, check_len, overlaps, shape_err, vecmath, view, view_mut, CHUNK, FLOATS};
use crate::backend::Buf;
use crate::error::Result;
use crate::tensor::DType;
use half::bf16;
use rayon::prelude::*;

/// Σ f(x) over a chunk with 8 f64 lanes (a fixed order the compiler can vectorise).
#[inline(always)]
pub(super) fn chunk_sum<T: Copy>(xs: &[T], f: impl Fn(T) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            acc[l] += f(c[l]);
        }
    }
    for (l, &x) in it.remainder().iter().enumerate() {
        acc[l] += f(x);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

fn total<T: Copy + Sync>(xs: &[T], f: impl Fn(T) -> f64 + Sync) -> f64 {
    total_by(xs, |c| chunk_sum(c, &f))
}

/// Σ of `chunk(c)` over fixed chunks, in chunk order.
fn total_by<T: Sync>(xs: &[T], chunk: impl Fn(&[T]) -> f64 + Sync) -> f64 {
    let parts: Vec<f64> = xs.par_chunks(CHUNK).map(&chunk).collect();
    parts.iter().sum()
}

/// Σ x or Σ x² of one float buffer, in f64. SAFETY (caller): `b` is a live buffer.
unsafe fn reduce_buf(op: &'static str, what: &str, b: Buf, square: bool) -> Result<f64> {
    check_dtype(op, what, b, FLOATS)?;
    Ok(match (b.dtype, square) {
        // f32 through `vecmath` (compiled for the vector unit present), same lane order.
        (DType::F32, sq) => total_by(view::<f32>(b), |c| vecmath::sum_f64_f32(c, sq)),
        (_, false) => total(view::<bf16>(b), |x| x.to_f64()),
        (_, true) => total(view::<bf16>(b), |x| x.to_f64() * x.to_f64()),
    })
}

fn check_out(op: &'static str, out: Buf, ins: &[Buf]) -> Result<()> {
    check_dtype(op, "out", out, &[DType::F32])?;
    check_len(op, "out", out, 1)?;
    if ins.iter().any(|b| overlaps(*b, out)) {
        return Err(shape_err(op, "out overlaps an input".into()));
    }
    Ok(())
}

pub(super) fn sum_op(x: Buf, out: Buf) -> Result<()> {
    check_out("sum", out, &[x])?;
    // SAFETY: live buffers of checked dtypes; out is disjoint from x.
    unsafe {
        let s = reduce_buf("sum", "x", x, false)?;
        view_mut::<f32>(out)[0] = s as f32;
    }
    Ok(())
}

pub(super) fn sum_squares_op(xs: &[Buf], out: Buf) -> Result<()> {
    check_out("sum_squares", out, xs)?;
    let mut s = 0f64;
    for (i, x) in xs.iter().enumerate() {
        // SAFETY: live buffers; out is disjoint from all of them.
        s += unsafe { reduce_buf("sum_squares", &format!("xs[{i}]"), *x, true)? };
    }
    // SAFETY: out is a live f32 buffer of one element.
    unsafe { view_mut::<f32>(out)[0] = s as f32 };
    Ok(())
}
