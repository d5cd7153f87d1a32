//! CUDA flash attention against a float64 reference computed here from the same bf16 inputs.
//!
//! Run on a GPU machine: `cargo test --release --features cuda --test cuda_attention -- --ignored`.
//! Without a device every test fails (CudaBackend::new errors), it never passes silently.
#![cfg(feature = "cuda")]

use half::bf16;
use rayon::prelude::*;
use titan::backend::cuda::CudaBackend;
use titan::backend::{AttnBwd, AttnFwd, AttnShape, Backend, Buf, DeviceMem};
use titan::tensor::DType;
use titan::Error;

fn device() -> CudaBackend {
    CudaBackend::new(0).expect("these tests need a CUDA device")
}

/// splitmix64 + Box-Muller: reproducible normal samples without extra dependencies.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    fn bf16s(&mut self, n: usize) -> Vec<bf16> {
        (0..n).map(|_| bf16::from_f32(self.normal())).collect()
    }
}

/// A device buffer that lives as long as the test needs it.
struct DevBuf {
    _mem: Box<dyn DeviceMem>,
    buf: Buf,
}

fn upload(be: &CudaBackend, bytes: &[u8], len: usize, dtype: DType) -> DevBuf {
    let mem = be.alloc(bytes.len()).expect("alloc");
    let buf = Buf::new(mem.ptr(), len, dtype);
    be.upload(buf, bytes).expect("upload");
    DevBuf { _mem: mem, buf }
}

fn upload_bf16(be: &CudaBackend, x: &[bf16]) -> DevBuf {
    upload(be, bytemuck::cast_slice(x), x.len(), DType::BF16)
}

/// Output buffer filled with NaN, so any element the kernel skips fails the comparison.
fn poisoned(be: &CudaBackend, len: usize, dtype: DType) -> DevBuf {
    let bytes: Vec<u8> = match dtype {
        DType::BF16 => bytemuck::cast_slice(&vec![bf16::NAN; len]).to_vec(),
        _ => bytemuck::cast_slice(&vec![f32::NAN; len]).to_vec(),
    };
    upload(be, &bytes, len, dtype)
}

fn download(be: &CudaBackend, b: Buf) -> Vec<f64> {
    let mut bytes = vec![0u8; b.bytes()];
    be.download(b, &mut bytes).expect("download");
    match b.dtype {
        DType::BF16 => bytemuck::cast_slice::<u8, bf16>(&bytes)
            .iter()
            .map(|x| x.to_f64())
            .collect(),
        _ => bytemuck::cast_slice::<u8, f32>(&bytes)
            .iter()
            .map(|&x| x as f64)
            .collect(),
    }
}

/// Float64 causal GQA attention, forward and backward, restricted to the kv heads in `kv_heads`
/// (and their query heads); other entries stay 0. Rows are independent in each of three passes
/// (forward + delta, dq, dk/dv per key), so each pass is one parallel loop.
struct Reference {
    out: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

fn reference(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    s: AttnShape,
    scale: f64,
    kv_heads: &[usize],
) -> Reference {
    let (b, n, h, hkv, d) = (s.batch, s.seq, s.n_heads, s.n_kv_heads, s.head_dim);
    let g = h / hkv;
    let qi = |bb: usize, i: usize, hh: usize| ((bb * n + i) * h + hh) * d;
    let ki = |bb: usize, j: usize, hk: usize| ((bb * n + j) * hkv + hk) * d;
    let dot = |a: &[f64], c: &[f64]| a.iter().zip(c).map(|(x, y)| x * y).sum::<f64>();
    let heads: Vec<usize> = kv_heads
        .iter()
        .flat_map(|&hk| hk * g..(hk + 1) * g)
        .collect();
    let rows: Vec<(usize, usize, usize)> = (0..b)
        .flat_map(|bb| {
            heads
                .iter()
                .flat_map(move |&hh| (0..n).map(move |i| (bb, hh, i)))
        })
        .collect();

    // Pass 1: out, lse and delta = dO · out per query row.
    let fwd: Vec<(Vec<f64>, f64, f64)> = rows
        .par_iter()
        .map(|&(bb, hh, i)| {
            let qr = &q[qi(bb, i, hh)..][..d];
            let sc: Vec<f64> = (0..=i)
                .map(|j| scale * dot(qr, &k[ki(bb, j, hh / g)..][..d]))
                .collect();
            let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
            let l: f64 = p.iter().sum();
            let mut o = vec![0.0; d];
            for (j, pj) in p.iter().enumerate() {
                let vr = &v[ki(bb, j, hh / g)..][..d];
                for c in 0..d {
                    o[c] += pj / l * vr[c];
                }
            }
            let delta = dot(&o, &dout[qi(bb, i, hh)..][..d]);
            (o, m + l.ln(), delta)
        })
        .collect();
    let mut r = Reference {
        out: vec![0.0; q.len()],
        lse: vec![0.0; b * h * n],
        dq: vec![0.0; q.len()],
        dk: vec![0.0; k.len()],
        dv: vec![0.0; k.len()],
    };
    let mut delta = vec![0.0; b * h * n];
    for (&(bb, hh, i), (o, l, dl)) in rows.iter().zip(&fwd) {
        r.out[qi(bb, i, hh)..][..d].copy_from_slice(o);
        r.lse[(bb * h + hh) * n + i] = *l;
        delta[(bb * h + hh) * n + i] = *dl;
    }
    let (lse, delta) = (&r.lse, &delta);
    // P and dS of one (query row, key) pair.
    let p_ds = |bb: usize, hh: usize, i: usize, j: usize| {
        let kv = ki(bb, j, hh / g);
        let p = (scale * dot(&q[qi(bb, i, hh)..][..d], &k[kv..][..d]) - lse[(bb * h + hh) * n + i])
            .exp();
        let dp = dot(&dout[qi(bb, i, hh)..][..d], &v[kv..][..d]);
        (p, p * (dp - delta[(bb * h + hh) * n + i]))
    };

    // Pass 2: dq = scale · Σ_j dS_ij k_j.
    let dq: Vec<Vec<f64>> = rows
        .par_iter()
        .map(|&(bb, hh, i)| {
            let mut acc = vec![0.0; d];
            for j in 0..=i {
                let (_, ds) = p_ds(bb, hh, i, j);
                let kr = &k[ki(bb, j, hh / g)..][..d];
                for c in 0..d {
                    acc[c] += scale * ds * kr[c];
                }
            }
            acc
        })
        .collect();
    for (&(bb, hh, i), x) in rows.iter().zip(&dq) {
        r.dq[qi(bb, i, hh)..][..d].copy_from_slice(x);
    }

    // Pass 3: dk_j = scale · Σ dS_ij q_i, dv_j = Σ P_ij dO_i over the group's heads and i >= j.
    let keys: Vec<(usize, usize, usize)> = (0..b)
        .flat_map(|bb| {
            kv_heads
                .iter()
                .flat_map(move |&hk| (0..n).map(move |j| (bb, hk, j)))
        })
        .collect();
    let dkv: Vec<(Vec<f64>, Vec<f64>)> = keys
        .par_iter()
        .map(|&(bb, hk, j)| {
            let (mut dk, mut dv) = (vec![0.0; d], vec![0.0; d]);
            for hh in hk * g..(hk + 1) * g {
                for i in j..n {
                    let (p, ds) = p_ds(bb, hh, i, j);
                    let (qr, dor) = (&q[qi(bb, i, hh)..][..d], &dout[qi(bb, i, hh)..][..d]);
                    for c in 0..d {
                        dk[c] += scale * ds * qr[c];
                        dv[c] += p * dor[c];
                    }
                }
            }
            (dk, dv)
        })
        .collect();
    for (&(bb, hk, j), (dk, dv)) in keys.iter().zip(&dkv) {
        r.dk[ki(bb, j, hk)..][..d].copy_from_slice(dk);
        r.dv[ki(bb, j, hk)..][..d].copy_from_slice(dv);
    }
    r
}

/// ‖got − want‖ / max(‖want‖, floor) over the elements `keep` selects. The floor matters where
/// the exact gradient is zero (seq 1: dS = P (dP − delta) = 0) and any rounding is a huge ratio.
fn rel_l2(got: &[f64], want: &[f64], keep: impl Fn(usize) -> bool, floor: f64) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for i in (0..got.len()).filter(|&i| keep(i)) {
        num += (got[i] - want[i]).powi(2);
        den += want[i].powi(2);
    }
    num.sqrt() / den.sqrt().max(floor)
}

/// Runs forward and backward (twice, to check bitwise determinism) on fresh random inputs and
/// compares out, lse, dq, dk, dv with the reference on the kv heads in `kv_heads` (all if None).
fn check(be: &CudaBackend, s: AttnShape, seed: u64, kv_heads: Option<Vec<usize>>) {
    let mut rng = Rng(seed);
    let (qh, kh, vh, doh) = (
        rng.bf16s(s.q_len()),
        rng.bf16s(s.kv_len()),
        rng.bf16s(s.kv_len()),
        rng.bf16s(s.q_len()),
    );
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let (q, k, v, dout) = (
        upload_bf16(be, &qh),
        upload_bf16(be, &kh),
        upload_bf16(be, &vh),
        upload_bf16(be, &doh),
    );
    let out = poisoned(be, s.q_len(), DType::BF16);
    let lse = poisoned(be, s.lse_len(), DType::F32);
    be.attention_fwd(&AttnFwd {
        q: q.buf,
        k: k.buf,
        v: v.buf,
        out: out.buf,
        lse: lse.buf,
        shape: s,
        scale,
    })
    .expect("attention_fwd");
    let grads = |be: &CudaBackend| {
        let dq = poisoned(be, s.q_len(), DType::BF16);
        let dk = poisoned(be, s.kv_len(), DType::BF16);
        let dv = poisoned(be, s.kv_len(), DType::BF16);
        be.attention_bwd(&AttnBwd {
            q: q.buf,
            k: k.buf,
            v: v.buf,
            out: out.buf,
            dout: dout.buf,
            lse: lse.buf,
            dq: dq.buf,
            dk: dk.buf,
            dv: dv.buf,
            shape: s,
            scale,
        })
        .expect("attention_bwd");
        [
            download(be, dq.buf),
            download(be, dk.buf),
            download(be, dv.buf),
        ]
    };
    let g1 = grads(be);
    let g2 = grads(be);
    be.synchronize().expect("synchronize");
    for (a, b, name) in g1
        .iter()
        .zip(&g2)
        .zip(["dq", "dk", "dv"])
        .map(|((a, b), n)| (a, b, n))
    {
        assert!(
            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{s:?}: {name} differs between two runs"
        );
    }

    let f = |x: &[bf16]| x.iter().map(|y| y.to_f64()).collect::<Vec<f64>>();
    let kv_heads = kv_heads.unwrap_or_else(|| (0..s.n_kv_heads).collect());
    let r = reference(
        &f(&qh),
        &f(&kh),
        &f(&vh),
        &f(&doh),
        s,
        scale as f64,
        &kv_heads,
    );
    let (d, g) = (s.head_dim, s.n_heads / s.n_kv_heads);
    let q_keep = |i: usize| kv_heads.contains(&((i / d) % s.n_heads / g));
    let kv_keep = |i: usize| kv_heads.contains(&((i / d) % s.n_kv_heads));
    let lse_keep = |i: usize| kv_heads.contains(&((i / s.seq) % s.n_heads / g));
    let floor = 1e-3 * f(&doh).iter().map(|x| x * x).sum::<f64>().sqrt();
    let errs = [
        ("out", rel_l2(&download(be, out.buf), &r.out, q_keep, 1e-30)),
        (
            "lse",
            rel_l2(&download(be, lse.buf), &r.lse, lse_keep, 1e-30),
        ),
        ("dq", rel_l2(&g1[0], &r.dq, q_keep, floor)),
        ("dk", rel_l2(&g1[1], &r.dk, kv_keep, floor)),
        ("dv", rel_l2(&g1[2], &r.dv, kv_keep, floor)),
    ];
    println!("{s:?}: {errs:?}");
    for (name, e) in errs {
        // bf16 outputs of fp32-accumulated products; NaN (an unwritten element) fails too.
        assert!(e < 1e-2, "{s:?}: {name} relative L2 error {e:e}");
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn matches_reference_at_odd_sizes() {
    let be = device();
    let mut seed = 1;
    for d in [16, 32, 64, 128] {
        for seq in [1, 17, 129, 1000] {
            for (batch, n_heads, n_kv_heads) in [(2, 8, 2), (1, 4, 4)] {
                seed += 1;
                check(
                    &be,
                    AttnShape {
                        batch,
                        seq,
                        n_heads,
                        n_kv_heads,
                        head_dim: d,
                    },
                    seed,
                    None,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn matches_reference_long_sequence() {
    // Full-size problem on the device; the float64 reference covers one kv group (4 query heads).
    let be = device();
    let s = AttnShape {
        batch: 1,
        seq: 4096,
        n_heads: 8,
        n_kv_heads: 2,
        head_dim: 128,
    };
    check(&be, s, 99, Some(vec![1]));
}

#[test]
#[ignore = "needs a CUDA device"]
fn rejects_f32_and_unsupported_head_dims() {
    let be = device();
    let s = AttnShape {
        batch: 1,
        seq: 5,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 64,
    };
    let f32buf = |len: usize| poisoned(&be, len, DType::F32);
    let (q, k, v, out, lse) = (
        f32buf(s.q_len()),
        f32buf(s.kv_len()),
        f32buf(s.kv_len()),
        f32buf(s.q_len()),
        f32buf(s.lse_len()),
    );
    let fwd = AttnFwd {
        q: q.buf,
        k: k.buf,
        v: v.buf,
        out: out.buf,
        lse: lse.buf,
        shape: s,
        scale: 0.125,
    };
    match be.attention_fwd(&fwd) {
        Err(Error::DType { op, .. }) => assert_eq!(op, "attention_fwd"),
        other => panic!("f32 inputs: expected a dtype error, got {other:?}"),
    }
    let s = AttnShape { head_dim: 96, ..s };
    let bf = |len: usize| poisoned(&be, len, DType::BF16);
    let (q, k, v, out) = (bf(s.q_len()), bf(s.kv_len()), bf(s.kv_len()), bf(s.q_len()));
    let lse = poisoned(&be, s.lse_len(), DType::F32);
    let fwd = AttnFwd {
        q: q.buf,
        k: k.buf,
        v: v.buf,
        out: out.buf,
        lse: lse.buf,
        shape: s,
        scale: 0.125,
    };
    match be.attention_fwd(&fwd) {
        Err(e @ Error::Shape { .. }) => assert!(e.to_string().contains("head_dim 96"), "{e}"),
        other => panic!("head_dim 96: expected a shape error, got {other:?}"),
    }
}
