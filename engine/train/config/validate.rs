//! Validation of a loaded `JobConfig` and resolution of parallel degrees for a world size.

use super::{Degrees, JobConfig, Parallelism, PIPELINE_SCHEDULES};
use crate::error::{Error, Result};

impl JobConfig {
    /// Cross-field checks that need no world size.
    pub fn validate(&self) -> Result<()> {
        let t = &self.training;
        positive("training.steps", t.steps)?;
        positive("training.seq_len", t.seq_len)?;
        positive("training.local_batch_size", t.local_batch_size)?;
        if t.global_batch_size != -1 && t.global_batch_size <= 0 {
            return bad(
                "training.global_batch_size",
                t.global_batch_size,
                "a positive integer or -1",
            );
        }
        if !(t.max_norm.is_finite() && t.max_norm > 0.0) {
            return bad("training.max_norm", t.max_norm, "a positive number");
        }
        one_of("training.dtype", &t.dtype, &["float32", "bfloat16"])?;
        one_of(
            "training.mixed_precision_param",
            &t.mixed_precision_param,
            &["bfloat16", "float32"],
        )?;
        one_of(
            "training.mixed_precision_reduce",
            &t.mixed_precision_reduce,
            &["float32", "bfloat16"],
        )?;
        one_of("training.device", &t.device, &["auto", "cpu", "cuda"])?;
        if let Some(seed) = t.seed {
            if seed < 0 {
                return bad("training.seed", seed, "a non-negative integer");
            }
        }

        let o = &self.optimizer;
        one_of("optimizer.name", &o.name, &["AdamW"])?;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad("optimizer.lr", o.lr, "a positive number");
        }
        for (k, b) in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(k, b, "in [0, 1)");
            }
        }
        if !(o.eps.is_finite() && o.eps > 0.0) {
            return bad("optimizer.eps", o.eps, "a positive number");
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return bad(
                "optimizer.weight_decay",
                o.weight_decay,
                "a non-negative number",
            );
        }

        let l = &self.lr_scheduler;
        if l.warmup_steps < 0 {
            return bad(
                "lr_scheduler.warmup_steps",
                l.warmup_steps,
                "a non-negative integer",
            );
        }
        if let Some(n) = l.total_steps {
            positive("lr_scheduler.total_steps", n)?;
        }
        if let Some(r) = l.decay_ratio {
            if !(0.0..=1.0).contains(&r) {
                return bad("lr_scheduler.decay_ratio", r, "in [0, 1]");
            }
        }
        one_of(
            "lr_scheduler.decay_type",
            &l.decay_type,
            &["linear", "sqrt", "cosine"],
        )?;
        if !(0.0..=1.0).contains(&l.min_lr_factor) {
            return bad("lr_scheduler.min_lr_factor", l.min_lr_factor, "in [0, 1]");
        }

        let ac = &self.activation_checkpoint;
        one_of(
            "activation_checkpoint.mode",
            &ac.mode,
            &["none", "selective", "full"],
        )?;
        if ac.mode == "selective" && ac.selective_ac_option != "op" {
            match ac.selective_ac_option.parse::<i64>() {
                Ok(n) if n > 0 => {}
                _ => {
                    return bad(
                        "activation_checkpoint.selective_ac_option",
                        &ac.selective_ac_option,
                        "a positive integer or \"op\"",
                    )
                }
            }
        }

        let p = &self.parallelism;
        for (k, v) in [
            (
                "parallelism.data_parallel_replicate_degree",
                p.data_parallel_replicate_degree,
            ),
            (
                "parallelism.tensor_parallel_degree",
                p.tensor_parallel_degree,
            ),
            (
                "parallelism.pipeline_parallel_degree",
                p.pipeline_parallel_degree,
            ),
            (
                "parallelism.context_parallel_degree",
                p.context_parallel_degree,
            ),
            (
                "parallelism.expert_parallel_degree",
                p.expert_parallel_degree,
            ),
            (
                "parallelism.expert_tensor_parallel_degree",
                p.expert_tensor_parallel_degree,
            ),
            (
                "parallelism.pipeline_parallel_microbatch_size",
                p.pipeline_parallel_microbatch_size,
            ),
        ] {
            positive(k, v)?;
        }
        if p.data_parallel_shard_degree != -1 && p.data_parallel_shard_degree <= 0 {
            return bad(
                "parallelism.data_parallel_shard_degree",
                p.data_parallel_shard_degree,
                "a positive integer or -1",
            );
        }
        one_of(
            "parallelism.fsdp_reshard_after_forward",
            &p.fsdp_reshard_after_forward,
            &["default", "always", "never"],
        )?;
        if canonical_schedule(&p.pipeline_parallel_schedule).is_none() {
            let s = &p.pipeline_parallel_schedule;
            one_of(
                "parallelism.pipeline_parallel_schedule",
                s,
                PIPELINE_SCHEDULES,
            )?;
        }
        if let Some(n) = p.pipeline_parallel_layers_per_stage {
            positive("parallelism.pipeline_parallel_layers_per_stage", n)?;
        }
        if t.local_batch_size % p.pipeline_parallel_microbatch_size != 0 {
            return bad(
                "training.local_batch_size",
                t.local_batch_size,
                &format!(
                    "a multiple of parallelism.pipeline_parallel_microbatch_size ({})",
                    p.pipeline_parallel_microbatch_size
                ),
            );
        }
        if p.data_parallel_shard_degree > 0 {
            let (rep, shard) = (
                p.data_parallel_replicate_degree,
                p.data_parallel_shard_degree,
            );
            let dp = rep.checked_mul(shard).ok_or_else(|| {
                Error::Config(format!(
                    "parallelism.data_parallel_replicate_degree x data_parallel_shard_degree = \
                     {rep} x {shard} is too large"
                ))
            })?;
            self.check_global_batch(dp as usize)?;
        }

        let c = &self.checkpoint;
        positive("checkpoint.interval", c.interval)?;
        if c.keep_latest_k < 0 {
            return bad(
                "checkpoint.keep_latest_k",
                c.keep_latest_k,
                "0 (keep all) or more",
            );
        }
        if c.load_step < -1 {
            return bad("checkpoint.load_step", c.load_step, "a step or -1 (latest)");
        }
        one_of(
            "checkpoint.export_dtype",
            &c.export_dtype,
            &["float16", "bfloat16", "float32"],
        )?;
        if c.initial_load_in_hf && !c.initial_load_model_only {
            return Err(Error::Config(
                "checkpoint.initial_load_model_only = false loads a whole titan checkpoint, but \
                 checkpoint.initial_load_in_hf names a Hugging Face folder, which holds weights only"
                    .into(),
            ));
        }
        if c.create_seed_checkpoint && !c.enable {
            return Err(Error::Config(
                "checkpoint.create_seed_checkpoint writes step-0 of the checkpoint folder: it needs \
                 checkpoint.enable"
                    .into(),
            ));
        }
        for e in &c.exclude_from_loading {
            one_of(
                "checkpoint.exclude_from_loading",
                e,
                &[
                    "model",
                    "optimizer",
                    "lr_scheduler",
                    "dataloader",
                    "train_state",
                ],
            )?;
        }

        positive("metrics.log_freq", self.metrics.log_freq)?;
        let v = &self.validation;
        positive("validation.freq", v.freq)?;
        positive("validation.local_batch_size", v.local_batch_size)?;
        positive("validation.seq_len", v.seq_len)?;
        if v.steps != -1 && v.steps <= 0 {
            return bad("validation.steps", v.steps, "a positive integer or -1");
        }
        // The model's rotary tables are built for training.seq_len (as torchtitan's).
        if v.enable && v.seq_len > t.seq_len {
            return Err(Error::Config(format!(
                "validation.seq_len = {} is longer than training.seq_len = {}: the model is built \
                 for sequences up to training.seq_len",
                v.seq_len, t.seq_len
            )));
        }
        positive("comm.init_timeout_seconds", self.comm.init_timeout_seconds)?;
        positive(
            "comm.train_timeout_seconds",
            self.comm.train_timeout_seconds,
        )?;
        Ok(())
    }

    /// Micro-batches per optimizer step for a data-parallel degree (torchtitan's rule:
    /// global = local * dp * accumulation).
    pub fn gradient_accumulation_steps(&self, dp: usize) -> Result<usize> {
        self.check_global_batch(dp)?;
        Ok(match self.training.global_batch_size {
            -1 => 1,
            // Checked above: 0 < local x dp <= g, so the product fits.
            g => g as usize / (self.training.local_batch_size as usize * dp),
        })
    }

    fn check_global_batch(&self, dp: usize) -> Result<()> {
        let g = self.training.global_batch_size;
        // In i128: local x dp may pass i64 (huge degrees), and wrap to 0 there.
        let per_step = self.training.local_batch_size as i128 * dp as i128;
        if g != -1 && (g <= 0 || per_step <= 0 || g as i128 % per_step != 0) {
            return Err(Error::Config(format!(
                "training.global_batch_size = {g} must be a multiple of local_batch_size ({}) x data-parallel degree ({dp}) = {per_step}",
                self.training.local_batch_size
            )));
        }
        Ok(())
    }
}

impl Parallelism {
    /// Resolves the degrees for `world_size` ranks, torchtitan's way: a shard degree of -1 takes
    /// the ranks left after replicate x cp x tp x pp; the product must equal the world; EP
    /// borrows its ranks from dp_shard x cp (x tp when expert TP is 1).
    pub fn resolve(&self, world_size: usize) -> Result<Degrees> {
        let d = |v: i64| v.max(1) as usize;
        let (rep, cp, tp, pp) = (
            d(self.data_parallel_replicate_degree),
            d(self.context_parallel_degree),
            d(self.tensor_parallel_degree),
            d(self.pipeline_parallel_degree),
        );
        // Checked: degrees up to i64::MAX would wrap, and a wrapped product can equal the world.
        let too_large = || {
            Error::Config(format!(
                "parallel degrees dp_replicate {rep} x cp {cp} x tp {tp} x pp {pp} multiply past \
                 the world size {world_size}"
            ))
        };
        let others = [rep, cp, tp, pp]
            .iter()
            .try_fold(1usize, |a, &x| a.checked_mul(x))
            .ok_or_else(too_large)?;
        let shard = if self.data_parallel_shard_degree == -1 {
            if !world_size.is_multiple_of(others) {
                return Err(Error::Config(format!(
                    "world size {world_size} is not divisible by data_parallel_replicate x context x tensor x pipeline degrees = {others}"
                )));
            }
            world_size / others
        } else {
            d(self.data_parallel_shard_degree)
        };
        let all = shard.checked_mul(others).ok_or_else(too_large)?;
        if all != world_size {
            return Err(Error::Config(format!(
                "parallel degrees multiply to {all} (dp_replicate {rep} x dp_shard {shard} x cp {cp} x tp {tp} x pp {pp}) but the world size is {world_size}"
            )));
        }
        let (ep, etp) = (
            d(self.expert_parallel_degree),
            d(self.expert_tensor_parallel_degree),
        );
        if etp != 1 && etp != tp {
            return Err(Error::Config(format!(
                "parallelism.expert_tensor_parallel_degree = {etp} must be 1 or equal tensor_parallel_degree ({tp})"
            )));
        }
        let borrow = shard * cp * if etp == 1 { tp } else { 1 };
        if ep > 1 && borrow % ep != 0 {
            return Err(Error::Config(format!(
                "parallelism.expert_parallel_degree = {ep} must divide dp_shard x cp{} = {borrow}",
                if etp == 1 { " x tp" } else { "" }
            )));
        }
        Ok(Degrees {
            dp_replicate: rep,
            dp_shard: shard,
            cp,
            tp,
            pp,
            ep,
            etp,
        })
    }
}

pub(super) fn canonical_schedule(name: &str) -> Option<&'static str> {
    PIPELINE_SCHEDULES
        .iter()
        .copied()
        .find(|s| s.eq_ignore_ascii_case(name))
}

fn positive(key: &str, v: i64) -> Result<()> {
    if v <= 0 {
        return bad(key, v, "a positive integer");
    }
    Ok(())
}

fn one_of(key: &str, v: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&v) {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{key} = \"{v}\" is not supported (expected one of: {})",
        allowed.join(", ")
    )))
}

fn bad(key: &str, v: impl std::fmt::Display, want: &str) -> Result<()> {
    Err(Error::Config(format!("{key} = {v} must be {want}")))
}
