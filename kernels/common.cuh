// Shared device helpers for titan's kernels: dtype conversion, 16-byte vector loads/stores and
// deterministic block reductions. Storage is bf16 or f32; arithmetic is always f32 (f64 in the
// global reductions). Every reduction here combines values in a fixed order that depends only on
// blockDim, never on timing, so results are bitwise reproducible run to run.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

namespace titan {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
// Round-to-nearest-even; NaN stays NaN.
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// Elements of T in one 16-byte vector.
template <typename T> struct Vec16 {
    static constexpr int N = 16 / sizeof(T);
};

// Loads N = 16/sizeof(T) consecutive elements at p (16-byte aligned) as floats.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < Vec16<T>::N; i++) out[i] = to_f32(e[i]);
}

// Stores N = 16/sizeof(T) floats at p (16-byte aligned), converting to T.
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < Vec16<T>::N; i++) e[i] = from_f32<T>(in[i]);
    *reinterpret_cast<uint4*>(p) = raw;
}

// Loads W (1 or Vec16<T>::N) elements; W == 1 is the scalar path for odd or unaligned shapes.
template <typename T, int W>
__device__ __forceinline__ void load_w(const T* p, float* out) {
    if constexpr (W == 1) {
        out[0] = to_f32(p[0]);
    } else {
        static_assert(W == Vec16<T>::N, "vector width must be 16 bytes");
        load_vec<T>(p, out);
    }
}

template <typename T, int W>
__device__ __forceinline__ void store_w(T* p, const float* in) {
    if constexpr (W == 1) {
        p[0] = from_f32<T>(in[0]);
    } else {
        static_assert(W == Vec16<T>::N, "vector width must be 16 bytes");
        store_vec<T>(p, in);
    }
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

template <typename V> __device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the result. blockDim.x must be a multiple of 32 (<= 1024).
// `shared` holds 32 values of V. Contains two __syncthreads, so every thread must call it, and a
// second call may reuse the same `shared` safely.
template <typename V> __device__ __forceinline__ V block_sum(V v, V* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // previous users of `shared` are done
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    V t = lane < nwarps ? shared[lane] : V(0);
    return warp_sum(t);
}

__device__ __forceinline__ float block_max(float v, float* shared) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? shared[lane] : -INFINITY;
    return warp_max(t);
}

}  // namespace titan
