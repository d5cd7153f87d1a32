//! Deterministic reductions: fixed chunks (independent of the thread count), f64 partials summed
//! in chunk order, so the result is bitwise reproducible on any machine.

use super::{check_dtype, check_len, overlaps, shape_err, view, view_mut, CHUNK, FLOATS};
use crate::backend::Buf;
use crate::error::Result;
use crate::tensor::DType;
use half::bf16;
use rayon::prelude::*;

/// Σ f(x) over a chunk with 8 f64 lanes (a fixed order the compiler can vectorise).
#[inline]
fn chunk_sum<T: Copy>(xs: &[T], f: impl Fn(T) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            acc[l] += f(c[l]);
        }
    }
    lanes_tail_sum(acc, it.remainder(), f)
}

/// The end of [`chunk_sum`]: the tail into lanes 0.., then the fixed tree.
#[inline(always)]
fn lanes_tail_sum<T: Copy>(mut acc: [f64; 8], tail: &[T], f: impl Fn(T) -> f64) -> f64 {
    for (l, &x) in tail.iter().enumerate() {
        acc[l] += f(x);
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// [`chunk_sum`] of f32 values (squared with `square`) with the 8 lanes in one AVX-512
/// register: the same additions in the same order, so the same bits (the compiler split the
/// generic loop into 128-bit pieces).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn chunk_sum_f32_v4(xs: &[f32], square: bool) -> f64 {
    use std::arch::x86_64::*;
    let mut acc = _mm512_setzero_pd();
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        let v = _mm512_cvtps_pd(_mm256_loadu_ps(c.as_ptr()));
        acc = _mm512_add_pd(acc, if square { _mm512_mul_pd(v, v) } else { v });
    }
    let mut lanes = [0f64; 8];
    _mm512_storeu_pd(lanes.as_mut_ptr(), acc);
    if square {
        lanes_tail_sum(lanes, it.remainder(), |x: f32| (x as f64) * (x as f64))
    } else {
        lanes_tail_sum(lanes, it.remainder(), |x: f32| x as f64)
    }
}

/// Σ x or Σ x² of f32 values in [`chunk_sum`]'s order.
fn chunk_sum_f32(xs: &[f32], square: bool) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected at run time.
        return unsafe { chunk_sum_f32_v4(xs, square) };
    }
    if square {
        chunk_sum(xs, |x| (x as f64) * (x as f64))
    } else {
        chunk_sum(xs, |x| x as f64)
    }
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
        (DType::F32, sq) => total_by(view::<f32>(b), |c| chunk_sum_f32(c, sq)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_chunk_sum_matches_the_generic_order_bitwise() {
        let mut x = 0x2545_f491u32;
        for n in [0usize, 1, 7, 8, 9, 1000, 16_383] {
            let xs: Vec<f32> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    (x as f32 / u32::MAX as f32 - 0.5) * 1e3
                })
                .collect();
            for square in [false, true] {
                let want = if square {
                    chunk_sum(&xs, |v| (v as f64) * (v as f64))
                } else {
                    chunk_sum(&xs, |v| v as f64)
                };
                let got = chunk_sum_f32(&xs, square);
                assert_eq!(got.to_bits(), want.to_bits(), "n {n} square {square}");
            }
        }
    }
}
