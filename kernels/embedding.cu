// Token embedding, whole or vocabulary-parallel: the table holds vocabulary rows
// [row0, row0 + rows) of `vocab` (the plain embedding is row0 = 0, rows = vocab).
// Forward: out[n, :] = table[ids[n] - row0, :] for the ids held, a zero row for ids another rank
// holds, and a NaN row for an id outside [0, vocab) so a bad batch is loud (a kernel cannot return
// an error). Memory traffic fwd: reads the held rows' table elements + ids, writes n * dim.
//
// Backward: dtable[ids[n] - row0, :] += dout[n, :] (dtable f32) for the ids held, deterministic
// and without atomics. Block (r, c) owns table rows [r * rows_per_range, ...) and 256 columns;
// it scans all ids in token order, compacts (order-preserving, per 256-token tile) the tokens
// whose id falls in its range into shared memory, then each thread walks that list for its own
// column. A run of equal consecutive ids in the list is summed in a register before one read-modify-write of dtable.
// Every (id, column) cell is owned by exactly one thread and summed in token order, so results are
// bitwise reproducible. Memory traffic bwd: dout once, dtable rows touched once per run, ids once
// per block (L2-resident).
#include "common.cuh"

using namespace titan;

namespace {

template <typename T, int W>
__device__ __forceinline__ void embedding_fwd_impl(const T* __restrict__ table, const int* __restrict__ ids,
                                                   T* __restrict__ out, int dim, int row0, int rows,
                                                   int vocab) {
    const int id = ids[blockIdx.x];
    const bool ok = id >= 0 && id < vocab;
    // row0 + rows <= vocab (checked on the host), so neither bound overflows.
    const bool held = id >= row0 && id < row0 + rows;
    const T* src = table + (long long)(held ? id - row0 : 0) * dim;
    T* dst = out + (long long)blockIdx.x * dim;
    const float fill = ok ? 0.f : __int_as_float(0x7fc00000);
    for (int col = threadIdx.x * W; col < dim; col += blockDim.x * W) {
        float v[W];
        if (held) {
            load_w<T, W>(src + col, v);
        } else {
#pragma unroll
            for (int i = 0; i < W; i++) v[i] = fill;
        }
        store_w<T, W>(dst + col, v);
    }
}

constexpr int BWD_THREADS = 256;

template <typename T>
__device__ __forceinline__ void embedding_bwd_impl(const T* __restrict__ dout, const int* __restrict__ ids,
                                                   float* __restrict__ dtable, int n, int dim, int row0,
                                                   int rows, int rows_per_range) {
    __shared__ int list_tok[BWD_THREADS];
    __shared__ int list_id[BWD_THREADS];
    __shared__ int warp_count[BWD_THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    // The ids this block owns, in vocabulary coordinates [v0, v1) (row0 + rows <= vocab).
    const int first = blockIdx.x * rows_per_range;
    const int v0 = row0 + first;
    const int v1 = v0 + min(rows - first, rows_per_range);
    const int col = blockIdx.y * BWD_THREADS + threadIdx.x;
    int cur = -1;
    float acc = 0.f;
    for (int base = 0; base < n; base += BWD_THREADS) {
        const int t = base + threadIdx.x;
        const int id = t < n ? ids[t] : -1;
        const bool mine = id >= v0 && id < v1;
        const unsigned mask = __ballot_sync(0xffffffffu, mine);
        if (lane == 0) warp_count[warp] = __popc(mask);
        __syncthreads();
        int offset = 0, count = 0;
#pragma unroll
        for (int w = 0; w < BWD_THREADS / 32; w++) {
            const int c = warp_count[w];
            offset += w < warp ? c : 0;
            count += c;
        }
        if (mine) {
            const int slot = offset + __popc(mask & ((1u << lane) - 1u));
            list_tok[slot] = t;
            list_id[slot] = id - row0;
        }
        __syncthreads();
        if (col < dim) {
            for (int i = 0; i < count; i++) {
                const int tid = list_id[i];
                const float v = to_f32(dout[(long long)list_tok[i] * dim + col]);
                if (tid == cur) {
                    acc += v;
                } else {
                    if (cur >= 0) dtable[(long long)cur * dim + col] += acc;
                    cur = tid;
                    acc = v;
                }
            }
        }
        __syncthreads();  // the lists and counts are rewritten by the next tile
    }
    if (col < dim && cur >= 0) dtable[(long long)cur * dim + col] += acc;
}

}  // namespace

#define EMB_FWD(T, TN, W)                                                                                      \
    extern "C" __global__ void embedding_fwd_##TN##_w##W(const T* table, const int* ids, T* out, int dim,     \
                                                          int row0, int rows, int vocab) {                     \
        embedding_fwd_impl<T, W>(table, ids, out, dim, row0, rows, vocab);                                     \
    }

EMB_FWD(float, f32, 1)
EMB_FWD(float, f32, 4)
EMB_FWD(bf16, bf16, 1)
EMB_FWD(bf16, bf16, 8)

#define EMB_BWD(T, TN)                                                                                         \
    extern "C" __global__ void __launch_bounds__(BWD_THREADS) embedding_bwd_##TN(                              \
        const T* dout, const int* ids, float* dtable, int n, int dim, int row0, int rows, int rows_per_range) { \
        embedding_bwd_impl<T>(dout, ids, dtable, n, dim, row0, rows, rows_per_range);                          \
    }

EMB_BWD(float, f32)
EMB_BWD(bf16, bf16)
