//! TensorBoard event files (torchtitan's `[metrics] enable_tensorboard`), written without
//! TensorFlow: a file is a sequence of TFRecords, each holding one `Event` protobuf.
//!
//! TFRecord framing: u64 length (little-endian), u32 masked CRC-32C of those 8 bytes, the data,
//! u32 masked CRC-32C of the data; mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8.
//! `Event` (tensorflow/core/util/event.proto): wall_time = 1 (double), step = 2 (int64),
//! file_version = 3 (string, "brain.Event:2" in the first record), summary = 5 (`Summary`:
//! repeated `Value` value = 1, each with tag = 1 and simple_value = 2 (float)).
//!
//! Where (torchtitan's `components/metrics.py`): `<dump_folder>/<save_tb_folder>/<YYYYmmdd-HHMM>/`
//! in local time, written by the metrics rank only unless `save_for_all_ranks`, which gives
//! each rank its own `rank_<r>/` below. Tags are torchtitan's where it has the quantity.
//! Every record is written with one `write` call straight to the file (no user-space buffer), so
//! a killed run keeps every event written before.

use crate::error::{Error, Result};
use crate::metrics::StepMetrics;
use crate::train::config::JobConfig;
use crate::train::validate::ValMetrics;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The scalars of a training log line, by TensorBoard tag.
pub fn step_scalars(m: &StepMetrics) -> Vec<(&'static str, f64)> {
    vec![
        ("loss_metrics/global_avg_loss", m.loss),
        ("grad_norm", m.grad_norm),
        ("lr", m.lr),
        ("throughput(tps)", m.tokens_per_s),
        ("tflops", m.tflops),
        ("mfu(%)", m.mfu_pct),
        // torchtitan's end_to_end is the mean step time over the log window, as step_time_s.
        ("time_metrics/end_to_end(s)", m.step_time_s),
        // titan holds all its device memory from the start: what it holds is its peak reserve.
        ("memory/max_reserved(GiB)", m.memory_actual_gib),
        // titan's own: the static plan's bytes, and the remaining time.
        ("memory/planned(GiB)", m.memory_planned_gib),
        ("time_metrics/eta(s)", m.eta_s),
    ]
}

/// The scalars of a validation line, by TensorBoard tag.
pub fn validation_scalars(m: &ValMetrics) -> Vec<(&'static str, f64)> {
    vec![
        ("validation_metrics/loss", m.validation_loss),
        ("validation_metrics/time(s)", m.validation_time_s),
    ]
}

/// A run's TensorBoard output: nothing unless `metrics.enable_tensorboard` (and this rank logs).
pub struct TensorBoard {
    writer: Option<EventWriter>,
}

impl TensorBoard {
    /// The writer of `rank` for the run `cfg`; `metrics_rank` is the rank whose numbers are the
    /// run's (torchtitan: 0, or the first rank of the last pipeline stage).
    pub fn open(cfg: &JobConfig, rank: usize, metrics_rank: usize) -> Result<TensorBoard> {
        let writer = match run_dir(cfg, rank, metrics_rank, &local_minute()) {
            Some(dir) => {
                let w = EventWriter::create(&dir)?;
                let _ = writeln!(
                    std::io::stderr(),
                    "titan: TensorBoard events in {}",
                    dir.display()
                );
                Some(w)
            }
            None => None,
        };
        Ok(TensorBoard { writer })
    }

    /// The event file, when writing.
    pub fn path(&self) -> Option<&Path> {
        self.writer.as_ref().map(|w| w.path.as_path())
    }

    pub fn log_step(&mut self, m: &StepMetrics) -> Result<()> {
        match self.writer.as_mut() {
            Some(w) => w.add_scalars(m.step, &step_scalars(m)),
            None => Ok(()),
        }
    }

    pub fn log_validation(&mut self, m: &ValMetrics) -> Result<()> {
        match self.writer.as_mut() {
            Some(w) => w.add_scalars(m.step, &validation_scalars(m)),
            None => Ok(()),
        }
    }
}

/// Where `rank` writes, or None when it does not: `<dump>/<save_tb_folder>/<stamp>[/rank_<r>]`.
pub fn run_dir(cfg: &JobConfig, rank: usize, metrics_rank: usize, stamp: &str) -> Option<PathBuf> {
    let m = &cfg.metrics;
    if !m.enable_tensorboard || (!m.save_for_all_ranks && rank != metrics_rank) {
        return None;
    }
    let dir = Path::new(&cfg.job.dump_folder)
        .join(&m.save_tb_folder)
        .join(stamp);
    Some(if m.save_for_all_ranks {
        dir.join(format!("rank_{rank}"))
    } else {
        dir
    })
}

/// One event file.
pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Creates `dir` and a new `events.out.tfevents.<secs>.<host>.<pid>.<n>` in it, starting
    /// with the file-version record.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        static FILES: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let name = format!(
            "events.out.tfevents.{:010}.{}.{}.{}",
            wall_time() as u64,
            host_name(),
            std::process::id(),
            FILES.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { path, file };
        w.write_event(&event(wall_time(), 0, Field::FileVersion("brain.Event:2")))?;
        Ok(w)
    }

    /// One event at `step` whose summary holds every `(tag, value)` (as f32, TensorBoard's
    /// simple_value).
    pub fn add_scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        for &(tag, v) in scalars {
            let mut value = Vec::new();
            put_bytes(&mut value, 1, tag.as_bytes());
            put_key(&mut value, 2, FIXED32);
            value.extend_from_slice(&(v as f32).to_le_bytes());
            put_bytes(&mut summary, 1, &value);
        }
        self.write_event(&event(wall_time(), step, Field::Summary(&summary)))
    }

    fn write_event(&mut self, data: &[u8]) -> Result<()> {
        let rec = tf_record(data);
        self.file
            .write_all(&rec)
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The payload of an `Event` (one of its `what` fields).
enum Field<'a> {
    FileVersion(&'a str),
    /// An encoded `Summary`.
    Summary(&'a [u8]),
}

fn event(wall_time: f64, step: u64, what: Field) -> Vec<u8> {
    let mut e = Vec::new();
    put_key(&mut e, 1, FIXED64);
    e.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        put_key(&mut e, 2, VARINT);
        put_varint(&mut e, step);
    }
    match what {
        Field::FileVersion(v) => put_bytes(&mut e, 3, v.as_bytes()),
        Field::Summary(s) => put_bytes(&mut e, 5, s),
    }
    e
}

// Protobuf wire types.
const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, (field << 3) | wire);
}

fn put_bytes(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    put_key(out, field, LEN);
    put_varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// `data` framed as one TFRecord.
pub fn tf_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    r
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven.
pub fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut c = !0u32;
    for &b in data {
        c = TABLE[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xA282_EAD8)
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The host name, with characters unsafe in a file name replaced.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or fails.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(0);
    let name = if ok { &buf[..end] } else { &[][..] };
    let name: String = String::from_utf8_lossy(name)
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '.' | '_' => c,
            _ => '_',
        })
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// The current local time as torchtitan names its run folders ("%Y%m%d-%H%M").
fn local_minute() -> String {
    let now = wall_time() as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which lives for the call.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        return "run".into();
    }
    format!(
        "{:04}{:02}{:02}-{:02}{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_values() {
        // RFC 3720 B.4 and the common "123456789" check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn varints_and_empty_step() {
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
        // Step 0 is proto3's default and is left out, as protobuf writers do.
        let e = event(1.5, 0, Field::FileVersion("x"));
        assert_eq!(e[0], 0x09);
        assert_eq!(&e[9..], &[0x1A, 1, b'x']);
    }

    #[test]
    fn each_event_is_on_disk_once_written() {
        let dir = std::env::temp_dir().join(format!("titan-tb-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut w = EventWriter::create(&dir).unwrap();
        let first = std::fs::read(w.path()).unwrap();
        assert_eq!(
            first.len(),
            16 + event(0.0, 0, Field::FileVersion("brain.Event:2")).len()
        );
        w.add_scalars(7, &[("loss", 2.5)]).unwrap();
        // Read while the writer is alive (a killed run never drops it).
        let both = std::fs::read(w.path()).unwrap();
        let rec = &both[first.len()..];
        let len = u64::from_le_bytes(rec[..8].try_into().unwrap()) as usize;
        assert_eq!(rec.len(), 16 + len);
        assert!(rec.windows(4).any(|x| x == 2.5f32.to_le_bytes()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn folders_follow_torchtitan() {
        let mut cfg = JobConfig::default();
        cfg.job.dump_folder = "/d".into();
        assert_eq!(run_dir(&cfg, 0, 0, "s"), None, "off by default");
        cfg.metrics.enable_tensorboard = true;
        assert_eq!(run_dir(&cfg, 0, 0, "s"), Some(PathBuf::from("/d/tb/s")));
        assert_eq!(run_dir(&cfg, 1, 0, "s"), None, "only the metrics rank");
        assert_eq!(run_dir(&cfg, 3, 3, "s"), Some(PathBuf::from("/d/tb/s")));
        cfg.metrics.save_for_all_ranks = true;
        cfg.metrics.save_tb_folder = "events".into();
        assert_eq!(
            run_dir(&cfg, 1, 0, "s"),
            Some(PathBuf::from("/d/events/s/rank_1"))
        );
        let stamp = local_minute();
        assert!(stamp.len() == 13 && stamp.as_bytes()[8] == b'-', "{stamp}");
    }
}
