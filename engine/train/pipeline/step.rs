//! One pipeline step on a pp rank: its action list of the schedule over the microbatches
//! (forward, backward, or zero-bubble's input and weight halves, with the send / recv between
//! stages), then the cross-stage reductions and AdamW; and validation through the stages.

use super::plan::{arena_bytes, scratch_bytes};
use super::wire::Wire;
use super::{Pipeline, StageModels};
use crate::backend::{Buf, DeviceMem};
use crate::data::Batch;
use crate::dist::ReduceOp;
use crate::error::{Error, Result};
use crate::parallel::schedule::Action;
use crate::parallel::tp::TensorParallel;
use crate::planner::Plan;
use crate::tape::{Placement, Tape, Tensor};
use crate::train::trainer::{StepResult, Trainer};
use crate::train::validate::{ValMetrics, Validator};
use std::collections::HashMap;

/// One stage microbatch in flight: its tape, the arena it runs in and the received buffers it
/// reads.
struct Live<'t> {
    tape: Tape<'t>,
    arena: Box<dyn DeviceMem>,
    input: Option<Tensor>,
    /// The loss (last stage) or the output hidden state.
    root: Tensor,
    held: Vec<Box<dyn DeviceMem>>,
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
    /// read); the last stages' loss sums and token counts are reduced over the world.
    pub(in crate::train) fn validate_pipelined(
        &self,
        v: &mut Validator,
        step: u64,
    ) -> Result<ValMetrics> {
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
        let forward = |stage| Action::Forward {
            stage,
            microbatch: 0,
        };
        // Every rank's stages in order: each reads its predecessor's output.
        let rows: Vec<Vec<Action>> = (0..s.pp)
            .map(|q| {
                (0..s.stages())
                    .filter(|&st| s.rank_of(st) == q)
                    .map(forward)
                    .collect()
            })
            .collect();
        let mut wire = Wire::new(comm, s, &rows, p.pp_rank);
        let mut loss = None;
        let base = p.validation_base(be)?;
        for (k, &stage) in p.local.iter().enumerate() {
            let a = forward(stage);
            let mut held = None; // outlives the tape that reads it
            let plan = p.val_plans.get(k).ok_or_else(|| {
                Error::Config("pipeline: validation's stages were not traced".into())
            })?;
            let mut tape = Tape::new(be, &self.store, Placement::Planned { base, plan });
            let x = match s.recv_before(&a) {
                None => tape.input_i32(&b.inputs, [b.batch, b.seq])?,
                Some(t) => {
                    let m = wire.take(t, len, dtype, &mut |n| be.alloc(n))?;
                    let buf = Buf::new(m.ptr(), len, dtype);
                    held = Some(m);
                    tape.stage_activation(buf, hidden, false)?
                }
            };
            let out = models.models[k].forward(&mut tape, x)?;
            match s.send_after(&a) {
                None => {
                    let labels = tape.input_i32(&b.labels, [b.batch * b.seq])?;
                    let l = (self.spec.loss)(&mut tape, out, labels, 1.0)?;
                    comm.wait()?; // NCCL: the host blocks on the download below
                    loss = Some(tape.to_vec_f32(l)?[0] as f64);
                }
                Some(t) => {
                    // Posted by the next stage's receive, before its forward reuses the arena
                    // (every local stage after the first receives), or by the flush. A stage
                    // without layers sends the received buffer itself: it goes with the send.
                    wire.send(tape.device_buf(out)?, t.to_rank);
                    if let Some(m) = held.take() {
                        wire.retire(m);
                    }
                }
            }
            drop(tape);
            drop(held);
        }
        wire.flush()?;
        Ok(loss)
    }

    /// One optimizer step of a pp > 1 run: `accum` local batches through the schedule, the
    /// shared parameters' gradients summed, the norm over every stage, AdamW on this rank's.
    pub(in crate::train) fn pipeline_step(&mut self) -> Result<StepResult> {
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
        if let Some(f) = self.store.fsdp() {
            // FSDP within each stage: the unit gradient slots accumulate every microbatch of
            // the step (several stage tapes are in flight); each unit reduces once, below.
            f.set_sync(false);
        }
        let mut loss_sum = 0f64;
        let mut tokens = 0;
        for batch in &batches {
            loss_sum += self.run_schedule(p, batch, grad_scale)?;
            tokens += batch.batch * batch.seq;
        }
        if let Some(f) = self.store.fsdp() {
            f.set_sync(true);
            for u in 0..f.layout.units.len() {
                self.store.reduce_unit(be, u)?;
            }
            f.comm().wait()?;
        }
        for s in &p.shared {
            // FSDP: the two stages' copies are sharded alike, so their local shards add up.
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
        // Each stage holds its own parameters, each FSDP rank its shards of them, each tp rank
        // its slices: their squares sum over the replica to the global norm's.
        Ok(self.clip_and_update(step, loss, tokens)?.0)
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
        let mut wire = Wire::new(comm, s, &s.per_rank, p.pp_rank);
        let mut live: HashMap<(usize, usize), Live> = HashMap::new();
        let mut loss_sum = 0f64;
        let missing = |a: &Action| Error::Config(format!("pipeline schedule: {a} before its F"));
        // Arenas and message buffers come from one pool and go back to it once no send reads
        // them; `plan::replay` follows the same order of takes and returns.
        let pool = &p.arenas;
        let drain = |wire: &mut Wire| {
            let mut pool = pool.borrow_mut();
            wire.released().into_iter().for_each(|m| pool.put(m));
        };
        let mut alloc = |n: usize| pool.borrow_mut().take(n, |n| be.alloc(n));
        for a in &s.per_rank[p.pp_rank] {
            let (stage, mb) = (a.stage(), a.microbatch());
            drain(&mut wire);
            let rows = mb * mbs * seq..(mb + 1) * mbs * seq;
            match a {
                Action::Forward { .. } => {
                    let k = p.local.iter().position(|&x| x == stage).ok_or_else(|| {
                        Error::Config(format!("pipeline schedule: {a} is not on this rank"))
                    })?;
                    let mut held = Vec::new();
                    let input = match s.recv_before(a) {
                        Some(t) => Some(wire.take(t, hidden_len, dtype, &mut alloc)?),
                        None if stage == 0 => None,
                        None => return Err(missing(a)),
                    };
                    let plan = &p.plans[k];
                    drain(&mut wire);
                    let arena = alloc(arena_bytes(plan))?;
                    let bases = [arena.ptr(), p.scratch(be)?];
                    let mut tape = Tape::new(be, &self.store, Placement::Regions { bases, plan });
                    let (x, input) = match input {
                        None => (
                            tape.input_i32(&batch.inputs[rows.clone()], [mbs, seq])?,
                            None,
                        ),
                        Some(mem) => {
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
                        comm.wait()?; // NCCL: the host blocks on the download below
                        loss_sum += tape.to_vec_f32(loss)?[0] as f64;
                        loss
                    } else {
                        if let Some(t) = s.send_after(a) {
                            // The tape outlives the send: the gradient that its backward
                            // waits for can only come after the send was posted.
                            wire.send(tape.device_buf(out)?, t.to_rank);
                        }
                        out
                    };
                    let l = Live {
                        tape,
                        arena,
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
                            let mem = wire.take(t, hidden_len, dtype, &mut alloc)?;
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
                        // In the tape's arena, which is retired into the wire (below) until
                        // the send is posted; the plan keeps dx alive through W.
                        wire.send(l.tape.device_buf(dx)?, t.to_rank);
                    }
                }
                Action::BackwardWeight { .. } => {
                    let l = live.get_mut(&(stage, mb)).ok_or_else(|| missing(a))?;
                    l.tape.backward_weights()?;
                }
            }
            // What `plan::replay` counts: the pool (arenas, messages) and the scratch.
            let held = pool.borrow().allocated + scratch_bytes(&p.plans);
            p.peak_activations.set(p.peak_activations.get().max(held));
            if matches!(a, Action::Backward { .. } | Action::BackwardWeight { .. }) {
                if let Some(l) = live.remove(&(stage, mb)) {
                    drop(l.tape);
                    // A send may still read them: the stage's output or input gradient (in
                    // the arena), or a received buffer a stage without layers passes on.
                    wire.retire(l.arena);
                    l.held.into_iter().for_each(|m| wire.retire(m));
                }
            }
        }
        wire.flush()?;
        drain(&mut wire);
        if let Some(((stage, mb), _)) = live.iter().next() {
            return Err(Error::Config(format!(
                "pipeline schedule: stage {stage} microbatch {mb} has no backward"
            )));
        }
        Ok(loss_sum)
    }
}
