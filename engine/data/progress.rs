//! A one-line progress bar on stderr (hand-rolled: `\r` redraws, at most ~10 per second).
//! Shown only when stderr is a terminal and the caller did not ask for quiet, so logs and CI
//! output never fill with carriage returns.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    start: Instant,
    last_draw: Option<Instant>,
    enabled: bool,
}

impl Progress {
    /// `total` in bytes; `enabled = false` (quiet) hides it whatever stderr is.
    pub fn new(label: impl Into<String>, total: u64, enabled: bool) -> Self {
        Self {
            label: label.into(),
            total,
            done: 0,
            start: Instant::now(),
            last_draw: None,
            enabled: enabled && std::io::stderr().is_terminal(),
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self
            .last_draw
            .is_some_and(|t| now - t < Duration::from_millis(100))
        {
            return;
        }
        self.last_draw = Some(now);
        self.draw(now);
    }

    fn draw(&self, now: Instant) {
        const WIDTH: usize = 30;
        let frac = if self.total == 0 {
            1.0
        } else {
            self.done as f64 / self.total as f64
        };
        let frac = frac.clamp(0.0, 1.0);
        let filled = (frac * WIDTH as f64).round() as usize;
        let secs = (now - self.start).as_secs_f64().max(1e-9);
        let mb = self.done as f64 / 1e6;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r{} [{}{}] {:5.1}% {:.1}/{:.1} MB {:.1} MB/s",
            self.label,
            "#".repeat(filled),
            " ".repeat(WIDTH - filled),
            frac * 100.0,
            mb,
            self.total as f64 / 1e6,
            mb / secs
        );
        let _ = err.flush();
    }

    /// Clears the bar's line (the caller logs its own summary).
    pub fn finish(self) {
        if self.enabled && self.last_draw.is_some() {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}
