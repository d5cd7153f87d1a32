//! One error type for the library. Every user-reachable failure becomes one of these with a message
//! that names the thing (op, shapes, file, key); the CLI prints it on one line and exits non-zero.

use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// An op got tensors whose shapes do not fit together.
    Shape {
        op: &'static str,
        msg: String,
    },
    /// An op got a dtype it does not support.
    DType {
        op: &'static str,
        msg: String,
    },
    /// A broken or unknown configuration value.
    Config(String),
    /// A checkpoint that is missing, truncated or inconsistent.
    Checkpoint(String),
    /// A dataset or tokenizer problem.
    Data(String),
    /// A backend (device, driver, kernel, allocation) failure.
    Backend(String),
    /// Training diverged (NaN / Inf loss or gradient).
    NonFinite(String),
    /// A collective failed: a rank died, timed out or disagreed.
    Comm(String),
    Io {
        path: String,
        source: std::io::Error,
    },
    /// stdout was closed by its reader (`titan train | head`): the run ends quietly.
    OutputClosed,
    Other(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape { op, msg } => write!(f, "shape error in {op}: {msg}"),
            Error::DType { op, msg } => write!(f, "dtype error in {op}: {msg}"),
            Error::Config(m) => write!(f, "config error: {m}"),
            Error::Checkpoint(m) => write!(f, "checkpoint error: {m}"),
            Error::Data(m) => write!(f, "data error: {m}"),
            Error::Backend(m) => write!(f, "backend error: {m}"),
            Error::NonFinite(m) => write!(f, "training diverged: {m}"),
            Error::Comm(m) => write!(f, "communication error: {m}"),
            Error::Io { path, source } => write!(f, "{path}: {source}"),
            Error::OutputClosed => write!(f, "stdout closed by its reader"),
            Error::Other(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

/// `bail!(Config, "...")`-style helper used across the crate.
#[macro_export]
macro_rules! err {
    ($kind:ident, $($arg:tt)*) => { $crate::error::Error::$kind(format!($($arg)*)) };
}
