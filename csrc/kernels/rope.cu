// YaRN RoPE in place on q and k, bf16, cos/sin computed on the fly.
//
// One CTA per token; each thread first issues the loads of its (up to 4) work items, then the
// CTA computes the token's cos/sin while they are in flight. The D/2 angles are formed in fp64 (position up to 131072 x inv_freq keeps
// full precision) and their cos/sin, scaled by the YaRN concentration, are shared through shared
// memory by the token's Hq + Hkv heads. A work item is one 8-wide chunk of the first half with its
// partner chunk in the second half: two 16-byte loads, two 16-byte stores. Bytes: 2 x T x (Hq+Hkv)
// x D x 2. Works on strided views (q and k slices of the fused qkv projection output).
#include "kernels/kv_cache.cuh"
#include "kernels/rope.h"

#include <algorithm>

namespace gptoss {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kItemsPerThread = 4;  // threads = items / 4 rounded up to a warp (gpt-oss: 288 items -> 96 x 3)

__global__ void __launch_bounds__(kMaxThreads) rope_kernel(
    bf16* __restrict__ q, bf16* __restrict__ k,   // [T, Hq, D], [T, Hkv, D] (token strides below)
    const int64_t* __restrict__ positions,        // [T]
    const double* __restrict__ inv_freq,          // [D/2]
    double concentration, int Hq, int Hkv, int D, int64_t q_stride, int64_t k_stride,
    RopeCacheWrite cw) {                          // cw.cache.k_cache null: no cache write
  pdl_wait();     // see kernels/pdl.h
  pdl_trigger();
  __shared__ float cs[128], sn[128];
  const int64_t t = blockIdx.x;
  const int half = D / 2;
  const int chunks = half / 8;                    // work items per head
  // With a cache write, v's heads are work items too (copied, not rotated).
  const bool writes = cw.cache.k_cache != nullptr;
  const int items = (Hq + Hkv + (writes ? Hkv : 0)) * chunks;
  const int64_t slot = writes ? cw.cache.slots[t] : -1;
  const bool to_cache = writes && kv_slot_valid(cw.cache, slot);
  for (int first = 0; first < items; first += kItemsPerThread * blockDim.x) {
    // 1. Issue every load of this pass before anything waits on memory.
    bf16x8 a[kItemsPerThread], b[kItemsPerThread];
    bf16* ptr[kItemsPerThread];
    int col[kItemsPerThread], head_of[kItemsPerThread];
#pragma unroll
    for (int i = 0; i < kItemsPerThread; ++i) {
      const int it = first + threadIdx.x + i * blockDim.x;
      ptr[i] = nullptr;
      if (it < items) {
        const int head = it / chunks;
        head_of[i] = head;
        col[i] = (it - head * chunks) * 8;
        ptr[i] = head < Hq         ? q + t * q_stride + static_cast<int64_t>(head) * D
                 : head < Hq + Hkv ? k + t * k_stride + static_cast<int64_t>(head - Hq) * D
                                   : const_cast<bf16*>(cw.v) + t * cw.v_stride + static_cast<int64_t>(head - Hq - Hkv) * D;
        a[i] = load_bf16x8_rw(ptr[i] + col[i]);
        b[i] = load_bf16x8_rw(ptr[i] + half + col[i]);
      }
    }
    // 2. While the loads are in flight: the token's cos/sin (fp64 angle), once.
    if (first == 0) {
      const double pos = static_cast<double>(positions[t]);
      for (int d = threadIdx.x; d < half; d += blockDim.x) {
        double s, c;
        sincos(pos * inv_freq[d], &s, &c);
        cs[d] = static_cast<float>(c * concentration);
        sn[d] = static_cast<float>(s * concentration);
      }
      __syncthreads();
    }
    // 3. Rotate and store.
#pragma unroll
    for (int i = 0; i < kItemsPerThread; ++i) {
      if (ptr[i] == nullptr) continue;
      if (head_of[i] >= Hq + Hkv) {  // v: copied into the cache as it is
        if (to_cache) {
          bf16* dst = kv_cache_head(cw.cache.v_cache, slot, Hkv, head_of[i] - Hq - Hkv, D);
          store_bf16x8(dst + col[i], a[i]);
          store_bf16x8(dst + half + col[i], b[i]);
        }
        continue;
      }
      float x1[8], x2[8], y1[8], y2[8];
      unpack(a[i], x1);
      unpack(b[i], x2);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float c = cs[col[i] + j], s = sn[col[i] + j];
        y1[j] = rope_rot1(x1[j], x2[j], c, s);
        y2[j] = rope_rot2(x1[j], x2[j], c, s);
      }
      const bf16x8 r1 = pack(y1), r2 = pack(y2);
      store_bf16x8(ptr[i] + col[i], r1);
      store_bf16x8(ptr[i] + half + col[i], r2);
      if (to_cache && head_of[i] >= Hq) {  // rotated k into the cache too
        bf16* dst = kv_cache_head(cw.cache.k_cache, slot, Hkv, head_of[i] - Hq, D);
        store_bf16x8(dst + col[i], r1);
        store_bf16x8(dst + half + col[i], r2);
      }
    }
  }
}

}  // namespace

cudaError_t launch_rope(bf16* q, bf16* k, const int64_t* positions, const double* inv_freq,
                        double concentration, int64_t T, int Hq, int Hkv, int D, int64_t q_stride,
                        int64_t k_stride, cudaStream_t stream, const RopeCacheWrite& cw) {
  if (T == 0) return cudaSuccess;
  if (D % 16 != 0 || D > kRopeMaxHeadDim || T > INT32_MAX) return cudaErrorInvalidValue;
  const bool writes = cw.cache.k_cache != nullptr;
  if (writes && (!cw.v || !cw.cache.v_cache || !cw.cache.slots)) return cudaErrorInvalidValue;
  const int items = (Hq + Hkv + (writes ? Hkv : 0)) * (D / 16);
  const int threads = std::min(kMaxThreads, std::max(32, (ceil_div(items, kItemsPerThread) + 31) / 32 * 32));
  return launch_kernel(rope_kernel, dim3(static_cast<unsigned>(T)), dim3(threads), 0, stream, q, k, positions, inv_freq,
                       concentration, Hq, Hkv, D, q_stride, k_stride, cw);
}

}  // namespace gptoss
