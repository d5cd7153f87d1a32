//! AdamW, deterministic sums and the clip coefficient (kernels/adamw.cu, kernels/reduce.cu).

use super::{check_dtype, check_len, Arg, CudaBackend, FLOATS};
use crate::backend::{AdamW, AdamWBufs, Buf};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Partials per buffer for the first reduction pass: a function of the length only, so sums are
/// bitwise reproducible on any device.
fn partial_blocks(len: usize) -> usize {
    len.div_ceil(16384).clamp(1, 1024)
}
const REDUCE_THREADS: u32 = 256;

impl CudaBackend {
    pub(crate) fn adamw_impl(&self, b: &AdamWBufs, hp: &AdamW) -> Result<()> {
        const OP: &str = "adamw";
        let AdamWBufs {
            param,
            grad,
            m,
            v,
            compute,
            grad_scale,
        } = *b;
        for (what, b) in [
            ("param", param),
            ("grad", grad),
            ("m", m),
            ("v", v),
            ("grad_scale", grad_scale),
        ] {
            check_dtype(OP, what, b, &[DType::F32])?;
        }
        for (what, b) in [("grad", grad), ("m", m), ("v", v)] {
            check_len(OP, what, b, param.len)?;
        }
        check_len(OP, "grad_scale", grad_scale, 1)?;
        if let Some(c) = compute {
            check_dtype(OP, "compute", c, FLOATS)?;
            check_len(OP, "compute", c, param.len)?;
        }
        if hp.step == 0 {
            return Err(Error::Shape {
                op: OP,
                msg: "step must be >= 1 (bias correction)".into(),
            });
        }
        if param.len == 0 {
            return Ok(());
        }
        let t = hp.step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - (hp.beta1 as f64).powi(t);
        let bc2 = 1.0 - (hp.beta2 as f64).powi(t);
        let decay = (1.0 - hp.lr as f64 * hp.weight_decay as f64) as f32;
        let step_size = (hp.lr as f64 / bc1) as f32;
        let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
        let (name, copy) = match compute {
            Some(c) if c.dtype == DType::BF16 => ("adamw_bf16", c.ptr),
            Some(c) => ("adamw_f32", c.ptr),
            None => ("adamw_f32", 0),
        };
        let grid = self.grid_for(param.len.div_ceil(4), 256);
        let args = [
            Arg::P(param.ptr),
            Arg::P(grad.ptr),
            Arg::P(m.ptr),
            Arg::P(v.ptr),
            Arg::P(copy),
            Arg::P(grad_scale.ptr),
            Arg::I64(param.len as i64),
            Arg::F32(decay),
            Arg::F32(hp.beta1),
            Arg::F32(hp.beta2),
            Arg::F32(hp.eps),
            Arg::F32(step_size),
            Arg::F32(inv_sqrt_bc2),
        ];
        self.launch(name, (grid, 1, 1), 256, 0, &args)
    }

    /// Writes Σ x (or Σ x²) of each buffer as f64 partials into scratch, then one block adds them.
    fn reduce_into(&self, op: &'static str, xs: &[Buf], square: bool, out: Buf) -> Result<()> {
        check_dtype(op, "out", out, &[DType::F32])?;
        check_len(op, "out", out, 1)?;
        let allowed: &[DType] = if square { FLOATS } else { &[DType::F32] };
        for (i, x) in xs.iter().enumerate() {
            check_dtype(op, &format!("xs[{i}]"), *x, allowed)?;
        }
        let total: usize = xs
            .iter()
            .map(|x| partial_blocks(x.len))
            .sum::<usize>()
            .max(1);
        if total > i32::MAX as usize {
            return Err(Error::Shape {
                op,
                msg: "too many buffers".into(),
            });
        }
        let partials = self.scratch(total * 8)?;
        let mut at = 0usize;
        for x in xs {
            let blocks = partial_blocks(x.len);
            let name = match (square, x.dtype) {
                (false, _) => "reduce_partial_sum_f32",
                (true, DType::BF16) => "reduce_partial_sumsq_bf16",
                (true, _) => "reduce_partial_sumsq_f32",
            };
            let args = [
                Arg::P(x.ptr),
                Arg::I64(x.len as i64),
                Arg::P(partials + at as u64 * 8),
            ];
            self.launch(name, (blocks as u32, 1, 1), REDUCE_THREADS, 0, &args)?;
            at += blocks;
        }
        if at == 0 {
            // No buffers: the sum of nothing is 0.
            return self.fill_impl(out, 0.0);
        }
        let args = [Arg::P(partials), Arg::I32(at as i32), Arg::P(out.ptr)];
        self.launch("reduce_final", (1, 1, 1), 1024, 0, &args)
    }

    pub(crate) fn sum_impl(&self, x: Buf, out: Buf) -> Result<()> {
        self.reduce_into("sum", &[x], false, out)
    }

    pub(crate) fn sum_squares_impl(&self, xs: &[Buf], out: Buf) -> Result<()> {
        self.reduce_into("sum_squares", xs, true, out)
    }

    pub(crate) fn clip_coef_impl(&self, norm_sq: Buf, max_norm: f32, coef: Buf) -> Result<()> {
        const OP: &str = "clip_coef";
        check_dtype(OP, "norm_sq", norm_sq, &[DType::F32])?;
        check_dtype(OP, "coef", coef, &[DType::F32])?;
        check_len(OP, "norm_sq", norm_sq, 1)?;
        check_len(OP, "coef", coef, 1)?;
        self.launch(
            "clip_coef",
            (1, 1, 1),
            32,
            0,
            &[Arg::P(norm_sq.ptr), Arg::F32(max_norm), Arg::P(coef.ptr)],
        )
    }
}
