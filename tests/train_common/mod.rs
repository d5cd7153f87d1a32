//! Helpers shared by the tests that drive the `Trainer`: a fresh scratch folder and the README's
//! debugmodel job with overrides. The config is embedded (not read from the repository), so these
//! tests also run from a GPU bundle on a machine without the source tree.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use titan::train::config::JobConfig;
use titan::train::trainer::Trainer;

/// An empty folder under the system temp dir, unique to this test process.
pub fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("titan-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `configs/llama3_debugmodel.toml` written into `dir`, then loaded with `overrides` (dumping to
/// `dir`).
pub fn debug_config(dir: &Path, overrides: &[&str]) -> titan::Result<JobConfig> {
    embedded_config(
        dir,
        "llama3_debugmodel.toml",
        include_str!("../../configs/llama3_debugmodel.toml"),
        overrides,
    )
}

/// `configs/qwen3_debugmodel.toml`, as `debug_config`.
pub fn qwen3_debug_config(dir: &Path, overrides: &[&str]) -> titan::Result<JobConfig> {
    embedded_config(
        dir,
        "qwen3_debugmodel.toml",
        include_str!("../../configs/qwen3_debugmodel.toml"),
        overrides,
    )
}

fn embedded_config(
    dir: &Path,
    file: &str,
    text: &str,
    overrides: &[&str],
) -> titan::Result<JobConfig> {
    std::fs::create_dir_all(dir).unwrap();
    let toml = dir.join(file);
    std::fs::write(&toml, text).unwrap();
    let mut o = vec![format!("--job.dump_folder={}", dir.display())];
    o.extend(overrides.iter().map(|s| s.to_string()));
    JobConfig::load(Some(&toml), &o)
}

/// The debugmodel job's trainer (see `debug_config`).
pub fn debug_trainer(dir: &Path, overrides: &[&str]) -> titan::Result<Trainer> {
    Trainer::new(debug_config(dir, overrides)?, &titan::registry())
}

/// A trainer's f32 master weights, flat.
pub fn masters(tr: &Trainer) -> Vec<f32> {
    tr.store
        .read_f32(tr.be.as_ref(), tr.store.flat_master())
        .unwrap()
}
