// KV-cache write (k, v rows into their slots), one launch. See kv_cache.h for the slot convention.
#include "kernels/kv_cache.cuh"

namespace gptoss {
namespace {

constexpr int D = 64;   // head_dim of the attention kernels

__global__ void kv_write_kernel(const bf16* __restrict__ k, const bf16* __restrict__ v, int64_t k_stride,
                                int64_t v_stride, int Hkv, KvCacheWrite cache) {
  pdl_wait();     // see kernels/pdl.h
  pdl_trigger();
  const int64_t t = blockIdx.x;
  const int64_t slot = cache.slots[t];
  if (!kv_slot_valid(cache, slot)) return;
  const int i = threadIdx.x;  // chunk of 8 elements within the token's Hkv * 64
  store_bf16x8(kv_cache_head(cache.k_cache, slot, Hkv, 0, D) + i * 8, load_bf16x8(k + t * k_stride + i * 8));
  store_bf16x8(kv_cache_head(cache.v_cache, slot, Hkv, 0, D) + i * 8, load_bf16x8(v + t * v_stride + i * 8));
}

}  // namespace

cudaError_t launch_kv_write(const bf16* k, const bf16* v, int64_t k_stride, int64_t v_stride, int64_t T, int Hkv,
                            const KvCacheWrite& cache, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (T > INT32_MAX || Hkv < 1 || Hkv * (D / 8) > 1024 || !cache.slots || !cache.k_cache || !cache.v_cache)
    return cudaErrorInvalidValue;
  return launch_kernel(kv_write_kernel, dim3(static_cast<unsigned>(T)), dim3(Hkv * (D / 8)), 0, stream, k, v, k_stride,
                       v_stride, Hkv, cache);
}

}  // namespace gptoss
