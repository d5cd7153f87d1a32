//! Hugging Face interop shared by every model: a `StateDictAdapter` maps a model's parameter
//! names (torchtitan's state dict) to and from the names of its Hugging Face `transformers`
//! counterpart; `load_hf` and `export_hf` move weights between a `ParamStore` and a Hugging Face
//! checkpoint folder (engine/checkpoint/hf_folder.rs does the file format).

use crate::backend::Backend;
use crate::checkpoint::hf_folder::{f32_to_bytes, write_hf, HfCheckpoint, HfOut};
use crate::error::{Error, Result};
use crate::params::{ParamId, ParamSpec, ParamStore};
use crate::progress::Progress;
use std::path::Path;

/// Name mapping between a titan model and its Hugging Face checkpoint.
pub trait StateDictAdapter {
    /// The Hugging Face name of a titan parameter.
    fn to_hf(&self, titan: &str) -> Result<String>;
    /// The titan parameter a Hugging Face tensor loads into; `Ok(None)` for tensors titan does
    /// not keep (buffers such as rotary `inv_freq`, or a tied `lm_head` copy).
    fn to_titan(&self, hf: &str) -> Result<Option<String>>;
}

/// Reads the tensor of every parameter in `specs` from `ck` (converted to f32, shape checked)
/// and hands it to `sink(index into specs, data)`. Every Hugging Face tensor must map to a
/// parameter or be one the adapter skips; every parameter must be present.
pub fn read_hf_params(
    adapter: &dyn StateDictAdapter,
    ck: &HfCheckpoint,
    specs: &[ParamSpec],
    mut sink: impl FnMut(usize, Vec<f32>) -> Result<()>,
) -> Result<()> {
    for hf in ck.names() {
        if let Some(titan) = adapter.to_titan(hf)? {
            if !specs.iter().any(|s| s.name == titan) {
                return Err(Error::Checkpoint(format!(
                    "{}: tensor {hf} maps to {titan}, which this model does not have",
                    ck.dir.display()
                )));
            }
        }
    }
    let mut names = Vec::with_capacity(specs.len());
    for spec in specs {
        let hf = adapter.to_hf(&spec.name)?;
        if !ck.contains(&hf) {
            return Err(Error::Checkpoint(format!(
                "{}: missing tensor {hf} (for parameter {})",
                ck.dir.display(),
                spec.name
            )));
        }
        names.push(hf);
    }
    let size = |hf: &str| ck.get(hf).map_or(0, |t| t.bytes.len() as u64);
    let total = names.iter().map(|hf| size(hf)).sum();
    let bar = Progress::new(format!("reading {}", ck.dir.display()), total, true);
    for (i, (spec, hf)) in specs.iter().zip(&names).enumerate() {
        sink(i, ck.read_f32(hf, &spec.shape.0)?)?;
        bar.add(size(hf));
    }
    bar.finish();
    Ok(())
}

/// Fills every parameter of `store` (master and compute copy) from `ck`.
pub fn load_hf(
    adapter: &dyn StateDictAdapter,
    ck: &HfCheckpoint,
    store: &ParamStore,
    be: &dyn Backend,
) -> Result<()> {
    read_hf_params(adapter, ck, &store.specs, |i, data| {
        store.set(be, ParamId(i), &data)
    })
}

/// Writes every parameter of `store` (its f32 master) as a Hugging Face checkpoint folder.
pub fn export_hf(
    adapter: &dyn StateDictAdapter,
    store: &ParamStore,
    be: &dyn Backend,
    dir: &Path,
    config: &serde_json::Value,
    dtype: safetensors::Dtype,
    max_shard_bytes: usize,
) -> Result<()> {
    let ids: Vec<_> = store.ids().collect();
    let outs = ids
        .iter()
        .map(|&id| {
            Ok(HfOut {
                name: adapter.to_hf(store.name(id))?,
                shape: store.shape(id).0.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    write_hf(dir, config, &outs, dtype, max_shard_bytes, |i| {
        let data = store.read_f32(be, store.master(ids[i]))?;
        f32_to_bytes(&data, dtype)
    })
}

/// The name mapping of a decoder whose HF names are fixed top-level names plus per-layer
/// suffixes under `model.layers.N.` (Llama, Qwen3, ...): a model's adapter is its tables.
pub struct NameTable {
    /// The model's name, for errors.
    pub model: &'static str,
    /// (titan name, HF name) outside the layers; the output projection must be
    /// ("output.weight", "lm_head.weight").
    pub top: &'static [(&'static str, &'static str)],
    /// (titan suffix under `layers.N.`, HF suffix under `model.layers.N.`).
    pub layer: &'static [(&'static str, &'static str)],
}

/// "3.rest" -> (3, "rest").
fn split_layer(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

impl NameTable {
    /// The Hugging Face name of a titan parameter.
    pub fn to_hf(&self, titan: &str) -> Result<String> {
        if let Some((_, hf)) = self.top.iter().find(|(t, _)| *t == titan) {
            return Ok(hf.to_string());
        }
        titan
            .strip_prefix("layers.")
            .and_then(split_layer)
            .and_then(|(n, rest)| {
                let (_, hf) = self.layer.iter().find(|(t, _)| *t == rest)?;
                Some(format!("model.layers.{n}.{hf}"))
            })
            .ok_or_else(|| {
                Error::Checkpoint(format!(
                    "{}: parameter {titan} has no Hugging Face name",
                    self.model
                ))
            })
    }

    /// The titan parameter of a Hugging Face tensor of a model with `n_layers` layers; None for
    /// tensors titan does not keep (rotary `inv_freq` buffers, the head of a tied checkpoint).
    pub fn to_titan(&self, hf: &str, n_layers: usize, tied: bool) -> Result<Option<String>> {
        if hf == "lm_head.weight" && tied {
            return Ok(None);
        }
        if let Some((t, _)) = self.top.iter().find(|(_, h)| *h == hf) {
            return Ok(Some(t.to_string()));
        }
        let unknown = || {
            Error::Checkpoint(format!(
                "{}: Hugging Face tensor {hf} has no counterpart in titan's {}",
                self.model, self.model
            ))
        };
        let (n, rest) = hf
            .strip_prefix("model.layers.")
            .and_then(split_layer)
            .ok_or_else(unknown)?;
        if rest == "self_attn.rotary_emb.inv_freq" {
            return Ok(None);
        }
        if n >= n_layers {
            return Err(Error::Checkpoint(format!(
                "{}: tensor {hf} is for layer {n}, the model has {n_layers} layers",
                self.model
            )));
        }
        let (titan, _) = self
            .layer
            .iter()
            .find(|(_, h)| *h == rest)
            .ok_or_else(unknown)?;
        Ok(Some(format!("layers.{n}.{titan}")))
    }
}
