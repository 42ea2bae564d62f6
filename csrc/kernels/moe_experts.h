// MoE experts (torch-free launchers): the MXFP4 grouped GEMMs mlp1 (+ SwiGLU) and mlp2 (+ bias x
// routing weight) over the pairs the router grouped by expert, and the plan that picks their kernel.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace gptoss {

constexpr int kMoeMaxExperts = 256;
constexpr int kMoeRowMultiple = 16;   // R % 16 == 0 (16-row weight tiles)
constexpr int kMoeColMultiple = 64;   // K % 64 == 0 (64-column chunks)

// MXFP4 weights in the kernel layout (see gptoss_ext/mxfp4.py, which writes it once at load):
//   codes  [E, R/16, K/64, 32 lanes, 16 bytes]: the FP4 codes of a 16-row x 64-column tile in the
//          order of the mma.m16n8k16 A fragments (one 16-byte load per lane per tile);
//   scales [E, R/16, K/64, 8, 4 bytes]: E8M0 scales of rows (g, g+8) x the tile's two 32-column
//          groups, for g = lane / 4.
// Still 4.25 bits per weight. For mlp1 the rows of each 16-row tile are (gate j, linear j) pairs:
// tile row i < 8 is gate row 2*(8t+i), row i + 8 the linear row 2*(8t+i)+1, so SwiGLU is local.
struct MoeGemmArgs {
  const __nv_bfloat16* x;       // mlp1: [T, K] activations (pair p reads row p / k); mlp2: [P, K] (row p)
  const uint8_t* codes;         // kernel layout, see above
  const uint8_t* scales;
  const __nv_bfloat16* bias;    // [E, R] (checkpoint row order)
  const int32_t* perm;          // [P] pairs grouped by expert
  const int32_t* offsets;       // [E + 1]
  const float* route_weights;   // [P] (mlp2 only)
  __nv_bfloat16* out_h;         // mlp1: [P, R/2] SwiGLU output, bf16
  float* out_y;                 // mlp2: [P, R] weight * (x W^T + b), fp32
  int64_t P;                    // pairs = T * top_k
  int top_k;
  int E, R, K;
  float swiglu_alpha, swiglu_limit;
  bool routing_ready;           // perm / offsets (and route_weights) were complete before the previous
                                // kernel in the stream started (mlp2 right after its mlp1): the decode
                                // kernels read them before their programmatic-launch wait
  int max_scale;                // largest E8M0 scale byte of the weights (255 if unknown): <= 128
                                // lets prefill fold the scales into 16-bit weights
};

// The kernels of one GEMM (design and measurements in bench/RESULTS.md):
//  kDecodePersistent  one CTA an SM, each an equal share of the (16-row tile, 64-column chunk)
//                     blocks of all work items (expert, 8 pairs); 24 warps. Needs work items <= SMs.
//  kDecodeTiles       grid of (row tiles, work items of 8 pairs), 8 warps a CTA, mlp1 unsplit and
//                     mlp2's K over 2 warps.
//  kDecodeTilesSplitK the same with K split over twice the warps (mlp1 2, mlp2 4): more parallelism
//                     where the pairs reach few experts.
//  kSmallBatch        16-pair tiles, 4 warps (up to ~32 pairs an expert).
//  kPrefillWgmma64/128  Hopper wgmma, 128 weight rows x 64/128 tokens a CTA (sm_90a build on sm_90;
//                     R % 64 == 0, max_scale <= 128).
//  kPrefillMma        mma.sync, 128 rows x 64 tokens, scales folded into fp16 weights (max_scale <= 128).
//  kPrefillExact      mma.sync with per-32-column partial sums scaled in fp32: any scale.
enum class MoeKernel : int {
  kDecodePersistent = 0,
  kDecodeTiles,
  kDecodeTilesSplitK,
  kSmallBatch,
  kPrefillWgmma64,
  kPrefillWgmma128,
  kPrefillMma,
  kPrefillExact,
  kCount
};
const char* moe_kernel_name(MoeKernel k);

// What the plan needs to know of the current device.
struct MoeDevice {
  int sms = 0;          // streaming multiprocessors
  bool wgmma = false;   // sm_90 and this build's sm_90a code is what runs
};
MoeDevice moe_current_device();

// The plan, the one place the kernel of a GEMM is chosen (from the shapes and the device only,
// so a CUDA graph replays the same kernel): by pairs per expert, decode kernels (<= 8), the small-
// batch kernel (<= 32), else prefill (wgmma on Hopper, the mma.sync kernel elsewhere, the exact
// kernel when a scale is too large to fold). Measurements behind each threshold: bench/RESULTS.md.
MoeKernel moe_plan(const MoeGemmArgs& a, const MoeDevice& d);
// Why kernel k cannot serve `a` on d, or nullptr when it can.
const char* moe_kernel_unsupported(MoeKernel k, const MoeGemmArgs& a, const MoeDevice& d);

// mlp1 (with the SwiGLU epilogue) and mlp2 (bias and routing weight in the epilogue) with kernel k
// (which must serve a: moe_kernel_unsupported is nullptr). R % 16 == 0, K % 64 == 0, E <= 256.
cudaError_t launch_moe_mlp1(const MoeGemmArgs& a, MoeKernel k, cudaStream_t stream);
cudaError_t launch_moe_mlp2(const MoeGemmArgs& a, MoeKernel k, cudaStream_t stream);

}  // namespace gptoss
