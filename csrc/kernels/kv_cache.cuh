// Device side of the KV-cache write (kv_cache.h): the one place a slot becomes an address.
#pragma once
#include "kernels/common.cuh"
#include "kernels/kv_cache.h"

namespace gptoss {

// Whether the token with this slot is written (slots outside the cache are skipped).
__device__ __forceinline__ bool kv_slot_valid(const KvCacheWrite& c, int64_t slot) { return slot >= 0 && slot < c.rows; }

// Head `head` of cache row `slot` ([rows, Hkv, D] bf16).
__device__ __forceinline__ bf16* kv_cache_head(bf16* cache, int64_t slot, int Hkv, int head, int D) {
  return cache + (slot * Hkv + head) * D;
}

}  // namespace gptoss
