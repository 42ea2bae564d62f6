// MoE router: top-k + softmax per token, and the grouping by expert, in one launch.
//
// Grid of ceil(T / 32) CTAs (a warp a token). Each CTA: top-k of its tokens by k rounds of a warp
// arg-max (larger value, then lower expert id; NaN as -inf), softmax over those k in registers,
// then its histogram of experts into a global scratch row. The last CTA to finish (atomic
// ticket) turns the histograms into counts, offsets (exclusive prefix over experts) and per-CTA
// bases (exclusive prefix over CTAs), then scatters every pair: a warp walks one CTA's pairs in
// order, 32 at a time, ranking equal experts with __match_any_sync — a stable counting sort, so
// perm is deterministic and ascending within an expert. It resets the ticket, so the scratch can
// be reused (and replayed in a CUDA graph) without clearing.
#include <cfloat>

#include "kernels/common.cuh"
#include "kernels/mma.cuh"
#include "kernels/moe_router.h"
#include "kernels/rms_norm.cuh"

namespace gptoss {
namespace {

constexpr int kTokensPerCta = 32;   // one warp a token
constexpr int kPerLane = kRouterMaxExperts / 32;

__device__ __forceinline__ bool better(float av, int ai, float bv, int bi) {
  return av > bv || (av == bv && ai < bi);
}

// The router proper, run by CTA `cta` of `ncta` (ncta == 1: every token in this CTA, no scratch).
// Logits are read through L2 (__ldcg): in the fused gate + router kernel other CTAs wrote them.
// CURSORS: rows of per-warp scatter cursors (32: one a warp for the multi-CTA scatter; a caller that
// always runs with ncta == 1 uses one row, 31 KB of shared memory less).
template <bool BF16, bool SMEM = false, int CURSORS = 32>
__device__ __forceinline__ void router_body(const void* __restrict__ logits_raw, int T, int E, int k,
                                            int32_t* __restrict__ ids, float* __restrict__ weights,
                                            int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                                            int32_t* __restrict__ perm, int32_t* __restrict__ scratch, int cta,
                                            int ncta) {
  __shared__ int32_t cursor[CURSORS][kRouterMaxExperts];  // histogram, then per-warp write cursors
  __shared__ int32_t offs[kRouterMaxExperts + 1];
  __shared__ int32_t sids[kTokensPerCta * kRouterMaxTopK];  // this CTA's expert ids (no global read-back)
  __shared__ bool is_last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int per_lane = (E + 31) / 32;
  const int t0 = cta * kTokensPerCta, t1 = min(T, t0 + kTokensPerCta);
  int32_t* rows = scratch + 1;  // scratch[0]: the ticket; then one histogram row per CTA

  // ---- top-k and softmax, a warp per token
  for (int t = t0 + warp; t < t1; t += nwarps) {
    float v[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane + 32 * j;
      float x = -INFINITY;
      if (j < per_lane && e < E) {
        x = BF16   ? __bfloat162float(static_cast<const bf16*>(logits_raw)[static_cast<int64_t>(t) * E + e])
            : SMEM ? static_cast<const float*>(logits_raw)[static_cast<int64_t>(t) * E + e]
                   : __ldcg(static_cast<const float*>(logits_raw) + static_cast<int64_t>(t) * E + e);
        if (x != x) x = -INFINITY;  // NaN
      }
      v[j] = x;
    }
    uint32_t taken = 0;
    float my_v = -INFINITY;  // lane r keeps the r-th pick
    int my_i = 0;
    float top0 = -INFINITY;
    for (int r = 0; r < k; ++r) {
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
      if (r == 0) top0 = bv;
      if (lane == r) {
        my_v = bv;
        my_i = bi;
      }
    }
    const float ex = lane < k ? __expf(my_v - top0) : 0.f;
    const float z = warp_sum(ex);
    if (lane < k) {
      ids[static_cast<int64_t>(t) * k + lane] = my_i;
      sids[(t - t0) * k + lane] = my_i;
      weights[static_cast<int64_t>(t) * k + lane] = ex / z;
    }
  }
  for (int e = threadIdx.x; e < E; e += blockDim.x) cursor[0][e] = 0;
  __syncthreads();
  // ---- this CTA's histogram -> scratch row
  for (int p = threadIdx.x; p < (t1 - t0) * k; p += blockDim.x) atomicAdd(&cursor[0][sids[p]], 1);
  __syncthreads();
  if (ncta == 1) {  // decode: everything is in this CTA, no scratch round trip
    for (int e = threadIdx.x; e < E; e += blockDim.x) offs[e] = cursor[0][e];
  } else {
    for (int e = threadIdx.x; e < E; e += blockDim.x) rows[static_cast<int64_t>(cta) * E + e] = cursor[0][e];
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(&scratch[0], 1) == ncta - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    // last CTA: per expert, exclusive prefix over CTAs (a warp an expert, lanes over CTA ranges)
    const int per = (ncta + 31) / 32;
    for (int e = warp; e < E; e += nwarps) {
      const int c0 = min(ncta, lane * per), c1 = min(ncta, c0 + per);
      int sum = 0;
      for (int c = c0; c < c1; ++c) sum += __ldcg(&rows[static_cast<int64_t>(c) * E + e]);
      const int incl = warp_inclusive_scan(sum);
      int run = incl - sum;
      for (int c = c0; c < c1; ++c) {
        const int n = __ldcg(&rows[static_cast<int64_t>(c) * E + e]);
        rows[static_cast<int64_t>(c) * E + e] = run;
        run += n;
      }
      if (lane == 31) offs[e] = incl;  // the expert's total, for now
    }
  }
  __syncthreads();
  if (warp == 0) {  // exclusive scan of the E <= 256 totals, 8 consecutive experts a lane
    int local[kPerLane];
    int sum = 0;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane * kPerLane + j;
      local[j] = e < E ? offs[e] : 0;
      sum += local[j];
    }
    const int incl = warp_inclusive_scan(sum);
    int run = incl - sum;
    __syncwarp();
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = lane * kPerLane + j;
      if (e < E) {
        counts[e] = local[j];
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
  __syncthreads();  // (no fence: nothing below reads what other CTAs wrote after their tickets)

  // ---- last CTA: stable scatter, a warp per source CTA's pairs
  const unsigned lt_mask = (1u << lane) - 1u;
  int32_t* my_cursor = cursor[CURSORS == 1 ? 0 : warp];  // CURSORS == 1: ncta == 1, only warp 0 below
  for (int c = warp; c < ncta; c += nwarps) {
    for (int e = lane; e < E; e += 32)
      my_cursor[e] = offs[e] + (ncta == 1 ? 0 : __ldcg(&rows[static_cast<int64_t>(c) * E + e]));
    __syncwarp();
    const int p0 = c * kTokensPerCta * k, p1 = min(T, (c + 1) * kTokensPerCta) * k;
    for (int base = p0; base < p1; base += 32) {
      const int p = base + lane;
      const bool active = p < p1;
      const int e = active ? (ncta == 1 ? sids[p] : __ldcg(&ids[p])) : -1;
      const unsigned peers = __match_any_sync(0xffffffffu, e);
      const int rank = __popc(peers & lt_mask);
      if (active) perm[my_cursor[e] + rank] = p;
      __syncwarp();
      if (active && rank == 0) my_cursor[e] += __popc(peers);
      __syncwarp();
    }
  }
  if (threadIdx.x == 0 && ncta > 1) scratch[0] = 0;  // the ticket, ready for the next launch
}

template <bool BF16>
__global__ void __launch_bounds__(1024) router_kernel(const void* __restrict__ logits_raw, int T, int E, int k,
                                                      int32_t* __restrict__ ids, float* __restrict__ weights,
                                                      int32_t* __restrict__ counts, int32_t* __restrict__ offsets,
                                                      int32_t* __restrict__ perm, int32_t* __restrict__ scratch) {
  pdl_wait();     // see kernels/pdl.h
  pdl_trigger();
  router_body<BF16>(logits_raw, T, E, k, ids, weights, counts, offsets, perm, scratch, blockIdx.x, gridDim.x);
}

// Gate linear + router in one launch (decode, T <= 32): CTA c's warps take experts c * warps ..,
// a warp streams its expert's gate row once (every 16-byte vector of it in flight: constant data,
// loaded before the launch wait) and forms that row's logit for each token, fp32 plus bias,
// rounded to bf16 as the unfused bf16 linear would. Then one CTA runs the router on them:
// - CLUSTER (GateForm::kCluster): the grid is one thread-block cluster; the logits go straight into
//   CTA 0's shared memory (distributed shared memory) and a cluster barrier hands them over;
// - otherwise (kTicket) the logits go to scratch and the last CTA to finish (atomic ticket in
//   scratch[0]) runs the router.
// Replaces a skinny-linear launch and the router launch.
// NORM: x is the block's output to add to `residual` first; each CTA forms the normed rows
// (add_rms_norm_row: the same arithmetic as the add_rms_norm kernel) in shared memory, CTA 0 also
// writes them and the new residual out, and the gate reads them from shared memory.
constexpr int kGateVecs = kGateMaxHidden / (32 * 8);   // 16-byte vectors of a gate row a lane holds
// Cluster form: 16 warps a CTA, so E <= 128 is at most 8 CTAs (a portable cluster size).
constexpr int kClusterWarps = 16;
static_assert(kGateClusterMaxExperts <= 8 * kClusterWarps, "a portable cluster has at most 8 CTAs");

template <bool NORM, int VPT, bool CLUSTER, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) gate_router_kernel(
    const bf16* x, int64_t x_stride, const bf16* __restrict__ w, const bf16* __restrict__ bias, int T,
    int K, int E, int k, int32_t* __restrict__ ids, float* __restrict__ weights, int32_t* __restrict__ counts,
    int32_t* __restrict__ offsets, int32_t* __restrict__ perm, int32_t* __restrict__ scratch, GateNormArgs nrm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int e = blockIdx.x * WARPS + warp;
  const int vecs = K / 8;
  uint4 wv[kGateVecs];
  const uint4* wrow = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(min(e, E - 1)) * K);
#pragma unroll
  for (int i = 0; i < kGateVecs; ++i) {
    const int v = lane + 32 * i;
    wv[i] = (e < E && v < vecs) ? __ldg(wrow + v) : make_uint4(0, 0, 0, 0);
  }
  [[maybe_unused]] __shared__ float slog[CLUSTER ? kGateNormMaxTokens * kRouterMaxExperts : 1];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Every CTA of the cluster has started before any writes into CTA 0's shared memory.
  if constexpr (CLUSTER) asm volatile("barrier.cluster.arrive.relaxed.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
#endif
  pdl_wait();     // see kernels/pdl.h
  pdl_trigger();
  float* logits = reinterpret_cast<float*>(scratch + 1);
  __shared__ bool is_last;
  [[maybe_unused]] __shared__ __align__(16) bf16 xs[NORM ? kGateNormMaxTokens * kGateVecs * 32 * 8 : 8];
  if constexpr (NORM) {
    __shared__ float red[32];
    const bool writer = blockIdx.x == 0;
    for (int t = 0; t < T; ++t) {
      bf16* out_row = nrm.out + static_cast<int64_t>(t) * K;
      add_rms_norm_row<VPT>(x, nrm.residual, nrm.scale, writer ? nrm.residual_out : nullptr, t, K, nrm.eps, nullptr,
                            0, nrm.threads, red, [&](int idx, const bf16x8& o) {
                              *reinterpret_cast<bf16x8*>(xs + t * K + idx * 8) = o;
                              if (writer) store_bf16x8(out_row + idx * 8, o);
                            });
    }
  }
  if (e < E) {
    const float b = bias ? __bfloat162float(bias[e]) : 0.f;
    for (int t = 0; t < T; ++t) {
      const uint4* xrow = NORM ? reinterpret_cast<const uint4*>(xs + t * K)
                               : reinterpret_cast<const uint4*>(x + static_cast<int64_t>(t) * x_stride);
      float acc = 0.f;
#pragma unroll
      for (int i = 0; i < kGateVecs; ++i) {
        const int v = lane + 32 * i;
        if (v < vecs) {
          const uint4 xv = xrow[v];   // a previous kernel's output: not __ldg (kernels/pdl.h)
          const __nv_bfloat162* xh = reinterpret_cast<const __nv_bfloat162*>(&xv);
          const __nv_bfloat162* wh = reinterpret_cast<const __nv_bfloat162*>(&wv[i]);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float2 a = __bfloat1622float2(xh[j]), c = __bfloat1622float2(wh[j]);
            acc = fmaf(a.x, c.x, acc);
            acc = fmaf(a.y, c.y, acc);
          }
        }
      }
      acc = warp_sum(acc);
      const float logit = __bfloat162float(__float2bfloat16(acc + b));
      if constexpr (CLUSTER) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        if (lane == 0) {
          const uint32_t dst = cluster_map(static_cast<uint32_t>(__cvta_generic_to_shared(slog + t * E + e)), 0);
          asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(dst), "f"(logit) : "memory");
        }
#endif
      } else if (lane == 0) {
        logits[static_cast<int64_t>(t) * E + e] = logit;
      }
    }
  }
  if constexpr (CLUSTER) {
    cluster_sync();
    if (blockIdx.x != 0) return;
    router_body<false, true, 1>(slog, T, E, k, ids, weights, counts, offsets, perm, nullptr, 0, 1);
    return;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(&scratch[0], 1) == static_cast<int>(gridDim.x) - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  router_body<false, false, 1>(logits, T, E, k, ids, weights, counts, offsets, perm, nullptr, 0, 1);
  if (threadIdx.x == 0) scratch[0] = 0;  // the ticket, ready for the next launch
}

}  // namespace

int64_t moe_router_scratch_size(int64_t T, int E) { return ((T + kTokensPerCta - 1) / kTokensPerCta) * E + 1; }

cudaError_t launch_moe_router(const void* logits, bool logits_bf16, int64_t T, int E, int k, int32_t* ids,
                              float* weights, int32_t* counts, int32_t* offsets, int32_t* perm, int32_t* scratch,
                              cudaStream_t stream) {
  if (E < 1 || E > kRouterMaxExperts || k < 1 || k > kRouterMaxTopK || k > E || T < 0 || T * k > INT32_MAX)
    return cudaErrorInvalidValue;
  const int64_t ncta = std::max<int64_t>(1, (T + kTokensPerCta - 1) / kTokensPerCta);
  const int threads = static_cast<int>(std::min<int64_t>(kTokensPerCta, std::max<int64_t>(1, T)) * 32);
  return launch_kernel(logits_bf16 ? router_kernel<true> : router_kernel<false>, dim3(static_cast<unsigned>(ncta)),
                       dim3(threads), 0, stream, logits, static_cast<int>(T), E, k, ids, weights, counts, offsets, perm,
                       scratch);
}

int64_t moe_gate_router_scratch_size(int64_t T, int E) { return 1 + T * E; }

const char* moe_gate_router_unsupported(GateForm form, int64_t T, int E) {
  if (form == GateForm::kTicket) return nullptr;
  if (form != GateForm::kCluster) return "unknown form";
  if (!device_is_sm90()) return "the cluster form needs an sm_90 GPU";
  if (T > kGateNormMaxTokens) return "the cluster form takes at most 2 tokens";
  if (E > kGateClusterMaxExperts) return "the cluster form takes at most 128 experts";
  return nullptr;
}

GateForm moe_gate_router_plan(int64_t T, int E) {
  return moe_gate_router_unsupported(GateForm::kCluster, T, E) ? GateForm::kTicket : GateForm::kCluster;
}

namespace {

template <bool NORM, int VPT>
cudaError_t launch_gate(const bf16* x, int64_t x_stride, const bf16* w, const bf16* bias, int T, int K, int E, int k,
                        int32_t* ids, float* weights, int32_t* counts, int32_t* offsets, int32_t* perm,
                        int32_t* scratch, GateForm form, cudaStream_t stream, const GateNormArgs& nrm) {
  if (form == GateForm::kCluster) {
    const int ctas16 = (E + kClusterWarps - 1) / kClusterWarps;
    return launch_kernel_cluster(ctas16, gate_router_kernel<NORM, VPT, true, kClusterWarps>, dim3(ctas16),
                                 dim3(kClusterWarps * 32), 0, stream, x, x_stride, w, bias, T, K, E, k, ids, weights,
                                 counts, offsets, perm, scratch, nrm);
  }
  constexpr int kWarps = 8;
  return launch_kernel(gate_router_kernel<NORM, VPT, false, kWarps>, dim3((E + kWarps - 1) / kWarps),
                       dim3(kWarps * 32), 0, stream, x, x_stride, w, bias, T, K, E, k, ids, weights, counts, offsets,
                       perm, scratch, nrm);
}

}  // namespace

cudaError_t launch_moe_gate_router(const bf16* x, int64_t x_stride, const bf16* w, const bf16* bias, int64_t T, int K,
                                   int E, int k, int32_t* ids, float* weights, int32_t* counts, int32_t* offsets,
                                   int32_t* perm, int32_t* scratch, GateForm form, cudaStream_t stream,
                                   const GateNormArgs* norm) {
  if (E < 1 || E > kRouterMaxExperts || k < 1 || k > kRouterMaxTopK || k > E || T < 1 || T > kGateRouterMaxTokens ||
      K % 8 != 0 || K > kGateMaxHidden || moe_gate_router_unsupported(form, T, E))
    return cudaErrorInvalidValue;
  if (norm == nullptr)
    return launch_gate<false, 1>(x, x_stride, w, bias, static_cast<int>(T), K, E, k, ids, weights, counts, offsets,
                                 perm, scratch, form, stream, GateNormArgs{});
  if (T > kGateNormMaxTokens || x_stride != K || !norm->residual || !norm->scale || !norm->out || !norm->residual_out)
    return cudaErrorInvalidValue;
  GateNormArgs nrm = *norm;
  const int vpt = K / 8 <= 256 ? 1 : 2;  // as launch_add_rms_norm picks it, so the results are bit-identical
  nrm.threads = rms_norm_threads(K, vpt);
  return vpt == 1 ? launch_gate<true, 1>(x, x_stride, w, bias, static_cast<int>(T), K, E, k, ids, weights, counts,
                                         offsets, perm, scratch, form, stream, nrm)
                  : launch_gate<true, 2>(x, x_stride, w, bias, static_cast<int>(T), K, E, k, ids, weights, counts,
                                         offsets, perm, scratch, form, stream, nrm);
}

}  // namespace gptoss
