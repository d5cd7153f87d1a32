// Cast family: f32 <-> bf16 conversion of a flat buffer, round-to-nearest-even (NaN stays NaN).
// Memory traffic per element: read sizeof(src) + write sizeof(dst). Threads convert 8 elements at
// a time (two float4 / one uint4 of bf16) when both pointers are 16-byte aligned, else scalar.
// Same-dtype "casts" are plain device copies on the host side and never reach these kernels.
#include "common.cuh"

using namespace titan;

namespace {

template <typename S, typename D>
__device__ void cast_impl(const S* __restrict__ src, D* __restrict__ dst, long long n) {
    constexpr int N = 8;
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = gridDim.x * (long long)blockDim.x;
    long long start = 0;
    if (aligned16(src) && aligned16(dst)) {
        const long long nv = n / N;
        for (long long i = tid; i < nv; i += stride) {
            float v[N];
            constexpr int SN = Vec16<S>::N, DN = Vec16<D>::N;
#pragma unroll
            for (int k = 0; k < N; k += SN) load_vec<S>(src + i * N + k, v + k);
#pragma unroll
            for (int k = 0; k < N; k += DN) store_vec<D>(dst + i * N + k, v + k);
        }
        start = nv * N;
    }
    for (long long i = start + tid; i < n; i += stride) dst[i] = from_f32<D>(to_f32(src[i]));
}

}  // namespace

extern "C" __global__ void cast_f32_bf16(const float* __restrict__ src, bf16* __restrict__ dst, long long n) {
    cast_impl<float, bf16>(src, dst, n);
}
extern "C" __global__ void cast_bf16_f32(const bf16* __restrict__ src, float* __restrict__ dst, long long n) {
    cast_impl<bf16, float>(src, dst, n);
}
