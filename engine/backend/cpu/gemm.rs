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

/// A strided matrix operand: element (i, j) lives at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy, Debug)]
pub struct Mat<T> {
    pub ptr: *mut T,
    pub rs: usize,
    pub cs: usize,
}

impl<T> Mat<T> {
    /// Row-major with leading dimension `ld` (rows `ld` apart).
    pub fn rows(ptr: *const T, ld: usize) -> Mat<T> {
        Mat {
            ptr: ptr as *mut T,
            rs: ld,
            cs: 1,
        }
    }
    /// Column-major with leading dimension `ld`, i.e. the transpose of a row-major matrix.
    pub fn cols(ptr: *const T, ld: usize) -> Mat<T> {
        Mat {
            ptr: ptr as *mut T,
            rs: 1,
            cs: ld,
        }
    }
    /// The matrix from row `r` on. SAFETY (caller): row r lies inside the same allocation.
    #[inline(always)]
    pub(super) unsafe fn skip_rows(self, r: usize) -> Mat<T> {
        Mat {
            ptr: self.ptr.add(r * self.rs),
            ..self
        }
    }
    /// The matrix from column `c` on. SAFETY (caller): as `skip_rows`.
    unsafe fn skip_cols(self, c: usize) -> Mat<T> {
        Mat {
            ptr: self.ptr.add(c * self.cs),
            ..self
        }
    }
}

/// One strided matrix product: dst[m,n] = beta·dst + alpha·lhs[m,k]·rhs[k,n] (BLAS roles).
/// When `beta` is zero the destination is not read, so stale NaNs in it do not propagate.
/// The crate vectorises along dst's unit-stride dimension, so a column-major `dst` is the fast
/// choice when n is small (attention's head_dim-wide outputs).
///
/// # Safety
/// Every operand with its strides must address valid memory for the given sizes, and `dst`
/// must not overlap `lhs` or `rhs`.
#[inline]
pub unsafe fn matmul<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: Mat<T>,
    lhs: Mat<T>,
    rhs: Mat<T>,
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
                let d = dst.ptr.add(i * dst.rs + j * dst.cs);
                *d = if beta == T::ZERO { T::ZERO } else { beta * *d };
            }
        }
        return;
    }
    let is = |x: usize| x as isize;
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        is(dst.cs),
        is(dst.rs),
        beta != T::ZERO,
        lhs.ptr,
        is(lhs.cs),
        is(lhs.rs),
        rhs.ptr,
        is(rhs.cs),
        is(rhs.rs),
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
    // op(A)[i, p]: A is [m, k] (row-major) or, transposed, stored [k, m] (column-major view).
    let a_of = |p: *mut T| {
        if g.trans_a {
            Mat::cols(p, m)
        } else {
            Mat::rows(p, k)
        }
    };
    let b_of = |p: *mut T| {
        if g.trans_b {
            Mat::cols(p, k)
        } else {
            Mat::rows(p, n)
        }
    };
    let (alpha, beta) = (T::from_f64(g.alpha as f64), T::from_f64(g.beta as f64));
    let (pa, pb, pc) = (
        SendPtr(a.as_ptr() as *mut T),
        SendPtr(b.as_ptr() as *mut T),
        SendPtr(c.as_mut_ptr()),
    );
    // Aᵀ·B in f32 (weight gradients) has its own kernel: the crate would repack A with a
    // transposing gather for every k-block.
    #[cfg(target_arch = "x86_64")]
    let tn = g.trans_a
        && !g.trans_b
        && k > 0
        && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && super::gemm_x86::supported(m, n);
    // SAFETY (every branch): check_gemm proved every matrix lies inside its slice, and distinct
    // batch entries of C are disjoint (stride_c >= m*n), so parallel batches never share output.
    let one = move |i: usize, split: bool| unsafe {
        let (a, b) = (
            a_of(pa.get().add(i * g.stride_a)),
            b_of(pb.get().add(i * g.stride_b)),
        );
        let c = Mat::rows(pc.get().add(i * g.stride_c), n);
        #[cfg(target_arch = "x86_64")]
        if tn {
            // T is f32 (checked above); the slices are the ranges check_gemm validated.
            let f = |p: *mut T, len: usize| std::slice::from_raw_parts(p as *const f32, len);
            let (a, b) = (f(a.ptr, k * m), f(b.ptr, k * n));
            let c = std::slice::from_raw_parts_mut(c.ptr as *mut f32, m * n);
            return super::gemm_x86::gemm_tn((m, n, k), a, b, c, g.alpha, g.beta, split);
        }
        if split {
            matmul_split((m, n, k), c, a, b, alpha, beta)
        } else {
            matmul((m, n, k), c, a, b, alpha, beta, Parallelism::None)
        }
    };
    // Small batched products (attention-like) parallelise better across the batch.
    if g.batch > 1 && m * n * k <= 128 * 128 * 128 {
        (0..g.batch).into_par_iter().for_each(|i| one(i, false));
    } else {
        for i in 0..g.batch {
            one(i, true);
        }
    }
    Ok(())
}

/// Cuts C [m, n] along its longer side (rows when m >= n) into one contiguous slab per rayon
/// thread, each a whole number of `unit`s along that side (rows, columns) and at least
/// `min_units` of them, and runs `f(by_rows, slab)` on every slab in parallel. A product under
/// 2^21 multiply-adds, or too narrow to cut, is one slab on this thread. Slabs are disjoint
/// parts of C and no kernel sums across them, so results do not depend on the cut.
pub(super) fn for_each_slab(
    (m, n, k): (usize, usize, usize),
    (row_unit, col_unit): (usize, usize),
    min_units: usize,
    f: impl Fn(bool, std::ops::Range<usize>) + Sync,
) {
    let by_rows = m >= n;
    let (len, unit) = if by_rows {
        (m, row_unit)
    } else {
        (n, col_unit)
    };
    let slabs = if m * n * k < 1 << 21 {
        1
    } else {
        rayon::current_num_threads()
            .min(len / (min_units * unit))
            .max(1)
    };
    if slabs == 1 {
        return f(by_rows, 0..len);
    }
    let per = len.div_ceil(slabs).next_multiple_of(unit);
    (0..slabs).into_par_iter().for_each(|s| {
        let (lo, hi) = (s * per, ((s + 1) * per).min(len));
        if lo < hi {
            f(by_rows, lo..hi)
        }
    });
}

/// Runs one product on every rayon thread (see [`for_each_slab`]: slabs of 16-row or
/// 16-column multiples, at least 64 wide, since narrower ones waste the micro-kernel), each a
/// single-threaded crate call. The crate's own parallel mode synchronises its threads at every
/// k-block; independent slabs do not, which measured 5-15 % faster on the Llama projection
/// shapes at 2 threads.
///
/// # Safety
/// As [`matmul`].
pub unsafe fn matmul_split<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: Mat<T>,
    lhs: Mat<T>,
    rhs: Mat<T>,
    alpha: T,
    beta: T,
) {
    let (d, l, r) = (SendPtr(dst.ptr), SendPtr(lhs.ptr), SendPtr(rhs.ptr));
    for_each_slab((m, n, k), (16, 16), 4, |by_rows, slab| {
        let (dst, lhs, rhs) = (
            Mat {
                ptr: d.get(),
                ..dst
            },
            Mat {
                ptr: l.get(),
                ..lhs
            },
            Mat {
                ptr: r.get(),
                ..rhs
            },
        );
        // SAFETY: the slab addresses rows (or columns) `slab` of dst, disjoint from every other
        // slab's, and a sub-range of what the caller proved valid.
        unsafe {
            let (mnk, dst, lhs, rhs) = if by_rows {
                let (dst, lhs) = (dst.skip_rows(slab.start), lhs.skip_rows(slab.start));
                ((slab.len(), n, k), dst, lhs, rhs)
            } else {
                let (dst, rhs) = (dst.skip_cols(slab.start), rhs.skip_cols(slab.start));
                ((m, slab.len(), k), dst, lhs, rhs)
            };
            matmul(mnk, dst, lhs, rhs, alpha, beta, Parallelism::None)
        }
    });
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
