//! TensorBoard event files (`[metrics] enable_tensorboard`), read back by a decoder written here
//! from the formats' documentation, independently of the writer:
//! - TFRecord (tensorflow/core/lib/io/record_writer.cc): u64 LE length, u32 masked CRC-32C of
//!   the length bytes, data, u32 masked CRC-32C of the data; mask(c) = ((c >> 15) | (c << 17))
//!   + 0xa282ead8.
//! - protobuf wire format: key varint = field << 3 | wire type (0 varint, 1 fixed64, 2 length-
//!   delimited, 5 fixed32).
//! - event.proto / summary.proto: Event { double wall_time = 1; int64 step = 2; string
//!   file_version = 3; Summary summary = 5 }, Summary { repeated Value value = 1 }, Value
//!   { string tag = 1; float simple_value = 2 }.
//!
//! Every scalar of every logged step and validation run must be in the file with metrics.jsonl's
//! value and step. scripts/check_tensorboard.py reads the same files with TensorBoard's own
//! EventAccumulator (not run here: CI has no tensorboard package).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod train_common;
use train_common::{debug_trainer, tmp};

/// metrics.jsonl key -> TensorBoard tag (torchtitan's names where it has the quantity).
const STEP_TAGS: &[(&str, &str)] = &[
    ("loss", "loss_metrics/global_avg_loss"),
    ("grad_norm", "grad_norm"),
    ("lr", "lr"),
    ("tokens_per_s", "throughput(tps)"),
    ("tflops", "tflops"),
    ("mfu_pct", "mfu(%)"),
    ("step_time_s", "time_metrics/end_to_end(s)"),
    ("memory_actual_gib", "memory/max_reserved(GiB)"),
    ("memory_planned_gib", "memory/planned(GiB)"),
    ("eta_s", "time_metrics/eta(s)"),
];
const VALIDATION_TAGS: &[(&str, &str)] = &[
    ("validation_loss", "validation_metrics/loss"),
    ("validation_time_s", "validation_metrics/time(s)"),
];
/// Validation counts (constant per run) that are in metrics.jsonl but not TensorBoard's.
const VALIDATION_UNLOGGED: &[&str] = &["validation_tokens", "validation_batches"];

fn crc32c(data: &[u8]) -> u32 {
    // Bitwise, no table: reflected Castagnoli polynomial.
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = (c >> 1) ^ (0x82F6_3B78 & 0u32.wrapping_sub(c & 1));
        }
    }
    !c
}

/// The mask as the format documents it (the writer uses `rotate_right`).
#[allow(clippy::manual_rotate)]
fn masked(data: &[u8]) -> u32 {
    let c = crc32c(data);
    ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
}

/// The records of a TFRecord file, every CRC checked; the file must end on a record boundary.
fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut p = 0;
    while p < bytes.len() {
        assert!(bytes.len() - p >= 12, "truncated record header at {p}");
        let len_bytes = &bytes[p..p + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let crc_len = u32::from_le_bytes(bytes[p + 8..p + 12].try_into().unwrap());
        assert_eq!(
            crc_len,
            masked(len_bytes),
            "length CRC of the record at {p}"
        );
        let data = &bytes[p + 12..p + 12 + len];
        let crc = u32::from_le_bytes(bytes[p + 12 + len..p + 16 + len].try_into().unwrap());
        assert_eq!(crc, masked(data), "data CRC of the record at {p}");
        out.push(data);
        p += 16 + len;
    }
    out
}

enum Wire<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

fn varint(b: &[u8], p: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let x = b[*p];
        *p += 1;
        v |= ((x & 0x7f) as u64) << shift;
        if x < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// (field number, value) of every field of a message.
fn fields(b: &[u8]) -> Vec<(u64, Wire<'_>)> {
    let mut out = Vec::new();
    let mut p = 0;
    while p < b.len() {
        let key = varint(b, &mut p);
        let w = match key & 7 {
            0 => Wire::Varint(varint(b, &mut p)),
            1 => {
                p += 8;
                Wire::Fixed64(b[p - 8..p].try_into().unwrap())
            }
            2 => {
                let n = varint(b, &mut p) as usize;
                p += n;
                Wire::Bytes(&b[p - n..p])
            }
            5 => {
                p += 4;
                Wire::Fixed32(b[p - 4..p].try_into().unwrap())
            }
            t => panic!("wire type {t} in an Event"),
        };
        out.push((key >> 3, w));
    }
    out
}

#[derive(Debug, Default)]
struct Event {
    wall_time: f64,
    step: u64,
    file_version: Option<String>,
    /// tag -> simple_value
    values: BTreeMap<String, f32>,
}

fn decode_event(b: &[u8]) -> Event {
    let mut e = Event::default();
    for (f, w) in fields(b) {
        match (f, w) {
            (1, Wire::Fixed64(x)) => e.wall_time = f64::from_le_bytes(x),
            (2, Wire::Varint(s)) => e.step = s,
            (3, Wire::Bytes(s)) => e.file_version = Some(String::from_utf8(s.to_vec()).unwrap()),
            (5, Wire::Bytes(summary)) => {
                for (f, w) in fields(summary) {
                    let (1, Wire::Bytes(value)) = (f, w) else {
                        panic!("Summary field {f}")
                    };
                    let (mut tag, mut v) = (None, None);
                    for (f, w) in fields(value) {
                        match (f, w) {
                            (1, Wire::Bytes(t)) => {
                                tag = Some(String::from_utf8(t.to_vec()).unwrap())
                            }
                            (2, Wire::Fixed32(x)) => v = Some(f32::from_le_bytes(x)),
                            (f, _) => panic!("Summary.Value field {f}"),
                        }
                    }
                    e.values.insert(tag.unwrap(), v.unwrap());
                }
            }
            (f, _) => panic!("Event field {f}"),
        }
    }
    e
}

/// The event files below `dir`.
fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(event_files(&p));
        } else if p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("events.out.tfevents.")
        {
            out.push(p);
        }
    }
    out
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn train(dir: &Path, extra: &[&str]) {
    let mut o = vec![
        "--training.device=cpu",
        "--training.steps=4",
        "--training.seq_len=32",
        "--training.local_batch_size=2",
        "--metrics.log_freq=1",
        "--metrics.enable_tensorboard",
    ];
    o.extend_from_slice(extra);
    debug_trainer(dir, &o).unwrap().fit(true).unwrap();
}

#[test]
fn events_hold_every_logged_scalar_and_validation_loss() {
    let dir = tmp("tb-events");
    let t0 = now();
    let v = [
        "--validation.enable",
        "--validation.freq=2",
        "--validation.steps=1",
        "--validation.local_batch_size=2",
        "--validation.seq_len=32",
    ];
    train(&dir, &v);
    let t1 = now();

    // <dump>/tb/<YYYYmmdd-HHMM>/events.out.tfevents.<secs>.<host>...
    let files = event_files(&dir.join("tb"));
    assert_eq!(files.len(), 1, "{files:?}");
    let run = files[0]
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy();
    assert!(
        run.len() == 13
            && run.as_bytes()[8] == b'-'
            && run.replace('-', "").bytes().all(|c| c.is_ascii_digit()),
        "run folder {run}"
    );
    let bytes = std::fs::read(&files[0]).unwrap();
    let events: Vec<Event> = records(&bytes).into_iter().map(decode_event).collect();
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events[0].values.is_empty());
    for e in &events {
        assert!(
            e.wall_time >= t0.floor() && e.wall_time <= t1 + 1.0,
            "wall_time {} outside the run [{t0}, {t1}]",
            e.wall_time
        );
    }
    // All scalars of one log line are one event at its step.
    let mut got: Vec<(u64, &BTreeMap<String, f32>)> =
        events[1..].iter().map(|e| (e.step, &e.values)).collect();

    let jsonl = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let (mut steps, mut validations) = (0, 0);
    for line in jsonl.lines() {
        let j: serde_json::Value = serde_json::from_str(line).unwrap();
        let obj = j.as_object().unwrap();
        let step = j["step"].as_u64().unwrap();
        let (table, unlogged): (&[(&str, &str)], &[&str]) = if obj.contains_key("loss") {
            steps += 1;
            (STEP_TAGS, &[])
        } else {
            validations += 1;
            (VALIDATION_TAGS, VALIDATION_UNLOGGED)
        };
        // Every scalar of the line has a tag (a new metric without one fails here).
        for key in obj.keys().filter(|k| *k != "step") {
            assert!(
                table.iter().any(|(k, _)| k == key) || unlogged.contains(&key.as_str()),
                "metrics.jsonl field {key} has no TensorBoard tag"
            );
        }
        let want: BTreeMap<String, f32> = table
            .iter()
            .map(|(k, tag)| (tag.to_string(), j[*k].as_f64().unwrap() as f32))
            .collect();
        assert!(!got.is_empty(), "no event for the line {line}");
        let (s, values) = got.remove(0);
        assert_eq!(s, step, "event step for the line {line}");
        assert_eq!(*values, want, "values for the line {line}");
    }
    assert!(got.is_empty(), "events without a metrics.jsonl line");
    assert_eq!(
        (steps, validations),
        (4, 3),
        "4 steps logged, validation after 1, 2, 4"
    );
}

#[test]
fn every_rank_writes_its_own_folder_when_asked() {
    let dir = tmp("tb-ranks");
    train(
        &dir,
        &[
            "--training.steps=2",
            "--metrics.save_for_all_ranks",
            "--metrics.save_tb_folder=events",
        ],
    );
    let files = event_files(&dir.join("events"));
    assert_eq!(files.len(), 1, "{files:?}");
    let rank_dir = files[0].parent().unwrap();
    assert_eq!(rank_dir.file_name().unwrap(), "rank_0");
    assert_eq!(
        rank_dir.parent().unwrap().parent().unwrap(),
        dir.join("events")
    );
    let bytes = std::fs::read(&files[0]).unwrap();
    let steps: Vec<u64> = records(&bytes)[1..]
        .iter()
        .map(|r| decode_event(r).step)
        .collect();
    assert_eq!(steps, vec![1, 2]);
    assert!(!dir.join("tb").exists());

    // Off (torchtitan's default): no folder at all.
    let off = tmp("tb-off");
    debug_trainer(
        &off,
        &[
            "--training.device=cpu",
            "--training.steps=1",
            "--training.seq_len=32",
            "--training.local_batch_size=2",
        ],
    )
    .unwrap()
    .fit(true)
    .unwrap();
    assert!(off.join("metrics.jsonl").exists());
    assert!(!off.join("tb").exists());
}
