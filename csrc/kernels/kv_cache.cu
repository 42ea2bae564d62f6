// KV-cache write (k, v rows into their slots) and a decode step's bookkeeping (lengths, positions,
// slots), each one launch. See kv_cache.h for the slot convention.
#include <algorithm>

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

__global__ void decode_prep_kernel(int32_t* __restrict__ seq_lens, const int32_t* __restrict__ active,
                                   const int64_t* __restrict__ row0, int64_t* __restrict__ positions,
                                   int64_t* __restrict__ slots, int B) {
  pdl_wait();     // see kernels/pdl.h
  pdl_trigger();
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int32_t a = active[b];
  const int32_t len = seq_lens[b] + a;
  seq_lens[b] = len;
  const int64_t p = static_cast<int64_t>(len) - 1;
  positions[b] = p;
  slots[b] = a > 0 ? row0[b] + p : -1;
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

cudaError_t launch_decode_prep(int32_t* seq_lens, const int32_t* active, const int64_t* row0, int64_t* positions,
                               int64_t* slots, int64_t B, cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  if (B > INT32_MAX) return cudaErrorInvalidValue;
  const int threads = static_cast<int>(std::min<int64_t>(B, 256));
  return launch_kernel(decode_prep_kernel, dim3(static_cast<unsigned>((B + threads - 1) / threads)), dim3(threads), 0,
                       stream, seq_lens, active, row0, positions, slots, static_cast<int>(B));
}

}  // namespace gptoss
