//! Pipeline-parallel schedules as data: which rank runs which stage's forward or backward of
//! which microbatch, in what order (torchtitan's `pipeline_parallel_schedule` names, the
//! semantics of PyTorch's `torch.distributed.pipelining` schedules). The trainer does not run
//! pipelines yet; this is the order that its execution and the cost model will both read, and a
//! simulator (sim.rs) that times it under a cost per action.
//!
//! Stage `s` of `pp * stages_per_rank` lives on rank `s % pp` (looped placement, as PyTorch's
//! interleaved schedules), so with one stage per rank stage and rank coincide.

mod sim;
#[cfg(test)]
mod tests;

pub use sim::{Slot, Timeline};

use crate::error::{Error, Result};
use crate::train::config::{Parallelism, PIPELINE_SCHEDULES};
use std::collections::{HashMap, VecDeque};
use std::fmt;

/// The schedules, by torchtitan's names (`Kind::name`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// All forwards, then all backwards (Huang et al. 2019).
    GPipe,
    /// Warm-up forwards, then one forward one backward, then cool-down backwards
    /// (PipeDream-flush, Narayanan et al. 2019).
    OneFOneB,
    /// 1F1B over `v` stages per rank, depth first (Narayanan et al. 2021).
    Interleaved1F1B,
    /// Interleaved 1F1B with the backward split into its input-gradient half, on the critical
    /// path, and its weight-gradient half, deferred into the bubbles (Qi et al. 2023, ZB1P).
    InterleavedZeroBubble,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::GPipe,
        Kind::OneFOneB,
        Kind::Interleaved1F1B,
        Kind::InterleavedZeroBubble,
    ];

    /// torchtitan's name (one of `PIPELINE_SCHEDULES`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::GPipe => "GPipe",
            Kind::OneFOneB => "1F1B",
            Kind::Interleaved1F1B => "Interleaved1F1B",
            Kind::InterleavedZeroBubble => "InterleavedZeroBubble",
        }
    }

    /// A schedule name, matched case-insensitively as the config matches it.
    pub fn parse(name: &str) -> Result<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                Error::Config(format!(
                    "parallelism.pipeline_parallel_schedule {name:?}: unknown schedule (one of {})",
                    PIPELINE_SCHEDULES.join(", ")
                ))
            })
    }

    /// Schedules that place several stages on every rank.
    pub fn interleaved(self) -> bool {
        matches!(self, Kind::Interleaved1F1B | Kind::InterleavedZeroBubble)
    }
}

/// One compute step of one rank. `Backward` is the full backward of a stage; zero-bubble splits
/// it into `BackwardInput` (the gradient sent to the previous stage) and `BackwardWeight` (the
/// parameter gradients, needed only by the optimizer) — on the explicit tape, the two halves of
/// each op's backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Forward { stage: usize, microbatch: usize },
    Backward { stage: usize, microbatch: usize },
    BackwardInput { stage: usize, microbatch: usize },
    BackwardWeight { stage: usize, microbatch: usize },
}

impl Action {
    pub fn stage(&self) -> usize {
        match *self {
            Action::Forward { stage, .. }
            | Action::Backward { stage, .. }
            | Action::BackwardInput { stage, .. }
            | Action::BackwardWeight { stage, .. } => stage,
        }
    }

    pub fn microbatch(&self) -> usize {
        match *self {
            Action::Forward { microbatch, .. }
            | Action::Backward { microbatch, .. }
            | Action::BackwardInput { microbatch, .. }
            | Action::BackwardWeight { microbatch, .. } => microbatch,
        }
    }

    /// PyTorch's letters: F, B (full backward), I (input gradient), W (weight gradient).
    pub fn letter(&self) -> char {
        match self {
            Action::Forward { .. } => 'F',
            Action::Backward { .. } => 'B',
            Action::BackwardInput { .. } => 'I',
            Action::BackwardWeight { .. } => 'W',
        }
    }

    /// Whether this action produces the gradient the previous stage waits for.
    fn is_input_grad(&self) -> bool {
        matches!(self, Action::Backward { .. } | Action::BackwardInput { .. })
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} of stage {} microbatch {}",
            self.letter(),
            self.stage(),
            self.microbatch()
        )
    }
}

/// What crosses a stage boundary: a stage's output activation forward, or the gradient of a
/// stage's input backward. Derived from the actions (`Schedule::recv_before`, `send_after`).
/// With pp > 1 it always crosses between two ranks; with every stage on one rank (pp = 1,
/// `parallelism.pipeline_on_one_rank`) it goes from the rank to itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Transfer {
    pub gradient: bool,
    pub from_rank: usize,
    pub to_rank: usize,
    /// The stage that produced it.
    pub stage: usize,
    pub microbatch: usize,
}

/// Every rank's actions, in execution order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub kind: Kind,
    pub pp: usize,
    /// 1, or `v` for the interleaved schedules.
    pub stages_per_rank: usize,
    pub microbatches: usize,
    pub per_rank: Vec<Vec<Action>>,
}

impl Schedule {
    /// The schedule `name` (torchtitan's, case-insensitive) for `pp` ranks holding
    /// `stages_per_rank` stages each, over `microbatches` microbatches.
    pub fn new(name: &str, pp: usize, stages_per_rank: usize, microbatches: usize) -> Result<Self> {
        Self::of(Kind::parse(name)?, pp, stages_per_rank, microbatches)
    }

    /// As `new`, from the `[parallelism]` section and the local batch: microbatches are
    /// `local_batch_size / pipeline_parallel_microbatch_size`; interleaved schedules place two
    /// stages per rank (torchtitan's default when `pipeline_parallel_layers_per_stage` is unset;
    /// that key is not read yet).
    pub fn for_config(p: &Parallelism, local_batch_size: i64) -> Result<Self> {
        let (kind, pp, v, m) = Self::config_layout(p, local_batch_size)?;
        Self::of(kind, pp, v, m)
    }

    /// As `for_config`, for a split into `stages` stages (`pipeline::SplitSpec`, which reads
    /// `pipeline_parallel_layers_per_stage` and the split points): `stages / pp` per rank, which
    /// must divide evenly and be 1 for GPipe / 1F1B, at least 2 for the interleaved schedules.
    pub fn for_stages(p: &Parallelism, local_batch_size: i64, stages: usize) -> Result<Self> {
        let (kind, pp, _, m) = Self::config_layout(p, local_batch_size)?;
        if !stages.is_multiple_of(pp) {
            return Err(Error::Config(format!(
                "{} schedule: {stages} pipeline stages do not divide evenly over \
                 pipeline_parallel_degree {pp}",
                kind.name()
            )));
        }
        Self::of(kind, pp, stages / pp, m)
    }

    /// The checks `for_config` makes, without building the schedule (config validation).
    pub fn check_config(p: &Parallelism, local_batch_size: i64) -> Result<()> {
        Self::config_layout(p, local_batch_size).map(|_| ())
    }

    fn config_layout(
        p: &Parallelism,
        local_batch_size: i64,
    ) -> Result<(Kind, usize, usize, usize)> {
        let kind = Kind::parse(&p.pipeline_parallel_schedule)?;
        let (pp, mbs) = (
            p.pipeline_parallel_degree,
            p.pipeline_parallel_microbatch_size,
        );
        if pp < 1 || mbs < 1 || local_batch_size < 1 || local_batch_size % mbs != 0 {
            return Err(Error::Config(format!(
                "pipeline: degree {pp}, microbatch size {mbs} and local batch size \
                 {local_batch_size} must be positive, the batch a multiple of the microbatch"
            )));
        }
        let (pp, m) = (pp as usize, (local_batch_size / mbs) as usize);
        let v = if kind.interleaved() { 2 } else { 1 };
        check_layout(kind, pp, v, m).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!(
                "{msg} (microbatches = training.local_batch_size {local_batch_size} / \
                 parallelism.pipeline_parallel_microbatch_size {mbs})"
            )),
            other => other,
        })?;
        Ok((kind, pp, v, m))
    }

    pub fn of(kind: Kind, pp: usize, stages_per_rank: usize, microbatches: usize) -> Result<Self> {
        let (v, m) = (stages_per_rank, microbatches);
        check_layout(kind, pp, v, m)?;
        let actions = pp.saturating_mul(v).saturating_mul(m).saturating_mul(3);
        if actions > MAX_ACTIONS {
            return Err(Error::Config(format!(
                "{} schedule: pp {pp} x {v} stages per rank x {m} microbatches is {actions} \
                 actions, more than the {MAX_ACTIONS} a schedule is built for",
                kind.name()
            )));
        }
        let per_rank = (0..pp)
            .map(|r| match kind {
                Kind::GPipe => gpipe(r, m),
                Kind::OneFOneB => one_f_one_b(r, pp, m),
                Kind::Interleaved1F1B => interleaved(r, pp, v, m, false),
                Kind::InterleavedZeroBubble => interleaved(r, pp, v, m, true),
            })
            .collect();
        let s = Schedule {
            kind,
            pp,
            stages_per_rank: v,
            microbatches: m,
            per_rank,
        };
        s.check()?;
        Ok(s)
    }

    pub fn stages(&self) -> usize {
        self.pp * self.stages_per_rank
    }

    pub fn rank_of(&self, stage: usize) -> usize {
        stage % self.pp
    }

    /// The schedule is well formed: one row per rank, every action's stage on that rank and in
    /// range, and every (stage, microbatch) run exactly once forward and once backward (either
    /// whole, or as one input-gradient and one weight-gradient half). Order is the simulator's
    /// business (a wrong order is a deadlock there).
    pub fn check(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(format!("pipeline schedule: {msg}")));
        if self.per_rank.len() != self.pp {
            return bad(format!(
                "{} rows for {} ranks",
                self.per_rank.len(),
                self.pp
            ));
        }
        let mut seen: HashMap<Action, usize> = HashMap::new();
        for (r, row) in self.per_rank.iter().enumerate() {
            for a in row {
                if a.stage() >= self.stages() || a.microbatch() >= self.microbatches {
                    return bad(format!("{a} is out of range on rank {r}"));
                }
                if self.rank_of(a.stage()) != r {
                    return bad(format!(
                        "{a} is on rank {r}; stage {} lives on rank {}",
                        a.stage(),
                        self.rank_of(a.stage())
                    ));
                }
                if seen.insert(*a, r).is_some() {
                    return bad(format!("{a} appears twice"));
                }
            }
        }
        for stage in 0..self.stages() {
            for microbatch in 0..self.microbatches {
                let has = |a: Action| seen.contains_key(&a);
                let f = has(Action::Forward { stage, microbatch });
                let b = has(Action::Backward { stage, microbatch });
                let i = has(Action::BackwardInput { stage, microbatch });
                let w = has(Action::BackwardWeight { stage, microbatch });
                if !f || !(b ^ (i || w)) || i != w {
                    return bad(format!(
                        "stage {stage} microbatch {microbatch} needs one forward and one backward \
                         (B, or I and W); has F {f}, B {b}, I {i}, W {w}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// What `a` must receive from the previous or next stage before it runs, if anything.
    pub fn recv_before(&self, a: &Action) -> Option<Transfer> {
        let here = self.rank_of(a.stage());
        let (s, m) = (a.stage(), a.microbatch());
        let t = match a {
            Action::Forward { .. } if s > 0 => (false, s - 1),
            _ if a.is_input_grad() && s + 1 < self.stages() => (true, s + 1),
            _ => return None,
        };
        Some(self.transfer(t.0, self.rank_of(t.1), here, t.1, m))
    }

    /// What `a` sends to the next or previous stage when it is done, if anything.
    pub fn send_after(&self, a: &Action) -> Option<Transfer> {
        let here = self.rank_of(a.stage());
        let (s, m) = (a.stage(), a.microbatch());
        match a {
            Action::Forward { .. } if s + 1 < self.stages() => {
                Some(self.transfer(false, here, self.rank_of(s + 1), s, m))
            }
            _ if a.is_input_grad() && s > 0 => {
                Some(self.transfer(true, here, self.rank_of(s - 1), s, m))
            }
            _ => None,
        }
    }

    fn transfer(
        &self,
        gradient: bool,
        from: usize,
        to: usize,
        stage: usize,
        microbatch: usize,
    ) -> Transfer {
        Transfer {
            gradient,
            from_rank: from,
            to_rank: to,
            stage,
            microbatch,
        }
    }

    /// The most (stage, microbatch) pairs a rank holds at once between a forward and its last
    /// backward pass (B, or W when split): its activation memory in units of one stage's
    /// activations for one microbatch.
    pub fn peak_in_flight(&self, rank: usize) -> usize {
        self.peak(rank, |a| {
            matches!(a, Action::Backward { .. } | Action::BackwardWeight { .. })
        })
    }

    /// As `peak_in_flight`, counting a pair only until its input gradient (B or I): what remains
    /// until W is the part of the activations the weight gradient reads (each matmul's input).
    pub fn peak_until_input_grad(&self, rank: usize) -> usize {
        self.peak(rank, Action::is_input_grad)
    }

    fn peak(&self, rank: usize, frees: impl Fn(&Action) -> bool) -> usize {
        let (mut live, mut peak) = (0usize, 0usize);
        for a in &self.per_rank[rank] {
            if matches!(a, Action::Forward { .. }) {
                live += 1;
                peak = peak.max(live);
            } else if frees(a) {
                live = live.saturating_sub(1);
            }
        }
        peak
    }
}

/// One row per rank, actions in order: `F0 F1 B0 ...` (with the stage in front, `4F1`, when a
/// rank holds several).
impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (r, row) in self.per_rank.iter().enumerate() {
            let labels: Vec<String> = row.iter().map(|a| label(a, self.stages_per_rank)).collect();
            writeln!(f, "rank {r}: {}", labels.join(" "))?;
        }
        Ok(())
    }
}

/// `F3`, or `5F3` (stage 5) when ranks hold several stages.
pub(crate) fn label(a: &Action, stages_per_rank: usize) -> String {
    if stages_per_rank > 1 {
        format!("{}{}{}", a.stage(), a.letter(), a.microbatch())
    } else {
        format!("{}{}", a.letter(), a.microbatch())
    }
}

/// A bound on the actions a schedule is built with (pp 64 x v 8 x 2048 microbatches fits), so
/// that an absurd layout is an error rather than an allocation failure.
const MAX_ACTIONS: usize = 1 << 22;

/// The layout rules of PyTorch's schedules (the stage count of `pp * v` must fit a `usize`).
fn check_layout(kind: Kind, pp: usize, v: usize, m: usize) -> Result<()> {
    let bad = |msg: String| Err(Error::Config(format!("{} schedule: {msg}", kind.name())));
    if pp == 0 {
        return bad("pipeline_parallel_degree must be at least 1".into());
    }
    if m < pp {
        return bad(format!(
            "{m} microbatches for {pp} pipeline ranks: needs at least one microbatch per \
             rank to fill the pipeline"
        ));
    }
    if kind.interleaved() {
        if v < 2 {
            return bad(format!(
                "{v} stage per rank: interleaved schedules need at least 2 (else use 1F1B)"
            ));
        }
        if !m.is_multiple_of(pp) {
            return bad(format!(
                "{m} microbatches is not a multiple of the {pp} pipeline ranks"
            ));
        }
    } else if v != 1 {
        return bad(format!(
            "{v} stages per rank: this schedule places one stage per rank (use \
             Interleaved1F1B or InterleavedZeroBubble for more)"
        ));
    }
    if pp.checked_mul(v).is_none() {
        return bad(format!("pp {pp} x {v} stages per rank is too many stages"));
    }
    Ok(())
}

fn gpipe(rank: usize, m: usize) -> Vec<Action> {
    let f = (0..m).map(|microbatch| Action::Forward {
        stage: rank,
        microbatch,
    });
    let b = (0..m).map(|microbatch| Action::Backward {
        stage: rank,
        microbatch,
    });
    f.chain(b).collect()
}

/// Rank r runs `pp - r - 1` forwards ahead (the microbatches still in the ranks after it when
/// its first backward can arrive), then alternates one forward and one backward, then drains.
/// It so never holds more than `pp - r` microbatches' activations.
fn one_f_one_b(rank: usize, pp: usize, m: usize) -> Vec<Action> {
    let warmup = (pp - rank - 1).min(m);
    let fwd = |microbatch| Action::Forward {
        stage: rank,
        microbatch,
    };
    let bwd = |microbatch| Action::Backward {
        stage: rank,
        microbatch,
    };
    let mut out: Vec<Action> = (0..warmup).map(fwd).collect();
    for i in 0..m - warmup {
        out.push(fwd(warmup + i));
        out.push(bwd(i));
    }
    out.extend((m - warmup..m).map(bwd));
    out
}

/// Depth-first interleaving: a rank's k-th forward runs local stage `(k / pp) % v` on
/// microbatch `(k / (pp v)) pp + k % pp`, i.e. rounds of `pp` microbatches through one local
/// stage before the next; backwards walk the local stages in reverse the same way. The warm-up
/// covers the forwards of the earlier local stages plus the round trip to the last rank: two
/// slots per hop for 1F1B (a forward and a backward), one for zero-bubble, whose backward is
/// split in halves. Zero-bubble runs I in place of B and keeps up to `rank` weight gradients
/// pending, running the oldest after each I once more are pending, the rest at the end: the
/// ranks that wait longest for their first gradient fill that wait later with W's.
fn interleaved(rank: usize, pp: usize, v: usize, m: usize, zero_bubble: bool) -> Vec<Action> {
    let total = v * m;
    let hops = pp - 1 - rank;
    let warmup = ((v - 1) * pp + if zero_bubble { hops } else { 2 * hops }).min(total);
    let microbatch = |k: usize| (k / (pp * v)) * pp + k % pp;
    let fwd = |k: usize| Action::Forward {
        stage: ((k / pp) % v) * pp + rank,
        microbatch: microbatch(k),
    };
    let bwd_stage = |k: usize| (v - 1 - (k / pp) % v) * pp + rank;
    let mut out: Vec<Action> = (0..warmup).map(fwd).collect();
    let mut pending: VecDeque<(usize, usize)> = VecDeque::new();
    for k in 0..total {
        if warmup + k < total {
            out.push(fwd(warmup + k));
        }
        let (stage, mb) = (bwd_stage(k), microbatch(k));
        if !zero_bubble {
            out.push(Action::Backward {
                stage,
                microbatch: mb,
            });
            continue;
        }
        out.push(Action::BackwardInput {
            stage,
            microbatch: mb,
        });
        pending.push_back((stage, mb));
        if pending.len() > rank {
            let (stage, microbatch) = pending.pop_front().unwrap_or((stage, mb));
            out.push(Action::BackwardWeight { stage, microbatch });
        }
    }
    out.extend(
        pending
            .into_iter()
            .map(|(stage, microbatch)| Action::BackwardWeight { stage, microbatch }),
    );
    out
}
