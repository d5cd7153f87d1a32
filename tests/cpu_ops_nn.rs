//! The CPU backend's attention, swiglu, loss, reductions and optimizer against naive f64
//! references (odd sizes, outputs poisoned with NaN first, f32 and bf16 storage), their errors,
//! and bitwise determinism across thread counts. See cpu_ops.rs for the other ops.
// Index loops keep the naive references close to the math they transcribe.
#![allow(clippy::needless_range_loop)]

mod cpu_common;

use cpu_common::*;
use titan::backend::cpu::CpuBackend;
use titan::backend::{
    AdamW, AdamWBufs, AttnBwd, AttnFwd, AttnShape, Backend, Buf, CrossEntropy, Gemm, RmsNormBwd,
};
use titan::{DType, Error};

const FL: [DType; 2] = [DType::F32, DType::BF16];

fn be() -> CpuBackend {
    CpuBackend::new()
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
        // Longer than the short-sequence tile threshold: 64-row tiles, several per head.
        (1, 577, 2, 1, 16),
        // Head dims 16/32/64 take the AVX-512 kernels where the CPU has them; 128 and 24 the
        // tile code (24 at a length with several long tiles).
        (1, 150, 4, 2, 32),
        (2, 70, 2, 1, 64),
        (1, 45, 2, 2, 128),
        (1, 577, 2, 1, 24),
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
            b.attention_fwd(&AttnFwd {
                q: qt.buf,
                k: kt.buf,
                v: vt.buf,
                out: o.buf,
                lse: l.buf,
                shape: s,
                scale: scale as f32,
            })
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
            let bwd = AttnBwd {
                q: qt.buf,
                k: kt.buf,
                v: vt.buf,
                out: o.buf,
                dout: gt.buf,
                lse: l.buf,
                dq: dq.buf,
                dk: dk.buf,
                dv: dv.buf,
                shape: s,
                scale: scale as f32,
            };
            b.attention_bwd(&bwd).unwrap();
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
            b.attention_bwd(&AttnBwd { dk: dk2.buf, ..bwd }).unwrap();
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
    let fwd = AttnFwd {
        q: q.buf,
        k: k.buf,
        v: k.buf,
        out: o.buf,
        lse: l.buf,
        shape: s,
        scale: 1.0,
    };
    assert!(matches!(
        b.attention_fwd(&fwd),
        Err(Error::Shape {
            op: "attention_fwd",
            ..
        })
    ));
    let s = AttnShape { n_kv_heads: 2, ..s };
    let k = poisoned(&b, 12, DType::F32);
    let lb = poisoned(&b, 12, DType::BF16);
    let fwd = AttnFwd {
        k: k.buf,
        v: k.buf,
        lse: lb.buf,
        shape: s,
        ..fwd
    };
    assert!(matches!(
        b.attention_fwd(&fwd),
        Err(Error::DType {
            op: "attention_fwd",
            ..
        })
    ));
    let short = poisoned(&b, 11, DType::F32);
    let fwd = AttnFwd {
        v: short.buf,
        lse: l.buf,
        ..fwd
    };
    assert!(matches!(
        b.attention_fwd(&fwd),
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
    let r = b.attention_bwd(&AttnBwd {
        q: q.buf,
        k: k.buf,
        v: k.buf,
        out: o.buf,
        dout: o.buf,
        lse: l.buf,
        dq: dq.buf,
        dk: dk.buf,
        dv: dv.buf,
        shape: s,
        scale: 1.0,
    });
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
            let ce = CrossEntropy {
                logits: lt.buf,
                targets: tt.buf,
                losses: ls.buf,
                dlogits: d.buf,
                rows,
                vocab,
                ignore_index: ignore,
                grad_scale: gs as f32,
            };
            b.cross_entropy(&ce).unwrap();
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
            b.cross_entropy(&CrossEntropy {
                losses: ls2.buf,
                dlogits: lt.buf,
                ..ce
            })
            .unwrap();
            assert_eq!(download(&b, lt.buf), download(&b, d.buf));
            assert_eq!(download(&b, ls2.buf), download(&b, ls.buf));
        }
    }
    let lt = poisoned(&b, 6, DType::F32);
    let bad = upload_i32(&b, &[1, 3]);
    let (ls, d) = (poisoned(&b, 2, DType::F32), poisoned(&b, 6, DType::F32));
    let ce = CrossEntropy {
        logits: lt.buf,
        targets: bad.buf,
        losses: ls.buf,
        dlogits: d.buf,
        rows: 2,
        vocab: 3,
        ignore_index: -100,
        grad_scale: 1.0,
    };
    let e = b.cross_entropy(&ce);
    assert!(matches!(
        e,
        Err(Error::Shape {
            op: "cross_entropy",
            ..
        })
    ));
    let fl = poisoned(&b, 2, DType::F32);
    let e = b.cross_entropy(&CrossEntropy {
        targets: fl.buf,
        ..ce
    });
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
        let bufs = AdamWBufs {
            param: p.buf,
            grad: gt.buf,
            m: m.buf,
            v: v.buf,
            compute: Some(comp.buf),
            grad_scale: gst.buf,
        };
        b.adamw(&bufs, &hp).unwrap();
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
    let bufs = AdamWBufs {
        param: h.buf,
        grad: p.buf,
        m: m.buf,
        v: v.buf,
        compute: None,
        grad_scale: gst.buf,
    };
    assert!(matches!(
        b.adamw(&bufs, &hp),
        Err(Error::DType { op: "adamw", .. })
    ));
    let short = poisoned(&b, n - 1, DType::F32);
    let bufs = AdamWBufs {
        param: p.buf,
        grad: short.buf,
        ..bufs
    };
    assert!(matches!(
        b.adamw(&bufs, &hp),
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
        b.attention_fwd(&AttnFwd {
            q: qt.buf,
            k: kt.buf,
            v: vt.buf,
            out: o.buf,
            lse: l.buf,
            shape: s,
            scale: 0.25,
        })
        .unwrap();
        let (dq, dk, dv) = (
            poisoned(&b, s.q_len(), DType::F32),
            poisoned(&b, s.kv_len(), DType::F32),
            poisoned(&b, s.kv_len(), DType::F32),
        );
        b.attention_bwd(&AttnBwd {
            q: qt.buf,
            k: kt.buf,
            v: vt.buf,
            out: o.buf,
            dout: gt.buf,
            lse: l.buf,
            dq: dq.buf,
            dk: dk.buf,
            dv: dv.buf,
            shape: s,
            scale: 0.25,
        })
        .unwrap();
        let (xt, wt, dyt) = (f(&x), f(&w), f(&dy));
        let (dx, dw, rs) = (
            poisoned(&b, rows * dim, DType::F32),
            f(&vec![0.0; dim]),
            f(&vec![1.0; rows]),
        );
        b.rmsnorm_bwd(&RmsNormBwd {
            dout: dyt.buf,
            x: xt.buf,
            w: wt.buf,
            rstd: rs.buf,
            dx: dx.buf,
            dw: dw.buf,
            rows,
            dim,
        })
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
        // Aᵀ·B, the weight-gradient product (its own AVX-512 kernel, slabs of C per thread).
        let ctn = poisoned(&b, 257 * 300, DType::F32);
        b.gemm(
            &Gemm::new(257, 300, 129, true, false, 0.0),
            at.buf,
            btt.buf,
            ctn.buf,
        )
        .unwrap();
        [
            o.buf, l.buf, dq.buf, dk.buf, dv.buf, dx.buf, dw.buf, dtab.buf, sq.buf, ct.buf, ctn.buf,
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
