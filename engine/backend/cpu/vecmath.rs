//! Vectorised f32 row primitives for the softmax-like ops (attention, cross-entropy, swiglu,
//! rmsnorm): exp, max, fused exp-and-sum, dot. Reductions keep 16 independent lanes so the
//! compiler can use whole vector registers, and combine the lanes in a fixed order, so results
//! are deterministic (they depend on the row length only, never on threads or the CPU).
//! Each primitive is compiled three times (AVX-512, AVX2+FMA, baseline) and picked at run time.

const LANES: usize = 16;

/// exp(x) for f32 with ~2 ulp error, branch-free so that it vectorises: x = n·ln2 + r with
/// |r| <= ln2/2, exp(r) by a degree-7 Taylor polynomial (truncation < 1e-8), 2^n via the
/// exponent bits. Inputs are clamped to [-87.3, 88.3] (so -inf gives ~1e-38, not 0); NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let bits = ((t.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

#[inline(always)]
fn exp_body(xs: &mut [f32]) {
    for x in xs {
        *x = exp_f32(*x);
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
fn max_body(xs: &[f32]) -> f32 {
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
fn exp_sub_sum_body(xs: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = xs.chunks_exact_mut(LANES);
    for c in &mut it {
        for l in 0..LANES {
            let e = exp_f32(c[l] - m);
            c[l] = e;
            acc[l] += e;
        }
    }
    let mut s = fold_lanes(acc, |a, b| a + b);
    for x in it.into_remainder() {
        *x = exp_f32(*x - m);
        s += *x;
    }
    s
}

#[inline(always)]
fn dot_body(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (mut ia, mut ib) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for l in 0..LANES {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut s = fold_lanes(acc, |x, y| x + y);
    for (x, y) in ia.remainder().iter().zip(ib.remainder()) {
        s += x * y;
    }
    s
}

/// Defines `pub fn $name` that runs `$body` compiled for the best vector unit present.
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident ($($arg:ident : $ty:ty),*) -> $ret:ty = $body:ident) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn v4($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
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
            $body($($arg),*)
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
    /// xs[i] = exp(xs[i] − m); returns Σ xs[i].
    exp_sub_sum_f32(xs: &mut [f32], m: f32) -> f32 = exp_sub_sum_body
);
dispatch!(
    /// Σ a[i]·b[i].
    dot_f32(a: &[f32], b: &[f32]) -> f32 = dot_body
);

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
        assert!(v[0].is_nan() && v[1] < 1e-37);
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
}
