//! The kernel boundary. Every op the models need, forward and backward, is one method of `Backend`.
//!
//! Buffers are raw addresses (`Buf`): a host pointer on the CPU backend, a device pointer on CUDA.
//! The tape and the memory planner own placement (one arena, planned offsets); a backend only
//! computes. Ops never allocate from the arena and never copy data to the host, so a step runs
//! without host round-trips on a device backend. Reductions are deterministic on every backend.
//!
//! Conventions (all row-major, contiguous):
//! * activations `[rows, dim]` with rows = batch * seq;
//! * linear weights `[out, in]` (Hugging Face layout), y = x · Wᵀ;
//! * attention tensors `[batch, seq, heads, head_dim]`, log-sum-exp `[batch, heads, seq]` f32;
//! * rotary tables `[seq, head_dim/2]` f32 (cos then sin as two buffers), half-split pairing
//!   (i, i + head_dim/2) as in Hugging Face's `rotate_half`, so HF q/k weights need no permutation;
//! * gradients of parameters are f32 and accumulate (`+=`) across micro-batches.

mod check;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod meta;

use crate::error::Result;
use crate::tensor::DType;

/// A view of backend memory. `ptr` is an address in the backend's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    pub ptr: u64,
    /// Number of elements.
    pub len: usize,
    pub dtype: DType,
}

impl Buf {
    pub fn new(ptr: u64, len: usize, dtype: DType) -> Self {
        Buf { ptr, len, dtype }
    }
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }
    /// Sub-view of `len` elements starting at element `start`.
    pub fn slice(&self, start: usize, len: usize) -> Buf {
        debug_assert!(start + len <= self.len);
        Buf {
            ptr: self.ptr + (start * self.dtype.size()) as u64,
            len,
            dtype: self.dtype,
        }
    }
    /// The same bytes seen with another dtype (len recomputed).
    pub fn reinterpret(&self, dtype: DType) -> Buf {
        Buf {
            ptr: self.ptr,
            len: self.bytes() / dtype.size(),
            dtype,
        }
    }
}

/// One allocation owned by a backend; freed on drop.
pub trait DeviceMem: Send + Sync {
    fn ptr(&self) -> u64;
    fn bytes(&self) -> usize;
}

/// Row-major GEMM: C[m,n] = alpha * op(A)[m,k] · op(B)[k,n] + beta * C, repeated `batch` times with
/// element strides between matrices. op(A) = Aᵀ when `trans_a` (A is then stored [k,m]).
/// A and B share a dtype (f32 or bf16); C may be f32 or bf16; accumulation is always f32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl Gemm {
    /// A plain single GEMM with alpha = 1 and the given beta.
    pub fn new(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, beta: f32) -> Self {
        Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            alpha: 1.0,
            beta,
            batch: 1,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
        }
    }
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64 * self.batch as f64
    }
}

/// Shape of a causal grouped-query attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    pub fn q_len(&self) -> usize {
        self.batch * self.seq * self.n_heads * self.head_dim
    }
    pub fn kv_len(&self) -> usize {
        self.batch * self.seq * self.n_kv_heads * self.head_dim
    }
    pub fn lse_len(&self) -> usize {
        self.batch * self.n_heads * self.seq
    }
    /// Causal forward FLOPs (two GEMMs over the lower triangle).
    pub fn fwd_flops(&self) -> f64 {
        let (b, s, h, d) = (
            self.batch as f64,
            self.seq as f64,
            self.n_heads as f64,
            self.head_dim as f64,
        );
        4.0 * b * h * d * s * s / 2.0
    }
}

/// Shape of a rotary-embedding call on `[batch, seq, heads, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// AdamW hyper-parameters for one update (decoupled weight decay, bias correction with `step` >= 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
}

/// The buffers of one AdamW update (`Backend::adamw`); the hyper-parameters are [`AdamW`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdamWBufs {
    /// f32 master weights, updated in place.
    pub param: Buf,
    /// f32 gradient, like `param`; scaled by `grad_scale[0]` before the update.
    pub grad: Buf,
    /// f32 first moment, like `param`, updated in place.
    pub m: Buf,
    /// f32 second moment, like `param`, updated in place.
    pub v: Buf,
    /// When given (bf16 or f32, like `param`), receives the updated weights.
    pub compute: Option<Buf>,
    /// One f32 on the device: the gradient scale (loss scaling / clip coefficient).
    pub grad_scale: Buf,
}

/// `Backend::rmsnorm_fwd`: out = x / sqrt(mean(x²) + eps) * w per row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsNorm {
    /// Input `[rows, dim]`.
    pub x: Buf,
    /// Weight `[dim]`.
    pub w: Buf,
    /// Output `[rows, dim]`.
    pub out: Buf,
    /// `[rows]` f32: 1 / sqrt(mean(x²) + eps) per row, saved for backward.
    pub rstd: Buf,
    pub rows: usize,
    pub dim: usize,
    pub eps: f32,
}

/// `Backend::rmsnorm_residual_fwd`: h = x + residual (written), out = rmsnorm(h) · w.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RmsNormResidual {
    /// Input `[rows, dim]`.
    pub x: Buf,
    /// The residual stream `[rows, dim]`, added to x.
    pub residual: Buf,
    /// Weight `[dim]`.
    pub w: Buf,
    /// Output `[rows, dim]`: x + residual, the input of the norm (and of the next residual).
    pub h: Buf,
    /// Output `[rows, dim]`: rmsnorm(h) · w.
    pub out: Buf,
    /// `[rows]` f32: 1 / sqrt(mean(h²) + eps) per row, saved for backward.
    pub rstd: Buf,
    pub rows: usize,
    pub dim: usize,
    pub eps: f32,
}

impl RmsNormResidual {
    /// The call as a plain norm of x plus the fused part `(residual, h)`: the backends serve
    /// both forwards through one entry point.
    pub fn split(&self) -> (RmsNorm, (Buf, Buf)) {
        let norm = RmsNorm {
            x: self.x,
            w: self.w,
            out: self.out,
            rstd: self.rstd,
            rows: self.rows,
            dim: self.dim,
            eps: self.eps,
        };
        (norm, (self.residual, self.h))
    }
}

/// `Backend::rmsnorm_bwd` (and `rmsnorm_bwd_add`): the gradients of `rmsnorm_fwd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RmsNormBwd {
    /// Incoming gradient dL/dout `[rows, dim]`.
    pub dout: Buf,
    /// The forward's input `[rows, dim]` (h for the residual forward).
    pub x: Buf,
    /// Weight `[dim]`.
    pub w: Buf,
    /// `[rows]` f32 saved by the forward.
    pub rstd: Buf,
    /// dL/dx `[rows, dim]`, written.
    pub dx: Buf,
    /// dL/dw `[dim]` f32, accumulated (`+=`), deterministic.
    pub dw: Buf,
    pub rows: usize,
    pub dim: usize,
}

/// `Backend::attention_fwd`: causal GQA attention, out = softmax(q kᵀ · scale) v.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnFwd {
    /// Queries `[batch, seq, n_heads, head_dim]`.
    pub q: Buf,
    /// Keys `[batch, seq, n_kv_heads, head_dim]`.
    pub k: Buf,
    /// Values, like k.
    pub v: Buf,
    /// Output, like q.
    pub out: Buf,
    /// `[batch, n_heads, seq]` f32: log Σ_j exp(scale · q_t · k_j), saved for backward.
    pub lse: Buf,
    /// Batch, sequence, query / kv heads and head dim.
    pub shape: AttnShape,
    /// Multiplies q kᵀ before the softmax (usually 1 / sqrt(head_dim)).
    pub scale: f32,
}

/// `Backend::attention_bwd`: the gradients of `attention_fwd`, written (not accumulated).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnBwd {
    /// The forward's queries `[batch, seq, n_heads, head_dim]`.
    pub q: Buf,
    /// The forward's keys `[batch, seq, n_kv_heads, head_dim]`.
    pub k: Buf,
    /// The forward's values, like k.
    pub v: Buf,
    /// The forward's output, like q.
    pub out: Buf,
    /// Incoming gradient dL/dout, like q.
    pub dout: Buf,
    /// `[batch, n_heads, seq]` f32 saved by the forward.
    pub lse: Buf,
    /// dL/dq, like q.
    pub dq: Buf,
    /// dL/dk, like k.
    pub dk: Buf,
    /// dL/dv, like k.
    pub dv: Buf,
    /// Batch, sequence, query / kv heads and head dim.
    pub shape: AttnShape,
    /// Multiplies q kᵀ before the softmax (usually 1 / sqrt(head_dim)).
    pub scale: f32,
}

/// `Backend::cross_entropy`: fused log-softmax + cross-entropy over `vocab` for each of `rows`,
/// with its gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropy {
    /// `[rows, vocab]`.
    pub logits: Buf,
    /// `[rows]` I32 class ids; `ignore_index` marks rows without a target.
    pub targets: Buf,
    /// `[rows]` f32: the per-row loss (0 where targets[r] == ignore_index).
    pub losses: Buf,
    /// `[rows, vocab]`: (softmax − onehot) · grad_scale (0 rows for ignored targets). May alias
    /// `logits` (the same buffer, not a partial overlap).
    pub dlogits: Buf,
    pub rows: usize,
    pub vocab: usize,
    /// The target id of rows that count for nothing (no loss, zero gradient).
    pub ignore_index: i32,
    /// Multiplies dlogits (e.g. 1 / the number of counted targets).
    pub grad_scale: f32,
}

/// `Backend::embedding_shard_fwd` / `_bwd`: the vocabulary-parallel embedding. `table` holds
/// rows `row0 .. row0 + table rows` of a vocabulary of `vocab` ids (another rank holds the rest).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmbeddingShard {
    /// Forward: this rank's rows [rows, dim]. Backward: their f32 gradient (accumulated).
    pub table: Buf,
    /// `[n]` I32 token ids, every one in `0 .. vocab`.
    pub ids: Buf,
    /// Forward: the output `[n, dim]` (zero rows for ids another rank holds). Backward: dout.
    pub out: Buf,
    pub dim: usize,
    pub row0: usize,
    pub vocab: usize,
}

/// `Backend::cross_entropy_stats`: pass 1 of the vocabulary-parallel loss. Per row of this
/// rank's logits columns `col0 .. col0 + vocab`: `stats[r] = (max, sum of exp(x - max),
/// x[target - col0] if this rank holds the target column, else 0)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropyStats {
    /// `[rows, vocab]` (this rank's columns).
    pub logits: Buf,
    /// `[rows]` I32 global class ids.
    pub targets: Buf,
    /// `[rows, 3]` f32.
    pub stats: Buf,
    pub rows: usize,
    pub vocab: usize,
    pub col0: usize,
    pub ignore_index: i32,
}

/// `Backend::cross_entropy_shard`: pass 2, once every rank's stats are gathered (`stats`
/// `[shards, rows, 3]` in rank order). With M = max of the maxima, S = sum of s * exp(m - M) and
/// xt = sum of the target logits: `losses[r] = ln S + M - xt` (0 for ignored rows) and `dlogits =
/// (exp(x - M) / S - onehot) * grad_scale` over this rank's columns. dlogits may alias logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropyShard {
    pub logits: Buf,
    pub targets: Buf,
    pub stats: Buf,
    pub losses: Buf,
    pub dlogits: Buf,
    pub rows: usize,
    pub vocab: usize,
    pub col0: usize,
    pub shards: usize,
    /// The whole vocabulary (a target outside it that is not ignore_index is an error).
    pub vocab_total: usize,
    pub ignore_index: i32,
    pub grad_scale: f32,
}

/// `Backend::copy_2d`: `dst[r * dst_stride + c] = src[r * src_stride + c]` for `r < rows`, `c <
/// cols` (same dtype; the buffers start at the first element), e.g. a column block of a matrix.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Copy2d {
    pub src: Buf,
    pub dst: Buf,
    pub rows: usize,
    pub cols: usize,
    pub src_stride: usize,
    pub dst_stride: usize,
}

/// The kernel boundary. All methods are asynchronous with respect to the host on device backends
/// except `upload`, `download` and `synchronize`. Output buffers must not overlap inputs unless a
/// method says so. Every CUDA kernel behind these methods has a CPU twin of the same name in `cpu`.
pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// The device in words (for logs and the MFU peak table).
    fn device_description(&self) -> String {
        self.name().to_string()
    }
    /// True for the shape-only backend used to plan memory: it computes nothing.
    fn is_meta(&self) -> bool {
        false
    }

    // ---- memory -------------------------------------------------------------------------
    /// One allocation (aligned to 256 bytes). Counted: see `alloc_count`.
    fn alloc(&self, bytes: usize) -> Result<Box<dyn DeviceMem>>;
    /// Number of `alloc` calls so far (the planner test asserts steps 2..N make none).
    fn alloc_count(&self) -> u64;
    fn upload(&self, dst: Buf, src: &[u8]) -> Result<()>;
    fn download(&self, src: Buf, dst: &mut [u8]) -> Result<()>;
    fn synchronize(&self) -> Result<()>;

    // ---- elementwise ------------------------------------------------------------------
    /// dst[i] = value (any dtype; I32 gets `value as i32`).
    fn fill(&self, dst: Buf, value: f32) -> Result<()>;
    /// dst = src, same dtype and length.
    fn copy(&self, src: Buf, dst: Buf) -> Result<()>;
    /// A strided block copy (see [`Copy2d`]).
    fn copy_2d(&self, a: &Copy2d) -> Result<()>;
    /// dst = src converted (f32 <-> bf16, or same dtype copy), round-to-nearest-even.
    fn cast(&self, src: Buf, dst: Buf) -> Result<()>;
    /// out = a + b elementwise; `out` may alias `a` or `b`. All three share a dtype.
    fn add(&self, a: Buf, b: Buf, out: Buf) -> Result<()>;
    /// x *= alpha in place.
    fn scale(&self, x: Buf, alpha: f32) -> Result<()>;

    // ---- matmul ------------------------------------------------------------------------
    fn gemm(&self, g: &Gemm, a: Buf, b: Buf, c: Buf) -> Result<()>;

    // ---- embedding ---------------------------------------------------------------------
    /// out[n, :] = table[ids[n], :]; table [vocab, dim], ids I32 [rows], out [rows, dim].
    fn embedding_fwd(&self, table: Buf, ids: Buf, out: Buf, dim: usize) -> Result<()>;
    /// dtable[ids[n], :] += dout[n, :] (dtable f32), deterministic: no float atomics.
    fn embedding_bwd(&self, dout: Buf, ids: Buf, dtable: Buf, dim: usize) -> Result<()>;
    /// The vocabulary-parallel lookup (see [`EmbeddingShard`]).
    fn embedding_shard_fwd(&self, a: &EmbeddingShard) -> Result<()>;
    /// table[ids[n] - row0, :] += out[n, :] for the ids this rank holds, deterministic.
    fn embedding_shard_bwd(&self, a: &EmbeddingShard) -> Result<()>;

    // ---- rmsnorm -----------------------------------------------------------------------
    /// out = x / sqrt(mean(x²) + eps) * w per row; rstd saved for backward (see [`RmsNorm`]).
    fn rmsnorm_fwd(&self, a: &RmsNorm) -> Result<()>;
    /// Fused residual add + rmsnorm: h = x + residual (written), out = rmsnorm(h) (see
    /// [`RmsNormResidual`]).
    fn rmsnorm_residual_fwd(&self, a: &RmsNormResidual) -> Result<()>;
    /// dx = dL/dx (written), dw += dL/dw (f32, accumulated, deterministic); see [`RmsNormBwd`].
    fn rmsnorm_bwd(&self, a: &RmsNormBwd) -> Result<()>;
    /// `rmsnorm_bwd` with `dres` added to dx (dx = dL/dx + dres; dres like dx, disjoint from
    /// it): the backward of `rmsnorm_residual_fwd` when h also has a gradient of its own (the
    /// residual stream). The default runs the two kernels; a backend may fuse them.
    fn rmsnorm_bwd_add(&self, a: &RmsNormBwd, dres: Buf) -> Result<()> {
        self.rmsnorm_bwd(a)?;
        self.add(a.dx, dres, a.dx)
    }

    // ---- rotary ------------------------------------------------------------------------
    /// Rotates pairs (i, i + d/2) of every head by the angle in (cos, sin) [seq, d/2] f32.
    fn rope_fwd(&self, x: Buf, out: Buf, cos: Buf, sin: Buf, s: RopeShape) -> Result<()>;
    /// The inverse rotation, applied to the incoming gradient.
    fn rope_bwd(&self, dout: Buf, dx: Buf, cos: Buf, sin: Buf, s: RopeShape) -> Result<()>;

    // ---- attention ---------------------------------------------------------------------
    /// Causal GQA attention, softmax(q kᵀ · scale) v; query head h reads kv head h / (H / Hkv).
    /// Never materialises the [seq, seq] score matrix for the whole batch. See [`AttnFwd`].
    fn attention_fwd(&self, a: &AttnFwd) -> Result<()>;
    /// Gradients of `attention_fwd`: dq, dk, dv written (not accumulated). See [`AttnBwd`].
    fn attention_bwd(&self, a: &AttnBwd) -> Result<()>;

    // ---- mlp ---------------------------------------------------------------------------
    /// out = silu(gate) * up.
    fn swiglu_fwd(&self, gate: Buf, up: Buf, out: Buf) -> Result<()>;
    fn swiglu_bwd(&self, dout: Buf, gate: Buf, up: Buf, dgate: Buf, dup: Buf) -> Result<()>;

    // ---- loss --------------------------------------------------------------------------
    /// Fused log-softmax + cross-entropy over `vocab` for each of `rows`, with its gradient
    /// (see [`CrossEntropy`]).
    fn cross_entropy(&self, a: &CrossEntropy) -> Result<()>;
    /// Vocabulary-parallel loss, pass 1 (see [`CrossEntropyStats`]).
    fn cross_entropy_stats(&self, a: &CrossEntropyStats) -> Result<()>;
    /// Vocabulary-parallel loss, pass 2 (see [`CrossEntropyShard`]).
    fn cross_entropy_shard(&self, a: &CrossEntropyShard) -> Result<()>;

    // ---- reductions / optimizer ----------------------------------------------------------
    /// out[0] (f32) = sum of x (f32), deterministic order.
    fn sum(&self, x: Buf, out: Buf) -> Result<()>;
    /// out[0] (f32) = Σ over all buffers of Σ x² (f32 buffers), deterministic order.
    fn sum_squares(&self, xs: &[Buf], out: Buf) -> Result<()>;
    /// coef[0] = min(1, max_norm / (sqrt(norm_sq[0]) + 1e-6)): the clip coefficient, on device.
    fn clip_coef(&self, norm_sq: Buf, max_norm: f32, coef: Buf) -> Result<()>;
    /// Fused AdamW on the buffers of `b` (see [`AdamWBufs`]) with hyper-parameters `hp`.
    fn adamw(&self, b: &AdamWBufs, hp: &AdamW) -> Result<()>;
}
