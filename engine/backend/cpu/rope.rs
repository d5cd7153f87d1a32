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

/// `Float::rope_row` for f32 on AVX-512 at head dims 16 and 32k (f32's `Float` impl picks it):
/// the generic loop runs over a head's half, and at head dim 16 (8 pairs, half a vector) it
/// compiles to scalar code.
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// Whether this CPU and a head of `half` pairs take [`rope_row`].
    pub fn supported(half: usize) -> bool {
        (half == 8 || (half > 0 && half.is_multiple_of(16)))
            && std::arch::is_x86_feature_detected!("avx512f")
    }

    /// out = x·c + swap(x)·s per head, with c = (cos, cos) and s = (−sin, sin) (signs flipped
    /// for the inverse), swap exchanging the halves of the head. Half 8 or a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn rope_row(x: &[f32], out: &mut [f32], cos: &[f32], sin: &[f32], inverse: bool) {
        let half = cos.len();
        let (xp, op) = (x.as_ptr(), out.as_mut_ptr());
        let heads = x.len() / (2 * half);
        if half == 8 {
            // Both halves of a head in one vector: lanes 0-7 are x1, 8-15 are x2.
            let low = _mm512_maskz_loadu_ps(0xff, cos.as_ptr());
            let c = _mm512_shuffle_f32x4::<0b01_00_01_00>(low, low);
            let sl = _mm512_maskz_loadu_ps(0xff, sin.as_ptr());
            let s = _mm512_shuffle_f32x4::<0b01_00_01_00>(sl, sl);
            let neg: __mmask16 = if inverse { 0xff00 } else { 0x00ff };
            let s = _mm512_mask_sub_ps(s, neg, _mm512_setzero_ps(), s);
            for h in 0..heads {
                let v = _mm512_loadu_ps(xp.add(16 * h));
                let sw = _mm512_shuffle_f32x4::<0b01_00_11_10>(v, v);
                let r = _mm512_fmadd_ps(sw, s, _mm512_mul_ps(v, c));
                _mm512_storeu_ps(op.add(16 * h), r);
            }
            return;
        }
        for h in 0..heads {
            let (x1, o1) = (xp.add(2 * half * h), op.add(2 * half * h));
            let (x2, o2) = (x1.add(half), o1.add(half));
            for i in (0..half).step_by(16) {
                let (a, b) = (_mm512_loadu_ps(x1.add(i)), _mm512_loadu_ps(x2.add(i)));
                let c = _mm512_loadu_ps(cos.as_ptr().add(i));
                let mut s = _mm512_loadu_ps(sin.as_ptr().add(i));
                if inverse {
                    s = _mm512_sub_ps(_mm512_setzero_ps(), s);
                }
                _mm512_storeu_ps(o1.add(i), _mm512_fnmadd_ps(b, s, _mm512_mul_ps(a, c)));
                _mm512_storeu_ps(o2.add(i), _mm512_fmadd_ps(a, s, _mm512_mul_ps(b, c)));
            }
        }
    }
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
