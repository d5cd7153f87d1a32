//! Where a run's model architecture and initial weights come from, and the Hugging Face export
//! at the end of training.
//!
//! Architecture, first match wins:
//! 1. the checkpoint the run will resume from (`extra.llama3_config` of its manifest), unless it
//!    was saved by a run of another `model.flavor`;
//! 2. `checkpoint.initial_load_path` with `checkpoint.initial_load_in_hf`: that folder's
//!    Hugging Face `config.json`; without `initial_load_in_hf`: the titan checkpoint folder there;
//! 3. `model.flavor`.
//!
//! Weights: a resume loads the checkpoint; otherwise `initial_load_path` is loaded over the
//! random init (model weights only; the optimizer starts fresh).

use super::config::JobConfig;
use super::trainer::Trainer;
use crate::checkpoint::hf::{parse_export_dtype, HfCheckpoint, HF_CONFIG};
use crate::checkpoint::{self, Manifest, MANIFEST_FILE};
use crate::error::{Error, Result};
use crate::models::llama3::model::state_dict_adapter::{
    hf_config_from_llama3, llama3_config_from_hf, Llama3StateDictAdapter,
};
use crate::models::llama3::{self, Llama3Config};
use crate::models::state_dict::{export_hf, load_hf};
use std::path::{Path, PathBuf};

/// Hugging Face exports at the end of training go to `<checkpoint root>/hf-step-N`.
pub fn hf_export_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("hf-step-{step}"))
}

/// The architecture a titan checkpoint folder (`step-N`) was saved with, if it recorded one.
pub fn manifest_model_config(m: &Manifest) -> Result<Option<Llama3Config>> {
    match m.extra.get("llama3_config") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
            Error::Checkpoint(format!(
                "manifest extra.llama3_config is not a Llama3Config: {e}"
            ))
        }),
    }
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

/// The run's model architecture (see the module doc), fitted to the training sequence length.
/// `vocab` is the tokenizer's: a flavor takes it as its vocabulary; a loaded architecture keeps
/// its own, which must cover every token id.
pub fn model_config(cfg: &JobConfig, vocab: Option<usize>) -> Result<Llama3Config> {
    let seq = cfg.training.seq_len as usize;
    let mut loaded = None;
    if let Some(dir) = resume_step_dir(cfg)? {
        let m = Manifest::read(&dir.join(MANIFEST_FILE))?;
        // A flavor run whose config now names another flavor keeps the flavor (and fails on the
        // shape check) rather than silently taking the checkpoint's architecture.
        let saved_flavor = m.extra.get("flavor").and_then(|f| f.as_str());
        if cfg.checkpoint.initial_load_in_hf || saved_flavor.is_none_or(|f| f == cfg.model.flavor) {
            loaded = manifest_model_config(&m)?;
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
                llama3_config_from_hf(&p.join(HF_CONFIG))?
            } else {
                let m = Manifest::read(&p.join(MANIFEST_FILE))?;
                match manifest_model_config(&m)? {
                    Some(c) => c,
                    None => llama3::flavor(&cfg.model.flavor)?,
                }
            });
        } else if cfg.checkpoint.initial_load_in_hf {
            return Err(Error::Config(
                "checkpoint.initial_load_in_hf needs checkpoint.initial_load_path (a Hugging Face checkpoint folder)".into(),
            ));
        }
    }
    match loaded {
        Some(mut c) => {
            if let Some(v) = vocab.filter(|&v| v > c.vocab_size) {
                return Err(Error::Config(format!(
                    "the tokenizer has {v} ids but the loaded model's vocabulary is {}",
                    c.vocab_size
                )));
            }
            c.update_from_training(seq, None)?;
            Ok(c)
        }
        None => {
            let mut c = llama3::flavor(&cfg.model.flavor)?;
            c.update_from_training(seq, vocab)?;
            Ok(c)
        }
    }
}

impl Trainer {
    /// Loads `checkpoint.initial_load_path` (Hugging Face or titan) into the model. Returns the
    /// folder loaded, None when no initial load is configured.
    pub fn load_initial(&mut self) -> Result<Option<PathBuf>> {
        let Some(p) = self
            .cfg
            .checkpoint
            .initial_load_path
            .as_deref()
            .filter(|p| !p.is_empty())
        else {
            return Ok(None);
        };
        let dir = PathBuf::from(p);
        let be = self.be.as_ref();
        if self.cfg.checkpoint.initial_load_in_hf {
            let ck = HfCheckpoint::open(&dir)?;
            load_hf(
                &Llama3StateDictAdapter::new(&self.model.config),
                &ck,
                &self.store,
                be,
            )?;
        } else {
            let ck = checkpoint::load_dir(&dir)?;
            if self.cfg.checkpoint.initial_load_model_only {
                self.load_weights(&ck)?;
            } else {
                // The whole state (moments, step, data position, schedule) as the starting point.
                self.load_state(&ck)?;
            }
        }
        Ok(Some(dir))
    }

    /// Writes the current weights as a Hugging Face checkpoint (config.json + safetensors, in
    /// `checkpoint.export_dtype`) to `<checkpoint root>/hf-step-N`.
    pub fn export_hf(&self) -> Result<PathBuf> {
        let dir = hf_export_dir(&self.checkpoint_root(), self.step);
        let dtype_name = self.cfg.checkpoint.export_dtype.as_str();
        let dtype = parse_export_dtype(dtype_name)?;
        let config = hf_config_from_llama3(&self.model.config, dtype_name);
        let adapter = Llama3StateDictAdapter::new(&self.model.config);
        const SHARD: usize = 5 << 30;
        export_hf(
            &adapter,
            &self.store,
            self.be.as_ref(),
            &dir,
            &config,
            dtype,
            SHARD,
        )?;
        Ok(dir)
    }
}
