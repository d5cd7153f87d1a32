//! Fixed token inputs for `titan eval` (and parity tests against reference implementations).
//!
//! Two formats:
//! - a token file (`.bin` / `.u32.bin`: little-endian u32 ids; `.u16.bin`: u16), cut into
//!   non-overlapping sequences of `seq_len + 1` tokens (a trailing remainder shorter than that is
//!   dropped) — the same sample layout as training;
//! - a `.json` list of lists of ids, e.g. `[[128000, 791, 1917], [128000, 40, 1093]]`: each inner
//!   list is one full sequence (inputs = list[..n-1], labels = list[1..]); all lists must have the
//!   same length n, and if `seq_len` is given, n must be `seq_len + 1`.
//!
//! Sequences are grouped `batch` at a time; the last batch may hold fewer.

use std::path::Path;

use serde_json::Value;

use super::loader::Batch;
use super::source::{read_token_file, TokenDType};
use crate::error::{Error, Result};

pub fn read_token_batches(
    path: &Path,
    seq_len: Option<usize>,
    batch: usize,
    vocab_size: Option<usize>,
) -> Result<Vec<Batch>> {
    if batch == 0 {
        return Err(Error::Config(format!(
            "eval tokens {}: batch size 0",
            path.display()
        )));
    }
    if !path.is_file() {
        return Err(Error::Data(format!(
            "eval token file {} does not exist",
            path.display()
        )));
    }
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let seqs: Vec<Vec<u32>> = if is_json {
        read_json_lists(path, seq_len)?
    } else {
        // A plain .bin here means u32: eval fixtures are written by scripts that know the vocab.
        let name = path.to_string_lossy().to_ascii_lowercase();
        let dtype = if name.ends_with(".u16.bin") {
            TokenDType::U16
        } else if name.ends_with(".bin") {
            TokenDType::U32
        } else {
            return Err(Error::Data(format!(
                "eval token file {}: expected .json, .bin, .u16.bin or .u32.bin",
                path.display()
            )));
        };
        let Some(t) = seq_len.filter(|&t| t > 0) else {
            return Err(Error::Config(format!(
                "eval token file {}: a token file needs seq_len",
                path.display()
            )));
        };
        let ids = read_token_file(path, dtype)?;
        // `<= t`, not `< t + 1`: seq_len may be usize::MAX.
        if ids.len() <= t {
            return Err(Error::Data(format!(
                "eval token file {}: {} tokens, fewer than one sequence of seq_len + 1 = {}",
                path.display(),
                ids.len(),
                t as u128 + 1
            )));
        }
        ids.chunks_exact(t + 1).map(<[u32]>::to_vec).collect()
    };

    let limit = vocab_size.map_or(i32::MAX as u64 + 1, |v| (v as u64).min(i32::MAX as u64 + 1));
    for (s, seq) in seqs.iter().enumerate() {
        if let Some((i, &id)) = seq.iter().enumerate().find(|(_, &id)| id as u64 >= limit) {
            return Err(Error::Data(format!(
                "eval token file {}: sequence {s}, position {i}: id {id} is not below the \
                 vocabulary size {limit}",
                path.display()
            )));
        }
    }
    Ok(seqs
        .chunks(batch)
        .map(|group| {
            let seq = group[0].len() - 1;
            let mut inputs = Vec::with_capacity(group.len() * seq);
            let mut labels = Vec::with_capacity(group.len() * seq);
            for s in group {
                inputs.extend(s[..seq].iter().map(|&x| x as i32));
                labels.extend(s[1..].iter().map(|&x| x as i32));
            }
            Batch {
                inputs,
                labels,
                batch: group.len(),
                seq,
            }
        })
        .collect())
}

fn read_json_lists(path: &Path, seq_len: Option<usize>) -> Result<Vec<Vec<u32>>> {
    let bad = |why: String| Error::Data(format!("eval token file {}: {why}", path.display()));
    let text = std::fs::read(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let v: Value =
        serde_json::from_slice(&text).map_err(|e| bad(format!("not valid JSON ({e})")))?;
    let lists = v
        .as_array()
        .ok_or_else(|| bad("expected a list of lists of token ids".into()))?;
    if lists.is_empty() {
        return Err(bad("no sequences".into()));
    }
    let mut out = Vec::with_capacity(lists.len());
    for (s, l) in lists.iter().enumerate() {
        let items = l
            .as_array()
            .ok_or_else(|| bad(format!("sequence {s} is not a list")))?;
        let mut seq = Vec::with_capacity(items.len());
        for (i, x) in items.iter().enumerate() {
            let id = x
                .as_u64()
                .filter(|&id| id <= u32::MAX as u64)
                .ok_or_else(|| bad(format!("sequence {s}, position {i}: {x} is not a token id")))?;
            seq.push(id as u32);
        }
        out.push(seq);
    }
    let n = out[0].len();
    if n < 2 {
        return Err(bad(format!(
            "sequences need at least 2 ids (inputs + labels), got {n}"
        )));
    }
    if let Some(s) = out.iter().position(|q| q.len() != n) {
        return Err(bad(format!(
            "sequence {s} has {} ids, sequence 0 has {n}: all must match",
            out[s].len()
        )));
    }
    if let Some(t) = seq_len {
        if t.checked_add(1) != Some(n) {
            return Err(bad(format!(
                "sequences have {n} ids, seq_len {t} needs {}",
                t as u128 + 1
            )));
        }
    }
    Ok(out)
}
