//! Tensor parallel on the tape (DTensor's idea, explicit): every tensor knows how it lies over
//! the tp group (`Tp`), `dims` reports the whole shape, and the ops that meet a split weight
//! insert the collectives Megatron-LM places by hand. A model's code stays single-device math:
//! `linear(x, wq)` with wq split on its output features gathers x's token shards (sequence
//! parallel) or marks x replicated, and returns head-sharded q; `linear(o, wo)` with wo split on
//! its input features reduce-scatters the partial sums back onto token shards (or all-reduces
//! them). Reshapes carry a split dim along, elementwise ops and norms keep their input's
//! placement, and the loss reads vocabulary-sharded logits without gathering them (loss
//! parallel). A replicated weight that meets sharded activations (a norm under sequence
//! parallel) is marked, so that the trainer all-reduces its partial gradient.

use super::ops::Op;
use super::{Tape, Tensor};
use crate::backend::Copy2d;
use crate::dist::ReduceOp;
use crate::error::{Error, Result};
use crate::parallel::tp::{split, TensorParallel};
use crate::tensor::Shape;

/// How a tensor lies over the tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tp {
    /// Every rank holds all of it.
    Replicate,
    /// Split on this dim of the whole shape: each rank holds a contiguous 1/tp of it.
    Shard(usize),
    /// Split on the tokens (sequence parallel): the rows of the whole shape flattened to
    /// `[rows, last]`, rank r holding rows `r * rows / tp ..`; the local shape is
    /// `[rows / tp, last]`.
    Tokens,
    /// Each rank holds a partial sum of the whole (a row-parallel output before its reduce).
    Partial,
}

/// The collectives the tape inserts (Megatron-LM's conjugate pairs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TpKind {
    /// Identity forward, all-reduce of the gradient in backward (Megatron's f): the replicated
    /// input of column-parallel linears without sequence parallel.
    Copy,
    /// All-reduce of partial sums forward, identity backward (Megatron's g).
    AllReduce,
    /// All-gather of token shards forward, reduce-scatter of the gradient backward.
    GatherTokens,
    /// Reduce-scatter of partial sums onto token shards forward, all-gather backward.
    ScatterTokens,
    /// All-gather of last-dim shards forward (whole logits without loss parallel), each rank's
    /// slice of the gradient backward.
    GatherLast,
}

impl TpKind {
    pub fn name(self) -> &'static str {
        match self {
            TpKind::Copy => "tp_copy",
            TpKind::AllReduce => "tp_all_reduce",
            TpKind::GatherTokens => "sp_all_gather",
            TpKind::ScatterTokens => "sp_reduce_scatter",
            TpKind::GatherLast => "tp_all_gather_last",
        }
    }
}

fn tp_err(op: &'static str, msg: String) -> Error {
    Error::Shape { op, msg }
}

impl<'a> Tape<'a> {
    pub(crate) fn tp_state(&self) -> Option<&'a TensorParallel> {
        self.store.tp()
    }

    pub fn placement_of(&self, t: Tensor) -> Tp {
        self.tensors[t.0 as usize].tp
    }

    pub(crate) fn set_tp(&mut self, t: Tensor, tp: Tp, logical: Shape) {
        let m = &mut self.tensors[t.0 as usize];
        m.tp = tp;
        m.logical = (tp != Tp::Replicate).then_some(logical);
    }

    /// `out` lies as `from` does (elementwise ops, norms).
    pub(crate) fn tp_follow(&mut self, out: Tensor, from: Tensor) {
        let tp = self.placement_of(from);
        if tp != Tp::Replicate {
            let logical = Shape(self.dims(from));
            self.set_tp(out, tp, logical);
        }
    }

    /// The operands of an elementwise op lie alike (placement and whole shape).
    pub(crate) fn tp_same(&self, op: &'static str, ts: &[Tensor]) -> Result<()> {
        let p0 = (self.placement_of(ts[0]), self.dims(ts[0]));
        for &t in &ts[1..] {
            let p = (self.placement_of(t), self.dims(t));
            if p != p0 {
                return Err(tp_err(
                    op,
                    format!("operands lie differently over the tp group: {p0:?} vs {p:?}"),
                ));
            }
        }
        Ok(())
    }

    /// A norm over the last dim of `x`: its input must hold whole rows; a replicated weight
    /// applied to split activations gets a partial gradient.
    pub(crate) fn tp_norm(&self, op: &'static str, x: Tensor, w: Tensor) -> Result<()> {
        let last = self.dims(x).len() - 1;
        match self.placement_of(x) {
            Tp::Replicate => Ok(()),
            Tp::Shard(d) if d == last => Err(tp_err(
                op,
                "normalises over a dim split over the tp group".into(),
            )),
            Tp::Partial => Err(tp_err(op, "input is an unreduced partial sum".into())),
            _ => {
                if let (Some(tp), Some(id)) = (self.tp_state(), self.tensors[w.0 as usize].param) {
                    if self.placement_of(w) == Tp::Replicate {
                        tp.mark_partial(id);
                    }
                }
                Ok(())
            }
        }
    }

    /// The split dim of a parameter tensor (None: replicated).
    fn weight_split(&self, w: Tensor) -> Option<usize> {
        match self.placement_of(w) {
            Tp::Shard(k) => Some(k),
            _ => None,
        }
    }

    /// The input a linear with weight `w` multiplies: a column-parallel weight needs the whole
    /// input on every rank (gathered from token shards, or marked replicated so its gradient is
    /// all-reduced), once per source tensor.
    pub(crate) fn tp_linear_in(&mut self, x: Tensor, w: Tensor) -> Result<Tensor> {
        if self.tp_state().is_none() {
            return Ok(x);
        }
        let last = self.dims(x).len() - 1;
        let kind = match (self.weight_split(w), self.placement_of(x)) {
            (Some(0), Tp::Tokens) => TpKind::GatherTokens,
            (Some(0), Tp::Replicate) if self.requires_grad(x) => TpKind::Copy,
            (Some(0), Tp::Replicate) => return Ok(x),
            (Some(1), Tp::Shard(d)) if d == last => return Ok(x),
            (None, Tp::Replicate | Tp::Tokens) => return Ok(x),
            (split, p) => {
                let what = match split {
                    Some(0) => "a column-parallel",
                    Some(1) => "a row-parallel",
                    _ => "a replicated",
                };
                return Err(tp_err(
                    "linear",
                    format!("{what} weight cannot take an input that lies as {p:?}"),
                ));
            }
        };
        let key = (x, self.open_region);
        if let Some(&g) = self.tp_inputs.get(&key) {
            return Ok(g);
        }
        let g = self.tp_op(kind, x)?;
        self.tp_inputs.insert(key, g);
        Ok(g)
    }

    /// Places a linear's output: split on its features after a column-parallel weight, reduced
    /// (onto token shards or all of it) after a row-parallel one.
    pub(crate) fn tp_linear_out(&mut self, x: Tensor, w: Tensor, out: Tensor) -> Result<Tensor> {
        let Some(tp) = self.tp_state() else {
            return Ok(out);
        };
        let mut logical = self.dims(x);
        let features = self.dims(w)[0];
        *logical.last_mut().unwrap() = features;
        match self.weight_split(w) {
            Some(0) => {
                self.set_tp(out, Tp::Shard(logical.len() - 1), Shape(logical));
                Ok(out)
            }
            Some(_) => {
                let local = self.shape(out).clone();
                self.set_tp(out, Tp::Partial, local);
                self.tp_reduce(out)
            }
            None => {
                if self.placement_of(x) == Tp::Tokens {
                    if let Some(id) = self.tensors[w.0 as usize].param {
                        tp.mark_partial(id);
                    }
                    self.set_tp(out, Tp::Tokens, Shape(logical));
                }
                Ok(out)
            }
        }
    }

    /// Reduces a partial sum: onto token shards with sequence parallel, else all of it.
    pub(crate) fn tp_reduce(&mut self, x: Tensor) -> Result<Tensor> {
        let sp = self.tp_state().is_some_and(|t| t.sequence_parallel);
        self.tp_op(
            if sp {
                TpKind::ScatterTokens
            } else {
                TpKind::AllReduce
            },
            x,
        )
    }

    /// Records one collective op on `x` and returns its output.
    pub(crate) fn tp_op(&mut self, kind: TpKind, x: Tensor) -> Result<Tensor> {
        let tp = self.tp_state().expect("tp_op without tensor parallel");
        let n = tp.degree;
        let xs = self.shape(x).clone();
        let logical = Shape(self.dims(x));
        let rg = self.requires_grad(x);
        let dtype = self.dtype(x);
        let (rows, last) = (xs.rows(), xs.last());
        let mut stage = None;
        let out = match kind {
            TpKind::Copy | TpKind::AllReduce => self.view_of(x, xs.clone(), rg),
            TpKind::GatherTokens => self.alloc(logical.clone(), dtype, rg)?,
            TpKind::ScatterTokens => {
                if !rows.is_multiple_of(n) {
                    return Err(Error::Config(format!(
                        "sequence parallel: {rows} tokens per micro-batch (local_batch_size x \
                         seq_len) do not split over tensor_parallel_degree {n}; make them a \
                         multiple of it or set parallelism.enable_sequence_parallel = false"
                    )));
                }
                self.alloc(Shape(vec![rows / n, last]), dtype, rg)?
            }
            TpKind::GatherLast => {
                // The gather's blocks, then this rank's columns padded to the chunk (ranks may
                // hold one column less than the first).
                let whole = *logical.0.last().unwrap();
                let chunk = whole.div_ceil(n);
                stage = Some(self.alloc(Shape(vec![(n + 1) * rows, chunk]), dtype, false)?);
                self.alloc(Shape(vec![rows, whole]), dtype, rg)?
            }
        };
        self.record(Op::Tp {
            kind,
            x,
            out,
            stage,
        })?;
        match kind {
            TpKind::Copy | TpKind::GatherTokens | TpKind::AllReduce | TpKind::GatherLast => {}
            TpKind::ScatterTokens => self.set_tp(out, Tp::Tokens, logical),
        }
        Ok(out)
    }

    /// The forward of a collective op (also its replay in a checkpoint region).
    pub(crate) fn run_tp(
        &mut self,
        kind: TpKind,
        x: Tensor,
        out: Tensor,
        stage: Option<Tensor>,
    ) -> Result<()> {
        let tp = self.tp_state().expect("tp op without tensor parallel");
        let (xb, ob) = (self.buf(x), self.buf(out));
        match kind {
            TpKind::Copy => Ok(()),
            TpKind::AllReduce => tp.comm.all_reduce(ob, ReduceOp::Sum),
            TpKind::GatherTokens => tp.comm.all_gather(xb, ob),
            TpKind::ScatterTokens => tp.comm.reduce_scatter(xb, ob, ReduceOp::Sum),
            TpKind::GatherLast => {
                let st = self.buf(stage.expect("GatherLast has a stage"));
                let (rows, cols) = (self.shape(x).rows(), self.shape(x).last());
                let whole = self.shape(out).last();
                let (n, chunk) = (tp.degree, whole.div_ceil(tp.degree));
                let send = st.slice(n * rows * chunk, rows * chunk);
                self.be.copy_2d(&Copy2d {
                    src: xb,
                    dst: send,
                    rows,
                    cols,
                    src_stride: cols,
                    dst_stride: chunk,
                })?;
                tp.comm.all_gather(send, st.slice(0, n * rows * chunk))?;
                for r in 0..n {
                    let (c0, c) = split(whole, n, r);
                    self.be.copy_2d(&Copy2d {
                        src: st.slice(r * rows * chunk, rows * chunk),
                        dst: ob.slice(c0, ob.len - c0),
                        rows,
                        cols: c,
                        src_stride: chunk,
                        dst_stride: whole,
                    })?;
                }
                Ok(())
            }
        }
    }

    /// The gradient of `x` from the gradient `g` of a collective op's output, in a new buffer
    /// unless the op is the identity on its gradient (then `g` itself, not owned).
    pub(crate) fn tp_backward(
        &mut self,
        kind: TpKind,
        x: Tensor,
        g: Tensor,
        g_owned: bool,
    ) -> Result<(Tensor, bool)> {
        let tp = self.tp_state().expect("tp op without tensor parallel");
        match kind {
            TpKind::AllReduce => Ok((self.view_of(g, self.shape(x).clone(), false), false)),
            TpKind::Copy => {
                let gx = if g_owned {
                    g
                } else {
                    let c = self.grad_like(x)?;
                    let (gb, cb) = (self.touch(g)?, self.touch(c)?);
                    self.be.copy(gb, cb)?;
                    c
                };
                let b = self.touch(gx)?;
                tp.comm.all_reduce(b, ReduceOp::Sum)?;
                self.tick();
                Ok((self.view_of(gx, self.shape(x).clone(), false), g_owned))
            }
            TpKind::GatherTokens => {
                let dx = self.grad_like(x)?;
                let (gb, db) = (self.touch(g)?, self.touch(dx)?);
                tp.comm.reduce_scatter(gb, db, ReduceOp::Sum)?;
                self.tick();
                Ok((dx, true))
            }
            TpKind::ScatterTokens => {
                let dx = self.grad_like(x)?;
                let (gb, db) = (self.touch(g)?, self.touch(dx)?);
                tp.comm.all_gather(gb, db)?;
                self.tick();
                Ok((dx, true))
            }
            TpKind::GatherLast => {
                let dx = self.grad_like(x)?;
                let (rows, cols) = (self.shape(x).rows(), self.shape(x).last());
                let whole = self.shape(g).last();
                let (gb, db) = (self.touch(g)?, self.touch(dx)?);
                let off = split(whole, tp.degree, tp.rank).0;
                self.be.copy_2d(&Copy2d {
                    src: gb.slice(off, gb.len - off),
                    dst: db,
                    rows,
                    cols,
                    src_stride: whole,
                    dst_stride: cols,
                })?;
                self.tick();
                Ok((dx, true))
            }
        }
    }

    /// Where a split dim goes in a reshape of the whole shape `from` to `to`: the dim of `to`
    /// that starts at the same element stride and divides by the degree (the local data is then
    /// the same contiguous chunks).
    pub(crate) fn tp_reshape(&self, x: Tensor, to: &Shape) -> Result<Option<(Tp, Shape)>> {
        let Some(tp) = self.tp_state() else {
            return Ok(None);
        };
        let from = self.dims(x);
        match self.placement_of(x) {
            Tp::Replicate => Ok(None),
            Tp::Shard(d) => {
                let before: usize = from[..d].iter().product();
                let numel = self.shape(x).numel();
                let mut acc = 1usize;
                for (e, &n) in to.0.iter().enumerate() {
                    if acc == before && n > 1 {
                        // This rank's extent of dim e: its elements over the other dims'.
                        let others = acc * to.0[e + 1..].iter().product::<usize>();
                        if numel.is_multiple_of(others) {
                            let mut local = to.0.clone();
                            local[e] = numel / others;
                            return Ok(Some((Tp::Shard(e), Shape(local))));
                        }
                        break;
                    }
                    acc *= n;
                }
                Err(tp_err(
                    "reshape",
                    format!(
                        "{from:?} split on dim {d} over {} ranks cannot become {to}",
                        tp.degree
                    ),
                ))
            }
            Tp::Tokens if to.0.last() == from.last() => {
                let local = self.shape(x).clone();
                Ok(Some((Tp::Tokens, local)))
            }
            p => Err(tp_err(
                "reshape",
                format!("{from:?} lying as {p:?} cannot become {to}"),
            )),
        }
    }

    fn grad_like(&mut self, t: Tensor) -> Result<Tensor> {
        let dtype = self.dtype(t);
        self.alloc(self.shape(t).clone(), dtype, false)
    }
}
