//! The step-time model of `titan plan`: a roofline for every kernel of a traced step and a
//! communication model for every collective, replayed on two streams.
//!
//! The input is the event log of one rank's step traced on the meta backend
//! (`train::step_trace`): every kernel with its FLOPs and bytes read + written, every collective
//! with its buffer size and group, and the points where compute waits for communication. A kernel
//! takes max(FLOPs / (peak x efficiency of its class), bytes / (memory bandwidth x memory
//! efficiency)). A collective over a group of n ranks moves the ring algorithm's bytes per rank
//! ((n - 1) / n of the buffer for all-gather and reduce-scatter, twice that for all-reduce) over
//! the intra-node link when the group fits in one node, else over the network, plus a latency.
//!
//! Overlap (`Assumptions::overlap`, GPUs with NCCL): collectives run on their own stream, in
//! issue order, each starting once the compute issued before it is done (NCCL's event order);
//! a `_start` collective (FSDP's prefetched gathers, the f32 reduce-scatters) leaves compute
//! running until the next wait, a plain one makes compute wait for it. So a unit's prefetched
//! gather hides behind the previous unit's compute, and what is exposed is the first gather and
//! whatever exceeds the compute it overlaps. Without overlap (CPU ranks as threads, whose host
//! communicators finish every call before returning) every collective adds to the step, and
//! it is a memory copy: the host algorithm's bytes at memory bandwidth.
//!
//! Not modelled yet (the layouts do not run yet): tensor-parallel collectives, the pipeline
//! bubble and point-to-point sends. They would be more events in the same log (TP) and a
//! schedule term over stages (PP); `Estimate::notes` says so.

use crate::backend::meta::{CollKind, KernelClass, MetaEvent};

/// The machine the estimate is for. Bandwidths in bytes/s, FLOP/s, seconds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Assumptions {
    pub device: String,
    /// Dense peak of one device (bf16 tensor cores on a GPU; the measured f32 GEMM on the CPU).
    pub peak_flops: f64,
    pub peak_source: String,
    /// Memory bandwidth of one device (HBM; on the CPU a measured copy).
    pub mem_bw: f64,
    /// Per GPU and direction: NVLink inside a node, the network across nodes.
    pub intra_bw: f64,
    pub inter_bw: f64,
    pub intra_latency: f64,
    pub inter_latency: f64,
    pub gpus_per_node: usize,
    /// Achievable fractions of peak per kernel class, and of bandwidth for memory-bound work.
    pub eff_gemm: f64,
    pub eff_attention: f64,
    pub eff_memory: f64,
    /// Ranks that share one device's compute and memory (CPU ranks as threads of one machine).
    pub share: usize,
    /// Collectives on their own stream (NCCL) rather than finished by the host before returning.
    pub overlap: bool,
    /// Device memory per rank, bytes (None: not checked).
    pub mem_capacity: Option<f64>,
}

impl Assumptions {
    /// H100 SXM: dense bf16 989 TFLOP/s, HBM3 3.35 TB/s, NVLink 4 at 450 GB/s per direction,
    /// one 400 Gb/s InfiniBand NIC per GPU (50 GB/s), 8 GPUs per node, 80 GB.
    pub fn h100() -> Assumptions {
        Assumptions {
            device: "h100".into(),
            peak_flops: 989e12,
            peak_source: "H100 SXM dense bf16 datasheet".into(),
            mem_bw: 3.35e12,
            intra_bw: 450e9,
            inter_bw: 50e9,
            intra_latency: 10e-6,
            inter_latency: 20e-6,
            gpus_per_node: 8,
            eff_gemm: 0.65,
            eff_attention: 0.5,
            eff_memory: 0.8,
            share: 1,
            overlap: true,
            mem_capacity: Some(80e9),
        }
    }

    /// This CPU, `ranks` CPU ranks as threads sharing it: peak and copy bandwidth measured (or
    /// given). Efficiencies from the kernel measurements in docs/PERFORMANCE.md: model GEMMs run
    /// at ~0.9 of the 1024^3 GEMM, the fused attention at head dim 16 at ~0.5, the memory-bound
    /// kernels at 0.75-1.0 of a copy.
    pub fn cpu(peak_flops: f64, peak_source: String, mem_bw: f64, ranks: usize) -> Assumptions {
        Assumptions {
            device: "cpu".into(),
            peak_flops,
            peak_source,
            mem_bw,
            intra_bw: mem_bw,
            inter_bw: mem_bw,
            intra_latency: 20e-6,
            inter_latency: 20e-6,
            gpus_per_node: ranks.max(1),
            eff_gemm: 0.9,
            eff_attention: 0.5,
            eff_memory: 0.8,
            share: ranks.max(1),
            overlap: false,
            mem_capacity: None,
        }
    }

    fn rank_peak(&self) -> f64 {
        self.peak_flops / self.share as f64
    }
    fn rank_bw(&self) -> f64 {
        self.mem_bw * self.eff_memory / self.share as f64
    }

    /// Seconds of one kernel on one rank: the roofline.
    pub fn kernel_time(&self, class: KernelClass, flops: f64, bytes: f64) -> f64 {
        let eff = match class {
            KernelClass::Gemm => self.eff_gemm,
            KernelClass::Attention => self.eff_attention,
            KernelClass::Memory => 1.0,
        };
        let compute = if flops > 0.0 {
            flops / (self.rank_peak() * eff)
        } else {
            0.0
        };
        compute.max(bytes / self.rank_bw())
    }

    /// Seconds of one collective on `bytes` (the whole buffer) over `group` ranks spanning
    /// `span` consecutive ranks.
    pub fn collective_time(&self, kind: CollKind, bytes: f64, group: usize, span: usize) -> f64 {
        if group <= 1 {
            return 0.0;
        }
        let n = group as f64;
        if !self.overlap {
            // Host collectives (dist/host.rs): each peer's chunk is sent as a copy and copied
            // out on arrival, the own chunk copied once; every copy reads and writes.
            let chunk = bytes / n;
            let copies = match kind {
                CollKind::AllReduce => 2.0 * (2.0 * n - 1.0),
                CollKind::Broadcast => 2.0,
                _ => 2.0 * n - 1.0,
            };
            return self.intra_latency + 2.0 * copies * chunk / self.rank_bw();
        }
        let (bw, lat) = if span <= self.gpus_per_node {
            (self.intra_bw, self.intra_latency)
        } else {
            (self.inter_bw, self.inter_latency)
        };
        let ring = match kind {
            CollKind::AllReduce => 2.0 * (n - 1.0) / n,
            CollKind::Broadcast => 1.0,
            _ => (n - 1.0) / n,
        };
        lat + ring * bytes / bw
    }
}

/// Totals of one kernel class.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ClassTotals {
    pub kernels: usize,
    pub flops: f64,
    pub bytes: f64,
    pub seconds: f64,
}

/// Totals of one collective kind.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct CommTotals {
    pub count: usize,
    /// Bytes each rank sends under the ring algorithm (the volume the link carries).
    pub ring_bytes: f64,
    pub seconds: f64,
}

/// The step-time estimate of one rank.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StepCost {
    pub gemm: ClassTotals,
    pub attention: ClassTotals,
    pub memory: ClassTotals,
    pub all_gather: CommTotals,
    pub reduce_scatter: CommTotals,
    pub all_reduce: CommTotals,
    /// Sum of kernel times, sum of collective times, and the replayed step.
    pub compute_s: f64,
    pub comm_s: f64,
    pub step_s: f64,
    /// The part of the step that is communication nothing overlapped.
    pub exposed_comm_s: f64,
}

impl StepCost {
    pub fn flops(&self) -> f64 {
        self.gemm.flops + self.attention.flops + self.memory.flops
    }
}

/// Ring-algorithm bytes per rank for one collective.
pub fn ring_bytes(kind: CollKind, bytes: f64, group: usize) -> f64 {
    let n = group as f64;
    match kind {
        _ if group <= 1 => 0.0,
        CollKind::AllReduce => 2.0 * (n - 1.0) / n * bytes,
        CollKind::Broadcast => bytes,
        _ => (n - 1.0) / n * bytes,
    }
}

/// Replays a traced step's events under `a`: compute on one stream, collectives on another
/// (or inline without overlap).
pub fn step_cost(events: &[MetaEvent], a: &Assumptions) -> StepCost {
    let mut c = StepCost::default();
    // When the compute stream and the communication stream are done.
    let (mut tc, mut tm) = (0f64, 0f64);
    for e in events {
        match *e {
            MetaEvent::Kernel {
                class,
                flops,
                bytes,
                ..
            } => {
                let t = a.kernel_time(class, flops, bytes);
                let tot = match class {
                    KernelClass::Gemm => &mut c.gemm,
                    KernelClass::Attention => &mut c.attention,
                    KernelClass::Memory => &mut c.memory,
                };
                tot.kernels += 1;
                tot.flops += flops;
                tot.bytes += bytes;
                tot.seconds += t;
                c.compute_s += t;
                tc += t;
            }
            MetaEvent::Collective {
                kind,
                group,
                span,
                bytes,
                started,
                ..
            } => {
                let t = a.collective_time(kind, bytes, group, span);
                let tot = match kind {
                    CollKind::AllGather => &mut c.all_gather,
                    CollKind::ReduceScatter => &mut c.reduce_scatter,
                    _ => &mut c.all_reduce,
                };
                tot.count += 1;
                tot.ring_bytes += ring_bytes(kind, bytes, group);
                tot.seconds += t;
                c.comm_s += t;
                if a.overlap {
                    tm = tm.max(tc) + t;
                    if !started {
                        tc = tm;
                    }
                } else {
                    tc += t;
                }
            }
            MetaEvent::OrderCompute | MetaEvent::Wait => tc = tc.max(tm),
        }
    }
    c.step_s = tc.max(tm);
    c.exposed_comm_s = (c.step_s - c.compute_s).max(0.0);
    c
}

/// What `titan plan` prints: the step and the throughput it implies.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Estimate {
    pub assumptions: Assumptions,
    pub cost: StepCost,
    pub tokens_per_step_per_rank: usize,
    pub tokens_per_s_per_rank: f64,
    pub tokens_per_s: f64,
    /// torchtitan's convention: tokens/s x the model's FLOPs per token / peak.
    pub mfu_pct: f64,
    pub fits: Option<bool>,
    pub notes: Vec<String>,
}

impl Estimate {
    /// `tokens_per_data_rank`: the tokens one data-parallel rank trains on per step (its
    /// tensor-parallel ranks share them); `data_ranks`: ranks that see different data, of
    /// `world`; `flops_per_token`: the model's `nparams_and_flops`; `memory`: the planned bytes
    /// per rank.
    pub fn new(
        a: &Assumptions,
        cost: StepCost,
        (tokens_per_data_rank, data_ranks, world): (usize, usize, usize),
        flops_per_token: f64,
        memory: usize,
    ) -> Estimate {
        let tokens_per_rank = tokens_per_data_rank * data_ranks / world.max(1);
        let per_rank = tokens_per_rank as f64 / cost.step_s.max(1e-12);
        let mfu_pct = 100.0 * per_rank * flops_per_token / a.rank_peak();
        let fits = a.mem_capacity.map(|cap| memory as f64 <= cap);
        let mut notes =
            vec!["no pipeline stages: one pass over the whole model per micro-batch".to_string()];
        if !a.overlap {
            notes.push(
                "host communicators: collectives finish before the next kernel (no overlap), \
                 modelled as memory copies"
                    .into(),
            );
        }
        if fits == Some(false) {
            notes.push(format!(
                "the plan needs {:.1} GB per rank: it does not fit in {:.0} GB",
                memory as f64 / 1e9,
                a.mem_capacity.unwrap_or(0.0) / 1e9
            ));
        }
        Estimate {
            assumptions: a.clone(),
            cost,
            tokens_per_step_per_rank: tokens_per_rank,
            tokens_per_s_per_rank: per_rank,
            tokens_per_s: per_rank * world.max(1) as f64,
            mfu_pct,
            fits,
            notes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(class: KernelClass, flops: f64, bytes: f64) -> MetaEvent {
        MetaEvent::Kernel {
            name: "k",
            class,
            flops,
            bytes,
        }
    }

    fn gather(bytes: f64, started: bool) -> MetaEvent {
        MetaEvent::Collective {
            kind: CollKind::AllGather,
            group: 8,
            span: 8,
            comm: "dp_shard",
            bytes,
            started,
        }
    }

    #[test]
    fn roofline_takes_the_slower_of_compute_and_memory() {
        let a = Assumptions::h100();
        let gemm = a.kernel_time(KernelClass::Gemm, 989e12 * 0.65, 1.0);
        assert!((gemm - 1.0).abs() < 1e-9, "{gemm}");
        let mem = a.kernel_time(KernelClass::Memory, 0.0, 3.35e12 * 0.8);
        assert!((mem - 1.0).abs() < 1e-9, "{mem}");
        // A GEMM with almost no FLOPs is bandwidth-bound.
        let thin = a.kernel_time(KernelClass::Gemm, 1.0, 3.35e12 * 0.8);
        assert!((thin - 1.0).abs() < 1e-9, "{thin}");
    }

    #[test]
    fn ring_volumes_and_links() {
        let a = Assumptions::h100();
        assert_eq!(ring_bytes(CollKind::AllGather, 800.0, 8), 700.0);
        assert_eq!(ring_bytes(CollKind::AllReduce, 800.0, 8), 1400.0);
        assert_eq!(ring_bytes(CollKind::ReduceScatter, 800.0, 1), 0.0);
        let intra = a.collective_time(CollKind::AllGather, 8e9, 8, 8);
        let inter = a.collective_time(CollKind::AllGather, 8e9, 16, 16);
        assert!((intra - (10e-6 + 7e9 / 450e9)).abs() < 1e-12, "{intra}");
        assert!((inter - (20e-6 + 7.5e9 / 50e9)).abs() < 1e-12, "{inter}");
    }

    #[test]
    fn prefetched_gathers_hide_behind_compute() {
        let a = Assumptions::h100();
        let k = kernel(KernelClass::Gemm, 989e12 * 0.65 * 1e-3, 0.0); // 1 ms
        let g = 450e9 * 0.5e-3 * 8.0 / 7.0; // 0.5 ms + latency
                                            // First gather blocking, then each unit prefetches the next: only the first is exposed.
        let mut ev = vec![gather(g, false)];
        for _ in 0..4 {
            ev.extend([gather(g, true), k.clone(), MetaEvent::OrderCompute]);
        }
        let c = step_cost(&ev, &a);
        let t_g = a.collective_time(CollKind::AllGather, g, 8, 8);
        assert!((c.compute_s - 4e-3).abs() < 1e-9);
        assert!((c.step_s - (4e-3 + t_g)).abs() < 1e-9, "{}", c.step_s);
        assert!((c.exposed_comm_s - t_g).abs() < 1e-9);
        // Gathers slower than the compute they overlap expose the excess.
        let slow = gather(4.0 * g, true);
        let ev = vec![slow.clone(), k.clone(), MetaEvent::OrderCompute, k.clone()];
        let c = step_cost(&ev, &a);
        let t_s = a.collective_time(CollKind::AllGather, 4.0 * g, 8, 8);
        assert!((c.step_s - (t_s + 1e-3)).abs() < 1e-9, "{}", c.step_s);
        // Without overlap every collective adds up.
        let mut host = a.clone();
        host.overlap = false;
        let c = step_cost(&ev, &host);
        assert!((c.step_s - (c.compute_s + c.comm_s)).abs() < 1e-12);
    }
}
