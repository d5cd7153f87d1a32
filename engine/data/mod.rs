//! Data pipeline: tokenizers, datasets, packing, and the stateful loader (torchtitan's
//! `components/tokenizer.py` + `datasets/hf_datasets.py`, without downloads).
//!
//! Datasets (`DataConfig::dataset`, or `dataset_path` which wins when set):
//! - `"synthetic"` (default): titan's own generated corpus, see [`synthetic`]. torchtitan's
//!   default `"c4_test"` (a small C4 slice it ships in its repository) maps here too, so
//!   torchtitan's debug configs run unchanged and offline; the text differs, the purpose (a small
//!   corpus to smoke-test training) is the same.
//! - a path: a `.txt` / `.jsonl` file, a `.u16.bin` / `.u32.bin` token file, or a folder of
//!   them (see [`source`] for the formats).
//!
//! Tokenizer (`DataConfig::tokenizer`, torchtitan's `model.hf_assets_path`): a folder containing
//! `tokenizer.json` or the file itself; none gives the byte-level tokenizer (vocab 259). Token
//! files need no tokenizer; when one (or `vocab_size`) is given, ids are checked against it.

pub mod eval;
pub mod loader;
pub mod source;
pub mod synthetic;
pub mod tokenizer;

use std::path::PathBuf;
use std::sync::Arc;

pub use eval::read_token_batches;
pub use loader::{Batch, DataLoader};
pub use source::TokenDType;
pub use synthetic::{unigram_entropy, SyntheticCorpus};
pub use tokenizer::{load_tokenizer, ByteTokenizer, HfTokenizer, Tokenizer};

use crate::error::{Error, Result};
use loader::{Common, Tokens};
use source::{Resolved, TokenFiles};

/// Built-in dataset names and what they mean.
pub const BUILTIN_DATASETS: &[&str] = &["synthetic", "c4_test"];

/// torchtitan's dataset names that are Hugging Face downloads (titan reads local files only).
pub fn needs_download(name: &str) -> bool {
    matches!(name, "c4" | "c4_mini" | "c4_validation" | "fineweb")
}

/// Everything `build_loader` needs; the trainer maps its TOML config onto this.
#[derive(Debug, Clone)]
pub struct DataConfig {
    /// "synthetic", "c4_test" (= synthetic) or a path.
    pub dataset: String,
    /// torchtitan's `training.dataset_path`: when set, read this path instead.
    pub dataset_path: Option<PathBuf>,
    /// Folder with tokenizer.json, or the file; None = byte-level.
    pub tokenizer: Option<PathBuf>,
    pub seq_len: usize,
    /// Per-rank batch (torchtitan's `local_batch_size`).
    pub batch: usize,
    /// Seed of the synthetic corpus (file datasets are read in order and ignore it).
    pub seed: u64,
    /// This rank's share of each global batch of `dp_world x batch` samples (see [`loader`]).
    pub dp_rank: usize,
    pub dp_world: usize,
    /// Element type of `.bin` token files; overrides the `.u16.bin` / `.u32.bin` extension.
    pub token_dtype: Option<TokenDType>,
    /// The model's vocabulary: every id must be below it (default: the tokenizer's).
    pub vocab_size: Option<usize>,
    /// Progress while tokenizing large files (see `crate::progress`); false = quiet.
    pub progress: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: "synthetic".into(),
            dataset_path: None,
            tokenizer: None,
            seq_len: 2048,
            batch: 8,
            seed: 0,
            dp_rank: 0,
            dp_world: 1,
            token_dtype: None,
            vocab_size: None,
            progress: true,
        }
    }
}

/// Build the loader for this rank. Text datasets are tokenized here, in full, on every rank
/// (progress shows on stderr for big files), so every rank walks the same packed stream.
pub fn build_loader(cfg: &DataConfig) -> Result<DataLoader> {
    if cfg.seq_len == 0 || cfg.batch == 0 {
        return Err(Error::Config(format!(
            "data loader needs seq_len and batch >= 1 (got seq_len {}, batch {})",
            cfg.seq_len, cfg.batch
        )));
    }
    // A batch holds batch x (seq_len + 1) u32 ids: a size no allocation can hold is an error
    // here, not a capacity-overflow panic in next_batch.
    let fits = (cfg.seq_len.checked_add(1))
        .and_then(|n| n.checked_mul(cfg.batch))
        .and_then(|n| n.checked_mul(4))
        .is_some_and(|bytes| bytes <= isize::MAX as usize);
    if !fits {
        return Err(Error::Config(format!(
            "data loader: batch {} x (seq_len {} + 1) tokens is too large to hold",
            cfg.batch, cfg.seq_len
        )));
    }
    if cfg.dp_world == 0 || cfg.dp_rank >= cfg.dp_world {
        return Err(Error::Config(format!(
            "data parallel rank {} is not in 0..{}",
            cfg.dp_rank, cfg.dp_world
        )));
    }
    let name = cfg.dataset.trim();
    let path = match (&cfg.dataset_path, name) {
        (Some(p), _) => Some(p.clone()),
        (None, "synthetic" | "c4_test") => None,
        (None, n) if needs_download(n) => {
            return Err(Error::Data(format!(
                "dataset {name:?} must be downloaded: titan reads local files only; set \
                 training.dataset_path to .txt/.jsonl/.bin files, or use \"synthetic\""
            )))
        }
        (None, other) => {
            let p = PathBuf::from(other);
            if !p.exists() {
                return Err(Error::Data(format!(
                    "dataset {other:?} is neither a built-in dataset ({}) nor an existing path",
                    BUILTIN_DATASETS.join(", ")
                )));
            }
            Some(p)
        }
    };
    let display_name = path
        .as_ref()
        .map_or(name.to_string(), |p| p.display().to_string());
    let common = |vocab, tokenizer| Common {
        name: display_name.clone(),
        seq_len: cfg.seq_len,
        batch: cfg.batch,
        vocab,
        tokenizer,
        dp_rank: cfg.dp_rank,
        dp_world: cfg.dp_world,
    };

    let rank = format!("dp rank {}/{}", cfg.dp_rank, cfg.dp_world);
    let tok_desc = |t: &dyn Tokenizer| format!("tokenizer {} (vocab {})", t.name(), t.vocab_size());

    let Some(path) = path else {
        let tok: Arc<dyn Tokenizer> = Arc::from(load_tokenizer(cfg.tokenizer.as_deref())?);
        let vocab = Some(check_vocab(cfg, tok.as_ref())?);
        let summary = format!(
            "dataset {name}: titan's synthetic corpus (seed {}), {}, {rank}",
            cfg.seed,
            tok_desc(tok.as_ref())
        );
        let corpus = SyntheticCorpus::new(cfg.seed);
        let mut l = DataLoader::new_synthetic(common(vocab, None), corpus, tok)?;
        l.summary = summary;
        return Ok(l);
    };
    match source::resolve(&path, cfg.token_dtype)? {
        Resolved::Text(files) => {
            let tok: Arc<dyn Tokenizer> = Arc::from(load_tokenizer(cfg.tokenizer.as_deref())?);
            let (stream, n_docs) = source::tokenize_files(&files, tok.as_ref(), cfg.progress)?;
            if n_docs == 0 {
                return Err(Error::Data(format!(
                    "dataset {} has no documents",
                    path.display()
                )));
            }
            // Each document adds BOS and EOS: no more than that is no text at all.
            if stream.len() as u64 <= 2 * n_docs {
                return Err(Error::Data(format!(
                    "dataset {} is empty: its {n_docs} document(s) hold no text",
                    path.display()
                )));
            }
            let vocab = Some(check_vocab(cfg, tok.as_ref())?);
            let summary = format!(
                "dataset {}: {} text file(s), {n_docs} documents, {} tokens, {}, {rank}",
                path.display(),
                files.len(),
                stream.len(),
                tok_desc(tok.as_ref())
            );
            let mut l = DataLoader::new_flat(common(vocab, Some(tok)), Tokens::Owned(stream))?;
            l.summary = summary;
            Ok(l)
        }
        Resolved::Tokens(files) => {
            let tok: Option<Arc<dyn Tokenizer>> = match &cfg.tokenizer {
                Some(p) => Some(Arc::from(load_tokenizer(Some(p))?)),
                None => None,
            };
            let vocab = match &tok {
                Some(t) => Some(check_vocab(cfg, t.as_ref())?),
                None => cfg.vocab_size,
            };
            let tf = TokenFiles::open(&files)?;
            let summary = format!(
                "dataset {}: {} token file(s), {} tokens, {}, {rank}",
                path.display(),
                files.len(),
                tf.len(),
                match &tok {
                    Some(t) => tok_desc(t.as_ref()),
                    None => format!("no tokenizer (vocab check: {vocab:?})"),
                }
            );
            let mut l = DataLoader::new_flat(common(vocab, tok), Tokens::Files(tf))?;
            l.summary = summary;
            Ok(l)
        }
    }
}

/// The vocabulary ids must stay below: the configured (model) one, which must hold every id the
/// tokenizer can produce; the tokenizer's when none is configured.
fn check_vocab(cfg: &DataConfig, tok: &dyn Tokenizer) -> Result<usize> {
    match cfg.vocab_size {
        Some(v) if v < tok.vocab_size() => Err(Error::Config(format!(
            "vocab_size {v} is smaller than tokenizer {}'s vocabulary ({})",
            tok.name(),
            tok.vocab_size()
        ))),
        Some(v) => Ok(v),
        None => Ok(tok.vocab_size()),
    }
}
