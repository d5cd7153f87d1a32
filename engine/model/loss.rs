//! The loss every causal language model here trains with (torchtitan's `build_cross_entropy_loss`).

use crate::error::Result;
use crate::tape::{Tape, Tensor};

/// Tokens whose label equals this are not scored (Hugging Face's and torchtitan's convention).
pub const IGNORE_INDEX: i32 = -100;

/// `loss(tape, logits [batch, seq, vocab], labels [batch * seq] i32, grad_scale)`: the summed loss
/// over scored labels, whose gradient is `grad_scale` times that of the sum (1 / tokens of the
/// global batch gives the global mean, so accumulation and data parallelism agree).
pub type LossFn = fn(&mut Tape, Tensor, Tensor, f32) -> Result<Tensor>;

/// Summed next-token cross-entropy, fused with its gradient (the logits buffer is reused).
pub fn cross_entropy_loss(
    t: &mut Tape,
    logits: Tensor,
    labels: Tensor,
    grad_scale: f32,
) -> Result<Tensor> {
    let dims = t.dims(logits);
    let vocab = *dims.last().unwrap_or(&0);
    let rows = t.shape(logits).rows();
    let flat = t.reshape(logits, [rows, vocab])?;
    t.cross_entropy(flat, labels, IGNORE_INDEX, grad_scale)
}
