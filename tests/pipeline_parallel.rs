//! Pipeline parallelism on CPU ranks as threads (the local communicator): pp 2 under every
//! schedule trains Llama 3's and Qwen3's (tied embedding) debug models with the losses of one
//! rank; so do pp 2 with gradient accumulation and activation checkpointing, and pp 2 x DDP 2;
//! checkpoints resume across pp 2 and pp 1 continuing the same losses; bad layouts are one
//! clear error. Every run has a deadline.

mod parallel_common;
mod train_common;

use parallel_common::{check_pipeline_memory, within_deadline, Model, SEQ32_RUN, VALIDATE};
use std::path::{Path, PathBuf};
use titan::dist::launch::run_rank_threads;
use titan::dist::{Communicator, HostComm};
use titan::train::trainer::Trainer;
use train_common::tmp;

/// For the Qwen3 debug model, whose steps cost 6x the Llama 3 one's.
const LOCAL_BATCH_2: &str = "--training.local_batch_size=2";

/// Overrides every run shares: the debug model at batch 4 x seq 32, 5 steps.
fn base(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut o: Vec<String> = SEQ32_RUN.iter().map(|s| s.to_string()).collect();
    o.push(format!("--job.dump_folder={}", dir.display()));
    o.extend(extra.iter().map(|s| s.to_string()));
    o
}

/// The logged losses of a run on `world` rank threads; every rank must log the same ones.
fn losses(
    model: Model,
    world: usize,
    dir: PathBuf,
    overrides: Vec<String>,
) -> titan::Result<Vec<f64>> {
    Ok(losses_and_validation(model, world, dir, overrides)?.0)
}

/// Training and validation losses of a run on `world` rank threads (every rank's the same).
fn losses_and_validation(
    model: Model,
    world: usize,
    dir: PathBuf,
    overrides: Vec<String>,
) -> titan::Result<(Vec<f64>, Vec<f64>)> {
    let o: Vec<&str> = overrides.iter().map(|s| s.as_str()).collect();
    // Loaded once: ranks each writing and reading the config file would race.
    let cfg = model.config(&dir, &o)?;
    let run = |c: Box<dyn Communicator>| -> titan::Result<(Vec<f64>, Vec<f64>)> {
        let world = (world > 1).then_some(c);
        let mut tr = Trainer::distributed(cfg.clone(), &titan::registry(), false, world)?;
        tr.maybe_resume()?;
        let train = tr.fit(true)?.iter().map(|m| m.loss).collect();
        check_pipeline_memory(&tr)?;
        let val = tr.validation_history.iter().map(|v| v.validation_loss);
        Ok((train, val.collect()))
    };
    let mut results = run_rank_threads(HostComm::local_comms(world), &run);
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

fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    if b.is_empty() {
        return 0.0;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// One rank, then each (world, overrides) layout; all must log the reference's losses (and
/// validation losses, when `extra` enables validation).
fn parity(
    model: Model,
    tag: &'static str,
    layouts: Vec<(usize, Vec<&'static str>)>,
    extra: &'static [&'static str],
) {
    within_deadline(move || {
        let d = tmp(&format!("pp-{tag}-ref"));
        let (reference, val_ref) =
            losses_and_validation(model, 1, d.clone(), base(&d, extra)).unwrap();
        assert_eq!(reference.len(), 5);
        let validates = extra.contains(&"--validation.enable");
        assert_eq!(val_ref.len(), if validates { 2 } else { 0 }, "{val_ref:?}");
        assert!(reference.iter().all(|l| l.is_finite()), "{reference:?}");
        for (i, (world, layout)) in layouts.into_iter().enumerate() {
            let d = tmp(&format!("pp-{tag}-{i}"));
            let mut o = extra.to_vec();
            o.extend(layout.iter().copied());
            let (got, val) = losses_and_validation(model, world, d.clone(), base(&d, &o)).unwrap();
            let ev = rel(&val, &val_ref);
            assert!(
                ev < 1e-5,
                "{layout:?}: validation rel {ev:.2e}\n{val:?}\n{val_ref:?}"
            );
            let e = rel(&got, &reference);
            println!("{tag} world {world} {layout:?}: rel {e:.2e}\n  {got:?}\n  {reference:?}");
            assert!(e < 1e-5, "{layout:?}: rel {e:.2e}\n{got:?}\n{reference:?}");
        }
    });
}

fn pp2(schedule: &'static str, microbatch: &'static str) -> Vec<&'static str> {
    vec![
        "--parallelism.pipeline_parallel_degree=2",
        schedule,
        microbatch,
    ]
}

/// Every schedule at pp 2: GPipe and 1F1B with 2 stages, the interleaved ones with 4 (debug
/// models: 6 and 8 layers); microbatches of one row, GPipe's of `gpipe_rows`.
fn every_schedule(gpipe_rows: &'static str) -> Vec<(usize, Vec<&'static str>)> {
    vec![
        (
            2,
            pp2("--parallelism.pipeline_parallel_schedule=GPipe", gpipe_rows),
        ),
        (
            2,
            pp2(
                "--parallelism.pipeline_parallel_schedule=1F1B",
                "--parallelism.pipeline_parallel_microbatch_size=1",
            ),
        ),
        (
            2,
            pp2(
                "--parallelism.pipeline_parallel_schedule=Interleaved1F1B",
                "--parallelism.pipeline_parallel_microbatch_size=1",
            ),
        ),
        (
            2,
            pp2(
                "--parallelism.pipeline_parallel_schedule=InterleavedZeroBubble",
                "--parallelism.pipeline_parallel_microbatch_size=1",
            ),
        ),
    ]
}

#[test]
fn llama3_pp2_every_schedule_matches_one_rank() {
    let rows = "--parallelism.pipeline_parallel_microbatch_size=2";
    parity(Model::Llama3, "llama3", every_schedule(rows), VALIDATE);
}

#[test]
fn qwen3_tied_pp2_every_schedule_matches_one_rank() {
    // Batch 2 (2 microbatches): this model's steps are 6x the Llama 3 debug model's.
    let rows = "--parallelism.pipeline_parallel_microbatch_size=1";
    parity(
        Model::Qwen3,
        "qwen3",
        every_schedule(rows),
        &[LOCAL_BATCH_2],
    );
}

/// Gradient accumulation (global batch 8 = 2 local batches), activation checkpointing and
/// split points under pp, and pp 2 x DDP 2 and pp 2 x FSDP 2 at world 4, against one rank at
/// the same global batch.
#[test]
fn pp_with_accumulation_checkpointing_and_ddp_matches_one_rank() {
    let zb = pp2(
        "--parallelism.pipeline_parallel_schedule=InterleavedZeroBubble",
        "--parallelism.pipeline_parallel_microbatch_size=2",
    );
    let mut ac = pp2(
        "--parallelism.pipeline_parallel_schedule=1F1B",
        "--parallelism.pipeline_parallel_microbatch_size=1",
    );
    ac.extend([
        "--activation_checkpoint.mode=full",
        "--parallelism.pipeline_parallel_split_points=layers.2",
    ]);
    let mut zb_ac = zb.clone();
    zb_ac.push("--activation_checkpoint.mode=selective");
    let ddp = vec![
        "--parallelism.pipeline_parallel_degree=2",
        "--parallelism.data_parallel_replicate_degree=2",
        "--parallelism.pipeline_parallel_schedule=1F1B",
        "--parallelism.pipeline_parallel_microbatch_size=1",
        "--training.local_batch_size=4",
    ];
    // FSDP within each stage, 2 stages per rank.
    let fsdp = vec![
        "--parallelism.pipeline_parallel_degree=2",
        "--parallelism.data_parallel_shard_degree=2",
        "--parallelism.pipeline_parallel_schedule=Interleaved1F1B",
        "--parallelism.pipeline_parallel_microbatch_size=1",
    ];
    // The DDP and FSDP layouts' two data-parallel ranks read 4 rows each of the global 8.
    parity(
        Model::Llama3,
        "accum",
        vec![(2, ac), (2, zb_ac), (4, ddp), (4, fsdp)],
        &[
            "--training.global_batch_size=8",
            "--validation.enable",
            "--validation.freq=5",
            "--validation.steps=2",
            "--validation.local_batch_size=2",
            "--validation.seq_len=32",
        ],
    );
}

/// A run saved at pp 2 resumes at pp 1 and the reverse, each continuing the losses of one
/// uninterrupted run (Qwen3: the tied embedding is saved once, by the first stage).
#[test]
fn checkpoints_resume_across_pp2_and_pp1() {
    within_deadline(|| {
        let ck = ["--checkpoint.enable", "--checkpoint.interval=3"];
        let d = tmp("pp-resume-ref");
        let reference = losses(Model::Qwen3, 1, d.clone(), base(&d, &[LOCAL_BATCH_2])).unwrap();
        let pp = pp2(
            "--parallelism.pipeline_parallel_schedule=1F1B",
            "--parallelism.pipeline_parallel_microbatch_size=1",
        );
        for (first, then) in [(2, 1), (1, 2)] {
            let d = tmp(&format!("pp-resume-{first}-{then}"));
            let layout = |world: usize| if world == 2 { pp.clone() } else { vec![] };
            let mut o = ck.to_vec();
            o.extend(["--training.steps=3", LOCAL_BATCH_2]);
            o.extend(layout(first));
            let head = losses(Model::Qwen3, first, d.clone(), base(&d, &o)).unwrap();
            let saved = titan::checkpoint::load(&d.join("checkpoint"), Some(3)).unwrap();
            for (name, t) in &saved.manifest.tensors {
                // One box per tensor: the tied embedding only from the first stage.
                assert_eq!(t.shards.len(), 1, "{name} saved {} times", t.shards.len());
            }
            // Resume without saving again (a save of this model is a few seconds).
            let mut o = vec![
                "--checkpoint.enable",
                "--checkpoint.load_only",
                LOCAL_BATCH_2,
            ];
            o.extend(layout(then));
            let tail = losses(Model::Qwen3, then, d.clone(), base(&d, &o)).unwrap();
            assert_eq!(tail.len(), 2, "resumed at step 3: {tail:?}");
            let got: Vec<f64> = head.into_iter().chain(tail).collect();
            let e = rel(&got, &reference);
            assert!(
                e < 1e-5,
                "pp {first} -> {then}: rel {e:.2e}\n{got:?}\n{reference:?}"
            );
        }
    });
}

/// Layouts no pipeline can run: one error on every rank, naming the cause.
#[test]
fn bad_pipeline_layouts_are_clear_errors() {
    within_deadline(|| {
        for (extra, want) in [
            // 8 stages of one layer (plus the two edge units) for 6 layers.
            (
                vec!["--parallelism.pipeline_parallel_layers_per_stage=1"],
                "8 stages for 6 layers",
            ),
            (
                vec!["--training.local_batch_size=1"],
                "1 microbatches for 2 pipeline ranks",
            ),
            (
                vec!["--parallelism.pipeline_parallel_split_points=layers.9"],
                "split_points: \"layers.9\"",
            ),
            (
                vec!["--parallelism.pipeline_parallel_split_points=layers.2,layers.4"],
                "3 pipeline stages do not divide evenly",
            ),
            (
                vec![
                    "--parallelism.pipeline_parallel_schedule=Interleaved1F1B",
                    "--parallelism.pipeline_parallel_layers_per_stage=4",
                ],
                "at least 2",
            ),
        ] {
            let d = tmp("pp-bad");
            let mut o = vec!["--parallelism.pipeline_parallel_degree=2"];
            o.extend(extra.iter().copied());
            let world = if o.iter().any(|x| x.contains("shard_degree=2")) {
                4
            } else {
                2
            };
            let e = losses(Model::Llama3, world, d.clone(), base(&d, &o))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{extra:?}: {e}");
        }
    });
}

/// `titan plan` of a pp layout: every pp rank's memory, its activations counting the stage
/// microbatches its schedule holds at once (1F1B: 2 on rank 0, 1 on rank 1; GPipe: all 4).
#[test]
fn plan_counts_each_pp_ranks_microbatches_in_flight() {
    let plan = |schedule: &str| -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_titan"))
            .args([
                "plan",
                "--config",
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/configs/llama3_debugmodel.toml"
                ),
                "--world-size",
                "2",
                "--json",
                "--parallelism.pipeline_parallel_degree=2",
                &format!("--parallelism.pipeline_parallel_schedule={schedule}"),
                "--training.local_batch_size=4",
                "--training.seq_len=32",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let e = &v["estimate"];
        assert!(e["cost"]["step_s"].as_f64().unwrap() > 0.0, "{v}");
        let note = e["notes"][0].as_str().unwrap();
        assert!(note.contains(schedule) && note.contains("bubble"), "{note}");
        v["pipeline"].clone()
    };
    let (one, all) = (plan("1F1B"), plan("GPipe"));
    assert_eq!(one["peak_in_flight"], serde_json::json!([2, 1]), "{one}");
    assert_eq!(all["peak_in_flight"], serde_json::json!([4, 4]), "{all}");
    let act = |p: &serde_json::Value, r: usize| p["ranks"][r]["activations_peak"].as_u64().unwrap();
    let state =
        |p: &serde_json::Value, r: usize| p["ranks"][r]["state"]["params"].as_u64().unwrap();
    for r in 0..2 {
        // The same stage: the same state, more activations for more microbatches in flight.
        assert_eq!(state(&one, r), state(&all, r));
        assert!(state(&one, r) > 0 && act(&one, r) > 0);
        assert!(act(&all, r) > act(&one, r), "rank {r}: {all} vs {one}");
    }
}
