//! The CPU backend's tensor-parallel ops (vocabulary-parallel embedding and cross-entropy,
//! copy_2d) against f64 references and against their whole-vocabulary counterparts: shards of a
//! vocabulary split unevenly must reassemble exactly what one device computes. Odd sizes, outputs
//! poisoned (NaN) first, f32 and bf16 storage; plus their shape / dtype / overlap errors.
// Index loops keep the naive references close to the math they transcribe.
#![allow(clippy::needless_range_loop)]

mod cpu_common;

use cpu_common::*;
use titan::backend::cpu::CpuBackend;
use titan::backend::{
    Backend, Copy2d, CrossEntropy, CrossEntropyShard, CrossEntropyStats, EmbeddingShard,
};
use titan::{DType, Error};

const FL: [DType; 2] = [DType::F32, DType::BF16];

fn be() -> CpuBackend {
    CpuBackend::new()
}

/// `n` split into `k` contiguous ranges of sizes differing by at most one (the first ones larger).
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

fn is_shape(r: titan::Result<()>, op: &str) -> bool {
    matches!(r, Err(Error::Shape { op: o, .. }) if o == op)
}

fn is_dtype(r: titan::Result<()>, op: &str) -> bool {
    matches!(r, Err(Error::DType { op: o, .. }) if o == op)
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

// ---- embedding -----------------------------------------------------------------------------

#[test]
fn embedding_shards_reassemble_the_whole_table() {
    let b = be();
    let mut r = Rng::new(140);
    let (vocab, dim, n) = (31, 13, 47);
    // Repeats of a few ids, the first and last id of every shard, and uniform ones.
    let shards = split(vocab, 3);
    let mut ids: Vec<i32> = shards
        .iter()
        .flat_map(|&(a, z)| [a as i32, z as i32 - 1])
        .collect();
    while ids.len() < n {
        let id = if r.below(3) == 0 { 4 } else { r.below(vocab) };
        ids.push(id as i32);
    }
    let table = r.vec(vocab * dim, 1.0);
    let dout = r.vec(n * dim, 1.0);
    let dt0 = r.vec(vocab * dim, 1.0);
    let idt = upload_i32(&b, &ids);
    for dt in FL {
        // Forward: every row comes from exactly one shard, bit for bit; the others give zeros.
        let whole = upload(&b, &table, dt);
        let wo = poisoned(&b, n * dim, dt);
        b.embedding_fwd(whole.buf, idt.buf, wo.buf, dim).unwrap();
        let want = download(&b, wo.buf);
        let rounded = download(&b, whole.buf);
        for (i, &id) in ids.iter().enumerate() {
            let row = &want[i * dim..(i + 1) * dim];
            assert_eq!(row, &rounded[id as usize * dim..(id as usize + 1) * dim]);
        }
        let mut sum = vec![0.0; n * dim];
        for &(a, z) in &shards {
            let t = upload(&b, &table[a * dim..z * dim], dt);
            let o = poisoned(&b, n * dim, dt);
            b.embedding_shard_fwd(&EmbeddingShard {
                table: t.buf,
                ids: idt.buf,
                out: o.buf,
                dim,
                row0: a,
                vocab,
            })
            .unwrap();
            let got = download(&b, o.buf);
            for (i, &id) in ids.iter().enumerate() {
                let row = &got[i * dim..(i + 1) * dim];
                if (a..z).contains(&(id as usize)) {
                    assert_eq!(
                        bits(row),
                        bits(&want[i * dim..(i + 1) * dim]),
                        "{dt} id {id}"
                    );
                } else {
                    assert!(row.iter().all(|&x| x == 0.0), "{dt} id {id} not zero");
                }
                for j in 0..dim {
                    sum[i * dim + j] += row[j];
                }
            }
        }
        assert_eq!(bits(&sum), bits(&want), "{dt}: shards do not add up");

        // Backward: the shards' gradients, stacked, are the whole table's gradient.
        let mut want_dt = dt0.clone();
        let dr = download(&b, upload(&b, &dout, dt).buf);
        for (i, &id) in ids.iter().enumerate() {
            for j in 0..dim {
                want_dt[id as usize * dim + j] += dr[i * dim + j];
            }
        }
        let d = upload(&b, &dout, dt);
        let g = upload(&b, &dt0, DType::F32);
        b.embedding_bwd(d.buf, idt.buf, g.buf, dim).unwrap();
        let whole_grad = download(&b, g.buf);
        let mut stacked = Vec::new();
        for &(a, z) in &shards {
            let g = upload(&b, &dt0[a * dim..z * dim], DType::F32);
            b.embedding_shard_bwd(&EmbeddingShard {
                table: g.buf,
                ids: idt.buf,
                out: d.buf,
                dim,
                row0: a,
                vocab,
            })
            .unwrap();
            stacked.extend(download(&b, g.buf));
        }
        // f32 accumulation in token order against the exact sum of the stored values.
        check("embedding_shard_bwd", DType::F32, &stacked, &want_dt);
        assert_eq!(
            bits(&stacked),
            bits(&whole_grad),
            "{dt}: not the whole gradient"
        );
    }
}

#[test]
fn embedding_shard_errors() {
    let b = be();
    let (vocab, dim) = (10, 3);
    let t = upload(&b, &[0.5; 4 * 3], DType::F32);
    let ids = upload_i32(&b, &[0, 9]);
    let o = poisoned(&b, 2 * dim, DType::F32);
    let ok = EmbeddingShard {
        table: t.buf,
        ids: ids.buf,
        out: o.buf,
        dim,
        row0: 6,
        vocab,
    };
    b.embedding_shard_fwd(&ok).unwrap();
    assert_eq!(download(&b, o.buf), [0.0, 0.0, 0.0, 0.5, 0.5, 0.5]);
    let fwd = |a: EmbeddingShard| b.embedding_shard_fwd(&a);
    let bad_ids = upload_i32(&b, &[0, 10]);
    let neg_ids = upload_i32(&b, &[-1, 3]);
    let f_ids = upload(&b, &[0.0, 1.0], DType::F32);
    let short = poisoned(&b, 2 * dim - 1, DType::F32);
    const OP: &str = "embedding_shard_fwd";
    assert!(is_shape(
        fwd(EmbeddingShard {
            ids: bad_ids.buf,
            ..ok
        }),
        OP
    ));
    assert!(is_shape(
        fwd(EmbeddingShard {
            ids: neg_ids.buf,
            ..ok
        }),
        OP
    ));
    assert!(is_shape(fwd(EmbeddingShard { row0: 7, ..ok }), OP));
    assert!(is_shape(
        fwd(EmbeddingShard {
            out: short.buf,
            ..ok
        }),
        OP
    ));
    assert!(is_shape(fwd(EmbeddingShard { dim: 5, ..ok }), OP));
    assert!(is_shape(
        fwd(EmbeddingShard {
            out: t.buf.slice(0, 6),
            ..ok
        }),
        OP
    ));
    assert!(is_dtype(
        fwd(EmbeddingShard {
            ids: f_ids.buf,
            ..ok
        }),
        OP
    ));

    let g = upload(&b, &[0.0; 4 * 3], DType::F32);
    let gh = upload(&b, &[0.0; 4 * 3], DType::BF16);
    let dout = upload(&b, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], DType::F32);
    let bwd = |a: EmbeddingShard| b.embedding_shard_bwd(&a);
    let ok = EmbeddingShard {
        table: g.buf,
        out: dout.buf,
        ..ok
    };
    bwd(ok).unwrap();
    let got = download(&b, g.buf);
    assert_eq!(&got[9..], [4.0, 5.0, 6.0], "id 9 is row 3 of the shard");
    assert!(got[..9].iter().all(|&x| x == 0.0), "id 0 is not held");
    const BOP: &str = "embedding_shard_bwd";
    assert!(is_shape(
        bwd(EmbeddingShard {
            ids: bad_ids.buf,
            ..ok
        }),
        BOP
    ));
    assert!(is_shape(bwd(EmbeddingShard { row0: 7, ..ok }), BOP));
    assert!(is_shape(
        bwd(EmbeddingShard {
            out: short.buf,
            ..ok
        }),
        BOP
    ));
    assert!(is_shape(
        bwd(EmbeddingShard {
            out: g.buf.slice(6, 6),
            ..ok
        }),
        BOP
    ));
    assert!(is_dtype(
        bwd(EmbeddingShard {
            table: gh.buf,
            ..ok
        }),
        BOP
    ));
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

// ---- copy_2d -------------------------------------------------------------------------------

#[test]
fn copy_2d_round_trips_column_blocks() {
    let b = be();
    let mut r = Rng::new(160);
    let (rows, cols) = (7, 53);
    for dt in [DType::F32, DType::BF16, DType::I32] {
        let vals: Vec<f64> = if dt == DType::I32 {
            (0..rows * cols)
                .map(|_| r.below(1 << 20) as f64 - 1e5)
                .collect()
        } else {
            r.vec(rows * cols, 1.0)
        };
        let m = upload(&b, &vals, dt);
        let want = download(&b, m.buf);
        let back = poisoned(&b, rows * cols, dt);
        for (a, z) in [(0, 20), (20, 37), (37, 53)] {
            let w = z - a;
            // Into a padded compact buffer (stride w + 3): the padding stays poisoned.
            let part = poisoned(&b, rows * (w + 3), dt);
            let out = Copy2d {
                src: m.buf.slice(a, rows * cols - a),
                dst: part.buf,
                rows,
                cols: w,
                src_stride: cols,
                dst_stride: w + 3,
            };
            b.copy_2d(&out).unwrap();
            let got = download(&b, part.buf);
            for i in 0..rows {
                for j in 0..w + 3 {
                    let g = got[i * (w + 3) + j];
                    if j < w {
                        assert_eq!(g.to_bits(), want[i * cols + a + j].to_bits(), "{dt}");
                    } else if dt == DType::I32 {
                        assert_eq!(g, i32::MIN as f64, "{dt}: padding written");
                    } else {
                        assert!(g.is_nan(), "{dt}: padding written");
                    }
                }
            }
            b.copy_2d(&Copy2d {
                src: part.buf,
                dst: back.buf.slice(a, rows * cols - a),
                src_stride: w + 3,
                dst_stride: cols,
                ..out
            })
            .unwrap();
        }
        assert_eq!(
            bits(&download(&b, back.buf)),
            bits(&want),
            "{dt} round trip"
        );
    }
}

#[test]
fn copy_2d_errors() {
    let b = be();
    let src = upload(&b, &[1.0; 40], DType::F32);
    let dst = poisoned(&b, 40, DType::F32);
    let ok = Copy2d {
        src: src.buf,
        dst: dst.buf,
        rows: 4,
        cols: 5,
        src_stride: 10,
        dst_stride: 10,
    };
    b.copy_2d(&ok).unwrap();
    let c = |a: Copy2d| b.copy_2d(&a);
    let half = poisoned(&b, 40, DType::BF16);
    const OP: &str = "copy_2d";
    assert!(is_shape(c(Copy2d { rows: 5, ..ok }), OP));
    assert!(is_shape(
        c(Copy2d {
            src: src.buf.slice(0, 34),
            ..ok
        }),
        OP
    ));
    assert!(is_shape(
        c(Copy2d {
            dst: dst.buf.slice(1, 34),
            ..ok
        }),
        OP
    ));
    assert!(is_shape(
        c(Copy2d {
            src_stride: 4,
            ..ok
        }),
        OP
    ));
    assert!(is_shape(
        c(Copy2d {
            dst_stride: 4,
            ..ok
        }),
        OP
    ));
    assert!(is_shape(
        c(Copy2d {
            dst: src.buf.slice(5, 35),
            ..ok
        }),
        OP
    ));
    assert!(is_shape(
        c(Copy2d {
            dst: half.buf,
            ..ok
        }),
        OP
    ));
    // An empty block is a no-op whatever the strides.
    c(Copy2d {
        rows: 0,
        src_stride: 0,
        ..ok
    })
    .unwrap();
}
