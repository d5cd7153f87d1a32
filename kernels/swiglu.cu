// SwiGLU: out = silu(gate) * up, silu(g) = g * sigmoid(g). Backward with s = sigmoid(g):
//   dgate = dout * up * s * (1 + g * (1 - s)),  dup = dout * g * s.
// Memory traffic per element: fwd reads 2, writes 1; bwd reads 3, writes 2. 16-byte vectors
// (grid-stride) when all pointers are aligned, then a scalar tail; otherwise scalar.
// expf (not __expf): the f32 path is checked against the CPU reference at 1e-5.
#include "common.cuh"

using namespace titan;

namespace {

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

template <typename T>
__device__ __forceinline__ void swiglu_fwd_impl(const T* __restrict__ gate, const T* __restrict__ up,
                                                T* __restrict__ out, long long n) {
    constexpr int N = Vec16<T>::N;
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = gridDim.x * (long long)blockDim.x;
    long long start = 0;
    if (aligned16(gate) && aligned16(up) && aligned16(out)) {
        const long long nv = n / N;
        for (long long i = tid; i < nv; i += stride) {
            float g[N], u[N];
            load_vec<T>(gate + i * N, g);
            load_vec<T>(up + i * N, u);
#pragma unroll
            for (int k = 0; k < N; k++) g[k] = g[k] * sigmoid(g[k]) * u[k];
            store_vec<T>(out + i * N, g);
        }
        start = nv * N;
    }
    for (long long i = start + tid; i < n; i += stride) {
        const float g = to_f32(gate[i]);
        out[i] = from_f32<T>(g * sigmoid(g) * to_f32(up[i]));
    }
}

__device__ __forceinline__ void swiglu_grad(float d, float g, float u, float& dg, float& du) {
    const float s = sigmoid(g);
    dg = d * u * s * (1.0f + g * (1.0f - s));
    du = d * g * s;
}

template <typename T>
__device__ __forceinline__ void swiglu_bwd_impl(const T* __restrict__ dout, const T* __restrict__ gate,
                                                const T* __restrict__ up, T* __restrict__ dgate,
                                                T* __restrict__ dup, long long n) {
    constexpr int N = Vec16<T>::N;
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = gridDim.x * (long long)blockDim.x;
    long long start = 0;
    if (aligned16(dout) && aligned16(gate) && aligned16(up) && aligned16(dgate) && aligned16(dup)) {
        const long long nv = n / N;
        for (long long i = tid; i < nv; i += stride) {
            float d[N], g[N], u[N], dg[N], du[N];
            load_vec<T>(dout + i * N, d);
            load_vec<T>(gate + i * N, g);
            load_vec<T>(up + i * N, u);
#pragma unroll
            for (int k = 0; k < N; k++) swiglu_grad(d[k], g[k], u[k], dg[k], du[k]);
            store_vec<T>(dgate + i * N, dg);
            store_vec<T>(dup + i * N, du);
        }
        start = nv * N;
    }
    for (long long i = start + tid; i < n; i += stride) {
        float dg, du;
        swiglu_grad(to_f32(dout[i]), to_f32(gate[i]), to_f32(up[i]), dg, du);
        dgate[i] = from_f32<T>(dg);
        dup[i] = from_f32<T>(du);
    }
}

}  // namespace

extern "C" __global__ void swiglu_fwd_f32(const float* gate, const float* up, float* out, long long n) {
    swiglu_fwd_impl<float>(gate, up, out, n);
}
extern "C" __global__ void swiglu_fwd_bf16(const bf16* gate, const bf16* up, bf16* out, long long n) {
    swiglu_fwd_impl<bf16>(gate, up, out, n);
}
extern "C" __global__ void swiglu_bwd_f32(const float* dout, const float* gate, const float* up, float* dgate,
                                          float* dup, long long n) {
    swiglu_bwd_impl<float>(dout, gate, up, dgate, dup, n);
}
extern "C" __global__ void swiglu_bwd_bf16(const bf16* dout, const bf16* gate, const bf16* up, bf16* dgate,
                                           bf16* dup, long long n) {
    swiglu_bwd_impl<bf16>(dout, gate, up, dgate, dup, n);
}
