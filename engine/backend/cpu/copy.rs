//! Strided block copy (`Backend::copy_2d`): a column block of a row-major matrix into another,
//! e.g. a rank's vocabulary columns into the gathered logits.

use super::{check_dtype, overlaps, shape_err, SendPtr};
use crate::backend::Copy2d;
use crate::error::Result;
use crate::tensor::DType;
use rayon::prelude::*;

pub(super) fn copy_2d_op(a: &Copy2d) -> Result<()> {
    const OP: &str = "copy_2d";
    let Copy2d {
        src,
        dst,
        rows,
        cols,
        src_stride,
        dst_stride,
    } = *a;
    check_dtype(OP, "src", src, &[DType::F32, DType::BF16, DType::I32])?;
    if src.dtype != dst.dtype {
        return Err(shape_err(
            OP,
            format!("src {} vs dst {}", src.dtype, dst.dtype),
        ));
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let need = |stride: usize| (rows - 1) * stride + cols;
    if src.len < need(src_stride)
        || dst.len < need(dst_stride)
        || src_stride < cols
        || dst_stride < cols
    {
        return Err(shape_err(
            OP,
            format!(
                "{rows} x {cols} block with strides {src_stride} / {dst_stride} does not fit \
                 src {} / dst {} elements",
                src.len, dst.len
            ),
        ));
    }
    if overlaps(src, dst) {
        return Err(shape_err(OP, "dst overlaps src".into()));
    }
    let es = src.dtype.size();
    let (s, d) = (SendPtr(src.ptr as *mut u8), SendPtr(dst.ptr as *mut u8));
    (0..rows).into_par_iter().for_each(|r| {
        // SAFETY: both blocks lie inside their buffers (checked) and do not overlap; each task
        // writes its own destination row.
        unsafe {
            std::ptr::copy_nonoverlapping(
                s.get().add(r * src_stride * es),
                d.get().add(r * dst_stride * es),
                cols * es,
            );
        }
    });
    Ok(())
}
