// MoE kernels (torch-free launchers): router top-k + grouping, MXFP4 grouped GEMMs, combine.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace gptoss {

constexpr int kRouterMaxExperts = 256;
constexpr int kRouterMaxTopK = 8;

// Router, one launch. For each token the top-k logits (descending, ties to the lower expert id,
// NaN treated as -inf) and the softmax over them; then the grouping a grouped GEMM needs:
// counts[e], offsets[e] (exclusive prefix sum, offsets[E] = T*k) and perm: the flat pair indices
// p = t*k + slot sorted by expert, stable (ascending p within an expert). Deterministic.
//   logits [T, E] (bf16 if logits_bf16 else fp32); ids [T, k] int32; weights [T, k] fp32;
//   counts [E], offsets [E + 1], perm [T * k] int32.  E <= 256, k <= 8, k <= E.
//   scratch: moe_router_scratch_size(T, E) int32: [0] a ticket that must be zero before the first
//   use (the kernel leaves it zero), then per-CTA histograms (overwritten every launch). Do not
//   share one scratch between launches that may overlap.
int64_t moe_router_scratch_size(int64_t T, int E);
cudaError_t launch_moe_router(const void* logits, bool logits_bf16, int64_t T, int E, int k, int32_t* ids,
                              float* weights, int32_t* counts, int32_t* offsets, int32_t* perm, int32_t* scratch,
                              cudaStream_t stream);

// Gate linear + router in one launch, for decode: logits = bf16(x W^T + bias) (x [T, K] bf16, row
// stride x_stride; W [E, K] bf16 contiguous; bias [E] or null), then exactly what
// launch_moe_router does with them. 1 <= T <= kGateRouterMaxTokens, K % 8 == 0, K <= 3072.
// scratch: moe_gate_router_scratch_size(T, E) int32, [0] zero before the first use (left zero).
// W is read before the programmatic-launch wait: no kernel of this library may write it.
// With `norm` (T <= kGateNormMaxTokens, x contiguous): the residual add + RMSNorm before the gate in
// the same launch, as launch_add_rms_norm(x, norm->residual, norm->scale, norm->out,
// norm->residual_out, T, K, norm->eps) computes it (bit-identical), and the gate reads norm->out's rows.
constexpr int kGateRouterMaxTokens = 32;
constexpr int kGateNormMaxTokens = 2;
struct GateNormArgs {
  const __nv_bfloat16* residual;  // [T, K]
  const __nv_bfloat16* scale;     // [K] RMSNorm weight
  __nv_bfloat16* out;             // [T, K] normed rows (the experts' input)
  __nv_bfloat16* residual_out;    // [T, K] residual + x
  float eps;
  int threads;                    // set by the launcher
};
int64_t moe_gate_router_scratch_size(int64_t T, int E);
cudaError_t launch_moe_gate_router(const __nv_bfloat16* x, int64_t x_stride, const __nv_bfloat16* w,
                                   const __nv_bfloat16* bias, int64_t T, int K, int E, int k, int32_t* ids,
                                   float* weights, int32_t* counts, int32_t* offsets, int32_t* perm,
                                   int32_t* scratch, cudaStream_t stream, const GateNormArgs* norm = nullptr);

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
                                // kernel reads them before its programmatic-launch wait
  int max_scale;                // largest E8M0 scale byte of the weights (255 if unknown): <= 128
                                // lets prefill fold the scales into fp16 weights
  bool slow_batches;            // set by the launcher (A/B, GPTOSS_MOE_FAST_BATCH=0): the decode kernels
                                // take their per-chunk path for every batch (no one-block fast path)
};

// mlp1 (with the SwiGLU epilogue) and mlp2 (bias and routing weight in the epilogue).
// R % 16 == 0, K % 64 == 0, E <= 256. The tile shapes are chosen from P (decode: 8 tokens a tile and
// split-K across warps; prefill: 64 x 64 tiles).
cudaError_t launch_moe_mlp1(const MoeGemmArgs& a, cudaStream_t stream);
cudaError_t launch_moe_mlp2(const MoeGemmArgs& a, cudaStream_t stream);

// mlp1 then mlp2 (a2: h as x, routing_ready) of one MoE block: launch_moe_mlp1, launch_moe_mlp2.
cudaError_t launch_moe_experts(const MoeGemmArgs& a1, const MoeGemmArgs& a2, cudaStream_t stream);

// Prefill on Hopper (moe_mxfp4_sm90.cu, built when sm_90a is in the architecture list): wgmma with
// the decoded weights as the register A operand, 128 weight rows x bn tokens a CTA (bn = 64, 128 or
// 256). Usable when the device is sm_90, this build has the sm_90a code, R % 64 == 0 and
// max_scale <= 128; launch_moe_mlp1/2 choose it for prefill where it is usable.
bool moe_wgmma_usable(const MoeGemmArgs& a);
cudaError_t launch_moe_wgmma(const MoeGemmArgs& a, bool swiglu, int bn, cudaStream_t stream);

// out[t] = (residual[t] if residual) + sum_s y[t*k + s], bf16 out; y fp32 [T*k, H].
cudaError_t launch_moe_combine(const float* y, const __nv_bfloat16* residual, __nv_bfloat16* out, int64_t T,
                               int k, int H, cudaStream_t stream);

}  // namespace gptoss
