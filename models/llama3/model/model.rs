//! Llama 3 as single-device math: no collectives, no device logic. Parallelism and activation
//! checkpointing arrive from `infra/`.

use super::config::Llama3Config;
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
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

/// SwiGLU feed-forward, w2(silu(w1 x) * w3 x); Qwen3's is this one.
pub struct FeedForward {
    pub w1: ParamId,
    pub w2: ParamId,
    pub w3: ParamId,
}

pub struct TransformerBlock {
    pub attention: Attention,
    pub feed_forward: FeedForward,
    pub attention_norm: ParamId,
    pub ffn_norm: ParamId,
    pub layer_id: usize,
    /// Set by `infra::parallelize::apply_ac`.
    pub ac: Option<AcPolicy>,
}

pub struct Llama3 {
    pub config: Llama3Config,
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

/// The rotary tables of one forward pass.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Attention {
    fn new(p: &mut ParamStoreBuilder, c: &Llama3Config, prefix: &str) -> Self {
        let (d, hd, kv) = (c.dim, c.head_dim(), c.kv_heads());
        Attention {
            wq: p.param(format!("{prefix}.wq.weight"), [c.n_heads * hd, d]),
            wk: p.param(format!("{prefix}.wk.weight"), [kv * hd, d]),
            wv: p.param(format!("{prefix}.wv.weight"), [kv * hd, d]),
            wo: p.param(format!("{prefix}.wo.weight"), [d, c.n_heads * hd]),
            n_heads: c.n_heads,
            n_kv_heads: kv,
            head_dim: hd,
        }
    }

    fn init_weights(&self, s: &Init, init_std: f64) -> Result<()> {
        for w in [self.wq, self.wk, self.wv] {
            s.trunc_normal(w, 0.02)?;
        }
        s.trunc_normal(self.wo, init_std)
    }

    fn forward(&self, t: &mut Tape, x: Tensor, rope: &Rope) -> Result<Tensor> {
        let d = t.dims(x);
        let (b, s) = (d[0], d[1]);
        let (h, kv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (wq, wk, wv, wo) = (
            t.param(self.wq)?,
            t.param(self.wk)?,
            t.param(self.wv)?,
            t.param(self.wo)?,
        );
        let q = t.linear(x, wq)?;
        let k = t.linear(x, wk)?;
        let v = t.linear(x, wv)?;
        let q = t.reshape(q, [b, s, h, hd])?;
        let k = t.reshape(k, [b, s, kv, hd])?;
        let v = t.reshape(v, [b, s, kv, hd])?;
        let q = t.rope(q, rope.cos, rope.sin)?;
        let k = t.rope(k, rope.cos, rope.sin)?;
        let o = t.attention(q, k, v)?;
        let o = t.reshape(o, [b, s, h * hd])?;
        t.linear(o, wo)
    }
}

impl FeedForward {
    /// `dim` -> `hidden` -> `dim`, its weights under `prefix`.
    pub fn new(p: &mut ParamStoreBuilder, (d, f): (usize, usize), prefix: &str) -> Self {
        FeedForward {
            w1: p.param(format!("{prefix}.w1.weight"), [f, d]),
            w2: p.param(format!("{prefix}.w2.weight"), [d, f]),
            w3: p.param(format!("{prefix}.w3.weight"), [f, d]),
        }
    }

    pub fn init_weights(&self, s: &Init, init_std: f64) -> Result<()> {
        s.trunc_normal(self.w1, 0.02)?;
        s.trunc_normal(self.w2, init_std)?;
        s.trunc_normal(self.w3, init_std)
    }

    pub fn forward(&self, t: &mut Tape, x: Tensor) -> Result<Tensor> {
        let (w1, w2, w3) = (t.param(self.w1)?, t.param(self.w2)?, t.param(self.w3)?);
        let gate = t.linear(x, w1)?;
        let up = t.linear(x, w3)?;
        let a = t.swiglu(gate, up)?;
        t.linear(a, w2)
    }
}

/// The std of a block's output projections (wo, w2, w3): torchtitan's depth-scaled init,
/// 0.02 / sqrt(2 (layer + 1)) with `depth_init`, else 0.02 / sqrt(2 n_layers).
pub fn block_init_std(depth_init: bool, layer_id: usize, n_layers: usize) -> f64 {
    let depth = if depth_init { layer_id + 1 } else { n_layers };
    0.02 / (2.0 * depth as f64).sqrt()
}

impl TransformerBlock {
    fn new(p: &mut ParamStoreBuilder, c: &Llama3Config, layer_id: usize) -> Self {
        let prefix = format!("layers.{layer_id}");
        TransformerBlock {
            attention: Attention::new(p, c, &format!("{prefix}.attention")),
            feed_forward: FeedForward::new(
                p,
                (c.dim, c.ffn_hidden()),
                &format!("{prefix}.feed_forward"),
            ),
            attention_norm: p.param(format!("{prefix}.attention_norm.weight"), [c.dim]),
            ffn_norm: p.param(format!("{prefix}.ffn_norm.weight"), [c.dim]),
            layer_id,
            ac: None,
        }
    }

    fn init_weights(&self, s: &Init, c: &Llama3Config) -> Result<()> {
        let init_std = block_init_std(c.depth_init, self.layer_id, c.n_layers);
        self.attention.init_weights(s, init_std)?;
        self.feed_forward.init_weights(s, init_std)?;
        s.ones(self.attention_norm)?;
        s.ones(self.ffn_norm)
    }

    /// h = x + attention(norm(x)); out = h + feed_forward(norm(h)).
    fn forward(&self, t: &mut Tape, x: Tensor, rope: &Rope, eps: f32) -> Result<Tensor> {
        let attn_norm = t.param(self.attention_norm)?;
        let xn = t.rmsnorm(x, attn_norm, eps)?;
        let a = self.attention.forward(t, xn, rope)?;
        let ffn_norm = t.param(self.ffn_norm)?;
        let (h, hn) = t.add_rmsnorm(a, x, ffn_norm, eps)?;
        let f = self.feed_forward.forward(t, hn)?;
        t.add(h, f)
    }
}

impl Llama3 {
    /// Declares every parameter (names follow torchtitan's state dict) and the rotary tables.
    pub fn new(config: Llama3Config, p: &mut ParamStoreBuilder) -> Result<Self> {
        let whole = Stage::whole(config.n_layers);
        Self::new_stage(config, whole, p)
    }

    /// The part of the model pipeline stage `stage` holds, its blocks under their global layer
    /// ids (so parameter names, and checkpoints, do not depend on the split).
    pub fn new_stage(
        config: Llama3Config,
        stage: Stage,
        p: &mut ParamStoreBuilder,
    ) -> Result<Self> {
        config.validate()?;
        check_stage(&stage, config.n_layers, "llama3")?;
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
        let half = c.head_dim() / 2;
        let rope_cos = p.constant("rope.cos", [c.max_seq_len, half], cos);
        let rope_sin = p.constant("rope.sin", [c.max_seq_len, half], sin);
        Ok(Llama3 {
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

    /// torchtitan's scheme: embeddings N(0, 1); q/k/v and w1 trunc-normal 0.02; wo, w2, w3 with the
    /// depth-scaled std; norms ones; output trunc-normal dim^-0.5 cut at 3 std.
    pub fn init_weights(&self, store: &ParamStore, be: &dyn Backend, seed: u64) -> Result<()> {
        let s = Init { store, be, seed };
        if let Some(e) = self.tok_embeddings {
            s.normal(e, 1.0)?;
        }
        for layer in &self.layers {
            layer.init_weights(&s, &self.config)?;
        }
        if let Some(n) = self.norm {
            s.ones(n)?;
        }
        if let Some(out) = self.output {
            let std = (self.config.dim as f64).powf(-0.5);
            s.trunc_normal_ab(out, std, -3.0 * std, 3.0 * std)?;
        }
        Ok(())
    }

    /// tokens [batch, seq] (i32) -> logits [batch, seq, vocab]; a pipeline stage maps tokens
    /// (first stage) or the hidden state [batch, seq, dim] to the hidden state, or to logits
    /// (last stage).
    pub fn forward(&self, t: &mut Tape, tokens: Tensor) -> Result<Tensor> {
        let seq = t.dims(tokens)[1];
        let half = self.config.head_dim() / 2;
        let rope = Rope {
            cos: t.constant(self.rope_cos, [seq.max(1), half])?,
            sin: t.constant(self.rope_sin, [seq.max(1), half])?,
        };
        let eps = self.config.norm_eps as f32;
        let mut h = match self.tok_embeddings.filter(|_| self.stage.embedding) {
            Some(e) => {
                let emb = t.param(e)?;
                t.embedding(emb, tokens)?
            }
            None => tokens,
        };
        for layer in &self.layers {
            h = match layer.ac {
                Some(policy) => t.checkpoint(policy, |t| layer.forward(t, h, &rope, eps))?,
                None => layer.forward(t, h, &rope, eps)?,
            };
        }
        let (Some(norm), Some(out)) = (self.norm, self.output.or(self.tok_embeddings)) else {
            return Ok(h); // not the last stage
        };
        let norm = t.param(norm)?;
        let h = t.rmsnorm(h, norm, eps)?;
        let out = t.param(out)?;
        t.linear(h, out)
    }
}

/// `ModelSpec::build` of Llama 3.
pub fn build_llama3(args: &dyn ModelArgs, p: &mut ParamStoreBuilder) -> Result<Box<dyn Model>> {
    let c = args_as::<Llama3Config>(args, "llama3")?;
    Ok(Box::new(Llama3::new(c.clone(), p)?))
}

/// `ModelSpec::build_stage` of Llama 3.
pub fn build_llama3_stage(
    args: &dyn ModelArgs,
    stage: &Stage,
    p: &mut ParamStoreBuilder,
) -> Result<Box<dyn Model>> {
    let c = args_as::<Llama3Config>(args, "llama3")?;
    Ok(Box::new(Llama3::new_stage(c.clone(), stage.clone(), p)?))
}

impl Model for Llama3 {
    fn args(&self) -> &dyn ModelArgs {
        &self.config
    }
    fn init_weights(&self, store: &ParamStore, be: &dyn Backend, seed: u64) -> Result<()> {
        Llama3::init_weights(self, store, be, seed)
    }
    fn forward(&self, t: &mut Tape, tokens: Tensor) -> Result<Tensor> {
        Llama3::forward(self, t, tokens)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
