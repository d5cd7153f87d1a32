//! The scalar type of the CPU kernels. Every kernel is generic over it so that the gradient
//! checks can run the very code the backend runs in f32 in f64 instead.

use super::gemm::Mat;
use super::rmsnorm::RmsNormBwdSlices;
use super::vecmath;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub, SubAssign};

/// A tile of causal attention score rows: row i starts at i·ld, sees keys 0..first + i and has
/// `keys` columns that later products read (the buffer's rows hold at least `keys` rounded up
/// to 16). Rows are processed up to whole 16-lane vectors with the masked lanes of the last
/// one set to -inf, whose exponential is exactly 0: a scalar tail per row costs more than the
/// vector body at attention's row lengths.
#[derive(Clone, Copy, Debug)]
pub struct CausalTile {
    pub ld: usize,
    pub rows: usize,
    pub first: usize,
    pub keys: usize,
}

impl CausalTile {
    /// Row i as (its visible keys rounded up to a vector, the masked lanes set to `mask`; the
    /// rest up to `keys`, for the caller to zero).
    #[inline(always)]
    pub fn split_row<'a, T: Float>(
        &self,
        buf: &'a mut [T],
        i: usize,
        mask: T,
    ) -> (&'a mut [T], &'a mut [T]) {
        let valid = self.first + i;
        let vp = valid.next_multiple_of(16);
        let end = vp.max(self.keys);
        let (live, tail) = buf[i * self.ld..i * self.ld + end].split_at_mut(vp);
        live[valid..].fill(mask);
        (live, tail)
    }
}

/// The scalar type of the math kernels: f32 in the backend, f64 in gradient checks.
pub trait Float:
    bytemuck::Pod
    + Copy
    + Send
    + Sync
    + Default
    + PartialOrd
    + std::fmt::Debug
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn max(self, o: Self) -> Self;
    /// xs[i] = exp(xs[i]). f32 overrides this and the row reductions below with vectorised
    /// versions (`vecmath`): softmax rows dominate attention and the loss on the CPU.
    fn exp_inplace(xs: &mut [Self]) {
        for x in xs {
            *x = x.exp();
        }
    }
    /// The largest element (−inf when empty).
    fn max_slice(xs: &[Self]) -> Self {
        xs.iter()
            .fold(Self::NEG_INFINITY, |m, &x| if x > m { x } else { m })
    }
    /// xs[i] = exp(xs[i] − m), returning Σ xs[i]: the core of every softmax.
    fn exp_sub_sum(xs: &mut [Self], m: Self) -> Self {
        let mut s = Self::ZERO;
        for x in xs {
            *x = (*x - m).exp();
            s += *x;
        }
        s
    }
    /// xs[i] *= k.
    fn scale_slice(xs: &mut [Self], k: Self) {
        for x in xs {
            *x = *x * k;
        }
    }
    /// out = silu(g)·u with silu(g) = g·σ(g), σ(g) = 1 / (1 + exp(−g)).
    fn swiglu_fwd_block(g: &[Self], u: &[Self], out: &mut [Self]) {
        swiglu_fwd_rows(g, u, out, Self::exp)
    }
    /// du = d·silu(g), dg = d·u·σ(g)·(1 + g·(1 − σ(g))).
    fn swiglu_bwd_block(d: &[Self], g: &[Self], u: &[Self], dg: &mut [Self], du: &mut [Self]) {
        swiglu_bwd_rows(d, g, u, dg, du, Self::exp)
    }
    /// RMSNorm forward of whole rows (`rstd.len()` rows of `w.len()`): out = x·rstd·w with
    /// rstd = 1/sqrt(mean(x²) + eps), rstd saved.
    fn rmsnorm_fwd_block(x: &[Self], w: &[Self], out: &mut [Self], rstd: &mut [Self], eps: Self) {
        rmsnorm_fwd_rows(x, w, out, rstd, eps)
    }
    /// RMSNorm backward of whole rows (`t.rstd.len()` rows of `t.w.len()`): dx =
    /// rstd·(g·w − x̂·mean(g·w·x̂)) (+ dres) with g = t.dout and x̂ = x·rstd, and t.dw (this
    /// block's partial dw) += Σ_rows g·x̂.
    fn rmsnorm_bwd_block(t: RmsNormBwdSlices<'_, Self>) {
        let RmsNormBwdSlices {
            dout,
            x,
            w,
            rstd,
            dres,
            dx,
            dw,
        } = t;
        rmsnorm_bwd_rows(dout, x, w, rstd, dres, dx, dw)
    }
    /// One token's heads rotated by one position's angles (cos/sin hold head_dim/2 entries):
    /// the halves (x1, x2) of each head become (x1·c − x2·s, x2·c + x1·s); `inverse` negates s.
    fn rope_row(x: &[Self], out: &mut [Self], cos: &[Self], sin: &[Self], inverse: bool) {
        rope_row(x, out, cos, sin, inverse)
    }
    /// Causal softmax of a tile of attention score rows, in place (see [`CausalTile`]): row i
    /// becomes exp(s − max) over its visible keys and 0 after them; lse[i] = max + ln Σ and
    /// inv[i] = 1 / Σ. f32 runs the whole tile in one vectorised call (`vecmath`).
    fn softmax_fwd_tile(s: &mut [Self], t: CausalTile, lse: &mut [Self], inv: &mut [Self]) {
        for i in 0..t.rows {
            let (row, tail) = t.split_row(s, i, Self::NEG_INFINITY);
            let m = Self::max_slice(row);
            let sum = Self::exp_sub_sum(row, m);
            tail.fill(Self::ZERO);
            lse[i] = m + sum.ln();
            inv[i] = Self::ONE / sum;
        }
    }
    /// The softmax backward of a tile, fused: p = exp(s − lse[i]) (s given in `p`) and
    /// ds = p·(dp − delta[i])·scale (dp given in `ds`), both 0 after each row's visible keys.
    fn softmax_bwd_tile(
        p: &mut [Self],
        ds: &mut [Self],
        t: CausalTile,
        lse: &[Self],
        delta: &[Self],
        scale: Self,
    ) {
        softmax_bwd_rows(p, ds, t, lse, delta, scale, Self::exp)
    }
    /// c[m, n] = beta·c + alpha · a · b through a kernel for narrow n (attention's head_dim
    /// wide products), see `vecmath::matmul_narrow_f32`; returns false when there is none and
    /// the caller should use the general GEMM.
    ///
    /// # Safety
    /// As `vecmath::matmul_narrow_f32`.
    unsafe fn matmul_narrow(
        _mnk: (usize, usize, usize),
        _c: Mat<Self>,
        _a: Mat<Self>,
        _b: Mat<Self>,
        _alpha: Self,
        _beta: Self,
    ) -> bool {
        false
    }
    fn dot(a: &[Self], b: &[Self]) -> Self {
        let mut s = Self::ZERO;
        for (&x, &y) in a.iter().zip(b) {
            s += x * y;
        }
        s
    }
}

/// The row formulas behind the trait's softmax backward, swiglu and rope methods, written once:
/// the generic defaults pass `Float::exp`, `vecmath`'s f32 versions their vectorisable exp and
/// are compiled per instruction set (hence `inline(always)`; the disassembly shows that exp
/// inlined and vectorised there, as before the sharing).
#[inline(always)]
pub(super) fn softmax_bwd_rows<T: Float>(
    p: &mut [T],
    ds: &mut [T],
    t: CausalTile,
    lse: &[T],
    delta: &[T],
    scale: T,
    exp: impl Fn(T) -> T,
) {
    for i in 0..t.rows {
        let ((pr, pt), (gr, gt)) = (
            t.split_row(p, i, T::NEG_INFINITY),
            t.split_row(ds, i, T::ZERO),
        );
        let (l, dl) = (lse[i], delta[i]);
        for (x, g) in pr.iter_mut().zip(gr.iter_mut()) {
            let e = exp(*x - l);
            *x = e;
            *g = e * (*g - dl) * scale;
        }
        pt.fill(T::ZERO);
        gt.fill(T::ZERO);
    }
}

/// See [`softmax_bwd_rows`].
#[inline(always)]
pub(super) fn swiglu_fwd_rows<T: Float>(g: &[T], u: &[T], out: &mut [T], exp: impl Fn(T) -> T) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        let s = T::ONE / (T::ONE + exp(-g));
        *o = g * s * u;
    }
}

/// See [`softmax_bwd_rows`].
#[inline(always)]
pub(super) fn swiglu_bwd_rows<T: Float>(
    d: &[T],
    g: &[T],
    u: &[T],
    dg: &mut [T],
    du: &mut [T],
    exp: impl Fn(T) -> T,
) {
    for (((dg, du), &d), (&g, &u)) in dg.iter_mut().zip(du.iter_mut()).zip(d).zip(g.iter().zip(u)) {
        let s = T::ONE / (T::ONE + exp(-g));
        *du = d * g * s;
        *dg = d * u * s * (T::ONE + g * (T::ONE - s));
    }
}

/// Σ a·b in 16 lanes (a fixed order; one running sum would be a long latency chain). Inlined,
/// not passed as a closure: a closure's body was compiled out of line for the baseline CPU.
#[inline(always)]
fn dot_lanes<T: Float>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::ZERO; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    for (l, (&x, &y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] = x * y;
    }
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut w = 8;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

/// See [`softmax_bwd_rows`].
#[inline(always)]
pub(super) fn rmsnorm_fwd_rows<T: Float>(x: &[T], w: &[T], out: &mut [T], rstd: &mut [T], eps: T) {
    let dim = w.len();
    let n = T::from_f64(dim as f64);
    for ((o, x), r) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)).zip(rstd) {
        let rs = T::ONE / (dot_lanes(x, x) / n + eps).sqrt();
        *r = rs;
        for ((o, &v), &w) in o.iter_mut().zip(x).zip(w) {
            *o = v * rs * w;
        }
    }
}

/// See [`softmax_bwd_rows`]; `pw` is the rows' partial dw. The slices arrive as separate
/// parameters (not in a `RmsNormBwdSlices`) on purpose, through `vecmath::rmsnorm_bwd_f32` too:
/// as parameters they are known not to alias each other, which slices loaded from a struct are
/// not (that version compiled to extra scalar code around the row loops).
#[inline(always)]
pub(super) fn rmsnorm_bwd_rows<T: Float>(
    g: &[T],
    x: &[T],
    w: &[T],
    rstd: &[T],
    dres: Option<&[T]>,
    dx: &mut [T],
    pw: &mut [T],
) {
    let dim = w.len();
    // g·w of the current row.
    let mut scratch = vec![T::ZERO; dim];
    let gw = &mut scratch[..];
    let n = T::from_f64(dim as f64);
    let rows = dx.chunks_exact_mut(dim).zip(g.chunks_exact(dim));
    for (i, ((dxr, g), (xr, &rs))) in rows.zip(x.chunks_exact(dim).zip(rstd)).enumerate() {
        for ((o, &g), &wv) in gw.iter_mut().zip(g).zip(w) {
            *o = g * wv;
        }
        let c = dot_lanes(gw, xr) * rs * rs / n;
        for (((d, &g), &xv), (&gw, p)) in dxr
            .iter_mut()
            .zip(g)
            .zip(xr)
            .zip(gw.iter().zip(pw.iter_mut()))
        {
            *d = rs * (gw - xv * c);
            *p += g * xv * rs;
        }
        if let Some(dr) = dres {
            for (d, &r) in dxr.iter_mut().zip(&dr[i * dim..(i + 1) * dim]) {
                *d += r;
            }
        }
    }
}

/// See [`softmax_bwd_rows`]; `inverse` negates the sines (the backward).
#[inline(always)]
pub(super) fn rope_row<T: Float>(x: &[T], out: &mut [T], cos: &[T], sin: &[T], inverse: bool) {
    let half = cos.len();
    let sign = if inverse { -T::ONE } else { T::ONE };
    for (o, x) in out.chunks_exact_mut(2 * half).zip(x.chunks_exact(2 * half)) {
        let (o1, o2) = o.split_at_mut(half);
        let (x1, x2) = x.split_at(half);
        for i in 0..half {
            let (a, b, c, s) = (x1[i], x2[i], cos[i], sign * sin[i]);
            o1[i] = a * c - b * s;
            o2[i] = b * c + a * s;
        }
    }
}

impl Float for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    const NEG_INFINITY: f64 = f64::NEG_INFINITY;
    fn from_f64(x: f64) -> f64 {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    fn ln(self) -> f64 {
        f64::ln(self)
    }
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
    fn max(self, o: f64) -> f64 {
        f64::max(self, o)
    }
}

impl Float for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    const NEG_INFINITY: f32 = f32::NEG_INFINITY;
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn exp(self) -> f32 {
        f32::exp(self)
    }
    fn ln(self) -> f32 {
        f32::ln(self)
    }
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
    fn max(self, o: f32) -> f32 {
        f32::max(self, o)
    }
    fn exp_inplace(xs: &mut [f32]) {
        vecmath::exp_f32_slice(xs)
    }
    fn max_slice(xs: &[f32]) -> f32 {
        vecmath::max_f32(xs)
    }
    fn exp_sub_sum(xs: &mut [f32], m: f32) -> f32 {
        vecmath::exp_sub_sum_f32(xs, m)
    }
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        vecmath::dot_f32(a, b)
    }
    fn scale_slice(xs: &mut [f32], k: f32) {
        vecmath::scale_f32(xs, k)
    }
    fn swiglu_fwd_block(g: &[f32], u: &[f32], out: &mut [f32]) {
        vecmath::swiglu_fwd_f32(g, u, out)
    }
    fn swiglu_bwd_block(d: &[f32], g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) {
        vecmath::swiglu_bwd_f32(d, g, u, dg, du)
    }
    fn rope_row(x: &[f32], out: &mut [f32], cos: &[f32], sin: &[f32], inverse: bool) {
        #[cfg(target_arch = "x86_64")]
        if super::rope::x86::supported(cos.len()) {
            // SAFETY: AVX-512F is present and the head size fits (`supported`).
            return unsafe { super::rope::x86::rope_row(x, out, cos, sin, inverse) };
        }
        vecmath::rope_row_f32(x, out, cos, sin, inverse)
    }
    fn rmsnorm_fwd_block(x: &[f32], w: &[f32], out: &mut [f32], rstd: &mut [f32], eps: f32) {
        vecmath::rmsnorm_fwd_f32(x, w, out, rstd, eps)
    }
    fn rmsnorm_bwd_block(t: RmsNormBwdSlices<'_, f32>) {
        let RmsNormBwdSlices {
            dout,
            x,
            w,
            rstd,
            dres,
            dx,
            dw,
        } = t;
        vecmath::rmsnorm_bwd_f32(dout, x, w, rstd, dres, dx, dw)
    }
    fn softmax_fwd_tile(s: &mut [f32], t: CausalTile, lse: &mut [f32], inv: &mut [f32]) {
        vecmath::softmax_fwd_tile_f32(s, t, lse, inv)
    }
    fn softmax_bwd_tile(
        p: &mut [f32],
        ds: &mut [f32],
        t: CausalTile,
        lse: &[f32],
        delta: &[f32],
        scale: f32,
    ) {
        vecmath::softmax_bwd_tile_f32(p, ds, t, lse, delta, scale)
    }
    unsafe fn matmul_narrow(
        mnk: (usize, usize, usize),
        c: Mat<f32>,
        a: Mat<f32>,
        b: Mat<f32>,
        alpha: f32,
        beta: f32,
    ) -> bool {
        vecmath::matmul_narrow_f32(mnk, c, a, b, alpha, beta)
    }
}
