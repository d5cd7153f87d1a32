//! GEMM through the `gemm` crate (runtime-dispatched AVX-512/AVX2 micro-kernels, rayon).
//!
//! The crate computes dst = alpha·dst + beta·lhs·rhs (alpha scales the destination: the roles
//! are swapped compared with BLAS) and takes a row and a column stride for every operand, so a
//! transpose is just swapped strides and costs nothing.

use super::{check_disjoint, check_dtype, load, shape_err, store, Float, SendPtr, FLOATS};
use crate::backend::{Buf, Gemm};
use crate::error::{Error, Result};
use gemm::Parallelism;
use rayon::prelude::*;

/// One strided matrix product: dst[m,n] = beta·dst + alpha·lhs[m,k]·rhs[k,n] (BLAS roles).
/// When `beta` is zero the destination is not read, so stale NaNs in it do not propagate.
///
/// # Safety
/// Every pointer with its strides must address valid memory for the given sizes, and `dst`
/// must not overlap `lhs` or `rhs`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub unsafe fn matmul<T: Float>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    lhs: *const T,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const T,
    rhs_rs: usize,
    rhs_cs: usize,
    alpha: T,
    beta: T,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let d = dst.add(i * dst_rs + j);
                *d = if beta == T::ZERO { T::ZERO } else { beta * *d };
            }
        }
        return;
    }
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        beta != T::ZERO,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        beta,
        alpha,
        false,
        false,
        false,
        par,
    );
}

/// Elements an operand of `rows`×`cols` repeated `batch` times `stride` apart must have.
fn extent(batch: usize, stride: usize, size: usize) -> usize {
    if batch == 0 || size == 0 {
        0
    } else {
        (batch - 1) * stride + size
    }
}

/// Checks that the operand lengths cover what `g` addresses.
pub fn check_gemm(g: &Gemm, a: usize, b: usize, c: usize) -> Result<()> {
    let need = [
        ("a", a, extent(g.batch, g.stride_a, g.m * g.k)),
        ("b", b, extent(g.batch, g.stride_b, g.k * g.n)),
        ("c", c, extent(g.batch, g.stride_c, g.m * g.n)),
    ];
    for (name, have, want) in need {
        if have < want {
            return Err(shape_err(
                "gemm",
                format!(
                    "{name} has {have} elements but m={} n={} k={} batch={} strides a/b/c={}/{}/{} need {want}",
                    g.m, g.n, g.k, g.batch, g.stride_a, g.stride_b, g.stride_c
                ),
            ));
        }
    }
    if g.batch > 1 && g.stride_c < g.m * g.n {
        return Err(shape_err(
            "gemm",
            format!(
                "stride_c {} < m*n {}: outputs would overlap",
                g.stride_c,
                g.m * g.n
            ),
        ));
    }
    Ok(())
}

/// Row-major C = alpha·op(A)·op(B) + beta·C for each of `g.batch` matrices (the kernel behind
/// `Backend::gemm`, generic so the gradient checks can run it in f64).
pub fn gemm_kernel<T: Float>(g: &Gemm, a: &[T], b: &[T], c: &mut [T]) -> Result<()> {
    check_gemm(g, a.len(), b.len(), c.len())?;
    let (m, n, k) = (g.m, g.n, g.k);
    // op(A)[i, p]: A is [m, k] (row stride k) or, transposed, [k, m] (column stride m).
    let (a_rs, a_cs) = if g.trans_a { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if g.trans_b { (1, k) } else { (n, 1) };
    let (alpha, beta) = (T::from_f64(g.alpha as f64), T::from_f64(g.beta as f64));
    let (pa, pb, pc) = (
        SendPtr(a.as_ptr() as *mut T),
        SendPtr(b.as_ptr() as *mut T),
        SendPtr(c.as_mut_ptr()),
    );
    // SAFETY (both branches): check_gemm proved every matrix lies inside its slice, and distinct
    // batch entries of C are disjoint (stride_c >= m*n), so parallel batches never share output.
    let one = move |i: usize, par: Parallelism| unsafe {
        matmul(
            m,
            n,
            k,
            pc.get().add(i * g.stride_c),
            n,
            pa.get().add(i * g.stride_a),
            a_rs,
            a_cs,
            pb.get().add(i * g.stride_b),
            b_rs,
            b_cs,
            alpha,
            beta,
            par,
        )
    };
    // Small batched products (attention-like) parallelise better across the batch.
    if g.batch > 1 && m * n * k <= 128 * 128 * 128 {
        (0..g.batch)
            .into_par_iter()
            .for_each(|i| one(i, Parallelism::None));
    } else {
        for i in 0..g.batch {
            one(i, Parallelism::Rayon(0));
        }
    }
    Ok(())
}

pub(super) fn gemm_op(g: &Gemm, a: Buf, b: Buf, c: Buf) -> Result<()> {
    check_dtype("gemm", "a", a, FLOATS)?;
    check_dtype("gemm", "b", b, FLOATS)?;
    check_dtype("gemm", "c", c, FLOATS)?;
    if a.dtype != b.dtype {
        return Err(Error::DType {
            op: "gemm",
            msg: format!("a is {} but b is {}: they must match", a.dtype, b.dtype),
        });
    }
    check_gemm(g, a.len, b.len, c.len)?;
    check_disjoint("gemm", "c", c, &[("a", a), ("b", b)])?;
    // SAFETY: live buffers of the checked dtypes; c overlaps neither input.
    unsafe {
        let (a, b) = (load("gemm", "a", a)?, load("gemm", "b", b)?);
        store("gemm", "c", c, g.beta != 0.0, |cf| {
            gemm_kernel(g, &a, &b, cf)
        })?
    }
}
