//! Multi-node data parallelism without GPUs: two `titan train` processes on loopback
//! (`--nnodes 2`, the tcp communicator) train like one rank at the same global batch, and a
//! killed node makes the other exit non-zero within the train timeout, naming the lost rank.
//! Every process has a deadline (process_common's watchdog).

mod process_common;

use process_common::{assert_no_panic, losses, run, tmp, train_args, Titan};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Node `node` of a two-node run with one rank per node, FSDP over both.
fn node_args(dump: &std::path::Path, port: u16, node: usize, extra: &[&str]) -> Vec<String> {
    let port = port.to_string();
    let node = node.to_string();
    let mut a: Vec<&str> = vec![
        "--nnodes",
        "2",
        "--node-rank",
        &node,
        "--nproc-per-node",
        "1",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        &port,
        "--parallelism.data_parallel_shard_degree=2",
        "--comm.init_timeout_seconds=60",
    ];
    a.extend(extra);
    train_args(dump, &a)
}

/// Runs both nodes of a two-node run to success (node 0's output must name `says`) and returns
/// rank 0's losses.
fn two_nodes(tag: &str, extra: &[&str], says: &str) -> Vec<f64> {
    let dump = tmp(tag);
    let port = free_port();
    let n1 = Titan::spawn(&node_args(&dump, port, 1, extra));
    let n0 = Titan::spawn(&node_args(&dump, port, 0, extra));
    let (f0, f1) = (n0.wait(), n1.wait());
    assert_no_panic(&f0);
    assert_no_panic(&f1);
    assert_eq!(f0.code, Some(0), "node 0: {}", f0.stderr);
    assert_eq!(f1.code, Some(0), "node 1: {}", f1.stderr);
    assert!(f0.stdout.contains(says), "{}", f0.stdout);
    loss_values(&dump)
}

fn loss_values(dump: &std::path::Path) -> Vec<f64> {
    losses(dump)
        .iter()
        .map(|&(_, b)| f64::from_bits(b))
        .collect()
}

#[test]
fn two_processes_on_loopback_match_one_rank() {
    let one = tmp("mn-one");
    let f = run(&train_args(
        &one,
        &["--training.steps=5", "--training.local_batch_size=4"],
    ));
    assert_eq!(f.code, Some(0), "{}", f.stderr);
    let reference = loss_values(&one);
    assert_eq!(reference.len(), 5);

    let extra = ["--training.steps=5", "--training.local_batch_size=2"];
    let got = two_nodes("mn-two", &extra, "over tcp");
    assert_eq!(got.len(), 5, "rank 0 logs every step: {got:?}");
    for (g, r) in got.iter().zip(&reference) {
        assert!(((g - r) / r).abs() < 1e-5, "{got:?} vs {reference:?}");
    }
}

#[test]
fn tensor_parallel_over_tcp_processes_matches_one_rank() {
    // The TP collectives (token all-gathers, reduce-scatters, the loss's stats gather) between
    // two processes.
    let steps = ["--training.steps=3", "--training.local_batch_size=4"];
    let one = tmp("mn-tp-one");
    let f = run(&train_args(&one, &steps));
    assert_eq!(f.code, Some(0), "{}", f.stderr);
    let reference = loss_values(&one);
    let mut extra = steps.to_vec();
    extra.extend([
        "--parallelism.data_parallel_shard_degree=1",
        "--parallelism.tensor_parallel_degree=2",
    ]);
    let got = two_nodes("mn-tp-two", &extra, "x tp 2");
    assert_eq!(got.len(), reference.len(), "{got:?}");
    for (g, r) in got.iter().zip(&reference) {
        assert!(((g - r) / r).abs() < 1e-5, "{got:?} vs {reference:?}");
    }
}

#[test]
fn a_killed_node_fails_the_other_naming_the_lost_rank() {
    let dump = tmp("mn-kill");
    let port = free_port();
    let extra = ["--training.steps=100000", "--comm.train_timeout_seconds=20"];
    let n1 = Titan::spawn(&node_args(&dump, port, 1, &extra));
    let mut n0 = Titan::spawn(&node_args(&dump, port, 0, &extra));
    n0.wait_for_steps(&dump, 2);
    n1.signal(libc::SIGKILL);
    let killed = Instant::now();
    let f = n0.wait();
    let took = killed.elapsed();
    assert_no_panic(&f);
    assert_ne!(f.code, Some(0), "{}", f.stderr);
    assert!(
        took < Duration::from_secs(20 + 10),
        "node 0 took {took:?} to notice"
    );
    assert!(
        f.stderr.contains("rank 1"),
        "the error names the lost rank: {}",
        f.stderr
    );
    let _ = n1.wait();
}

#[test]
fn four_cpu_ranks_in_one_process_have_the_loss_curve_of_one() {
    // The README's command: `titan train --nproc-per-node 4` with dp_shard 4.
    let one = tmp("mn-four-ref");
    let f = run(&train_args(
        &one,
        &["--training.steps=4", "--training.local_batch_size=8"],
    ));
    assert_eq!(f.code, Some(0), "{}", f.stderr);
    let four = tmp("mn-four");
    let f = run(&train_args(
        &four,
        &[
            "--nproc-per-node",
            "4",
            "--parallelism.data_parallel_shard_degree",
            "4",
            "--training.steps=4",
            "--training.local_batch_size=2",
        ],
    ));
    assert_no_panic(&f);
    assert_eq!(f.code, Some(0), "{}", f.stderr);
    assert!(f.stdout.contains("over shared memory"), "{}", f.stdout);
    let (a, b) = (loss_values(&four), loss_values(&one));
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert!(((x - y) / y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
}

#[test]
fn a_process_per_rank_as_torchrun_starts_them() {
    // torchrun / `srun --ntasks-per-node=GPUs`: no launcher flags, RANK and WORLD_SIZE set.
    let one = tmp("mn-torchrun-ref");
    let f = run(&train_args(
        &one,
        &["--training.steps=3", "--training.local_batch_size=4"],
    ));
    assert_eq!(f.code, Some(0), "{}", f.stderr);
    let dump = tmp("mn-torchrun");
    let port = free_port().to_string();
    let extra = [
        "--training.steps=3",
        "--training.local_batch_size=2",
        "--parallelism.data_parallel_shard_degree=2",
    ];
    let env = |rank: usize| {
        vec![
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("WORLD_SIZE", "2".to_string()),
            ("LOCAL_WORLD_SIZE", "2".to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", port.clone()),
        ]
    };
    let r1 = Titan::spawn_with_env(&train_args(&dump, &extra), &env(1));
    let r0 = Titan::spawn_with_env(&train_args(&dump, &extra), &env(0));
    let (f0, f1) = (r0.wait(), r1.wait());
    assert_eq!(f0.code, Some(0), "rank 0: {}", f0.stderr);
    assert_eq!(f1.code, Some(0), "rank 1: {}", f1.stderr);
    let (a, b) = (loss_values(&dump), loss_values(&one));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert!(((x - y) / y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
}
