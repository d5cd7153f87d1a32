//! Model registry. Each model folder (torchtitan's convention) registers a `ModelSpec`: its name,
//! flavors and how to build it. `titan list-models` prints this table.

pub mod llama3;
pub mod state_dict;

use crate::error::{Error, Result};

/// What the engine needs to know about one model flavor.
pub struct FlavorInfo {
    pub name: &'static str,
    pub num_params: usize,
    pub description: String,
}

pub struct ModelSpec {
    pub name: &'static str,
    pub flavors: fn() -> Vec<FlavorInfo>,
}

pub fn registry() -> Vec<ModelSpec> {
    vec![llama3::model_spec()]
}

pub fn find_model(name: &str) -> Result<ModelSpec> {
    let all = registry();
    let names: Vec<&str> = all.iter().map(|m| m.name).collect();
    all.into_iter().find(|m| m.name == name).ok_or_else(|| {
        Error::Config(format!(
            "unknown model '{name}'; available: {}",
            names.join(", ")
        ))
    })
}
