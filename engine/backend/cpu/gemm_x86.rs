//! C[m, n] = alpha·Aᵀ·B + beta·C in f32 on AVX-512, A stored [k, m] and B stored [k, n]
//! (row-major): the weight-gradient product of a linear layer, dW = dYᵀ·X, where k is the
//! token count and both operands have it as their strided dimension.
//!
//! The `gemm` crate's micro-kernel wants one operand contiguous along k, so it repacks dY with
//! a transposing gather for every k-block, and with only m/64 row panels to reuse each packed
//! block that costs 15-25 % on the Llama shapes. Here nothing is transposed: a `MR × NR` tile of
//! C takes, per k step, `NV` vectors of B's row and `MR` broadcasts of A's row, both contiguous
//! in memory. Per k-block of `KC` rows, A's rows of the slab are copied into `MR`-wide panels
//! (streamed from L2 by the tiles) and B's rows into one `NR`-wide panel at a time (32 KiB, kept
//! in L1 while every row panel passes over it). Traffic per block: A and B read once and
//! packed once; C read and written once per k-block (`k / KC` times in all).
//!
//! Threads own disjoint slabs of C (rows or columns) and every element sums its k terms in
//! the same order, so results do not depend on the thread count.

// Register-blocked tiles index their accumulators with row / vector counters.
#![allow(clippy::needless_range_loop)]

use super::{with_scratch, SendPtr};
use std::arch::x86_64::*;

/// Rows of C per tile (broadcast from A).
const MR: usize = 6;
/// 16-lane vectors of C per tile row.
const NV: usize = 4;
/// Columns of C per tile.
const NR: usize = 16 * NV;
/// Rows of A per packed strip: eight tiles, three vectors.
const SP: usize = 8 * MR;
/// k rows per block: B's packed panel is KC·NR floats = 32 KiB.
const KC: usize = 256;

/// Whether this CPU takes the path, and the product is wide enough for 64-column tiles.
pub fn supported(m: usize, n: usize) -> bool {
    m >= MR && n >= 32 && std::arch::is_x86_feature_detected!("avx512f")
}

/// C = alpha·Aᵀ·B + beta·C with A `[k, m]`, B `[k, n]`, C `[m, n]`, all row-major and dense;
/// C is not read when beta is 0. `split` spreads slabs of C over the rayon threads.
/// Callers check [`supported`] first.
pub fn gemm_tn(
    (m, n, k): (usize, usize, usize),
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    alpha: f32,
    beta: f32,
    split: bool,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n && k > 0);
    let (pa, pb, pc) = (
        SendPtr(a.as_ptr() as *mut f32),
        SendPtr(b.as_ptr() as *mut f32),
        SendPtr(c.as_mut_ptr()),
    );
    let run = |by_rows: bool, part: std::ops::Range<usize>| {
        let (rows, cols) = if by_rows { (part, 0..n) } else { (0..m, part) };
        let op = Operands {
            a: pa.get(),
            b: pb.get(),
            c: pc.get(),
            m,
            n,
            k,
        };
        // SAFETY: the asserts above bound every index the slab reads; slabs write disjoint
        // rectangles of C; the caller checked AVX-512 through `supported`.
        unsafe { slab(&op, rows, cols, alpha, beta) }
    };
    if split {
        // Slabs of whole tiles along the longer side of C.
        super::gemm::for_each_slab((m, n, k), (MR, NR), 1, run);
    } else {
        run(true, 0..m);
    }
}

struct Operands {
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    m: usize,
    n: usize,
    k: usize,
}

/// The rectangle `rows × cols` of C over all of k.
#[target_feature(enable = "avx512f")]
unsafe fn slab(
    op: &Operands,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    alpha: f32,
    beta: f32,
) {
    // A's block in strips of SP rows, then B's block in panels of NR columns; 64-byte aligned.
    let a_len = KC * rows.len().next_multiple_of(SP);
    let b_len = KC * cols.len().next_multiple_of(NR);
    with_scratch::<f32, _>(a_len + b_len + 16, |buf| {
        let skip = buf.as_ptr().align_offset(64).min(16);
        let (ap, bp) = buf[skip..].split_at_mut(a_len);
        let mut k0 = 0;
        while k0 < op.k {
            let kc = KC.min(op.k - k0);
            pack_a(op, rows.clone(), k0, kc, ap);
            for (j, j0) in cols.clone().step_by(NR).enumerate() {
                pack_b(
                    op,
                    j0,
                    NR.min(cols.end - j0),
                    k0,
                    kc,
                    &mut bp[j * KC * NR..],
                );
            }
            // beta applies once, on the first block; later blocks accumulate.
            let beta = if k0 == 0 { beta } else { 1.0 };
            for i0 in rows.clone().step_by(MR) {
                let i = i0 - rows.start;
                let a = ap.as_ptr().add(i / SP * KC * SP + i % SP);
                let mr = MR.min(rows.end - i0);
                for (j, j0) in cols.clone().step_by(NR).enumerate() {
                    let dst = CTile {
                        c: op.c.add(i0 * op.n + j0),
                        ldc: op.n,
                        mr,
                        nc: NR.min(cols.end - j0),
                    };
                    let b = bp.as_ptr().add(j * KC * NR);
                    tile(kc, a, b, dst, alpha, beta);
                }
            }
            k0 += kc;
        }
    });
}

/// ap[s][t][r] = A[k0 + t, rows.start + s·SP + r] (strips of SP rows, each KC·SP floats; rows
/// past the slab zero, so the last tile may read whole `MR` rows).
#[inline(always)]
unsafe fn pack_a(
    op: &Operands,
    rows: std::ops::Range<usize>,
    k0: usize,
    kc: usize,
    ap: &mut [f32],
) {
    let len = rows.len();
    for t in 0..kc {
        let src = op.a.add((k0 + t) * op.m + rows.start);
        for c in (0..len.next_multiple_of(SP)).step_by(16) {
            let x = if c + 16 <= len {
                _mm512_loadu_ps(src.add(c))
            } else if c < len {
                _mm512_maskz_loadu_ps((1u16 << (len - c)) - 1, src.add(c))
            } else {
                _mm512_setzero_ps()
            };
            _mm512_store_ps(ap.as_mut_ptr().add(c / SP * KC * SP + t * SP + c % SP), x);
        }
    }
}

/// bp[t][c] = B[k0 + t, j0 + c] for c < nc, zero beyond.
#[inline(always)]
unsafe fn pack_b(op: &Operands, j0: usize, nc: usize, k0: usize, kc: usize, bp: &mut [f32]) {
    let tail = if nc.is_multiple_of(16) {
        0xffff
    } else {
        (1u16 << (nc % 16)) - 1
    };
    for t in 0..kc {
        let src = op.b.add((k0 + t) * op.n + j0);
        let dst = bp.as_mut_ptr().add(t * NR);
        for v in 0..NV {
            let c = 16 * v;
            let x = if c + 16 <= nc {
                _mm512_loadu_ps(src.add(c))
            } else if c < nc {
                _mm512_maskz_loadu_ps(tail, src.add(c))
            } else {
                _mm512_setzero_ps()
            };
            _mm512_store_ps(dst.add(c), x);
        }
    }
}

/// The part of C one tile writes: `mr` rows (at most `MR`) of `nc` columns (at most `NR`) from
/// `c`, rows `ldc` apart.
#[derive(Clone, Copy)]
struct CTile {
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nc: usize,
}

/// C[r, c] = alpha·Σ_t A[t, r]·bp[t][c] + beta·C[r, c] for r < mr, c < nc of `dst`, with A's
/// rows `SP` apart; C is not read when beta is 0.
#[inline(always)]
unsafe fn tile(kc: usize, a: *const f32, bp: *const f32, dst: CTile, alpha: f32, beta: f32) {
    let CTile { c, ldc, mr, nc } = dst;
    // C's lines are only needed after the k loop: ask for them (for writing) now.
    for r in 0..mr {
        for v in 0..NV.min(nc.div_ceil(16)) {
            _mm_prefetch::<_MM_HINT_ET0>(c.add(r * ldc + 16 * v) as *const i8);
        }
    }
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for t in 0..kc {
        let bv: [__m512; NV] = std::array::from_fn(|v| _mm512_load_ps(bp.add(t * NR + 16 * v)));
        let at = a.add(t * SP);
        for r in 0..MR {
            let a = _mm512_set1_ps(*at.add(r));
            for v in 0..NV {
                acc[r][v] = _mm512_fmadd_ps(a, bv[v], acc[r][v]);
            }
        }
    }
    let (al, be) = (_mm512_set1_ps(alpha), _mm512_set1_ps(beta));
    for r in 0..mr {
        for v in 0..NV {
            let col = 16 * v;
            if col >= nc {
                break;
            }
            let mask: __mmask16 = if nc - col >= 16 {
                0xffff
            } else {
                (1u16 << (nc - col)) - 1
            };
            let p = c.add(r * ldc + col);
            let x = _mm512_mul_ps(acc[r][v], al);
            let out = if beta == 0.0 {
                x
            } else {
                _mm512_fmadd_ps(be, _mm512_maskz_loadu_ps(mask, p), x)
            };
            _mm512_mask_storeu_ps(p, mask, out);
        }
    }
}
