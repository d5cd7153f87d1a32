//! The `titan` command line: `train`, `plan`, `bench`, `list-models`, `eval`, `convert`. It lives
//! in the engine so tests can call every subcommand; the binary (models/bin/titan.rs) only hands
//! it the registry of models.

pub mod commands;
pub mod convert;
pub mod estimate;
pub mod eval;
mod search;
pub mod train;

pub use commands::{bench, list_models, plan, PlanOpts};
pub use train::train;

use crate::dist::launch::LaunchArgs;
use crate::error::{Error, Result};
use crate::model::Registry;
use crate::train::preempt::EXIT_OUTPUT_CLOSED;
use clap::{Parser, Subcommand};
use estimate::Machine;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "titan",
    version,
    about = "Kernel-first LLM pre-training engine (CPU reference and CUDA backends; `titan list-models` shows the models)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model from a torchtitan-style TOML config. Overrides follow torchtitan:
    /// `--training.steps 20 --optimizer.lr=3e-4 --checkpoint.enable`. SIGTERM, SIGINT or SIGUSR1
    /// finish the step, checkpoint it and exit 75 (a second signal exits at once with 128 + the
    /// signal); a closed stdout ends the run with 141; one run per dump folder (run.lock).
    #[command(allow_hyphen_values = true)]
    Train {
        /// The TOML config (torchtitan's --job.config_file is accepted too).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print only the final summary.
        #[arg(long)]
        quiet: bool,
        /// Ranks this process runs (one per local GPU, or CPU ranks sharing the cores).
        #[arg(long)]
        nproc_per_node: Option<usize>,
        /// Nodes of the run (torchrun's flags; under SLURM they default to its variables).
        #[arg(long)]
        nnodes: Option<usize>,
        #[arg(long)]
        node_rank: Option<usize>,
        /// Host of node rank 0, where the rendezvous store listens.
        #[arg(long)]
        master_addr: Option<String>,
        #[arg(long)]
        master_port: Option<u16>,
        /// Whose step lines print: "all" or ranks such as 0,3 (default: rank 0). Rank 0 alone
        /// writes metrics, checkpoints' manifest and the loss curve.
        #[arg(long)]
        log_ranks: Option<String>,
        /// Config overrides, `--section.key value` or `--section.key=value`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        overrides: Vec<String>,
    },
    /// Print the memory plan (parameters, gradients, optimizer state, activations, peak) of a
    /// config without allocating it, and an estimate of its step time, tokens/s and MFU (a
    /// roofline of every traced kernel plus the layout's collectives; the machine's numbers are
    /// printed and set by the flags below).
    #[command(allow_hyphen_values = true)]
    Plan {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Compute dtype to plan for (default bfloat16, the CUDA default; float32 with
        /// `--device cpu`, the CPU backend's).
        #[arg(long)]
        dtype: Option<String>,
        /// The machine of the estimate: h100 (H100 SXM datasheet numbers) or cpu (this machine:
        /// its GEMM rate and copy bandwidth measured, CPU ranks as threads sharing it).
        #[arg(long)]
        device: Option<String>,
        /// Peak dense FLOP/s of one device, in TFLOP/s.
        #[arg(long)]
        peak_tflops: Option<f64>,
        /// Memory (HBM) bandwidth of one device, GB/s.
        #[arg(long)]
        hbm_gbps: Option<f64>,
        /// Intra-node (NVLink) bandwidth per GPU and direction, GB/s.
        #[arg(long)]
        nvlink_gbps: Option<f64>,
        /// Inter-node (network) bandwidth per GPU, GB/s.
        #[arg(long)]
        net_gbps: Option<f64>,
        #[arg(long)]
        gpus_per_node: Option<usize>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Ranks of the layout to plan (`[parallelism]` degrees resolved against it); the
        /// figures are per rank.
        #[arg(long, default_value_t = 1)]
        world_size: usize,
        /// Plan every layout of --world-size (dp_replicate x dp_shard x tp, tp inside a node)
        /// and list the best by estimated tokens/s per GPU among those that fit.
        #[arg(long)]
        search: bool,
        /// How many layouts --search lists.
        #[arg(long, default_value_t = 10)]
        top: usize,
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
        /// Time every op (synchronising around each) and print a table.
        #[arg(long)]
        profile: bool,
        /// Ranks as threads of this process (with `[parallelism]` degrees for them).
        #[arg(long, default_value_t = 1)]
        nproc_per_node: usize,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        overrides: Vec<String>,
    },
    /// List every registered model and flavor with its parameter count.
    ListModels,
    /// Mean next-token loss of a checkpoint on a token file, printed as one JSON line.
    Eval {
        /// A checkpoint folder root (the run's <dump_folder>/<checkpoint.folder>).
        #[arg(
            long,
            required_unless_present = "hf_checkpoint",
            conflicts_with = "hf_checkpoint"
        )]
        checkpoint: Option<PathBuf>,
        /// A Hugging Face folder (config.json + safetensors) of any registered model instead of a
        /// titan checkpoint; the loss is transformers' <Model>ForCausalLM(input_ids,
        /// labels=input_ids).
        #[arg(long)]
        hf_checkpoint: Option<PathBuf>,
        /// With --hf-checkpoint: write the f32 logits [sequences, ids, vocab] to this
        /// .safetensors file (tensor "logits").
        #[arg(long, requires = "hf_checkpoint")]
        dump_logits: Option<PathBuf>,
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
    /// Convert checkpoints: `--from hf DIR --to titan DIR` writes a titan checkpoint step-0 under
    /// DIR; `--from titan DIR [--step N] --to hf DIR` writes a Hugging Face folder.
    Convert {
        /// Source format (hf or titan) and folder.
        #[arg(long, required = true, num_args = 2, value_names = ["FORMAT", "DIR"])]
        from: Vec<String>,
        /// Target format (titan or hf) and folder.
        #[arg(long, required = true, num_args = 2, value_names = ["FORMAT", "DIR"])]
        to: Vec<String>,
        /// Which titan step to export (default: the newest).
        #[arg(long)]
        step: Option<u64>,
        /// Hugging Face export dtype: float32, bfloat16 or float16.
        #[arg(long, default_value = "float32")]
        dtype: String,
        /// Hugging Face shard size cap in MiB (0 = one file).
        #[arg(long, default_value_t = 5120)]
        max_shard_mb: usize,
    },
}

// clap hands every argument from the first `--section.key` override on to the trailing list, so
// a subcommand's own options written after an override are taken out of that list here.

/// Splits `--config X` / `--job.config_file X` out of torchtitan-style override lists.
fn take_config(
    config: Option<PathBuf>,
    mut overrides: Vec<String>,
) -> Result<(Option<PathBuf>, Vec<String>)> {
    let mut cfg = config;
    for name in ["--config", "--job.config_file"] {
        if let Some(v) = take_value(&mut overrides, name)? {
            cfg = Some(PathBuf::from(v));
        }
    }
    Ok((cfg, overrides))
}

/// Removes `--name V` / `--name=V` from the trailing overrides; the last one wins.
fn take_value(overrides: &mut Vec<String>, name: &str) -> Result<Option<String>> {
    let mut value = None;
    let mut rest = Vec::with_capacity(overrides.len());
    let mut it = std::mem::take(overrides).into_iter();
    while let Some(a) = it.next() {
        if a == name {
            let v = it
                .next()
                .ok_or_else(|| Error::Config(format!("{name} needs a value")))?;
            value = Some(v);
        } else if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            value = Some(v.to_string());
        } else {
            rest.push(a);
        }
    }
    *overrides = rest;
    Ok(value)
}

/// Removes a bare flag of this subcommand from the trailing overrides.
fn take_flag(overrides: &mut Vec<String>, flag: &str) -> bool {
    let before = overrides.len();
    overrides.retain(|a| a != flag);
    overrides.len() != before
}

/// `take_value` parsed as a number.
fn take_number(overrides: &mut Vec<String>, name: &str) -> Result<Option<u64>> {
    take_value(overrides, name)?
        .map(|v| {
            v.parse()
                .map_err(|_| Error::Config(format!("{name} {v:?} is not a whole number")))
        })
        .transpose()
}

/// `take_value` parsed as a real number.
fn take_float(overrides: &mut Vec<String>, name: &str) -> Result<Option<f64>> {
    take_value(overrides, name)?
        .map(|v| {
            v.parse()
                .map_err(|_| Error::Config(format!("{name} {v:?} is not a number")))
        })
        .transpose()
}

/// Parses the process's arguments and runs the subcommand with the models of `reg`.
pub fn main(reg: Registry) -> ExitCode {
    let cli = Cli::parse();
    // Run on a worker of the compute pool: every parallel kernel is then forked from a pool
    // thread that joins the work, instead of being injected from outside and waited on.
    let res = match rayon::ThreadPoolBuilder::new().build() {
        Ok(pool) => pool.install(|| run(&reg, cli)),
        Err(_) => run(&reg, cli),
    };
    match res {
        Ok(code) => code,
        // The reader of stdout went away (`| head`): end quietly, as SIGPIPE would.
        Err(Error::OutputClosed) => ExitCode::from(EXIT_OUTPUT_CLOSED),
        Err(e) => {
            crate::errln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(reg: &Registry, cli: Cli) -> Result<ExitCode> {
    let done = |r: Result<()>| r.map(|()| ExitCode::SUCCESS);
    match cli.cmd {
        Cmd::Train {
            config,
            quiet,
            nproc_per_node,
            nnodes,
            node_rank,
            master_addr,
            master_port,
            log_ranks,
            overrides,
        } => {
            let (config, mut overrides) = take_config(config, overrides)?;
            let quiet = take_flag(&mut overrides, "--quiet") || quiet;
            let o = &mut overrides;
            let number = |o: &mut Vec<String>, n| take_number(o, n).map(|v| v.map(|v| v as usize));
            let launch = LaunchArgs {
                nproc_per_node: number(o, "--nproc-per-node")?.or(nproc_per_node),
                nnodes: number(o, "--nnodes")?.or(nnodes),
                node_rank: number(o, "--node-rank")?.or(node_rank),
                master_addr: take_value(o, "--master-addr")?.or(master_addr),
                master_port: match take_number(o, "--master-port")? {
                    Some(p) => Some(u16::try_from(p).map_err(|_| {
                        Error::Config(format!("--master-port {p} is not a port number"))
                    })?),
                    None => master_port,
                },
            };
            let log_ranks = take_value(&mut overrides, "--log-ranks")?.or(log_ranks);
            train(
                reg,
                config.as_deref(),
                &overrides,
                quiet,
                &launch,
                log_ranks.as_deref(),
            )
        }
        Cmd::Plan {
            config,
            dtype,
            device,
            peak_tflops,
            hbm_gbps,
            nvlink_gbps,
            net_gbps,
            gpus_per_node,
            json,
            world_size,
            search,
            top,
            overrides,
        } => {
            let (config, mut overrides) = take_config(config, overrides)?;
            let o = &mut overrides;
            let json = take_flag(o, "--json") || json;
            let dtype = take_value(o, "--dtype")?.or(dtype);
            let world = take_number(o, "--world-size")?.map_or(world_size, |w| w as usize);
            let machine = Machine {
                device: take_value(o, "--device")?.or(device),
                peak_tflops: take_float(o, "--peak-tflops")?.or(peak_tflops),
                hbm_gbps: take_float(o, "--hbm-gbps")?.or(hbm_gbps),
                nvlink_gbps: take_float(o, "--nvlink-gbps")?.or(nvlink_gbps),
                net_gbps: take_float(o, "--net-gbps")?.or(net_gbps),
                gpus_per_node: take_number(o, "--gpus-per-node")?
                    .map(|n| n as usize)
                    .or(gpus_per_node),
            };
            let search = take_flag(o, "--search") || search;
            let top = take_number(o, "--top")?.map_or(top, |n| n as usize);
            let opts = PlanOpts {
                dtype,
                json,
                world_size: world,
                machine,
                search,
                top,
            };
            done(plan(reg, config.as_deref(), &overrides, &opts))
        }
        Cmd::Bench {
            config,
            steps,
            warmup,
            profile,
            nproc_per_node,
            overrides,
        } => {
            let (config, mut overrides) = take_config(config, overrides)?;
            let profile = take_flag(&mut overrides, "--profile") || profile;
            let nproc = take_number(&mut overrides, "--nproc-per-node")?
                .map_or(nproc_per_node, |n| n as usize);
            let steps = take_number(&mut overrides, "--steps")?.unwrap_or(steps);
            let warmup = take_number(&mut overrides, "--warmup")?.unwrap_or(warmup);
            done(bench(
                reg,
                config.as_deref(),
                &overrides,
                steps,
                warmup,
                profile,
                nproc,
            ))
        }
        Cmd::ListModels => done(list_models(reg)),
        Cmd::Eval {
            checkpoint,
            hf_checkpoint,
            dump_logits,
            step,
            tokens,
            seq_len,
            device,
        } => done(match (checkpoint, hf_checkpoint) {
            (_, Some(hf)) => {
                eval::eval_hf_cli(reg, &hf, &tokens, seq_len, dump_logits.as_deref(), &device)
            }
            (Some(ck), None) => eval::eval(reg, &ck, step, &tokens, seq_len, &device),
            (None, None) => Err(Error::Config(
                "eval needs --checkpoint or --hf-checkpoint".into(),
            )),
        }),
        Cmd::Convert {
            from,
            to,
            step,
            dtype,
            max_shard_mb,
        } => {
            let (src, dst) = (std::path::Path::new(&from[1]), std::path::Path::new(&to[1]));
            done(convert::convert(
                reg,
                &convert::Convert {
                    from: (&from[0], src),
                    to: (&to[0], dst),
                    step,
                    dtype: &dtype,
                    max_shard_mb,
                },
            ))
        }
    }
}
