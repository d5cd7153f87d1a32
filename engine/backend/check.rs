//! Host-side argument checks shared by the backends' ops (the CPU and CUDA twins of an op
//! reject the same bad arguments with the same errors).

use super::Buf;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// The float dtypes the ops compute in.
pub(crate) const FLOATS: &[DType] = &[DType::F32, DType::BF16];

pub(crate) fn shape_err(op: &'static str, msg: String) -> Error {
    Error::Shape { op, msg }
}

pub(crate) fn check_len(op: &'static str, what: &str, b: Buf, want: usize) -> Result<()> {
    if b.len != want {
        return Err(shape_err(
            op,
            format!("{what} has {} elements, expected {want}", b.len),
        ));
    }
    Ok(())
}

pub(crate) fn check_dtype(op: &'static str, what: &str, b: Buf, allowed: &[DType]) -> Result<()> {
    if !allowed.contains(&b.dtype) {
        let names: Vec<&str> = allowed.iter().map(|d| d.name()).collect();
        return Err(Error::DType {
            op,
            msg: format!("{what} is {}, expected {}", b.dtype, names.join(" or ")),
        });
    }
    if b.len > 0 && b.ptr == 0 {
        return Err(Error::Backend(format!("{op}: {what} is a null buffer")));
    }
    Ok(())
}

/// `b` has `a`'s dtype and length.
#[cfg(feature = "cuda")]
pub(crate) fn check_same(op: &'static str, names: (&str, &str), a: Buf, b: Buf) -> Result<()> {
    if a.dtype != b.dtype {
        return Err(Error::DType {
            op,
            msg: format!("{} is {} but {} is {}", names.0, a.dtype, names.1, b.dtype),
        });
    }
    check_len(op, names.1, b, a.len)
}

/// Whether two buffers share a byte.
pub(crate) fn overlaps(a: Buf, b: Buf) -> bool {
    let (a0, a1) = (a.ptr, a.ptr + a.bytes() as u64);
    let (b0, b1) = (b.ptr, b.ptr + b.bytes() as u64);
    a.bytes() > 0 && b.bytes() > 0 && a0 < b1 && b0 < a1
}

/// Rejects an output that shares bytes with an input (the planner must never produce that).
pub(crate) fn check_disjoint(
    op: &'static str,
    out_name: &str,
    out: Buf,
    ins: &[(&str, Buf)],
) -> Result<()> {
    match ins.iter().find(|(_, b)| overlaps(out, *b)) {
        Some((name, _)) => Err(shape_err(
            op,
            format!("output {out_name} overlaps input {name}"),
        )),
        None => Ok(()),
    }
}
