//! What the multi-rank parity tests share: a deadline per test, the small-run overrides, the
//! losses of a run on rank threads (every rank must log the same), and the relative error.

#![allow(dead_code)]

use crate::train_common::{debug_config, tmp};
use std::sync::mpsc;
use std::time::Duration;
use titan::dist::launch::run_rank_threads;
use titan::dist::{Communicator, HostComm};
use titan::train::config::JobConfig;
use titan::train::trainer::Trainer;

pub const DEADLINE: Duration = Duration::from_secs(240);

/// The pipeline tests' runs: the debug model at batch 4 x seq 32, 5 steps, every loss logged.
pub const SEQ32_RUN: &[&str] = &[
    "--training.seq_len=32",
    "--training.local_batch_size=4",
    "--training.steps=5",
    "--metrics.log_freq=1",
    "--comm.init_timeout_seconds=60",
    "--comm.train_timeout_seconds=60",
];

/// Validation after steps 1 and 5, two batches of 2 x 32 (run through the stages under pp).
pub const VALIDATE: &[&str] = &[
    "--validation.enable",
    "--validation.freq=5",
    "--validation.steps=2",
    "--validation.local_batch_size=2",
    "--validation.seq_len=32",
];

/// The debug model a run trains.
#[derive(Clone, Copy, Debug)]
pub enum Model {
    Llama3,
    Qwen3,
}

impl Model {
    /// Its debugmodel config (embedded) with `overrides`, dumping to `dir`.
    pub fn config(self, dir: &std::path::Path, overrides: &[&str]) -> titan::Result<JobConfig> {
        match self {
            Model::Llama3 => debug_config(dir, overrides),
            Model::Qwen3 => crate::train_common::qwen3_debug_config(dir, overrides),
        }
    }
}

/// Runs `f` on a helper thread and fails the test if it does not finish within DEADLINE (a
/// panic inside `f` is re-raised here).
pub fn within_deadline<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("the sender sent or panicked"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("the multi-rank run did not finish within {DEADLINE:?}")
        }
    }
}

pub fn base(dir: &std::path::Path, extra: &[String]) -> Vec<String> {
    let mut o: Vec<String> = [
        "--training.seq_len=64",
        "--training.steps=5",
        "--metrics.log_freq=1",
        "--comm.init_timeout_seconds=60",
        "--comm.train_timeout_seconds=60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    o.push(format!("--job.dump_folder={}", dir.display()));
    o.extend(extra.iter().cloned());
    o
}

/// What a run logged: per step the loss and the gradient norm, and the validation losses.
#[derive(Clone, Debug, PartialEq)]
pub struct Curves {
    pub loss: Vec<f64>,
    pub grad_norm: Vec<f64>,
    pub validation: Vec<f64>,
}

/// Losses of `steps` steps on `world` rank threads (rank 0's, which every rank agrees on).
pub fn losses(
    world: usize,
    dir: std::path::PathBuf,
    overrides: Vec<String>,
) -> titan::Result<Vec<f64>> {
    Ok(curves(world, dir, overrides)?.loss)
}

/// Training losses and validation losses of a run on `world` rank threads.
pub fn losses_and_validation(
    world: usize,
    dir: std::path::PathBuf,
    overrides: Vec<String>,
) -> titan::Result<(Vec<f64>, Vec<f64>)> {
    let c = curves(world, dir, overrides)?;
    Ok((c.loss, c.validation))
}

/// A pipeline rank's activation memory after its steps: the memory plan replays the schedule,
/// so the arenas and messages the rank really held must be exactly the planned bytes.
pub fn check_pipeline_memory(tr: &Trainer) -> titan::Result<()> {
    let Some(p) = &tr.pipeline else {
        return Ok(());
    };
    let (held, planned) = (p.peak_activations.get(), tr.memory.activations_peak);
    if held != planned {
        return Err(titan::Error::Config(format!(
            "rank {}: {held} activation bytes held, {planned} planned",
            tr.rank
        )));
    }
    Ok(())
}

/// The curves of a run on `world` rank threads (rank 0's, which every rank must agree on).
pub fn curves(
    world: usize,
    dir: std::path::PathBuf,
    overrides: Vec<String>,
) -> titan::Result<Curves> {
    let comms = HostComm::local_comms(world);
    // Loaded once: ranks each writing and reading the config file would race.
    let o: Vec<&str> = overrides.iter().map(|s| s.as_str()).collect();
    let cfg = debug_config(&dir, &o)?;
    let run = |c: Box<dyn Communicator>| -> titan::Result<Curves> {
        let world = (world > 1).then_some(c);
        let mut tr = Trainer::distributed(cfg.clone(), &titan::registry(), false, world)?;
        tr.maybe_resume()?;
        let hist = tr.fit(true)?;
        check_pipeline_memory(&tr)?;
        let val = tr.validation_history.iter().map(|v| v.validation_loss);
        Ok(Curves {
            loss: hist.iter().map(|m| m.loss).collect(),
            grad_norm: hist.iter().map(|m| m.grad_norm).collect(),
            validation: val.collect(),
        })
    };
    let mut results = run_rank_threads(comms, &run);
    if results.iter().any(|r| r.is_err()) {
        // Every rank's error: the first failing rank's names the cause, the others a lost peer.
        let errs: Vec<String> = results
            .iter()
            .enumerate()
            .filter_map(|(r, e)| e.as_ref().err().map(|e| format!("rank {r}: {e}")))
            .collect();
        return Err(titan::Error::Other(errs.join("\n")));
    }
    let first = results.remove(0)?;
    for (r, other) in results.into_iter().enumerate() {
        assert_eq!(
            other?,
            first,
            "rank {} logged other losses than rank 0",
            r + 1
        );
    }
    Ok(first)
}

pub fn rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// World 1 at local batch `global`, then each layout at the same global batch: the losses and
/// the gradient norms agree (relative 1e-5).
pub fn parity(
    tag: &'static str,
    layouts: Vec<(usize, Vec<&'static str>)>,
    extra: Vec<&'static str>,
) {
    within_deadline(move || {
        let global = 4;
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut one = extra.clone();
        one.push(format!("--training.local_batch_size={global}"));
        let d = tmp(&format!("dp-{tag}-1"));
        let reference = curves(1, d.clone(), base(&d, &one)).unwrap();
        assert!(reference.loss.len() >= 3, "{reference:?}");
        assert!(reference.loss.iter().all(|l| l.is_finite()));
        for (world, degrees) in layouts {
            let mut o = extra.clone();
            o.extend(degrees.iter().map(|s| s.to_string()));
            let d = tmp(&format!("dp-{tag}-{world}-{}", degrees.join("").len()));
            let got = curves(world, d.clone(), base(&d, &o)).unwrap();
            let e = rel(&got.loss, &reference.loss);
            let en = rel(&got.grad_norm, &reference.grad_norm);
            println!(
                "{tag} world {world} {degrees:?}: {:?} vs {:?}: rel {e:.2e}, grad norms rel {en:.2e}",
                got.loss, reference.loss
            );
            assert!(e < 1e-5, "{degrees:?}: rel {e:.2e}\n{got:?}\n{reference:?}");
            assert!(
                en < 1e-5,
                "{degrees:?}: grad norms rel {en:.2e}\n{got:?}\n{reference:?}"
            );
        }
    });
}

/// One leg of a resume test: `steps` steps under `degrees`, checkpointing every `every`.
pub fn leg(
    dir: &std::path::Path,
    world: usize,
    degrees: &[&str],
    steps: usize,
    every: usize,
) -> Vec<f64> {
    let mut o: Vec<String> = degrees.iter().map(|s| s.to_string()).collect();
    o.extend([
        format!("--training.steps={steps}"),
        "--checkpoint.enable".into(),
        format!("--checkpoint.interval={every}"),
    ]);
    losses(world, dir.to_path_buf(), base(dir, &o)).unwrap()
}

/// The curves of a run validating `batches` held-out batches every 2 steps (and after step 1).
pub fn with_validation(
    tag: &str,
    world: usize,
    o: &[&str],
    steps: usize,
    batches: usize,
) -> Curves {
    let d = tmp(tag);
    let mut v: Vec<String> = [
        "--validation.enable",
        "--validation.freq=2",
        "--validation.local_batch_size=2",
        "--validation.seq_len=64",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(format!("--validation.steps={batches}"));
    v.push(format!("--training.steps={steps}"));
    v.extend(o.iter().map(|s| s.to_string()));
    curves(world, d.clone(), base(&d, &v)).unwrap()
}

/// Each case saves a checkpoint after 3 steps under one layout (world, degrees) and resumes to
/// step 5 under another: the 5 losses must be the uninterrupted `reference` run's.
pub fn assert_resumes(tag: &str, reference: &[f64], cases: &[(usize, &[&str], usize, &[&str])]) {
    for (k, &(w0, a, w1, b)) in cases.iter().enumerate() {
        let d = tmp(&format!("{tag}-{k}"));
        let first = leg(&d, w0, a, 3, 3);
        let rest = leg(&d, w1, b, 5, 100);
        let got: Vec<f64> = first.iter().chain(&rest).copied().collect();
        let e = rel(&got, reference);
        println!("saved {a:?} at world {w0}, resumed {b:?} at world {w1}: rel {e:.2e}");
        assert_eq!(got.len(), 5, "{got:?}");
        assert!(e < 1e-5, "{a:?} -> {b:?}: {got:?} vs {reference:?}");
        let _ = std::fs::remove_dir_all(&d); // checkpoints: tens of MB each
    }
}

/// The error of a run on `world` rank threads that must fail before any step (no metrics
/// written).
pub fn layout_error(tag: &str, world: usize, o: &[&str]) -> String {
    let d = tmp(tag);
    let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
    let e = losses(world, d.clone(), base(&d, &o))
        .unwrap_err()
        .to_string();
    assert!(!d.join("metrics.jsonl").exists(), "{tag}: no step may run");
    e
}
