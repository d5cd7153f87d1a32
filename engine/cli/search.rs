//! `titan plan --search`: every layout of a world size (pp x dp_replicate x dp_shard x tp; tp
//! inside a node), each planned and estimated as `titan plan` would, listed by estimated tokens/s
//! per GPU, best first, among those that fit the device's memory. Pipeline layouts use the
//! config's schedule and microbatch size; those its rules refuse are counted as refused.

use super::commands::{plan_layout, PlanOpts};
use crate::dist::ParallelDims;
use crate::error::{Error, Result};
use crate::metrics::GIB;
use crate::model::{ModelArgs, ModelSpec};
use crate::outln;
use crate::planner::cost::Estimate;
use crate::tensor::DType;
use crate::train::config::{JobConfig, Parallelism};
use crate::train::trainer::MemoryPlan;
use rayon::prelude::*;
use std::time::Instant;

/// One candidate layout and what planning it gave.
struct Candidate {
    /// (pp, dp_replicate, dp_shard, tp).
    degrees: (usize, usize, usize, usize),
    outcome: Result<(MemoryPlan, Estimate)>,
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

/// The layouts searched: tp a divisor of the world within a node, pp a divisor of what is
/// left up to the number of layers and 16, the rest split every way between dp_replicate and
/// dp_shard (DDP, FSDP, HSDP) without pipelines, as DDP or FSDP with them (each pipeline layout
/// traces every stage, so HSDP splits of them are left out to answer in seconds).
fn layouts(world: usize, gpus_per_node: usize, layers: usize) -> Vec<(usize, usize, usize, usize)> {
    let mut out = Vec::new();
    for tp in divisors(world).into_iter().filter(|&t| t <= gpus_per_node) {
        for pp in divisors(world / tp)
            .into_iter()
            .filter(|&p| p <= layers.min(16))
        {
            let rest = world / tp / pp;
            for shard in divisors(rest) {
                if pp == 1 || shard == 1 || shard == rest {
                    out.push((pp, rest / shard, shard, tp));
                }
            }
        }
    }
    out
}

pub fn search(
    spec: &ModelSpec,
    cfg: &JobConfig,
    args: &dyn ModelArgs,
    dtype: DType,
    opts: &PlanOpts,
) -> Result<()> {
    let world = opts.world_size;
    if world < 2 {
        return Err(Error::Config(
            "plan --search needs --world-size N (N > 1): the layouts of N ranks".into(),
        ));
    }
    let t0 = Instant::now();
    let machine = opts.machine.assumptions(world)?;
    let candidates: Vec<Candidate> = layouts(world, machine.gpus_per_node, args.n_layers())
        .into_par_iter()
        .map(|(pp, rep, shard, tp)| {
            let mut c = cfg.clone();
            c.parallelism = Parallelism {
                pipeline_parallel_degree: pp as i64,
                data_parallel_replicate_degree: rep as i64,
                data_parallel_shard_degree: shard as i64,
                tensor_parallel_degree: tp as i64,
                ..cfg.parallelism.clone()
            };
            let outcome = ParallelDims::new(&c.parallelism, world)
                .and_then(|dims| plan_layout(spec, &c, args, dtype, &dims, &machine));
            Candidate {
                degrees: (pp, rep, shard, tp),
                outcome,
            }
        })
        .collect();
    let mut ok: Vec<(&Candidate, &MemoryPlan, &Estimate)> = candidates
        .iter()
        .filter_map(|c| c.outcome.as_ref().ok().map(|(m, e)| (c, m, e)))
        .collect();
    ok.sort_by(|a, b| {
        let fits = |e: &Estimate| e.fits != Some(false);
        fits(b.2).cmp(&fits(a.2)).then(
            b.2.tokens_per_s_per_rank
                .total_cmp(&a.2.tokens_per_s_per_rank),
        )
    });
    let fitting = ok.iter().filter(|c| c.2.fits != Some(false)).count();
    let refused: Vec<String> = candidates
        .iter()
        .filter_map(|c| {
            let (p, r, s, t) = c.degrees;
            c.outcome
                .as_ref()
                .err()
                .map(|e| format!("pp {p} x dp_replicate {r} x dp_shard {s} x tp {t}: {e}"))
        })
        .collect();
    if opts.json {
        let rows: Vec<serde_json::Value> = ok
            .iter()
            .map(|(c, m, e)| {
                serde_json::json!({
                    "pp": c.degrees.0, "dp_replicate": c.degrees.1, "dp_shard": c.degrees.2,
                    "tp": c.degrees.3,
                    "memory_per_rank": m.total(), "estimate": e,
                })
            })
            .collect();
        outln!(
            "{}",
            serde_json::json!({"layouts": rows, "refused": refused})
        )?;
        return Ok(());
    }
    let unit = if machine.device == "cpu" {
        "rank"
    } else {
        "GPU"
    };
    outln!(
        "layout search: {} {} on {world} {unit}s ({}, {} per node) | local batch {} x seq {} | \
         compute {dtype} | AC {}",
        spec.name,
        cfg.model.flavor,
        machine.device,
        machine.gpus_per_node,
        cfg.training.local_batch_size,
        cfg.training.seq_len,
        cfg.activation_checkpoint.mode,
    )?;
    let cap = machine
        .mem_capacity
        .map_or("no memory limit".into(), |c| format!("{:.0} GB", c / 1e9));
    outln!(
        "  {} layouts planned in {:.1}s: {fitting} fit in {cap}, {} do not, {} refused",
        candidates.len(),
        t0.elapsed().as_secs_f64(),
        ok.len() - fitting,
        refused.len()
    )?;
    outln!(
        "  {:<4} {:>4} {:>12} {:>8} {:>4} {:>13} {:>10} {:>14} {:>7}",
        "#",
        "pp",
        "dp_replicate",
        "dp_shard",
        "tp",
        "memory/rank",
        "step ms",
        format!("tokens/s/{unit}"),
        "MFU %"
    )?;
    for (i, (c, m, e)) in ok.iter().take(opts.top.max(1)).enumerate() {
        let (p, r, s, t) = c.degrees;
        outln!(
            "  {:<4} {:>4} {:>12} {:>8} {:>4} {:>9.1} GiB {:>10.1} {:>14.0} {:>7.1}{}",
            i + 1,
            p,
            r,
            s,
            t,
            m.total() as f64 / GIB,
            e.cost.step_s * 1e3,
            e.tokens_per_s_per_rank,
            e.mfu_pct,
            if e.fits == Some(false) {
                "  (does not fit)"
            } else {
                ""
            }
        )?;
    }
    for r in refused.iter().take(5) {
        outln!("  refused: {r}")?;
    }
    outln!(
        "  assumptions as `titan plan` prints them (change with --device, --peak-tflops, \
         --hbm-gbps, --nvlink-gbps, --net-gbps, --gpus-per-node); pipeline layouts use the \
         config's schedule ({}) and microbatch size ({})",
        cfg.parallelism.pipeline_parallel_schedule,
        cfg.parallelism.pipeline_parallel_microbatch_size
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_cover_every_split_with_tp_inside_a_node() {
        let l = layouts(16, 8, 4);
        // tp 1, 2, 4, 8 (not 16: beyond a node); pp up to the 4 layers; every dp split of the
        // rest without pp, DDP or FSDP with it. tp 1: pp 1, 2, 4 leave 16, 8, 4 ranks (5 + 2 +
        // 2 splits); tp 2: 8, 4, 2 (4 + 2 + 2); tp 4: 4, 2, 1 (3 + 2 + 1); tp 8: 2, 1 (2 + 1).
        assert_eq!(l.len(), 9 + 8 + 6 + 3);
        assert!(l
            .iter()
            .all(|&(p, r, s, t)| p * r * s * t == 16 && t <= 8 && p <= 4));
        assert!(
            l.contains(&(1, 1, 2, 8)) && l.contains(&(4, 1, 4, 1)) && l.contains(&(2, 1, 8, 1))
        );
        assert!(!l.contains(&(2, 2, 4, 1)), "no HSDP split with pipelines");
    }
}
