//! The step-time estimate block of `titan plan`: which machine (`--device`, and the flags that
//! change its numbers), the traced step replayed on it (`planner::cost`), the printout.

use crate::backend::cpu::CpuBackend;
use crate::backend::meta::CollKind;
use crate::dist::ParallelDims;
use crate::error::{Error, Result};
use crate::metrics::{measure_copy_bandwidth, measure_gemm_peak};
use crate::model::{ModelArgs, ModelSpec};
use crate::outln;
use crate::parallel::schedule::Action;
use crate::planner::cost::{step_cost, Assumptions, CommTotals, Estimate};
use crate::tensor::DType;
use crate::train::config::JobConfig;
use crate::train::pipeline_trace::trace_pipeline;
use crate::train::step_trace::trace_step;

/// `titan plan`'s machine flags; unset ones keep the device's defaults.
#[derive(Clone, Debug, Default)]
pub struct Machine {
    /// "h100" (default) or "cpu" (this machine, peak and bandwidth measured).
    pub device: Option<String>,
    pub peak_tflops: Option<f64>,
    pub hbm_gbps: Option<f64>,
    pub nvlink_gbps: Option<f64>,
    pub net_gbps: Option<f64>,
    pub gpus_per_node: Option<usize>,
}

impl Machine {
    pub fn is_cpu(&self) -> bool {
        self.device.as_deref() == Some("cpu")
    }

    /// The assumptions for `world` ranks: the device's defaults, measured where the device is
    /// this CPU, then every flag given.
    pub fn assumptions(&self, world: usize) -> Result<Assumptions> {
        for (name, v) in [
            ("--peak-tflops", self.peak_tflops),
            ("--hbm-gbps", self.hbm_gbps),
            ("--nvlink-gbps", self.nvlink_gbps),
            ("--net-gbps", self.net_gbps),
        ] {
            if let Some(x) = v {
                if !(x.is_finite() && x > 0.0) {
                    return Err(Error::Config(format!(
                        "{name} {x}: expected a positive number"
                    )));
                }
            }
        }
        if self.gpus_per_node == Some(0) {
            return Err(Error::Config(
                "--gpus-per-node 0: expected at least 1".into(),
            ));
        }
        let mut a = match self.device.as_deref().unwrap_or("h100") {
            "h100" => Assumptions::h100(),
            "cpu" => {
                let be = CpuBackend::new();
                let (peak, source) = match self.peak_tflops {
                    Some(_) => (0.0, String::new()),
                    // The best of three measurements: on a shared machine one of them can
                    // fall into a busy moment and halve the figure.
                    None => {
                        let mut best = measure_gemm_peak(&be)?;
                        for _ in 0..2 {
                            let p = measure_gemm_peak(&be)?;
                            if p.flops > best.flops {
                                best = p;
                            }
                        }
                        (best.flops, format!("best of 3 x {}", best.source))
                    }
                };
                let bw = match self.hbm_gbps {
                    Some(_) => 0.0,
                    None => measure_copy_bandwidth(&be)?,
                };
                let ranks = self.gpus_per_node.unwrap_or(world).min(world);
                Assumptions::cpu(peak, source, bw, ranks)
            }
            other => {
                return Err(Error::Config(format!(
                    "--device {other}: expected h100 or cpu"
                )))
            }
        };
        if let Some(t) = self.peak_tflops {
            a.peak_flops = t * 1e12;
            a.peak_source = "--peak-tflops".into();
        }
        if let Some(g) = self.hbm_gbps {
            a.mem_bw = g * 1e9;
            if !a.overlap {
                // Host collectives are copies, inside the machine or (TCP aside) across.
                (a.intra_bw, a.inter_bw) = (a.mem_bw, a.mem_bw);
            }
        }
        if let Some(g) = self.nvlink_gbps {
            a.intra_bw = g * 1e9;
        }
        if let Some(g) = self.net_gbps {
            a.inter_bw = g * 1e9;
        }
        if let Some(n) = self.gpus_per_node {
            a.gpus_per_node = n;
        }
        Ok(a)
    }
}

/// Traces one step of the layout `dims` and replays it on `a`; `memory` is the planned bytes per
/// rank (for the fit check).
pub fn estimate(
    spec: &ModelSpec,
    cfg: &JobConfig,
    args: &dyn ModelArgs,
    dtype: DType,
    dims: &ParallelDims,
    a: &Assumptions,
    memory: usize,
) -> Result<Estimate> {
    let trace = trace_step(spec, cfg, args, dtype, dims)?;
    let cost = step_cost(&trace.events, a);
    let (_, flops_per_token) = args.nparams_and_flops(cfg.training.seq_len as usize);
    Ok(Estimate::new(
        a,
        cost,
        (trace.tokens, dims.dp(), dims.world),
        flops_per_token,
        memory,
    ))
}

/// As `estimate` for a pipeline layout (pp > 1): each stage's passes timed, the schedule
/// simulated with those times and the stage-to-stage transfers (pp ranks are world / pp apart,
/// so usually on other nodes), the step tail of pp rank 0 added; the totals are pp rank 0's.
pub fn estimate_pipeline(
    spec: &ModelSpec,
    cfg: &JobConfig,
    args: &dyn ModelArgs,
    dtype: DType,
    dims: &ParallelDims,
    a: &Assumptions,
    memory: usize,
) -> Result<Estimate> {
    let t = trace_pipeline(spec, cfg, args, dtype, dims)?;
    let secs: Vec<[f64; 3]> = t
        .passes
        .iter()
        .map(|p| p.each_ref().map(|e| step_cost(e, a).step_s))
        .collect();
    let cost = |x: &Action| {
        let c = secs[x.stage()];
        match x {
            Action::Forward { .. } => c[0],
            Action::Backward { .. } => c[1] + c[2],
            Action::BackwardInput { .. } => c[1],
            Action::BackwardWeight { .. } => c[2],
        }
    };
    let span = dims.world / dims.degrees.pp + 1;
    let p2p = a.collective_time(CollKind::Broadcast, t.hidden_bytes as f64, 2, span);
    let tl = t.schedule.simulate(&cost, p2p)?;
    // Pp rank 0's kernels and collectives over the step, for the totals.
    let mut events = Vec::new();
    for _ in 0..t.accum {
        for x in &t.schedule.per_rank[0] {
            let p = &t.passes[x.stage()];
            match x {
                Action::Forward { .. } => events.extend_from_slice(&p[0]),
                Action::Backward { .. } => {
                    events.extend_from_slice(&p[1]);
                    events.extend_from_slice(&p[2]);
                }
                Action::BackwardInput { .. } => events.extend_from_slice(&p[1]),
                Action::BackwardWeight { .. } => events.extend_from_slice(&p[2]),
            }
        }
    }
    events.extend_from_slice(&t.tail);
    let mut c = step_cost(&events, a);
    c.step_s = t.accum as f64 * tl.makespan + step_cost(&t.tail, a).step_s;
    c.exposed_comm_s = (c.step_s - c.compute_s).max(0.0);
    let (_, flops_per_token) = args.nparams_and_flops(cfg.training.seq_len as usize);
    let mut e = Estimate::new(
        a,
        c,
        (t.tokens, dims.dp(), dims.world),
        flops_per_token,
        memory,
    );
    e.notes.retain(|n| !n.starts_with("no pipeline stages"));
    if dims.degrees.dp_shard > 1 {
        e.notes.push(
            "FSDP within stages: each stage pass (forward, backward) gathers its stage's \
             parameters, prefetched over the pass's compute; gradients reduce-scatter once per \
             step"
                .into(),
        );
    }
    e.notes.insert(
        0,
        format!(
            "pipeline: {} over {} stages, {} microbatches per schedule x {} accumulation: bubble \
             {:.1} % of the schedule (simulated with each stage's traced pass times, {:.3} ms per \
             stage-to-stage transfer); the idle time counts in exposed comm",
            t.schedule.kind.name(),
            t.schedule.stages(),
            t.schedule.microbatches,
            t.accum,
            100.0 * tl.bubble,
            p2p * 1e3
        ),
    );
    Ok(e)
}

fn ms(s: f64) -> String {
    format!("{:>10.2} ms", s * 1e3)
}

fn comm_part(name: &str, c: &CommTotals) -> String {
    format!(
        "{name} {} x {:.3} GB/rank {:.2} ms",
        c.count,
        c.ring_bytes / 1e9,
        c.seconds * 1e3
    )
}

pub fn print(e: &Estimate) -> Result<()> {
    let a = &e.assumptions;
    let c = &e.cost;
    let unit = if a.device == "cpu" { "rank" } else { "GPU" };
    let per_node = if a.gpus_per_node == 1 { "" } else { "s" };
    outln!(
        "step-time estimate on {}: peak {:.3} TFLOP/s ({}), memory {:.0} GB/s, intra-node {:.0} GB/s \
         {:.0} us, network {:.0} GB/s {:.0} us, {} {unit}{per_node} per node{}",
        a.device,
        a.peak_flops / 1e12,
        a.peak_source,
        a.mem_bw / 1e9,
        a.intra_bw / 1e9,
        a.intra_latency * 1e6,
        a.inter_bw / 1e9,
        a.inter_latency * 1e6,
        a.gpus_per_node,
        if a.share > 1 {
            format!(", {} ranks sharing the device", a.share)
        } else {
            String::new()
        }
    )?;
    outln!(
        "  efficiency: GEMM {:.2}, attention {:.2}, memory-bound {:.2}; collectives {}",
        a.eff_gemm,
        a.eff_attention,
        a.eff_memory,
        if a.overlap {
            "overlap compute (own stream)"
        } else {
            "in line with compute"
        }
    )?;
    outln!(
        "  compute              {}   (GEMM {:.2} ms, {:.3} TFLOP; attention {:.2} ms, {:.3} TFLOP; memory-bound {:.2} ms, {:.2} GB)",
        ms(c.compute_s),
        c.gemm.seconds * 1e3,
        c.gemm.flops / 1e12,
        c.attention.seconds * 1e3,
        c.attention.flops / 1e12,
        c.memory.seconds * 1e3,
        c.memory.bytes / 1e9
    )?;
    outln!(
        "  communication        {}   ({}; {}; {})",
        ms(c.comm_s),
        comm_part("all-gather", &c.all_gather),
        comm_part("reduce-scatter", &c.reduce_scatter),
        comm_part("all-reduce", &c.all_reduce)
    )?;
    outln!("  exposed comm         {}", ms(c.exposed_comm_s))?;
    outln!("  step                 {}", ms(c.step_s))?;
    outln!(
        "  tokens/s             {:.0} per {unit}, {:.0} total   ({} tokens per {unit} per step)",
        e.tokens_per_s_per_rank,
        e.tokens_per_s,
        e.tokens_per_step_per_rank
    )?;
    outln!(
        "  MFU                  {:>10.1} %    (torchtitan's 6N + 12 l h q t FLOPs per token)",
        e.mfu_pct
    )?;
    for n in &e.notes {
        outln!("  note: {n}")?;
    }
    Ok(())
}
