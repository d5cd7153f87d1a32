//! The memory of a configuration, traced on the meta backend without allocating it: one
//! micro-batch's forward and backward planned into the activation arena, plus the persistent
//! state (what `titan plan` prints and the trainer allocates).

use super::config::JobConfig;
use super::validate::validation_arena_bytes;
use crate::backend::meta::MetaBackend;
use crate::error::Result;
use crate::model::{ModelArgs, ModelSpec};
use crate::parallel::tp::TensorParallel;
use crate::params::{ParamStore, StateBytes};
use crate::planner::Plan;
use crate::tape::{Placement, Tape};
use crate::tensor::DType;

/// The compute dtype: bf16 on CUDA (torchtitan's mixed_precision_param), f32 on the CPU backend,
/// whose reference kernels compute in f32 anyway.
pub fn compute_dtype(cfg: &JobConfig, backend_name: &str) -> Result<DType> {
    if backend_name == "cpu" {
        return Ok(DType::F32);
    }
    DType::parse(&cfg.training.mixed_precision_param)
}

/// Memory of one configuration, computed on the meta backend without allocating it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemoryPlan {
    pub state: StateBytes,
    pub activations_peak: usize,
    pub activations_unplanned: usize,
    /// Validation's own arena, when its forward pass does not fit in the training arena.
    pub validation_activations: usize,
    pub buffers: usize,
    pub ops: usize,
    pub num_params: usize,
}

impl MemoryPlan {
    pub fn total(&self) -> usize {
        self.state.total() + self.activations_peak + self.validation_activations
    }
}

/// Traces one micro-batch of `batch x seq` tokens (forward, and backward when `backward`) of the
/// architecture `args` on the meta backend and plans it. Returns the plan, the number of ops and
/// the store's sizes.
fn trace(
    spec: &ModelSpec,
    cfg: &JobConfig,
    args: &dyn ModelArgs,
    dtype: DType,
    (b, s): (usize, usize),
    backward: bool,
    tp_rank: usize,
) -> Result<(Plan, usize, StateBytes, usize)> {
    let (model, builder) = spec.build_for(args, cfg)?;
    let meta = MetaBackend::new();
    let tp = TensorParallel::meta(&cfg.parallelism, builder.tp_dims(), meta.log(), tp_rank);
    let store = ParamStore::materialize_sharded(builder, &meta, dtype, None, tp)?;
    let zeros = vec![0i32; b * s];
    let mut tape = Tape::new(&meta, &store, Placement::Owned);
    let tokens = tape.input_i32(&zeros, [b, s])?;
    let labels = tape.input_i32(&zeros, [b * s])?;
    let loss = spec.loss_of(model.as_ref(), &mut tape, tokens, labels, 1.0)?;
    if backward {
        tape.backward(loss)?;
    }
    tape.to_vec_f32(loss)?;
    Ok((
        tape.plan(),
        tape.num_nodes(),
        store.state_bytes(),
        store.num_params(),
    ))
}

/// Traces one training micro-batch (forward, backward) of the architecture `args` on the meta
/// backend and plans it; with validation enabled, also the validation batch's forward pass.
/// Returns (training plan, validation plan, memory). `tp_rank`: the tensor-parallel rank whose
/// slices are traced (they differ by a row where a split dim does not divide).
pub fn trace_plan(
    spec: &ModelSpec,
    cfg: &JobConfig,
    args: &dyn ModelArgs,
    dtype: DType,
    tp_rank: usize,
) -> Result<(Plan, Option<Plan>, MemoryPlan)> {
    let shape = (
        cfg.training.local_batch_size as usize,
        cfg.training.seq_len as usize,
    );
    let (plan, ops, state, num_params) = trace(spec, cfg, args, dtype, shape, true, tp_rank)?;
    let v = &cfg.validation;
    let validation = if v.enable {
        let shape = (v.local_batch_size as usize, v.seq_len as usize);
        Some(trace(spec, cfg, args, dtype, shape, false, tp_rank)?.0)
    } else {
        None
    };
    let mp = MemoryPlan {
        state,
        activations_peak: plan.peak,
        activations_unplanned: plan.unplanned,
        validation_activations: validation
            .as_ref()
            .map_or(0, |vp| validation_arena_bytes(plan.peak, vp.peak)),
        buffers: plan.requests.len(),
        ops,
        num_params,
    };
    Ok((plan, validation, mp))
}
