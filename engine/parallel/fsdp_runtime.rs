//! FSDP at run time: the gathered-parameter and gradient slots, the staging buffers and the
//! collectives that fill and drain them (the layout is in fsdp.rs).
//!
//! The tape drives it: binding a parameter (`Tape::param`) gathers its unit unless the unit's slot
//! still holds it, and prefetches the next unit (issues its all-gather, which NCCL runs on its own
//! stream while this unit computes; the copy-out waits for it); backward gathers a unit again
//! before its first backward op if the slot was reused (prefetching the unit backward reaches
//! next), zeroes the unit's gradient slot on first use, and after the unit's last backward op
//! reduce-scatters the gradients into the local shard (on the step's last micro-batch only, when
//! gradient accumulation defers the reduction). Every rank runs the same tape, so every rank
//! issues the same collectives in the same order.
//!
//! Per gather of a unit: an all-gather of `ranks x shard_len` compute-dtype elements into one of
//! two staging buffers, then one copy per (parameter, rank) out of it. Per reduce: a pack of the
//! f32 gradients into `ranks x shard_len` (padding rows zero), one reduce-scatter (f32, or bf16
//! with `mixed_precision_reduce`) into the local gradient shard. On NCCL the prefetched gathers
//! and the f32 reduce-scatters leave the compute stream running; it waits for them at the
//! copy-out, before the next pack, and in `drain` (end of backward, before the optimizer).

use super::fsdp::FsdpLayout;
use crate::backend::{Backend, Buf, DeviceMem};
use crate::dist::{Communicator, ReduceOp};
use crate::error::Result;
use crate::params::ParamId;
use crate::tensor::DType;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
struct SlotState {
    /// Which unit each parameter slot / gradient slot holds now.
    param_owner: Vec<Option<usize>>,
    grad_owner: Vec<Option<usize>>,
    /// False on micro-batches whose gradients stay unreduced (accumulation).
    sync: bool,
    /// A prefetched gather in flight: (unit, staging buffer).
    pending: Option<(usize, usize)>,
    /// The staging buffer the next gather uses (they alternate).
    next_staging: usize,
    /// A reduce-scatter issued and not yet ordered before compute.
    reduces_in_flight: bool,
    comm_time: Duration,
    gathers: u64,
    prefetched: u64,
    reduces: u64,
}

/// Communication counters of the current step.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommStats {
    pub time: Duration,
    /// All-gathers issued (prefetches included).
    pub gathers: u64,
    /// Acquires a prefetch had already issued the gather for.
    pub prefetched: u64,
    pub reduces: u64,
}

pub struct Fsdp {
    pub layout: FsdpLayout,
    comm: Box<dyn Communicator>,
    compute_dtype: DType,
    /// Reduce-scatter in bf16 (`mixed_precision_reduce = "bfloat16"`), else f32.
    reduce_dtype: DType,
    params: Buf,
    grads: Buf,
    /// Two: a prefetched gather fills one while the other is copied out.
    gather_staging: [Buf; 2],
    reduce_staging: Buf,
    /// Receives a bf16 reduce-scatter before it is widened into the f32 shard.
    reduce_recv: Option<Buf>,
    state: Mutex<SlotState>,
    _mem: Box<dyn DeviceMem>,
}

impl Fsdp {
    /// Allocates the slots and staging buffers of `layout` on `be`; `comm` is the dp_shard group.
    pub fn new(
        layout: FsdpLayout,
        comm: Box<dyn Communicator>,
        be: &dyn Backend,
        compute_dtype: DType,
        reduce_dtype: DType,
    ) -> Result<Fsdp> {
        let cs = compute_dtype.size();
        let rs = reduce_dtype.size();
        let (pa, ga, st) = (layout.param_arena(), layout.grad_arena(), layout.staging());
        let recv = if reduce_dtype == DType::F32 {
            0
        } else {
            layout.max_shard.max(128)
        };
        let bytes = [pa * cs, ga * 4, st * cs, st * cs, st * rs, recv * rs];
        let offs: Vec<u64> = bytes
            .iter()
            .scan(0u64, |o, &b| {
                let at = *o;
                *o += b.div_ceil(512) as u64 * 512;
                Some(at)
            })
            .collect();
        let total: usize = bytes.iter().map(|b| b.div_ceil(512) * 512).sum();
        let mem = be.alloc(total)?;
        let base = mem.ptr();
        let buf = |i: usize, n: usize, d: DType| Buf::new(base + offs[i], n, d);
        let state = SlotState {
            param_owner: vec![None; layout.param_slots.len()],
            grad_owner: vec![None; layout.grad_slots.len()],
            sync: true,
            ..Default::default()
        };
        Ok(Fsdp {
            params: buf(0, pa, compute_dtype),
            grads: buf(1, ga, DType::F32),
            gather_staging: [buf(2, st, compute_dtype), buf(3, st, compute_dtype)],
            reduce_staging: buf(4, st, reduce_dtype),
            reduce_recv: (recv > 0).then(|| buf(5, recv, reduce_dtype)),
            layout,
            comm,
            compute_dtype,
            reduce_dtype,
            state: Mutex::new(state),
            _mem: mem,
        })
    }

    /// Bytes of the slots and staging buffers (the planner's "gathered" and "communication").
    pub fn bytes(layout: &FsdpLayout, compute: DType, reduce: DType) -> (usize, usize) {
        let gathered = layout.param_arena() * compute.size() + layout.grad_arena() * 4;
        let recv = if reduce == DType::F32 {
            0
        } else {
            layout.max_shard
        };
        let comm = layout.staging() * (2 * compute.size() + reduce.size()) + recv * reduce.size();
        (gathered, comm)
    }

    pub fn comm(&self) -> &dyn Communicator {
        self.comm.as_ref()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn unit_of(&self, id: ParamId) -> usize {
        self.layout.params[id.0].unit
    }

    /// The whole parameter `id` in its unit's slot (valid while the unit is gathered).
    pub fn compute(&self, id: ParamId, numel: usize) -> Buf {
        let p = &self.layout.params[id.0];
        let slot = self.layout.param_slots[self.layout.units[p.unit].param_slot].0;
        self.params.slice(slot + p.full_off, numel)
    }

    /// The whole f32 gradient of `id` in its unit's gradient slot.
    pub fn grad(&self, id: ParamId, numel: usize) -> Buf {
        let p = &self.layout.params[id.0];
        let slot = self.layout.grad_slots[self.layout.units[p.unit].grad_slot].0;
        self.grads.slice(slot + p.full_off, numel)
    }

    /// Marks every gathered copy stale (after the optimizer or a load changed the shards).
    pub fn invalidate(&self) {
        let mut s = self.lock();
        s.param_owner.iter_mut().for_each(|o| *o = None);
    }

    /// Starts a step: gradient slots empty, counters reset.
    pub fn zero_grads(&self) {
        let mut s = self.lock();
        s.grad_owner.iter_mut().for_each(|o| *o = None);
        s.comm_time = Duration::ZERO;
        s.gathers = 0;
        s.prefetched = 0;
        s.reduces = 0;
    }

    /// Whether this micro-batch's backward reduce-scatters (the step's last micro-batch).
    pub fn set_sync(&self, sync: bool) {
        self.lock().sync = sync;
    }

    pub fn stats(&self) -> CommStats {
        let s = self.lock();
        CommStats {
            time: s.comm_time,
            gathers: s.gathers,
            prefetched: s.prefetched,
            reduces: s.reduces,
        }
    }

    /// Makes unit `u`'s slot hold its whole parameters, gathering them from every rank's
    /// `shards` (the local compute-dtype region) unless the slot holds them already; a
    /// prefetched gather of `u` is only waited for.
    pub fn acquire(&self, be: &dyn Backend, u: usize, shards: Buf) -> Result<()> {
        let slot = self.layout.units[u].param_slot;
        let t0 = Instant::now();
        let (prefetched, staging) = {
            let mut s = self.lock();
            if s.param_owner[slot] == Some(u) {
                return Ok(());
            }
            match s.pending {
                Some((p, i)) if p == u => {
                    s.pending = None;
                    (true, i)
                }
                // Not the one in flight: the other staging buffer.
                Some((_, i)) => (false, 1 - i),
                None => {
                    s.next_staging = 1 - s.next_staging;
                    (false, s.next_staging)
                }
            }
        };
        let unit = &self.layout.units[u];
        let n = self.layout.ranks;
        let staging = self.gather_staging[staging].slice(0, n * unit.shard_len);
        if prefetched {
            self.comm.order_compute()?;
        } else {
            self.comm
                .all_gather(shards.slice(unit.local_off, unit.shard_len), staging)?;
        }
        let base = self.layout.param_slots[slot].0;
        for (at, to, len) in self.layout.blocks(u) {
            be.copy(staging.slice(at, len), self.params.slice(base + to, len))?;
        }
        let mut s = self.lock();
        s.param_owner[slot] = Some(u);
        s.gathers += !prefetched as u64;
        s.prefetched += prefetched as u64;
        s.comm_time += t0.elapsed();
        Ok(())
    }

    /// Issues the all-gather of unit `u` into a staging buffer while the current unit computes
    /// (FSDP's prefetch); `acquire(u)` then only waits for it and copies it out. One prefetch is
    /// in flight at a time; a unit already in its slot is not fetched.
    pub fn prefetch(&self, u: usize, shards: Buf) -> Result<()> {
        let t0 = Instant::now();
        let i = {
            let mut s = self.lock();
            let slot = self.layout.units[u].param_slot;
            if s.pending.is_some() || s.param_owner[slot] == Some(u) {
                return Ok(());
            }
            s.next_staging = 1 - s.next_staging;
            s.pending = Some((u, s.next_staging));
            s.next_staging
        };
        let unit = &self.layout.units[u];
        let staging = self.gather_staging[i].slice(0, self.layout.ranks * unit.shard_len);
        let r = self
            .comm
            .all_gather_start(shards.slice(unit.local_off, unit.shard_len), staging);
        let mut s = self.lock();
        if r.is_err() {
            s.pending = None;
        }
        s.gathers += 1;
        s.comm_time += t0.elapsed();
        r
    }

    /// Orders compute after the reduce-scatters issued so far.
    fn order_reduces(&self) -> Result<()> {
        let in_flight = std::mem::take(&mut self.lock().reduces_in_flight);
        if in_flight {
            self.comm.order_compute()?;
        }
        Ok(())
    }

    /// Orders compute after everything in flight: a prefetch nobody acquired (before the
    /// optimizer rewrites the shards it reads) and the last reduce-scatters (before the grad
    /// norm reads the gradient shards).
    pub fn drain(&self) -> Result<()> {
        let pending = self.lock().pending.take().is_some();
        let reduces = std::mem::take(&mut self.lock().reduces_in_flight);
        if pending || reduces {
            self.comm.order_compute()?;
        }
        Ok(())
    }

    /// Makes unit `u`'s gradient slot its own (zeroed on first use in the step); a slot it
    /// already owns keeps accumulating.
    pub fn open_grads(&self, be: &dyn Backend, u: usize) -> Result<()> {
        let slot = self.layout.units[u].grad_slot;
        if self.lock().grad_owner[slot] == Some(u) {
            return Ok(());
        }
        let (off, _) = self.layout.grad_slots[slot];
        be.fill(self.grads.slice(off, self.layout.units[u].full_len), 0.0)?;
        self.lock().grad_owner[slot] = Some(u);
        Ok(())
    }

    /// After unit `u`'s last backward op: on a syncing micro-batch, reduce-scatters its
    /// gradients (summed over ranks) into `local_grads` (the local f32 gradient region).
    pub fn reduce(&self, be: &dyn Backend, u: usize, local_grads: Buf) -> Result<()> {
        if !self.lock().sync {
            return Ok(());
        }
        self.open_grads(be, u)?; // a unit no op touched still reduces (zeros)
        let t0 = Instant::now();
        let unit = &self.layout.units[u];
        let n = self.layout.ranks;
        // The previous unit's reduce-scatter, which ran while this unit's backward computed,
        // reads the staging buffer: it must be done before the pack (NCCL: compute waits on the
        // communication stream here; the host communicators are always done).
        self.order_reduces()?;
        let staging = self.reduce_staging.slice(0, n * unit.shard_len);
        be.fill(staging, 0.0)?;
        let base = self.layout.grad_slots[unit.grad_slot].0;
        for (at, from, len) in self.layout.blocks(u) {
            let (src, dst) = (self.grads.slice(base + from, len), staging.slice(at, len));
            if self.reduce_dtype == DType::F32 {
                be.copy(src, dst)?;
            } else {
                be.cast(src, dst)?;
            }
        }
        let out = local_grads.slice(unit.local_off, unit.shard_len);
        match self.reduce_recv {
            None => {
                self.comm
                    .reduce_scatter_start(staging, out, ReduceOp::Sum)?;
                self.lock().reduces_in_flight = true;
            }
            Some(r) => {
                let r = r.slice(0, unit.shard_len);
                self.comm.reduce_scatter(staging, r, ReduceOp::Sum)?;
                be.cast(r, out)?;
            }
        }
        let mut s = self.lock();
        s.reduces += 1;
        s.comm_time += t0.elapsed();
        Ok(())
    }

    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }
    pub fn reduce_dtype(&self) -> DType {
        self.reduce_dtype
    }
}
