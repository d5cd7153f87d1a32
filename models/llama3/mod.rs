//! Llama 3 (3.1 and 3.2 shapes). Flavors follow torchtitan's `models/llama3/__init__.py`.

pub mod infra;
pub mod model;

pub use model::config::{Llama3Config, RopeScaling};
pub use model::model::Llama3;

use model::state_dict_adapter::{llama3_adapter, llama3_args_from_hf, llama3_hf_config};
use titan_engine::error::{Error, Result};
use titan_engine::model::{cross_entropy_loss, HfInterop, ModelArgs, ModelSpec};

const FLAVORS: &[&str] = &[
    "debugmodel",
    "debugmodel_gqa",
    "1B",
    "3B",
    "8B",
    "70B",
    "405B",
];

/// The architecture of a flavor.
pub fn flavor(name: &str) -> Result<Llama3Config> {
    let base = Llama3Config::default();
    let l31 = Some(RopeScaling::llama3_1());
    let l32 = Some(RopeScaling::llama3_2());
    let c = match name {
        "debugmodel" => Llama3Config {
            dim: 256,
            n_layers: 6,
            n_heads: 16,
            vocab_size: 2048,
            ..base
        },
        "debugmodel_gqa" => Llama3Config {
            dim: 256,
            n_layers: 6,
            n_heads: 16,
            n_kv_heads: Some(4),
            vocab_size: 2048,
            ..base
        },
        "1B" => Llama3Config {
            dim: 2048,
            n_layers: 16,
            n_heads: 32,
            n_kv_heads: Some(8),
            ffn_dim_multiplier: Some(1.5),
            multiple_of: 256,
            rope_scaling: l32,
            tie_embeddings: true,
            ..base
        },
        "3B" => Llama3Config {
            dim: 3072,
            n_layers: 28,
            n_heads: 24,
            n_kv_heads: Some(8),
            ffn_dim_multiplier: Some(1.0),
            multiple_of: 256,
            rope_scaling: l32,
            tie_embeddings: true,
            ..base
        },
        "8B" => Llama3Config {
            dim: 4096,
            n_layers: 32,
            n_heads: 32,
            n_kv_heads: Some(8),
            ffn_dim_multiplier: Some(1.3),
            multiple_of: 1024,
            rope_scaling: l31,
            ..base
        },
        "70B" => Llama3Config {
            dim: 8192,
            n_layers: 80,
            n_heads: 64,
            n_kv_heads: Some(8),
            ffn_dim_multiplier: Some(1.3),
            multiple_of: 4096,
            rope_scaling: l31,
            ..base
        },
        "405B" => Llama3Config {
            dim: 16384,
            n_layers: 126,
            n_heads: 128,
            n_kv_heads: Some(8),
            ffn_dim_multiplier: Some(1.2),
            multiple_of: 4096,
            rope_scaling: l31,
            ..base
        },
        _ => {
            return Err(Error::Config(format!(
                "unknown llama3 flavor '{name}'; available: {}",
                FLAVORS.join(", ")
            )))
        }
    };
    Ok(c)
}

fn flavor_args(name: &str) -> Result<Box<dyn ModelArgs>> {
    Ok(Box::new(flavor(name)?))
}

fn args_from_json(v: &serde_json::Value) -> Result<Box<dyn ModelArgs>> {
    let c: Llama3Config = serde_json::from_value(v.clone())
        .map_err(|e| Error::Config(format!("not a llama3 architecture: {e}")))?;
    c.validate()?;
    Ok(Box::new(c))
}

static SPEC: ModelSpec = ModelSpec {
    name: "llama3",
    flavors: FLAVORS,
    flavor: flavor_args,
    args_from_json,
    build: model::model::build_llama3,
    build_stage: model::model::build_llama3_stage,
    parallelize: infra::parallelize::parallelize_llama3,
    pipeline_split: infra::pipeline::pipeline_llama3,
    loss: cross_entropy_loss,
    state_dict_adapter: llama3_adapter,
    hf: HfInterop {
        model_types: &["llama"],
        args_from_config: llama3_args_from_hf,
        to_config: llama3_hf_config,
    },
};

/// Llama 3's registry entry.
pub fn model_spec() -> &'static ModelSpec {
    &SPEC
}
