//! fill, copy, cast, add, scale, and the vectorised f32 exp used by every softmax.

use super::{
    bf16_to_f32, check_dtype, check_len, f32_to_bf16, f32_to_bf16_bits, overlaps, shape_err, view,
    view_mut, SendPtr, CHUNK, FLOATS, PAR_MIN,
};
use crate::backend::Buf;
use crate::error::{Error, Result};
use crate::tensor::DType;
use half::bf16;
use rayon::prelude::*;

fn par_chunks_mut<T: Send>(xs: &mut [T], f: impl Fn(&mut [T]) + Sync + Send) {
    if xs.len() >= PAR_MIN {
        xs.par_chunks_mut(CHUNK).for_each(f);
    } else {
        f(xs);
    }
}

pub(super) fn fill(dst: Buf, value: f32) -> Result<()> {
    check_dtype("fill", "dst", dst, &[DType::F32, DType::BF16, DType::I32])?;
    // SAFETY: dst is a live buffer of its dtype; nothing else is borrowed.
    unsafe {
        match dst.dtype {
            DType::F32 => par_chunks_mut(view_mut::<f32>(dst), |c| c.fill(value)),
            DType::BF16 => {
                let v = bf16::from_bits(f32_to_bf16_bits(value));
                par_chunks_mut(view_mut::<bf16>(dst), |c| c.fill(v))
            }
            DType::I32 => par_chunks_mut(view_mut::<i32>(dst), |c| c.fill(value as i32)),
        }
    }
    Ok(())
}

pub(super) fn copy(src: Buf, dst: Buf) -> Result<()> {
    if src.dtype != dst.dtype {
        return Err(Error::DType {
            op: "copy",
            msg: format!("src is {}, dst is {} (use cast)", src.dtype, dst.dtype),
        });
    }
    check_len("copy", "dst", dst, src.len)?;
    if src.bytes() == 0 || src.ptr == dst.ptr {
        return Ok(());
    }
    const PIECE: usize = 1 << 18;
    if src.bytes() >= 4 * PIECE && !overlaps(src, dst) {
        // One core does not saturate the memory system: disjoint pieces over the threads.
        // SAFETY: live, disjoint buffers of src.bytes() bytes; pieces of dst are disjoint.
        let (s, d) = unsafe {
            (
                std::slice::from_raw_parts(src.ptr as *const u8, src.bytes()),
                std::slice::from_raw_parts_mut(dst.ptr as *mut u8, src.bytes()),
            )
        };
        d.par_chunks_mut(PIECE)
            .zip(s.par_chunks(PIECE))
            .for_each(|(d, s)| d.copy_from_slice(s));
        return Ok(());
    }
    // SAFETY: both are live buffers of src.bytes() bytes; `copy` is memmove, so even an
    // (unplanned) overlap is well defined.
    unsafe { std::ptr::copy(src.ptr as *const u8, dst.ptr as *mut u8, src.bytes()) };
    Ok(())
}

pub(super) fn cast(src: Buf, dst: Buf) -> Result<()> {
    check_len("cast", "dst", dst, src.len)?;
    if src.dtype == dst.dtype {
        return copy(src, dst);
    }
    check_dtype("cast", "src", src, FLOATS)?;
    check_dtype("cast", "dst", dst, FLOATS)?;
    if overlaps(src, dst) {
        return Err(shape_err("cast", "src and dst overlap".into()));
    }
    // SAFETY: disjoint live buffers of the checked dtypes and lengths.
    unsafe {
        match src.dtype {
            DType::F32 => f32_to_bf16(view::<f32>(src), view_mut::<bf16>(dst)),
            _ => bf16_to_f32(view::<bf16>(src), view_mut::<f32>(dst)),
        }
    }
    Ok(())
}

/// out = a + b; `out` may be `a` or `b` (or both), but may not partially overlap them.
pub(super) fn add(a: Buf, b: Buf, out: Buf) -> Result<()> {
    for (n, x) in [("a", a), ("b", b), ("out", out)] {
        check_dtype("add", n, x, FLOATS)?;
    }
    if a.dtype != b.dtype || a.dtype != out.dtype {
        return Err(Error::DType {
            op: "add",
            msg: format!(
                "a is {}, b is {}, out is {}: all must match",
                a.dtype, b.dtype, out.dtype
            ),
        });
    }
    if a.len != b.len || a.len != out.len {
        return Err(shape_err(
            "add",
            format!("lengths a {} b {} out {} differ", a.len, b.len, out.len),
        ));
    }
    for (n, x) in [("a", a), ("b", b)] {
        if overlaps(x, out) && x.ptr != out.ptr {
            return Err(shape_err("add", format!("out partially overlaps {n}")));
        }
    }
    let n = out.len;
    let (pa, pb, po) = (
        SendPtr(a.ptr as *mut u8),
        SendPtr(b.ptr as *mut u8),
        SendPtr(out.ptr as *mut u8),
    );
    let is_f32 = out.dtype == DType::F32;
    // Raw pointers rather than slices: out may alias an input, and each chunk reads an element
    // before writing the same element, so the alias is harmless.
    let work = move |c: usize| {
        let lo = c * CHUNK;
        let hi = (lo + CHUNK).min(n);
        // SAFETY: indices are within the checked lengths; chunks are disjoint across tasks.
        unsafe {
            if is_f32 {
                let (a, b, o) = (
                    pa.get() as *const f32,
                    pb.get() as *const f32,
                    po.get() as *mut f32,
                );
                for i in lo..hi {
                    *o.add(i) = *a.add(i) + *b.add(i);
                }
            } else {
                let (a, b, o) = (
                    pa.get() as *const u16,
                    pb.get() as *const u16,
                    po.get() as *mut u16,
                );
                for i in lo..hi {
                    let x = f32::from_bits((*a.add(i) as u32) << 16)
                        + f32::from_bits((*b.add(i) as u32) << 16);
                    *o.add(i) = f32_to_bf16_bits(x);
                }
            }
        }
    };
    let chunks = n.div_ceil(CHUNK);
    if n >= PAR_MIN {
        (0..chunks).into_par_iter().for_each(work);
    } else {
        (0..chunks).for_each(work);
    }
    Ok(())
}

pub(super) fn scale(x: Buf, alpha: f32) -> Result<()> {
    check_dtype("scale", "x", x, FLOATS)?;
    // SAFETY: x is a live buffer of its dtype, borrowed by nothing else.
    unsafe {
        match x.dtype {
            DType::F32 => par_chunks_mut(view_mut::<f32>(x), |c| {
                c.iter_mut().for_each(|v| *v *= alpha)
            }),
            _ => par_chunks_mut(view_mut::<bf16>(x), |c| {
                c.iter_mut()
                    .for_each(|v| *v = bf16::from_bits(f32_to_bf16_bits(v.to_f32() * alpha)))
            }),
        }
    }
    Ok(())
}
