//! `titan convert` (Hugging Face <-> titan native checkpoints) and `titan eval --hf-checkpoint`.

use crate::checkpoint::hf::{
    f32_to_bytes, parse_export_dtype, write_f32_file, write_hf, HfCheckpoint, HfOut, HF_CONFIG,
};
use crate::checkpoint::{self, CheckpointMeta, LoadedCheckpoint, NamedTensor, MANIFEST_FILE};
use crate::data::read_token_batches;
use crate::error::{Error, Result};
use crate::models::llama3::model::model::IGNORE_INDEX;
use crate::models::llama3::model::state_dict_adapter::{
    hf_config_from_llama3, llama3_config_from_hf, Llama3StateDictAdapter,
};
use crate::models::llama3::{self, Llama3, Llama3Config};
use crate::models::state_dict::{load_hf, read_hf_params};
use crate::params::{ParamSpec, ParamStore, ParamStoreBuilder};
use crate::tape::{Placement, Tape};
use crate::tensor::DType;
use crate::train::config::JobConfig;
use crate::train::device::select_backend;
use crate::train::hf::manifest_model_config;
use std::path::Path;

/// The parameters (names, shapes) of an architecture, without allocating them.
fn param_specs(c: &Llama3Config) -> Result<Vec<ParamSpec>> {
    let mut b = ParamStoreBuilder::default();
    Llama3::new(c.clone(), &mut b)?;
    Ok(b.params)
}

/// `titan convert --from hf|titan SRC --to titan|hf DST`.
pub fn convert(
    from: &str,
    src: &Path,
    to: &str,
    dst: &Path,
    step: Option<u64>,
    dtype: &str,
    max_shard_mb: usize,
) -> Result<()> {
    match (from, to) {
        ("hf", "titan") => {
            let dir = hf_to_titan(src, dst)?;
            println!("titan: wrote titan checkpoint {}", dir.display());
            Ok(())
        }
        ("titan", "hf") => {
            titan_to_hf(src, step, dst, dtype, max_shard_mb << 20)?;
            println!("titan: wrote Hugging Face checkpoint {}", dst.display());
            Ok(())
        }
        _ => Err(Error::Config(format!(
            "convert --from {from} --to {to}: supported are --from hf --to titan and --from titan --to hf"
        ))),
    }
}

/// Writes `<dst>/step-0`: the weights as f32 masters, zero AdamW moments, no data position, and
/// the architecture in the manifest, so `titan eval --checkpoint DST` and a training run with
/// `checkpoint.folder` pointing there (or `initial_load_path` = `DST/step-0`) load it.
pub fn hf_to_titan(src: &Path, dst: &Path) -> Result<std::path::PathBuf> {
    let existing = checkpoint::available_steps(dst)?;
    if !existing.is_empty() {
        return Err(Error::Checkpoint(format!(
            "{}: already holds titan checkpoints (steps {existing:?}); convert into a new folder",
            dst.display()
        )));
    }
    let mc = llama3_config_from_hf(&src.join(HF_CONFIG))?;
    let specs = param_specs(&mc)?;
    let ck = HfCheckpoint::open(src)?;
    let mut data: Vec<Vec<f32>> = vec![Vec::new(); specs.len()];
    read_hf_params(&Llama3StateDictAdapter::new(&mc), &ck, &specs, |i, d| {
        data[i] = d;
        Ok(())
    })?;
    let zeros = vec![0f32; specs.iter().map(|s| s.shape.numel()).max().unwrap_or(0)];
    let mut tensors = Vec::with_capacity(3 * specs.len());
    for (s, d) in specs.iter().zip(&data) {
        let n = d.len();
        for (key, vals) in [
            (format!("model.{}", s.name), &d[..]),
            (format!("optim.exp_avg.{}", s.name), &zeros[..n]),
            (format!("optim.exp_avg_sq.{}", s.name), &zeros[..n]),
        ] {
            tensors.push(NamedTensor::full(
                &key,
                DType::F32,
                &s.shape.0,
                bytemuck::cast_slice(vals),
            ));
        }
    }
    let mut cfg = JobConfig::default();
    cfg.training.seq_len = mc.max_seq_len as i64;
    cfg.model.hf_assets_path = src.display().to_string();
    let meta = CheckpointMeta {
        config_toml: cfg.to_toml_string()?,
        parallel: serde_json::json!({"world_size": 1, "dp_shard": 1, "dp_replicate": 1, "tp": 1, "pp": 1, "cp": 1}),
        dataloader: serde_json::Value::Null,
        rng: serde_json::json!({}),
        lr_scheduler: serde_json::json!({"step": 0}),
        extra: serde_json::json!({"model": "llama3", "llama3_config": mc,
            "converted_from": src.display().to_string()}),
    };
    checkpoint::save(dst, 0, &[tensors], &meta, 0)
}

/// A titan checkpoint root (newest step, or `step`) or one `step-N` folder.
fn open_titan(src: &Path, step: Option<u64>) -> Result<LoadedCheckpoint> {
    if src.join(MANIFEST_FILE).is_file() {
        checkpoint::load_dir(src)
    } else {
        checkpoint::load(src, step)
    }
}

/// The architecture a titan checkpoint was saved with (recorded, or its config's flavor).
fn titan_model_config(ck: &LoadedCheckpoint) -> Result<Llama3Config> {
    if let Some(c) = manifest_model_config(&ck.manifest)? {
        return Ok(c);
    }
    let origin = format!("{}/{MANIFEST_FILE}", ck.dir.display());
    let cfg = JobConfig::from_toml_str(&ck.manifest.config, &origin, &[])?;
    let vocab = ck.entry("model.tok_embeddings.weight")?.shape[0];
    let mut c = llama3::flavor(&cfg.model.flavor)?;
    c.update_from_training(cfg.training.seq_len as usize, Some(vocab))?;
    Ok(c)
}

/// Writes the model weights of a titan checkpoint as a Hugging Face folder in `dtype`.
pub fn titan_to_hf(
    src: &Path,
    step: Option<u64>,
    dst: &Path,
    dtype: &str,
    max_shard_bytes: usize,
) -> Result<()> {
    let ck = open_titan(src, step)?;
    let mc = titan_model_config(&ck)?;
    let specs = param_specs(&mc)?;
    let st_dtype = parse_export_dtype(dtype)?;
    let adapter = Llama3StateDictAdapter::new(&mc);
    use crate::models::state_dict::StateDictAdapter;
    let outs = specs
        .iter()
        .map(|s| {
            Ok(HfOut {
                name: adapter.to_hf(&s.name)?,
                shape: s.shape.0.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let config = hf_config_from_llama3(&mc, dtype);
    write_hf(dst, &config, &outs, st_dtype, max_shard_bytes, |i| {
        let key = format!("model.{}", specs[i].name);
        let e = ck.entry(&key)?;
        if e.dtype != DType::F32 || e.shape != specs[i].shape.0 {
            return Err(Error::Checkpoint(format!(
                "{}: tensor {key} is {} {:?}, expected f32 {}",
                ck.dir.display(),
                e.dtype,
                e.shape,
                specs[i].shape
            )));
        }
        let bytes = ck.read_global(&key)?;
        let f: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        f32_to_bytes(&f, st_dtype)
    })
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
/// The loss is transformers' `LlamaForCausalLM(input_ids, labels=input_ids)`: the mean over all
/// sequences of cross-entropy of position t's logits against id t+1.
pub fn eval_hf(
    dir: &Path,
    tokens: &Path,
    seq_len: Option<usize>,
    keep_logits: bool,
    device: &str,
) -> Result<HfEval> {
    let mut mc = llama3_config_from_hf(&dir.join(HF_CONFIG))?;
    let batches = read_token_batches(tokens, seq_len, 8, Some(mc.vocab_size))?;
    let n = batches.iter().map(|b| b.seq + 1).max().unwrap_or(1);
    mc.max_seq_len = n;
    mc.validate()
        .map_err(|e| Error::Config(format!("{}: {e}", dir.display())))?;
    let be = select_backend(device)?;
    let mut b = ParamStoreBuilder::default();
    let model = Llama3::new(mc.clone(), &mut b)?;
    // f32 on the CPU reference (parity with transformers' float32 model); the CUDA kernels
    // compute attention in bf16 only, so CUDA evaluates in the trainer's mixed precision.
    let dtype = if be.name() == "cpu" {
        DType::F32
    } else {
        DType::BF16
    };
    let store = ParamStore::materialize(b, be.as_ref(), dtype)?;
    let ck = HfCheckpoint::open(dir)?;
    load_hf(&Llama3StateDictAdapter::new(&mc), &ck, &store, be.as_ref())?;
    drop(ck);
    let v = mc.vocab_size;
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
        let flat = tape.reshape(logits, [bsz * (s + 1), v])?;
        let loss = tape.cross_entropy(flat, tl, IGNORE_INDEX, 1.0)?;
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
        logits: keep_logits.then(|| (vec![rows, n, v], logits_out)),
    })
}

/// `titan eval --hf-checkpoint DIR`: prints `{"loss": .., "tokens": ..}`; optionally writes the
/// logits (f32 [sequences, ids per sequence, vocab], tensor "logits") to a safetensors file.
pub fn eval_hf_cli(
    dir: &Path,
    tokens: &Path,
    seq_len: Option<usize>,
    dump: Option<&Path>,
    device: &str,
) -> Result<()> {
    let r = eval_hf(dir, tokens, seq_len, dump.is_some(), device)?;
    if let (Some(path), Some((shape, data))) = (dump, &r.logits) {
        write_f32_file(path, "logits", shape, data)?;
    }
    println!(
        "{}",
        serde_json::json!({"loss": r.loss, "tokens": r.tokens})
    );
    Ok(())
}
