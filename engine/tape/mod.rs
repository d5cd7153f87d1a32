//! The explicit autograd tape.
//!
//! Models call ops on a `Tape`; each call checks shapes, allocates its outputs, records a `Node`
//! (the op, its input and output tensor ids, its attributes) and launches the kernel through the
//! backend. `backward()` walks the nodes in reverse and calls each op's backward kernels. Tensors
//! are `Copy` ids into the tape; the tape owns their metadata and buffer records.
//!
//! Memory: every buffer request is numbered. In `Placement::Owned` each request is its own
//! backend allocation (used for tracing, tests and eval). In `Placement::Planned` the k-th request
//! is `arena + plan.offsets[k]` from the static plan (see `planner`), so a planned step makes no
//! allocation at all. Each buffer's lifetime is the clock of the first and last op touching it.
//!
//! Activation checkpointing: `checkpoint(policy, f)` records the ops `f` issues as a region. When
//! the region ends, the buffers of its internal tensors are released (their lifetime ends; Owned
//! memory is freed). When backward reaches the region it replays the region's recorded ops to
//! rematerialise exactly those buffers (same tensor ids, new buffers), then differentiates them.
//! Replay needs no closure: the nodes themselves are the program.

mod backward;
mod forward;
mod ops;
pub mod profile;
mod tp;

use crate::backend::{Backend, Buf, DeviceMem};
use crate::error::{Error, Result};
use crate::params::{ConstId, ParamId, ParamStore};
use crate::planner::{Plan, Request};
use crate::tensor::{DType, Shape};

pub use ops::Op;
pub use tp::{Tp, TpKind};

/// A tensor on the tape: a small id, cheap to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tensor(pub(crate) u32);

/// Which internals an activation-checkpoint region keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcPolicy {
    /// Keep only the region's inputs and outputs; recompute everything inside.
    Full,
    /// Keep the outputs of matmuls and attention (the expensive ops); recompute the rest.
    SaveMatmulAndAttention,
}

/// Where buffers come from.
pub enum Placement<'p> {
    /// Every request is a fresh backend allocation, freed when no longer needed.
    Owned,
    /// Every request is at its planned offset in one pre-allocated arena.
    Planned { base: u64, plan: &'p Plan },
    /// As `Planned`, over the two arenas of `Plan::with_regions`: request k at
    /// `bases[plan.region(k)]` plus its offset.
    Regions { bases: [u64; 2], plan: &'p Plan },
}

pub(crate) struct TMeta {
    pub shape: Shape,
    pub dtype: DType,
    pub buf: usize,
    /// Element offset into the buffer (views).
    pub offset: usize,
    pub requires_grad: bool,
    pub param: Option<ParamId>,
    /// How the tensor lies over the tensor-parallel group (Replicate without TP).
    pub tp: Tp,
    /// The whole (logical) shape when `tp` is not Replicate: what `dims` reports.
    pub logical: Option<Shape>,
}

pub(crate) enum Mem {
    /// Held only so that dropping the record frees the allocation.
    #[allow(dead_code)]
    Owned(Box<dyn DeviceMem>),
    Arena,
    External,
    Released,
}

pub(crate) struct BufRec {
    pub ptr: u64,
    pub bytes: usize,
    pub mem: Mem,
    /// Request number for planned buffers.
    pub seq: Option<usize>,
    pub first: u32,
    pub last: u32,
    /// The FSDP unit whose slot holds this buffer (parameters of a sharded store).
    pub unit: Option<usize>,
}

pub(crate) struct Node {
    pub op: Op,
    pub region: Option<u32>,
}

pub(crate) struct Region {
    pub start: usize,
    pub end: usize,
    /// True once the region's released buffers have been rematerialised in backward.
    pub recomputed: bool,
    pub released_any: bool,
}

pub struct Tape<'a> {
    pub(crate) be: &'a dyn Backend,
    pub(crate) store: &'a ParamStore,
    placement: Placement<'a>,
    pub(crate) tensors: Vec<TMeta>,
    pub(crate) bufs: Vec<BufRec>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) regions: Vec<Region>,
    open_region: Option<u32>,
    /// Column-parallel inputs already gathered / marked (per source tensor and region), so
    /// wq, wk and wv share one all-gather.
    tp_inputs: std::collections::HashMap<(Tensor, Option<u32>), Tensor>,
    clock: u32,
    seq: usize,
    /// Dtype of activations and activation gradients (the compute dtype).
    pub act_dtype: DType,
    /// Weight-gradient work a split backward (`backward_from` with `defer_weights`) left for
    /// `backward_weights`, in the order a full backward would have run it.
    deferred: Vec<backward::Deferred>,
}

impl<'a> Tape<'a> {
    pub fn new(be: &'a dyn Backend, store: &'a ParamStore, placement: Placement<'a>) -> Tape<'a> {
        Tape {
            be,
            store,
            placement,
            tensors: Vec::new(),
            bufs: Vec::new(),
            nodes: Vec::new(),
            regions: Vec::new(),
            open_region: None,
            tp_inputs: Default::default(),
            clock: 0,
            seq: 0,
            act_dtype: store.compute_dtype,
            deferred: Vec::new(),
        }
    }

    /// The op clock (one tick per kernel launch): with `requests`, which buffers a point of the
    /// tape keeps alive (a pipeline stage's activations held between forward and backward).
    pub fn now(&self) -> u32 {
        self.clock
    }

    pub fn backend(&self) -> &'a dyn Backend {
        self.be
    }

    pub fn shape(&self, t: Tensor) -> &Shape {
        &self.tensors[t.0 as usize].shape
    }
    /// The tensor's whole (logical) dims: what the model sees, whatever this rank holds of it
    /// under tensor parallel (`shape` is the local part the kernels see).
    pub fn dims(&self, t: Tensor) -> Vec<usize> {
        let m = &self.tensors[t.0 as usize];
        m.logical.as_ref().unwrap_or(&m.shape).0.clone()
    }
    pub fn dtype(&self, t: Tensor) -> DType {
        self.tensors[t.0 as usize].dtype
    }
    pub fn requires_grad(&self, t: Tensor) -> bool {
        self.tensors[t.0 as usize].requires_grad
    }
    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The raw buffer view of a tensor.
    pub(crate) fn buf(&self, t: Tensor) -> Buf {
        let m = &self.tensors[t.0 as usize];
        let b = &self.bufs[m.buf];
        Buf::new(
            b.ptr + (m.offset * m.dtype.size()) as u64,
            m.shape.numel(),
            m.dtype,
        )
    }

    /// Marks a tensor's buffer as used now; an error if its buffer was released (a bug in a
    /// checkpoint region's bookkeeping, caught instead of reading freed memory).
    pub(crate) fn touch(&mut self, t: Tensor) -> Result<Buf> {
        let bi = self.tensors[t.0 as usize].buf;
        let clock = self.clock;
        let b = &mut self.bufs[bi];
        if matches!(b.mem, Mem::Released) {
            return Err(Error::Backend(format!(
                "tensor {} used after its checkpointed buffer was released",
                t.0
            )));
        }
        b.first = b.first.min(clock);
        b.last = b.last.max(clock);
        Ok(self.buf(t))
    }

    pub(crate) fn touch_all<const N: usize>(&mut self, ts: [Tensor; N]) -> Result<[Buf; N]> {
        let mut out = [Buf::new(0, 0, DType::F32); N];
        for (o, t) in out.iter_mut().zip(ts) {
            *o = self.touch(t)?;
        }
        Ok(out)
    }

    pub(crate) fn tick(&mut self) {
        self.clock += 1;
    }

    fn alloc_buf(&mut self, bytes: usize) -> Result<usize> {
        let seq = self.seq;
        self.seq += 1;
        let (ptr, mem) = match &self.placement {
            Placement::Owned => {
                let m = self.be.alloc(bytes)?;
                (m.ptr(), Mem::Owned(m))
            }
            Placement::Planned { base, plan } => {
                (base + plan.offset(seq, bytes)? as u64, Mem::Arena)
            }
            Placement::Regions { bases, plan } => {
                let base = bases[plan.region(seq)];
                (base + plan.offset(seq, bytes)? as u64, Mem::Arena)
            }
        };
        self.bufs.push(BufRec {
            ptr,
            bytes,
            mem,
            seq: Some(seq),
            first: self.clock,
            last: self.clock,
            unit: None,
        });
        Ok(self.bufs.len() - 1)
    }

    pub(crate) fn push_tensor(&mut self, meta: TMeta) -> Tensor {
        self.tensors.push(meta);
        Tensor((self.tensors.len() - 1) as u32)
    }

    /// A fresh tensor with its own buffer.
    pub(crate) fn alloc(
        &mut self,
        shape: Shape,
        dtype: DType,
        requires_grad: bool,
    ) -> Result<Tensor> {
        let buf = self.alloc_buf(shape.numel().max(1) * dtype.size())?;
        Ok(self.push_tensor(TMeta {
            shape,
            dtype,
            buf,
            offset: 0,
            requires_grad,
            param: None,
            tp: Tp::Replicate,
            logical: None,
        }))
    }

    /// A new tensor sharing `src`'s storage with another shape (same element count).
    pub(crate) fn view_of(&mut self, src: Tensor, shape: Shape, requires_grad: bool) -> Tensor {
        let m = &self.tensors[src.0 as usize];
        let meta = TMeta {
            shape,
            dtype: m.dtype,
            buf: m.buf,
            offset: m.offset,
            requires_grad,
            param: None,
            tp: Tp::Replicate,
            logical: None,
        };
        self.push_tensor(meta)
    }

    /// Gives `t` a new buffer (rematerialisation after a checkpoint region released it).
    pub(crate) fn realloc(&mut self, t: Tensor) -> Result<()> {
        let bytes = self.tensors[t.0 as usize].shape.numel().max(1)
            * self.tensors[t.0 as usize].dtype.size();
        let bi = self.alloc_buf(bytes)?;
        let old = self.tensors[t.0 as usize].buf;
        // Views of the released buffer follow it to the new one.
        for m in self.tensors.iter_mut() {
            if m.buf == old {
                m.buf = bi;
            }
        }
        Ok(())
    }

    pub(crate) fn is_released(&self, t: Tensor) -> bool {
        matches!(self.bufs[self.tensors[t.0 as usize].buf].mem, Mem::Released)
    }

    pub(crate) fn release_buf_of(&mut self, t: Tensor) {
        let bi = self.tensors[t.0 as usize].buf;
        if matches!(self.bufs[bi].mem, Mem::Owned(_) | Mem::Arena) {
            self.bufs[bi].mem = Mem::Released;
        }
    }

    pub(crate) fn buf_index(&self, t: Tensor) -> usize {
        self.tensors[t.0 as usize].buf
    }

    /// A tensor over memory the tape does not own (parameters, their gradients, constants):
    /// no planned request, no lifetime to track.
    pub(crate) fn external(
        &mut self,
        b: Buf,
        shape: Shape,
        requires_grad: bool,
        param: Option<ParamId>,
    ) -> Tensor {
        let unit = param.and_then(|id| self.store.fsdp().map(|f| f.unit_of(id)));
        self.bufs.push(BufRec {
            ptr: b.ptr,
            bytes: b.bytes(),
            mem: Mem::External,
            seq: None,
            first: 0,
            last: 0,
            unit,
        });
        let buf = self.bufs.len() - 1;
        self.push_tensor(TMeta {
            shape,
            dtype: b.dtype,
            buf,
            offset: 0,
            requires_grad,
            param,
            tp: Tp::Replicate,
            logical: None,
        })
    }

    /// Binds a parameter (its compute copy) as a leaf that accumulates into the parameter's grad.
    /// With FSDP this is where the parameter's unit is gathered (unless its slot holds it).
    pub fn param(&mut self, id: ParamId) -> Result<Tensor> {
        self.store.acquire(self.be, id)?;
        let shape = self.store.local_shape(id).clone();
        let t = self.external(self.store.compute(id), shape, true, Some(id));
        if let Some(k) = self.store.tp().and_then(|tp| tp.dim(id)) {
            self.set_tp(t, Tp::Shard(k), self.store.shape(id).clone());
        }
        Ok(t)
    }

    /// The FSDP units whose parameters node `ni` reads.
    pub(crate) fn node_units(&self, ni: usize) -> Vec<usize> {
        let mut us: Vec<usize> = Vec::new();
        for t in self.nodes[ni].op.inputs() {
            if let Some(u) = self.bufs[self.tensors[t.0 as usize].buf].unit {
                if !us.contains(&u) {
                    us.push(u);
                }
            }
        }
        us
    }

    /// Binds a constant f32 buffer (no gradient).
    pub fn constant(&mut self, id: ConstId, shape: impl Into<Shape>) -> Result<Tensor> {
        let b = self.store.constant(id);
        let shape = shape.into();
        if shape.numel() > b.len {
            return Err(Error::Shape {
                op: "constant",
                msg: format!("view {shape} exceeds {} elements", b.len),
            });
        }
        Ok(self.external(b, shape, false, None))
    }

    /// An activation-dtype tensor over memory the caller holds and keeps alive as long as the
    /// tape (a pipeline stage's received hidden state, or the gradient of its output). With
    /// `requires_grad` it is a leaf whose gradient `backward_from` returns.
    pub fn external_activation(
        &mut self,
        b: Buf,
        shape: impl Into<Shape>,
        requires_grad: bool,
    ) -> Result<Tensor> {
        let shape = shape.into();
        if b.dtype != self.act_dtype || b.len != shape.numel() {
            return Err(Error::Shape {
                op: "external_activation",
                msg: format!(
                    "{shape} {} given {} {} elements",
                    self.act_dtype, b.len, b.dtype
                ),
            });
        }
        Ok(self.external(b, shape, requires_grad, None))
    }

    /// The hidden state `shape` ([batch, seq, dim]) a pipeline stage receives from another, in
    /// `b`: all of it, or under sequence parallel this rank's token shard of it (which is how
    /// the sending stage's output lies, so each tp rank exchanges its shard with its peer).
    pub fn stage_activation(
        &mut self,
        b: Buf,
        shape: impl Into<Shape>,
        requires_grad: bool,
    ) -> Result<Tensor> {
        let shape = shape.into();
        match self.tp_state().filter(|t| t.sequence_parallel) {
            Some(tp) => {
                let rows = shape.rows();
                if !rows.is_multiple_of(tp.degree) {
                    return Err(Error::Config(format!(
                        "sequence parallel: {rows} tokens per pipeline microbatch do not split \
                         over tensor_parallel_degree {}",
                        tp.degree
                    )));
                }
                let local = Shape(vec![rows / tp.degree, shape.last()]);
                let t = self.external_activation(b, local, requires_grad)?;
                self.set_tp(t, Tp::Tokens, shape);
                Ok(t)
            }
            None => self.external_activation(b, shape, requires_grad),
        }
    }

    /// The device buffer of `t` (to send it to another rank).
    pub fn device_buf(&mut self, t: Tensor) -> Result<Buf> {
        self.touch(t)
    }

    /// Uploads host i32 data (token ids, targets) into a planned buffer.
    pub fn input_i32(&mut self, data: &[i32], shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.numel() != data.len() {
            return Err(Error::Shape {
                op: "input",
                msg: format!("shape {shape} but {} values", data.len()),
            });
        }
        let t = self.alloc(shape, DType::I32, false)?;
        let b = self.touch(t)?;
        self.be.upload(b, bytemuck::cast_slice(data))?;
        Ok(t)
    }

    /// Uploads host f32 data as an activation-dtype tensor (tests, custom inputs).
    pub fn input_f32(
        &mut self,
        data: &[f32],
        shape: impl Into<Shape>,
        requires_grad: bool,
    ) -> Result<Tensor> {
        let shape = shape.into();
        if shape.numel() != data.len() {
            return Err(Error::Shape {
                op: "input",
                msg: format!("shape {shape} but {} values", data.len()),
            });
        }
        let dtype = self.act_dtype;
        let staged = self.alloc(shape.clone(), DType::F32, false)?;
        let sb = self.touch(staged)?;
        self.be.upload(sb, bytemuck::cast_slice(data))?;
        if dtype == DType::F32 {
            self.tensors[staged.0 as usize].requires_grad = requires_grad;
            return Ok(staged);
        }
        let t = self.alloc(shape, dtype, requires_grad)?;
        let tb = self.touch(t)?;
        self.be.cast(sb, tb)?;
        Ok(t)
    }

    /// Reads a tensor back to the host as f32 (synchronises the backend).
    pub fn to_vec_f32(&mut self, t: Tensor) -> Result<Vec<f32>> {
        let b = self.touch(t)?;
        let n = b.len;
        match b.dtype {
            DType::F32 => {
                let mut out = vec![0f32; n];
                self.be.download(b, bytemuck::cast_slice_mut(&mut out))?;
                Ok(out)
            }
            DType::BF16 => {
                let mut raw = vec![half::bf16::ZERO; n];
                self.be.download(b, bytemuck::cast_slice_mut(&mut raw))?;
                Ok(raw.iter().map(|x| x.to_f32()).collect())
            }
            DType::I32 => {
                let mut raw = vec![0i32; n];
                self.be.download(b, bytemuck::cast_slice_mut(&mut raw))?;
                Ok(raw.iter().map(|&x| x as f32).collect())
            }
        }
    }

    /// Runs `f` as an activation-checkpoint region (see the module doc). Regions do not nest.
    pub fn checkpoint<F>(&mut self, policy: AcPolicy, f: F) -> Result<Tensor>
    where
        F: FnOnce(&mut Tape<'a>) -> Result<Tensor>,
    {
        if self.open_region.is_some() {
            return f(self);
        }
        let r = self.regions.len() as u32;
        self.regions.push(Region {
            start: self.nodes.len(),
            end: 0,
            recomputed: false,
            released_any: false,
        });
        self.open_region = Some(r);
        let out = f(self);
        self.open_region = None;
        let out = out?;
        let end = self.nodes.len();
        self.regions[r as usize].end = end;
        // Buffers that must survive: the region output's, and anything created outside it.
        let keep = self.buf_index(out);
        let start = self.regions[r as usize].start;
        let mut released = false;
        for ni in start..end {
            if self.keeps_outputs(ni, policy) {
                continue;
            }
            for o in self.nodes[ni].op.outputs() {
                if self.buf_index(o) != keep && self.node_owns_buffer(ni, o) {
                    self.release_buf_of(o);
                    released = true;
                }
            }
        }
        self.regions[r as usize].released_any = released;
        Ok(out)
    }

    pub(crate) fn keeps_outputs(&self, ni: usize, policy: AcPolicy) -> bool {
        match policy {
            AcPolicy::Full => false,
            AcPolicy::SaveMatmulAndAttention => {
                matches!(self.nodes[ni].op, Op::Linear { .. } | Op::Attention { .. })
            }
        }
    }

    /// A node owns an output buffer unless the output is a view of an input (views, aliased ops).
    pub(crate) fn node_owns_buffer(&self, ni: usize, o: Tensor) -> bool {
        let bo = self.buf_index(o);
        !self.nodes[ni]
            .op
            .inputs()
            .iter()
            .any(|&i| self.buf_index(i) == bo)
    }

    /// The traced buffer requests of this tape (sizes and lifetimes), in request order.
    pub fn requests(&self) -> Vec<Request> {
        let mut reqs: Vec<(usize, Request)> = self
            .bufs
            .iter()
            .filter_map(|b| {
                b.seq.map(|s| {
                    (
                        s,
                        Request {
                            bytes: b.bytes,
                            first: b.first,
                            last: b.last,
                        },
                    )
                })
            })
            .collect();
        reqs.sort_by_key(|r| r.0);
        reqs.into_iter().map(|r| r.1).collect()
    }

    /// Plans this tape's requests (call after `backward`).
    pub fn plan(&self) -> Plan {
        Plan::new(self.requests())
    }

    /// The op clock: how many ops the tape has run (the lifetimes in `plan` count in it).
    pub fn clock(&self) -> u32 {
        self.clock
    }

    /// The request number of `t`'s buffer (its index in `plan`), if the tape allocated it.
    pub fn request_of(&self, t: Tensor) -> Option<usize> {
        self.bufs[self.buf_index(t)].seq
    }
}
