//! Applies training techniques to a Qwen3 model from outside the model code, in torchtitan's
//! order: tensor parallel -> activation checkpointing -> fusion / graph capture -> FSDP. Under
//! TP the per-head q/k norms stay replicated and work on head shards; the tape all-reduces their
//! partial gradients.

use crate::qwen3::model::model::TransformerBlock;
use crate::qwen3::Qwen3;
use titan_engine::error::Result;
use titan_engine::model::{model_as_mut, BlockTp, Model, Parallelize};
use titan_engine::parallel::ac::AcConfig;
use titan_engine::params::ParamId;

/// `ModelSpec::parallelize` of Qwen3.
pub fn parallelize_qwen3(model: &mut dyn Model, p: &Parallelize) -> Result<()> {
    let model = model_as_mut::<Qwen3>(model, "qwen3")?;
    let blocks = model.layers.iter().map(|b| {
        let (a, f) = (&b.attention, &b.feed_forward);
        BlockTp {
            colwise: vec![a.wq, a.wk, a.wv, f.w1, f.w3],
            rowwise: vec![a.wo, f.w2],
        }
    });
    let c = &model.config;
    let heads = (c.n_heads, c.n_kv_heads);
    p.tensor_parallel_decoder("qwen3", heads, model.tok_embeddings, blocks, model.output)?;
    let ac = &p.job.activation_checkpoint;
    let ac = AcConfig::parse(&ac.mode, &ac.selective_ac_option)?;
    for layer in &mut model.layers {
        layer.ac = ac.block_policy(layer.layer_id);
    }
    // FSDP as Llama 3's; the q/k norms are in their block's unit.
    let blocks = model.layers.iter().map(block_params);
    p.fully_shard_decoder(model.tok_embeddings, blocks, model.norm, model.output);
    Ok(())
}

fn block_params(b: &TransformerBlock) -> Vec<ParamId> {
    let (a, f) = (&b.attention, &b.feed_forward);
    let norms = [a.q_norm, a.k_norm, b.attention_norm, b.ffn_norm];
    [a.wq, a.wk, a.wv, a.wo, f.w1, f.w2, f.w3]
        .into_iter()
        .chain(norms)
        .collect()
}
