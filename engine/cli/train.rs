//! `titan train`: the launch (this process's ranks as threads over shared memory or TCP, the run
//! lock, per-rank failures) and one rank's run.

use super::commands::layout_summary;
use crate::dist::launch::{run_rank_threads, Launch, LaunchArgs};
use crate::dist::tcp::{Rendezvous, TcpTransport};
use crate::dist::{Communicator, HostComm};
use crate::error::{Error, Result};
use crate::metrics::GIB;
use crate::model::Registry;
use crate::train::config::JobConfig;
use crate::train::lock::RunLock;
use crate::train::preempt::StopFlag;
use crate::train::trainer::Trainer;
use crate::{checkpoint, errln, outln};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `titan train`. Holds the dump folder's run lock throughout (train/lock.rs). Exits 0 when the
/// run reaches `training.steps`, `EXIT_STOPPED` when a stop signal ended it (train/preempt.rs).
/// With several ranks (`--nproc-per-node`, `--nnodes`, torchrun's or SLURM's variables) this
/// process runs its ranks as threads: over shared memory when it holds the whole world, over
/// TCP (the rendezvous at the master address) otherwise; rank 0 logs.
pub fn train(
    reg: &Registry,
    config: Option<&Path>,
    overrides: &[String],
    quiet: bool,
    launch: &LaunchArgs,
    log_ranks: Option<&str>,
) -> Result<ExitCode> {
    let cfg = JobConfig::load(config, overrides)?;
    let logs = LogRanks::parse(log_ranks)?;
    let launch = Launch::resolve(launch, &|k| std::env::var(k).ok())?;
    let lead = launch.ranks.contains(&0);
    let dump = Path::new(&cfg.job.dump_folder);
    // The process of rank 0 owns the dump folder (the others may be on other machines).
    let _lock = if lead {
        let lock = RunLock::acquire(dump)?;
        if let Some(prev) = &lock.took_over {
            outln!(
                "titan: took over {} from a run that ended without releasing it ({prev})",
                lock.lock.path().display()
            )?;
        }
        // Only now, with the lock held, can no live save own a temp folder.
        for dir in checkpoint::remove_partial_saves(&dump.join(&cfg.checkpoint.folder))? {
            outln!(
                "titan: removed {}, a checkpoint save that did not finish",
                dir.display()
            )?;
        }
        if cfg.job.print_config {
            outln!("titan: job config\n{}", cfg.to_toml_string()?)?;
        }
        Some(lock)
    } else {
        None
    };
    let stop = StopFlag::from_signals()?;
    if launch.world == 1 {
        return train_rank(reg, cfg, quiet, None, stop, &logs);
    }
    if lead {
        outln!(
            "titan: {} ranks on {} node(s); this node ({}) runs ranks {}..={} as threads over {}",
            launch.world,
            launch.nnodes,
            launch.node,
            launch.ranks[0],
            launch.ranks[launch.ranks.len() - 1],
            if launch.single_process() {
                "shared memory"
            } else {
                "tcp"
            }
        )?;
    }
    let results = if launch.single_process() {
        let comms = HostComm::local_comms(launch.world);
        run_rank_threads(comms, &|c| {
            train_rank(reg, cfg.clone(), quiet, Some(c), stop.clone(), &logs)
        })
    } else {
        let timeout = Duration::from_secs(cfg.comm.init_timeout_seconds.max(1) as u64);
        let rdvs: Vec<Rendezvous> = launch
            .ranks
            .iter()
            .map(|&rank| Rendezvous {
                master_addr: launch.master_addr.clone(),
                master_port: launch.master_port,
                rank,
                world: launch.world,
                node: launch.node,
                timeout,
            })
            .collect();
        run_rank_threads(rdvs, &|r: Rendezvous| {
            let t = TcpTransport::connect(&r)?;
            let c: Box<dyn Communicator> = Box::new(HostComm::world(Arc::new(t)));
            train_rank(reg, cfg.clone(), quiet, Some(c), stop.clone(), &logs)
        })
    };
    // Every failed rank is reported with its rank and node; the first failure decides nothing
    // else, since a lost peer makes the others fail too.
    let mut code = ExitCode::SUCCESS;
    let mut failed = 0;
    for (rank, r) in launch.ranks.iter().zip(results) {
        match r {
            Ok(c) if rank == &0 => code = c,
            Ok(_) => {}
            Err(Error::OutputClosed) => return Err(Error::OutputClosed),
            Err(e) => {
                errln!("error: rank {rank} (node {}): {e}", launch.node);
                failed += 1;
            }
        }
    }
    if failed > 0 {
        return Err(Error::Other(format!(
            "{failed} of the {} ranks of node {} failed (each is reported above)",
            launch.ranks.len(),
            launch.node
        )));
    }
    Ok(code)
}

/// One rank of `titan train` (the whole run for one rank): builds the trainer, resumes, trains,
/// reports. Only rank 0 prints.
fn train_rank(
    reg: &Registry,
    cfg: JobConfig,
    quiet: bool,
    world: Option<Box<dyn Communicator>>,
    stop: StopFlag,
    logs: &LogRanks,
) -> Result<ExitCode> {
    let t0 = Instant::now();
    let mut tr = Trainer::distributed(cfg, reg, false, world)?;
    let lead = tr.rank == 0;
    tr.logs = logs.includes(tr.rank);
    if tr.cfg.checkpoint.create_seed_checkpoint {
        // torchtitan's seed checkpoint: the initialised weights as step-0, then stop.
        let dir = tr.save(crate::train::state::SaveKind::ModelOnly)?;
        if lead {
            outln!(
                "titan: seed checkpoint (initial weights, step 0) in {}",
                dir.display()
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if lead {
        outln!(
            "titan: {} {} ({:.2}M params, {}) on {} | {} dtype | seq {} x batch {} x accum {}{}",
            tr.cfg.model.name,
            tr.cfg.model.flavor,
            tr.store.num_params() as f64 / 1e6,
            tr.model.args().summary(),
            tr.device,
            tr.store.compute_dtype,
            tr.cfg.training.seq_len,
            tr.cfg.training.local_batch_size,
            tr.accum,
            layout_summary(&tr)
        )?;
        outln!(
            "titan: memory plan {:.3} GiB{} (state {:.3} + activations {:.3}; {:.3} without reuse), {} buffers over {} ops; data: {}; MFU peak: {:.3} TFLOP/s{} ({})",
            tr.memory.total() as f64 / GIB,
            if tr.world_size() > 1 { " per rank" } else { "" },
            tr.memory.state.total() as f64 / GIB,
            tr.memory.activations_peak as f64 / GIB,
            tr.memory.activations_unplanned as f64 / GIB,
            tr.memory.buffers,
            tr.memory.ops,
            tr.loader.name(),
            tr.peak.flops / 1e12,
            match tr.peak_devices {
                1 => String::new(),
                n => format!(" x {n} ranks"),
            },
            tr.peak.source
        )?;
        if let Ok(h) = tr.loader.unigram_entropy() {
            outln!("titan: dataset unigram entropy {h:.3} nats/token (a model that learns context beats this)")?;
        }
    }
    let resumed = tr.maybe_resume()?;
    if lead {
        match resumed {
            Some(s) => outln!("titan: resumed from checkpoint step {s}")?,
            None => {
                if let Some(p) = tr
                    .cfg
                    .checkpoint
                    .initial_load_path
                    .as_deref()
                    .filter(|p| !p.is_empty())
                {
                    let kind = if tr.cfg.checkpoint.initial_load_in_hf {
                        "Hugging Face"
                    } else {
                        "titan"
                    };
                    outln!("titan: initial weights from {kind} checkpoint {p}")?;
                }
            }
        }
        warn_if_data_repeats(&tr);
    }
    tr.stop = stop;
    let hist = tr.fit(quiet)?;
    if let Some(stopped) = &tr.stopped {
        if lead {
            errln!("{}", stopped.message);
        }
        return Ok(ExitCode::from(stopped.cause.exit_code()));
    }
    if let (true, Some(first), Some(last)) = (lead, hist.first(), hist.last()) {
        outln!(
            "titan: done {} steps in {:.1}s; loss {:.4} -> {:.4}; metrics in {}",
            tr.step,
            t0.elapsed().as_secs_f64(),
            first.loss,
            last.loss,
            Path::new(&tr.cfg.job.dump_folder)
                .join("metrics.jsonl")
                .display()
        )?;
        let png = Path::new(&tr.cfg.job.dump_folder).join("loss.png");
        let run = crate::plot::RunInfo {
            model: &tr.cfg.model.name,
            flavor: &tr.cfg.model.flavor,
            steps: tr.step,
        };
        crate::plot::loss_curve_png(&hist, &tr.validation_history, &run, &png)?;
        outln!("titan: loss curve in {}", png.display())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `--log-ranks`: whose step lines print (rank 0's by default).
pub enum LogRanks {
    All,
    Some(Vec<usize>),
}

impl LogRanks {
    fn parse(s: Option<&str>) -> Result<LogRanks> {
        match s {
            None => Ok(LogRanks::Some(vec![0])),
            Some("all") => Ok(LogRanks::All),
            Some(list) => list
                .split(',')
                .map(|r| {
                    r.trim().parse().map_err(|_| {
                        Error::Config(format!(
                            "--log-ranks {list:?}: expected \"all\" or ranks such as 0,3"
                        ))
                    })
                })
                .collect::<Result<Vec<usize>>>()
                .map(LogRanks::Some),
        }
    }

    fn includes(&self, rank: usize) -> bool {
        match self {
            LogRanks::All => true,
            LogRanks::Some(v) => v.contains(&rank),
        }
    }
}

/// One warning when the run reads its training data more than once (the loader starts over at
/// the end, as torchtitan's infinite loader does), and when validation has fewer batches than
/// `validation.steps` asks for.
fn warn_if_data_repeats(tr: &Trainer) {
    let c = &tr.cfg.training;
    let (steps, per_step) = (
        c.steps.max(0) as u64,
        (tr.accum * tr.loader.batch_size()) as u64,
    );
    let loader = &tr.loader;
    if let (Some(tokens), Some(epochs)) =
        (loader.stream_tokens(), loader.epochs_for(steps * per_step))
    {
        if epochs > 1.0 {
            let sample = loader.seq_len() as u64 + 1;
            // epochs_for counts every data-parallel rank's reads; so does this product.
            let global = per_step * tr.mesh.as_ref().map_or(1, |m| m.dims.dp()) as u64;
            errln!(
                "titan: warning: dataset {} holds {tokens} tokens; {steps} steps x {global} \
                 sequences x {sample} tokens = {} tokens read it {epochs:.1} times (it starts \
                 over at its end)",
                loader.name(),
                steps * global * sample
            );
        }
    }
    if let Some(v) = &tr.validator {
        let asked = tr.cfg.validation.steps;
        if asked > 0 && v.batches() < asked as usize {
            errln!(
                "titan: warning: validation dataset {} holds {} full batch(es); each validation \
                 reads those, not validation.steps = {asked} (the set is read once, as in \
                 torchtitan)",
                v.dataset_name(),
                v.batches()
            );
        }
    }
}
