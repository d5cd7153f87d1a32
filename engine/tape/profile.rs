//! Per-op wall time, for `titan bench --profile`. When enabled, every forward and backward op
//! synchronises the backend before and after its kernels (so device times are attributed to the
//! op that launched them) and adds its time to a process-wide table.

use crate::backend::Backend;
use crate::error::Result;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<BTreeMap<String, (u64, f64)>> = Mutex::new(BTreeMap::new());

pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

pub fn record(name: String, start: Instant) {
    let dt = start.elapsed().as_secs_f64();
    let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let e = t.entry(name).or_insert((0, 0.0));
    e.0 += 1;
    e.1 += dt;
}

/// Runs `f`; while profiling, synchronises `be` around it and adds its time to row `name()`
/// (a closure, so the row's name is only formatted when profiling).
pub fn timed<T>(
    be: &dyn Backend,
    name: impl FnOnce() -> String,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if !enabled() {
        return f();
    }
    be.synchronize()?;
    let t0 = Instant::now();
    let out = f()?;
    be.synchronize()?;
    record(name(), t0);
    Ok(out)
}

pub fn reset() {
    TABLE.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// The table sorted by total time: (op, calls, seconds).
pub fn report() -> Vec<(String, u64, f64)> {
    let t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<(String, u64, f64)> = t.iter().map(|(k, (n, s))| (k.clone(), *n, *s)).collect();
    v.sort_by(|a, b| b.2.total_cmp(&a.2));
    v
}
