//! `manifest.json`: everything needed to resume besides the tensor bytes, and where those are.

use crate::error::{Error, Result};
use crate::tensor::DType;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

pub const FORMAT_NAME: &str = "titan-checkpoint";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub step: u64,
    /// Ranks that wrote shard files (rank-00000 .. rank-{world_size-1}).
    pub world_size: usize,
    /// The parallel layout of the writing run (degrees, mesh order), as the trainer describes it.
    pub parallel: serde_json::Value,
    /// The merged job config, as TOML.
    pub config: String,
    pub dataloader: serde_json::Value,
    pub rng: serde_json::Value,
    pub lr_scheduler: serde_json::Value,
    /// Anything else the trainer wants back (loss-scale, token count, ...).
    #[serde(default)]
    pub extra: serde_json::Value,
    pub tensors: BTreeMap<String, TensorEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub dtype: DType,
    /// The global (unsharded) shape.
    pub shape: Vec<usize>,
    /// The boxes ranks hold; identical boxes (replicas) may appear more than once.
    pub shards: Vec<ShardEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    pub rank: usize,
    pub file: String,
    /// Start of the box in each global dim.
    pub offset: Vec<usize>,
    /// The box's (local) shape.
    pub shape: Vec<usize>,
    /// `checkpoint::checksum` of the shard's bytes, hex.
    pub checksum: String,
}

impl Manifest {
    pub fn read(path: &Path) -> Result<Manifest> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Checkpoint(format!(
                    "{}: missing (incomplete checkpoint, or not a titan checkpoint folder)",
                    path.display()
                )))
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::Checkpoint(format!("{}: corrupt manifest: {e}", path.display())))?;
        if m.format != FORMAT_NAME || m.version != FORMAT_VERSION {
            return Err(Error::Checkpoint(format!(
                "{}: format '{}' version {} is not supported (expected '{FORMAT_NAME}' version {FORMAT_VERSION})",
                path.display(),
                m.format,
                m.version
            )));
        }
        Ok(m)
    }

    /// Checks that every tensor's shards lie inside it and tile it exactly (replicas allowed).
    pub fn check_layout(&self, origin: &str) -> Result<()> {
        for (name, t) in &self.tensors {
            check_tiling(t)
                .map_err(|m| Error::Checkpoint(format!("{origin}: tensor '{name}': {m}")))?;
            for s in &t.shards {
                if s.rank >= self.world_size {
                    return Err(Error::Checkpoint(format!(
                        "{origin}: tensor '{name}': shard on rank {} but world size is {}",
                        s.rank, self.world_size
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The distinct boxes must lie inside the global shape, not overlap, and cover its volume.
fn check_tiling(t: &TensorEntry) -> std::result::Result<(), String> {
    let nd = t.shape.len();
    let mut boxes: Vec<(&[usize], &[usize])> = Vec::new();
    let mut seen = HashSet::new();
    for s in &t.shards {
        if s.offset.len() != nd || s.shape.len() != nd {
            return Err(format!(
                "shard on rank {} has rank-{} box for a rank-{nd} tensor",
                s.rank,
                s.shape.len()
            ));
        }
        for d in 0..nd {
            let end = s.offset[d].saturating_add(s.shape[d]);
            if end > t.shape[d] {
                return Err(format!(
                    "shard on rank {} spans {}..{end} of dim {d}, beyond its size {}",
                    s.rank, s.offset[d], t.shape[d]
                ));
            }
        }
        let b = (s.offset.as_slice(), s.shape.as_slice());
        if seen.insert(b) {
            boxes.push(b);
        }
    }
    let volume = |shape: &[usize]| shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let total = volume(&t.shape).ok_or_else(|| format!("shape {:?} is too large", t.shape))?;
    // Boxes lie inside the tensor, so each volume fits; the sum saturates instead of wrapping.
    let covered = boxes.iter().fold(0usize, |acc, (_, sh)| {
        acc.saturating_add(volume(sh).unwrap_or(usize::MAX))
    });
    // Sweep on dim 0 so the usual dim-0 sharding costs O(n log n), not O(n^2).
    boxes.sort_by_key(|(o, _)| o.first().copied().unwrap_or(0));
    for i in 0..boxes.len() {
        for j in i + 1..boxes.len() {
            if nd > 0 && boxes[j].0[0] >= boxes[i].0[0] + boxes[i].1[0] {
                break;
            }
            if overlaps(boxes[i], boxes[j]) {
                return Err(format!(
                    "shards at offsets {:?} and {:?} overlap",
                    boxes[i].0, boxes[j].0
                ));
            }
        }
    }
    if covered != total {
        return Err(format!(
            "shards cover {covered} of its {total} elements (shape {:?})",
            t.shape
        ));
    }
    Ok(())
}

fn overlaps(a: (&[usize], &[usize]), b: (&[usize], &[usize])) -> bool {
    let empty = |s: &[usize]| s.contains(&0);
    if empty(a.1) || empty(b.1) {
        return false;
    }
    (0..a.0.len()).all(|d| a.0[d] < b.0[d] + b.1[d] && b.0[d] < a.0[d] + a.1[d])
}
