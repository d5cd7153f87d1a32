// RMSNorm family. Forward: out = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps) per row,
// rstd saved (f32) for backward; the residual variant first forms h = x + residual (rounded to
// the storage dtype, written out) and normalises h. Backward: with g = dout * w,
//   dx = rstd * g - x * rstd^3 * mean(g * x),   dw += sum_rows dout * x * rstd.
// Memory traffic: fwd reads x (+ residual) and w, writes out (+ h) and rstd; bwd reads dout and x
// twice (the second pass is an L1/L2 hit), writes dx, plus a [G, dim] f32 partial buffer and its
// reduction for dw (G <= 512 fixed blocks: deterministic, no atomics).
//
// Layout: a thread owns vectors j = threadIdx.x + k * blockDim.x (k < K) of W elements of a row;
// W = 16 / sizeof(T) when dim % W == 0 and pointers are 16-byte aligned, else W = 1. The host
// picks K and blockDim so that K * W * blockDim covers dim.
#include "common.cuh"

using namespace titan;

namespace {

template <typename T, int W, int K>
__device__ __forceinline__ void rmsnorm_fwd_impl(const T* __restrict__ x, const T* __restrict__ res,
                                                 const T* __restrict__ w, T* __restrict__ h, T* __restrict__ out,
                                                 float* __restrict__ rstd, int dim, float eps) {
    __shared__ float red[32];
    const long long base = (long long)blockIdx.x * dim;
    float v[K][W];
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < K; k++) {
        const int col = (threadIdx.x + k * blockDim.x) * W;
#pragma unroll
        for (int i = 0; i < W; i++) v[k][i] = 0.f;
        if (col < dim) {
            load_w<T, W>(x + base + col, v[k]);
            if (res != nullptr) {
                float r[W];
                load_w<T, W>(res + base + col, r);
#pragma unroll
                for (int i = 0; i < W; i++) v[k][i] = to_f32(from_f32<T>(v[k][i] + r[i]));
                store_w<T, W>(h + base + col, v[k]);
            }
#pragma unroll
            for (int i = 0; i < W; i++) ss += v[k][i] * v[k][i];
        }
    }
    ss = block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / (float)dim + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
#pragma unroll
    for (int k = 0; k < K; k++) {
        const int col = (threadIdx.x + k * blockDim.x) * W;
        if (col < dim) {
            float wv[W], o[W];
            load_w<T, W>(w + col, wv);
#pragma unroll
            for (int i = 0; i < W; i++) o[i] = v[k][i] * r * wv[i];
            store_w<T, W>(out + base + col, o);
        }
    }
}

// Grid-strides over rows (gridDim.x fixed by the host from the shape only); each thread keeps
// its columns' dw partial in registers and writes it to partial[blockIdx.x, :].
template <typename T, int W, int K>
__device__ __forceinline__ void rmsnorm_bwd_impl(const T* __restrict__ dout, const T* __restrict__ x,
                                                 const T* __restrict__ w, const float* __restrict__ rstd,
                                                 T* __restrict__ dx, float* __restrict__ partial, int rows, int dim) {
    __shared__ float red[32];
    float acc[K][W];
#pragma unroll
    for (int k = 0; k < K; k++)
#pragma unroll
        for (int i = 0; i < W; i++) acc[k][i] = 0.f;

    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const long long base = (long long)row * dim;
        float dot = 0.f;
#pragma unroll
        for (int k = 0; k < K; k++) {
            const int col = (threadIdx.x + k * blockDim.x) * W;
            if (col < dim) {
                float g[W], xv[W], wv[W];
                load_w<T, W>(dout + base + col, g);
                load_w<T, W>(x + base + col, xv);
                load_w<T, W>(w + col, wv);
#pragma unroll
                for (int i = 0; i < W; i++) dot += g[i] * wv[i] * xv[i];
            }
        }
        dot = block_sum(dot, red);
        const float r = rstd[row];
        const float c = dot / (float)dim * r * r * r;
#pragma unroll
        for (int k = 0; k < K; k++) {
            const int col = (threadIdx.x + k * blockDim.x) * W;
            if (col < dim) {
                float g[W], xv[W], wv[W], o[W];
                load_w<T, W>(dout + base + col, g);
                load_w<T, W>(x + base + col, xv);
                load_w<T, W>(w + col, wv);
#pragma unroll
                for (int i = 0; i < W; i++) {
                    o[i] = r * g[i] * wv[i] - c * xv[i];
                    acc[k][i] += g[i] * xv[i] * r;
                }
                store_w<T, W>(dx + base + col, o);
            }
        }
    }
    float* p = partial + (long long)blockIdx.x * dim;
#pragma unroll
    for (int k = 0; k < K; k++) {
        const int col = (threadIdx.x + k * blockDim.x) * W;
        if (col < dim) {
#pragma unroll
            for (int i = 0; i < W; i++) p[col + i] = acc[k][i];
        }
    }
}

}  // namespace

#define RMSNORM_FWD(T, TN, W, K)                                                                              \
    extern "C" __global__ void __launch_bounds__(512)                                                        \
        rmsnorm_fwd_##TN##_w##W##_k##K(const T* x, const T* w, T* out, float* rstd, int dim, float eps) {     \
        rmsnorm_fwd_impl<T, W, K>(x, nullptr, w, nullptr, out, rstd, dim, eps);                                \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(512) rmsnorm_residual_fwd_##TN##_w##W##_k##K(                 \
        const T* x, const T* res, const T* w, T* h, T* out, float* rstd, int dim, float eps) {                \
        rmsnorm_fwd_impl<T, W, K>(x, res, w, h, out, rstd, dim, eps);                                         \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(512) rmsnorm_bwd_##TN##_w##W##_k##K(                          \
        const T* dout, const T* x, const T* w, const float* rstd, T* dx, float* partial, int rows, int dim) { \
        rmsnorm_bwd_impl<T, W, K>(dout, x, w, rstd, dx, partial, rows, dim);                                  \
    }

#define RMSNORM_ALL_K(T, TN, W) \
    RMSNORM_FWD(T, TN, W, 1)    \
    RMSNORM_FWD(T, TN, W, 2)    \
    RMSNORM_FWD(T, TN, W, 4)    \
    RMSNORM_FWD(T, TN, W, 8)

RMSNORM_ALL_K(float, f32, 1)
RMSNORM_ALL_K(float, f32, 4)
RMSNORM_ALL_K(bf16, bf16, 1)
RMSNORM_ALL_K(bf16, bf16, 8)

// dw[col] += sum over b < nparts of partial[b, col], summed in a fixed tree: 16 groups of a
// 512-thread block each add every 16th partial in order, then group sums are added in order.
// Block: 32 columns x 16 groups; grid: ceil(dim / 32).
extern "C" __global__ void __launch_bounds__(512)
    rmsnorm_dw_reduce(const float* __restrict__ partial, float* __restrict__ dw, int nparts, int dim) {
    __shared__ float s[16][33];
    const int lane = threadIdx.x & 31, grp = threadIdx.x >> 5;
    const int col = blockIdx.x * 32 + lane;
    float acc = 0.f;
    if (col < dim)
        for (int b = grp; b < nparts; b += 16) acc += partial[(long long)b * dim + col];
    s[grp][lane] = acc;
    __syncthreads();
    if (grp == 0 && col < dim) {
        float t = 0.f;
#pragma unroll
        for (int g = 0; g < 16; g++) t += s[g][lane];
        dw[col] += t;
    }
}
