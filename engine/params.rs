//! Parameters, gradients and optimizer state live outside the step arena, in flat persistent
//! regions: one f32 master copy, one f32 gradient, AdamW's m and v, and (for bf16 training) one
//! bf16 compute copy. Each parameter is a slice of the same offsets in every region, so the whole
//! optimizer is one fused AdamW launch, the grad norm one reduction, and a future FSDP shard is a
//! contiguous range of the same flat layout.

use crate::backend::{Backend, Buf, DeviceMem};
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::parallel::fsdp::FsdpLayout;
use crate::parallel::fsdp_runtime::Fsdp;
use crate::parallel::tp::TensorParallel;
use crate::tensor::{DType, Shape};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub usize);
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConstId(pub usize);

#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Shape,
    /// Which initial-weight stream the parameter draws (`model::init`): its index in the whole
    /// model, so a pipeline stage holding only some parameters draws the same weights.
    pub init_key: usize,
}

/// Collects parameter and constant declarations while a model is built (no memory yet).
#[derive(Default)]
pub struct ParamStoreBuilder {
    pub params: Vec<ParamSpec>,
    pub consts: Vec<(String, Shape, Vec<f32>)>,
    /// The FSDP units a model's `parallelize` declared (`Parallelize::fully_shard`).
    pub fsdp_units: Vec<Vec<ParamId>>,
    /// The tensor-parallel plan a model's `parallelize` declared: (weight, dim it is split on).
    pub tp_plan: Vec<(ParamId, usize)>,
}

impl ParamStoreBuilder {
    /// Per parameter: the dim the tensor-parallel plan splits it on.
    pub fn tp_dims(&self) -> Vec<Option<usize>> {
        let mut d = vec![None; self.params.len()];
        for &(id, k) in &self.tp_plan {
            d[id.0] = Some(k);
        }
        d
    }

    /// Declares a parameter; one already declared under the same name and shape is returned
    /// instead (a tied embedding whose two pipeline stages sit on one rank: one weight, whose
    /// gradient both stages add to). A name declared again with another shape is an error at
    /// `materialize`.
    pub fn param(&mut self, name: impl Into<String>, shape: impl Into<Shape>) -> ParamId {
        let (name, shape) = (name.into(), shape.into());
        if let Some(i) = self
            .params
            .iter()
            .position(|p| p.name == name && p.shape == shape)
        {
            return ParamId(i);
        }
        self.params.push(ParamSpec {
            name,
            shape,
            init_key: self.params.len(),
        });
        ParamId(self.params.len() - 1)
    }
    /// A non-trainable f32 buffer computed on the host (e.g. rotary tables).
    pub fn constant(
        &mut self,
        name: impl Into<String>,
        shape: impl Into<Shape>,
        data: Vec<f32>,
    ) -> ConstId {
        self.consts.push((name.into(), shape.into(), data));
        ConstId(self.consts.len() - 1)
    }
}

/// The dim FSDP shards (1 for a scalar).
fn dim0(s: &Shape) -> usize {
    s.dims().first().copied().unwrap_or(1).max(1)
}

/// Elements per parameter slot are rounded up to this, so every slice starts 512-byte aligned.
const SLOT: usize = 128;

pub struct ParamStore {
    pub specs: Vec<ParamSpec>,
    pub compute_dtype: DType,
    offsets: Vec<usize>,
    total: usize,
    master: Buf,
    grad: Buf,
    m: Buf,
    v: Buf,
    compute: Option<Buf>,
    consts: Vec<(String, Buf)>,
    /// Set when the parameters are sharded (FSDP): the regions above then hold this rank's
    /// shards and `compute` / `grad` are whole tensors in the unit slots.
    fsdp: Option<Fsdp>,
    /// Tensor parallel: the plan and group. Each parameter is then this rank's slice of it
    /// (`local_shape`), which FSDP shards further.
    tp: Option<TensorParallel>,
    /// Per parameter: the shape this rank computes with (its tensor-parallel slice).
    local: Vec<Shape>,
    _mem: Vec<Box<dyn DeviceMem>>,
}

/// Byte totals of the persistent state, for the memory report.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct StateBytes {
    pub params: usize,
    pub compute_copy: usize,
    pub grads: usize,
    pub optimizer: usize,
    pub constants: usize,
    /// FSDP: the gathered-parameter and unsharded-gradient slots.
    pub gathered: usize,
    /// FSDP: the all-gather and reduce-scatter staging buffers.
    pub comm_buffers: usize,
}

impl StateBytes {
    pub fn total(&self) -> usize {
        self.params
            + self.compute_copy
            + self.grads
            + self.optimizer
            + self.constants
            + self.gathered
            + self.comm_buffers
    }
}

impl StateBytes {
    /// The state of one FSDP rank of `layout` (what a sharded store allocates): the local
    /// shards, the unit slots and the staging buffers.
    pub fn sharded(layout: &FsdpLayout, compute: DType, reduce: DType, constants: usize) -> Self {
        let local = layout.local_len.max(SLOT);
        let (gathered, comm_buffers) = Fsdp::bytes(layout, compute, reduce);
        StateBytes {
            params: local * 4,
            compute_copy: if compute == DType::BF16 { local * 2 } else { 0 },
            grads: local * 4,
            optimizer: local * 8,
            constants,
            gathered,
            comm_buffers,
        }
    }

    /// An unsharded store's bytes (`self`) once FSDP shards it over `layout`: its constants and
    /// its tensor-parallel staging (its only comm buffer so far; a bound, as FSDP's gradient
    /// shards are smaller) stay.
    pub fn sharded_as(&self, layout: &FsdpLayout, compute: DType, reduce: DType) -> Self {
        let mut s = Self::sharded(layout, compute, reduce, self.constants);
        s.comm_buffers += self.comm_buffers;
        s
    }
}

/// How a store is sharded: the layout, the dp_shard group and the reduce dtype.
pub struct Sharding {
    pub layout: FsdpLayout,
    pub comm: Box<dyn Communicator>,
    pub reduce_dtype: DType,
}

impl ParamStore {
    /// Lays out and allocates every region (one allocation for the flat state, one for constants),
    /// zeroes gradients and moments and uploads constants. Weights are set by the model's
    /// `init_weights` or a checkpoint load.
    pub fn materialize(
        b: ParamStoreBuilder,
        be: &dyn Backend,
        compute_dtype: DType,
    ) -> Result<ParamStore> {
        Self::materialize_sharded(b, be, compute_dtype, None, None)
    }

    /// As `materialize`, with every parameter this rank's tensor-parallel slice when `tp` is
    /// given (its FSDP layout must be of those slices, `parallel::tp::local_specs`), and every
    /// region holding only this rank's shards when `sharding` is given (FSDP; see
    /// parallel/fsdp.rs).
    pub fn materialize_sharded(
        b: ParamStoreBuilder,
        be: &dyn Backend,
        compute_dtype: DType,
        sharding: Option<Sharding>,
        tp: Option<TensorParallel>,
    ) -> Result<ParamStore> {
        if compute_dtype == DType::I32 {
            return Err(Error::Config(
                "compute dtype must be float32 or bfloat16".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        if let Some(p) = b.params.iter().find(|p| !names.insert(p.name.as_str())) {
            return Err(Error::Config(format!(
                "parameter {} is declared twice with different shapes",
                p.name
            )));
        }
        let local: Vec<Shape> = match &tp {
            Some(t) => {
                crate::parallel::tp::check_plan(&b.params, &t.dims, t.degree)?;
                let specs = crate::parallel::tp::local_specs(&b.params, &t.dims, t.degree, t.rank);
                specs.into_iter().map(|s| s.shape).collect()
            }
            None => b.params.iter().map(|p| p.shape.clone()).collect(),
        };
        let mut offsets = Vec::with_capacity(b.params.len());
        let mut total = 0usize;
        match &sharding {
            Some(sh) => {
                offsets.extend(sh.layout.params.iter().map(|p| p.local_off));
                total = sh.layout.local_len;
            }
            None => {
                for p in &local {
                    offsets.push(total);
                    total += p.numel().div_ceil(SLOT) * SLOT;
                }
            }
        }
        let total = total.max(SLOT);
        let f32b = total * 4;
        let cbytes = if compute_dtype == DType::BF16 {
            total * 2
        } else {
            0
        };
        let mem = be.alloc(4 * f32b + cbytes)?;
        let base = mem.ptr();
        let region = |i: u64| Buf::new(base + i * f32b as u64, total, DType::F32);
        let (master, grad, m, v) = (region(0), region(1), region(2), region(3));
        let compute = (cbytes > 0).then(|| Buf::new(base + 4 * f32b as u64, total, DType::BF16));
        be.fill(Buf::new(base, (4 * f32b + cbytes) / 4, DType::F32), 0.0)?;

        let cnum: usize = b
            .consts
            .iter()
            .map(|c| c.2.len().div_ceil(SLOT) * SLOT)
            .sum::<usize>()
            .max(SLOT);
        let cmem = be.alloc(cnum * 4)?;
        let mut consts = Vec::new();
        let mut off = 0usize;
        for (name, shape, data) in b.consts {
            if shape.numel() != data.len() {
                return Err(Error::Shape {
                    op: "constant",
                    msg: format!("{name}: shape {shape} but {} values", data.len()),
                });
            }
            let buf = Buf::new(cmem.ptr() + (off * 4) as u64, data.len(), DType::F32);
            be.upload(buf, bytemuck::cast_slice(&data))?;
            consts.push((name, buf));
            off += data.len().div_ceil(SLOT) * SLOT;
        }
        let fsdp = match sharding {
            Some(sh) => Some(Fsdp::new(
                sh.layout,
                sh.comm,
                be,
                compute_dtype,
                sh.reduce_dtype,
            )?),
            None => None,
        };
        let mut store = ParamStore {
            specs: b.params,
            compute_dtype,
            offsets,
            total,
            master,
            grad,
            m,
            v,
            compute,
            consts,
            fsdp,
            tp,
            local,
            _mem: vec![mem, cmem],
        };
        if let Some(t) = &store.tp {
            // Room for every replicated gradient: the partial ones reduce packed.
            let n: usize = store
                .ids()
                .filter(|&id| t.dim(id).is_none())
                .map(|id| store.local_grad(id).len)
                .sum();
            let staging = be.alloc(n.max(1) * 4)?;
            if let Some(t) = store.tp.as_mut() {
                t.set_staging(staging);
            }
        }
        Ok(store)
    }

    /// The FSDP runtime of a sharded store.
    pub fn fsdp(&self) -> Option<&Fsdp> {
        self.fsdp.as_ref()
    }

    /// The tensor-parallel state of a store split over a tp group.
    pub fn tp(&self) -> Option<&TensorParallel> {
        self.tp.as_ref()
    }

    /// The shape of this rank's tensor-parallel slice of `id` (its whole shape without TP):
    /// what the ops compute with.
    pub fn local_shape(&self, id: ParamId) -> &Shape {
        &self.local[id.0]
    }

    /// This rank's FSDP rows of its slice of `id`: (first row, count); every row when
    /// unsharded.
    pub fn shard_rows(&self, id: ParamId) -> (usize, usize) {
        match &self.fsdp {
            Some(f) => f.layout.my_rows(id),
            None => (0, dim0(self.local_shape(id))),
        }
    }

    /// The box of the whole tensor `id` this rank's master holds: (offset, shape) per dim.
    pub fn local_box(&self, id: ParamId) -> (Vec<usize>, Vec<usize>) {
        let local = self.local_shape(id);
        let mut offset = match &self.tp {
            Some(t) => t.offset(id, self.shape(id)),
            None => vec![0; local.rank()],
        };
        let mut shape = local.0.clone();
        let (row0, rows) = self.shard_rows(id);
        if let (Some(o), Some(d)) = (offset.first_mut(), shape.first_mut()) {
            *o += row0;
            *d = rows;
        }
        (offset, shape)
    }

    /// Elements of this rank's shard of `id` (all of its slice when unsharded).
    pub fn local_numel(&self, id: ParamId) -> usize {
        match &self.fsdp {
            Some(f) => f.layout.my_rows(id).1 * f.layout.params[id.0].row,
            None => self.local_shape(id).numel(),
        }
    }

    /// FSDP, in forward: gathers the unit of `id` into its slot unless it is there, and
    /// prefetches the next unit in forward (declaration) order. A no-op unsharded.
    pub fn acquire(&self, be: &dyn Backend, id: ParamId) -> Result<()> {
        match &self.fsdp {
            Some(f) => {
                let u = f.unit_of(id);
                self.gather_unit(be, u)?;
                self.prefetch_unit(u + 1)
            }
            None => Ok(()),
        }
    }

    /// FSDP: gathers unit `u` from the local compute-dtype shards.
    pub fn gather_unit(&self, be: &dyn Backend, u: usize) -> Result<()> {
        match &self.fsdp {
            Some(f) => f.acquire(be, u, self.compute.unwrap_or(self.master)),
            None => Ok(()),
        }
    }

    /// FSDP: issues unit `u`'s gather ahead of its use (see `Fsdp::prefetch`).
    pub fn prefetch_unit(&self, u: usize) -> Result<()> {
        match &self.fsdp {
            Some(f) if u < f.layout.units.len() => {
                f.prefetch(u, self.compute.unwrap_or(self.master))
            }
            _ => Ok(()),
        }
    }

    /// FSDP: reduce-scatters unit `u`'s gradients into the local gradient shard.
    pub fn reduce_unit(&self, be: &dyn Backend, u: usize) -> Result<()> {
        match &self.fsdp {
            Some(f) => f.reduce(be, u, self.grad),
            None => Ok(()),
        }
    }

    pub fn len(&self) -> usize {
        self.specs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }
    pub fn numel(&self, id: ParamId) -> usize {
        self.specs[id.0].shape.numel()
    }
    pub fn shape(&self, id: ParamId) -> &Shape {
        &self.specs[id.0].shape
    }
    /// The initial-weight stream of `id` (`ParamSpec::init_key`).
    pub fn init_key(&self, id: ParamId) -> usize {
        self.specs[id.0].init_key
    }
    pub fn name(&self, id: ParamId) -> &str {
        &self.specs[id.0].name
    }
    pub fn ids(&self) -> impl Iterator<Item = ParamId> {
        (0..self.specs.len()).map(ParamId)
    }
    pub fn find(&self, name: &str) -> Option<ParamId> {
        self.specs.iter().position(|s| s.name == name).map(ParamId)
    }
    /// Total parameter count (excluding padding).
    pub fn num_params(&self) -> usize {
        self.specs.iter().map(|s| s.shape.numel()).sum()
    }

    /// This rank's part of `id` in a flat region (all of it when unsharded).
    fn slice(&self, region: &Buf, id: ParamId) -> Buf {
        region.slice(self.offsets[id.0], self.local_numel(id))
    }
    pub fn master(&self, id: ParamId) -> Buf {
        self.slice(&self.master, id)
    }
    /// The whole f32 gradient backward accumulates into (FSDP: in the unit's gradient slot).
    pub fn grad(&self, id: ParamId) -> Buf {
        match &self.fsdp {
            Some(f) => f.grad(id, self.local_shape(id).numel()),
            None => self.slice(&self.grad, id),
        }
    }
    /// This rank's shard of the reduced gradient of `id` (the whole gradient when unsharded).
    pub fn local_grad(&self, id: ParamId) -> Buf {
        self.slice(&self.grad, id)
    }
    pub fn moment1(&self, id: ParamId) -> Buf {
        self.slice(&self.m, id)
    }
    pub fn moment2(&self, id: ParamId) -> Buf {
        self.slice(&self.v, id)
    }
    /// The weights ops read: the bf16 copy in mixed precision, else the f32 master itself.
    /// FSDP: the whole tensor in its unit's slot, valid after `acquire`.
    pub fn compute(&self, id: ParamId) -> Buf {
        if let Some(f) = &self.fsdp {
            return f.compute(id, self.local_shape(id).numel());
        }
        match &self.compute {
            Some(c) => self.slice(c, id),
            None => self.master(id),
        }
    }
    pub fn constant(&self, id: ConstId) -> Buf {
        self.consts[id.0].1
    }

    /// Whole flat regions (padding included; padding stays zero in every region).
    pub fn flat_master(&self) -> Buf {
        self.master
    }
    pub fn flat_grad(&self) -> Buf {
        self.grad
    }
    pub fn flat_moments(&self) -> (Buf, Buf) {
        (self.m, self.v)
    }
    pub fn flat_compute(&self) -> Option<Buf> {
        self.compute
    }

    pub fn zero_grads(&self, be: &dyn Backend) -> Result<()> {
        if let Some(f) = &self.fsdp {
            f.zero_grads();
        }
        be.fill(self.grad, 0.0)
    }

    /// FSDP: the shards changed (optimizer step, load), so gathered copies are stale.
    pub fn shards_updated(&self) {
        if let Some(f) = &self.fsdp {
            f.invalidate();
        }
    }

    /// Writes f32 values of the whole parameter into its master copy (and its compute copy);
    /// a sharded store keeps this rank's rows.
    pub fn set(&self, be: &dyn Backend, id: ParamId, data: &[f32]) -> Result<()> {
        if data.len() != self.numel(id) {
            return Err(Error::Shape {
                op: "param.set",
                msg: format!(
                    "{}: expected {} values ({}), got {}",
                    self.name(id),
                    self.numel(id),
                    self.shape(id),
                    data.len()
                ),
            });
        }
        let (offset, shape) = self.local_box(id);
        let mine = box_of(data, &self.shape(id).0, &offset, &shape);
        be.upload(self.master(id), bytemuck::cast_slice(&mine))?;
        if let Some(c) = &self.compute {
            be.cast(self.master(id), self.slice(c, id))?;
        }
        self.shards_updated();
        Ok(())
    }

    /// Refreshes the compute copy from the master copy (after loading masters directly).
    pub fn sync_compute(&self, be: &dyn Backend) -> Result<()> {
        if let Some(c) = self.compute {
            be.cast(self.master, c)?;
        }
        self.shards_updated();
        Ok(())
    }

    pub fn read_f32(&self, be: &dyn Backend, b: Buf) -> Result<Vec<f32>> {
        let mut out = vec![0f32; b.len];
        be.download(b, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }

    pub fn state_bytes(&self) -> StateBytes {
        let constants = self.consts.iter().map(|c| c.1.bytes()).sum();
        let tp_staging = self.tp.as_ref().map_or(0, |t| t.staging_bytes());
        if let Some(f) = &self.fsdp {
            let mut s =
                StateBytes::sharded(&f.layout, self.compute_dtype, f.reduce_dtype(), constants);
            s.comm_buffers += tp_staging;
            return s;
        }
        let (gathered, comm_buffers) = (0, tp_staging);
        StateBytes {
            params: self.total * 4,
            compute_copy: self.compute.map(|c| c.bytes()).unwrap_or(0),
            grads: self.total * 4,
            optimizer: self.total * 8,
            constants,
            gathered,
            comm_buffers,
        }
    }
}

/// The elements of the box `offset .. offset + shape` of a row-major tensor of `dims`.
pub fn box_of(data: &[f32], dims: &[usize], offset: &[usize], shape: &[usize]) -> Vec<f32> {
    if dims.is_empty() || shape == dims {
        return data.to_vec();
    }
    let inner: usize = dims[1..].iter().product();
    let mut out = Vec::with_capacity(shape.iter().product());
    for r in offset[0]..offset[0] + shape[0] {
        let row = &data[r * inner..(r + 1) * inner];
        out.extend(box_of(row, &dims[1..], &offset[1..], &shape[1..]));
    }
    out
}
