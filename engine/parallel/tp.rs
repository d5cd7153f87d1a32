//! Tensor parallel (Megatron-LM's split, torchtitan's plan): which parameters are split over the
//! tp group and on which dim, and this rank's slice of each. The ops that turn a split weight
//! into column- or row-parallel compute live on the tape (tape/tp.rs); a model folder's
//! `infra/parallelize.rs` only names its weights (`Parallelize::colwise_parallel` ...).
//!
//! A weight `[out, in]` split on dim 0 is column-parallel (each rank computes a slice of the
//! output features), on dim 1 row-parallel (a slice of the input features, partial sums that
//! the tape reduces); an embedding table split on dim 0 holds a slice of the vocabulary.
//!
//! A dim of n splits into chunks of ceil(n / tp), the last rank holding what is left (a
//! vocabulary of 259 byte-level ids splits 130 + 129), so no model needs padding; heads always
//! divide (the model folders check it).

use crate::backend::{Backend, Buf, DeviceMem};
use crate::dist::{Communicator, ReduceOp};
use crate::error::{Error, Result};
use crate::params::{ParamId, ParamSpec};
use crate::tensor::{DType, Shape};
use std::sync::atomic::{AtomicBool, Ordering};

/// Rank `rank`'s part of a dim of `n` split `degree` ways: (start, len).
pub fn split(n: usize, degree: usize, rank: usize) -> (usize, usize) {
    let chunk = n.div_ceil(degree.max(1));
    let start = (rank * chunk).min(n);
    (start, chunk.min(n - start))
}

/// The shape of rank `rank`'s slice of `global` split `degree` ways on `dim`.
pub fn local_shape(global: &Shape, dim: Option<usize>, degree: usize, rank: usize) -> Shape {
    let mut d = global.0.clone();
    if let Some(k) = dim {
        d[k] = split(d[k], degree, rank).1;
    }
    Shape(d)
}

/// The specs of the parameters as tp rank `rank` holds them (what FSDP then shards).
pub fn local_specs(
    specs: &[ParamSpec],
    dims: &[Option<usize>],
    degree: usize,
    rank: usize,
) -> Vec<ParamSpec> {
    specs
        .iter()
        .zip(dims)
        .map(|(s, &d)| ParamSpec {
            shape: local_shape(&s.shape, d, degree, rank),
            ..s.clone()
        })
        .collect()
}

/// Every split dim gives each rank a part; one error naming the first parameter that does not.
pub fn check_plan(specs: &[ParamSpec], dims: &[Option<usize>], degree: usize) -> Result<()> {
    for (s, &d) in specs.iter().zip(dims) {
        let Some(k) = d else { continue };
        let n = s.shape.0.get(k).copied().unwrap_or(0);
        if split(n, degree, degree - 1).1 == 0 {
            return Err(Error::Config(format!(
                "tensor_parallel_degree {degree}: parameter {} {} cannot be split on dim {k} \
                 ({n} does not give each of {degree} ranks a part)",
                s.name, s.shape
            )));
        }
    }
    Ok(())
}

/// One rank's tensor-parallel state: the group, the plan, and which replicated weights have
/// partial gradients.
pub struct TensorParallel {
    pub degree: usize,
    pub rank: usize,
    pub comm: Box<dyn Communicator>,
    /// Norms and the residual stream on token shards between the parallel regions.
    pub sequence_parallel: bool,
    /// The loss works on vocabulary-sharded logits instead of gathering them.
    pub loss_parallel: bool,
    /// Per parameter: the dim it is split on (None: every tp rank holds all of it).
    pub dims: Vec<Option<usize>>,
    /// Per parameter: a replicated weight that met sharded activations (a norm under sequence
    /// parallel, Qwen3's per-head q/k norm), so each rank's gradient is a partial sum that the
    /// trainer all-reduces over the group. Set by the tape's ops as they are recorded.
    partial: Vec<AtomicBool>,
    /// f32 room for every replicated parameter's gradient: the partial ones are packed here
    /// and reduced in one all-reduce (`reduce_partials`). Given by the store (`set_staging`).
    staging: Option<Box<dyn DeviceMem>>,
}

impl TensorParallel {
    pub fn new(
        comm: Box<dyn Communicator>,
        dims: Vec<Option<usize>>,
        sequence_parallel: bool,
        loss_parallel: bool,
    ) -> TensorParallel {
        let partial = dims.iter().map(|_| AtomicBool::new(false)).collect();
        TensorParallel {
            degree: comm.size(),
            rank: comm.rank(),
            comm,
            sequence_parallel,
            loss_parallel,
            dims,
            partial,
            staging: None,
        }
    }

    /// The buffer `reduce_partials` packs into (the store allocates it with its regions).
    pub fn set_staging(&mut self, mem: Box<dyn DeviceMem>) {
        self.staging = Some(mem);
    }

    pub fn staging_bytes(&self) -> usize {
        self.staging.as_ref().map_or(0, |m| m.bytes())
    }

    /// Sums the partial gradients (`grad` of each parameter `mark_partial` named) over the
    /// group: packed into the staging buffer, one all-reduce, unpacked; one launch per step
    /// instead of one per norm weight (two per layer).
    pub fn reduce_partials(&self, be: &dyn Backend, grad: impl Fn(ParamId) -> Buf) -> Result<()> {
        let grads: Vec<Buf> = self
            .partial_params()
            .into_iter()
            .map(grad)
            .filter(|b| b.len > 0)
            .collect();
        let total: usize = grads.iter().map(|b| b.len).sum();
        let room = self.staging_bytes() / 4;
        let packed = match &self.staging {
            Some(m) if grads.len() > 1 && total <= room => Buf::new(m.ptr(), total, DType::F32),
            _ if total > room && grads.len() > 1 => {
                return Err(Error::Config(format!(
                    "tensor parallel: {total} partial gradient values exceed the {room} of the \
                     staging buffer"
                )))
            }
            // One gradient (or none): reduced in place.
            _ => {
                for &g in &grads {
                    self.comm.all_reduce(g, ReduceOp::Sum)?;
                }
                return self.comm.wait();
            }
        };
        let mut off = 0;
        for &g in &grads {
            be.copy(g, packed.slice(off, g.len))?;
            off += g.len;
        }
        self.comm.all_reduce(packed, ReduceOp::Sum)?;
        off = 0;
        for &g in &grads {
            be.copy(packed.slice(off, g.len), g)?;
            off += g.len;
        }
        self.comm.wait()
    }

    /// The tensor-parallel state of rank `rank` of a `degree`-way group on the meta backend
    /// (traces and plans), or None for degree 1.
    pub fn meta(
        cfg: &crate::train::config::Parallelism,
        dims: Vec<Option<usize>>,
        log: crate::backend::meta::EventLog,
        rank: usize,
    ) -> Option<TensorParallel> {
        let degree = cfg.tensor_parallel_degree.max(1) as usize;
        (degree > 1).then(|| {
            let comm = crate::dist::meta::MetaComm::new((rank, degree, 1), "tp", log);
            TensorParallel::new(
                Box::new(comm),
                dims,
                cfg.enable_sequence_parallel,
                !cfg.disable_loss_parallel,
            )
        })
    }

    /// Elements of a `rows x width` activation this rank holds between pipeline stages: its
    /// token shard under sequence parallel, else all of it (`Tape::stage_activation`).
    pub fn stage_numel(tp: Option<&TensorParallel>, rows: usize, width: usize) -> usize {
        match tp.filter(|t| t.sequence_parallel) {
            Some(t) => rows / t.degree * width,
            None => rows * width,
        }
    }

    pub fn dim(&self, id: ParamId) -> Option<usize> {
        self.dims[id.0]
    }

    pub fn mark_partial(&self, id: ParamId) {
        self.partial[id.0].store(true, Ordering::Relaxed);
    }

    /// Replicated parameters whose gradients are partial sums over the group.
    pub fn partial_params(&self) -> Vec<ParamId> {
        (0..self.partial.len())
            .filter(|&i| self.partial[i].load(Ordering::Relaxed))
            .map(ParamId)
            .collect()
    }

    /// Where this rank's slice of a tensor of `global` shape starts, per dim.
    pub fn offset(&self, id: ParamId, global: &Shape) -> Vec<usize> {
        let mut o = vec![0; global.rank()];
        if let Some(k) = self.dims[id.0] {
            o[k] = split(global.0[k], self.degree, self.rank).0;
        }
        o
    }
}
