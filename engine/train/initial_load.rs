//! A run's initial weights and its Hugging Face export at the end of training.
//!
//! Weights: a resume loads the checkpoint (state.rs); otherwise `checkpoint.initial_load_path`
//! is loaded over the random init (model weights only unless `initial_load_model_only = false`).
//! The architecture of either source is chosen in `model::resolve`.

use super::trainer::Trainer;
use crate::checkpoint::hf_folder::{parse_export_dtype, HfCheckpoint};
use crate::checkpoint::{self};
use crate::error::Result;
use crate::model::state_dict::{export_hf, load_hf};
use std::path::{Path, PathBuf};

/// Hugging Face exports at the end of training go to `<checkpoint root>/hf-step-N`.
pub fn hf_export_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("hf-step-{step}"))
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
            let adapter = (self.spec.state_dict_adapter)(self.model.args())?;
            load_hf(adapter.as_ref(), &ck, &self.store, be)?;
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
        let config = (self.spec.hf.to_config)(self.model.args(), dtype_name)?;
        let adapter = (self.spec.state_dict_adapter)(self.model.args())?;
        const SHARD: usize = 5 << 30;
        export_hf(
            adapter.as_ref(),
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
