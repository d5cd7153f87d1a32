//! Applies training techniques to a Llama 3 model from outside the model code, in torchtitan's
//! order: tensor parallel -> activation checkpointing -> fusion / graph capture -> FSDP. Only
//! activation checkpointing exists in this release; TP and FSDP slot in here when `dist` lands.

use crate::error::{Error, Result};
use crate::models::llama3::Llama3;
use crate::tape::AcPolicy;

/// torchtitan's `[activation_checkpoint]`: mode none | full | selective; for selective,
/// `selective_ac_option` is "op" (keep matmul and attention outputs, recompute the rest) or an
/// integer N (checkpoint every N-th layer fully).
pub fn apply_ac(model: &mut Llama3, mode: &str, selective_option: &str) -> Result<()> {
    for layer in &mut model.layers {
        layer.ac = None;
    }
    match mode {
        "none" => Ok(()),
        "full" => {
            for layer in &mut model.layers {
                layer.ac = Some(AcPolicy::Full);
            }
            Ok(())
        }
        "selective" => {
            if selective_option == "op" {
                for layer in &mut model.layers {
                    layer.ac = Some(AcPolicy::SaveMatmulAndAttention);
                }
                return Ok(());
            }
            let every: usize = selective_option.parse().map_err(|_| {
                Error::Config(format!(
                    "activation_checkpoint.selective_ac_option must be 'op' or a positive integer, got '{selective_option}'"
                ))
            })?;
            if every == 0 {
                return Err(Error::Config(
                    "activation_checkpoint.selective_ac_option must be >= 1".into(),
                ));
            }
            for layer in &mut model.layers {
                if (layer.layer_id + 1) % every == 0 {
                    layer.ac = Some(AcPolicy::Full);
                }
            }
            Ok(())
        }
        other => Err(Error::Config(format!(
            "activation_checkpoint.mode must be none, full or selective, got '{other}'"
        ))),
    }
}
