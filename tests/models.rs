//! Models as plug-ins: the engine sees models only through their `ModelSpec`; Qwen3 (added by
//! docs/adding_a_model.md) trains, checkpoints and resumes exactly through the same trainer as
//! Llama 3; manifests of the release before the model protocol still load; tied embeddings
//! accumulate both uses' gradients.

use std::path::Path;
use titan::backend::cpu::CpuBackend;
use titan::checkpoint::{self, Manifest, MANIFEST_FILE};
use titan::model::resolve;
use titan::params::{ParamStore, ParamStoreBuilder};
use titan::qwen3::{Qwen3, Qwen3Config};
use titan::tape::{Placement, Tape};
use titan::train::config::JobConfig;
use titan::train::trainer::Trainer;
use titan::DType;

mod train_common;
use train_common::{debug_config, masters, qwen3_debug_config, tmp};

/// Runs `tr` to its configured step count, returning each step's loss.
fn losses(tr: &mut Trainer) -> Vec<f64> {
    let steps = tr.cfg.training.steps as u64;
    let mut out = Vec::new();
    while tr.step < steps {
        out.push(tr.train_step().unwrap().loss);
    }
    out
}

fn small(steps: u32) -> Vec<String> {
    vec![
        "--training.device=cpu".into(),
        "--training.seq_len=32".into(),
        "--training.local_batch_size=2".into(),
        format!("--training.steps={steps}"),
    ]
}

fn trainer(cfg: JobConfig) -> Trainer {
    Trainer::new(cfg, &titan::registry()).unwrap()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

#[test]
fn qwen3_debugmodel_trains_checkpoints_and_resumes_exactly() {
    let (a, b) = (tmp("models-qwen3-a"), tmp("models-qwen3-b"));
    // One 6-step schedule for the uninterrupted run and both halves of the interrupted one.
    let mut o = small(6);
    o.extend([
        "--lr_scheduler.warmup_steps=1".into(),
        "--lr_scheduler.total_steps=6".into(),
    ]);
    let mut full = trainer(qwen3_debug_config(&a, &refs(&o)).unwrap());
    assert_eq!(full.spec.name, "qwen3");
    let la = losses(&mut full);
    assert!(
        la[5] < la[0] - 0.5,
        "qwen3 debugmodel loss should fall over 6 steps: {la:?}"
    );

    // Interrupted: 3 steps with a checkpoint, then a fresh trainer resumes to 6.
    let ck = [
        "--checkpoint.enable".to_string(),
        "--checkpoint.interval=3".into(),
    ];
    let mut o3 = o.clone();
    o3[3] = "--training.steps=3".into();
    o3.extend(ck.clone());
    let mut o6 = o.clone();
    o6.extend(ck);
    let mut first = trainer(qwen3_debug_config(&b, &refs(&o3)).unwrap());
    first.fit(true).unwrap();
    assert_eq!(
        checkpoint::available_steps(&b.join("checkpoint")).unwrap(),
        vec![3]
    );
    let m = Manifest::read(&b.join("checkpoint/step-3").join(MANIFEST_FILE)).unwrap();
    assert_eq!(m.extra["model"], "qwen3");
    assert_eq!(m.extra["model_args"]["head_dim"], 128);
    drop(first);
    let mut second = trainer(qwen3_debug_config(&b, &refs(&o6)).unwrap());
    assert_eq!(second.maybe_resume().unwrap(), Some(3));
    let lb = losses(&mut second);
    assert_eq!(
        &la[3..],
        &lb[..],
        "resumed losses must equal the uninterrupted run's"
    );
    assert_eq!(masters(&full), masters(&second), "weights after step 6");
    for d in [a, b] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn manifests_with_llama3_config_still_load() {
    // Releases before the model protocol recorded the architecture as extra.llama3_config.
    let dir = tmp("models-legacy");
    let mut o = small(2);
    o.extend([
        "--checkpoint.enable".into(),
        "--checkpoint.interval=2".into(),
    ]);
    let mut tr = trainer(debug_config(&dir, &refs(&o)).unwrap());
    tr.fit(true).unwrap();
    let saved = masters(&tr);
    let want_args = tr.model.args().to_json();
    drop(tr);
    let path = dir.join("checkpoint/step-2").join(MANIFEST_FILE);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let extra = v["extra"].as_object_mut().unwrap();
    let args = extra.remove("model_args").unwrap();
    extra.insert("llama3_config".into(), args);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();

    let m = Manifest::read(&path).unwrap();
    let spec = titan::registry().find("llama3").unwrap();
    let got = resolve::manifest_args(spec, &m)
        .unwrap()
        .expect("legacy record read");
    assert_eq!(got.to_json(), want_args);
    // A qwen3 config cannot take a llama3 checkpoint's record.
    let q = titan::registry().find("qwen3").unwrap();
    assert!(resolve::manifest_args(q, &m).is_err());

    let mut o3 = small(3);
    o3.extend(["--checkpoint.enable".into()]);
    let mut tr = trainer(debug_config(&dir, &refs(&o3)).unwrap());
    assert_eq!(tr.maybe_resume().unwrap(), Some(2));
    assert_eq!(masters(&tr), saved);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn unknown_model_and_flavor_are_clear_errors() {
    let dir = tmp("models-unknown");
    let mut o = small(1);
    o.push("--model.name=gpt2".into());
    let e = Trainer::new(debug_config(&dir, &refs(&o)).unwrap(), &titan::registry())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("unknown model 'gpt2'") && e.contains("llama3, qwen3"),
        "{e}"
    );
    let mut o = small(1);
    o.push("--model.flavor=70B".into());
    let e = Trainer::new(
        qwen3_debug_config(&dir, &refs(&o)).unwrap(),
        &titan::registry(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("unknown qwen3 flavor '70B'") && e.contains("0.6B"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A tiny Qwen3 with odd sizes (head_dim 6 != dim 20 / heads 4).
fn tiny_qwen3(tied: bool) -> Qwen3Config {
    Qwen3Config {
        dim: 20,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 6,
        hidden_dim: 28,
        vocab_size: 23,
        max_seq_len: 7,
        tie_embeddings: tied,
        ..Qwen3Config::default()
    }
}

/// Loss gradients of every parameter, by name, of `model` with `store`'s weights.
fn grads(model: &Qwen3, store: &ParamStore, be: &CpuBackend) -> Vec<(String, Vec<f32>)> {
    let spec = titan::qwen3::model_spec();
    let (ids, labels): (Vec<i32>, Vec<i32>) = (0..14)
        .map(|i| ((i * 7 + 3) % 23, (i * 5 + 1) % 23))
        .unzip();
    store.zero_grads(be).unwrap();
    let mut t = Tape::new(be, store, Placement::Owned);
    let ti = t.input_i32(&ids, [2, 7]).unwrap();
    let tl = t.input_i32(&labels, [14]).unwrap();
    let loss = spec.loss_of(model, &mut t, ti, tl, 1.0 / 14.0).unwrap();
    t.backward(loss).unwrap();
    store
        .ids()
        .map(|id| {
            (
                store.name(id).to_string(),
                store.read_f32(be, store.grad(id)).unwrap(),
            )
        })
        .collect()
}

#[test]
fn tied_embedding_gradient_is_the_sum_of_both_uses() {
    // The tied model's embedding gradient must equal, in an untied copy holding the same matrix
    // twice, the embedding's gradient plus the output projection's.
    let be = CpuBackend::new();
    let build = |tied: bool| {
        let mut b = ParamStoreBuilder::default();
        let m = Qwen3::new(tiny_qwen3(tied), &mut b).unwrap();
        let s = ParamStore::materialize(b, &be, DType::F32).unwrap();
        (m, s)
    };
    let (untied, su) = build(false);
    untied.init_weights(&su, &be, 5).unwrap();
    let (tied, st) = build(true);
    let emb = su
        .read_f32(&be, su.master(untied.tok_embeddings.unwrap()))
        .unwrap();
    let out = untied.output.unwrap();
    su.set(&be, out, &emb).unwrap();
    for id in st.ids() {
        let src = su.find(st.name(id)).unwrap();
        st.set(&be, id, &su.read_f32(&be, su.master(src)).unwrap())
            .unwrap();
    }
    let gu = grads(&untied, &su, &be);
    let gt = grads(&tied, &st, &be);
    let get = |g: &[(String, Vec<f32>)], n: &str| g.iter().find(|x| x.0 == n).unwrap().1.clone();
    let sum: Vec<f32> = get(&gu, "tok_embeddings.weight")
        .iter()
        .zip(get(&gu, "output.weight"))
        .map(|(a, b)| a + b)
        .collect();
    let tied_g = get(&gt, "tok_embeddings.weight");
    let num: f64 = sum
        .iter()
        .zip(&tied_g)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = sum.iter().map(|a| (*a as f64).powi(2)).sum();
    assert!(
        den > 0.0 && (num / den).sqrt() < 1e-5,
        "rel {}",
        (num / den).sqrt()
    );
    // Every other parameter's gradient is the same in both.
    for (n, g) in &gt {
        if n != "tok_embeddings.weight" {
            assert_eq!(g, &get(&gu, n), "{n}");
        }
    }
}

#[test]
fn the_engine_names_no_model() {
    // The crate boundary already refuses `use titan::llama3` inside the engine; this also keeps
    // model names out of the engine's code (comments may mention them).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("engine");
    let mut bad = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for (i, line) in text.lines().enumerate() {
                    let code = line.trim_start();
                    if code.starts_with("//") {
                        continue;
                    }
                    let l = code.to_lowercase();
                    if l.contains("llama") || l.contains("qwen") {
                        bad.push(format!("{}:{}: {line}", p.display(), i + 1));
                    }
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "engine code names a model:\n{}",
        bad.join("\n")
    );
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        !manifest.contains("titan ="),
        "the engine crate must not depend on the models crate"
    );
}
