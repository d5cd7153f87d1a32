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

#[cfg(test)]
mod tests {
    use super::*;

    fn factors(s: &LrSchedule, n: u64) -> Vec<f64> {
        (0..n).map(|i| s.factor(i)).collect()
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() < 1e-12,
                "step {i}: got {g}, want {w} (all: {got:?})"
            );
        }
    }

    #[test]
    fn warmup_then_linear_decay_over_the_rest() {
        // 10 steps, warmup 2: (0+1)/2, (1+1)/2; decay 8 steps after one virtual stable step.
        let s = LrSchedule::new(0.1, 10, 2, None, DecayType::Linear, 0.0);
        assert_eq!((s.warmup_steps, s.stable_steps, s.decay_steps), (2, 1, 8));
        let want = [
            0.5,
            1.0,
            1.0,
            7.0 / 8.0,
            6.0 / 8.0,
            5.0 / 8.0,
            0.5,
            3.0 / 8.0,
            0.25,
            1.0 / 8.0,
        ];
        assert_close(&factors(&s, 10), &want);
        // lr_at is 1-based: step 1 uses factor(0).
        assert_eq!(s.lr_at(1), (0.1f64 * 0.5) as f32);
        assert_eq!(s.lr_at(10), (0.1f64 / 8.0) as f32);
        assert_eq!(s.lr_at(0), s.lr_at(1));
        assert!(s.warnings.is_empty());
    }

    #[test]
    fn warmup_stable_decay() {
        // decay_ratio 0.5 of 10 steps = 5 decay steps; stable = 10 + 1 - 2 - 5 = 4.
        let s = LrSchedule::new(1.0, 10, 2, Some(0.5), DecayType::Linear, 0.0);
        assert_eq!((s.warmup_steps, s.stable_steps, s.decay_steps), (2, 4, 5));
        let want = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2];
        assert_close(&factors(&s, 10), &want);
    }

    #[test]
    fn cosine_to_a_floor() {
        // No warmup, decay over all 10 steps, floor 0.1: 0.1 + 0.9 * (1 + cos(pi * p)) / 2.
        let s = LrSchedule::new(1.0, 10, 0, None, DecayType::Cosine, 0.1);
        let f = factors(&s, 10);
        assert_eq!(f[0], 1.0);
        // p = 0.1: cos(0.1 pi) = 0.9510565162951535
        assert!((f[1] - (0.1 + 0.9 * 0.5 * (1.0 + 0.951_056_516_295_153_5))).abs() < 1e-12);
        // p = 0.9: cos(0.9 pi) = -0.9510565162951535 -> 0.1 + 0.9 * 0.02447174185242324
        assert!((f[9] - 0.122_024_567_667_180_9).abs() < 1e-12, "{}", f[9]);
        assert!(f.windows(2).all(|w| w[1] < w[0] || w[1] == 1.0));
    }

    #[test]
    fn sqrt_decay() {
        // 5 steps, warmup 1, decay 4, stable 1: progress 1/4, 2/4, 3/4 -> 1 - sqrt(p).
        let s = LrSchedule::new(1.0, 5, 1, None, DecayType::Sqrt, 0.0);
        let want = [1.0, 1.0, 0.5, 1.0 - 0.5f64.sqrt(), 1.0 - 0.75f64.sqrt()];
        assert_close(&factors(&s, 5), &want);
    }

    #[test]
    fn decay_steps_round_half_to_even_like_python() {
        // 10 * 0.25 = 2.5 -> Python round() gives 2 (away-from-zero would give 3).
        let s = LrSchedule::new(1.0, 10, 0, Some(0.25), DecayType::Linear, 0.0);
        assert_eq!((s.stable_steps, s.decay_steps), (9, 2));
        assert_eq!(s.factor(8), 1.0);
        assert_eq!(s.factor(9), 0.5);
    }

    #[test]
    fn too_long_warmup_and_decay_are_clamped_with_a_warning() {
        let s = LrSchedule::new(1.0, 10, 20, None, DecayType::Linear, 0.0);
        assert_eq!((s.warmup_steps, s.stable_steps, s.decay_steps), (10, 1, 0));
        assert_close(
            &factors(&s, 10),
            &(1..=10).map(|i| i as f64 / 10.0).collect::<Vec<_>>(),
        );
        assert_eq!(s.warnings.len(), 1);
        let s = LrSchedule::new(1.0, 10, 6, Some(0.5), DecayType::Linear, 0.0);
        assert_eq!((s.warmup_steps, s.stable_steps, s.decay_steps), (6, 1, 4));
        assert_eq!(s.warnings.len(), 1);
        assert!(s.warnings[0].contains("decay (5)"), "{}", s.warnings[0]);
    }

    #[test]
    fn past_the_schedule_end_holds_the_floor() {
        let s = LrSchedule::new(1.0, 4, 0, None, DecayType::Sqrt, 0.2);
        assert_eq!(s.factor(50), 0.2);
        let lin = LrSchedule::new(1.0, 4, 0, None, DecayType::Linear, 0.0);
        assert_eq!(lin.factor(50), 0.0);
    }

    #[test]
    fn from_config_uses_total_steps_override() {
        let cfg = JobConfig::from_toml_str(
            "[optimizer]\nlr = 0.5\n[lr_scheduler]\nwarmup_steps = 2\ntotal_steps = 10\n\
             [training]\nsteps = 4\n",
            "t",
            &[],
        )
        .unwrap();
        let s = LrSchedule::from_config(&cfg).unwrap();
        assert_eq!((s.warmup_steps, s.stable_steps, s.decay_steps), (2, 1, 8));
        assert_eq!(s.lr_at(4), (0.5 * 7.0 / 8.0) as f32);
    }
}
