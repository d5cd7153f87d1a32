//! Pipeline-parallel execution (torchtitan's `pipelining`): each pp rank holds the stages
//! `s = rank + k pp` of the split (engine/parallel/pipeline.rs) and runs its action list of the
//! schedule (engine/parallel/schedule/) over the microbatches of each local batch (step.rs): a
//! forward receives the previous stage's hidden state (or reads the tokens), a backward the
//! gradient of its output (or starts from the loss on the last stage), both over the pp group's
//! send/recv, grouped for NCCL (wire.rs). With `parallelism.pipeline_on_one_rank` (pp = 1)
//! every stage is on this rank and crosses its boundaries by sends to itself. This file: the
//! layout (split, schedule, stage models) and the communicators.
//!
//! Memory: a microbatch's stage tape lives from its forward to its last backward pass, and
//! several are alive at once under 1F1B and the interleaved schedules. Each is planned from its
//! stage's trace (plan.rs): what it keeps between its passes in an arena of its own, taken from
//! a pool kept across microbatches and steps (received messages too); what dies inside one pass
//! in one scratch that the rank's tapes share. The memory plan replays the schedule on sizes to
//! count the arenas, scratch and received messages the rank holds at most; the step records
//! what it really held (`peak_activations`), the same bytes.
//!
//! A tied embedding (first stage) and output (last stage) is one parameter held by both ranks:
//! the same initial weights, their gradients summed before the optimizer (Megatron's embedding
//! group), so both copies take the same update; only the first stage's copy is saved and counted
//! in the gradient norm.

mod plan;
mod step;
mod wire;

use super::config::JobConfig;
use super::memory::MemoryPlan;
use crate::backend::meta::MetaBackend;
use crate::backend::{Backend, DeviceMem};
use crate::dist::mesh::Dim;
use crate::dist::{Communicator, Mesh, ParallelDims};
use crate::error::{Error, Result};
use crate::model::{Model, ModelArgs, ModelSpec};
use crate::parallel::pipeline::{SplitSpec, Stage};
use crate::parallel::schedule::Schedule;
use crate::params::{ParamId, ParamStore, ParamStoreBuilder};
use crate::planner::Plan;
use crate::tape::{Placement, Tape, Tensor};
use crate::tensor::DType;
use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use wire::Pool;

/// The split and schedule of a pipelined run, before the communicators exist.
pub(super) struct Layout {
    pub schedule: Schedule,
    pub(in crate::train) stages: Vec<Stage>,
    /// This rank's coordinate along pp.
    pp_rank: usize,
    /// Along tp (which slices its stages' weights hold).
    tp_rank: usize,
    /// Per local stage (ascending): the plan of its tapes' arenas (`trace_plan`), and of its
    /// validation forward (empty without validation).
    plans: Vec<Plan>,
    val_plans: Vec<Plan>,
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
            plans: Vec::new(),
            val_plans: Vec::new(),
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
        if self.plans.len() != self.local().len() {
            return Err(Error::Config(
                "pipeline: its stages were not traced before the run".into(),
            ));
        }
        Ok(Pipeline {
            local: self.local(),
            plans: self.plans,
            val_plans: self.val_plans,
            arenas: RefCell::new(Pool::default()),
            scratch: RefCell::new(None),
            val_arena: RefCell::new(None),
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
        let mut l = Layout::new(spec, cfg, args, dims, r * (dims.world / pp))?;
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
    /// Per local stage: the plan its tapes run in, each in an arena from `arenas`.
    plans: Vec<Plan>,
    arenas: RefCell<Pool<Box<dyn DeviceMem>>>,
    /// The transient buffers of the pass running (`plan::scratch_bytes`), made at the first.
    scratch: RefCell<Option<Box<dyn DeviceMem>>>,
    /// Validation's stage plans, run in the idle scratch, or here when they need more.
    val_plans: Vec<Plan>,
    val_arena: RefCell<Option<Box<dyn DeviceMem>>>,
    /// The most activation bytes the steps so far held at once (arenas and received buffers).
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

    /// The scratch arena's address (allocated on first use).
    fn scratch(&self, be: &dyn Backend) -> Result<u64> {
        lazy_arena(&self.scratch, be, plan::scratch_bytes(&self.plans))
    }

    /// Where validation's stage tapes run: the scratch when it holds them (no training pass
    /// runs meanwhile), else an arena of their own (allocated on first use).
    fn validation_base(&self, be: &dyn Backend) -> Result<u64> {
        let need = plan::validation_bytes(&self.val_plans);
        if need <= plan::scratch_bytes(&self.plans) {
            return self.scratch(be);
        }
        lazy_arena(&self.val_arena, be, need)
    }

    /// Validation's own arena, when it has one.
    pub fn validation_arena_bytes(&self) -> usize {
        self.val_arena.borrow().as_ref().map_or(0, |m| m.bytes())
    }

    pub fn degree(&self) -> usize {
        self.schedule.pp
    }

    pub fn set_timeout(&self, t: std::time::Duration) {
        self.comm.set_timeout(t);
        self.shared.iter().for_each(|s| s.comm.set_timeout(t));
    }
}

/// The address of `cell`'s arena of `bytes`, allocated on first use.
fn lazy_arena(
    cell: &RefCell<Option<Box<dyn DeviceMem>>>,
    be: &dyn Backend,
    bytes: usize,
) -> Result<u64> {
    let mut a = cell.borrow_mut();
    if a.is_none() {
        *a = Some(be.alloc(bytes)?);
    }
    Ok(a.as_ref().map_or(0, |m| m.ptr()))
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
