//! Qwen3 <-> Hugging Face `Qwen3ForCausalLM`: parameter names and config.json.
//!
//! | titan                                   | Hugging Face                                    |
//! |-----------------------------------------|-------------------------------------------------|
//! | tok_embeddings.weight                   | model.embed_tokens.weight                       |
//! | layers.N.attention.w{q,k,v,o}.weight    | model.layers.N.self_attn.{q,k,v,o}_proj.weight  |
//! | layers.N.attention.{q,k}_norm.weight    | model.layers.N.self_attn.{q,k}_norm.weight      |
//! | layers.N.feed_forward.w1 / w3 / w2      | model.layers.N.mlp.gate_proj / up_proj / down_proj |
//! | layers.N.attention_norm.weight          | model.layers.N.input_layernorm.weight           |
//! | layers.N.ffn_norm.weight                | model.layers.N.post_attention_layernorm.weight  |
//! | norm.weight                             | model.norm.weight                               |
//! | output.weight (absent when tied)        | lm_head.weight (absent or ignored when tied)    |
//!
//! No permutation: titan's rotary pairs (i, i + head_dim/2) exactly as transformers'
//! `rotate_half` (see models/llama3/model/state_dict_adapter.rs). A tied export writes no
//! `lm_head.weight`, as `save_pretrained` does for tied models.

use super::config::Qwen3Config;
use serde_json::{json, Value};
use std::path::Path;
use titan_engine::error::{Error, Result};
use titan_engine::model::hf_config::{read_config, rope_type, HfFields};
use titan_engine::model::state_dict::NameTable;
use titan_engine::model::{args_as, ModelArgs, StateDictAdapter};

pub struct Qwen3StateDictAdapter {
    pub n_layers: usize,
    pub tie_embeddings: bool,
}

const NAMES: NameTable = NameTable {
    model: "qwen3",
    top: &[
        ("tok_embeddings.weight", "model.embed_tokens.weight"),
        ("norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ],
    layer: &[
        ("attention.wq.weight", "self_attn.q_proj.weight"),
        ("attention.wk.weight", "self_attn.k_proj.weight"),
        ("attention.wv.weight", "self_attn.v_proj.weight"),
        ("attention.wo.weight", "self_attn.o_proj.weight"),
        ("attention.q_norm.weight", "self_attn.q_norm.weight"),
        ("attention.k_norm.weight", "self_attn.k_norm.weight"),
        ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
        ("feed_forward.w3.weight", "mlp.up_proj.weight"),
        ("feed_forward.w2.weight", "mlp.down_proj.weight"),
        ("attention_norm.weight", "input_layernorm.weight"),
        ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ],
};

impl StateDictAdapter for Qwen3StateDictAdapter {
    fn to_hf(&self, titan: &str) -> Result<String> {
        NAMES.to_hf(titan)
    }
    fn to_titan(&self, hf: &str) -> Result<Option<String>> {
        // A tied checkpoint may still carry the (identical) head; the embedding is used.
        NAMES.to_titan(hf, self.n_layers, self.tie_embeddings)
    }
}

/// Reads a Hugging Face Qwen3 `config.json` (already parsed; `path` names it in errors).
/// max_seq_len is left at min(4096, max_position_embeddings); the caller fits it to the run.
/// Sliding-window attention, biases, activations other than silu and scaled rotary embeddings
/// (YaRN) are refused with an error naming the field.
pub fn qwen3_config_from_json(v: &Value, path: &Path) -> Result<Qwen3Config> {
    let f = HfFields::new(v, path);
    f.require_str("model_type", "qwen3")?;
    f.refuse_true("attention_bias", "titan's Qwen3 has no biases")?;
    f.refuse_true(
        "use_sliding_window",
        "titan's attention is full causal attention",
    )?;
    f.require_str("hidden_act", "silu")?;
    let (sfield, scaling) = f.rope_scaling();
    if let Some(kind) = scaling.and_then(rope_type) {
        return Err(f.bad(
            &format!("{sfield}.rope_type"),
            format!("{kind:?} is not supported (only \"default\")"),
        ));
    }
    let dim = f.uint("hidden_size")?;
    let n_heads = f.uint("num_attention_heads")?;
    let max_pos = f.uint_or("max_position_embeddings", 40960)?;
    let c = Qwen3Config {
        dim,
        n_layers: f.uint("num_hidden_layers")?,
        n_heads,
        n_kv_heads: f.uint_or("num_key_value_heads", n_heads)?,
        head_dim: f.uint_or("head_dim", dim / n_heads.max(1))?,
        hidden_dim: f.uint("intermediate_size")?,
        vocab_size: f.uint("vocab_size")?,
        norm_eps: f.float_or("rms_norm_eps", 1e-6)?,
        rope_theta: f.rope_theta(10000.0)?,
        max_seq_len: max_pos.min(4096),
        max_position_embeddings: max_pos,
        tie_embeddings: f.bool_or("tie_word_embeddings", false),
        depth_init: true,
    };
    c.validate()
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    Ok(c)
}

/// `qwen3_config_from_json` of a file.
pub fn qwen3_config_from_hf(path: &Path) -> Result<Qwen3Config> {
    qwen3_config_from_json(&read_config(path)?, path)
}

/// The `config.json` of a Qwen3Config (transformers 4 spelling, which transformers 5 reads),
/// with `torch_dtype` naming the exported dtype.
pub fn hf_config_from_qwen3(c: &Qwen3Config, dtype: &str) -> Value {
    json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": c.dim,
        "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": null,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "use_sliding_window": false,
        "sliding_window": null,
        "max_window_layers": c.n_layers,
        "initializer_range": 0.02,
        "torch_dtype": dtype,
    })
}

/// `HfInterop::args_from_config` of Qwen3.
pub fn qwen3_args_from_hf(v: &Value, path: &Path) -> Result<Box<dyn ModelArgs>> {
    Ok(Box::new(qwen3_config_from_json(v, path)?))
}

/// `HfInterop::to_config` of Qwen3.
pub fn qwen3_hf_config(args: &dyn ModelArgs, dtype: &str) -> Result<Value> {
    Ok(hf_config_from_qwen3(
        args_as::<Qwen3Config>(args, "qwen3")?,
        dtype,
    ))
}

/// `ModelSpec::state_dict_adapter` of Qwen3.
pub fn qwen3_adapter(args: &dyn ModelArgs) -> Result<Box<dyn StateDictAdapter>> {
    let c = args_as::<Qwen3Config>(args, "qwen3")?;
    Ok(Box::new(Qwen3StateDictAdapter {
        n_layers: c.n_layers,
        tie_embeddings: c.tie_embeddings,
    }))
}
