//! The pipeline's code path on one rank (`parallelism.pipeline_on_one_rank`): every stage of the
//! schedule on this rank, each stage boundary crossed by a send to itself inside a communicator
//! group, as one GPU runs it with NCCL. On the CPU, 5 steps (and validation through the stages)
//! under GPipe, Interleaved1F1B and InterleavedZeroBubble must log the plain path's losses, for
//! Llama 3 and for Qwen3 (tied embedding, both halves on the rank); on a GPU (`--ignored`, needs
//! NCCL: `scripts/install-cuda-toolchain.sh --nccl`) the same runs on the CUDA backend over NCCL
//! must match the CPU within bf16 tolerance. Steps after the first allocate no memory.

mod parallel_common;
mod train_common;

use parallel_common::{rel, within_deadline, Model, SEQ32_RUN, VALIDATE};
use titan::train::trainer::Trainer;
use train_common::tmp;

/// (training losses, validation losses) of 5 steps at batch 4 x seq 32 on `device`, with the
/// pipeline on one rank when `one_rank`.
fn run(model: Model, device: &str, layout: &[&str], one_rank: bool) -> (Vec<f64>, Vec<f64>) {
    let tag = format!(
        "pp1-{model:?}-{device}-{one_rank}-{}",
        layout.join("").len()
    );
    let d = tmp(&tag);
    let device = format!("--training.device={device}");
    let mut o = vec![device.as_str()];
    o.extend(SEQ32_RUN);
    o.extend(VALIDATE);
    o.extend(layout);
    let mut cfg = model.config(&d, &o).unwrap();
    cfg.parallelism.pipeline_on_one_rank = one_rank;
    let mut tr = Trainer::new(cfg, &titan::registry()).unwrap();
    assert_eq!(tr.pipeline.is_some(), one_rank);
    if let Some(p) = &tr.pipeline {
        assert_eq!(p.degree(), 1);
        // The transfers go through the trainer's communicator: NCCL on a GPU.
        let world = tr.mesh.as_ref().unwrap().world.describe();
        assert!(device.ends_with("cpu") || world.contains("nccl"), "{world}");
    }
    let train = tr.fit(true).unwrap().iter().map(|m| m.loss).collect();
    parallel_common::check_pipeline_memory(&tr).unwrap();
    let val = tr.validation_history.iter().map(|v| v.validation_loss);
    let _ = std::fs::remove_dir_all(&d);
    (train, val.collect())
}

/// The schedules with their stage layouts on one rank: GPipe (1 stage, microbatches of 2 rows),
/// Interleaved1F1B (2 stages) and InterleavedZeroBubble (a stage per 2 layers: 4 stages of the
/// Llama 3 debug model's 6 layers, 5 of Qwen3's 8), microbatches of one row.
fn layouts() -> Vec<Vec<&'static str>> {
    vec![
        vec![
            "--parallelism.pipeline_parallel_schedule=GPipe",
            "--parallelism.pipeline_parallel_microbatch_size=2",
        ],
        vec![
            "--parallelism.pipeline_parallel_schedule=Interleaved1F1B",
            "--parallelism.pipeline_parallel_microbatch_size=1",
        ],
        vec![
            "--parallelism.pipeline_parallel_schedule=InterleavedZeroBubble",
            "--parallelism.pipeline_parallel_microbatch_size=1",
            "--parallelism.pipeline_parallel_layers_per_stage=2",
        ],
    ]
}

/// Every layout's losses against the plain run on `device`, within `tol` (relative L2).
fn parity(model: Model, device: &'static str, tol: f64) {
    within_deadline(move || {
        let (reference, val_ref) = run(model, "cpu", &[], false);
        assert_eq!((reference.len(), val_ref.len()), (5, 2));
        assert!(reference.iter().all(|l| l.is_finite()), "{reference:?}");
        for layout in layouts() {
            let (got, val) = run(model, device, &layout, true);
            let (e, ev) = (rel(&got, &reference), rel(&val, &val_ref));
            println!("{model:?} {device} {layout:?}: rel {e:.2e}, validation {ev:.2e}\n  {got:?}\n  {reference:?}");
            assert!(e < tol, "{layout:?}: rel {e:.2e}\n{got:?}\n{reference:?}");
            assert!(
                ev < tol,
                "{layout:?}: validation rel {ev:.2e}\n{val:?}\n{val_ref:?}"
            );
        }
    });
}

#[test]
fn llama3_pipeline_on_one_cpu_rank_matches_the_plain_run() {
    parity(Model::Llama3, "cpu", 1e-5);
}

#[test]
fn qwen3_tied_pipeline_on_one_cpu_rank_matches_the_plain_run() {
    parity(Model::Qwen3, "cpu", 1e-5);
}

#[test]
#[ignore = "needs a CUDA device"]
fn pipeline_on_one_gpu_with_nccl_matches_the_cpu() {
    // bf16 compute against the f32 CPU run: the tolerance of tests/cuda_train.rs.
    parity(Model::Llama3, "cuda", 2e-2);
    parity(Model::Qwen3, "cuda", 2e-2);
}

#[test]
fn pipeline_steps_after_the_first_allocate_nothing() {
    // Stage tapes run in pooled arenas and messages reuse pooled buffers: once the first step
    // has filled the pool, a step makes no backend allocation (a cudaMalloc on a GPU).
    within_deadline(|| {
        let d = tmp("pp1-allocs");
        let mut o = vec!["--training.device=cpu"];
        o.extend(SEQ32_RUN);
        o.extend([
            "--parallelism.pipeline_parallel_schedule=InterleavedZeroBubble",
            "--parallelism.pipeline_parallel_layers_per_stage=2",
        ]);
        let mut cfg = Model::Llama3.config(&d, &o).unwrap();
        cfg.parallelism.pipeline_on_one_rank = true;
        let mut tr = Trainer::new(cfg, &titan::registry()).unwrap();
        tr.train_step().unwrap();
        let after_first = tr.be.alloc_count();
        for _ in 0..2 {
            tr.train_step().unwrap();
        }
        assert_eq!(tr.be.alloc_count(), after_first, "later steps allocated");
        parallel_common::check_pipeline_memory(&tr).unwrap();
        let _ = std::fs::remove_dir_all(&d);
    });
}
