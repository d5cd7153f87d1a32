// Rotary position embedding on [batch, seq, heads, head_dim] with half-split pairs (i, i + d/2)
// (Hugging Face's rotate_half layout) and f32 tables cos, sin of shape [seq, d/2]:
//   fwd: o1 = x1 cos - x2 sin,  o2 = x2 cos + x1 sin
//   bwd: the inverse rotation, dx1 = d1 cos + d2 sin,  dx2 = d2 cos - d1 sin.
// Memory traffic: reads x once, writes out once, reads the tables (small, L2-resident).
// A thread handles W consecutive pairs of one head (W = 16 / sizeof(T) when (d/2) % W == 0 and
// the pointers are 16-byte aligned, else 1). Each thread reads both halves before writing them, so
// out may even alias x.
#include "common.cuh"

using namespace titan;

namespace {

template <int W>
__device__ __forceinline__ void load_f32(const float* p, float* out) {
    if constexpr (W % 4 == 0) {
#pragma unroll
        for (int i = 0; i < W; i += 4) {
            const float4 v = *reinterpret_cast<const float4*>(p + i);
            out[i] = v.x;
            out[i + 1] = v.y;
            out[i + 2] = v.z;
            out[i + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < W; i++) out[i] = p[i];
    }
}

template <typename T, int W, bool BWD>
__device__ __forceinline__ void rope_impl(const T* x, T* out, const float* __restrict__ cos_t,
                                          const float* __restrict__ sin_t, int seq, int heads, int head_dim,
                                          long long rowheads) {
    const int half = head_dim / 2;
    const int nv = half / W;  // vectors per half
    const long long total = rowheads * nv;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += gridDim.x * (long long)blockDim.x) {
        const int v = (int)(idx % nv);
        const long long rh = idx / nv;  // ((b * seq + s) * heads + h)
        const int s = (int)((rh / heads) % seq);
        const long long base = rh * head_dim + (long long)v * W;
        float x1[W], x2[W], c[W], sn[W], o1[W], o2[W];
        load_w<T, W>(x + base, x1);
        load_w<T, W>(x + base + half, x2);
        load_f32<W>(cos_t + (long long)s * half + v * W, c);
        load_f32<W>(sin_t + (long long)s * half + v * W, sn);
#pragma unroll
        for (int i = 0; i < W; i++) {
            if (BWD) {
                o1[i] = x1[i] * c[i] + x2[i] * sn[i];
                o2[i] = x2[i] * c[i] - x1[i] * sn[i];
            } else {
                o1[i] = x1[i] * c[i] - x2[i] * sn[i];
                o2[i] = x2[i] * c[i] + x1[i] * sn[i];
            }
        }
        store_w<T, W>(out + base, o1);
        store_w<T, W>(out + base + half, o2);
    }
}

}  // namespace

#define ROPE(T, TN, W)                                                                                        \
    extern "C" __global__ void rope_fwd_##TN##_w##W(const T* x, T* out, const float* cos_t, const float* sin_t, \
                                                    int seq, int heads, int head_dim, long long rowheads) {    \
        rope_impl<T, W, false>(x, out, cos_t, sin_t, seq, heads, head_dim, rowheads);                          \
    }                                                                                                         \
    extern "C" __global__ void rope_bwd_##TN##_w##W(const T* x, T* out, const float* cos_t, const float* sin_t, \
                                                    int seq, int heads, int head_dim, long long rowheads) {    \
        rope_impl<T, W, true>(x, out, cos_t, sin_t, seq, heads, head_dim, rowheads);                           \
    }

ROPE(float, f32, 1)
ROPE(float, f32, 4)
ROPE(bf16, bf16, 1)
ROPE(bf16, bf16, 8)
