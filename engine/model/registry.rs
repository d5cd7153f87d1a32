//! The models a binary knows. The registry is built above the engine (the `titan` crate's
//! `registry()`) and handed to the CLI and the trainer, which look models up here by name or
//! by a Hugging Face `model_type`.

use super::hf_config::read_config;
use super::ModelSpec;
use crate::checkpoint::hf_folder::HF_CONFIG;
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

pub struct Registry {
    specs: Vec<&'static ModelSpec>,
}

impl Registry {
    pub fn new(specs: Vec<&'static ModelSpec>) -> Self {
        Registry { specs }
    }

    pub fn specs(&self) -> &[&'static ModelSpec] {
        &self.specs
    }

    fn names(&self) -> String {
        let n: Vec<&str> = self.specs.iter().map(|s| s.name).collect();
        if n.is_empty() {
            "none".into()
        } else {
            n.join(", ")
        }
    }

    /// The model registered as `name` (`model.name` of a config); an empty name is the first
    /// registered model (the binary's default, torchtitan's "llama3").
    pub fn find(&self, name: &str) -> Result<&'static ModelSpec> {
        if name.is_empty() {
            if let Some(s) = self.specs.first() {
                return Ok(s);
            }
        }
        self.specs
            .iter()
            .copied()
            .find(|s| s.name == name)
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown model '{name}'; available: {}",
                    self.names()
                ))
            })
    }

    /// The model that reads a Hugging Face folder's `config.json`, chosen by its `model_type`,
    /// with the parsed file.
    pub fn for_hf_folder(&self, dir: &Path) -> Result<(&'static ModelSpec, Value)> {
        let path = dir.join(HF_CONFIG);
        let v = read_config(&path)?;
        let Some(kind) = v.get("model_type").and_then(Value::as_str) else {
            return Err(Error::Config(format!(
                "{}: field model_type: missing (it names the architecture)",
                path.display()
            )));
        };
        let spec = self
            .specs
            .iter()
            .copied()
            .find(|s| s.hf.model_types.contains(&kind))
            .ok_or_else(|| {
                let known: Vec<&str> = self
                    .specs
                    .iter()
                    .flat_map(|s| s.hf.model_types.iter().copied())
                    .collect();
                Error::Config(format!(
                    "{}: field model_type: \"{kind}\" is not supported (supported: {})",
                    path.display(),
                    known.join(", ")
                ))
            })?;
        Ok((spec, v))
    }
}
