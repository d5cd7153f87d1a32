//! Composed layouts on CPU ranks as threads: tensor parallel inside pipeline stages, with data
//! parallel replicas around them, train the debugmodel with the losses and gradient norms of one
//! rank (DESIGN §2's mesh order pp, dp_replicate, dp_shard, cp, tp); a checkpoint saved under one
//! composed layout resumes under another. Every test runs under a deadline.

mod parallel_common;
mod train_common;

use parallel_common::{assert_resumes, leg, parity, within_deadline};
use train_common::tmp;

const TP2: &str = "--parallelism.tensor_parallel_degree=2";
const PP2: &str = "--parallelism.pipeline_parallel_degree=2";

#[test]
fn tp2_inside_pp2_matches_one_rank() {
    for model in ["llama3", "qwen3"] {
        let m: &'static str = if model == "llama3" {
            "--model.name=llama3"
        } else {
            "--model.name=qwen3"
        };
        parity(
            if model == "llama3" {
                "3d-llama"
            } else {
                "3d-qwen3"
            },
            vec![
                (4, vec![TP2, PP2, "--training.local_batch_size=4"]),
                (
                    4,
                    vec![
                        TP2,
                        PP2,
                        "--training.local_batch_size=4",
                        "--parallelism.pipeline_parallel_schedule=InterleavedZeroBubble",
                        "--parallelism.enable_sequence_parallel=false",
                    ],
                ),
            ],
            vec![m, "--training.steps=3"],
        );
    }
}

#[test]
fn tp2_pp2_dp2_at_world_8_matches_one_rank() {
    // FSDP and DDP around tensor-parallel pipeline stages.
    parity(
        "3d-world8",
        vec![
            (
                8,
                vec![
                    TP2,
                    PP2,
                    "--parallelism.data_parallel_shard_degree=2",
                    "--training.local_batch_size=2",
                ],
            ),
            (
                8,
                vec![
                    TP2,
                    PP2,
                    "--parallelism.data_parallel_replicate_degree=2",
                    "--parallelism.data_parallel_shard_degree=1",
                    "--training.local_batch_size=2",
                ],
            ),
        ],
        vec!["--training.steps=3"],
    );
}

#[test]
fn qwen3_tp2_pp2_fsdp2_at_world_8_matches_one_rank() {
    // The tied embedding's two stage copies are split alike over tp and sharded alike over
    // dp_shard, so their local gradient shards add up between the first and last stage.
    parity(
        "3d-world8-qwen3",
        vec![(
            8,
            vec![
                TP2,
                PP2,
                "--parallelism.data_parallel_shard_degree=2",
                "--training.local_batch_size=2",
            ],
        )],
        vec!["--model.name=qwen3", "--training.steps=3"],
    );
}

#[test]
fn zero_bubble_with_fsdp_within_the_stages_matches_one_rank() {
    // The weight pass reads no weight values, so a parameter slot another unit reused in
    // between (reshard "always" rotates two slots) does not change its gradients.
    parity(
        "3d-zb-fsdp",
        vec![
            (
                4,
                vec![
                    PP2,
                    "--parallelism.data_parallel_shard_degree=2",
                    "--parallelism.pipeline_parallel_schedule=InterleavedZeroBubble",
                    "--training.local_batch_size=2",
                ],
            ),
            (
                4,
                vec![
                    PP2,
                    "--parallelism.data_parallel_shard_degree=2",
                    "--parallelism.pipeline_parallel_schedule=InterleavedZeroBubble",
                    "--parallelism.fsdp_reshard_after_forward=always",
                    "--training.local_batch_size=2",
                ],
            ),
        ],
        vec!["--training.steps=3"],
    );
}

#[test]
fn composed_layouts_resume_each_other() {
    within_deadline(|| {
        let one = ["--training.local_batch_size=4"];
        let tp_pp = [TP2, PP2, "--training.local_batch_size=4"];
        let pp = [PP2, "--training.local_batch_size=4"];
        let tp_fsdp = [
            TP2,
            "--parallelism.data_parallel_shard_degree=2",
            "--training.local_batch_size=2",
        ];
        let tp_pp_fsdp = [
            TP2,
            PP2,
            "--parallelism.data_parallel_shard_degree=2",
            "--training.local_batch_size=2",
        ];
        let d = tmp("3d-resume-ref");
        let reference = leg(&d, 1, &one, 5, 100);
        let cases: [(usize, &[&str], usize, &[&str]); 3] = [
            (4, &tp_pp, 4, &tp_fsdp),
            (4, &tp_fsdp, 2, &pp),
            (8, &tp_pp_fsdp, 1, &one),
        ];
        assert_resumes("3d-resume", &reference, &cases);
    });
}
