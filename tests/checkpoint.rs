//! Native checkpoints: round trips (whole, dim-0 and 2-D sharded, replicated), resharding on load,
//! atomic commit and pruning, and one-line errors for every broken-checkpoint case.

use serde_json::json;
use std::path::{Path, PathBuf};
use titan::checkpoint::{
    self, latest_step, load, save, tmp_dir, write_shard, CheckpointMeta, CheckpointWriter,
    NamedTensor,
};
use titan::{DType, Error};

/// A fresh folder per test (tests run in parallel in one process).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("titan-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Distinct, never-zero values so a missed element cannot compare equal by accident.
fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| seed + 1.0 + i as f32 * 0.25).collect()
}

fn bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn meta(step: u64) -> CheckpointMeta {
    CheckpointMeta {
        config_toml: "[training]\nsteps = 10\n".into(),
        parallel: json!({"dp_shard": 3}),
        dataloader: json!({"position": step * 100}),
        rng: json!({"seed": 42, "offset": step}),
        lr_scheduler: json!({"last_step": step}),
        extra: json!({"tokens_seen": 12345}),
    }
}

fn ckpt_err(r: titan::Result<impl Sized>) -> String {
    match r {
        Err(Error::Checkpoint(m)) => m,
        Err(other) => panic!("expected a checkpoint error, got {other}"),
        Ok(_) => panic!("expected a checkpoint error, got Ok"),
    }
}

/// Rows [a, b) of a row-major [rows, cols] f32 tensor.
fn rows_of(full: &[f32], cols: usize, a: usize, b: usize) -> Vec<f32> {
    full[a * cols..b * cols].to_vec()
}

/// Saves `step` from 3 ranks: `w` [7, 5] f32 split 3/2/2 on dim 0, `norm` [5] replicated,
/// `tok` [2, 3] i32 on rank 0 only, `b` [4] bf16 split 2/2 (rank 2 holds none of it).
fn save_three_ranks(root: &Path, step: u64, keep: usize) -> PathBuf {
    let w = values(35, step as f32);
    let norm = values(5, 100.0);
    let tok: Vec<u8> = bytemuck::cast_slice(&[1i32, 2, 3, 4, 5, 6]).to_vec();
    let b: Vec<u8> = (1..=8u8).collect();
    let (wb, nb) = (bytes(&w), bytes(&norm));
    let splits = [(0, 3), (3, 5), (5, 7)];
    let ranks: Vec<Vec<NamedTensor>> = splits
        .iter()
        .enumerate()
        .map(|(r, &(a, e))| {
            let mut v = vec![
                NamedTensor::dim0_shard("w", DType::F32, &[e - a, 5], 7, a, &wb[a * 20..e * 20]),
                NamedTensor::full("norm", DType::F32, &[5], &nb),
            ];
            if r == 0 {
                v.push(NamedTensor::full("tok", DType::I32, &[2, 3], &tok));
            }
            if r < 2 {
                v.push(NamedTensor::dim0_shard(
                    "b",
                    DType::BF16,
                    &[2],
                    4,
                    2 * r,
                    &b[4 * r..4 * r + 4],
                ));
            }
            v
        })
        .collect();
    save(root, step, &ranks, &meta(step), keep).unwrap()
}

#[test]
fn sharded_round_trip_and_manifest() {
    let root = scratch("roundtrip");
    let dir = save_three_ranks(&root, 4, 0);
    assert_eq!(dir, root.join("step-4"));
    for f in [
        "manifest.json",
        "rank-00000.safetensors",
        "rank-00001.safetensors",
        "rank-00002.safetensors",
    ] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    assert_eq!(latest_step(&root).unwrap(), Some(4));
    let ck = load(&root, None).unwrap();
    assert_eq!(ck.step(), 4);
    let m = &ck.manifest;
    assert_eq!(m.world_size, 3);
    assert_eq!(m.config, "[training]\nsteps = 10\n");
    assert_eq!(m.dataloader, json!({"position": 400}));
    assert_eq!(m.rng, json!({"seed": 42, "offset": 4}));
    assert_eq!(m.lr_scheduler, json!({"last_step": 4}));
    assert_eq!(m.extra["tokens_seen"], 12345);
    assert_eq!(m.parallel, json!({"dp_shard": 3}));
    let w = &m.tensors["w"];
    assert_eq!(
        (w.dtype, w.shape.clone(), w.shards.len()),
        (DType::F32, vec![7, 5], 3)
    );
    assert_eq!(w.shards[1].offset, vec![3, 0]);
    assert_eq!(w.shards[2].file, "rank-00002.safetensors");
    assert_eq!(m.tensors["norm"].shards.len(), 3, "replicas are all listed");

    let full = values(35, 4.0);
    assert_eq!(ck.read_global("w").unwrap(), bytes(&full));
    assert_eq!(ck.read_global("norm").unwrap(), bytes(&values(5, 100.0)));
    assert_eq!(
        ck.read_global("tok").unwrap(),
        bytemuck::cast_slice::<i32, u8>(&[1, 2, 3, 4, 5, 6])
    );
    assert_eq!(ck.read_global("b").unwrap(), (1..=8u8).collect::<Vec<_>>());
    // Reshard 3 -> 2 ranks: rows 0..4 and 4..7 cross the saved shard boundaries.
    assert_eq!(
        ck.read_rows("w", 0, 4).unwrap(),
        bytes(&rows_of(&full, 5, 0, 4))
    );
    assert_eq!(
        ck.read_rows("w", 4, 3).unwrap(),
        bytes(&rows_of(&full, 5, 4, 7))
    );
    // An arbitrary box: rows 2..6, cols 1..4.
    let want: Vec<f32> = (2..6)
        .flat_map(|r| (1..4).map(move |c| (r, c)))
        .map(|(r, c)| full[r * 5 + c])
        .collect();
    assert_eq!(ck.read_slice("w", &[2, 1], &[4, 3]).unwrap(), bytes(&want));
    ck.verify_all().unwrap();
    let names: Vec<&str> = ck.tensor_names().collect();
    assert_eq!(names, vec!["b", "norm", "tok", "w"]);
    assert!(ckpt_err(ck.read_global("nope")).contains("no tensor 'nope'"));
    assert!(ckpt_err(ck.read_slice("w", &[5, 0], &[3, 5])).contains("outside tensor 'w'"));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn two_dim_blocks_reassemble() {
    // A [6, 10] tensor on a 2 x 2 grid with uneven cuts (rows 4 + 2, cols 3 + 7), as FSDP x TP
    // row-parallel would lay it out; plus a scalar.
    let root = scratch("blocks");
    let full = values(60, 0.0);
    let block = |r0: usize, r1: usize, c0: usize, c1: usize| -> Vec<u8> {
        let v: Vec<f32> = (r0..r1)
            .flat_map(|r| full[r * 10 + c0..r * 10 + c1].to_vec())
            .collect();
        bytes(&v)
    };
    let boxes = [(0, 4, 0, 3), (0, 4, 3, 10), (4, 6, 0, 3), (4, 6, 3, 10)];
    let data: Vec<Vec<u8>> = boxes
        .iter()
        .map(|&(a, b, c, d)| block(a, b, c, d))
        .collect();
    let scalar = bytes(&[7.5]);
    let ranks: Vec<Vec<NamedTensor>> = boxes
        .iter()
        .zip(&data)
        .map(|(&(a, b, c, d), bytes)| {
            let mut t = NamedTensor::full("wo", DType::F32, &[b - a, d - c], bytes);
            t.global_shape = vec![6, 10];
            t.offset = vec![a, c];
            vec![t, NamedTensor::full("step_scale", DType::F32, &[], &scalar)]
        })
        .collect();
    CheckpointWriter::new(&root, 0)
        .save(1, &ranks, &CheckpointMeta::default())
        .unwrap();
    let ck = load(&root, Some(1)).unwrap();
    assert_eq!(ck.read_global("wo").unwrap(), bytes(&full));
    assert_eq!(ck.read_global("step_scale").unwrap(), scalar);
    // A box straddling all four blocks.
    let want: Vec<f32> = (3..5)
        .flat_map(|r| full[r * 10 + 2..r * 10 + 5].to_vec())
        .collect();
    assert_eq!(ck.read_slice("wo", &[3, 2], &[2, 3]).unwrap(), bytes(&want));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn keep_latest_k_prunes_after_commit_and_stale_tmp_is_ignored() {
    let root = scratch("prune");
    // A crashed save of a later step: ignored by latest_step, removed by the next commit.
    let stale = root.join("step-99.tmp-12345");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("rank-00000.safetensors"), b"garbage").unwrap();
    for step in 1..=5 {
        save_three_ranks(&root, step, 2);
    }
    assert_eq!(checkpoint::available_steps(&root).unwrap(), vec![4, 5]);
    assert!(!stale.exists(), "stale temp folder must be cleaned");
    // k = 0 keeps everything.
    save_three_ranks(&root, 6, 0);
    assert_eq!(checkpoint::available_steps(&root).unwrap(), vec![4, 5, 6]);

    // A save that dies after writing shards (no commit) leaves the last good checkpoint intact.
    let tmp = tmp_dir(&root, 7, 777);
    let v = bytes(&values(4, 0.0));
    write_shard(
        &tmp,
        7,
        0,
        2,
        &[NamedTensor::full("x", DType::F32, &[4], &v)],
    )
    .unwrap();
    assert_eq!(latest_step(&root).unwrap(), Some(6));
    assert_eq!(load(&root, None).unwrap().step(), 6);

    // Saving a step again replaces it.
    save_three_ranks(&root, 6, 0);
    assert_eq!(checkpoint::available_steps(&root).unwrap(), vec![4, 5, 6]);
    assert_eq!(
        load(&root, Some(6)).unwrap().read_global("w").unwrap(),
        bytes(&values(35, 6.0))
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn missing_folder_step_and_manifest() {
    let root = scratch("missing");
    let gone = root.join("nope");
    let m = ckpt_err(load(&gone, None));
    assert!(m.contains("nope") && m.contains("does not exist"), "{m}");
    assert_eq!(latest_step(&gone).unwrap(), None);
    let m = ckpt_err(load(&root, None));
    assert!(m.contains("no checkpoint found"), "{m}");

    save_three_ranks(&root, 2, 0);
    save_three_ranks(&root, 8, 0);
    let m = ckpt_err(load(&root, Some(5)));
    assert!(
        m.contains("step 5 not found") && m.contains("available steps: 2, 8"),
        "{m}"
    );

    std::fs::remove_file(root.join("step-8/manifest.json")).unwrap();
    let m = ckpt_err(load(&root, Some(8)));
    assert!(
        m.contains("step-8/manifest.json") && m.contains("missing"),
        "{m}"
    );
    std::fs::write(root.join("step-8/manifest.json"), "{\"format\": ").unwrap();
    let m = ckpt_err(load(&root, Some(8)));
    assert!(m.contains("corrupt manifest"), "{m}");

    std::fs::remove_file(root.join("step-2/rank-00001.safetensors")).unwrap();
    let m = ckpt_err(load(&root, Some(2)));
    assert!(
        m.contains("rank-00001.safetensors") && m.contains("missing"),
        "{m}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

fn rewrite(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(path).unwrap();
    f(&mut b);
    std::fs::write(path, b).unwrap();
}

#[test]
fn truncated_and_corrupt_shard_files() {
    let root = scratch("corrupt");
    let file = |s: u64| root.join(format!("step-{s}/rank-00001.safetensors"));
    for s in 1..=5 {
        save_three_ranks(&root, s, 0);
    }
    // Data cut short.
    rewrite(&file(1), |b| b.truncate(b.len() - 6));
    let m = ckpt_err(load(&root, Some(1)));
    assert!(
        m.contains("rank-00001.safetensors") && m.contains("truncated"),
        "{m}"
    );
    // Cut inside the header.
    rewrite(&file(2), |b| b.truncate(40));
    let m = ckpt_err(load(&root, Some(2)));
    assert!(
        m.contains("rank-00001.safetensors") && m.contains("header"),
        "{m}"
    );
    // Shorter than the length field.
    rewrite(&file(3), |b| b.truncate(5));
    let m = ckpt_err(load(&root, Some(3)));
    assert!(
        m.contains("rank-00001.safetensors") && m.contains("truncated"),
        "{m}"
    );
    // Garbage in the header JSON.
    rewrite(&file(4), |b| b[8..14].copy_from_slice(b"!!!!!!"));
    let m = ckpt_err(load(&root, Some(4)));
    assert!(
        m.contains("rank-00001.safetensors") && m.contains("corrupt safetensors header"),
        "{m}"
    );
    // One flipped bit in the data: headers are fine, the read catches it by checksum.
    rewrite(&file(5), |b| {
        let n = b.len();
        b[n - 3] ^= 0x10;
    });
    let ck = load(&root, Some(5)).unwrap();
    let m = ckpt_err(ck.verify_all());
    assert!(
        m.contains("rank-00001.safetensors") && m.contains("corrupt") && m.contains("tensor '"),
        "{m}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// Edits a checkpoint's manifest as JSON.
fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn manifest_and_shards_disagree() {
    let root = scratch("mismatch");
    let dirs: Vec<PathBuf> = (1..=5).map(|s| save_three_ranks(&root, s, 0)).collect();
    edit_manifest(&dirs[0], |v| {
        v["tensors"]["w"]["shards"][1]["shape"] = json!([3, 5])
    });
    let m = ckpt_err(load(&root, Some(1)));
    assert!(
        m.contains("manifest.json") && m.contains("'w'") && m.contains("overlap"),
        "{m}"
    );
    // A consistent layout that is not what the files hold (rows 0..2 / 2..5 vs 0..3 / 3..5).
    edit_manifest(&dirs[0], |v| {
        let shards = &mut v["tensors"]["w"]["shards"];
        shards[0]["shape"] = json!([2, 5]);
        shards[1]["offset"] = json!([2, 0]);
        shards[1]["shape"] = json!([3, 5]);
    });
    let m = ckpt_err(load(&root, Some(1)));
    assert!(
        m.contains("rank-00000.safetensors") && m.contains("f32 [3, 5] in the file but f32 [2, 5]"),
        "{m}"
    );
    edit_manifest(&dirs[1], |v| v["tensors"]["w"]["dtype"] = json!("BF16"));
    let m = ckpt_err(load(&root, Some(2)));
    assert!(
        m.contains("rank-0000") && m.contains("'w'") && m.contains("bf16"),
        "{m}"
    );
    edit_manifest(&dirs[2], |v| {
        let mut ghost = v["tensors"]["norm"].clone();
        ghost["shards"] = json!([ghost["shards"][0].clone()]);
        v["tensors"]["ghost"] = ghost;
    });
    let m = ckpt_err(load(&root, Some(3)));
    assert!(
        m.contains("rank-00000.safetensors") && m.contains("'ghost'") && m.contains("missing"),
        "{m}"
    );
    edit_manifest(&dirs[3], |v| v["tensors"]["w"]["shape"] = json!([8, 5]));
    let m = ckpt_err(load(&root, Some(4)));
    assert!(m.contains("'w'") && m.contains("cover 35 of its 40"), "{m}");
    edit_manifest(&dirs[4], |v| v["version"] = json!(99));
    let m = ckpt_err(load(&root, Some(5)));
    assert!(m.contains("version 99"), "{m}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn bad_saves_fail_and_leave_previous_checkpoint() {
    let root = scratch("badsave");
    save_three_ranks(&root, 1, 0);
    let v = bytes(&values(12, 0.0));
    // Two ranks, each holding one dim-0 shard (rows, global rows, first row) of the f32
    // tensor "w" with 3 columns.
    let w_shards = |a: (usize, usize, usize), b: (usize, usize, usize)| {
        [a, b]
            .map(|(rows, global, start)| {
                let data = &v[..rows * 12];
                vec![NamedTensor::dim0_shard(
                    "w",
                    DType::F32,
                    &[rows, 3],
                    global,
                    start,
                    data,
                )]
            })
            .to_vec()
    };
    // Rows 0..2 and 3..4 of a 4-row tensor: row 2 is held by nobody.
    let gap = w_shards((2, 4, 0), (1, 4, 3));
    let m = ckpt_err(save(&root, 2, &gap, &meta(2), 0));
    assert!(m.contains("'w'") && m.contains("cover 9 of its 12"), "{m}");
    // Overlapping, non-identical boxes.
    let overlap = w_shards((3, 4, 0), (2, 4, 2));
    assert!(ckpt_err(save(&root, 2, &overlap, &meta(2), 0)).contains("overlap"));
    // Ranks disagree on the global shape.
    let disagree = w_shards((2, 4, 0), (2, 5, 2));
    let m = ckpt_err(save(&root, 2, &disagree, &meta(2), 0));
    assert!(
        m.contains("rank-00001.safetensors") && m.contains("another rank"),
        "{m}"
    );
    // Byte count does not match the shape; box outside the global shape.
    let m = ckpt_err(save(
        &root,
        2,
        &[vec![NamedTensor::full("x", DType::F32, &[4], &v[..12])]],
        &meta(2),
        0,
    ));
    assert!(m.contains("'x'") && m.contains("12 bytes"), "{m}");
    let m = ckpt_err(save(
        &root,
        2,
        &[vec![NamedTensor::dim0_shard(
            "x",
            DType::F32,
            &[3],
            4,
            2,
            &v[..12],
        )]],
        &meta(2),
        0,
    ));
    assert!(m.contains("'x'") && m.contains("does not fit"), "{m}");
    assert_eq!(checkpoint::available_steps(&root).unwrap(), vec![1]);
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec!["step-1"],
        "failed saves must not leave temp folders"
    );
    assert_eq!(
        load(&root, None).unwrap().read_global("w").unwrap(),
        bytes(&values(35, 1.0))
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// Cuts `n` rows into `k` contiguous, possibly empty, pieces (a tiny LCG picks the cuts).
fn random_cuts(n: usize, k: usize, seed: &mut u64) -> Vec<(usize, usize)> {
    let mut cuts: Vec<usize> = (0..k - 1)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (*seed >> 33) as usize % (n + 1)
        })
        .collect();
    cuts.push(0);
    cuts.push(n);
    cuts.sort_unstable();
    cuts.windows(2).map(|w| (w[0], w[1])).collect()
}

#[test]
fn ranks_as_threads_write_then_one_commits_and_any_layout_reads_back() {
    // The distributed protocol: every rank writes its shard into the shared temp folder, a
    // barrier (here: join), then one rank commits. Saved on 5 ranks with random uneven row
    // splits of a [97, 13] bf16 tensor; read back as 1, 2, 3 and 7 ranks would.
    let root = scratch("threads");
    let (rows, cols) = (97, 13);
    let full: Vec<u8> = (0..rows * cols * 2).map(|i| (i % 251) as u8 + 1).collect();
    let mut seed = 0x5eed;
    let cuts = random_cuts(rows, 5, &mut seed);
    let tmp = tmp_dir(&root, 3, 4242);
    std::thread::scope(|s| {
        for (rank, &(a, b)) in cuts.iter().enumerate() {
            let (tmp, full) = (&tmp, &full);
            s.spawn(move || {
                let shard = &full[a * cols * 2..b * cols * 2];
                let t = NamedTensor::dim0_shard("emb", DType::BF16, &[b - a, cols], rows, a, shard);
                write_shard(tmp, 3, rank, 5, &[t]).unwrap();
            });
        }
    });
    checkpoint::commit(&root, 3, &tmp, 5, &meta(3), 0).unwrap();
    assert!(!tmp.exists());
    let ck = load(&root, Some(3)).unwrap();
    assert_eq!(ck.read_global("emb").unwrap(), full);
    for world in [1, 2, 3, 7] {
        for (a, b) in random_cuts(rows, world, &mut seed) {
            let got = ck.read_rows("emb", a, b - a).unwrap();
            assert_eq!(
                got,
                &full[a * cols * 2..b * cols * 2],
                "world {world}, rows {a}..{b}"
            );
        }
    }
    std::fs::remove_dir_all(&root).unwrap();
}
