//! Rotary position embedding, half-split pairing (i, i + d/2) as Hugging Face's `rotate_half`.

use super::{check_disjoint, check_dtype, load, shape_err, store, view, Float, FLOATS};
use crate::backend::{Buf, RopeShape};
use crate::error::Result;
use crate::tensor::DType;
use rayon::prelude::*;

fn check(
    op: &'static str,
    x: usize,
    out: usize,
    cos: usize,
    sin: usize,
    s: RopeShape,
) -> Result<()> {
    if !s.head_dim.is_multiple_of(2) {
        return Err(shape_err(op, format!("head_dim {} is odd", s.head_dim)));
    }
    let n = s.batch * s.seq * s.heads * s.head_dim;
    if x != n || out != n {
        return Err(shape_err(
            op,
            format!("input {x} / output {out} elements, expected {n} for {s:?}"),
        ));
    }
    let t = s.seq * s.head_dim / 2;
    if cos < t || sin < t {
        return Err(shape_err(
            op,
            format!(
                "cos/sin tables have {cos}/{sin} elements, need [seq {}, {}]",
                s.seq,
                s.head_dim / 2
            ),
        ));
    }
    Ok(())
}

/// out = rotate(x) by the per-position angles; `inverse` applies the transpose rotation (the
/// backward: dx = Rᵀ · dout).
pub fn rope<T: Float>(
    x: &[T],
    out: &mut [T],
    cos: &[T],
    sin: &[T],
    s: RopeShape,
    inverse: bool,
) -> Result<()> {
    check("rope", x.len(), out.len(), cos.len(), sin.len(), s)?;
    let (d, half) = (s.head_dim, s.head_dim / 2);
    let row = s.heads * d;
    if row == 0 {
        return Ok(());
    }
    out.par_chunks_mut(row)
        .zip(x.par_chunks(row))
        .enumerate()
        .with_min_len(16)
        .for_each(|(t, (o, x))| {
            let p = t % s.seq;
            let (c, sn) = (
                &cos[p * half..(p + 1) * half],
                &sin[p * half..(p + 1) * half],
            );
            T::rope_row(x, o, c, sn, inverse);
        });
    Ok(())
}

pub(super) fn rope_op(
    op: &'static str,
    x: Buf,
    out: Buf,
    cos: Buf,
    sin: Buf,
    s: RopeShape,
    inverse: bool,
) -> Result<()> {
    check_dtype(op, "input", x, FLOATS)?;
    check_dtype(op, "output", out, FLOATS)?;
    check_dtype(op, "cos", cos, &[DType::F32])?;
    check_dtype(op, "sin", sin, &[DType::F32])?;
    check(op, x.len, out.len, cos.len, sin.len, s)?;
    check_disjoint(
        op,
        "output",
        out,
        &[("input", x), ("cos", cos), ("sin", sin)],
    )?;
    // SAFETY: live buffers of checked dtypes and lengths; out overlaps no input.
    unsafe {
        let xs = load(op, "input", x)?;
        let (c, sn) = (view::<f32>(cos), view::<f32>(sin));
        store(op, "output", out, false, |o| {
            rope(&xs, o, c, sn, s, inverse)
        })?
    }
}
