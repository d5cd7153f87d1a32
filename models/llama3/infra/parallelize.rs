//! Applies training techniques to a Llama 3 model from outside the model code, in torchtitan's
//! order: tensor parallel -> activation checkpointing -> fusion / graph capture -> FSDP. Only
//! activation checkpointing exists in this release; TP and FSDP slot in here when `dist` lands.

use crate::llama3::Llama3;
use titan_engine::error::Result;
use titan_engine::model::{model_as_mut, Model, Parallelize};
use titan_engine::parallel::ac::AcConfig;

/// `ModelSpec::parallelize` of Llama 3.
pub fn parallelize_llama3(model: &mut dyn Model, p: &Parallelize) -> Result<()> {
    let model = model_as_mut::<Llama3>(model, "llama3")?;
    let ac = &p.job.activation_checkpoint;
    apply_ac(model, AcConfig::parse(&ac.mode, &ac.selective_ac_option)?);
    Ok(())
}

/// torchtitan's `apply_ac`: one policy per transformer block.
pub fn apply_ac(model: &mut Llama3, ac: AcConfig) {
    for layer in &mut model.layers {
        layer.ac = ac.block_policy(layer.layer_id);
    }
}
