//! Causal grouped-query flash attention (kernels/attention.cu): forward, and a deterministic
//! backward in three launches (delta = rowsum(dO ∘ O) into the backend scratch, then a dK/dV
//! kernel per kv tile and a dQ kernel per query tile; no atomics, so gradients are bitwise
//! reproducible).
//!
//! bf16 q, k, v, out, dout, dq, dk, dv; f32 lse. Tensor-core path (mma.sync m16n8k16) for head
//! dims 16, 32, 64 and 128; any other head dim is a clean `Error::Shape`.

use super::{check_dtype, check_len, Arg, CudaBackend};
use crate::backend::{AttnBwd, AttnFwd, AttnShape, Buf};
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::driver::sys::CUfunction_attribute;

/// Launch shapes of one head dim; they must match the `ATTN_ENTRY` table in kernels/attention.cu.
#[derive(Clone, Copy, Debug)]
struct Tiles {
    /// Forward: warps per CTA, m16 tiles per warp, keys per tile.
    fwd: (usize, usize, usize),
    /// dK/dV: warps per CTA (16 keys each), queries per tile.
    dkv: (usize, usize),
    /// dQ: warps per CTA (16 queries each), keys per tile.
    dq: (usize, usize),
}

const HEAD_DIMS: [usize; 4] = [16, 32, 64, 128];

fn tiles(head_dim: usize) -> Option<Tiles> {
    Some(match head_dim {
        16 => Tiles {
            fwd: (4, 1, 64),
            dkv: (4, 64),
            dq: (4, 64),
        },
        32 => Tiles {
            fwd: (4, 1, 64),
            dkv: (4, 64),
            dq: (4, 32),
        },
        64 => Tiles {
            fwd: (4, 2, 64),
            dkv: (4, 64),
            dq: (4, 64),
        },
        128 => Tiles {
            fwd: (4, 2, 32),
            dkv: (4, 32),
            dq: (4, 32),
        },
        _ => return None,
    })
}

impl Tiles {
    // Shared tiles are row-major with 8 bf16 of padding per row (see the kernel header).
    fn fwd_smem(&self, d: usize) -> usize {
        let (nw, mw, bn) = self.fwd;
        (16 * nw * mw + 4 * bn) * (d + 8) * 2
    }
    fn dkv_smem(&self, d: usize) -> usize {
        let (nw, bmq) = self.dkv;
        (2 * 16 * nw + 4 * bmq) * (d + 8) * 2 + 2 * 2 * bmq * 4
    }
    fn dq_smem(&self, d: usize) -> usize {
        let (nw, bn) = self.dq;
        (2 * 16 * nw + 4 * bn) * (d + 8) * 2
    }
}

/// Checks everything the kernels assume about the shape; returns the tile table.
fn check_shape(op: &'static str, s: &AttnShape, scale: f32) -> Result<Tiles> {
    let t = tiles(s.head_dim).ok_or_else(|| Error::Shape {
        op,
        msg: format!(
            "head_dim {} is not supported by the CUDA flash-attention kernels (supported: {HEAD_DIMS:?})",
            s.head_dim
        ),
    })?;
    if s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
        return Err(Error::Shape {
            op,
            msg: format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                s.n_heads, s.n_kv_heads
            ),
        });
    }
    // Grid y / z limits and the kernels' 32-bit sequence and head indices.
    if s.n_heads > 65535 || s.batch > 65535 || s.seq > i32::MAX as usize {
        return Err(Error::Shape {
            op,
            msg: format!(
                "batch {} / n_heads {} / seq {} exceed the launch limits",
                s.batch, s.n_heads, s.seq
            ),
        });
    }
    if !scale.is_finite() {
        return Err(Error::Shape {
            op,
            msg: format!("scale {scale} is not finite"),
        });
    }
    Ok(t)
}

/// bf16 tiles move by 16-byte cp.async: every bf16 tensor must start 16-byte aligned (rows are
/// then aligned too, since head_dim is a multiple of 8).
fn check_aligned(op: &'static str, bufs: &[(&str, Buf)]) -> Result<()> {
    for (name, b) in bufs {
        if b.ptr % 16 != 0 {
            return Err(Error::Shape {
                op,
                msg: format!("{name} at {:#x} is not 16-byte aligned", b.ptr),
            });
        }
    }
    Ok(())
}

impl CudaBackend {
    /// Launches a kernel that may need more than the default 48 KB of dynamic shared memory.
    fn launch_big(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: usize,
        smem: usize,
        args: &[Arg],
    ) -> Result<()> {
        let f = self.function(name)?;
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .map_err(|e| {
            Error::Backend(format!(
                "cuda: {name}: allow {smem} bytes of shared memory: {e}"
            ))
        })?;
        self.launch(name, grid, block as u32, smem as u32, args)
    }

    pub(crate) fn flash_attention_fwd(&self, a: &AttnFwd) -> Result<()> {
        const OP: &str = "attention_fwd";
        let AttnFwd {
            q,
            k,
            v,
            out,
            lse,
            shape: s,
            scale,
        } = *a;
        for (name, b) in [("q", q), ("k", k), ("v", v), ("out", out)] {
            check_dtype(OP, name, b, &[DType::BF16])?;
        }
        check_dtype(OP, "lse", lse, &[DType::F32])?;
        let t = check_shape(OP, &s, scale)?;
        check_len(OP, "q", q, s.q_len())?;
        check_len(OP, "k", k, s.kv_len())?;
        check_len(OP, "v", v, s.kv_len())?;
        check_len(OP, "out", out, s.q_len())?;
        check_len(OP, "lse", lse, s.lse_len())?;
        if s.q_len() == 0 {
            return Ok(());
        }
        check_aligned(OP, &[("q", q), ("k", k), ("v", v), ("out", out)])?;

        let d = s.head_dim;
        let (nw, mw, _) = t.fwd;
        let grid = (
            s.seq.div_ceil(16 * nw * mw) as u32,
            s.n_heads as u32,
            s.batch as u32,
        );
        let args = [
            Arg::P(q.ptr),
            Arg::P(k.ptr),
            Arg::P(v.ptr),
            Arg::P(out.ptr),
            Arg::P(lse.ptr),
            Arg::I32(s.seq as i32),
            Arg::I32(s.n_heads as i32),
            Arg::I32(s.n_kv_heads as i32),
            Arg::F32(scale),
        ];
        self.launch_big(
            &format!("attn_fwd_d{d}_bf16"),
            grid,
            32 * nw,
            t.fwd_smem(d),
            &args,
        )
    }

    pub(crate) fn flash_attention_bwd(&self, a: &AttnBwd) -> Result<()> {
        const OP: &str = "attention_bwd";
        let AttnBwd {
            q,
            k,
            v,
            out,
            dout,
            lse,
            dq,
            dk,
            dv,
            shape: s,
            scale,
        } = *a;
        let bf16s = [
            ("q", q),
            ("k", k),
            ("v", v),
            ("out", out),
            ("dout", dout),
            ("dq", dq),
            ("dk", dk),
            ("dv", dv),
        ];
        for (name, b) in bf16s {
            check_dtype(OP, name, b, &[DType::BF16])?;
        }
        check_dtype(OP, "lse", lse, &[DType::F32])?;
        let t = check_shape(OP, &s, scale)?;
        for (name, b) in [("q", q), ("out", out), ("dout", dout), ("dq", dq)] {
            check_len(OP, name, b, s.q_len())?;
        }
        for (name, b) in [("k", k), ("v", v), ("dk", dk), ("dv", dv)] {
            check_len(OP, name, b, s.kv_len())?;
        }
        check_len(OP, "lse", lse, s.lse_len())?;
        if s.q_len() == 0 {
            return Ok(());
        }
        check_aligned(OP, &bf16s)?;

        let d = s.head_dim;
        let (seq, nh, nkv) = (s.seq as i32, s.n_heads as i32, s.n_kv_heads as i32);
        let delta = self.scratch(s.lse_len() * 4)?;

        // One group of d/8 lanes per (token, head) row.
        let rows = s.batch * s.seq * s.n_heads;
        let threads = rows * (d / 8);
        let blocks = threads.div_ceil(256);
        if blocks > i32::MAX as usize {
            return Err(Error::Shape {
                op: OP,
                msg: format!("{rows} rows exceed the delta kernel's grid"),
            });
        }
        let args = [
            Arg::P(out.ptr),
            Arg::P(dout.ptr),
            Arg::P(delta),
            Arg::I64(rows as i64),
            Arg::I32(seq),
            Arg::I32(nh),
        ];
        self.launch(
            &format!("attn_bwd_delta_d{d}_bf16"),
            (blocks as u32, 1, 1),
            256,
            0,
            &args,
        )?;

        let (nw, _) = t.dkv;
        let grid = (
            s.seq.div_ceil(16 * nw) as u32,
            s.n_kv_heads as u32,
            s.batch as u32,
        );
        let args = [
            Arg::P(q.ptr),
            Arg::P(k.ptr),
            Arg::P(v.ptr),
            Arg::P(dout.ptr),
            Arg::P(lse.ptr),
            Arg::P(delta),
            Arg::P(dk.ptr),
            Arg::P(dv.ptr),
            Arg::I32(seq),
            Arg::I32(nh),
            Arg::I32(nkv),
            Arg::F32(scale),
        ];
        self.launch_big(
            &format!("attn_bwd_dkv_d{d}_bf16"),
            grid,
            32 * nw,
            t.dkv_smem(d),
            &args,
        )?;

        let (nw, _) = t.dq;
        let grid = (
            s.seq.div_ceil(16 * nw) as u32,
            s.n_heads as u32,
            s.batch as u32,
        );
        let args = [
            Arg::P(q.ptr),
            Arg::P(k.ptr),
            Arg::P(v.ptr),
            Arg::P(dout.ptr),
            Arg::P(lse.ptr),
            Arg::P(delta),
            Arg::P(dq.ptr),
            Arg::I32(seq),
            Arg::I32(nh),
            Arg::I32(nkv),
            Arg::F32(scale),
        ];
        self.launch_big(
            &format!("attn_bwd_dq_d{d}_bf16"),
            grid,
            32 * nw,
            t.dq_smem(d),
            &args,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Host-side checks need no device: they run in the ordinary `cargo test --features cuda`.
    #[test]
    fn rejects_unsupported_head_dims_and_groups() {
        let s = AttnShape {
            batch: 1,
            seq: 8,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 96,
        };
        let e = check_shape("attention_fwd", &s, 0.1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("attention_fwd") && e.contains("head_dim 96"),
            "{e}"
        );
        let s = AttnShape {
            head_dim: 64,
            n_kv_heads: 3,
            ..s
        };
        assert!(check_shape("attention_fwd", &s, 0.1)
            .unwrap_err()
            .to_string()
            .contains("multiple"));
        let s = AttnShape { n_kv_heads: 2, ..s };
        assert!(check_shape("attention_fwd", &s, f32::NAN).is_err());
        assert!(check_shape("attention_fwd", &s, 0.125).is_ok());
    }

    #[test]
    fn shared_memory_fits_every_supported_gpu() {
        // 99 KB is the smallest opt-in limit among sm_80+ parts (sm_86/89); A100/H100 allow more.
        for d in HEAD_DIMS {
            let t = tiles(d).unwrap();
            for bytes in [t.fwd_smem(d), t.dkv_smem(d), t.dq_smem(d)] {
                assert!(bytes <= 99 * 1024, "d{d}: {bytes} bytes of shared memory");
            }
        }
    }
}
