//! AdamW (torch.optim.AdamW semantics: decoupled weight decay, bias-corrected moments) and the
//! gradient clipping coefficient.

use super::{
    check_dtype, check_len, f32_to_bf16_bits, overlaps, shape_err, view, view_mut, Float, CHUNK,
    FLOATS,
};
use crate::backend::{AdamW, AdamWBufs, Buf};
use crate::error::Result;
use crate::tensor::DType;
use half::bf16;
use rayon::prelude::*;

/// One AdamW update of `p` in place. `grad_scale` multiplies the gradient first (loss scaling /
/// clipping). Per element, in torch's order:
/// p *= 1 − lr·wd; m = β1 m + (1−β1) g; v = β2 v + (1−β2) g²;
/// p −= lr/(1−β1ᵗ) · m / (sqrt(v)/sqrt(1−β2ᵗ) + eps).
pub fn adamw<T: Float>(
    p: &mut [T],
    g: &[T],
    m: &mut [T],
    v: &mut [T],
    grad_scale: T,
    hp: &AdamW,
) -> Result<()> {
    let n = p.len();
    if g.len() != n || m.len() != n || v.len() != n {
        return Err(shape_err(
            "adamw",
            format!(
                "param {n}, grad {}, m {}, v {} differ",
                g.len(),
                m.len(),
                v.len()
            ),
        ));
    }
    if hp.step == 0 {
        return Err(shape_err(
            "adamw",
            "step must be >= 1 (bias correction)".into(),
        ));
    }
    let t = hp.step.min(i32::MAX as u64) as i32;
    let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
    let bc2 = 1.0 - (hp.beta2 as f64).powi(t);
    let f = T::from_f64;
    let (b1, b2, eps) = (f(hp.beta1 as f64), f(hp.beta2 as f64), f(hp.eps as f64));
    let decay = f(1.0 - hp.lr as f64 * hp.weight_decay as f64);
    let step_size = f(hp.lr as f64 / bc1);
    let inv_sqrt_bc2 = f(1.0 / bc2.sqrt());
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(c, ((p, m), v))| {
            let g = &g[c * CHUNK..c * CHUNK + p.len()];
            for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                let g = g * grad_scale;
                *p = *p * decay;
                *m = b1 * *m + (T::ONE - b1) * g;
                *v = b2 * *v + (T::ONE - b2) * g * g;
                *p -= step_size * *m / ((*v).sqrt() * inv_sqrt_bc2 + eps);
            }
        });
    Ok(())
}

pub(super) fn adamw_op(b: &AdamWBufs, hp: &AdamW) -> Result<()> {
    const OP: &str = "adamw";
    let AdamWBufs {
        param,
        grad,
        m,
        v,
        compute,
        grad_scale,
    } = *b;
    let named = [
        ("param", param),
        ("grad", grad),
        ("m", m),
        ("v", v),
        ("grad_scale", grad_scale),
    ];
    for (what, b) in named {
        check_dtype(OP, what, b, &[DType::F32])?;
    }
    for (what, b) in &named[1..4] {
        check_len(OP, what, *b, param.len)?;
    }
    check_len(OP, "grad_scale", grad_scale, 1)?;
    let mut all: Vec<(&str, Buf)> = named.to_vec();
    if let Some(c) = compute {
        check_dtype(OP, "compute", c, FLOATS)?;
        check_len(OP, "compute", c, param.len)?;
        all.push(("compute", c));
    }
    for (i, (na, a)) in all.iter().enumerate() {
        for (nb, b) in &all[i + 1..] {
            if overlaps(*a, *b) {
                return Err(shape_err(OP, format!("{na} overlaps {nb}")));
            }
        }
    }
    // SAFETY: live f32 buffers, pairwise disjoint (checked above).
    unsafe {
        let gs = view::<f32>(grad_scale)[0];
        let p = view_mut::<f32>(param);
        adamw(
            p,
            view::<f32>(grad),
            view_mut::<f32>(m),
            view_mut::<f32>(v),
            gs,
            hp,
        )?;
        match compute {
            Some(c) if c.dtype == DType::BF16 => view_mut::<bf16>(c)
                .par_chunks_mut(CHUNK)
                .zip(p.par_chunks(CHUNK))
                .for_each(|(c, p)| {
                    c.iter_mut()
                        .zip(p)
                        .for_each(|(c, &x)| *c = bf16::from_bits(f32_to_bf16_bits(x)))
                }),
            Some(c) => view_mut::<f32>(c).copy_from_slice(p),
            None => {}
        }
    }
    Ok(())
}

/// coef = min(1, max_norm / (sqrt(norm_sq) + 1e-6)); a NaN norm gives NaN (as torch's clamp
/// does), so a diverged step is visible instead of silently unclipped.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub fn clip_coef<T: Float>(norm_sq: T, max_norm: T) -> T {
    let c = max_norm / (norm_sq.sqrt() + T::from_f64(1e-6));
    if !(c >= T::ONE) {
        c
    } else {
        T::ONE
    }
}

pub(super) fn clip_coef_op(norm_sq: Buf, max_norm: f32, coef: Buf) -> Result<()> {
    const OP: &str = "clip_coef";
    check_dtype(OP, "norm_sq", norm_sq, &[DType::F32])?;
    check_dtype(OP, "coef", coef, &[DType::F32])?;
    check_len(OP, "norm_sq", norm_sq, 1)?;
    check_len(OP, "coef", coef, 1)?;
    // SAFETY: one-element live f32 buffers; reading before writing makes aliasing harmless.
    unsafe {
        let n = *(norm_sq.ptr as *const f32);
        *(coef.ptr as *mut f32) = clip_coef(n, max_norm);
    }
    Ok(())
}
