//! Which architecture a run, an evaluation or a conversion uses, fitted to its sequence length:
//! the one place that reads a manifest's record, a Hugging Face `config.json` or a flavor.
//!
//! For a training run, first match wins:
//! 1. the checkpoint the run will resume from (its manifest's `model_args`), unless it was saved
//!    by a run of another `model.flavor`;
//! 2. `checkpoint.initial_load_path` with `checkpoint.initial_load_in_hf`: that folder's
//!    Hugging Face `config.json`; without `initial_load_in_hf`: the titan checkpoint folder there;
//! 3. `model.flavor`.

use super::hf_config::read_config;
use super::{ModelArgs, ModelSpec, Registry};
use crate::checkpoint::hf_folder::HF_CONFIG;
use crate::checkpoint::{self, LoadedCheckpoint, Manifest, MANIFEST_FILE};
use crate::error::{Error, Result};
use crate::train::config::JobConfig;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The manifest key holding the architecture (`ModelArgs::to_json`).
pub const MANIFEST_ARGS: &str = "model_args";

/// The `extra` record of a checkpoint's manifest: model, flavor and architecture.
pub fn manifest_record(cfg: &JobConfig, args: &dyn ModelArgs) -> Value {
    serde_json::json!({
        "model": cfg.model.name,
        "flavor": cfg.model.flavor,
        MANIFEST_ARGS: args.to_json(),
    })
}

/// The architecture a manifest recorded, if any: `model_args`, or `<model>_config`, which
/// releases before the model protocol wrote (`llama3_config`).
pub fn manifest_args(spec: &ModelSpec, m: &Manifest) -> Result<Option<Box<dyn ModelArgs>>> {
    if let Some(saved) = m.extra.get("model").and_then(Value::as_str) {
        if saved != spec.name {
            return Err(Error::Checkpoint(format!(
                "the checkpoint holds a {saved} model, the config names model.name = {}",
                spec.name
            )));
        }
    }
    let legacy = format!("{}_config", spec.name);
    let (key, v) = match m.extra.get(MANIFEST_ARGS) {
        Some(v) if !v.is_null() => (MANIFEST_ARGS, v),
        _ => match m.extra.get(&legacy) {
            Some(v) if !v.is_null() => (legacy.as_str(), v),
            _ => return Ok(None),
        },
    };
    (spec.args_from_json)(v)
        .map(Some)
        .map_err(|e| Error::Checkpoint(format!("manifest extra.{key}: {e}")))
}

/// The architecture of a Hugging Face folder for `spec`, refusing a folder of another model.
pub fn hf_args(spec: &ModelSpec, dir: &Path) -> Result<Box<dyn ModelArgs>> {
    let path = dir.join(HF_CONFIG);
    let v = read_config(&path)?;
    if let Some(kind) = v.get("model_type").and_then(Value::as_str) {
        if !spec.hf.model_types.contains(&kind) {
            return Err(Error::Config(format!(
                "{}: field model_type: \"{kind}\" is not a {} checkpoint (it reads {}); set model.name to the model of that folder",
                path.display(),
                spec.name,
                spec.hf.model_types.join(", ")
            )));
        }
    }
    (spec.hf.args_from_config)(&v, &path)
}

/// The model and architecture of a Hugging Face folder, chosen by its `model_type`.
pub fn hf_folder_args(
    reg: &Registry,
    dir: &Path,
) -> Result<(&'static ModelSpec, Box<dyn ModelArgs>)> {
    let (spec, v) = reg.for_hf_folder(dir)?;
    Ok((spec, (spec.hf.args_from_config)(&v, &dir.join(HF_CONFIG))?))
}

fn resume_step_dir(cfg: &JobConfig) -> Result<Option<PathBuf>> {
    if !cfg.checkpoint.enable {
        return Ok(None);
    }
    let root = Path::new(&cfg.job.dump_folder).join(&cfg.checkpoint.folder);
    let step = match cfg.checkpoint.load_step {
        s if s > 0 => Some(s as u64),
        _ => checkpoint::latest_step(&root)?,
    };
    Ok(step.map(|s| checkpoint::step_dir(&root, s)))
}

/// The run's architecture (see the module doc), fitted to the training sequence length. `vocab`
/// is the tokenizer's: a flavor takes it as its vocabulary; a loaded architecture keeps its own,
/// which must cover every token id.
pub fn run_args(
    spec: &ModelSpec,
    cfg: &JobConfig,
    vocab: Option<usize>,
) -> Result<Box<dyn ModelArgs>> {
    let seq = cfg.training.seq_len as usize;
    let mut loaded = None;
    if let Some(dir) = resume_step_dir(cfg)? {
        let m = Manifest::read(&dir.join(MANIFEST_FILE))?;
        // A flavor run whose config now names another flavor keeps the flavor (and fails on the
        // shape check) rather than silently taking the checkpoint's architecture.
        let saved_flavor = m.extra.get("flavor").and_then(|f| f.as_str());
        if cfg.checkpoint.initial_load_in_hf || saved_flavor.is_none_or(|f| f == cfg.model.flavor) {
            loaded = manifest_args(spec, &m)?;
        }
    }
    if loaded.is_none() {
        if let Some(p) = cfg
            .checkpoint
            .initial_load_path
            .as_deref()
            .filter(|p| !p.is_empty())
        {
            let p = Path::new(p);
            loaded = Some(if cfg.checkpoint.initial_load_in_hf {
                hf_args(spec, p)?
            } else {
                let m = Manifest::read(&p.join(MANIFEST_FILE))?;
                match manifest_args(spec, &m)? {
                    Some(a) => a,
                    None => (spec.flavor)(&cfg.model.flavor)?,
                }
            });
        } else if cfg.checkpoint.initial_load_in_hf {
            return Err(Error::Config(
                "checkpoint.initial_load_in_hf needs checkpoint.initial_load_path (a Hugging Face checkpoint folder)".into(),
            ));
        }
    }
    match loaded {
        Some(mut a) => {
            if let Some(v) = vocab.filter(|&v| v > a.vocab_size()) {
                return Err(Error::Config(format!(
                    "the tokenizer has {v} ids but the loaded model's vocabulary is {}",
                    a.vocab_size()
                )));
            }
            a.update_from_config(seq, None)?;
            Ok(a)
        }
        None => spec.flavor_for(&cfg.model.flavor, seq, vocab),
    }
}

/// The job config a titan checkpoint was saved with.
pub fn checkpoint_job(ck: &LoadedCheckpoint) -> Result<JobConfig> {
    let origin = format!("{}/{MANIFEST_FILE}", ck.dir.display());
    JobConfig::from_toml_str(&ck.manifest.config, &origin, &[])
}

/// The model and architecture of a titan checkpoint (for eval and convert), fitted to
/// `seq_len`: the recorded architecture, else its config's flavor.
pub fn checkpoint_args(
    reg: &Registry,
    ck: &LoadedCheckpoint,
    seq_len: usize,
) -> Result<(&'static ModelSpec, Box<dyn ModelArgs>)> {
    let cfg = checkpoint_job(ck)?;
    let spec = reg.find(&cfg.model.name)?;
    let mut a = match manifest_args(spec, &ck.manifest)? {
        Some(a) => a,
        None => (spec.flavor)(&cfg.model.flavor)?,
    };
    a.update_from_config(seq_len, None)?;
    Ok((spec, a))
}
