//! One training step of a layout, traced on the meta backend: every kernel the trainer's step
//! launches on one rank (forward, backward, recomputation, FSDP copy-outs and packs, the
//! optimizer) and every collective it issues (the FSDP runtime's own all-gathers and
//! reduce-scatters, DDP / HSDP's all-reduce, the host-value all-reduces), in order. The same code
//! paths as `Trainer::train_step` run, so what is gathered again in backward is what the slots
//! decide, not a formula. `planner::cost` turns the log into a step time.

use super::config::JobConfig;
use super::dist::reduce_dtype;
use crate::backend::meta::{MetaBackend, MetaEvent};
use crate::backend::{AdamW, AdamWBufs, Backend, Buf};
use crate::dist::meta::MetaComm;
use crate::dist::{Communicator, ParallelDims, ReduceOp};
use crate::error::Result;
use crate::model::{ModelArgs, ModelSpec};
use crate::parallel::fsdp::{FsdpLayout, Reshard};
use crate::parallel::tp::{local_specs, TensorParallel};
use crate::params::{ParamStore, Sharding};
use crate::tape::{Placement, Tape};
use crate::tensor::DType;

/// A traced step of rank 0 (the rank with the largest shards).
pub struct StepTrace {
    pub events: Vec<MetaEvent>,
    /// Tokens rank 0 trains on per step (local batch x seq x accumulation steps).
    pub tokens: usize,
    pub accum: usize,
    /// The FSDP layout (dp_shard > 1).
    pub layout: Option<FsdpLayout>,
}

/// Micro-batches traced: the first (slots empty after the optimizer), one in the middle (slots
/// as the previous backward left them) and the last (the one that reduces); a longer
/// accumulation repeats the middle one's events.
const TRACED_MICRO_BATCHES: usize = 3;

pub fn trace_step(
    spec: &ModelSpec,
    cfg: &JobConfig,
    args: &dyn ModelArgs,
    dtype: DType,
    dims: &ParallelDims,
) -> Result<StepTrace> {
    let g = dims.degrees;
    let accum = cfg.gradient_accumulation_steps(dims.dp())?;
    let meta = MetaBackend::new();
    let log = meta.log();
    let (model, builder) = spec.build_for(args, cfg)?;
    let mut layout = None;
    let tp = TensorParallel::meta(&cfg.parallelism, builder.tp_dims(), log.clone(), 0);
    let local = local_specs(&builder.params, &builder.tp_dims(), g.tp, 0);
    let sharding = if g.dp_shard > 1 {
        let reshard = Reshard::parse(&cfg.parallelism.fsdp_reshard_after_forward)?;
        let l = FsdpLayout::new(
            &local,
            &builder.fsdp_units,
            g.dp_shard,
            0,
            reshard,
            accum > 1,
        )?;
        layout = Some(l.clone());
        // Mesh order pp, dp_replicate, dp_shard, cp, tp: dp_shard ranks are cp x tp apart.
        let comm = MetaComm::new((0, g.dp_shard, g.cp * g.tp), "dp_shard", log.clone());
        Some(Sharding {
            layout: l,
            comm: Box::new(comm),
            reduce_dtype: reduce_dtype(cfg)?,
        })
    } else {
        None
    };
    let store = ParamStore::materialize_sharded(builder, &meta, dtype, sharding, tp)?;
    let scalars = meta.alloc(256)?;
    let scalar = |i: usize| crate::backend::Buf::new(scalars.ptr() + 4 * i as u64, 1, DType::F32);
    meta.take_events(); // set-up is not part of a step
    let multi = dims.world > 1;
    let world = MetaComm::new((0, dims.world, 1), "world", log.clone());
    let host_reduce = |n: usize| -> Result<()> {
        if multi {
            world.all_reduce(crate::backend::Buf::new(0, n, DType::F32), ReduceOp::Sum)?;
            world.wait()?;
        }
        Ok(())
    };
    host_reduce(3)?; // the global token count
    store.zero_grads(&meta)?;
    let (b, s) = (
        cfg.training.local_batch_size as usize,
        cfg.training.seq_len as usize,
    );
    let traced = accum.min(TRACED_MICRO_BATCHES);
    let mut middle = (0, 0);
    let zeros = vec![0i32; b * s];
    for i in 0..traced {
        let start = log.lock().map_or(0, |l| l.len());
        if let Some(f) = store.fsdp() {
            f.set_sync(i + 1 == traced);
        }
        let mut tape = Tape::new(&meta, &store, Placement::Owned);
        let tokens = tape.input_i32(&zeros, [b, s])?;
        let labels = tape.input_i32(&zeros, [b * s])?;
        let loss = spec.loss_of(model.as_ref(), &mut tape, tokens, labels, 1.0)?;
        tape.backward(loss)?;
        tape.to_vec_f32(loss)?;
        if i == 1 {
            middle = (start, log.lock().map_or(0, |l| l.len()));
        }
    }
    if accum > traced {
        let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
        let seg: Vec<MetaEvent> = l[middle.0..middle.1].to_vec();
        let tail = l.split_off(middle.1);
        for _ in traced..accum {
            l.extend(seg.iter().cloned());
        }
        l.extend(tail);
    }
    if let Some(f) = store.fsdp() {
        f.comm().wait()?;
    }
    if g.dp_replicate > 1 {
        let stride = g.dp_shard * g.cp * g.tp;
        let rep = MetaComm::new((0, g.dp_replicate, stride), "dp_replicate", log.clone());
        rep.all_reduce(store.flat_grad(), ReduceOp::Sum)?;
        rep.wait()?;
    }
    host_reduce(1)?; // the loss
    meta.sum_squares(&[store.flat_grad()], scalar(0))?;
    if let Some(tp) = store.tp() {
        // The replicated weights' partial gradients, then the norm over the whole replica.
        tp.reduce_partials(&meta, |id| store.local_grad(id))?;
        let replica = MetaComm::new((0, dims.world / g.dp_replicate, 1), "replica", log.clone());
        replica.all_reduce(scalar(0), ReduceOp::Sum)?;
        replica.wait()?;
    } else if let Some(f) = store.fsdp() {
        f.comm().all_reduce(scalar(0), ReduceOp::Sum)?;
        f.comm().wait()?;
    }
    meta.clip_coef(scalar(0), 1.0, scalar(1))?;
    if let Some(f) = store.fsdp() {
        f.drain()?;
    }
    trace_adamw(&meta, &store, scalar(1))?;
    store.shards_updated();
    Ok(StepTrace {
        events: meta.take_events(),
        tokens: b * s * accum,
        accum,
        layout,
    })
}

/// The optimizer's launch over `store`'s flat state (`coef`: the clip coefficient), on the meta
/// backend: its bytes are what the cost model times.
pub(super) fn trace_adamw(meta: &MetaBackend, store: &ParamStore, coef: Buf) -> Result<()> {
    let (m, v) = store.flat_moments();
    let bufs = AdamWBufs {
        param: store.flat_master(),
        grad: store.flat_grad(),
        m,
        v,
        compute: store.flat_compute(),
        grad_scale: coef,
    };
    let hp = AdamW {
        lr: 0.0,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
    };
    meta.adamw(&bufs, &hp)
}
