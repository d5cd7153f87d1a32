//! torchtitan's `linear_warmup_stable_decay` LR schedule, reproduced exactly (including its
//! integer rounding, clamping and the extra "virtual" stable step that keeps the last step's LR
//! above min_lr_factor * lr).
//!
//! Step numbering: torchtitan's lambda is evaluated at `current_step` = 0 for the first optimizer
//! step (LambdaLR starts at epoch 0 and `scheduler.step()` runs after each `optimizer.step()`).
//! `factor(current_step)` is that lambda; `lr_at(step)` takes titan's 1-based training step (the
//! number in the log line) and returns the LR that step's update uses: `lr * factor(step - 1)`.

use super::config::JobConfig;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecayType {
    Linear,
    Sqrt,
    Cosine,
}

impl DecayType {
    pub fn parse(s: &str) -> Result<DecayType> {
        match s {
            "linear" => Ok(DecayType::Linear),
            "sqrt" => Ok(DecayType::Sqrt),
            "cosine" => Ok(DecayType::Cosine),
            _ => Err(Error::Config(format!(
                "lr_scheduler.decay_type = \"{s}\" is not supported (expected linear, sqrt or cosine)"
            ))),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub stable_steps: u64,
    pub decay_steps: u64,
    pub decay_type: DecayType,
    pub min_lr_factor: f64,
    /// torchtitan's warnings when warmup/decay had to be shortened to fit (print them once).
    pub warnings: Vec<String>,
}

impl LrSchedule {
    /// `total_steps` is the schedule length (lr_scheduler.total_steps, else training.steps).
    pub fn new(
        base_lr: f64,
        total_steps: u64,
        warmup_steps: u64,
        decay_ratio: Option<f64>,
        decay_type: DecayType,
        min_lr_factor: f64,
    ) -> LrSchedule {
        let mut warnings = Vec::new();
        let mut warmup = warmup_steps;
        if warmup > total_steps {
            warnings.push(format!(
                "lr_scheduler: warmup steps ({warmup}) exceed total steps ({total_steps}); using {total_steps}"
            ));
            warmup = total_steps;
        }
        let decay = match decay_ratio {
            Some(r) => {
                // Python's round(): halves go to the even neighbour.
                let d = (total_steps as f64 * r).round_ties_even().max(0.0) as u64;
                if warmup + d > total_steps {
                    let fit = total_steps - warmup;
                    warnings.push(format!(
                        "lr_scheduler: warmup ({warmup}) + decay ({d}) steps exceed total steps ({total_steps}); decaying over {fit}"
                    ));
                    fit
                } else {
                    d
                }
            }
            None => total_steps - warmup,
        };
        // One virtual extra step so that the last real step does not reach the floor.
        let stable = total_steps + 1 - warmup - decay;
        LrSchedule {
            base_lr,
            warmup_steps: warmup,
            stable_steps: stable,
            decay_steps: decay,
            decay_type,
            min_lr_factor,
            warnings,
        }
    }

    pub fn from_config(cfg: &JobConfig) -> Result<LrSchedule> {
        let l = &cfg.lr_scheduler;
        Ok(LrSchedule::new(
            cfg.optimizer.lr,
            cfg.schedule_steps(),
            l.warmup_steps.max(0) as u64,
            l.decay_ratio,
            DecayType::parse(&l.decay_type)?,
            l.min_lr_factor,
        ))
    }

    /// The multiplier torchtitan's LambdaLR applies at 0-based `current_step`.
    pub fn factor(&self, current_step: u64) -> f64 {
        let warmup_stable = self.warmup_steps + self.stable_steps;
        if current_step < self.warmup_steps {
            (current_step + 1) as f64 / self.warmup_steps as f64
        } else if current_step < warmup_stable || self.decay_steps == 0 {
            // decay_steps == 0 cannot reach here in torchtitan (it asserts); stay flat instead.
            1.0
        } else {
            // Clamped: past the schedule's end (training.steps > lr_scheduler.total_steps)
            // torchtitan's curve would go negative (linear) or NaN (sqrt); titan holds the floor.
            let progress =
                ((current_step + 1 - warmup_stable) as f64 / self.decay_steps as f64).min(1.0);
            let curve = match self.decay_type {
                DecayType::Linear => 1.0 - progress,
                DecayType::Sqrt => 1.0 - progress.sqrt(),
                DecayType::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            };
            self.min_lr_factor + (1.0 - self.min_lr_factor) * curve
        }
    }

    /// The LR used by the update of 1-based training step `step` (step 0 is treated as 1).
    pub fn lr_at(&self, step: u64) -> f32 {
        (self.base_lr * self.factor(step.saturating_sub(1))) as f32
    }
}
