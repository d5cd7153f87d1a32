// Softmax cross-entropy with its gradient, one block per row of logits [rows, vocab].
//
// cross_entropy (whole vocabulary, fused):
//   loss[r]   = logsumexp(x) - x[target]            (0 when target == ignore_index)
//   dlogits   = (softmax(x) - onehot(target)) * grad_scale   (all 0 when ignored)
// Pass 1 keeps a per-thread online (max, sum of exp) over 16-byte vectors, combined across the
// block in a fixed order; pass 2 reads the row again and writes dlogits. Probabilities are never
// stored. dlogits may alias logits: every element is read before it is written by the same
// thread, and x[target] is read before the first barrier that precedes any write.
// A target outside [0, vocab) that is not ignore_index yields a NaN loss (kernels cannot return
// errors; the trainer's non-finite check reports it).
// Memory traffic: reads the row once from DRAM and writes it once: pass 1 also parks the first
// `cache_vecs` vectors of the row in dynamic shared memory (up to ~220 KB, i.e. all of a 128256
// bf16 row but 10 KB), pass 2 reads them back from there and only the rest from global memory (an
// L2 hit: one block per SM keeps the uncached tails of all live rows far below L2's size). Each
// thread reads back exactly the slots it wrote, so the cache needs no barrier.
//
// Vocabulary-parallel, two kernels around an all-gather of the [rows, 3] stats (the rank holds
// columns [col0, col0 + vocab) of a vocabulary of vocab_total):
//   cross_entropy_stats: stats[r] = (max, sum of exp(x - max), x[target - col0] if this rank holds
//     the target column else 0), pass 1 above. Traffic: reads the row once, writes 12 bytes.
//   cross_entropy_shard: combines the gathered stats [shards, rows, 3] in rank order (M = max of
//     the maxima, S = sum of s * exp(m - M), xt = sum of the target entries), loss = ln S + M - xt,
//     dlogits = (exp(x - M) / S - onehot) * grad_scale over the held columns; ignored rows as
//     above; a target outside [0, vocab_total) gives a NaN loss. One pass: each thread reads an
//     element and then writes it, so dlogits may alias logits. Traffic: reads the row and
//     shards * 12 bytes, writes the row and 4 bytes.
#include "common.cuh"

#include <type_traits>

using namespace titan;

namespace {

// W raw elements of T (one 16-byte vector, or one element when W == 1).
template <typename T, int W> struct Raw {
    using type = typename std::conditional<W == 1, T, uint4>::type;
};

template <typename T, int W>
__device__ __forceinline__ void unpack(typename Raw<T, W>::type raw, float* v) {
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < W; i++) v[i] = to_f32(e[i]);
}

// One row's (max, sum of exp(x - max)) over its nvec vectors: a per-thread online pair combined
// across the block in a fixed order (every thread gets the result). The first cache_vecs vectors
// are parked in `cache` on the way.
template <typename T, int W>
__device__ __forceinline__ float2 row_max_sum(const typename Raw<T, W>::type* xr, int nvec,
                                              typename Raw<T, W>::type* cache, int cache_vecs, float* red) {
    using R = typename Raw<T, W>::type;
    float m = -INFINITY, s = 0.f;
    for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
        const R raw = xr[j];
        if (j < cache_vecs) cache[j] = raw;
        float v[W];
        unpack<T, W>(raw, v);
        float mv = v[0];
#pragma unroll
        for (int i = 1; i < W; i++) mv = fmaxf(mv, v[i]);
        if (mv > m) {
            s *= expf(m - mv);  // m == -inf: s is 0 and expf(-inf) is 0
            m = mv;
        }
        if (m != -INFINITY) {
#pragma unroll
            for (int i = 0; i < W; i++) s += expf(v[i] - m);
        } else {
            // every value so far is -inf (or NaN): a NaN must still poison the sum
#pragma unroll
            for (int i = 0; i < W; i++) s += (v[i] != v[i]) ? v[i] : 0.f;
        }
    }
    const float mx = block_max(m, red);
    const float scaled = (m == -INFINITY) ? s : s * expf(m - mx);
    return make_float2(mx, block_sum(scaled, red));
}

template <typename T, int W>
__device__ __forceinline__ void cross_entropy_impl(const T* logits, const int* __restrict__ targets,
                                                   float* __restrict__ losses, T* dlogits, int vocab,
                                                   int ignore_index, float grad_scale, int cache_vecs) {
    using R = typename Raw<T, W>::type;
    __shared__ float red[32];
    extern __shared__ uint4 smem_cache[];
    R* cache = reinterpret_cast<R*>(smem_cache);
    const long long base = (long long)blockIdx.x * vocab;
    const T* x = logits + base;
    T* d = dlogits + base;
    const int target = targets[blockIdx.x];
    const int nvec = vocab / W;

    if (target == ignore_index) {
        float z[W];
#pragma unroll
        for (int i = 0; i < W; i++) z[i] = 0.f;
        for (int j = threadIdx.x; j < nvec; j += blockDim.x) store_w<T, W>(d + (long long)j * W, z);
        if (threadIdx.x == 0) losses[blockIdx.x] = 0.f;
        return;
    }
    const bool valid = target >= 0 && target < vocab;
    float xt = 0.f;
    if (threadIdx.x == 0 && valid) xt = to_f32(x[target]);

    const R* xr = reinterpret_cast<const R*>(x);
    const float2 ms = row_max_sum<T, W>(xr, nvec, cache, cache_vecs, red);
    const float mx = ms.x, sum = ms.y;
    const float lse = mx + logf(sum);
    if (threadIdx.x == 0) losses[blockIdx.x] = valid ? lse - xt : __int_as_float(0x7fc00000);

    const float k = grad_scale / sum;
    for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
        float v[W];
        unpack<T, W>(j < cache_vecs ? cache[j] : xr[j], v);
#pragma unroll
        for (int i = 0; i < W; i++) {
            v[i] = expf(v[i] - mx) * k;
            if (j * W + i == target) v[i] -= grad_scale;
        }
        store_w<T, W>(d + (long long)j * W, v);
    }
}

template <typename T, int W>
__device__ __forceinline__ void cross_entropy_stats_impl(const T* __restrict__ logits,
                                                         const int* __restrict__ targets,
                                                         float* __restrict__ stats, int vocab, int col0,
                                                         int ignore_index) {
    using R = typename Raw<T, W>::type;
    __shared__ float red[32];
    const T* x = logits + (long long)blockIdx.x * vocab;
    const float2 ms = row_max_sum<T, W>(reinterpret_cast<const R*>(x), vocab / W, nullptr, 0, red);
    if (threadIdx.x == 0) {
        const int target = targets[blockIdx.x];
        const long long t = (long long)target - col0;  // no int overflow for any target
        const bool held = target != ignore_index && t >= 0 && t < vocab;
        float* st = stats + 3LL * blockIdx.x;
        st[0] = ms.x;
        st[1] = ms.y;
        st[2] = held ? to_f32(x[t]) : 0.f;
    }
}

template <typename T, int W>
__device__ __forceinline__ void cross_entropy_shard_impl(const T* logits, const int* __restrict__ targets,
                                                         const float* __restrict__ stats,
                                                         float* __restrict__ losses, T* dlogits, int rows,
                                                         int vocab, int col0, int shards, int vocab_total,
                                                         int ignore_index, float grad_scale) {
    using R = typename Raw<T, W>::type;
    const long long base = (long long)blockIdx.x * vocab;
    const R* xr = reinterpret_cast<const R*>(logits + base);
    T* d = dlogits + base;
    const int target = targets[blockIdx.x];
    const int nvec = vocab / W;
    if (target == ignore_index) {
        float z[W];
#pragma unroll
        for (int i = 0; i < W; i++) z[i] = 0.f;
        for (int j = threadIdx.x; j < nvec; j += blockDim.x) store_w<T, W>(d + (long long)j * W, z);
        if (threadIdx.x == 0) losses[blockIdx.x] = 0.f;
        return;
    }
    // Every thread combines the shards' stats itself, in rank order (the same on every rank).
    const float* st = stats + 3LL * blockIdx.x;
    const long long kstride = 3LL * rows;
    float m = -INFINITY;
    for (int k = 0; k < shards; k++) m = fmaxf(m, st[k * kstride]);
    float s = 0.f, xt = 0.f;
    for (int k = 0; k < shards; k++) {
        s += st[k * kstride + 1] * expf(st[k * kstride] - m);
        xt += st[k * kstride + 2];
    }
    const bool valid = target >= 0 && target < vocab_total;
    if (threadIdx.x == 0) losses[blockIdx.x] = valid ? logf(s) + m - xt : __int_as_float(0x7fc00000);
    const long long tl = (long long)target - col0;  // the target's column here, if held
    const float k = grad_scale / s;
    for (int j = threadIdx.x; j < nvec; j += blockDim.x) {
        float v[W];
        unpack<T, W>(xr[j], v);
#pragma unroll
        for (int i = 0; i < W; i++) {
            v[i] = expf(v[i] - m) * k;
            if ((long long)j * W + i == tl) v[i] -= grad_scale;
        }
        store_w<T, W>(d + (long long)j * W, v);
    }
}

}  // namespace

#define CE(T, TN, W)                                                                                          \
    extern "C" __global__ void __launch_bounds__(1024) cross_entropy_##TN##_w##W(                             \
        const T* logits, const int* targets, float* losses, T* dlogits, int vocab, int ignore_index,          \
        float grad_scale, int cache_vecs) {                                                                   \
        cross_entropy_impl<T, W>(logits, targets, losses, dlogits, vocab, ignore_index, grad_scale,           \
                                 cache_vecs);                                                                 \
    }

CE(float, f32, 1)
CE(float, f32, 4)
CE(bf16, bf16, 1)
CE(bf16, bf16, 8)

#define CE_STATS(T, TN, W)                                                                                    \
    extern "C" __global__ void __launch_bounds__(1024) cross_entropy_stats_##TN##_w##W(                       \
        const T* logits, const int* targets, float* stats, int vocab, int col0, int ignore_index) {          \
        cross_entropy_stats_impl<T, W>(logits, targets, stats, vocab, col0, ignore_index);                    \
    }

CE_STATS(float, f32, 1)
CE_STATS(float, f32, 4)
CE_STATS(bf16, bf16, 1)
CE_STATS(bf16, bf16, 8)

#define CE_SHARD(T, TN, W)                                                                                    \
    extern "C" __global__ void __launch_bounds__(1024) cross_entropy_shard_##TN##_w##W(                       \
        const T* logits, const int* targets, const float* stats, float* losses, T* dlogits, int rows,        \
        int vocab, int col0, int shards, int vocab_total, int ignore_index, float grad_scale) {              \
        cross_entropy_shard_impl<T, W>(logits, targets, stats, losses, dlogits, rows, vocab, col0, shards,    \
                                       vocab_total, ignore_index, grad_scale);                                \
    }

CE_SHARD(float, f32, 1)
CE_SHARD(float, f32, 4)
CE_SHARD(bf16, bf16, 1)
CE_SHARD(bf16, bf16, 8)
