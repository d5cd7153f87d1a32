//! What the tests of the `titan` binary share: running it, its output as text, and the one
//! clear error a bad input must give.

#![allow(dead_code)]

use std::process::{Command, Output};

/// Runs the binary built for these tests with `args`.
pub fn titan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_titan"))
        .args(args)
        .output()
        .expect("run titan")
}

/// (stdout, stderr) as text.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A failed command: non-zero exit, one "error:" line naming `needle`, no panic.
pub fn assert_clean_error(o: &Output, needle: &str) {
    let (out, err) = text(o);
    assert!(
        !o.status.success(),
        "expected failure; stdout {out} stderr {err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic: {err}"
    );
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "want exactly one error line, got: {err}");
    assert!(
        lines[0].contains(needle),
        "error should mention '{needle}': {}",
        lines[0]
    );
}
