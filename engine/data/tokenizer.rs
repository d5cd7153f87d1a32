//! Tokenizers: the built-in byte-level one and Hugging Face `tokenizer.json` files (Llama 3's).
//!
//! Every tokenizer here encodes *without* special tokens; the packer adds BOS/EOS around each
//! document itself, so a document gets exactly one BOS and one EOS whatever the tokenizer's own
//! post-processor would have done (Llama 3's adds BOS only).

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// What the data pipeline needs from a tokenizer.
pub trait Tokenizer: Send + Sync {
    /// Token ids of `text`, no BOS/EOS added.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Text of `ids`; special tokens (BOS/EOS/pad) are dropped.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// Number of ids the model's embedding must hold (every id is `< vocab_size`).
    fn vocab_size(&self) -> usize;
    fn bos_id(&self) -> u32;
    fn eos_id(&self) -> u32;
    fn pad_id(&self) -> Option<u32> {
        None
    }
    /// Short description for logs ("byte-level", "hf:/path/tokenizer.json").
    fn name(&self) -> String;
    /// Identity of the token mapping (not of where the file lives), stored in loader states so a
    /// resume with a different tokenizer is refused while a moved assets folder is fine.
    fn fingerprint(&self) -> String;
}

/// FNV-1a, 64 bit: a stable, dependency-free content hash for fingerprints.
pub(crate) fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}
pub(crate) const FNV_OFFSET: u64 = 0xCBF2_9CE4_8422_2325;

/// Bytes are their own ids (0..=255), then BOS = 256, EOS = 257, PAD = 258: vocab_size = 259.
/// The model config may round its embedding up (e.g. to 320 or 512) for GEMM-friendly shapes;
/// the extra rows are simply never used.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    pub const BOS: u32 = 256;
    pub const EOS: u32 = 257;
    pub const PAD: u32 = 258;
    pub const VOCAB_SIZE: usize = 259;
}

impl Tokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(text.bytes().map(u32::from).collect())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            match id {
                0..=255 => bytes.push(id as u8),
                Self::BOS | Self::EOS | Self::PAD => {}
                _ => {
                    let n = Self::VOCAB_SIZE;
                    return Err(Error::Data(format!(
                        "byte tokenizer: id {id} at position {i} is outside the vocabulary ({n})"
                    )));
                }
            }
        }
        // Bytes cut mid-character (a sample boundary) are shown as U+FFFD rather than failing.
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn vocab_size(&self) -> usize {
        Self::VOCAB_SIZE
    }
    fn bos_id(&self) -> u32 {
        Self::BOS
    }
    fn eos_id(&self) -> u32 {
        Self::EOS
    }
    fn pad_id(&self) -> Option<u32> {
        Some(Self::PAD)
    }
    fn name(&self) -> String {
        "byte-level".into()
    }
    fn fingerprint(&self) -> String {
        format!("byte-level/{}", Self::VOCAB_SIZE)
    }
}

/// Token names tried (in order) when looking for BOS/EOS among a tokenizer's tokens.
/// Llama 3 first; `<|end_of_text|>` before the chat-turn `<|eot_id|>` because pre-training
/// separates documents, not turns.
const BOS_NAMES: &[&str] = &[
    "<|begin_of_text|>",
    "<s>",
    "<bos>",
    "[BOS]",
    "<|startoftext|>",
];
const EOS_NAMES: &[&str] = &["<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|endoftext|>"];

/// A Hugging Face `tokenizer.json` through the `tokenizers` crate.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    bos: u32,
    eos: u32,
    pad: Option<u32>,
    vocab: usize,
    file_hash: u64,
}

impl HfTokenizer {
    /// Load `tokenizer.json`. BOS/EOS are found, in order, among the file's tokens by their usual
    /// names (Llama 3: `<|begin_of_text|>` / `<|end_of_text|>`), from the post-processor's
    /// template (special tokens before / after the sequence), then from a `tokenizer_config.json`
    /// next to the file (`bos_token` / `eos_token`). A tokenizer with only an end token (GPT-2's
    /// `<|endoftext|>`) uses it for both.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::Data(format!(
                "cannot read tokenizer file {}: {e}",
                path.display()
            ))
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            Error::Data(format!(
                "cannot parse tokenizer file {}: {e}",
                path.display()
            ))
        })?;
        let json: Value = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Data(format!(
                "cannot parse tokenizer file {}: {e}",
                path.display()
            ))
        })?;
        let config = read_tokenizer_config(path)?;

        let lookup = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let (tmpl_bos, tmpl_eos) = template_specials(&json);
        let resolve = |name: Option<String>| name.and_then(|n| inner.token_to_id(&n));
        let cfg_token = |key: &str| config.as_ref().and_then(|c| config_token(c, key));

        let bos = lookup(BOS_NAMES)
            .or_else(|| resolve(tmpl_bos))
            .or_else(|| resolve(cfg_token("bos_token")));
        let eos = lookup(EOS_NAMES)
            .or_else(|| resolve(tmpl_eos))
            .or_else(|| resolve(cfg_token("eos_token")));
        let (bos, eos) = match (bos, eos) {
            (Some(b), Some(e)) => (b, e),
            (None, Some(e)) => (e, e),
            (Some(_), None) | (None, None) => {
                return Err(Error::Data(format!(
                    "tokenizer {}: no end-of-text token found (tried {:?}, the post-processor \
                     template and tokenizer_config.json's eos_token)",
                    path.display(),
                    EOS_NAMES
                )))
            }
        };
        let pad = ["<|finetune_right_pad_id|>", "<pad>", "[PAD]"]
            .iter()
            .find_map(|n| inner.token_to_id(n))
            .or_else(|| resolve(cfg_token("pad_token")));

        // Added tokens may sit above the model's vocabulary with gaps; size by the largest id.
        let max_added = inner.get_added_tokens_decoder().keys().copied().max();
        let vocab = inner
            .get_vocab_size(true)
            .max(max_added.map_or(0, |m| m as usize + 1))
            .max(bos.max(eos) as usize + 1);
        let file_hash = fnv1a(&bytes, FNV_OFFSET);
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            bos,
            eos,
            pad,
            vocab,
            file_hash,
        })
    }
}

/// `tokenizer_config.json` next to `tokenizer.json`, if any.
fn read_tokenizer_config(tokenizer_path: &Path) -> Result<Option<Value>> {
    let Some(dir) = tokenizer_path.parent() else {
        return Ok(None);
    };
    let cfg = dir.join("tokenizer_config.json");
    if !cfg.is_file() {
        return Ok(None);
    }
    let text = std::fs::read(&cfg)
        .map_err(|e| Error::Data(format!("cannot read {}: {e}", cfg.display())))?;
    let v = serde_json::from_slice(&text)
        .map_err(|e| Error::Data(format!("cannot parse {}: {e}", cfg.display())))?;
    Ok(Some(v))
}

/// `"bos_token": "<s>"` or `"bos_token": {"content": "<s>", ...}`.
fn config_token(cfg: &Value, key: &str) -> Option<String> {
    match cfg.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// Special tokens the post-processor's single-sequence template puts before and after the text.
/// The post-processor may be a `Sequence` of processors (Llama 3: ByteLevel + TemplateProcessing).
fn template_specials(json: &Value) -> (Option<String>, Option<String>) {
    fn find_template(pp: &Value) -> Option<&Vec<Value>> {
        match pp.get("type")?.as_str()? {
            "TemplateProcessing" => pp.get("single")?.as_array(),
            "Sequence" => pp
                .get("processors")?
                .as_array()?
                .iter()
                .find_map(find_template),
            _ => None,
        }
    }
    let Some(single) = json.get("post_processor").and_then(find_template) else {
        return (None, None);
    };
    let mut before = None;
    let mut after = None;
    let mut seen_seq = false;
    for piece in single {
        if piece.get("Sequence").is_some() {
            seen_seq = true;
        } else if let Some(id) = piece.pointer("/SpecialToken/id").and_then(Value::as_str) {
            if seen_seq {
                after.get_or_insert_with(|| id.to_owned());
            } else {
                before.get_or_insert_with(|| id.to_owned());
            }
        }
    }
    (before, after)
}

impl Tokenizer for HfTokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // encode_fast skips char offsets, which the packer never uses.
        let enc = self.inner.encode_fast(text, false).map_err(|e| {
            Error::Data(format!(
                "tokenizer {}: encode failed: {e}",
                self.path.display()
            ))
        })?;
        Ok(enc.get_ids().to_vec())
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some((i, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= self.vocab)
        {
            return Err(Error::Data(format!(
                "tokenizer {}: id {id} at position {i} is outside the vocabulary (size {})",
                self.path.display(),
                self.vocab
            )));
        }
        self.inner.decode(ids, true).map_err(|e| {
            Error::Data(format!(
                "tokenizer {}: decode failed: {e}",
                self.path.display()
            ))
        })
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn bos_id(&self) -> u32 {
        self.bos
    }
    fn eos_id(&self) -> u32 {
        self.eos
    }
    fn pad_id(&self) -> Option<u32> {
        self.pad
    }
    fn name(&self) -> String {
        format!("hf:{}", self.path.display())
    }
    fn fingerprint(&self) -> String {
        format!("hf/{}/{:016x}", self.vocab, self.file_hash)
    }
}

/// torchtitan's `model.hf_assets_path`: a folder holding `tokenizer.json`, or the file itself.
/// `None` gives the byte-level tokenizer.
pub fn load_tokenizer(path: Option<&Path>) -> Result<Box<dyn Tokenizer>> {
    let Some(path) = path else {
        return Ok(Box::new(ByteTokenizer));
    };
    if path.is_dir() {
        let file = path.join("tokenizer.json");
        if !file.is_file() {
            return Err(Error::Data(format!(
                "tokenizer folder {} has no tokenizer.json (tokenizer.model / tiktoken files are \
                 not supported; export a tokenizer.json)",
                path.display()
            )));
        }
        return Ok(Box::new(HfTokenizer::from_file(&file)?));
    }
    if !path.exists() {
        return Err(Error::Data(format!(
            "tokenizer path {} does not exist",
            path.display()
        )));
    }
    Ok(Box::new(HfTokenizer::from_file(path)?))
}
