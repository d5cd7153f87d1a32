//! The training job configuration: torchtitan's TOML schema (v0.2-era `JobConfig`, with the
//! v0.1 spellings accepted), torchtitan's defaults, and torchtitan-style CLI overrides.
//!
//! A torchtitan llama3 TOML loads unchanged. Keys torchtitan knows but titan does not act on yet
//! are dropped, with one stderr warning per key per process when set to a non-default value; a
//! key nobody knows, or a value of the wrong type, is an `Error::Config` naming file, section and
//! key. The key table lives in `config/schema.rs`.

mod parse;
mod schema;
mod validate;

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
    /// Write TensorBoard event files to `<dump_folder>/<save_tb_folder>/<YYYYmmdd-HHMM>/`.
    pub enable_tensorboard: bool,
    pub save_tb_folder: String,
    /// Every rank writes its own events (in `rank_<r>/`), not only the metrics rank.
    pub save_for_all_ranks: bool,
}
impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            log_freq: 10,
            enable_tensorboard: false,
            save_tb_folder: "tb".into(),
            save_for_all_ranks: false,
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
            // Empty: the registry's first model (the titan binary registers llama3 first, as
            // torchtitan defaults to it); the trainer writes the resolved name back.
            name: String::new(),
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
    /// With tensor parallel: norms and the residual stream on token shards (torchtitan's later
    /// `enable_sequence_parallel`, default on).
    pub enable_sequence_parallel: bool,
    pub pipeline_parallel_degree: i64,
    pub pipeline_parallel_schedule: String,
    pub pipeline_parallel_microbatch_size: i64,
    pub pipeline_parallel_layers_per_stage: Option<i64>,
    pub pipeline_parallel_first_stage_less_layers: i64,
    pub pipeline_parallel_last_stage_less_layers: i64,
    /// "layers.N" block names each starting a new pipeline stage (empty: an even split).
    pub pipeline_parallel_split_points: Vec<String>,
    pub context_parallel_degree: i64,
    pub expert_parallel_degree: i64,
    pub expert_tensor_parallel_degree: i64,
    /// With pipeline_parallel_degree 1: run the pipeline schedule anyway, every stage on this
    /// rank, the stage boundaries crossed by sends to itself through the communicator. This is
    /// how one GPU exercises the pipeline's code (NCCL groups included) and how the tests check
    /// it against the plain path. Not a config key: torchtitan's pp 1 means no pipeline.
    #[serde(skip)]
    pub pipeline_on_one_rank: bool,
}
impl Default for Parallelism {
    fn default() -> Self {
        Parallelism {
            data_parallel_replicate_degree: 1,
            data_parallel_shard_degree: -1,
            fsdp_reshard_after_forward: "default".into(),
            tensor_parallel_degree: 1,
            disable_loss_parallel: false,
            enable_sequence_parallel: true,
            pipeline_parallel_degree: 1,
            pipeline_parallel_schedule: "1F1B".into(),
            pipeline_parallel_microbatch_size: 1,
            pipeline_parallel_layers_per_stage: None,
            pipeline_parallel_first_stage_less_layers: 1,
            pipeline_parallel_last_stage_less_layers: 1,
            pipeline_parallel_split_points: Vec::new(),
            context_parallel_degree: 1,
            expert_parallel_degree: 1,
            expert_tensor_parallel_degree: 1,
            pipeline_on_one_rank: false,
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
pub const PIPELINE_SCHEDULES: &[&str] =
    &["GPipe", "1F1B", "Interleaved1F1B", "InterleavedZeroBubble"];

impl JobConfig {
    /// Loads a TOML file (or torchtitan's defaults when `path` is None), applies CLI overrides
    /// (`["--training.steps", "20", "--optimizer.lr=3e-4", "--checkpoint.enable"]`), checks and
    /// validates. Unsupported keys are warned about once per process on stderr.
    ///
    /// As in torchtitan, the file may instead be named by a `--job.config_file PATH` override.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<JobConfig> {
        let from_cli = config_file_override(overrides)?;
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
        if let Some(s) = validate::canonical_schedule(&cfg.parallelism.pipeline_parallel_schedule) {
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

/// The value of a `--job.config_file` override, if any, read by the override parser itself:
/// a scan of the words would also take a `--job.config_file` that is another flag's value
/// (`--job.description --job.config_file`), and silently drop the file named before it.
fn config_file_override(args: &[String]) -> Result<Option<String>> {
    let mut probe = toml::Table::new();
    parse::apply_overrides(&mut probe, args)?;
    Ok(probe
        .get("job")
        .and_then(|j| j.get("config_file"))
        .and_then(toml::Value::as_str)
        .map(str::to_string))
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
            crate::errln!(
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
