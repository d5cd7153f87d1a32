// Deterministic global reductions: sum (x f32) and sum of squares (f32 or bf16 buffers), plus the
// gradient-clipping coefficient. Two passes: `reduce_partial_*` runs a grid whose size the host
// derives from the length only (never from the device), each block writes one f64 partial; then
// `reduce_final` adds all partials in one block in a fixed order. f64 accumulation keeps the
// global grad norm of billions of elements accurate. Memory traffic: each input read once.
#include "common.cuh"

using namespace titan;

namespace {

template <typename T, bool SQUARE>
__device__ __forceinline__ void reduce_partial_impl(const T* __restrict__ x, long long n,
                                                    double* __restrict__ partials) {
    __shared__ double red[32];
    constexpr int N = Vec16<T>::N;
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = gridDim.x * (long long)blockDim.x;
    double acc = 0.0;
    long long start = 0;
    if (aligned16(x)) {
        const long long nv = n / N;
        for (long long i = tid; i < nv; i += stride) {
            float v[N];
            load_vec<T>(x + i * N, v);
#pragma unroll
            for (int k = 0; k < N; k++) acc += SQUARE ? (double)v[k] * (double)v[k] : (double)v[k];
        }
        start = nv * N;
    }
    for (long long i = start + tid; i < n; i += stride) {
        const double v = to_f32(x[i]);
        acc += SQUARE ? v * v : v;
    }
    acc = block_sum(acc, red);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

}  // namespace

extern "C" __global__ void reduce_partial_sum_f32(const float* x, long long n, double* partials) {
    reduce_partial_impl<float, false>(x, n, partials);
}
extern "C" __global__ void reduce_partial_sumsq_f32(const float* x, long long n, double* partials) {
    reduce_partial_impl<float, true>(x, n, partials);
}
extern "C" __global__ void reduce_partial_sumsq_bf16(const bf16* x, long long n, double* partials) {
    reduce_partial_impl<bf16, true>(x, n, partials);
}

// out[0] = (float) sum of partials[0..count), one block, fixed order.
extern "C" __global__ void reduce_final(const double* __restrict__ partials, int count, float* __restrict__ out) {
    __shared__ double red[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
    acc = block_sum(acc, red);
    if (threadIdx.x == 0) out[0] = (float)acc;
}

// coef[0] = min(1, max_norm / (sqrt(norm_sq[0]) + 1e-6)); a NaN norm propagates as NaN.
extern "C" __global__ void clip_coef(const float* norm_sq, float max_norm, float* coef) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
        const float c = max_norm / (sqrtf(norm_sq[0]) + 1e-6f);
        coef[0] = (c >= 1.0f) ? 1.0f : c;
    }
}
