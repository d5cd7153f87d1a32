//! Pipeline-parallel execution (torchtitan's `pipelining`): each pp rank holds the stages
//! `s = rank + k pp` of the split (engine/parallel/pipeline.rs) and runs its action list of the
//! schedule (engine/parallel/schedule/) over the microbatches of each local batch (step.rs): a
//! forward receives the previous stage's hidden state (or reads the tokens), a backward the
//! gradient of its output (or starts from the loss on the last stage), both over the pp group's
//! send/recv, grouped for NCCL (wire.rs). With `parallelism.pipeline_on_one_rank` (pp = 1)
//! every stage is on this rank and crosses its boundaries by sends to itself. This file: the
//! layout (split, schedule, stage models), its memory plan, and the communicators.
//!
//! Memory: a microbatch's stage tape lives from its forward to its last backward pass, and
//! several are alive at once under 1F1B and the interleaved schedules, so each tape owns its
//! buffers (`Placement::Owned`), all of them until it is dropped (no reuse inside a tape, as
//! the arena plan would give: the price of simple correctness, for now). The memory plan
//! counts `peak_in_flight` such tapes: one through its backward plus what each other pair in
//! flight holds after its forward, traced on the meta backend with the same owned tapes. The
//! step records the bytes it really held (`peak_activations`).
//!
//! A tied embedding (first stage) and output (last stage) is one parameter held by both ranks:
//! the same initial weights, their gradients summed before the optimizer (Megatron's embedding
//! group), so both copies take the same update; only the first stage's copy is saved and counted
//! in the gradient norm.

mod step;
mod wire;

use super::config::JobConfig;
use super::memory::MemoryPlan;
use crate::backend::meta::MetaBackend;
use crate::backend::{Backend, Buf};
use crate::dist::mesh::Dim;
use crate::dist::{Communicator, Mesh, ParallelDims};
use crate::error::{Error, Result};
use crate::model::{Model, ModelArgs, ModelSpec};
use crate::parallel::fsdp::{FsdpLayout, Reshard};
use crate::parallel::pipeline::{SplitSpec, Stage};
use crate::parallel::schedule::Schedule;
use crate::parallel::tp::{local_specs, TensorParallel};
use crate::params::{ParamId, ParamStore, ParamStoreBuilder, StateBytes};
use crate::planner::Plan;
use crate::tape::{Placement, Tape, Tensor};
use crate::tensor::DType;
use std::any::Any;
use std::cell::Cell;
use std::collections::BTreeMap;

/// The split and schedule of a pipelined run, before the communicators exist.
pub(super) struct Layout {
    pub schedule: Schedule,
    pub(in crate::train) stages: Vec<Stage>,
    /// This rank's coordinate along pp.
    pp_rank: usize,
    /// Along tp (which slices its stages' weights hold).
    tp_rank: usize,
}

impl Layout {
    /// The split of `args` and the schedule for `cfg`'s `[parallelism]`; layouts titan does not
    /// run with pipelines are errors here, before any work.
    pub fn new(
        spec: &ModelSpec,
        cfg: &JobConfig,
        args: &dyn ModelArgs,
        dims: &ParallelDims,
        rank: usize,
    ) -> Result<Layout> {
        let g = dims.degrees;
        let refuse = |what: &str| {
            Err(Error::Config(format!(
                "pipeline_parallel_degree {} with {what} is not built yet",
                g.pp
            )))
        };
        let p = &cfg.parallelism;
        let kind = crate::parallel::schedule::Kind::parse(&p.pipeline_parallel_schedule)?;
        if cfg.checkpoint.last_save_in_hf {
            return refuse(
                "checkpoint.last_save_in_hf (export the last checkpoint with `titan convert`)",
            );
        }
        let split = SplitSpec::from_config(p, args.n_layers(), kind.interleaved())?;
        let stages = (spec.pipeline_split)(args, &split)?;
        let schedule = Schedule::for_stages(p, cfg.training.local_batch_size, stages.len())?;
        Ok(Layout {
            schedule,
            stages,
            pp_rank: dims.coords(rank)[0],
            tp_rank: dims.coords(rank)[4],
        })
    }

    /// The stages this rank holds, ascending.
    fn local(&self) -> Vec<usize> {
        (0..self.stages.len())
            .filter(|&s| self.schedule.rank_of(s) == self.pp_rank)
            .collect()
    }

    /// This rank's stage models, their parameters in one store.
    pub fn build(
        &self,
        spec: &ModelSpec,
        args: &dyn ModelArgs,
        cfg: &JobConfig,
    ) -> Result<(Box<dyn Model>, ParamStoreBuilder)> {
        let stages: Vec<Stage> = self
            .local()
            .iter()
            .map(|&s| self.stages[s].clone())
            .collect();
        let (models, b) = spec.build_stages_for(args, cfg, &stages)?;
        Ok((Box::new(StageModels { models }), b))
    }

    /// The memory of this rank's stages, traced on the meta backend: the state of its
    /// parameters, and activations of `peak_in_flight` stage microbatches (see the module doc).
    /// The plan is empty: pipeline tapes own their buffers.
    pub fn trace_plan(
        &self,
        spec: &ModelSpec,
        cfg: &JobConfig,
        args: &dyn ModelArgs,
        dtype: DType,
    ) -> Result<(Plan, Option<Plan>, MemoryPlan)> {
        let shape = self.micro_shape(cfg);
        let hidden = hidden_dim(spec, args, dtype)?;
        let (mut peak, mut held, mut unplanned, mut buffers, mut ops) = (0, 0, 0, 0, 0);
        let (_, builder) = self.build(spec, args, cfg)?;
        let meta = MetaBackend::new();
        let tp = TensorParallel::meta(
            &cfg.parallelism,
            builder.tp_dims(),
            meta.log(),
            self.tp_rank,
        );
        let g = &cfg.parallelism;
        let dp_shard = g.data_parallel_shard_degree.max(1) as usize;
        let fsdp = if dp_shard > 1 {
            // Rank 0 of each stage's FSDP group holds the largest shards.
            let degree = g.tensor_parallel_degree.max(1) as usize;
            let local = local_specs(&builder.params, &builder.tp_dims(), degree, self.tp_rank);
            let reshard = Reshard::parse(&g.fsdp_reshard_after_forward)?;
            Some(FsdpLayout::new(
                &local,
                &builder.fsdp_units,
                dp_shard,
                0,
                reshard,
                true, // pipeline microbatches accumulate (as the trainer's layout)
            )?)
        } else {
            None
        };
        let mut state =
            ParamStore::materialize_sharded(builder, &meta, dtype, None, tp)?.state_bytes();
        if let Some(l) = &fsdp {
            let reduce = DType::parse(&cfg.training.mixed_precision_reduce)?;
            // Its comm buffers so far: the tensor-parallel staging (a bound under FSDP).
            let tp_staging = state.comm_buffers;
            state = StateBytes::sharded(l, dtype, reduce, state.constants);
            state.comm_buffers += tp_staging;
        }
        let mut num_params = 0;
        for s in self.local() {
            let st = &self.stages[s];
            let t = trace_stage(spec, cfg, args, st, dtype, shape, (hidden, self.tp_rank))?;
            peak = peak.max(t.total);
            held = held.max(t.held);
            unplanned = unplanned.max(t.plan.unplanned);
            buffers += t.plan.requests.len();
            ops += t.ops;
            num_params += t.num_params;
        }
        let in_flight = self.schedule.peak_in_flight(self.pp_rank).max(1);
        let mp = MemoryPlan {
            state,
            activations_peak: peak + (in_flight - 1) * held,
            activations_unplanned: unplanned * in_flight,
            validation_activations: 0,
            buffers,
            ops,
            num_params,
        };
        // Validation runs through the stages too, on tapes of their own (`validate_pipelined`).
        let validation = cfg.validation.enable.then(|| Plan::new(Vec::new()));
        Ok((Plan::new(Vec::new()), validation, mp))
    }

    /// (batch, seq) of one microbatch.
    pub(in crate::train) fn micro_shape(&self, cfg: &JobConfig) -> (usize, usize) {
        let mbs = cfg.parallelism.pipeline_parallel_microbatch_size.max(1) as usize;
        (mbs, cfg.training.seq_len as usize)
    }

    /// Opens the pp group (and the groups of parameters several stages hold) on every rank,
    /// collectively over the world.
    pub fn connect(
        self,
        spec: &ModelSpec,
        args: &dyn ModelArgs,
        mesh: &Mesh,
        store: &ParamStore,
        dtype: DType,
    ) -> Result<Pipeline> {
        let rank = mesh.world.rank();
        let comm = mesh.world.split(&mesh.dims.group(rank, &[Dim::Pp]))?;
        // Parameter names per pp rank, from every stage's declarations (no memory).
        let mut holders: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (s, st) in self.stages.iter().enumerate() {
            let mut b = ParamStoreBuilder::default();
            (spec.build_stage)(args, st, &mut b)?;
            for p in b.params {
                let ranks = holders.entry(p.name).or_default();
                let r = self.schedule.rank_of(s);
                if !ranks.contains(&r) {
                    ranks.push(r);
                }
            }
        }
        let mut groups: BTreeMap<Vec<usize>, Vec<String>> = BTreeMap::new();
        for (name, mut ranks) in holders.into_iter().filter(|h| h.1.len() > 1) {
            ranks.sort_unstable();
            groups.entry(ranks).or_default().push(name);
        }
        let mut shared = Vec::new();
        for (ranks, names) in groups {
            if !ranks.contains(&self.pp_rank) {
                continue;
            }
            let params = names
                .iter()
                .map(|n| store.find(n))
                .collect::<Option<Vec<ParamId>>>()
                .ok_or_else(|| Error::Config("pipeline: a shared parameter is missing".into()))?;
            shared.push(Shared {
                params,
                comm: comm.split(&ranks)?,
                owner: ranks[0] == self.pp_rank,
            });
        }
        let hidden = hidden_dim(spec, args, dtype)?;
        Ok(Pipeline {
            local: self.local(),
            schedule: self.schedule,
            stages: self.stages,
            pp_rank: self.pp_rank,
            hidden,
            comm,
            shared,
            peak_activations: Cell::new(0),
        })
    }
}

/// `titan plan` of a pp > 1 layout: the schedule, and each pp rank's memory (its stages'
/// state and in-flight activations, traced on the meta backend).
pub fn plan_pp_ranks(
    spec: &ModelSpec,
    cfg: &JobConfig,
    args: &dyn ModelArgs,
    dims: &ParallelDims,
    dtype: DType,
) -> Result<(Schedule, Vec<MemoryPlan>)> {
    let pp = dims.degrees.pp;
    let mut out = Vec::with_capacity(pp);
    let mut schedule = None;
    for r in 0..pp {
        // pp is the outermost mesh dimension: world rank r * (world / pp) has coordinate r.
        let l = Layout::new(spec, cfg, args, dims, r * (dims.world / pp))?;
        out.push(l.trace_plan(spec, cfg, args, dtype)?.2);
        schedule = Some(l.schedule);
    }
    let s = schedule.ok_or_else(|| Error::Config("pipeline: no pp ranks".into()))?;
    Ok((s, out))
}

/// Parameters several pp ranks hold (a tied embedding): their gradients are summed over `comm`.
struct Shared {
    params: Vec<ParamId>,
    comm: Box<dyn Communicator>,
    /// This rank saves them and counts them in the gradient norm.
    owner: bool,
}

/// A pipelined run's execution state on one rank.
pub struct Pipeline {
    pub schedule: Schedule,
    stages: Vec<Stage>,
    /// The stages on this rank, ascending (the order of `StageModels`).
    local: Vec<usize>,
    pp_rank: usize,
    /// Width of the hidden state that crosses between stages.
    hidden: usize,
    comm: Box<dyn Communicator>,
    shared: Vec<Shared>,
    /// The most activation bytes the steps so far held at once (tapes and received buffers).
    pub peak_activations: Cell<usize>,
}

impl Pipeline {
    fn last_stage(&self) -> usize {
        self.stages.len() - 1
    }

    /// Whether `id` is another rank's parameter held here too (not saved, not in the norm).
    pub fn is_copy(&self, id: ParamId) -> bool {
        self.shared
            .iter()
            .any(|s| !s.owner && s.params.contains(&id))
    }

    pub fn degree(&self) -> usize {
        self.schedule.pp
    }

    pub fn set_timeout(&self, t: std::time::Duration) {
        self.comm.set_timeout(t);
        self.shared.iter().for_each(|s| s.comm.set_timeout(t));
    }
}

/// The models of one pp rank's stages (one `Model` to the trainer: weights init, arguments).
pub struct StageModels {
    pub models: Vec<Box<dyn Model>>,
}

impl Model for StageModels {
    fn args(&self) -> &dyn ModelArgs {
        self.models[0].args()
    }
    fn init_weights(&self, store: &ParamStore, be: &dyn Backend, seed: u64) -> Result<()> {
        self.models
            .iter()
            .try_for_each(|m| m.init_weights(store, be, seed))
    }
    fn forward(&self, _: &mut Tape, _: Tensor) -> Result<Tensor> {
        Err(Error::Config(
            "a pipeline rank's stages run through the schedule, not one forward".into(),
        ))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The width of the hidden state between stages: the first stage's output on a 1 x 1 input,
/// traced on the meta backend.
pub(in crate::train) fn hidden_dim(
    spec: &ModelSpec,
    args: &dyn ModelArgs,
    dtype: DType,
) -> Result<usize> {
    let mut b = ParamStoreBuilder::default();
    let st = Stage {
        layers: 0..0,
        embedding: true,
        output: false,
    };
    let model = (spec.build_stage)(args, &st, &mut b)?;
    let meta = MetaBackend::new();
    let store = ParamStore::materialize(b, &meta, dtype)?;
    let mut tape = Tape::new(&meta, &store, Placement::Owned);
    let tokens = tape.input_i32(&[0], [1, 1])?;
    let h = model.forward(&mut tape, tokens)?;
    tape.dims(h).last().copied().ok_or_else(|| {
        Error::Config(format!(
            "{}: the first pipeline stage returned a scalar",
            spec.name
        ))
    })
}

/// One stage microbatch traced on the meta backend, on a tape that owns its buffers as the
/// pipeline's do (they are freed when the tape is dropped after its last backward pass; only
/// activation checkpointing releases some earlier).
struct StageTrace {
    plan: Plan,
    /// Bytes its tape holds between its forward and its backward (a pair in flight).
    held: usize,
    /// Bytes its tape holds at the end of its backward.
    total: usize,
    ops: usize,
    num_params: usize,
}

fn trace_stage(
    spec: &ModelSpec,
    cfg: &JobConfig,
    args: &dyn ModelArgs,
    st: &Stage,
    dtype: DType,
    (b, s): (usize, usize),
    (hidden, tp_rank): (usize, usize),
) -> Result<StageTrace> {
    let (models, builder) = spec.build_stages_for(args, cfg, std::slice::from_ref(st))?;
    let meta = MetaBackend::new();
    let tp = TensorParallel::meta(&cfg.parallelism, builder.tp_dims(), meta.log(), tp_rank);
    let store = ParamStore::materialize_sharded(builder, &meta, dtype, None, tp)?;
    let mut tape = Tape::new(&meta, &store, Placement::Owned);
    let shape = [b, s, hidden];
    let fake = Buf::new(
        0,
        TensorParallel::stage_numel(store.tp(), b * s, hidden),
        dtype,
    );
    let x = if st.embedding {
        tape.input_i32(&vec![0; b * s], [b, s])?
    } else {
        tape.stage_activation(fake, shape, true)?
    };
    let out = models[0].forward(&mut tape, x)?;
    let (root, seed) = if st.output {
        let labels = tape.input_i32(&vec![0; b * s], [b * s])?;
        ((spec.loss)(&mut tape, out, labels, 1.0)?, None)
    } else {
        (out, Some(tape.stage_activation(fake, shape, false)?))
    };
    let held = tape.owned_bytes_live();
    tape.backward_from(root, seed, &[x], false)?;
    Ok(StageTrace {
        plan: tape.plan(),
        held,
        total: tape.owned_bytes_live(),
        ops: tape.num_nodes(),
        num_params: store.num_params(),
    })
}
