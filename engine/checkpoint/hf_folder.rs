//! Hugging Face safetensors checkpoints (the `save_pretrained` layout), model-independent.
//!
//! Reading: `model.safetensors`, or the shards named by `model.safetensors.index.json`. Every
//! file is memory-mapped and its header validated when the folder is opened; tensor bytes are
//! read from the map only when a tensor is converted (f32, bf16, f16 and f64 become f32), so a
//! checkpoint is never held in RAM twice. Writing: `config.json`, shards capped at a byte size
//! (`model-0000k-of-0000n.safetensors` plus the index; one shard is plain `model.safetensors`),
//! produced one shard at a time into a temp folder renamed into place.
//! Model-specific naming lives in each model's `StateDictAdapter` (engine/model/state_dict.rs).

use crate::error::{Error, Result};
use crate::progress::Progress;
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const HF_CONFIG: &str = "config.json";
pub const HF_SINGLE: &str = "model.safetensors";
pub const HF_INDEX: &str = "model.safetensors.index.json";

struct MappedFile {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// An opened Hugging Face checkpoint folder.
pub struct HfCheckpoint {
    pub dir: PathBuf,
    files: Vec<MappedFile>,
    /// tensor name -> index into `files`.
    names: BTreeMap<String, usize>,
}

/// One tensor as stored: dtype, shape and raw little-endian bytes (borrowed from the map).
pub struct HfTensor<'a> {
    pub name: &'a str,
    pub file: &'a Path,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: &'a [u8],
}

fn ck_err(msg: String) -> Error {
    Error::Checkpoint(msg)
}

fn map_file(path: &Path) -> Result<MappedFile> {
    let file = std::fs::File::open(path).map_err(|e| {
        ck_err(format!(
            "{}: cannot open safetensors file: {e}",
            path.display()
        ))
    })?;
    // SAFETY: a read-only private map; every access is bounds-checked against the header, which
    // is validated below against the file's length.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (n, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
        use safetensors::SafeTensorError as E;
        let what = match e {
            E::HeaderTooSmall | E::InvalidHeaderLength => {
                "truncated safetensors header (the file ends before its header does)".to_string()
            }
            E::MetadataIncompleteBuffer => format!(
                "truncated or padded safetensors data ({} bytes, the header describes another size)",
                map.len()
            ),
            other => format!("corrupt safetensors header: {other}"),
        };
        ck_err(format!("{}: {what}", path.display()))
    })?;
    let tensors = meta
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.clone()))
        .collect();
    Ok(MappedFile {
        path: path.to_path_buf(),
        map,
        data_start: 8 + n,
        tensors,
    })
}

impl HfCheckpoint {
    /// Opens `dir`: the index and every shard it names (each must exist and hold the tensors the
    /// index assigns to it), or the single `model.safetensors`.
    pub fn open(dir: &Path) -> Result<HfCheckpoint> {
        let index = dir.join(HF_INDEX);
        let single = dir.join(HF_SINGLE);
        let mut files = Vec::new();
        let mut names = BTreeMap::new();
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ck_err(format!("{}: not valid JSON ({e})", index.display())))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ck_err(format!("{}: no \"weight_map\" object", index.display())))?;
            let mut file_ids: HashMap<String, usize> = HashMap::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    ck_err(format!(
                        "{}: tensor {tensor}: file is not a string",
                        index.display()
                    ))
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                    return Err(ck_err(format!(
                        "{}: tensor {tensor}: shard name {file:?} must be a plain file name",
                        index.display()
                    )));
                }
                let id = match file_ids.get(file) {
                    Some(&id) => id,
                    None => {
                        let path = dir.join(file);
                        if !path.is_file() {
                            return Err(ck_err(format!(
                                "{}: tensor {tensor} is in shard {file}, which does not exist ({})",
                                index.display(),
                                path.display()
                            )));
                        }
                        files.push(map_file(&path)?);
                        file_ids.insert(file.to_string(), files.len() - 1);
                        files.len() - 1
                    }
                };
                if !files[id].tensors.contains_key(tensor) {
                    return Err(ck_err(format!(
                        "{}: the index puts tensor {tensor} in this file, which does not hold it",
                        files[id].path.display()
                    )));
                }
                names.insert(tensor.clone(), id);
            }
        } else if single.is_file() {
            let f = map_file(&single)?;
            for k in f.tensors.keys() {
                names.insert(k.clone(), 0);
            }
            files.push(f);
        } else {
            return Err(ck_err(format!(
                "{}: no {HF_SINGLE} or {HF_INDEX} (not a Hugging Face checkpoint folder)",
                dir.display()
            )));
        }
        Ok(HfCheckpoint {
            dir: dir.to_path_buf(),
            files,
            names,
        })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Result<HfTensor<'_>> {
        let (key, &id) = self
            .names
            .get_key_value(name)
            .ok_or_else(|| ck_err(format!("{}: no tensor {name}", self.dir.display())))?;
        let f = &self.files[id];
        let info = &f.tensors[name];
        let (a, b) = info.data_offsets;
        Ok(HfTensor {
            name: key,
            file: &f.path,
            dtype: info.dtype,
            shape: &info.shape,
            bytes: &f.map[f.data_start + a..f.data_start + b],
        })
    }

    /// The tensor as f32, after checking its shape is `expect`.
    pub fn read_f32(&self, name: &str, expect: &[usize]) -> Result<Vec<f32>> {
        let t = self.get(name)?;
        if t.shape != expect {
            return Err(ck_err(format!(
                "{}: tensor {name} has shape {:?}, the model expects {expect:?}",
                t.file.display(),
                t.shape
            )));
        }
        t.to_f32()
    }
}

impl HfTensor<'_> {
    /// Widens f32, bf16, f16 or f64 (narrowed) data to f32.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = self.bytes;
        Ok(match self.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => b
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            other => {
                return Err(ck_err(format!(
                    "{}: tensor {} has dtype {other:?}; supported: F32, BF16, F16, F64",
                    self.file.display(),
                    self.name
                )))
            }
        })
    }
}

/// "float32" | "bfloat16" | "float16" (checkpoint.export_dtype) -> safetensors dtype.
pub fn parse_export_dtype(s: &str) -> Result<Dtype> {
    match s {
        "float32" => Ok(Dtype::F32),
        "bfloat16" => Ok(Dtype::BF16),
        "float16" => Ok(Dtype::F16),
        _ => Err(Error::Config(format!(
            "export dtype {s:?}: expected float32, bfloat16 or float16"
        ))),
    }
}

/// f32 values -> little-endian bytes of `dtype` (round to nearest even for 16-bit types).
pub fn f32_to_bytes(data: &[f32], dtype: Dtype) -> Result<Vec<u8>> {
    Ok(match dtype {
        Dtype::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::BF16 => data
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::F16 => data
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        other => return Err(Error::Config(format!("cannot export tensors as {other:?}"))),
    })
}

/// A tensor to write: its name and shape; bytes are produced when its shard is written.
pub struct HfOut {
    pub name: String,
    pub shape: Vec<usize>,
}

struct OutView<'a> {
    dtype: Dtype,
    shape: &'a [usize],
    bytes: Vec<u8>,
}

impl safetensors::View for OutView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes a Hugging Face checkpoint folder `dir` (which must not exist or be empty):
/// `config.json`, then the tensors in order, a new shard starting whenever the next tensor would
/// push the current one past `max_shard_bytes` (0 = one file). `bytes_of(i)` gives tensor i's
/// bytes in `dtype`; only one shard's tensors are in memory at a time.
pub fn write_hf(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &[HfOut],
    dtype: Dtype,
    max_shard_bytes: usize,
    mut bytes_of: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<()> {
    if dir.exists()
        && std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .next()
            .is_some()
    {
        return Err(ck_err(format!(
            "{}: output folder exists and is not empty",
            dir.display()
        )));
    }
    let elem = dtype.bitsize() / 8;
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut cur = 0usize;
    let mut all = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let n = t.shape.iter().product::<usize>() * elem;
        all += n as u64;
        if max_shard_bytes > 0 && cur > 0 && cur + n > max_shard_bytes {
            shards.push(Vec::new());
            cur = 0;
        }
        cur += n;
        shards.last_mut().expect("one shard").push(i);
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let leaf = dir.file_name().map(|s| s.to_string_lossy().into_owned());
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        leaf.unwrap_or_else(|| "hf".into()),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    // Counted as each tensor is produced (read, converted): the bulk of the work; each shard's
    // write to disk follows its tensors.
    let bar = Progress::new(format!("writing {}", dir.display()), all, true);
    let written = write_into(&tmp, config, tensors, dtype, &shards, &mut bytes_of, &bar);
    let result = written.and_then(|()| {
        bar.finish();
        if dir.exists() {
            std::fs::remove_dir(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_into(
    tmp: &Path,
    config: &serde_json::Value,
    tensors: &[HfOut],
    dtype: Dtype,
    shards: &[Vec<usize>],
    bytes_of: &mut impl FnMut(usize) -> Result<Vec<u8>>,
    bar: &Progress,
) -> Result<()> {
    std::fs::create_dir_all(tmp).map_err(|e| Error::io(tmp, e))?;
    let cfg_path = tmp.join(HF_CONFIG);
    let text = serde_json::to_string_pretty(config).map_err(|e| Error::Other(e.to_string()))?;
    std::fs::write(&cfg_path, text + "\n").map_err(|e| Error::io(&cfg_path, e))?;
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (k, shard) in shards.iter().enumerate() {
        let file = if n == 1 {
            HF_SINGLE.to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        let mut views = Vec::with_capacity(shard.len());
        for &i in shard {
            let bytes = bytes_of(i)?;
            let want = tensors[i].shape.iter().product::<usize>() * dtype.bitsize() / 8;
            if bytes.len() != want {
                return Err(Error::Other(format!(
                    "hf export: tensor {} produced {} bytes, expected {want}",
                    tensors[i].name,
                    bytes.len()
                )));
            }
            total += bytes.len();
            bar.add(bytes.len() as u64);
            weight_map.insert(tensors[i].name.clone(), file.clone().into());
            views.push((
                tensors[i].name.as_str(),
                OutView {
                    dtype,
                    shape: &tensors[i].shape,
                    bytes,
                },
            ));
        }
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let path = tmp.join(&file);
        safetensors::serialize_to_file(views, Some(meta), &path)
            .map_err(|e| ck_err(format!("{}: cannot write: {e}", path.display())))?;
    }
    if n > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = tmp.join(HF_INDEX);
        let text = serde_json::to_string_pretty(&index).map_err(|e| Error::Other(e.to_string()))?;
        std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// Writes one f32 tensor as a safetensors file (e.g. `titan eval --dump-logits`).
pub fn write_f32_file(path: &Path, name: &str, shape: &[usize], data: &[f32]) -> Result<()> {
    let view = OutView {
        dtype: Dtype::F32,
        shape,
        bytes: f32_to_bytes(data, Dtype::F32)?,
    };
    safetensors::serialize_to_file([(name, view)], None, path)
        .map_err(|e| ck_err(format!("{}: cannot write: {e}", path.display())))
}
