//! Applies training techniques to a Llama 3 model from outside the model code, in torchtitan's
//! order: tensor parallel -> activation checkpointing -> fusion / graph capture -> FSDP. The
//! engine does the splitting and sharding; this file only names the weights and the units.

use crate::llama3::model::model::TransformerBlock;
use crate::llama3::Llama3;
use titan_engine::error::Result;
use titan_engine::model::{model_as_mut, BlockTp, Model, Parallelize};
use titan_engine::parallel::ac::AcConfig;
use titan_engine::params::ParamId;

/// `ModelSpec::parallelize` of Llama 3.
pub fn parallelize_llama3(model: &mut dyn Model, p: &Parallelize) -> Result<()> {
    let model = model_as_mut::<Llama3>(model, "llama3")?;
    apply_tp(model, p)?;
    let ac = &p.job.activation_checkpoint;
    apply_ac(model, AcConfig::parse(&ac.mode, &ac.selective_ac_option)?);
    apply_fsdp(model, p);
    Ok(())
}

/// torchtitan's `apply_tp` (sequence parallel and loss parallel are the engine's defaults).
pub fn apply_tp(model: &Llama3, p: &Parallelize) -> Result<()> {
    let c = &model.config;
    let blocks = model.layers.iter().map(|b| {
        let (a, f) = (&b.attention, &b.feed_forward);
        BlockTp {
            colwise: vec![a.wq, a.wk, a.wv, f.w1, f.w3],
            rowwise: vec![a.wo, f.w2],
        }
    });
    let heads = (c.n_heads, c.kv_heads());
    p.tensor_parallel_decoder("llama3", heads, model.tok_embeddings, blocks, model.output)
}

/// torchtitan's `apply_fsdp`: the embedding, each block, then norm + output as FSDP units.
pub fn apply_fsdp(model: &Llama3, p: &Parallelize) {
    let blocks = model.layers.iter().map(block_params);
    p.fully_shard_decoder(model.tok_embeddings, blocks, model.norm, model.output);
}

fn block_params(b: &TransformerBlock) -> Vec<ParamId> {
    let (a, f) = (&b.attention, &b.feed_forward);
    let norms = [b.attention_norm, b.ffn_norm];
    [a.wq, a.wk, a.wv, a.wo, f.w1, f.w2, f.w3]
        .into_iter()
        .chain(norms)
        .collect()
}

/// torchtitan's `apply_ac`: one policy per transformer block.
pub fn apply_ac(model: &mut Llama3, ac: AcConfig) {
    for layer in &mut model.layers {
        layer.ac = ac.block_policy(layer.layer_id);
    }
}
