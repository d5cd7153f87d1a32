//! Forward ops: shape checks, output allocation and node recording; the kernel launch of each
//! op lives in `Tape::run_forward` (forward.rs), so activation-checkpoint replay runs the very
//! same code as the first forward.

use super::tp::{Tp, TpKind};
use super::{Node, Tape, Tensor};
use crate::error::{Error, Result};
use crate::parallel::tp::split;
use crate::tensor::{DType, Shape};

#[derive(Clone, Debug)]
pub enum Op {
    View {
        x: Tensor,
        out: Tensor,
    },
    Embedding {
        table: Tensor,
        ids: Tensor,
        out: Tensor,
        /// Vocabulary parallel: (first row this rank holds, whole vocabulary).
        shard: Option<(usize, usize)>,
    },
    /// out = x · wᵀ with w [out_features, in_features].
    Linear {
        x: Tensor,
        w: Tensor,
        out: Tensor,
    },
    RmsNorm {
        x: Tensor,
        w: Tensor,
        out: Tensor,
        rstd: Tensor,
        eps: f32,
    },
    /// h = x + residual; out = rmsnorm(h).
    AddRmsNorm {
        x: Tensor,
        residual: Tensor,
        w: Tensor,
        h: Tensor,
        out: Tensor,
        rstd: Tensor,
        eps: f32,
    },
    Rope {
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        out: Tensor,
    },
    Attention {
        q: Tensor,
        k: Tensor,
        v: Tensor,
        out: Tensor,
        lse: Tensor,
        scale: f32,
    },
    SwiGlu {
        gate: Tensor,
        up: Tensor,
        out: Tensor,
    },
    Add {
        a: Tensor,
        b: Tensor,
        out: Tensor,
    },
    /// Fused loss: per-row losses, their sum, and dlogits (aliasing logits) computed in forward.
    CrossEntropy {
        logits: Tensor,
        targets: Tensor,
        losses: Tensor,
        loss: Tensor,
        dlogits: Tensor,
        ignore_index: i32,
        grad_scale: f32,
    },
    /// Loss parallel: the fused loss over vocabulary-sharded logits (this rank's columns
    /// `col0 ..`), its row statistics all-gathered over the tp group in between.
    CrossEntropyShard {
        logits: Tensor,
        targets: Tensor,
        stats: Tensor,
        gathered: Tensor,
        losses: Tensor,
        loss: Tensor,
        dlogits: Tensor,
        col0: usize,
        vocab_total: usize,
        ignore_index: i32,
        grad_scale: f32,
    },
    /// A tensor-parallel collective (see tape/tp.rs); `stage` is GatherLast's gather buffer.
    Tp {
        kind: TpKind,
        x: Tensor,
        out: Tensor,
        stage: Option<Tensor>,
    },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::View { .. } => "view",
            Op::Embedding { .. } => "embedding",
            Op::Linear { .. } => "linear",
            Op::RmsNorm { .. } => "rmsnorm",
            Op::AddRmsNorm { .. } => "add_rmsnorm",
            Op::Rope { .. } => "rope",
            Op::Attention { .. } => "attention",
            Op::SwiGlu { .. } => "swiglu",
            Op::Add { .. } => "add",
            Op::CrossEntropy { .. } => "cross_entropy",
            Op::CrossEntropyShard { .. } => "cross_entropy_shard",
            Op::Tp { kind, .. } => kind.name(),
        }
    }
    pub fn inputs(&self) -> Vec<Tensor> {
        match *self {
            Op::View { x, .. } => vec![x],
            Op::Embedding { table, ids, .. } => vec![table, ids],
            Op::Linear { x, w, .. } => vec![x, w],
            Op::RmsNorm { x, w, .. } => vec![x, w],
            Op::AddRmsNorm { x, residual, w, .. } => vec![x, residual, w],
            Op::Rope { x, cos, sin, .. } => vec![x, cos, sin],
            Op::Attention { q, k, v, .. } => vec![q, k, v],
            Op::SwiGlu { gate, up, .. } => vec![gate, up],
            Op::Add { a, b, .. } => vec![a, b],
            Op::CrossEntropy {
                logits, targets, ..
            }
            | Op::CrossEntropyShard {
                logits, targets, ..
            } => vec![logits, targets],
            Op::Tp { x, .. } => vec![x],
        }
    }
    pub fn outputs(&self) -> Vec<Tensor> {
        match *self {
            Op::View { out, .. } => vec![out],
            Op::Embedding { out, .. } => vec![out],
            Op::Linear { out, .. } => vec![out],
            Op::RmsNorm { out, rstd, .. } => vec![out, rstd],
            Op::AddRmsNorm { h, out, rstd, .. } => vec![h, out, rstd],
            Op::Rope { out, .. } => vec![out],
            Op::Attention { out, lse, .. } => vec![out, lse],
            Op::SwiGlu { out, .. } => vec![out],
            Op::Add { out, .. } => vec![out],
            Op::CrossEntropy {
                losses,
                loss,
                dlogits,
                ..
            } => vec![losses, loss, dlogits],
            Op::CrossEntropyShard {
                stats,
                gathered,
                losses,
                loss,
                dlogits,
                ..
            } => vec![stats, gathered, losses, loss, dlogits],
            Op::Tp { out, stage, .. } => std::iter::once(out).chain(stage).collect(),
        }
    }
}

fn shape_err(op: &'static str, msg: String) -> Error {
    Error::Shape { op, msg }
}

impl<'a> Tape<'a> {
    fn float_check(&self, op: &'static str, t: Tensor) -> Result<()> {
        match self.dtype(t) {
            DType::F32 | DType::BF16 => Ok(()),
            d => Err(Error::DType {
                op,
                msg: format!("expected a float tensor, got {d}"),
            }),
        }
    }

    fn same_dtype(&self, op: &'static str, a: Tensor, b: Tensor) -> Result<()> {
        if self.dtype(a) != self.dtype(b) {
            return Err(Error::DType {
                op,
                msg: format!("{} vs {}", self.dtype(a), self.dtype(b)),
            });
        }
        Ok(())
    }

    pub(crate) fn record(&mut self, op: Op) -> Result<()> {
        self.nodes.push(Node {
            op,
            region: self.open_region,
        });
        self.run_forward(self.nodes.len() - 1)
    }

    fn any_grad(&self, ts: &[Tensor]) -> bool {
        ts.iter().any(|&t| self.requires_grad(t))
    }

    /// Same storage, new shape (element count must match).
    pub fn reshape(&mut self, x: Tensor, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if shape.numel() != Shape(self.dims(x)).numel() {
            return Err(shape_err(
                "reshape",
                format!("{} -> {} changes the element count", self.shape(x), shape),
            ));
        }
        let rg = self.requires_grad(x);
        let out = match self.tp_reshape(x, &shape)? {
            Some((tp, local)) => {
                let out = self.view_of(x, local, rg);
                self.set_tp(out, tp, shape);
                out
            }
            None => self.view_of(x, shape, rg),
        };
        self.record(Op::View { x, out })?;
        Ok(out)
    }

    /// Rows of `table` [vocab, dim] gathered by `ids` (i32, any shape) -> [ids.., dim].
    pub fn embedding(&mut self, table: Tensor, ids: Tensor) -> Result<Tensor> {
        self.float_check("embedding", table)?;
        if self.dtype(ids) != DType::I32 {
            return Err(Error::DType {
                op: "embedding",
                msg: format!("ids must be i32, got {}", self.dtype(ids)),
            });
        }
        let ts = self.shape(table).clone();
        if ts.rank() != 2 {
            return Err(shape_err(
                "embedding",
                format!("table must be [vocab, dim], got {ts}"),
            ));
        }
        let mut dims = self.dims(ids);
        dims.push(ts.0[1]);
        let rg = self.requires_grad(table);
        let out = self.alloc(Shape(dims), self.dtype(table), rg)?;
        // A vocabulary-parallel table gives each rank's partial rows, reduced like a row-parallel
        // output.
        let shard = match (self.tp_state(), self.placement_of(table)) {
            (Some(tp), Tp::Shard(0)) => {
                let vocab = self.dims(table)[0];
                Some((split(vocab, tp.degree, tp.rank).0, vocab))
            }
            (_, Tp::Replicate) => None,
            (_, p) => {
                return Err(shape_err(
                    "embedding",
                    format!("a table lying as {p:?} over the tp group"),
                ))
            }
        };
        self.record(Op::Embedding {
            table,
            ids,
            out,
            shard,
        })?;
        if shard.is_some() {
            let local = self.shape(out).clone();
            self.set_tp(out, Tp::Partial, local);
            return self.tp_reduce(out);
        }
        Ok(out)
    }

    /// y = x · wᵀ, x [.., in], w [out, in] -> [.., out].
    pub fn linear(&mut self, x: Tensor, w: Tensor) -> Result<Tensor> {
        self.float_check("linear", x)?;
        let x = self.tp_linear_in(x, w)?;
        self.same_dtype("linear", x, w)?;
        let (xs, ws) = (self.shape(x).clone(), self.shape(w).clone());
        if ws.rank() != 2 || xs.last() != ws.0[1] {
            return Err(shape_err(
                "linear",
                format!("x {xs} does not fit weight {ws} ([out, in])"),
            ));
        }
        let mut dims = xs.0.clone();
        *dims.last_mut().unwrap() = ws.0[0];
        let rg = self.any_grad(&[x, w]);
        let out = self.alloc(Shape(dims), self.dtype(x), rg)?;
        self.record(Op::Linear { x, w, out })?;
        self.tp_linear_out(x, w, out)
    }

    fn norm_check(&self, x: Tensor, w: Tensor) -> Result<()> {
        self.float_check("rmsnorm", x)?;
        self.same_dtype("rmsnorm", x, w)?;
        let (xs, ws) = (self.shape(x), self.shape(w));
        if ws.rank() != 1 || ws.0[0] != xs.last() {
            return Err(shape_err(
                "rmsnorm",
                format!("x {xs} does not fit weight {ws}"),
            ));
        }
        Ok(())
    }

    pub fn rmsnorm(&mut self, x: Tensor, w: Tensor, eps: f32) -> Result<Tensor> {
        self.norm_check(x, w)?;
        self.tp_norm("rmsnorm", x, w)?;
        let xs = self.shape(x).clone();
        let rg = self.any_grad(&[x, w]);
        let out = self.alloc(xs.clone(), self.dtype(x), rg)?;
        let rstd = self.alloc(Shape(vec![xs.rows()]), DType::F32, false)?;
        self.record(Op::RmsNorm {
            x,
            w,
            out,
            rstd,
            eps,
        })?;
        self.tp_follow(out, x);
        Ok(out)
    }

    /// Fused residual add and norm: returns (h = x + residual, rmsnorm(h)).
    pub fn add_rmsnorm(
        &mut self,
        x: Tensor,
        residual: Tensor,
        w: Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        self.norm_check(x, w)?;
        self.same_dtype("add_rmsnorm", x, residual)?;
        self.tp_same("add_rmsnorm", &[x, residual])?;
        self.tp_norm("add_rmsnorm", x, w)?;
        if self.shape(x) != self.shape(residual) {
            return Err(shape_err(
                "add_rmsnorm",
                format!("{} vs {}", self.shape(x), self.shape(residual)),
            ));
        }
        let xs = self.shape(x).clone();
        let rg = self.any_grad(&[x, residual, w]);
        let h = self.alloc(xs.clone(), self.dtype(x), rg)?;
        let out = self.alloc(xs.clone(), self.dtype(x), rg)?;
        let rstd = self.alloc(Shape(vec![xs.rows()]), DType::F32, false)?;
        self.record(Op::AddRmsNorm {
            x,
            residual,
            w,
            h,
            out,
            rstd,
            eps,
        })?;
        self.tp_follow(h, x);
        self.tp_follow(out, x);
        Ok((h, out))
    }

    /// Rotary embedding of x [batch, seq, heads, head_dim] with tables [>= seq, head_dim/2].
    pub fn rope(&mut self, x: Tensor, cos: Tensor, sin: Tensor) -> Result<Tensor> {
        self.float_check("rope", x)?;
        let xs = self.shape(x).clone();
        let cs = self.shape(cos).clone();
        if xs.rank() != 4 || !xs.0[3].is_multiple_of(2) {
            return Err(shape_err(
                "rope",
                format!("x must be [batch, seq, heads, even head_dim], got {xs}"),
            ));
        }
        if cs.rank() != 2 || cs.0[0] < xs.0[1] || cs.0[1] != xs.0[3] / 2 || self.shape(sin) != &cs {
            return Err(shape_err(
                "rope",
                format!("tables {cs} do not cover x {xs}"),
            ));
        }
        if !matches!(self.placement_of(x), Tp::Replicate | Tp::Shard(2)) {
            return Err(shape_err(
                "rope",
                format!(
                    "x lies as {:?}: rotary positions need whole sequences",
                    self.placement_of(x)
                ),
            ));
        }
        let rg = self.requires_grad(x);
        let out = self.alloc(xs, self.dtype(x), rg)?;
        self.record(Op::Rope { x, cos, sin, out })?;
        self.tp_follow(out, x);
        Ok(out)
    }

    /// Causal grouped-query attention: q [b, s, h, d], k/v [b, s, hkv, d] -> [b, s, h, d].
    pub fn attention(&mut self, q: Tensor, k: Tensor, v: Tensor) -> Result<Tensor> {
        self.float_check("attention", q)?;
        self.same_dtype("attention", q, k)?;
        self.same_dtype("attention", q, v)?;
        let (qs, ks, vs) = (
            self.shape(q).clone(),
            self.shape(k).clone(),
            self.shape(v).clone(),
        );
        let ok = qs.rank() == 4
            && ks == vs
            && ks.rank() == 4
            && qs.0[0] == ks.0[0]
            && qs.0[1] == ks.0[1]
            && qs.0[3] == ks.0[3]
            && ks.0[2] > 0
            && qs.0[2] % ks.0[2] == 0;
        if !ok {
            return Err(shape_err(
                "attention",
                format!("q {qs}, k {ks}, v {vs} (need [b, s, h, d] with h % h_kv == 0)"),
            ));
        }
        let place = [q, k, v].map(|t| self.placement_of(t));
        if !(place.iter().all(|p| *p == Tp::Replicate) || place.iter().all(|p| *p == Tp::Shard(2)))
        {
            return Err(shape_err(
                "attention",
                format!("q, k, v must all be replicated or all split on heads, got {place:?}"),
            ));
        }
        let scale = 1.0 / (qs.0[3] as f32).sqrt();
        let rg = self.any_grad(&[q, k, v]);
        let out = self.alloc(qs.clone(), self.dtype(q), rg)?;
        let lse = self.alloc(Shape(vec![qs.0[0], qs.0[2], qs.0[1]]), DType::F32, false)?;
        self.record(Op::Attention {
            q,
            k,
            v,
            out,
            lse,
            scale,
        })?;
        self.tp_follow(out, q);
        Ok(out)
    }

    /// silu(gate) * up.
    pub fn swiglu(&mut self, gate: Tensor, up: Tensor) -> Result<Tensor> {
        let out = self.elementwise_out("swiglu", gate, up)?;
        self.record(Op::SwiGlu { gate, up, out })?;
        self.tp_follow(out, gate);
        Ok(out)
    }

    pub fn add(&mut self, a: Tensor, b: Tensor) -> Result<Tensor> {
        let out = self.elementwise_out("add", a, b)?;
        self.record(Op::Add { a, b, out })?;
        self.tp_follow(out, a);
        Ok(out)
    }

    /// Checks the two float operands of an elementwise op (one dtype, one shape) and allocates
    /// their output.
    fn elementwise_out(&mut self, op: &'static str, a: Tensor, b: Tensor) -> Result<Tensor> {
        self.float_check(op, a)?;
        self.same_dtype(op, a, b)?;
        self.tp_same(op, &[a, b])?;
        if self.shape(a) != self.shape(b) {
            return Err(shape_err(
                op,
                format!("{} vs {}", self.shape(a), self.shape(b)),
            ));
        }
        let rg = self.any_grad(&[a, b]);
        self.alloc(self.shape(a).clone(), self.dtype(a), rg)
    }

    /// Summed next-token cross-entropy of logits [.., vocab] against i32 targets [..]; returns a
    /// one-element f32 tensor. The gradient is fixed here: dlogits = (softmax - onehot) *
    /// `grad_scale` (e.g. 1 / valid tokens in the global batch), so `backward(loss)` differentiates
    /// `grad_scale * loss`.
    pub fn cross_entropy(
        &mut self,
        logits: Tensor,
        targets: Tensor,
        ignore_index: i32,
        grad_scale: f32,
    ) -> Result<Tensor> {
        self.float_check("cross_entropy", logits)?;
        if self.dtype(targets) != DType::I32 {
            return Err(Error::DType {
                op: "cross_entropy",
                msg: format!("targets must be i32, got {}", self.dtype(targets)),
            });
        }
        let logits = match self.placement_of(logits) {
            Tp::Replicate => logits,
            Tp::Shard(1) if self.dims(logits).len() == 2 => {
                if self.tp_state().is_some_and(|t| t.loss_parallel) {
                    return self.cross_entropy_shard(logits, targets, ignore_index, grad_scale);
                }
                self.tp_op(TpKind::GatherLast, logits)?
            }
            p => {
                return Err(shape_err(
                    "cross_entropy",
                    format!("logits lying as {p:?} over the tp group"),
                ))
            }
        };
        let ls = self.shape(logits).clone();
        if ls.rows() != self.shape(targets).numel() {
            return Err(shape_err(
                "cross_entropy",
                format!("logits {ls} vs targets {}", self.shape(targets)),
            ));
        }
        let rg = self.requires_grad(logits);
        let losses = self.alloc(Shape(vec![ls.rows()]), DType::F32, false)?;
        let loss = self.alloc(Shape(vec![1]), DType::F32, rg)?;
        let dlogits = self.view_of(logits, ls, false);
        self.record(Op::CrossEntropy {
            logits,
            targets,
            losses,
            loss,
            dlogits,
            ignore_index,
            grad_scale,
        })?;
        Ok(loss)
    }

    /// Loss parallel: the loss of vocabulary-sharded logits [rows, vocab / tp] (see
    /// `Op::CrossEntropyShard`); the same value and gradient as `cross_entropy` of the whole.
    fn cross_entropy_shard(
        &mut self,
        logits: Tensor,
        targets: Tensor,
        ignore_index: i32,
        grad_scale: f32,
    ) -> Result<Tensor> {
        let tp = self
            .tp_state()
            .expect("loss parallel without tensor parallel");
        let ls = self.shape(logits).clone();
        if ls.rows() != self.shape(targets).numel() {
            return Err(shape_err(
                "cross_entropy",
                format!("logits {ls} vs targets {}", self.shape(targets)),
            ));
        }
        let rows = ls.rows();
        let vocab_total = self.dims(logits)[1];
        let rg = self.requires_grad(logits);
        let stats = self.alloc(Shape(vec![rows, 3]), DType::F32, false)?;
        let gathered = self.alloc(Shape(vec![tp.degree * rows, 3]), DType::F32, false)?;
        let losses = self.alloc(Shape(vec![rows]), DType::F32, false)?;
        let loss = self.alloc(Shape(vec![1]), DType::F32, rg)?;
        let dlogits = self.view_of(logits, ls.clone(), false);
        self.record(Op::CrossEntropyShard {
            logits,
            targets,
            stats,
            gathered,
            losses,
            loss,
            dlogits,
            col0: split(vocab_total, tp.degree, tp.rank).0,
            vocab_total,
            ignore_index,
            grad_scale,
        })?;
        Ok(loss)
    }
}
