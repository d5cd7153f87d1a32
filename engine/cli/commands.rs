//! `titan train`, `plan`, `bench` and `list-models`.

use crate::error::{Error, Result};
use crate::metrics::GIB;
use crate::model::{resolve, Registry};
use crate::tensor::DType;
use crate::train::config::JobConfig;
use crate::train::trainer::{model_spec, trace_plan, Trainer};
use std::path::Path;
use std::time::Instant;

pub fn train(
    reg: &Registry,
    config: Option<&Path>,
    overrides: &[String],
    quiet: bool,
) -> Result<()> {
    let cfg = JobConfig::load(config, overrides)?;
    if cfg.job.print_config {
        println!("titan: job config\n{}", cfg.to_toml_string()?);
    }
    let t0 = Instant::now();
    let mut tr = Trainer::new(cfg, reg)?;
    if tr.cfg.checkpoint.create_seed_checkpoint {
        // torchtitan's seed checkpoint: the initialised weights as step-0, then stop.
        let dir = tr.save(crate::train::state::SaveKind::ModelOnly)?;
        println!(
            "titan: seed checkpoint (initial weights, step 0) in {}",
            dir.display()
        );
        return Ok(());
    }
    println!(
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
    );
    println!(
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
    );
    if let Ok(h) = tr.loader.unigram_entropy() {
        println!("titan: dataset unigram entropy {h:.3} nats/token (a model that learns context beats this)");
    }
    match tr.maybe_resume()? {
        Some(s) => println!("titan: resumed from checkpoint step {s}"),
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
                println!("titan: initial weights from {kind} checkpoint {p}");
            }
        }
    }
    let hist = tr.fit(quiet)?;
    if let (Some(first), Some(last)) = (hist.first(), hist.last()) {
        println!(
            "titan: done {} steps in {:.1}s; loss {:.4} -> {:.4}; metrics in {}",
            tr.step,
            t0.elapsed().as_secs_f64(),
            first.loss,
            last.loss,
            Path::new(&tr.cfg.job.dump_folder)
                .join("metrics.jsonl")
                .display()
        );
        let png = Path::new(&tr.cfg.job.dump_folder).join("loss.png");
        let run = crate::plot::RunInfo {
            model: &tr.cfg.model.name,
            flavor: &tr.cfg.model.flavor,
            steps: tr.step,
        };
        crate::plot::loss_curve_png(&hist, &tr.validation_history, &run, &png)?;
        println!("titan: loss curve in {}", png.display());
    }
    Ok(())
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
    let spec = model_spec(reg, &cfg)?;
    let args = resolve::run_args(spec, &cfg, None)?;
    let (_, _, mp) = trace_plan(spec, &cfg, args.as_ref(), dtype)?;
    if json {
        println!(
            "{}",
            serde_json::to_string(&mp).map_err(|e| Error::Other(e.to_string()))?
        );
        return Ok(());
    }
    let s = &mp.state;
    println!(
        "memory plan: {} {} | {:.3}B params | local batch {} x seq {} | compute {} | AC {}",
        spec.name,
        cfg.model.flavor,
        mp.num_params as f64 / 1e9,
        cfg.training.local_batch_size,
        cfg.training.seq_len,
        dtype,
        cfg.activation_checkpoint.mode
    );
    println!("  parameters (f32 master)   {}", gib(s.params));
    println!("  compute copy ({dtype})      {}", gib(s.compute_copy));
    println!("  gradients (f32)           {}", gib(s.grads));
    println!("  optimizer (AdamW m, v)    {}", gib(s.optimizer));
    println!("  constants (rope tables)   {}", gib(s.constants));
    println!(
        "  activations (planned)     {}   ({} without reuse; {} buffers, {} ops)",
        gib(mp.activations_peak),
        gib(mp.activations_unplanned).trim(),
        mp.buffers,
        mp.ops
    );
    if mp.validation_activations > 0 {
        println!(
            "  validation (own arena)    {}   (its forward pass does not fit in the training arena)",
            gib(mp.validation_activations)
        );
    }
    println!("  peak, one device          {}", gib(mp.total()));
    let shard = cfg.parallelism.data_parallel_shard_degree;
    if shard > 1 {
        println!(
            "  state per rank if sharded {shard}-way (FSDP layout; FSDP execution is not in this release): {}",
            gib(s.total() / shard as usize).trim()
        );
    }
    println!(
        "  (traced on the meta backend in {:.2}s, nothing allocated)",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Every registered model and flavor with its parameter count (at the flavor's own vocabulary).
pub fn list_models(reg: &Registry) -> Result<()> {
    for spec in reg.specs() {
        println!("{}", spec.name);
        for &f in spec.flavors {
            let a = (spec.flavor)(f)?;
            println!(
                "  {:<16} {:>16} params   {}",
                f,
                group_digits(a.num_params()),
                a.summary()
            );
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
    println!(
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
    );
    for _ in 0..warmup {
        let r = tr.train_step()?;
        println!("bench: warm-up step {} loss {:.4}", tr.step, r.loss);
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
        println!(
            "profile: {:<22} {:>7} {:>10} {:>6}   (ops synchronised; step {:.1} ms)",
            "op",
            "calls",
            "ms/step",
            "%",
            1e3 * dt / steps.max(1) as f64
        );
        for (name, calls, secs) in rows {
            println!(
                "profile: {name:<22} {:>7} {:>10.2} {:>5.1}%",
                calls / steps.max(1),
                1e3 * secs / steps.max(1) as f64,
                100.0 * secs / total
            );
        }
    }
    let tps = tokens as f64 / dt;
    let (_, f_tt) = c.nparams_and_flops(seq);
    let f_llmc = c.flops_per_token_llmc(seq);
    let peak = tr.peak.flops;
    println!(
        "bench: {} steps in {:.3}s ({:.1} ms/step), loss {:.4}",
        steps,
        dt,
        1e3 * dt / steps.max(1) as f64,
        last
    );
    println!(
        "bench: tokens/s {:.0} | torchtitan 6N+12lhqt: {:.3} TFLOP/s MFU {:.2}% | llm.c 6N+6LCT: {:.3} TFLOP/s MFU {:.2}% | peak {:.3} TFLOP/s ({})",
        tps,
        tps * f_tt / 1e12,
        100.0 * tps * f_tt / peak,
        tps * f_llmc / 1e12,
        100.0 * tps * f_llmc / peak,
        peak / 1e12,
        tr.peak.source
    );
    println!(
        "{}",
        serde_json::json!({"bench": "train", "flavor": tr.cfg.model.flavor, "seq_len": seq,
            "batch": tr.cfg.training.local_batch_size, "tokens_per_s": tps,
            "mfu_torchtitan_pct": 100.0 * tps * f_tt / peak, "mfu_llmc_pct": 100.0 * tps * f_llmc / peak,
            "device": tr.device, "step_ms": 1e3 * dt / steps.max(1) as f64})
    );
    Ok(())
}
