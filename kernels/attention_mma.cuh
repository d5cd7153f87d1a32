// Building blocks of kernels/attention.cu: async copies, ldmatrix / mma.sync m16n8k16 wrappers,
// the fragment-level GEMM stages and the padded tile loader. Separate from the kernels so that a
// wgmma (sm_90a) path can reuse the tile loads and swap only the matrix stages.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

namespace attn {

typedef __nv_bfloat16 bf16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- primitives ------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy; when !pred the destination is zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
    int bytes = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// c += a · b for one m16n8k16 tile (a row-major 16x16, b "col" = k-major 16x8, c 16x8 f32).
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Low half = lo (the smaller column index in every mma fragment).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// ---- fragment stages -------------------------------------------------------------------------
//
// Fragment facts (PTX ISA, mma.m16n8k16 .bf16), with g = lane / 4 and t = lane % 4:
//   A regs a0..a3: (row g, k 2t..2t+1), (row g+8, k 2t..), (row g, k 2t+8..), (row g+8, k 2t+8..)
//   B regs b0, b1: (k 2t..2t+1, col g), (k 2t+8.., col g)
//   C c0..c3:      (row g, col 2t), (row g, col 2t+1), (row g+8, col 2t), (row g+8, col 2t+1)
// ldmatrix.x4: lanes 8i..8i+7 give the row addresses of matrix i; matrix i lands in register i
// with the same (row g, cols 2t..2t+1) distribution; .trans hands out the transpose.

// A fragment of the 16x16 block at (r0, c0) of a row-major tile with pitch LD (elements).
template <int LD>
__device__ __forceinline__ void load_a(uint32_t base, int r0, int c0, int lane, uint32_t (&a)[4]) {
    int r = r0 + (lane & 15);
    int c = c0 + (lane >> 4) * 8;
    ldsm_x4(base + (r * LD + c) * 2, a[0], a[1], a[2], a[3]);
}

// B fragments for two n8 tiles where B[k][n] = T[n0 + n][k0 + k] (T row-major, rows are n):
// the "multiply by a transposed tile" case (Q·Kᵀ, dO·Vᵀ). b[0..1] for rows n0..n0+7, b[2..3]
// for rows n0+8..n0+15.
template <int LD>
__device__ __forceinline__ void load_b_nt(uint32_t base, int n0, int k0, int lane, uint32_t (&b)[4]) {
    int r = n0 + (lane >> 4) * 8 + (lane & 7);
    int c = k0 + ((lane >> 3) & 1) * 8;
    ldsm_x4(base + (r * LD + c) * 2, b[0], b[1], b[2], b[3]);
}

// B fragments for two n8 tiles where B[k][n] = T[k0 + k][n0 + n] (T row-major, rows are k):
// the "multiply by a tile as stored" case (P·V, dS·K). b[0..1] for cols n0..n0+7, b[2..3] for
// cols n0+8..n0+15.
template <int LD>
__device__ __forceinline__ void load_b_nn(uint32_t base, int k0, int n0, int lane, uint32_t (&b)[4]) {
    int r = k0 + ((lane >> 3) & 1) * 8 + (lane & 7);
    int c = n0 + (lane >> 4) * 8;
    ldsm_x4_t(base + (r * LD + c) * 2, b[0], b[1], b[2], b[3]);
}

// acc[16 x 8*NT] += A[16 x 16*KS] (rows r0.. of tile a_base) · T[n rows 0..8*NT, k cols]ᵀ
template <int LDA, int LDT, int KS, int NT>
__device__ __forceinline__ void mma_abt(uint32_t a_base, int r0, uint32_t t_base, int lane, float (&acc)[NT][4]) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        uint32_t a[4];
        load_a<LDA>(a_base, r0, kk * 16, lane, a);
#pragma unroll
        for (int nn = 0; nn < NT / 2; ++nn) {
            uint32_t b[4];
            load_b_nt<LDT>(t_base, nn * 16, kk * 16, lane, b);
            mma16816(acc[2 * nn], a, b[0], b[1]);
            mma16816(acc[2 * nn + 1], a, b[2], b[3]);
        }
    }
}

// acc[16 x 8*NT] += P[16 x 16*KS] · T[k rows 0..16*KS, n cols 0..8*NT], P given as C-layout
// fp32 registers (the register-reuse of FlashAttention-2: a C tile pair is an A fragment).
template <int LDT, int KS, int NT>
__device__ __forceinline__ void mma_pt(const float (&p)[2 * KS][4], uint32_t t_base, int lane, float (&acc)[NT][4]) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        uint32_t a[4];
        a[0] = pack_bf16(p[2 * kk][0], p[2 * kk][1]);
        a[1] = pack_bf16(p[2 * kk][2], p[2 * kk][3]);
        a[2] = pack_bf16(p[2 * kk + 1][0], p[2 * kk + 1][1]);
        a[3] = pack_bf16(p[2 * kk + 1][2], p[2 * kk + 1][3]);
#pragma unroll
        for (int nn = 0; nn < NT / 2; ++nn) {
            uint32_t b[4];
            load_b_nn<LDT>(t_base, kk * 16, nn * 16, lane, b);
            mma16816(acc[2 * nn], a, b[0], b[1]);
            mma16816(acc[2 * nn + 1], a, b[2], b[3]);
        }
    }
}

// As mma_abt with the A fragments already in registers (one per k step).
template <int LDT, int KS, int NT>
__device__ __forceinline__ void mma_abt_frag(const uint32_t (&a)[KS][4], uint32_t t_base, int lane,
                                             float (&acc)[NT][4]) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
        for (int nn = 0; nn < NT / 2; ++nn) {
            uint32_t b[4];
            load_b_nt<LDT>(t_base, nn * 16, kk * 16, lane, b);
            mma16816(acc[2 * nn], a[kk], b[0], b[1]);
            mma16816(acc[2 * nn + 1], a[kk], b[2], b[3]);
        }
    }
}

template <int NT>
__device__ __forceinline__ void zero(float (&acc)[NT][4]) {
#pragma unroll
    for (int i = 0; i < NT; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
}

// ---- tile loads ------------------------------------------------------------------------------

// ROWS x D tile from global rows (pitch `stride` elements) into shared (pitch D + 8); rows at or
// past `valid` are zero-filled so masked lanes never meet NaN/Inf garbage (0 · NaN = NaN).
template <int ROWS, int D, int NTHREADS>
__device__ __forceinline__ void load_tile(uint32_t dst, const bf16* src, int64_t stride, int valid, int tid) {
    constexpr int CH = D / 8;  // 16-byte chunks per row
    constexpr int TOTAL = ROWS * CH;
    static_assert(TOTAL % NTHREADS == 0 || TOTAL < NTHREADS, "tile chunks must spread evenly");
#pragma unroll
    for (int i0 = 0; i0 < TOTAL; i0 += NTHREADS) {
        int i = i0 + tid;
        if (TOTAL % NTHREADS == 0 || i < TOTAL) {
            int r = i / CH, c = i % CH;
            bool ok = r < valid;
            const bf16* s = ok ? src + r * stride + c * 8 : src;
            cp_async16(dst + (r * (D + 8) + c * 8) * 2, s, ok);
        }
    }
}

// MW m16 tiles per warp: every K/V fragment read from shared memory feeds MW mma instead of one,
// which is what bounds this loop (shared-memory bandwidth), at the price of MW x the registers.
template <int LDA, int LDT, int KS, int NT, int MW>
__device__ __forceinline__ void mma_abt_mw(uint32_t a_base, int r0, uint32_t t_base, int lane,
                                           float (&acc)[MW][NT][4]) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        uint32_t a[MW][4];
#pragma unroll
        for (int mi = 0; mi < MW; ++mi) load_a<LDA>(a_base, r0 + mi * 16, kk * 16, lane, a[mi]);
#pragma unroll
        for (int nn = 0; nn < NT / 2; ++nn) {
            uint32_t b[4];
            load_b_nt<LDT>(t_base, nn * 16, kk * 16, lane, b);
#pragma unroll
            for (int mi = 0; mi < MW; ++mi) {
                mma16816(acc[mi][2 * nn], a[mi], b[0], b[1]);
                mma16816(acc[mi][2 * nn + 1], a[mi], b[2], b[3]);
            }
        }
    }
}

template <int LDT, int KS, int NT, int MW>
__device__ __forceinline__ void mma_pt_mw(const float (&p)[MW][2 * KS][4], uint32_t t_base, int lane,
                                          float (&acc)[MW][NT][4]) {
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        uint32_t a[MW][4];
#pragma unroll
        for (int mi = 0; mi < MW; ++mi) {
            a[mi][0] = pack_bf16(p[mi][2 * kk][0], p[mi][2 * kk][1]);
            a[mi][1] = pack_bf16(p[mi][2 * kk][2], p[mi][2 * kk][3]);
            a[mi][2] = pack_bf16(p[mi][2 * kk + 1][0], p[mi][2 * kk + 1][1]);
            a[mi][3] = pack_bf16(p[mi][2 * kk + 1][2], p[mi][2 * kk + 1][3]);
        }
#pragma unroll
        for (int nn = 0; nn < NT / 2; ++nn) {
            uint32_t b[4];
            load_b_nn<LDT>(t_base, kk * 16, nn * 16, lane, b);
#pragma unroll
            for (int mi = 0; mi < MW; ++mi) {
                mma16816(acc[mi][2 * nn], a[mi], b[0], b[1]);
                mma16816(acc[mi][2 * nn + 1], a[mi], b[2], b[3]);
            }
        }
    }
}

}  // namespace attn
