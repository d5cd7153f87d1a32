//! `titan`: one binary per node. `train`, `plan`, `list-models`, `eval`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use titan::error::{Error, Result};

#[derive(Parser)]
#[command(name = "titan", version, about = "Kernel-first LLM pre-training engine (Llama 3; CPU reference and CUDA backends)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model from a torchtitan-style TOML config. Overrides follow torchtitan:
    /// `--training.steps 20 --optimizer.lr=3e-4 --checkpoint.enable`.
    #[command(allow_hyphen_values = true)]
    Train {
        /// The TOML config (torchtitan's --job.config_file is accepted too).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print only the final summary.
        #[arg(long)]
        quiet: bool,
        /// Config overrides, `--section.key value` or `--section.key=value`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        overrides: Vec<String>,
    },
    /// Print the memory plan (parameters, gradients, optimizer state, activations, peak) of a
    /// config without allocating it.
    #[command(allow_hyphen_values = true)]
    Plan {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Compute dtype to plan for (bfloat16 = the CUDA default, float32 = the CPU backend).
        #[arg(long, default_value = "bfloat16")]
        dtype: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        overrides: Vec<String>,
    },
    /// Benchmark training throughput: a config's model (its flavor's full vocabulary) on built-in
    /// data for a number of steps; prints tokens/s and MFU in torchtitan's and llm.c's conventions.
    #[command(allow_hyphen_values = true)]
    Bench {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Timed steps (after the warm-up steps).
        #[arg(long, default_value_t = 10)]
        steps: u64,
        #[arg(long, default_value_t = 3)]
        warmup: u64,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        overrides: Vec<String>,
    },
    /// List every registered model and flavor with its parameter count.
    ListModels,
    /// Mean next-token loss of a checkpoint on a token file, printed as one JSON line.
    Eval {
        /// A checkpoint folder root (the run's <dump_folder>/<checkpoint.folder>).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Which step (default: the newest).
        #[arg(long)]
        step: Option<u64>,
        /// A .bin of u32 token ids (with --seq-len) or a JSON list of token-id lists.
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long)]
        seq_len: Option<usize>,
        /// Device: auto, cpu or cuda.
        #[arg(long, default_value = "auto")]
        device: String,
    },
}

/// Splits `--config X` / `--job.config_file X` out of torchtitan-style override lists.
fn take_config(config: Option<PathBuf>, overrides: Vec<String>) -> (Option<PathBuf>, Vec<String>) {
    let mut cfg = config;
    let mut rest = Vec::new();
    let mut it = overrides.into_iter();
    while let Some(a) = it.next() {
        let key = a.split('=').next().unwrap_or("").to_string();
        if key == "--config" || key == "--job.config_file" {
            match a.split_once('=') {
                Some((_, v)) => cfg = Some(PathBuf::from(v)),
                None => cfg = it.next().map(PathBuf::from),
            }
        } else {
            rest.push(a);
        }
    }
    (cfg, rest)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train { config, quiet, overrides } => {
            let (config, overrides) = take_config(config, overrides);
            titan::cli::train(config.as_deref(), &overrides, quiet)
        }
        Cmd::Plan { config, dtype, json, overrides } => {
            let (config, overrides) = take_config(config, overrides);
            titan::cli::plan(config.as_deref(), &overrides, &dtype, json)
        }
        Cmd::Bench { config, steps, warmup, overrides } => {
            let (config, overrides) = take_config(config, overrides);
            titan::cli::bench(config.as_deref(), &overrides, steps, warmup)
        }
        Cmd::ListModels => {
            titan::cli::list_models();
            Ok(())
        }
        Cmd::Eval { checkpoint, step, tokens, seq_len, device } => {
            titan::cli::eval(&checkpoint, step, &tokens, seq_len, &device)
        }
    }
    .map_err(|e: Error| e)
}
