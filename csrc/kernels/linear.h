// Skinny bf16 linear for decode (torch-free launcher): out[m] = x[m] W^T + bias, M <= 8 rows.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "kernels/kv_cache.h"

namespace gptoss {

constexpr int kSkinnyMaxM = 8;
constexpr int kSkinnyMaxXBytes = 96 * 1024;   // rows x K x 2 bytes of x, staged in shared memory

// x [M, K] (row stride x_stride), w [N, K] contiguous, bias [N] or nullptr, out [M, N] (row stride
// out_stride), all bf16; fp32 accumulation. 1 <= M <= 8, K % 8 == 0, M * K * 2 <= 96 KB, 16-byte
// aligned rows. Each warp streams two weight rows with 16-byte loads, x is staged in shared memory.
// weight_constant: w is never written by the kernel launched just before (model weights), so its
// first vectors may be loaded before the programmatic-launch wait (kernels/pdl.h).
// Optional epilogue for a fused qkv projection (N = (Hq + 2 Hkv) * D, rows: q heads, k heads, v heads):
// YaRN RoPE on the q and k heads exactly as launch_rope computes it, and the rotated k and v rows
// written to KV-cache rows cache.slots[m] (what launch_rope's cache write does, kv_cache.h). Each warp then takes the row pair (d, d + D/2) of one head. positions and slots are
// read before the programmatic-launch wait: the kernel launched just before must not write them.
struct LinearRope {
  const int64_t* positions = nullptr;  // [M]
  const double* inv_freq = nullptr;    // [D/2]
  double concentration = 1.0;
  int Hq = 0, Hkv = 0, D = 0;
  KvCacheWrite cache;                  // slots [M]
};

cudaError_t launch_linear_skinny(const __nv_bfloat16* x, int64_t x_stride, const __nv_bfloat16* w,
                                 const __nv_bfloat16* bias, __nv_bfloat16* out, int64_t out_stride, int M, int N,
                                 int K, bool weight_constant, cudaStream_t stream,
                                 const LinearRope* rope = nullptr);

}  // namespace gptoss
