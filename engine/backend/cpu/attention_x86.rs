//! Causal attention for one head in f32 on AVX-512, for head dims 16·DC (DC = 1, 2, 4): the
//! fast path of `attention.rs` (whose generic tile code remains the reference for f64, other
//! head dims and CPUs without AVX-512).
//!
//! Work goes in blocks of `R` query rows. Per block: (A) the scores against every key the block
//! can see, 16 keys per vector, the query rows pre-scaled by scale·log2(e) so that the softmax
//! is a base-2 exponential, masked keys set to -inf, into an `R × keys` scratch (L1/L2 sized);
//! (B) the exponentials in place, with row sums; (C) the products with v (forward) or the five
//! products of the backward, each reading the block's scratch rows with broadcasts. Per block
//! and 16 keys the forward does d FMAs for the scores, d for p·v and ~12 vector ops for the
//! exponential; no `[seq, seq]` matrix exists. Memory traffic: q and out once; k and v (copied
//! once per task into the key-chunked layout, see [`chunked`]) re-read from cache per block.
//!
//! The backward accumulates dk and dv (key-chunked) into per-kv-head buffers, 16 query rows at a
//! time, in a fixed order (blocks, then rows), so results do not depend on the thread count.

// Register-blocked kernels index several arrays with one row / chunk counter.
#![allow(clippy::needless_range_loop)]

use super::attention::{gather, ptr, row_stride, Layout};
use super::{with_scratch, SendPtr};
use crate::backend::AttnShape;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Query rows per block of the score phases.
pub const R: usize = 8;
/// Query rows per block of the backward's dk / dv accumulation (two score blocks).
const R2: usize = 2 * R;
/// The largest head dim served here.
pub const MAX_D: usize = 64;

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2: f32 = std::f32::consts::LN_2;

/// Whether this CPU and head dim take the AVX-512 path.
pub fn supported(d: usize) -> bool {
    matches!(d, 16 | 32 | 64) && std::arch::is_x86_feature_detected!("avx512f")
}

/// 2^x lane-wise; x below -126 (masked scores are -inf) gives exactly 0, NaN stays NaN.
/// x = n + f with n = round(x), |f| <= 1/2; 2^f = e^(f·ln2) by its degree-6 Taylor polynomial
/// (relative error < 2e-7); the power of two through `vscalefps`.
#[inline(always)]
unsafe fn exp2(x: __m512) -> __m512 {
    const C: [f32; 7] = [
        1.0,
        LN2,
        0.240_226_5,     // ln2^2 / 2
        0.055_504_11,    // ln2^3 / 6
        0.009_618_129,   // ln2^4 / 24
        0.001_333_355_8, // ln2^5 / 120
        0.000_154_035_3, // ln2^6 / 720
    ];
    let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(-126.0));
    // max(c, x) returns x when x is NaN, so NaN propagates.
    let x = _mm512_max_ps(_mm512_set1_ps(-126.0), x);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm512_sub_ps(x, n);
    let mut p = _mm512_set1_ps(C[6]);
    for &c in C[..6].iter().rev() {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_maskz_scalef_ps(keep, p, n)
}

/// The operands of phase A for one block of R query rows: the rows of `a` (`d` apart) times
/// `bt` (keys in the key-chunked layout, see [`chunked`]) into `dst` (rows `sp` apart); row r
/// is query q0 + r, which the causal mask needs.
#[derive(Clone, Copy)]
struct ScoreBlock<'a> {
    d: usize,
    a: &'a [f32],
    bt: *const f32,
    sp: usize,
    q0: usize,
    dst: *mut f32,
}

/// Phase A for 16·NC keys from `j`: dst[r, j..] = Σ_c a[r, c] · b[j.., c] for the R rows of
/// the block. With `MASK`, key j + l is visible to row r only if j + l <= q0 + r (else -inf),
/// and `mx` keeps each row's running maximum.
#[inline(always)]
unsafe fn scores<const NC: usize, const MASK: bool>(
    blk: ScoreBlock,
    j: usize,
    mx: &mut [__m512; R],
) {
    let ScoreBlock {
        d,
        a,
        bt,
        sp,
        q0,
        dst,
    } = blk;
    let mut acc = [[_mm512_setzero_ps(); NC]; R];
    for c in 0..d {
        let kv: [__m512; NC] =
            std::array::from_fn(|n| _mm512_loadu_ps(bt.add((j + 16 * n) * d + 16 * c)));
        for r in 0..R {
            let b = _mm512_set1_ps(*a.get_unchecked(r * d + c));
            for n in 0..NC {
                acc[r][n] = _mm512_fmadd_ps(b, kv[n], acc[r][n]);
            }
        }
    }
    for r in 0..R {
        for n in 0..NC {
            let (j0, t) = (j + 16 * n, q0 + r);
            let mut v = acc[r][n];
            if MASK {
                if j0 + 15 > t {
                    let visible = (t + 1).saturating_sub(j0) as u32; // lanes 0..visible
                    let m = ((1u32 << visible) - 1) as __mmask16;
                    v = _mm512_mask_mov_ps(_mm512_set1_ps(f32::NEG_INFINITY), m, v);
                }
                mx[r] = _mm512_max_ps(mx[r], v);
            }
            _mm512_storeu_ps(dst.add(r * sp + j0), v);
        }
    }
}

/// Phase A over keys 0..kp (a multiple of 16), 32 keys at a time while they last.
#[inline(always)]
unsafe fn scores_all<const MASK: bool>(blk: ScoreBlock, kp: usize, mx: &mut [__m512; R]) {
    let mut j = 0;
    while j + 32 <= kp {
        scores::<2, MASK>(blk, j, mx);
        j += 32;
    }
    if j < kp {
        scores::<1, MASK>(blk, j, mx);
    }
}

/// dst[g + r, :] (+)= Σ_{j < keys} w[g + r, j] · m[j, :] for the RG rows from g of a block:
/// p·v in the forward, ds·k in the backward. Rows of m are `d = 16·DC` apart.
#[inline(always)]
unsafe fn rows_times<const DC: usize, const RG: usize>(
    w: *const f32,
    sp: usize,
    g: usize,
    m: *const f32,
    keys: usize,
) -> [[__m512; DC]; RG] {
    #[inline(always)]
    unsafe fn step<const DC: usize, const RG: usize>(
        o: &mut [[__m512; DC]; RG],
        w: *const f32,
        sp: usize,
        g: usize,
        m: *const f32,
        j: usize,
    ) {
        let mj: [__m512; DC] =
            std::array::from_fn(|c| _mm512_loadu_ps(m.add(j * 16 * DC + 16 * c)));
        for (r, or) in o.iter_mut().enumerate() {
            let b = _mm512_set1_ps(*w.add((g + r) * sp + j));
            for c in 0..DC {
                or[c] = _mm512_fmadd_ps(b, mj[c], or[c]);
            }
        }
    }
    let mut o = [[_mm512_setzero_ps(); DC]; RG];
    let mut j = 0;
    if DC * RG <= 8 {
        // Few accumulators: a second set for odd keys halves the FMA chains' length per key.
        let mut o2 = o;
        while j + 2 <= keys {
            step(&mut o, w, sp, g, m, j);
            step(&mut o2, w, sp, g, m, j + 1);
            j += 2;
        }
        for (a, b) in o.iter_mut().zip(&o2) {
            for c in 0..DC {
                a[c] = _mm512_add_ps(a[c], b[c]);
            }
        }
    }
    while j < keys {
        step(&mut o, w, sp, g, m, j);
        j += 1;
    }
    o
}

/// Copies the rows of d elements from `src` (rows `rs` apart, `rows` of them valid) into `dst`
/// ([dst.len() / d, d], at most MAX_D wide) times `mul`; missing rows are zeros.
#[inline(always)]
unsafe fn load_block(src: *const f32, rs: usize, rows: usize, d: usize, mul: f32, dst: &mut [f32]) {
    for r in 0..dst.len() / MAX_D {
        let row = &mut dst[r * d..(r + 1) * d];
        if r < rows {
            let s = std::slice::from_raw_parts(src.add(r * rs), d);
            for (x, &y) in row.iter_mut().zip(s) {
                *x = y * mul;
            }
        } else {
            row.fill(0.0);
        }
    }
}

/// The key-chunked layout of a [keys, d] matrix: keys in chunks of 16, each chunk stored as d
/// vectors of 16 keys (element (j, c) at (j − j % 16)·d + 16·c + j % 16). Score products read
/// one contiguous vector per feature, and a chunk's d vectors are contiguous, so no power-of-two
/// strides arise.
pub fn chunked(keys: usize, d: usize) -> usize {
    keys.next_multiple_of(16) * d
}

/// Transposes a 16×16 block held as 16 row vectors.
#[inline(always)]
unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // 32-bit interleave within 128-bit lanes, then 64-bit, then whole lanes twice.
    let a: [__m512; 16] = std::array::from_fn(|i| {
        let (x, y) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(x, y)
        } else {
            _mm512_unpackhi_ps(x, y)
        }
    });
    let b: [__m512; 16] = std::array::from_fn(|i| {
        let (g, k) = (i / 4 * 4, i % 4);
        let (x, y) = (
            _mm512_castps_pd(a[g + k / 2]),
            _mm512_castps_pd(a[g + k / 2 + 2]),
        );
        _mm512_castpd_ps(if k % 2 == 0 {
            _mm512_unpacklo_pd(x, y)
        } else {
            _mm512_unpackhi_pd(x, y)
        })
    });
    // b[4i + k], lane L: column 4L + k of rows 4i..4i+4.
    let mut out = [_mm512_setzero_ps(); 16];
    for k in 0..4 {
        let c0 = _mm512_shuffle_f32x4::<0x44>(b[k], b[4 + k]);
        let c1 = _mm512_shuffle_f32x4::<0xEE>(b[k], b[4 + k]);
        let c2 = _mm512_shuffle_f32x4::<0x44>(b[8 + k], b[12 + k]);
        let c3 = _mm512_shuffle_f32x4::<0xEE>(b[8 + k], b[12 + k]);
        out[k] = _mm512_shuffle_f32x4::<0x88>(c0, c2);
        out[4 + k] = _mm512_shuffle_f32x4::<0xDD>(c0, c2);
        out[8 + k] = _mm512_shuffle_f32x4::<0x88>(c1, c3);
        out[12 + k] = _mm512_shuffle_f32x4::<0xDD>(c1, c3);
    }
    out
}

/// Copies `rows` rows of d (a multiple of 16) elements, `ld` apart, into `dst` in the
/// key-chunked layout; padding keys are zeros.
///
/// # Safety
/// AVX-512F present; src addresses rows·ld elements; dst holds `chunked(rows, d)`.
#[target_feature(enable = "avx512f")]
pub unsafe fn gather_chunked(src: *const f32, ld: usize, rows: usize, d: usize, dst: &mut [f32]) {
    let dst = &mut dst[..chunked(rows, d)];
    for j in (0..rows).step_by(16) {
        for c in (0..d).step_by(16) {
            let r = std::array::from_fn(|i| {
                if j + i < rows {
                    _mm512_loadu_ps(src.add((j + i) * ld + c))
                } else {
                    _mm512_setzero_ps()
                }
            });
            for (i, v) in transpose16(r).into_iter().enumerate() {
                _mm512_storeu_ps(dst.as_mut_ptr().add(j * d + 16 * (c + i)), v);
            }
        }
    }
}

/// The inverse of [`gather_chunked`]: row j of the `rows` rows goes to dst + j·ld.
///
/// # Safety
/// AVX-512F present; dst addresses rows·ld elements and overlaps nothing else in use.
#[target_feature(enable = "avx512f")]
pub unsafe fn scatter_chunked(src: &[f32], rows: usize, d: usize, dst: *mut f32, ld: usize) {
    let src = &src[..chunked(rows, d)];
    for j in (0..rows).step_by(16) {
        for c in (0..d).step_by(16) {
            let r =
                std::array::from_fn(|i| _mm512_loadu_ps(src.as_ptr().add(j * d + 16 * (c + i))));
            for (i, v) in transpose16(r).into_iter().enumerate() {
                if j + i < rows {
                    _mm512_storeu_ps(dst.add((j + i) * ld + c), v);
                }
            }
        }
    }
}

/// Inputs of one head shared by both passes.
#[derive(Clone, Copy)]
pub struct Head {
    /// Query / out / dout rows of this head: row t at base + t·rs.
    pub rs: usize,
    pub seq: usize,
    pub scale: f32,
    /// k in the key-chunked layout ([`chunked`]), padding keys zero.
    pub kt: *const f32,
}

impl Head {
    fn sp(&self) -> usize {
        row_stride(self.seq)
    }
}

/// Forward of one head. `v` is [seq, d] contiguous, `lse` this head's [seq] row, `buf` R·sp
/// floats of scratch.
///
/// # Safety
/// AVX-512F must be present; every pointer must address the sizes above (q and out: seq rows
/// of d at stride `h.rs`); out must not overlap the inputs.
#[target_feature(enable = "avx512f")]
pub unsafe fn fwd_head<const DC: usize, const RG: usize>(
    h: Head,
    q: *const f32,
    v: *const f32,
    out: *mut f32,
    lse: *mut f32,
    buf: &mut [f32],
) {
    let (d, sp, seq) = (16 * DC, h.sp(), h.seq);
    let s = buf.as_mut_ptr();
    let mut qb = [0f32; R * MAX_D];
    for q0 in (0..seq).step_by(R) {
        let rows = R.min(seq - q0);
        load_block(q.add(q0 * h.rs), h.rs, rows, d, h.scale * LOG2E, &mut qb);
        let keys = q0 + rows;
        let kp = keys.next_multiple_of(16);
        let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); R];
        let blk = ScoreBlock {
            d,
            a: &qb,
            bt: h.kt,
            sp,
            q0,
            dst: s,
        };
        scores_all::<true>(blk, kp, &mut mx);
        // Key 0 is visible to every row, so the maxima are finite (unless inputs are not).
        let m2 = reduce8(mx, |a, b| _mm512_max_ps(a, b));
        let mut sv = [_mm512_setzero_ps(); R];
        for r in 0..R {
            let mv = _mm512_set1_ps(m2[r]);
            for j in (0..kp).step_by(16) {
                let at = s.add(r * sp + j);
                let p = exp2(_mm512_sub_ps(_mm512_loadu_ps(at), mv));
                sv[r] = _mm512_add_ps(sv[r], p);
                _mm512_storeu_ps(at, p);
            }
        }
        let sum = reduce8(sv, |a, b| _mm512_add_ps(a, b));
        for g in (0..R).step_by(RG) {
            let o = rows_times::<DC, RG>(s, sp, g, v, keys);
            for (r, orow) in o.iter().enumerate() {
                let t = g + r;
                if t >= rows {
                    break;
                }
                let inv = _mm512_set1_ps(1.0 / sum[t]);
                let dst = out.add((q0 + t) * h.rs);
                for (c, &x) in orow.iter().enumerate() {
                    _mm512_storeu_ps(dst.add(16 * c), _mm512_mul_ps(x, inv));
                }
                *lse.add(q0 + t) = (m2[t] + sum[t].log2()) * LN2;
            }
        }
    }
}

/// The 16 lanes of each of eight vectors combined by `op` (max or add; a fixed tree): the rows
/// of a block reduced together, 26 shuffles and ops with short dependency chains instead of
/// eight separate reductions that each hold up their row's next phase.
#[inline(always)]
unsafe fn reduce8(v: [__m512; R], op: impl Fn(__m512, __m512) -> __m512) -> [f32; R] {
    // Pairs (2i, 2i + 1): 128-bit quarters q0..q3 of each folded to two, side by side.
    let h: [__m512; 4] = std::array::from_fn(|i| {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        op(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
        )
    });
    // Quads: each quarter now holds one row's four partial lanes (rows 4i..4i + 4).
    let q: [__m512; 2] = std::array::from_fn(|i| {
        let (a, b) = (h[2 * i], h[2 * i + 1]);
        op(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
        )
    });
    let mut out = [0f32; R];
    for (i, x) in q.into_iter().enumerate() {
        let x = op(x, _mm512_permute_ps::<0b01_00_11_10>(x));
        let x = op(x, _mm512_permute_ps::<0b10_11_00_01>(x));
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), x);
        for k in 0..4 {
            out[4 * i + k] = lanes[4 * k];
        }
    }
    out
}

/// Per-kv-head inputs and accumulators of the backward.
#[derive(Clone, Copy)]
pub struct BwdKv {
    /// k as [seq, d] contiguous.
    pub k: *const f32,
    /// v in the key-chunked layout.
    pub vt: *const f32,
    /// dk and dv accumulators in the key-chunked layout, added to.
    pub dkt: *mut f32,
    pub dvt: *mut f32,
}

/// One query head's rows: q, out and dout in, dq out (all rows `h.rs` apart), lse [seq].
#[derive(Clone, Copy)]
pub struct BwdRows {
    pub q: *const f32,
    pub out: *const f32,
    pub dout: *const f32,
    pub lse: *const f32,
    pub dq: *mut f32,
}

/// Backward of one query head: writes its dq rows and adds its share to the kv head's dk, dv.
/// `buf` holds 4·R·sp floats of scratch.
///
/// # Safety
/// As [`fwd_head`]: AVX-512F present, every pointer valid for its documented size, dq and the
/// accumulators disjoint from the inputs and from each other.
#[target_feature(enable = "avx512f")]
pub unsafe fn bwd_head<const DC: usize, const RG: usize>(
    h: Head,
    kv: BwdKv,
    x: BwdRows,
    buf: &mut [f32],
) {
    let (d, sp, seq) = (16 * DC, h.sp(), h.seq);
    let (pb, db) = buf.split_at_mut(R2 * sp);
    let (pb, db) = (pb.as_mut_ptr(), db.as_mut_ptr());
    let mut qs = [0f32; R2 * MAX_D]; // q · scale · log2(e): scores in the base-2 domain
    let mut qu = [0f32; R2 * MAX_D]; // q, for dk
    let mut go = [0f32; R2 * MAX_D]; // dout
    for q0 in (0..seq).step_by(R2) {
        let rows = R2.min(seq - q0);
        let at = q0 * h.rs;
        load_block(x.q.add(at), h.rs, rows, d, h.scale * LOG2E, &mut qs);
        load_block(x.q.add(at), h.rs, rows, d, 1.0, &mut qu);
        load_block(x.dout.add(at), h.rs, rows, d, 1.0, &mut go);
        let (mut lse2, mut delta) = ([f32::INFINITY; R2], [0f32; R2]);
        for r in 0..rows {
            lse2[r] = *x.lse.add(q0 + r) * LOG2E;
            let o = std::slice::from_raw_parts(x.out.add(at + r * h.rs), d);
            delta[r] = o.iter().zip(&go[r * d..]).map(|(a, b)| a * b).sum();
        }
        // Both 8-row halves cover the keys of the whole 16-row block (the first half's extra
        // keys are masked to p = ds = 0), so the dk/dv pass can read 16 full rows.
        let keys = q0 + rows;
        let kp = keys.next_multiple_of(16);
        let sc = _mm512_set1_ps(h.scale);
        for half in 0..2 {
            let (r0, p0, d0) = (half * R, pb.add(half * R * sp), db.add(half * R * sp));
            let mut mx = [_mm512_setzero_ps(); R];
            let blk = ScoreBlock {
                d,
                a: &qs[r0 * d..],
                bt: h.kt,
                sp,
                q0: q0 + r0,
                dst: p0,
            };
            scores_all::<true>(blk, kp, &mut mx);
            let blk = ScoreBlock {
                a: &go[r0 * d..],
                bt: kv.vt,
                dst: d0,
                ..blk
            };
            scores_all::<false>(blk, kp, &mut mx);
            // p = 2^(s − lse·log2 e) (0 where masked), ds = p·(dp − delta)·scale.
            for r in 0..R {
                let (l, dl) = (_mm512_set1_ps(lse2[r0 + r]), _mm512_set1_ps(delta[r0 + r]));
                for j in (0..kp).step_by(16) {
                    let (pa, da) = (p0.add(r * sp + j), d0.add(r * sp + j));
                    let p = exp2(_mm512_sub_ps(_mm512_loadu_ps(pa), l));
                    let dp = _mm512_sub_ps(_mm512_loadu_ps(da), dl);
                    _mm512_storeu_ps(pa, p);
                    _mm512_storeu_ps(da, _mm512_mul_ps(_mm512_mul_ps(p, dp), sc));
                }
            }
            // dq = ds · k, over the keys this half's rows can see
            let hrows = rows.saturating_sub(r0).min(R);
            for g in (0..hrows).step_by(RG) {
                let o = rows_times::<DC, RG>(d0, sp, g, kv.k, (q0 + r0 + hrows).min(seq));
                for (r, orow) in o.iter().enumerate() {
                    if g + r >= hrows {
                        break;
                    }
                    let dst = x.dq.add(at + (r0 + g + r) * h.rs);
                    for (c, &v) in orow.iter().enumerate() {
                        _mm512_storeu_ps(dst.add(16 * c), v);
                    }
                }
            }
        }
        // dk[j.., c] += Σ_r q[r, c] · ds[r, j..], then dv[j.., c] += Σ_r dout[r, c] · p[r, j..]:
        // keys are the lanes, so the block's 16 rows of ds (then p) for 16 keys stay in
        // registers, the q (dout) elements are broadcasts at fixed offsets, and each
        // accumulator vector is read and written once per 16 rows.
        for j in (0..kp).step_by(16) {
            accumulate_t::<R2>(db, sp, j, d, &qu, kv.dkt);
            accumulate_t::<R2>(pb, sp, j, d, &go, kv.dvt);
        }
    }
}

/// acc[j.., c] += Σ_r w[r, j..] · a[r, c] for the 16 keys from j (key-chunked `acc`), over
/// the N rows of `w` (rows `sp` apart) and of `a` (rows d apart).
#[inline(always)]
unsafe fn accumulate_t<const N: usize>(
    w: *const f32,
    sp: usize,
    j: usize,
    d: usize,
    a: &[f32],
    acc: *mut f32,
) {
    let wr: [__m512; N] = std::array::from_fn(|r| _mm512_loadu_ps(w.add(r * sp + j)));
    for c in 0..d {
        let at = acc.add(j * d + 16 * c);
        // Four interleaved partial sums: short FMA chains, so that several feature columns are
        // in flight at once (one N-long chain measured 2x slower).
        // The next key chunk's accumulator line (the buffers outgrow L1 at long sequences).
        _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(16 * d) as *const i8);
        let mut s = [_mm512_setzero_ps(); 4];
        s[0] = _mm512_loadu_ps(at);
        for r in 0..N {
            let b = _mm512_set1_ps(*a.get_unchecked(r * d + c));
            s[r % 4] = _mm512_fmadd_ps(b, wr[r], s[r % 4]);
        }
        let t = _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]));
        _mm512_storeu_ps(at, t);
    }
}

// ---- whole-tensor drivers -------------------------------------------------------------------

type FwdFn = unsafe fn(Head, *const f32, *const f32, *mut f32, *mut f32, &mut [f32]);
type BwdFn = unsafe fn(Head, BwdKv, BwdRows, &mut [f32]);

/// The kernels for a head dim, when this CPU has AVX-512 and the head dim is 16, 32 or 64. (At
/// 128 the general tile path measured faster: 21 vs 24 ms forward, 47 vs 57 ms backward at
/// seq 1024, 16 heads, 2 threads.)
fn kernels(d: usize) -> Option<(FwdFn, BwdFn)> {
    if !supported(d) {
        return None;
    }
    match d {
        16 => Some((fwd_head::<1, 8>, bwd_head::<1, 8>)),
        32 => Some((fwd_head::<2, 8>, bwd_head::<2, 8>)),
        64 => Some((fwd_head::<4, 4>, bwd_head::<4, 4>)),
        _ => None,
    }
}

/// `attention_fwd` for f32 on [batch, seq, heads, d] tensors; false (nothing done) when this
/// path does not serve the shape or CPU. Shapes were checked by the caller.
pub(super) fn fwd(
    [q, k, v]: [&[f32]; 3],
    out: &mut [f32],
    lse: &mut [f32],
    s: AttnShape,
    scale: f32,
) -> bool {
    let Some((f, _)) = kernels(s.head_dim) else {
        return false;
    };
    let (seq, d, lay) = (s.seq, s.head_dim, Layout { s });
    let group = s.n_heads / s.n_kv_heads;
    let (qs, ks, sp) = (lay.q_row_stride(), lay.kv_row_stride(), row_stride(seq));
    let (pq, pk, pv) = (ptr(q), ptr(k), ptr(v));
    let (po, pl) = (SendPtr(out.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    // A task takes some query heads of one kv head (k transposed once for all of them); the
    // heads of a group are split only when there would be too few tasks for the threads.
    let kv_tasks = s.batch * s.n_kv_heads;
    let parts = (4 * rayon::current_num_threads())
        .div_ceil(kv_tasks)
        .clamp(1, group);
    let per = group.div_ceil(parts);
    (0..kv_tasks * parts).into_par_iter().for_each(|task| {
        let (kvt, part) = (task / parts, task % parts);
        let (b, hk) = (kvt / s.n_kv_heads, kvt % s.n_kv_heads);
        let heads = hk * group + part * per..(hk * group + (part + 1) * per).min((hk + 1) * group);
        if heads.is_empty() {
            return;
        }
        with_scratch(chunked(seq, d) + seq * d + R * sp, |buf: &mut [f32]| {
            let (kt, rest) = buf.split_at_mut(chunked(seq, d));
            let (vb, sb) = rest.split_at_mut(seq * d);
            // SAFETY: offsets come from the checked shape; this task alone writes the out rows
            // and lse entries of its heads of batch b; the kernel exists, so AVX-512F does.
            unsafe {
                gather_chunked(pk.get().add(lay.kv_off(b, 0, hk)), ks, seq, d, kt);
                gather(pv.get().add(lay.kv_off(b, 0, hk)), ks, seq, d, vb);
                let head = Head {
                    rs: qs,
                    seq,
                    scale,
                    kt: kt.as_ptr(),
                };
                for h in heads {
                    let o = lay.q_off(b, 0, h);
                    let l = pl.get().add(lay.lse_off(b, h, 0));
                    f(head, pq.get().add(o), vb.as_ptr(), po.get().add(o), l, sb);
                }
            }
        })
    });
    true
}

/// `attention_bwd` for f32: dq, dk, dv written. One task per (batch, kv head), which owns that
/// kv head's dk and dv sums (deterministic order). False when the path does not apply.
pub(super) fn bwd(
    [q, k, v, out, dout, lse]: [&[f32]; 6],
    [dq, dk, dv]: [&mut [f32]; 3],
    s: AttnShape,
    scale: f32,
) -> bool {
    let Some((_, f)) = kernels(s.head_dim) else {
        return false;
    };
    let (seq, d, lay) = (s.seq, s.head_dim, Layout { s });
    let group = s.n_heads / s.n_kv_heads;
    let (qs, ks, sp) = (lay.q_row_stride(), lay.kv_row_stride(), row_stride(seq));
    let (pq, pk, pv, po, pg, pl) = (ptr(q), ptr(k), ptr(v), ptr(out), ptr(dout), ptr(lse));
    let (pdq, pdk, pdv) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    (0..s.batch * s.n_kv_heads)
        .into_par_iter()
        .for_each(|task| {
            let (b, hk) = (task / s.n_kv_heads, task % s.n_kv_heads);
            let ch = chunked(seq, d);
            with_scratch(4 * ch + seq * d + 4 * R * sp, |buf: &mut [f32]| {
                let (kt, rest) = buf.split_at_mut(ch);
                let (vt, rest) = rest.split_at_mut(ch);
                let (kb, rest) = rest.split_at_mut(seq * d);
                let (dka, rest) = rest.split_at_mut(ch);
                let (dva, sb) = rest.split_at_mut(ch);
                dka.fill(0.0);
                dva.fill(0.0);
                // SAFETY: offsets come from the checked shape. This task alone writes dq of the
                // query heads of kv head hk in batch b, and dk / dv of (b, hk); AVX-512F exists.
                unsafe {
                    let base = lay.kv_off(b, 0, hk);
                    gather(pk.get().add(base), ks, seq, d, kb);
                    gather_chunked(pk.get().add(base), ks, seq, d, kt);
                    gather_chunked(pv.get().add(base), ks, seq, d, vt);
                    let head = Head {
                        rs: qs,
                        seq,
                        scale,
                        kt: kt.as_ptr(),
                    };
                    let acc = BwdKv {
                        k: kb.as_ptr(),
                        vt: vt.as_ptr(),
                        dkt: dka.as_mut_ptr(),
                        dvt: dva.as_mut_ptr(),
                    };
                    for h in hk * group..(hk + 1) * group {
                        let o = lay.q_off(b, 0, h);
                        let rows = BwdRows {
                            q: pq.get().add(o),
                            out: po.get().add(o),
                            dout: pg.get().add(o),
                            lse: pl.get().add(lay.lse_off(b, h, 0)),
                            dq: pdq.get().add(o),
                        };
                        f(head, acc, rows, sb);
                    }
                    scatter_chunked(dka, seq, d, pdk.get().add(base), ks);
                    scatter_chunked(dva, seq, d, pdv.get().add(base), ks);
                }
            })
        });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp2_accuracy_and_edges() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return; // nothing to test on this CPU
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn run(xs: &[f32; 16]) -> [f32; 16] {
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), exp2(_mm512_loadu_ps(xs.as_ptr())));
            out
        }
        let mut worst = 0f64;
        let mut x = -125.9f32;
        while x < 127.0 {
            let xs: [f32; 16] = std::array::from_fn(|i| x + i as f32 * 0.0071);
            // SAFETY: AVX-512F checked above.
            let got = unsafe { run(&xs) };
            for (g, &x) in got.iter().zip(&xs) {
                let want = 2f64.powf(x as f64);
                worst = worst.max(((*g as f64 - want) / want).abs());
            }
            x += 0.173;
        }
        assert!(worst < 3e-7, "exp2 relative error {worst:e}");
        let mut edge = [0f32; 16];
        edge[..4].copy_from_slice(&[f32::NEG_INFINITY, -200.0, f32::NAN, 0.0]);
        // SAFETY: as above.
        let got = unsafe { run(&edge) };
        assert_eq!(&got[..2], &[0.0, 0.0], "masked lanes must be exactly 0");
        assert!(got[2].is_nan(), "NaN must propagate");
        assert_eq!(got[3], 1.0);
    }

    #[test]
    fn chunked_round_trip_transposes() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return; // nothing to test on this CPU
        }
        for (rows, d, ld) in [(1usize, 16usize, 16usize), (37, 32, 40), (64, 128, 131)] {
            let src: Vec<f32> = (0..rows * ld).map(|i| i as f32 * 0.5 - 3.0).collect();
            let mut ch = vec![f32::NAN; chunked(rows, d)];
            let mut back = vec![f32::NAN; rows * ld];
            // SAFETY: AVX-512F checked above; buffers sized as documented.
            unsafe {
                gather_chunked(src.as_ptr(), ld, rows, d, &mut ch);
                scatter_chunked(&ch, rows, d, back.as_mut_ptr(), ld);
            }
            for j in 0..rows.next_multiple_of(16) {
                for c in 0..d {
                    let want = if j < rows { src[j * ld + c] } else { 0.0 };
                    assert_eq!(ch[(j - j % 16) * d + 16 * c + j % 16], want, "({j}, {c})");
                }
            }
            for j in 0..rows {
                assert_eq!(&back[j * ld..j * ld + d], &src[j * ld..j * ld + d]);
                assert!(back[j * ld + d..(j + 1) * ld].iter().all(|x| x.is_nan()));
            }
        }
    }
}
