// Shared device helpers for the torch-free kernels: bf16 vectors, warp/block reductions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "kernels/pdl.h"

namespace gptoss {

using bf16 = __nv_bfloat16;

// 8 bf16 values = one 16-byte vector.
struct alignas(16) bf16x8 {
  __nv_bfloat162 h[4];
};

// A plain load, not __ldg: the data is usually a previous kernel's output, and an __ldg (an
// invariant load to the compiler) may be hoisted above the programmatic-launch wait (pdl.h).
__device__ __forceinline__ bf16x8 load_bf16x8(const bf16* p) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  return *reinterpret_cast<bf16x8*>(&u);
}

__device__ __forceinline__ bf16x8 load_bf16x8_rw(const bf16* p) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  return *reinterpret_cast<bf16x8*>(&u);
}

__device__ __forceinline__ void store_bf16x8(bf16* p, const bf16x8& v) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&v);
}

// The RoPE rotation (x1 c - x2 s, x2 c + x1 s) with every product and sum rounded on its own (no FMA
// contraction), so the rope kernel and the fused linear epilogue give the same bits.
__device__ __forceinline__ float rope_rot1(float x1, float x2, float c, float s) {
  return __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
}
__device__ __forceinline__ float rope_rot2(float x1, float x2, float c, float s) {
  return __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}

__device__ __forceinline__ void unpack(const bf16x8& v, float (&f)[8]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 t = __bfloat1622float2(v.h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ bf16x8 pack(const float (&f)[8]) {
  bf16x8 v;
#pragma unroll
  for (int i = 0; i < 4; ++i) v.h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Inclusive prefix sum across the warp's lanes.
__device__ __forceinline__ int warp_inclusive_scan(int v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += y;
  }
  return v;
}

// Sum over the block; every thread gets the result. `shared` holds >= 32 floats.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < nwarps ? shared[lane] : 0.f;
  v = warp_sum(v);
  return v;
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace gptoss
