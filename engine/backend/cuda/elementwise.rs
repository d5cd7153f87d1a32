//! fill / copy / copy_2d / cast / add / scale (kernels/elementwise.cu, kernels/copy.cu,
//! kernels/cast.cu).

use super::{check_dtype, check_len, check_same, overlaps, sfx, Arg, CudaBackend, FLOATS};
use crate::backend::{Buf, Copy2d};
use crate::error::{Error, Result};
use crate::tensor::DType;

const BLOCK: u32 = 256;

impl CudaBackend {
    /// Threads needed for a flat op on `n` elements moving 16-byte vectors.
    fn flat_grid(&self, n: usize, dtype: DType) -> u32 {
        self.grid_for(n.div_ceil(16 / dtype.size()), BLOCK)
    }

    pub(crate) fn fill_impl(&self, dst: Buf, value: f32) -> Result<()> {
        check_dtype("fill", "dst", dst, &[DType::F32, DType::BF16, DType::I32])?;
        if dst.len == 0 {
            return Ok(());
        }
        let n = Arg::I64(dst.len as i64);
        let (name, v) = match dst.dtype {
            DType::F32 => ("fill_f32", Arg::F32(value)),
            DType::BF16 => ("fill_bf16", Arg::F32(value)),
            // Rust's `as`: saturating, NaN -> 0 (the CPU twin does the same).
            DType::I32 => ("fill_i32", Arg::I32(value as i32)),
        };
        self.launch(
            name,
            (self.flat_grid(dst.len, dst.dtype), 1, 1),
            BLOCK,
            0,
            &[Arg::P(dst.ptr), n, v],
        )
    }

    pub(crate) fn copy_impl(&self, src: Buf, dst: Buf) -> Result<()> {
        check_dtype("copy", "src", src, &[DType::F32, DType::BF16, DType::I32])?;
        check_same("copy", ("src", "dst"), src, dst)?;
        self.memcpy_dtod(src.ptr, dst.ptr, src.bytes())
    }

    pub(crate) fn copy_2d_impl(&self, a: &Copy2d) -> Result<()> {
        const OP: &str = "copy_2d";
        let Copy2d {
            src,
            dst,
            rows,
            cols,
            src_stride,
            dst_stride,
        } = *a;
        let dtypes = [DType::F32, DType::BF16, DType::I32];
        check_dtype(OP, "src", src, &dtypes)?;
        check_dtype(OP, "dst", dst, &dtypes)?;
        if src.dtype != dst.dtype {
            return Err(Error::Shape {
                op: OP,
                msg: format!("src {} vs dst {}", src.dtype, dst.dtype),
            });
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
            return Err(Error::Shape {
                op: OP,
                msg: format!(
                    "{rows} x {cols} block with strides {src_stride} / {dst_stride} does not fit \
                     src {} / dst {} elements",
                    src.len, dst.len
                ),
            });
        }
        if overlaps(src, dst) {
            return Err(Error::Shape {
                op: OP,
                msg: "dst overlaps src".into(),
            });
        }
        // Counted in units: 16-byte vectors when every row start is 16-byte aligned, else elements.
        let es = src.dtype.size();
        let wide = [src.ptr as usize, dst.ptr as usize, cols * es]
            .into_iter()
            .chain([src_stride * es, dst_stride * es])
            .all(|b| b.is_multiple_of(16));
        let (unit, name) = match (wide, es) {
            (true, _) => (16, "copy_2d_16b"),
            (false, 2) => (2, "copy_2d_2b"),
            (false, _) => (4, "copy_2d_4b"),
        };
        let k = unit / es; // elements per unit
        let (ucols, ss, ds) = (cols / k, src_stride / k, dst_stride / k);
        // y strides over rows (at most 65535 blocks); x covers a row, fewer blocks per row when
        // there are many rows so the grid stays a few blocks per SM.
        let gy = rows.min(65535);
        let budget = (self.sm_count as usize * 128 / gy).max(1);
        let gx = ucols.div_ceil(BLOCK as usize).min(budget).max(1);
        let args = [
            Arg::P(src.ptr),
            Arg::P(dst.ptr),
            Arg::I64(rows as i64),
            Arg::I64(ucols as i64),
            Arg::I64(ss as i64),
            Arg::I64(ds as i64),
        ];
        self.launch(name, (gx as u32, gy as u32, 1), BLOCK, 0, &args)
    }

    pub(crate) fn cast_impl(&self, src: Buf, dst: Buf) -> Result<()> {
        check_dtype("cast", "src", src, FLOATS)?;
        check_dtype("cast", "dst", dst, FLOATS)?;
        check_len("cast", "dst", dst, src.len)?;
        if src.len == 0 {
            return Ok(());
        }
        let name = match (src.dtype, dst.dtype) {
            (a, b) if a == b => return self.memcpy_dtod(src.ptr, dst.ptr, src.bytes()),
            (DType::F32, DType::BF16) => "cast_f32_bf16",
            (DType::BF16, DType::F32) => "cast_bf16_f32",
            (a, b) => {
                return Err(Error::DType {
                    op: "cast",
                    msg: format!("{a} -> {b} is not supported"),
                })
            }
        };
        let grid = self.grid_for(src.len.div_ceil(8), BLOCK);
        self.launch(
            name,
            (grid, 1, 1),
            BLOCK,
            0,
            &[Arg::P(src.ptr), Arg::P(dst.ptr), Arg::I64(src.len as i64)],
        )
    }

    pub(crate) fn add_impl(&self, a: Buf, b: Buf, out: Buf) -> Result<()> {
        check_dtype("add", "a", a, FLOATS)?;
        check_same("add", ("a", "b"), a, b)?;
        check_same("add", ("a", "out"), a, out)?;
        if a.len == 0 {
            return Ok(());
        }
        let name = format!("add_{}", sfx(a.dtype));
        let args = [
            Arg::P(a.ptr),
            Arg::P(b.ptr),
            Arg::P(out.ptr),
            Arg::I64(a.len as i64),
        ];
        self.launch(
            &name,
            (self.flat_grid(a.len, a.dtype), 1, 1),
            BLOCK,
            0,
            &args,
        )
    }

    pub(crate) fn scale_impl(&self, x: Buf, alpha: f32) -> Result<()> {
        check_dtype("scale", "x", x, FLOATS)?;
        if x.len == 0 {
            return Ok(());
        }
        let name = format!("scale_{}", sfx(x.dtype));
        let args = [Arg::P(x.ptr), Arg::I64(x.len as i64), Arg::F32(alpha)];
        self.launch(
            &name,
            (self.flat_grid(x.len, x.dtype), 1, 1),
            BLOCK,
            0,
            &args,
        )
    }
}
