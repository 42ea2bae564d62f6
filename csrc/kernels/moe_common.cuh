// Device helpers shared by the MXFP4 expert GEMM kernels (moe_mxfp4.cu: mma.sync, any sm_80+;
// moe_mxfp4_sm90.cu: wgmma, sm_90a): the work-item lookup and the epilogue.
#pragma once
#include <cuda_bf16.h>
#include <cstdint>

#include "kernels/common.cuh"
#include "kernels/moe.h"

namespace gptoss {
namespace {

constexpr int kMaxExperts = 256;

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

}  // namespace
}  // namespace gptoss
