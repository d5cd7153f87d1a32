//! Llama 3 <-> Hugging Face `LlamaForCausalLM`: parameter names and config.json.
//!
//! | titan                                   | Hugging Face                                    |
//! |-----------------------------------------|-------------------------------------------------|
//! | tok_embeddings.weight                   | model.embed_tokens.weight                       |
//! | layers.N.attention.w{q,k,v,o}.weight    | model.layers.N.self_attn.{q,k,v,o}_proj.weight  |
//! | layers.N.feed_forward.w1 / w3 / w2      | model.layers.N.mlp.gate_proj / up_proj / down_proj |
//! | layers.N.attention_norm.weight          | model.layers.N.input_layernorm.weight           |
//! | layers.N.ffn_norm.weight                | model.layers.N.post_attention_layernorm.weight  |
//! | norm.weight                             | model.norm.weight                               |
//! | output.weight (absent when tied)        | lm_head.weight (absent or ignored when tied)    |
//!
//! Tensors are copied as they are: no q/k permutation. Meta's original Llama checkpoints pair
//! rotary dims as interleaved (2i, 2i+1) and Hugging Face's conversion script permutes wq/wk rows
//! so that its `rotate_half` can pair (i, i + head_dim/2) instead; torchtitan's HF adapter undoes
//! that permutation because torchtitan rotates interleaved pairs. titan's rope kernels
//! (engine/backend/cpu/rope.rs and its CUDA twin) use the half-split pairing of `rotate_half`
//! themselves, with frequency i shared by dims i and i + head_dim/2 exactly as in transformers'
//! `cat((freqs, freqs))` tables, so an HF q/k row ordering is already titan's ordering. The
//! tests/hf_interop.rs logits parity (rel. L2 < 1e-5 against a float64 reference checked against
//! transformers) would fail by O(1) if the pairing differed. Rotary `inv_freq` buffers that old
//! checkpoints carry are ignored: titan recomputes the tables from the config.

use super::config::{Llama3Config, RopeScaling};
use crate::error::{Error, Result};
use crate::models::state_dict::StateDictAdapter;
use serde_json::{json, Value};
use std::path::Path;

pub struct Llama3StateDictAdapter {
    pub n_layers: usize,
    pub tie_embeddings: bool,
}

impl Llama3StateDictAdapter {
    pub fn new(c: &Llama3Config) -> Self {
        Llama3StateDictAdapter {
            n_layers: c.n_layers,
            tie_embeddings: c.tie_embeddings,
        }
    }
}

/// (titan suffix, HF suffix) inside one layer.
const LAYER_MAP: [(&str, &str); 9] = [
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
];

/// "3.rest" -> (3, "rest").
fn split_layer(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

impl StateDictAdapter for Llama3StateDictAdapter {
    fn to_hf(&self, titan: &str) -> Result<String> {
        let direct = match titan {
            "tok_embeddings.weight" => Some("model.embed_tokens.weight"),
            "norm.weight" => Some("model.norm.weight"),
            "output.weight" => Some("lm_head.weight"),
            _ => None,
        };
        if let Some(d) = direct {
            return Ok(d.to_string());
        }
        let mapped = titan
            .strip_prefix("layers.")
            .and_then(split_layer)
            .and_then(|(n, rest)| {
                let (_, hf) = LAYER_MAP.iter().find(|(t, _)| *t == rest)?;
                Some(format!("model.layers.{n}.{hf}"))
            });
        mapped.ok_or_else(|| {
            Error::Checkpoint(format!(
                "llama3: parameter {titan} has no Hugging Face name"
            ))
        })
    }

    fn to_titan(&self, hf: &str) -> Result<Option<String>> {
        let unknown = || {
            Error::Checkpoint(format!(
                "llama3: Hugging Face tensor {hf} has no counterpart in titan's Llama 3"
            ))
        };
        match hf {
            "model.embed_tokens.weight" => return Ok(Some("tok_embeddings.weight".into())),
            "model.norm.weight" => return Ok(Some("norm.weight".into())),
            // Tied checkpoints may still carry the (identical) head; the embedding is used.
            "lm_head.weight" if self.tie_embeddings => return Ok(None),
            "lm_head.weight" => return Ok(Some("output.weight".into())),
            _ => {}
        }
        let (n, rest) = hf
            .strip_prefix("model.layers.")
            .and_then(split_layer)
            .ok_or_else(unknown)?;
        if rest == "self_attn.rotary_emb.inv_freq" {
            return Ok(None);
        }
        if n >= self.n_layers {
            return Err(Error::Checkpoint(format!(
                "llama3: tensor {hf} is for layer {n}, the model has {} layers",
                self.n_layers
            )));
        }
        let (titan, _) = LAYER_MAP
            .iter()
            .find(|(_, h)| *h == rest)
            .ok_or_else(unknown)?;
        Ok(Some(format!("layers.{n}.{titan}")))
    }
}

/// Reads a Hugging Face Llama `config.json` into a `Llama3Config` (max_seq_len is left at
/// min(2048, max_position_embeddings); the caller sets the training or eval length). Both the
/// transformers 4 spelling (top-level `rope_theta`, `rope_scaling`) and the transformers 5 one
/// (`rope_parameters` holding both) are accepted. Unsupported architectures are refused.
pub fn llama3_config_from_hf(path: &Path) -> Result<Llama3Config> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: not valid JSON ({e})", path.display())))?;
    let bad = |field: &str, why: String| {
        Error::Config(format!("{}: field {field}: {why}", path.display()))
    };
    let get = |k: &str| v.get(k).filter(|x| !x.is_null());
    let uint = |k: &str| -> Result<usize> {
        let x = get(k).ok_or_else(|| bad(k, "missing".into()))?;
        x.as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| bad(k, format!("{x} is not a positive integer")))
    };
    let float = |k: &str, x: &Value| -> Result<f64> {
        x.as_f64()
            .ok_or_else(|| bad(k, format!("{x} is not a number")))
    };
    if let Some(t) = get("model_type") {
        if t.as_str() != Some("llama") {
            return Err(bad(
                "model_type",
                format!("{t} is not supported (only \"llama\")"),
            ));
        }
    }
    for k in ["attention_bias", "mlp_bias"] {
        if get(k).and_then(Value::as_bool) == Some(true) {
            return Err(bad(
                k,
                "true is not supported (titan's Llama has no biases)".into(),
            ));
        }
    }
    if let Some(a) = get("hidden_act") {
        if a.as_str() != Some("silu") {
            return Err(bad(
                "hidden_act",
                format!("{a} is not supported (only \"silu\")"),
            ));
        }
    }
    let dim = uint("hidden_size")?;
    let n_heads = uint("num_attention_heads")?;
    let kv = match get("num_key_value_heads") {
        Some(_) => uint("num_key_value_heads")?,
        None => n_heads,
    };
    if let Some(hd) = get("head_dim") {
        if hd.as_u64() != Some((dim / n_heads) as u64) || !dim.is_multiple_of(n_heads) {
            return Err(bad(
                "head_dim",
                format!("{hd} must equal hidden_size / num_attention_heads = {dim}/{n_heads}"),
            ));
        }
    }
    let params = get("rope_parameters");
    let theta_field = if get("rope_theta").is_some() {
        ("rope_theta", get("rope_theta"))
    } else {
        (
            "rope_parameters.rope_theta",
            params.and_then(|p| p.get("rope_theta")),
        )
    };
    let rope_theta = match theta_field.1 {
        Some(x) => float(theta_field.0, x)?,
        None => 10000.0,
    };
    let (sfield, scaling) = match get("rope_scaling") {
        Some(s) => ("rope_scaling", Some(s)),
        None => ("rope_parameters", params),
    };
    let rope_scaling = match scaling {
        None => None,
        Some(s) => {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(Value::as_str);
            match kind {
                None | Some("default") => None,
                Some("llama3") => {
                    let f = |k: &str| -> Result<f64> {
                        let key = format!("{sfield}.{k}");
                        let x = s.get(k).ok_or_else(|| bad(&key, "missing".into()))?;
                        float(&key, x)
                    };
                    let old = f("original_max_position_embeddings")?;
                    Some(RopeScaling {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: old as usize,
                    })
                }
                Some(other) => {
                    return Err(bad(
                        &format!("{sfield}.rope_type"),
                        format!("{other:?} is not supported (only \"default\" and \"llama3\")"),
                    ))
                }
            }
        }
    };
    let max_pos = match get("max_position_embeddings") {
        Some(_) => uint("max_position_embeddings")?,
        None => 2048,
    };
    let c = Llama3Config {
        dim,
        n_layers: uint("num_hidden_layers")?,
        n_heads,
        n_kv_heads: (kv != n_heads).then_some(kv),
        vocab_size: uint("vocab_size")?,
        multiple_of: 1,
        ffn_dim_multiplier: None,
        ffn_hidden_override: Some(uint("intermediate_size")?),
        norm_eps: match get("rms_norm_eps") {
            Some(x) => float("rms_norm_eps", x)?,
            None => 1e-6,
        },
        rope_theta,
        rope_scaling,
        max_seq_len: max_pos.min(2048),
        depth_init: true,
        tie_embeddings: get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        max_position_embeddings: max_pos,
    };
    c.validate()
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    Ok(c)
}

/// The `config.json` of a Llama3Config, in the transformers 4 spelling (which transformers 5
/// still reads), with `torch_dtype` naming the exported dtype.
pub fn hf_config_from_llama3(c: &Llama3Config, dtype: &str) -> Value {
    let scaling = c.rope_scaling.map(|s| {
        json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        })
    });
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": c.dim,
        "intermediate_size": c.ffn_hidden(),
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads(),
        "head_dim": c.head_dim(),
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": scaling,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "mlp_bias": false,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": dtype,
    })
}
