//! Progress of long work (tokenizing a dataset, saving or loading a checkpoint, reading or
//! writing Hugging Face weights) on stderr: bytes done of the total, rate and ETA.
//!
//! On a terminal one line is redrawn in place (`\r`, at most ten times a second); anywhere else
//! (a log file, CI) a plain line is printed every ten seconds, so logs never fill with carriage
//! returns. Small work prints nothing: under `MIN_BYTES` in all, or done within `DELAY`. When
//! anything was shown, `finish` prints one summary line.
//!
//! The reporter takes `&self` (its state sits behind a mutex), so a writer can count bytes from
//! inside a callback such as a serializer's `View::data`.

use crate::metrics::fmt_duration;
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Work below this many bytes never shows progress.
pub const MIN_BYTES: u64 = 64 << 20;
/// Nothing is shown before this much time has passed.
pub const DELAY: Duration = Duration::from_secs(1);
/// Terminal redraw interval.
pub const REDRAW: Duration = Duration::from_millis(100);
/// Interval of the plain lines when stderr is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One line redrawn in place.
    Terminal,
    /// A plain line every `LOG_EVERY`.
    Lines,
    Off,
}

/// Time since the work started.
pub type Clock = Box<dyn Fn() -> Duration + Send + Sync>;

struct State {
    done: u64,
    /// When the last line was drawn or printed.
    last: Option<Duration>,
    finished: bool,
}

pub struct Progress {
    label: String,
    total: u64,
    mode: Mode,
    sink: Mutex<Box<dyn Write + Send>>,
    clock: Clock,
    state: Mutex<State>,
}

impl Progress {
    /// Progress of `total` bytes on stderr (redrawn on a terminal, plain lines otherwise);
    /// `enabled = false` (quiet) hides it.
    pub fn new(label: impl Into<String>, total: u64, enabled: bool) -> Self {
        let mode = match (enabled, std::io::stderr().is_terminal()) {
            (false, _) => Mode::Off,
            (true, true) => Mode::Terminal,
            (true, false) => Mode::Lines,
        };
        let start = Instant::now();
        Self::with_output(
            label,
            total,
            mode,
            Box::new(std::io::stderr()),
            Box::new(move || start.elapsed()),
        )
    }

    /// As `new`, writing to `sink` and reading time from `clock` (tests inject both).
    pub fn with_output(
        label: impl Into<String>,
        total: u64,
        mode: Mode,
        sink: Box<dyn Write + Send>,
        clock: Clock,
    ) -> Self {
        Self {
            label: label.into(),
            total,
            mode: if total < MIN_BYTES { Mode::Off } else { mode },
            sink: Mutex::new(sink),
            clock,
            state: Mutex::new(State {
                done: 0,
                last: None,
                finished: false,
            }),
        }
    }

    /// Counts `n` more bytes done and redraws or prints when due.
    pub fn add(&self, n: u64) {
        let mut st = lock(&self.state);
        st.done += n;
        if self.mode == Mode::Off {
            return;
        }
        let now = (self.clock)();
        let due = match (self.mode, st.last) {
            _ if now < DELAY => false,
            (Mode::Terminal, None) => true,
            (Mode::Terminal, Some(t)) => now.saturating_sub(t) >= REDRAW,
            (_, last) => now.saturating_sub(last.unwrap_or_default()) >= LOG_EVERY,
        };
        if !due {
            return;
        }
        st.last = Some(now);
        let line = self.status(st.done, now);
        let text = match self.mode {
            Mode::Terminal => format!("\r\x1b[2K{line}"),
            _ => format!("{line}\n"),
        };
        self.emit(&text);
    }

    /// Bytes counted so far.
    pub fn done(&self) -> u64 {
        lock(&self.state).done
    }

    /// Ends the report: one summary line if anything was shown, else nothing.
    pub fn finish(&self) {
        let mut st = lock(&self.state);
        if st.finished {
            return;
        }
        st.finished = true;
        if st.last.is_none() {
            return;
        }
        let secs = (self.clock)().as_secs_f64();
        let prefix = if self.mode == Mode::Terminal {
            "\r\x1b[2K"
        } else {
            ""
        };
        let text = format!(
            "{prefix}titan: {}: done, {} in {} ({}/s)\n",
            self.label,
            fmt_bytes(st.done),
            fmt_duration(secs),
            fmt_bytes((st.done as f64 / secs.max(1e-9)) as u64)
        );
        self.emit(&text);
    }

    /// "titan: LABEL: [bar] pct% done/total rate/s, ETA t" (the bar on a terminal only).
    fn status(&self, done: u64, now: Duration) -> String {
        const WIDTH: usize = 24;
        let frac = (done as f64 / self.total.max(1) as f64).clamp(0.0, 1.0);
        let secs = now.as_secs_f64().max(1e-9);
        let rate = done as f64 / secs;
        let eta = self.total.saturating_sub(done) as f64 / rate;
        let bar = if self.mode == Mode::Terminal {
            let filled = (frac * WIDTH as f64).round() as usize;
            format!("[{}{}] ", "#".repeat(filled), " ".repeat(WIDTH - filled))
        } else {
            String::new()
        };
        format!(
            "titan: {}: {bar}{:.1}% {}/{} {}/s, ETA {}",
            self.label,
            100.0 * frac,
            fmt_bytes(done),
            fmt_bytes(self.total),
            fmt_bytes(rate as u64),
            fmt_duration(eta)
        )
    }

    fn emit(&self, text: &str) {
        // Progress must never fail the work: a closed stderr just hides it.
        let mut sink = lock(&self.sink);
        let _ = sink.write_all(text.as_bytes());
        let _ = sink.flush();
    }
}

impl Drop for Progress {
    /// Work that failed half-way leaves no half-drawn line before its error message.
    fn drop(&mut self) {
        let st = lock(&self.state);
        if self.mode == Mode::Terminal && st.last.is_some() && !st.finished {
            self.emit("\r\x1b[2K");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Bytes in binary units: "512 B", "63.5 MiB", "1.25 GiB".
pub fn fmt_bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let x = n as f64;
    if x >= KIB * KIB * KIB {
        format!("{:.2} GiB", x / (KIB * KIB * KIB))
    } else if x >= KIB * KIB {
        format!("{:.1} MiB", x / (KIB * KIB))
    } else if x >= KIB {
        format!("{:.1} KiB", x / KIB)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A sink the test reads back, and a clock it sets (milliseconds).
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Shared {
        fn take(&self) -> String {
            String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
        }
    }

    fn reporter(total: u64, mode: Mode) -> (Progress, Shared, Arc<AtomicU64>) {
        let out = Shared::default();
        let ms = Arc::new(AtomicU64::new(0));
        let m = ms.clone();
        let clock: Clock = Box::new(move || Duration::from_millis(m.load(Ordering::SeqCst)));
        let p = Progress::with_output("reading x", total, mode, Box::new(out.clone()), clock);
        (p, out, ms)
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn plain_lines_every_ten_seconds_with_rate_and_eta() {
        let (p, out, ms) = reporter(1024 * MIB, Mode::Lines);
        ms.store(5_000, Ordering::SeqCst);
        p.add(100 * MIB);
        assert_eq!(out.take(), "", "nothing before the first interval");
        ms.store(10_000, Ordering::SeqCst);
        p.add(100 * MIB);
        // 200 MiB of 1 GiB in 10 s: 20 MiB/s, 824 MiB left = 41.2 s.
        assert_eq!(
            out.take(),
            "titan: reading x: 19.5% 200.0 MiB/1.00 GiB 20.0 MiB/s, ETA 41s\n"
        );
        ms.store(19_999, Ordering::SeqCst);
        p.add(100 * MIB);
        assert_eq!(out.take(), "", "at most one line per interval");
        ms.store(20_000, Ordering::SeqCst);
        p.add(100 * MIB);
        // 400 MiB in 20 s: 20 MiB/s, 624 MiB left = 31.2 s.
        assert_eq!(
            out.take(),
            "titan: reading x: 39.1% 400.0 MiB/1.00 GiB 20.0 MiB/s, ETA 31s\n"
        );
        ms.store(32_000, Ordering::SeqCst);
        p.add(624 * MIB);
        assert_eq!(
            out.take(),
            "titan: reading x: 100.0% 1.00 GiB/1.00 GiB 32.0 MiB/s, ETA 0s\n"
        );
        p.finish();
        assert_eq!(
            out.take(),
            "titan: reading x: done, 1.00 GiB in 32s (32.0 MiB/s)\n"
        );
        p.finish();
        assert_eq!(out.take(), "", "finish reports once");
        assert_eq!(p.done(), 1024 * MIB);
    }

    #[test]
    fn small_or_quick_work_prints_nothing() {
        // Below MIN_BYTES: silent however long it takes.
        let (p, out, ms) = reporter(MIN_BYTES - 1, Mode::Lines);
        for t in 1..=10u64 {
            ms.store(t * 30_000, Ordering::SeqCst);
            p.add(MIB);
        }
        p.finish();
        assert_eq!(out.take(), "");
        // Large but done within DELAY: no redraw and no summary.
        let (p, out, ms) = reporter(10 * MIN_BYTES, Mode::Terminal);
        ms.store(999, Ordering::SeqCst);
        p.add(10 * MIN_BYTES);
        p.finish();
        drop(p);
        assert_eq!(out.take(), "");
        // Off (quiet).
        let (p, out, ms) = reporter(10 * MIN_BYTES, Mode::Off);
        ms.store(60_000, Ordering::SeqCst);
        p.add(MIN_BYTES);
        p.finish();
        assert_eq!(out.take(), "");
    }

    #[test]
    fn terminal_redraws_in_place_at_most_ten_times_a_second() {
        let (p, out, ms) = reporter(100 * MIB, Mode::Terminal);
        ms.store(1_000, Ordering::SeqCst);
        p.add(10 * MIB);
        let first = out.take();
        assert!(
            first.starts_with("\r\x1b[2Ktitan: reading x: [##") && !first.contains('\n'),
            "{first:?}"
        );
        assert!(first.contains("10.0% 10.0 MiB/100.0 MiB 10.0 MiB/s, ETA 9s"));
        ms.store(1_050, Ordering::SeqCst);
        p.add(MIB);
        assert_eq!(out.take(), "", "redraw throttled");
        ms.store(1_100, Ordering::SeqCst);
        p.add(MIB);
        assert!(out.take().contains("12.0%"));
        // Dropped without finish (an error): the half-drawn line is cleared.
        drop(p);
        assert_eq!(out.take(), "\r\x1b[2K");
    }

    #[test]
    fn bytes_format() {
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_bytes(64 * MIB), "64.0 MiB");
        assert_eq!(fmt_bytes(5 * 1024 * MIB / 4), "1.25 GiB");
    }
}
