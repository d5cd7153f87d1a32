//! Vectorised f32 row primitives for the softmax-like ops (attention, cross-entropy, swiglu,
//! rmsnorm): exp, max, fused exp-and-sum, dot. Reductions keep 16 independent lanes so the
//! compiler can use whole vector registers, and combine the lanes in a fixed order, so results
//! are deterministic (they depend on the row length only, never on threads or the CPU).
//! Each primitive is compiled three times (AVX-512, AVX2+FMA, baseline) and picked at run time.

use super::float::{self, CausalTile};
use super::gemm::Mat;

const LANES: usize = 16;

/// a·b + c, fused when the caller is compiled with FMA (`F`): without the feature `mul_add`
/// would be a libm call, and plain Rust never fuses on its own.
#[inline(always)]
fn fma<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// exp(x) for f32 with ~2 ulp error, branch-free so that it vectorises: x = n·ln2 + r with
/// |r| <= ln2/2, exp(r) by a degree-7 Taylor polynomial (truncation < 1e-8), 2^n via the
/// exponent bits. Inputs below -87.3 (where exp underflows f32's normal range) give exactly 0,
/// so masked scores set to -inf vanish; inputs above 88.3 are clamped; NaN stays NaN.
#[inline(always)]
fn exp_f32<const F: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let under = x < -87.3;
    let x = x.clamp(-87.3, 88.3);
    let t = fma::<F>(x, LOG2E, MAGIC);
    let n = t - MAGIC;
    let r = fma::<F>(-n, LN2_LO, fma::<F>(-n, LN2_HI, x));
    let mut p = 1.0 / 5040.0;
    p = fma::<F>(p, r, 1.0 / 720.0);
    p = fma::<F>(p, r, 1.0 / 120.0);
    p = fma::<F>(p, r, 1.0 / 24.0);
    p = fma::<F>(p, r, 1.0 / 6.0);
    p = fma::<F>(p, r, 0.5);
    p = fma::<F>(p, r, 1.0);
    p = fma::<F>(p, r, 1.0);
    let bits = ((t.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) as u32) << 23;
    let e = p * f32::from_bits(bits);
    if under {
        0.0
    } else {
        e
    }
}

#[inline(always)]
fn exp_body<const F: bool>(xs: &mut [f32]) {
    for x in xs {
        *x = exp_f32::<F>(*x);
    }
}

/// Lane-wise combine in a fixed tree order.
#[inline(always)]
fn fold_lanes(acc: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut w = acc;
    let mut n = LANES / 2;
    while n > 0 {
        for l in 0..n {
            w[l] = f(w[l], w[l + n]);
        }
        n /= 2;
    }
    w[0]
}

#[inline(always)]
fn max_body<const F: bool>(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut it = xs.chunks_exact(LANES);
    for c in &mut it {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    let mut m = fold_lanes(acc, |a, b| if b > a { b } else { a });
    for &x in it.remainder() {
        m = if x > m { x } else { m };
    }
    m
}

#[inline(always)]
fn scale_body<const F: bool>(xs: &mut [f32], k: f32) {
    for x in xs {
        *x *= k;
    }
}

#[inline(always)]
fn exp_sub_sum_body<const F: bool>(xs: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = xs.chunks_exact_mut(LANES);
    for c in &mut it {
        for l in 0..LANES {
            let e = exp_f32::<F>(c[l] - m);
            c[l] = e;
            acc[l] += e;
        }
    }
    let mut s = fold_lanes(acc, |a, b| a + b);
    for x in it.into_remainder() {
        *x = exp_f32::<F>(*x - m);
        s += *x;
    }
    s
}

#[inline(always)]
fn dot_body<const F: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (mut ia, mut ib) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for l in 0..LANES {
            acc[l] = fma::<F>(ca[l], cb[l], acc[l]);
        }
    }
    let mut s = fold_lanes(acc, |x, y| x + y);
    for (x, y) in ia.remainder().iter().zip(ib.remainder()) {
        s += x * y;
    }
    s
}

#[inline(always)]
fn softmax_fwd_tile_body<const F: bool>(
    s: &mut [f32],
    t: CausalTile,
    lse: &mut [f32],
    inv: &mut [f32],
) {
    // The f32 twin of the trait's generic default, written out rather than shared through
    // closures: passed as closures, the two reductions were compiled out of line for the
    // baseline CPU instead of inlined here with AVX-512 (checked in the disassembly).
    for i in 0..t.rows {
        let (row, tail) = t.split_row(s, i, f32::NEG_INFINITY);
        let m = max_body::<F>(row);
        let sum = exp_sub_sum_body::<F>(row, m);
        tail.fill(0.0);
        lse[i] = m + sum.ln();
        inv[i] = 1.0 / sum;
    }
}

#[inline(always)]
fn softmax_bwd_tile_body<const F: bool>(
    p: &mut [f32],
    ds: &mut [f32],
    t: CausalTile,
    lse: &[f32],
    delta: &[f32],
    scale: f32,
) {
    float::softmax_bwd_rows(p, ds, t, lse, delta, scale, exp_f32::<F>)
}

#[inline(always)]
fn swiglu_fwd_body<const F: bool>(g: &[f32], u: &[f32], out: &mut [f32]) {
    float::swiglu_fwd_rows(g, u, out, exp_f32::<F>)
}

#[inline(always)]
fn swiglu_bwd_body<const F: bool>(d: &[f32], g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) {
    float::swiglu_bwd_rows(d, g, u, dg, du, exp_f32::<F>)
}

#[inline(always)]
fn rope_row_body<const F: bool>(
    x: &[f32],
    out: &mut [f32],
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) {
    float::rope_row(x, out, cos, sin, inverse)
}

#[inline(always)]
fn rmsnorm_fwd_body<const F: bool>(
    x: &[f32],
    w: &[f32],
    out: &mut [f32],
    rstd: &mut [f32],
    eps: f32,
) {
    float::rmsnorm_fwd_rows(x, w, out, rstd, eps)
}

#[inline(always)]
fn rmsnorm_bwd_body<const F: bool>(
    g: &[f32],
    x: &[f32],
    w: &[f32],
    rstd: &[f32],
    dres: Option<&[f32]>,
    dx: &mut [f32],
    pw: &mut [f32],
) {
    float::rmsnorm_bwd_rows(g, x, w, rstd, dres, dx, pw)
}

/// Round-to-nearest-even f32 -> bf16 bits, branch-free (so slices of it vectorise); a NaN
/// keeps its sign and top payload bits and is made quiet.
#[inline(always)]
pub fn round_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    (if nan { (b >> 16) | 0x40 } else { rounded }) as u16
}

#[inline(always)]
fn widen_body<const F: bool>(src: &[u16], dst: &mut [f32]) {
    for (s, d) in src.iter().zip(dst.iter_mut()) {
        *d = f32::from_bits((*s as u32) << 16);
    }
}

#[inline(always)]
fn round_body<const F: bool>(src: &[f32], dst: &mut [u16]) {
    for (s, d) in src.iter().zip(dst.iter_mut()) {
        *d = round_bf16(*s);
    }
}

/// Defines `pub fn $name` that runs `$body` compiled for the best vector unit present.
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident ($($arg:ident : $ty:ty),*) -> $ret:ty = $body:ident) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,fma")]
                unsafe fn v4($($arg: $ty),*) -> $ret {
                    $body::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) -> $ret {
                    $body::<true>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the feature was detected at run time.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { v3($($arg),*) };
                }
            }
            $body::<false>($($arg),*)
        }
    };
}

dispatch!(
    /// xs[i] = exp(xs[i]).
    exp_f32_slice(xs: &mut [f32]) -> () = exp_body
);
dispatch!(
    /// The largest element (-inf for an empty slice).
    max_f32(xs: &[f32]) -> f32 = max_body
);
dispatch!(
    /// xs[i] *= k.
    scale_f32(xs: &mut [f32], k: f32) -> () = scale_body
);
dispatch!(
    /// xs[i] = exp(xs[i] − m); returns Σ xs[i].
    exp_sub_sum_f32(xs: &mut [f32], m: f32) -> f32 = exp_sub_sum_body
);
dispatch!(
    /// `Float::softmax_fwd_tile` for f32.
    softmax_fwd_tile_f32(s: &mut [f32], t: CausalTile, lse: &mut [f32], inv: &mut [f32]) -> () = softmax_fwd_tile_body
);
dispatch!(
    /// `Float::softmax_bwd_tile` for f32.
    softmax_bwd_tile_f32(p: &mut [f32], ds: &mut [f32], t: CausalTile, lse: &[f32], delta: &[f32], scale: f32) -> () = softmax_bwd_tile_body
);
dispatch!(
    /// `Float::swiglu_fwd_block` for f32.
    swiglu_fwd_f32(g: &[f32], u: &[f32], out: &mut [f32]) -> () = swiglu_fwd_body
);
dispatch!(
    /// `Float::swiglu_bwd_block` for f32.
    swiglu_bwd_f32(d: &[f32], g: &[f32], u: &[f32], dg: &mut [f32], du: &mut [f32]) -> () = swiglu_bwd_body
);
dispatch!(
    /// `Float::rope_row` for f32.
    rope_row_f32(x: &[f32], out: &mut [f32], cos: &[f32], sin: &[f32], inverse: bool) -> () = rope_row_body
);
dispatch!(
    /// `Float::rmsnorm_fwd_block` for f32.
    rmsnorm_fwd_f32(x: &[f32], w: &[f32], out: &mut [f32], rstd: &mut [f32], eps: f32) -> () = rmsnorm_fwd_body
);
dispatch!(
    /// `Float::rmsnorm_bwd_block` for f32.
    rmsnorm_bwd_f32(g: &[f32], x: &[f32], w: &[f32], rstd: &[f32], dres: Option<&[f32]>, dx: &mut [f32], pw: &mut [f32]) -> () = rmsnorm_bwd_body
);
dispatch!(
    /// dst[i] = bf16 bits src[i] widened to f32 (exact).
    bf16_bits_to_f32(src: &[u16], dst: &mut [f32]) -> () = widen_body
);
dispatch!(
    /// dst[i] = src[i] rounded to bf16 bits (nearest even).
    f32_to_bf16_bits_slice(src: &[f32], dst: &mut [u16]) -> () = round_body
);
dispatch!(
    /// Σ a[i]·b[i].
    dot_f32(a: &[f32], b: &[f32]) -> f32 = dot_body
);

// ---- narrow GEMM ----------------------------------------------------------------------------

/// Output rows computed together for head width D: 12 vector accumulators (rows × D/16) hide
/// the FMA latency, and each loaded row of `b` is reused for every one of those rows.
const fn rows_for(d: usize) -> usize {
    match d {
        16 => 12,
        32 => 6,
        _ => 3,
    }
}

/// c[i, 0..D] = beta·c + alpha · Σ_p a(i, p) · b[p, 0..D] for the first R rows of c and a,
/// with a(i, p) = a[i·a.rs + p·a.cs]; rows of b and c are contiguous (their `cs`, 1, is not
/// read). Only ever compiled with FMA enabled (`mul_add` is one instruction there).
#[inline(always)]
unsafe fn narrow_rows<const D: usize, const R: usize>(
    k: usize,
    c: Mat<f32>,
    a: Mat<f32>,
    b: Mat<f32>,
    alpha: f32,
    beta: f32,
) {
    let (c, c_rs) = (c.ptr, c.rs);
    let (a, a_rs, a_cs) = (a.ptr as *const f32, a.rs, a.cs);
    let (b, b_rs) = (b.ptr as *const f32, b.rs);
    let mut acc = [[0f32; D]; R];
    for p in 0..k {
        let bp = &*(b.add(p * b_rs) as *const [f32; D]);
        let ap = a.add(p * a_cs);
        for (r, accr) in acc.iter_mut().enumerate() {
            let av = *ap.add(r * a_rs);
            for e in 0..D {
                accr[e] = av.mul_add(bp[e], accr[e]);
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        let cr = &mut *(c.add(r * c_rs) as *mut [f32; D]);
        for e in 0..D {
            cr[e] = if beta == 0.0 {
                alpha * accr[e]
            } else {
                beta * cr[e] + alpha * accr[e]
            };
        }
    }
}

#[allow(clippy::int_plus_one)] // `i + r <= m` reads as "r more rows fit"
#[inline(always)]
unsafe fn narrow_body<const D: usize, const R: usize>(
    m: usize,
    k: usize,
    c: Mat<f32>,
    a: Mat<f32>,
    b: Mat<f32>,
    alpha: f32,
    beta: f32,
) {
    let mut i = 0;
    // Blocks of R rows, then the leftover rows in blocks of 4, 2, 1 (a lone row is one FMA
    // chain per vector, latency-bound).
    macro_rules! blocks {
        ($r:tt, $wanted:expr) => {
            while $wanted && i + $r <= m {
                narrow_rows::<D, $r>(k, c.skip_rows(i), a.skip_rows(i), b, alpha, beta);
                i += $r;
            }
        };
    }
    blocks!(R, true);
    blocks!(4, R > 4);
    blocks!(2, R > 2);
    blocks!(1, R > 1);
}

/// An operand of the narrow kernels where they are called through a function pointer: its
/// address and row stride. Two words travel in registers; a three-word `Mat` would be passed
/// through memory, and the kernels compiled from that kept their accumulators on the stack
/// (scalar FMAs, twice the code). `a`'s column stride is passed beside it.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Rows {
    ptr: *mut f32,
    rs: usize,
}

#[cfg(target_arch = "x86_64")]
impl Rows {
    fn of(m: Mat<f32>) -> Rows {
        Rows {
            ptr: m.ptr,
            rs: m.rs,
        }
    }
    /// Back to a `Mat` with column stride `cs`.
    #[inline(always)]
    fn mat(self, cs: usize) -> Mat<f32> {
        Mat {
            ptr: self.ptr,
            rs: self.rs,
            cs,
        }
    }
}

macro_rules! narrow_variants {
    ($($d:literal => $v4:ident, $v3:ident;)*) => {
        $(
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,fma")]
            unsafe fn $v4((m, k): (usize, usize), c: Rows, a: Rows, a_cs: usize, b: Rows,
                          (alpha, beta): (f32, f32)) {
                let (c, a, b) = (c.mat(1), a.mat(a_cs), b.mat(1));
                narrow_body::<$d, { rows_for($d) }>(m, k, c, a, b, alpha, beta)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $v3((m, k): (usize, usize), c: Rows, a: Rows, a_cs: usize, b: Rows,
                          (alpha, beta): (f32, f32)) {
                let (c, a, b) = (c.mat(1), a.mat(a_cs), b.mat(1));
                narrow_body::<$d, { rows_for($d) }>(m, k, c, a, b, alpha, beta)
            }
        )*
    };
}

narrow_variants! {
    16 => narrow16_v4, narrow16_v3;
    32 => narrow32_v4, narrow32_v3;
    64 => narrow64_v4, narrow64_v3;
}

/// c[m, n] = beta·c + alpha · a[m, k] · b[k, n] for the narrow n of attention heads (16, 32 or
/// 64), with contiguous rows in b and c (`cs` = 1) and any strides for a. The gemm crate
/// vectorises such products along n with a 1-vector micro-kernel and packs operands; this kernel
/// keeps a block of output rows in registers and reads a and b in place. Every sum runs over p in
/// order (deterministic). Returns false (and does nothing) when n is not supported, the rows of
/// b or c are not contiguous, or the CPU lacks AVX2/AVX-512.
///
/// # Safety
/// The operands must address valid memory for the given sizes and strides; c must not overlap
/// a or b.
pub unsafe fn matmul_narrow_f32(
    (m, n, k): (usize, usize, usize),
    c: Mat<f32>,
    a: Mat<f32>,
    b: Mat<f32>,
    alpha: f32,
    beta: f32,
) -> bool {
    if c.cs != 1 || b.cs != 1 {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        type K = unsafe fn((usize, usize), Rows, Rows, usize, Rows, (f32, f32));
        let v4 = std::arch::is_x86_feature_detected!("avx512f");
        let v3 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        let f: Option<K> = match (n, v4, v3) {
            (16, true, _) => Some(narrow16_v4),
            (32, true, _) => Some(narrow32_v4),
            (64, true, _) => Some(narrow64_v4),
            (16, false, true) => Some(narrow16_v3),
            (32, false, true) => Some(narrow32_v3),
            (64, false, true) => Some(narrow64_v3),
            _ => None,
        };
        if let Some(f) = f {
            f(
                (m, k),
                Rows::of(c),
                Rows::of(a),
                a.cs,
                Rows::of(b),
                (alpha, beta),
            );
            return true;
        }
    }
    let _ = (m, n, k, c, a, b, alpha, beta);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let mut v = [x];
            exp_f32_slice(&mut v);
            let want = (x as f64).exp();
            worst = worst.max(((v[0] as f64 - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "fast exp relative error {worst:e}");
        let mut v = [f32::NAN, f32::NEG_INFINITY];
        exp_f32_slice(&mut v);
        assert!(v[0].is_nan() && v[1] == 0.0);
    }

    #[test]
    fn reductions_match_scalar() {
        let xs: Vec<f32> = (0..1237)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        assert_eq!(
            max_f32(&xs),
            xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
        );
        assert_eq!(max_f32(&[]), f32::NEG_INFINITY);
        let d: f64 = xs.iter().map(|&x| x as f64 * x as f64).sum();
        assert!(((dot_f32(&xs, &xs) as f64 - d) / d).abs() < 1e-6);
        let mut e = xs.clone();
        let s = exp_sub_sum_f32(&mut e, 4.99);
        let want: f64 = xs.iter().map(|&x| (x as f64 - 4.99f32 as f64).exp()).sum();
        assert!(((s as f64 - want) / want).abs() < 1e-6);
    }

    #[test]
    fn narrow_matmul_matches_naive() {
        for n in [16usize, 32, 64] {
            for (m, k) in [(1usize, 1usize), (7, 13), (13, 130)] {
                let a: Vec<f32> = (0..m * k * 2)
                    .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                    .collect();
                let b: Vec<f32> = (0..k * (n + 3))
                    .map(|i| ((i * 53) % 97) as f32 / 48.0 - 1.0)
                    .collect();
                let mut c: Vec<f32> = (0..m * (n + 5)).map(|i| (i % 9) as f32).collect();
                let c0 = c.clone();
                // a read transposed with a padded stride: a(i, p) = a[i + p * 2m]
                let ok = unsafe {
                    matmul_narrow_f32(
                        (m, n, k),
                        Mat::rows(c.as_mut_ptr(), n + 5),
                        Mat::cols(a.as_ptr(), 2 * m),
                        Mat::rows(b.as_ptr(), n + 3),
                        0.5,
                        1.0,
                    )
                };
                if !ok {
                    return; // no AVX2: nothing to compare
                }
                for i in 0..m {
                    for j in 0..n {
                        let s: f64 = (0..k)
                            .map(|p| a[i + p * 2 * m] as f64 * b[p * (n + 3) + j] as f64)
                            .sum();
                        let want = c0[i * (n + 5) + j] as f64 + 0.5 * s;
                        let got = c[i * (n + 5) + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "n {n} m {m} k {k}: {got} vs {want}"
                        );
                    }
                    for j in n..n + 5 {
                        assert_eq!(
                            c[i * (n + 5) + j],
                            c0[i * (n + 5) + j],
                            "wrote outside the row"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_rounding_matches_half_and_round_trips() {
        // A spread of bit patterns: ties, denormals, infinities, NaNs, both signs.
        let mut bits: Vec<u32> = (0..200_000u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        bits.extend([
            0,
            0x8000_0000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0x7f80_0001,
            0x3f80_8000,
            0x3f81_8000,
            1,
        ]);
        let xs: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let mut got = vec![0u16; xs.len()];
        f32_to_bf16_bits_slice(&xs, &mut got);
        for (x, g) in xs.iter().zip(&got) {
            let want = half::bf16::from_f32(*x);
            if x.is_nan() {
                assert!(half::bf16::from_bits(*g).is_nan(), "{x:e} must stay NaN");
            } else {
                assert_eq!(*g, want.to_bits(), "rounding {x:e} ({:#010x})", x.to_bits());
            }
        }
        let mut back = vec![0f32; got.len()];
        bf16_bits_to_f32(&got, &mut back);
        for (g, b) in got.iter().zip(&back) {
            assert_eq!(b.to_bits(), (*g as u32) << 16);
        }
    }
}
