//! Pipeline stages of Qwen3: contiguous runs of transformer blocks, the embedding on the first
//! stage, the final norm and output projection on the last (torchtitan's split, the engine's
//! `split_decoder`); a tied output makes the last stage hold a copy of the embedding, whose
//! gradient the trainer sums with the first stage's.

use titan_engine::error::Result;
use titan_engine::model::ModelArgs;
use titan_engine::parallel::pipeline::{split_decoder, SplitSpec, Stage};

/// `ModelSpec::pipeline_split` of Qwen3.
pub fn pipeline_qwen3(args: &dyn ModelArgs, split: &SplitSpec) -> Result<Vec<Stage>> {
    split_decoder(args.n_layers(), split)
}
