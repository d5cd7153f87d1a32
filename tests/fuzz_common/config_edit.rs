//! The config target's inputs: the keys titan acts on with their TOML types, the values and
//! flags overrides are drawn from, and the edits of TOML text (meaning-preserving ones, a key
//! written into a file) and of override lists.

use super::{mutate, Fz};

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Kind {
    Int,
    Float,
    Str,
    Bool,
    OptInt,
    OptStr,
    OptFloat,
    StrList,
    StrOrInt,
}
use Kind::*;

/// Keys titan acts on, with their TOML type (as in engine/train/config/schema.rs).
pub(super) const KEYS: &[(&str, &str, Kind)] = &[
    ("job", "dump_folder", Str),
    ("job", "print_config", Bool),
    ("metrics", "log_freq", Int),
    ("model", "flavor", Str),
    ("model", "tokenizer_path", OptStr),
    ("optimizer", "lr", Float),
    ("optimizer", "beta1", Float),
    ("optimizer", "eps", Float),
    ("optimizer", "weight_decay", Float),
    ("lr_scheduler", "warmup_steps", Int),
    ("lr_scheduler", "total_steps", OptInt),
    ("lr_scheduler", "decay_ratio", OptFloat),
    ("lr_scheduler", "decay_type", Str),
    ("lr_scheduler", "min_lr_factor", Float),
    ("training", "dataset", Str),
    ("training", "dataset_path", OptStr),
    ("training", "local_batch_size", Int),
    ("training", "global_batch_size", Int),
    ("training", "seq_len", Int),
    ("training", "max_norm", Float),
    ("training", "steps", Int),
    ("training", "dtype", Str),
    ("training", "seed", OptInt),
    ("training", "deterministic", Bool),
    ("training", "device", Str),
    ("parallelism", "data_parallel_replicate_degree", Int),
    ("parallelism", "data_parallel_shard_degree", Int),
    ("parallelism", "tensor_parallel_degree", Int),
    ("parallelism", "pipeline_parallel_degree", Int),
    ("parallelism", "pipeline_parallel_schedule", Str),
    ("parallelism", "pipeline_parallel_microbatch_size", Int),
    ("parallelism", "pipeline_parallel_layers_per_stage", OptInt),
    ("parallelism", "context_parallel_degree", Int),
    ("parallelism", "expert_parallel_degree", Int),
    ("parallelism", "expert_tensor_parallel_degree", Int),
    ("checkpoint", "enable", Bool),
    ("checkpoint", "interval", Int),
    ("checkpoint", "keep_latest_k", Int),
    ("checkpoint", "load_step", Int),
    ("checkpoint", "initial_load_in_hf", Bool),
    ("checkpoint", "create_seed_checkpoint", Bool),
    ("checkpoint", "exclude_from_loading", StrList),
    ("checkpoint", "export_dtype", Str),
    ("activation_checkpoint", "mode", Str),
    ("activation_checkpoint", "selective_ac_option", StrOrInt),
    ("validation", "enable", Bool),
    ("validation", "seq_len", Int),
    ("validation", "local_batch_size", Int),
    ("validation", "freq", Int),
    ("validation", "steps", Int),
    ("comm", "init_timeout_seconds", Int),
];

/// Override spellings beyond the keys above: aliases, torchtitan-only keys, nonsense.
pub(super) const OTHER_FLAGS: &[&str] = &[
    "--debug.seed",
    "--checkpoint.enable_checkpoint",
    "--checkpoint.no_enable",
    "--training.no_deterministic",
    "--training.compile",
    "--compile.enable",
    "--lr_scheduler.lr_min",
    "--float8.emulate",
    "--quantize.linear.float8.filter_fqns",
    "--training.dataloader.num_workers",
    "--parallelism.module_fqns_per_model_part",
    "--job.config_file",
    "--training.stepz",
    "--nosuch.key",
    "--training",
    "--",
    "-x",
    "training.steps",
    "--a.b.c.d",
    "--training.no_steps",
    "--.",
    "--training.",
    "--=5",
    "--quiet",
];

pub(super) const INTS: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "8",
    "64",
    "4096",
    "65536",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "9223372036854775808",
    "+7",
    "-0",
];
pub(super) const FLOATS: &[&str] = &[
    "0.0", "1.0", "3e-4", "1e-8", "0.5", "0.999", "-1.0", "-0.0", "nan", "inf", "-inf", "+inf",
    "2.5", "1e308", "1e309", "1", "0",
];
pub(super) const STRS: &[&str] = &[
    "synthetic",
    "c4_test",
    "cpu",
    "auto",
    "float32",
    "bfloat16",
    "float16",
    "linear",
    "cosine",
    "none",
    "full",
    "selective",
    "op",
    "2",
    "AdamW",
    "GPipe",
    "1f1b",
    "debugmodel",
    "./out dir",
    "é",
    "",
];
pub(super) const LISTS: &[&str] = &[
    "model",
    "model,optimizer",
    "dataloader, train_state",
    "x",
    "",
];

pub(super) fn value(fz: &mut Fz, kind: Kind) -> String {
    let s = match kind {
        Int | OptInt => *fz.pick(INTS),
        Float | OptFloat => *fz.pick(FLOATS),
        Str | OptStr => *fz.pick(STRS),
        Bool => *fz.pick(&["true", "false"]),
        StrList => *fz.pick(LISTS),
        StrOrInt => *fz.pick(&["op", "1", "2", "0", "-3", "x"]),
    };
    if matches!(kind, OptInt | OptStr | OptFloat) && fz.chance(0.15) {
        return "None".into();
    }
    s.to_string()
}

/// The TOML literal a CLI value stands for (None: the key is cleared).
pub(super) fn literal(fz: &mut Fz, kind: Kind, v: &str) -> Option<String> {
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    match kind {
        OptInt | OptStr | OptFloat if matches!(v, "None" | "none" | "null") => None,
        Int | OptInt | Float | OptFloat | Bool => Some(v.to_string()),
        Str | OptStr => Some(quote(v)),
        StrOrInt if v.parse::<i64>().is_ok() && fz.chance(0.5) => Some(v.to_string()),
        StrOrInt => Some(quote(v)),
        StrList => {
            let items: Vec<String> = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(quote)
                .collect();
            Some(format!("[{}]", items.join(", ")))
        }
    }
}

/// `section.key = lit` written into the file (replacing any line that set it; None removes it).
pub(super) fn set_in_file(text: &str, section: &str, key: &str, lit: Option<&str>) -> String {
    let header = format!("[{section}]");
    let sets_key = |l: &str| {
        l.trim_start()
            .strip_prefix(key)
            .is_some_and(|r| r.trim_start().starts_with('='))
    };
    let mut out = Vec::new();
    let mut in_section = false;
    let mut found = false;
    for l in text.lines() {
        if l.trim_start().starts_with('[') {
            in_section = l.trim() == header;
            out.push(l.to_string());
            if in_section {
                found = true;
                if let Some(v) = lit {
                    out.push(format!("{key} = {v}"));
                }
            }
            continue;
        }
        if !(in_section && sets_key(l)) {
            out.push(l.to_string());
        }
    }
    if let (false, Some(v)) = (found, lit) {
        out.push(format!("\n{header}\n{key} = {v}"));
    }
    out.join("\n") + "\n"
}

/// Edits that keep the meaning of a TOML file without multi-line values.
pub(super) fn same_meaning(fz: &mut Fz, text: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for _ in 0..fz.range(1, 4) {
        let i = fz.below(lines.len() + 1);
        match fz.below(6) {
            0 => {
                let c = *fz.pick(&["# a = 1", "#[job]", "# \"'\\ é", "#", "   # x = [", "\t#"]);
                fz.note(format!("insert comment {c:?} at line {i}"));
                lines.insert(i, c.to_string());
            }
            1 => {
                let ws = *fz.pick(&["", " ", "\t", "  \t "]);
                fz.note(format!("insert blank line {ws:?} at line {i}"));
                lines.insert(i, ws.to_string());
            }
            2 if i < lines.len() && !lines[i].trim_start().starts_with('#') => {
                let l = &lines[i];
                let new = match l.split_once('=') {
                    Some((k, v)) if !l.trim_start().starts_with('[') => {
                        let sp = *fz.pick(&["=", " = ", "   =\t", "= "]);
                        format!("  {}{sp}{}", k.trim(), v.trim_start())
                    }
                    _ => format!("\t{l}"),
                };
                fz.note(format!("respace line {i}"));
                lines[i] = new;
            }
            3 if i < lines.len() && !lines[i].trim().is_empty() => {
                fz.note(format!("trailing comment on line {i}"));
                lines[i].push_str("   # trailing = \"x\"");
            }
            4 => {
                // Shuffle whole sections (everything from one header to the next).
                let mut blocks: Vec<Vec<String>> = vec![Vec::new()];
                for l in lines.drain(..) {
                    if l.trim_start().starts_with('[') {
                        blocks.push(Vec::new());
                    }
                    blocks.last_mut().unwrap().push(l);
                }
                let mut rest = blocks.split_off(1);
                for k in (1..rest.len()).rev() {
                    rest.swap(k, fz.below(k + 1));
                }
                fz.note("shuffle sections");
                lines = blocks.into_iter().chain(rest).flatten().collect();
            }
            _ => {
                // Shuffle the lines inside one section.
                let heads: Vec<usize> = (0..lines.len())
                    .filter(|&k| lines[k].trim_start().starts_with('['))
                    .collect();
                if heads.is_empty() {
                    continue;
                }
                let h = *fz.pick(&heads);
                let end = (h + 1..lines.len())
                    .find(|&k| lines[k].trim_start().starts_with('['))
                    .unwrap_or(lines.len());
                let body = &mut lines[h + 1..end];
                for k in (1..body.len()).rev() {
                    body.swap(k, fz.below(k + 1));
                }
                fz.note(format!("shuffle the lines of {}", lines[h].trim()));
            }
        }
    }
    lines.join("\n") + "\n"
}

/// Random override lists: known keys, aliases, nonsense flags, odd values, mangled bytes.
pub(super) fn random_overrides(fz: &mut Fz) -> Vec<String> {
    let mut args = Vec::new();
    for _ in 0..fz.range(1, 5) {
        let flag = if fz.chance(0.6) {
            let (s, k, _) = fz.pick(KEYS);
            format!("--{s}.{k}")
        } else {
            fz.pick(OTHER_FLAGS).to_string()
        };
        let v = match fz.below(4) {
            0 => mutate::NUMBERS[fz.below(mutate::NUMBERS.len())].to_string(),
            1 => mutate::TOKENS[fz.below(mutate::TOKENS.len())].to_string(),
            2 => fz
                .pick(&["None", "True", "1", "", "[\"a\", 1]", "[[1]]"])
                .to_string(),
            _ => STRS[fz.below(STRS.len())].to_string(),
        };
        match fz.below(3) {
            0 => args.push(format!("{flag}={v}")),
            1 => args.push(flag),
            _ => args.extend([flag, v]),
        }
    }
    if fz.chance(0.2) {
        let i = fz.below(args.len());
        let mut b = args[i].clone().into_bytes();
        mutate::bytes(fz, &mut b, None);
        args[i] = String::from_utf8_lossy(&b).into_owned();
    }
    fz.note(format!("overrides {args:?}"));
    args
}

/// Integer keys that multiply together (batch x degrees) set to edge values at once.
pub(super) fn integer_storm(fz: &mut Fz) -> Vec<String> {
    let keys = KEYS
        .iter()
        .filter(|(s, _, k)| *k == Int && matches!(*s, "training" | "parallelism" | "validation"));
    let mut args = Vec::new();
    for (s, k, _) in keys {
        if fz.chance(0.4) {
            continue;
        }
        let v: i64 = match fz.below(10) {
            0..=5 => 1i64 << fz.range(0, 62),
            6 => i64::MAX,
            7 => *fz.pick(&[-1, 0, 3]),
            _ => fz.range(1, 64) as i64,
        };
        args.push(format!("--{s}.{k}={v}"));
    }
    fz.note(format!("overrides {args:?}"));
    args
}
