//! One pipeline-parallel step traced on the meta backend for the cost model: every stage's
//! forward, input-gradient and weight-gradient passes of one microbatch (their kernels and
//! tensor-parallel collectives, split by the tape as zero-bubble runs them), the tail of pp rank
//! 0's step (tied-embedding and replica all-reduces, the norm, AdamW), and the schedule that
//! orders the passes. `cli::estimate` times each pass, simulates the schedule and adds the tail.

use super::config::JobConfig;
use super::pipeline::{hidden_dim, Layout};
use super::step_trace::trace_adamw;
use crate::backend::meta::{CollKind, MetaBackend, MetaEvent};
use crate::backend::{Backend, Buf};
use crate::dist::meta::MetaComm;
use crate::dist::{Communicator, ParallelDims, ReduceOp};
use crate::error::Result;
use crate::model::{ModelArgs, ModelSpec};
use crate::parallel::schedule::Schedule;
use crate::parallel::tp::TensorParallel;
use crate::params::ParamStore;
use crate::tape::{Placement, Tape};
use crate::tensor::DType;

/// A traced pipeline step (see the module doc).
pub struct PipelineTrace {
    pub schedule: Schedule,
    /// Per stage: the events of one microbatch's forward, input-gradient and weight-gradient
    /// passes.
    pub passes: Vec<[Vec<MetaEvent>; 3]>,
    /// Bytes of the hidden state (or its gradient) one microbatch sends between stages.
    pub hidden_bytes: usize,
    /// Pp rank 0's step after its schedule.
    pub tail: Vec<MetaEvent>,
    /// Tokens one data-parallel rank trains on per step, and the accumulation steps.
    pub tokens: usize,
    pub accum: usize,
}

pub fn trace_pipeline(
    spec: &ModelSpec,
    cfg: &JobConfig,
    args: &dyn ModelArgs,
    dtype: DType,
    dims: &ParallelDims,
) -> Result<PipelineTrace> {
    let layout = Layout::new(spec, cfg, args, dims, 0)?;
    let (b, s) = layout.micro_shape(cfg);
    let hidden = hidden_dim(spec, args, dtype)?;
    let mut passes = Vec::with_capacity(layout.stages.len());
    let mut hidden_bytes = 0;
    for st in &layout.stages {
        let (models, builder) = spec.build_stages_for(args, cfg, std::slice::from_ref(st))?;
        let meta = MetaBackend::new();
        let tp = TensorParallel::meta(&cfg.parallelism, builder.tp_dims(), meta.log(), 0);
        let store = ParamStore::materialize_sharded(builder, &meta, dtype, None, tp)?;
        let numel = TensorParallel::stage_numel(store.tp(), b * s, hidden);
        hidden_bytes = numel * dtype.size();
        let fake = Buf::new(0, numel, dtype);
        meta.take_events();
        let mut tape = Tape::new(&meta, &store, Placement::Owned);
        let x = if st.embedding {
            tape.input_i32(&vec![0; b * s], [b, s])?
        } else {
            tape.stage_activation(fake, [b, s, hidden], true)?
        };
        let out = models[0].forward(&mut tape, x)?;
        let (root, seed) = if st.output {
            let labels = tape.input_i32(&vec![0; b * s], [b * s])?;
            ((spec.loss)(&mut tape, out, labels, 1.0)?, None)
        } else {
            (
                out,
                Some(tape.stage_activation(fake, [b, s, hidden], false)?),
            )
        };
        let mut forward = fsdp_gather(dims, &store, dtype);
        forward.extend(meta.take_events());
        forward.push(MetaEvent::OrderCompute); // the pass ends after its gathers
        tape.backward_from(root, seed, &[x], true)?;
        // The stage's units are gathered again for its backward (resharded after forward).
        let mut input = fsdp_gather(dims, &store, dtype);
        input.extend(meta.take_events());
        input.push(MetaEvent::OrderCompute);
        tape.backward_weights()?;
        passes.push([forward, input, meta.take_events()]);
    }
    let tail = trace_tail(spec, cfg, args, dtype, dims, &layout)?;
    let accum = cfg.gradient_accumulation_steps(dims.dp())?;
    let tokens = cfg.training.local_batch_size as usize * cfg.training.seq_len as usize * accum;
    Ok(PipelineTrace {
        schedule: layout.schedule,
        passes,
        hidden_bytes,
        tail,
        tokens,
        accum,
    })
}

/// Pp rank 0's work after its schedule: the tensor-parallel partial-gradient and replica
/// all-reduces, the norm over the replica, AdamW over its stages' state.
fn trace_tail(
    spec: &ModelSpec,
    cfg: &JobConfig,
    args: &dyn ModelArgs,
    dtype: DType,
    dims: &ParallelDims,
    layout: &Layout,
) -> Result<Vec<MetaEvent>> {
    let g = dims.degrees;
    let meta = MetaBackend::new();
    let log = meta.log();
    let (_, builder) = layout.build(spec, args, cfg)?;
    let tp = TensorParallel::meta(&cfg.parallelism, builder.tp_dims(), log.clone(), 0);
    let store = ParamStore::materialize_sharded(builder, &meta, dtype, None, tp)?;
    let scalars = meta.alloc(256)?;
    let scalar = |i: usize| Buf::new(scalars.ptr() + 4 * i as u64, 1, DType::F32);
    meta.take_events();
    let mut tail = Vec::new();
    if g.dp_shard > 1 {
        // Each unit's gradients reduce-scatter once per step, after the schedule.
        let bytes = 4 * store.num_params() / g.tp;
        tail.push(MetaEvent::Collective {
            kind: CollKind::ReduceScatter,
            group: g.dp_shard,
            span: (g.dp_shard - 1) * g.cp * g.tp + 1,
            comm: "dp_shard",
            bytes: bytes as f64,
            started: false,
        });
    }
    if g.dp_replicate > 1 {
        let stride = g.dp_shard * g.cp * g.tp;
        let rep = MetaComm::new((0, g.dp_replicate, stride), "dp_replicate", log.clone());
        rep.all_reduce(store.flat_grad(), ReduceOp::Sum)?;
    }
    meta.sum_squares(&[store.flat_grad()], scalar(0))?;
    let replica = MetaComm::new((0, dims.world / g.dp_replicate, 1), "replica", log);
    replica.all_reduce(scalar(0), ReduceOp::Sum)?;
    meta.clip_coef(scalar(0), 1.0, scalar(1))?;
    trace_adamw(&meta, &store, scalar(1))?;
    tail.extend(meta.take_events());
    Ok(tail)
}

/// FSDP within a stage (dp_shard > 1): the all-gather of the stage's parameters (this tp
/// rank's slices, in the compute dtype) that precedes a pass, issued ahead on the
/// communication stream (prefetched unit by unit, so it overlaps the pass's compute).
fn fsdp_gather(dims: &ParallelDims, store: &ParamStore, dtype: DType) -> Vec<MetaEvent> {
    let g = dims.degrees;
    if g.dp_shard <= 1 {
        return Vec::new();
    }
    let bytes: usize = store
        .ids()
        .map(|id| store.local_shape(id).numel() * dtype.size())
        .sum();
    vec![MetaEvent::Collective {
        kind: CollKind::AllGather,
        group: g.dp_shard,
        span: (g.dp_shard - 1) * g.cp * g.tp + 1,
        comm: "dp_shard",
        bytes: bytes as f64,
        started: true,
    }]
}
