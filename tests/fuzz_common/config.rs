//! The TOML config reader and its CLI overrides (`JobConfig::from_toml_str`, `JobConfig::load`).
//!
//! Correct results checked: every accepted config saves to TOML and loads back equal, and its
//! parallel degrees resolve to products that equal the world size; an edit that keeps a TOML
//! file's meaning (comments, blank lines, spacing, section and key order) gives the very same
//! config; an override given as `--k v`, as `--k=v` and written into the file gives the same
//! verdict and, when accepted, the same config. Every rejection is `Error::Config` (or `Io`)
//! naming the file or the command line.

use super::config_edit::{
    integer_storm, literal, random_overrides, same_meaning, set_in_file, value, Kind, KEYS,
};
use super::{mutate, Case, Check, Dump, Fz, Verdict};
use std::path::PathBuf;
use titan::train::config::JobConfig;
use titan::Error;

/// torchtitan-era spellings: aliases, unsupported sections and keys, nested tables.
const TORCHTITAN_STYLE: &str = r#"
[job]
dump_folder = "./outputs/fuzz"
description = "torchtitan v0.1 spellings"
print_args = false
use_for_integration_test = true

[profiling]
enable_profiling = true
profile_freq = 100

[metrics]
log_freq = 5
disable_color_printing = true

[model]
name = "llama3"
flavor = "debugmodel"
tokenizer_path = "./tests/assets/tokenizer"
converters = ["float8"]

[optimizer]
name = "AdamW"
lr = 8e-4
implementation = "foreach"

[lr_scheduler]
warmup_steps = 2
decay_ratio = 0.8
decay_type = "cosine"
lr_min = 0.1

[training]
dataset = "c4_test"
local_batch_size = 4
global_batch_size = 8
seq_len = 128
max_norm = 1
steps = 10
compile = false
gc_freq = 50

[training.dataloader]
num_workers = 2

[parallelism]
data_parallel_shard_degree = -1
pipeline_parallel_split_points = "layers.1,layers.2"
module_fqns_per_model_part = [["tok_embeddings", "layers.0"], ["layers.1", "norm", "output"]]

[checkpoint]
enable_checkpoint = true
interval = 5
last_save_model_weights_only = false
exclude_from_loading = "dataloader,lr_scheduler"

[activation_checkpoint]
mode = "selective"
selective_ac_option = 2

[float8]
enable_fsdp_float8_all_gather = true

[quantize.linear.float8]
emulate = true

[debug]
seed = 7
deterministic = true
"#;
struct Base {
    name: String,
    text: String,
    cfg: JobConfig,
    /// No alias spellings: a key written into it has no other spelling to collide with.
    plain: bool,
}

fn bases() -> Vec<Base> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let mut out: Vec<(String, String, bool)> = files
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(p).unwrap(), true)
        })
        .collect();
    out.push((
        "torchtitan_style.toml".into(),
        TORCHTITAN_STYLE.into(),
        false,
    ));
    out.into_iter()
        .map(|(name, text, plain)| {
            let cfg = JobConfig::from_toml_str(&text, &name, &[])
                .unwrap_or_else(|e| panic!("pristine {name} must load: {e}"));
            Base {
                name,
                text,
                cfg,
                plain,
            }
        })
        .collect()
}

/// The config with the warn list in a canonical order (it follows table order).
fn norm(mut c: JobConfig) -> JobConfig {
    c.ignored.sort();
    c
}

/// Every rejection is a config (or I/O) error naming where the bad input came from.
fn check_err(e: &Error, origin: &str) -> Result<(), String> {
    match e {
        // "<defaults>": the command line cleared --job.config_file.
        Error::Config(m)
            if m.contains(origin) || m.contains("command line") || m.contains("<defaults>") =>
        {
            Ok(())
        }
        // A file the command line named (maybe a mangled --job.config_file): the path is given.
        Error::Io { .. } => Ok(()),
        other => Err(format!("not a config error naming {origin}: {other:?}")),
    }
}

/// What must hold of any accepted config.
fn check_ok(cfg: &JobConfig) -> Result<(), String> {
    let text = cfg
        .to_toml_string()
        .map_err(|e| format!("cannot save an accepted config: {e}"))?;
    let back = JobConfig::from_toml_str(&text, "saved.toml", &[])
        .map_err(|e| format!("a saved config does not load back: {e}\n{text}"))?;
    let mut want = cfg.clone();
    want.ignored.clear();
    if back != want {
        return Err(format!(
            "a saved config loads back different:\n{back:?}\nvs\n{want:?}"
        ));
    }
    let _ = (
        cfg.schedule_steps(),
        cfg.checkpoint_load_step(),
        cfg.checkpoint_root(),
    );
    for world in [1usize, 2, 3, 4, 8, 1 << 20] {
        let Ok(d) = cfg.parallelism.resolve(world) else {
            continue;
        };
        let product: u128 = [d.dp_replicate, d.dp_shard, d.cp, d.tp, d.pp]
            .iter()
            .map(|&x| x as u128)
            .product();
        if product != world as u128 {
            return Err(format!("world {world} resolved to degrees {d:?}"));
        }
        if let Ok(accum) = cfg.gradient_accumulation_steps(d.dp()) {
            let t = &cfg.training;
            let got = t.local_batch_size as u128 * d.dp() as u128 * accum as u128;
            let ok = match t.global_batch_size {
                -1 => accum == 1,
                g => got == g as u128,
            };
            if !ok {
                return Err(format!(
                    "world {world}: {accum} accumulation steps for local {} x dp {} vs global {}",
                    t.local_batch_size,
                    d.dp(),
                    t.global_batch_size
                ));
            }
        }
    }
    Ok(())
}

fn verdict(r: titan::Result<JobConfig>, origin: &str) -> Check {
    match r {
        Ok(c) => check_ok(&c).map(|()| Verdict::Accepted),
        Err(e) => check_err(&e, origin).map(|()| Verdict::Rejected),
    }
}
fn write_tmp(dir: &std::path::Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    super::write_fresh(&p, bytes);
    p
}

/// The config reader's generator: five kinds of cases over the repository's configs and a
/// torchtitan-style file.
pub fn generator(dir: PathBuf) -> impl FnMut(&mut Fz) -> Case {
    let bases = bases();
    move |fz: &mut Fz| {
        let base = &bases[fz.below(bases.len())];
        fz.note(format!("base {}", base.name));
        let origin = "fuzz.toml";
        match fz.below(10) {
            // Text mutations (through a real file now and then, for non-UTF-8 bytes).
            0..=2 => {
                let mut bytes = base.text.clone().into_bytes();
                for _ in 0..fz.range(1, 4) {
                    let t = String::from_utf8_lossy(&bytes).into_owned();
                    bytes = mutate::text(fz, &t);
                }
                let inputs = vec![Dump::new(origin, bytes.clone())];
                if fz.chance(0.3) {
                    let path = write_tmp(&dir, origin, &bytes);
                    let run = move || verdict(JobConfig::load(Some(&path), &[]), origin);
                    return Case {
                        inputs,
                        run: Box::new(run),
                    };
                }
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let run = move || verdict(JobConfig::from_toml_str(&text, origin, &[]), origin);
                Case {
                    inputs,
                    run: Box::new(run),
                }
            }
            // Meaning-preserving edits: the very same config.
            3 | 4 => {
                let text = same_meaning(fz, &base.text);
                let want = norm(base.cfg.clone());
                let inputs = vec![Dump::new(origin, text.clone())];
                let run = move || match JobConfig::from_toml_str(&text, origin, &[]) {
                    Ok(c) if norm(c.clone()) == want => check_ok(&c).map(|()| Verdict::Accepted),
                    Ok(c) => Err(format!(
                        "same meaning, different config:\n{c:?}\nvs\n{want:?}"
                    )),
                    Err(e) => Err(format!("same meaning, rejected: {e}")),
                };
                Case {
                    inputs,
                    run: Box::new(run),
                }
            }
            // Random override lists, sometimes through `load` and --job.config_file.
            5 | 6 => {
                let mut args = random_overrides(fz);
                let text = base.text.clone();
                let inputs = vec![
                    Dump::new(origin, text.clone()),
                    Dump::new("overrides", args.join("\n")),
                ];
                if fz.chance(0.3) {
                    let path = write_tmp(&dir, origin, text.as_bytes());
                    args.splice(
                        0..0,
                        ["--job.config_file".to_string(), path.display().to_string()],
                    );
                    let run = move || verdict(JobConfig::load(None, &args), origin);
                    return Case {
                        inputs,
                        run: Box::new(run),
                    };
                }
                let run = move || verdict(JobConfig::from_toml_str(&text, origin, &args), origin);
                Case {
                    inputs,
                    run: Box::new(run),
                }
            }
            // The same settings as `--k v`, `--k=v` and in the file.
            7 | 8 if base.plain => {
                let mut chosen: Vec<&(&str, &str, Kind)> = Vec::new();
                for _ in 0..fz.range(1, 5) {
                    let k = fz.pick(KEYS);
                    if !chosen.iter().any(|c| c.0 == k.0 && c.1 == k.1) {
                        chosen.push(k);
                    }
                }
                let (mut spaced, mut joined, mut text) =
                    (Vec::new(), Vec::new(), base.text.clone());
                for &&(s, k, kind) in &chosen {
                    let v = value(fz, kind);
                    let lit = literal(fz, kind, &v);
                    text = set_in_file(&text, s, k, lit.as_deref());
                    joined.push(format!("--{s}.{k}={v}"));
                    match (kind, v.as_str()) {
                        (Kind::Bool, "true") if fz.chance(0.5) => spaced.push(format!("--{s}.{k}")),
                        (Kind::Bool, "false") if fz.chance(0.5) => {
                            spaced.push(format!("--{s}.no_{k}"))
                        }
                        _ => spaced.extend([format!("--{s}.{k}"), v]),
                    }
                }
                fz.note(format!("overrides {spaced:?} / {joined:?} / in the file"));
                let orig = base.text.clone();
                let inputs = vec![
                    Dump::new(origin, text.clone()),
                    Dump::new("overrides", spaced.join("\n")),
                ];
                let run = move || {
                    let a = JobConfig::from_toml_str(&orig, origin, &spaced);
                    let b = JobConfig::from_toml_str(&orig, origin, &joined);
                    let c = JobConfig::from_toml_str(&text, origin, &[]);
                    match (a, b, c) {
                        (Ok(a), Ok(b), Ok(c)) => {
                            let (a, b, c) = (norm(a), norm(b), norm(c));
                            if a != b || a != c {
                                return Err(format!("equal settings, different configs:\n--k v: {a:?}\n--k=v: {b:?}\nfile: {c:?}"));
                            }
                            check_ok(&a).map(|()| Verdict::Accepted)
                        }
                        (Err(a), Err(b), Err(c)) => {
                            check_err(&a, origin)?;
                            check_err(&b, origin)?;
                            check_err(&c, origin)?;
                            Ok(Verdict::Rejected)
                        }
                        (a, b, c) => Err(format!(
                            "equal settings, different verdicts: --k v {:?} / --k=v {:?} / file {:?}",
                            a.err().map(|e| e.to_string()),
                            b.err().map(|e| e.to_string()),
                            c.err().map(|e| e.to_string())
                        )),
                    }
                };
                Case {
                    inputs,
                    run: Box::new(run),
                }
            }
            _ => {
                let args = integer_storm(fz);
                let text = base.text.clone();
                let inputs = vec![
                    Dump::new(origin, text.clone()),
                    Dump::new("overrides", args.join("\n")),
                ];
                let run = move || verdict(JobConfig::from_toml_str(&text, origin, &args), origin);
                Case {
                    inputs,
                    run: Box::new(run),
                }
            }
        }
    }
}
