//! The training job configuration: torchtitan's TOML schema (v0.2-era `JobConfig`, with the
//! v0.1 spellings accepted), torchtitan's defaults, and torchtitan-style CLI overrides.
//!
//! A torchtitan llama3 TOML loads unchanged. Keys torchtitan knows but titan does not act on yet
//! are dropped, with one stderr warning per key per process when set to a non-default value; a
//! key nobody knows, or a value of the wrong type, is an `Error::Config` naming file, section and
//! key. The key table lives in `config/schema.rs`.

mod parse;
mod schema;

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// Sections that have fields in `JobConfig` (all others are torchtitan-only).
const TITAN_SECTIONS: &[&str] = &[
    "job",
    "metrics",
    "model",
    "optimizer",
    "lr_scheduler",
    "training",
    "parallelism",
    "checkpoint",
    "activation_checkpoint",
    "validation",
    "comm",
];

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    pub job: Job,
    pub metrics: Metrics,
    pub model: Model,
    pub optimizer: Optimizer,
    pub lr_scheduler: LrScheduler,
    pub training: Training,
    pub parallelism: Parallelism,
    pub checkpoint: Checkpoint,
    pub activation_checkpoint: ActivationCheckpoint,
    pub validation: Validation,
    pub comm: Comm,
    /// "section.key" of every torchtitan key that was set but is not supported (not saved).
    #[serde(skip)]
    pub ignored: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Job {
    pub dump_folder: String,
    pub description: String,
    pub print_config: bool,
}
impl Default for Job {
    fn default() -> Self {
        Job {
            dump_folder: "./outputs".into(),
            description: "default job".into(),
            print_config: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Metrics {
    /// Log every this many steps.
    pub log_freq: i64,
    pub disable_color_printing: bool,
}
impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            log_freq: 10,
            disable_color_printing: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Model {
    pub name: String,
    pub flavor: String,
    /// Folder with Hugging Face assets (tokenizer.json, config.json, *.safetensors).
    pub hf_assets_path: String,
    /// Deprecated in torchtitan in favour of hf_assets_path; still honoured when set.
    pub tokenizer_path: Option<String>,
}
impl Default for Model {
    fn default() -> Self {
        Model {
            name: "llama3".into(),
            flavor: "debugmodel".into(),
            hf_assets_path: "./tests/assets/tokenizer".into(),
            tokenizer_path: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Optimizer {
    pub name: String,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}
impl Default for Optimizer {
    fn default() -> Self {
        Optimizer {
            name: "AdamW".into(),
            lr: 8e-4,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LrScheduler {
    pub warmup_steps: i64,
    /// Steps the schedule spans; None = training.steps.
    pub total_steps: Option<i64>,
    /// Fraction of the steps spent decaying at the end (WSD); None = decay right after warmup.
    pub decay_ratio: Option<f64>,
    pub decay_type: String,
    pub min_lr_factor: f64,
}
impl Default for LrScheduler {
    fn default() -> Self {
        LrScheduler {
            warmup_steps: 200,
            total_steps: None,
            decay_ratio: None,
            decay_type: "linear".into(),
            min_lr_factor: 0.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Training {
    pub dataset: String,
    pub dataset_path: Option<String>,
    pub local_batch_size: i64,
    /// -1 = local_batch_size * data-parallel degree; larger = gradient accumulation.
    pub global_batch_size: i64,
    pub seq_len: i64,
    pub max_norm: f64,
    pub steps: i64,
    /// "float32" (fp32 master weights) or "bfloat16" (everything in bf16).
    pub dtype: String,
    pub mixed_precision_param: String,
    pub mixed_precision_reduce: String,
    /// torchtitan moved these two to [debug] in v0.2; both spellings are read.
    pub seed: Option<i64>,
    pub deterministic: bool,
    /// titan: "auto" (CUDA if a device is present, else CPU), "cpu" or "cuda".
    pub device: String,
}
impl Default for Training {
    fn default() -> Self {
        Training {
            dataset: "c4_test".into(),
            dataset_path: None,
            local_batch_size: 8,
            global_batch_size: -1,
            seq_len: 2048,
            max_norm: 1.0,
            steps: 10000,
            dtype: "float32".into(),
            mixed_precision_param: "bfloat16".into(),
            mixed_precision_reduce: "float32".into(),
            seed: None,
            deterministic: false,
            device: "auto".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Parallelism {
    pub data_parallel_replicate_degree: i64,
    /// -1 = whatever is left of the world after the other degrees.
    pub data_parallel_shard_degree: i64,
    pub fsdp_reshard_after_forward: String,
    pub tensor_parallel_degree: i64,
    pub disable_loss_parallel: bool,
    pub pipeline_parallel_degree: i64,
    pub pipeline_parallel_schedule: String,
    pub pipeline_parallel_microbatch_size: i64,
    pub pipeline_parallel_layers_per_stage: Option<i64>,
    pub pipeline_parallel_first_stage_less_layers: i64,
    pub pipeline_parallel_last_stage_less_layers: i64,
    pub context_parallel_degree: i64,
    pub expert_parallel_degree: i64,
    pub expert_tensor_parallel_degree: i64,
}
impl Default for Parallelism {
    fn default() -> Self {
        Parallelism {
            data_parallel_replicate_degree: 1,
            data_parallel_shard_degree: -1,
            fsdp_reshard_after_forward: "default".into(),
            tensor_parallel_degree: 1,
            disable_loss_parallel: false,
            pipeline_parallel_degree: 1,
            pipeline_parallel_schedule: "1F1B".into(),
            pipeline_parallel_microbatch_size: 1,
            pipeline_parallel_layers_per_stage: None,
            pipeline_parallel_first_stage_less_layers: 1,
            pipeline_parallel_last_stage_less_layers: 1,
            context_parallel_degree: 1,
            expert_parallel_degree: 1,
            expert_tensor_parallel_degree: 1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Checkpoint {
    /// torchtitan v0.1 spelled this `enable_checkpoint`.
    pub enable: bool,
    /// Checkpoints go to `<job.dump_folder>/<folder>/step-N/`.
    pub folder: String,
    pub interval: i64,
    pub initial_load_path: Option<String>,
    pub initial_load_model_only: bool,
    pub initial_load_in_hf: bool,
    pub last_save_model_only: bool,
    pub last_save_in_hf: bool,
    pub export_dtype: String,
    /// Keep only the newest k checkpoints (0 = all).
    pub keep_latest_k: i64,
    /// -1 = the latest.
    pub load_step: i64,
    pub exclude_from_loading: Vec<String>,
    pub enable_first_step_checkpoint: bool,
    pub create_seed_checkpoint: bool,
    pub load_only: bool,
}
impl Default for Checkpoint {
    fn default() -> Self {
        Checkpoint {
            enable: false,
            folder: "checkpoint".into(),
            interval: 500,
            initial_load_path: None,
            initial_load_model_only: true,
            initial_load_in_hf: false,
            last_save_model_only: true,
            last_save_in_hf: false,
            export_dtype: "float32".into(),
            keep_latest_k: 10,
            load_step: -1,
            exclude_from_loading: Vec::new(),
            enable_first_step_checkpoint: false,
            create_seed_checkpoint: false,
            load_only: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActivationCheckpoint {
    /// "none", "selective" or "full".
    pub mode: String,
    /// A positive integer n (checkpoint every n-th layer) or "op" (per-op policy).
    pub selective_ac_option: String,
}
impl Default for ActivationCheckpoint {
    fn default() -> Self {
        ActivationCheckpoint {
            mode: "selective".into(),
            selective_ac_option: "2".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Validation {
    pub enable: bool,
    pub dataset: String,
    pub dataset_path: Option<String>,
    pub local_batch_size: i64,
    pub seq_len: i64,
    pub freq: i64,
    /// -1 = the whole validation set.
    pub steps: i64,
}
impl Default for Validation {
    fn default() -> Self {
        Validation {
            enable: false,
            dataset: "c4_validation".into(),
            dataset_path: None,
            local_batch_size: 8,
            seq_len: 2048,
            freq: 10,
            steps: -1,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Comm {
    pub init_timeout_seconds: i64,
    pub train_timeout_seconds: i64,
}
impl Default for Comm {
    fn default() -> Self {
        Comm {
            init_timeout_seconds: 300,
            train_timeout_seconds: 100,
        }
    }
}

/// Parallel degrees with data_parallel_shard_degree = -1 resolved for a world size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Degrees {
    pub dp_replicate: usize,
    pub dp_shard: usize,
    pub cp: usize,
    pub tp: usize,
    pub pp: usize,
    pub ep: usize,
    pub etp: usize,
}

impl Degrees {
    /// Ranks that see different data.
    pub fn dp(&self) -> usize {
        self.dp_replicate * self.dp_shard
    }
}

/// Pipeline schedules titan implements (torchtitan's names; matched case-insensitively).
pub const PIPELINE_SCHEDULES: &[&str] = &["GPipe", "1F1B", "Interleaved1F1B"];

impl JobConfig {
    /// Loads a TOML file (or torchtitan's defaults when `path` is None), applies CLI overrides
    /// (`["--training.steps", "20", "--optimizer.lr=3e-4", "--checkpoint.enable"]`), checks and
    /// validates. Unsupported keys are warned about once per process on stderr.
    ///
    /// As in torchtitan, the file may instead be named by a `--job.config_file PATH` override.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<JobConfig> {
        let from_cli = config_file_override(overrides);
        let path = match (path, from_cli.as_deref()) {
            (Some(p), Some(c)) if p != Path::new(c) => {
                return Err(Error::Config(format!(
                    "two config files given: {} and --job.config_file {c}",
                    p.display()
                )))
            }
            (Some(p), _) => Some(p),
            (None, c) => c.map(Path::new),
        };
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?,
                p.display().to_string(),
            ),
            None => (String::new(), "<defaults>".to_string()),
        };
        let cfg = Self::from_toml_str(&text, &origin, overrides)?;
        warn_ignored_once(&cfg.ignored, &origin);
        Ok(cfg)
    }

    /// As `load`, from TOML text; `origin` names the source in errors. Does not print.
    pub fn from_toml_str(text: &str, origin: &str, overrides: &[String]) -> Result<JobConfig> {
        let mut root: toml::Table = toml::from_str(text)
            .map_err(|e| Error::Config(format!("{origin}: invalid TOML: {}", one_line(&e))))?;
        parse::apply_overrides(&mut root, overrides)?;
        parse::move_aliases(&mut root, origin)?;
        let ignored = parse::check(&mut root, origin)?;
        parse::prune_unused_sections(&mut root);
        let mut cfg: JobConfig = toml::Value::Table(root)
            .try_into()
            .map_err(|e: toml::de::Error| Error::Config(format!("{origin}: {}", one_line(&e))))?;
        cfg.ignored = ignored;
        if let Some(s) = canonical_schedule(&cfg.parallelism.pipeline_parallel_schedule) {
            cfg.parallelism.pipeline_parallel_schedule = s.to_string();
        }
        cfg.validate().map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("{origin}: {m}")),
            other => other,
        })?;
        Ok(cfg)
    }

    /// The merged configuration as TOML (saved in checkpoints; loads back to an equal config).
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string_pretty(self)
            .map_err(|e| Error::Config(format!("cannot write config as TOML: {e}")))
    }

    /// Cross-field checks that need no world size.
    pub fn validate(&self) -> Result<()> {
        let t = &self.training;
        positive("training.steps", t.steps)?;
        positive("training.seq_len", t.seq_len)?;
        positive("training.local_batch_size", t.local_batch_size)?;
        if t.global_batch_size != -1 && t.global_batch_size <= 0 {
            return bad(
                "training.global_batch_size",
                t.global_batch_size,
                "a positive integer or -1",
            );
        }
        if !(t.max_norm.is_finite() && t.max_norm > 0.0) {
            return bad("training.max_norm", t.max_norm, "a positive number");
        }
        one_of("training.dtype", &t.dtype, &["float32", "bfloat16"])?;
        one_of(
            "training.mixed_precision_param",
            &t.mixed_precision_param,
            &["bfloat16", "float32"],
        )?;
        one_of(
            "training.mixed_precision_reduce",
            &t.mixed_precision_reduce,
            &["float32"],
        )?;
        one_of("training.device", &t.device, &["auto", "cpu", "cuda"])?;
        if let Some(seed) = t.seed {
            if seed < 0 {
                return bad("training.seed", seed, "a non-negative integer");
            }
        }

        let o = &self.optimizer;
        one_of("optimizer.name", &o.name, &["AdamW"])?;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad("optimizer.lr", o.lr, "a positive number");
        }
        for (k, b) in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(k, b, "in [0, 1)");
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return bad("optimizer.eps", o.eps, "a positive number");
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return bad(
                "optimizer.weight_decay",
                o.weight_decay,
                "a non-negative number",
            );
        }

        let l = &self.lr_scheduler;
        if l.warmup_steps < 0 {
            return bad(
                "lr_scheduler.warmup_steps",
                l.warmup_steps,
                "a non-negative integer",
            );
        }
        if let Some(n) = l.total_steps {
            positive("lr_scheduler.total_steps", n)?;
        }
        if let Some(r) = l.decay_ratio {
            if !(0.0..=1.0).contains(&r) {
                return bad("lr_scheduler.decay_ratio", r, "in [0, 1]");
            }
        }
        one_of(
            "lr_scheduler.decay_type",
            &l.decay_type,
            &["linear", "sqrt", "cosine"],
        )?;
        if !(0.0..=1.0).contains(&l.min_lr_factor) {
            return bad("lr_scheduler.min_lr_factor", l.min_lr_factor, "in [0, 1]");
        }

        let ac = &self.activation_checkpoint;
        one_of(
            "activation_checkpoint.mode",
            &ac.mode,
            &["none", "selective", "full"],
        )?;
        if ac.mode == "selective" && ac.selective_ac_option != "op" {
            match ac.selective_ac_option.parse::<i64>() {
                Ok(n) if n > 0 => {}
                _ => {
                    return bad(
                        "activation_checkpoint.selective_ac_option",
                        &ac.selective_ac_option,
                        "a positive integer or \"op\"",
                    )
                }
            }
        }

        let p = &self.parallelism;
        for (k, v) in [
            (
                "parallelism.data_parallel_replicate_degree",
                p.data_parallel_replicate_degree,
            ),
            (
                "parallelism.tensor_parallel_degree",
                p.tensor_parallel_degree,
            ),
            (
                "parallelism.pipeline_parallel_degree",
                p.pipeline_parallel_degree,
            ),
            (
                "parallelism.context_parallel_degree",
                p.context_parallel_degree,
            ),
            (
                "parallelism.expert_parallel_degree",
                p.expert_parallel_degree,
            ),
            (
                "parallelism.expert_tensor_parallel_degree",
                p.expert_tensor_parallel_degree,
            ),
            (
                "parallelism.pipeline_parallel_microbatch_size",
                p.pipeline_parallel_microbatch_size,
            ),
        ] {
            positive(k, v)?;
        }
        if p.data_parallel_shard_degree != -1 && p.data_parallel_shard_degree <= 0 {
            return bad(
                "parallelism.data_parallel_shard_degree",
                p.data_parallel_shard_degree,
                "a positive integer or -1",
            );
        }
        one_of(
            "parallelism.fsdp_reshard_after_forward",
            &p.fsdp_reshard_after_forward,
            &["default", "always", "never"],
        )?;
        if canonical_schedule(&p.pipeline_parallel_schedule).is_none() {
            let s = &p.pipeline_parallel_schedule;
            one_of(
                "parallelism.pipeline_parallel_schedule",
                s,
                PIPELINE_SCHEDULES,
            )?;
        }
        if let Some(n) = p.pipeline_parallel_layers_per_stage {
            positive("parallelism.pipeline_parallel_layers_per_stage", n)?;
        }
        if t.local_batch_size % p.pipeline_parallel_microbatch_size != 0 {
            return bad(
                "training.local_batch_size",
                t.local_batch_size,
                &format!(
                    "a multiple of parallelism.pipeline_parallel_microbatch_size ({})",
                    p.pipeline_parallel_microbatch_size
                ),
            );
        }
        if p.data_parallel_shard_degree > 0 {
            let dp = p.data_parallel_replicate_degree * p.data_parallel_shard_degree;
            self.check_global_batch(dp as usize)?;
        }

        let c = &self.checkpoint;
        positive("checkpoint.interval", c.interval)?;
        if c.keep_latest_k < 0 {
            return bad(
                "checkpoint.keep_latest_k",
                c.keep_latest_k,
                "0 (keep all) or more",
            );
        }
        if c.load_step < -1 {
            return bad("checkpoint.load_step", c.load_step, "a step or -1 (latest)");
        }
        one_of(
            "checkpoint.export_dtype",
            &c.export_dtype,
            &["float16", "bfloat16", "float32"],
        )?;
        for e in &c.exclude_from_loading {
            one_of(
                "checkpoint.exclude_from_loading",
                e,
                &[
                    "model",
                    "optimizer",
                    "lr_scheduler",
                    "dataloader",
                    "train_state",
                ],
            )?;
        }

        positive("metrics.log_freq", self.metrics.log_freq)?;
        let v = &self.validation;
        positive("validation.freq", v.freq)?;
        positive("validation.local_batch_size", v.local_batch_size)?;
        positive("validation.seq_len", v.seq_len)?;
        if v.steps != -1 && v.steps <= 0 {
            return bad("validation.steps", v.steps, "a positive integer or -1");
        }
        positive("comm.init_timeout_seconds", self.comm.init_timeout_seconds)?;
        positive(
            "comm.train_timeout_seconds",
            self.comm.train_timeout_seconds,
        )?;
        Ok(())
    }

    /// Micro-batches per optimizer step for a data-parallel degree (torchtitan's rule:
    /// global = local * dp * accumulation).
    pub fn gradient_accumulation_steps(&self, dp: usize) -> Result<usize> {
        self.check_global_batch(dp)?;
        let per_step = self.training.local_batch_size as usize * dp;
        Ok(match self.training.global_batch_size {
            -1 => 1,
            g => g as usize / per_step,
        })
    }

    fn check_global_batch(&self, dp: usize) -> Result<()> {
        let g = self.training.global_batch_size;
        let per_step = self.training.local_batch_size * dp as i64;
        if g != -1 && (g <= 0 || g % per_step != 0) {
            return Err(Error::Config(format!(
                "training.global_batch_size = {g} must be a multiple of local_batch_size ({}) x data-parallel degree ({dp}) = {per_step}",
                self.training.local_batch_size
            )));
        }
        Ok(())
    }

    /// Where checkpoints live: `<job.dump_folder>/<checkpoint.folder>`.
    pub fn checkpoint_root(&self) -> std::path::PathBuf {
        Path::new(&self.job.dump_folder).join(&self.checkpoint.folder)
    }

    /// The step to resume from: `None` = the latest (checkpoint.load_step = -1).
    pub fn checkpoint_load_step(&self) -> Option<u64> {
        u64::try_from(self.checkpoint.load_step).ok()
    }

    /// The LR schedule's length (lr_scheduler.total_steps, else training.steps).
    pub fn schedule_steps(&self) -> u64 {
        self.lr_scheduler
            .total_steps
            .unwrap_or(self.training.steps)
            .max(0) as u64
    }
}

impl Parallelism {
    /// Resolves the degrees for `world_size` ranks, torchtitan's way: a shard degree of -1 takes
    /// the ranks left after replicate x cp x tp x pp; the product must equal the world; EP
    /// borrows its ranks from dp_shard x cp (x tp when expert TP is 1).
    pub fn resolve(&self, world_size: usize) -> Result<Degrees> {
        let d = |v: i64| v.max(1) as usize;
        let (rep, cp, tp, pp) = (
            d(self.data_parallel_replicate_degree),
            d(self.context_parallel_degree),
            d(self.tensor_parallel_degree),
            d(self.pipeline_parallel_degree),
        );
        let others = rep * cp * tp * pp;
        let shard = if self.data_parallel_shard_degree == -1 {
            if !world_size.is_multiple_of(others) {
                return Err(Error::Config(format!(
                    "world size {world_size} is not divisible by data_parallel_replicate x context x tensor x pipeline degrees = {others}"
                )));
            }
            world_size / others
        } else {
            d(self.data_parallel_shard_degree)
        };
        if shard * others != world_size {
            return Err(Error::Config(format!(
                "parallel degrees multiply to {} (dp_replicate {rep} x dp_shard {shard} x cp {cp} x tp {tp} x pp {pp}) but the world size is {world_size}",
                shard * others
            )));
        }
        let (ep, etp) = (
            d(self.expert_parallel_degree),
            d(self.expert_tensor_parallel_degree),
        );
        if etp != 1 && etp != tp {
            return Err(Error::Config(format!(
                "parallelism.expert_tensor_parallel_degree = {etp} must be 1 or equal tensor_parallel_degree ({tp})"
            )));
        }
        let borrow = shard * cp * if etp == 1 { tp } else { 1 };
        if ep > 1 && borrow % ep != 0 {
            return Err(Error::Config(format!(
                "parallelism.expert_parallel_degree = {ep} must divide dp_shard x cp{} = {borrow}",
                if etp == 1 { " x tp" } else { "" }
            )));
        }
        Ok(Degrees {
            dp_replicate: rep,
            dp_shard: shard,
            cp,
            tp,
            pp,
            ep,
            etp,
        })
    }
}

/// The value of a `--job.config_file` override, if any.
fn config_file_override(args: &[String]) -> Option<String> {
    let mut found = None;
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix("--job.config_file=") {
            found = Some(v.to_string());
        } else if a == "--job.config_file" {
            found = args.get(i + 1).cloned();
        }
    }
    found
}

fn canonical_schedule(name: &str) -> Option<&'static str> {
    PIPELINE_SCHEDULES
        .iter()
        .copied()
        .find(|s| s.eq_ignore_ascii_case(name))
}

fn positive(key: &str, v: i64) -> Result<()> {
    if v <= 0 {
        return bad(key, v, "a positive integer");
    }
    Ok(())
}

fn one_of(key: &str, v: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&v) {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{key} = \"{v}\" is not supported (expected one of: {})",
        allowed.join(", ")
    )))
}

fn bad(key: &str, v: impl std::fmt::Display, want: &str) -> Result<()> {
    Err(Error::Config(format!("{key} = {v} must be {want}")))
}

fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints each ignored key once per process (ranks run as threads share the set).
fn warn_ignored_once(keys: &[String], origin: &str) {
    static WARNED: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let mut seen = WARNED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    for k in keys {
        if seen.insert(k.clone()) {
            eprintln!(
                "titan: warning: {origin}: '{k}' is a torchtitan option titan does not support yet; ignored"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::schema::{self, Kind, Use};
    use super::*;

    /// The schema's `Use::Yes` keys and the serde structs must name the same fields, and every
    /// alias must point at a real key (the parser relies on both).
    #[test]
    fn schema_matches_structs() {
        let saved: toml::Table =
            toml::from_str(&JobConfig::default().to_toml_string().unwrap()).unwrap();
        for section in TITAN_SECTIONS {
            let table = saved[*section].as_table().unwrap();
            for (key, kind, u) in schema::section_keys(section) {
                let optional = matches!(kind, Kind::OptStr | Kind::OptInt | Kind::OptFloat);
                if *u == Use::Yes && !optional {
                    assert!(
                        table.contains_key(*key),
                        "{section}.{key} is in the schema but not the struct"
                    );
                }
            }
            for key in table.keys() {
                assert_eq!(
                    schema::lookup(section, key).map(|(_, u)| u),
                    Some(Use::Yes),
                    "{section}.{key} is in the struct but not a supported schema key"
                );
            }
        }
        for s in schema::SECTIONS {
            for (key, _, u) in schema::section_keys(s) {
                if let Use::Alias(t) = u {
                    let (ts, tk) = schema::split_path(t).unwrap();
                    let target = schema::lookup(ts, tk).map(|(_, u)| u);
                    assert!(
                        matches!(target, Some(u) if !matches!(u, Use::Alias(_))),
                        "{s}.{key} -> {t}"
                    );
                }
            }
        }
        // Defaults of unsupported keys are valid TOML literals.
        for s in schema::SECTIONS {
            for (key, _, u) in schema::section_keys(s) {
                if let Use::No(d) = u {
                    assert!(
                        d.is_empty() || parse::parse_literal(d).is_some(),
                        "{s}.{key}: {d}"
                    );
                }
            }
        }
    }
}
