//! Kernel launches of the forward ops: one place for the first forward and for the replay of
//! an activation-checkpoint region, so both run the very same code.

use super::ops::Op;
use super::Tape;
use crate::backend::{
    AttnFwd, AttnShape, CrossEntropy, CrossEntropyShard, CrossEntropyStats, EmbeddingShard, Gemm,
    RmsNorm, RmsNormResidual, RopeShape,
};
use crate::error::Result;
use crate::tensor::Shape;

impl<'a> Tape<'a> {
    /// The op's row in the profile table: linear layers are told apart by their weight shape
    /// (in -> out), since their GEMM rates differ with it.
    pub(crate) fn profile_name(&self, op: &Op) -> String {
        match op {
            Op::Linear { w, .. } => {
                let ws = &self.shape(*w).0;
                format!("linear {}->{}", ws[1], ws[0])
            }
            _ => op.name().to_string(),
        }
    }

    /// Launches the kernel of node `ni` on its current buffers.
    pub(crate) fn run_forward(&mut self, ni: usize) -> Result<()> {
        let name =
            super::profile::enabled().then(|| self.profile_name(&self.nodes[ni].op) + " fwd");
        super::profile::timed(
            self.be,
            || name.unwrap_or_default(),
            || self.run_forward_inner(ni),
        )
    }

    fn run_forward_inner(&mut self, ni: usize) -> Result<()> {
        let op = self.nodes[ni].op.clone();
        for t in op.inputs().into_iter().chain(op.outputs()) {
            self.touch(t)?;
        }
        let be = self.be;
        match op {
            Op::View { .. } => {}
            Op::Embedding {
                table,
                ids,
                out,
                shard,
            } => {
                let dim = self.shape(table).0[1];
                match shard {
                    None => be.embedding_fwd(self.buf(table), self.buf(ids), self.buf(out), dim)?,
                    Some((row0, vocab)) => be.embedding_shard_fwd(&EmbeddingShard {
                        table: self.buf(table),
                        ids: self.buf(ids),
                        out: self.buf(out),
                        dim,
                        row0,
                        vocab,
                    })?,
                }
            }
            Op::Linear { x, w, out } => {
                let (n, k) = (self.shape(x).rows(), self.shape(x).last());
                let m_out = self.shape(w).0[0];
                be.gemm(
                    &Gemm::new(n, m_out, k, false, true, 0.0),
                    self.buf(x),
                    self.buf(w),
                    self.buf(out),
                )?
            }
            Op::RmsNorm {
                x,
                w,
                out,
                rstd,
                eps,
            } => {
                let (rows, dim) = (self.shape(x).rows(), self.shape(x).last());
                be.rmsnorm_fwd(&RmsNorm {
                    x: self.buf(x),
                    w: self.buf(w),
                    out: self.buf(out),
                    rstd: self.buf(rstd),
                    rows,
                    dim,
                    eps,
                })?
            }
            Op::AddRmsNorm {
                x,
                residual,
                w,
                h,
                out,
                rstd,
                eps,
            } => {
                let (rows, dim) = (self.shape(x).rows(), self.shape(x).last());
                be.rmsnorm_residual_fwd(&RmsNormResidual {
                    x: self.buf(x),
                    residual: self.buf(residual),
                    w: self.buf(w),
                    h: self.buf(h),
                    out: self.buf(out),
                    rstd: self.buf(rstd),
                    rows,
                    dim,
                    eps,
                })?
            }
            Op::Rope { x, cos, sin, out } => {
                let s = rope_shape(self.shape(x));
                let half = s.head_dim / 2;
                let (c, sn) = (
                    self.buf(cos).slice(0, s.seq * half),
                    self.buf(sin).slice(0, s.seq * half),
                );
                be.rope_fwd(self.buf(x), self.buf(out), c, sn, s)?
            }
            Op::Attention {
                q,
                k,
                v,
                out,
                lse,
                scale,
            } => be.attention_fwd(&AttnFwd {
                q: self.buf(q),
                k: self.buf(k),
                v: self.buf(v),
                out: self.buf(out),
                lse: self.buf(lse),
                shape: attn_shape(self.shape(q), self.shape(k)),
                scale,
            })?,
            Op::SwiGlu { gate, up, out } => {
                be.swiglu_fwd(self.buf(gate), self.buf(up), self.buf(out))?
            }
            Op::Add { a, b, out } => be.add(self.buf(a), self.buf(b), self.buf(out))?,
            Op::CrossEntropy {
                logits,
                targets,
                losses,
                loss,
                dlogits,
                ignore_index,
                grad_scale,
            } => {
                let (rows, vocab) = (self.shape(logits).rows(), self.shape(logits).last());
                be.cross_entropy(&CrossEntropy {
                    logits: self.buf(logits),
                    targets: self.buf(targets),
                    losses: self.buf(losses),
                    dlogits: self.buf(dlogits),
                    rows,
                    vocab,
                    ignore_index,
                    grad_scale,
                })?;
                be.sum(self.buf(losses), self.buf(loss))?
            }
            Op::CrossEntropyShard {
                logits,
                targets,
                stats,
                gathered,
                losses,
                loss,
                dlogits,
                col0,
                vocab_total,
                ignore_index,
                grad_scale,
            } => {
                let tp = self
                    .tp_state()
                    .expect("loss parallel without tensor parallel");
                let (rows, vocab) = (self.shape(logits).rows(), self.shape(logits).last());
                be.cross_entropy_stats(&CrossEntropyStats {
                    logits: self.buf(logits),
                    targets: self.buf(targets),
                    stats: self.buf(stats),
                    rows,
                    vocab,
                    col0,
                    ignore_index,
                })?;
                tp.comm.all_gather(self.buf(stats), self.buf(gathered))?;
                be.cross_entropy_shard(&CrossEntropyShard {
                    logits: self.buf(logits),
                    targets: self.buf(targets),
                    stats: self.buf(gathered),
                    losses: self.buf(losses),
                    dlogits: self.buf(dlogits),
                    rows,
                    vocab,
                    col0,
                    shards: tp.degree,
                    vocab_total,
                    ignore_index,
                    grad_scale,
                })?;
                be.sum(self.buf(losses), self.buf(loss))?
            }
            Op::Tp {
                kind,
                x,
                out,
                stage,
            } => self.run_tp(kind, x, out, stage)?,
        }
        self.tick();
        Ok(())
    }
}

pub(crate) fn rope_shape(s: &Shape) -> RopeShape {
    RopeShape {
        batch: s.0[0],
        seq: s.0[1],
        heads: s.0[2],
        head_dim: s.0[3],
    }
}

pub(crate) fn attn_shape(q: &Shape, k: &Shape) -> AttnShape {
    AttnShape {
        batch: q.0[0],
        seq: q.0[1],
        n_heads: q.0[2],
        n_kv_heads: k.0[2],
        head_dim: q.0[3],
    }
}
