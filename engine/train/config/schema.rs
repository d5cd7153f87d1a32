//! Every key torchtitan's TOML schema knows (v0.1 and v0.2 eras), with its type and whether titan
//! acts on it. This table drives the file check, the CLI override coercion and the warnings, so a
//! key is added in exactly one place. `Use::Yes` keys must also be fields of the serde structs in
//! `config.rs` (the structs deny unknown fields, so a mismatch fails the config tests).

/// The TOML type a key accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Bool,
    Int,
    /// Also accepts an integer (`max_norm = 1`).
    Float,
    Str,
    /// May be absent (torchtitan's `None`); on the command line `None` clears it.
    OptStr,
    OptInt,
    OptFloat,
    /// An array of strings; a comma-separated string is split (torchtitan's CLI form).
    StrList,
    /// A string that people also write as an integer (`selective_ac_option = 2`).
    StrOrInt,
    /// Any TOML value (nested lists torchtitan has no simpler type for).
    Any,
}

impl Kind {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Kind::Bool => "a boolean",
            Kind::Int | Kind::OptInt => "an integer",
            Kind::Float | Kind::OptFloat => "a number",
            Kind::Str | Kind::OptStr => "a string",
            Kind::StrList => "a list of strings",
            Kind::StrOrInt => "a string or integer",
            Kind::Any => "a value",
        }
    }
}

/// What titan does with a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Use {
    /// Parsed into `JobConfig`.
    Yes,
    /// torchtitan knows it, titan does not act on it yet: warned about (once, by name) when set to
    /// anything but torchtitan's default, which is given as a TOML literal ("" = no default/None).
    No(&'static str),
    /// Meaningless in titan (Python GC, torch DataLoader workers): accepted silently.
    Moot,
    /// An older spelling of "section.key".
    Alias(&'static str),
}

use Kind::*;
use Use::*;

/// Sections that may appear as tables (dotted = nested).
pub(crate) const SECTIONS: &[&str] = &[
    "job",
    "profiling",
    "metrics",
    "model",
    "optimizer",
    "lr_scheduler",
    "training",
    "training.dataloader",
    "parallelism",
    "checkpoint",
    "activation_checkpoint",
    "compile",
    "float8",
    "mx",
    "quantize",
    "quantize.linear",
    "quantize.linear.float8",
    "quantize.linear.mx",
    "quantize.grouped_mm",
    "quantize.grouped_mm.float8",
    "quantize.grouped_mm.mx",
    "comm",
    "memory_estimation",
    "fault_tolerance",
    "experimental",
    "validation",
    "validation.dataloader",
    "debug",
];

const FLOAT8_LINEAR: &[(&str, Kind, Use)] = &[
    ("enable_fsdp_float8_all_gather", Bool, No("false")),
    (
        "precompute_float8_dynamic_scale_for_fsdp",
        Bool,
        No("false"),
    ),
    ("recipe_name", OptStr, No("")),
    ("filter_fqns", StrList, No("[]")),
    ("emulate", Bool, No("false")),
    ("force_recompute_fp8_weight_in_bwd", Bool, No("false")),
];
const MX_LINEAR: &[(&str, Kind, Use)] = &[
    ("mxfp8_dim1_cast_kernel_choice", Str, No("\"triton\"")),
    ("use_fp8_dim1_cast_triton_kernel", Bool, No("false")),
    ("recipe_name", Str, No("\"mxfp8_cublas\"")),
    ("filter_fqns", StrList, No("[\"output\"]")),
];
const GROUPED_FLOAT8: &[(&str, Kind, Use)] = &[("fqns", StrList, No("[]"))];
const GROUPED_MX: &[(&str, Kind, Use)] = &[
    ("recipe_name", Str, No("\"mxfp8\"")),
    ("fqns", StrList, No("[]")),
];
const DATALOADER: &[(&str, Kind, Use)] = &[
    ("num_workers", Int, Moot),
    ("persistent_workers", Bool, Moot),
    ("pin_memory", Bool, Moot),
    ("prefetch_factor", OptInt, Moot),
];

/// The keys of one section.
pub(crate) fn section_keys(section: &str) -> &'static [(&'static str, Kind, Use)] {
    match section {
        "job" => &[
            ("dump_folder", Str, Yes),
            ("description", Str, Yes),
            ("print_config", Bool, Yes),
            ("print_args", Bool, Alias("job.print_config")),
            // torchtitan's way to name the TOML on the command line; `JobConfig::load` reads it.
            ("config_file", OptStr, Moot),
            ("save_config_file", OptStr, No("")),
            ("custom_config_module", Str, No("\"\"")),
            ("use_for_integration_test", Bool, No("false")),
        ],
        "profiling" => &[
            ("enable_profiling", Bool, No("false")),
            ("save_traces_folder", Str, No("\"profile_traces\"")),
            ("profile_freq", Int, No("10")),
            ("profiler_active", Int, No("1")),
            ("profiler_warmup", Int, No("3")),
            ("enable_memory_snapshot", Bool, No("false")),
            (
                "save_memory_snapshot_folder",
                Str,
                No("\"memory_snapshot\""),
            ),
        ],
        "metrics" => &[
            ("log_freq", Int, Yes),
            ("disable_color_printing", Bool, Moot), // titan prints no colours
            ("save_for_all_ranks", Bool, Yes),
            ("enable_tensorboard", Bool, Yes),
            ("save_tb_folder", Str, Yes),
            ("enable_wandb", Bool, No("false")),
        ],
        "model" => &[
            ("name", Str, Yes),
            ("flavor", Str, Yes),
            ("hf_assets_path", Str, Yes),
            ("tokenizer_path", OptStr, Yes),
            ("converters", StrList, No("[]")),
            ("print_after_conversion", Bool, No("false")),
        ],
        "optimizer" => &[
            ("name", Str, Yes),
            ("lr", Float, Yes),
            ("beta1", Float, Yes),
            ("beta2", Float, Yes),
            ("eps", Float, Yes),
            ("weight_decay", Float, Yes),
            ("implementation", Str, No("\"fused\"")),
            ("early_step_in_backward", Bool, No("false")),
        ],
        "lr_scheduler" => &[
            ("warmup_steps", Int, Yes),
            ("total_steps", OptInt, Yes),
            ("decay_ratio", OptFloat, Yes),
            ("decay_type", Str, Yes),
            ("min_lr_factor", Float, Yes),
            ("lr_min", Float, Alias("lr_scheduler.min_lr_factor")),
        ],
        "training" => &[
            ("dataset", Str, Yes),
            ("dataset_path", OptStr, Yes),
            ("local_batch_size", Int, Yes),
            ("global_batch_size", Int, Yes),
            ("seq_len", Int, Yes),
            ("max_norm", Float, Yes),
            ("steps", Int, Yes),
            ("dtype", Str, Yes),
            ("mixed_precision_param", Str, Yes),
            ("mixed_precision_reduce", Str, Yes),
            ("seed", OptInt, Yes),
            ("deterministic", Bool, Yes),
            ("device", Str, Yes),
            ("enable_cpu_offload", Bool, No("false")),
            ("compile", Bool, Alias("compile.enable")),
            ("gc_freq", Int, Moot),
            ("gc_debug", Bool, Moot),
        ],
        "training.dataloader" | "validation.dataloader" => DATALOADER,
        "parallelism" => &[
            ("data_parallel_replicate_degree", Int, Yes),
            ("data_parallel_shard_degree", Int, Yes),
            ("fsdp_reshard_after_forward", Str, Yes),
            ("tensor_parallel_degree", Int, Yes),
            ("disable_loss_parallel", Bool, Yes),
            ("enable_sequence_parallel", Bool, Yes),
            ("pipeline_parallel_degree", Int, Yes),
            ("pipeline_parallel_schedule", Str, Yes),
            ("pipeline_parallel_microbatch_size", Int, Yes),
            ("pipeline_parallel_layers_per_stage", OptInt, Yes),
            ("pipeline_parallel_first_stage_less_layers", Int, Yes),
            ("pipeline_parallel_last_stage_less_layers", Int, Yes),
            ("context_parallel_degree", Int, Yes),
            ("expert_parallel_degree", Int, Yes),
            ("expert_tensor_parallel_degree", Int, Yes),
            ("enable_async_tensor_parallel", Bool, No("false")),
            ("enable_compiled_autograd", Bool, No("false")),
            ("pipeline_parallel_split_points", StrList, Yes),
            ("module_fqns_per_model_part", Any, No("")),
            ("pipeline_parallel_schedule_csv", OptStr, No("\"\"")),
            (
                "pipeline_parallel_expert_parallel_overlap",
                Bool,
                No("true"),
            ),
            ("context_parallel_load_balancer", OptStr, No("\"headtail\"")),
            ("context_parallel_rotate_method", Str, No("\"allgather\"")),
            ("expert_parallel_comm_backend", Str, No("\"standard\"")),
        ],
        "checkpoint" => &[
            ("enable", Bool, Yes),
            ("enable_checkpoint", Bool, Alias("checkpoint.enable")),
            ("folder", Str, Yes),
            ("interval", Int, Yes),
            ("initial_load_path", OptStr, Yes),
            ("initial_load_model_only", Bool, Yes),
            (
                "initial_load_model_weights_only",
                Bool,
                Alias("checkpoint.initial_load_model_only"),
            ),
            ("initial_load_in_hf", Bool, Yes),
            ("last_save_model_only", Bool, Yes),
            (
                "last_save_model_weights_only",
                Bool,
                Alias("checkpoint.last_save_model_only"),
            ),
            ("last_save_in_hf", Bool, Yes),
            ("export_dtype", Str, Yes),
            ("keep_latest_k", Int, Yes),
            ("load_step", Int, Yes),
            ("exclude_from_loading", StrList, Yes),
            ("enable_first_step_checkpoint", Bool, Yes),
            ("create_seed_checkpoint", Bool, Yes),
            ("load_only", Bool, Yes),
            ("async_mode", Str, No("\"disabled\"")),
            ("enable_ft_dataloader_checkpoints", Bool, No("true")),
            ("initial_load_in_hf_quantized", Bool, No("false")),
        ],
        "activation_checkpoint" => &[
            ("mode", Str, Yes),
            ("selective_ac_option", StrOrInt, Yes),
            (
                "per_op_sac_force_recompute_mm_shapes_by_fqns",
                StrList,
                No("[\"moe.router.gate\"]"),
            ),
            ("early_stop", Bool, No("false")),
            ("memory_budget", Float, No("0.5")),
            ("visualize_memory_budget_pareto", Bool, No("false")),
            ("preserve_rng_state", Bool, No("true")),
            ("determinism_check", Str, No("\"default\"")),
            ("debug", Bool, No("false")),
        ],
        "compile" => &[
            ("enable", Bool, No("false")),
            ("components", StrList, No("[\"model\", \"loss\"]")),
            ("backend", Str, No("\"inductor\"")),
        ],
        "float8" | "quantize.linear.float8" => FLOAT8_LINEAR,
        "mx" | "quantize.linear.mx" => MX_LINEAR,
        "quantize.grouped_mm.float8" => GROUPED_FLOAT8,
        "quantize.grouped_mm.mx" => GROUPED_MX,
        "comm" => &[
            ("init_timeout_seconds", Int, Yes),
            ("train_timeout_seconds", Int, Yes),
            ("trace_buf_size", Int, No("20000")),
            ("save_traces_folder", Str, No("\"comm_traces\"")),
            ("save_traces_file_prefix", Str, No("\"rank_\"")),
            ("mode", Str, No("\"default\"")),
        ],
        "memory_estimation" => &[
            ("enable", Bool, No("false")),
            ("enabled", Bool, Alias("memory_estimation.enable")),
            ("disable_fake_mode", Bool, No("false")),
        ],
        "fault_tolerance" => &[
            ("enable", Bool, No("false")),
            ("process_group", Str, No("\"gloo\"")),
            ("process_group_timeout_ms", Int, No("10000")),
            ("replica_id", Int, No("0")),
            ("group_size", Int, No("0")),
            ("min_replica_size", Int, No("1")),
            ("semi_sync_method", OptStr, No("")),
            ("sync_steps", Int, No("5")),
            ("should_quantize", Bool, No("false")),
            ("fragment_sync_delay", Int, No("0")),
            ("fragment_update_alpha", Float, No("0.0")),
        ],
        "experimental" => &[
            ("custom_import", Str, No("\"\"")),
            ("custom_args_module", Str, No("\"\"")),
        ],
        "validation" => &[
            ("enable", Bool, Yes),
            ("dataset", Str, Yes),
            ("dataset_path", OptStr, Yes),
            ("local_batch_size", Int, Yes),
            ("seq_len", Int, Yes),
            ("freq", Int, Yes),
            ("steps", Int, Yes),
        ],
        "debug" => &[
            ("seed", OptInt, Alias("training.seed")),
            ("deterministic", Bool, Alias("training.deterministic")),
            ("deterministic_warn_only", Bool, No("false")),
            ("moe_force_load_balance", Bool, No("false")),
        ],
        _ => &[],
    }
}

pub(crate) fn is_section(path: &str) -> bool {
    SECTIONS.contains(&path)
}

pub(crate) fn lookup(section: &str, key: &str) -> Option<(Kind, Use)> {
    section_keys(section)
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|&(_, kind, u)| (kind, u))
}

/// Splits "section.sub.key" at its last dot.
pub(crate) fn split_path(path: &str) -> Option<(&str, &str)> {
    path.rsplit_once('.')
}

/// The closest known key of a section (for "did you mean" hints), if any is close.
pub(crate) fn suggest(section: &str, key: &str) -> Option<&'static str> {
    let best = section_keys(section)
        .iter()
        .map(|(k, _, _)| (*k, edit_distance(k, key)))
        .min_by_key(|&(_, d)| d)?;
    (best.1 <= 2.max(key.len() / 4)).then_some(best.0)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}
