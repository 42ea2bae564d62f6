// MoE router: top-k + softmax per token, and the grouping by expert, in one launch.
//
// One CTA (32..1024 threads). Phase 1: a warp per token; each lane holds E/32 logits; k rounds of
// a warp arg-max (larger value, then lower expert id) give the sorted top-k; softmax over those k
// in registers. Phase 2: the T*k pairs are split into one contiguous segment per warp; per-warp
// histograms in shared memory. Phase 3: exclusive prefix sums over experts (counts, offsets) and,
// per expert, over warps (each warp's first slot). Phase 4: each warp walks its segment in order,
// 32 pairs at a time, ranking equal experts with __match_any_sync: a stable counting sort, so perm
// is deterministic and ascending within each expert. At T = 1 this is one warp, a few microseconds.
// Versions tried: none yet (first version).
#include <cfloat>

#include "kernels/common.cuh"
#include "kernels/moe.h"

namespace gptoss {
namespace {

constexpr int kMaxWarps = 32;
constexpr int kPerLane = kRouterMaxExperts / 32;

__device__ __forceinline__ bool better(float av, int ai, float bv, int bi) {
  return av > bv || (av == bv && ai < bi);
}

template <bool BF16>
__global__ void __launch_bounds__(1024) router_kernel(const void* __restrict__ logits_raw, int T, int E, int k,
                                                      int32_t* __restrict__ ids, float* __restrict__ weights,
                                                      int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                                                      int32_t* __restrict__ perm) {
  __shared__ int32_t hist[kMaxWarps][kRouterMaxExperts];  // per-warp counts, then per-warp write cursors
  __shared__ int32_t offs[kRouterMaxExperts + 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int per_lane = (E + 31) / 32;

  // ---- phase 1: top-k and softmax, a warp per token
  for (int t = warp; t < T; t += nwarps) {
    float v[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane + 32 * j;
      float x = -INFINITY;
      if (j < per_lane && e < E) {
        x = BF16 ? __bfloat162float(static_cast<const bf16*>(logits_raw)[static_cast<int64_t>(t) * E + e])
                 : static_cast<const float*>(logits_raw)[static_cast<int64_t>(t) * E + e];
        if (x != x) x = -INFINITY;  // NaN
      }
      v[j] = x;
    }
    uint32_t taken = 0;
    float top_v[kRouterMaxTopK];
    int top_i[kRouterMaxTopK];
#pragma unroll
    for (int r = 0; r < kRouterMaxTopK; ++r) {
      if (r >= k) break;
      float bv = -INFINITY;
      int bi = INT32_MAX;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int e = lane + 32 * j;
        if (j < per_lane && e < E && !(taken & (1u << j)) && better(v[j], e, bv, bi)) {
          bv = v[j];
          bi = e;
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(ov, oi, bv, bi)) {
          bv = ov;
          bi = oi;
        }
      }
      if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
      top_v[r] = bv;
      top_i[r] = bi;
    }
    if (lane == 0) {
      float z = 0.f;
      for (int r = 0; r < k; ++r) z += __expf(top_v[r] - top_v[0]);
      for (int r = 0; r < k; ++r) {
        ids[static_cast<int64_t>(t) * k + r] = top_i[r];
        weights[static_cast<int64_t>(t) * k + r] = __expf(top_v[r] - top_v[0]) / z;
      }
    }
  }
  for (int i = threadIdx.x; i < nwarps * kRouterMaxExperts; i += blockDim.x) hist[i / kRouterMaxExperts][i % kRouterMaxExperts] = 0;
  __syncthreads();

  // ---- phase 2: per-warp histograms over contiguous segments of pairs
  const int P = T * k;
  const int seg = (P + nwarps - 1) / nwarps;
  const int p0 = min(P, warp * seg), p1 = min(P, p0 + seg);
  for (int p = p0 + lane; p < p1; p += 32) atomicAdd(&hist[warp][ids[p]], 1);
  __syncthreads();

  // ---- phase 3: prefix sums
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int run = 0;
    for (int w = 0; w < nwarps; ++w) {
      const int c = hist[w][e];
      hist[w][e] = run;
      run += c;
    }
    counts[e] = run;
    offs[e] = run;  // temporarily the count
  }
  __syncthreads();
  if (warp == 0) {  // exclusive scan of E <= 256 counts: 8 consecutive experts a lane
    int local[kPerLane];
    int sum = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane * kPerLane + j;
      local[j] = e < E ? offs[e] : 0;
      sum += local[j];
    }
    int incl = sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    int run = incl - sum;
    __syncwarp();
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane * kPerLane + j;
      if (e < E) {
        offs[e] = run;
        offsets[e] = run;
      }
      run += local[j];
    }
    if (lane == 31) {
      offs[E] = run;
      offsets[E] = run;
    }
  }
  __syncthreads();

  // ---- phase 4: stable scatter
  const unsigned lt_mask = (1u << lane) - 1u;
  for (int base = p0; base < p1; base += 32) {
    const int p = base + lane;
    const bool active = p < p1;
    const int e = active ? ids[p] : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int rank = __popc(peers & lt_mask);
    if (active) perm[offs[e] + hist[warp][e] + rank] = p;
    __syncwarp();
    if (active && rank == 0) hist[warp][e] += __popc(peers);
    __syncwarp();
  }
}

}  // namespace

cudaError_t launch_moe_router(const void* logits, bool logits_bf16, int64_t T, int E, int k, int32_t* ids,
                              float* weights, int32_t* counts, int32_t* offsets, int32_t* perm,
                              cudaStream_t stream) {
  if (E < 1 || E > kRouterMaxExperts || k < 1 || k > kRouterMaxTopK || k > E || T < 0 || T * k > INT32_MAX)
    return cudaErrorInvalidValue;
  const int threads = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, T * 32)));  // a warp a token
  if (logits_bf16)
    router_kernel<true><<<1, threads, 0, stream>>>(logits, static_cast<int>(T), E, k, ids, weights, counts, offsets, perm);
  else
    router_kernel<false><<<1, threads, 0, stream>>>(logits, static_cast<int>(T), E, k, ids, weights, counts, offsets, perm);
  return cudaGetLastError();
}

}  // namespace gptoss
