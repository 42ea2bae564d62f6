// The KV cache of one layer as the kernels see it (torch-free): rows of [Hkv, 64] bf16 keys and
// values, one row a token, addressed by a flat slot. The contiguous cache of the Python side
// ([B, max_len, Hkv, 64]) has slot = b * max_len + pos; a paged pool ([blocks * block_size, Hkv,
// 64]) slot = block * block_size + offset. Every kernel that writes the cache (kv_write, rope with
// its cache write, the qkv projection's epilogue) writes row `slot` through kv_cache.cuh; a slot
// outside [0, rows) (e.g. -1 for an idle sequence) is not written.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace gptoss {

struct KvCacheWrite {
  const int64_t* slots = nullptr;     // [T] the row each token's key / value goes to
  __nv_bfloat16* k_cache = nullptr;   // [rows, Hkv, D]
  __nv_bfloat16* v_cache = nullptr;
  int64_t rows = 0;
};

// k, v [T, Hkv, 64] (token strides k_stride / v_stride) -> cache rows slots[t].
cudaError_t launch_kv_write(const __nv_bfloat16* k, const __nv_bfloat16* v, int64_t k_stride, int64_t v_stride,
                            int64_t T, int Hkv, const KvCacheWrite& cache, cudaStream_t stream);

}  // namespace gptoss
