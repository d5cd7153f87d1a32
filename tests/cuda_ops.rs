//! Every CUDA op against its CPU twin (`CpuBackend`) on fresh random inputs, at odd sizes (scalar
//! kernel paths) and large aligned ones (16-byte vector paths). Outputs are poisoned with NaN on
//! both backends before each op so an unwritten element fails. Tolerances are relative L2 errors:
//! 1e-5 for f32 outputs, 1e-2 for bf16 outputs.
//!
//! The device tests are `#[ignore = "needs a CUDA device"]`; run them on a GPU machine with
//! `cargo test --release --features cuda --test cuda_ops -- --ignored --test-threads=1`.
//! Without a device they fail (CudaBackend::new returns an error and `gpu()` panics).
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use titan::backend::cuda::CudaBackend;
use titan::backend::{
    AdamW, AdamWBufs, Backend, Buf, CrossEntropy, Gemm, RmsNorm, RmsNormBwd, RmsNormResidual,
    RopeShape,
};
use titan::DType;

// ---- construction -----------------------------------------------------------------------------

/// Runs on any machine: constructing the backend never panics. Without a driver (the CPU build
/// machine) it must return a clean `Error::Backend`; with one, a bad ordinal must still be an error.
#[test]
fn cuda_backend_new_returns_error_instead_of_panicking() {
    let r = std::panic::catch_unwind(|| CudaBackend::new(0).map(|_| ()));
    let r = r.expect("CudaBackend::new(0) panicked");
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    match r {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("cuda"), "unexpected error text: {msg}");
            eprintln!("no device here, as expected: {msg}");
        }
        Ok(()) => assert!(driver, "a backend was created without a driver"),
    }
    let bad = std::panic::catch_unwind(|| CudaBackend::new(4096).map(|_| ()))
        .expect("new(4096) panicked");
    assert!(bad.is_err(), "device 4096 cannot exist");
}

#[test]
#[ignore = "needs a CUDA device"]
fn device_reports_name_and_counts_allocations() {
    let g = gpu();
    assert!(!g.device_name().is_empty());
    let before = g.alloc_count();
    let m = g.alloc(1000).unwrap();
    assert!(
        m.ptr().is_multiple_of(256),
        "allocations are 256-byte aligned"
    );
    assert_eq!(g.alloc_count(), before + 1);
    eprintln!("device: {} ({} SMs)", g.device_name(), g.sm_count());
}

// ---- elementwise ------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA device"]
fn fill_copy_cast_match_cpu() {
    let mut p = pair();
    let mut rng = Rng::new(1);
    for n in [1usize, 7, 8, 4099 * 2047, 1 << 20] {
        for dt in [DType::F32, DType::BF16, DType::I32] {
            let t = p.out(n, dt);
            p.gpu.fill(t.g, -3.25).unwrap();
            p.cpu.fill(t.c, -3.25).unwrap();
            let (g, c) = p.get(t);
            assert_eq!(g, c, "fill {dt} n={n}");
        }
        for dt in BOTH {
            let x = p.put(&rng.vec(n, 2.0), dt);
            let y = p.out(n, dt);
            p.gpu.copy(x.g, y.g).unwrap();
            p.cpu.copy(x.c, y.c).unwrap();
            let (g, c) = p.get(y);
            assert_eq!(g, c, "copy {dt} n={n}");
        }
        for (s, d) in [
            (DType::F32, DType::BF16),
            (DType::BF16, DType::F32),
            (DType::F32, DType::F32),
        ] {
            let x = p.put(&rng.vec(n, 100.0), s);
            let y = p.out(n, d);
            p.gpu.cast(x.g, y.g).unwrap();
            p.cpu.cast(x.c, y.c).unwrap();
            let (g, c) = p.get(y);
            // Both round to nearest even: bitwise equal.
            assert!(
                g.iter().zip(&c).all(|(a, b)| a.to_bits() == b.to_bits()),
                "cast {s}->{d} n={n}"
            );
        }
    }
    // Unaligned views take the scalar path.
    let x = p.put(&rng.vec(1001, 1.0), DType::F32);
    let y = p.out(1001, DType::BF16);
    let (xs, ys) = (
        T2 {
            g: x.g.slice(1, 999),
            c: x.c.slice(1, 999),
        },
        T2 {
            g: y.g.slice(1, 999),
            c: y.c.slice(1, 999),
        },
    );
    p.gpu.cast(xs.g, ys.g).unwrap();
    p.cpu.cast(xs.c, ys.c).unwrap();
    assert_pair("cast unaligned", &p, ys, 1e-12);
}

#[test]
#[ignore = "needs a CUDA device"]
fn add_and_scale_match_cpu() {
    let mut p = pair();
    let mut rng = Rng::new(2);
    for n in [1usize, 13, 4099 * 2047, 4096 * 2048] {
        for dt in BOTH {
            let a = p.put(&rng.vec(n, 1.0), dt);
            let b = p.put(&rng.vec(n, 1.0), dt);
            let o = p.out(n, dt);
            p.gpu.add(a.g, b.g, o.g).unwrap();
            p.cpu.add(a.c, b.c, o.c).unwrap();
            assert_pair(&format!("add {dt} n={n}"), &p, o, tol(dt));
            // out aliases a
            p.gpu.add(a.g, b.g, a.g).unwrap();
            p.cpu.add(a.c, b.c, a.c).unwrap();
            assert_pair(&format!("add in place {dt} n={n}"), &p, a, tol(dt));
            p.gpu.scale(b.g, -0.37).unwrap();
            p.cpu.scale(b.c, -0.37).unwrap();
            assert_pair(&format!("scale {dt} n={n}"), &p, b, tol(dt));
        }
    }
}

// ---- gemm -------------------------------------------------------------------------------------

fn gemm_case(p: &mut Pair, rng: &mut Rng, g: Gemm, in_dt: DType, out_dt: DType) {
    let a = p.put(&rng.vec(g.stride_a * (g.batch - 1) + g.m * g.k, 1.0), in_dt);
    let b = p.put(&rng.vec(g.stride_b * (g.batch - 1) + g.k * g.n, 1.0), in_dt);
    let c_len = g.stride_c * (g.batch - 1) + g.m * g.n;
    // beta != 0 reads C: start from the same finite values on both sides.
    let c = if g.beta != 0.0 {
        p.put(&rng.vec(c_len, 1.0), out_dt)
    } else {
        p.out(c_len, out_dt)
    };
    p.gpu.gemm(&g, a.g, b.g, c.g).unwrap();
    p.cpu.gemm(&g, a.c, b.c, c.c).unwrap();
    let what = format!(
        "gemm {in_dt}->{out_dt} m={} n={} k={} ta={} tb={} batch={} alpha={} beta={}",
        g.m, g.n, g.k, g.trans_a, g.trans_b, g.batch, g.alpha, g.beta
    );
    // Only the matrices: padding between strided outputs is never written (stays NaN).
    let (gv, cv) = p.get(c);
    let pick = |v: &[f32]| -> Vec<f32> {
        (0..g.batch)
            .flat_map(|i| v[i * g.stride_c..i * g.stride_c + g.m * g.n].to_vec())
            .collect()
    };
    assert_close(&what, &pick(&gv), &pick(&cv), tol(out_dt));
}

#[test]
#[ignore = "needs a CUDA device"]
fn gemm_matches_cpu() {
    let mut p = pair();
    let mut rng = Rng::new(3);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        for (i, o) in [
            (DType::F32, DType::F32),
            (DType::BF16, DType::BF16),
            (DType::BF16, DType::F32),
        ] {
            gemm_case(&mut p, &mut rng, Gemm::new(67, 131, 257, ta, tb, 0.0), i, o);
            let mut g = Gemm::new(33, 17, 65, ta, tb, 0.5);
            g.alpha = -1.5;
            gemm_case(&mut p, &mut rng, g, i, o);
        }
    }
    // Large Llama-like shapes (x·Wᵀ, dW = dyᵀ·x, dx = dy·W).
    gemm_case(
        &mut p,
        &mut rng,
        Gemm::new(1024, 2048, 512, false, true, 0.0),
        DType::BF16,
        DType::BF16,
    );
    gemm_case(
        &mut p,
        &mut rng,
        Gemm::new(512, 1024, 2048, true, false, 1.0),
        DType::BF16,
        DType::F32,
    );
    gemm_case(
        &mut p,
        &mut rng,
        Gemm::new(1021, 509, 1031, false, false, 0.0),
        DType::F32,
        DType::F32,
    );
    // Strided batch with padding between matrices (attention-style).
    let mut g = Gemm::new(29, 31, 37, false, true, 0.0);
    g.batch = 5;
    g.stride_a = 29 * 37 + 3;
    g.stride_b = 31 * 37 + 11;
    g.stride_c = 29 * 31 + 7;
    for (i, o) in [(DType::F32, DType::F32), (DType::BF16, DType::BF16)] {
        gemm_case(&mut p, &mut rng, g, i, o);
    }
}

// ---- embedding --------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA device"]
fn embedding_fwd_bwd_match_cpu() {
    let mut p = pair();
    let mut rng = Rng::new(4);
    for (rows, vocab, dim) in [
        (1usize, 1usize, 1usize),
        (37, 11, 7),
        (4099, 32003, 1024),
        (4096, 128256, 64),
        (333, 1000, 2047),
    ] {
        for dt in BOTH {
            let table = p.put(&rng.vec(vocab * dim, 1.0), dt);
            // Skewed ids: many repeats of a few tokens, plus uniform ones.
            let ids: Vec<i32> =
                (0..rows).map(|_| if rng.below(3) == 0 { rng.below(vocab.min(5)) } else { rng.below(vocab) } as i32).collect();
            let id = p.put_i32(&ids);
            let out = p.out(rows * dim, dt);
            p.gpu.embedding_fwd(table.g, id.g, out.g, dim).unwrap();
            p.cpu.embedding_fwd(table.c, id.c, out.c, dim).unwrap();
            let (g, c) = p.get(out);
            assert_eq!(
                g, c,
                "embedding_fwd {dt} rows={rows} vocab={vocab} dim={dim} is a gather"
            );

            let dout = p.put(&rng.vec(rows * dim, 1.0), dt);
            let dtable = p.put(&rng.vec(vocab * dim, 0.1), DType::F32); // += onto existing values
            p.gpu.embedding_bwd(dout.g, id.g, dtable.g, dim).unwrap();
            p.cpu.embedding_bwd(dout.c, id.c, dtable.c, dim).unwrap();
            assert_pair(
                &format!("embedding_bwd {dt} rows={rows} vocab={vocab} dim={dim}"),
                &p,
                dtable,
                1e-5,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn embedding_bwd_and_rmsnorm_bwd_are_deterministic() {
    let mut p = pair();
    let mut rng = Rng::new(5);
    let (rows, vocab, dim) = (4099, 5000, 2048);
    let ids: Vec<i32> = (0..rows).map(|_| rng.below(50) as i32).collect();
    let id = p.put_i32(&ids);
    let dout = p.put(&rng.vec(rows * dim, 1.0), DType::BF16);
    let x = p.put(&rng.vec(rows * dim, 1.0), DType::BF16);
    let w = p.put(&rng.vec(dim, 1.0), DType::BF16);
    let mut runs = Vec::new();
    for _ in 0..2 {
        let dtable = p.put(&vec![0.0; vocab * dim], DType::F32);
        p.gpu.embedding_bwd(dout.g, id.g, dtable.g, dim).unwrap();
        let out = p.out(rows * dim, DType::BF16);
        let rstd = p.out(rows, DType::F32);
        p.gpu
            .rmsnorm_fwd(&RmsNorm {
                x: x.g,
                w: w.g,
                out: out.g,
                rstd: rstd.g,
                rows,
                dim,
                eps: 1e-5,
            })
            .unwrap();
        let dx = p.out(rows * dim, DType::BF16);
        let dw = p.put(&vec![0.0; dim], DType::F32);
        p.gpu
            .rmsnorm_bwd(&RmsNormBwd {
                dout: dout.g,
                x: x.g,
                w: w.g,
                rstd: rstd.g,
                dx: dx.g,
                dw: dw.g,
                rows,
                dim,
            })
            .unwrap();
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<u32>>();
        runs.push((
            bits(get(&p.gpu, dtable.g)),
            bits(get(&p.gpu, dw.g)),
            bits(get(&p.gpu, dx.g)),
        ));
    }
    assert!(runs[0].0 == runs[1].0, "embedding_bwd differs between runs");
    assert!(runs[0].1 == runs[1].1, "rmsnorm dw differs between runs");
    assert!(runs[0].2 == runs[1].2, "rmsnorm dx differs between runs");
}

// ---- rmsnorm ----------------------------------------------------------------------------------

/// Shapes covering the scalar path (odd dim) and each vector layout K = 1, 2, 4, 8, plus Qwen3's
/// per-head q/k norm: one row per (token, head) of head_dim (128; 12 in the HF fixtures), so
/// many short rows and a dw reduced over all of them.
const RMS_SHAPES: [(usize, usize); 8] = [
    (1, 1),
    (4099, 2047),
    (4096, 2048),
    (67, 8192),
    (33, 16384),
    (5, 3000),
    (2 * 97 * 16 + 3, 128),
    (2 * 9 * 4, 12),
];
/// The backward at dim 1 is pure cancellation (dx = rstd·g·w·eps/(x²+eps)): ill-conditioned for
/// any f32 comparison, so its smallest shape has a few columns.
const RMS_BWD_SHAPES: [(usize, usize); 8] = [
    (3, 5),
    (4099, 2047),
    (4096, 2048),
    (67, 8192),
    (33, 16384),
    (5, 3000),
    (4 * 1024 * 8 + 5, 128),
    (2 * 9 * 4, 12),
];

#[test]
#[ignore = "needs a CUDA device"]
fn rmsnorm_fwd_and_residual_match_cpu() {
    let mut p = pair();
    let mut rng = Rng::new(6);
    for (rows, dim) in RMS_SHAPES {
        for dt in BOTH {
            let x = p.put(&rng.vec(rows * dim, 1.5), dt);
            let w = p.put(&rng.vec(dim, 1.0), dt);
            let out = p.out(rows * dim, dt);
            let rstd = p.out(rows, DType::F32);
            let args = |side: fn(T2) -> Buf| RmsNorm {
                x: side(x),
                w: side(w),
                out: side(out),
                rstd: side(rstd),
                rows,
                dim,
                eps: 1e-5,
            };
            p.gpu.rmsnorm_fwd(&args(T2::gpu)).unwrap();
            p.cpu.rmsnorm_fwd(&args(T2::cpu)).unwrap();
            assert_pair(
                &format!("rmsnorm_fwd out {dt} {rows}x{dim}"),
                &p,
                out,
                tol(dt),
            );
            assert_pair(
                &format!("rmsnorm_fwd rstd {dt} {rows}x{dim}"),
                &p,
                rstd,
                1e-5,
            );

            let r = p.put(&rng.vec(rows * dim, 1.0), dt);
            let h = p.out(rows * dim, dt);
            let args = |side: fn(T2) -> Buf| RmsNormResidual {
                x: side(x),
                residual: side(r),
                w: side(w),
                h: side(h),
                out: side(out),
                rstd: side(rstd),
                rows,
                dim,
                eps: 1e-6,
            };
            p.gpu.rmsnorm_residual_fwd(&args(T2::gpu)).unwrap();
            p.cpu.rmsnorm_residual_fwd(&args(T2::cpu)).unwrap();
            assert_pair(
                &format!("rmsnorm_residual_fwd h {dt} {rows}x{dim}"),
                &p,
                h,
                tol(dt),
            );
            assert_pair(
                &format!("rmsnorm_residual_fwd out {dt} {rows}x{dim}"),
                &p,
                out,
                tol(dt),
            );
            assert_pair(
                &format!("rmsnorm_residual_fwd rstd {dt} {rows}x{dim}"),
                &p,
                rstd,
                1e-5,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn rmsnorm_bwd_matches_cpu() {
    let mut p = pair();
    let mut rng = Rng::new(7);
    for (rows, dim) in RMS_BWD_SHAPES {
        for dt in BOTH {
            let x = p.put(&rng.vec(rows * dim, 1.5), dt);
            let w = p.put(&rng.vec(dim, 1.0), dt);
            let out = p.out(rows * dim, dt);
            let rstd = p.out(rows, DType::F32);
            p.cpu
                .rmsnorm_fwd(&RmsNorm {
                    x: x.c,
                    w: w.c,
                    out: out.c,
                    rstd: rstd.c,
                    rows,
                    dim,
                    eps: 1e-5,
                })
                .unwrap();
            // Both sides get the CPU's rstd so the backward is compared alone.
            let rs = get(&p.cpu, rstd.c);
            p.gpu.upload(rstd.g, &to_bytes(&rs, DType::F32)).unwrap();
            let dout = p.put(&rng.vec(rows * dim, 1.0), dt);
            let dx = p.out(rows * dim, dt);
            let dw = p.put(&rng.vec(dim, 1.0), DType::F32);
            let args = |side: fn(T2) -> Buf| RmsNormBwd {
                dout: side(dout),
                x: side(x),
                w: side(w),
                rstd: side(rstd),
                dx: side(dx),
                dw: side(dw),
                rows,
                dim,
            };
            p.gpu.rmsnorm_bwd(&args(T2::gpu)).unwrap();
            p.cpu.rmsnorm_bwd(&args(T2::cpu)).unwrap();
            assert_pair(
                &format!("rmsnorm_bwd dx {dt} {rows}x{dim}"),
                &p,
                dx,
                tol(dt),
            );
            assert_pair(&format!("rmsnorm_bwd dw {dt} {rows}x{dim}"), &p, dw, 1e-5);
        }
    }
}

// ---- rope -------------------------------------------------------------------------------------

fn rope_tables(seq: usize, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let (mut c, mut s) = (Vec::new(), Vec::new());
    for pos in 0..seq {
        for i in 0..half {
            let inv = 1.0 / 500000f64.powf(2.0 * i as f64 / head_dim as f64);
            let a = pos as f64 * inv;
            c.push(a.cos() as f32);
            s.push(a.sin() as f32);
        }
    }
    (c, s)
}

#[test]
#[ignore = "needs a CUDA device"]
fn rope_fwd_bwd_match_cpu() {
    let mut p = pair();
    let mut rng = Rng::new(8);
    for (batch, seq, heads, head_dim) in [
        (1usize, 1usize, 1usize, 2usize),
        (2, 129, 5, 62),
        (3, 257, 8, 64),
        (2, 2048, 32, 64),
        (1, 33, 3, 128),
    ] {
        let s = RopeShape {
            batch,
            seq,
            heads,
            head_dim,
        };
        let (c, sn) = rope_tables(seq, head_dim);
        let cos = p.put(&c, DType::F32);
        let sin = p.put(&sn, DType::F32);
        let n = batch * seq * heads * head_dim;
        for dt in BOTH {
            let x = p.put(&rng.vec(n, 1.0), dt);
            let out = p.out(n, dt);
            p.gpu.rope_fwd(x.g, out.g, cos.g, sin.g, s).unwrap();
            p.cpu.rope_fwd(x.c, out.c, cos.c, sin.c, s).unwrap();
            assert_pair(&format!("rope_fwd {dt} {s:?}"), &p, out, tol(dt));
            let dx = p.out(n, dt);
            p.gpu.rope_bwd(out.g, dx.g, cos.g, sin.g, s).unwrap();
            p.cpu.rope_bwd(out.c, dx.c, cos.c, sin.c, s).unwrap();
            assert_pair(&format!("rope_bwd {dt} {s:?}"), &p, dx, tol(dt));
            // The inverse rotation undoes the forward one.
            let (back, orig) = (get(&p.gpu, dx.g), get(&p.gpu, x.g));
            assert_close(
                &format!("rope roundtrip {dt} {s:?}"),
                &back,
                &orig,
                if dt == DType::F32 { 1e-5 } else { 2e-2 },
            );
        }
    }
}

// ---- swiglu -----------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA device"]
fn swiglu_fwd_bwd_match_cpu() {
    let mut p = pair();
    let mut rng = Rng::new(9);
    for n in [1usize, 9, 4099 * 2047, 1 << 23] {
        for dt in BOTH {
            let g = p.put(&rng.vec(n, 3.0), dt);
            let u = p.put(&rng.vec(n, 1.0), dt);
            let out = p.out(n, dt);
            p.gpu.swiglu_fwd(g.g, u.g, out.g).unwrap();
            p.cpu.swiglu_fwd(g.c, u.c, out.c).unwrap();
            assert_pair(&format!("swiglu_fwd {dt} n={n}"), &p, out, tol(dt));
            let d = p.put(&rng.vec(n, 1.0), dt);
            let dg = p.out(n, dt);
            let du = p.out(n, dt);
            p.gpu.swiglu_bwd(d.g, g.g, u.g, dg.g, du.g).unwrap();
            p.cpu.swiglu_bwd(d.c, g.c, u.c, dg.c, du.c).unwrap();
            assert_pair(&format!("swiglu_bwd dgate {dt} n={n}"), &p, dg, tol(dt));
            assert_pair(&format!("swiglu_bwd dup {dt} n={n}"), &p, du, tol(dt));
        }
    }
}

// ---- cross-entropy ----------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA device"]
fn cross_entropy_matches_cpu() {
    let mut p = pair();
    let mut rng = Rng::new(10);
    let ignore = -100;
    for (rows, vocab) in [
        (1usize, 1usize),
        (7, 50001),
        (67, 128256),
        (1024, 32000),
        (3, 2),
    ] {
        for dt in BOTH {
            let logits = rng.vec(rows * vocab, 4.0);
            let targets: Vec<i32> = (0..rows)
                .map(|r| {
                    if r % 5 == 3 {
                        ignore
                    } else {
                        rng.below(vocab) as i32
                    }
                })
                .collect();
            let x = p.put(&logits, dt);
            let t = p.put_i32(&targets);
            let loss = p.out(rows, DType::F32);
            let d = p.out(rows * vocab, dt);
            let args = |side: fn(T2) -> Buf| CrossEntropy {
                logits: side(x),
                targets: side(t),
                losses: side(loss),
                dlogits: side(d),
                rows,
                vocab,
                ignore_index: ignore,
                grad_scale: 0.25,
            };
            p.gpu.cross_entropy(&args(T2::gpu)).unwrap();
            p.cpu.cross_entropy(&args(T2::cpu)).unwrap();
            // The loss against an f64 reference (the CPU twin sums 10^5 exponentials in f32
            // sequentially, which alone drifts ~1e-5); against the CPU only loosely.
            let rounded = from_bytes(&to_bytes(&logits, dt), dt);
            let want: Vec<f32> = targets
                .iter()
                .enumerate()
                .map(|(r, &tg)| {
                    if tg == ignore {
                        return 0.0;
                    }
                    let row = &rounded[r * vocab..(r + 1) * vocab];
                    let mx = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                    let s: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
                    (mx + s.ln() - row[tg as usize] as f64) as f32
                })
                .collect();
            let (gl, cl) = p.get(loss);
            let what = format!("{dt} {rows}x{vocab}");
            assert_close(
                &format!("cross_entropy loss vs f64 {what}"),
                &gl,
                &want,
                1e-5,
            );
            assert_close(&format!("cross_entropy loss vs cpu {what}"), &gl, &cl, 1e-4);
            assert_pair(
                &format!("cross_entropy dlogits {dt} {rows}x{vocab}"),
                &p,
                d,
                tol(dt),
            );
            for (r, &tg) in targets.iter().enumerate() {
                if tg == ignore {
                    assert_eq!(gl[r], 0.0, "ignored row {r} has a loss");
                }
            }
            // dlogits written over logits.
            let loss2 = p.out(rows, DType::F32);
            p.gpu
                .cross_entropy(&CrossEntropy {
                    losses: loss2.g,
                    dlogits: x.g,
                    ..args(T2::gpu)
                })
                .unwrap();
            let (aliased, fresh) = (get(&p.gpu, x.g), get(&p.gpu, d.g));
            assert_close(
                &format!("cross_entropy aliased dlogits {dt} {rows}x{vocab}"),
                &aliased,
                &fresh,
                1e-7,
            );
            assert_close(
                &format!("cross_entropy aliased loss {dt}"),
                &get(&p.gpu, loss2.g),
                &get(&p.gpu, loss.g),
                1e-7,
            );
        }
    }
}

// ---- reductions and optimizer -----------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA device"]
fn sum_sum_squares_clip_match_cpu() {
    let mut p = pair();
    let mut rng = Rng::new(11);
    for n in [1usize, 1023, 4099 * 2047, 20_000_001] {
        // Positive values: the relative error of a sum is then well defined.
        let x = p.put(
            &(0..n).map(|_| rng.uniform().abs()).collect::<Vec<_>>(),
            DType::F32,
        );
        let out = p.out(1, DType::F32);
        p.gpu.sum(x.g, out.g).unwrap();
        p.cpu.sum(x.c, out.c).unwrap();
        assert_pair(&format!("sum n={n}"), &p, out, 1e-6);
    }
    let mut bufs = Vec::new();
    for (i, n) in [1usize, 17, 4099 * 2047, 1 << 20, 333]
        .into_iter()
        .enumerate()
    {
        let dt = if i.is_multiple_of(2) {
            DType::F32
        } else {
            DType::BF16
        };
        bufs.push(p.put(&rng.vec(n, 0.5), dt));
    }
    let out = p.out(1, DType::F32);
    let gs: Vec<Buf> = bufs.iter().map(|b| b.g).collect();
    let cs: Vec<Buf> = bufs.iter().map(|b| b.c).collect();
    p.gpu.sum_squares(&gs, out.g).unwrap();
    p.cpu.sum_squares(&cs, out.c).unwrap();
    assert_pair("sum_squares", &p, out, 1e-6);
    let first = get(&p.gpu, out.g)[0];
    p.gpu.sum_squares(&gs, out.g).unwrap();
    assert_eq!(
        first.to_bits(),
        get(&p.gpu, out.g)[0].to_bits(),
        "sum_squares is deterministic"
    );

    for (norm_sq, max_norm) in [(4.0f32, 1.0f32), (0.25, 1.0), (0.0, 1.0), (1e6, 0.5)] {
        let n = p.put(&[norm_sq], DType::F32);
        let c = p.out(1, DType::F32);
        p.gpu.clip_coef(n.g, max_norm, c.g).unwrap();
        p.cpu.clip_coef(n.c, max_norm, c.c).unwrap();
        assert_pair(
            &format!("clip_coef norm_sq={norm_sq} max={max_norm}"),
            &p,
            c,
            1e-6,
        );
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn adamw_matches_cpu() {
    let mut p = pair();
    let mut rng = Rng::new(12);
    let hp = AdamW {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
    };
    for n in [1usize, 5, 4099 * 2047, 1 << 22] {
        for copy in [None, Some(DType::BF16), Some(DType::F32)] {
            let param = p.put(&rng.vec(n, 1.0), DType::F32);
            let grad = p.put(&rng.vec(n, 1e-2), DType::F32);
            let m = p.put(&rng.vec(n, 1e-3), DType::F32);
            let v = p.put(
                &rng.vec(n, 1e-3).iter().map(|x| x * x).collect::<Vec<_>>(),
                DType::F32,
            );
            let gs = p.put(&[0.5], DType::F32);
            let c = copy.map(|d| p.out(n, d));
            let bufs = |side: fn(T2) -> Buf| AdamWBufs {
                param: side(param),
                grad: side(grad),
                m: side(m),
                v: side(v),
                compute: c.map(side),
                grad_scale: side(gs),
            };
            p.gpu.adamw(&bufs(T2::gpu), &hp).unwrap();
            p.cpu.adamw(&bufs(T2::cpu), &hp).unwrap();
            for (what, t) in [("param", param), ("m", m), ("v", v)] {
                assert_pair(&format!("adamw {what} n={n} copy={copy:?}"), &p, t, 1e-5);
            }
            if let (Some(c), Some(d)) = (c, copy) {
                assert_pair(&format!("adamw compute copy {d} n={n}"), &p, c, tol(d));
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn scratch_growth_is_counted_and_steady_state_allocates_nothing() {
    let mut p = pair();
    let mut rng = Rng::new(13);
    let (rows, dim) = (64, 1024);
    let x = p.put(&rng.vec(rows * dim, 1.0), DType::BF16);
    let w = p.put(&rng.vec(dim, 1.0), DType::BF16);
    let out = p.out(rows * dim, DType::BF16);
    let rstd = p.out(rows, DType::F32);
    let dx = p.out(rows * dim, DType::BF16);
    let dw = p.put(&vec![0.0; dim], DType::F32);
    let s = p.out(1, DType::F32);
    let step = |p: &Pair| {
        p.gpu
            .rmsnorm_fwd(&RmsNorm {
                x: x.g,
                w: w.g,
                out: out.g,
                rstd: rstd.g,
                rows,
                dim,
                eps: 1e-5,
            })
            .unwrap();
        p.gpu
            .rmsnorm_bwd(&RmsNormBwd {
                dout: out.g,
                x: x.g,
                w: w.g,
                rstd: rstd.g,
                dx: dx.g,
                dw: dw.g,
                rows,
                dim,
            })
            .unwrap();
        p.gpu.sum_squares(&[dx.g, dw.g], s.g).unwrap();
    };
    step(&p);
    let after_first = p.gpu.alloc_count();
    for _ in 0..3 {
        step(&p);
    }
    p.gpu.synchronize().unwrap();
    assert_eq!(
        p.gpu.alloc_count(),
        after_first,
        "ops allocate nothing once scratch is warm"
    );
}
