//! The stateful, infinite, packing data loader.
//!
//! Packing (as torchtitan's HuggingFaceDataset): documents become BOS + tokens + EOS and are
//! concatenated into one stream; each sample takes the next `seq_len + 1` tokens (samples do not
//! overlap), inputs = sample[..seq_len], labels = sample[1..]. A batch is `batch` consecutive
//! samples, row-major `batch x seq_len` i32 ids. At the end of the stream the loader wraps to its
//! start (next epoch), so `next_batch` never runs dry.
//!
//! Data parallelism: every rank walks the same global stream (the whole token stream, or
//! synthetic documents 0, 1, 2, ...) and takes its share of each global batch of
//! `dp_world x batch` samples: rank r skips `r x batch` samples, reads `batch`, and skips the
//! `(dp_world - 1 - r) x batch` of the ranks after it. So the ranks' k-th batches, concatenated
//! in rank order, are the k-th batch of a world-1 loader with batch `dp_world x batch`, whatever
//! the layout: a sharded run sees exactly the data of a single-device run at the same global
//! batch (FSDP parity), and after every batch all ranks stand at the same global position, which
//! is all `state()` holds, so a checkpoint resumes at any data parallel degree.
//!
//! The position is a handful of integers — (epoch, offset in the stream) or (document, offset in
//! the document) — because text is tokenized deterministically and synthetic documents are pure
//! functions of (seed, index): `state()` is complete and `restore()` resumes bitwise. Skipping is
//! arithmetic on a token stream; synthetic documents skipped over are generated and dropped.

use std::sync::Arc;

use serde_json::{json, Value};

use super::source::TokenFiles;
use super::synthetic::{unigram_entropy, SyntheticCorpus};
use super::tokenizer::{fnv1a, Tokenizer, FNV_OFFSET};
use crate::error::{Error, Result};

/// `state()`'s format: 2 since all ranks walk one stream (1 held a rank's slice position).
const STATE_VERSION: u64 = 2;

/// One batch: `inputs[b * seq + t]`, `labels` the same tokens shifted one to the left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<i32>,
    pub labels: Vec<i32>,
    pub batch: usize,
    pub seq: usize,
}

pub(crate) enum Tokens {
    Owned(Vec<u32>),
    Files(TokenFiles),
}

impl Tokens {
    fn len(&self) -> u64 {
        match self {
            Tokens::Owned(v) => v.len() as u64,
            Tokens::Files(f) => f.len(),
        }
    }
    fn copy(&self, pos: u64, out: &mut [u32]) {
        match self {
            Tokens::Owned(v) => out.copy_from_slice(&v[pos as usize..pos as usize + out.len()]),
            Tokens::Files(f) => f.copy(pos, out),
        }
    }
    fn locate(&self, pos: u64) -> String {
        match self {
            Tokens::Owned(_) => format!("token {pos} of the tokenized text"),
            Tokens::Files(f) => f.locate(pos),
        }
    }
}

pub(crate) enum Stream {
    /// A whole token stream, read from `offset` in pass `epoch`.
    Flat {
        tokens: Tokens,
        epoch: u64,
        offset: u64,
        /// Identity of the stream, checked on restore.
        fingerprint: String,
    },
    /// Global document index `doc` (`cur`, tokenized) and the offset into it.
    Synthetic {
        corpus: SyntheticCorpus,
        tokenizer: Arc<dyn Tokenizer>,
        doc: u64,
        offset: usize,
        cur: Vec<u32>,
    },
}

pub struct DataLoader {
    pub(crate) name: String,
    pub(crate) stream: Stream,
    pub(crate) seq_len: usize,
    pub(crate) batch: usize,
    /// Ids must be below this (the tokenizer's or the configured vocabulary); None: no check.
    pub(crate) vocab: Option<usize>,
    pub(crate) tokenizer: Option<Arc<dyn Tokenizer>>,
    pub(crate) dp_rank: usize,
    pub(crate) dp_world: usize,
    pub(crate) buf: Vec<u32>,
    pub(crate) summary: String,
}

fn synthetic_doc(corpus: &SyntheticCorpus, tok: &dyn Tokenizer, global: u64) -> Result<Vec<u32>> {
    let text = corpus.document(global);
    let mut ids = Vec::with_capacity(text.len() + 2);
    ids.push(tok.bos_id());
    ids.extend(tok.encode(&text)?);
    ids.push(tok.eos_id());
    Ok(ids)
}

/// The settings every loader has, whatever its source.
pub(crate) struct Common {
    pub name: String,
    pub seq_len: usize,
    pub batch: usize,
    pub vocab: Option<usize>,
    pub tokenizer: Option<Arc<dyn Tokenizer>>,
    pub dp_rank: usize,
    pub dp_world: usize,
}

/// Identity of a whole token stream (all ranks), cheap even for a multi-GB file: its length and a
/// hash of 64 evenly spaced windows of 1024 tokens (everything, when that is shorter).
fn stream_fingerprint(tokens: &Tokens) -> String {
    const WINDOWS: u64 = 64;
    const WIDTH: u64 = 1024;
    let total = tokens.len();
    let mut h = fnv1a(&total.to_le_bytes(), FNV_OFFSET);
    let mut buf = Vec::new();
    let mut hash_range = |h: &mut u64, pos: u64, n: u64| {
        buf.resize(n as usize, 0u32);
        tokens.copy(pos, &mut buf);
        *h = fnv1a(bytemuck::cast_slice(&buf), *h);
    };
    if total <= WINDOWS * WIDTH {
        hash_range(&mut h, 0, total);
    } else {
        for w in 0..WINDOWS {
            hash_range(&mut h, w * (total - WIDTH) / (WINDOWS - 1), WIDTH);
        }
    }
    format!("{total}/{h:016x}")
}

impl DataLoader {
    fn with_stream(c: Common, stream: Stream) -> Self {
        Self {
            name: c.name,
            stream,
            seq_len: c.seq_len,
            batch: c.batch,
            vocab: c.vocab,
            tokenizer: c.tokenizer,
            dp_rank: c.dp_rank,
            dp_world: c.dp_world,
            buf: Vec::new(),
            summary: String::new(),
        }
    }

    pub(crate) fn new_flat(c: Common, tokens: Tokens) -> Result<Self> {
        let name = &c.name;
        let total = tokens.len();
        if total == 0 {
            return Err(Error::Data(format!("dataset {name} is empty (no tokens)")));
        }
        // A sample is seq_len + 1 consecutive tokens; a shorter stream would repeat itself
        // inside every sample.
        let sample = c.seq_len as u64 + 1;
        if total < sample {
            return Err(Error::Data(format!(
                "dataset {name} has {total} tokens, fewer than one sample of seq_len {} + 1 = \
                 {sample} tokens: give it more data or lower training.seq_len",
                c.seq_len
            )));
        }
        let fingerprint = stream_fingerprint(&tokens);
        let stream = Stream::Flat {
            tokens,
            epoch: 0,
            offset: 0,
            fingerprint,
        };
        Ok(Self::with_stream(c, stream))
    }

    pub(crate) fn new_synthetic(
        mut c: Common,
        corpus: SyntheticCorpus,
        tokenizer: Arc<dyn Tokenizer>,
    ) -> Result<Self> {
        let cur = synthetic_doc(&corpus, tokenizer.as_ref(), 0)?;
        c.tokenizer = Some(tokenizer.clone());
        let stream = Stream::Synthetic {
            corpus,
            tokenizer,
            doc: 0,
            offset: 0,
            cur,
        };
        Ok(Self::with_stream(c, stream))
    }

    /// One line for the training log: dataset, size, tokenizer, this rank's share.
    pub fn summary(&self) -> &str {
        &self.summary
    }

    /// Dataset name as configured ("synthetic", a path, ...).
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }
    pub fn batch_size(&self) -> usize {
        self.batch
    }
    /// The vocabulary ids are checked against (tokenizer's, or `DataConfig::vocab_size`).
    pub fn vocab_size(&self) -> Option<usize> {
        self.vocab
    }
    /// None only for token files loaded without a tokenizer.
    pub fn tokenizer(&self) -> Option<&dyn Tokenizer> {
        self.tokenizer.as_deref()
    }
    /// Tokens in the whole stream, which every rank walks (None for the endless synthetic
    /// corpus).
    pub fn stream_tokens(&self) -> Option<u64> {
        match &self.stream {
            Stream::Flat { tokens, .. } => Some(tokens.len()),
            Stream::Synthetic { .. } => None,
        }
    }

    /// Passes over the stream that `samples` more samples of this rank make: all ranks together
    /// move through it `dp_world` samples per sample of one rank (None for the endless
    /// synthetic corpus).
    pub fn epochs_for(&self, samples: u64) -> Option<f64> {
        let len = self.stream_tokens()?;
        let global = samples as f64 * self.dp_world as f64;
        Some(global * (self.seq_len as f64 + 1.0) / len as f64)
    }

    /// Unigram entropy (nats/token) of the stream: its first 2^20 tokens (synthetic: the first
    /// documents up to that many tokens). The same on every rank; does not move the loader.
    pub fn unigram_entropy(&self) -> Result<f64> {
        const N: u64 = 1 << 20;
        match &self.stream {
            Stream::Flat { tokens, .. } => {
                let mut v = vec![0u32; tokens.len().min(N) as usize];
                tokens.copy(0, &mut v);
                Ok(unigram_entropy(&v))
            }
            Stream::Synthetic {
                corpus, tokenizer, ..
            } => {
                let mut v = Vec::new();
                let mut doc = 0u64;
                while (v.len() as u64) < N {
                    v.extend(synthetic_doc(corpus, tokenizer.as_ref(), doc)?);
                    doc += 1;
                }
                Ok(unigram_entropy(&v))
            }
        }
    }

    /// The next `batch x seq_len` inputs and labels. On error the position is left unchanged.
    pub fn next_batch(&mut self) -> Result<Batch> {
        let saved = self.position();
        let result = self.next_batch_inner();
        if result.is_err() {
            self.set_position(saved);
        }
        result
    }

    /// (epoch, offset) or (document, offset): cheap to copy, unlike `state()`.
    fn position(&self) -> (u64, u64) {
        match &self.stream {
            Stream::Flat { epoch, offset, .. } => (*epoch, *offset),
            Stream::Synthetic { doc, offset, .. } => (*doc, *offset as u64),
        }
    }

    /// Back to a `position()` taken earlier; regenerating the synthetic document cannot fail
    /// here because it was generated successfully when that position was current.
    fn set_position(&mut self, (a, b): (u64, u64)) {
        match &mut self.stream {
            Stream::Flat { epoch, offset, .. } => (*epoch, *offset) = (a, b),
            Stream::Synthetic {
                corpus,
                tokenizer,
                doc,
                offset,
                cur,
            } => {
                if *doc != a {
                    let Ok(ids) = synthetic_doc(corpus, tokenizer.as_ref(), a) else {
                        return;
                    };
                    *cur = ids;
                    *doc = a;
                }
                *offset = b as usize;
            }
        }
    }

    /// This rank's share of the next global batch: skip the samples of the ranks before it,
    /// read its own, skip those of the ranks after it.
    fn next_batch_inner(&mut self) -> Result<Batch> {
        let (b, t) = (self.batch, self.seq_len);
        let sample = t as u128 + 1;
        let (before, after) = (self.dp_rank, self.dp_world - 1 - self.dp_rank);
        self.skip(before as u128 * b as u128 * sample)?;
        let mut inputs = Vec::with_capacity(b * t);
        let mut labels = Vec::with_capacity(b * t);
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(t + 1, 0);
        for _ in 0..b {
            self.fill(&mut buf)?;
            inputs.extend(buf[..t].iter().map(|&x| x as i32));
            labels.extend(buf[1..].iter().map(|&x| x as i32));
        }
        self.buf = buf;
        self.skip(after as u128 * b as u128 * sample)?;
        Ok(Batch {
            inputs,
            labels,
            batch: b,
            seq: t,
        })
    }

    /// Move `n` tokens on without reading them (other ranks check theirs), to the position
    /// reading them would leave: the epoch wrap in closed form on a token stream; synthetic
    /// documents generated (each once) only to learn their length.
    fn skip(&mut self, mut n: u128) -> Result<()> {
        match &mut self.stream {
            Stream::Flat {
                tokens,
                epoch,
                offset,
                ..
            } => {
                let (len, pos) = (tokens.len() as u128, *offset as u128 + n);
                let wraps = u64::try_from(pos / len).unwrap_or(u64::MAX);
                *epoch = epoch.saturating_add(wraps);
                *offset = (pos % len) as u64;
            }
            Stream::Synthetic {
                corpus,
                tokenizer,
                doc,
                offset,
                cur,
            } => loop {
                let left = (cur.len() - *offset) as u128;
                if n < left {
                    *offset += n as usize;
                    break;
                }
                n -= left;
                // As in `fill`: reaching a document's end moves on to the next one.
                *cur = synthetic_doc(corpus, tokenizer.as_ref(), *doc + 1)?;
                *doc += 1;
                *offset = 0;
            },
        }
        Ok(())
    }

    /// Next `out.len()` tokens of the stream, each checked against the vocabulary.
    fn fill(&mut self, out: &mut [u32]) -> Result<()> {
        let limit = self
            .vocab
            .map_or(i32::MAX as u64 + 1, |v| (v as u64).min(i32::MAX as u64 + 1));
        let mut done = 0;
        match &mut self.stream {
            Stream::Flat {
                tokens,
                epoch,
                offset,
                ..
            } => {
                let len = tokens.len();
                while done < out.len() {
                    let n = (out.len() - done).min((len - *offset) as usize);
                    let dst = &mut out[done..done + n];
                    let pos = *offset;
                    tokens.copy(pos, dst);
                    if let Some(i) = dst.iter().position(|&x| x as u64 >= limit) {
                        return Err(Error::Data(format!(
                            "dataset {}: id {} at {} is not below the vocabulary size {limit}",
                            self.name,
                            dst[i],
                            tokens.locate(pos + i as u64)
                        )));
                    }
                    done += n;
                    *offset += n as u64;
                    if *offset == len {
                        *offset = 0;
                        *epoch += 1;
                    }
                }
            }
            Stream::Synthetic {
                corpus,
                tokenizer,
                doc,
                offset,
                cur,
            } => {
                while done < out.len() {
                    let n = (out.len() - done).min(cur.len() - *offset);
                    let dst = &mut out[done..done + n];
                    dst.copy_from_slice(&cur[*offset..*offset + n]);
                    if let Some(i) = dst.iter().position(|&x| x as u64 >= limit) {
                        return Err(Error::Data(format!(
                            "synthetic dataset: id {} from tokenizer {} is not below the \
                             vocabulary size {limit}",
                            dst[i],
                            tokenizer.name()
                        )));
                    }
                    done += n;
                    *offset += n;
                    if *offset == cur.len() {
                        *doc += 1;
                        *offset = 0;
                        *cur = synthetic_doc(corpus, tokenizer.as_ref(), *doc)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Everything that determines the batches to come, as JSON (for the checkpoint manifest):
    /// the global stream position, the same on every rank. `dp_world` only records the layout
    /// that saved it; any layout restores it.
    pub fn state(&self) -> Value {
        match &self.stream {
            Stream::Flat {
                tokens,
                epoch,
                offset,
                fingerprint,
            } => json!({
                "version": STATE_VERSION,
                "kind": "tokens",
                "dataset": self.name,
                "dp_world": self.dp_world,
                "tokens": tokens.len(),
                "fingerprint": fingerprint,
                "epoch": epoch,
                "offset": offset,
            }),
            Stream::Synthetic {
                corpus,
                tokenizer,
                doc,
                offset,
                ..
            } => json!({
                "version": STATE_VERSION,
                "kind": "synthetic",
                "dataset": self.name,
                "dp_world": self.dp_world,
                "seed": corpus.seed(),
                "tokenizer": tokenizer.fingerprint(),
                "doc": doc,
                "offset": offset,
            }),
        }
    }

    /// Resume at a position from `state()`, saved at any data parallel rank and degree. The
    /// loader must be built from the same dataset, tokenizer and seed; a mismatch is an error,
    /// never a silent skip.
    pub fn restore(&mut self, state: &Value) -> Result<()> {
        let bad = |what: &str| Error::Data(format!("data loader state: {what} (state: {state})"));
        let get = |k: &str| {
            state
                .get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| bad(&format!("missing integer field {k:?}")))
        };
        let kind = state
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no \"kind\""))?;
        // Version 1 (per-rank slices) is the same position only where it had one rank.
        let version = get("version")?;
        let v1 = match version {
            STATE_VERSION => false,
            1 if get("dp_world")? == 1 => true,
            1 => {
                return Err(bad(&format!(
                    "saved by an earlier titan whose data parallel ranks read separate slices \
                     (saved at rank {} of {}); that position does not carry over to the shared \
                     stream: set checkpoint.exclude_from_loading = \"dataloader\" to start the \
                     data over",
                    get("dp_rank")?,
                    get("dp_world")?
                )))
            }
            v => return Err(bad(&format!("unknown version {v}"))),
        };
        match &mut self.stream {
            Stream::Flat {
                tokens,
                epoch,
                offset,
                fingerprint,
            } => {
                if kind != "tokens" {
                    return Err(bad(
                        "saved from a synthetic dataset, restoring into a token stream",
                    ));
                }
                let total = tokens.len();
                let (saved, start) = match v1 {
                    true => (get("slice_len")?, get("slice_start")?),
                    false => (get("tokens")?, 0),
                };
                if saved != total || start != 0 {
                    return Err(bad(&format!(
                        "saved for a different dataset (this loader's: {total} tokens)"
                    )));
                }
                if state.get("fingerprint").and_then(Value::as_str) != Some(fingerprint.as_str()) {
                    return Err(bad(&format!(
                        "saved for different data (this loader's tokens: {fingerprint})"
                    )));
                }
                let off = get("offset")?;
                if off >= total {
                    return Err(bad("offset past the end of the stream"));
                }
                *epoch = get("epoch")?;
                *offset = off;
            }
            Stream::Synthetic {
                corpus,
                tokenizer,
                doc,
                offset,
                cur,
            } => {
                if kind != "synthetic" {
                    return Err(bad(
                        "saved from a token stream, restoring into a synthetic dataset",
                    ));
                }
                if get("seed")? != corpus.seed() {
                    return Err(bad(&format!(
                        "different seed (this loader: {})",
                        corpus.seed()
                    )));
                }
                let saved_tok = state.get("tokenizer").and_then(Value::as_str);
                if saved_tok != Some(tokenizer.fingerprint().as_str()) {
                    return Err(bad(&format!(
                        "different tokenizer (this loader: {})",
                        tokenizer.name()
                    )));
                }
                let d = get("doc")?;
                let ids = synthetic_doc(corpus, tokenizer.as_ref(), d)?;
                let off = get("offset")? as usize;
                if off >= ids.len() {
                    return Err(bad("offset past the end of its document"));
                }
                *doc = d;
                *offset = off;
                *cur = ids;
            }
        }
        Ok(())
    }
}
