//! Validation during training (`[validation]`): the held-out loss it reports is the mean loss of an
//! independent forward pass over the same batches, it leaves training bitwise unchanged (it
//! borrows the training arena between steps), it gets its own arena when its batches are larger,
//! `steps = -1` is one pass over a file, and each bad setting is one clear error.

use std::path::Path;
use titan::data::{build_loader, DataConfig};
use titan::tape::{Placement, Tape};
use titan::train::trainer::Trainer;
use titan::train::validate::VALIDATION_SEED_SALT;
use titan::Error;

mod train_common;
use train_common::{debug_trainer, tmp};

/// The debugmodel job on the CPU, 4 steps of batch 2 x seq 32, plus `extra` overrides.
fn trainer(dump: &Path, extra: &[&str]) -> titan::Result<Trainer> {
    let mut o = vec![
        "--training.device=cpu",
        "--training.steps=4",
        "--training.seq_len=32",
        "--training.local_batch_size=2",
    ];
    o.extend_from_slice(extra);
    debug_trainer(dump, &o)
}

/// Mean loss of `tr`'s current weights on the first `batches` batches of a fresh synthetic
/// validation loader, each batch on its own tape with owned buffers (no plan, no arena).
fn independent_loss(tr: &Trainer, batch: usize, seq: usize, batches: usize) -> f64 {
    let seed = tr.cfg.training.seed.unwrap() as u64 ^ VALIDATION_SEED_SALT;
    let mut loader = build_loader(&DataConfig {
        dataset: "synthetic".into(),
        seq_len: seq,
        batch,
        seed,
        progress: false,
        ..DataConfig::default()
    })
    .unwrap();
    let (mut total, mut count) = (0f64, 0usize);
    for _ in 0..batches {
        let b = loader.next_batch().unwrap();
        let mut t = Tape::new(tr.be.as_ref(), &tr.store, Placement::Owned);
        let ti = t.input_i32(&b.inputs, [b.batch, b.seq]).unwrap();
        let tl = t.input_i32(&b.labels, [b.batch * b.seq]).unwrap();
        let loss = tr
            .spec
            .loss_of(tr.model.as_ref(), &mut t, ti, tl, 1.0)
            .unwrap();
        total += t.to_vec_f32(loss).unwrap()[0] as f64;
        count += b.labels.iter().filter(|&&l| l >= 0).count();
    }
    total / count as f64
}

fn rel(a: f64, b: f64) -> f64 {
    ((a - b) / b).abs()
}

#[test]
fn reports_the_held_out_loss_and_leaves_training_unchanged() {
    let plain_dir = tmp("val-plain");
    let mut plain = trainer(&plain_dir, &[]).unwrap();
    let plain_hist = plain.fit(true).unwrap();
    assert!(plain.validator.is_none());

    let dir = tmp("val-val");
    let v = [
        "--validation.enable",
        "--validation.freq",
        "2",
        "--validation.steps",
        "3",
        "--validation.local_batch_size",
        "2",
        "--validation.seq_len",
        "32",
    ];
    let mut tr = trainer(&dir, &v).unwrap();
    assert_eq!(
        tr.validator.as_ref().unwrap().own_bytes(),
        0,
        "same batch shape: validation runs in the training arena"
    );
    assert_eq!(tr.memory.validation_activations, 0);
    let hist = tr.fit(true).unwrap();
    // Training is bitwise the same with validation interleaved in its arena.
    let bits = |h: &[titan::metrics::StepMetrics]| -> Vec<u64> {
        h.iter().map(|m| m.loss.to_bits()).collect()
    };
    assert_eq!(bits(&hist), bits(&plain_hist));

    // torchtitan's cadence: after step 1, then every freq steps.
    let steps: Vec<u64> = tr.validation_history.iter().map(|m| m.step).collect();
    assert_eq!(steps, vec![1, 2, 4]);
    let last = tr.validation_history.last().unwrap();
    assert_eq!(last.validation_batches, 3);
    assert_eq!(last.validation_tokens, 3 * 2 * 32);
    let want = independent_loss(&tr, 2, 32, 3);
    assert!(
        rel(last.validation_loss, want) < 1e-6,
        "validation loss {} vs independent forward {want}",
        last.validation_loss
    );
    // Same held-out tokens every run: the weights changed between steps 1 and 4, the data not.
    let first = tr.validation_history[0].validation_loss;
    assert!(
        last.validation_loss < first,
        "held-out loss did not fall: {first} -> {}",
        last.validation_loss
    );

    // Each run is one JSON line in metrics.jsonl, beside the step lines.
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let val: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|j| j.get("validation_loss").is_some())
        .collect();
    assert_eq!(val.len(), 3);
    assert_eq!(val[2]["step"], 4);
    assert_eq!(
        val[2]["validation_loss"].as_f64().unwrap(),
        last.validation_loss
    );
}

#[test]
fn larger_validation_batches_get_their_own_planned_arena() {
    let dir = tmp("val-own");
    let v = [
        "--training.local_batch_size",
        "1",
        "--training.steps",
        "2",
        "--validation.enable",
        "--validation.freq",
        "1",
        "--validation.steps",
        "2",
        "--validation.local_batch_size",
        "16",
        "--validation.seq_len",
        "32",
    ];
    let mut tr = trainer(&dir, &v).unwrap();
    let own = tr.validator.as_ref().unwrap().own_bytes();
    assert!(
        own > tr.memory.activations_peak,
        "a 16 x 32 forward ({own} bytes) should not fit a 1 x 32 step's arena ({})",
        tr.memory.activations_peak
    );
    assert_eq!(tr.memory.validation_activations, own);
    assert_eq!(
        tr.actual_memory(),
        tr.memory.total() + 256,
        "held memory = plan (state + training arena + validation arena) + scalars"
    );
    tr.fit(true).unwrap();
    let last = tr.validation_history.last().unwrap();
    assert_eq!((last.step, last.validation_tokens), (2, 2 * 16 * 32));
    let want = independent_loss(&tr, 16, 32, 2);
    assert!(
        rel(last.validation_loss, want) < 1e-6,
        "validation loss {} vs independent forward {want}",
        last.validation_loss
    );
}

#[test]
fn steps_minus_one_is_one_pass_over_a_token_file() {
    let dir = tmp("val-file");
    let file = dir.join("val.u16.bin");
    let ids: Vec<u16> = (0..1000u32).map(|i| ((i * 7 + 3) % 259) as u16).collect();
    std::fs::write(&file, bytemuck::cast_slice(&ids)).unwrap();
    let path_arg = format!("--validation.dataset_path={}", file.display());
    let v = [
        "--validation.enable",
        path_arg.as_str(),
        "--validation.steps",
        "-1",
        "--validation.local_batch_size",
        "2",
        "--validation.seq_len",
        "31",
        "--validation.freq",
        "4",
    ];
    let mut tr = trainer(&dir, &v).unwrap();
    tr.fit(true).unwrap();
    // 1000 tokens in samples of 32 (seq + 1), two per batch: 15 whole batches.
    let runs = &tr.validation_history;
    assert_eq!(runs.len(), 2, "steps 1 and 4");
    for m in runs {
        assert_eq!(
            (m.validation_batches, m.validation_tokens),
            (15, 15 * 2 * 31)
        );
        assert!(m.validation_loss.is_finite());
    }
}

fn config_error(extra: &[&str]) -> String {
    let dir = tmp("val-err");
    let mut all = vec!["--validation.enable"];
    all.extend_from_slice(extra);
    match trainer(&dir, &all) {
        Ok(_) => panic!("{extra:?} was accepted"),
        Err(e @ (Error::Config(_) | Error::Data(_))) => e.to_string(),
        Err(e) => panic!("{extra:?}: unexpected kind of error {e}"),
    }
}

#[test]
fn bad_validation_settings_are_clear_errors() {
    let e = config_error(&["--validation.seq_len", "64"]);
    assert!(
        e.contains("validation.seq_len = 64") && e.contains("training.seq_len = 32"),
        "{e}"
    );
    let e = config_error(&["--validation.seq_len", "32", "--validation.steps", "-1"]);
    assert!(
        e.contains("validation.steps = -1") && e.contains("synthetic"),
        "{e}"
    );
    let e = config_error(&[
        "--validation.seq_len",
        "32",
        "--validation.dataset",
        "c4_validation",
    ]);
    assert!(e.contains("validation.dataset_path"), "{e}");
    let e = config_error(&[
        "--validation.seq_len",
        "32",
        "--validation.dataset_path",
        "/nonexistent/val.txt",
    ]);
    assert!(
        e.contains("validation dataset") && e.contains("/nonexistent/val.txt"),
        "{e}"
    );
    let tiny = tmp("val-tiny").join("tiny.u16.bin");
    std::fs::write(&tiny, bytemuck::cast_slice(&[1u16; 40])).unwrap();
    let arg = format!("--validation.dataset_path={}", tiny.display());
    let e = config_error(&[
        "--validation.seq_len",
        "32",
        arg.as_str(),
        "--validation.steps",
        "-1",
    ]);
    assert!(e.contains("fewer than one batch"), "{e}");
}

#[test]
fn a_finite_validation_set_is_read_once_and_needs_one_full_batch() {
    let dir = tmp("val-once");
    let file = dir.join("val.u16.bin");
    // 100 tokens, samples of 32 (seq 31 + 1), two per batch: one full batch, 36 tokens over.
    let ids: Vec<u16> = (0..100u16).map(|i| (i * 7 + 3) % 259).collect();
    std::fs::write(&file, bytemuck::cast_slice(&ids)).unwrap();
    let path_arg = format!("--validation.dataset_path={}", file.display());
    let v = [
        "--validation.enable",
        path_arg.as_str(),
        "--validation.steps",
        "5",
        "--validation.local_batch_size",
        "2",
        "--validation.seq_len",
        "31",
        "--validation.freq",
        "4",
    ];
    let mut tr = trainer(&dir, &v).unwrap();
    assert_eq!(tr.validator.as_ref().unwrap().batches(), 1);
    tr.fit(true).unwrap();
    for m in &tr.validation_history {
        assert_eq!((m.validation_batches, m.validation_tokens), (1, 2 * 31));
    }
    // 40 tokens: one sample but not one batch of two; validation.steps > 0 does not make it
    // repeat the set to fill one.
    std::fs::write(&file, bytemuck::cast_slice(&ids[..40])).unwrap();
    let e = match trainer(&dir, &v) {
        Err(e @ Error::Data(_)) => e.to_string(),
        Err(e) => panic!("unexpected kind of error {e}"),
        Ok(_) => panic!("a validation set without a full batch was accepted"),
    };
    assert!(e.contains("has 40 tokens, fewer than one batch"), "{e}");
}
