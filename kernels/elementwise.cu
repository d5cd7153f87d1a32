// Elementwise family: fill, add, scale over flat buffers of f32 / bf16 (fill also i32).
// Memory traffic per element: fill writes 1; scale reads 1 + writes 1; add reads 2 + writes 1.
// Each thread moves 16-byte vectors (grid-stride) when every pointer is 16-byte aligned, then a
// scalar tail covers the last n % (16 / sizeof(T)) elements; unaligned buffers take the scalar loop.
#include "common.cuh"

using namespace titan;

namespace {

__device__ __forceinline__ long long gtid() { return blockIdx.x * (long long)blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long gstride() { return gridDim.x * (long long)blockDim.x; }

template <typename T>
__device__ void fill_impl(T* x, long long n, T value) {
    constexpr int N = 16 / sizeof(T);
    long long start = 0;
    if (aligned16(x)) {
        uint4 raw;
        T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int k = 0; k < N; k++) e[k] = value;
        const long long nv = n / N;
        for (long long i = gtid(); i < nv; i += gstride()) reinterpret_cast<uint4*>(x)[i] = raw;
        start = nv * N;
    }
    for (long long i = start + gtid(); i < n; i += gstride()) x[i] = value;
}

// out may alias a or b: each element is read before it is written, by the same thread.
template <typename T>
__device__ void add_impl(const T* a, const T* b, T* out, long long n) {
    constexpr int N = Vec16<T>::N;
    long long start = 0;
    if (aligned16(a) && aligned16(b) && aligned16(out)) {
        const long long nv = n / N;
        for (long long i = gtid(); i < nv; i += gstride()) {
            float x[N], y[N];
            load_vec<T>(a + i * N, x);
            load_vec<T>(b + i * N, y);
#pragma unroll
            for (int k = 0; k < N; k++) x[k] += y[k];
            store_vec<T>(out + i * N, x);
        }
        start = nv * N;
    }
    for (long long i = start + gtid(); i < n; i += gstride()) out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

template <typename T>
__device__ void scale_impl(T* x, long long n, float alpha) {
    constexpr int N = Vec16<T>::N;
    long long start = 0;
    if (aligned16(x)) {
        const long long nv = n / N;
        for (long long i = gtid(); i < nv; i += gstride()) {
            float v[N];
            load_vec<T>(x + i * N, v);
#pragma unroll
            for (int k = 0; k < N; k++) v[k] *= alpha;
            store_vec<T>(x + i * N, v);
        }
        start = nv * N;
    }
    for (long long i = start + gtid(); i < n; i += gstride()) x[i] = from_f32<T>(to_f32(x[i]) * alpha);
}

}  // namespace

extern "C" __global__ void fill_f32(float* x, long long n, float value) { fill_impl<float>(x, n, value); }
extern "C" __global__ void fill_bf16(bf16* x, long long n, float value) { fill_impl<bf16>(x, n, from_f32<bf16>(value)); }
extern "C" __global__ void fill_i32(int* x, long long n, int value) { fill_impl<int>(x, n, value); }

extern "C" __global__ void add_f32(const float* a, const float* b, float* out, long long n) { add_impl<float>(a, b, out, n); }
extern "C" __global__ void add_bf16(const bf16* a, const bf16* b, bf16* out, long long n) { add_impl<bf16>(a, b, out, n); }

extern "C" __global__ void scale_f32(float* x, long long n, float alpha) { scale_impl<float>(x, n, alpha); }
extern "C" __global__ void scale_bf16(bf16* x, long long n, float alpha) { scale_impl<bf16>(x, n, alpha); }
