//! Causal grouped-query attention on `[batch, seq, heads, head_dim]` tensors.
//!
//! f32 at head dims 16/32/64 on CPUs with AVX-512 runs the fused kernels of
//! `attention_x86.rs`. This file is the general path (f64 gradient checks, other head dims,
//! other CPUs) and the reference those kernels are tested against.
//!
//! Forward: one task per (batch, head). It copies its kv head's k (transposed) and v into
//! contiguous scratch (their rows are H_kv·d elements apart in the input, too far for the
//! prefetchers), then walks tiles of `tile_rows(seq)` query rows (32 up to seq 512, else 64):
//! the tile's scores against the keys it may see (0..=last row of the tile) go into a
//! `QTILE × seq` scratch block, the exponentials are taken per row, the output is a second
//! product, and each output row is divided by its row sum. No `[seq, seq]` matrix per head and
//! nothing of size B·H·S·S ever exists. q, out and dout are read and written in place.
//!
//! Backward: the probabilities are recomputed from the saved log-sum-exp. One task owns one
//! (batch, kv head): it walks that kv head's query heads and tiles in a fixed order, so the dK
//! and dV sums are formed in the same order on every run and every thread count.
//!
//! Products use the narrow register-blocked kernel (`matmul_narrow`, f32 with AVX2 or better,
//! head dims 16/32/64, or 32-key column blocks for the scores) and the gemm crate otherwise.

use super::float::CausalTile;
use super::gemm::{matmul, Mat};
use super::{
    check_dtype, load, overlaps, shape_err, store, view, view_mut, with_scratch, Float, SendPtr,
    FLOATS,
};
use crate::backend::{AttnBwd, AttnFwd, AttnShape, Buf};
use crate::error::Result;
use crate::tensor::DType;
use gemm::Parallelism;
use rayon::prelude::*;

/// Query rows per tile at most (scratch is sized for this).
pub const QTILE: usize = 64;

/// Query rows per tile for a sequence length: the diagonal tile computes scores that the causal
/// mask then discards (half of a square tile), so short sequences use shorter tiles; long ones
/// amortise the per-tile calls over more rows (measured best at 32 and 64 rows).
fn tile_rows(seq: usize) -> usize {
    if seq <= 512 {
        QTILE / 2
    } else {
        QTILE
    }
}

fn check_shape(op: &'static str, s: AttnShape, lens: &[(&str, usize)]) -> Result<()> {
    if s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
        return Err(shape_err(
            op,
            format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                s.n_heads, s.n_kv_heads
            ),
        ));
    }
    for (what, have) in lens {
        let want = match *what {
            "k" | "v" | "dk" | "dv" => s.kv_len(),
            "lse" => s.lse_len(),
            _ => s.q_len(),
        };
        if *have != want {
            return Err(shape_err(
                op,
                format!("{what} has {have} elements, expected {want} for {s:?}"),
            ));
        }
    }
    Ok(())
}

/// Element offsets of row `t` of head `h` in a q-like and of kv head `hk` in a kv-like tensor.
#[derive(Clone, Copy)]
pub(super) struct Layout {
    pub(super) s: AttnShape,
}

impl Layout {
    pub(super) fn q_row_stride(&self) -> usize {
        self.s.n_heads * self.s.head_dim
    }
    pub(super) fn kv_row_stride(&self) -> usize {
        self.s.n_kv_heads * self.s.head_dim
    }
    pub(super) fn q_off(&self, b: usize, t: usize, h: usize) -> usize {
        ((b * self.s.seq + t) * self.s.n_heads + h) * self.s.head_dim
    }
    pub(super) fn kv_off(&self, b: usize, t: usize, hk: usize) -> usize {
        ((b * self.s.seq + t) * self.s.n_kv_heads + hk) * self.s.head_dim
    }
    pub(super) fn lse_off(&self, b: usize, h: usize, t: usize) -> usize {
        (b * self.s.n_heads + h) * self.s.seq + t
    }
}

/// out = softmax(scale · q kᵀ, causal) v; lse[b, h, t] = log Σ_j exp(scale · q_t · k_j).
pub fn attention_fwd<T: Float>(
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    lse: &mut [T],
    s: AttnShape,
    scale: T,
) -> Result<()> {
    let lens = [
        ("q", q.len()),
        ("k", k.len()),
        ("v", v.len()),
        ("out", out.len()),
        ("lse", lse.len()),
    ];
    check_shape("attention_fwd", s, &lens)?;
    let (seq, d) = (s.seq, s.head_dim);
    if s.q_len() == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(f32s) = as_f32(&[q, k, v]) {
        if super::attention_x86::fwd(
            f32s,
            as_f32_mut(out),
            as_f32_mut(lse),
            s,
            scale.to_f64() as f32,
        ) {
            return Ok(());
        }
    }
    let lay = Layout { s };
    let group = s.n_heads / s.n_kv_heads;
    let tr = tile_rows(seq);
    let tiles = seq.div_ceil(tr);
    let (qs, ks) = (lay.q_row_stride(), lay.kv_row_stride());
    let (pq, pk, pv) = (ptr(q), ptr(k), ptr(v));
    let (po, pl) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    // One task per (batch, head): it copies its kv head's k (transposed, for the score
    // product) and v into contiguous scratch once (the strided rows are 1 KB+ apart, which
    // defeats the prefetchers), then walks the query tiles.
    let sp = row_stride(seq);
    (0..s.batch * s.n_heads).into_par_iter().for_each(|bh| {
        with_scratch(FwdScratch::<T>::len(seq, d), |buf| {
            let w = FwdScratch::split(buf, seq, d);
            let (b, h) = (bh / s.n_heads, bh % s.n_heads);
            let hk = h / group;
            // SAFETY: offsets come from the checked shape; this task alone writes the out rows
            // of head h of batch b and the matching lse entries.
            unsafe {
                gather_t(pk.get().add(lay.kv_off(b, 0, hk)), ks, seq, d, w.kt);
                gather(pv.get().add(lay.kv_off(b, 0, hk)), ks, seq, d, w.v);
                let vm = Mat::rows(w.v.as_ptr(), d);
                for t in 0..tiles {
                    let (q0, q1) = (t * tr, ((t + 1) * tr).min(seq));
                    let (rows, keys) = (q1 - q0, q1);
                    let qt = Mat::rows(pq.get().add(lay.q_off(b, q0, h)), qs);
                    let sc = w.s.as_mut_ptr();
                    scores(
                        (rows, padded(keys), d),
                        sc,
                        sp,
                        qt,
                        w.kt.as_ptr(),
                        sp,
                        scale,
                    );
                    let lse_t = pl.get().add(lay.lse_off(b, h, q0));
                    // Unnormalised exponentials; each output row is divided by its sum after
                    // the product (rows·d divisions instead of rows·keys).
                    let mut inv = [T::ZERO; QTILE];
                    let mut lse_r = [T::ZERO; QTILE];
                    let tile = CausalTile {
                        ld: sp,
                        rows,
                        first: q0 + 1,
                        keys,
                    };
                    let st = std::slice::from_raw_parts_mut(sc, rows * sp);
                    T::softmax_fwd_tile(st, tile, &mut lse_r, &mut inv);
                    std::ptr::copy_nonoverlapping(lse_r.as_ptr(), lse_t, rows);
                    let om = Mat::rows(po.get().add(lay.q_off(b, q0, h)), qs);
                    matmul_d((rows, d, keys), om, Mat::rows(sc, sp), vm, T::ONE, T::ZERO);
                    for (i, &r) in inv[..rows].iter().enumerate() {
                        let o = std::slice::from_raw_parts_mut(om.ptr.add(i * qs), d);
                        o.iter_mut().for_each(|x| *x = *x * r);
                    }
                }
            }
        })
    });
    Ok(())
}

/// The head_dim-wide products (out = p·v, dq = ds·k, dk += dsᵀ·q, dv += pᵀ·dout): a narrow
/// register-blocked kernel where one exists (f32, d in {16, 32, 64}), else the gemm crate.
/// SAFETY (caller): as `matmul`.
#[inline]
unsafe fn matmul_d<T: Float>(
    mnk: (usize, usize, usize),
    dst: Mat<T>,
    lhs: Mat<T>,
    rhs: Mat<T>,
    alpha: T,
    beta: T,
) {
    if dst.cs == 1 && rhs.cs == 1 && T::matmul_narrow(mnk, dst, lhs, rhs, alpha, beta) {
        return;
    }
    matmul(mnk, dst, lhs, rhs, alpha, beta, Parallelism::None)
}

/// A task's buffers in the forward: one score tile and contiguous copies of k and v, carved
/// out of the thread's reusable scratch.
struct FwdScratch<'a, T> {
    s: &'a mut [T],
    kt: &'a mut [T],
    v: &'a mut [T],
}

impl<'a, T: Float> FwdScratch<'a, T> {
    fn len(seq: usize, d: usize) -> usize {
        (QTILE.min(seq) + d) * row_stride(seq) + seq * d
    }
    fn split(buf: &'a mut [T], seq: usize, d: usize) -> Self {
        let (s, rest) = buf.split_at_mut(QTILE.min(seq) * row_stride(seq));
        let (kt, v) = rest.split_at_mut(d * row_stride(seq));
        FwdScratch { s, kt, v }
    }
}

/// Copies `rows` rows of `d` elements, `ld` apart, into contiguous `dst`.
/// SAFETY (caller): src addresses rows·ld elements (the last row needs only d).
pub(super) unsafe fn gather<T: Float>(
    src: *const T,
    ld: usize,
    rows: usize,
    d: usize,
    dst: &mut [T],
) {
    for (j, r) in dst[..rows * d].chunks_exact_mut(d).enumerate() {
        r.copy_from_slice(std::slice::from_raw_parts(src.add(j * ld), d));
    }
}

/// Copies `rows` rows of `d` elements, `ld` apart, transposed into `dst` = [d, padded(rows)]
/// (key j of feature c at c·padded(rows) + j); the padding columns are zeroed.
/// SAFETY (caller): as `gather`.
pub(super) unsafe fn gather_t<T: Float>(
    src: *const T,
    ld: usize,
    rows: usize,
    d: usize,
    dst: &mut [T],
) {
    let sp = row_stride(rows);
    let dst = &mut dst[..d * sp];
    // Row by row: each source row is read once, contiguously; the d destination rows are
    // written in step (d streams, all within L1 for the head dims used).
    for j in 0..rows {
        let r = std::slice::from_raw_parts(src.add(j * ld), d);
        for (c, &x) in r.iter().enumerate() {
            dst[c * sp + j] = x;
        }
    }
    for col in dst.chunks_exact_mut(sp) {
        col[rows..].fill(T::ZERO);
    }
}

/// Key counts are rounded up to whole 16-lane vectors for the score products.
pub(super) fn padded(keys: usize) -> usize {
    keys.next_multiple_of(16)
}

/// Row stride of the key-major scratch (kᵀ, vᵀ, score tiles) for `seq` keys: the padded length
/// plus one cache line, so that the rows of a tile do not all fall into one cache set when seq
/// is a power of two (a 2048-key stride is 8 KB; the L1 has 12 ways).
pub(super) fn row_stride(seq: usize) -> usize {
    padded(seq) + 16
}

/// dst[i, j] = alpha · Σ_c a(i, c) · bt[c, j] for i < rows, j < n (a multiple of 16): the
/// score-like products q·kᵀ and dout·vᵀ, with kᵀ / vᵀ stored transposed so that the keys are
/// the vector lanes. The head_dim-long sums are far too short for the general GEMM's packing to
/// pay off, so the narrow kernel runs over 32- (then 16-) key column blocks instead.
/// SAFETY (caller): dst rows are `ld` apart and hold n elements; bt rows are `bt_ld` apart.
unsafe fn scores<T: Float>(
    (rows, n, d): (usize, usize, usize),
    dst: *mut T,
    ld: usize,
    a: Mat<T>,
    bt: *const T,
    bt_ld: usize,
    alpha: T,
) {
    let mut j = 0;
    while j < n {
        let w = if n - j >= 32 { 32 } else { 16 };
        let (c, b) = (Mat::rows(dst.add(j), ld), Mat::rows(bt.add(j), bt_ld));
        if !T::matmul_narrow((rows, w, d), c, a, b, alpha, T::ZERO) {
            // No narrow kernel (f64 gradient checks, CPUs without AVX2): one general product.
            matmul((rows, n - j, d), c, a, b, alpha, T::ZERO, Parallelism::None);
            return;
        }
        j += w;
    }
}

/// The slices as f32 when T is f32 (the AVX-512 path serves f32 only).
fn as_f32<'a, T: Float, const N: usize>(xs: &[&'a [T]; N]) -> Option<[&'a [f32]; N]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| xs.map(|x| bytemuck::cast_slice::<T, f32>(x)))
}

/// A mutable slice as f32; only called after `as_f32` established T = f32.
fn as_f32_mut<T: Float>(x: &mut [T]) -> &mut [f32] {
    bytemuck::cast_slice_mut::<T, f32>(x)
}

pub(super) fn ptr<T>(x: &[T]) -> SendPtr<T> {
    SendPtr(x.as_ptr() as *mut T)
}

/// The tensors of an attention backward (the slice form of [`AttnBwd`]'s buffers): the
/// forward's q, k, v, out and lse, the incoming dout, and the gradients dq, dk, dv.
#[derive(Debug)]
pub struct AttnBwdSlices<'a, T> {
    /// `[batch, seq, n_heads, head_dim]`.
    pub q: &'a [T],
    /// `[batch, seq, n_kv_heads, head_dim]`.
    pub k: &'a [T],
    /// Like k.
    pub v: &'a [T],
    /// The forward's output, like q.
    pub out: &'a [T],
    /// dL/dout, like q.
    pub dout: &'a [T],
    /// `[batch, n_heads, seq]`, saved by the forward.
    pub lse: &'a [T],
    /// dL/dq, like q, written.
    pub dq: &'a mut [T],
    /// dL/dk, like k, written.
    pub dk: &'a mut [T],
    /// dL/dv, like k, written.
    pub dv: &'a mut [T],
}

/// Gradients of `attention_fwd`: dq, dk, dv are written (not accumulated).
pub fn attention_bwd<T: Float>(t: AttnBwdSlices<'_, T>, s: AttnShape, scale: T) -> Result<()> {
    let AttnBwdSlices {
        q,
        k,
        v,
        out,
        dout,
        lse,
        dq,
        dk,
        dv,
    } = t;
    let lens = [
        ("q", q.len()),
        ("k", k.len()),
        ("v", v.len()),
        ("out", out.len()),
        ("dout", dout.len()),
        ("lse", lse.len()),
        ("dq", dq.len()),
        ("dk", dk.len()),
        ("dv", dv.len()),
    ];
    check_shape("attention_bwd", s, &lens)?;
    let (seq, d) = (s.seq, s.head_dim);
    if s.q_len() == 0 {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(f32s) = as_f32(&[q, k, v, out, dout, lse]) {
        let outs = [as_f32_mut(dq), as_f32_mut(dk), as_f32_mut(dv)];
        if super::attention_x86::bwd(f32s, outs, s, scale.to_f64() as f32) {
            return Ok(());
        }
    }
    let lay = Layout { s };
    let group = s.n_heads / s.n_kv_heads;
    let sp = row_stride(seq);
    let tr = tile_rows(seq);
    let tiles = seq.div_ceil(tr);
    let (qs, ks) = (lay.q_row_stride(), lay.kv_row_stride());
    let (pq, pk, pv, pdo) = (ptr(q), ptr(k), ptr(v), ptr(dout));
    let (pdq, pdk, pdv) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    (0..s.batch * s.n_kv_heads)
        .into_par_iter()
        .for_each(|task| {
            with_scratch(Scratch::<T>::len(seq, d), |buf| {
                let w = Scratch::split(buf, seq, d);
                let (b, hk) = (task / s.n_kv_heads, task % s.n_kv_heads);
                w.dk.fill(T::ZERO);
                w.dv.fill(T::ZERO);
                let (dka, dva) = (
                    Mat::rows(w.dk.as_mut_ptr(), d),
                    Mat::rows(w.dv.as_mut_ptr(), d),
                );
                // SAFETY: offsets come from the checked shape. This task alone writes dq for the
                // query heads of kv head hk in batch b, and dk/dv of (b, hk).
                unsafe {
                    let base = lay.kv_off(b, 0, hk);
                    gather(pk.get().add(base), ks, seq, d, w.k);
                    gather_t(pk.get().add(base), ks, seq, d, w.kt);
                    gather_t(pv.get().add(base), ks, seq, d, w.vt);
                    let kb = w.k.as_ptr();
                    for h in hk * group..(hk + 1) * group {
                        for t in 0..tiles {
                            let (q0, q1) = (t * tr, ((t + 1) * tr).min(seq));
                            let (rows, keys) = (q1 - q0, q1);
                            let qt = Mat::rows(pq.get().add(lay.q_off(b, q0, h)), qs);
                            let dot = Mat::rows(pdo.get().add(lay.q_off(b, q0, h)), qs);
                            let (pp, dpp) = (w.p.as_mut_ptr(), w.dp.as_mut_ptr());
                            let mnk = (rows, padded(keys), d);
                            // p = exp(scale · q kᵀ − lse): the forward's probabilities, recomputed.
                            scores(mnk, pp, sp, qt, w.kt.as_ptr(), sp, scale);
                            // dp = dout · vᵀ
                            scores(mnk, dpp, sp, dot, w.vt.as_ptr(), sp, T::ONE);
                            let (mut lse_r, mut delta) = ([T::ZERO; QTILE], [T::ZERO; QTILE]);
                            for i in 0..rows {
                                let o = lay.q_off(b, q0 + i, h);
                                delta[i] = T::dot(&dout[o..o + d], &out[o..o + d]);
                                lse_r[i] = lse[lay.lse_off(b, h, q0 + i)];
                            }
                            let tile = CausalTile {
                                ld: sp,
                                rows,
                                first: q0 + 1,
                                keys,
                            };
                            let (pt, dpt) = (
                                std::slice::from_raw_parts_mut(pp, rows * sp),
                                std::slice::from_raw_parts_mut(dpp, rows * sp),
                            );
                            T::softmax_bwd_tile(pt, dpt, tile, &lse_r, &delta, scale);
                            let dpm = Mat::rows(dpp, sp);
                            // dq = ds · k
                            let dqm = Mat::rows(pdq.get().add(lay.q_off(b, q0, h)), qs);
                            matmul_d((rows, d, keys), dqm, dpm, Mat::rows(kb, d), T::ONE, T::ZERO);
                            // dk += dsᵀ · q, dv += pᵀ · dout
                            let (dst, pt) = (Mat::cols(dpp, sp), Mat::cols(pp, sp));
                            matmul_d((keys, d, rows), dka, dst, qt, T::ONE, T::ONE);
                            matmul_d((keys, d, rows), dva, pt, dot, T::ONE, T::ONE);
                        }
                    }
                    for j in 0..seq {
                        let o = lay.kv_off(b, j, hk);
                        std::ptr::copy_nonoverlapping(
                            w.dk.as_ptr().add(j * d),
                            pdk.get().add(o),
                            d,
                        );
                        std::ptr::copy_nonoverlapping(
                            w.dv.as_ptr().add(j * d),
                            pdv.get().add(o),
                            d,
                        );
                    }
                }
            })
        });
    Ok(())
}

/// A task's buffers in the backward: contiguous k and v, the probability and gradient tiles,
/// and the dk / dv accumulators.
struct Scratch<'a, T> {
    k: &'a mut [T],
    kt: &'a mut [T],
    vt: &'a mut [T],
    p: &'a mut [T],
    dp: &'a mut [T],
    dk: &'a mut [T],
    dv: &'a mut [T],
}

impl<'a, T: Float> Scratch<'a, T> {
    fn len(seq: usize, d: usize) -> usize {
        2 * (QTILE.min(seq) + d) * row_stride(seq) + 3 * seq * d
    }
    fn split(buf: &'a mut [T], seq: usize, d: usize) -> Self {
        let (tile, sp) = (QTILE.min(seq) * row_stride(seq), row_stride(seq));
        let (p, rest) = buf.split_at_mut(tile);
        let (dp, rest) = rest.split_at_mut(tile);
        let (kt, rest) = rest.split_at_mut(d * sp);
        let (vt, rest) = rest.split_at_mut(d * sp);
        let (k, rest) = rest.split_at_mut(seq * d);
        let (dk, dv) = rest.split_at_mut(seq * d);
        Scratch {
            k,
            kt,
            vt,
            p,
            dp,
            dk,
            dv,
        }
    }
}

fn check_bufs(op: &'static str, outs: &[(&str, Buf)], ins: &[(&str, Buf)]) -> Result<()> {
    for (what, b) in outs.iter().chain(ins) {
        let allowed: &[DType] = if *what == "lse" {
            &[DType::F32]
        } else {
            FLOATS
        };
        check_dtype(op, what, *b, allowed)?;
    }
    for (i, (no, o)) in outs.iter().enumerate() {
        for (ni, x) in ins.iter().chain(&outs[i + 1..]) {
            if overlaps(*o, *x) {
                return Err(shape_err(op, format!("output {no} overlaps {ni}")));
            }
        }
    }
    Ok(())
}

pub(super) fn attention_fwd_op(a: &AttnFwd) -> Result<()> {
    const OP: &str = "attention_fwd";
    let AttnFwd {
        q,
        k,
        v,
        out,
        lse,
        shape: s,
        scale,
    } = *a;
    check_bufs(
        OP,
        &[("out", out), ("lse", lse)],
        &[("q", q), ("k", k), ("v", v)],
    )?;
    check_shape(
        OP,
        s,
        &[
            ("q", q.len),
            ("k", k.len),
            ("v", v.len),
            ("out", out.len),
            ("lse", lse.len),
        ],
    )?;
    // SAFETY: live buffers of checked dtypes and lengths; outputs overlap nothing.
    unsafe {
        let (qf, kf, vf) = (load(OP, "q", q)?, load(OP, "k", k)?, load(OP, "v", v)?);
        let l = view_mut::<f32>(lse);
        store(OP, "out", out, false, |o| {
            attention_fwd(&qf, &kf, &vf, o, l, s, scale)
        })?
    }
}

pub(super) fn attention_bwd_op(a: &AttnBwd) -> Result<()> {
    const OP: &str = "attention_bwd";
    let AttnBwd {
        q,
        k,
        v,
        out,
        dout,
        lse,
        dq,
        dk,
        dv,
        shape: s,
        scale,
    } = *a;
    let ins = [
        ("q", q),
        ("k", k),
        ("v", v),
        ("out", out),
        ("dout", dout),
        ("lse", lse),
    ];
    check_bufs(OP, &[("dq", dq), ("dk", dk), ("dv", dv)], &ins)?;
    let lens = [
        ("q", q.len),
        ("k", k.len),
        ("v", v.len),
        ("out", out.len),
        ("dout", dout.len),
        ("lse", lse.len),
        ("dq", dq.len),
        ("dk", dk.len),
        ("dv", dv.len),
    ];
    check_shape(OP, s, &lens)?;
    // SAFETY: live buffers of checked dtypes and lengths; outputs overlap nothing.
    unsafe {
        let (qf, kf, vf) = (load(OP, "q", q)?, load(OP, "k", k)?, load(OP, "v", v)?);
        let (of, gf, l) = (
            load(OP, "out", out)?,
            load(OP, "dout", dout)?,
            view::<f32>(lse),
        );
        store(OP, "dq", dq, false, |dqf| {
            store(OP, "dk", dk, false, |dkf| {
                store(OP, "dv", dv, false, |dvf| {
                    let t = AttnBwdSlices {
                        q: &qf,
                        k: &kf,
                        v: &vf,
                        out: &of,
                        dout: &gf,
                        lse: l,
                        dq: dqf,
                        dk: dkf,
                        dv: dvf,
                    };
                    attention_bwd(t, s, scale)
                })
            })
        })???
    }
}
