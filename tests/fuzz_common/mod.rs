//! A small seeded mutation fuzzer for the readers of user files: the TOML config and its
//! overrides, native checkpoints (manifest + safetensors shards), Hugging Face folders and token
//! files. Each target module builds pristine inputs once, then per case mutates them and checks
//! the reader's answer: a clean `Err` or a correct `Ok`.
//!
//! Every case runs on a worker thread under `catch_unwind` with a deadline, so a panic, a hang
//! or a wrong result fails the test with the seed, the case index, the mutations applied and a
//! dump of the inputs (also saved under the temp dir). Case `i` of a target draws only from its
//! own generator, seeded from (seed, target, i), so one case can be rerun alone.
//!
//! An allocation failure aborts the process without a report; the case then running is
//! described in `<temp dir>/titan-fuzz-last-case-<target>.txt`.
//!
//! Environment: `TITAN_FUZZ_SEED` (decimal or 0x-hex; default fixed), `TITAN_FUZZ_SCALE`
//! (multiplies every target's case count, for longer runs), `TITAN_FUZZ_CASE` (run one case).
#![allow(dead_code)]

pub mod checkpoint;
pub mod config;
mod config_edit;
pub mod hf;
pub mod mutate;
pub mod safetensors_mut;
pub mod tokens;

use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
pub use titan::rng::Rng;

/// The seed CI runs with (any other is one environment variable away).
pub const DEFAULT_SEED: u64 = 0x7174_616e_1515;
/// A case that runs longer than this is reported as a hang (cases take microseconds).
const DEADLINE: Duration = Duration::from_secs(20);
/// Stop collecting after this many failing cases.
const MAX_FAILURES: usize = 4;

/// One input of a case (a file, or the override list), for the failure report.
pub struct Dump {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl Dump {
    pub fn new(name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Dump {
        Dump {
            name: name.into(),
            bytes: bytes.into(),
        }
    }
}

/// What the reader did with an input whose result was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    Rejected,
}

/// `Err` = a wrong result (described).
pub type Check = Result<Verdict, String>;

pub struct Case {
    pub inputs: Vec<Dump>,
    pub run: Box<dyn FnOnce() -> Check + Send>,
}

/// A case's generator plus the log of the mutations it applied.
pub struct Fz {
    rng: Rng,
    pub log: Vec<String>,
}

impl Fz {
    pub fn new(seed: u64) -> Fz {
        Fz {
            rng: Rng::new(seed),
            log: Vec::new(),
        }
    }
    /// Uniform in [0, n) (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        self.rng.below(n as u64) as usize
    }
    /// Uniform in [lo, hi].
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, p: f64) -> bool {
        self.rng.uniform() < p
    }
    pub fn u64(&mut self) -> u64 {
        self.rng.next_u64()
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    pub fn note(&mut self, what: impl Into<String>) {
        self.log.push(what.into());
    }
}

/// Counts of one target's run.
#[derive(Debug, Default)]
pub struct Stats {
    pub cases: usize,
    pub accepted: usize,
    pub rejected: usize,
}

impl Stats {
    /// Guards against a generator that degenerated (all inputs rejected, or none mutated).
    pub fn assert_mix(&self, target: &str, min_each: f64) {
        if self.cases < 50 {
            return; // a single reproduced case, or a tiny scale
        }
        let n = self.cases as f64;
        assert!(
            self.accepted as f64 >= min_each * n && self.rejected as f64 >= min_each * n,
            "fuzz {target}: {} accepted, {} rejected of {} cases: the mutations no longer \
             exercise both outcomes (want at least {:.0}% of each)",
            self.accepted,
            self.rejected,
            self.cases,
            min_each * 100.0
        );
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not an integer")))
}

pub fn seed() -> u64 {
    env_u64("TITAN_FUZZ_SEED").unwrap_or(DEFAULT_SEED)
}

fn case_seed(seed: u64, target: &str, case: usize) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in target.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h ^ seed.rotate_left(17) ^ (case as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A fresh scratch folder for one target.
pub fn scratch(target: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("titan-fuzz-{}-{target}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The case being run, for a hang report: its index, header and inputs.
type Current = Arc<Mutex<(usize, String, Vec<Dump>)>>;

/// Writes a file as a new inode: rewriting one in place (truncate + write) makes ext4 flush it
/// on close, which costs milliseconds per case on a busy disk.
pub fn write_fresh(path: &std::path::Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(path);
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Runs `cases` cases (times TITAN_FUZZ_SCALE) of `target`; panics with a report if any case
/// panicked, hung or gave a wrong result.
///
/// Generation and runs happen on one worker thread (each run under `catch_unwind`); this thread
/// only watches a progress counter, so a case costs no thread hand-off on a busy machine.
pub fn fuzz<G>(target: &'static str, cases: usize, mut gen: G) -> Stats
where
    G: FnMut(&mut Fz) -> Case + Send + 'static,
{
    let seed = seed();
    let scale = env_u64("TITAN_FUZZ_SCALE").unwrap_or(1) as usize;
    let which: Vec<usize> = match env_u64("TITAN_FUZZ_CASE") {
        Some(c) => vec![c as usize],
        None => (0..cases * scale).collect(),
    };
    let done = Arc::new(AtomicUsize::new(0));
    let current: Current = Arc::new(Mutex::new((0, String::new(), Vec::new())));
    let started = Instant::now();
    let worker = {
        let (done, current) = (done.clone(), current.clone());
        std::thread::Builder::new()
            .name(format!("fuzz-{target}"))
            .spawn(move || {
                // An allocation failure aborts the process before any report: the case then
                // running is described in this file.
                let note = std::env::temp_dir().join(format!("titan-fuzz-last-case-{target}.txt"));
                let mut note = std::fs::File::create(note).ok();
                let mut stats = Stats::default();
                let mut failures = Vec::new();
                for &i in &which {
                    let mut fz = Fz::new(case_seed(seed, target, i));
                    let Case { inputs, run } = gen(&mut fz);
                    let head = header(target, seed, i, "started", &fz.log);
                    if let Some(f) = note.as_mut() {
                        use std::os::unix::fs::FileExt;
                        let _ = f
                            .set_len(0)
                            .and_then(|()| f.write_all_at(head.as_bytes(), 0));
                    }
                    *current.lock().unwrap() = (i, head, inputs);
                    let what = match catch_unwind(AssertUnwindSafe(run)) {
                        Ok(Ok(v)) => {
                            stats.cases += 1;
                            match v {
                                Verdict::Accepted => stats.accepted += 1,
                                Verdict::Rejected => stats.rejected += 1,
                            }
                            done.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        Ok(Err(why)) => format!("wrong result: {why}"),
                        Err(p) => format!("PANIC: {}", panic_text(&*p)),
                    };
                    let inputs = std::mem::take(&mut current.lock().unwrap().2);
                    failures.push(report(target, seed, i, &what, &fz.log, &inputs));
                    done.fetch_add(1, Ordering::Relaxed);
                    if failures.len() >= MAX_FAILURES {
                        break;
                    }
                }
                (stats, failures)
            })
            .expect("spawn the fuzz worker")
    };
    let (mut seen, mut since) = (0, Instant::now());
    while !worker.is_finished() {
        std::thread::sleep(Duration::from_millis(20));
        let now = done.load(Ordering::Relaxed);
        if now != seen {
            (seen, since) = (now, Instant::now());
        } else if since.elapsed() > DEADLINE {
            // The worker is stuck in a reader: report now, nothing more can run.
            let (case, head, inputs) = &*current.lock().unwrap_or_else(|p| p.into_inner());
            let head = head.replacen(
                "started",
                &format!("HANG: no answer within {DEADLINE:?}"),
                1,
            );
            panic!("{head}{}", dump_inputs(target, seed, *case, inputs));
        }
    }
    let (stats, failures) = match worker.join() {
        Ok(r) => r,
        Err(p) => panic!("fuzz {target}: a generator panicked: {}", panic_text(&*p)),
    };
    if failures.is_empty() {
        let _ = std::fs::remove_file(
            std::env::temp_dir().join(format!("titan-fuzz-last-case-{target}.txt")),
        );
    } else {
        panic!(
            "fuzz {target}: {} failing case(s) (stopped after {MAX_FAILURES}):\n\n{}",
            failures.len(),
            failures.join("\n\n")
        );
    }
    eprintln!(
        "fuzz {target}: {} cases, seed {seed:#x}: {} accepted, {} rejected ({:.2} s)",
        stats.cases,
        stats.accepted,
        stats.rejected,
        started.elapsed().as_secs_f64()
    );
    stats
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".into()
    }
}

fn header(target: &str, seed: u64, case: usize, what: &str, log: &[String]) -> String {
    format!(
        "fuzz {target}, seed {seed:#x}, case {case}: {what}\n  rerun: TITAN_FUZZ_SEED={seed:#x} \
         TITAN_FUZZ_CASE={case} cargo test --release --test fuzz fuzz_{target}\n  mutations: {}\n",
        if log.is_empty() {
            "none".into()
        } else {
            log.join("; ")
        }
    )
}

fn report(
    target: &str,
    seed: u64,
    case: usize,
    what: &str,
    log: &[String],
    inputs: &[Dump],
) -> String {
    header(target, seed, case, what, log) + &dump_inputs(target, seed, case, inputs)
}

/// The inputs shown (cut) and saved (whole) under the temp dir.
fn dump_inputs(target: &str, seed: u64, case: usize, inputs: &[Dump]) -> String {
    let mut r = String::new();
    let saved = std::env::temp_dir().join(format!("titan-fuzz-failures/{target}-{seed:x}-{case}"));
    let _ = std::fs::create_dir_all(&saved);
    for d in inputs {
        let file = d.name.replace(['/', '\\'], "_");
        let _ = std::fs::write(saved.join(&file), &d.bytes);
        let _ = writeln!(
            r,
            "  input {} ({} bytes):\n{}",
            d.name,
            d.bytes.len(),
            dump(&d.bytes)
        );
    }
    let _ = write!(r, "  inputs saved in {}", saved.display());
    r
}

/// Text inputs escaped, binary ones as hex; long inputs cut (the saved copy is whole).
pub fn dump(bytes: &[u8]) -> String {
    const TEXT_MAX: usize = 3000;
    const HEX_MAX: usize = 768;
    let text = String::from_utf8_lossy(bytes);
    let odd = text
        .chars()
        .filter(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r') || *c == '\u{fffd}')
        .count();
    if odd * 50 <= text.chars().count() {
        let shown: String = text.chars().take(TEXT_MAX).collect();
        let cut = if shown.len() < text.len() { " ..." } else { "" };
        return format!("    {shown:?}{cut}");
    }
    let mut out = String::new();
    for (row, chunk) in bytes[..bytes.len().min(HEX_MAX)].chunks(32).enumerate() {
        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let asc: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        let _ = writeln!(out, "    {:06x}  {}  {asc}", row * 32, hex.join(" "));
    }
    if bytes.len() > HEX_MAX {
        let _ = write!(out, "    ... ({} more bytes)", bytes.len() - HEX_MAX);
    }
    out
}

/// `Err` unless `msg` names `what` (a file or folder).
pub fn names(msg: &str, what: &str) -> Result<(), String> {
    if msg.contains(what) {
        Ok(())
    } else {
        Err(format!("the error does not name {what}: {msg}"))
    }
}
