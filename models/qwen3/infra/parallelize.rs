//! Applies training techniques to a Qwen3 model from outside the model code, in torchtitan's
//! order: tensor parallel -> activation checkpointing -> fusion / graph capture -> FSDP. Only
//! activation checkpointing exists in this release; TP (with the per-head q/k norms working on
//! head shards) and FSDP slot in here when the distributed layers land.

use crate::qwen3::Qwen3;
use titan_engine::error::Result;
use titan_engine::model::{model_as_mut, Model, Parallelize};
use titan_engine::parallel::ac::AcConfig;

/// `ModelSpec::parallelize` of Qwen3.
pub fn parallelize_qwen3(model: &mut dyn Model, p: &Parallelize) -> Result<()> {
    let model = model_as_mut::<Qwen3>(model, "qwen3")?;
    let ac = &p.job.activation_checkpoint;
    let ac = AcConfig::parse(&ac.mode, &ac.selective_ac_option)?;
    for layer in &mut model.layers {
        layer.ac = ac.block_policy(layer.layer_id);
    }
    Ok(())
}
