//! Data parallelism on CPU ranks as threads (the local communicator): FSDP (dp_shard 2, 4),
//! HSDP (dp_replicate 2 x dp_shard 2) and DDP (dp_replicate 2) train the debugmodel with the
//! losses of one rank at the same global batch; resharded resumes continue the same run; bad
//! layouts are clear errors before any work. Every test runs under a deadline.

mod train_common;

use std::sync::mpsc;
use std::time::Duration;
use titan::dist::launch::run_rank_threads;
use titan::dist::{Communicator, HostComm};
use titan::train::trainer::Trainer;
use train_common::{debug_config, tmp};

const DEADLINE: Duration = Duration::from_secs(240);
const STEPS: usize = 5;

/// Runs `f` on a helper thread and fails the test if it does not finish within DEADLINE.
fn within_deadline<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(DEADLINE)
        .expect("the multi-rank run did not finish within its deadline")
}

fn base(dir: &std::path::Path, extra: &[String]) -> Vec<String> {
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

/// Losses of `steps` steps on `world` rank threads (rank 0's, which every rank agrees on).
fn losses(world: usize, dir: std::path::PathBuf, overrides: Vec<String>) -> titan::Result<Vec<f64>> {
    let comms: Vec<Box<dyn Communicator>> = HostComm::local_world(world)
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Communicator>)
        .collect();
    let run = |c: Box<dyn Communicator>| -> titan::Result<Vec<f64>> {
        let o: Vec<&str> = overrides.iter().map(|s| s.as_str()).collect();
        let cfg = debug_config(&dir, &o)?;
        let world = (world > 1).then_some(c);
        let mut tr = Trainer::distributed(cfg, &titan::registry(), false, world)?;
        tr.maybe_resume()?;
        let hist = tr.fit(true)?;
        Ok(hist.iter().map(|m| m.loss).collect())
    };
    let mut results = run_rank_threads(comms, &run);
    let first = results.remove(0)?;
    for (r, other) in results.into_iter().enumerate() {
        assert_eq!(other?, first, "rank {} logged other losses than rank 0", r + 1);
    }
    Ok(first)
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// World 1 at local batch `global`, then each layout at the same global batch.
fn parity(tag: &'static str, layouts: Vec<(usize, Vec<&'static str>)>, extra: Vec<&'static str>) {
    within_deadline(move || {
        let global = 4;
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut one = extra.clone();
        one.push(format!("--training.local_batch_size={global}"));
        let d = tmp(&format!("dp-{tag}-1"));
        let reference = losses(1, d.clone(), base(&d, &one)).unwrap();
        assert_eq!(reference.len(), STEPS);
        assert!(reference.iter().all(|l| l.is_finite()));
        for (world, degrees) in layouts {
            let mut o = extra.clone();
            o.extend(degrees.iter().map(|s| s.to_string()));
            let d = tmp(&format!("dp-{tag}-{world}-{}", degrees.join("").len()));
            let got = losses(world, d.clone(), base(&d, &o)).unwrap();
            let e = rel(&got, &reference);
            println!("{tag} world {world} {degrees:?}: {got:?} vs {reference:?}: rel {e:.2e}");
            assert!(e < 1e-5, "{degrees:?}: rel {e:.2e}\n{got:?}\n{reference:?}");
        }
    });
}

#[test]
fn fsdp_matches_one_rank() {
    parity(
        "fsdp",
        vec![
            (2, vec!["--training.local_batch_size=2", "--parallelism.data_parallel_shard_degree=2"]),
            (4, vec!["--training.local_batch_size=1", "--parallelism.data_parallel_shard_degree=4"]),
        ],
        vec![],
    );
}

#[test]
fn hsdp_and_ddp_match_one_rank() {
    parity(
        "hsdp",
        vec![
            (
                4,
                vec![
                    "--training.local_batch_size=1",
                    "--parallelism.data_parallel_replicate_degree=2",
                    "--parallelism.data_parallel_shard_degree=2",
                ],
            ),
            (
                2,
                vec![
                    "--training.local_batch_size=2",
                    "--parallelism.data_parallel_replicate_degree=2",
                    "--parallelism.data_parallel_shard_degree=1",
                ],
            ),
        ],
        vec![],
    );
}

#[test]
fn tmp_fsdp_vs_ddp() {
    within_deadline(|| {
        let run = |tag: &str, o: &[&str]| {
            let d = tmp(tag);
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            losses(2, d.clone(), base(&d, &o)).unwrap()
        };
        let a = run("tf", &["--training.local_batch_size=2", "--parallelism.data_parallel_shard_degree=2"]);
        let b = run("td", &["--training.local_batch_size=2", "--parallelism.data_parallel_replicate_degree=2", "--parallelism.data_parallel_shard_degree=1"]);
        let c = run("ta", &["--training.local_batch_size=2", "--parallelism.data_parallel_shard_degree=2", "--parallelism.fsdp_reshard_after_forward=always", "--activation_checkpoint.mode=full"]);
        println!("{a:?}\n{b:?}\n{c:?}");
        assert!(rel(&a, &b) < 1e-5 && rel(&c, &b) < 1e-5);
    });
}
