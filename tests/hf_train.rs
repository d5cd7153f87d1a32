//! Training from Hugging Face weights (checkpoint.initial_load_in_hf), exporting at the end
//! (checkpoint.last_save_in_hf), resuming from a converted checkpoint, and the fixture
//! tokenizer.json driving a .txt dataset through engine/data.

use std::path::{Path, PathBuf};
use titan::checkpoint::hf_folder::{HfCheckpoint, HF_CONFIG};
use titan::data::{build_loader, load_tokenizer, DataConfig};
use titan::llama3::model::state_dict_adapter::{llama3_config_from_hf, Llama3StateDictAdapter};
use titan::llama3::Llama3Config;
use titan::model::StateDictAdapter;
use titan::train::config::JobConfig;
use titan::train::trainer::Trainer;

fn hf_to_titan(src: &Path, dst: &Path) -> titan::Result<PathBuf> {
    titan::cli::convert::hf_to_titan(&titan::registry(), src, dst)
}

/// The trainer's Llama 3 architecture.
fn llama(tr: &Trainer) -> &Llama3Config {
    tr.model
        .args()
        .as_any()
        .downcast_ref::<Llama3Config>()
        .unwrap()
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

fn scratch(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("titan-hftrain-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

fn sample() -> (String, Vec<u32>, usize) {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tokenizer/sample_ids.json")).unwrap(),
    )
    .unwrap();
    let ids = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    (
        v["text"].as_str().unwrap().to_string(),
        ids,
        v["vocab_size"].as_u64().unwrap() as usize,
    )
}

#[test]
fn fixture_tokenizer_drives_a_text_dataset() {
    let (text, ids, vocab) = sample();
    let tok = load_tokenizer(Some(&fixture("tokenizer"))).unwrap();
    assert_eq!(
        tok.encode(&text).unwrap(),
        ids,
        "tokenizers (Python) vs titan encode"
    );
    assert_eq!(tok.vocab_size(), vocab);
    let cfg = DataConfig {
        dataset: "text".into(),
        dataset_path: Some(fixture("tokenizer/sample.txt")),
        tokenizer: Some(fixture("tokenizer")),
        seq_len: 7,
        batch: 2,
        progress: false,
        ..DataConfig::default()
    };
    let mut loader = build_loader(&cfg).unwrap();
    assert_eq!(loader.vocab_size(), Some(vocab));
    let b = loader.next_batch().unwrap();
    let mut stream = vec![tok.bos_id()];
    stream.extend(&ids);
    stream.push(tok.eos_id());
    let got: Vec<u32> = b.inputs[..7].iter().map(|&x| x as u32).collect();
    assert_eq!(got, stream[..7], "first sequence = <bos> + the text's ids");
    let labels: Vec<u32> = b.labels[..7].iter().map(|&x| x as u32).collect();
    assert_eq!(labels, stream[1..8]);
}

fn overrides(dump: &Path, extra: &[&str]) -> Vec<String> {
    let mut o: Vec<String> = [
        "--training.device",
        "cpu",
        "--training.dataset_path",
        fixture("tokenizer/sample.txt").to_str().unwrap(),
        "--model.hf_assets_path",
        fixture("tokenizer").to_str().unwrap(),
        "--training.seq_len",
        "8",
        "--training.local_batch_size",
        "2",
        "--training.steps",
        "2",
        "--lr_scheduler.warmup_steps",
        "1",
        "--metrics.log_freq",
        "1",
        "--job.dump_folder",
        dump.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    o.extend(extra.iter().map(|s| s.to_string()));
    o
}

#[test]
fn trains_from_hf_weights_and_exports_hf_at_the_end() {
    let dump = scratch("from-hf");
    let src = fixture("mha_tied");
    let cfg = JobConfig::load(
        None,
        &overrides(
            &dump,
            &[
                "--checkpoint.initial_load_path",
                src.to_str().unwrap(),
                "--checkpoint.initial_load_in_hf",
                "--checkpoint.last_save_in_hf",
            ],
        ),
    )
    .unwrap();
    let mut tr = Trainer::new(cfg, &titan::registry()).unwrap();
    let mut want = llama3_config_from_hf(&src.join(HF_CONFIG)).unwrap();
    want.max_seq_len = 8;
    assert_eq!(*llama(&tr), want, "the architecture comes from config.json");
    assert_eq!(tr.maybe_resume().unwrap(), None);
    // The weights are the checkpoint's, not the random init.
    let ck = HfCheckpoint::open(&src).unwrap();
    let adapter = Llama3StateDictAdapter::new(llama(&tr));
    for id in tr.store.ids() {
        let hf = adapter.to_hf(tr.store.name(id)).unwrap();
        let want = ck.get(&hf).unwrap().to_f32().unwrap();
        let got = tr
            .store
            .read_f32(tr.be.as_ref(), tr.store.master(id))
            .unwrap();
        assert!(got == want, "{hf} was not loaded");
    }
    let hist = tr.fit(true).unwrap();
    assert!(hist.iter().all(|m| m.loss.is_finite()));
    let out = dump.join("checkpoint/hf-step-2");
    assert_eq!(
        llama3_config_from_hf(&out.join(HF_CONFIG)).unwrap(),
        llama3_config_from_hf(&src.join(HF_CONFIG)).unwrap()
    );
    let exported = HfCheckpoint::open(&out).unwrap();
    assert_eq!(
        exported.names().collect::<Vec<_>>(),
        ck.names().collect::<Vec<_>>()
    );
    let a = exported
        .get("model.embed_tokens.weight")
        .unwrap()
        .to_f32()
        .unwrap();
    let b = ck
        .get("model.embed_tokens.weight")
        .unwrap()
        .to_f32()
        .unwrap();
    assert!(a != b, "two AdamW steps changed the embedding");
    let _ = std::fs::remove_dir_all(dump);
}

#[test]
fn resumes_from_a_converted_checkpoint() {
    let dump = scratch("resume-converted");
    hf_to_titan(&fixture("mha_tied"), &dump.join("checkpoint")).unwrap();
    let cfg = JobConfig::load(None, &overrides(&dump, &["--checkpoint.enable"])).unwrap();
    let mut tr = Trainer::new(cfg, &titan::registry()).unwrap();
    assert_eq!(
        llama(&tr).dim,
        40,
        "architecture from the converted manifest"
    );
    assert_eq!(tr.maybe_resume().unwrap(), Some(0));
    let ck = HfCheckpoint::open(&fixture("mha_tied")).unwrap();
    let id = tr.store.find("layers.1.attention.wk.weight").unwrap();
    let got = tr
        .store
        .read_f32(tr.be.as_ref(), tr.store.master(id))
        .unwrap();
    let want = ck
        .get("model.layers.1.self_attn.k_proj.weight")
        .unwrap()
        .to_f32()
        .unwrap();
    assert!(got == want);
    tr.fit(true).unwrap();
    assert!(dump.join("checkpoint/step-2/manifest.json").is_file());
    let _ = std::fs::remove_dir_all(dump);
}

#[test]
fn initial_load_from_a_titan_step_folder() {
    let dump = scratch("initial-titan");
    let conv = dump.join("converted");
    let step0 = hf_to_titan(&fixture("llama3_scaled_mqa"), &conv).unwrap();
    let cfg = JobConfig::load(
        None,
        &overrides(
            &dump,
            &["--checkpoint.initial_load_path", step0.to_str().unwrap()],
        ),
    )
    .unwrap();
    let mut tr = Trainer::new(cfg, &titan::registry()).unwrap();
    assert_eq!(
        llama(&tr).n_kv_heads,
        Some(1),
        "architecture from the step folder"
    );
    assert!(llama(&tr).rope_scaling.is_some());
    assert_eq!(tr.maybe_resume().unwrap(), None);
    let ck = HfCheckpoint::open(&fixture("llama3_scaled_mqa")).unwrap();
    let id = tr.store.find("output.weight").unwrap();
    let got = tr
        .store
        .read_f32(tr.be.as_ref(), tr.store.master(id))
        .unwrap();
    assert!(got == ck.get("lm_head.weight").unwrap().to_f32().unwrap());
    let _ = std::fs::remove_dir_all(dump);
}

#[test]
fn initial_load_in_hf_without_a_path_is_a_config_error() {
    let dump = scratch("no-path");
    let cfg = JobConfig::load(
        None,
        &overrides(&dump, &["--checkpoint.initial_load_in_hf"]),
    )
    .unwrap();
    let e = Trainer::new(cfg, &titan::registry())
        .err()
        .expect("missing initial_load_path")
        .to_string();
    assert!(e.contains("initial_load_path"), "{e}");
    let _ = std::fs::remove_dir_all(dump);
}

/// The `titan` binary: convert both ways, then `eval --hf-checkpoint` prints transformers' loss.
#[test]
fn cli_convert_and_eval_hf() {
    let bin = env!("CARGO_BIN_EXE_titan");
    let tmp = scratch("cli");
    let src = fixture("gqa_untied_sharded");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        (out.status.success(), text, err)
    };
    let (s, t, ck) = (src.to_str().unwrap(), tmp.join("ck"), tmp.join("hf"));
    let ok = run(&[
        "convert",
        "--from",
        "hf",
        s,
        "--to",
        "titan",
        t.to_str().unwrap(),
    ]);
    assert!(ok.0, "{}", ok.2);
    // Small work shows no progress: the one-line result is all the output.
    assert_eq!((ok.1.lines().count(), ok.2.as_str()), (1, ""), "{}", ok.1);
    let args = [
        "convert",
        "--from",
        "titan",
        t.to_str().unwrap(),
        "--to",
        "hf",
    ];
    let ok = run(&[&args[..], &[ck.to_str().unwrap(), "--dtype", "bfloat16"]].concat());
    assert!(ok.0, "{}", ok.2);
    assert_eq!((ok.1.lines().count(), ok.2.as_str()), (1, ""), "{}", ok.1);
    assert!(ck.join("config.json").is_file() && ck.join("model.safetensors").is_file());
    let tokens = src.join("inputs.json");
    let dump = tmp.join("logits.safetensors");
    let (ok, out, err) = run(&[
        "eval",
        "--hf-checkpoint",
        s,
        "--tokens",
        tokens.to_str().unwrap(),
        "--device",
        "cpu",
        "--dump-logits",
        dump.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["tokens"], 16);
    assert!(
        (v["loss"].as_f64().unwrap() - 4.770066).abs() < 1e-5,
        "{out}"
    );
    let bytes = std::fs::read(&dump).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("logits").unwrap().shape(), &[2, 9, 71]);
    // Bad usage is an error, not a panic.
    let (ok, _, err) = run(&["convert", "--from", "gguf", s, "--to", "titan", "x"]);
    assert!(!ok && err.contains("--from hf --to titan"), "{err}");
    let _ = std::fs::remove_dir_all(tmp);
}
