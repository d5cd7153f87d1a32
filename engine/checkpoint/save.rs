//! Writing: every rank calls `write_shard` into the same temp folder; after a barrier one rank
//! calls `commit`, which builds the manifest from the shard files' own headers (so ranks never
//! ship metadata to each other), syncs, renames the folder into place and prunes old steps.
//! `save` does both for a process that holds every rank's tensors (one rank, or ranks as threads).

use super::manifest::{Manifest, ShardEntry, TensorEntry, FORMAT_NAME, FORMAT_VERSION};
use super::{checksum, numel, shard_file_name, st_dtype, step_dir, NamedTensor, MANIFEST_FILE};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::tensor::DType;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

/// Header metadata key holding this file's per-tensor shard placement (JSON).
pub(super) const SHARDS_KEY: &str = "titan.shards";

/// The non-tensor state saved with a checkpoint.
#[derive(Clone, Debug, Default)]
pub struct CheckpointMeta {
    /// `JobConfig::to_toml_string()` of the run.
    pub config_toml: String,
    pub parallel: serde_json::Value,
    pub dataloader: serde_json::Value,
    pub rng: serde_json::Value,
    pub lr_scheduler: serde_json::Value,
    pub extra: serde_json::Value,
}

/// Where a tensor's shard sits in the global tensor, stored in the shard file's header.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Placement {
    pub global_shape: Vec<usize>,
    pub offset: Vec<usize>,
    pub checksum: String,
}

/// Saves from one process: `ranks[r]` are rank r's tensors. Returns the `step-N` folder.
pub struct CheckpointWriter {
    pub root: PathBuf,
    /// Keep only the newest k checkpoints (0 = all).
    pub keep_latest_k: usize,
}

impl CheckpointWriter {
    pub fn new(root: impl Into<PathBuf>, keep_latest_k: usize) -> Self {
        CheckpointWriter {
            root: root.into(),
            keep_latest_k,
        }
    }

    pub fn save(
        &self,
        step: u64,
        ranks: &[Vec<NamedTensor>],
        meta: &CheckpointMeta,
    ) -> Result<PathBuf> {
        save(&self.root, step, ranks, meta, self.keep_latest_k)
    }
}

/// `write_shard` for every rank, then `commit`, under a temp folder tagged with this pid.
pub fn save(
    root: &Path,
    step: u64,
    ranks: &[Vec<NamedTensor>],
    meta: &CheckpointMeta,
    keep_latest_k: usize,
) -> Result<PathBuf> {
    if ranks.is_empty() {
        return Err(Error::Checkpoint(format!(
            "{}: save of step {step} with no ranks",
            root.display()
        )));
    }
    let tmp = tmp_dir(root, step, u64::from(std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp); // a leftover of an earlier crashed save by this pid
    let result = ranks
        .iter()
        .enumerate()
        .try_for_each(|(rank, tensors)| write_shard(&tmp, step, rank, ranks.len(), tensors))
        .and_then(|()| commit(root, step, &tmp, ranks.len(), meta, keep_latest_k));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp); // nothing half-written stays behind
    }
    result
}

/// `<root>/step-N.tmp-<tag>`. All ranks of one save must use the same tag (e.g. rank 0's pid,
/// broadcast); a tag never names a finished checkpoint.
pub fn tmp_dir(root: &Path, step: u64, tag: u64) -> PathBuf {
    root.join(format!("step-{step}.tmp-{tag}"))
}

struct ShardView<'a> {
    dtype: DType,
    shape: &'a [usize],
    bytes: &'a [u8],
    /// The serializer asks for each tensor's data once, as it writes it.
    bar: &'a Progress,
}

impl safetensors::View for ShardView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        st_dtype(self.dtype)
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        self.bar.add(self.bytes.len() as u64);
        Cow::Borrowed(self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes and syncs one rank's shard file into `tmp` (created if needed).
pub fn write_shard(
    tmp: &Path,
    step: u64,
    rank: usize,
    world_size: usize,
    tensors: &[NamedTensor],
) -> Result<()> {
    std::fs::create_dir_all(tmp).map_err(|e| Error::io(tmp, e))?;
    let path = tmp.join(shard_file_name(rank));
    let total = tensors.iter().map(|t| t.bytes.len() as u64).sum();
    let label = match world_size {
        1 => format!("saving checkpoint step {step}"),
        _ => format!("saving checkpoint step {step} (rank {rank})"),
    };
    let bar = Progress::new(label, total, true);
    let mut placements = BTreeMap::new();
    let mut views = Vec::with_capacity(tensors.len());
    for t in tensors {
        let what = || format!("{}: tensor '{}' (rank {rank})", path.display(), t.name);
        let nd = t.shape.len();
        if t.global_shape.len() != nd || t.offset.len() != nd {
            return Err(Error::Checkpoint(format!(
                "{}: shape {:?}, global shape {:?} and offset {:?} must have the same rank",
                what(),
                t.shape,
                t.global_shape,
                t.offset
            )));
        }
        if (0..nd).any(|d| t.offset[d] + t.shape[d] > t.global_shape[d]) {
            return Err(Error::Checkpoint(format!(
                "{}: shard at {:?} of shape {:?} does not fit in global shape {:?}",
                what(),
                t.offset,
                t.shape,
                t.global_shape
            )));
        }
        if t.bytes.len() != numel(&t.shape) * t.dtype.size() {
            return Err(Error::Checkpoint(format!(
                "{}: {} bytes given for shape {:?} of {}",
                what(),
                t.bytes.len(),
                t.shape,
                t.dtype
            )));
        }
        if t.name.starts_with("__") || placements.contains_key(&t.name) {
            return Err(Error::Checkpoint(format!(
                "{}: duplicate or reserved name",
                what()
            )));
        }
        let p = Placement {
            global_shape: t.global_shape.clone(),
            offset: t.offset.clone(),
            checksum: format!("{:016x}", checksum(t.bytes)),
        };
        placements.insert(t.name.clone(), p);
        views.push((
            t.name.clone(),
            ShardView {
                dtype: t.dtype,
                shape: &t.shape,
                bytes: t.bytes,
                bar: &bar,
            },
        ));
    }
    let mut info = HashMap::new();
    info.insert("format".to_string(), FORMAT_NAME.to_string());
    info.insert("titan.step".to_string(), step.to_string());
    info.insert("titan.rank".to_string(), rank.to_string());
    info.insert("titan.world_size".to_string(), world_size.to_string());
    let json = serde_json::to_string(&placements).map_err(|e| Error::Checkpoint(e.to_string()))?;
    info.insert(SHARDS_KEY.to_string(), json);
    safetensors::serialize_to_file(views, Some(info), &path)
        .map_err(|e| Error::Checkpoint(format!("{}: write failed: {e}", path.display())))?;
    sync_path(&path)?;
    bar.finish();
    Ok(())
}

/// Builds and writes the manifest from the `world_size` shard files in `tmp`, makes the folder
/// durable, renames it to `step-N` (replacing an older folder of the same step), then removes
/// stale temp folders and all but the newest `keep_latest_k` steps (0 = keep all).
pub fn commit(
    root: &Path,
    step: u64,
    tmp: &Path,
    world_size: usize,
    meta: &CheckpointMeta,
    keep_latest_k: usize,
) -> Result<PathBuf> {
    let mut tensors: BTreeMap<String, TensorEntry> = BTreeMap::new();
    for rank in 0..world_size {
        let file = shard_file_name(rank);
        let path = tmp.join(&file);
        let shard = super::load::ShardFile::open(&path)?;
        let header = shard.header(&path)?;
        let placements = super::load::placements(&header, &path)?;
        for (name, info) in header.tensors() {
            let p = placements.get(&name).ok_or_else(|| {
                Error::Checkpoint(format!(
                    "{}: tensor '{name}' has no placement",
                    path.display()
                ))
            })?;
            let dtype = super::load::titan_dtype(info.dtype, &path, &name)?;
            let entry = tensors.entry(name.clone()).or_insert_with(|| TensorEntry {
                dtype,
                shape: p.global_shape.clone(),
                shards: Vec::new(),
            });
            if entry.dtype != dtype || entry.shape != p.global_shape {
                return Err(Error::Checkpoint(format!(
                    "{}: tensor '{name}' is {dtype} {:?} here but {} {:?} on another rank",
                    path.display(),
                    p.global_shape,
                    entry.dtype,
                    entry.shape
                )));
            }
            entry.shards.push(ShardEntry {
                rank,
                file: file.clone(),
                offset: p.offset.clone(),
                shape: info.shape.clone(),
                checksum: p.checksum.clone(),
            });
        }
    }
    let manifest = Manifest {
        format: FORMAT_NAME.to_string(),
        version: FORMAT_VERSION,
        step,
        world_size,
        parallel: meta.parallel.clone(),
        config: meta.config_toml.clone(),
        dataloader: meta.dataloader.clone(),
        rng: meta.rng.clone(),
        lr_scheduler: meta.lr_scheduler.clone(),
        extra: meta.extra.clone(),
        tensors,
    };
    manifest.check_layout(&tmp.display().to_string())?;
    let mpath = tmp.join(MANIFEST_FILE);
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|e| Error::Checkpoint(e.to_string()))?;
    std::fs::write(&mpath, text).map_err(|e| Error::io(&mpath, e))?;
    sync_path(&mpath)?;
    sync_path(tmp)?;

    let dest = step_dir(root, step);
    let old = root.join(format!("step-{step}.old-{}", std::process::id()));
    let replaced = dest.exists();
    if replaced {
        std::fs::rename(&dest, &old).map_err(|e| Error::io(&dest, e))?;
    }
    std::fs::rename(tmp, &dest).map_err(|e| Error::io(tmp, e))?;
    sync_path(root)?;
    if replaced {
        let _ = std::fs::remove_dir_all(&old);
    }
    cleanup(root, &dest, keep_latest_k)?;
    Ok(dest)
}

/// Removes leftover temp folders and steps beyond the newest `keep` (the new one is complete by now).
fn cleanup(root: &Path, keep_dir: &Path, keep: usize) -> Result<()> {
    let rd = std::fs::read_dir(root).map_err(|e| Error::io(root, e))?;
    for entry in rd.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("step-") && (name.contains(".tmp-") || name.contains(".old-")) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    if keep > 0 {
        let steps = super::available_steps(root)?;
        for &s in steps.iter().take(steps.len().saturating_sub(keep)) {
            let dir = step_dir(root, s);
            if dir != keep_dir {
                std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            }
        }
    }
    Ok(())
}

/// Removes the `step-N.tmp-*` folders under `root`: saves that a process died in the middle of
/// (a finished save renames its folder). Call only while holding the dump folder's run lock, so
/// no live save is among them. Returns the folders removed.
pub fn remove_partial_saves(root: &Path) -> Result<Vec<PathBuf>> {
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(root, e)),
    };
    let mut removed = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("step-") && name.contains(".tmp-") {
            let path = entry.path();
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
            removed.push(path);
        }
    }
    removed.sort();
    Ok(removed)
}

/// fsync a file or folder so a rename after it cannot expose unwritten data.
fn sync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}
