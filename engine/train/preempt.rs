//! Preemption: SIGTERM (what SLURM and Kubernetes send before killing a job), SIGINT (Ctrl-C) and
//! SIGUSR1 (SLURM's `--signal=USR1@120`, sent a chosen time before the end of the allocation)
//! ask the run to stop. The trainer finishes the step in flight, writes a full checkpoint of it
//! (when `checkpoint.enable`) and ends; `titan train` then exits with [`EXIT_STOPPED`]. A rerun
//! with the same dump folder resumes from that step exactly. A second signal exits at once with
//! 128 + the signal number, what a shell reports for a process the signal killed.
//!
//! The handler only counts signals and records the first one in atomics; beyond that it calls
//! nothing but write(2) (to acknowledge) and _exit(2) (on the second signal), both
//! async-signal-safe. The fit loop reads the request once per step through
//! [`StopFlag::agreed_stop`], the one place where ranks will agree on the step they stop after.

use super::trainer::Trainer;
use crate::checkpoint;
use crate::error::{Error, Result};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Once};

/// Exit code of a run stopped by a signal after its checkpoint was written (or with
/// checkpointing disabled, after its last step): sysexits' EX_TEMPFAIL, "try again later".
pub const EXIT_STOPPED: u8 = 75;
/// Exit code when stdout was closed by its reader (`| head`): 128 + SIGPIPE, as for any tool
/// that SIGPIPE ends.
pub const EXIT_OUTPUT_CLOSED: u8 = 141;

/// The signals that ask a run to stop.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1];

/// What ended a run early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    Signal(i32),
    /// stdout was closed by its reader.
    OutputClosed,
}

impl StopCause {
    /// "SIGTERM", "SIGINT", "SIGUSR1", "stdout closed".
    pub fn name(&self) -> String {
        match *self {
            StopCause::Signal(s) => signal_name(s).to_string(),
            StopCause::OutputClosed => "stdout closed".into(),
        }
    }

    /// The process exit code of a run ended this way.
    pub fn exit_code(&self) -> u8 {
        match self {
            StopCause::Signal(_) => EXIT_STOPPED,
            StopCause::OutputClosed => EXIT_OUTPUT_CLOSED,
        }
    }

    pub(crate) fn encode(self) -> i32 {
        match self {
            StopCause::Signal(s) => s,
            StopCause::OutputClosed => -1,
        }
    }

    pub(crate) fn decode(v: i32) -> Option<StopCause> {
        match v {
            0 => None,
            -1 => Some(StopCause::OutputClosed),
            s => Some(StopCause::Signal(s)),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGUSR1 => "SIGUSR1",
        _ => "a signal",
    }
}

/// The first stop signal's number (0: none) and the number of stop signals received.
static SIGNALLED: AtomicI32 = AtomicI32::new(0);
static SIGNAL_COUNT: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    let write = |msg: &[u8]| {
        // SAFETY: write(2) on fd 2 with a valid buffer; async-signal-safe.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    };
    if SIGNAL_COUNT.fetch_add(1, Ordering::SeqCst) > 0 {
        write(b"titan: second stop signal: exiting now, without saving\n");
        // SAFETY: _exit(2) is async-signal-safe; nothing is flushed or unwound, on purpose.
        unsafe { libc::_exit(128 + sig) };
    }
    let _ = SIGNALLED.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    write(match sig {
        libc::SIGTERM => b"titan: SIGTERM received: finishing this step, then saving and stopping (signal again to exit at once)\n",
        libc::SIGINT => b"titan: SIGINT received: finishing this step, then saving and stopping (signal again to exit at once)\n",
        _ => b"titan: SIGUSR1 received: finishing this step, then saving and stopping (signal again to exit at once)\n",
    });
}

fn install_handlers() -> Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        for sig in STOP_SIGNALS {
            // SAFETY: a zeroed sigaction is a valid value to fill in; the handler is an
            // `extern "C" fn(c_int)` that only touches atomics and async-signal-safe calls.
            let rc = unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_stop_signal as *const () as libc::sighandler_t;
                // Interrupted reads and writes resume instead of failing with EINTR; the other
                // stop signals wait while the handler runs.
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                for s in STOP_SIGNALS {
                    libc::sigaddset(&mut sa.sa_mask, s);
                }
                libc::sigaction(sig, &sa, std::ptr::null_mut())
            };
            if rc != 0 {
                result = Err(Error::Other(format!(
                    "cannot install the {} handler: {}",
                    signal_name(sig),
                    std::io::Error::last_os_error()
                )));
                return;
            }
        }
    });
    result
}

#[derive(Clone, Debug)]
enum Cell {
    /// The process-wide cell the signal handler writes.
    Signals,
    Own(Arc<AtomicI32>),
}

/// A request to stop the run after the current step, polled by the fit loop once per step.
#[derive(Clone, Debug)]
pub struct StopFlag {
    cell: Cell,
}

impl Default for StopFlag {
    fn default() -> Self {
        Self::new()
    }
}

impl StopFlag {
    /// A flag that only [`request`](Self::request) sets (no signal handlers).
    pub fn new() -> Self {
        StopFlag {
            cell: Cell::Own(Arc::new(AtomicI32::new(0))),
        }
    }

    /// Installs the SIGTERM / SIGINT / SIGUSR1 handlers (once per process) and returns the flag
    /// they set.
    pub fn from_signals() -> Result<Self> {
        install_handlers()?;
        Ok(StopFlag {
            cell: Cell::Signals,
        })
    }

    fn cell(&self) -> &AtomicI32 {
        match &self.cell {
            Cell::Signals => &SIGNALLED,
            Cell::Own(a) => a,
        }
    }

    /// Asks the run to stop after the current step (the first request wins).
    pub fn request(&self, cause: StopCause) {
        let _ = self
            .cell()
            .compare_exchange(0, cause.encode(), Ordering::SeqCst, Ordering::SeqCst);
    }

    /// This process's request, if any.
    pub fn local(&self) -> Option<StopCause> {
        StopCause::decode(self.cell().load(Ordering::SeqCst))
    }

    /// This rank's stop request. Every rank calls this at the same point of every step; with
    /// several ranks the trainer all-reduces (max) the requests (train/dist.rs), so that a signal
    /// reaching any rank stops all of them after the same step.
    pub fn agreed_stop(&self) -> Option<StopCause> {
        self.local()
    }
}

/// How a stopped run ended.
#[derive(Clone, Debug)]
pub struct Stopped {
    pub cause: StopCause,
    /// The last step trained.
    pub step: u64,
    /// The checkpoint of `step`, when there is one.
    pub checkpoint: Option<PathBuf>,
    /// One line for the user: what was saved and how to resume.
    pub message: String,
}

impl Trainer {
    /// Ends the run at a stop request before step `self.step + 1`: writes a full checkpoint of
    /// `self.step` unless `saved` (the step the loop last checkpointed) is it already, no step
    /// ran since `first_step`, or checkpointing is off.
    pub(super) fn stop_run(
        &mut self,
        cause: StopCause,
        first_step: u64,
        saved: Option<u64>,
    ) -> Result<Stopped> {
        let step = self.step;
        let c = &self.cfg.checkpoint;
        let head = format!("titan: {}: stopped after step {step}", cause.name());
        let (checkpoint, tail) = if !c.enable || c.load_only {
            let why = if c.enable {
                "checkpoint.load_only = true"
            } else {
                "checkpointing is disabled (checkpoint.enable = false)"
            };
            (
                None,
                format!("{why}, so nothing was saved; a rerun starts again from the beginning"),
            )
        } else if step == first_step {
            let dir = checkpoint::step_dir(&self.checkpoint_root(), step);
            let dir = dir.exists().then_some(dir);
            let what = match &dir {
                Some(d) => format!("checkpoint step-{step} in {} is current", d.display()),
                None => "nothing to save".into(),
            };
            (dir, format!("no step ran in this process; {what}"))
        } else {
            let dir = if saved == Some(step) {
                checkpoint::step_dir(&self.checkpoint_root(), step)
            } else {
                self.save(super::state::SaveKind::Full)?
            };
            let tail = format!(
                "checkpoint step-{step} saved in {}; rerun the same command to resume from it",
                dir.display()
            );
            (Some(dir), tail)
        };
        Ok(Stopped {
            cause,
            step,
            checkpoint,
            message: format!("{head}; {tail} (exit code {})", cause.exit_code()),
        })
    }

    /// A log line on stdout. A closed stdout asks the run to stop like a signal, so the step is
    /// still checkpointed and the run ends quietly.
    pub(super) fn say(&self, args: std::fmt::Arguments) -> Result<()> {
        // Other ranks' lines (`--log-ranks`) say whose they are.
        let line = match self.rank {
            0 => crate::out::line(args),
            r => crate::out::line(format_args!("[rank {r}] {args}")),
        };
        match line {
            Err(Error::OutputClosed) => {
                self.stop.request(StopCause::OutputClosed);
                Ok(())
            }
            r => r,
        }
    }
}
