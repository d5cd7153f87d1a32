//! Token-file readers: `read_token_batches` (titan eval's .json / .bin / .u16.bin inputs) and
//! the training loader `build_loader` over .u32.bin / .u16.bin / .bin token files, .txt and
//! .jsonl text (byte tokenizer) and folders of them, with `next_batch`, `state` / `restore`.
//!
//! Correct results checked against a reference written here from the formats' documentation
//! (engine/data/eval.rs, source.rs, loader.rs): the same verdict, and the same batches when
//! accepted; a resumed loader continues with the same batches; a loader restored from an
//! edited state that it accepts continues from the offset that state names. Every error names
//! the file or dataset.

use super::{mutate, Case, Check, Dump, Fz, Verdict};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use titan::data::{build_loader, read_token_batches, Batch, DataConfig, DataLoader, TokenDType};
use titan::Error;

const BOS: u32 = 256;
const EOS: u32 = 257;
/// Ids are i32 on the device: the loaders' ceiling without a vocabulary.
const ID_CEILING: u64 = i32::MAX as u64 + 1;

fn limit(vocab: Option<usize>) -> u64 {
    vocab.map_or(ID_CEILING, |v| (v as u64).min(ID_CEILING))
}

fn random_ids(fz: &mut Fz, n: usize) -> Vec<u32> {
    (0..n)
        .map(|_| match fz.below(40) {
            0 => *fz.pick(&[259, 300, 65535, 65536, 1 << 31, u32::MAX]),
            _ => fz.below(300) as u32,
        })
        .collect()
}

fn le_bytes(ids: &[u32], size: usize) -> Vec<u8> {
    ids.iter()
        .flat_map(|&x| x.to_le_bytes()[..size].to_vec())
        .collect()
}

fn decode(bytes: &[u8], size: usize) -> Option<Vec<u32>> {
    if !bytes.len().is_multiple_of(size) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(size)
            .map(|c| c.iter().rev().fold(0u32, |a, &b| (a << 8) | b as u32))
            .collect(),
    )
}

fn batches_of(seqs: &[Vec<u32>], batch: usize) -> Vec<Batch> {
    seqs.chunks(batch)
        .map(|g| {
            let seq = g[0].len() - 1;
            Batch {
                inputs: g
                    .iter()
                    .flat_map(|s| s[..seq].iter().map(|&x| x as i32))
                    .collect(),
                labels: g
                    .iter()
                    .flat_map(|s| s[1..].iter().map(|&x| x as i32))
                    .collect(),
                batch: g.len(),
                seq,
            }
        })
        .collect()
}

/// What `read_token_batches` must return for this file (None: an error).
fn eval_reference(
    name: &str,
    bytes: &[u8],
    seq_len: Option<usize>,
    batch: usize,
    vocab: Option<usize>,
) -> Option<Vec<Batch>> {
    if batch == 0 {
        return None;
    }
    let lower = name.to_ascii_lowercase();
    let seqs: Vec<Vec<u32>> = if lower.ends_with(".json") {
        let v: Value = serde_json::from_slice(bytes).ok()?;
        let mut seqs = Vec::new();
        for l in v.as_array()? {
            let ids: Option<Vec<u32>> = l
                .as_array()?
                .iter()
                .map(|x| {
                    x.as_u64()
                        .filter(|&x| x <= u32::MAX as u64)
                        .map(|x| x as u32)
                })
                .collect();
            seqs.push(ids?);
        }
        let n = seqs.first()?.len();
        if n < 2 || seqs.iter().any(|s| s.len() != n) {
            return None;
        }
        if seq_len.is_some_and(|t| t as u128 + 1 != n as u128) {
            return None;
        }
        seqs
    } else if lower.ends_with(".bin") {
        let size = if lower.ends_with(".u16.bin") { 2 } else { 4 };
        let t = seq_len.filter(|&t| t > 0)? as u128;
        let ids = decode(bytes, size)?;
        if (ids.len() as u128) < t + 1 {
            return None;
        }
        ids.chunks_exact(t as usize + 1)
            .map(<[u32]>::to_vec)
            .collect()
    } else {
        return None;
    };
    if seqs.iter().flatten().any(|&id| id as u64 >= limit(vocab)) {
        return None;
    }
    Some(batches_of(&seqs, batch))
}

fn eval_case(fz: &mut Fz, dir: &Path) -> Case {
    let name = *fz.pick(&[
        "eval.json",
        "eval.bin",
        "eval.u16.bin",
        "eval.u32.bin",
        "EVAL.U16.BIN",
        "eval.txt",
    ]);
    let (n_seq, len) = (fz.range(0, 6), fz.range(1, 10));
    let seqs: Vec<Vec<u32>> = (0..n_seq).map(|_| random_ids(fz, len)).collect();
    let mut bytes = if name.ends_with(".json") {
        serde_json::to_vec(&seqs).unwrap()
    } else {
        let size = if name.to_ascii_lowercase().ends_with(".u16.bin") {
            2
        } else {
            4
        };
        le_bytes(&seqs.concat(), size)
    };
    if fz.chance(0.4) {
        bytes = match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) if name.ends_with(".json") => mutate::json_bytes(fz, &v),
            _ => {
                for _ in 0..fz.range(1, 3) {
                    mutate::bytes(fz, &mut bytes, None);
                }
                bytes
            }
        };
    }
    let seq_len = match fz.below(11) {
        0 => None,
        1 => Some(0),
        2 | 9 | 10 => Some(len.saturating_sub(1)),
        3 => Some(len),
        4 => Some(usize::MAX),
        5 => Some(usize::MAX - 1),
        6 => Some(1 << 40),
        _ => Some(fz.range(1, 12)),
    };
    let batch = *fz.pick(&[0, 1, 2, 3, 8, usize::MAX, 1, 2]);
    let vocab = *fz.pick(&[
        None,
        None,
        Some(0),
        Some(1),
        Some(259),
        Some(300),
        Some(1 << 31),
        Some(usize::MAX),
    ]);
    fz.note(format!(
        "read_token_batches({name}, seq_len {seq_len:?}, batch {batch}, vocab {vocab:?})"
    ));
    let path = dir.join(name);
    super::write_fresh(&path, &bytes);
    let want = eval_reference(name, &bytes, seq_len, batch, vocab);
    let inputs = vec![Dump::new(name, bytes)];
    let run = move || match (read_token_batches(&path, seq_len, batch, vocab), want) {
        (Ok(got), Some(want)) if got == want => Ok(Verdict::Accepted),
        (Ok(got), want) => Err(format!("read {got:?}, the reference says {want:?}")),
        (Err(e), None) => {
            super::names(&e.to_string(), &path.display().to_string())?;
            Ok(Verdict::Rejected)
        }
        (Err(e), Some(want)) => Err(format!("rejected ({e}), the reference reads {want:?}")),
    };
    Case {
        inputs,
        run: Box::new(run),
    }
}

/// A dataset file: relative path and bytes.
type File = (String, Vec<u8>);

fn text_doc(fz: &mut Fz) -> String {
    const WORDS: &[&str] = &[
        "the", "cat", "é", "日本", "🦀", "\t", "\n", "\r\n", " ", "\"q\"", "\\", "\u{0}", "{}", "x",
    ];
    (0..fz.range(0, 30)).map(|_| *fz.pick(WORDS)).collect()
}

/// Dataset files of one kind, before mutation.
fn dataset(fz: &mut Fz) -> Vec<File> {
    let n = if fz.chance(0.3) { fz.range(2, 3) } else { 1 };
    let mut files = Vec::new();
    for i in 0..n {
        let sub = if fz.chance(0.2) { "sub/" } else { "" };
        let file = match fz.below(6) {
            0 | 1 => {
                let ext = *fz.pick(&["u32.bin", "u16.bin", "bin"]);
                let size = if ext == "u16.bin" { 2 } else { 4 };
                let k = fz.range(0, 80);
                (
                    format!("{sub}d{i}.{ext}"),
                    le_bytes(&random_ids(fz, k), size),
                )
            }
            2 | 3 => (format!("{sub}d{i}.txt"), text_doc(fz).into_bytes()),
            _ => {
                let mut s = String::new();
                for _ in 0..fz.range(0, 5) {
                    match fz.below(8) {
                        0 => s.push('\n'),
                        1 => s.push_str("{\"text\": 5}\n"),
                        _ => {
                            let line = json!({"text": text_doc(fz), "id": 1}).to_string();
                            s.push_str(&line);
                            s.push('\n');
                        }
                    }
                }
                (format!("{sub}d{i}.jsonl"), s.into_bytes())
            }
        };
        files.push(file);
    }
    if fz.chance(0.1) {
        files.push((".hidden.txt".into(), b"skipped".to_vec()));
    }
    files
}

/// The tokens a dataset stands for (None: it must be refused when the loader is built).
fn stream_reference(
    files: &[File],
    single: bool,
    dtype: Option<TokenDType>,
    vocab: Option<usize>,
) -> Option<(Vec<u32>, Option<usize>)> {
    let mut files: Vec<(PathBuf, &[u8])> = files
        .iter()
        .filter(|(p, _)| single || !p.starts_with('.'))
        .map(|(p, b)| (PathBuf::from(p), &b[..]))
        .collect();
    files.sort();
    let is_tokens = |p: &Path| p.to_string_lossy().ends_with(".bin");
    let n_tok = files.iter().filter(|(p, _)| is_tokens(p)).count();
    if files.is_empty() || (n_tok != 0 && n_tok != files.len()) {
        return None;
    }
    let mut stream = Vec::new();
    if n_tok > 0 {
        for (p, b) in &files {
            let name = p.to_string_lossy();
            let ext = if name.ends_with(".u16.bin") {
                Some(2)
            } else if name.ends_with(".u32.bin") {
                Some(4)
            } else {
                None
            };
            let size = dtype.map(|d| d.size()).or(ext)?;
            stream.extend(decode(b, size)?);
        }
        return Some((stream, vocab));
    }
    if vocab.is_some_and(|v| v < 259) {
        return None;
    }
    let mut docs = 0;
    for (p, b) in &files {
        let text = std::str::from_utf8(b).ok()?;
        let texts: Vec<String> = if p.to_string_lossy().ends_with(".txt") {
            vec![text.to_string()]
        } else {
            let mut t = Vec::new();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: Value = serde_json::from_str(line).ok()?;
                t.push(v.get("text")?.as_str()?.to_string());
            }
            t
        };
        for t in texts {
            docs += 1;
            stream.push(BOS);
            stream.extend(t.bytes().map(u32::from));
            stream.push(EOS);
        }
    }
    // Documents that hold no text at all (only BOS + EOS each) are an empty dataset: an error
    // (issue 15's data guards).
    (docs > 0 && stream.len() > 2 * docs).then_some((stream, Some(vocab.unwrap_or(259))))
}

/// The loader's reference: the whole stream read cyclically, this rank's `batch` samples of
/// seq_len + 1 out of each global batch of `world x batch` (only its own ids are checked).
struct Reference {
    stream: Vec<u32>,
    limit: u64,
    seq_len: usize,
    batch: usize,
    rank: usize,
    world: usize,
    pos: usize,
}

impl Reference {
    fn next(&mut self) -> Option<Batch> {
        let (t, n) = (self.seq_len, self.stream.len());
        let mut seqs = Vec::new();
        let mut p = (self.pos + self.rank * self.batch * (t + 1)) % n;
        for _ in 0..self.batch {
            let s: Vec<u32> = (0..=t).map(|k| self.stream[(p + k) % n]).collect();
            if s.iter().any(|&x| x as u64 >= self.limit) {
                return None;
            }
            p = (p + t + 1) % n;
            seqs.push(s);
        }
        self.pos = (p + (self.world - 1 - self.rank) * self.batch * (t + 1)) % n;
        batches_of(&seqs, self.batch).pop()
    }
}

fn take(l: &mut DataLoader, r: &mut Reference, n: usize, what: &str) -> Result<(), String> {
    for i in 0..n {
        match (l.next_batch(), r.next()) {
            (Ok(a), Some(b)) if a == b => {}
            (Err(e), None) => super::names(&e.to_string(), l.name())?,
            (a, b) => {
                return Err(format!(
                    "{what} batch {i}: loader {:?}, reference {b:?}",
                    a.map_err(|e| e.to_string())
                ))
            }
        }
    }
    Ok(())
}

fn loader_case(fz: &mut Fz, dir: &Path) -> Case {
    // Files of the previous case go; the folders stay (cheaper than new ones per case).
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for sub in [dir.to_path_buf(), dir.join("sub")] {
        for e in std::fs::read_dir(&sub).unwrap() {
            let p = e.unwrap().path();
            if p.is_file() {
                std::fs::remove_file(p).unwrap();
            }
        }
    }
    let mut files = dataset(fz);
    let k = fz.below(files.len());
    if fz.chance(0.5) {
        let f = &mut files[k].1;
        for _ in 0..fz.range(1, 3) {
            if fz.chance(0.5) {
                let t = String::from_utf8_lossy(f).into_owned();
                *f = mutate::text(fz, &t);
            } else {
                mutate::bytes(fz, f, None);
            }
        }
        fz.note(format!("(mutations above: {})", files[k].0));
    }
    for (p, b) in &files {
        super::write_fresh(&dir.join(p), b);
    }
    let single = files.len() == 1;
    let path = if single {
        dir.join(&files[0].0)
    } else {
        dir.to_path_buf()
    };
    let (dp_rank, dp_world) = *fz.pick(&[(0, 1), (0, 1), (0, 2), (1, 2), (2, 3), (1, 1)]);
    let cfg = DataConfig {
        dataset: "fuzz".into(),
        dataset_path: Some(path.clone()),
        tokenizer: None,
        // Huge lengths only where they cannot be allocated at all (capacity overflow).
        seq_len: *fz.pick(&[1, 2, 3, 5, 8, 16, 33, 100, 1, 2, 3, 8, usize::MAX, 1 << 62]),
        batch: fz.range(1, 3),
        seed: 0,
        dp_rank,
        dp_world,
        token_dtype: *fz.pick(&[None, None, Some(TokenDType::U16), Some(TokenDType::U32)]),
        vocab_size: *fz.pick(&[
            None,
            Some(100),
            Some(259),
            Some(300),
            Some(1 << 31),
            Some(usize::MAX),
        ]),
        progress: false,
    };
    fz.note(format!(
        "seq_len {} batch {} dp {dp_rank}/{dp_world} dtype {:?} vocab {:?}",
        cfg.seq_len, cfg.batch, cfg.token_dtype, cfg.vocab_size
    ));
    let reference = stream_reference(&files, single, cfg.token_dtype, cfg.vocab_size);
    let state_edit = fz.u64();
    let inputs = files
        .iter()
        .map(|(p, b)| Dump::new(p.clone(), b.clone()))
        .collect();
    let run = move || run_loader(&cfg, reference, state_edit, &path);
    Case {
        inputs,
        run: Box::new(run),
    }
}

fn run_loader(
    cfg: &DataConfig,
    reference: Option<(Vec<u32>, Option<usize>)>,
    state_edit: u64,
    path: &Path,
) -> Check {
    // Data errors name the dataset; config errors (rank, vocab_size) name their setting.
    let named = |e: &Error| match e {
        Error::Config(_) => Ok(()),
        other => super::names(&other.to_string(), &path.display().to_string()),
    };
    let built = build_loader(cfg);
    let (stream, vocab) = match (reference, &built) {
        (None, Err(e)) => return named(e).map(|()| Verdict::Rejected),
        (None, Ok(_)) => return Err("the loader accepted a dataset the reference refuses".into()),
        (Some(r), _) => r,
    };
    let total = stream.len();
    let (rank, world) = (cfg.dp_rank, cfg.dp_world);
    let mut l = match built {
        Err(e) if world == 0 || rank >= world => return named(&e).map(|()| Verdict::Rejected),
        // Refusing a stream shorter than one sample (issue 15's data guards) is allowed too.
        Err(e) if total <= cfg.seq_len => return named(&e).map(|()| Verdict::Rejected),
        Err(e) => {
            return Err(format!(
                "rejected ({e}), the reference reads {total} tokens"
            ))
        }
        Ok(_) if rank >= world => return Err(format!("accepted rank {rank} of {world}")),
        Ok(_) if total <= cfg.seq_len => {
            return Err(format!(
                "accepted {total} tokens at seq_len {}",
                cfg.seq_len
            ))
        }
        // The reference below walks seq_len tokens per sample.
        Ok(_) if cfg.seq_len > 1 << 20 => return Err(format!("accepted seq_len {}", cfg.seq_len)),
        Ok(l) => l,
    };
    let mut r = Reference {
        stream,
        limit: limit(vocab),
        seq_len: cfg.seq_len,
        batch: cfg.batch,
        rank,
        world,
        pos: 0,
    };
    let entropy = l.unigram_entropy().map_err(|e| e.to_string())?;
    if !(entropy.is_finite() && entropy >= 0.0) {
        return Err(format!("unigram entropy {entropy}"));
    }
    take(&mut l, &mut r, 3, "first run")?;
    // Resume from the state: the same batches follow.
    let state = l.state();
    let mut again = build_loader(cfg).map_err(|e| format!("second build: {e}"))?;
    again
        .restore(&state)
        .map_err(|e| format!("restore of its own state: {e}"))?;
    let mut r2 = Reference {
        stream: r.stream.clone(),
        pos: r.pos,
        ..r
    };
    take(&mut again, &mut r2, 2, "resumed")?;
    // An edited state: refused, or followed from the offset it names.
    let mut fz = super::Fz::new(state_edit);
    let mut edited = state.clone();
    mutate::json(&mut fz, &mut edited);
    let mut third = build_loader(cfg).map_err(|e| format!("third build: {e}"))?;
    if third.restore(&edited).is_ok() {
        let pos = edited["offset"]
            .as_u64()
            .ok_or("restore accepted a state without an offset")? as usize;
        if pos >= r2.stream.len() {
            return Err(format!(
                "restore accepted offset {pos} of a {}-token stream",
                r2.stream.len()
            ));
        }
        let mut r3 = Reference { pos, ..r2 };
        take(&mut third, &mut r3, 1, &format!("restored from {edited}"))?;
    }
    Ok(Verdict::Accepted)
}

pub fn eval_generator(dir: PathBuf) -> impl FnMut(&mut Fz) -> Case {
    move |fz: &mut Fz| eval_case(fz, &dir)
}

pub fn loader_generator(dir: PathBuf) -> impl FnMut(&mut Fz) -> Case {
    move |fz: &mut Fz| loader_case(fz, &dir.join("data"))
}
