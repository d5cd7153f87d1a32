//! Tensor parallel on CPU ranks as threads: tp 2 (with and without sequence parallel, with and
//! without loss parallel) trains the debugmodel with the losses of one rank, for Llama 3 and
//! Qwen3 (whose per-head q/k norms work on head shards); TP composes with FSDP; resumes across
//! tp layouts continue the uninterrupted run; bad layouts are clear errors. Every test runs
//! under a deadline.

mod parallel_common;
mod train_common;

use parallel_common::{
    assert_resumes, layout_error, leg, parity, rel, with_validation, within_deadline,
};
use train_common::tmp;

const TP2: &str = "--parallelism.tensor_parallel_degree=2";

#[test]
fn tp2_matches_one_rank_with_and_without_sequence_and_loss_parallel() {
    parity(
        "tp-llama",
        vec![
            (2, vec![TP2, "--training.local_batch_size=4"]),
            (
                2,
                vec![
                    TP2,
                    "--training.local_batch_size=4",
                    "--parallelism.enable_sequence_parallel=false",
                ],
            ),
            (
                2,
                vec![
                    TP2,
                    "--training.local_batch_size=4",
                    "--parallelism.disable_loss_parallel=true",
                ],
            ),
        ],
        vec![],
    );
}

#[test]
fn qwen3_tp2_matches_one_rank() {
    parity(
        "tp-qwen3",
        vec![
            (2, vec![TP2, "--training.local_batch_size=4"]),
            (
                2,
                vec![
                    TP2,
                    "--training.local_batch_size=4",
                    "--parallelism.enable_sequence_parallel=false",
                    "--parallelism.disable_loss_parallel=true",
                ],
            ),
        ],
        vec!["--model.name=qwen3", "--training.steps=3"],
    );
}

#[test]
fn tp_composes_with_fsdp_ddp_accumulation_and_checkpointing() {
    parity(
        "tp-compose",
        vec![
            (
                4,
                vec![
                    TP2,
                    "--parallelism.data_parallel_shard_degree=2",
                    "--training.local_batch_size=2",
                ],
            ),
            (
                4,
                vec![
                    TP2,
                    "--parallelism.data_parallel_replicate_degree=2",
                    "--parallelism.data_parallel_shard_degree=1",
                    "--training.local_batch_size=2",
                ],
            ),
            (
                2,
                vec![
                    TP2,
                    "--training.local_batch_size=2",
                    "--training.global_batch_size=4",
                    "--activation_checkpoint.mode=full",
                ],
            ),
        ],
        vec!["--training.steps=4"],
    );
}

#[test]
fn validation_under_tp_matches_one_rank() {
    within_deadline(|| {
        let one = with_validation("tp-val-1", 1, &["--training.local_batch_size=4"], 2, 2);
        let tp = with_validation("tp-val-2", 2, &[TP2, "--training.local_batch_size=4"], 2, 2);
        assert_eq!(one.validation.len(), 2, "{one:?}");
        let e = rel(&tp.validation, &one.validation);
        println!(
            "validation tp 2 {:?} vs 1 {:?}: rel {e:.2e}",
            tp.validation, one.validation
        );
        assert!(e < 1e-5);
    });
}

#[test]
fn resumes_across_tp_layouts_continue_the_uninterrupted_run() {
    within_deadline(|| {
        let one = ["--training.local_batch_size=4"];
        let tp2 = [TP2, "--training.local_batch_size=4"];
        let tp2_fsdp2 = [
            TP2,
            "--parallelism.data_parallel_shard_degree=2",
            "--training.local_batch_size=2",
        ];
        let fsdp2 = [
            "--parallelism.data_parallel_shard_degree=2",
            "--training.local_batch_size=2",
        ];
        let d = tmp("tp-resume-ref");
        let reference = leg(&d, 1, &one, 5, 100);
        let cases: [(usize, &[&str], usize, &[&str]); 3] = [
            (2, &tp2, 1, &one),
            (1, &one, 4, &tp2_fsdp2),
            (4, &tp2_fsdp2, 2, &fsdp2),
        ];
        assert_resumes("tp-resume", &reference, &cases);
    });
}

#[test]
fn bad_tp_layouts_are_clear_errors_before_any_work() {
    within_deadline(|| {
        let e = layout_error("tp-heads", 3, &["--parallelism.tensor_parallel_degree=3"]);
        assert!(
            e.contains("n_heads 16 is not divisible by tensor_parallel_degree 3"),
            "{e}"
        );
        let e = layout_error(
            "tp-qwen3-heads",
            3,
            &[
                "--parallelism.tensor_parallel_degree=3",
                "--model.name=qwen3",
            ],
        );
        assert!(e.contains("qwen3: n_heads"), "{e}");
        // 1 x 63 tokens cannot lie on two token shards.
        let e = layout_error(
            "tp-tokens",
            2,
            &[
                TP2,
                "--training.local_batch_size=1",
                "--training.seq_len=63",
            ],
        );
        assert!(
            e.contains("63 tokens") && e.contains("enable_sequence_parallel"),
            "{e}"
        );
        let e = layout_error("tp-world", 2, &["--parallelism.tensor_parallel_degree=4"]);
        assert!(e.contains("world size 2 is not divisible"), "{e}");
    });
}
