//! Broken Hugging Face checkpoints and configs: each must fail with an error naming the file
//! and the tensor (or config field) at fault, never a panic or a silent partial load.

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::{Path, PathBuf};
use titan::checkpoint::hf_folder::{HfCheckpoint, HF_CONFIG, HF_INDEX, HF_SINGLE};
use titan::error::Error;
use titan::llama3::model::state_dict_adapter::llama3_config_from_hf;

fn hf_to_titan(src: &Path, dst: &Path) -> titan::Result<PathBuf> {
    titan::cli::convert::hf_to_titan(&titan::registry(), src, dst)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// A scratch copy of a fixture folder.
fn copy_of(name: &str, tag: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("titan-hfbad-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dst.join(p.file_name().unwrap())).unwrap();
    }
    dst
}

/// The conversion error of `dir` (the model config is read from it too).
fn convert_err(dir: &Path) -> String {
    let out = dir.join("out");
    match hf_to_titan(dir, &out) {
        Ok(_) => panic!("{}: conversion unexpectedly succeeded", dir.display()),
        Err(e) => {
            let _ = std::fs::remove_dir_all(dir);
            e.to_string()
        }
    }
}

fn assert_has(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

/// Rewrites model.safetensors of `dir` with `edit` applied to its (name, dtype, shape, bytes).
fn rewrite(dir: &Path, edit: impl Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join(HF_SINGLE);
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut ts);
    let views: Vec<_> = ts
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

#[test]
fn missing_shard_names_index_tensor_and_file() {
    let d = copy_of("gqa_untied_sharded", "missing-shard");
    std::fs::remove_file(d.join("model-00002-of-00004.safetensors")).unwrap();
    let e = convert_err(&d);
    assert_has(
        &e,
        &[
            HF_INDEX,
            "model-00002-of-00004.safetensors",
            "model.layers.",
        ],
    );
}

#[test]
fn index_naming_a_missing_file_or_wrong_file_is_refused() {
    let d = copy_of("gqa_untied_sharded", "bad-index");
    let p = d.join(HF_INDEX);
    let text = std::fs::read_to_string(&p).unwrap();
    let text = text.replacen(
        "\"model.norm.weight\": \"model-0000",
        "\"model.norm.weight\": \"model-9999",
        1,
    );
    assert!(text.contains("model-9999"), "fixture index changed shape");
    std::fs::write(&p, text).unwrap();
    let e = convert_err(&d);
    assert_has(&e, &[HF_INDEX, "model.norm.weight", "does not exist"]);

    // A tensor assigned to a shard that does not hold it.
    let d = copy_of("gqa_untied_sharded", "wrong-file");
    let p = d.join(HF_INDEX);
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let map = v["weight_map"].as_object().unwrap();
    let emb_file = map["model.embed_tokens.weight"]
        .as_str()
        .unwrap()
        .to_string();
    let other = map
        .iter()
        .find(|(_, f)| f.as_str() != Some(&emb_file))
        .map(|(_, f)| f.as_str().unwrap().to_string())
        .unwrap();
    let mut v2 = v.clone();
    v2["weight_map"]["model.embed_tokens.weight"] = other.clone().into();
    std::fs::write(&p, serde_json::to_string(&v2).unwrap()).unwrap();
    let e = convert_err(&d);
    assert_has(
        &e,
        &[&other, "model.embed_tokens.weight", "does not hold it"],
    );
}

#[test]
fn wrong_shape_names_file_and_tensor() {
    let d = copy_of("llama3_scaled_mqa", "shape");
    rewrite(&d, |ts| {
        let t = ts
            .iter_mut()
            .find(|t| t.0 == "model.layers.1.mlp.down_proj.weight")
            .unwrap();
        t.2.reverse(); // [dim, ffn] -> [ffn, dim]: same bytes, transposed shape
    });
    let e = convert_err(&d);
    assert_has(
        &e,
        &[
            HF_SINGLE,
            "model.layers.1.mlp.down_proj.weight",
            "[50, 40]",
            "[40, 50]",
        ],
    );
}

#[test]
fn unsupported_dtype_names_file_and_tensor() {
    let d = copy_of("llama3_scaled_mqa", "dtype");
    rewrite(&d, |ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        t.1 = Dtype::I32; // same byte size as F32
    });
    let e = convert_err(&d);
    assert_has(&e, &[HF_SINGLE, "model.norm.weight", "I32"]);
}

#[test]
fn missing_and_unknown_tensors_are_named() {
    let d = copy_of("llama3_scaled_mqa", "missing-tensor");
    rewrite(&d, |ts| {
        ts.retain(|t| t.0 != "model.layers.0.input_layernorm.weight")
    });
    let e = convert_err(&d);
    assert_has(
        &e,
        &[
            "missing tensor model.layers.0.input_layernorm.weight",
            "attention_norm",
        ],
    );

    let d = copy_of("llama3_scaled_mqa", "extra-tensor");
    rewrite(&d, |ts| {
        ts.push((
            "model.layers.0.self_attn.q_proj.bias".into(),
            Dtype::F32,
            vec![40],
            vec![0; 160],
        ))
    });
    let e = convert_err(&d);
    assert_has(&e, &["model.layers.0.self_attn.q_proj.bias"]);
}

#[test]
fn truncated_files_are_named() {
    // Cut inside the JSON header.
    let d = copy_of("llama3_scaled_mqa", "trunc-header");
    let p = d.join(HF_SINGLE);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..100]).unwrap();
    let e = HfCheckpoint::open(&d)
        .err()
        .expect("truncated header")
        .to_string();
    assert_has(&e, &[HF_SINGLE, "truncated safetensors header"]);
    // Shorter than the 8-byte length field.
    std::fs::write(&p, &bytes[..5]).unwrap();
    let e = HfCheckpoint::open(&d)
        .err()
        .expect("5-byte file")
        .to_string();
    assert_has(&e, &[HF_SINGLE, "truncated"]);
    // Cut inside the tensor data.
    std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
    let e = convert_err(&d);
    assert_has(&e, &[HF_SINGLE, "truncated"]);
}

#[test]
fn empty_folder_is_not_a_checkpoint() {
    let d = std::env::temp_dir().join(format!("titan-hfbad-empty-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let e = HfCheckpoint::open(&d)
        .err()
        .expect("empty folder")
        .to_string();
    assert_has(&e, &[HF_SINGLE, HF_INDEX]);
    let _ = std::fs::remove_dir_all(&d);
}

/// config.json edits that must be refused, with the field named.
#[test]
fn unsupported_configs_name_file_and_field() {
    let cases: [(&str, serde_json::Value, &str); 6] = [
        ("attention_bias", true.into(), "attention_bias"),
        ("mlp_bias", true.into(), "mlp_bias"),
        ("hidden_act", "gelu".into(), "hidden_act"),
        ("head_dim", 16.into(), "head_dim"),
        (
            "rope_scaling",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
            "rope_scaling.rope_type",
        ),
        (
            "intermediate_size",
            serde_json::Value::Null,
            "intermediate_size",
        ),
    ];
    for (i, (key, value, field)) in cases.into_iter().enumerate() {
        let d = copy_of("llama3_scaled_mqa", &format!("cfg{i}"));
        let p = d.join(HF_CONFIG);
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v[key] = value;
        std::fs::write(&p, v.to_string()).unwrap();
        let e = llama3_config_from_hf(&p).expect_err(key);
        assert!(matches!(e, Error::Config(_)), "{key}: {e}");
        assert_has(&e.to_string(), &[HF_CONFIG, field]);
        let _ = std::fs::remove_dir_all(&d);
    }
}
