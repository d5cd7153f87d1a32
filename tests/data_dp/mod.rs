//! The data parallel split: every rank walks the world-1 stream and takes its share of each
//! global batch, so any layout reads the same data and a state resumes at any degree.

use serde_json::{json, Value};
use titan::data::{build_loader, Batch, DataConfig, DataLoader, SyntheticCorpus};

use super::{cfg, data_err, scratch, take, u16_file, write};

/// The `world` ranks' loaders of `c` at local batch `batch`.
fn ranks(c: &DataConfig, world: usize, batch: usize) -> Vec<DataLoader> {
    (0..world)
        .map(|rank| {
            let mut c = c.clone();
            (c.batch, c.dp_rank, c.dp_world) = (batch, rank, world);
            build_loader(&c).unwrap()
        })
        .collect()
}

/// The rows of `parts` in order, as one batch.
fn concat(parts: &[Batch]) -> Batch {
    Batch {
        inputs: parts.iter().flat_map(|b| b.inputs.clone()).collect(),
        labels: parts.iter().flat_map(|b| b.labels.clone()).collect(),
        batch: parts.iter().map(|b| b.batch).sum(),
        seq: parts[0].seq,
    }
}

/// A state without the layout that saved it (informational only).
fn position(state: &Value) -> Value {
    let mut s = state.clone();
    s.as_object_mut().unwrap().remove("dp_world");
    s
}

/// A state through text, as a checkpoint manifest stores it.
fn reread(state: &Value) -> Value {
    serde_json::from_str(&state.to_string()).unwrap()
}

/// For n in {2, 3, 4} ranks at local batch b in {1, 2}, `steps` batches: the ranks' k-th batches
/// in rank order are world 1's k-th batch at batch n x b; rank r's k-th is world 1's
/// (k n + r)-th at batch b; after each, every rank's state equals the others' and world 1's
/// position. Returns world 1's last state (at n = 4, b = 2).
fn split_matches_world_1(c: &DataConfig, steps: usize) -> Value {
    let mut last = Value::Null;
    for n in [2, 3, 4] {
        for b in [1, 2] {
            let mut whole = ranks(c, 1, n * b).pop().unwrap();
            let fine = take(&mut ranks(c, 1, b).pop().unwrap(), steps * n);
            let mut rs = ranks(c, n, b);
            for k in 0..steps {
                let parts: Vec<Batch> = rs.iter_mut().map(|l| l.next_batch().unwrap()).collect();
                let what = format!("{}: {n} ranks x batch {b}, batch {k}", c.dataset);
                assert_eq!(concat(&parts), whole.next_batch().unwrap(), "{what}");
                for (r, p) in parts.iter().enumerate() {
                    assert_eq!(p, &fine[k * n + r], "{what}, rank {r}");
                }
                let at = whole.state();
                for l in &rs {
                    assert_eq!(l.state(), rs[0].state(), "{what}");
                    assert_eq!(position(&l.state()), position(&at), "{what}");
                }
            }
            last = whole.state();
        }
    }
    last
}

#[test]
fn dp_ranks_in_order_read_the_world_1_batch() {
    let d = scratch("dp-split");
    // Text: one document, seq_len 8 (samples of 9); enough batches that 2 ranks x batch 1 pass
    // the end of the stream, so the others wrap several times, inside reads and skips alike.
    let text = SyntheticCorpus::new(9).document(0);
    write(&d.join("t.txt"), &text);
    let c = cfg(d.join("t.txt").to_str().unwrap(), 8, 1);
    let steps = (text.len() + 2) / (2 * 9) + 2;
    let end = split_matches_world_1(&c, steps);
    assert!(end["epoch"].as_u64().unwrap() >= 3, "{end}");

    // Token files: a folder of two shards (101 tokens), read across the file boundary.
    let ids: Vec<u16> = (0..101).map(|i| (i * 37) % 1000).collect();
    u16_file(&d.join("shards/s0.u16.bin"), &ids[..61]);
    u16_file(&d.join("shards/s1.u16.bin"), &ids[61..]);
    let c = cfg(d.join("shards").to_str().unwrap(), 6, 1);
    let end = split_matches_world_1(&c, 101 / (2 * 7) + 2);
    assert!(end["epoch"].as_u64().unwrap() >= 3, "{end}");

    // Synthetic: documents 0, 1, 2, ... for every layout; skips span whole documents.
    let end = split_matches_world_1(&cfg("synthetic", 100, 1), 6);
    assert!(end["doc"].as_u64().unwrap() >= 5, "{end}");

    // A skip that ends exactly at a document's end stands at the next document, as reading
    // there does: rank 0 of 2 reads the first half of document 0 and skips the second.
    let seed = (0..)
        .find(|&s| SyntheticCorpus::new(s).document(0).len().is_multiple_of(2))
        .unwrap();
    let half = (SyntheticCorpus::new(seed).document(0).len() + 2) / 2;
    let mut c = cfg("synthetic", half - 1, 1);
    c.seed = seed;
    let mut rs = ranks(&c, 2, 1);
    for l in &mut rs {
        l.next_batch().unwrap();
    }
    assert_eq!(rs[0].state(), rs[1].state());
    assert_eq!(
        (
            rs[0].state()["doc"].clone(),
            rs[0].state()["offset"].clone()
        ),
        (json!(1), json!(0))
    );
}

/// A world-1 state (batch 4) restores into every rank of 2 ranks x 2 and 4 ranks x 1, which go
/// on with world 1's batches; their state (the same on all ranks) restores into world 1.
fn resumes_across_degrees(c: &DataConfig) {
    let mut one = ranks(c, 1, 4).pop().unwrap();
    take(&mut one, 3);
    let saved = reread(&one.state());
    let next = take(&mut one, 4);
    for (n, b) in [(2, 2), (4, 1)] {
        let mut rs = ranks(c, n, b);
        for l in &mut rs {
            l.restore(&saved).unwrap();
        }
        for (k, want) in next.iter().enumerate() {
            let parts: Vec<Batch> = rs.iter_mut().map(|l| l.next_batch().unwrap()).collect();
            assert_eq!(
                &concat(&parts),
                want,
                "{}: world 1 -> {n}, batch {k}",
                c.dataset
            );
        }
        let state = rs[0].state();
        assert!(rs.iter().all(|l| l.state() == state));
        assert_eq!(position(&state), position(&one.state()));

        // And back: a state saved at world n continues in world 1 where the ranks go on.
        let mut back = ranks(c, 1, n * b).pop().unwrap();
        back.restore(&reread(&state)).unwrap();
        for k in 0..3 {
            let parts: Vec<Batch> = rs.iter_mut().map(|l| l.next_batch().unwrap()).collect();
            assert_eq!(
                back.next_batch().unwrap(),
                concat(&parts),
                "world {n} -> 1, {k}"
            );
        }
    }
}

#[test]
fn state_resumes_at_another_dp_degree() {
    let d = scratch("dp-resume");
    // 3 documents, about 1300 tokens: the 7 + 3 batches of 4 x 33 tokens wrap the stream.
    write(&d.join("t.txt"), SyntheticCorpus::new(2).text(3));
    resumes_across_degrees(&cfg(d.join("t.txt").to_str().unwrap(), 32, 4));
    resumes_across_degrees(&cfg("synthetic", 32, 4));
}

#[test]
fn version_1_states_resume_only_where_they_had_one_rank() {
    // States as the loader before the shared stream wrote them (byte tokenizer, seed 0):
    // synthetic seq_len 37 x batch 3 after 3 batches; SyntheticCorpus::new(5).text(3) as a text
    // file (700 tokens), seq_len 61 x batch 5 after 1 batch.
    let syn = json!({"doc": 1, "dp_rank": 0, "dp_world": 1, "kind": "synthetic", "offset": 113,
        "seed": 0, "tokenizer": "byte-level/259", "version": 1, "dataset": "synthetic"});
    let d = scratch("dp-v1");
    write(&d.join("t.txt"), SyntheticCorpus::new(5).text(3));
    let path = d.join("t.txt").to_str().unwrap().to_string();
    let toks = json!({"dp_rank": 0, "dp_world": 1, "epoch": 0, "kind": "tokens", "offset": 310,
        "fingerprint": "700/2903a004d0e3e872", "slice_len": 700, "slice_start": 0, "version": 1,
        "dataset": path});
    for (c, state, done) in [
        (cfg("synthetic", 37, 3), syn, 3),
        (cfg(&path, 61, 5), toks, 1),
    ] {
        let mut fresh = build_loader(&c).unwrap();
        let want = take(&mut fresh, done + 2).split_off(done);
        let mut l = build_loader(&c).unwrap();
        l.restore(&state).unwrap();
        assert_eq!(take(&mut l, 2), want, "{}", c.dataset);
        assert_eq!(l.state(), fresh.state());
        // A rank of an old split run held a position in its own slice: refused, with the way out.
        let mut split = state.clone();
        (split["dp_rank"], split["dp_world"]) = (json!(1), json!(2));
        let m = data_err(build_loader(&c).unwrap().restore(&split));
        assert!(
            m.contains("rank 1 of 2") && m.contains("exclude_from_loading"),
            "{m}"
        );
        let mut shifted = state.clone();
        shifted["slice_start"] = json!(5);
        if state["kind"] == "tokens" {
            data_err(build_loader(&c).unwrap().restore(&shifted));
        }
        let mut future = l.state();
        future["version"] = json!(3);
        let m = data_err(l.restore(&future));
        assert!(m.contains("version 3"), "{m}");
    }
}
