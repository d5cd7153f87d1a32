//! Hugging Face interop against tests/fixtures/hf (written by scripts/make_hf_fixtures.py):
//! logits, loss and every parameter gradient of tiny transformers Llama models versus a float64
//! reference, round trips HF -> titan -> HF, training from and exporting to HF checkpoints.

use std::path::{Path, PathBuf};
use titan::backend::cpu::CpuBackend;
use titan::checkpoint::hf_folder::HfCheckpoint;
use titan::cli::eval::HfEval;
use titan::llama3::model::state_dict_adapter::{llama3_config_from_hf, Llama3StateDictAdapter};
use titan::model::resolve::hf_folder_args;
use titan::model::state_dict::load_hf;
use titan::model::StateDictAdapter;
use titan::model::IGNORE_INDEX;
use titan::params::{ParamStore, ParamStoreBuilder};
use titan::tape::{Placement, Tape};
use titan::tensor::DType;

fn hf_to_titan(src: &Path, dst: &Path) -> titan::Result<PathBuf> {
    titan::cli::convert::hf_to_titan(&titan::registry(), src, dst)
}

fn titan_to_hf(
    src: &Path,
    step: Option<u64>,
    dst: &Path,
    dtype: &str,
    shard: usize,
) -> titan::Result<()> {
    titan::cli::convert::titan_to_hf(&titan::registry(), src, step, dst, dtype, shard)
}

fn eval_hf(
    dir: &Path,
    tokens: &Path,
    seq: Option<usize>,
    logits: bool,
    dev: &str,
) -> titan::Result<HfEval> {
    titan::cli::eval::eval_hf(&titan::registry(), dir, tokens, seq, logits, dev)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// A fresh, empty scratch folder.
fn scratch(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("titan-hf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Every tensor of reference.safetensors, widened to f64.
fn reference(name: &str) -> std::collections::HashMap<String, Vec<f64>> {
    let bytes = std::fs::read(fixture(name).join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let d = v.data();
            let vals: Vec<f64> = match v.dtype() {
                safetensors::Dtype::F64 => d
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("reference dtype {other:?}"),
            };
            (n, vals)
        })
        .collect()
}

fn inputs(name: &str) -> Vec<Vec<i32>> {
    let text = std::fs::read_to_string(fixture(name).join("inputs.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    assert!(got.iter().all(|x| x.is_finite()), "non-finite output");
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

/// Loads a fixture (any registered model, chosen by its config.json) into the CPU backend and
/// checks logits, loss and (when the reference has them) every gradient.
fn check_parity(name: &str) {
    let dir = fixture(name);
    let ids = inputs(name);
    let (b, s) = (ids.len(), ids[0].len());
    let (spec, mut c) = hf_folder_args(&titan::registry(), &dir).unwrap();
    c.update_from_config(s, None).unwrap();
    let be = CpuBackend::new();
    let mut pb = ParamStoreBuilder::default();
    let model = (spec.build)(c.as_ref(), &mut pb).unwrap();
    let store = ParamStore::materialize(pb, &be, DType::F32).unwrap();
    // Poison: a parameter the loader misses stays NaN and fails every comparison.
    for id in store.ids() {
        store
            .set(&be, id, &vec![f32::NAN; store.numel(id)])
            .unwrap();
    }
    let adapter = (spec.state_dict_adapter)(c.as_ref()).unwrap();
    load_hf(
        adapter.as_ref(),
        &HfCheckpoint::open(&dir).unwrap(),
        &store,
        &be,
    )
    .unwrap();
    store.zero_grads(&be).unwrap();

    let flat: Vec<i32> = ids.concat();
    let mut labels = Vec::with_capacity(b * s);
    for row in &ids {
        labels.extend_from_slice(&row[1..]);
        labels.push(IGNORE_INDEX);
    }
    let count = b * (s - 1);
    let r = reference(name);
    let mut tape = Tape::new(&be, &store, Placement::Owned);
    let ti = tape.input_i32(&flat, [b, s]).unwrap();
    let tl = tape.input_i32(&labels, [b * s]).unwrap();
    let logits = model.forward(&mut tape, ti).unwrap();
    let got_logits = tape.to_vec_f32(logits).unwrap();
    let e = rel_l2(&got_logits, &r["logits"]);
    eprintln!("{name}: logits rel L2 {e:.3e}");
    assert!(e < 1e-5, "{name}: logits rel L2 {e:.3e}");
    let v = c.vocab_size();
    let fl = tape.reshape(logits, [b * s, v]).unwrap();
    let loss = tape
        .cross_entropy(fl, tl, IGNORE_INDEX, 1.0 / count as f32)
        .unwrap();
    let got_loss = tape.to_vec_f32(loss).unwrap()[0] as f64 / count as f64;
    let want_loss = r["loss"][0];
    let e = (got_loss - want_loss).abs() / want_loss.abs();
    assert!(
        e < 1e-5,
        "{name}: loss {got_loss} vs {want_loss} (rel {e:.3e})"
    );

    tape.backward(loss).unwrap();
    let grads: Vec<_> = r.keys().filter(|k| k.starts_with("grad.")).collect();
    if grads.is_empty() {
        return;
    }
    assert_eq!(
        grads.len(),
        store.len(),
        "{name}: one reference gradient per parameter"
    );
    let mut worst = 0f64;
    for id in store.ids() {
        let hf = adapter.to_hf(store.name(id)).unwrap();
        let want = &r[&format!("grad.{hf}")];
        let got = store.read_f32(&be, store.grad(id)).unwrap();
        let e = rel_l2(&got, want);
        assert!(e < 1e-4, "{name}: gradient of {hf} rel L2 {e:.3e}");
        worst = worst.max(e);
    }
    eprintln!(
        "{name}: loss rel {:.3e}, worst gradient rel L2 {worst:.3e}",
        (got_loss - want_loss).abs() / want_loss
    );
}

#[test]
fn mha_tied_matches_float64_reference() {
    check_parity("mha_tied");
}

#[test]
fn gqa_untied_sharded_matches_float64_reference() {
    check_parity("gqa_untied_sharded");
}

#[test]
fn llama3_rope_scaling_mqa_matches_float64_reference() {
    check_parity("llama3_scaled_mqa");
}

#[test]
fn bf16_checkpoint_matches_float64_reference() {
    check_parity("bf16_gqa");
}

#[test]
fn qwen3_tied_gqa_matches_float64_reference() {
    check_parity("qwen3_gqa_tied");
}

#[test]
fn qwen3_untied_sharded_matches_float64_reference() {
    check_parity("qwen3_untied_sharded");
}

#[test]
fn eval_hf_reports_transformers_loss_and_logits() {
    for name in ["mha_tied", "llama3_scaled_mqa", "qwen3_gqa_tied"] {
        let r = eval_hf(
            &fixture(name),
            &fixture(name).join("inputs.json"),
            None,
            true,
            "cpu",
        )
        .unwrap();
        let want = reference(name);
        let e = (r.loss - want["loss"][0]).abs() / want["loss"][0];
        assert!(
            e < 1e-5,
            "{name}: eval loss {} vs {}",
            r.loss,
            want["loss"][0]
        );
        let ids = inputs(name);
        assert_eq!(r.tokens, ids.len() * (ids[0].len() - 1));
        let (shape, logits) = r.logits.unwrap();
        assert_eq!(
            shape,
            vec![
                ids.len(),
                ids[0].len(),
                want["logits"].len() / ids.len() / ids[0].len()
            ]
        );
        assert!(rel_l2(&logits, &want["logits"]) < 1e-5);
    }
}

/// Every tensor of a Hugging Face folder: name -> (dtype, shape, bytes).
fn tensors_of(dir: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let ck = HfCheckpoint::open(dir).unwrap();
    ck.names()
        .map(|n| {
            let t = ck.get(n).unwrap();
            (
                n.to_string(),
                format!("{:?}", t.dtype),
                t.shape.to_vec(),
                t.bytes.to_vec(),
            )
        })
        .collect()
}

fn round_trip(name: &str, dtype: &str, shard_bytes: usize) -> PathBuf {
    let tmp = scratch(&format!("rt-{name}"));
    hf_to_titan(&fixture(name), &tmp.join("titan")).unwrap();
    let out = tmp.join("hf");
    titan_to_hf(&tmp.join("titan"), None, &out, dtype, shard_bytes).unwrap();
    let a = tensors_of(&fixture(name));
    let b = tensors_of(&out);
    assert_eq!(a.len(), b.len(), "{name}: tensor count");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.0, &x.1, &x.2), (&y.0, &y.1, &y.2), "{name}");
        assert!(
            x.3 == y.3,
            "{name}: tensor {} differs after the round trip",
            x.0
        );
    }
    let reg = titan::registry();
    let (s0, c0) = hf_folder_args(&reg, &fixture(name)).unwrap();
    let (s1, c1) = hf_folder_args(&reg, &out).unwrap();
    assert_eq!(s0.name, s1.name, "{name}: model_type round trip");
    assert_eq!(c0.to_json(), c1.to_json(), "{name}: config.json round trip");
    tmp
}

#[test]
fn round_trip_is_byte_identical() {
    let t = round_trip("mha_tied", "float32", 0);
    assert!(!t.join("hf/model.safetensors.index.json").exists());
    let _ = std::fs::remove_dir_all(t);
    let t = round_trip("llama3_scaled_mqa", "float32", 0);
    let _ = std::fs::remove_dir_all(t);
    let t = round_trip("bf16_gqa", "bfloat16", 0);
    let _ = std::fs::remove_dir_all(t);
    // A 30 kB cap splits the export into several shards plus an index.
    let t = round_trip("gqa_untied_sharded", "float32", 30_000);
    let index = std::fs::read_to_string(t.join("hf/model.safetensors.index.json")).unwrap();
    assert!(index.contains("model-00002-of-"), "{index}");
    for e in std::fs::read_dir(t.join("hf")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let n = std::fs::metadata(&p).unwrap().len();
            assert!(n < 30_000 + 4096, "{} is {n} bytes", p.display());
        }
    }
    let _ = std::fs::remove_dir_all(t);
}

#[test]
fn qwen3_round_trip_is_byte_identical() {
    // Tied: the export holds no lm_head.weight, exactly as save_pretrained wrote the fixture.
    let t = round_trip("qwen3_gqa_tied", "float32", 0);
    let names: Vec<String> = tensors_of(&t.join("hf")).into_iter().map(|x| x.0).collect();
    assert!(!names.iter().any(|n| n == "lm_head.weight"), "{names:?}");
    assert!(names
        .iter()
        .any(|n| n == "model.layers.1.self_attn.k_norm.weight"));
    let _ = std::fs::remove_dir_all(t);
    let t = round_trip("qwen3_untied_sharded", "float32", 40_000);
    assert!(t.join("hf/model.safetensors.index.json").is_file());
    let _ = std::fs::remove_dir_all(t);
}

#[test]
fn converted_checkpoint_evaluates_like_the_hf_model() {
    let tmp = scratch("eval-titan");
    let root = tmp.join("ck");
    hf_to_titan(&fixture("gqa_untied_sharded"), &root).unwrap();
    assert!(root.join("step-0/manifest.json").is_file());
    let tokens = fixture("gqa_untied_sharded").join("inputs.json");
    titan::cli::eval::eval(&titan::registry(), &root, None, &tokens, None, "cpu").unwrap();
    let _ = std::fs::remove_dir_all(tmp);
}

#[test]
fn tied_export_has_no_lm_head_and_untied_has_one() {
    let a = Llama3StateDictAdapter {
        n_layers: 2,
        tie_embeddings: true,
    };
    assert_eq!(a.to_titan("lm_head.weight").unwrap(), None);
    assert_eq!(
        a.to_titan("model.layers.1.self_attn.rotary_emb.inv_freq")
            .unwrap(),
        None
    );
    assert_eq!(
        a.to_titan("model.layers.1.mlp.up_proj.weight")
            .unwrap()
            .as_deref(),
        Some("layers.1.feed_forward.w3.weight")
    );
    assert!(a.to_titan("model.layers.2.mlp.up_proj.weight").is_err());
    assert!(a.to_titan("model.layers.0.self_attn.q_proj.bias").is_err());
    let u = Llama3StateDictAdapter {
        n_layers: 2,
        tie_embeddings: false,
    };
    assert_eq!(
        u.to_titan("lm_head.weight").unwrap().as_deref(),
        Some("output.weight")
    );
    let names = tensors_of(&fixture("mha_tied"));
    assert!(names.iter().all(|t| t.0 != "lm_head.weight"));
}

/// Every flavor survives config.json export and re-import (same shapes, rotary frequencies and
/// parameter count; the exact `intermediate_size` path is taken on import).
#[test]
fn flavors_round_trip_through_config_json() {
    use titan::llama3::{flavor, model::state_dict_adapter::hf_config_from_llama3};
    let tmp = scratch("flavor-configs");
    for f in [
        "debugmodel",
        "debugmodel_gqa",
        "1B",
        "3B",
        "8B",
        "70B",
        "405B",
    ] {
        let c = flavor(f).unwrap();
        let p = tmp.join(format!("{f}.json"));
        std::fs::write(&p, hf_config_from_llama3(&c, "bfloat16").to_string()).unwrap();
        let back = llama3_config_from_hf(&p).unwrap();
        assert_eq!(back.ffn_hidden_override, Some(c.ffn_hidden()), "{f}");
        assert_eq!(back.num_params(), c.num_params(), "{f}");
        assert_eq!(back.rope_freqs(), c.rope_freqs(), "{f}");
        assert_eq!(
            (back.kv_heads(), back.tie_embeddings),
            (c.kv_heads(), c.tie_embeddings)
        );
    }
    let _ = std::fs::remove_dir_all(tmp);
}

/// The published Llama 3.2 1B config.json (transformers 4 spelling) is the 1B flavor.
#[test]
fn llama_3_2_1b_config_matches_the_flavor() {
    let tmp = scratch("l32-config");
    let p = tmp.join("config.json");
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "max_position_embeddings": 131072, "tie_word_embeddings": true,
        "attention_bias": false, "mlp_bias": false, "torch_dtype": "bfloat16"
    });
    std::fs::write(&p, cfg.to_string()).unwrap();
    let c = llama3_config_from_hf(&p).unwrap();
    let f = titan::llama3::flavor("1B").unwrap();
    assert_eq!(c.num_params(), 1_235_814_400);
    assert_eq!(c.rope_freqs(), f.rope_freqs());
    assert_eq!(
        (c.norm_eps, c.max_position_embeddings),
        (f.norm_eps, f.max_position_embeddings)
    );
    let _ = std::fs::remove_dir_all(tmp);
}

/// float16 checkpoints: an f16 export of the f32 fixture reads back as the f16-rounded weights,
/// and round-trips HF(f16) -> titan -> HF(f16) byte for byte.
#[test]
fn float16_checkpoints_load_and_round_trip() {
    let tmp = scratch("f16");
    hf_to_titan(&fixture("gqa_untied_sharded"), &tmp.join("a")).unwrap();
    titan_to_hf(&tmp.join("a"), Some(0), &tmp.join("f16"), "float16", 0).unwrap();
    let src = HfCheckpoint::open(&fixture("gqa_untied_sharded")).unwrap();
    let f16 = HfCheckpoint::open(&tmp.join("f16")).unwrap();
    for n in src.names() {
        let t = f16.get(n).unwrap();
        assert_eq!(t.dtype, safetensors::Dtype::F16, "{n}");
        let want: Vec<f32> = src
            .get(n)
            .unwrap()
            .to_f32()
            .unwrap()
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect();
        assert!(t.to_f32().unwrap() == want, "{n}");
    }
    hf_to_titan(&tmp.join("f16"), &tmp.join("b")).unwrap();
    titan_to_hf(&tmp.join("b"), None, &tmp.join("f16b"), "float16", 0).unwrap();
    assert!(tensors_of(&tmp.join("f16")) == tensors_of(&tmp.join("f16b")));
    let _ = std::fs::remove_dir_all(tmp);
}
