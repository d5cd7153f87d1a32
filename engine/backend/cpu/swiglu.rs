//! SwiGLU: out = silu(gate) · up.

use super::{check_disjoint, check_dtype, load, shape_err, store, Float, FLOATS};
use crate::backend::Buf;
use crate::error::Result;
use rayon::prelude::*;

/// Elements per rayon piece (the pool splits adaptively; this is the finest grain).
const BLOCK: usize = 4096;

fn check(op: &'static str, lens: &[(&str, usize)]) -> Result<()> {
    let n = lens[0].1;
    if let Some((what, l)) = lens.iter().find(|(_, l)| *l != n) {
        return Err(shape_err(
            op,
            format!("{what} has {l} elements but {} has {n}", lens[0].0),
        ));
    }
    Ok(())
}

pub fn swiglu_fwd<T: Float>(gate: &[T], up: &[T], out: &mut [T]) -> Result<()> {
    check(
        "swiglu_fwd",
        &[("gate", gate.len()), ("up", up.len()), ("out", out.len())],
    )?;
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, o)| {
        let r = b * BLOCK..b * BLOCK + o.len();
        T::swiglu_fwd_block(&gate[r.clone()], &up[r], o);
    });
    Ok(())
}

/// dgate = dout · up · σ(g)(1 + g(1 − σ(g))), dup = dout · silu(g).
pub fn swiglu_bwd<T: Float>(
    dout: &[T],
    gate: &[T],
    up: &[T],
    dgate: &mut [T],
    dup: &mut [T],
) -> Result<()> {
    let lens = [
        ("dout", dout.len()),
        ("gate", gate.len()),
        ("up", up.len()),
        ("dgate", dgate.len()),
        ("dup", dup.len()),
    ];
    check("swiglu_bwd", &lens)?;
    dgate
        .par_chunks_mut(BLOCK)
        .zip(dup.par_chunks_mut(BLOCK))
        .enumerate()
        .for_each(|(b, (dg, du))| {
            let r = b * BLOCK..b * BLOCK + dg.len();
            T::swiglu_bwd_block(&dout[r.clone()], &gate[r.clone()], &up[r], dg, du);
        });
    Ok(())
}

pub(super) fn swiglu_fwd_op(gate: Buf, up: Buf, out: Buf) -> Result<()> {
    const OP: &str = "swiglu_fwd";
    for (w, b) in [("gate", gate), ("up", up), ("out", out)] {
        check_dtype(OP, w, b, FLOATS)?;
    }
    check(OP, &[("gate", gate.len), ("up", up.len), ("out", out.len)])?;
    check_disjoint(OP, "out", out, &[("gate", gate), ("up", up)])?;
    // SAFETY: live buffers of checked dtypes and lengths; out overlaps no input.
    unsafe {
        let (g, u) = (load(OP, "gate", gate)?, load(OP, "up", up)?);
        store(OP, "out", out, false, |o| swiglu_fwd(&g, &u, o))?
    }
}

pub(super) fn swiglu_bwd_op(dout: Buf, gate: Buf, up: Buf, dgate: Buf, dup: Buf) -> Result<()> {
    const OP: &str = "swiglu_bwd";
    for (w, b) in [
        ("dout", dout),
        ("gate", gate),
        ("up", up),
        ("dgate", dgate),
        ("dup", dup),
    ] {
        check_dtype(OP, w, b, FLOATS)?;
    }
    check(
        OP,
        &[
            ("dout", dout.len),
            ("gate", gate.len),
            ("up", up.len),
            ("dgate", dgate.len),
            ("dup", dup.len),
        ],
    )?;
    let ins = [("dout", dout), ("gate", gate), ("up", up)];
    check_disjoint(OP, "dgate", dgate, &ins)?;
    check_disjoint(OP, "dup", dup, &ins)?;
    check_disjoint(OP, "dup", dup, &[("dgate", dgate)])?;
    // SAFETY: live buffers of checked dtypes and lengths; outputs overlap no input or each other.
    unsafe {
        let (d, g, u) = (
            load(OP, "dout", dout)?,
            load(OP, "gate", gate)?,
            load(OP, "up", up)?,
        );
        store(OP, "dgate", dgate, false, |dg| {
            store(OP, "dup", dup, false, |du| swiglu_bwd(&d, &g, &u, dg, du))
        })??
    }
}
