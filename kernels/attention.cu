// Causal grouped-query flash attention, forward and backward, bf16 in/out, fp32 accumulation.
//
// Layout: q/out/dq [batch, seq, n_heads, D], k/v/dk/dv [batch, seq, n_kv_heads, D] (bf16),
// lse [batch, n_heads, seq] f32 in natural log of the scaled scores. Query head h reads kv head
// h / (n_heads / n_kv_heads).
//
// Tensor cores through mma.sync m16n8k16 (sm_80+). Every warp owns 16-row slices of the tile it
// produces, so row statistics (max, sum, lse, delta) stay inside one quad of lanes. Shared tiles
// are row-major with 8 bf16 of padding per row: a row pitch of 2*D+16 bytes puts the 8 row
// addresses of every ldmatrix phase on distinct 16-byte bank groups for D in {16, 32, 64, 128}.
// Stages are separate device functions (tile load, Q·Kᵀ, softmax, P·V) so a wgmma path for
// sm_90a can replace the matrix stages without touching the rest.
//
// Backward is deterministic without atomics: one kernel per kv tile accumulates dK, dV over all
// query tiles of all query heads of its group in a fixed order; a second kernel per query tile
// accumulates dQ over key tiles. delta = rowsum(dO ∘ O) comes from a small pre-kernel.

#include "attention_mma.cuh"

namespace attn {

// ---- forward ---------------------------------------------------------------------------------

template <int D, int NW, int MW, int BN>
struct Fwd {
    static constexpr int BM = 16 * MW * NW;  // query rows per CTA, 16 * MW per warp
    static constexpr int LD = D + 8;
    static constexpr int NTHREADS = 32 * NW;
    static constexpr int SMEM = (BM + 4 * BN) * LD * 2;  // Q + double-buffered K and V
};

// Online softmax of one m16 x BN score tile (in place: scores -> probabilities), rescaling the
// running max m_r, partial sums l_r and the output accumulator of the tile's two rows per lane.
template <int BN, int D>
__device__ __forceinline__ void softmax_tile(float (&s)[BN / 8][4], float (&acc)[D / 8][4], float (&m_r)[2],
                                             float (&l_r)[2], float sl2, bool diag, int kbase, int row_g,
                                             int t) {
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            s[nt][e] *= sl2;  // log2 units; scaling before the max keeps any sign of scale right
            if (diag) {
                const int key = kbase + nt * 8 + 2 * t + (e & 1);
                const int row = row_g + (e >> 1) * 8;
                if (key > row) s[nt][e] = -INFINITY;
            }
            mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
        }
    }
    float corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        // A row whose keys are all masked here keeps its max. No row is masked on tile 0 (key 0
        // is visible to every row), so m_new is finite from the first tile on.
        const float m_new = fmaxf(m_r[r], mx[r]);
        corr[r] = exp2f(m_r[r] - m_new);  // exp2(-inf) = 0 on the first tile
        m_r[r] = m_new;
        l_r[r] *= corr[r];
    }
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float p = exp2f(s[nt][e] - m_r[e >> 1]);
            s[nt][e] = p;
            l_r[e >> 1] += p;
        }
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
        acc[dt][0] *= corr[0];
        acc[dt][1] *= corr[0];
        acc[dt][2] *= corr[1];
        acc[dt][3] *= corr[1];
    }
}

// Grid: (query tiles, n_heads, batch); query tiles run last-first so the long ones start early.
template <int D, int NW, int MW, int BN>
__device__ __forceinline__ void fwd_body(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                         const bf16* __restrict__ v, bf16* __restrict__ out,
                                         float* __restrict__ lse, int seq, int nh, int nkv, float scale) {
    using C = Fwd<D, NW, MW, BN>;
    constexpr int BM = C::BM, LD = C::LD;
    extern __shared__ __align__(16) unsigned char smem[];
    const uint32_t sQ = smem_addr(smem);
    const uint32_t sK = sQ + BM * LD * 2;
    const uint32_t sV = sK + 2 * BN * LD * 2;
    constexpr uint32_t KV_STAGE = BN * LD * 2;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int m_blk = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (nh / nkv);
    const int q0 = m_blk * BM;
    const int64_t q_rs = (int64_t)nh * D, kv_rs = (int64_t)nkv * D;
    const bf16* qb = q + (int64_t)b * seq * q_rs + (int64_t)h * D;
    const bf16* kb = k + (int64_t)b * seq * kv_rs + (int64_t)hk * D;
    const bf16* vb = v + (int64_t)b * seq * kv_rs + (int64_t)hk * D;
    const float sl2 = scale * kLog2e;

    const int kv_end = min(seq, q0 + BM);
    const int n_tiles = (kv_end + BN - 1) / BN;

    load_tile<BM, D, C::NTHREADS>(sQ, qb + (int64_t)q0 * q_rs, q_rs, seq - q0, tid);
    load_tile<BN, D, C::NTHREADS>(sK, kb, kv_rs, seq, tid);
    load_tile<BN, D, C::NTHREADS>(sV, vb, kv_rs, seq, tid);
    cp_async_commit();

    float acc[MW][D / 8][4];
    float m_r[MW][2], l_r[MW][2];  // running max (log2 units) and this lane's partial row sums
#pragma unroll
    for (int mi = 0; mi < MW; ++mi) {
        zero(acc[mi]);
        m_r[mi][0] = m_r[mi][1] = -INFINITY;
        l_r[mi][0] = l_r[mi][1] = 0.f;
    }
    const int row0 = warp * 16 * MW;  // warp's first row within the tile
    const int w_first = q0 + row0, w_last = w_first + 16 * MW - 1;

    for (int j = 0; j < n_tiles; ++j) {
        if (j + 1 < n_tiles) {
            // Buffer (j+1)&1 was last read in iteration j-1, which ended with a barrier.
            const int k1 = (j + 1) * BN;
            const uint32_t st = ((j + 1) & 1) * KV_STAGE;
            load_tile<BN, D, C::NTHREADS>(sK + st, kb + (int64_t)k1 * kv_rs, kv_rs, seq - k1, tid);
            load_tile<BN, D, C::NTHREADS>(sV + st, vb + (int64_t)k1 * kv_rs, kv_rs, seq - k1, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        const int kbase = j * BN;
        // Warps whose rows all precede this tile's first key have nothing to add.
        if (kbase <= w_last) {
            const uint32_t st = (j & 1) * KV_STAGE;
            float s[MW][BN / 8][4];
#pragma unroll
            for (int mi = 0; mi < MW; ++mi) zero(s[mi]);
            mma_abt_mw<LD, LD, D / 16, BN / 8, MW>(sQ, row0, sK + st, lane, s);
#pragma unroll
            for (int mi = 0; mi < MW; ++mi) {
                const int first = w_first + mi * 16;
                softmax_tile<BN, D>(s[mi], acc[mi], m_r[mi], l_r[mi], sl2, kbase + BN - 1 > first, kbase,
                                    first + g, t);
            }
            mma_pt_mw<LD, BN / 16, D / 8, MW>(s, sV + st, lane, acc);
        }
        __syncthreads();
    }

#pragma unroll
    for (int mi = 0; mi < MW; ++mi) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = l_r[mi][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const int row = w_first + mi * 16 + g + r * 8;
            if (row < seq) {
                const float inv = 1.f / l;
                bf16* o = out + ((int64_t)b * seq + row) * q_rs + (int64_t)h * D;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    *reinterpret_cast<uint32_t*>(o + dt * 8 + 2 * t) =
                        pack_bf16(acc[mi][dt][2 * r] * inv, acc[mi][dt][2 * r + 1] * inv);
                }
                if (t == 0) lse[((int64_t)b * nh + h) * seq + row] = (m_r[mi][r] + log2f(l)) * kLn2;
            }
        }
    }
}

// ---- backward: delta = rowsum(dO ∘ O) ----------------------------------------------------------

// One group of D/8 lanes per (token, head) row, each lane one 16-byte chunk. delta [b, h, seq].
template <int D>
__device__ __forceinline__ void delta_body(const bf16* __restrict__ out, const bf16* __restrict__ dout,
                                           float* __restrict__ delta, int64_t rows, int seq, int nh) {
    constexpr int CH = D / 8;
    const int64_t gid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t row = gid / CH;
    const int c = (int)(gid % CH);
    float acc = 0.f;
    if (row < rows) {
        const uint4 ov = *reinterpret_cast<const uint4*>(out + row * D + c * 8);
        const uint4 dv = *reinterpret_cast<const uint4*>(dout + row * D + c * 8);
        const __nv_bfloat162* o2 = reinterpret_cast<const __nv_bfloat162*>(&ov);
        const __nv_bfloat162* d2 = reinterpret_cast<const __nv_bfloat162*>(&dv);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float2 of = __bfloat1622float2(o2[i]);
            float2 df = __bfloat1622float2(d2[i]);
            acc = fmaf(of.x, df.x, acc);
            acc = fmaf(of.y, df.y, acc);
        }
    }
    // Groups are aligned runs of CH lanes (CH divides 32), so xor-shuffles stay inside a group.
#pragma unroll
    for (int off = CH / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (row < rows && c == 0) {
        const int64_t hh = row % nh;
        const int64_t tok = row / nh;  // b * seq + i
        const int64_t bb = tok / seq, i = tok % seq;
        delta[(bb * nh + hh) * seq + i] = acc;
    }
}

// ---- backward: dK, dV ------------------------------------------------------------------------

template <int D, int NW, int BMQ>
struct Dkv {
    static constexpr int BN = 16 * NW;  // keys per CTA, 16 per warp
    static constexpr int LD = D + 8;
    static constexpr int NTHREADS = 32 * NW;
    // K, V once; Q, dO double-buffered; lse (log2 units) and delta double-buffered.
    static constexpr int SMEM = (2 * BN + 4 * BMQ) * LD * 2 + 2 * 2 * BMQ * 4;
};

// Grid: (kv tiles, n_kv_heads, batch). Tile n sees query tiles from the diagonal to the end, for
// each of the G query heads of its group in order; low n carries the most work and starts first.
template <int D, int NW, int BMQ>
__device__ __forceinline__ void dkv_body(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                         const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                         const float* __restrict__ lse, const float* __restrict__ delta,
                                         bf16* __restrict__ dk, bf16* __restrict__ dv, int seq, int nh, int nkv,
                                         float scale) {
    using C = Dkv<D, NW, BMQ>;
    constexpr int BN = C::BN, LD = C::LD, NTH = C::NTHREADS;
    extern __shared__ __align__(16) unsigned char smem[];
    const uint32_t sK = smem_addr(smem);
    const uint32_t sV = sK + BN * LD * 2;
    const uint32_t sQ = sV + BN * LD * 2;           // 2 stages
    const uint32_t sO = sQ + 2 * BMQ * LD * 2;      // dO, 2 stages
    constexpr uint32_t QSTAGE = BMQ * LD * 2;
    float* sL = reinterpret_cast<float*>(smem + (2 * BN + 4 * BMQ) * LD * 2);  // [2][BMQ]
    float* sD = sL + 2 * BMQ;                                                  // [2][BMQ]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int n_blk = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
    const int grp = nh / nkv;
    const int k0 = n_blk * BN;
    const int64_t q_rs = (int64_t)nh * D, kv_rs = (int64_t)nkv * D;
    const int64_t kv_off = (int64_t)b * seq * kv_rs + (int64_t)hk * D;
    const float sl2 = scale * kLog2e;

    const int m_first = k0 / BMQ;
    const int m_count = (seq + BMQ - 1) / BMQ - m_first;
    const int iters = grp * m_count;

    // Loads query tile `it` (head-major order) into stage `st`. Rows past seq get lse = +inf,
    // delta = 0 so their P and dS are exactly zero (their Q, dO are zero-filled as well).
    auto load_q = [&](int it, int st) {
        const int h = hk * grp + it / m_count;
        const int qs = (m_first + it % m_count) * BMQ;
        const int64_t off = ((int64_t)b * seq + qs) * q_rs + (int64_t)h * D;
        load_tile<BMQ, D, NTH>(sQ + st * QSTAGE, q + off, q_rs, seq - qs, tid);
        load_tile<BMQ, D, NTH>(sO + st * QSTAGE, dout + off, q_rs, seq - qs, tid);
        const int64_t loff = ((int64_t)b * nh + h) * seq;
        for (int i = tid; i < BMQ; i += NTH) {
            const int row = qs + i;
            sL[st * BMQ + i] = row < seq ? lse[loff + row] * kLog2e : INFINITY;
            sD[st * BMQ + i] = row < seq ? delta[loff + row] : 0.f;
        }
    };

    load_tile<BN, D, NTH>(sK, k + kv_off + (int64_t)k0 * kv_rs, kv_rs, seq - k0, tid);
    load_tile<BN, D, NTH>(sV, v + kv_off + (int64_t)k0 * kv_rs, kv_rs, seq - k0, tid);
    load_q(0, 0);
    cp_async_commit();

    float dka[D / 8][4], dva[D / 8][4];
    zero(dka);
    zero(dva);
    const int row0 = warp * 16;             // warp's first key within the tile
    const int w_first = k0 + row0, w_last = w_first + 15;

    for (int it = 0; it < iters; ++it) {
        if (it + 1 < iters) {
            // Stage (it+1)&1 (smem tiles and the plain-stored sL/sD) was last read in iteration
            // it-1, which ended with a barrier.
            load_q(it + 1, (it + 1) & 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        const int st = it & 1;
        const int qs = (m_first + it % m_count) * BMQ;
        // Keys after the tile's last query see none of it.
        if (w_first <= qs + BMQ - 1) {
            const float* lrow = sL + st * BMQ;
            const float* drow = sD + st * BMQ;
            const bool need_mask = (qs < w_last) || (qs + BMQ > seq);

            // Sᵀ = K Qᵀ (keys x queries), then Pᵀ = exp(Sᵀ·scale − lse).
            float pt[BMQ / 8][4];
            zero(pt);
            mma_abt<LD, LD, D / 16, BMQ / 8>(sK, row0, sQ + st * QSTAGE, lane, pt);
#pragma unroll
            for (int nt = 0; nt < BMQ / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = nt * 8 + 2 * t + (e & 1);
                    float p = exp2f(fmaf(pt[nt][e], sl2, -lrow[qi]));
                    if (need_mask) {
                        const int key = w_first + g + (e >> 1) * 8;
                        if (key > qs + qi || qs + qi >= seq) p = 0.f;
                    }
                    pt[nt][e] = p;
                }
            }
            // dV += Pᵀ dO
            mma_pt<LD, BMQ / 16, D / 8>(pt, sO + st * QSTAGE, lane, dva);
            // dPᵀ = V dOᵀ; dSᵀ = Pᵀ ∘ (dPᵀ − delta)
            float ds[BMQ / 8][4];
            zero(ds);
            mma_abt<LD, LD, D / 16, BMQ / 8>(sV, row0, sO + st * QSTAGE, lane, ds);
#pragma unroll
            for (int nt = 0; nt < BMQ / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = nt * 8 + 2 * t + (e & 1);
                    ds[nt][e] = pt[nt][e] * (ds[nt][e] - drow[qi]);
                }
            }
            // dK += dSᵀ Q (scale applied once at the end)
            mma_pt<LD, BMQ / 16, D / 8>(ds, sQ + st * QSTAGE, lane, dka);
        }
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = w_first + g + r * 8;
        if (key < seq) {
            const int64_t off = kv_off + (int64_t)key * kv_rs;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                *reinterpret_cast<uint32_t*>(dk + off + dt * 8 + 2 * t) =
                    pack_bf16(dka[dt][2 * r] * scale, dka[dt][2 * r + 1] * scale);
                *reinterpret_cast<uint32_t*>(dv + off + dt * 8 + 2 * t) =
                    pack_bf16(dva[dt][2 * r], dva[dt][2 * r + 1]);
            }
        }
    }
}

// ---- backward: dQ ----------------------------------------------------------------------------

template <int D, int NW, int BN>
struct Dq {
    static constexpr int BM = 16 * NW;
    static constexpr int LD = D + 8;
    static constexpr int NTHREADS = 32 * NW;
    static constexpr int SMEM = (2 * BM + 4 * BN) * LD * 2;  // Q, dO once; K, V double-buffered
};

// Grid: (query tiles, n_heads, batch), last-first like the forward.
// QREG keeps the warp's Q and dO A fragments in registers for the whole key loop (they never
// change), cutting a quarter of the shared-memory reads that bound this kernel.
template <int D, int NW, int BN, bool QREG>
__device__ __forceinline__ void dq_body(const bf16* __restrict__ q, const bf16* __restrict__ k,
                                        const bf16* __restrict__ v, const bf16* __restrict__ dout,
                                        const float* __restrict__ lse, const float* __restrict__ delta,
                                        bf16* __restrict__ dq, int seq, int nh, int nkv, float scale) {
    using C = Dq<D, NW, BN>;
    constexpr int BM = C::BM, LD = C::LD, NTH = C::NTHREADS;
    extern __shared__ __align__(16) unsigned char smem[];
    const uint32_t sQ = smem_addr(smem);
    const uint32_t sO = sQ + BM * LD * 2;
    const uint32_t sK = sO + BM * LD * 2;
    const uint32_t sV = sK + 2 * BN * LD * 2;
    constexpr uint32_t KV_STAGE = BN * LD * 2;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int m_blk = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z;
    const int hk = h / (nh / nkv);
    const int q0 = m_blk * BM;
    const int64_t q_rs = (int64_t)nh * D, kv_rs = (int64_t)nkv * D;
    const int64_t q_off = ((int64_t)b * seq + q0) * q_rs + (int64_t)h * D;
    const bf16* kb = k + (int64_t)b * seq * kv_rs + (int64_t)hk * D;
    const bf16* vb = v + (int64_t)b * seq * kv_rs + (int64_t)hk * D;
    const float sl2 = scale * kLog2e;

    const int kv_end = min(seq, q0 + BM);
    const int n_tiles = (kv_end + BN - 1) / BN;

    load_tile<BM, D, NTH>(sQ, q + q_off, q_rs, seq - q0, tid);
    load_tile<BM, D, NTH>(sO, dout + q_off, q_rs, seq - q0, tid);
    load_tile<BN, D, NTH>(sK, kb, kv_rs, seq, tid);
    load_tile<BN, D, NTH>(sV, vb, kv_rs, seq, tid);
    cp_async_commit();

    const int row0 = warp * 16;
    const int w_first = q0 + row0, w_last = w_first + 15;
    float lr[2], dr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = w_first + g + r * 8;
        const int64_t li = ((int64_t)b * nh + h) * seq + row;
        lr[r] = row < seq ? lse[li] * kLog2e : INFINITY;  // P = 0 on rows past the end
        dr[r] = row < seq ? delta[li] : 0.f;
    }

    float acc[D / 8][4];
    zero(acc);
    uint32_t qf[QREG ? D / 16 : 1][4], of[QREG ? D / 16 : 1][4];
    if constexpr (QREG) {
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            load_a<LD>(sQ, row0, kk * 16, lane, qf[kk]);
            load_a<LD>(sO, row0, kk * 16, lane, of[kk]);
        }
    }

    for (int j = 0; j < n_tiles; ++j) {
        if (j + 1 < n_tiles) {
            const int k1 = (j + 1) * BN;
            const uint32_t st = ((j + 1) & 1) * KV_STAGE;
            load_tile<BN, D, NTH>(sK + st, kb + (int64_t)k1 * kv_rs, kv_rs, seq - k1, tid);
            load_tile<BN, D, NTH>(sV + st, vb + (int64_t)k1 * kv_rs, kv_rs, seq - k1, tid);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        const int kbase = j * BN;
        if (kbase <= w_last) {
            const uint32_t st = (j & 1) * KV_STAGE;
            float p[BN / 8][4];
            zero(p);
            if constexpr (QREG) {
                mma_abt_frag<LD, D / 16, BN / 8>(qf, sK + st, lane, p);
            } else {
                mma_abt<LD, LD, D / 16, BN / 8>(sQ, row0, sK + st, lane, p);
            }
            const bool diag = kbase + BN - 1 > w_first;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    float pv = exp2f(fmaf(p[nt][e], sl2, -lr[e >> 1]));
                    if (diag) {
                        const int key = kbase + nt * 8 + 2 * t + (e & 1);
                        const int row = w_first + g + (e >> 1) * 8;
                        if (key > row) pv = 0.f;
                    }
                    p[nt][e] = pv;
                }
            }
            // dP = dO Vᵀ; dS = P ∘ (dP − delta)
            float ds[BN / 8][4];
            zero(ds);
            if constexpr (QREG) {
                mma_abt_frag<LD, D / 16, BN / 8>(of, sV + st, lane, ds);
            } else {
                mma_abt<LD, LD, D / 16, BN / 8>(sO, row0, sV + st, lane, ds);
            }
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) ds[nt][e] = p[nt][e] * (ds[nt][e] - dr[e >> 1]);
            }
            // dQ += dS K
            mma_pt<LD, BN / 16, D / 8>(ds, sK + st, lane, acc);
        }
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = w_first + g + r * 8;
        if (row < seq) {
            bf16* o = dq + ((int64_t)b * seq + row) * q_rs + (int64_t)h * D;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                *reinterpret_cast<uint32_t*>(o + dt * 8 + 2 * t) =
                    pack_bf16(acc[dt][2 * r] * scale, acc[dt][2 * r + 1] * scale);
            }
        }
    }
}

}  // namespace attn

// ---- entry points ------------------------------------------------------------------------------
// Launch shapes (must match engine/backend/cuda/attention.rs):
//   attn_fwd_d{D}_bf16:       block 32*FWD_NW, grid (ceil(seq/(16*FWD_NW*FWD_MW)), n_heads, batch)
//   attn_bwd_dkv_d{D}_bf16:   block 32*DKV_NW, grid (ceil(seq/(16*DKV_NW)), n_kv_heads, batch)
//   attn_bwd_dq_d{D}_bf16:    block 32*DQ_NW,  grid (ceil(seq/(16*DQ_NW)), n_heads, batch)
//   attn_bwd_delta_d{D}_bf16: block 256, grid ceil(rows * D/8 / 256), rows = batch*seq*n_heads
// Dynamic shared memory sizes are the SMEM constants above; the host mirrors them.

#define ATTN_ENTRY(D, FWD_NW, FWD_MW, FWD_BN, DKV_NW, DKV_BMQ, DQ_NW, DQ_BN)                            \
    extern "C" __global__ void __launch_bounds__(32 * FWD_NW, 1)                                        \
        attn_fwd_d##D##_bf16(const attn::bf16* q, const attn::bf16* k, const attn::bf16* v,             \
                             attn::bf16* out, float* lse, int seq, int nh, int nkv, float scale) {      \
        attn::fwd_body<D, FWD_NW, FWD_MW, FWD_BN>(q, k, v, out, lse, seq, nh, nkv, scale);              \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                                   \
        attn_bwd_delta_d##D##_bf16(const attn::bf16* out, const attn::bf16* dout, float* delta,         \
                                   long long rows, int seq, int nh) {                                   \
        attn::delta_body<D>(out, dout, delta, rows, seq, nh);                                           \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * DKV_NW) attn_bwd_dkv_d##D##_bf16(                 \
        const attn::bf16* q, const attn::bf16* k, const attn::bf16* v, const attn::bf16* dout,          \
        const float* lse, const float* delta, attn::bf16* dk, attn::bf16* dv, int seq, int nh, int nkv, \
        float scale) {                                                                                  \
        attn::dkv_body<D, DKV_NW, DKV_BMQ>(q, k, v, dout, lse, delta, dk, dv, seq, nh, nkv, scale);     \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * DQ_NW) attn_bwd_dq_d##D##_bf16(                   \
        const attn::bf16* q, const attn::bf16* k, const attn::bf16* v, const attn::bf16* dout,          \
        const float* lse, const float* delta, attn::bf16* dq, int seq, int nh, int nkv, float scale) {  \
        attn::dq_body<D, DQ_NW, DQ_BN, true>(q, k, v, dout, lse, delta, dq, seq, nh, nkv, scale);             \
    }

// D, fwd warps, fwd m16 tiles per warp, fwd key tile, dkv warps, dkv query tile, dq warps, dq key tile
ATTN_ENTRY(16, 4, 1, 64, 4, 64, 4, 64)
ATTN_ENTRY(32, 4, 1, 64, 4, 64, 4, 32)
// Measured on an H100 (b4 s4096 causal): d128 fwd 8x1x64 212 TFLOP/s vs 4x2x32 244; d64 fwd
// 8x1x64 174 vs 4x2x64 224; dQ with Q/dO fragments in registers 1.44 ms vs 1.60 from shared;
// 8-warp dK/dV and dQ variants were slower (docs/attention-notes.md).
ATTN_ENTRY(64, 4, 2, 64, 4, 64, 4, 64)
ATTN_ENTRY(128, 4, 2, 32, 4, 32, 4, 32)

#ifdef ATTN_TUNING
// Alternative shapes, built only for scripts/attn_gpu_check.py (nvcc -DATTN_TUNING) to time them
// side by side with the production table above.
#define ATTN_FWD_VARIANT(TAG, D, NW, MW, BN)                                                            \
    extern "C" __global__ void __launch_bounds__(32 * NW)                                               \
        attn_fwd_d##D##_##TAG(const attn::bf16* q, const attn::bf16* k, const attn::bf16* v,            \
                              attn::bf16* out, float* lse, int seq, int nh, int nkv, float scale) {     \
        attn::fwd_body<D, NW, MW, BN>(q, k, v, out, lse, seq, nh, nkv, scale);                          \
    }
#define ATTN_DKV_VARIANT(TAG, D, NW, BMQ)                                                               \
    extern "C" __global__ void __launch_bounds__(32 * NW) attn_bwd_dkv_d##D##_##TAG(                    \
        const attn::bf16* q, const attn::bf16* k, const attn::bf16* v, const attn::bf16* dout,          \
        const float* lse, const float* delta, attn::bf16* dk, attn::bf16* dv, int seq, int nh, int nkv, \
        float scale) {                                                                                  \
        attn::dkv_body<D, NW, BMQ>(q, k, v, dout, lse, delta, dk, dv, seq, nh, nkv, scale);             \
    }
#define ATTN_DQ_VARIANT(TAG, D, NW, BN, QREG)                                                                \
    extern "C" __global__ void __launch_bounds__(32 * NW) attn_bwd_dq_d##D##_##TAG(                     \
        const attn::bf16* q, const attn::bf16* k, const attn::bf16* v, const attn::bf16* dout,          \
        const float* lse, const float* delta, attn::bf16* dq, int seq, int nh, int nkv, float scale) {  \
        attn::dq_body<D, NW, BN, QREG>(q, k, v, dout, lse, delta, dq, seq, nh, nkv, scale);                   \
    }
ATTN_FWD_VARIANT(w8m1n64, 128, 8, 1, 64)
ATTN_FWD_VARIANT(w8m1n64, 64, 8, 1, 64)
ATTN_DKV_VARIANT(w8q32, 128, 8, 32)
ATTN_DKV_VARIANT(w8q64, 64, 8, 64)
ATTN_DQ_VARIANT(w4n32s, 128, 4, 32, false)
ATTN_DQ_VARIANT(w4n64, 128, 4, 64, true)
ATTN_DQ_VARIANT(w4n64s, 64, 4, 64, false)
#endif
