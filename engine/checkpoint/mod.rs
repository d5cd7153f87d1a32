//! Native checkpoints (DESIGN §5): one folder per step,
//! `<dump_folder>/<checkpoint.folder>/step-N/` holding one safetensors file per rank
//! (`rank-00000.safetensors`) and `manifest.json` (step, world size, parallel layout, config,
//! data-loader / RNG / LR-scheduler state, and every tensor's global shape and shard boxes).
//!
//! Atomicity: ranks write into `step-N.tmp-<tag>`; once every rank's file is complete and synced,
//! one rank writes the manifest and renames the folder to `step-N`. A crash at any point leaves
//! the previous `step-N` folders untouched; stale `.tmp-` folders are ignored and later removed.
//!
//! Shards are boxes: each rank stores, per tensor, a dense block given by its offset in every
//! global dim and its local shape (FSDP = a dim-0 slice, TP row-parallel = a dim-1 slice, both =
//! a 2-D block, replicated = the whole tensor). Loading reassembles any box of the global tensor
//! from whichever shards cover it, so a run may resume with a different parallel layout.

pub mod hf_folder;
mod load;
mod manifest;
mod save;

pub use load::{load, load_dir, LoadedCheckpoint};
pub use manifest::{Manifest, ShardEntry, TensorEntry, FORMAT_NAME, FORMAT_VERSION};
pub use save::{
    commit, remove_partial_saves, save, tmp_dir, write_shard, CheckpointMeta, CheckpointWriter,
};

use crate::error::{Error, Result};
use crate::tensor::DType;
use std::path::{Path, PathBuf};

pub const MANIFEST_FILE: &str = "manifest.json";

/// One rank's piece of a tensor, as handed to the writer.
#[derive(Clone, Debug)]
pub struct NamedTensor<'a> {
    pub name: String,
    pub dtype: DType,
    /// The local (shard) shape; `bytes` holds exactly this many elements, row-major.
    pub shape: Vec<usize>,
    pub global_shape: Vec<usize>,
    /// Where the shard starts in each global dim.
    pub offset: Vec<usize>,
    pub bytes: &'a [u8],
}

impl<'a> NamedTensor<'a> {
    /// A whole (unsharded or replicated) tensor.
    pub fn full(name: &str, dtype: DType, shape: &[usize], bytes: &'a [u8]) -> Self {
        NamedTensor {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            global_shape: shape.to_vec(),
            offset: vec![0; shape.len()],
            bytes,
        }
    }

    /// The box `offset .. offset + shape` of a tensor of `global_shape` (a tensor-parallel
    /// slice, further split in rows by FSDP).
    pub fn boxed(
        name: &str,
        dtype: DType,
        global_shape: &[usize],
        offset: &[usize],
        shape: &[usize],
        bytes: &'a [u8],
    ) -> Self {
        NamedTensor {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            global_shape: global_shape.to_vec(),
            offset: offset.to_vec(),
            bytes,
        }
    }

    /// Rows `row_offset .. row_offset + local_shape[0]` of a tensor with `global_rows` rows (FSDP).
    pub fn dim0_shard(
        name: &str,
        dtype: DType,
        local_shape: &[usize],
        global_rows: usize,
        row_offset: usize,
        bytes: &'a [u8],
    ) -> Self {
        let mut global_shape = local_shape.to_vec();
        let mut offset = vec![0; local_shape.len()];
        if let (Some(g), Some(o)) = (global_shape.first_mut(), offset.first_mut()) {
            *g = global_rows;
            *o = row_offset;
        }
        NamedTensor {
            name: name.to_string(),
            dtype,
            shape: local_shape.to_vec(),
            global_shape,
            offset,
            bytes,
        }
    }
}

/// `rank-00003.safetensors`
pub fn shard_file_name(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

/// `<root>/step-N`
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step}"))
}

/// Completed checkpoint steps under `root`, ascending (a missing root has none).
pub fn available_steps(root: &Path) -> Result<Vec<u64>> {
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(root, e)),
    };
    let mut steps = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(root, e))?;
        let name = entry.file_name();
        let Some(n) = name.to_str().and_then(parse_step_name) else {
            continue;
        };
        if entry.path().is_dir() {
            steps.push(n);
        }
    }
    steps.sort_unstable();
    Ok(steps)
}

/// The newest completed step under `root`, if any.
pub fn latest_step(root: &Path) -> Result<Option<u64>> {
    Ok(available_steps(root)?.last().copied())
}

/// "step-12" -> 12; temp folders ("step-12.tmp-99") and anything else -> None.
fn parse_step_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A fast 64-bit checksum of a shard's bytes (not cryptographic: it catches truncation, bit rot
/// and mix-ups). Every step is a bijection of the state for a fixed input word, so changing any
/// single word always changes the result.
pub fn checksum(bytes: &[u8]) -> u64 {
    const K1: u64 = 0x9E37_79B9_7F4A_7C15;
    const K2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    let mut h = 0xCBF2_9CE4_8422_2325 ^ (bytes.len() as u64).wrapping_mul(K2);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("chunks of 8"));
        h = (h ^ w).wrapping_mul(K1).rotate_left(29);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h ^ u64::from_le_bytes(tail))
        .wrapping_mul(K1)
        .rotate_left(29);
    h ^= h >> 33;
    h = h.wrapping_mul(K2);
    h ^ (h >> 29)
}

fn st_dtype(d: DType) -> safetensors::Dtype {
    match d {
        DType::F32 => safetensors::Dtype::F32,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::I32 => safetensors::Dtype::I32,
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}
