//! Tensor parallel on CPU ranks as threads: tp 2 (with and without sequence parallel, with and
//! without loss parallel) trains the debugmodel with the losses of one rank, for Llama 3 and
//! Qwen3 (whose per-head q/k norms work on head shards); TP composes with FSDP; resumes across
//! tp layouts continue the uninterrupted run; bad layouts are clear errors. Every test runs
//! under a deadline.

mod parallel_common;
mod train_common;

use parallel_common::{base, losses, parity, rel, within_deadline};
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
