//! Console output that never panics. `println!` panics when the reader of stdout has gone away
//! (`titan train | head -2`: EPIPE, because Rust ignores SIGPIPE); these return an error instead.
//! A closed stdout is `Error::OutputClosed`, which the trainer treats as a request to stop (see
//! train/preempt.rs) and the CLI as a quiet exit. Writes to stderr are best effort: a message
//! that cannot be shown is dropped, never a reason to fail.

use crate::error::{Error, Result};
use std::fmt;
use std::io::{self, Write};

/// One line on stdout.
pub fn line(args: fmt::Arguments) -> Result<()> {
    let mut out = io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .map_err(stdout_error)
}

/// One line on stderr, dropped if stderr is closed.
pub fn err_line(args: fmt::Arguments) {
    let mut err = io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

fn stdout_error(e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Error::OutputClosed
    } else {
        Error::io("stdout", e)
    }
}

/// `println!` that returns `Result<()>` (`Err(Error::OutputClosed)` for a closed stdout).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => { $crate::out::line(format_args!($($arg)*)) };
}

/// `eprintln!` that never panics.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => { $crate::out::err_line(format_args!($($arg)*)) };
}
