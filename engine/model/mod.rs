//! The model protocol: how the engine sees a model (torchtitan's `protocols/train_spec.py`).
//!
//! A model folder (models/<name>/, a crate above this one) registers one [`ModelSpec`]: its
//! flavors, how to read its architecture from a flavor, a manifest or a Hugging Face
//! `config.json` (and write it back), how to build it, how to parallelize it, how to split it
//! into pipeline stages, its loss and its state-dict adapter. The trainer, checkpoints, HF interop
//! and the CLI use only these fields and the two traits below; nothing in the engine names a
//! model, and the crate boundary makes the compiler refuse an engine-to-model import.

pub mod hf_config;
pub mod init;
pub mod loss;
pub mod registry;
pub mod resolve;
pub mod state_dict;

pub use loss::{cross_entropy_loss, LossFn, IGNORE_INDEX};
pub use registry::Registry;
pub use state_dict::StateDictAdapter;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::parallel::pipeline::{SplitSpec, Stage};
use crate::params::{ParamId, ParamSpec, ParamStore, ParamStoreBuilder};
use crate::tape::{Tape, Tensor};
use crate::train::config::JobConfig;
use serde_json::Value;
use std::any::Any;
use std::path::Path;

/// Every architecture hyper-parameter of one model (torchtitan's `BaseModelArgs`). Each model
/// folder has its own `Config` struct implementing this.
pub trait ModelArgs: Any + std::fmt::Debug + Send + Sync {
    /// torchtitan's `update_from_config`: the run's sequence length (the rotary tables cover it)
    /// and, when given, the tokenizer's vocabulary. Validates the result.
    fn update_from_config(&mut self, seq_len: usize, vocab: Option<usize>) -> Result<()>;
    fn vocab_size(&self) -> usize;
    fn n_layers(&self) -> usize;
    /// Longest sequence the built model accepts (set by `update_from_config`).
    fn max_seq_len(&self) -> usize;
    /// (parameters, training FLOPs per token) in torchtitan's convention:
    /// 6 (N - N_embedding) + 12 layers heads head_dim seq.
    fn nparams_and_flops(&self, seq_len: usize) -> (usize, f64);
    /// llm.c's convention for the same quantity: 6 N + 6 L C T (N counts every parameter).
    fn flops_per_token_llmc(&self, seq_len: usize) -> f64;
    /// One line for logs and `titan list-models` ("dim 256 layers 6 heads 16/4 ...").
    fn summary(&self) -> String;
    /// The architecture as JSON (the manifest's `model_args`; `ModelSpec::args_from_json` reads
    /// it back).
    fn to_json(&self) -> Value;
    fn clone_box(&self) -> Box<dyn ModelArgs>;
    fn as_any(&self) -> &dyn Any;

    fn num_params(&self) -> usize {
        self.nparams_and_flops(self.max_seq_len()).0
    }
}

impl Clone for Box<dyn ModelArgs> {
    fn clone(&self) -> Self {
        self.clone_box()
    }
}

/// A built model: single-device math on the tape.
pub trait Model: Any + Send + Sync {
    fn args(&self) -> &dyn ModelArgs;
    /// Initial weights (recursive per module in the model folder), deterministic in `seed`.
    fn init_weights(&self, store: &ParamStore, be: &dyn Backend, seed: u64) -> Result<()>;
    /// tokens [batch, seq] (i32) -> logits [batch, seq, vocab].
    fn forward(&self, t: &mut Tape, tokens: Tensor) -> Result<Tensor>;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// What `ModelSpec::parallelize` is given: the job (activation checkpointing, the parallel
/// degrees), and where it declares the FSDP units (torchtitan's `fully_shard` per block; the
/// parameters not in any unit form the root unit). The engine shards by these units whenever
/// dp_shard > 1, so a model folder only names its blocks' parameters.
pub struct Parallelize<'a> {
    pub job: &'a JobConfig,
    units: std::cell::RefCell<Vec<Vec<ParamId>>>,
    tp_plan: std::cell::RefCell<Vec<(ParamId, usize)>>,
}

impl<'a> Parallelize<'a> {
    pub fn new(job: &'a JobConfig) -> Self {
        Parallelize {
            job,
            units: Default::default(),
            tp_plan: Default::default(),
        }
    }

    /// `parallelism.tensor_parallel_degree` (1: no tensor parallel).
    pub fn tp_degree(&self) -> usize {
        self.job.parallelism.tensor_parallel_degree.max(1) as usize
    }

    /// Column-parallel linears (torchtitan's `ColwiseParallel`): each weight `[out, in]` is
    /// split on its output features; the tape gathers the input (sequence parallel) or marks it
    /// replicated, and the output stays split on its last dim.
    pub fn colwise_parallel(&self, weights: &[ParamId]) {
        self.tp_split(weights, 0);
    }

    /// Row-parallel linears (`RowwiseParallel`): each weight is split on its input features;
    /// the tape reduce-scatters the partial outputs onto token shards (sequence parallel) or
    /// all-reduces them.
    pub fn rowwise_parallel(&self, weights: &[ParamId]) {
        self.tp_split(weights, 1);
    }

    /// A vocabulary-parallel embedding table `[vocab, dim]` (`RowwiseParallel` of an
    /// embedding): each rank looks up the ids it holds, the partial rows are reduced like a
    /// row-parallel output. A tied output projection reads the same split as column-parallel.
    pub fn vocab_parallel(&self, table: ParamId) {
        self.tp_split(&[table], 0);
    }

    /// torchtitan's `apply_tp` for a decoder: the embedding vocabulary-parallel, in each block
    /// the q/k/v and gate/up projections column-parallel and the attention output and down
    /// projections row-parallel, the output projection column-parallel (its logits stay split
    /// on the vocabulary for loss parallel; a tied one (`None`) is the embedding's split).
    /// Heads must divide by the degree (each rank attends with whole heads). A pipeline stage
    /// passes the edges it holds.
    pub fn tensor_parallel_decoder(
        &self,
        model: &str,
        (n_heads, n_kv_heads): (usize, usize),
        embedding: Option<ParamId>,
        blocks: impl IntoIterator<Item = BlockTp>,
        output: Option<ParamId>,
    ) -> Result<()> {
        let tp = self.tp_degree();
        if tp == 1 {
            return Ok(());
        }
        for (what, n) in [("n_heads", n_heads), ("n_kv_heads", n_kv_heads)] {
            if !n.is_multiple_of(tp) {
                return Err(Error::Config(format!(
                    "{model}: {what} {n} is not divisible by tensor_parallel_degree {tp} (each \
                     rank computes whole attention heads)"
                )));
            }
        }
        if let Some(e) = embedding {
            self.vocab_parallel(e);
        }
        for b in blocks {
            self.colwise_parallel(&b.colwise);
            self.rowwise_parallel(&b.rowwise);
        }
        if let Some(out) = output {
            self.colwise_parallel(&[out]);
        }
        Ok(())
    }

    fn tp_split(&self, weights: &[ParamId], dim: usize) {
        if self.tp_degree() > 1 {
            let mut plan = self.tp_plan.borrow_mut();
            plan.extend(weights.iter().map(|&w| (w, dim)));
        }
    }

    /// Makes `params` one FSDP unit: gathered together before its forward and backward, its
    /// gradients reduce-scattered together after its backward. Declare units in forward order.
    pub fn fully_shard(&self, params: Vec<ParamId>) {
        self.units.borrow_mut().push(params);
    }

    /// torchtitan's `apply_fsdp` for a decoder: the embedding, each block, then the final norm
    /// with the output projection, as units in forward order. A tied output (`None`) leaves the
    /// embedding, used first and last, in the root unit.
    /// A pipeline stage passes only the edges it holds (None for the others); a stage's tied
    /// output (the embedding with a norm, no output) stays in the root unit the same way.
    pub fn fully_shard_decoder(
        &self,
        embedding: Option<ParamId>,
        blocks: impl IntoIterator<Item = Vec<ParamId>>,
        norm: Option<ParamId>,
        output: Option<ParamId>,
    ) {
        // Own unit unless the embedding is also the output (tied: used first and last).
        if let Some(e) = embedding.filter(|_| output.is_some() || norm.is_none()) {
            self.fully_shard(vec![e]);
        }
        blocks.into_iter().for_each(|b| self.fully_shard(b));
        if let Some(out) = output {
            self.fully_shard(norm.into_iter().chain([out]).collect());
        }
    }

    /// (FSDP units, tensor-parallel plan).
    pub fn into_parts(self) -> (Vec<Vec<ParamId>>, Vec<(ParamId, usize)>) {
        (self.units.into_inner(), self.tp_plan.into_inner())
    }
}

/// One block's tensor-parallel weights (`Parallelize::tensor_parallel_decoder`).
pub struct BlockTp {
    /// Split on their output features: wq, wk, wv, w1, w3.
    pub colwise: Vec<ParamId>,
    /// Split on their input features: wo, w2.
    pub rowwise: Vec<ParamId>,
}

/// `ModelSpec::build_stage`: declares one pipeline stage's parameters, returns that part.
pub type BuildStage = fn(&dyn ModelArgs, &Stage, &mut ParamStoreBuilder) -> Result<Box<dyn Model>>;

/// Hugging Face `transformers` interop of one model.
pub struct HfInterop {
    /// The `model_type` values of `config.json` this model reads ("llama", "qwen3").
    pub model_types: &'static [&'static str],
    /// The architecture of a parsed `config.json` (`origin` names the file in errors).
    pub args_from_config: fn(config: &Value, origin: &Path) -> Result<Box<dyn ModelArgs>>,
    /// The `config.json` of an architecture, `torch_dtype` naming the exported dtype.
    pub to_config: fn(args: &dyn ModelArgs, dtype: &str) -> Result<Value>,
}

/// One registered model (torchtitan's `TrainSpec`).
pub struct ModelSpec {
    pub name: &'static str,
    pub flavors: &'static [&'static str],
    /// The architecture of a flavor (an unknown name is an error listing the flavors).
    pub flavor: fn(&str) -> Result<Box<dyn ModelArgs>>,
    /// The architecture from its JSON form (`ModelArgs::to_json`, a manifest's `model_args`).
    pub args_from_json: fn(&Value) -> Result<Box<dyn ModelArgs>>,
    /// Declares the parameters and constants of an architecture and returns the model.
    pub build: fn(&dyn ModelArgs, &mut ParamStoreBuilder) -> Result<Box<dyn Model>>,
    /// Applies parallelism and training techniques from outside the model code, in torchtitan's
    /// order: tensor parallel, activation checkpointing, fusion, FSDP.
    pub parallelize: fn(&mut dyn Model, &Parallelize) -> Result<()>,
    /// Which layers (and edge modules) each pipeline stage owns.
    pub pipeline_split: fn(&dyn ModelArgs, &SplitSpec) -> Result<Vec<Stage>>,
    /// Declares the parameters of one pipeline stage (its blocks under their global layer ids,
    /// the embedding on the first stage, norm + output on the last) and returns that part of
    /// the model: its `forward` maps tokens (first stage) or the hidden state [b, s, dim] to
    /// the hidden state, or to logits (last stage).
    pub build_stage: BuildStage,
    /// Builds the loss from logits (torchtitan's `build_loss_fn`).
    pub loss: LossFn,
    /// titan <-> Hugging Face parameter names for an architecture.
    pub state_dict_adapter: fn(&dyn ModelArgs) -> Result<Box<dyn StateDictAdapter>>,
    pub hf: HfInterop,
}

impl ModelSpec {
    /// The flavor's architecture fitted to a run of `seq_len` with the tokenizer's `vocab`.
    pub fn flavor_for(
        &self,
        flavor: &str,
        seq_len: usize,
        vocab: Option<usize>,
    ) -> Result<Box<dyn ModelArgs>> {
        let mut a = (self.flavor)(flavor)?;
        a.update_from_config(seq_len, vocab)?;
        Ok(a)
    }

    /// The model of `args` with the job's parallelism applied, and its parameter declarations.
    pub fn build_for(
        &self,
        args: &dyn ModelArgs,
        job: &JobConfig,
    ) -> Result<(Box<dyn Model>, ParamStoreBuilder)> {
        let mut b = ParamStoreBuilder::default();
        let mut model = (self.build)(args, &mut b)?;
        let p = Parallelize::new(job);
        (self.parallelize)(model.as_mut(), &p)?;
        (b.fsdp_units, b.tp_plan) = p.into_parts();
        Ok((model, b))
    }

    /// The models of a pipeline rank's `stages` with the job's parallelism applied, their
    /// parameters declared into one store. Each parameter draws the initial weights it draws in
    /// the whole model (`ParamSpec::init_key` by name), so any split starts from the same
    /// weights.
    pub fn build_stages_for(
        &self,
        args: &dyn ModelArgs,
        job: &JobConfig,
        stages: &[Stage],
    ) -> Result<(Vec<Box<dyn Model>>, ParamStoreBuilder)> {
        let mut b = ParamStoreBuilder::default();
        let p = Parallelize::new(job);
        let mut models = Vec::with_capacity(stages.len());
        for st in stages {
            let mut m = (self.build_stage)(args, st, &mut b)?;
            (self.parallelize)(m.as_mut(), &p)?;
            models.push(m);
        }
        (b.fsdp_units, b.tp_plan) = p.into_parts();
        let whole = self.param_specs(args)?;
        for spec in &mut b.params {
            spec.init_key = whole
                .iter()
                .position(|w| w.name == spec.name)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "{}: stage parameter {} is not in the whole model",
                        self.name, spec.name
                    ))
                })?;
        }
        Ok((models, b))
    }

    /// The parameters (names, shapes) of an architecture, without allocating them.
    pub fn param_specs(&self, args: &dyn ModelArgs) -> Result<Vec<ParamSpec>> {
        let mut b = ParamStoreBuilder::default();
        (self.build)(args, &mut b)?;
        Ok(b.params)
    }

    /// Summed next-token loss of `labels` over the model's logits for `tokens` (its gradient is
    /// `grad_scale` times that of the sum).
    pub fn loss_of(
        &self,
        model: &dyn Model,
        t: &mut Tape,
        tokens: Tensor,
        labels: Tensor,
        grad_scale: f32,
    ) -> Result<Tensor> {
        let logits = model.forward(t, tokens)?;
        (self.loss)(t, logits, labels, grad_scale)
    }
}

/// The concrete architecture behind `args` (a model folder reading its own `Config`).
pub fn args_as<'a, T: 'static>(args: &'a dyn ModelArgs, model: &str) -> Result<&'a T> {
    args.as_any().downcast_ref::<T>().ok_or_else(|| {
        Error::Config(format!(
            "{model}: given the architecture of another model ({args:?})"
        ))
    })
}

/// The concrete model behind `m` (a model folder's `parallelize` reaching its own modules).
pub fn model_as_mut<'a, T: 'static>(m: &'a mut dyn Model, model: &str) -> Result<&'a mut T> {
    m.as_any_mut()
        .downcast_mut::<T>()
        .ok_or_else(|| Error::Config(format!("{model}: given a model of another kind")))
}
