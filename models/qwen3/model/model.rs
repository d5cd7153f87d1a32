//! Qwen3 (dense) as single-device math: no collectives, no device logic. Parallelism and
//! activation checkpointing arrive from `infra/`.
//!
//! A block: h = x + attention(norm(x)); out = h + feed_forward(norm(h)). The attention differs
//! from Llama 3's in one place: q and k are RMS-normalised per head (over head_dim, with weights
//! q_norm / k_norm of length head_dim) before the rotary embedding.

use super::config::Qwen3Config;
// The feed-forward and the block init are Llama 3's.
pub use crate::llama3::model::model::{block_init_std, FeedForward};
use std::any::Any;
use titan_engine::backend::Backend;
use titan_engine::error::Result;
use titan_engine::model::init::Init;
use titan_engine::model::{args_as, Model, ModelArgs};
use titan_engine::parallel::pipeline::{check_stage, Stage};
use titan_engine::params::{ConstId, ParamId, ParamStore, ParamStoreBuilder};
use titan_engine::tape::{AcPolicy, Tape, Tensor};

pub struct Attention {
    pub wq: ParamId,
    pub wk: ParamId,
    pub wv: ParamId,
    pub wo: ParamId,
    pub q_norm: ParamId,
    pub k_norm: ParamId,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

pub struct TransformerBlock {
    pub attention: Attention,
    pub feed_forward: FeedForward,
    pub attention_norm: ParamId,
    pub ffn_norm: ParamId,
    pub layer_id: usize,
    /// Set by `infra::parallelize`.
    pub ac: Option<AcPolicy>,
}

pub struct Qwen3 {
    pub config: Qwen3Config,
    /// The part of the model this holds: all of it, or one pipeline stage.
    pub stage: Stage,
    /// On the first stage; on the last too when tied (there it is the output projection).
    pub tok_embeddings: Option<ParamId>,
    pub layers: Vec<TransformerBlock>,
    /// On the last stage.
    pub norm: Option<ParamId>,
    /// On the last stage; None when the output projection is tied to the embedding.
    pub output: Option<ParamId>,
    rope_cos: ConstId,
    rope_sin: ConstId,
}

/// What every layer of one forward pass shares.
struct Ctx {
    cos: Tensor,
    sin: Tensor,
    eps: f32,
}

impl Attention {
    fn new(p: &mut ParamStoreBuilder, c: &Qwen3Config, prefix: &str) -> Self {
        let (d, hd) = (c.dim, c.head_dim);
        let (q, kv) = (c.n_heads * hd, c.n_kv_heads * hd);
        Attention {
            wq: p.param(format!("{prefix}.wq.weight"), [q, d]),
            wk: p.param(format!("{prefix}.wk.weight"), [kv, d]),
            wv: p.param(format!("{prefix}.wv.weight"), [kv, d]),
            wo: p.param(format!("{prefix}.wo.weight"), [d, q]),
            q_norm: p.param(format!("{prefix}.q_norm.weight"), [hd]),
            k_norm: p.param(format!("{prefix}.k_norm.weight"), [hd]),
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: hd,
        }
    }

    fn init_weights(&self, s: &Init, init_std: f64) -> Result<()> {
        for w in [self.wq, self.wk, self.wv] {
            s.trunc_normal(w, 0.02)?;
        }
        s.trunc_normal(self.wo, init_std)?;
        s.ones(self.q_norm)?;
        s.ones(self.k_norm)
    }

    fn forward(&self, t: &mut Tape, x: Tensor, cx: &Ctx) -> Result<Tensor> {
        let d = t.dims(x);
        let (b, s) = (d[0], d[1]);
        let (h, kv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (wq, wk, wv, wo) = (
            t.param(self.wq)?,
            t.param(self.wk)?,
            t.param(self.wv)?,
            t.param(self.wo)?,
        );
        let (qn, kn) = (t.param(self.q_norm)?, t.param(self.k_norm)?);
        let q = t.linear(x, wq)?;
        let k = t.linear(x, wk)?;
        let v = t.linear(x, wv)?;
        let q = t.reshape(q, [b, s, h, hd])?;
        let k = t.reshape(k, [b, s, kv, hd])?;
        let v = t.reshape(v, [b, s, kv, hd])?;
        // Per-head RMSNorm: the rows of a [b, s, heads, head_dim] tensor are its heads.
        let q = t.rmsnorm(q, qn, cx.eps)?;
        let k = t.rmsnorm(k, kn, cx.eps)?;
        let q = t.rope(q, cx.cos, cx.sin)?;
        let k = t.rope(k, cx.cos, cx.sin)?;
        let o = t.attention(q, k, v)?;
        let o = t.reshape(o, [b, s, h * hd])?;
        t.linear(o, wo)
    }
}

impl TransformerBlock {
    fn new(p: &mut ParamStoreBuilder, c: &Qwen3Config, layer_id: usize) -> Self {
        let prefix = format!("layers.{layer_id}");
        TransformerBlock {
            attention: Attention::new(p, c, &format!("{prefix}.attention")),
            feed_forward: FeedForward::new(
                p,
                (c.dim, c.hidden_dim),
                &format!("{prefix}.feed_forward"),
            ),
            attention_norm: p.param(format!("{prefix}.attention_norm.weight"), [c.dim]),
            ffn_norm: p.param(format!("{prefix}.ffn_norm.weight"), [c.dim]),
            layer_id,
            ac: None,
        }
    }

    fn init_weights(&self, s: &Init, c: &Qwen3Config) -> Result<()> {
        let init_std = block_init_std(c.depth_init, self.layer_id, c.n_layers);
        self.attention.init_weights(s, init_std)?;
        self.feed_forward.init_weights(s, init_std)?;
        s.ones(self.attention_norm)?;
        s.ones(self.ffn_norm)
    }

    fn forward(&self, t: &mut Tape, x: Tensor, cx: &Ctx) -> Result<Tensor> {
        let attn_norm = t.param(self.attention_norm)?;
        let xn = t.rmsnorm(x, attn_norm, cx.eps)?;
        let a = self.attention.forward(t, xn, cx)?;
        let ffn_norm = t.param(self.ffn_norm)?;
        let (h, hn) = t.add_rmsnorm(a, x, ffn_norm, cx.eps)?;
        let f = self.feed_forward.forward(t, hn)?;
        t.add(h, f)
    }
}

impl Qwen3 {
    /// Declares every parameter (names follow torchtitan's state dict) and the rotary tables.
    pub fn new(config: Qwen3Config, p: &mut ParamStoreBuilder) -> Result<Self> {
        let whole = Stage::whole(config.n_layers);
        Self::new_stage(config, whole, p)
    }

    /// The part of the model pipeline stage `stage` holds, its blocks under their global layer
    /// ids (so parameter names, and checkpoints, do not depend on the split). A tied output
    /// makes the last stage hold the embedding matrix too.
    pub fn new_stage(config: Qwen3Config, stage: Stage, p: &mut ParamStoreBuilder) -> Result<Self> {
        config.validate()?;
        check_stage(&stage, config.n_layers, "qwen3")?;
        let c = &config;
        let (tied, last) = (c.tie_embeddings, stage.output);
        let tok_embeddings = (stage.embedding || (last && tied))
            .then(|| p.param("tok_embeddings.weight", [c.vocab_size, c.dim]));
        let layers = stage
            .layers
            .clone()
            .map(|i| TransformerBlock::new(p, c, i))
            .collect();
        let norm = last.then(|| p.param("norm.weight", [c.dim]));
        let output = (last && !tied).then(|| p.param("output.weight", [c.vocab_size, c.dim]));
        let (cos, sin) = c.rope_tables();
        let half = c.head_dim / 2;
        let rope_cos = p.constant("rope.cos", [c.max_seq_len, half], cos);
        let rope_sin = p.constant("rope.sin", [c.max_seq_len, half], sin);
        Ok(Qwen3 {
            config,
            stage,
            tok_embeddings,
            layers,
            norm,
            output,
            rope_cos,
            rope_sin,
        })
    }

    /// torchtitan's scheme: q/k/v and w1 trunc-normal 0.02; wo, w2, w3 depth-scaled; norms (and
    /// q/k norms) ones; output trunc-normal dim^-0.5 cut at 3 std; the embedding N(0, 1), or,
    /// when tied, the output's init (the shared matrix is initialised once, as the output).
    pub fn init_weights(&self, store: &ParamStore, be: &dyn Backend, seed: u64) -> Result<()> {
        let s = Init { store, be, seed };
        let std = (self.config.dim as f64).powf(-0.5);
        match (self.tok_embeddings, self.config.tie_embeddings) {
            (Some(e), true) => s.trunc_normal_ab(e, std, -3.0 * std, 3.0 * std)?,
            (Some(e), false) => s.normal(e, 1.0)?,
            (None, _) => {}
        }
        if let Some(out) = self.output {
            s.trunc_normal_ab(out, std, -3.0 * std, 3.0 * std)?;
        }
        for layer in &self.layers {
            layer.init_weights(&s, &self.config)?;
        }
        match self.norm {
            Some(n) => s.ones(n),
            None => Ok(()),
        }
    }

    /// tokens [batch, seq] (i32) -> logits [batch, seq, vocab]; a pipeline stage maps tokens
    /// (first stage) or the hidden state [batch, seq, dim] to the hidden state, or to logits
    /// (last stage).
    pub fn forward(&self, t: &mut Tape, tokens: Tensor) -> Result<Tensor> {
        let seq = t.dims(tokens)[1];
        let half = self.config.head_dim / 2;
        let cx = Ctx {
            cos: t.constant(self.rope_cos, [seq.max(1), half])?,
            sin: t.constant(self.rope_sin, [seq.max(1), half])?,
            eps: self.config.norm_eps as f32,
        };
        let mut h = match self.tok_embeddings.filter(|_| self.stage.embedding) {
            Some(e) => {
                let emb = t.param(e)?;
                t.embedding(emb, tokens)?
            }
            None => tokens,
        };
        for layer in &self.layers {
            h = match layer.ac {
                Some(policy) => t.checkpoint(policy, |t| layer.forward(t, h, &cx))?,
                None => layer.forward(t, h, &cx)?,
            };
        }
        let (Some(norm), Some(out)) = (self.norm, self.output.or(self.tok_embeddings)) else {
            return Ok(h); // not the last stage
        };
        let norm = t.param(norm)?;
        let h = t.rmsnorm(h, norm, cx.eps)?;
        let out = t.param(out)?;
        t.linear(h, out)
    }
}

/// `ModelSpec::build` of Qwen3.
pub fn build_qwen3(args: &dyn ModelArgs, p: &mut ParamStoreBuilder) -> Result<Box<dyn Model>> {
    let c = args_as::<Qwen3Config>(args, "qwen3")?;
    Ok(Box::new(Qwen3::new(c.clone(), p)?))
}

/// `ModelSpec::build_stage` of Qwen3.
pub fn build_qwen3_stage(
    args: &dyn ModelArgs,
    stage: &Stage,
    p: &mut ParamStoreBuilder,
) -> Result<Box<dyn Model>> {
    let c = args_as::<Qwen3Config>(args, "qwen3")?;
    Ok(Box::new(Qwen3::new_stage(c.clone(), stage.clone(), p)?))
}

impl Model for Qwen3 {
    fn args(&self) -> &dyn ModelArgs {
        &self.config
    }
    fn init_weights(&self, store: &ParamStore, be: &dyn Backend, seed: u64) -> Result<()> {
        Qwen3::init_weights(self, store, be, seed)
    }
    fn forward(&self, t: &mut Tape, tokens: Tensor) -> Result<Tensor> {
        Qwen3::forward(self, t, tokens)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
