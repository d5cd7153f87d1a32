//! Job config: torchtitan TOMLs (both schema eras) load, unknown keys and bad types fail with the
//! key's name, unsupported keys are reported, CLI overrides coerce and validate, the merged config
//! round-trips through TOML, and every shipped config under configs/ loads cleanly.

use std::path::{Path, PathBuf};
use titan::train::config::{Degrees, JobConfig};
use titan::Error;

fn parse(text: &str, overrides: &[&str]) -> titan::Result<JobConfig> {
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    JobConfig::from_toml_str(text, "test.toml", &ov)
}

fn config_err(text: &str, overrides: &[&str]) -> String {
    match parse(text, overrides) {
        Err(Error::Config(m)) => m,
        Err(other) => panic!("expected a config error, got {other}"),
        Ok(_) => panic!("expected a config error for {text:?} {overrides:?}, but it loaded"),
    }
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A torchtitan v0.2-style llama3 debug TOML (written for this test, every section torchtitan's
/// own debug config has, with the nested [quantize.linear.float8] table).
const TORCHTITAN_V02: &str = r#"
[job]
dump_folder = "./outputs"
description = "Llama 3 debug training"
print_config = false

[profiling]
enable_profiling = false
save_traces_folder = "profile_traces"
profile_freq = 10
enable_memory_snapshot = false
save_memory_snapshot_folder = "memory_snapshot"

[metrics]
log_freq = 1
disable_color_printing = false
enable_tensorboard = true
save_tb_folder = "tb"
enable_wandb = false

[model]
name = "llama3"
flavor = "debugmodel"
hf_assets_path = "./tests/assets/tokenizer"

[optimizer]
name = "AdamW"
lr = 8e-4
eps = 1e-8

[lr_scheduler]
warmup_steps = 2
decay_ratio = 0.8
decay_type = "linear"
min_lr_factor = 0.0

[training]
local_batch_size = 8
seq_len = 2048
max_norm = 1.0
steps = 10
dataset = "c4_test"

[training.dataloader]
num_workers = 2

[parallelism]
data_parallel_replicate_degree = 1
data_parallel_shard_degree = -1
fsdp_reshard_after_forward = "default"
tensor_parallel_degree = 1
enable_async_tensor_parallel = false
pipeline_parallel_degree = 1
pipeline_parallel_schedule = "Interleaved1F1B"
context_parallel_degree = 1

[checkpoint]
enable = false
folder = "checkpoint"
interval = 10
last_save_model_only = false
export_dtype = "float32"
async_mode = "disabled"

[activation_checkpoint]
mode = "selective"
selective_ac_option = '2'

[compile]
enable = false
components = ["model", "loss"]

[quantize.linear.float8]
enable_fsdp_float8_all_gather = false
precompute_float8_dynamic_scale_for_fsdp = false
filter_fqns = ["output"]

[validation]
enable = false
dataset = "c4_validation"
freq = 5
steps = 10

[debug]
seed = 7
deterministic = true
"#;

#[test]
fn torchtitan_v02_toml_loads_and_reports_unsupported_keys() {
    let cfg = parse(TORCHTITAN_V02, &[]).expect("torchtitan TOML must load");
    assert_eq!(cfg.training.steps, 10);
    assert_eq!(cfg.training.seq_len, 2048);
    assert_eq!(cfg.optimizer.lr, 8e-4);
    assert_eq!(cfg.lr_scheduler.decay_ratio, Some(0.8));
    assert_eq!(cfg.metrics.log_freq, 1);
    assert_eq!(
        cfg.parallelism.pipeline_parallel_schedule,
        "Interleaved1F1B"
    );
    assert_eq!(cfg.activation_checkpoint.selective_ac_option, "2");
    assert_eq!(cfg.checkpoint.interval, 10);
    // [debug] seed/deterministic are torchtitan v0.2's home for what titan keeps in [training].
    assert_eq!(cfg.training.seed, Some(7));
    assert!(cfg.training.deterministic);
    // Only keys set away from torchtitan's default are reported; defaults (async_mode =
    // "disabled", compile.enable = false, ...) and Python-only knobs (num_workers) are silent.
    let mut ignored = cfg.ignored.clone();
    ignored.sort();
    assert_eq!(ignored, vec!["quantize.linear.float8.filter_fqns"]);
    // TensorBoard is supported: its keys are parsed, not reported.
    assert!(cfg.metrics.enable_tensorboard);
    assert_eq!(cfg.metrics.save_tb_folder, "tb");
}

#[test]
fn torchtitan_v01_spellings_map_to_current_names() {
    // The v0.1 spellings: print_args, lr_min, training.seed/compile, enable_checkpoint,
    // last_save_model_weights_only and a top-level [float8].
    let text = "[job]\nprint_args = true\n[lr_scheduler]\nlr_min = 0.1\n\
                [training]\nseed = 3\ncompile = true\n\
                [checkpoint]\nenable_checkpoint = true\nlast_save_model_weights_only = false\n\
                [float8]\nenable_fsdp_float8_all_gather = true\n";
    let cfg = parse(text, &[]).unwrap();
    assert!(cfg.job.print_config);
    assert_eq!(cfg.lr_scheduler.min_lr_factor, 0.1);
    assert_eq!(cfg.training.seed, Some(3));
    assert!(cfg.checkpoint.enable);
    assert!(!cfg.checkpoint.last_save_model_only);
    let mut ignored = cfg.ignored.clone();
    ignored.sort();
    assert_eq!(
        ignored,
        vec!["compile.enable", "float8.enable_fsdp_float8_all_gather"]
    );
}

#[test]
fn old_and_new_spelling_together_is_an_error() {
    let m = config_err(
        "[checkpoint]\nenable = true\nenable_checkpoint = false\n",
        &[],
    );
    assert!(
        m.contains("enable_checkpoint") && m.contains("test.toml"),
        "{m}"
    );
    let m = config_err("[training]\nseed = 1\n[debug]\nseed = 2\n", &[]);
    assert!(
        m.contains("[debug] seed") && m.contains("[training] seed"),
        "{m}"
    );
}

#[test]
fn unknown_key_names_file_section_and_key() {
    let m = config_err("[training]\nsteps = 5\nstepz = 5\n", &[]);
    assert!(
        m.contains("test.toml") && m.contains("'stepz'") && m.contains("[training]"),
        "{m}"
    );
    assert!(m.contains("did you mean 'steps'"), "{m}");
    let m = config_err("[trainnig]\nsteps = 5\n", &[]);
    assert!(m.contains("'trainnig'"), "{m}");
    let m = config_err("[quantize.linear.float8]\nbogus = 1\n", &[]);
    assert!(
        m.contains("'bogus'") && m.contains("[quantize.linear.float8]"),
        "{m}"
    );
    let m = config_err("steps = 5\n", &[]);
    assert!(m.contains("'steps'"), "{m}");
}

#[test]
fn wrong_types_name_the_key() {
    for (text, key) in [
        ("[training]\nsteps = \"ten\"\n", "[training] steps"),
        ("[optimizer]\nlr = \"fast\"\n", "[optimizer] lr"),
        ("[checkpoint]\nenable = 1\n", "[checkpoint] enable"),
        ("[model]\nflavor = 8\n", "[model] flavor"),
        (
            "[checkpoint]\nexclude_from_loading = [1, 2]\n",
            "[checkpoint] exclude_from_loading",
        ),
        (
            "[profiling]\nprofile_freq = \"often\"\n",
            "[profiling] profile_freq",
        ),
        ("training = 3\n", "[training]"),
    ] {
        let m = config_err(text, &[]);
        assert!(m.contains(key) && m.contains("test.toml"), "{key}: {m}");
    }
}

#[test]
fn lenient_numeric_and_string_forms() {
    let cfg = parse(
        "[training]\nmax_norm = 1\n[activation_checkpoint]\nselective_ac_option = 3\n\
         [checkpoint]\nexclude_from_loading = \"optimizer,dataloader\"\n\
         [parallelism]\npipeline_parallel_schedule = \"gpipe\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(cfg.training.max_norm, 1.0);
    assert_eq!(cfg.activation_checkpoint.selective_ac_option, "3");
    assert_eq!(
        cfg.checkpoint.exclude_from_loading,
        vec!["optimizer", "dataloader"]
    );
    assert_eq!(cfg.parallelism.pipeline_parallel_schedule, "GPipe");
}

#[test]
fn defaults_are_torchtitans() {
    let cfg = JobConfig::load(None, &[]).unwrap();
    assert_eq!(cfg.job.dump_folder, "./outputs");
    assert_eq!(cfg.metrics.log_freq, 10);
    // An unnamed model is the registry's first, which is torchtitan's default, llama3.
    let model = titan::registry().find(&cfg.model.name).unwrap().name;
    assert_eq!((model, cfg.model.flavor.as_str()), ("llama3", "debugmodel"));
    let o = &cfg.optimizer;
    assert_eq!(
        (o.lr, o.beta1, o.beta2, o.eps, o.weight_decay),
        (8e-4, 0.9, 0.95, 1e-8, 0.1)
    );
    assert_eq!(cfg.lr_scheduler.warmup_steps, 200);
    assert_eq!(cfg.lr_scheduler.decay_ratio, None);
    assert_eq!(cfg.lr_scheduler.decay_type, "linear");
    let t = &cfg.training;
    assert_eq!(
        (t.local_batch_size, t.global_batch_size, t.seq_len, t.steps),
        (8, -1, 2048, 10000)
    );
    assert_eq!(
        (t.dtype.as_str(), t.mixed_precision_param.as_str()),
        ("float32", "bfloat16")
    );
    assert_eq!(t.device, "auto");
    assert_eq!(cfg.parallelism.data_parallel_shard_degree, -1);
    assert_eq!(cfg.parallelism.pipeline_parallel_schedule, "1F1B");
    let c = &cfg.checkpoint;
    assert_eq!(
        (c.enable, c.interval, c.keep_latest_k, c.load_step),
        (false, 500, 10, -1)
    );
    assert!(c.last_save_model_only && c.initial_load_model_only);
    assert_eq!(cfg.activation_checkpoint.mode, "selective");
    assert_eq!(cfg.activation_checkpoint.selective_ac_option, "2");
    assert!(cfg.ignored.is_empty());
    assert_eq!(
        cfg.checkpoint_root(),
        Path::new("./outputs").join("checkpoint")
    );
    assert_eq!(cfg.checkpoint_load_step(), None);
    let at = parse("[checkpoint]\nload_step = 40\n", &[]).unwrap();
    assert_eq!(at.checkpoint_load_step(), Some(40));
}

#[test]
fn cli_overrides_in_torchtitan_style() {
    let cfg = parse(
        "[training]\nsteps = 5\n[checkpoint]\nenable_checkpoint = false\n",
        &[
            "--training.steps",
            "20",
            "--optimizer.lr=3e-4",
            "--checkpoint.enable",
            "--checkpoint.no_initial_load_model_only",
            "--job.print_config",
            "false",
            "--training.seed",
            "11",
            "--lr_scheduler.decay_ratio=None",
            "--checkpoint.exclude_from_loading",
            "optimizer,lr_scheduler",
            "--debug.deterministic",
            "--profiling.enable_profiling",
        ],
    )
    .unwrap();
    assert_eq!(cfg.training.steps, 20);
    assert_eq!(cfg.optimizer.lr, 3e-4);
    assert!(
        cfg.checkpoint.enable,
        "override must win over the file's old spelling"
    );
    assert!(!cfg.checkpoint.initial_load_model_only);
    assert!(!cfg.job.print_config);
    assert_eq!(cfg.training.seed, Some(11));
    assert_eq!(cfg.lr_scheduler.decay_ratio, None);
    assert_eq!(
        cfg.checkpoint.exclude_from_loading,
        vec!["optimizer", "lr_scheduler"]
    );
    assert!(cfg.training.deterministic);
    assert_eq!(cfg.ignored, vec!["profiling.enable_profiling"]);
    // A bare flag as the last argument.
    assert!(parse("", &["--job.print_config"]).unwrap().job.print_config);
    // Override clears an optional value the file set.
    let cfg = parse(
        "[lr_scheduler]\ndecay_ratio = 0.5\n",
        &["--lr_scheduler.decay_ratio", "None"],
    );
    assert_eq!(cfg.unwrap().lr_scheduler.decay_ratio, None);
}

#[test]
fn bad_cli_overrides_name_the_flag() {
    for (args, needle) in [
        (&["--training.steps", "abc"][..], "--training.steps"),
        (
            &["--training.stepz", "3"][..],
            "did you mean --training.steps",
        ),
        (&["--training.steps"][..], "needs a value"),
        (&["training.steps", "3"][..], "unexpected argument"),
        (&["--steps", "3"][..], "--section.key"),
        (&["--nosuch.key", "3"][..], "unknown section"),
        (&["--checkpoint.enable=maybe"][..], "--checkpoint.enable"),
        (&["--training.steps", "0"][..], "training.steps = 0"),
    ] {
        let m = config_err("", args);
        assert!(m.contains(needle), "{args:?}: {m}");
    }
}

#[test]
fn validation_rejects_bad_values() {
    for (text, needle) in [
        ("[training]\nsteps = 0\n", "training.steps"),
        ("[training]\nseq_len = -4\n", "training.seq_len"),
        ("[training]\nlocal_batch_size = 0\n", "training.local_batch_size"),
        ("[training]\ndevice = \"tpu\"\n", "training.device"),
        ("[training]\nmax_norm = 0.0\n", "training.max_norm"),
        ("[lr_scheduler]\ndecay_type = \"exp\"\n", "lr_scheduler.decay_type"),
        ("[lr_scheduler]\nwarmup_steps = -1\n", "lr_scheduler.warmup_steps"),
        ("[lr_scheduler]\ndecay_ratio = 1.5\n", "lr_scheduler.decay_ratio"),
        ("[lr_scheduler]\nmin_lr_factor = 2.0\n", "lr_scheduler.min_lr_factor"),
        ("[optimizer]\nlr = -1.0\n", "optimizer.lr"),
        ("[optimizer]\nname = \"SGD\"\n", "optimizer.name"),
        ("[optimizer]\nbeta2 = 1.0\n", "optimizer.beta2"),
        ("[activation_checkpoint]\nmode = \"memory_budget\"\n", "activation_checkpoint.mode"),
        ("[activation_checkpoint]\nselective_ac_option = \"x\"\n", "selective_ac_option"),
        ("[parallelism]\ntensor_parallel_degree = 0\n", "tensor_parallel_degree"),
        ("[parallelism]\ndata_parallel_shard_degree = -2\n", "data_parallel_shard_degree"),
        ("[parallelism]\npipeline_parallel_schedule = \"ZBVZeroBubble\"\n", "pipeline_parallel_schedule"),
        ("[checkpoint]\ninterval = 0\n", "checkpoint.interval"),
        ("[checkpoint]\nkeep_latest_k = -1\n", "checkpoint.keep_latest_k"),
        ("[checkpoint]\nexclude_from_loading = [\"weights\"]\n", "exclude_from_loading"),
        (
            "[training]\nlocal_batch_size = 4\nglobal_batch_size = 12\n[parallelism]\ndata_parallel_shard_degree = 2\n",
            "global_batch_size = 12",
        ),
        ("[validation]\nsteps = 0\n", "validation.steps"),
    ] {
        let m = config_err(text, &[]);
        assert!(m.contains(needle) && m.contains("test.toml"), "{needle}: {m}");
    }
}

#[test]
fn merged_config_round_trips_through_toml() {
    let path = repo_file("configs/llama3_debugmodel.toml");
    let ov = vec![
        "--training.steps".to_string(),
        "7".to_string(),
        "--lr_scheduler.total_steps=9".into(),
    ];
    let cfg = JobConfig::load(Some(&path), &ov).unwrap();
    let text = cfg.to_toml_string().unwrap();
    let back = JobConfig::from_toml_str(&text, "saved", &[]).unwrap();
    assert_eq!(back, cfg);
    assert_eq!(back.training.steps, 7);
    assert_eq!(back.lr_scheduler.total_steps, Some(9));
    assert_eq!(back.schedule_steps(), 9);
}

#[test]
fn shipped_configs_load_without_warnings() {
    let expect = [
        ("llama3_debugmodel.toml", "debugmodel", 256, 8, 300),
        ("llama3_1b.toml", "1B", 8192, 2, 1000),
        ("llama3_8b.toml", "8B", 8192, 1, 1000),
        ("llama3_70b.toml", "70B", 8192, 8, 1000),
        ("llama3_405b.toml", "405B", 8192, 2, 3000),
    ];
    for (file, flavor, seq, batch, steps) in expect {
        let path = repo_file(&format!("configs/{file}"));
        let cfg = JobConfig::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(cfg.ignored.is_empty(), "{file}: {:?}", cfg.ignored);
        assert_eq!(cfg.model.flavor, flavor, "{file}");
        assert_eq!(cfg.training.seq_len, seq, "{file}");
        assert_eq!(cfg.training.local_batch_size, batch, "{file}");
        assert_eq!(cfg.training.steps, steps, "{file}");
    }
    let dbg = JobConfig::load(Some(&repo_file("configs/llama3_debugmodel.toml")), &[]).unwrap();
    assert_eq!((dbg.optimizer.lr, dbg.lr_scheduler.warmup_steps), (8e-4, 2));
    assert_eq!(
        (dbg.training.dataset.as_str(), dbg.metrics.log_freq),
        ("synthetic", 10)
    );
    let big = JobConfig::load(Some(&repo_file("configs/llama3_405b.toml")), &[]).unwrap();
    assert_eq!(
        (big.optimizer.lr, big.lr_scheduler.warmup_steps),
        (8e-5, 600)
    );
    assert_eq!(big.parallelism.tensor_parallel_degree, 8);
    assert_eq!(big.activation_checkpoint.mode, "full");
}

#[test]
fn file_errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("titan-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("broken.toml");
    std::fs::write(&bad, "[training\nsteps = 3\n").unwrap();
    match JobConfig::load(Some(&bad), &[]) {
        Err(Error::Config(m)) => assert!(
            m.contains("broken.toml") && m.contains("invalid TOML"),
            "{m}"
        ),
        other => panic!("expected a config error, got {other:?}"),
    }
    let missing = dir.join("missing.toml");
    match JobConfig::load(Some(&missing), &[]) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("missing.toml"), "{e}"),
        other => panic!("expected an io error, got {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn config_file_from_the_command_line() {
    let path = repo_file("configs/llama3_8b.toml");
    let p = path.display().to_string();
    let args = vec![
        "--job.config_file".to_string(),
        p.clone(),
        "--training.steps=3".into(),
    ];
    let cfg = JobConfig::load(None, &args).unwrap();
    assert_eq!((cfg.model.flavor.as_str(), cfg.training.steps), ("8B", 3));
    let same = JobConfig::load(Some(&path), &[format!("--job.config_file={p}")]).unwrap();
    assert_eq!(same.model.flavor, "8B");
    let other = repo_file("configs/llama3_70b.toml");
    match JobConfig::load(Some(&other), &args) {
        Err(Error::Config(m)) => assert!(m.contains("two config files"), "{m}"),
        r => panic!("expected a config error, got {r:?}"),
    }
}

#[test]
fn degrees_and_gradient_accumulation() {
    let cfg = parse(
        "[parallelism]\ntensor_parallel_degree = 2\npipeline_parallel_degree = 2\n",
        &[],
    )
    .unwrap();
    let d = cfg.parallelism.resolve(16).unwrap();
    assert_eq!(
        d,
        Degrees {
            dp_replicate: 1,
            dp_shard: 4,
            cp: 1,
            tp: 2,
            pp: 2,
            ep: 1,
            etp: 1
        }
    );
    assert_eq!(d.dp(), 4);
    assert!(
        cfg.parallelism.resolve(6).is_err(),
        "6 ranks cannot hold tp 2 x pp 2"
    );
    let fixed = parse("[parallelism]\ndata_parallel_shard_degree = 2\n", &[]).unwrap();
    let m = fixed.parallelism.resolve(4).unwrap_err().to_string();
    assert!(m.contains("world size is 4"), "{m}");
    let ep = parse("[parallelism]\nexpert_parallel_degree = 3\n", &[]).unwrap();
    assert!(
        ep.parallelism.resolve(4).is_err(),
        "ep 3 does not divide dp_shard 4"
    );

    let acc = parse(
        "[training]\nlocal_batch_size = 2\nglobal_batch_size = 16\n",
        &[],
    )
    .unwrap();
    assert_eq!(acc.gradient_accumulation_steps(2).unwrap(), 4);
    assert_eq!(acc.gradient_accumulation_steps(8).unwrap(), 1);
    assert!(acc.gradient_accumulation_steps(3).is_err());
    assert_eq!(
        parse("", &[])
            .unwrap()
            .gradient_accumulation_steps(5)
            .unwrap(),
        1
    );
}

/// Loads torchtitan's own llama3 train_configs unchanged (not vendored here): point
/// TITAN_TORCHTITAN_CONFIGS at `<torchtitan>/torchtitan/models/llama3/train_configs`.
#[test]
#[ignore = "needs TITAN_TORCHTITAN_CONFIGS=<torchtitan checkout>/torchtitan/models/llama3/train_configs"]
fn torchtitan_llama3_configs_load_unchanged() {
    let dir =
        std::env::var("TITAN_TORCHTITAN_CONFIGS").expect("TITAN_TORCHTITAN_CONFIGS is not set");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let cfg = JobConfig::load(Some(&path), &[]).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(cfg.model.name, "llama3", "{}", path.display());
            n += 1;
        }
    }
    assert!(
        n >= 4,
        "expected torchtitan's llama3 configs in {dir}, found {n}"
    );
}
