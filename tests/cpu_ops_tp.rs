//! The CPU backend's vocabulary-parallel embedding and copy_2d against f64 references and
//! against the whole-table embedding: shards of an unevenly split vocabulary must reassemble
//! exactly what one device computes. Odd sizes, outputs poisoned (NaN) first, f32 and bf16
//! storage; plus their shape / dtype / overlap errors. The vocabulary-parallel loss:
//! cpu_ops_tp_loss.rs.

mod cpu_common;

use cpu_common::*;
use titan::backend::cpu::CpuBackend;
use titan::backend::{Backend, Copy2d, EmbeddingShard};
use titan::DType;

const FL: [DType; 2] = [DType::F32, DType::BF16];

fn be() -> CpuBackend {
    CpuBackend::new()
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
