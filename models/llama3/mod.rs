//! Llama 3 (3.1 and 3.2 shapes). Flavors follow torchtitan's `models/llama3/__init__.py`.

pub mod infra;
pub mod model;

pub use model::config::{Llama3Config, RopeScaling};
pub use model::model::Llama3;

use super::{FlavorInfo, ModelSpec};
use crate::error::{Error, Result};

const FLAVORS: [&str; 7] = [
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

pub fn model_spec() -> ModelSpec {
    ModelSpec {
        name: "llama3",
        flavors: || {
            FLAVORS
                .iter()
                .map(|&f| {
                    let c = flavor(f).expect("registered flavor");
                    FlavorInfo {
                        name: f,
                        num_params: c.num_params(),
                        description: format!(
                            "dim {} layers {} heads {}/{} ffn {} vocab {}{}",
                            c.dim,
                            c.n_layers,
                            c.n_heads,
                            c.kv_heads(),
                            c.ffn_hidden(),
                            c.vocab_size,
                            if c.tie_embeddings { " tied" } else { "" }
                        ),
                    }
                })
                .collect()
        },
    }
}
