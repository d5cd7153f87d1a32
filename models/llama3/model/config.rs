//! Every architecture hyper-parameter of Llama 3, torchtitan's `TransformerModelArgs` in Rust.

use std::any::Any;
use titan_engine::error::{Error, Result};
use titan_engine::model::ModelArgs;

/// Llama 3 rotary frequency scaling ("rope_type": "llama3" in Hugging Face configs).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

impl RopeScaling {
    /// Llama 3.1 (8B, 70B, 405B).
    pub fn llama3_1() -> Self {
        RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        }
    }
    /// Llama 3.2 (1B, 3B).
    pub fn llama3_2() -> Self {
        RopeScaling {
            factor: 32.0,
            ..Self::llama3_1()
        }
    }
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Llama3Config {
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    /// None = multi-head attention (as many kv heads as query heads).
    pub n_kv_heads: Option<usize>,
    pub vocab_size: usize,
    pub multiple_of: usize,
    pub ffn_dim_multiplier: Option<f64>,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// Longest sequence the rotary tables cover (set from training.seq_len).
    pub max_seq_len: usize,
    /// Depth-scaled init std for output projections: 0.02 / sqrt(2 (layer + 1)).
    pub depth_init: bool,
    pub tie_embeddings: bool,
    /// Longest context the architecture supports (rotary scaling's target length).
    pub max_position_embeddings: usize,
    /// An exact SwiGLU hidden size (Hugging Face's `intermediate_size`), which the
    /// `multiple_of` / `ffn_dim_multiplier` formula cannot express for every checkpoint. None for
    /// every built-in flavor.
    #[serde(default)]
    pub ffn_hidden_override: Option<usize>,
}

impl Default for Llama3Config {
    fn default() -> Self {
        Llama3Config {
            dim: 4096,
            n_layers: 32,
            n_heads: 32,
            n_kv_heads: None,
            vocab_size: 128256,
            multiple_of: 256,
            ffn_dim_multiplier: None,
            norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: None,
            max_seq_len: 2048,
            depth_init: true,
            tie_embeddings: false,
            max_position_embeddings: 131072,
            ffn_hidden_override: None,
        }
    }
}

impl Llama3Config {
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }
    /// SwiGLU hidden size: multiple_of-rounded int(ffn_dim_multiplier * int(2 * 4 * dim / 3)).
    pub fn ffn_hidden(&self) -> usize {
        if let Some(h) = self.ffn_hidden_override {
            return h;
        }
        let mut hidden = 2 * (4 * self.dim) / 3;
        if let Some(m) = self.ffn_dim_multiplier {
            hidden = (m * hidden as f64) as usize;
        }
        self.multiple_of * hidden.div_ceil(self.multiple_of)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("llama3: {m}")));
        if self.dim == 0 || self.n_layers == 0 || self.n_heads == 0 || self.vocab_size == 0 {
            return bad("dim, n_layers, n_heads and vocab_size must be positive".into());
        }
        if self.ffn_hidden() == 0 {
            return bad("the feed-forward hidden size must be positive".into());
        }
        if !self.dim.is_multiple_of(self.n_heads) {
            return bad(format!(
                "dim {} is not divisible by n_heads {}",
                self.dim, self.n_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        if self.kv_heads() == 0 || !self.n_heads.is_multiple_of(self.kv_heads()) {
            return bad(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads,
                self.kv_heads()
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

    /// torchtitan's `update_from_config`: the training sequence length and the tokenizer's vocab.
    pub fn update_from_training(
        &mut self,
        seq_len: usize,
        vocab_size: Option<usize>,
    ) -> Result<()> {
        self.max_seq_len = seq_len;
        if let Some(v) = vocab_size {
            self.vocab_size = v;
        }
        self.validate()
    }

    pub fn num_params(&self) -> usize {
        let (d, f, v) = (self.dim, self.ffn_hidden(), self.vocab_size);
        let kv = self.kv_heads() * self.head_dim();
        let per_layer = d * d * 2 + 2 * d * kv + 3 * d * f + 2 * d;
        let out = if self.tie_embeddings { 0 } else { v * d };
        v * d + self.n_layers * per_layer + d + out
    }

    /// (parameters, training FLOPs per token) in torchtitan's convention:
    /// 6 * (N - N_embedding) + 12 * layers * heads * head_dim * seq.
    pub fn nparams_and_flops(&self, seq_len: usize) -> (usize, f64) {
        let n = self.num_params();
        let emb = self.vocab_size * self.dim;
        let attn = 12.0 * (self.n_layers * self.n_heads * self.head_dim() * seq_len) as f64;
        (n, 6.0 * (n - emb) as f64 + attn)
    }

    /// llm.c's convention for the same quantity: 6 N + 6 * L * C * T (N counts every parameter).
    pub fn flops_per_token_llmc(&self, seq_len: usize) -> f64 {
        6.0 * self.num_params() as f64 + 6.0 * (self.n_layers * self.dim * seq_len) as f64
    }

    /// Rotary inverse frequencies for pairs i = 0..head_dim/2, with llama3 scaling when set.
    pub fn rope_freqs(&self) -> Vec<f64> {
        let hd = self.head_dim();
        (0..hd / 2)
            .map(|i| {
                let freq = 1.0 / self.rope_theta.powf((2 * i) as f64 / hd as f64);
                match &self.rope_scaling {
                    None => freq,
                    Some(s) => {
                        let old = s.original_max_position_embeddings as f64;
                        let low_wavelen = old / s.low_freq_factor;
                        let high_wavelen = old / s.high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / s.factor
                        } else {
                            let smooth = (old / wavelen - s.low_freq_factor)
                                / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * freq / s.factor + smooth * freq
                        }
                    }
                }
            })
            .collect()
    }

    /// cos and sin tables [max_seq_len, head_dim / 2] (f32, computed in f64).
    pub fn rope_tables(&self) -> (Vec<f32>, Vec<f32>) {
        let freqs = self.rope_freqs();
        let mut cos = Vec::with_capacity(self.max_seq_len * freqs.len());
        let mut sin = Vec::with_capacity(self.max_seq_len * freqs.len());
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

impl ModelArgs for Llama3Config {
    fn update_from_config(&mut self, seq_len: usize, vocab: Option<usize>) -> Result<()> {
        self.update_from_training(seq_len, vocab)
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
    fn nparams_and_flops(&self, seq_len: usize) -> (usize, f64) {
        Llama3Config::nparams_and_flops(self, seq_len)
    }
    fn flops_per_token_llmc(&self, seq_len: usize) -> f64 {
        Llama3Config::flops_per_token_llmc(self, seq_len)
    }
    fn summary(&self) -> String {
        format!(
            "dim {} layers {} heads {}/{} ffn {} vocab {}{}",
            self.dim,
            self.n_layers,
            self.n_heads,
            self.kv_heads(),
            self.ffn_hidden(),
            self.vocab_size,
            if self.tie_embeddings { " tied" } else { "" }
        )
    }
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("Llama3Config serializes")
    }
    fn clone_box(&self) -> Box<dyn ModelArgs> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn num_params(&self) -> usize {
        Llama3Config::num_params(self)
    }
}

#[cfg(test)]
mod tests {
    use crate::llama3::flavor;

    #[test]
    fn ffn_sizes_match_published_models() {
        assert_eq!(flavor("debugmodel").unwrap().ffn_hidden(), 768);
        assert_eq!(flavor("1B").unwrap().ffn_hidden(), 8192);
        assert_eq!(flavor("3B").unwrap().ffn_hidden(), 8192);
        assert_eq!(flavor("8B").unwrap().ffn_hidden(), 14336);
        assert_eq!(flavor("70B").unwrap().ffn_hidden(), 28672);
        assert_eq!(flavor("405B").unwrap().ffn_hidden(), 53248);
    }

    #[test]
    fn param_counts_match_published_models() {
        // Published sizes: Llama 3.1 8B = 8,030,261,248; 3.2 1B = 1,235,814,400; 70B = 70,553,706,496.
        assert_eq!(flavor("8B").unwrap().num_params(), 8_030_261_248);
        assert_eq!(flavor("1B").unwrap().num_params(), 1_235_814_400);
        assert_eq!(flavor("70B").unwrap().num_params(), 70_553_706_496);
    }

    #[test]
    fn rope_scaling_keeps_high_frequencies() {
        let c = flavor("8B").unwrap();
        let f = c.rope_freqs();
        assert_eq!(f[0], 1.0);
        let last_unscaled = 1.0 / c.rope_theta.powf((2 * 63) as f64 / 128.0);
        assert!((f[63] - last_unscaled / 8.0).abs() < 1e-18);
    }
}
