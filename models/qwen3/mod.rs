//! Qwen3 dense models. Flavors follow torchtitan's `models/qwen3/__init__.py` and the published
//! Hugging Face configs (Qwen/Qwen3-0.6B ... Qwen3-32B).

pub mod infra;
pub mod model;

pub use model::config::Qwen3Config;
pub use model::model::Qwen3;

use model::state_dict_adapter::{qwen3_adapter, qwen3_args_from_hf, qwen3_hf_config};
use titan_engine::error::{Error, Result};
use titan_engine::model::{cross_entropy_loss, HfInterop, ModelArgs, ModelSpec};

const FLAVORS: &[&str] = &["debugmodel", "0.6B", "1.7B", "4B", "8B", "14B", "32B"];

/// The architecture of a flavor.
pub fn flavor(name: &str) -> Result<Qwen3Config> {
    let base = Qwen3Config::default();
    // (dim, layers, heads, ffn hidden, vocab, tied); all have 8 kv heads and head_dim 128.
    let (dim, n_layers, n_heads, hidden_dim, vocab_size, tie) = match name {
        "debugmodel" => (256, 8, 16, 3072, 2048, true),
        "0.6B" => (1024, 28, 16, 3072, 151936, true),
        "1.7B" => (2048, 28, 16, 6144, 151936, true),
        "4B" => (2560, 36, 32, 9728, 151936, true),
        "8B" => (4096, 36, 32, 12288, 151936, false),
        "14B" => (5120, 40, 40, 17408, 151936, false),
        "32B" => (5120, 64, 64, 25600, 151936, false),
        _ => {
            return Err(Error::Config(format!(
                "unknown qwen3 flavor '{name}'; available: {}",
                FLAVORS.join(", ")
            )))
        }
    };
    Ok(Qwen3Config {
        dim,
        n_layers,
        n_heads,
        hidden_dim,
        vocab_size,
        tie_embeddings: tie,
        ..base
    })
}

fn flavor_args(name: &str) -> Result<Box<dyn ModelArgs>> {
    Ok(Box::new(flavor(name)?))
}

fn args_from_json(v: &serde_json::Value) -> Result<Box<dyn ModelArgs>> {
    let c: Qwen3Config = serde_json::from_value(v.clone())
        .map_err(|e| Error::Config(format!("not a qwen3 architecture: {e}")))?;
    c.validate()?;
    Ok(Box::new(c))
}

static SPEC: ModelSpec = ModelSpec {
    name: "qwen3",
    flavors: FLAVORS,
    flavor: flavor_args,
    args_from_json,
    build: model::model::build_qwen3,
    build_stage: model::model::build_qwen3_stage,
    parallelize: infra::parallelize::parallelize_qwen3,
    pipeline_split: infra::pipeline::pipeline_qwen3,
    loss: cross_entropy_loss,
    state_dict_adapter: qwen3_adapter,
    hf: HfInterop {
        model_types: &["qwen3"],
        args_from_config: qwen3_args_from_hf,
        to_config: qwen3_hf_config,
    },
};

/// Qwen3's registry entry.
pub fn model_spec() -> &'static ModelSpec {
    &SPEC
}
