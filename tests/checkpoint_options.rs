//! torchtitan's checkpoint options beyond save/resume: `last_save_model_only`,
//! `exclude_from_loading`, `initial_load_model_only = false`, `enable_first_step_checkpoint`,
//! `load_only`, `create_seed_checkpoint`, and `job.print_config`.

use std::path::Path;
use std::process::Command;
use titan::checkpoint;
use titan::train::trainer::Trainer;
use titan::Error;

mod train_common;
use train_common::{debug_trainer, masters, tmp};

const CFG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/configs/llama3_debugmodel.toml"
);

/// The debugmodel job on the CPU, batch 2 x seq 16, `steps` steps, checkpoints enabled in `dump`.
fn trainer(dump: &Path, steps: u32, extra: &[&str]) -> titan::Result<Trainer> {
    let steps = format!("--training.steps={steps}");
    let mut o = vec![
        "--training.device=cpu",
        "--training.seq_len=16",
        "--training.local_batch_size=2",
        "--checkpoint.enable",
        steps.as_str(),
    ];
    o.extend_from_slice(extra);
    debug_trainer(dump, &o)
}

fn moments(tr: &Trainer) -> (Vec<f32>, Vec<f32>) {
    let (m, v) = tr.store.flat_moments();
    let be = tr.be.as_ref();
    (
        tr.store.read_f32(be, m).unwrap(),
        tr.store.read_f32(be, v).unwrap(),
    )
}

fn steps_on_disk(dump: &Path) -> Vec<u64> {
    checkpoint::available_steps(&dump.join("checkpoint")).unwrap()
}

fn has_moments(dump: &Path, step: u64) -> bool {
    let ck = checkpoint::load(&dump.join("checkpoint"), Some(step)).unwrap();
    let n = ck
        .tensor_names()
        .filter(|n| n.starts_with("optim."))
        .count();
    n > 0
}

#[test]
fn last_save_model_only_writes_weights_only_and_resuming_from_it_says_so() {
    let dump = tmp("ckopt-last-model-only");
    let extra = [
        "--checkpoint.interval=1",
        "--checkpoint.last_save_model_only",
    ];
    let mut tr = trainer(&dump, 2, &extra).unwrap();
    tr.fit(true).unwrap();
    let saved = masters(&tr);
    assert_eq!(steps_on_disk(&dump), vec![1, 2]);
    assert!(has_moments(&dump, 1), "an interval save is whole");
    assert!(!has_moments(&dump, 2), "the last save holds weights only");

    let mut again = trainer(&dump, 3, &extra).unwrap();
    match again.maybe_resume() {
        Err(Error::Checkpoint(m)) => assert!(
            m.contains("weights only") && m.contains("exclude_from_loading"),
            "{m}"
        ),
        other => panic!("resuming from a weights-only step 2: {other:?}"),
    }
    // Excluding the optimizer makes it a valid start: weights and step back, moments fresh.
    let mut ok = trainer(
        &dump,
        3,
        &[
            extra[0],
            extra[1],
            "--checkpoint.exclude_from_loading=optimizer",
        ],
    )
    .unwrap();
    assert_eq!(ok.maybe_resume().unwrap(), Some(2));
    assert!(masters(&ok) == saved);
    let (m, v) = moments(&ok);
    assert!(m.iter().chain(&v).all(|&x| x == 0.0));
}

#[test]
fn exclude_from_loading_restores_everything_else() {
    let dump = tmp("ckopt-exclude");
    let extra = [
        "--checkpoint.interval=2",
        "--checkpoint.no_last_save_model_only",
    ];
    let mut a = trainer(&dump, 4, &extra).unwrap();
    let fresh = masters(&a);
    let fresh_data = a.loader.state();
    let mut lrs = Vec::new();
    for _ in 0..4 {
        lrs.push(a.train_step().unwrap().lr);
        if a.step == 2 {
            a.save_checkpoint().unwrap();
        }
    }
    let ck = checkpoint::load(&dump.join("checkpoint"), Some(2)).unwrap();
    let weights_at_2: Vec<u8> = ck.read_global("model.output.weight").unwrap();

    let resume = |what: &str| {
        let arg = format!("--checkpoint.exclude_from_loading={what}");
        let mut t = trainer(&dump, 4, &[extra[0], extra[1], arg.as_str()]).unwrap();
        t.maybe_resume().unwrap();
        t
    };
    let out_w = |t: &Trainer| {
        let id = t.store.find("output.weight").unwrap();
        let w = t.store.read_f32(t.be.as_ref(), t.store.master(id)).unwrap();
        bytemuck::cast_slice::<f32, u8>(&w).to_vec()
    };

    let mut t = resume("dataloader");
    assert_eq!(t.step, 2);
    assert_eq!(out_w(&t), weights_at_2);
    assert_eq!(t.loader.state(), fresh_data, "data position not restored");
    assert_eq!(t.train_step().unwrap().lr, lrs[2], "schedule continues");

    let mut t = resume("train_state");
    assert_eq!(t.step, 0, "step not restored");
    assert_eq!(out_w(&t), weights_at_2);
    assert_eq!(
        t.train_step().unwrap().lr,
        lrs[2],
        "the schedule keeps its own position (step 3's lr)"
    );

    let mut t = resume("lr_scheduler");
    assert_eq!(t.step, 2);
    assert_eq!(
        t.train_step().unwrap().lr,
        lrs[0],
        "the schedule restarts (step 1's lr)"
    );
    // Its next save records the restarted schedule, and a plain resume continues it.
    t.save_checkpoint().unwrap();
    let ck = checkpoint::load(&dump.join("checkpoint"), Some(3)).unwrap();
    assert_eq!(ck.manifest.lr_scheduler["step"], 1);
    let mut u = trainer(&dump, 4, &extra).unwrap();
    assert_eq!(u.maybe_resume().unwrap(), Some(3));
    assert_eq!(u.train_step().unwrap().lr, lrs[1]);

    let t = resume("model");
    assert_eq!(t.step, 3);
    assert!(
        masters(&t) == fresh,
        "weights stay the fresh initialisation"
    );

    let t = resume("optimizer,model");
    let (m, v) = moments(&t);
    assert!(
        m.iter().chain(&v).all(|&x| x == 0.0),
        "moments not restored"
    );
}

#[test]
fn initial_load_model_only_false_continues_from_the_whole_state() {
    let src = tmp("ckopt-whole-src");
    let extra = [
        "--checkpoint.interval=2",
        "--checkpoint.no_last_save_model_only",
    ];
    let mut a = trainer(&src, 4, &extra).unwrap();
    let losses_a: Vec<u64> = a
        .fit(true)
        .unwrap()
        .iter()
        .map(|m| m.loss.to_bits())
        .collect();

    let dump = tmp("ckopt-whole-dst");
    let step2 = src.join("checkpoint/step-2");
    let load = format!("--checkpoint.initial_load_path={}", step2.display());
    let mut b = trainer(
        &dump,
        4,
        &[
            load.as_str(),
            "--checkpoint.no_initial_load_model_only",
            "--metrics.log_freq=1",
        ],
    )
    .unwrap();
    assert_eq!(
        b.maybe_resume().unwrap(),
        None,
        "nothing to resume in its own folder"
    );
    assert_eq!(b.step, 2);
    let losses_b: Vec<u64> = b
        .fit(true)
        .unwrap()
        .iter()
        .map(|m| m.loss.to_bits())
        .collect();
    // Steps 3 and 4 repeat the source run's bit for bit (log_freq 10: it logged steps 1 and 4).
    assert_eq!(losses_b.last(), losses_a.last());
    assert_eq!(losses_b.len(), 2);

    // Model only (the default) takes the weights and starts at step 0.
    let mut c = trainer(&tmp("ckopt-whole-model"), 4, &[load.as_str()]).unwrap();
    c.maybe_resume().unwrap();
    assert_eq!(c.step, 0);
    let (m, _) = moments(&c);
    assert!(m.iter().all(|&x| x == 0.0));
}

#[test]
fn first_step_checkpoint_and_load_only() {
    let dump = tmp("ckopt-first");
    let mut tr = trainer(
        &dump,
        3,
        &[
            "--checkpoint.interval=10",
            "--checkpoint.enable_first_step_checkpoint",
        ],
    )
    .unwrap();
    tr.fit(true).unwrap();
    assert_eq!(steps_on_disk(&dump), vec![1, 3]);

    // load_only resumes from step 3 and never writes.
    let mut again = trainer(
        &dump,
        5,
        &["--checkpoint.interval=1", "--checkpoint.load_only"],
    )
    .unwrap();
    assert_eq!(again.maybe_resume().unwrap(), Some(3));
    again.fit(true).unwrap();
    assert_eq!(again.step, 5);
    assert_eq!(steps_on_disk(&dump), vec![1, 3]);
}

fn titan(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_titan"))
        .args(args)
        .output()
        .expect("run titan")
}

#[test]
fn seed_checkpoint_then_training_from_it_and_print_config() {
    let dump = tmp("ckopt-seed");
    let dump_arg = format!("--job.dump_folder={}", dump.display());
    let base = [
        "train",
        "--config",
        CFG,
        "--quiet",
        dump_arg.as_str(),
        "--training.device=cpu",
        "--training.seq_len=16",
        "--training.local_batch_size=2",
        "--training.steps=2",
    ];
    let mut seed = base.to_vec();
    seed.extend(["--checkpoint.create_seed_checkpoint", "--checkpoint.enable"]);
    let o = titan(&seed);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("seed checkpoint"), "{out}");
    assert_eq!(steps_on_disk(&dump), vec![0]);
    assert!(
        !has_moments(&dump, 0),
        "a seed checkpoint holds weights only"
    );
    assert!(!dump.join("metrics.jsonl").exists(), "no training ran");

    // The seed's weights are where training starts.
    let mut tr = trainer(&dump, 2, &[]).unwrap();
    let init = masters(&tr);
    assert_eq!(tr.maybe_resume().unwrap(), Some(0));
    let ck = checkpoint::load(&dump.join("checkpoint"), Some(0)).unwrap();
    let id = tr.store.find("tok_embeddings.weight").unwrap();
    let w = tr
        .store
        .read_f32(tr.be.as_ref(), tr.store.master(id))
        .unwrap();
    assert_eq!(
        bytemuck::cast_slice::<f32, u8>(&w),
        &ck.read_global("model.tok_embeddings.weight").unwrap()[..]
    );
    assert!(
        masters(&tr) == init,
        "same seed: the seed checkpoint is this init"
    );
    tr.fit(true).unwrap();

    let mut no_enable = base.to_vec();
    no_enable.push("--checkpoint.create_seed_checkpoint");
    let o = titan(&no_enable);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("panicked"));
    assert!(
        err.contains("checkpoint.create_seed_checkpoint") && err.contains("checkpoint.enable"),
        "{err}"
    );

    let mut show = base.to_vec();
    show.extend(["--job.print_config", "--training.steps=1"]);
    let o = titan(&show);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        out.contains("[training]") && out.contains("seq_len = 16"),
        "{out}"
    );
}
