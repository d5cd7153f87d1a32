//! RMSNorm forward (optionally fused with the residual add) and backward.

use super::{check_disjoint, check_dtype, check_len, load, store, view, view_mut, Float, FLOATS};
use crate::backend::{Buf, RmsNorm, RmsNormBwd};
use crate::error::Result;
use crate::tensor::DType;
use rayon::prelude::*;

/// Rows per task. Fixed (not derived from the thread count) so that the backward's partial dw
/// sums, and therefore dw itself, are bitwise identical on any machine.
const ROWS: usize = 32;

fn check(op: &'static str, lens: &[(&str, usize)], rows: usize, dim: usize) -> Result<()> {
    for (what, have) in lens {
        let want = match *what {
            "w" | "dw" => dim,
            "rstd" => rows,
            _ => rows * dim,
        };
        if *have != want {
            return Err(super::shape_err(
                op,
                format!("{what} has {have} elements, expected {want} (rows {rows}, dim {dim})"),
            ));
        }
    }
    Ok(())
}

/// out = x · rstd · w per row with rstd = 1/sqrt(mean(x²) + eps), rstd saved.
pub fn rmsnorm_fwd<T: Float>(
    x: &[T],
    w: &[T],
    out: &mut [T],
    rstd: &mut [T],
    dim: usize,
    eps: T,
) -> Result<()> {
    let rows = rstd.len();
    check(
        "rmsnorm_fwd",
        &[("x", x.len()), ("w", w.len()), ("out", out.len())],
        rows,
        dim,
    )?;
    if dim == 0 {
        return Ok(());
    }
    out.par_chunks_mut(ROWS * dim)
        .zip(x.par_chunks(ROWS * dim))
        .zip(rstd.par_chunks_mut(ROWS))
        .for_each(|((o, x), r)| T::rmsnorm_fwd_block(x, w, o, r, eps));
    Ok(())
}

/// h = x + residual and out = rmsnorm(h), rstd saved, block by block of rows of `w.len()`.
fn residual_fwd<T: Float>(
    x: &[T],
    residual: &[T],
    w: &[T],
    h: &mut [T],
    out: &mut [T],
    rstd: &mut [T],
    eps: T,
) {
    let dim = w.len();
    if dim == 0 {
        return;
    }
    h.par_chunks_mut(ROWS * dim)
        .zip(out.par_chunks_mut(ROWS * dim))
        .zip(rstd.par_chunks_mut(ROWS))
        .enumerate()
        .for_each(|(c, ((hc, oc), rc))| {
            let at = c * ROWS * dim;
            for ((h, &a), &b) in hc.iter_mut().zip(&x[at..]).zip(&residual[at..]) {
                *h = a + b;
            }
            T::rmsnorm_fwd_block(hc, w, oc, rc, eps);
        });
}

/// The slices of an rmsnorm backward over `rstd.len()` rows of `dim` (the slice form of
/// [`RmsNormBwd`], also handed to `Float::rmsnorm_bwd_block` one block of rows at a time).
#[derive(Debug)]
pub struct RmsNormBwdSlices<'a, T> {
    /// Incoming gradient g = dL/dout, `[rows, dim]`.
    pub dout: &'a [T],
    /// The forward's input `[rows, dim]`.
    pub x: &'a [T],
    /// Weight `[dim]`.
    pub w: &'a [T],
    /// `[rows]`, saved by the forward.
    pub rstd: &'a [T],
    /// A gradient added to dx (`rmsnorm_bwd_add`), like dx.
    pub dres: Option<&'a [T]>,
    /// dL/dx `[rows, dim]`, written.
    pub dx: &'a mut [T],
    /// dL/dw `[dim]`, accumulated (`+=`).
    pub dw: &'a mut [T],
}

/// dx = rstd · (g·w − x̂ · mean(g·w·x̂)) (+ dres) with x̂ = x · rstd; dw += Σ_rows g · x̂
/// (deterministic).
pub fn rmsnorm_bwd<T: Float>(t: RmsNormBwdSlices<'_, T>, dim: usize) -> Result<()> {
    let RmsNormBwdSlices {
        dout,
        x,
        w,
        rstd,
        dres,
        dx,
        dw,
    } = t;
    let rows = rstd.len();
    let lens = [
        ("dout", dout.len()),
        ("x", x.len()),
        ("w", w.len()),
        ("dx", dx.len()),
        ("dw", dw.len()),
        ("dres", dres.map_or(rows * dim, |d| d.len())),
    ];
    check("rmsnorm_bwd", &lens, rows, dim)?;
    if dim == 0 || rows == 0 {
        return Ok(());
    }
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(ROWS * dim)
        .zip(dout.par_chunks(ROWS * dim))
        .zip(x.par_chunks(ROWS * dim).zip(rstd.par_chunks(ROWS)))
        .enumerate()
        .map(|(c, ((dxc, g), (xc, rs)))| {
            let mut pw = vec![T::ZERO; dim];
            let dr = dres.map(|d| &d[c * ROWS * dim..c * ROWS * dim + dxc.len()]);
            let block = RmsNormBwdSlices {
                dout: g,
                x: xc,
                w,
                rstd: rs,
                dres: dr,
                dx: dxc,
                dw: &mut pw,
            };
            T::rmsnorm_bwd_block(block);
            pw
        })
        .collect();
    dw.par_iter_mut()
        .enumerate()
        .with_min_len(64)
        .for_each(|(j, d)| {
            let mut s = T::ZERO;
            for p in &partials {
                s += p[j];
            }
            *d += s;
        });
    Ok(())
}

/// The `Backend` entry for both rmsnorm_fwd and (with `res = Some((residual, h))`)
/// rmsnorm_residual_fwd: h = x + residual is rounded to h's dtype first and the norm reads the
/// rounded h, so forward and backward (which only sees h) agree exactly.
pub(super) fn rmsnorm_fwd_op(a: &RmsNorm, res: Option<(Buf, Buf)>) -> Result<()> {
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
    check_dtype(op, "w", w, FLOATS)?;
    check_dtype(op, "out", out, FLOATS)?;
    check_dtype(op, "rstd", rstd, &[DType::F32])?;
    check(
        op,
        &[
            ("x", x.len),
            ("w", w.len),
            ("out", out.len),
            ("rstd", rstd.len),
        ],
        rows,
        dim,
    )?;
    let mut ins = vec![("x", x), ("w", w)];
    if let Some((residual, h)) = res {
        check_dtype(op, "residual", residual, FLOATS)?;
        check_dtype(op, "h", h, FLOATS)?;
        check(op, &[("residual", residual.len), ("h", h.len)], rows, dim)?;
        check_disjoint(
            op,
            "h",
            h,
            &[
                ("x", x),
                ("residual", residual),
                ("w", w),
                ("out", out),
                ("rstd", rstd),
            ],
        )?;
        ins.push(("residual", residual));
        ins.push(("h", h));
    }
    check_disjoint(op, "out", out, &ins)?;
    check_disjoint(op, "rstd", rstd, &ins)?;
    check_disjoint(op, "rstd", rstd, &[("out", out)])?;
    let src = match res {
        // All f32: h and the norm in one pass over each block of rows (h is still in cache
        // when the norm reads it).
        Some((residual, h))
            if [x, residual, h, w, out]
                .iter()
                .all(|b| b.dtype == DType::F32) =>
        {
            // SAFETY: live f32 buffers of checked lengths; outputs overlap no input or each
            // other (checked above).
            unsafe {
                let (hs, os) = (view_mut::<f32>(h), view_mut::<f32>(out));
                let (xs, rs, ws) = (view::<f32>(x), view::<f32>(residual), view::<f32>(w));
                // w has dim elements (checked above).
                residual_fwd(xs, rs, ws, hs, os, view_mut::<f32>(rstd), eps);
            }
            return Ok(());
        }
        Some((residual, h)) => {
            // SAFETY: live buffers of checked dtypes; h overlaps nothing else.
            unsafe {
                let (xs, rs) = (load(op, "x", x)?, load(op, "residual", residual)?);
                store(op, "h", h, false, |hf| {
                    hf.par_iter_mut()
                        .zip(xs.par_iter())
                        .zip(rs.par_iter())
                        .with_min_len(4096)
                        .for_each(|((h, a), b)| *h = a + b)
                })?;
            }
            h
        }
        None => x,
    };
    // SAFETY: live buffers of checked dtypes and lengths; outputs overlap no input.
    unsafe {
        let (xs, ws) = (load(op, "x", src)?, load(op, "w", w)?);
        store(op, "out", out, false, |o| {
            rmsnorm_fwd(&xs, &ws, o, view_mut::<f32>(rstd), dim, eps)
        })?
    }
}

/// The `Backend` entry for rmsnorm_bwd and (with `dres`) rmsnorm_bwd_add.
pub(super) fn rmsnorm_bwd_op(a: &RmsNormBwd, dres: Option<Buf>) -> Result<()> {
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
    let op = if dres.is_some() {
        "rmsnorm_bwd_add"
    } else {
        "rmsnorm_bwd"
    };
    for (what, b) in [("dout", dout), ("x", x), ("w", w), ("dx", dx)] {
        check_dtype(op, what, b, FLOATS)?;
    }
    if let Some(d) = dres {
        check_dtype(op, "dres", d, FLOATS)?;
        check(op, &[("dres", d.len)], rows, dim)?;
        check_disjoint(op, "dx", dx, &[("dres", d)])?;
    }
    check_dtype(op, "rstd", rstd, &[DType::F32])?;
    check_dtype(op, "dw", dw, &[DType::F32])?;
    let lens = [
        ("dout", dout.len),
        ("x", x.len),
        ("w", w.len),
        ("dx", dx.len),
        ("dw", dw.len),
        ("rstd", rstd.len),
    ];
    check(op, &lens, rows, dim)?;
    let ins = [("dout", dout), ("x", x), ("w", w), ("rstd", rstd)];
    check_disjoint(op, "dx", dx, &ins)?;
    check_disjoint(op, "dw", dw, &ins)?;
    check_disjoint(op, "dw", dw, &[("dx", dx)])?;
    if let Some(d) = dres {
        check_disjoint(op, "dw", dw, &[("dres", d)])?;
    }
    check_len(op, "rstd", rstd, rows)?;
    // SAFETY: live buffers of checked dtypes and lengths; outputs overlap no input or each other.
    unsafe {
        let (g, xs, ws) = (
            load(op, "dout", dout)?,
            load(op, "x", x)?,
            load(op, "w", w)?,
        );
        let rs = view::<f32>(rstd);
        let dr = dres.map(|d| load(op, "dres", d)).transpose()?;
        store(op, "dx", dx, false, |d| {
            let t = RmsNormBwdSlices {
                dout: &g,
                x: &xs,
                w: &ws,
                rstd: rs,
                dres: dr.as_deref(),
                dx: d,
                dw: view_mut::<f32>(dw),
            };
            rmsnorm_bwd(t, dim)
        })?
    }
}
