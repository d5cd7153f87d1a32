//! Reverse pass: each op's backward kernels, gradient accumulation, and the replay of
//! activation-checkpoint regions.

use super::forward::{attn_shape, rope_shape};
use super::ops::Op;
use super::{Tape, Tensor};
use crate::backend::{AttnBwd, EmbeddingShard, Gemm, RmsNormBwd};
use crate::error::{Error, Result};
use crate::tensor::{DType, Shape};

/// Gradient bookkeeping for one backward pass. A gradient is `owned` when no other tensor shares
/// its buffer; only owned gradients may be accumulated in place.
#[derive(Default)]
struct Grads {
    g: Vec<Option<(Tensor, bool)>>,
}

impl Grads {
    fn get(&self, t: Tensor) -> Option<(Tensor, bool)> {
        self.g.get(t.0 as usize).copied().flatten()
    }
    fn set(&mut self, t: Tensor, g: Tensor, owned: bool) {
        let i = t.0 as usize;
        if self.g.len() <= i {
            self.g.resize(i + 1, None);
        }
        self.g[i] = Some((g, owned));
    }
}

/// FSDP's part of a backward pass: a unit is gathered (if its slot was reused) and its gradient
/// slot opened before its first backward op, and its gradients are reduce-scattered after its
/// last one, which is the lowest-numbered node reading it. Inert for an unsharded store.
struct FsdpWalk {
    /// Per unit: the first forward node reading it (its last in backward), if any.
    first_use: Vec<Option<usize>>,
    /// Per unit: the unit backward opens after it (the prefetch target).
    next: Vec<Option<usize>>,
    opened: Vec<bool>,
    reduced: Vec<bool>,
}

impl FsdpWalk {
    fn new(t: &Tape) -> FsdpWalk {
        let n = t.store.fsdp().map_or(0, |f| f.layout.units.len());
        let mut first_use = vec![None; n];
        let mut last_use: Vec<Option<usize>> = vec![None; n];
        if n > 0 {
            for ni in (0..t.nodes.len()).rev() {
                for u in t.node_units(ni) {
                    first_use[u] = Some(ni);
                    last_use[u].get_or_insert(ni);
                }
            }
        }
        // Backward opens units by their last forward use, latest first.
        let mut order: Vec<usize> = (0..n).filter(|&u| last_use[u].is_some()).collect();
        order.sort_by_key(|&u| std::cmp::Reverse(last_use[u]));
        let mut next = vec![None; n];
        for w in order.windows(2) {
            next[w[0]] = Some(w[1]);
        }
        FsdpWalk {
            first_use,
            next,
            opened: vec![false; n],
            reduced: vec![false; n],
        }
    }

    fn before(&mut self, t: &Tape, ni: usize) -> Result<()> {
        let Some(f) = t.store.fsdp() else {
            return Ok(());
        };
        for u in t.node_units(ni) {
            if !self.opened[u] {
                t.store.gather_unit(t.be, u)?;
                f.open_grads(t.be, u)?;
                self.opened[u] = true;
                if let Some(v) = self.next[u] {
                    t.store.prefetch_unit(v)?;
                }
            }
        }
        Ok(())
    }

    fn after(&mut self, t: &Tape, ni: usize) -> Result<()> {
        if self.first_use.is_empty() {
            return Ok(());
        }
        for u in t.node_units(ni) {
            if self.first_use[u] == Some(ni) && !self.reduced[u] {
                t.store.reduce_unit(t.be, u)?;
                self.reduced[u] = true;
            }
        }
        Ok(())
    }

    /// Units no node read still reduce (zeros), so every rank issues the same collectives.
    fn finish(self, t: &Tape) -> Result<()> {
        for (u, done) in self.reduced.iter().enumerate() {
            if !done {
                t.store.reduce_unit(t.be, u)?;
            }
        }
        match t.store.fsdp() {
            Some(f) => f.drain(),
            None => Ok(()),
        }
    }
}

/// Weight-gradient work of one node that a split backward deferred: the node and the gradients
/// its backward read (of its output, and for `AddRmsNorm` of its residual sum `h`).
pub(crate) struct Deferred {
    ni: usize,
    g: Tensor,
    gh: Option<Tensor>,
}

impl<'a> Tape<'a> {
    /// Differentiates the tape from `loss`, which must be the output of `cross_entropy` (its
    /// gradient scale was fixed there). Parameter gradients are accumulated (+=) into the
    /// parameter store, so calling this once per micro-batch accumulates over the global batch.
    pub fn backward(&mut self, loss: Tensor) -> Result<()> {
        self.backward_from(loss, None, &[], false).map(|_| ())
    }

    /// A pipeline stage's backward: from `out` with gradient `dout` (None: `out` is the
    /// `cross_entropy` loss, the last stage); returns the gradients of `inputs` (None where no
    /// gradient reached one). With `defer_weights` (zero-bubble's input-gradient pass) each
    /// op's parameter-gradient work is recorded instead of run; `backward_weights` runs it
    /// later, in the same order, so the gradients are bitwise those of a full backward.
    pub fn backward_from(
        &mut self,
        out: Tensor,
        dout: Option<Tensor>,
        inputs: &[Tensor],
        defer_weights: bool,
    ) -> Result<Vec<Option<Tensor>>> {
        let mut grads = Grads::default();
        match dout {
            None => {
                let is_loss = self.nodes.iter().any(|n| match n.op {
                    Op::CrossEntropy { loss: l, .. } | Op::CrossEntropyShard { loss: l, .. } => {
                        l == out
                    }
                    _ => false,
                });
                if !is_loss {
                    return Err(Error::Shape {
                        op: "backward",
                        msg: "the root must be a cross_entropy loss".into(),
                    });
                }
                grads.set(out, out, false);
            }
            Some(g) => {
                if self.shape(g) != self.shape(out) || self.dtype(g) != self.dtype(out) {
                    return Err(Error::Shape {
                        op: "backward",
                        msg: format!(
                            "output gradient {} {} for an output {} {}",
                            self.shape(g),
                            self.dtype(g),
                            self.shape(out),
                            self.dtype(out)
                        ),
                    });
                }
                grads.set(out, g, false);
            }
        }
        self.walk(grads, defer_weights)
            .map(|g| inputs.iter().map(|&x| g.get(x).map(|p| p.0)).collect())
    }

    /// Runs the parameter-gradient work a `backward_from(.., defer_weights)` left (zero-bubble's
    /// weight pass): the same kernels on the same buffers, which the tape still holds.
    pub fn backward_weights(&mut self) -> Result<()> {
        for d in std::mem::take(&mut self.deferred) {
            // FSDP: no gather is needed even if a later forward reused the unit's parameter
            // slot: a weight gradient reads no weight values (dW = doutᵀ x; the norms' kernel
            // reads w only for its input gradient, which goes to a scratch here). The gradient
            // slot stays open: the pipeline reduces every unit once, after the schedule.
            let op = self.nodes[d.ni].op.clone();
            self.weight_grads(&op, d.g, d.gh)?;
        }
        Ok(())
    }

    fn walk(&mut self, mut grads: Grads, defer: bool) -> Result<Grads> {
        let mut fsdp = FsdpWalk::new(self);
        for ni in (0..self.nodes.len()).rev() {
            if let Some(r) = self.nodes[ni].region {
                let reg = &self.regions[r as usize];
                if reg.released_any && !reg.recomputed {
                    let (start, end) = (reg.start, reg.end);
                    for n in start..end {
                        for u in self.node_units(n) {
                            self.store.gather_unit(self.be, u)?;
                        }
                    }
                    self.recompute(r as usize)?;
                }
            }
            let op = self.nodes[ni].op.clone();
            if op.outputs().iter().any(|&o| grads.get(o).is_some()) {
                fsdp.before(self, ni)?;
                let name = super::profile::enabled().then(|| self.profile_name(&op) + " bwd");
                super::profile::timed(
                    self.be,
                    || name.unwrap_or_default(),
                    || self.backward_node(ni, &op, &mut grads, defer),
                )?;
            }
            fsdp.after(self, ni)?;
        }
        fsdp.finish(self)?;
        Ok(grads)
    }

    /// The parameter-gradient half of node `op`'s backward, given the gradient `g` of its
    /// output (and `gh` of an `AddRmsNorm`'s residual sum, as the full backward read it). The
    /// norms' kernel computes the input gradient too; here it goes to a scratch buffer.
    fn weight_grads(&mut self, op: &Op, g: Tensor, gh: Option<Tensor>) -> Result<()> {
        let be = self.be;
        match *op {
            Op::Embedding {
                table, ids, shard, ..
            } => {
                let dim = self.shape(table).0[1];
                let dt = self.weight_grad(table, "embedding")?;
                let (gb, ib, db) = (self.touch(g)?, self.touch(ids)?, self.touch(dt)?);
                match shard {
                    None => be.embedding_bwd(gb, ib, db, dim)?,
                    Some((row0, vocab)) => be.embedding_shard_bwd(&EmbeddingShard {
                        table: db,
                        ids: ib,
                        out: gb,
                        dim,
                        row0,
                        vocab,
                    })?,
                }
            }
            Op::Linear { x, w, .. } => {
                let (n, k) = (self.shape(x).rows(), self.shape(x).last());
                let m_out = self.shape(w).0[0];
                let dw = self.weight_grad(w, "linear")?;
                let (gb, xb, dwb) = (self.touch(g)?, self.touch(x)?, self.touch(dw)?);
                be.gemm(&Gemm::new(m_out, k, n, true, false, 1.0), gb, xb, dwb)?;
            }
            Op::RmsNorm { x, w, rstd, .. } => {
                let dw = self.weight_grad(w, "rmsnorm")?;
                self.norm_bwd(g, x, w, rstd, None, dw)?;
            }
            Op::AddRmsNorm { w, h, rstd, .. } => {
                let dw = self.weight_grad(w, "add_rmsnorm")?;
                self.norm_bwd(g, h, w, rstd, gh, dw)?;
            }
            _ => return Ok(()),
        }
        self.tick();
        Ok(())
    }

    /// An RMSNorm backward whose input gradient is discarded (a fresh scratch), `dres` added
    /// to it as the full backward did.
    fn norm_bwd(
        &mut self,
        g: Tensor,
        x: Tensor,
        w: Tensor,
        rstd: Tensor,
        dres: Option<Tensor>,
        dw: Tensor,
    ) -> Result<()> {
        let (rows, dim) = (self.shape(x).rows(), self.shape(x).last());
        let dx = self.grad_buf_like(x)?;
        let [gb, xb, wb, rb, dxb, dwb] = self.touch_all([g, x, w, rstd, dx, dw])?;
        let a = RmsNormBwd {
            dout: gb,
            x: xb,
            w: wb,
            rstd: rb,
            dx: dxb,
            dw: dwb,
            rows,
            dim,
        };
        match dres {
            Some(r) => {
                let rb = self.touch(r)?;
                self.be.rmsnorm_bwd_add(&a, rb)
            }
            None => self.be.rmsnorm_bwd(&a),
        }
    }

    /// A zeroed f32 gradient of `w`'s shape that nothing reads (the weight half of a norm's
    /// kernel, while a split backward defers the real one).
    fn scratch_weight_grad(&mut self, w: Tensor) -> Result<Tensor> {
        let t = self.alloc(self.shape(w).clone(), DType::F32, false)?;
        let b = self.touch(t)?;
        self.be.fill(b, 0.0)?;
        Ok(t)
    }

    /// Records node `ni`'s weight-gradient work for `backward_weights` when deferring; true
    /// when it did (the caller then skips it).
    fn defer(&mut self, defer: bool, ni: usize, g: Tensor, gh: Option<Tensor>) -> bool {
        if defer {
            self.deferred.push(Deferred { ni, g, gh });
        }
        defer
    }

    /// Rematerialises the released buffers of a checkpoint region by replaying its nodes.
    fn recompute(&mut self, r: usize) -> Result<()> {
        let (start, end) = (self.regions[r].start, self.regions[r].end);
        for ni in start..end {
            let outs = self.nodes[ni].op.outputs();
            let mut redo = false;
            for o in outs {
                if self.is_released(o) {
                    self.realloc(o)?;
                    redo = true;
                }
            }
            if redo {
                self.run_forward(ni)?;
            }
        }
        self.regions[r].recomputed = true;
        Ok(())
    }

    fn accumulate(&mut self, grads: &mut Grads, t: Tensor, g: Tensor, owned: bool) -> Result<()> {
        if !self.requires_grad(t) {
            return Ok(());
        }
        match grads.get(t) {
            None => grads.set(t, g, owned),
            Some((e, true)) => {
                let (eb, gb) = (self.touch(e)?, self.touch(g)?);
                self.be.add(eb, gb, eb)?;
                self.tick();
            }
            Some((e, false)) => {
                let n = self.alloc(self.shape(t).clone(), self.dtype(e), false)?;
                let (eb, gb, nb) = (self.touch(e)?, self.touch(g)?, self.touch(n)?);
                self.be.add(eb, gb, nb)?;
                self.tick();
                grads.set(t, n, true);
            }
        }
        Ok(())
    }

    fn grad_buf_like(&mut self, t: Tensor) -> Result<Tensor> {
        let dtype = self.dtype(t);
        self.alloc(self.shape(t).clone(), dtype, false)
    }

    /// The f32 gradient buffer a weight's gradient accumulates into.
    fn weight_grad(&mut self, w: Tensor, op: &'static str) -> Result<Tensor> {
        match self.tensors[w.0 as usize].param {
            Some(pid) => {
                let shape = self.shape(w).clone();
                Ok(self.external(self.store.grad(pid), shape, false, None))
            }
            None if !self.requires_grad(w) => {
                // Gradient is not wanted; a zeroed scratch keeps the kernel contract simple.
                let t = self.alloc(self.shape(w).clone(), DType::F32, false)?;
                let b = self.touch(t)?;
                self.be.fill(b, 0.0)?;
                Ok(t)
            }
            None => Err(Error::Shape {
                op,
                msg: "a weight that needs a gradient must be a parameter".into(),
            }),
        }
    }

    fn backward_node(&mut self, ni: usize, op: &Op, grads: &mut Grads, defer: bool) -> Result<()> {
        let be = self.be;
        match *op {
            Op::View { x, out } => {
                if let Some((g, _)) = grads.get(out) {
                    let shape: Shape = self.shape(x).clone();
                    let gv = self.view_of(g, shape, false);
                    self.accumulate(grads, x, gv, false)?;
                }
            }
            Op::Embedding { table, out, .. } => {
                let (g, _) = grads.get(out).unwrap();
                if self.requires_grad(table) && !self.defer(defer, ni, g, None) {
                    self.weight_grads(op, g, None)?;
                }
            }
            Op::Linear { x, w, out } => {
                let (g, _) = grads.get(out).unwrap();
                let (n, k) = (self.shape(x).rows(), self.shape(x).last());
                let m_out = self.shape(w).0[0];
                match grads.get(x) {
                    // x already has a gradient of its own (q, k, v share their input): the GEMM
                    // accumulates into it (beta = 1) instead of a temporary plus an add pass.
                    Some((e, true)) if self.requires_grad(x) => {
                        let [gb, wb, eb] = self.touch_all([g, w, e])?;
                        be.gemm(&Gemm::new(n, k, m_out, false, false, 1.0), gb, wb, eb)?;
                        self.tick();
                    }
                    _ if self.requires_grad(x) => {
                        let dx = self.grad_buf_like(x)?;
                        let [gb, wb, dxb] = self.touch_all([g, w, dx])?;
                        be.gemm(&Gemm::new(n, k, m_out, false, false, 0.0), gb, wb, dxb)?;
                        self.tick();
                        self.accumulate(grads, x, dx, true)?;
                    }
                    _ => {}
                }
                if self.requires_grad(w) && !self.defer(defer, ni, g, None) {
                    let dw = self.weight_grad(w, "linear")?;
                    let (gb, xb, dwb) = (self.touch(g)?, self.touch(x)?, self.touch(dw)?);
                    be.gemm(&Gemm::new(m_out, k, n, true, false, 1.0), gb, xb, dwb)?;
                    self.tick();
                }
            }
            Op::RmsNorm {
                x, w, rstd, out, ..
            } => {
                let (g, _) = grads.get(out).unwrap();
                let (rows, dim) = (self.shape(x).rows(), self.shape(x).last());
                let dx = self.grad_buf_like(x)?;
                let dw = match self.defer(defer, ni, g, None) {
                    true => self.scratch_weight_grad(w)?,
                    false => self.weight_grad(w, "rmsnorm")?,
                };
                let [gb, xb, wb, rb, dxb, dwb] = self.touch_all([g, x, w, rstd, dx, dw])?;
                be.rmsnorm_bwd(&RmsNormBwd {
                    dout: gb,
                    x: xb,
                    w: wb,
                    rstd: rb,
                    dx: dxb,
                    dw: dwb,
                    rows,
                    dim,
                })?;
                self.tick();
                self.accumulate(grads, x, dx, true)?;
            }
            Op::AddRmsNorm {
                x,
                residual,
                w,
                h,
                out,
                rstd,
                ..
            } => {
                let (rows, dim) = (self.shape(x).rows(), self.shape(x).last());
                let mut total = grads.get(h).map(|p| p.0);
                if let Some((g, _)) = grads.get(out) {
                    let dh = self.grad_buf_like(h)?;
                    let dw = match self.defer(defer, ni, g, total) {
                        true => self.scratch_weight_grad(w)?,
                        false => self.weight_grad(w, "add_rmsnorm")?,
                    };
                    let [gb, hb, wb, rb, dhb, dwb] = self.touch_all([g, h, w, rstd, dh, dw])?;
                    let a = RmsNormBwd {
                        dout: gb,
                        x: hb,
                        w: wb,
                        rstd: rb,
                        dx: dhb,
                        dw: dwb,
                        rows,
                        dim,
                    };
                    match total {
                        // h's own gradient (the residual stream) is added in the same pass.
                        Some(gh) => {
                            let ghb = self.touch(gh)?;
                            be.rmsnorm_bwd_add(&a, ghb)?
                        }
                        None => be.rmsnorm_bwd(&a)?,
                    }
                    self.tick();
                    total = Some(dh);
                }
                if let Some(t) = total {
                    self.accumulate(grads, x, t, false)?;
                    self.accumulate(grads, residual, t, false)?;
                }
            }
            Op::Rope { x, cos, sin, out } => {
                let (g, _) = grads.get(out).unwrap();
                if self.requires_grad(x) {
                    let s = rope_shape(self.shape(x));
                    let half = s.head_dim / 2;
                    let dx = self.grad_buf_like(x)?;
                    let (gb, dxb) = (self.touch(g)?, self.touch(dx)?);
                    let (cb, sb) = (
                        self.touch(cos)?.slice(0, s.seq * half),
                        self.touch(sin)?.slice(0, s.seq * half),
                    );
                    be.rope_bwd(gb, dxb, cb, sb, s)?;
                    self.tick();
                    self.accumulate(grads, x, dx, true)?;
                }
            }
            Op::Attention {
                q,
                k,
                v,
                out,
                lse,
                scale,
            } => {
                let (g, _) = grads.get(out).unwrap();
                let s = attn_shape(self.shape(q), self.shape(k));
                let (dq, dk, dv) = (
                    self.grad_buf_like(q)?,
                    self.grad_buf_like(k)?,
                    self.grad_buf_like(v)?,
                );
                let [qb, kb, vb, ob, gb, lb, dqb, dkb, dvb] =
                    self.touch_all([q, k, v, out, g, lse, dq, dk, dv])?;
                be.attention_bwd(&AttnBwd {
                    q: qb,
                    k: kb,
                    v: vb,
                    out: ob,
                    dout: gb,
                    lse: lb,
                    dq: dqb,
                    dk: dkb,
                    dv: dvb,
                    shape: s,
                    scale,
                })?;
                self.tick();
                self.accumulate(grads, q, dq, true)?;
                self.accumulate(grads, k, dk, true)?;
                self.accumulate(grads, v, dv, true)?;
            }
            Op::SwiGlu { gate, up, out } => {
                let (g, _) = grads.get(out).unwrap();
                let (dg, du) = (self.grad_buf_like(gate)?, self.grad_buf_like(up)?);
                let [gb, gtb, ub, dgb, dub] = self.touch_all([g, gate, up, dg, du])?;
                be.swiglu_bwd(gb, gtb, ub, dgb, dub)?;
                self.tick();
                self.accumulate(grads, gate, dg, true)?;
                self.accumulate(grads, up, du, true)?;
            }
            Op::Add { a, b, out } => {
                let (g, _) = grads.get(out).unwrap();
                self.accumulate(grads, a, g, false)?;
                self.accumulate(grads, b, g, false)?;
            }
            Op::Tp { kind, x, out, .. } => {
                if let Some((g, owned)) = grads.get(out) {
                    if self.requires_grad(x) {
                        let (gx, owned) = self.tp_backward(kind, x, g, owned)?;
                        self.accumulate(grads, x, gx, owned)?;
                    }
                }
            }
            Op::CrossEntropy {
                logits,
                loss,
                dlogits,
                ..
            }
            | Op::CrossEntropyShard {
                logits,
                loss,
                dlogits,
                ..
            } => {
                if grads.get(loss).is_some() {
                    self.accumulate(grads, logits, dlogits, true)?;
                }
            }
        }
        Ok(())
    }
}
