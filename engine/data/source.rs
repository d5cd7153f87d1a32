//! Local dataset files: text (.txt, .jsonl) tokenized up front, and pre-tokenized token files
//! (.u16.bin / .u32.bin) memory-mapped.
//!
//! File formats:
//! - `.txt`: the whole file is one document (UTF-8).
//! - `.jsonl`: one JSON object per line with a string field `"text"`; each line is one document.
//!   Blank lines are skipped; any other bad line is an error naming the file and line.
//! - `.u16.bin` / `.u32.bin`: a flat array of little-endian token ids, no header. Document
//!   boundaries are whatever the file holds (write BOS/EOS into it yourself). A plain `.bin`
//!   needs an explicit dtype (`DataConfig::token_dtype`); an explicit dtype also overrides the
//!   extension.
//! - A folder: every such file below it (recursively, dot-files skipped), in sorted path order,
//!   so every rank and every run sees the same order. Text and token files cannot be mixed.

use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use serde_json::Value;

use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// Element type of a pre-tokenized token file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenDType {
    U16,
    U32,
}

impl TokenDType {
    /// "u16" / "uint16" / "u32" / "uint32".
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "u16" | "uint16" => Ok(Self::U16),
            "u32" | "uint32" => Ok(Self::U32),
            _ => Err(Error::Config(format!(
                "unknown token dtype {s:?} (expected u16 or u32)"
            ))),
        }
    }
    pub fn size(self) -> usize {
        match self {
            Self::U16 => 2,
            Self::U32 => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Txt,
    Jsonl,
    Tokens(Option<TokenDType>),
}

fn file_kind(path: &Path) -> Option<FileKind> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    if name.ends_with(".txt") {
        Some(FileKind::Txt)
    } else if name.ends_with(".jsonl") {
        Some(FileKind::Jsonl)
    } else if name.ends_with(".u16.bin") {
        Some(FileKind::Tokens(Some(TokenDType::U16)))
    } else if name.ends_with(".u32.bin") {
        Some(FileKind::Tokens(Some(TokenDType::U32)))
    } else if name.ends_with(".bin") {
        Some(FileKind::Tokens(None))
    } else {
        None
    }
}

/// What a dataset path resolved to.
pub(crate) enum Resolved {
    Text(Vec<PathBuf>),
    Tokens(Vec<(PathBuf, TokenDType)>),
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::Data(format!("cannot list dataset folder {}: {e}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| {
            Error::Data(format!("cannot list dataset folder {}: {e}", dir.display()))
        })?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if file_kind(&path).is_some() {
            out.push(path);
        }
    }
    Ok(())
}

/// Files of a dataset path (file or folder), classified; `dtype` overrides extensions.
pub(crate) fn resolve(path: &Path, dtype: Option<TokenDType>) -> Result<Resolved> {
    if !path.exists() {
        return Err(Error::Data(format!(
            "dataset path {} does not exist",
            path.display()
        )));
    }
    let mut files = Vec::new();
    if path.is_dir() {
        walk(path, &mut files)?;
        files.sort();
        if files.is_empty() {
            return Err(Error::Data(format!(
                "dataset folder {} holds no .txt, .jsonl or token .bin files",
                path.display()
            )));
        }
    } else {
        if file_kind(path).is_none() {
            return Err(Error::Data(format!(
                "dataset file {}: unknown format (expected .txt, .jsonl, .u16.bin, .u32.bin or \
                 .bin with an explicit token dtype)",
                path.display()
            )));
        }
        files.push(path.to_path_buf());
    }
    let kinds: Vec<FileKind> = files
        .iter()
        .map(|f| file_kind(f).expect("filtered"))
        .collect();
    let n_tokens = kinds
        .iter()
        .filter(|k| matches!(k, FileKind::Tokens(_)))
        .count();
    if n_tokens == 0 {
        return Ok(Resolved::Text(files));
    }
    if n_tokens != files.len() {
        return Err(Error::Data(format!(
            "dataset {} mixes text files and token .bin files",
            path.display()
        )));
    }
    let mut out = Vec::with_capacity(files.len());
    for (f, k) in files.into_iter().zip(kinds) {
        let FileKind::Tokens(ext_dtype) = k else {
            unreachable!()
        };
        let Some(dt) = dtype.or(ext_dtype) else {
            return Err(Error::Data(format!(
                "token file {}: dtype unknown; name it .u16.bin / .u32.bin or set the token \
                 dtype (u16 or u32)",
                f.display()
            )));
        };
        out.push((f, dt));
    }
    Ok(Resolved::Tokens(out))
}

/// Documents of one text file.
fn read_documents(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Data(format!("cannot read dataset file {}: {e}", path.display())))?;
    if file_kind(path) == Some(FileKind::Txt) {
        return Ok(vec![text]);
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: String| Error::Data(format!("{}:{}: {why}", path.display(), i + 1));
        let v: Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not valid JSON ({e})")))?;
        match v.get("text") {
            Some(Value::String(s)) => docs.push(s.clone()),
            Some(_) => return Err(bad("field \"text\" is not a string".into())),
            None => return Err(bad("no \"text\" field".into())),
        }
    }
    Ok(docs)
}

/// Pieces of at least `target` bytes (but the last) that `text` can be encoded in independently:
/// cuts go right after a '\n' that is followed by a printable ASCII character. Pre-tokenizers
/// split there anyway (Llama 3's regex ends a pre-token at a run of newlines followed by a
/// non-space; byte-level is exact anywhere), so encoding the pieces gives the same ids as
/// encoding the whole text, with parallelism and progress for huge single-document files.
pub(crate) fn split_for_encoding(text: &str, target: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut pieces = Vec::new();
    let mut start = 0;
    while bytes.len() - start > target {
        let from = start + target;
        let cut = bytes[from..]
            .windows(2)
            .position(|w| w[0] == b'\n' && w[1].is_ascii_graphic())
            .map(|i| from + i + 1);
        let Some(cut) = cut else { break };
        pieces.push(&text[start..cut]);
        start = cut;
    }
    pieces.push(&text[start..]);
    pieces
}

/// Tokenize every document of `files` into one stream: BOS + tokens + EOS per document.
/// Work is split into ~1 MB chunks (of whole small documents, or pieces of big ones) tokenized in
/// parallel; order is preserved, so the stream is the same on every run and every rank.
pub(crate) fn tokenize_files(
    files: &[PathBuf],
    tok: &dyn Tokenizer,
    show_progress: bool,
) -> Result<(Vec<u32>, u64)> {
    const CHUNK: usize = 1 << 20;
    let total: u64 = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let bar = Progress::new("tokenizing", total, show_progress);
    let (bos, eos) = (tok.bos_id(), tok.eos_id());
    let mut stream = Vec::new();
    let mut n_docs = 0u64;
    for file in files {
        let docs = read_documents(file)?;
        n_docs += docs.len() as u64;
        // (text, first piece of its document, last piece of its document)
        let mut pieces: Vec<(&str, bool, bool)> = Vec::with_capacity(docs.len());
        for d in &docs {
            let parts = split_for_encoding(d, CHUNK);
            let last = parts.len() - 1;
            pieces.extend(
                parts
                    .into_iter()
                    .enumerate()
                    .map(|(k, p)| (p, k == 0, k == last)),
            );
        }
        let mut i = 0;
        while i < pieces.len() {
            let mut j = i;
            let mut bytes = 0;
            while j < pieces.len() && (j == i || bytes < CHUNK) {
                bytes += pieces[j].0.len();
                j += 1;
            }
            let encoded: Vec<Vec<u32>> = pieces[i..j]
                .par_iter()
                .map(|(text, _, _)| tok.encode(text))
                .collect::<Result<_>>()
                .map_err(|e| match e {
                    Error::Data(m) => Error::Data(format!("{}: {m}", file.display())),
                    other => other,
                })?;
            for (ids, &(_, first, last)) in encoded.iter().zip(&pieces[i..j]) {
                if first {
                    stream.push(bos);
                }
                stream.extend_from_slice(ids);
                if last {
                    stream.push(eos);
                }
            }
            bar.add(bytes as u64);
            i = j;
        }
    }
    bar.finish();
    stream.shrink_to_fit();
    Ok((stream, n_docs))
}

struct MappedFile {
    path: PathBuf,
    map: Mmap,
    dtype: TokenDType,
    /// Global index of this file's first token in the concatenated stream.
    start: u64,
    len: u64,
}

/// Token files memory-mapped and read as one concatenated stream.
pub(crate) struct TokenFiles {
    files: Vec<MappedFile>,
    len: u64,
}

impl TokenFiles {
    pub(crate) fn open(files: &[(PathBuf, TokenDType)]) -> Result<Self> {
        let mut mapped = Vec::with_capacity(files.len());
        let mut start = 0u64;
        for (path, dtype) in files {
            let file = std::fs::File::open(path).map_err(|e| {
                Error::Data(format!("cannot open token file {}: {e}", path.display()))
            })?;
            let bytes = file
                .metadata()
                .map_err(|e| {
                    Error::Data(format!("cannot stat token file {}: {e}", path.display()))
                })?
                .len();
            if bytes % dtype.size() as u64 != 0 {
                return Err(Error::Data(format!(
                    "token file {}: {bytes} bytes is not a whole number of {}-byte ids",
                    path.display(),
                    dtype.size()
                )));
            }
            if bytes == 0 {
                continue;
            }
            // SAFETY: the map is read-only; titan never writes dataset files, and a dataset
            // rewritten underneath a running job is outside what any loader can defend against.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| {
                Error::Data(format!("cannot map token file {}: {e}", path.display()))
            })?;
            let len = bytes / dtype.size() as u64;
            mapped.push(MappedFile {
                path: path.clone(),
                map,
                dtype: *dtype,
                start,
                len,
            });
            start += len;
        }
        Ok(Self {
            files: mapped,
            len: start,
        })
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    fn file_at(&self, pos: u64) -> usize {
        self.files.partition_point(|f| f.start + f.len <= pos)
    }

    /// Copies tokens `pos..pos + out.len()` (must lie inside the stream).
    pub(crate) fn copy(&self, mut pos: u64, out: &mut [u32]) {
        let mut done = 0;
        let mut fi = self.file_at(pos);
        while done < out.len() {
            let f = &self.files[fi];
            let local = (pos - f.start) as usize;
            let n = (out.len() - done).min(f.len as usize - local);
            let dst = &mut out[done..done + n];
            match f.dtype {
                TokenDType::U16 => {
                    let src = &f.map[local * 2..(local + n) * 2];
                    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                        *d = u16::from_le_bytes([s[0], s[1]]) as u32;
                    }
                }
                TokenDType::U32 => {
                    let src = &f.map[local * 4..(local + n) * 4];
                    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                        *d = u32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                    }
                }
            }
            done += n;
            pos += n as u64;
            fi += 1;
        }
    }

    /// "file.u16.bin, token 1234" for error messages.
    pub(crate) fn locate(&self, pos: u64) -> String {
        let f = &self.files[self.file_at(pos).min(self.files.len() - 1)];
        format!(
            "token file {}, token index {}",
            f.path.display(),
            pos - f.start
        )
    }
}

/// Reads one whole token file into memory (the eval reader's small inputs).
pub(crate) fn read_token_file(path: &Path, dtype: TokenDType) -> Result<Vec<u32>> {
    let tf = TokenFiles::open(&[(path.to_path_buf(), dtype)])?;
    let mut out = vec![0u32; tf.len() as usize];
    if !out.is_empty() {
        tf.copy(0, &mut out);
    }
    Ok(out)
}
