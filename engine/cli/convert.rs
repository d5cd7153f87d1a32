//! `titan convert`: Hugging Face <-> titan native checkpoints, for any registered model (a
//! Hugging Face folder's model is chosen by its `config.json` `model_type`, a titan
//! checkpoint's by its config's `model.name`).

use crate::checkpoint::hf_folder::{
    f32_to_bytes, parse_export_dtype, write_hf, HfCheckpoint, HfOut,
};
use crate::checkpoint::{self, CheckpointMeta, LoadedCheckpoint, NamedTensor, MANIFEST_FILE};
use crate::error::{Error, Result};
use crate::model::state_dict::read_hf_params;
use crate::model::{resolve, Registry};
use crate::outln;
use crate::tensor::DType;
use crate::train::config::JobConfig;
use std::path::Path;

/// What `titan convert` was asked.
pub struct Convert<'a> {
    /// Source format (hf or titan) and folder.
    pub from: (&'a str, &'a Path),
    /// Target format (titan or hf) and folder.
    pub to: (&'a str, &'a Path),
    /// Which titan step to export (default: the newest).
    pub step: Option<u64>,
    /// Hugging Face export dtype.
    pub dtype: &'a str,
    /// Hugging Face shard size cap in MiB (0 = one file).
    pub max_shard_mb: usize,
}

/// `titan convert --from hf|titan SRC --to titan|hf DST`.
pub fn convert(reg: &Registry, c: &Convert) -> Result<()> {
    let ((from, src), (to, dst)) = (c.from, c.to);
    let (step, dtype, max_shard_mb) = (c.step, c.dtype, c.max_shard_mb);
    match (from, to) {
        ("hf", "titan") => {
            let dir = hf_to_titan(reg, src, dst)?;
            outln!("titan: wrote titan checkpoint {}", dir.display())?;
            Ok(())
        }
        ("titan", "hf") => {
            titan_to_hf(reg, src, step, dst, dtype, max_shard_mb << 20)?;
            outln!("titan: wrote Hugging Face checkpoint {}", dst.display())?;
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
pub fn hf_to_titan(reg: &Registry, src: &Path, dst: &Path) -> Result<std::path::PathBuf> {
    let existing = checkpoint::available_steps(dst)?;
    if !existing.is_empty() {
        return Err(Error::Checkpoint(format!(
            "{}: already holds titan checkpoints (steps {existing:?}); convert into a new folder",
            dst.display()
        )));
    }
    let (spec, args) = resolve::hf_folder_args(reg, src)?;
    let specs = spec.param_specs(args.as_ref())?;
    let ck = HfCheckpoint::open(src)?;
    let mut data: Vec<Vec<f32>> = vec![Vec::new(); specs.len()];
    let adapter = (spec.state_dict_adapter)(args.as_ref())?;
    read_hf_params(adapter.as_ref(), &ck, &specs, |i, d| {
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
    cfg.model.name = spec.name.to_string();
    cfg.training.seq_len = args.max_seq_len() as i64;
    cfg.model.hf_assets_path = src.display().to_string();
    let meta = CheckpointMeta {
        config_toml: cfg.to_toml_string()?,
        parallel: serde_json::json!({"world_size": 1, "dp_shard": 1, "dp_replicate": 1, "tp": 1, "pp": 1, "cp": 1}),
        dataloader: serde_json::Value::Null,
        rng: serde_json::json!({}),
        lr_scheduler: serde_json::json!({"step": 0}),
        extra: {
            let mut e = resolve::manifest_record(&cfg, args.as_ref());
            e["converted_from"] = src.display().to_string().into();
            e
        },
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

/// Writes the model weights of a titan checkpoint as a Hugging Face folder in `dtype`.
pub fn titan_to_hf(
    reg: &Registry,
    src: &Path,
    step: Option<u64>,
    dst: &Path,
    dtype: &str,
    max_shard_bytes: usize,
) -> Result<()> {
    let ck = open_titan(src, step)?;
    let seq = resolve::checkpoint_job(&ck)?.training.seq_len as usize;
    let (spec, args) = resolve::checkpoint_args(reg, &ck, seq)?;
    let specs = spec.param_specs(args.as_ref())?;
    let st_dtype = parse_export_dtype(dtype)?;
    let adapter = (spec.state_dict_adapter)(args.as_ref())?;
    let outs = specs
        .iter()
        .map(|s| {
            Ok(HfOut {
                name: adapter.to_hf(&s.name)?,
                shape: s.shape.0.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let config = (spec.hf.to_config)(args.as_ref(), dtype)?;
    write_hf(dst, &config, &outs, st_dtype, max_shard_bytes, |i| {
        let key = format!("model.{}", specs[i].name);
        let bytes = ck.read_f32_of(&key, &specs[i].shape)?;
        let f: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        f32_to_bytes(&f, st_dtype)
    })
}
