//! Pipeline stages of Llama 3: contiguous runs of transformer blocks, the embedding on the first
//! stage, the final norm and output projection on the last (the engine's generic split).

use titan_engine::error::Result;
use titan_engine::model::ModelArgs;
use titan_engine::parallel::pipeline::{split_stages, Stage};

/// `ModelSpec::pipeline_split` of Llama 3.
pub fn pipeline_llama3(args: &dyn ModelArgs, stages: usize) -> Result<Vec<Stage>> {
    split_stages(args.n_layers(), stages)
}
