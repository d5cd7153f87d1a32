//! The CUDA tensor-parallel ops (vocabulary-parallel embedding and cross-entropy, copy_2d)
//! against their CPU twins on the same inputs, at odd sizes (scalar kernel paths) and aligned
//! Llama-sized ones (16-byte vector paths), outputs poisoned with NaN on both backends; plus what
//! only the device does (NaN rows / losses for out-of-range ids and targets, which the CPU twin
//! reports as errors) and the host-side argument checks.
//!
//! Run on a GPU machine: `cargo test --release --features cuda --test cuda_ops_tp -- --ignored
//! --test-threads=1`. Without a device every device test fails (`pair()` panics), never passes
//! silently; only `tensor_parallel_kernels_are_embedded` runs everywhere.
#![cfg(feature = "cuda")]

mod cuda_common;

use cuda_common::*;
use titan::backend::cuda::embeds_kernel;
use titan::backend::{
    Backend, Buf, Copy2d, CrossEntropy, CrossEntropyShard, CrossEntropyStats, EmbeddingShard,
};
use titan::{DType, Error};

/// `n` split into `k` contiguous ranges of sizes differing by at most one.
fn split(n: usize, k: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..k {
        let len = n / k + usize::from(i < n % k);
        out.push((start, start + len));
        start += len;
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Columns `a..z` of a row-major `[rows, cols]` matrix.
fn columns(m: &[f32], cols: usize, a: usize, z: usize) -> Vec<f32> {
    m.chunks(cols).flat_map(|r| r[a..z].to_vec()).collect()
}

// ---- the binary carries the kernels ------------------------------------------------------------

/// Runs on any machine: every kernel the tensor-parallel wrappers can launch (each dtype and
/// vector width) is in the fatbins build.rs embedded.
#[test]
fn tensor_parallel_kernels_are_embedded() {
    let mut names = vec![
        "copy_2d_2b".to_string(),
        "copy_2d_4b".into(),
        "copy_2d_16b".into(),
    ];
    for (dt, w) in [("f32", 4), ("bf16", 8)] {
        for width in [1, w] {
            for op in [
                "embedding_fwd",
                "cross_entropy_stats",
                "cross_entropy_shard",
            ] {
                names.push(format!("{op}_{dt}_w{width}"));
            }
        }
        names.push(format!("embedding_bwd_{dt}"));
    }
    let missing: Vec<&String> = names.iter().filter(|n| !embeds_kernel(n)).collect();
    assert!(
        missing.is_empty(),
        "not in the embedded fatbins: {missing:?}"
    );
    assert!(
        !embeds_kernel("copy_2d_8b"),
        "the symbol search finds anything"
    );
}

// ---- embedding --------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA device"]
fn embedding_shard_fwd_bwd_match_cpu() {
    let mut p = pair();
    let mut rng = Rng::new(40);
    for (n, vocab, dim, k) in [
        (37usize, 31usize, 7usize, 3usize),
        (4099, 32000, 1024, 2),
        (333, 1001, 2047, 3),
    ] {
        let shards = split(vocab, k);
        // Skewed ids (repeats of a few tokens) plus every shard's first and last row.
        let mut ids: Vec<i32> = shards
            .iter()
            .flat_map(|&(a, z)| [a as i32, z as i32 - 1])
            .collect();
        while ids.len() < n {
            let id = if rng.below(3) == 0 {
                rng.below(5)
            } else {
                rng.below(vocab)
            };
            ids.push(id as i32);
        }
        let id = p.put_i32(&ids);
        for dt in BOTH {
            let table = rng.vec(vocab * dim, 1.0);
            let dout = p.put(&rng.vec(n * dim, 1.0), dt);
            for &(a, z) in &shards {
                let what = format!("{dt} n={n} vocab={vocab} dim={dim} rows {a}..{z}");
                let t = p.put(&table[a * dim..z * dim], dt);
                let out = p.out(n * dim, dt);
                let args = |side: fn(T2) -> Buf, t: T2, out: T2| EmbeddingShard {
                    table: side(t),
                    ids: side(id),
                    out: side(out),
                    dim,
                    row0: a,
                    vocab,
                };
                p.gpu.embedding_shard_fwd(&args(T2::gpu, t, out)).unwrap();
                p.cpu.embedding_shard_fwd(&args(T2::cpu, t, out)).unwrap();
                let (g, c) = p.get(out);
                assert_eq!(bits(&g), bits(&c), "embedding_shard_fwd {what}: a gather");

                let g0 = rng.vec((z - a) * dim, 0.1); // += onto existing values
                let dtab = p.put(&g0, DType::F32);
                p.gpu
                    .embedding_shard_bwd(&args(T2::gpu, dtab, dout))
                    .unwrap();
                p.cpu
                    .embedding_shard_bwd(&args(T2::cpu, dtab, dout))
                    .unwrap();
                assert_pair(&format!("embedding_shard_bwd {what}"), &p, dtab, 1e-5);
                // No atomics: a second run from the same start is bit-identical.
                let again = p.put(&g0, DType::F32);
                p.gpu
                    .embedding_shard_bwd(&args(T2::gpu, again, dout))
                    .unwrap();
                let (first, second) = (get(&p.gpu, dtab.g), get(&p.gpu, again.g));
                assert_eq!(bits(&first), bits(&second), "embedding_shard_bwd {what}");
            }
        }
    }
}

/// An id another rank holds gives a zero row; one outside the whole vocabulary a NaN row (the
/// CPU twin rejects it; a kernel cannot return an error).
#[test]
#[ignore = "needs a CUDA device"]
fn embedding_shard_fwd_zero_and_nan_rows() {
    let mut p = pair();
    let (vocab, dim) = (10, 8);
    let t = p.put(&[0.5; 4 * 8], DType::BF16);
    let id = p.put_i32(&[7, 2, 10, -1]);
    let out = p.out(4 * dim, DType::BF16);
    p.gpu
        .embedding_shard_fwd(&EmbeddingShard {
            table: t.g,
            ids: id.g,
            out: out.g,
            dim,
            row0: 6,
            vocab,
        })
        .unwrap();
    let g = get(&p.gpu, out.g);
    assert!(g[..dim].iter().all(|&x| x == 0.5), "held id 7: {g:?}");
    assert!(
        g[dim..2 * dim].iter().all(|&x| x == 0.0),
        "id 2 is another rank's"
    );
    assert!(
        g[2 * dim..].iter().all(|x| x.is_nan()),
        "ids 10 and -1: {g:?}"
    );
}

// ---- cross entropy ----------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA device"]
fn cross_entropy_stats_and_shard_match_cpu() {
    let mut p = pair();
    let mut rng = Rng::new(41);
    let ignore = -100;
    for (rows, vocab, k) in [
        (3usize, 5usize, 2usize),
        (7, 50001, 3),
        (67, 128256, 2),
        (1024, 32000, 4),
    ] {
        let shards = split(vocab, k);
        let targets: Vec<i32> = (0..rows)
            .map(|r| match r % 5 {
                3 => ignore,
                0 => shards[r % k].0 as i32,
                1 => shards[r % k].1 as i32 - 1,
                _ => rng.below(vocab) as i32,
            })
            .collect();
        let t = p.put_i32(&targets);
        for dt in BOTH {
            let what = format!("{dt} {rows}x{vocab} over {k}");
            let logits = rng.vec(rows * vocab, 4.0);
            let parts: Vec<T2> = shards
                .iter()
                .map(|&(a, z)| p.put(&columns(&logits, vocab, a, z), dt))
                .collect();
            // Pass 1 on every rank, then the all-gather by hand, per backend, in rank order.
            let (mut gath_g, mut gath_c) = (Vec::new(), Vec::new());
            for (&(a, z), &x) in shards.iter().zip(&parts) {
                let st = p.out(rows * 3, DType::F32);
                let args = |side: fn(T2) -> Buf| CrossEntropyStats {
                    logits: side(x),
                    targets: side(t),
                    stats: side(st),
                    rows,
                    vocab: z - a,
                    col0: a,
                    ignore_index: ignore,
                };
                p.gpu.cross_entropy_stats(&args(T2::gpu)).unwrap();
                p.cpu.cross_entropy_stats(&args(T2::cpu)).unwrap();
                // The CPU sums up to 10^5 exponentials sequentially in f32 (drift ~1e-5).
                assert_pair(
                    &format!("cross_entropy_stats {what} cols {a}"),
                    &p,
                    st,
                    1e-4,
                );
                let (g, c) = p.get(st);
                gath_g.extend(g);
                gath_c.extend(c);
            }
            let st = p.alloc(k * rows * 3, DType::F32);
            p.gpu.upload(st.g, &to_bytes(&gath_g, DType::F32)).unwrap();
            p.cpu.upload(st.c, &to_bytes(&gath_c, DType::F32)).unwrap();

            // The f64 loss of the stored logits.
            let rounded = from_bytes(&to_bytes(&logits, dt), dt);
            let want: Vec<f32> = (0..rows)
                .map(|r| {
                    if targets[r] == ignore {
                        return 0.0;
                    }
                    let row = &rounded[r * vocab..(r + 1) * vocab];
                    let mx = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                    let s: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
                    (mx + s.ln() - row[targets[r] as usize] as f64) as f32
                })
                .collect();
            let mut dl_gpu = vec![0f32; rows * vocab];
            for (&(a, z), &x) in shards.iter().zip(&parts) {
                let (loss, d) = (p.out(rows, DType::F32), p.out(rows * (z - a), dt));
                let args = |side: fn(T2) -> Buf| CrossEntropyShard {
                    logits: side(x),
                    targets: side(t),
                    stats: side(st),
                    losses: side(loss),
                    dlogits: side(d),
                    rows,
                    vocab: z - a,
                    col0: a,
                    shards: k,
                    vocab_total: vocab,
                    ignore_index: ignore,
                    grad_scale: 0.25,
                };
                p.gpu.cross_entropy_shard(&args(T2::gpu)).unwrap();
                p.cpu.cross_entropy_shard(&args(T2::cpu)).unwrap();
                let (gl, cl) = p.get(loss);
                let w = format!("cross_entropy_shard {what} cols {a}");
                assert_close(&format!("{w} loss vs f64"), &gl, &want, 1e-5);
                assert_close(&format!("{w} loss vs cpu"), &gl, &cl, 1e-4);
                assert_pair(&format!("{w} dlogits"), &p, d, tol(dt));
                // dlogits written over the logits: the same bits.
                let loss2 = p.out(rows, DType::F32);
                p.gpu
                    .cross_entropy_shard(&CrossEntropyShard {
                        losses: loss2.g,
                        dlogits: x.g,
                        ..args(T2::gpu)
                    })
                    .unwrap();
                let fresh = get(&p.gpu, d.g);
                assert_eq!(
                    bits(&get(&p.gpu, x.g)),
                    bits(&fresh),
                    "{w}: aliased dlogits"
                );
                assert_eq!(bits(&get(&p.gpu, loss2.g)), bits(&gl), "{w}: aliased loss");
                for r in 0..rows {
                    let w = z - a;
                    dl_gpu[r * vocab + a..r * vocab + z]
                        .copy_from_slice(&fresh[r * w..(r + 1) * w]);
                }
            }
            // The shards reassemble the device's whole-vocabulary loss gradient.
            let x = p.put(&logits, dt);
            let (loss, d) = (p.out(rows, DType::F32), p.out(rows * vocab, dt));
            p.gpu
                .cross_entropy(&CrossEntropy {
                    logits: x.g,
                    targets: t.g,
                    losses: loss.g,
                    dlogits: d.g,
                    rows,
                    vocab,
                    ignore_index: ignore,
                    grad_scale: 0.25,
                })
                .unwrap();
            let whole = get(&p.gpu, d.g);
            assert_close(
                &format!("sharded vs whole dlogits {what}"),
                &dl_gpu,
                &whole,
                tol(dt),
            );
        }
    }
}

/// A target outside the whole vocabulary (not ignore_index) gives a NaN loss on the device; the
/// other rows are unaffected.
#[test]
#[ignore = "needs a CUDA device"]
fn cross_entropy_shard_nan_for_bad_target() {
    let mut p = pair();
    let (rows, vocab) = (3, 64);
    let x = p.put(&Rng::new(42).vec(rows * vocab, 1.0), DType::F32);
    let t = p.put_i32(&[5, 64, -100]);
    let st = p.out(rows * 3, DType::F32);
    p.gpu
        .cross_entropy_stats(&CrossEntropyStats {
            logits: x.g,
            targets: t.g,
            stats: st.g,
            rows,
            vocab,
            col0: 0,
            ignore_index: -100,
        })
        .unwrap();
    let (loss, d) = (p.out(rows, DType::F32), p.out(rows * vocab, DType::F32));
    p.gpu
        .cross_entropy_shard(&CrossEntropyShard {
            logits: x.g,
            targets: t.g,
            stats: st.g,
            losses: loss.g,
            dlogits: d.g,
            rows,
            vocab,
            col0: 0,
            shards: 1,
            vocab_total: vocab,
            ignore_index: -100,
            grad_scale: 1.0,
        })
        .unwrap();
    let l = get(&p.gpu, loss.g);
    assert!(l[0].is_finite() && l[0] > 0.0, "{l:?}");
    assert!(l[1].is_nan(), "target 64 of 64: {l:?}");
    assert_eq!(l[2], 0.0, "ignored row");
}

// ---- copy_2d ----------------------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA device"]
fn copy_2d_matches_cpu() {
    let mut p = pair();
    let mut rng = Rng::new(43);
    // (rows, cols, src_stride, dst_stride, src_offset, dst_offset): a rank's half of Llama 3's
    // vocabulary into the gathered logits (16-byte path), odd strides (element path), and more
    // rows than a grid's y dimension holds.
    for (rows, cols, ss, ds, so, doff) in [
        (
            64usize,
            64128usize,
            64128usize,
            128256usize,
            0usize,
            64128usize,
        ),
        (7, 53, 61, 59, 3, 1),
        (70001, 3, 5, 4, 0, 2),
        (1, 1, 1, 1, 0, 0),
    ] {
        for dt in [DType::F32, DType::BF16, DType::I32] {
            let (sn, dn) = (so + (rows - 1) * ss + cols, doff + (rows - 1) * ds + cols);
            let vals: Vec<f32> = match dt {
                DType::I32 => (0..sn).map(|_| rng.below(1 << 24) as f32 - 8e6).collect(),
                _ => rng.vec(sn, 1.0),
            };
            let src = p.put(&vals, dt);
            let dst = p.out(dn, dt); // gaps between the rows stay poisoned on both
            let args = |side: fn(T2) -> Buf| Copy2d {
                src: side(src).slice(so, sn - so),
                dst: side(dst).slice(doff, dn - doff),
                rows,
                cols,
                src_stride: ss,
                dst_stride: ds,
            };
            p.gpu.copy_2d(&args(T2::gpu)).unwrap();
            p.cpu.copy_2d(&args(T2::cpu)).unwrap();
            let (g, c) = p.get(dst);
            assert_eq!(
                bits(&g),
                bits(&c),
                "copy_2d {dt} {rows}x{cols} strides {ss}/{ds}"
            );
        }
    }
}

// ---- argument checks --------------------------------------------------------------------------

/// The device wrappers reject what the CPU twins reject (before any launch), with the same kind.
#[test]
#[ignore = "needs a CUDA device"]
fn bad_arguments_are_errors_on_both_backends() {
    let mut p = pair();
    let shape = |r: titan::Result<()>| matches!(r, Err(Error::Shape { .. }));
    let table = p.put(&[0.5; 4 * 3], DType::F32);
    let ids = p.put_i32(&[0, 9]);
    let out = p.out(6, DType::F32);
    let big = p.out(64, DType::F32);
    let tt = p.put_i32(&[1, -100]);
    for (name, side) in [("cuda", T2::gpu as fn(T2) -> Buf), ("cpu", T2::cpu)] {
        let be: &dyn Backend = if name == "cuda" { &p.gpu } else { &p.cpu };
        let emb = EmbeddingShard {
            table: side(table),
            ids: side(ids),
            out: side(out),
            dim: 3,
            row0: 6,
            vocab: 10,
        };
        be.embedding_shard_fwd(&emb).unwrap();
        let bad = [
            EmbeddingShard { row0: 7, ..emb },
            EmbeddingShard { dim: 5, ..emb },
            EmbeddingShard {
                out: side(table).slice(0, 6),
                ..emb
            },
        ];
        for (i, a) in bad.iter().enumerate() {
            assert!(
                shape(be.embedding_shard_fwd(a)),
                "{name} embedding fwd case {i}"
            );
            assert!(
                shape(be.embedding_shard_bwd(a)),
                "{name} embedding bwd case {i}"
            );
        }
        let b = side(big);
        let stats = CrossEntropyStats {
            logits: b.slice(0, 6),
            targets: side(tt),
            stats: b.slice(6, 6),
            rows: 2,
            vocab: 3,
            col0: 0,
            ignore_index: -100,
        };
        be.cross_entropy_stats(&stats).unwrap();
        let st_bad = CrossEntropyStats {
            stats: b.slice(3, 6),
            ..stats
        };
        assert!(
            shape(be.cross_entropy_stats(&st_bad)),
            "{name} stats overlap"
        );
        let ce = CrossEntropyShard {
            logits: b.slice(0, 6),
            targets: side(tt),
            stats: b.slice(6, 6),
            losses: b.slice(12, 2),
            dlogits: b.slice(16, 6),
            rows: 2,
            vocab: 3,
            col0: 0,
            shards: 1,
            vocab_total: 3,
            ignore_index: -100,
            grad_scale: 1.0,
        };
        be.cross_entropy_shard(&ce).unwrap();
        let bad = [
            CrossEntropyShard {
                dlogits: b.slice(1, 6),
                ..ce
            },
            CrossEntropyShard {
                losses: b.slice(7, 2),
                ..ce
            },
            CrossEntropyShard { shards: 2, ..ce },
            CrossEntropyShard { col0: 1, ..ce },
            CrossEntropyShard {
                shards: 0,
                stats: b.slice(6, 0),
                ..ce
            },
        ];
        for (i, a) in bad.iter().enumerate() {
            assert!(shape(be.cross_entropy_shard(a)), "{name} shard case {i}");
        }
        let cp = Copy2d {
            src: b.slice(0, 30),
            dst: b.slice(30, 30),
            rows: 3,
            cols: 4,
            src_stride: 10,
            dst_stride: 10,
        };
        be.copy_2d(&cp).unwrap();
        let bad = [
            Copy2d { rows: 4, ..cp },
            Copy2d {
                src_stride: 3,
                ..cp
            },
            Copy2d {
                dst: b.slice(20, 30),
                ..cp
            },
            Copy2d {
                dst: side(tt),
                rows: 1,
                cols: 2,
                ..cp
            },
        ];
        for (i, a) in bad.iter().enumerate() {
            assert!(shape(be.copy_2d(a)), "{name} copy_2d case {i}");
        }
    }
}
