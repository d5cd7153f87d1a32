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
use serde_json::{json, Value};
use std::path::Path;
use titan_engine::error::{Error, Result};
use titan_engine::model::hf_config::{read_config, rope_type, HfFields};
use titan_engine::model::state_dict::NameTable;
use titan_engine::model::{args_as, ModelArgs, StateDictAdapter};

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

const NAMES: NameTable = NameTable {
    model: "llama3",
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
        ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
        ("feed_forward.w3.weight", "mlp.up_proj.weight"),
        ("feed_forward.w2.weight", "mlp.down_proj.weight"),
        ("attention_norm.weight", "input_layernorm.weight"),
        ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ],
};

impl StateDictAdapter for Llama3StateDictAdapter {
    fn to_hf(&self, titan: &str) -> Result<String> {
        NAMES.to_hf(titan)
    }
    fn to_titan(&self, hf: &str) -> Result<Option<String>> {
        // Tied checkpoints may still carry the (identical) head; the embedding is used.
        NAMES.to_titan(hf, self.n_layers, self.tie_embeddings)
    }
}

/// Reads a Hugging Face Llama `config.json` into a `Llama3Config` (max_seq_len is left at
/// min(2048, max_position_embeddings); the caller sets the training or eval length). Both the
/// transformers 4 spelling (top-level `rope_theta`, `rope_scaling`) and the transformers 5 one
/// (`rope_parameters` holding both) are accepted. Unsupported architectures are refused.
pub fn llama3_config_from_hf(path: &Path) -> Result<Llama3Config> {
    llama3_config_from_json(&read_config(path)?, path)
}

/// `llama3_config_from_hf` of an already parsed `config.json` (`path` names it in errors).
pub fn llama3_config_from_json(v: &Value, path: &Path) -> Result<Llama3Config> {
    let f = HfFields::new(v, path);
    f.require_str("model_type", "llama")?;
    for k in ["attention_bias", "mlp_bias"] {
        f.refuse_true(k, "titan's Llama has no biases")?;
    }
    f.require_str("hidden_act", "silu")?;
    let dim = f.uint("hidden_size")?;
    let n_heads = f.uint("num_attention_heads")?;
    let kv = f.uint_or("num_key_value_heads", n_heads)?;
    if let Some(hd) = f.get("head_dim") {
        if hd.as_u64() != Some((dim / n_heads) as u64) || !dim.is_multiple_of(n_heads) {
            return Err(f.bad(
                "head_dim",
                format!("{hd} must equal hidden_size / num_attention_heads = {dim}/{n_heads}"),
            ));
        }
    }
    let rope_theta = f.rope_theta(10000.0)?;
    let (sfield, scaling) = f.rope_scaling();
    let rope_scaling = match scaling.map(|s| (s, rope_type(s))) {
        None | Some((_, None)) => None,
        Some((s, Some("llama3"))) => {
            let num = |k: &str| -> Result<f64> {
                let key = format!("{sfield}.{k}");
                let x = s.get(k).ok_or_else(|| f.bad(&key, "missing"))?;
                f.number(&key, x)
            };
            let old = num("original_max_position_embeddings")?;
            Some(RopeScaling {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: old as usize,
            })
        }
        Some((_, Some(other))) => {
            return Err(f.bad(
                &format!("{sfield}.rope_type"),
                format!("{other:?} is not supported (only \"default\" and \"llama3\")"),
            ))
        }
    };
    let max_pos = f.uint_or("max_position_embeddings", 2048)?;
    let c = Llama3Config {
        dim,
        n_layers: f.uint("num_hidden_layers")?,
        n_heads,
        n_kv_heads: (kv != n_heads).then_some(kv),
        vocab_size: f.uint("vocab_size")?,
        multiple_of: 1,
        ffn_dim_multiplier: None,
        ffn_hidden_override: Some(f.uint("intermediate_size")?),
        norm_eps: f.float_or("rms_norm_eps", 1e-6)?,
        rope_theta,
        rope_scaling,
        max_seq_len: max_pos.min(2048),
        depth_init: true,
        tie_embeddings: f.bool_or("tie_word_embeddings", false),
        max_position_embeddings: max_pos,
    };
    c.validate()
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    Ok(c)
}

/// `HfInterop::args_from_config` of Llama 3.
pub fn llama3_args_from_hf(v: &Value, path: &Path) -> Result<Box<dyn ModelArgs>> {
    Ok(Box::new(llama3_config_from_json(v, path)?))
}

/// `HfInterop::to_config` of Llama 3.
pub fn llama3_hf_config(args: &dyn ModelArgs, dtype: &str) -> Result<Value> {
    Ok(hf_config_from_llama3(
        args_as::<Llama3Config>(args, "llama3")?,
        dtype,
    ))
}

/// `ModelSpec::state_dict_adapter` of Llama 3.
pub fn llama3_adapter(args: &dyn ModelArgs) -> Result<Box<dyn StateDictAdapter>> {
    let c = args_as::<Llama3Config>(args, "llama3")?;
    Ok(Box::new(Llama3StateDictAdapter::new(c)))
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
