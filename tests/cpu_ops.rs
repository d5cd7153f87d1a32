//! Every CPU backend op against a naive f64 reference, at odd sizes, with outputs poisoned
//! (NaN) first, in f32 and bf16 storage; plus the dtype / shape errors.
// Index loops keep the naive references close to the math they transcribe.
#![allow(clippy::needless_range_loop)]

mod cpu_common;

use cpu_common::*;
use titan::backend::cpu::CpuBackend;
use titan::backend::{AdamW, AttnShape, Backend, Buf, Gemm, RopeShape};
use titan::{DType, Error};

const FL: [DType; 2] = [DType::F32, DType::BF16];

fn be() -> CpuBackend {
    CpuBackend::new()
}

// ---- memory & elementwise --------------------------------------------------------------------

#[test]
fn alloc_is_aligned_zeroed_and_counted() {
    let b = be();
    assert_eq!(b.alloc_count(), 0);
    for bytes in [0usize, 1, 7, 256, 1000, 1 << 20] {
        let m = b.alloc(bytes).unwrap();
        assert_eq!(m.ptr() % 256, 0, "alloc({bytes}) not 256-aligned");
        assert_eq!(m.bytes(), bytes);
        if bytes > 0 {
            // SAFETY: the allocation is live and holds `bytes` bytes.
            let raw = unsafe { std::slice::from_raw_parts(m.ptr() as *const u8, bytes) };
            assert!(raw.iter().all(|&x| x == 0), "alloc({bytes}) not zeroed");
        }
    }
    assert_eq!(b.alloc_count(), 6);
}

#[test]
fn upload_download_roundtrip_and_size_errors() {
    let b = be();
    let mut r = Rng::new(1);
    let data = r.vec(37, 1.0);
    let t = upload(&b, &data, DType::F32);
    assert_eq!(download(&b, t.buf), data);
    assert!(matches!(
        b.upload(t.buf, &[0u8; 3]),
        Err(Error::Shape { .. })
    ));
    let mut small = [0u8; 5];
    assert!(matches!(
        b.download(t.buf, &mut small),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn fill_copy_cast_scale() {
    let b = be();
    let mut r = Rng::new(2);
    for dt in FL {
        let t = poisoned(&b, 37, dt);
        b.fill(t.buf, 1.5).unwrap();
        assert!(download(&b, t.buf).iter().all(|&x| x == 1.5));
        let src = r.vec(37, 3.0);
        let s = upload(&b, &src, dt);
        let d = poisoned(&b, 37, dt);
        b.copy(s.buf, d.buf).unwrap();
        assert_eq!(download(&b, d.buf), download(&b, s.buf));
        b.scale(d.buf, -0.5).unwrap();
        let want: Vec<f64> = src.iter().map(|x| x * -0.5).collect();
        check("scale", dt, &download(&b, d.buf), &want);
    }
    let ids = poisoned(&b, 11, DType::I32);
    b.fill(ids.buf, 7.0).unwrap();
    assert!(download(&b, ids.buf).iter().all(|&x| x == 7.0));
    // cast both ways; bf16 -> f32 is exact, f32 -> bf16 rounds to nearest even.
    let src = r.vec(1001, 10.0);
    let f = upload(&b, &src, DType::F32);
    let h = poisoned(&b, 1001, DType::BF16);
    b.cast(f.buf, h.buf).unwrap();
    let hv = download(&b, h.buf);
    let want: Vec<f64> = src
        .iter()
        .map(|&x| half::bf16::from_f64(x).to_f64())
        .collect();
    assert_eq!(
        hv, want,
        "f32 -> bf16 must round to nearest even like half::bf16::from_f32"
    );
    let back = poisoned(&b, 1001, DType::F32);
    b.cast(h.buf, back.buf).unwrap();
    assert_eq!(download(&b, back.buf), hv);
    // Ties go to even: 1 + 2^-8 is halfway between two bf16 values.
    let tie = upload(&b, &[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0], DType::F32);
    let th = poisoned(&b, 2, DType::BF16);
    b.cast(tie.buf, th.buf).unwrap();
    assert_eq!(download(&b, th.buf), vec![1.0, 1.0 + 4.0 / 256.0]);
}

#[test]
fn add_plain_and_aliased() {
    let b = be();
    let mut r = Rng::new(3);
    for dt in FL {
        for n in [1usize, 37, 70_001] {
            let (x, y) = (r.vec(n, 1.0), r.vec(n, 1.0));
            let want: Vec<f64> = x.iter().zip(&y).map(|(a, b)| a + b).collect();
            let (a, c) = (upload(&b, &x, dt), upload(&b, &y, dt));
            let o = poisoned(&b, n, dt);
            b.add(a.buf, c.buf, o.buf).unwrap();
            check("add", dt, &download(&b, o.buf), &want);
            b.add(a.buf, c.buf, a.buf).unwrap(); // out aliases a
            check("add (out = a)", dt, &download(&b, a.buf), &want);
            let c2 = upload(&b, &y, dt);
            let a2 = upload(&b, &x, dt);
            b.add(a2.buf, c2.buf, c2.buf).unwrap(); // out aliases b
            check("add (out = b)", dt, &download(&b, c2.buf), &want);
        }
    }
}

// ---- gemm ----------------------------------------------------------------------------------

fn gemm_ref(g: &Gemm, a: &[f64], bm: &[f64], c: &mut [f64]) {
    for bi in 0..g.batch {
        let (a, bm) = (&a[bi * g.stride_a..], &bm[bi * g.stride_b..]);
        for i in 0..g.m {
            for j in 0..g.n {
                let mut s = 0.0;
                for p in 0..g.k {
                    let av = if g.trans_a {
                        a[p * g.m + i]
                    } else {
                        a[i * g.k + p]
                    };
                    let bv = if g.trans_b {
                        bm[j * g.k + p]
                    } else {
                        bm[p * g.n + j]
                    };
                    s += av * bv;
                }
                let cv = &mut c[bi * g.stride_c + i * g.n + j];
                *cv = g.alpha as f64 * s
                    + if g.beta == 0.0 {
                        0.0
                    } else {
                        g.beta as f64 * *cv
                    };
            }
        }
    }
}

fn run_gemm(g: Gemm, ab_dt: DType, c_dt: DType, seed: u64) {
    let b = be();
    let mut r = Rng::new(seed);
    let la = (g.batch - 1) * g.stride_a + g.m * g.k;
    let lb = (g.batch - 1) * g.stride_b + g.k * g.n;
    let lc = (g.batch - 1) * g.stride_c + g.m * g.n;
    let (av, bv) = (r.vec(la, 1.0), r.vec(lb, 1.0));
    let mut cv = if g.beta == 0.0 {
        vec![f64::NAN; lc]
    } else {
        r.vec(lc, 1.0)
    };
    let (a, bb, c) = (
        upload(&b, &av, ab_dt),
        upload(&b, &bv, ab_dt),
        upload(&b, &cv, c_dt),
    );
    b.gemm(&g, a.buf, bb.buf, c.buf).unwrap();
    let got = download(&b, c.buf);
    gemm_ref(&g, &av, &bv, &mut cv);
    // Compare only the elements the product defines (padding between batch entries is untouched).
    let mut gi = Vec::new();
    let mut wi = Vec::new();
    for bi in 0..g.batch {
        for e in 0..g.m * g.n {
            gi.push(got[bi * g.stride_c + e]);
            wi.push(cv[bi * g.stride_c + e]);
        }
    }
    let dt = if ab_dt == DType::BF16 || c_dt == DType::BF16 {
        DType::BF16
    } else {
        DType::F32
    };
    check(&format!("gemm {g:?} a/b {ab_dt} c {c_dt}"), dt, &gi, &wi);
}

#[test]
fn gemm_all_transposes_sizes_and_dtypes() {
    let mut seed = 10;
    for (m, n, k) in [
        (1, 1, 1),
        (7, 13, 37),
        (1, 29, 3),
        (67, 5, 1),
        (131, 97, 53),
    ] {
        for ta in [false, true] {
            for tb in [false, true] {
                for beta in [0.0, 0.5] {
                    for (abd, cd) in [
                        (DType::F32, DType::F32),
                        (DType::BF16, DType::F32),
                        (DType::BF16, DType::BF16),
                    ] {
                        let mut g = Gemm::new(m, n, k, ta, tb, beta);
                        g.alpha = 0.75;
                        if abd == DType::BF16 && (m * n == 1 || k == 1) {
                            continue; // too few values for a meaningful bf16 error band
                        }
                        seed += 1;
                        run_gemm(g, abd, cd, seed);
                    }
                }
            }
        }
    }
}

#[test]
fn gemm_batched_with_padded_strides() {
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        for (m, n, k) in [(5, 7, 3), (200, 150, 160)] {
            let g = Gemm {
                m,
                n,
                k,
                trans_a: ta,
                trans_b: tb,
                alpha: 1.25,
                beta: 1.0,
                batch: 3,
                stride_a: m * k + 5,
                stride_b: k * n + 2,
                stride_c: m * n + 11,
            };
            run_gemm(g, DType::F32, DType::F32, 99);
        }
    }
}

#[test]
fn gemm_errors() {
    let b = be();
    let a = poisoned(&b, 12, DType::F32);
    let c = poisoned(&b, 9, DType::F32);
    let i = poisoned(&b, 12, DType::I32);
    let h = poisoned(&b, 12, DType::BF16);
    let g = Gemm::new(3, 3, 4, false, false, 0.0);
    assert!(matches!(
        b.gemm(&g, i.buf, a.buf, c.buf),
        Err(Error::DType { op: "gemm", .. })
    ));
    assert!(matches!(
        b.gemm(&g, h.buf, a.buf, c.buf),
        Err(Error::DType { op: "gemm", .. })
    ));
    let g2 = Gemm::new(3, 3, 5, false, false, 0.0);
    assert!(matches!(
        b.gemm(&g2, a.buf, a.buf, c.buf),
        Err(Error::Shape { op: "gemm", .. })
    ));
    assert!(matches!(
        b.gemm(&g, a.buf, a.buf, a.buf.slice(0, 9)),
        Err(Error::Shape { op: "gemm", .. })
    ));
}

// ---- embedding -----------------------------------------------------------------------------

#[test]
fn embedding_fwd_bwd() {
    let b = be();
    let mut r = Rng::new(20);
    let (vocab, dim, rows) = (29, 37, 41);
    let ids: Vec<i32> = (0..rows)
        .map(|i: usize| {
            if i.is_multiple_of(5) {
                3
            } else {
                r.below(vocab) as i32
            }
        })
        .collect();
    let table = r.vec(vocab * dim, 1.0);
    let dout = r.vec(rows * dim, 1.0);
    let dt0 = r.vec(vocab * dim, 1.0);
    let mut want_out = vec![0.0; rows * dim];
    let mut want_dt = dt0.clone();
    for (n, &id) in ids.iter().enumerate() {
        for j in 0..dim {
            want_out[n * dim + j] = table[id as usize * dim + j];
            want_dt[id as usize * dim + j] += dout[n * dim + j];
        }
    }
    let idt = upload_i32(&b, &ids);
    for (tdt, odt) in [
        (DType::F32, DType::F32),
        (DType::BF16, DType::BF16),
        (DType::BF16, DType::F32),
        (DType::F32, DType::BF16),
    ] {
        let t = upload(&b, &table, tdt);
        let o = poisoned(&b, rows * dim, odt);
        b.embedding_fwd(t.buf, idt.buf, o.buf, dim).unwrap();
        let dt = if tdt == DType::BF16 || odt == DType::BF16 {
            DType::BF16
        } else {
            DType::F32
        };
        check("embedding_fwd", dt, &download(&b, o.buf), &want_out);
    }
    for ddt in FL {
        let d = upload(&b, &dout, ddt);
        let g = upload(&b, &dt0, DType::F32);
        b.embedding_bwd(d.buf, idt.buf, g.buf, dim).unwrap();
        let got = download(&b, g.buf);
        // bf16 dout: the error is relative to the (large) accumulated table, so f32 storage of
        // the gradient keeps it well inside the bf16 band; only require the bf16 upper bound.
        let e = rel_l2(&got, &want_dt);
        assert!(e < tol(ddt), "embedding_bwd {ddt}: {e:e}");
    }
    // Out-of-range ids and wrong dtypes are errors, not panics.
    let bad = upload_i32(&b, &[0, 29]);
    let t = upload(&b, &table, DType::F32);
    let o = poisoned(&b, 2 * dim, DType::F32);
    assert!(matches!(
        b.embedding_fwd(t.buf, bad.buf, o.buf, dim),
        Err(Error::Shape {
            op: "embedding_fwd",
            ..
        })
    ));
    let fid = poisoned(&b, 2, DType::F32);
    assert!(matches!(
        b.embedding_fwd(t.buf, fid.buf, o.buf, dim),
        Err(Error::DType {
            op: "embedding_fwd",
            ..
        })
    ));
    let hb = poisoned(&b, vocab * dim, DType::BF16);
    let d = poisoned(&b, rows * dim, DType::F32);
    assert!(matches!(
        b.embedding_bwd(d.buf, idt.buf, hb.buf, dim),
        Err(Error::DType {
            op: "embedding_bwd",
            ..
        })
    ));
}

// ---- rmsnorm -------------------------------------------------------------------------------

fn rmsnorm_ref(x: &[f64], w: &[f64], dim: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let rows = x.len() / dim;
    let mut out = vec![0.0; x.len()];
    let mut rstd = vec![0.0; rows];
    for r in 0..rows {
        let xr = &x[r * dim..(r + 1) * dim];
        let rs = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / dim as f64 + eps).sqrt();
        rstd[r] = rs;
        for j in 0..dim {
            out[r * dim + j] = xr[j] * rs * w[j];
        }
    }
    (out, rstd)
}

#[test]
fn rmsnorm_fwd_bwd_and_residual() {
    let b = be();
    let mut r = Rng::new(30);
    let eps = 1e-5;
    for (rows, dim) in [(1, 1), (7, 37), (67, 256), (3, 1)] {
        let x = r.vec(rows * dim, 2.0);
        let res = r.vec(rows * dim, 1.0);
        let w = r.vec(dim, 1.0);
        let g = r.vec(rows * dim, 1.0);
        let dw0 = r.vec(dim, 1.0);
        let (want, want_rstd) = rmsnorm_ref(&x, &w, dim, eps);
        // Reference backward by the closed form (the gradient check covers the formula itself).
        let mut want_dx = vec![0.0; rows * dim];
        let mut want_dw = dw0.clone();
        for rr in 0..rows {
            let rs = want_rstd[rr];
            let o = rr * dim;
            let dot: f64 = (0..dim).map(|j| g[o + j] * w[j] * x[o + j]).sum();
            for j in 0..dim {
                want_dx[o + j] = rs * (g[o + j] * w[j] - x[o + j] * dot * rs * rs / dim as f64);
                want_dw[j] += g[o + j] * x[o + j] * rs;
            }
        }
        for dt in FL {
            if dt == DType::BF16 && rows * dim < 30 {
                continue;
            }
            let (xt, wt) = (upload(&b, &x, dt), upload(&b, &w, dt));
            let (o, rstd) = (poisoned(&b, rows * dim, dt), poisoned(&b, rows, DType::F32));
            b.rmsnorm_fwd(xt.buf, wt.buf, o.buf, rstd.buf, rows, dim, eps as f32)
                .unwrap();
            check("rmsnorm_fwd out", dt, &download(&b, o.buf), &want);
            let rs_got = download(&b, rstd.buf);
            let e = rel_l2(&rs_got, &want_rstd);
            assert!(e < tol(dt), "rmsnorm_fwd rstd {dt}: {e:e}");
            let gt = upload(&b, &g, dt);
            let (dx, dw) = (poisoned(&b, rows * dim, dt), upload(&b, &dw0, DType::F32));
            let rs_ref = upload(&b, &want_rstd, DType::F32);
            b.rmsnorm_bwd(
                gt.buf, xt.buf, wt.buf, rs_ref.buf, dx.buf, dw.buf, rows, dim,
            )
            .unwrap();
            let got_dx = download(&b, dx.buf);
            if dim == 1 {
                // dx = r·g·w·eps/(x²+eps): the two terms cancel almost exactly, so measure the
                // error against the size of the terms, not of their difference.
                let size = (0..rows)
                    .map(|i| (g[i] * w[0] * want_rstd[i]).abs())
                    .fold(0.0, f64::max);
                let err = got_dx
                    .iter()
                    .zip(&want_dx)
                    .map(|(a, c)| (a - c).abs())
                    .fold(0.0, f64::max);
                assert!(
                    err <= tol(dt) * size,
                    "rmsnorm_bwd dx dim 1 {dt}: {err:e} vs term size {size:e}"
                );
            } else {
                check(
                    &format!("rmsnorm_bwd dx rows {rows} dim {dim}"),
                    dt,
                    &got_dx,
                    &want_dx,
                );
            }
            let e = rel_l2(&download(&b, dw.buf), &want_dw);
            assert!(e < tol(dt), "rmsnorm_bwd dw {dt}: {e:e}");

            // Fused residual: h = x + res, out = rmsnorm(h).
            let hx: Vec<f64> = x.iter().zip(&res).map(|(a, c)| a + c).collect();
            let (want_o, _) = rmsnorm_ref(&hx, &w, dim, eps);
            let rt = upload(&b, &res, dt);
            let (h, o2, rs2) = (
                poisoned(&b, rows * dim, dt),
                poisoned(&b, rows * dim, dt),
                poisoned(&b, rows, DType::F32),
            );
            b.rmsnorm_residual_fwd(
                xt.buf, rt.buf, wt.buf, h.buf, o2.buf, rs2.buf, rows, dim, eps as f32,
            )
            .unwrap();
            check("rmsnorm_residual_fwd h", dt, &download(&b, h.buf), &hx);
            check(
                "rmsnorm_residual_fwd out",
                dt,
                &download(&b, o2.buf),
                &want_o,
            );
        }
    }
    // Errors
    let x = poisoned(&b, 14, DType::F32);
    let w = poisoned(&b, 7, DType::F32);
    let rs = poisoned(&b, 2, DType::BF16);
    let o = poisoned(&b, 14, DType::F32);
    assert!(matches!(
        b.rmsnorm_fwd(x.buf, w.buf, o.buf, rs.buf, 2, 7, 1e-5),
        Err(Error::DType {
            op: "rmsnorm_fwd",
            ..
        })
    ));
    let rs = poisoned(&b, 2, DType::F32);
    assert!(matches!(
        b.rmsnorm_fwd(x.buf, w.buf, o.buf, rs.buf, 2, 6, 1e-5),
        Err(Error::Shape {
            op: "rmsnorm_fwd",
            ..
        })
    ));
}

// ---- rope ----------------------------------------------------------------------------------

fn rope_tables(seq: usize, d: usize) -> (Vec<f64>, Vec<f64>) {
    let half = d / 2;
    let mut c = vec![0.0; seq * half];
    let mut s = vec![0.0; seq * half];
    for p in 0..seq {
        for i in 0..half {
            let f = 1.0 / 10000f64.powf(2.0 * i as f64 / d as f64);
            c[p * half + i] = ((p as f64 * f).cos() as f32) as f64;
            s[p * half + i] = ((p as f64 * f).sin() as f32) as f64;
        }
    }
    (c, s)
}

fn rope_ref(x: &[f64], c: &[f64], s: &[f64], sh: RopeShape, inverse: bool) -> Vec<f64> {
    let (d, half) = (sh.head_dim, sh.head_dim / 2);
    let mut out = vec![0.0; x.len()];
    for b in 0..sh.batch {
        for p in 0..sh.seq {
            for h in 0..sh.heads {
                let o = ((b * sh.seq + p) * sh.heads + h) * d;
                for i in 0..half {
                    let (cs, mut sn) = (c[p * half + i], s[p * half + i]);
                    if inverse {
                        sn = -sn;
                    }
                    // rotate_half: out = x * cos + [-x2, x1] * sin
                    out[o + i] = x[o + i] * cs - x[o + half + i] * sn;
                    out[o + half + i] = x[o + half + i] * cs + x[o + i] * sn;
                }
            }
        }
    }
    out
}

#[test]
fn rope_fwd_bwd() {
    let b = be();
    let mut r = Rng::new(40);
    for sh in [
        RopeShape {
            batch: 1,
            seq: 1,
            heads: 1,
            head_dim: 2,
        },
        RopeShape {
            batch: 2,
            seq: 13,
            heads: 3,
            head_dim: 20,
        },
        RopeShape {
            batch: 3,
            seq: 7,
            heads: 5,
            head_dim: 16,
        },
    ] {
        let n = sh.batch * sh.seq * sh.heads * sh.head_dim;
        let x = r.vec(n, 1.0);
        let (c, s) = rope_tables(sh.seq, sh.head_dim);
        let (ct, st) = (upload(&b, &c, DType::F32), upload(&b, &s, DType::F32));
        for dt in FL {
            if dt == DType::BF16 && n < 30 {
                continue;
            }
            let xt = upload(&b, &x, dt);
            let o = poisoned(&b, n, dt);
            b.rope_fwd(xt.buf, o.buf, ct.buf, st.buf, sh).unwrap();
            check(
                "rope_fwd",
                dt,
                &download(&b, o.buf),
                &rope_ref(&x, &c, &s, sh, false),
            );
            let d = poisoned(&b, n, dt);
            b.rope_bwd(xt.buf, d.buf, ct.buf, st.buf, sh).unwrap();
            check(
                "rope_bwd",
                dt,
                &download(&b, d.buf),
                &rope_ref(&x, &c, &s, sh, true),
            );
        }
    }
    let sh = RopeShape {
        batch: 1,
        seq: 2,
        heads: 1,
        head_dim: 3,
    };
    let x = poisoned(&b, 6, DType::F32);
    let o = poisoned(&b, 6, DType::F32);
    let c = poisoned(&b, 2, DType::F32);
    assert!(matches!(
        b.rope_fwd(x.buf, o.buf, c.buf, c.buf, sh),
        Err(Error::Shape { op: "rope_fwd", .. })
    ));
    let ch = poisoned(&b, 2, DType::BF16);
    let sh = RopeShape {
        batch: 1,
        seq: 2,
        heads: 1,
        head_dim: 2,
    };
    let x = poisoned(&b, 4, DType::F32);
    let o = poisoned(&b, 4, DType::F32);
    assert!(matches!(
        b.rope_bwd(x.buf, o.buf, ch.buf, ch.buf, sh),
        Err(Error::DType { op: "rope_bwd", .. })
    ));
}

// ---- attention -----------------------------------------------------------------------------

struct AttnRef {
    out: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

fn attention_ref(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    s: AttnShape,
    scale: f64,
) -> AttnRef {
    let (sq, h, hk, d) = (s.seq, s.n_heads, s.n_kv_heads, s.head_dim);
    let qi = |b: usize, t: usize, hh: usize| ((b * sq + t) * h + hh) * d;
    let ki = |b: usize, t: usize, hh: usize| ((b * sq + t) * hk + hh) * d;
    let mut r = AttnRef {
        out: vec![0.0; s.q_len()],
        lse: vec![0.0; s.lse_len()],
        dq: vec![0.0; s.q_len()],
        dk: vec![0.0; s.kv_len()],
        dv: vec![0.0; s.kv_len()],
    };
    for b in 0..s.batch {
        for hh in 0..h {
            let kh = hh / (h / hk);
            for i in 0..sq {
                let sc: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..d)
                            .map(|e| q[qi(b, i, hh) + e] * k[ki(b, j, kh) + e])
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                let p: Vec<f64> = sc.iter().map(|x| (x - mx).exp() / z).collect();
                r.lse[(b * h + hh) * sq + i] = mx + z.ln();
                for (j, &pj) in p.iter().enumerate() {
                    for e in 0..d {
                        r.out[qi(b, i, hh) + e] += pj * v[ki(b, j, kh) + e];
                    }
                }
                let dp: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..d)
                            .map(|e| dout[qi(b, i, hh) + e] * v[ki(b, j, kh) + e])
                            .sum()
                    })
                    .collect();
                let delta: f64 = p.iter().zip(&dp).map(|(a, c)| a * c).sum();
                for j in 0..=i {
                    let ds = p[j] * (dp[j] - delta) * scale;
                    for e in 0..d {
                        r.dq[qi(b, i, hh) + e] += ds * k[ki(b, j, kh) + e];
                        r.dk[ki(b, j, kh) + e] += ds * q[qi(b, i, hh) + e];
                        r.dv[ki(b, j, kh) + e] += p[j] * dout[qi(b, i, hh) + e];
                    }
                }
            }
        }
    }
    r
}

#[test]
fn attention_fwd_bwd_vs_reference() {
    let b = be();
    let mut rng = Rng::new(50);
    for (batch, seq, nh, nkv, hd) in [
        (2, 1, 6, 2, 16),
        (2, 13, 6, 2, 16),
        (1, 67, 3, 3, 20),
        (2, 67, 6, 2, 20),
        (1, 150, 4, 1, 16),
        (2, 300, 2, 1, 16),
    ] {
        let s = AttnShape {
            batch,
            seq,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let (q, k, v) = (
            rng.vec(s.q_len(), 1.5),
            rng.vec(s.kv_len(), 1.5),
            rng.vec(s.kv_len(), 1.0),
        );
        let dout = rng.vec(s.q_len(), 1.0);
        let want = attention_ref(&q, &k, &v, &dout, s, scale);
        for dt in FL {
            let (qt, kt, vt) = (upload(&b, &q, dt), upload(&b, &k, dt), upload(&b, &v, dt));
            let (o, l) = (
                poisoned(&b, s.q_len(), dt),
                poisoned(&b, s.lse_len(), DType::F32),
            );
            b.attention_fwd(qt.buf, kt.buf, vt.buf, o.buf, l.buf, s, scale as f32)
                .unwrap();
            check(
                &format!("attention_fwd out {s:?}"),
                dt,
                &download(&b, o.buf),
                &want.out,
            );
            let e = rel_l2(&download(&b, l.buf), &want.lse);
            assert!(e < tol(dt), "attention_fwd lse {dt} {s:?}: {e:e}");
            // Backward from the op's own forward results, like training does.
            let gt = upload(&b, &dout, dt);
            let (dq, dk, dv) = (
                poisoned(&b, s.q_len(), dt),
                poisoned(&b, s.kv_len(), dt),
                poisoned(&b, s.kv_len(), dt),
            );
            b.attention_bwd(
                qt.buf,
                kt.buf,
                vt.buf,
                o.buf,
                gt.buf,
                l.buf,
                dq.buf,
                dk.buf,
                dv.buf,
                s,
                scale as f32,
            )
            .unwrap();
            // bf16 rounding of `out` enters delta; the gradients stay within the bf16 band.
            check(
                &format!("attention_bwd dq {s:?}"),
                dt,
                &download(&b, dq.buf),
                &want.dq,
            );
            check(
                &format!("attention_bwd dk {s:?}"),
                dt,
                &download(&b, dk.buf),
                &want.dk,
            );
            check(
                &format!("attention_bwd dv {s:?}"),
                dt,
                &download(&b, dv.buf),
                &want.dv,
            );
            // Deterministic: a second run is bitwise identical.
            let dk2 = poisoned(&b, s.kv_len(), dt);
            b.attention_bwd(
                qt.buf,
                kt.buf,
                vt.buf,
                o.buf,
                gt.buf,
                l.buf,
                dq.buf,
                dk2.buf,
                dv.buf,
                s,
                scale as f32,
            )
            .unwrap();
            assert_eq!(download(&b, dk.buf), download(&b, dk2.buf));
        }
    }
}

#[test]
fn attention_errors() {
    let b = be();
    let s = AttnShape {
        batch: 1,
        seq: 3,
        n_heads: 4,
        n_kv_heads: 3,
        head_dim: 2,
    };
    let q = poisoned(&b, 24, DType::F32);
    let k = poisoned(&b, 18, DType::F32);
    let o = poisoned(&b, 24, DType::F32);
    let l = poisoned(&b, 12, DType::F32);
    assert!(matches!(
        b.attention_fwd(q.buf, k.buf, k.buf, o.buf, l.buf, s, 1.0),
        Err(Error::Shape {
            op: "attention_fwd",
            ..
        })
    ));
    let s = AttnShape { n_kv_heads: 2, ..s };
    let k = poisoned(&b, 12, DType::F32);
    let lb = poisoned(&b, 12, DType::BF16);
    assert!(matches!(
        b.attention_fwd(q.buf, k.buf, k.buf, o.buf, lb.buf, s, 1.0),
        Err(Error::DType {
            op: "attention_fwd",
            ..
        })
    ));
    let short = poisoned(&b, 11, DType::F32);
    assert!(matches!(
        b.attention_fwd(q.buf, k.buf, short.buf, o.buf, l.buf, s, 1.0),
        Err(Error::Shape {
            op: "attention_fwd",
            ..
        })
    ));
    let (dq, dk, dv) = (
        poisoned(&b, 24, DType::F32),
        poisoned(&b, 12, DType::F32),
        poisoned(&b, 12, DType::I32),
    );
    let r = b.attention_bwd(
        q.buf, k.buf, k.buf, o.buf, o.buf, l.buf, dq.buf, dk.buf, dv.buf, s, 1.0,
    );
    assert!(matches!(
        r,
        Err(Error::DType {
            op: "attention_bwd",
            ..
        })
    ));
}

// ---- swiglu --------------------------------------------------------------------------------

#[test]
fn swiglu_fwd_bwd() {
    let b = be();
    let mut r = Rng::new(60);
    for n in [1usize, 37, 5003] {
        let (g, u, d) = (r.vec(n, 6.0), r.vec(n, 1.0), r.vec(n, 1.0));
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        let want: Vec<f64> = g.iter().zip(&u).map(|(&g, &u)| g * sig(g) * u).collect();
        let want_dg: Vec<f64> = (0..n)
            .map(|i| d[i] * u[i] * sig(g[i]) * (1.0 + g[i] * (1.0 - sig(g[i]))))
            .collect();
        let want_du: Vec<f64> = (0..n).map(|i| d[i] * g[i] * sig(g[i])).collect();
        for dt in FL {
            if dt == DType::BF16 && n < 30 {
                continue;
            }
            let (gt, ut, dtt) = (upload(&b, &g, dt), upload(&b, &u, dt), upload(&b, &d, dt));
            let o = poisoned(&b, n, dt);
            b.swiglu_fwd(gt.buf, ut.buf, o.buf).unwrap();
            check("swiglu_fwd", dt, &download(&b, o.buf), &want);
            let (dg, du) = (poisoned(&b, n, dt), poisoned(&b, n, dt));
            b.swiglu_bwd(dtt.buf, gt.buf, ut.buf, dg.buf, du.buf)
                .unwrap();
            check("swiglu_bwd dgate", dt, &download(&b, dg.buf), &want_dg);
            check("swiglu_bwd dup", dt, &download(&b, du.buf), &want_du);
        }
    }
    let a = poisoned(&b, 5, DType::F32);
    let c = poisoned(&b, 4, DType::F32);
    assert!(matches!(
        b.swiglu_fwd(a.buf, a.buf, c.buf),
        Err(Error::Shape {
            op: "swiglu_fwd",
            ..
        })
    ));
    let i = poisoned(&b, 5, DType::I32);
    let o = poisoned(&b, 5, DType::F32);
    assert!(matches!(
        b.swiglu_fwd(a.buf, i.buf, o.buf),
        Err(Error::DType {
            op: "swiglu_fwd",
            ..
        })
    ));
}

// ---- cross entropy -------------------------------------------------------------------------

#[test]
fn cross_entropy_fused() {
    let b = be();
    let mut r = Rng::new(70);
    let ignore = -100;
    for (rows, vocab) in [(1, 1), (7, 37), (13, 2003)] {
        let logits = r.vec(rows * vocab, 8.0);
        let targets: Vec<i32> = (0..rows)
            .map(|i: usize| {
                if i % 4 == 3 {
                    ignore
                } else {
                    r.below(vocab) as i32
                }
            })
            .collect();
        let gs = 0.37;
        let mut want_l = vec![0.0; rows];
        let mut want_d = vec![0.0; rows * vocab];
        for i in 0..rows {
            if targets[i] == ignore {
                continue;
            }
            let x = &logits[i * vocab..(i + 1) * vocab];
            let mx = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = x.iter().map(|v| (v - mx).exp()).sum();
            want_l[i] = mx + z.ln() - x[targets[i] as usize];
            for j in 0..vocab {
                let onehot = if j == targets[i] as usize { 1.0 } else { 0.0 };
                want_d[i * vocab + j] = ((x[j] - mx).exp() / z - onehot) * gs;
            }
        }
        let tt = upload_i32(&b, &targets);
        for dt in FL {
            if dt == DType::BF16 && vocab < 30 {
                continue;
            }
            let lt = upload(&b, &logits, dt);
            let (ls, d) = (
                poisoned(&b, rows, DType::F32),
                poisoned(&b, rows * vocab, dt),
            );
            b.cross_entropy(
                lt.buf, tt.buf, ls.buf, d.buf, rows, vocab, ignore, gs as f32,
            )
            .unwrap();
            let e = rel_l2(&download(&b, ls.buf), &want_l);
            // bf16 logits: the loss error is relative to the logits' rounding, within the band.
            assert!(e < tol(dt), "cross_entropy loss {dt}: {e:e}");
            if vocab > 1 {
                check("cross_entropy dlogits", dt, &download(&b, d.buf), &want_d);
            } else {
                assert!(download(&b, d.buf).iter().all(|&x| x == 0.0));
            }
            // dlogits written over logits.
            let ls2 = poisoned(&b, rows, DType::F32);
            b.cross_entropy(
                lt.buf, tt.buf, ls2.buf, lt.buf, rows, vocab, ignore, gs as f32,
            )
            .unwrap();
            assert_eq!(download(&b, lt.buf), download(&b, d.buf));
            assert_eq!(download(&b, ls2.buf), download(&b, ls.buf));
        }
    }
    let lt = poisoned(&b, 6, DType::F32);
    let bad = upload_i32(&b, &[1, 3]);
    let (ls, d) = (poisoned(&b, 2, DType::F32), poisoned(&b, 6, DType::F32));
    let e = b.cross_entropy(lt.buf, bad.buf, ls.buf, d.buf, 2, 3, -100, 1.0);
    assert!(matches!(
        e,
        Err(Error::Shape {
            op: "cross_entropy",
            ..
        })
    ));
    let fl = poisoned(&b, 2, DType::F32);
    let e = b.cross_entropy(lt.buf, fl.buf, ls.buf, d.buf, 2, 3, -100, 1.0);
    assert!(matches!(
        e,
        Err(Error::DType {
            op: "cross_entropy",
            ..
        })
    ));
}

// ---- reductions / optimizer ----------------------------------------------------------------

#[test]
fn sum_sum_squares_clip_coef() {
    let b = be();
    let mut r = Rng::new(80);
    let xs: Vec<Vec<f64>> = [1usize, 37, 100_003]
        .iter()
        .map(|&n| r.vec(n, 1.0))
        .collect();
    let ts: Vec<_> = xs.iter().map(|x| upload(&b, x, DType::F32)).collect();
    let out = poisoned(&b, 1, DType::F32);
    for (x, t) in xs.iter().zip(&ts) {
        b.sum(t.buf, out.buf).unwrap();
        let want: f64 = x.iter().sum();
        let got = download(&b, out.buf)[0];
        assert!(
            (got - want).abs() <= 1e-6 * x.iter().map(|v| v.abs()).sum::<f64>(),
            "sum {got} vs {want}"
        );
    }
    let bufs: Vec<Buf> = ts.iter().map(|t| t.buf).collect();
    b.sum_squares(&bufs, out.buf).unwrap();
    let want: f64 = xs.iter().flatten().map(|v| v * v).sum();
    let got = download(&b, out.buf)[0];
    assert!(
        ((got - want) / want).abs() < 1e-6,
        "sum_squares {got} vs {want}"
    );
    // Deterministic: bitwise the same twice.
    let out2 = poisoned(&b, 1, DType::F32);
    b.sum_squares(&bufs, out2.buf).unwrap();
    assert_eq!(download(&b, out.buf), download(&b, out2.buf));

    let coef = poisoned(&b, 1, DType::F32);
    for (nsq, maxn) in [(100.0f64, 1.0f64), (0.25, 1.0), (0.0, 1.0)] {
        let n = upload(&b, &[nsq], DType::F32);
        b.clip_coef(n.buf, maxn as f32, coef.buf).unwrap();
        let want = (maxn / (nsq.sqrt() + 1e-6)).min(1.0);
        assert!((download(&b, coef.buf)[0] - want).abs() < 1e-6);
    }
    let i = poisoned(&b, 3, DType::I32);
    assert!(matches!(
        b.sum(i.buf, out.buf),
        Err(Error::DType { op: "sum", .. })
    ));
    let two = poisoned(&b, 2, DType::F32);
    assert!(matches!(
        b.sum(ts[1].buf, two.buf),
        Err(Error::Shape { op: "sum", .. })
    ));
}

#[test]
fn adamw_three_steps_vs_f64() {
    let b = be();
    let mut r = Rng::new(90);
    let n = 1037;
    let p0 = r.vec(n, 1.0);
    let grads: Vec<Vec<f64>> = (0..3).map(|_| r.vec(n, 0.1)).collect();
    let hp0 = AdamW {
        lr: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 0,
    };
    let gs = 0.5f64;
    let (p, m, v) = (
        upload(&b, &p0, DType::F32),
        poisoned(&b, n, DType::F32),
        poisoned(&b, n, DType::F32),
    );
    b.fill(m.buf, 0.0).unwrap();
    b.fill(v.buf, 0.0).unwrap();
    let comp = poisoned(&b, n, DType::BF16);
    let gst = upload(&b, &[gs], DType::F32);
    let (mut pr, mut mr, mut vr) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
    for (t, g) in grads.iter().enumerate() {
        let hp = AdamW {
            step: t as u64 + 1,
            ..hp0
        };
        let gt = upload(&b, g, DType::F32);
        b.adamw(p.buf, gt.buf, m.buf, v.buf, Some(comp.buf), gst.buf, &hp)
            .unwrap();
        // Hand-written torch.optim.AdamW step in f64.
        let (lr, b1, b2, eps, wd) = (
            hp.lr as f64,
            hp.beta1 as f64,
            hp.beta2 as f64,
            hp.eps as f64,
            hp.weight_decay as f64,
        );
        let step = (t + 1) as i32;
        for i in 0..n {
            let gi = g[i] * gs;
            pr[i] *= 1.0 - lr * wd;
            mr[i] = b1 * mr[i] + (1.0 - b1) * gi;
            vr[i] = b2 * vr[i] + (1.0 - b2) * gi * gi;
            let mh = mr[i] / (1.0 - b1.powi(step));
            let vh = vr[i] / (1.0 - b2.powi(step));
            pr[i] -= lr * mh / (vh.sqrt() + eps);
        }
    }
    check("adamw param", DType::F32, &download(&b, p.buf), &pr);
    check("adamw m", DType::F32, &download(&b, m.buf), &mr);
    check("adamw v", DType::F32, &download(&b, v.buf), &vr);
    check(
        "adamw compute copy",
        DType::BF16,
        &download(&b, comp.buf),
        &pr,
    );
    let hp = AdamW { step: 1, ..hp0 };
    let h = poisoned(&b, n, DType::BF16);
    assert!(matches!(
        b.adamw(h.buf, p.buf, m.buf, v.buf, None, gst.buf, &hp),
        Err(Error::DType { op: "adamw", .. })
    ));
    let short = poisoned(&b, n - 1, DType::F32);
    assert!(matches!(
        b.adamw(p.buf, short.buf, m.buf, v.buf, None, gst.buf, &hp),
        Err(Error::Shape { op: "adamw", .. })
    ));
}

// ---- determinism across thread counts -----------------------------------------------------

/// Runs `f` on a private rayon pool of `threads` threads.
fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
}

#[test]
fn reductions_and_backwards_are_bitwise_identical_for_any_thread_count() {
    let b = be();
    let mut r = Rng::new(100);
    let s = AttnShape {
        batch: 2,
        seq: 300,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 16,
    };
    let (q, k, v, g) = (
        r.vec(s.q_len(), 1.0),
        r.vec(s.kv_len(), 1.0),
        r.vec(s.kv_len(), 1.0),
        r.vec(s.q_len(), 1.0),
    );
    let (rows, dim, vocab) = (333, 96, 50);
    let (x, w, dy) = (
        r.vec(rows * dim, 1.0),
        r.vec(dim, 1.0),
        r.vec(rows * dim, 1.0),
    );
    let ids: Vec<i32> = (0..rows).map(|_| r.below(vocab) as i32).collect();
    let big = r.vec(300_007, 1.0);
    let (ga, gb) = (r.vec(257 * 129, 1.0), r.vec(129 * 300, 1.0));
    let run = || {
        let f = |d: &[f64]| upload(&b, d, DType::F32);
        let (qt, kt, vt, gt) = (f(&q), f(&k), f(&v), f(&g));
        let (o, l) = (
            poisoned(&b, s.q_len(), DType::F32),
            poisoned(&b, s.lse_len(), DType::F32),
        );
        b.attention_fwd(qt.buf, kt.buf, vt.buf, o.buf, l.buf, s, 0.25)
            .unwrap();
        let (dq, dk, dv) = (
            poisoned(&b, s.q_len(), DType::F32),
            poisoned(&b, s.kv_len(), DType::F32),
            poisoned(&b, s.kv_len(), DType::F32),
        );
        b.attention_bwd(
            qt.buf, kt.buf, vt.buf, o.buf, gt.buf, l.buf, dq.buf, dk.buf, dv.buf, s, 0.25,
        )
        .unwrap();
        let (xt, wt, dyt) = (f(&x), f(&w), f(&dy));
        let (dx, dw, rs) = (
            poisoned(&b, rows * dim, DType::F32),
            f(&vec![0.0; dim]),
            f(&vec![1.0; rows]),
        );
        b.rmsnorm_bwd(dyt.buf, xt.buf, wt.buf, rs.buf, dx.buf, dw.buf, rows, dim)
            .unwrap();
        let idt = upload_i32(&b, &ids);
        let dtab = f(&vec![0.0; vocab * dim]);
        b.embedding_bwd(dyt.buf, idt.buf, dtab.buf, dim).unwrap();
        let (bt, sq) = (f(&big), poisoned(&b, 1, DType::F32));
        b.sum_squares(&[bt.buf, xt.buf], sq.buf).unwrap();
        let (at, btt, ct) = (f(&ga), f(&gb), poisoned(&b, 257 * 300, DType::F32));
        b.gemm(
            &Gemm::new(257, 300, 129, false, false, 0.0),
            at.buf,
            btt.buf,
            ct.buf,
        )
        .unwrap();
        [
            o.buf, l.buf, dq.buf, dk.buf, dv.buf, dx.buf, dw.buf, dtab.buf, sq.buf, ct.buf,
        ]
        .iter()
        .map(|x| download(&b, *x))
        .collect::<Vec<_>>()
    };
    let one = on_threads(1, run);
    let three = on_threads(3, run);
    for (i, (a, c)) in one.iter().zip(&three).enumerate() {
        assert!(a.iter().all(|x| x.is_finite()), "output {i} not finite");
        assert_eq!(a, c, "output {i} differs between 1 and 3 threads");
    }
}
