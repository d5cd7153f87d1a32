//! The CPU backend's memory, elementwise, gemm, embedding, rmsnorm and rope ops against naive
//! f64 references, at odd sizes, with outputs poisoned (NaN) first, in f32 and bf16 storage;
//! plus their dtype / shape errors. Attention and the rest: cpu_ops_nn.rs.
// Index loops keep the naive references close to the math they transcribe.
#![allow(clippy::needless_range_loop)]

mod cpu_common;

use cpu_common::*;
use titan::backend::cpu::CpuBackend;
use titan::backend::{Backend, Gemm, RmsNorm, RmsNormBwd, RmsNormResidual, RopeShape};
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
    // Large enough for the parallel copy (pieces of 256 KiB and a ragged last one).
    let src = r.vec(300_007, 3.0);
    let s = upload(&b, &src, DType::F32);
    let d = poisoned(&b, 300_007, DType::F32);
    b.copy(s.buf, d.buf).unwrap();
    assert_eq!(download(&b, d.buf), download(&b, s.buf));
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
        // Aᵀ·B's AVX-512 kernel: partial row tiles and strips, column tails (64 + 19, and
        // 3·64 + 8), several k-blocks, slabs split by rows and by columns.
        (301, 83, 517),
        (40, 200, 300),
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
            b.rmsnorm_fwd(&RmsNorm {
                x: xt.buf,
                w: wt.buf,
                out: o.buf,
                rstd: rstd.buf,
                rows,
                dim,
                eps: eps as f32,
            })
            .unwrap();
            check("rmsnorm_fwd out", dt, &download(&b, o.buf), &want);
            let rs_got = download(&b, rstd.buf);
            let e = rel_l2(&rs_got, &want_rstd);
            assert!(e < tol(dt), "rmsnorm_fwd rstd {dt}: {e:e}");
            let gt = upload(&b, &g, dt);
            let (dx, dw) = (poisoned(&b, rows * dim, dt), upload(&b, &dw0, DType::F32));
            let rs_ref = upload(&b, &want_rstd, DType::F32);
            let bwd = RmsNormBwd {
                dout: gt.buf,
                x: xt.buf,
                w: wt.buf,
                rstd: rs_ref.buf,
                dx: dx.buf,
                dw: dw.buf,
                rows,
                dim,
            };
            b.rmsnorm_bwd(&bwd).unwrap();
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
            // With the residual stream's gradient added in the same pass.
            let (dx2, dw2) = (poisoned(&b, rows * dim, dt), upload(&b, &dw0, DType::F32));
            let rest = upload(&b, &res, dt);
            let bwd2 = RmsNormBwd {
                dx: dx2.buf,
                dw: dw2.buf,
                ..bwd
            };
            b.rmsnorm_bwd_add(&bwd2, rest.buf).unwrap();
            if dim > 1 {
                let want: Vec<f64> = want_dx.iter().zip(&res).map(|(a, c)| a + c).collect();
                check("rmsnorm_bwd_add dx", dt, &download(&b, dx2.buf), &want);
            }
            let e = rel_l2(&download(&b, dw2.buf), &want_dw);
            assert!(e < tol(dt), "rmsnorm_bwd_add dw {dt}: {e:e}");

            // Fused residual: h = x + res, out = rmsnorm(h).
            let hx: Vec<f64> = x.iter().zip(&res).map(|(a, c)| a + c).collect();
            let (want_o, _) = rmsnorm_ref(&hx, &w, dim, eps);
            let rt = upload(&b, &res, dt);
            let (h, o2, rs2) = (
                poisoned(&b, rows * dim, dt),
                poisoned(&b, rows * dim, dt),
                poisoned(&b, rows, DType::F32),
            );
            b.rmsnorm_residual_fwd(&RmsNormResidual {
                x: xt.buf,
                residual: rt.buf,
                w: wt.buf,
                h: h.buf,
                out: o2.buf,
                rstd: rs2.buf,
                rows,
                dim,
                eps: eps as f32,
            })
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
    let a = RmsNorm {
        x: x.buf,
        w: w.buf,
        out: o.buf,
        rstd: rs.buf,
        rows: 2,
        dim: 7,
        eps: 1e-5,
    };
    assert!(matches!(
        b.rmsnorm_fwd(&a),
        Err(Error::DType {
            op: "rmsnorm_fwd",
            ..
        })
    ));
    let rs = poisoned(&b, 2, DType::F32);
    let a = RmsNorm {
        rstd: rs.buf,
        dim: 6,
        ..a
    };
    assert!(matches!(
        b.rmsnorm_fwd(&a),
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
        // The AVX-512 paths: head dim 16 above (both halves in one vector), 32 and 64 here.
        RopeShape {
            batch: 2,
            seq: 9,
            heads: 3,
            head_dim: 32,
        },
        RopeShape {
            batch: 1,
            seq: 5,
            heads: 2,
            head_dim: 64,
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
