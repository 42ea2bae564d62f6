// Device helpers shared by the MXFP4 expert kernels (moe_experts_decode.cu, moe_experts_prefill.cu:
// mma.sync, sm_80+; moe_experts_prefill_sm90.cu: wgmma, sm_90a): the FP4 / E8M0 decode, the work-item
// lookup, the epilogue; and the launchers each of those files defines for moe_experts.cu's dispatch.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "kernels/common.cuh"
#include "kernels/moe_experts.h"

namespace gptoss {

// Launchers of the kernel files (moe_experts.cu checks the arguments and calls the one planned).
cudaError_t launch_moe_decode_persistent(const MoeGemmArgs& a, bool swiglu, int sms, cudaStream_t stream);
size_t moe_decode_persistent_smem(const MoeGemmArgs& a);
constexpr size_t kMoeDecodePersistentMaxSmem = 200 * 1024;
cudaError_t launch_moe_decode_tiles(const MoeGemmArgs& a, bool swiglu, bool split_k, cudaStream_t stream);
cudaError_t launch_moe_small_batch(const MoeGemmArgs& a, bool swiglu, cudaStream_t stream);
cudaError_t launch_moe_prefill_mma(const MoeGemmArgs& a, bool swiglu, cudaStream_t stream);
cudaError_t launch_moe_prefill_exact(const MoeGemmArgs& a, bool swiglu, cudaStream_t stream);
// moe_experts_prefill_sm90.cu (built with sm_90a): whether its kernels run here, and the launch.
bool moe_wgmma_loaded();
cudaError_t launch_moe_prefill_wgmma(const MoeGemmArgs& a, bool swiglu, int bn, cudaStream_t stream);

namespace {

constexpr int kMaxExperts = kMoeMaxExperts;

// Upper bound on the work items (an expert's tiles of bn pairs) of P pairs over E experts: with m
// experts non-empty, sum ceil(n_e / bn) <= (P + m (bn - 1)) / bn, largest at m = min(E, P).
inline int64_t max_work_items(int64_t P, int E, int bn) {
  const int64_t m = P < E ? P : E;
  return (P + m * (bn - 1)) / bn;
}

// The serial form of find_work: every thread scans a shared-memory copy of the offsets. The
// long-running prefill CTAs use it: with the warp form, mlp1 at T = 4096 took 2.51-2.53 ms against
// 2.12-2.14 ms (H200, same run); decode CTAs, whose prologue is on the critical path, use the warp
// form (at E = 128 the serial scan cost ~24 us a mlp1 + mlp2 pair).
__device__ __forceinline__ bool find_work_scan(const int32_t* offsets, int E, int64_t P, int bn,
                                               int item, int& expert, int& start, int& count, int& base) {
  __shared__ int32_t offs[kMaxExperts + 1];
  for (int e = threadIdx.x; e <= E; e += blockDim.x) offs[e] = offsets[e];
  __syncthreads();
  int acc = 0;
  for (int e = 0; e < E; ++e) {
    const int lo = offs[e], hi = offs[e + 1];
    if (lo < 0 || hi < lo || hi > P) return false;
    const int tiles = (hi - lo + bn - 1) / bn;
    if (item < acc + tiles) {
      expert = e;
      start = (item - acc) * bn;
      count = min(bn, hi - lo - start);
      base = lo + start;
      return true;
    }
    acc += tiles;
  }
  return false;
}

// The epilogue for one accumulator tile (rows tile*16 + g, +8; tokens 2q + t of n-tile n, whose
// pair indices are pair_of): mlp1 adds the bias and applies SwiGLU to (gate, linear) row pairs;
// mlp2 adds the bias and scales by the routing weight.
template <bool SWIGLU>
__device__ __forceinline__ void store_tile(const MoeGemmArgs& a, const bf16* bias, const int32_t* pair_of, int n,
                                           int tile, int g, int q, const float (&acc)[4]) {
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    const int p = pair_of[n * 8 + 2 * q + t];
    if (p < 0) continue;
    if constexpr (SWIGLU) {
      const int col = tile * 8 + g;  // output column (I index)
      float gate = acc[t] + __bfloat162float(bias[2 * col]);
      float lin = acc[2 + t] + __bfloat162float(bias[2 * col + 1]);
      gate = fminf(gate, a.swiglu_limit);
      lin = fminf(fmaxf(lin, -a.swiglu_limit), a.swiglu_limit);
      const float hval = gate / (1.f + __expf(-a.swiglu_alpha * gate)) * (lin + 1.f);
      a.out_h[static_cast<int64_t>(p) * (a.R / 2) + col] = __float2bfloat16(hval);
    } else {
      const int r0 = tile * 16 + g;
      const float w = a.route_weights[p];
      float* y = a.out_y + static_cast<int64_t>(p) * a.R;
      y[r0] = (acc[t] + __bfloat162float(bias[r0])) * w;
      y[r0 + 8] = (acc[2 + t] + __bfloat162float(bias[r0 + 8])) * w;
    }
  }
}

// The four fp16x2 A registers held by one word of the kernel layout (gptoss_ext/mxfp4.py): each
// code's 3 magnitude bits land at fp16 bits 9..11 and its sign at bit 15, i.e. E2M1 * 2^-14,
// exact (code 1 = 0.5 becomes an fp16 subnormal). 11 integer operations for 8 weights.
__device__ __forceinline__ void fp4x8_to_f16x2(uint32_t w, uint32_t (&r)[4]) {
  constexpr uint32_t kMag = 0x0E000E00u, kSign = 0x80008000u, kBoth = kMag | kSign;
  r[0] = ((w << 9) & kMag) | ((w << 2) & kSign);
  r[1] = ((w << 6) & kMag) | ((w << 1) & kSign);
  r[2] = (w << 3) & kBoth;
  r[3] = w & kBoth;
}

// E8M0 byte k of the scale word sc -> 2^(s - 127) as fp32 (s = 0 gives 0 instead of 2^-127, s = 255,
// NaN in E8M0, gives inf). Two integer operations; the decode's 2^-14 is undone once at the end.
template <int k>
__device__ __forceinline__ float e8m0_byte(uint32_t sc) {
  return __uint_as_float((k < 3 ? sc << (23 - 8 * k) : sc >> 1) & 0x7F800000u);
}

__device__ __forceinline__ uint32_t bf16x2_to_f16x2(uint32_t v) {
  const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  const __half2 h = __floats2half2_rn(f.x, f.y);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Per-lane share of the work-item scan (lane l: experts 8l .. 8l + 7, E <= 256) for items of bn pairs.
struct ItemScan {
  int lo[8], n[8], incl, tiles;
};

// The scan and the number of items (every lane gets it); false if the offsets are not a valid
// grouping of P pairs (then nothing is computed: no out-of-range access). The offsets are the
// router's output, so they are plain loads: an __ldg (ld.global.nc, an invariant load to the
// compiler) of an address known at entry was hoisted above the programmatic-launch wait, and under
// CUDA-graph replay the kernel read the previous step's routing. (ld.global.cg instead: every warp
// of 360 CTAs on the same L2 lines, 20b T=1 mlp1 + mlp2 31 -> 40 us.)
__device__ __forceinline__ bool item_scan(const int32_t* offsets, int E, int64_t P, int bn, ItemScan& s,
                                          int& total) {
  const int lane = threadIdx.x & 31, e0 = lane * 8;
  bool bad = false;
  int prev = e0 <= E ? offsets[e0] : 0;
  s.tiles = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int e = e0 + i;
    const int hi = e < E ? offsets[e + 1] : prev;
    bad |= prev < 0 || hi < prev || hi > P;
    s.lo[i] = prev;
    s.n[i] = hi - prev;
    s.tiles += (s.n[i] + bn - 1) / bn;
    prev = hi;
  }
  if (__any_sync(0xFFFFFFFFu, bad)) {
    s.incl = s.tiles = 0;
    return false;
  }
  s.incl = s.tiles;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xFFFFFFFFu, s.incl, o);
    if ((threadIdx.x & 31) >= o) s.incl += v;
  }
  total = __shfl_sync(0xFFFFFFFFu, s.incl, 31);
  return true;
}

// (expert, pair count, perm index of the first pair) of item `item` (< total), warp-collective.
__device__ __forceinline__ void item_info(const ItemScan& s, int bn, int item, int& expert, int& count, int& base,
                                          int* start = nullptr) {
  const int lane = threadIdx.x & 31;
  const unsigned owner = __ballot_sync(0xFFFFFFFFu, item >= s.incl - s.tiles && item < s.incl);
  int info[4] = {0, 0, 0, 0};
  int acc = s.incl - s.tiles;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int t = (s.n[i] + bn - 1) / bn;
    if (item >= acc && item < acc + t) {
      const int st = (item - acc) * bn;
      info[0] = lane * 8 + i;
      info[1] = min(bn, s.n[i] - st);
      info[2] = s.lo[i] + st;
      info[3] = st;
    }
    acc += t;
  }
  const int src = owner ? __ffs(owner) - 1 : 0;
  expert = __shfl_sync(0xFFFFFFFFu, info[0], src);
  count = owner ? __shfl_sync(0xFFFFFFFFu, info[1], src) : 0;
  base = __shfl_sync(0xFFFFFFFFu, info[2], src);
  if (start) *start = __shfl_sync(0xFFFFFFFFu, info[3], src);
}

// Which (expert, first pair, count, perm index of the first pair) work item `item` is, for tiles of
// bn pairs; false if the item is past the end or the offsets are not a valid grouping. One warp
// does it (every warp of a CTA gets the same answer).
__device__ __forceinline__ bool find_work(const int32_t* offsets, int E, int64_t P, int bn, int item, int& expert,
                                          int& start, int& count, int& base) {
  ItemScan s;
  int total;
  if (!item_scan(offsets, E, P, bn, s, total) || item >= total) return false;
  item_info(s, bn, item, expert, count, base, &start);
  return true;
}

}  // namespace
}  // namespace gptoss
