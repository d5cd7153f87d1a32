//! Every architecture hyper-parameter of Qwen3 (dense), torchtitan's `Qwen3ModelArgs` in Rust.
//! Unlike Llama 3, `head_dim` is its own hyper-parameter (not dim / n_heads) and the SwiGLU
//! hidden size is given exactly.

use std::any::Any;
use titan_engine::error::{Error, Result};
use titan_engine::model::ModelArgs;

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Qwen3Config {
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    /// Per-head width of q, k and v; q_proj is [n_heads * head_dim, dim].
    pub head_dim: usize,
    /// SwiGLU hidden size (Hugging Face's `intermediate_size`).
    pub hidden_dim: usize,
    pub vocab_size: usize,
    /// Epsilon of every RMSNorm, including the per-head q/k norms.
    pub norm_eps: f64,
    pub rope_theta: f64,
    /// Longest sequence the rotary tables cover (set from training.seq_len).
    pub max_seq_len: usize,
    /// Longest context the architecture supports.
    pub max_position_embeddings: usize,
    /// Output projection shares the embedding matrix (0.6B, 1.7B, 4B).
    pub tie_embeddings: bool,
    /// Depth-scaled init std for output projections: 0.02 / sqrt(2 (layer + 1)).
    pub depth_init: bool,
}

impl Default for Qwen3Config {
    fn default() -> Self {
        Qwen3Config {
            dim: 1024,
            n_layers: 28,
            n_heads: 16,
            n_kv_heads: 8,
            head_dim: 128,
            hidden_dim: 3072,
            vocab_size: 151936,
            norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_seq_len: 4096,
            max_position_embeddings: 40960,
            tie_embeddings: true,
            depth_init: true,
        }
    }
}

impl Qwen3Config {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("qwen3: {m}")));
        let sizes = [
            self.dim,
            self.n_layers,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.hidden_dim,
            self.vocab_size,
        ];
        if sizes.contains(&0) {
            return bad(
                "dim, n_layers, n_heads, n_kv_heads, head_dim, hidden_dim and vocab_size must be positive"
                    .into(),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if self.max_seq_len > self.max_position_embeddings {
            return bad(format!(
                "seq_len {} exceeds the model's limit of {} positions",
                self.max_seq_len, self.max_position_embeddings
            ));
        }
        Ok(())
    }

    /// Every parameter, counting a tied embedding once (as transformers' `num_parameters()`).
    pub fn num_params(&self) -> usize {
        let (d, f, v, hd) = (self.dim, self.hidden_dim, self.vocab_size, self.head_dim);
        let (q, kv) = (self.n_heads * hd, self.n_kv_heads * hd);
        let attn = d * q + 2 * d * kv + q * d + 2 * hd;
        let per_layer = attn + 3 * d * f + 2 * d;
        let out = if self.tie_embeddings { 0 } else { v * d };
        v * d + self.n_layers * per_layer + d + out
    }

    /// Rotary inverse frequencies for pairs i = 0..head_dim/2 (no scaling).
    pub fn rope_freqs(&self) -> Vec<f64> {
        let hd = self.head_dim;
        (0..hd / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect()
    }

    /// cos and sin tables [max_seq_len, head_dim / 2] (f32, computed in f64).
    pub fn rope_tables(&self) -> (Vec<f32>, Vec<f32>) {
        let freqs = self.rope_freqs();
        let n = self.max_seq_len * freqs.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for p in 0..self.max_seq_len {
            for f in &freqs {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        (cos, sin)
    }
}

impl ModelArgs for Qwen3Config {
    /// torchtitan's `update_from_config`: the training sequence length and the tokenizer's vocab.
    fn update_from_config(&mut self, seq_len: usize, vocab: Option<usize>) -> Result<()> {
        self.max_seq_len = seq_len;
        if let Some(v) = vocab {
            self.vocab_size = v;
        }
        self.validate()
    }
    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
    fn n_layers(&self) -> usize {
        self.n_layers
    }
    fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }
    /// torchtitan's convention: 6 (N - N_embedding) + 12 layers heads head_dim seq.
    fn nparams_and_flops(&self, seq_len: usize) -> (usize, f64) {
        let n = self.num_params();
        let emb = self.vocab_size * self.dim;
        let attn = 12.0 * (self.n_layers * self.n_heads * self.head_dim * seq_len) as f64;
        (n, 6.0 * (n - emb) as f64 + attn)
    }
    fn flops_per_token_llmc(&self, seq_len: usize) -> f64 {
        6.0 * self.num_params() as f64 + 6.0 * (self.n_layers * self.dim * seq_len) as f64
    }
    fn summary(&self) -> String {
        format!(
            "dim {} layers {} heads {}/{} head_dim {} ffn {} vocab {}{}",
            self.dim,
            self.n_layers,
            self.n_heads,
            self.n_kv_heads,
            self.head_dim,
            self.hidden_dim,
            self.vocab_size,
            if self.tie_embeddings { " tied" } else { "" }
        )
    }
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("Qwen3Config serializes")
    }
    fn clone_box(&self) -> Box<dyn ModelArgs> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn num_params(&self) -> usize {
        Qwen3Config::num_params(self)
    }
}

#[cfg(test)]
mod tests {
    use crate::qwen3::flavor;

    #[test]
    fn param_counts_match_transformers() {
        // transformers 5.25 Qwen3ForCausalLM(config).num_parameters() for the published configs
        // (scripts/hf_param_counts.py; a tied embedding is counted once).
        for (f, n) in [
            ("debugmodel", 31_987_968),
            ("0.6B", 596_049_920),
            ("1.7B", 1_720_574_976),
            ("4B", 4_022_468_096),
            ("8B", 8_190_735_360),
            ("14B", 14_768_307_200),
            ("32B", 32_762_123_264),
        ] {
            assert_eq!(flavor(f).unwrap().num_params(), n, "{f}");
        }
    }

    #[test]
    fn head_dim_is_independent_of_dim() {
        let c = flavor("0.6B").unwrap();
        assert_eq!((c.dim / c.n_heads, c.head_dim), (64, 128));
        let mut bad = c.clone();
        bad.n_kv_heads = 5;
        assert!(bad.validate().is_err());
    }
}
