//! `titan train`, `plan`, `bench` and `list-models`.

use crate::error::{Error, Result};
use crate::metrics::GIB;
use crate::model::{resolve, Registry};
use crate::tensor::DType;
use crate::train::config::JobConfig;
use crate::train::lock::RunLock;
use crate::train::preempt::StopFlag;
use crate::train::trainer::{trace_plan, Trainer};
use crate::{checkpoint, errln, outln};
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

/// `titan train`. Holds the dump folder's run lock throughout (train/lock.rs). Exits 0 when the
/// run reaches `training.steps`, `EXIT_STOPPED` when a stop signal ended it (train/preempt.rs).
pub fn train(
    reg: &Registry,
    config: Option<&Path>,
    overrides: &[String],
    quiet: bool,
) -> Result<ExitCode> {
    let cfg = JobConfig::load(config, overrides)?;
    let dump = Path::new(&cfg.job.dump_folder);
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
    let t0 = Instant::now();
    let mut tr = Trainer::new(cfg, reg)?;
    if tr.cfg.checkpoint.create_seed_checkpoint {
        // torchtitan's seed checkpoint: the initialised weights as step-0, then stop.
        let dir = tr.save(crate::train::state::SaveKind::ModelOnly)?;
        outln!(
            "titan: seed checkpoint (initial weights, step 0) in {}",
            dir.display()
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "titan: {} {} ({:.2}M params, {}) on {} | {} dtype | seq {} x batch {} x accum {}",
        tr.cfg.model.name,
        tr.cfg.model.flavor,
        tr.store.num_params() as f64 / 1e6,
        tr.model.args().summary(),
        tr.device,
        tr.store.compute_dtype,
        tr.cfg.training.seq_len,
        tr.cfg.training.local_batch_size,
        tr.accum
    )?;
    outln!(
        "titan: memory plan {:.3} GiB (state {:.3} + activations {:.3}; {:.3} without reuse), {} buffers over {} ops; data: {}; MFU peak: {:.3} TFLOP/s ({})",
        tr.memory.total() as f64 / GIB,
        tr.memory.state.total() as f64 / GIB,
        tr.memory.activations_peak as f64 / GIB,
        tr.memory.activations_unplanned as f64 / GIB,
        tr.memory.buffers,
        tr.memory.ops,
        tr.loader.name(),
        tr.peak.flops / 1e12,
        tr.peak.source
    )?;
    if let Ok(h) = tr.loader.unigram_entropy() {
        outln!("titan: dataset unigram entropy {h:.3} nats/token (a model that learns context beats this)")?;
    }
    match tr.maybe_resume()? {
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
    tr.stop = StopFlag::from_signals()?;
    let hist = tr.fit(quiet)?;
    if let Some(stopped) = &tr.stopped {
        errln!("{}", stopped.message);
        return Ok(ExitCode::from(stopped.cause.exit_code()));
    }
    if let (Some(first), Some(last)) = (hist.first(), hist.last()) {
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

fn gib(b: usize) -> String {
    format!("{:>10.3} GiB", b as f64 / GIB)
}

pub fn plan(
    reg: &Registry,
    config: Option<&Path>,
    overrides: &[String],
    dtype: &str,
    json: bool,
) -> Result<()> {
    let cfg = JobConfig::load(config, overrides)?;
    let dtype = DType::parse(dtype)?;
    let t0 = Instant::now();
    let spec = reg.find(&cfg.model.name)?;
    let args = resolve::run_args(spec, &cfg, None)?;
    let (_, _, mp) = trace_plan(spec, &cfg, args.as_ref(), dtype)?;
    if json {
        outln!(
            "{}",
            serde_json::to_string(&mp).map_err(|e| Error::Other(e.to_string()))?
        )?;
        return Ok(());
    }
    let s = &mp.state;
    outln!(
        "memory plan: {} {} | {:.3}B params | local batch {} x seq {} | compute {} | AC {}",
        spec.name,
        cfg.model.flavor,
        mp.num_params as f64 / 1e9,
        cfg.training.local_batch_size,
        cfg.training.seq_len,
        dtype,
        cfg.activation_checkpoint.mode
    )?;
    outln!("  parameters (f32 master)   {}", gib(s.params))?;
    outln!("  compute copy ({dtype})      {}", gib(s.compute_copy))?;
    outln!("  gradients (f32)           {}", gib(s.grads))?;
    outln!("  optimizer (AdamW m, v)    {}", gib(s.optimizer))?;
    outln!("  constants (rope tables)   {}", gib(s.constants))?;
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
    outln!("  peak, one device          {}", gib(mp.total()))?;
    let shard = cfg.parallelism.data_parallel_shard_degree;
    if shard > 1 {
        outln!(
            "  state per rank if sharded {shard}-way (FSDP layout; FSDP execution is not in this release): {}",
            gib(s.total() / shard as usize).trim()
        )?;
    }
    outln!(
        "  (traced on the meta backend in {:.2}s, nothing allocated)",
        t0.elapsed().as_secs_f64()
    )?;
    Ok(())
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

/// Training throughput of a config on one device: warm-up steps, then `steps` timed steps.
pub fn bench(
    reg: &Registry,
    config: Option<&Path>,
    overrides: &[String],
    steps: u64,
    warmup: u64,
    profile: bool,
) -> Result<()> {
    let mut ov = overrides.to_vec();
    ov.extend(["--training.dataset".to_string(), "synthetic".to_string()]);
    ov.extend(["--training.steps".to_string(), (steps + warmup).to_string()]);
    ov.extend(["--checkpoint.enable=false".to_string()]);
    let cfg = JobConfig::load(config, &ov)?;
    let mut tr = Trainer::with_options(cfg, reg, true)?;
    let seq = tr.cfg.training.seq_len as usize;
    let c = tr.model.args().clone_box();
    outln!(
        "bench: {} {} ({:.3}B params) on {} | {} | batch {} x seq {} x accum {} | plan {:.2} GiB",
        tr.cfg.model.name,
        tr.cfg.model.flavor,
        tr.store.num_params() as f64 / 1e9,
        tr.device,
        tr.store.compute_dtype,
        tr.cfg.training.local_batch_size,
        seq,
        tr.accum,
        tr.memory.total() as f64 / GIB
    )?;
    for _ in 0..warmup {
        let r = tr.train_step()?;
        outln!("bench: warm-up step {} loss {:.4}", tr.step, r.loss)?;
    }
    tr.be.synchronize()?;
    crate::tape::profile::enable(profile);
    let t0 = Instant::now();
    let mut tokens = 0usize;
    let mut last = 0.0;
    for _ in 0..steps {
        let r = tr.train_step()?;
        tokens += r.tokens;
        last = r.loss;
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
    let peak = tr.peak.flops;
    outln!(
        "bench: {} steps in {:.3}s ({:.1} ms/step), loss {:.4}",
        steps,
        dt,
        1e3 * dt / steps.max(1) as f64,
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
            "device": tr.device, "step_ms": 1e3 * dt / steps.max(1) as f64})
    )?;
    Ok(())
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
            errln!(
                "titan: warning: dataset {} holds {tokens} tokens; {steps} steps x {per_step} \
                 sequences x {sample} tokens = {} tokens read it {epochs:.1} times (it starts \
                 over at its end)",
                loader.name(),
                steps * per_step * sample
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
