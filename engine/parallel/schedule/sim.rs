//! Timing a schedule: every rank runs its actions in the listed order, each as soon as the
//! rank is free and its inputs have arrived; sends do not block the sender. The result is the
//! per-action start/end, the makespan and the bubble (idle share of all ranks' time).

use super::{label, Action, Schedule};
use crate::error::{Error, Result};
use std::collections::HashMap;

/// One action's place on the timeline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slot {
    pub action: Action,
    pub start: f64,
    pub end: f64,
}

/// A simulated step.
#[derive(Clone, Debug, PartialEq)]
pub struct Timeline {
    pub stages_per_rank: usize,
    /// Each rank's slots, in execution order.
    pub per_rank: Vec<Vec<Slot>>,
    pub makespan: f64,
    /// idle / (ranks x makespan).
    pub bubble: f64,
}

/// What an action waits for: the forward of the stage before; for a backward (B or I), the
/// stage's own forward and the input gradient of the stage after; for W, its own I.
fn deps(s: &Schedule, a: &Action) -> Vec<Action> {
    let (stage, microbatch) = (a.stage(), a.microbatch());
    let last = stage + 1 == s.stages();
    // The gradient of this stage's output comes from the next stage's B or I, whichever the
    // schedule runs (`check` guarantees exactly one).
    let next_grad = |stage| {
        let b = Action::Backward { stage, microbatch };
        let i = Action::BackwardInput { stage, microbatch };
        if s.per_rank[s.rank_of(stage)].contains(&i) {
            i
        } else {
            b
        }
    };
    match *a {
        Action::Forward { .. } if stage == 0 => vec![],
        Action::Forward { .. } => vec![Action::Forward {
            stage: stage - 1,
            microbatch,
        }],
        Action::Backward { .. } | Action::BackwardInput { .. } => {
            let mut d = vec![Action::Forward { stage, microbatch }];
            if !last {
                d.push(next_grad(stage + 1));
            }
            d
        }
        Action::BackwardWeight { .. } => vec![Action::BackwardInput { stage, microbatch }],
    }
}

impl Schedule {
    /// Times the schedule with `cost(action)` seconds (or any unit) per action and `p2p` for
    /// every transfer between ranks. An order that can never finish (an action waiting on one
    /// that its rank, or a rank it waits on, only runs later) is an error naming the stuck
    /// actions.
    pub fn simulate(&self, cost: &dyn Fn(&Action) -> f64, p2p: f64) -> Result<Timeline> {
        self.check()?;
        if !(p2p.is_finite() && p2p >= 0.0) {
            return Err(Error::Other(format!(
                "pipeline simulation: p2p latency {p2p}"
            )));
        }
        let deps: HashMap<Action, Vec<Action>> = self
            .per_rank
            .iter()
            .flatten()
            .map(|a| (*a, deps(self, a)))
            .collect();
        let mut end: HashMap<Action, f64> = HashMap::new();
        let mut per_rank: Vec<Vec<Slot>> = vec![Vec::new(); self.pp];
        let mut free = vec![0.0f64; self.pp];
        let mut next = vec![0usize; self.pp];
        // Each pass over the ranks runs every action whose inputs are done; a pass that runs
        // nothing while actions remain is a deadlock.
        loop {
            let mut progressed = false;
            for r in 0..self.pp {
                while let Some(a) = self.per_rank[r].get(next[r]) {
                    let mut ready = free[r];
                    let mut waiting = false;
                    for d in &deps[a] {
                        match end.get(d) {
                            Some(&t) => {
                                let hop = if self.rank_of(d.stage()) == r {
                                    0.0
                                } else {
                                    p2p
                                };
                                ready = ready.max(t + hop);
                            }
                            None => waiting = true,
                        }
                    }
                    if waiting {
                        break;
                    }
                    let c = cost(a);
                    if !(c.is_finite() && c >= 0.0) {
                        return Err(Error::Other(format!(
                            "pipeline simulation: cost {c} for {a}"
                        )));
                    }
                    end.insert(*a, ready + c);
                    per_rank[r].push(Slot {
                        action: *a,
                        start: ready,
                        end: ready + c,
                    });
                    free[r] = ready + c;
                    next[r] += 1;
                    progressed = true;
                }
            }
            if next
                .iter()
                .zip(&self.per_rank)
                .all(|(n, row)| *n == row.len())
            {
                break;
            }
            if !progressed {
                let stuck: Vec<String> = (0..self.pp)
                    .filter_map(|r| {
                        let a = self.per_rank[r].get(next[r])?;
                        let missing: Vec<String> = deps[a]
                            .iter()
                            .filter(|d| !end.contains_key(d))
                            .map(|d| d.to_string())
                            .collect();
                        Some(format!("rank {r}: {a} waits for {}", missing.join(", ")))
                    })
                    .collect();
                return Err(Error::Other(format!(
                    "pipeline schedule deadlocks: {}",
                    stuck.join("; ")
                )));
            }
        }
        let makespan = free.iter().copied().fold(0.0, f64::max);
        let busy: f64 = per_rank.iter().flatten().map(|s| s.end - s.start).sum();
        let bubble = if makespan > 0.0 {
            1.0 - busy / (self.pp as f64 * makespan)
        } else {
            0.0
        };
        Ok(Timeline {
            stages_per_rank: self.stages_per_rank,
            per_rank,
            makespan,
            bubble,
        })
    }
}

impl Timeline {
    /// One row per rank, one cell per `unit` of time: an action's label at its start, `-` while
    /// it runs on, `.` where the rank idles.
    pub fn ascii(&self, unit: f64) -> String {
        let cells = (self.makespan / unit).round() as usize;
        let width = self
            .per_rank
            .iter()
            .flatten()
            .map(|s| label(&s.action, self.stages_per_rank).len())
            .max()
            .unwrap_or(1)
            + 1;
        let mut out = String::new();
        for (r, row) in self.per_rank.iter().enumerate() {
            let mut line: Vec<String> = vec![format!("{:<w$}", ".", w = width); cells];
            for s in row {
                let (a, b) = (
                    (s.start / unit).round() as usize,
                    (s.end / unit).round() as usize,
                );
                for (i, cell) in line.iter_mut().enumerate().take(b.max(a + 1)).skip(a) {
                    *cell = if i == a {
                        format!("{:<w$}", label(&s.action, self.stages_per_rank), w = width)
                    } else {
                        format!("{:-<w$} ", "", w = width - 1)
                    };
                }
            }
            out.push_str(format!("rank {r} | {}", line.concat()).trim_end());
            out.push('\n');
        }
        out
    }
}
