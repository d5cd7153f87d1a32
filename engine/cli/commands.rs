//! `titan plan`, `bench` and `list-models` (`train` is in train.rs).

use super::estimate::{estimate, estimate_pipeline, print as print_estimate, Machine};
use crate::dist::launch::run_rank_threads;
use crate::dist::{Communicator, HostComm, ParallelDims};
use crate::error::{Error, Result};
use crate::metrics::GIB;
use crate::model::{resolve, ModelArgs, ModelSpec, Registry};
use crate::outln;
use crate::parallel::fsdp::{FsdpLayout, Reshard};
use crate::parallel::tp::local_specs;
use crate::planner::cost::{Assumptions, Estimate};
use crate::tensor::DType;
use crate::train::config::JobConfig;
use crate::train::pipeline::plan_pp_ranks;
use crate::train::trainer::{trace_plan, MemoryPlan, Trainer};
use std::path::Path;
use std::time::Instant;

/// " | world 4: dp_replicate 1 x dp_shard 4 (FSDP)" for multi-rank runs.
pub(super) fn layout_summary(tr: &Trainer) -> String {
    let Some(m) = &tr.mesh else {
        return String::new();
    };
    let g = m.dims.degrees;
    let kind = match (g.dp_replicate > 1, g.dp_shard > 1) {
        (true, true) => "HSDP",
        (false, true) => "FSDP",
        (true, false) => "DDP",
        (false, false) if g.tp > 1 => "TP",
        (false, false) => "replicated",
    };
    let tp = if g.tp > 1 {
        format!(" x tp {}", g.tp)
    } else {
        String::new()
    };
    let pp = match &tr.pipeline {
        Some(p) => format!(
            "pp {} ({}, {} stages, {} microbatches) x ",
            g.pp,
            p.schedule.kind.name(),
            p.schedule.stages(),
            p.schedule.microbatches
        ),
        None => String::new(),
    };
    format!(
        " | world {}: {pp}dp_replicate {} x dp_shard {}{tp} ({kind})",
        m.dims.world, g.dp_replicate, g.dp_shard
    )
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn gib(b: usize) -> String {
    format!("{:>10.3} GiB", b as f64 / GIB)
}

/// `titan plan`'s options besides the config.
#[derive(Clone, Debug, Default)]
pub struct PlanOpts {
    /// Compute dtype (default: bfloat16, float32 with `--device cpu`).
    pub dtype: Option<String>,
    pub json: bool,
    pub world_size: usize,
    pub machine: Machine,
    /// `--search`: list the best layouts of the world size instead of planning the config's.
    pub search: bool,
    /// `--top K`: how many layouts `--search` lists.
    pub top: usize,
}

/// One layout's memory per rank and step-time estimate (what `plan` prints, `--search` ranks).
pub(super) fn plan_layout(
    spec: &ModelSpec,
    cfg: &JobConfig,
    args: &dyn ModelArgs,
    dtype: DType,
    dims: &ParallelDims,
    machine: &Assumptions,
) -> Result<(MemoryPlan, Estimate)> {
    let g = dims.degrees;
    if g.cp > 1 || g.ep > 1 {
        return Err(Error::Config(format!(
            "plan: cp {} x ep {}: context and expert parallel planning is not built yet",
            g.cp, g.ep
        )));
    }
    if g.pp > 1 {
        // The busiest pp rank's memory.
        let (_, ranks) = plan_pp_ranks(spec, cfg, args, dims, dtype)?;
        let mp = ranks
            .into_iter()
            .max_by_key(|m| m.total())
            .ok_or_else(|| Error::Config("plan: no pp ranks".into()))?;
        let est = estimate_pipeline(spec, cfg, args, dtype, dims, machine, mp.total())?;
        return Ok((mp, est));
    }
    let (_, _, mut mp) = trace_plan(spec, cfg, args, dtype, 0)?;
    let accum = cfg.gradient_accumulation_steps(dims.dp())?;
    if g.dp_shard > 1 {
        // Rank 0 holds the largest shards (ceil division), so its state is the per-rank peak.
        let (_, b) = spec.build_for(args, cfg)?;
        let reshard = Reshard::parse(&cfg.parallelism.fsdp_reshard_after_forward)?;
        let local = local_specs(&b.params, &b.tp_dims(), g.tp, 0);
        let layout = FsdpLayout::new(&local, &b.fsdp_units, g.dp_shard, 0, reshard, accum > 1)?;
        let reduce = DType::parse(&cfg.training.mixed_precision_reduce)?;
        mp.state = mp.state.sharded_as(&layout, dtype, reduce);
    }
    let est = estimate(spec, cfg, args, dtype, dims, machine, mp.total())?;
    Ok((mp, est))
}

pub fn plan(
    reg: &Registry,
    config: Option<&Path>,
    overrides: &[String],
    opts: &PlanOpts,
) -> Result<()> {
    let (json, world_size) = (opts.json, opts.world_size);
    let mut cfg = JobConfig::load(config, overrides)?;
    let default_dtype = if opts.machine.is_cpu() {
        "float32"
    } else {
        "bfloat16"
    };
    let dtype = DType::parse(opts.dtype.as_deref().unwrap_or(default_dtype))?;
    let t0 = Instant::now();
    let spec = reg.find(&cfg.model.name)?;
    let args = resolve::run_args(spec, &cfg, None)?;
    if opts.search {
        return super::search::search(spec, &cfg, args.as_ref(), dtype, opts);
    }
    // One device plans the model alone, whatever layout the config names (a note says how
    // to plan that layout).
    if world_size == 1 {
        cfg.parallelism = crate::train::config::Parallelism::default();
    }
    let dims = ParallelDims::new(&cfg.parallelism, world_size)?;
    let g = dims.degrees;
    if g.pp > 1 {
        let machine = opts.machine.assumptions(world_size)?;
        let l = PlanLayout {
            dims: &dims,
            dtype,
            machine: &machine,
        };
        return plan_pipeline(spec, &cfg, args.as_ref(), &l, json);
    }
    let accum = cfg.gradient_accumulation_steps(dims.dp())?;
    let machine = opts.machine.assumptions(world_size)?;
    let (mp, est) = plan_layout(spec, &cfg, args.as_ref(), dtype, &dims, &machine)?;
    let traced_s = t0.elapsed().as_secs_f64();
    if json {
        let mut v = serde_json::to_value(&mp).map_err(|e| Error::Other(e.to_string()))?;
        let e = serde_json::to_value(&est).map_err(|e| Error::Other(e.to_string()))?;
        v["estimate"] = e;
        outln!("{v}")?;
        return Ok(());
    }
    let s = &mp.state;
    outln!(
        "memory plan: {} {} | {:.3}B params | local batch {} x seq {} x accum {} | compute {} | AC {}",
        spec.name,
        cfg.model.flavor,
        mp.num_params as f64 / 1e9,
        cfg.training.local_batch_size,
        cfg.training.seq_len,
        accum,
        dtype,
        cfg.activation_checkpoint.mode
    )?;
    if world_size > 1 {
        outln!(
            "  layout: world {world_size} = dp_replicate {} x dp_shard {} x tp {}{}{}; figures per \
             rank",
            g.dp_replicate,
            g.dp_shard,
            g.tp,
            if g.tp > 1 {
                format!(
                    " (TP: sequence parallel {}, loss parallel {})",
                    on_off(cfg.parallelism.enable_sequence_parallel),
                    on_off(!cfg.parallelism.disable_loss_parallel)
                )
            } else {
                String::new()
            },
            if g.dp_shard > 1 {
                format!(
                    " (FSDP, reshard_after_forward {})",
                    cfg.parallelism.fsdp_reshard_after_forward
                )
            } else {
                " (DDP)".into()
            }
        )?;
    }
    outln!("  parameters (f32 master)   {}", gib(s.params))?;
    outln!("  compute copy ({dtype})      {}", gib(s.compute_copy))?;
    outln!("  gradients (f32)           {}", gib(s.grads))?;
    outln!("  optimizer (AdamW m, v)    {}", gib(s.optimizer))?;
    outln!("  constants (rope tables)   {}", gib(s.constants))?;
    if g.dp_shard > 1 {
        outln!(
            "  gathered units (FSDP)     {}   (whole parameters and f32 gradients of the units in flight)",
            gib(s.gathered)
        )?;
        outln!(
            "  comm buffers (FSDP)       {}   (all-gather and reduce-scatter staging)",
            gib(s.comm_buffers)
        )?;
    }
    outln!(
        "  activations (planned)     {}   ({} without reuse; {} buffers, {} ops)",
        gib(mp.activations_peak),
        gib(mp.activations_unplanned).trim(),
        mp.buffers,
        mp.ops
    )?;
    if mp.validation_activations > 0 {
        outln!(
            "  validation (own arena)    {}   (its forward pass does not fit in the training arena)",
            gib(mp.validation_activations)
        )?;
    }
    let per = if world_size > 1 {
        "per rank"
    } else {
        "one device"
    };
    outln!("  peak, {per:<18} {}", gib(mp.total()))?;
    let p = &cfg.parallelism;
    let named = [
        p.data_parallel_replicate_degree,
        p.data_parallel_shard_degree,
        p.tensor_parallel_degree,
        p.pipeline_parallel_degree,
        p.context_parallel_degree,
    ]
    .iter()
    .map(|&d| d.max(1))
    .product::<i64>();
    if world_size == 1 && named > 1 {
        outln!(
            "  (the config's [parallelism] names {named} ranks; `--world-size N` plans each rank of it)"
        )?;
    }
    outln!(
        "  (traced on the meta backend in {:.2}s, nothing allocated)",
        traced_s
    )?;
    print_estimate(&est)
}

/// `titan plan` of a pp > 1 layout: every pp rank's memory (its stages' state, and the
/// activations of the stage microbatches its schedule holds at once), the largest first in
/// the text. The step-time model does not cover pipeline schedules yet.
/// What a pipeline layout is planned for.
struct PlanLayout<'a> {
    dims: &'a ParallelDims,
    dtype: DType,
    machine: &'a Assumptions,
}

fn plan_pipeline(
    spec: &crate::model::ModelSpec,
    cfg: &JobConfig,
    args: &dyn crate::model::ModelArgs,
    l: &PlanLayout,
    json: bool,
) -> Result<()> {
    let (dims, dtype) = (l.dims, l.dtype);
    let (s, ranks) = plan_pp_ranks(spec, cfg, args, dims, dtype)?;
    let busiest = (0..ranks.len())
        .max_by_key(|&r| ranks[r].total())
        .unwrap_or(0);
    let est = estimate_pipeline(
        spec,
        cfg,
        args,
        dtype,
        dims,
        l.machine,
        ranks[busiest].total(),
    )?;
    if json {
        let v = serde_json::json!({
            "pipeline": {
                "schedule": s.kind.name(),
                "stages": s.stages(),
                "microbatches": s.microbatches,
                "peak_in_flight": (0..s.pp).map(|r| s.peak_in_flight(r)).collect::<Vec<_>>(),
                "ranks": ranks,
            },
            "estimate": est,
        });
        outln!("{v}")?;
        return Ok(());
    }
    let g = dims.degrees;
    outln!(
        "memory plan: {} {} | pp {} x dp_replicate {} | {} schedule, {} stages, {} microbatches \
         of {} x seq {} | compute {} | AC {}",
        spec.name,
        cfg.model.flavor,
        g.pp,
        g.dp_replicate,
        s.kind.name(),
        s.stages(),
        s.microbatches,
        cfg.parallelism.pipeline_parallel_microbatch_size,
        cfg.training.seq_len,
        dtype,
        cfg.activation_checkpoint.mode
    )?;
    for (r, mp) in ranks.iter().enumerate() {
        let st = &mp.state;
        outln!(
            "  pp rank {r}: {:.3}B params | state {} | activations {} ({} stage microbatches in \
             flight) | peak {}{}",
            mp.num_params as f64 / 1e9,
            gib(st.total()).trim(),
            gib(mp.activations_peak).trim(),
            s.peak_in_flight(r),
            gib(mp.total()).trim(),
            if r == busiest {
                "  <- per-rank peak"
            } else {
                ""
            }
        )?;
    }
    outln!(
        "  (activations: the arenas of the stage microbatch tapes a rank holds at once (what \
         each keeps between its passes), the scratch its passes share, and received hidden \
         states; the schedule replayed on the meta backend's traces, nothing allocated)"
    )?;
    print_estimate(&est)
}

/// Every registered model and flavor with its parameter count (at the flavor's own vocabulary).
pub fn list_models(reg: &Registry) -> Result<()> {
    for spec in reg.specs() {
        outln!("{}", spec.name)?;
        for &f in spec.flavors {
            let a = (spec.flavor)(f)?;
            outln!(
                "  {:<16} {:>16} params   {}",
                f,
                group_digits(a.num_params()),
                a.summary()
            )?;
        }
    }
    Ok(())
}

fn group_digits(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `titan bench`: warm-up steps, then `steps` timed steps of a config's training; with `nproc > 1` that many CPU or GPU ranks as threads of this process
/// (FSDP / HSDP / DDP from `[parallelism]`), timed together; rank 0 reports the global
/// tokens/s and the time each step spent in collectives.
pub fn bench(
    reg: &Registry,
    config: Option<&Path>,
    overrides: &[String],
    steps: u64,
    warmup: u64,
    profile: bool,
    nproc: usize,
) -> Result<()> {
    let mut ov = overrides.to_vec();
    ov.extend(["--training.dataset".to_string(), "synthetic".to_string()]);
    ov.extend(["--training.steps".to_string(), (steps + warmup).to_string()]);
    ov.extend(["--checkpoint.enable=false".to_string()]);
    let cfg = JobConfig::load(config, &ov)?;
    if nproc <= 1 {
        return bench_rank(reg, cfg, steps, warmup, profile, None);
    }
    if profile {
        return Err(Error::Config(
            "bench --profile times one rank's ops; run it without --nproc-per-node".into(),
        ));
    }
    let comms = HostComm::local_comms(nproc);
    let results = run_rank_threads(comms, &|c| {
        bench_rank(reg, cfg.clone(), steps, warmup, false, Some(c))
    });
    for (rank, r) in results.into_iter().enumerate() {
        if let Err(e) = r {
            return Err(Error::Other(format!("bench rank {rank}: {e}")));
        }
    }
    Ok(())
}

fn bench_rank(
    reg: &Registry,
    cfg: JobConfig,
    steps: u64,
    warmup: u64,
    profile: bool,
    world: Option<Box<dyn Communicator>>,
) -> Result<()> {
    let mut tr = Trainer::distributed(cfg, reg, true, world)?;
    let lead = tr.rank == 0;
    let seq = tr.cfg.training.seq_len as usize;
    let c = tr.model.args().clone_box();
    if lead {
        outln!(
            "bench: {} {} ({:.3}B params) on {} | {} | batch {} x seq {} x accum {}{} | plan {:.2} GiB{}",
            tr.cfg.model.name,
            tr.cfg.model.flavor,
            tr.store.num_params() as f64 / 1e9,
            tr.device,
            tr.store.compute_dtype,
            tr.cfg.training.local_batch_size,
            seq,
            tr.accum,
            layout_summary(&tr),
            tr.memory.total() as f64 / GIB,
            if tr.world_size() > 1 { " per rank" } else { "" }
        )?;
    }
    for _ in 0..warmup {
        let r = tr.train_step()?;
        if lead {
            outln!("bench: warm-up step {} loss {:.4}", tr.step, r.loss)?;
        }
    }
    tr.be.synchronize()?;
    crate::tape::profile::enable(profile);
    let t0 = Instant::now();
    let mut tokens = 0usize;
    let mut last = 0.0;
    let mut comm_s = 0.0;
    for _ in 0..steps {
        let r = tr.train_step()?;
        tokens += r.tokens;
        last = r.loss;
        comm_s += tr.last_comm_s;
    }
    tr.be.synchronize()?;
    let dt = t0.elapsed().as_secs_f64();
    crate::tape::profile::enable(false);
    if profile {
        let rows = crate::tape::profile::report();
        let total: f64 = rows.iter().map(|r| r.2).sum();
        outln!(
            "profile: {:<22} {:>7} {:>10} {:>6}   (ops synchronised; step {:.1} ms)",
            "op",
            "calls",
            "ms/step",
            "%",
            1e3 * dt / steps.max(1) as f64
        )?;
        for (name, calls, secs) in rows {
            outln!(
                "profile: {name:<22} {:>7} {:>10.2} {:>5.1}%",
                calls / steps.max(1),
                1e3 * secs / steps.max(1) as f64,
                100.0 * secs / total
            )?;
        }
    }
    let tps = tokens as f64 / dt;
    let (_, f_tt) = c.nparams_and_flops(seq);
    let f_llmc = c.flops_per_token_llmc(seq);
    if !lead {
        return Ok(());
    }
    let peak = tr.peak.flops * tr.peak_devices as f64;
    let per_step = |x: f64| 1e3 * x / steps.max(1) as f64;
    outln!(
        "bench: {} steps in {:.3}s ({:.1} ms/step, {:.1} ms of it in collectives on rank 0), loss {:.4}",
        steps,
        dt,
        per_step(dt),
        per_step(comm_s),
        last
    )?;
    outln!(
        "bench: tokens/s {:.0} | torchtitan 6N+12lhqt: {:.3} TFLOP/s MFU {:.2}% | llm.c 6N+6LCT: {:.3} TFLOP/s MFU {:.2}% | peak {:.3} TFLOP/s ({})",
        tps,
        tps * f_tt / 1e12,
        100.0 * tps * f_tt / peak,
        tps * f_llmc / 1e12,
        100.0 * tps * f_llmc / peak,
        peak / 1e12,
        tr.peak.source
    )?;
    outln!(
        "{}",
        serde_json::json!({"bench": "train", "flavor": tr.cfg.model.flavor, "seq_len": seq,
            "batch": tr.cfg.training.local_batch_size, "tokens_per_s": tps,
            "mfu_torchtitan_pct": 100.0 * tps * f_tt / peak, "mfu_llmc_pct": 100.0 * tps * f_llmc / peak,
            "device": tr.device, "step_ms": per_step(dt), "comm_ms": per_step(comm_s),
            "world": tr.world_size()})
    )?;
    Ok(())
}
