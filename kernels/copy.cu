// Strided block copy: dst[r * dst_stride + c] = src[r * src_stride + c] for r < rows, c < cols,
// in units of U (strides and cols counted in units), e.g. one rank's vocabulary columns of the
// logits into the gathered [rows, vocab] matrix. The element type does not matter, only its
// size: 2-byte units serve bf16, 4-byte units f32 and i32, and when the pointers, strides and
// row length are all 16-byte multiples the host passes 16-byte units (uint4) for any dtype.
// src and dst must not overlap (checked on the host).
// Grid: x covers a row's units (each thread strides over them), y strides over the rows, so any
// rows fit the 65535 limit of gridDim.y. Memory traffic: reads rows * cols units once, writes
// them once.
#include "common.cuh"

namespace {

template <typename U>
__device__ __forceinline__ void copy_2d_impl(const U* __restrict__ src, U* __restrict__ dst, long long rows,
                                             long long cols, long long src_stride, long long dst_stride) {
    const long long c0 = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long cstep = gridDim.x * (long long)blockDim.x;
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        const U* s = src + r * src_stride;
        U* d = dst + r * dst_stride;
        for (long long c = c0; c < cols; c += cstep) d[c] = s[c];
    }
}

}  // namespace

#define COPY_2D(U, NAME)                                                                                    \
    extern "C" __global__ void NAME(const U* src, U* dst, long long rows, long long cols,                  \
                                    long long src_stride, long long dst_stride) {                          \
        copy_2d_impl<U>(src, dst, rows, cols, src_stride, dst_stride);                                      \
    }

COPY_2D(unsigned short, copy_2d_2b)
COPY_2D(unsigned int, copy_2d_4b)
COPY_2D(uint4, copy_2d_16b)
