//! Reading: memory-maps the shard files named by the manifest, checks headers against it, and
//! assembles any box of a global tensor from the shards that cover it (resharding on load).

use super::manifest::{Manifest, TensorEntry};
use super::save::{Placement, SHARDS_KEY};
use super::{available_steps, checksum, numel, step_dir, MANIFEST_FILE};
use crate::error::{Error, Result};
use crate::tensor::{DType, Shape};
use safetensors::tensor::Metadata;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A mapped shard file.
pub(super) struct ShardFile {
    map: memmap2::Mmap,
}

impl ShardFile {
    pub(super) fn open(path: &Path) -> Result<ShardFile> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Checkpoint(format!(
                    "{}: shard file missing",
                    path.display()
                )))
            }
            Err(e) => return Err(Error::io(path, e)),
        };
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len < 8 {
            return Err(Error::Checkpoint(format!(
                "{}: truncated safetensors file ({len} bytes, shorter than its 8-byte header length)",
                path.display()
            )));
        }
        // SAFETY: the map is read-only and private to this process; checkpoint folders are
        // immutable once renamed into place, and every read is bounds-checked against the header.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(ShardFile { map })
    }

    /// Parses and validates the header; errors say whether the file is truncated or corrupt.
    pub(super) fn header(&self, path: &Path) -> Result<Metadata> {
        use safetensors::SafeTensorError as E;
        let (n, meta) = safetensors::SafeTensors::read_metadata(&self.map).map_err(|e| {
            let what = match &e {
                E::InvalidHeaderLength => "truncated or corrupt safetensors header (length field exceeds the file)".to_string(),
                E::MetadataIncompleteBuffer => format!(
                    "truncated or corrupt safetensors data (file is {} bytes, header describes a different size)",
                    self.map.len()
                ),
                other => format!("corrupt safetensors header: {other}"),
            };
            Error::Checkpoint(format!("{}: {what}", path.display()))
        })?;
        debug_assert!(n + 8 <= self.map.len());
        Ok(meta)
    }

    fn data(&self, meta_len: usize) -> &[u8] {
        &self.map[8 + meta_len..]
    }
}

pub(super) fn placements(header: &Metadata, path: &Path) -> Result<BTreeMap<String, Placement>> {
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(SHARDS_KEY))
        .ok_or_else(|| {
            Error::Checkpoint(format!(
                "{}: not a titan shard file (no '{SHARDS_KEY}' metadata)",
                path.display()
            ))
        })?;
    serde_json::from_str(json).map_err(|e| {
        Error::Checkpoint(format!(
            "{}: corrupt '{SHARDS_KEY}' metadata: {e}",
            path.display()
        ))
    })
}

pub(super) fn titan_dtype(d: safetensors::Dtype, path: &Path, name: &str) -> Result<DType> {
    match d {
        safetensors::Dtype::F32 => Ok(DType::F32),
        safetensors::Dtype::BF16 => Ok(DType::BF16),
        safetensors::Dtype::I32 => Ok(DType::I32),
        other => Err(Error::Checkpoint(format!(
            "{}: tensor '{name}' has dtype {other:?}, which titan does not store",
            path.display()
        ))),
    }
}

/// A shard file opened for reading, with the offset of its data section.
struct OpenShard {
    file: ShardFile,
    header_len: usize,
    header: Metadata,
}

/// A checkpoint ready to read. Shard data is verified against the manifest's checksums the
/// first time each shard is read.
pub struct LoadedCheckpoint {
    pub dir: PathBuf,
    pub manifest: Manifest,
    shards: Vec<OpenShard>,
    verified: Mutex<HashSet<(String, usize)>>,
}

/// Loads `<root>/step-N` (`None` = the newest).
pub fn load(root: &Path, step: Option<u64>) -> Result<LoadedCheckpoint> {
    if !root.is_dir() {
        return Err(Error::Checkpoint(format!(
            "{}: checkpoint folder does not exist",
            root.display()
        )));
    }
    let steps = available_steps(root)?;
    let step = match step {
        Some(s) if steps.contains(&s) => s,
        Some(s) => {
            let list = if steps.is_empty() {
                "none".to_string()
            } else {
                steps
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(Error::Checkpoint(format!(
                "{}: step {s} not found (available steps: {list})",
                root.display()
            )));
        }
        None => *steps.last().ok_or_else(|| {
            Error::Checkpoint(format!(
                "{}: no checkpoint found (no step-N folders)",
                root.display()
            ))
        })?,
    };
    load_dir(&step_dir(root, step))
}

/// Loads one checkpoint folder (e.g. checkpoint.initial_load_path pointing at `.../step-N`).
pub fn load_dir(dir: &Path) -> Result<LoadedCheckpoint> {
    if !dir.is_dir() {
        return Err(Error::Checkpoint(format!(
            "{}: checkpoint folder does not exist",
            dir.display()
        )));
    }
    let manifest = Manifest::read(&dir.join(MANIFEST_FILE))?;
    manifest.check_layout(&dir.join(MANIFEST_FILE).display().to_string())?;
    // Not with_capacity(world_size): a corrupt manifest's world size must fail on the first
    // missing shard file, not on allocating for 2^40 ranks.
    let mut shards = Vec::new();
    for rank in 0..manifest.world_size {
        let path = dir.join(super::shard_file_name(rank));
        let file = ShardFile::open(&path)?;
        let header = file.header(&path)?;
        let header_len = header_len(&file);
        shards.push(OpenShard {
            file,
            header_len,
            header,
        });
    }
    // Every manifest shard must be in its file with the same dtype and shape.
    for (name, t) in &manifest.tensors {
        for s in &t.shards {
            let path = dir.join(&s.file);
            if s.file != super::shard_file_name(s.rank) {
                return Err(Error::Checkpoint(format!(
                    "{}: tensor '{name}' names file {} for rank {}",
                    dir.join(MANIFEST_FILE).display(),
                    s.file,
                    s.rank
                )));
            }
            let info = shards[s.rank].header.info(name).ok_or_else(|| {
                Error::Checkpoint(format!(
                    "{}: tensor '{name}' listed in the manifest is missing",
                    path.display()
                ))
            })?;
            let dtype = titan_dtype(info.dtype, &path, name)?;
            if dtype != t.dtype || info.shape != s.shape {
                return Err(Error::Checkpoint(format!(
                    "{}: tensor '{name}' is {dtype} {:?} in the file but {} {:?} in the manifest",
                    path.display(),
                    info.shape,
                    t.dtype,
                    s.shape
                )));
            }
        }
    }
    Ok(LoadedCheckpoint {
        dir: dir.to_path_buf(),
        manifest,
        shards,
        verified: Mutex::new(HashSet::new()),
    })
}

fn header_len(file: &ShardFile) -> usize {
    u64::from_le_bytes(file.map[..8].try_into().expect("8 bytes checked at open")) as usize
}

impl LoadedCheckpoint {
    pub fn step(&self) -> u64 {
        self.manifest.step
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.manifest.tensors.keys().map(String::as_str)
    }

    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.manifest.tensors.get(name).ok_or_else(|| {
            Error::Checkpoint(format!(
                "{}: no tensor '{name}' in this checkpoint",
                self.dir.display()
            ))
        })
    }

    /// The whole global tensor `name` as f32 bytes, after checking it is f32 of `shape` (a
    /// model parameter or its optimizer state); the error names the folder and the tensor.
    pub fn read_f32_of(&self, name: &str, shape: &Shape) -> Result<Vec<u8>> {
        let rows = shape.dims().first().copied().unwrap_or(1);
        self.read_f32_rows_of(name, shape, 0, rows)
    }

    /// Rows `start .. start + rows` (an FSDP rank's shard, in whatever layout the checkpoint
    /// was saved) of an f32 tensor that must have the model's `shape`.
    pub fn read_f32_rows_of(
        &self,
        name: &str,
        shape: &Shape,
        start: usize,
        rows: usize,
    ) -> Result<Vec<u8>> {
        self.check_f32(name, shape)?;
        if shape.rank() == 0 {
            return self.read_global(name);
        }
        self.read_rows(name, start, rows)
    }

    /// The box `offset .. offset + shape` (a tensor-parallel slice and its FSDP rows, in whatever
    /// layout the checkpoint was saved) of an f32 tensor that must have the model's `global`.
    pub fn read_f32_box_of(
        &self,
        name: &str,
        global: &Shape,
        offset: &[usize],
        shape: &[usize],
    ) -> Result<Vec<u8>> {
        self.check_f32(name, global)?;
        if global.rank() == 0 {
            return self.read_global(name);
        }
        self.read_slice(name, offset, shape)
    }

    /// Tensor `name` is f32 of the model's `shape`.
    fn check_f32(&self, name: &str, shape: &Shape) -> Result<()> {
        let e = self.entry(name)?;
        if e.dtype != DType::F32 || e.shape != shape.0 {
            return Err(Error::Checkpoint(format!(
                "{}: tensor {name} is {} {:?}, the model expects f32 {shape}",
                self.dir.display(),
                e.dtype,
                e.shape,
            )));
        }
        Ok(())
    }

    /// The whole global tensor, row-major bytes.
    pub fn read_global(&self, name: &str) -> Result<Vec<u8>> {
        let shape = self.entry(name)?.shape.clone();
        self.read_slice(name, &vec![0; shape.len()], &shape)
    }

    /// Rows `start .. start + rows` of dim 0 (a new FSDP rank's shard), row-major bytes.
    pub fn read_rows(&self, name: &str, start: usize, rows: usize) -> Result<Vec<u8>> {
        let t = self.entry(name)?;
        let mut offset = vec![0; t.shape.len()];
        let mut shape = t.shape.clone();
        if let (Some(o), Some(s)) = (offset.first_mut(), shape.first_mut()) {
            *o = start;
            *s = rows;
        }
        self.read_slice(name, &offset, &shape)
    }

    /// Any box of the global tensor (start `offset`, extent `shape`), assembled from the shards
    /// that overlap it; row-major bytes.
    pub fn read_slice(&self, name: &str, offset: &[usize], shape: &[usize]) -> Result<Vec<u8>> {
        let t = self.entry(name)?;
        let nd = t.shape.len();
        if offset.len() != nd
            || shape.len() != nd
            || (0..nd).any(|d| offset[d].saturating_add(shape[d]) > t.shape[d])
        {
            return Err(Error::Checkpoint(format!(
                "{}: box at {offset:?} of shape {shape:?} is outside tensor '{name}' of shape {:?}",
                self.dir.display(),
                t.shape
            )));
        }
        let esize = t.dtype.size();
        let mut out = vec![0u8; numel(shape) * esize];
        // The manifest's shards tile the tensor, so taking the first of each replica set fills
        // every element of the box exactly once.
        let mut seen = HashSet::new();
        for (i, s) in t.shards.iter().enumerate() {
            let lo: Vec<usize> = (0..nd).map(|d| offset[d].max(s.offset[d])).collect();
            let hi: Vec<usize> = (0..nd)
                .map(|d| (offset[d] + shape[d]).min(s.offset[d] + s.shape[d]))
                .collect();
            if (0..nd).any(|d| lo[d] >= hi[d]) || numel(shape) == 0 {
                continue;
            }
            if !seen.insert((s.offset.as_slice(), s.shape.as_slice())) {
                continue; // a replica of a box already copied
            }
            let src = self.shard_bytes(name, i)?;
            let (from, to) = (
                Region {
                    offset: &s.offset,
                    shape: &s.shape,
                },
                Region { offset, shape },
            );
            copy_box(src, from, &mut out, to, &lo, &hi, esize);
        }
        Ok(out)
    }

    /// The bytes of shard `i` of a tensor, checksum-verified on first use.
    fn shard_bytes(&self, name: &str, i: usize) -> Result<&[u8]> {
        let s = &self.entry(name)?.shards[i];
        let open = &self.shards[s.rank];
        let path = self.dir.join(&s.file);
        let info = open.header.info(name).ok_or_else(|| {
            Error::Checkpoint(format!("{}: tensor '{name}' is missing", path.display()))
        })?;
        let (a, b) = info.data_offsets;
        let bytes = &open.file.data(open.header_len)[a..b];
        let key = (name.to_string(), i);
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if !verified.contains(&key) {
            let got = format!("{:016x}", checksum(bytes));
            if got != s.checksum {
                return Err(Error::Checkpoint(format!(
                    "{}: tensor '{name}' data is corrupt (checksum {got}, manifest says {})",
                    path.display(),
                    s.checksum
                )));
            }
            verified.insert(key);
        }
        Ok(bytes)
    }

    /// Reads (and so checksums) every shard of every tensor.
    pub fn verify_all(&self) -> Result<()> {
        for (name, t) in &self.manifest.tensors {
            for i in 0..t.shards.len() {
                self.shard_bytes(name, i)?;
            }
        }
        Ok(())
    }
}

/// Where a dense row-major block of a tensor sits: its origin in global coordinates and its
/// shape.
#[derive(Clone, Copy, Debug)]
struct Region<'a> {
    offset: &'a [usize],
    shape: &'a [usize],
}

/// Copies the intersection box [lo, hi) (global coordinates) from a shard's bytes (`src`, laid
/// out as region `from`) into an output box (`dst`, region `to`), one contiguous last-dim run at
/// a time.
fn copy_box(
    src: &[u8],
    from: Region,
    dst: &mut [u8],
    to: Region,
    lo: &[usize],
    hi: &[usize],
    esize: usize,
) {
    let (s_shape, s_off) = (from.shape, from.offset);
    let (o_shape, o_off) = (to.shape, to.offset);
    let nd = lo.len();
    if nd == 0 {
        dst[..esize].copy_from_slice(&src[..esize]);
        return;
    }
    let strides = |shape: &[usize]| {
        let mut st = vec![1usize; nd];
        for d in (0..nd - 1).rev() {
            st[d] = st[d + 1] * shape[d + 1];
        }
        st
    };
    let (ss, os) = (strides(s_shape), strides(o_shape));
    let run = (hi[nd - 1] - lo[nd - 1]) * esize;
    let mut idx = lo.to_vec();
    loop {
        let si: usize = (0..nd).map(|d| (idx[d] - s_off[d]) * ss[d]).sum::<usize>() * esize;
        let oi: usize = (0..nd).map(|d| (idx[d] - o_off[d]) * os[d]).sum::<usize>() * esize;
        dst[oi..oi + run].copy_from_slice(&src[si..si + run]);
        // Odometer over all dims but the last.
        let mut d = nd - 1;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < hi[d] {
                break;
            }
            idx[d] = lo[d];
        }
    }
}
