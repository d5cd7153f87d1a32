//! Validation during training (torchtitan's `components/validate.py`): after the first step and
//! every `validation.freq` steps, the mean next-token loss of the current weights on a held-out
//! dataset, forward only. Each run starts from the beginning of that dataset, so the numbers of
//! different steps are over the same tokens and compare directly.
//!
//! The held-out data: `validation.dataset_path`, or `validation.dataset`; the built-in synthetic
//! corpus is drawn with another seed than training's (same grammar and tasks, other documents).
//! `validation.steps = -1` means one pass over the whole set, which needs a finite one (a file).
//!
//! Data parallel: rank r of n evaluates batches r, r + n, ... of the same sequence of batches
//! (the loader's data-parallel split), and the loss sums and token counts are all-reduced, so
//! every layout reports the one-rank number n times faster. Every rank runs the same number of
//! forward passes (FSDP gathers in each); a rank past the last batch discards its result.
//!
//! Memory: the forward pass is traced and planned on the meta backend like the training step.
//! When its peak fits in the training arena (idle between steps) it runs there; otherwise it gets
//! an arena of its own, which the memory plan counts (`MemoryPlan::validation_activations`).

use super::config::JobConfig;
use crate::backend::{Backend, DeviceMem};
use crate::data::{build_loader, needs_download, Batch, DataConfig, DataLoader};
use crate::error::{Error, Result};
use crate::model::{Model, ModelArgs, ModelSpec};
use crate::params::ParamStore;
use crate::planner::Plan;
use crate::tape::{Placement, Tape};
use std::path::PathBuf;
use std::time::Instant;

/// Mixed into the training seed for the synthetic validation corpus: other documents, same kind.
pub const VALIDATION_SEED_SALT: u64 = 0x7661_6C69_6461_7465; // "validate"

/// One validation run's numbers (a line of metrics.jsonl).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct ValMetrics {
    pub step: u64,
    pub validation_loss: f64,
    pub validation_tokens: usize,
    pub validation_batches: usize,
    pub validation_time_s: f64,
}

impl ValMetrics {
    pub fn log_line(&self) -> String {
        format!(
            "validate step {:>5}  loss {:>8.4}  over {} tokens ({} batches, {:.2}s)",
            self.step,
            self.validation_loss,
            self.validation_tokens,
            self.validation_batches,
            self.validation_time_s
        )
    }
}

/// Arena bytes validation needs beyond the training arena: none when its forward pass fits there.
pub fn validation_arena_bytes(train_peak: usize, validation_peak: usize) -> usize {
    if validation_peak <= train_peak {
        0
    } else {
        validation_peak
    }
}

/// What a validation run evaluates on.
#[derive(Clone, Copy)]
pub struct ValRun<'a> {
    pub spec: &'a ModelSpec,
    pub model: &'a dyn Model,
    pub store: &'a ParamStore,
    pub be: &'a dyn Backend,
    /// The training step's arena, free while no step runs.
    pub train_arena: u64,
    /// Sums host values over the data-parallel ranks.
    pub all_reduce: &'a dyn Fn(&mut [f32]) -> Result<()>,
}

pub struct Validator {
    loader: DataLoader,
    /// The loader's position before its first batch: every run restarts there.
    start: serde_json::Value,
    batches: usize,
    /// This rank among the data-parallel ranks, and their number.
    dp: (usize, usize),
    freq: u64,
    plan: Plan,
    own_arena: Option<Box<dyn DeviceMem>>,
}

impl Validator {
    /// The validator of `cfg.validation` for a model of architecture `args` (whose vocabulary every
    /// validation id must fit), running the forward pass `plan` (from `trace_plan`), with
    /// `train_arena_bytes` of training arena to borrow, as data-parallel rank `dp.0` of `dp.1`.
    pub fn new(
        cfg: &JobConfig,
        args: &dyn ModelArgs,
        plan: Plan,
        tokenizer: Option<PathBuf>,
        be: &dyn Backend,
        train_arena_bytes: usize,
        dp: (usize, usize),
    ) -> Result<Validator> {
        let v = &cfg.validation;
        let (batch, seq) = (v.local_batch_size as usize, v.seq_len as usize);
        let seed = cfg.training.seed.unwrap_or(0).max(0) as u64 ^ VALIDATION_SEED_SALT;
        let dcfg = DataConfig {
            dataset: v.dataset.clone(),
            dataset_path: v
                .dataset_path
                .as_deref()
                .filter(|p| !p.trim().is_empty())
                .map(PathBuf::from),
            tokenizer,
            seq_len: seq,
            batch,
            seed,
            dp_rank: dp.0,
            dp_world: dp.1,
            token_dtype: None,
            vocab_size: Some(args.vocab_size()),
            progress: dp.0 == 0,
        };
        if dcfg.dataset_path.is_none() && needs_download(v.dataset.trim()) {
            return Err(Error::Data(format!(
                "validation.dataset = {:?} must be downloaded: titan reads local files only; set \
                 validation.dataset_path to .txt/.jsonl/.bin files, or use \"synthetic\" \
                 (held-out documents of the built-in corpus)",
                v.dataset
            )));
        }
        let loader = build_loader(&dcfg).map_err(|e| match e {
            Error::Data(m) => Error::Data(format!("validation dataset: {m}")),
            Error::Config(m) => Error::Config(format!("validation dataset: {m}")),
            other => other,
        })?;
        // A finite set is read once per run, as torchtitan's non-repeating validation loader:
        // all its full batches, or the first `steps` of them.
        let full_batches = match loader.stream_tokens() {
            Some(tokens) => {
                let n = (tokens / (batch * (seq + 1)) as u64) as usize;
                if n == 0 {
                    return Err(Error::Data(format!(
                        "validation dataset {} has {tokens} tokens, fewer than one batch of \
                         {batch} x (seq_len {seq} + 1)",
                        loader.name()
                    )));
                }
                Some(n)
            }
            None => None,
        };
        let batches = match (v.steps > 0, full_batches) {
            (true, Some(n)) => n.min(v.steps as usize),
            (true, None) => v.steps as usize,
            (false, Some(n)) => n,
            (false, None) => {
                return Err(Error::Config(format!(
                    "validation.steps = -1 (one pass over the whole set) needs a finite dataset, \
                     but {} is endless: set validation.steps to a number of batches",
                    loader.name()
                )))
            }
        };
        let own_arena = match validation_arena_bytes(train_arena_bytes, plan.peak) {
            0 => None,
            bytes => Some(be.alloc(bytes)?),
        };
        let start = loader.state();
        Ok(Validator {
            loader,
            start,
            batches,
            dp,
            freq: v.freq.max(1) as u64,
            plan,
            own_arena,
        })
    }

    /// torchtitan's cadence: after the first step, then every `freq` steps.
    pub fn should_run(&self, step: u64) -> bool {
        step == 1 || step.is_multiple_of(self.freq)
    }

    /// Batches each validation run reads.
    pub fn batches(&self) -> usize {
        self.batches
    }

    pub fn dataset_name(&self) -> &str {
        self.loader.name()
    }

    /// Bytes of the validator's own arena (0 when it borrows the training arena).
    pub fn own_bytes(&self) -> usize {
        self.own_arena.as_ref().map_or(0, |m| m.bytes())
    }

    /// Mean loss over the validation batches of the weights in `on.store`.
    pub fn run(&mut self, step: u64, on: &ValRun) -> Result<ValMetrics> {
        let ValRun {
            spec,
            model,
            store,
            be,
            train_arena,
            all_reduce,
        } = *on;
        let base = self.own_arena.as_ref().map_or(train_arena, |m| m.ptr());
        let mut loss_of = |b: &Batch, plan: &Plan| -> Result<Option<f64>> {
            let mut tape = Tape::new(be, store, Placement::Planned { base, plan });
            let inputs = tape.input_i32(&b.inputs, [b.batch, b.seq])?;
            let labels = tape.input_i32(&b.labels, [b.batch * b.seq])?;
            let loss = spec.loss_of(model, &mut tape, inputs, labels, 1.0)?;
            Ok(Some(tape.to_vec_f32(loss)?[0] as f64))
        };
        let reduce = self.dp.1 > 1;
        self.run_with(step, reduce, all_reduce, &mut loss_of)
    }

    /// As `run`, each batch's summed loss from `loss_of` (given the forward pass's plan); None
    /// from a pipeline rank without the last stage, which counts no tokens. `reduce`: sum the
    /// numbers over the world (`all_reduce`).
    pub(super) fn run_with(
        &mut self,
        step: u64,
        reduce: bool,
        all_reduce: &dyn Fn(&mut [f32]) -> Result<()>,
        loss_of: &mut dyn FnMut(&Batch, &Plan) -> Result<Option<f64>>,
    ) -> Result<ValMetrics> {
        let t0 = Instant::now();
        self.loader.restore(&self.start)?;
        let (mut total, mut tokens) = (0f64, 0usize);
        let (rank, ranks) = self.dp;
        for k in 0..self.batches.div_ceil(ranks) {
            let b = self.loader.next_batch()?;
            let sum = loss_of(&b, &self.plan)?;
            if let (Some(sum), true) = (sum, k * ranks + rank < self.batches) {
                total += sum;
                tokens += b.labels.iter().filter(|&&l| l >= 0).count();
            }
        }
        if reduce {
            // Token counts as 16-bit halves: exact in f32 for any real world size.
            let mut v = [
                total as f32,
                (tokens >> 16) as f32,
                (tokens & 0xffff) as f32,
            ];
            all_reduce(&mut v)?;
            total = v[0] as f64;
            tokens = ((v[1] as usize) << 16) + v[2] as usize;
        }
        Ok(ValMetrics {
            step,
            validation_loss: total / tokens.max(1) as f64,
            validation_tokens: tokens,
            validation_batches: self.batches,
            validation_time_s: t0.elapsed().as_secs_f64(),
        })
    }
}
