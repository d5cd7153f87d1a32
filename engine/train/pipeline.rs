//! Pipeline-parallel execution (torchtitan's `pipelining`): each pp rank holds the stages
//! `s = rank + k pp` of the split (engine/parallel/pipeline.rs) and runs its action list of the
//! schedule (engine/parallel/schedule/) over the microbatches of each local batch: a forward
//! receives the previous stage's hidden state (or reads the tokens), a backward the gradient of
//! its output (or starts from the loss on the last stage), both over the pp group's send/recv.
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

use super::config::JobConfig;
use super::memory::MemoryPlan;
use super::trainer::{StepResult, Trainer};
use super::validate::{ValMetrics, Validator};
use crate::backend::meta::MetaBackend;
use crate::backend::{AdamW, AdamWBufs, Backend, Buf, DeviceMem};
use crate::data::Batch;
use crate::dist::mesh::Dim;
use crate::dist::{Communicator, Mesh, ParallelDims, ReduceOp};
use crate::error::{Error, Result};
use crate::model::{Model, ModelArgs, ModelSpec};
use crate::parallel::pipeline::{SplitSpec, Stage};
use crate::parallel::schedule::{Action, Schedule, Transfer};
use crate::parallel::tp::TensorParallel;
use crate::params::{ParamId, ParamStore, ParamStoreBuilder};
use crate::planner::Plan;
use crate::tape::{Placement, Tape, Tensor};
use crate::tensor::DType;
use std::any::Any;
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// The split and schedule of a pp > 1 run, before the communicators exist.
pub(super) struct Layout {
    pub schedule: Schedule,
    pub(super) stages: Vec<Stage>,
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
        if g.dp_shard > 1 {
            return refuse("data_parallel_shard_degree > 1 (FSDP within each stage)");
        }
        if cfg.checkpoint.last_save_in_hf {
            return refuse(
                "checkpoint.last_save_in_hf (export the last checkpoint with `titan convert`)",
            );
        }
        let p = &cfg.parallelism;
        let kind = crate::parallel::schedule::Kind::parse(&p.pipeline_parallel_schedule)?;
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

    /// Checks that the pipeline runs on backend `name`: the host communicators only so far.
    /// NCCL's send waits on the GPU for its recv, so the crossing send / recv pairs of 1F1B's
    /// steady state would need NCCL groups, which are not built (nor tested: no GPU here).
    pub fn on(self, backend: &str) -> Result<Layout> {
        if backend != "cpu" {
            return Err(Error::Config(format!(
                "pipeline_parallel_degree {} on the {backend} backend is not built yet (NCCL \
                 send / recv grouping); pipelines run on CPU ranks (--training.device cpu)",
                self.schedule.pp
            )));
        }
        Ok(self)
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
        let tp = TensorParallel::meta(&cfg.parallelism, builder.tp_dims(), meta.log(), self.tp_rank);
        let state = ParamStore::materialize_sharded(builder, &meta, dtype, None, tp)?.state_bytes();
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
    pub(super) fn micro_shape(&self, cfg: &JobConfig) -> (usize, usize) {
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

/// A pp > 1 run's execution state on one rank.
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

/// One stage microbatch in flight: its tape and the received buffers the tape reads.
struct Live<'t> {
    tape: Tape<'t>,
    input: Option<Tensor>,
    /// The loss (last stage) or the output hidden state.
    root: Tensor,
    held: Vec<Box<dyn DeviceMem>>,
}

/// Messages from the other pp ranks. The host transport delivers a pair's messages in order
/// without labels, and activations and gradients share a pair under interleaving, so each
/// message is named by the sender's schedule (the order of its sends to this rank) and kept
/// until the action that needs it.
struct Inbox {
    expect: Vec<VecDeque<Transfer>>,
    stash: HashMap<Transfer, Box<dyn DeviceMem>>,
}

impl Inbox {
    fn new(s: &Schedule, me: usize) -> Inbox {
        let expect = (0..s.pp)
            .map(|q| {
                let row = if q == me { &[][..] } else { &s.per_rank[q][..] };
                row.iter()
                    .filter_map(|a| s.send_after(a))
                    .filter(|t| t.to_rank == me)
                    .collect()
            })
            .collect();
        Inbox {
            expect,
            stash: HashMap::new(),
        }
    }

    fn take(
        &mut self,
        t: Transfer,
        len: usize,
        dtype: DType,
        comm: &dyn Communicator,
        be: &dyn Backend,
    ) -> Result<Box<dyn DeviceMem>> {
        loop {
            if let Some(m) = self.stash.remove(&t) {
                return Ok(m);
            }
            let next = self.expect[t.from_rank].pop_front().ok_or_else(|| {
                Error::Comm(format!(
                    "pipeline: rank {} never sends {} of stage {} microbatch {}",
                    t.from_rank,
                    if t.gradient {
                        "the gradient"
                    } else {
                        "the output"
                    },
                    t.stage,
                    t.microbatch
                ))
            })?;
            let m = be.alloc(len * dtype.size())?;
            comm.recv(Buf::new(m.ptr(), len, dtype), t.from_rank)?;
            self.stash.insert(next, m);
        }
    }

    fn bytes(&self) -> usize {
        self.stash.values().map(|m| m.bytes()).sum()
    }
}

impl Trainer {
    fn pipeline(&self) -> Result<&Pipeline> {
        self.pipeline
            .as_ref()
            .ok_or_else(|| Error::Config("not a pipeline-parallel trainer".into()))
    }

    fn stage_models(&self) -> Result<&StageModels> {
        self.model
            .as_any()
            .downcast_ref::<StageModels>()
            .ok_or_else(|| Error::Config("pipeline: the model is not a stage list".into()))
    }

    /// A validation run through the stages: each batch forward only, stage after stage (every
    /// rank walks (batch, stage) in order, so a pair's messages arrive in the order they are
    /// read); the last stages' loss sums and token counts are reduced over pp x dp.
    pub(super) fn validate_pipelined(&self, v: &mut Validator, step: u64) -> Result<ValMetrics> {
        let reduce = |vals: &mut [f32]| self.all_reduce_batch(vals, ReduceOp::Sum);
        let mut loss_of = |b: &Batch, _: &Plan| self.forward_stages(b);
        v.run_with(step, true, &reduce, &mut loss_of)
    }

    /// This rank's stages' forward passes over `b`; the summed loss on the last stage.
    fn forward_stages(&self, b: &Batch) -> Result<Option<f64>> {
        let (p, models, be) = (self.pipeline()?, self.stage_models()?, self.be.as_ref());
        let (s, comm, dtype) = (&p.schedule, p.comm.as_ref(), self.store.compute_dtype);
        let hidden = [b.batch, b.seq, p.hidden];
        let len = TensorParallel::stage_numel(self.store.tp(), b.batch * b.seq, p.hidden);
        let mut loss = None;
        for (k, &stage) in p.local.iter().enumerate() {
            let mut held = None; // outlives the tape that reads it
            let mut tape = Tape::new(be, &self.store, Placement::Owned);
            let x = if stage == 0 {
                tape.input_i32(&b.inputs, [b.batch, b.seq])?
            } else {
                let m = be.alloc(len * dtype.size())?;
                let buf = Buf::new(m.ptr(), len, dtype);
                comm.recv(buf, s.rank_of(stage - 1))?;
                held = Some(m);
                tape.stage_activation(buf, hidden, false)?
            };
            let out = models.models[k].forward(&mut tape, x)?;
            if stage == p.last_stage() {
                let labels = tape.input_i32(&b.labels, [b.batch * b.seq])?;
                let l = (self.spec.loss)(&mut tape, out, labels, 1.0)?;
                loss = Some(tape.to_vec_f32(l)?[0] as f64);
            } else {
                comm.send(tape.device_buf(out)?, s.rank_of(stage + 1))?;
            }
            drop(tape);
            drop(held);
        }
        Ok(loss)
    }

    /// One optimizer step of a pp > 1 run: `accum` local batches through the schedule, the
    /// shared parameters' gradients summed, the norm over every stage, AdamW on this rank's.
    pub(super) fn pipeline_step(&mut self) -> Result<StepResult> {
        let step = self.step + 1;
        let be = self.be.as_ref();
        let mut batches = Vec::with_capacity(self.accum);
        for _ in 0..self.accum {
            batches.push(self.loader.next_batch()?);
        }
        let p = self.pipeline()?;
        // Every stage of a data-parallel rank reads the same batch: the count is over dp.
        let local_valid: usize = batches
            .iter()
            .map(|b| b.labels.iter().filter(|&&l| l >= 0).count())
            .sum::<usize>();
        let valid = self.global_count(local_valid)?;
        let grad_scale = 1.0 / valid.max(1) as f32;
        self.store.zero_grads(be)?;
        let mut loss_sum = 0f64;
        let mut tokens = 0;
        for batch in &batches {
            loss_sum += self.run_schedule(p, batch, grad_scale)?;
            tokens += batch.batch * batch.seq;
        }
        for s in &p.shared {
            for &id in &s.params {
                s.comm
                    .all_reduce(self.store.local_grad(id), ReduceOp::Sum)?;
            }
            s.comm.wait()?;
        }
        self.reduce_tp_partials()?;
        self.replicate_grads()?;
        // Only the last stages hold losses: summed over pp and dp (not tp, whose ranks agree).
        let mut sums = [loss_sum as f32];
        self.all_reduce_batch(&mut sums, ReduceOp::Sum)?;
        let loss = sums[0] as f64 / valid.max(1) as f64;
        let tokens = tokens * self.mesh.as_ref().map_or(1, |m| m.dims.dp());
        let norm_sq = self.scalars.slice(0, 1);
        let coef = self.scalars.slice(1, 1);
        self.grad_norm_sq(norm_sq)?;
        let max_norm = if self.cfg.training.max_norm > 0.0 {
            self.cfg.training.max_norm as f32
        } else {
            f32::INFINITY
        };
        be.clip_coef(norm_sq, max_norm, coef)?;
        let mut host = [0f32; 1];
        be.download(norm_sq, bytemuck::cast_slice_mut(&mut host))?;
        let grad_norm = (host[0] as f64).sqrt();
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Err(Error::NonFinite(format!(
                "step {step}: loss {loss}, grad_norm {grad_norm}; the weights were not updated (last good checkpoint kept)"
            )));
        }
        let lr = self.lr.lr_at(self.schedule_step(step));
        let o = &self.cfg.optimizer;
        let hp = AdamW {
            lr,
            beta1: o.beta1 as f32,
            beta2: o.beta2 as f32,
            eps: o.eps as f32,
            weight_decay: o.weight_decay as f32,
            step,
        };
        let (m, v) = self.store.flat_moments();
        be.adamw(
            &AdamWBufs {
                param: self.store.flat_master(),
                grad: self.store.flat_grad(),
                m,
                v,
                compute: self.store.flat_compute(),
                grad_scale: coef,
            },
            &hp,
        )?;
        self.store.shards_updated();
        self.step = step;
        Ok(StepResult {
            loss,
            grad_norm,
            lr: lr as f64,
            tokens,
        })
    }

    /// This rank's actions of the schedule over the microbatches of `batch`; returns the summed
    /// loss of the microbatches (0 unless this rank holds the last stage).
    fn run_schedule(&self, p: &Pipeline, batch: &Batch, grad_scale: f32) -> Result<f64> {
        let be = self.be.as_ref();
        let models = self.stage_models()?;
        let s = &p.schedule;
        let m = s.microbatches;
        if !batch.batch.is_multiple_of(m) {
            return Err(Error::Config(format!(
                "pipeline: a batch of {} rows does not split into {m} microbatches",
                batch.batch
            )));
        }
        let (mbs, seq) = (batch.batch / m, batch.seq);
        let hidden = [mbs, seq, p.hidden];
        let hidden_len = TensorParallel::stage_numel(self.store.tp(), mbs * seq, p.hidden);
        let dtype = self.store.compute_dtype;
        let comm = p.comm.as_ref();
        let mut inbox = Inbox::new(s, p.pp_rank);
        let mut live: HashMap<(usize, usize), Live> = HashMap::new();
        let mut loss_sum = 0f64;
        let missing = |a: &Action| Error::Config(format!("pipeline schedule: {a} before its F"));
        for a in &s.per_rank[p.pp_rank] {
            let (stage, mb) = (a.stage(), a.microbatch());
            let rows = mb * mbs * seq..(mb + 1) * mbs * seq;
            match a {
                Action::Forward { .. } => {
                    let k = p.local.iter().position(|&x| x == stage).ok_or_else(|| {
                        Error::Config(format!("pipeline schedule: {a} is not on this rank"))
                    })?;
                    let mut tape = Tape::new(be, &self.store, Placement::Owned);
                    let mut held = Vec::new();
                    let (x, input) = match s.recv_before(a) {
                        None if stage == 0 => (
                            tape.input_i32(&batch.inputs[rows.clone()], [mbs, seq])?,
                            None,
                        ),
                        None => return Err(missing(a)),
                        Some(t) => {
                            let mem = inbox.take(t, hidden_len, dtype, comm, be)?;
                            let buf = Buf::new(mem.ptr(), hidden_len, dtype);
                            held.push(mem);
                            let x = tape.stage_activation(buf, hidden, true)?;
                            (x, Some(x))
                        }
                    };
                    let out = models.models[k].forward(&mut tape, x)?;
                    let root = if stage == p.last_stage() {
                        let labels = tape.input_i32(&batch.labels[rows], [mbs * seq])?;
                        let loss = (self.spec.loss)(&mut tape, out, labels, grad_scale)?;
                        loss_sum += tape.to_vec_f32(loss)?[0] as f64;
                        loss
                    } else {
                        if let Some(t) = s.send_after(a) {
                            comm.send(tape.device_buf(out)?, t.to_rank)?;
                        }
                        out
                    };
                    let l = Live {
                        tape,
                        input,
                        root,
                        held,
                    };
                    live.insert((stage, mb), l);
                }
                Action::Backward { .. } | Action::BackwardInput { .. } => {
                    let l = live.get_mut(&(stage, mb)).ok_or_else(|| missing(a))?;
                    let seed = match s.recv_before(a) {
                        Some(t) => {
                            let mem = inbox.take(t, hidden_len, dtype, comm, be)?;
                            let buf = Buf::new(mem.ptr(), hidden_len, dtype);
                            l.held.push(mem);
                            Some(l.tape.stage_activation(buf, hidden, false)?)
                        }
                        None => None,
                    };
                    let split = matches!(a, Action::BackwardInput { .. });
                    let inputs: Vec<Tensor> = l.input.into_iter().collect();
                    let g = l.tape.backward_from(l.root, seed, &inputs, split)?;
                    if let Some(t) = s.send_after(a) {
                        let dx = g.first().copied().flatten().ok_or_else(|| {
                            Error::Config(format!("pipeline: no gradient reached the input of {a}"))
                        })?;
                        comm.send(l.tape.device_buf(dx)?, t.to_rank)?;
                    }
                }
                Action::BackwardWeight { .. } => {
                    let l = live.get_mut(&(stage, mb)).ok_or_else(|| missing(a))?;
                    l.tape.backward_weights()?;
                }
            }
            let held: usize = live
                .values()
                .map(|l| {
                    l.tape.owned_bytes_live() + l.held.iter().map(|m| m.bytes()).sum::<usize>()
                })
                .sum::<usize>()
                + inbox.bytes();
            p.peak_activations.set(p.peak_activations.get().max(held));
            if matches!(a, Action::Backward { .. } | Action::BackwardWeight { .. }) {
                live.remove(&(stage, mb)); // frees the tape's buffers
            }
        }
        if let Some(((stage, mb), _)) = live.iter().next() {
            return Err(Error::Config(format!(
                "pipeline schedule: stage {stage} microbatch {mb} has no backward"
            )));
        }
        Ok(loss_sum)
    }
}

/// The width of the hidden state between stages: the first stage's output on a 1 x 1 input,
/// traced on the meta backend.
pub(super) fn hidden_dim(spec: &ModelSpec, args: &dyn ModelArgs, dtype: DType) -> Result<usize> {
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
    let fake = Buf::new(0, TensorParallel::stage_numel(store.tp(), b * s, hidden), dtype);
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
