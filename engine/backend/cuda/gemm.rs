//! GEMM through cuBLAS `cublasGemmStridedBatchedEx` with f32 accumulation.
//!
//! cuBLAS is column-major; a row-major [r, c] matrix is the column-major [c, r] matrix, its
//! transpose. So the row-major C = op(A)·op(B) is computed as the column-major Cᵀ = op(B)ᵀ·op(A)ᵀ:
//! cuBLAS's "A" is our B, its "B" is our A, with m and n swapped. bf16 inputs write bf16 or f32
//! C; f32 inputs (the reference path) use plain FP32 math (no TF32: the handle keeps the default
//! math mode and the compute type is CUBLAS_COMPUTE_32F).

use super::{backend_err, check_dtype, CudaBackend, FLOATS};
use crate::backend::{Buf, Gemm};
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::cublas::{result as br, sys as bs};

fn cuda_type(d: DType) -> bs::cudaDataType {
    match d {
        DType::BF16 => bs::cudaDataType::CUDA_R_16BF,
        _ => bs::cudaDataType::CUDA_R_32F,
    }
}

/// Elements a strided batch of `batch` matrices of `each` elements touches.
fn span(batch: usize, stride: usize, each: usize) -> usize {
    if batch == 0 || each == 0 {
        0
    } else {
        (batch - 1) * stride + each
    }
}

impl CudaBackend {
    pub(crate) fn gemm_impl(&self, g: &Gemm, a: Buf, b: Buf, c: Buf) -> Result<()> {
        const OP: &str = "gemm";
        check_dtype(OP, "a", a, FLOATS)?;
        check_dtype(OP, "b", b, FLOATS)?;
        check_dtype(OP, "c", c, FLOATS)?;
        if a.dtype != b.dtype {
            return Err(Error::DType {
                op: OP,
                msg: format!("a is {} but b is {}", a.dtype, b.dtype),
            });
        }
        if a.dtype == DType::F32 && c.dtype != DType::F32 {
            return Err(Error::DType {
                op: OP,
                msg: "f32 inputs need an f32 output".into(),
            });
        }
        let (m, n, k) = (g.m, g.n, g.k);
        let shape = || {
            format!(
                "m={m} n={n} k={k} batch={} trans_a={} trans_b={}",
                g.batch, g.trans_a, g.trans_b
            )
        };
        for (what, buf, each, stride) in [
            ("a", a, m * k, g.stride_a),
            ("b", b, k * n, g.stride_b),
            ("c", c, m * n, g.stride_c),
        ] {
            if buf.len < span(g.batch, stride, each) {
                return Err(Error::Shape {
                    op: OP,
                    msg: format!(
                        "{what} has {} elements, {} needs {}",
                        buf.len,
                        shape(),
                        span(g.batch, stride, each)
                    ),
                });
            }
        }
        if m == 0 || n == 0 || g.batch == 0 {
            return Ok(());
        }
        let fits = |v: usize| v <= i32::MAX as usize;
        if ![m, n, k, g.batch].into_iter().all(fits) {
            return Err(Error::Shape {
                op: OP,
                msg: format!("dimensions exceed cuBLAS's int range: {}", shape()),
            });
        }
        let (ta, lda) = if g.trans_b {
            (bs::cublasOperation_t::CUBLAS_OP_T, k)
        } else {
            (bs::cublasOperation_t::CUBLAS_OP_N, n)
        };
        let (tb, ldb) = if g.trans_a {
            (bs::cublasOperation_t::CUBLAS_OP_T, m)
        } else {
            (bs::cublasOperation_t::CUBLAS_OP_N, k)
        };
        let alpha = g.alpha;
        let beta = g.beta;
        self.bind()?;
        unsafe {
            br::gemm_strided_batched_ex(
                *self.blas.handle(),
                ta,
                tb,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                b.ptr as *const _,
                cuda_type(b.dtype),
                lda.max(1) as i32,
                g.stride_b as i64,
                a.ptr as *const _,
                cuda_type(a.dtype),
                ldb.max(1) as i32,
                g.stride_a as i64,
                &beta as *const f32 as *const _,
                c.ptr as *mut _,
                cuda_type(c.dtype),
                n as i32,
                g.stride_c as i64,
                g.batch as i32,
                bs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                bs::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            backend_err(
                &format!(
                    "cublasGemmStridedBatchedEx ({}, {} -> {})",
                    shape(),
                    a.dtype,
                    c.dtype
                ),
                e,
            )
        })
    }
}
