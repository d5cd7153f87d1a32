//! The CPU backend's vocabulary-parallel cross-entropy (cross_entropy_stats + an all-gather by
//! hand + cross_entropy_shard) over 2 and 3 uneven shards against an f64 reference and against
//! the whole-vocabulary `cross_entropy`, f32 and bf16 logits, ignored rows, dlogits written over
//! the logits; plus its shape / dtype / overlap errors.
// Index loops keep the naive references close to the math they transcribe.
#![allow(clippy::needless_range_loop)]

mod cpu_common;

use cpu_common::*;
use titan::backend::cpu::CpuBackend;
use titan::backend::{Backend, CrossEntropy, CrossEntropyShard, CrossEntropyStats};
use titan::DType;

const FL: [DType; 2] = [DType::F32, DType::BF16];

fn be() -> CpuBackend {
    CpuBackend::new()
}

// ---- cross entropy -------------------------------------------------------------------------

/// f64 loss and dlogits of one row.
fn ce_ref(x: &[f64], target: usize, gs: f64) -> (f64, Vec<f64>) {
    let mx = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = x.iter().map(|v| (v - mx).exp()).sum();
    let d = x
        .iter()
        .enumerate()
        .map(|(j, v)| ((v - mx).exp() / z - if j == target { 1.0 } else { 0.0 }) * gs)
        .collect();
    (mx + z.ln() - x[target], d)
}

/// The two passes of the vocabulary-parallel loss over `shards`, the stats all-gathered by hand
/// in rank order. Returns every rank's losses and the reassembled dlogits (from the aliased run,
/// which must match the separate one bit for bit).
fn sharded_loss(
    b: &CpuBackend,
    logits: &[f64],
    targets: &[i32],
    vocab: usize,
    shards: &[(usize, usize)],
    dt: DType,
    gs: f32,
) -> (Vec<Vec<f64>>, Vec<f64>) {
    let rows = targets.len();
    let tt = upload_i32(b, targets);
    let cols = |a: usize, z: usize| -> Vec<f64> {
        (0..rows)
            .flat_map(|r| logits[r * vocab + a..r * vocab + z].to_vec())
            .collect()
    };
    let mut gathered = Vec::new();
    let mut parts = Vec::new();
    for &(a, z) in shards {
        let x = upload(b, &cols(a, z), dt);
        let st = poisoned(b, rows * 3, DType::F32);
        b.cross_entropy_stats(&CrossEntropyStats {
            logits: x.buf,
            targets: tt.buf,
            stats: st.buf,
            rows,
            vocab: z - a,
            col0: a,
            ignore_index: -100,
        })
        .unwrap();
        gathered.extend(download(b, st.buf));
        parts.push(x);
    }
    let st = upload(b, &gathered, DType::F32);
    let mut losses = Vec::new();
    let mut d = vec![f64::NAN; rows * vocab];
    for (&(a, z), x) in shards.iter().zip(&parts) {
        let (ls, dl) = (
            poisoned(b, rows, DType::F32),
            poisoned(b, rows * (z - a), dt),
        );
        let args = CrossEntropyShard {
            logits: x.buf,
            targets: tt.buf,
            stats: st.buf,
            losses: ls.buf,
            dlogits: dl.buf,
            rows,
            vocab: z - a,
            col0: a,
            shards: shards.len(),
            vocab_total: vocab,
            ignore_index: -100,
            grad_scale: gs,
        };
        b.cross_entropy_shard(&args).unwrap();
        let (sep_l, sep_d) = (download(b, ls.buf), download(b, dl.buf));
        let ls2 = poisoned(b, rows, DType::F32);
        b.cross_entropy_shard(&CrossEntropyShard {
            dlogits: x.buf,
            losses: ls2.buf,
            ..args
        })
        .unwrap();
        let got = download(b, x.buf);
        assert_eq!(bits(&got), bits(&sep_d), "{dt}: aliased dlogits differ");
        assert_eq!(
            bits(&download(b, ls2.buf)),
            bits(&sep_l),
            "{dt}: aliased loss"
        );
        for r in 0..rows {
            d[r * vocab + a..r * vocab + z].copy_from_slice(&got[r * (z - a)..(r + 1) * (z - a)]);
        }
        losses.push(sep_l);
    }
    (losses, d)
}

#[test]
fn cross_entropy_shards_equal_the_whole_vocabulary() {
    let b = be();
    let mut r = Rng::new(150);
    let (rows, vocab, gs) = (13, 2003, 0.37);
    let logits = r.vec(rows * vocab, 8.0);
    for k in [2, 3] {
        let shards = split(vocab, k);
        // Ignored rows, targets on both sides of each shard boundary, uniform ones.
        let targets: Vec<i32> = (0..rows)
            .map(|i| match i % 4 {
                3 => -100,
                0 => shards[i / 4 % k].0 as i32,
                1 => shards[i / 4 % k].1 as i32 - 1,
                _ => r.below(vocab) as i32,
            })
            .collect();
        for dt in FL {
            let rounded = download(&b, upload(&b, &logits, dt).buf);
            let mut want_l = vec![0.0; rows];
            let mut want_d = vec![0.0; rows * vocab];
            for i in 0..rows {
                if targets[i] >= 0 {
                    let x = &rounded[i * vocab..(i + 1) * vocab];
                    let (l, d) = ce_ref(x, targets[i] as usize, gs);
                    want_l[i] = l;
                    want_d[i * vocab..(i + 1) * vocab].copy_from_slice(&d);
                }
            }
            let (losses, d) = sharded_loss(&b, &logits, &targets, vocab, &shards, dt, gs as f32);
            for (rank, l) in losses.iter().enumerate() {
                assert_eq!(
                    bits(l),
                    bits(&losses[0]),
                    "{dt}: rank {rank}'s losses differ"
                );
            }
            // Losses are f32 arithmetic on the stored logits; dlogits are stored in dt.
            check("cross_entropy_shard loss", DType::F32, &losses[0], &want_l);
            check("cross_entropy_shard dlogits", dt, &d, &want_d);
            for i in (0..rows).filter(|&i| targets[i] < 0) {
                assert_eq!(losses[0][i], 0.0);
                assert!(d[i * vocab..(i + 1) * vocab].iter().all(|&x| x == 0.0));
            }
            // The whole-vocabulary op on the same logits.
            let (x, tt) = (upload(&b, &logits, dt), upload_i32(&b, &targets));
            let (ls, dl) = (
                poisoned(&b, rows, DType::F32),
                poisoned(&b, rows * vocab, dt),
            );
            b.cross_entropy(&CrossEntropy {
                logits: x.buf,
                targets: tt.buf,
                losses: ls.buf,
                dlogits: dl.buf,
                rows,
                vocab,
                ignore_index: -100,
                grad_scale: gs as f32,
            })
            .unwrap();
            let e = rel_l2(&losses[0], &download(&b, ls.buf));
            assert!(e < 1e-5, "{dt} {k} shards: loss vs cross_entropy {e:e}");
            let e = rel_l2(&d, &download(&b, dl.buf));
            assert!(
                e < tol(dt),
                "{dt} {k} shards: dlogits vs cross_entropy {e:e}"
            );
        }
    }
}

#[test]
fn cross_entropy_shard_errors() {
    let b = be();
    let (rows, vocab, total) = (2, 3, 7);
    let x = upload(&b, &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], DType::F32);
    let tt = upload_i32(&b, &[4, -100]);
    let st = poisoned(&b, 2 * rows * 3, DType::F32);
    let stats = CrossEntropyStats {
        logits: x.buf,
        targets: tt.buf,
        stats: st.buf.slice(0, rows * 3),
        rows,
        vocab,
        col0: 4,
        ignore_index: -100,
    };
    b.cross_entropy_stats(&stats).unwrap();
    let s = download(&b, st.buf.slice(0, rows * 3));
    assert_eq!(
        (s[2], s[5]),
        (0.1f32 as f64, 0.0),
        "held target / ignored row"
    );
    let sf = |a: CrossEntropyStats| b.cross_entropy_stats(&a);
    const SOP: &str = "cross_entropy_stats";
    assert!(is_shape(sf(CrossEntropyStats { rows: 3, ..stats }), SOP));
    assert!(is_shape(
        sf(CrossEntropyStats {
            stats: st.buf,
            ..stats
        }),
        SOP
    ));
    assert!(is_shape(
        sf(CrossEntropyStats {
            stats: x.buf,
            ..stats
        }),
        SOP
    ));
    assert!(is_dtype(
        sf(CrossEntropyStats {
            targets: x.buf.slice(0, 2),
            ..stats
        }),
        SOP
    ));

    let (ls, d) = (
        poisoned(&b, rows, DType::F32),
        poisoned(&b, rows * vocab, DType::F32),
    );
    let shard = CrossEntropyShard {
        logits: x.buf,
        targets: tt.buf,
        stats: st.buf,
        losses: ls.buf,
        dlogits: d.buf,
        rows,
        vocab,
        col0: 4,
        shards: 2,
        vocab_total: total,
        ignore_index: -100,
        grad_scale: 1.0,
    };
    b.upload(st.buf, &encode(&[0.0; 12], DType::F32)).unwrap();
    b.cross_entropy_shard(&shard).unwrap();
    let sh = |a: CrossEntropyShard| b.cross_entropy_shard(&a);
    const OP: &str = "cross_entropy_shard";
    let far = upload_i32(&b, &[7, 0]);
    let neg = upload_i32(&b, &[-1, 0]);
    let big = poisoned(&b, 12, DType::F32);
    assert!(is_shape(
        sh(CrossEntropyShard {
            targets: far.buf,
            ..shard
        }),
        OP
    ));
    assert!(is_shape(
        sh(CrossEntropyShard {
            targets: neg.buf,
            ..shard
        }),
        OP
    ));
    assert!(is_shape(sh(CrossEntropyShard { shards: 3, ..shard }), OP));
    assert!(is_shape(
        sh(CrossEntropyShard {
            shards: 0,
            stats: st.buf.slice(0, 0),
            ..shard
        }),
        OP
    ));
    assert!(is_shape(sh(CrossEntropyShard { col0: 5, ..shard }), OP));
    assert!(is_shape(
        sh(CrossEntropyShard {
            vocab_total: 6,
            ..shard
        }),
        OP
    ));
    assert!(is_shape(
        sh(CrossEntropyShard {
            losses: ls.buf.slice(0, 1),
            ..shard
        }),
        OP
    ));
    // dlogits partly over logits, losses over stats, dlogits over the stats.
    assert!(is_shape(
        sh(CrossEntropyShard {
            logits: big.buf.slice(0, 6),
            dlogits: big.buf.slice(1, 6),
            ..shard
        }),
        OP
    ));
    assert!(is_shape(
        sh(CrossEntropyShard {
            losses: st.buf.slice(4, 2),
            ..shard
        }),
        OP
    ));
    assert!(is_shape(
        sh(CrossEntropyShard {
            dlogits: st.buf.slice(0, 6),
            ..shard
        }),
        OP
    ));
    assert!(is_dtype(
        sh(CrossEntropyShard {
            losses: tt.buf,
            ..shard
        }),
        OP
    ));
}
