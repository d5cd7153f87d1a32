//! One pipeline-parallel step traced on the meta backend for the cost model: every stage's
//! forward, input-gradient and weight-gradient passes of one microbatch (their kernels and
//! tensor-parallel collectives, split by the tape as zero-bubble runs them), the tail of pp rank
//! 0's step (tied-embedding and replica all-reduces, the norm, AdamW), and the schedule that
//! orders the passes. `cli::estimate` times each pass, simulates the schedule and adds the tail.

use super::config::JobConfig;
use super::pipeline::{hidden_dim, Layout};
use crate::backend::meta::{MetaBackend, MetaEvent};
use crate::backend::{AdamW, AdamWBufs, Backend, Buf};
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
        let forward = meta.take_events();
        tape.backward_from(root, seed, &[x], true)?;
        let input = meta.take_events();
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
    if g.dp_replicate > 1 {
        let stride = g.dp_shard * g.cp * g.tp;
        let rep = MetaComm::new((0, g.dp_replicate, stride), "dp_replicate", log.clone());
        rep.all_reduce(store.flat_grad(), ReduceOp::Sum)?;
    }
    meta.sum_squares(&[store.flat_grad()], scalar(0))?;
    let replica = MetaComm::new((0, dims.world / g.dp_replicate, 1), "replica", log);
    replica.all_reduce(scalar(0), ReduceOp::Sum)?;
    meta.clip_coef(scalar(0), 1.0, scalar(1))?;
    let (m, v) = store.flat_moments();
    let bufs = AdamWBufs {
        param: store.flat_master(),
        grad: store.flat_grad(),
        m,
        v,
        compute: store.flat_compute(),
        grad_scale: scalar(1),
    };
    let hp = AdamW {
        lr: 0.0,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
    };
    meta.adamw(&bufs, &hp)?;
    Ok(meta.take_events())
}
