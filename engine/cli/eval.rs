//! `titan eval`: the mean next-token loss of a titan checkpoint or a Hugging Face folder on a
//! token file, for any registered model.

use crate::checkpoint;
use crate::checkpoint::hf_folder::{write_f32_file, HfCheckpoint};
use crate::data::read_token_batches;
use crate::error::{Error, Result};
use crate::model::state_dict::load_hf;
use crate::model::{resolve, Registry, IGNORE_INDEX};
use crate::outln;
use crate::params::ParamStore;
use crate::tape::{Placement, Tape};
use crate::tensor::DType;
use crate::train::device::select_backend;
use std::path::Path;

/// Mean next-token loss over every sequence of the token file.
pub fn eval(
    reg: &Registry,
    root: &Path,
    step: Option<u64>,
    tokens: &Path,
    seq_len: Option<usize>,
    device: &str,
) -> Result<()> {
    let ck = checkpoint::load(root, step)?;
    let mut cfg = resolve::checkpoint_job(&ck)?;
    let be = select_backend(device)?;
    let dtype = crate::train::trainer::compute_dtype(&cfg, be.name())?;
    let (spec, mut args) = resolve::checkpoint_args(reg, &ck, cfg.training.seq_len as usize)?;
    let batches = read_token_batches(tokens, seq_len, 8, Some(args.vocab_size()))?;
    let max_len = batches.iter().map(|b| b.seq).max().unwrap_or(0);
    if max_len as i64 > cfg.training.seq_len {
        cfg.training.seq_len = max_len as i64;
        args.update_from_config(max_len, None)?;
    }
    let (model, builder) = spec.build_for(args.as_ref(), &cfg)?;
    let store = ParamStore::materialize(builder, be.as_ref(), dtype)?;
    for id in store.ids() {
        let key = format!("model.{}", store.name(id));
        be.upload(store.master(id), &ck.read_f32_of(&key, store.shape(id))?)?;
    }
    store.sync_compute(be.as_ref())?;
    let (mut total, mut count) = (0f64, 0usize);
    for b in &batches {
        let mut tape = Tape::new(be.as_ref(), &store, Placement::Owned);
        let ti = tape.input_i32(&b.inputs, [b.batch, b.seq])?;
        let tl = tape.input_i32(&b.labels, [b.batch * b.seq])?;
        let loss = spec.loss_of(model.as_ref(), &mut tape, ti, tl, 1.0)?;
        total += tape.to_vec_f32(loss)?[0] as f64;
        count += b.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    }
    if count == 0 {
        return Err(Error::Data(format!(
            "{}: no sequence with at least 2 tokens",
            tokens.display()
        )));
    }
    outln!(
        "{}",
        serde_json::json!({"loss": total / count as f64, "tokens": count, "step": ck.step()})
    )?;
    Ok(())
}

/// Result of `eval_hf`: mean next-token loss, scored tokens, and (when asked) the logits.
pub struct HfEval {
    pub loss: f64,
    pub tokens: usize,
    /// [sequences, ids per sequence, vocab], as transformers' `model(input_ids).logits`.
    pub logits: Option<(Vec<usize>, Vec<f32>)>,
}

/// Every sequence of the token file through the Hugging Face checkpoint `dir` (f32 compute on
/// the CPU backend, bf16 on CUDA).
/// The loss is transformers' `<Model>ForCausalLM(input_ids, labels=input_ids)`: the mean over
/// all sequences of cross-entropy of position t's logits against id t+1.
pub fn eval_hf(
    reg: &Registry,
    dir: &Path,
    tokens: &Path,
    seq_len: Option<usize>,
    keep_logits: bool,
    device: &str,
) -> Result<HfEval> {
    let (spec, mut args) = resolve::hf_folder_args(reg, dir)?;
    let batches = read_token_batches(tokens, seq_len, 8, Some(args.vocab_size()))?;
    let n = batches.iter().map(|b| b.seq + 1).max().unwrap_or(1);
    args.update_from_config(n, None)
        .map_err(|e| Error::Config(format!("{}: {e}", dir.display())))?;
    let be = select_backend(device)?;
    let mut b = crate::params::ParamStoreBuilder::default();
    let model = (spec.build)(args.as_ref(), &mut b)?;
    // f32 on the CPU reference (parity with transformers' float32 model); the CUDA kernels
    // compute attention in bf16 only, so CUDA evaluates in the trainer's mixed precision.
    let dtype = if be.name() == "cpu" {
        DType::F32
    } else {
        DType::BF16
    };
    let store = ParamStore::materialize(b, be.as_ref(), dtype)?;
    let ck = HfCheckpoint::open(dir)?;
    let adapter = (spec.state_dict_adapter)(args.as_ref())?;
    load_hf(adapter.as_ref(), &ck, &store, be.as_ref())?;
    drop(ck);
    let (mut total, mut count, mut rows) = (0f64, 0usize, 0usize);
    let mut logits_out = Vec::new();
    for batch in &batches {
        let (bsz, s) = (batch.batch, batch.seq);
        let (mut ids, mut labels) = (Vec::new(), Vec::new());
        for r in 0..bsz {
            ids.extend_from_slice(&batch.inputs[r * s..(r + 1) * s]);
            ids.push(batch.labels[r * s + s - 1]);
            labels.extend_from_slice(&batch.labels[r * s..(r + 1) * s]);
            labels.push(IGNORE_INDEX);
        }
        let mut tape = Tape::new(be.as_ref(), &store, Placement::Owned);
        let ti = tape.input_i32(&ids, [bsz, s + 1])?;
        let tl = tape.input_i32(&labels, [bsz * (s + 1)])?;
        let logits = model.forward(&mut tape, ti)?;
        if keep_logits {
            logits_out.extend(tape.to_vec_f32(logits)?);
        }
        let loss = (spec.loss)(&mut tape, logits, tl, 1.0)?;
        total += tape.to_vec_f32(loss)?[0] as f64;
        count += labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        rows += bsz;
    }
    if count == 0 {
        return Err(Error::Data(format!(
            "{}: no token to score",
            tokens.display()
        )));
    }
    Ok(HfEval {
        loss: total / count as f64,
        tokens: count,
        logits: keep_logits.then(|| (vec![rows, n, args.vocab_size()], logits_out)),
    })
}

/// `titan eval --hf-checkpoint DIR`: prints `{"loss": .., "tokens": ..}`; optionally writes the
/// logits (f32 [sequences, ids per sequence, vocab], tensor "logits") to a safetensors file.
pub fn eval_hf_cli(
    reg: &Registry,
    dir: &Path,
    tokens: &Path,
    seq_len: Option<usize>,
    dump: Option<&Path>,
    device: &str,
) -> Result<()> {
    let r = eval_hf(reg, dir, tokens, seq_len, dump.is_some(), device)?;
    if let (Some(path), Some((shape, data))) = (dump, &r.logits) {
        write_f32_file(path, "logits", shape, data)?;
    }
    outln!(
        "{}",
        serde_json::json!({"loss": r.loss, "tokens": r.tokens})
    )?;
    Ok(())
}
