//! Helpers for tests that spawn `titan` and talk to it through signals and pipes: every process
//! gets a deadline (a watchdog kills it past it), so a test fails instead of hanging.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub const CFG: &str = "configs/llama3_debugmodel.toml";
pub const DEADLINE: Duration = Duration::from_secs(180);
pub const EXIT_STOPPED: i32 = 75;
pub const EXIT_OUTPUT_CLOSED: i32 = 141;

pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("titan-preempt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `titan train` of the debugmodel on the CPU, batch 2 x seq 32, every step logged; later
/// overrides in `extra` win.
pub fn train_args(dump: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--config",
        CFG,
        "--quiet",
        "--training.seq_len",
        "32",
        "--training.local_batch_size",
        "2",
        "--training.device",
        "cpu",
        "--metrics.log_freq",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("--job.dump_folder={}", dump.display()));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Kills process `pid` with SIGKILL if it is still running at the deadline, so that a test that
/// blocks on its pipes fails instead of hanging. Dropping it calls the watch off.
pub struct Watchdog(Option<mpsc::Sender<()>>);

impl Watchdog {
    pub fn new(pid: u32) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        thread::spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(DEADLINE) {
                eprintln!("titan {pid} passed the {DEADLINE:?} deadline: killing it");
                // SAFETY: kill(2) on a child of this test that has not been waited for yet.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        });
        Watchdog(Some(tx))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// A running `titan`: stderr (and stdout unless taken) read by threads; killed when dropped.
pub struct Titan {
    child: Child,
    started: Instant,
    err_lines: Receiver<String>,
    stderr: Vec<String>,
    stdout: Option<JoinHandle<String>>,
    watchdog: Watchdog,
}

pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Titan {
    pub fn spawn(args: &[String]) -> Titan {
        Self::spawn_with_env(args, &[])
    }

    /// `spawn` with extra environment variables (torchrun's RANK, WORLD_SIZE, ...).
    pub fn spawn_with_env(args: &[String], env: &[(&str, String)]) -> Titan {
        let mut child = Command::new(env!("CARGO_BIN_EXE_titan"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn titan");
        let err = child.stderr.take().unwrap();
        let (tx, err_lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let out = child.stdout.take().unwrap();
        let stdout = Some(thread::spawn(move || {
            std::io::read_to_string(out).unwrap_or_default()
        }));
        Titan {
            watchdog: Watchdog::new(child.id()),
            child,
            started: Instant::now(),
            err_lines,
            stderr: Vec::new(),
            stdout,
        }
    }

    /// Spawned with stdout left to the caller (`take_stdout`).
    pub fn spawn_reading_stdout(args: &[String]) -> (Titan, ChildStdout) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_titan"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn titan");
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, err_lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let t = Titan {
            watchdog: Watchdog::new(child.id()),
            child,
            started: Instant::now(),
            err_lines,
            stderr: Vec::new(),
            stdout: None,
        };
        (t, out)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid() as libc::pid_t, sig) }, 0);
    }

    fn left(&self) -> Duration {
        DEADLINE.saturating_sub(self.started.elapsed())
    }

    /// Fails (after killing the process) when the deadline passes.
    fn check_deadline(&mut self, what: &str) {
        if self.left().is_zero() {
            let _ = self.child.kill();
            panic!(
                "titan {} still running after {DEADLINE:?} ({what}); stderr: {:?}",
                self.pid(),
                self.stderr
            );
        }
    }

    /// Waits for a stderr line containing `needle`.
    pub fn wait_for_stderr(&mut self, needle: &str) {
        loop {
            match self.err_lines.recv_timeout(self.left()) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.stderr.push(line);
                    if hit {
                        return;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("titan closed stderr before {needle:?}: {:?}", self.stderr)
                }
                Err(RecvTimeoutError::Timeout) => self.check_deadline(needle),
            }
        }
    }

    /// Waits until `dump`'s metrics.jsonl logs at least `n` steps.
    pub fn wait_for_steps(&mut self, dump: &Path, n: usize) {
        while losses(dump).len() < n {
            if let Ok(Some(s)) = self.child.try_wait() {
                panic!("titan ended ({s}) before step {n}: {:?}", self.drain());
            }
            self.check_deadline(&format!("waiting for step {n}"));
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn drain(&mut self) -> Vec<String> {
        self.stderr.extend(self.err_lines.try_iter());
        self.stderr.clone()
    }

    pub fn wait(mut self) -> Finished {
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            self.check_deadline("waiting for exit");
            thread::sleep(Duration::from_millis(5));
        };
        drop(std::mem::replace(&mut self.watchdog, Watchdog(None)));
        // The readers end with the process's pipes.
        let stdout = self
            .stdout
            .take()
            .map(|h| h.join().unwrap())
            .unwrap_or_default();
        while let Ok(line) = self.err_lines.recv_timeout(Duration::from_secs(5)) {
            self.stderr.push(line);
        }
        Finished {
            code: status.code(),
            stdout,
            stderr: self.stderr.join("\n"),
        }
    }
}

impl Drop for Titan {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn run(args: &[String]) -> Finished {
    Titan::spawn(args).wait()
}

/// (step, loss bits) of every training record in metrics.jsonl.
pub fn losses(dump: &Path) -> Vec<(u64, u64)> {
    let Ok(text) = std::fs::read_to_string(dump.join("metrics.jsonl")) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()?.to_bits())))
        .collect()
}

/// Names of the entries of `dump`'s checkpoint folder, sorted.
pub fn checkpoint_entries(dump: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dump.join("checkpoint"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn assert_no_panic(f: &Finished) {
    assert!(
        !f.stderr.contains("panicked")
            && !f.stderr.contains("RUST_BACKTRACE")
            && f.code != Some(101),
        "panic: {}",
        f.stderr
    );
}
