// Fused softmax cross-entropy with its gradient, one block per row of logits [rows, vocab]:
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
    const float sum = block_sum(scaled, red);
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
