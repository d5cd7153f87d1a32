//! Data parallelism on CPU ranks as threads (the local communicator): FSDP (dp_shard 2, 4),
//! HSDP (dp_replicate 2 x dp_shard 2) and DDP (dp_replicate 2) train the debugmodel with the
//! losses of one rank at the same global batch; resharded resumes continue the same run; bad
//! layouts are clear errors before any work. Every test runs under a deadline.

mod parallel_common;
mod train_common;

use parallel_common::{
    assert_resumes, base, layout_error, leg, losses, parity, rel, with_validation, within_deadline,
};
use titan::dist::launch::run_rank_threads;
use titan::dist::HostComm;
use titan::train::trainer::Trainer;
use train_common::{debug_config, tmp};

#[test]
fn fsdp_matches_one_rank() {
    parity(
        "fsdp",
        vec![
            (
                2,
                vec![
                    "--training.local_batch_size=2",
                    "--parallelism.data_parallel_shard_degree=2",
                ],
            ),
            (
                4,
                vec![
                    "--training.local_batch_size=1",
                    "--parallelism.data_parallel_shard_degree=4",
                ],
            ),
            // Gradient accumulation: two micro-batches per rank, one reduce-scatter per step.
            (
                2,
                vec![
                    "--training.local_batch_size=1",
                    "--training.global_batch_size=4",
                    "--parallelism.data_parallel_shard_degree=2",
                ],
            ),
        ],
        vec![],
    );
}

#[test]
fn qwen3_fsdp_matches_one_rank() {
    // Per-head q/k norms in their block's unit, the tied embedding in the root unit (gathered
    // once, used first and last).
    parity(
        "qwen3",
        vec![(
            2,
            vec![
                "--training.local_batch_size=2",
                "--parallelism.data_parallel_shard_degree=2",
            ],
        )],
        vec!["--model.name=qwen3", "--training.steps=3"],
    );
}

#[test]
fn bf16_gradient_reduction_stays_close() {
    // mixed_precision_reduce = bfloat16 rounds the reduce-scatter's operands: near, not equal.
    within_deadline(|| {
        let run = |tag: &str, world: usize, o: &[&str]| {
            let d = tmp(tag);
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            losses(world, d.clone(), base(&d, &o)).unwrap()
        };
        let f32 = run("bf16-ref", 1, &["--training.local_batch_size=4"]);
        let bf16 = run(
            "bf16",
            2,
            &[
                "--training.local_batch_size=2",
                "--parallelism.data_parallel_shard_degree=2",
                "--training.mixed_precision_reduce=bfloat16",
            ],
        );
        let e = rel(&bf16, &f32);
        println!("bf16 reduce: rel {e:.2e}");
        assert!(e > 0.0 && e < 1e-2, "rel {e:.2e}: {bf16:?} vs {f32:?}");
    });
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
fn reshard_policies_and_activation_checkpointing_agree_bitwise() {
    // The same two-rank data split as FSDP, DDP and FSDP with re-gathers in backward and
    // recomputed blocks: the same collectives' sums, so the same bits.
    within_deadline(|| {
        let run = |tag: &str, o: &[&str]| {
            let d = tmp(tag);
            let mut o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            o.push("--training.local_batch_size=2".into());
            losses(2, d.clone(), base(&d, &o)).unwrap()
        };
        let ddp = run(
            "agree-ddp",
            &[
                "--parallelism.data_parallel_replicate_degree=2",
                "--parallelism.data_parallel_shard_degree=1",
            ],
        );
        for policy in ["default", "always", "never"] {
            for ac in ["none", "full"] {
                let got = run(
                    &format!("agree-{policy}-{ac}"),
                    &[
                        "--parallelism.data_parallel_shard_degree=2",
                        &format!("--parallelism.fsdp_reshard_after_forward={policy}"),
                        &format!("--activation_checkpoint.mode={ac}"),
                    ],
                );
                assert_eq!(got, ddp, "reshard {policy}, AC {ac}");
            }
        }
    });
}

/// Trains steps 1..=`steps` on `world` ranks with `degrees`, checkpointing every `every` steps,
/// resuming from `dir`'s newest checkpoint if there is one.
#[test]
fn resharded_resumes_continue_the_uninterrupted_run() {
    within_deadline(|| {
        let fsdp4 = [
            "--training.local_batch_size=1",
            "--parallelism.data_parallel_shard_degree=4",
        ];
        let fsdp2 = [
            "--training.local_batch_size=2",
            "--parallelism.data_parallel_shard_degree=2",
        ];
        let one = ["--training.local_batch_size=4"];
        let d = tmp("reshard-ref");
        let reference = leg(&d, 1, &one, 5, 100);
        // (saved under, resumed under)
        // Replicas write no duplicate boxes: DDP's and HSDP's checkpoints hold one copy.
        let ddp2 = [
            "--training.local_batch_size=2",
            "--parallelism.data_parallel_replicate_degree=2",
            "--parallelism.data_parallel_shard_degree=1",
        ];
        let hsdp = [
            "--training.local_batch_size=1",
            "--parallelism.data_parallel_replicate_degree=2",
            "--parallelism.data_parallel_shard_degree=2",
        ];
        let cases: [(usize, &[&str], usize, &[&str]); 5] = [
            (4, &fsdp4, 2, &fsdp2),
            (4, &fsdp4, 1, &one),
            (1, &one, 4, &fsdp4),
            (2, &ddp2, 4, &hsdp),
            (4, &hsdp, 2, &ddp2),
        ];
        assert_resumes("reshard", &reference, &cases);
    });
}

#[test]
fn bad_layouts_are_clear_errors_before_any_work() {
    within_deadline(|| {
        let e = layout_error(
            "bad-product",
            3,
            &["--parallelism.data_parallel_shard_degree=2"],
        );
        assert!(
            e.contains("world size is 3") && e.contains("dp_shard 2"),
            "{e}"
        );
        let e = layout_error(
            "bad-one",
            1,
            &["--parallelism.data_parallel_shard_degree=2"],
        );
        assert!(e.contains("--nproc-per-node"), "{e}");
        let e = layout_error("bad-cp", 2, &["--parallelism.context_parallel_degree=2"]);
        assert!(
            e.contains("context parallel degree 2") && e.contains("not built yet"),
            "{e}"
        );
        let e = layout_error(
            "bad-batch",
            2,
            &[
                "--parallelism.data_parallel_shard_degree=2",
                "--training.local_batch_size=2",
                "--training.global_batch_size=6",
            ],
        );
        assert!(e.contains("global_batch_size = 6"), "{e}");
    });
}

#[test]
fn every_gather_but_the_first_is_prefetched() {
    // One step on two ranks: forward gathers each unit while the previous computes, backward
    // re-gathers the units whose slots were reused, each issued while the unit before computes.
    within_deadline(|| {
        for (policy, regathered) in [("always", true), ("default", true), ("never", false)] {
            let d = tmp(&format!("prefetch-{policy}"));
            let o = base(
                &d,
                &[
                    "--training.local_batch_size=1".into(),
                    "--parallelism.data_parallel_shard_degree=2".into(),
                    format!("--parallelism.fsdp_reshard_after_forward={policy}"),
                ],
            );
            let o: Vec<&str> = o.iter().map(|s| s.as_str()).collect();
            let cfg = debug_config(&d, &o).unwrap();
            let comms = HostComm::local_comms(2);
            let stats = run_rank_threads(comms, &|c| {
                let mut tr = Trainer::distributed(cfg.clone(), &titan::registry(), false, Some(c))?;
                tr.train_step()?;
                let units = tr.store.fsdp().unwrap().layout.units.len();
                Ok((tr.store.fsdp().unwrap().stats(), units))
            });
            for r in stats {
                let (s, units) = r.unwrap();
                // The root unit is empty (untied embedding): every other unit is gathered in
                // forward; with reuse some again in backward.
                assert!(s.gathers >= (units - 1) as u64, "{policy}: {s:?}");
                assert_eq!(
                    s.gathers > (units - 1) as u64,
                    regathered,
                    "{policy}: {s:?}"
                );
                assert_eq!(s.prefetched, s.gathers - 1, "{policy}: {s:?}");
                assert_eq!(
                    s.reduces, units as u64,
                    "{policy}: one reduce-scatter per unit"
                );
            }
        }
    });
}

#[test]
fn validation_is_split_over_the_ranks_and_matches_one_rank() {
    // 3 validation batches over 2 ranks: rank 1 runs a second forward it discards (FSDP needs
    // every rank in every gather), and the all-reduced loss is the one-rank loss.
    within_deadline(|| {
        let one = with_validation("val-1", 1, &["--training.local_batch_size=4"], 4, 3);
        let fsdp = [
            "--training.local_batch_size=2",
            "--parallelism.data_parallel_shard_degree=2",
        ];
        let two = with_validation("val-2", 2, &fsdp, 4, 3);
        let (v1, v2) = (&one.validation, &two.validation);
        assert_eq!(v1.len(), 3, "after steps 1, 2 and 4: {v1:?} ({one:?})");
        assert!(rel(&two.loss, &one.loss) < 1e-5);
        let e = rel(v2, v1);
        println!("validation world 2 {v2:?} vs world 1 {v1:?}: rel {e:.2e}");
        assert!(e < 1e-5, "{v2:?} vs {v1:?}");
    });
}
