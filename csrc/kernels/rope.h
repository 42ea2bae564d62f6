// YaRN rotary embedding applied in place to q and k (torch-free launcher).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

#include "kernels/kv_cache.h"

namespace gptoss {

constexpr int kRopeMaxHeadDim = 256;

// Rotate-halves RoPE in place: for each token t, head h, d < D/2:
//   a = pos[t] * inv_freq[d] (fp64), c = cos(a) * concentration, s = sin(a) * concentration,
//   x1 = x[d], x2 = x[d + D/2];  x[d] = x1 c - x2 s;  x[d + D/2] = x2 c + x1 s   (fp32, bf16 out).
//   q: [T, Hq, D] bf16, heads packed (head stride D), token stride q_stride elements; k likewise.
//   positions: [T] int64. inv_freq: [D/2] fp64 (YaRN, computed once on the host).
//   D % 16 == 0, D <= 256; q, k and their token strides 16-byte aligned.
// With cw.cache.k_cache set, the same launch also writes the KV cache (what launch_kv_write does):
// the rotated k and v [T, Hkv, D] (token stride cw.v_stride) go to cache rows cw.cache.slots[t]
// (kv_cache.h).
struct RopeCacheWrite {
  const __nv_bfloat16* v = nullptr;
  int64_t v_stride = 0;
  KvCacheWrite cache;
};
cudaError_t launch_rope(__nv_bfloat16* q, __nv_bfloat16* k, const int64_t* positions,
                        const double* inv_freq, double concentration, int64_t T, int Hq, int Hkv,
                        int D, int64_t q_stride, int64_t k_stride, cudaStream_t stream,
                        const RopeCacheWrite& cw = RopeCacheWrite());

}  // namespace gptoss
