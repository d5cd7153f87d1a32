//! Finite-difference gradient checks, in f64, of every backward kernel of the CPU backend. The
//! kernels are generic over `Float`, so this runs the very code the backend runs in f32.
//! For an op y = f(x) and a fixed random R, L = Σ y·R; the backward fed dout = R must equal the
//! central difference (L(x + h) − L(x − h)) / 2h on every checked coordinate.

mod cpu_common;

use cpu_common::{rel_l2, Rng};
use titan::backend::cpu::attention::{self, AttnBwdSlices};
use titan::backend::cpu::rmsnorm::{self, RmsNormBwdSlices};
use titan::backend::cpu::{cross_entropy, embedding, gemm, rope, swiglu};
use titan::backend::{AttnShape, Gemm, RopeShape};

const H: f64 = 1e-6;
const TOL: f64 = 1e-6;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compares `grad` with central differences of `loss` at `x`, on at most `max` coordinates
/// (spread evenly, always including the first and last).
fn fd_check(what: &str, x: &[f64], grad: &[f64], max: usize, loss: impl Fn(&[f64]) -> f64) {
    assert_eq!(x.len(), grad.len(), "{what}: gradient length");
    let n = x.len();
    let step = n.div_ceil(max.max(1)).max(1);
    let mut idx: Vec<usize> = (0..n).step_by(step).collect();
    if n > 0 && *idx.last().unwrap() != n - 1 {
        idx.push(n - 1);
    }
    let mut num = Vec::new();
    let mut ana = Vec::new();
    let mut xp = x.to_vec();
    for &i in &idx {
        xp[i] = x[i] + H;
        let lp = loss(&xp);
        xp[i] = x[i] - H;
        let lm = loss(&xp);
        xp[i] = x[i];
        num.push((lp - lm) / (2.0 * H));
        ana.push(grad[i]);
    }
    let e = rel_l2(&ana, &num);
    assert!(
        e < TOL,
        "{what}: analytic vs finite-difference relative L2 {e:e} over {} coords",
        idx.len()
    );
}

#[test]
fn gradcheck_gemm_all_transposes() {
    let mut r = Rng::new(1);
    for (m, n, k) in [(1, 1, 1), (7, 5, 3), (13, 11, 17)] {
        for ta in [false, true] {
            for tb in [false, true] {
                let mut g = Gemm::new(m, n, k, ta, tb, 0.0);
                g.alpha = 0.7;
                let (a, b, rr) = (r.vec(m * k, 1.0), r.vec(k * n, 1.0), r.vec(m * n, 1.0));
                let fwd = |a: &[f64], b: &[f64]| {
                    let mut c = vec![f64::NAN; m * n];
                    gemm::gemm_kernel(&g, a, b, &mut c).unwrap();
                    dot(&c, &rr)
                };
                // The backward GEMMs a tape issues for C = α·op(A)·op(B).
                let mut da = vec![f64::NAN; m * k];
                let mut db = vec![f64::NAN; k * n];
                let mut ga = if ta {
                    Gemm::new(k, m, n, tb, true, 0.0)
                } else {
                    Gemm::new(m, k, n, false, !tb, 0.0)
                };
                ga.alpha = g.alpha;
                if ta {
                    gemm::gemm_kernel(&ga, &b, &rr, &mut da).unwrap();
                } else {
                    gemm::gemm_kernel(&ga, &rr, &b, &mut da).unwrap();
                }
                let mut gb = if tb {
                    Gemm::new(n, k, m, true, ta, 0.0)
                } else {
                    Gemm::new(k, n, m, !ta, false, 0.0)
                };
                gb.alpha = g.alpha;
                if tb {
                    gemm::gemm_kernel(&gb, &rr, &a, &mut db).unwrap();
                } else {
                    gemm::gemm_kernel(&gb, &a, &rr, &mut db).unwrap();
                }
                let tag = format!("gemm m{m} n{n} k{k} ta {ta} tb {tb}");
                fd_check(&format!("{tag} dA"), &a, &da, 400, |a| fwd(a, &b));
                fd_check(&format!("{tag} dB"), &b, &db, 400, |b| fwd(&a, b));
            }
        }
    }
}

#[test]
fn gradcheck_embedding() {
    let mut r = Rng::new(2);
    let (vocab, dim, rows) = (11, 7, 19);
    let ids: Vec<i32> = (0..rows)
        .map(|i: usize| {
            if i.is_multiple_of(3) {
                4
            } else {
                r.below(vocab) as i32
            }
        })
        .collect();
    let (table, rr) = (r.vec(vocab * dim, 1.0), r.vec(rows * dim, 1.0));
    let loss = |t: &[f64]| {
        let mut out = vec![f64::NAN; rows * dim];
        embedding::embedding_fwd(t, &ids, &mut out, dim).unwrap();
        dot(&out, &rr)
    };
    let mut dt = vec![0.0; vocab * dim];
    embedding::embedding_bwd(&rr, &ids, &mut dt, dim).unwrap();
    fd_check("embedding dtable", &table, &dt, 1000, loss);
}

#[test]
fn gradcheck_rmsnorm() {
    rmsnorm_check(3, &[(1, 2), (7, 37), (3, 64)]);
}

#[test]
fn gradcheck_qk_norm_per_head_rows() {
    // Qwen3's q/k norm is RMSNorm over each head: the rows of a [batch, seq, heads, head_dim]
    // tensor, head_dim wide, with one weight of head_dim shared by every (token, head) row, so
    // dw sums over batch x seq x heads rows. Shapes of the HF fixtures (head_dim 12 and 8, GQA)
    // and an odd one.
    rmsnorm_check(13, &[(2 * 9 * 4, 12), (2 * 9 * 3, 8), (3 * 5 * 7, 6)]);
}

/// Finite-difference check of rmsnorm's dx and dw at each (rows, dim).
fn rmsnorm_check(seed: u64, shapes: &[(usize, usize)]) {
    let mut r = Rng::new(seed);
    for &(rows, dim) in shapes {
        let (x, w, rr) = (
            r.vec(rows * dim, 2.0),
            r.vec(dim, 1.0),
            r.vec(rows * dim, 1.0),
        );
        let eps = 1e-5;
        let fwd = |x: &[f64], w: &[f64]| {
            let mut out = vec![f64::NAN; rows * dim];
            let mut rstd = vec![f64::NAN; rows];
            rmsnorm::rmsnorm_fwd(x, w, &mut out, &mut rstd, dim, eps).unwrap();
            (dot(&out, &rr), rstd)
        };
        let rstd = fwd(&x, &w).1;
        let (mut dx, mut dw) = (vec![f64::NAN; rows * dim], vec![0.0; dim]);
        let t = RmsNormBwdSlices {
            dout: &rr,
            x: &x,
            w: &w,
            rstd: &rstd,
            dres: None,
            dx: &mut dx,
            dw: &mut dw,
        };
        rmsnorm::rmsnorm_bwd(t, dim).unwrap();
        fd_check(&format!("rmsnorm dx {rows}x{dim}"), &x, &dx, 500, |x| {
            fwd(x, &w).0
        });
        fd_check(&format!("rmsnorm dw {rows}x{dim}"), &w, &dw, 500, |w| {
            fwd(&x, w).0
        });
    }
}

#[test]
fn gradcheck_rmsnorm_residual() {
    // The fused forward has no backward op of its own: the tape sends the gradient of `out`
    // through rmsnorm_bwd (with x = h) plus the gradient arriving at `h` (rmsnorm_bwd_add);
    // dx = dresidual.
    let mut r = Rng::new(4);
    let (rows, dim, eps) = (5, 13, 1e-5);
    let (x, res, w) = (
        r.vec(rows * dim, 1.0),
        r.vec(rows * dim, 1.0),
        r.vec(dim, 1.0),
    );
    let (r_out, r_h) = (r.vec(rows * dim, 1.0), r.vec(rows * dim, 1.0));
    let fwd = |x: &[f64], res: &[f64]| {
        let h: Vec<f64> = x.iter().zip(res).map(|(a, b)| a + b).collect();
        let mut out = vec![f64::NAN; rows * dim];
        let mut rstd = vec![f64::NAN; rows];
        rmsnorm::rmsnorm_fwd(&h, &w, &mut out, &mut rstd, dim, eps).unwrap();
        (dot(&out, &r_out) + dot(&h, &r_h), h, rstd)
    };
    let (_, h, rstd) = fwd(&x, &res);
    let (mut dh, mut dw) = (vec![f64::NAN; rows * dim], vec![0.0; dim]);
    let t = RmsNormBwdSlices {
        dout: &r_out,
        x: &h,
        w: &w,
        rstd: &rstd,
        dres: Some(&r_h),
        dx: &mut dh,
        dw: &mut dw,
    };
    rmsnorm::rmsnorm_bwd(t, dim).unwrap();
    fd_check("rmsnorm_residual dx", &x, &dh, 500, |x| fwd(x, &res).0);
    fd_check("rmsnorm_residual dresidual", &res, &dh, 500, |res| {
        fwd(&x, res).0
    });
}

#[test]
fn gradcheck_rope() {
    let mut r = Rng::new(5);
    let s = RopeShape {
        batch: 2,
        seq: 5,
        heads: 3,
        head_dim: 6,
    };
    let n = 2 * 5 * 3 * 6;
    let ang: Vec<f64> = r.vec(5 * 3, 3.0);
    let (cos, sin): (Vec<f64>, Vec<f64>) = ang.iter().map(|a| (a.cos(), a.sin())).unzip();
    let (x, rr) = (r.vec(n, 1.0), r.vec(n, 1.0));
    let loss = |x: &[f64]| {
        let mut out = vec![f64::NAN; n];
        rope::rope(x, &mut out, &cos, &sin, s, false).unwrap();
        dot(&out, &rr)
    };
    let mut dx = vec![f64::NAN; n];
    rope::rope(&rr, &mut dx, &cos, &sin, s, true).unwrap();
    fd_check("rope dx", &x, &dx, 1000, loss);
}

#[test]
fn gradcheck_swiglu() {
    let mut r = Rng::new(6);
    let n = 41;
    let (g, u, rr) = (r.vec(n, 5.0), r.vec(n, 1.0), r.vec(n, 1.0));
    let fwd = |g: &[f64], u: &[f64]| {
        let mut out = vec![f64::NAN; n];
        swiglu::swiglu_fwd(g, u, &mut out).unwrap();
        dot(&out, &rr)
    };
    let (mut dg, mut du) = (vec![f64::NAN; n], vec![f64::NAN; n]);
    swiglu::swiglu_bwd(&rr, &g, &u, &mut dg, &mut du).unwrap();
    fd_check("swiglu dgate", &g, &dg, 100, |g| fwd(g, &u));
    fd_check("swiglu dup", &u, &du, 100, |u| fwd(&g, u));
}

#[test]
fn gradcheck_cross_entropy() {
    let mut r = Rng::new(7);
    let (rows, vocab, ignore) = (6, 23, -1);
    let logits = r.vec(rows * vocab, 4.0);
    let targets: Vec<i32> = (0..rows)
        .map(|i: usize| {
            if i == 2 {
                ignore
            } else {
                r.below(vocab) as i32
            }
        })
        .collect();
    let wrow = r.vec(rows, 1.0);
    let fwd = |x: &[f64], gs: f64| {
        let (mut l, mut d) = (vec![f64::NAN; rows], vec![f64::NAN; rows * vocab]);
        cross_entropy::cross_entropy(x, &targets, &mut l, &mut d, vocab, ignore, gs).unwrap();
        (l, d)
    };
    // grad_scale scales dlogits; weight each row's loss by a row weight folded in afterwards.
    let (_, d) = fwd(&logits, 1.0);
    let grad: Vec<f64> = d
        .iter()
        .enumerate()
        .map(|(i, g)| g * wrow[i / vocab])
        .collect();
    fd_check("cross_entropy dlogits", &logits, &grad, 1000, |x| {
        dot(&fwd(x, 1.0).0, &wrow)
    });
    let (_, d2) = fwd(&logits, 0.25);
    let scaled: Vec<f64> = d.iter().map(|g| g * 0.25).collect();
    assert!(
        rel_l2(&d2, &scaled) < 1e-12,
        "grad_scale must scale dlogits"
    );
}

#[test]
fn gradcheck_attention() {
    let mut r = Rng::new(8);
    for (batch, seq, nh, nkv, hd, max) in [
        (1, 1, 2, 1, 4, 100),
        (2, 13, 6, 2, 16, 150),
        (1, 67, 3, 3, 20, 120),
        (1, 150, 4, 2, 8, 120),
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
            r.vec(s.q_len(), 1.5),
            r.vec(s.kv_len(), 1.5),
            r.vec(s.kv_len(), 1.0),
        );
        let rr = r.vec(s.q_len(), 1.0);
        let fwd = |q: &[f64], k: &[f64], v: &[f64]| {
            let (mut o, mut l) = (vec![f64::NAN; s.q_len()], vec![f64::NAN; s.lse_len()]);
            attention::attention_fwd(q, k, v, &mut o, &mut l, s, scale).unwrap();
            (dot(&o, &rr), o, l)
        };
        let (_, o, l) = fwd(&q, &k, &v);
        let (mut dq, mut dk, mut dv) = (
            vec![f64::NAN; s.q_len()],
            vec![f64::NAN; s.kv_len()],
            vec![f64::NAN; s.kv_len()],
        );
        let t = AttnBwdSlices {
            q: &q,
            k: &k,
            v: &v,
            out: &o,
            dout: &rr,
            lse: &l,
            dq: &mut dq,
            dk: &mut dk,
            dv: &mut dv,
        };
        attention::attention_bwd(t, s, scale).unwrap();
        let tag = format!("attention {s:?}");
        fd_check(&format!("{tag} dq"), &q, &dq, max, |q| fwd(q, &k, &v).0);
        fd_check(&format!("{tag} dk"), &k, &dk, max, |k| fwd(&q, k, &v).0);
        fd_check(&format!("{tag} dv"), &v, &dv, max, |v| fwd(&q, &k, v).0);
    }
}
