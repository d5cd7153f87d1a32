//! Pipeline stages of Qwen3: contiguous runs of transformer blocks, the embedding on the first
//! stage, the final norm and output projection on the last (the engine's generic split; a tied
//! output reads the first stage's embedding, which the pipeline schedule must then share).

use titan_engine::error::Result;
use titan_engine::model::ModelArgs;
use titan_engine::parallel::pipeline::{split_stages, Stage};

/// `ModelSpec::pipeline_split` of Qwen3.
pub fn pipeline_qwen3(args: &dyn ModelArgs, stages: usize) -> Result<Vec<Stage>> {
    split_stages(args.n_layers(), stages)
}
