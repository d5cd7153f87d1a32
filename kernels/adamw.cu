// Fused AdamW step (torch.optim.AdamW semantics) on an f32 master copy, per element:
//   g = grad * grad_scale[0];  p *= 1 - lr * wd;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   p -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps)
// with step_size = lr / (1 - b1^t) and inv_sqrt_bc2 = 1 / sqrt(1 - b2^t) computed on the host in
// f64. grad_scale is read on the device (the clip coefficient never visits the host). Optionally
// writes the updated weights to a bf16 or f32 compute copy.
// Memory traffic per element: reads p, grad, m, v (16 B), writes p, m, v (12 B) + 2 or 4 B copy.
// float4 vectors when the f32 buffers are 16-byte aligned (and the copy 8/16-byte aligned).
#include "common.cuh"

using namespace titan;

namespace {

struct Hyper {
    float decay, b1, b2, eps, step_size, inv_sqrt_bc2;
};

__device__ __forceinline__ void adamw_one(float& p, float g, float& m, float& v, const Hyper& h) {
    p = p * h.decay;
    m = h.b1 * m + (1.0f - h.b1) * g;
    v = h.b2 * v + (1.0f - h.b2) * g * g;
    p -= h.step_size * m / (sqrtf(v) * h.inv_sqrt_bc2 + h.eps);
}

// C is the compute-copy type (float or bf16); copy may be null.
template <typename C>
__device__ __forceinline__ void adamw_impl(float* __restrict__ param, const float* __restrict__ grad,
                                           float* __restrict__ mom, float* __restrict__ var, C* __restrict__ copy,
                                           const float* __restrict__ grad_scale, long long n, Hyper h) {
    const float gs = grad_scale[0];
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = gridDim.x * (long long)blockDim.x;
    long long start = 0;
    const bool copy_ok = copy == nullptr || (reinterpret_cast<uintptr_t>(copy) & (4 * sizeof(C) - 1)) == 0;
    if (aligned16(param) && aligned16(grad) && aligned16(mom) && aligned16(var) && copy_ok) {
        const long long nv = n / 4;
        for (long long i = tid; i < nv; i += stride) {
            float4 p = reinterpret_cast<float4*>(param)[i];
            const float4 g = reinterpret_cast<const float4*>(grad)[i];
            float4 m = reinterpret_cast<float4*>(mom)[i];
            float4 v = reinterpret_cast<float4*>(var)[i];
            adamw_one(p.x, g.x * gs, m.x, v.x, h);
            adamw_one(p.y, g.y * gs, m.y, v.y, h);
            adamw_one(p.z, g.z * gs, m.z, v.z, h);
            adamw_one(p.w, g.w * gs, m.w, v.w, h);
            reinterpret_cast<float4*>(param)[i] = p;
            reinterpret_cast<float4*>(mom)[i] = m;
            reinterpret_cast<float4*>(var)[i] = v;
            if (copy != nullptr) {
                if constexpr (sizeof(C) == 2) {
                    uint2 raw;
                    C* e = reinterpret_cast<C*>(&raw);
                    e[0] = from_f32<C>(p.x);
                    e[1] = from_f32<C>(p.y);
                    e[2] = from_f32<C>(p.z);
                    e[3] = from_f32<C>(p.w);
                    reinterpret_cast<uint2*>(copy)[i] = raw;
                } else {
                    reinterpret_cast<float4*>(copy)[i] = p;
                }
            }
        }
        start = nv * 4;
    }
    for (long long i = start + tid; i < n; i += stride) {
        float p = param[i], m = mom[i], v = var[i];
        adamw_one(p, grad[i] * gs, m, v, h);
        param[i] = p;
        mom[i] = m;
        var[i] = v;
        if (copy != nullptr) copy[i] = from_f32<C>(p);
    }
}

}  // namespace

#define ADAMW(C, CN)                                                                                          \
    extern "C" __global__ void adamw_##CN(float* param, const float* grad, float* mom, float* var, C* copy,   \
                                          const float* grad_scale, long long n, float decay, float b1,        \
                                          float b2, float eps, float step_size, float inv_sqrt_bc2) {         \
        adamw_impl<C>(param, grad, mom, var, copy, grad_scale, n, Hyper{decay, b1, b2, eps, step_size, inv_sqrt_bc2}); \
    }

// adamw_f32: the copy (if any) is f32; adamw_bf16: the copy is bf16.
ADAMW(float, f32)
ADAMW(bf16, bf16)
