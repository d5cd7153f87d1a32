//! The memory plan of a pp rank: each of its stages traced on the meta backend (one microbatch's
//! forward and backward, split into I and W for zero-bubble, as `run_schedule` runs them) and
//! planned like a plain step over two arenas: what lives across the tape's passes in an arena
//! of its own, what dies inside a pass in one scratch the rank's tapes share (a rank runs one
//! pass at a time). Then the schedule replayed on sizes: the own arenas its pool holds at most
//! (one per stage microbatch in flight, and those a held-back send still reads) and the
//! received hidden states. Validation's forward through the stages is traced and planned too;
//! it runs in the idle scratch when that holds it.

use super::wire::{Book, Pool};
use super::Layout;
use crate::backend::meta::MetaBackend;
use crate::backend::Buf;
use crate::error::{Error, Result};
use crate::model::{ModelArgs, ModelSpec};
use crate::parallel::fsdp::{FsdpLayout, Reshard};
use crate::parallel::pipeline::Stage;
use crate::parallel::schedule::{Action, Kind, Schedule};
use crate::parallel::tp::{local_specs, TensorParallel};
use crate::params::ParamStore;
use crate::planner::Plan;
use crate::tape::{Placement, Tape};
use crate::tensor::DType;
use crate::train::config::JobConfig;
use crate::train::memory::MemoryPlan;
use crate::train::validate::validation_arena_bytes;
use std::collections::HashMap;

impl Layout {
    /// The memory of this rank's stages: the state of its parameters, the activations of its
    /// schedule (`replay`) and of a validation pass. Keeps each local stage's plans (training
    /// and validation) for `connect`. The returned step plan is empty: stage tapes run in
    /// arenas of their own.
    pub fn trace_plan(
        &mut self,
        spec: &ModelSpec,
        cfg: &JobConfig,
        args: &dyn ModelArgs,
        dtype: DType,
    ) -> Result<(Plan, Option<Plan>, MemoryPlan)> {
        let shape = self.micro_shape(cfg);
        let hidden = super::hidden_dim(spec, args, dtype)?;
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
        let store = ParamStore::materialize_sharded(builder, &meta, dtype, None, tp)?;
        // Every message is one microbatch's hidden state (this tp rank's token shard under SP).
        let rows = shape.0 * shape.1;
        let msg = TensorParallel::stage_numel(store.tp(), rows, hidden) * dtype.size();
        let mut state = store.state_bytes();
        if let Some(l) = &fsdp {
            let reduce = DType::parse(&cfg.training.mixed_precision_reduce)?;
            state = state.sharded_as(l, dtype, reduce);
        }
        let split = self.schedule.kind == Kind::InterleavedZeroBubble;
        let (mut unplanned, mut buffers, mut ops, mut num_params) = (0, 0, 0, 0);
        let mut plans = Vec::new();
        for s in self.local() {
            let st = &self.stages[s];
            let pass = Pass::Train { split };
            let t = trace_stage(
                spec,
                cfg,
                args,
                st,
                dtype,
                shape,
                (hidden, self.tp_rank),
                pass,
            )?;
            unplanned = unplanned.max(t.plan.unplanned);
            buffers += t.plan.requests.len();
            ops += t.ops;
            num_params += t.num_params;
            plans.push(t.plan);
        }
        let in_flight = self.schedule.peak_in_flight(self.pp_rank).max(1);
        let peaks: Vec<usize> = plans.iter().map(arena_bytes).collect();
        let replayed = replay(&self.schedule, self.pp_rank, &self.local(), &peaks, msg)?;
        let v = &cfg.validation;
        let mut validation_activations = 0;
        self.val_plans.clear();
        if v.enable {
            let vshape = (
                v.local_batch_size.max(1) as usize,
                v.seq_len.max(1) as usize,
            );
            for s in self.local() {
                let st = &self.stages[s];
                let tp = (hidden, self.tp_rank);
                let t = trace_stage(spec, cfg, args, st, dtype, vshape, tp, Pass::Validate)?;
                self.val_plans.push(t.plan);
            }
            // Its arena (unless the idle scratch holds it) and at most two received hidden
            // states (one a stage without layers passes on, until its send is posted).
            let need = validation_bytes(&self.val_plans);
            let vmsg = TensorParallel::stage_numel(store.tp(), vshape.0 * vshape.1, hidden);
            validation_activations =
                validation_arena_bytes(scratch_bytes(&plans), need) + 2 * vmsg * dtype.size();
        }
        let mp = MemoryPlan {
            state,
            activations_peak: replayed + scratch_bytes(&plans),
            activations_unplanned: unplanned * in_flight,
            validation_activations,
            buffers,
            ops,
            num_params,
        };
        self.plans = plans;
        // Validation runs through the stages (`validate_pipelined`) on the plans kept above.
        let validation = cfg.validation.enable.then(|| Plan::new(Vec::new()));
        Ok((Plan::new(Vec::new()), validation, mp))
    }
}

/// The bytes of a stage tape's own arena (what it holds across its passes).
pub(super) fn arena_bytes(plan: &Plan) -> usize {
    plan.region_peak[0].max(256)
}

/// The arena a validation pass through this rank's stages needs (one stage at a time).
pub(super) fn validation_bytes(plans: &[Plan]) -> usize {
    plans.iter().map(|p| p.peak).max().unwrap_or(0).max(256)
}

/// The bytes of the scratch a rank's stage tapes share (the transient buffers of one pass).
pub(super) fn scratch_bytes(plans: &[Plan]) -> usize {
    plans
        .iter()
        .map(|p| p.region_peak[1])
        .max()
        .unwrap_or(0)
        .max(256)
}

/// The most activation bytes `run_schedule` holds on rank `me` besides the shared scratch: what
/// its pool has allocated, the tapes' own arenas (`peaks`, per local stage) and the received
/// messages (`msg` bytes each), replaying on sizes the order in which it takes from the pool,
/// sends, receives and returns to the pool.
pub(super) fn replay(
    s: &Schedule,
    me: usize,
    local: &[usize],
    peaks: &[usize],
    msg: usize,
) -> Result<usize> {
    let mut book = Book::new(s, &s.per_rank, me);
    let mut pool = Pool::<usize>::default();
    // Sends held back; memory they read (`kept`), and memory free to go back (`done`).
    let (mut pending, mut kept, mut done) = (0usize, Vec::new(), Vec::new());
    // Per (stage, microbatch) in flight: its arena and the messages its tape holds.
    let mut live: HashMap<(usize, usize), (usize, usize)> = HashMap::new();
    let mut peak = 0;
    for a in &s.per_rank[me] {
        let key = (a.stage(), a.microbatch());
        done.drain(..).for_each(|m| pool.put(m));
        let mut got = 0;
        if let Some(t) = s.recv_before(a) {
            for (i, _) in book.receive(t)?.iter().enumerate() {
                pool.take(msg, Ok)?;
                if i == 0 {
                    // Its group posts the pending sends: what they read may go back.
                    pending = 0;
                    done.append(&mut kept);
                }
            }
            got = 1;
        }
        match a {
            Action::Forward { .. } => {
                let k = local.iter().position(|&x| x == a.stage()).ok_or_else(|| {
                    Error::Config(format!("pipeline schedule: {a} is not on this rank"))
                })?;
                done.drain(..).for_each(|m| pool.put(m));
                let arena = pool.take(peaks[k], Ok)?;
                live.insert(key, (arena, got));
            }
            _ => {
                let l = live
                    .get_mut(&key)
                    .ok_or_else(|| Error::Config(format!("pipeline schedule: {a} before its F")))?;
                l.1 += got;
            }
        }
        if s.send_after(a).is_some() {
            pending += 1;
        }
        peak = peak.max(pool.allocated);
        if matches!(a, Action::Backward { .. } | Action::BackwardWeight { .. }) {
            if let Some((arena, msgs)) = live.remove(&key) {
                let back = if pending == 0 { &mut done } else { &mut kept };
                back.push(arena);
                back.extend(std::iter::repeat_n(msg, msgs));
            }
        }
    }
    Ok(peak)
}

/// What a stage trace runs: a training microbatch as `run_schedule` does (`split`: I and W),
/// or a validation batch as `forward_stages` does.
#[derive(Clone, Copy)]
enum Pass {
    Train { split: bool },
    Validate,
}

/// One stage microbatch traced on the meta backend.
struct StageTrace {
    plan: Plan,
    ops: usize,
    num_params: usize,
}

#[allow(clippy::too_many_arguments)]
fn trace_stage(
    spec: &ModelSpec,
    cfg: &JobConfig,
    args: &dyn ModelArgs,
    st: &Stage,
    dtype: DType,
    (b, s): (usize, usize),
    (hidden, tp_rank): (usize, usize),
    pass: Pass,
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
    let split = match pass {
        Pass::Train { split } => split,
        Pass::Validate => false,
    };
    let train = matches!(pass, Pass::Train { .. });
    let x = if st.embedding {
        tape.input_i32(&vec![0; b * s], [b, s])?
    } else {
        tape.stage_activation(fake, shape, train)?
    };
    let out = models[0].forward(&mut tape, x)?;
    if !train {
        // `forward_stages`: the loss, or the output read by its send.
        if st.output {
            let labels = tape.input_i32(&vec![0; b * s], [b * s])?;
            (spec.loss)(&mut tape, out, labels, 1.0)?;
        } else {
            tape.device_buf(out)?;
        }
        return Ok(StageTrace {
            plan: tape.plan(),
            ops: tape.num_nodes(),
            num_params: store.num_params(),
        });
    }
    let (root, seed) = if st.output {
        let labels = tape.input_i32(&vec![0; b * s], [b * s])?;
        ((spec.loss)(&mut tape, out, labels, 1.0)?, None)
    } else {
        (out, Some(tape.stage_activation(fake, shape, false)?))
    };
    let forward_end = tape.clock();
    let inputs: Vec<_> = (!st.embedding).then_some(x).into_iter().collect();
    let g = tape.backward_from(root, seed, &inputs, split)?;
    let input_grad_end = tape.clock();
    if split {
        tape.backward_weights()?;
    }
    // Buffers that live across the tape's passes (F | B or I | W) go in its own arena; the
    // others die inside one pass, in the scratch its rank's tapes share (one pass runs at a
    // time). So do the stage's output and its input gradient: held-back sends read them after
    // their pass.
    let phase = |c: u32| (c >= forward_end) as u8 + (c >= input_grad_end) as u8;
    let sent: Vec<usize> = [(!st.output).then_some(out), g.first().copied().flatten()]
        .into_iter()
        .flatten()
        .filter_map(|t| tape.request_of(t))
        .collect();
    let requests = tape.requests();
    let region = requests
        .iter()
        .enumerate()
        .map(|(k, r)| {
            let held = phase(r.first) != phase(r.last) || sent.contains(&k);
            if held {
                0
            } else {
                1
            }
        })
        .collect();
    Ok(StageTrace {
        plan: Plan::with_regions(requests, region),
        ops: tape.num_nodes(),
        num_params: store.num_params(),
    })
}
