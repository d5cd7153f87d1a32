//! Pipeline stages of Llama 3: contiguous runs of transformer blocks, the embedding on the first
//! stage, the final norm and output projection on the last (torchtitan's split, the engine's
//! `split_decoder`).

use titan_engine::error::Result;
use titan_engine::model::ModelArgs;
use titan_engine::parallel::pipeline::{split_decoder, SplitSpec, Stage};

/// `ModelSpec::pipeline_split` of Llama 3.
pub fn pipeline_llama3(args: &dyn ModelArgs, split: &SplitSpec) -> Result<Vec<Stage>> {
    split_decoder(args.n_layers(), split)
}
