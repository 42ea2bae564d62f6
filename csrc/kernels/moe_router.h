// MoE router (torch-free launchers): top-k + softmax + grouping by expert, alone or fused with the
// gate linear (and the residual add + RMSNorm before it) for decode.
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
// launch_moe_router does with them. 1 <= T <= kGateRouterMaxTokens, K % 8 == 0, K <= kGateMaxHidden.
// scratch: moe_gate_router_scratch_size(T, E) int32, [0] zero before the first use (left zero).
// W is read before the programmatic-launch wait: no kernel of this library may write it.
// With `norm` (T <= kGateNormMaxTokens, x contiguous): the residual add + RMSNorm before the gate in
// the same launch, as launch_add_rms_norm(x, norm->residual, norm->scale, norm->out,
// norm->residual_out, T, K, norm->eps) computes it (bit-identical), and the gate reads norm->out's rows.
constexpr int kGateRouterMaxTokens = 32;
constexpr int kGateNormMaxTokens = 2;
constexpr int kGateMaxHidden = 3072;
struct GateNormArgs {
  const __nv_bfloat16* residual;  // [T, K]
  const __nv_bfloat16* scale;     // [K] RMSNorm weight
  __nv_bfloat16* out;             // [T, K] normed rows (the experts' input)
  __nv_bfloat16* residual_out;    // [T, K] residual + x
  float eps;
  int threads;                    // set by the launcher
};

// The two forms of the fused gate + router (the plan picks one; a caller may name one):
//  kGateTicket   every CTA writes its experts' logits to scratch; the last CTA to finish (atomic
//                ticket) runs the router on them. Any GPU.
//  kGateCluster  the grid is one thread-block cluster (sm_90); the logits go straight into CTA 0's
//                shared memory and a cluster barrier hands them over (a fence, an atomic and an L2
//                round trip less). T <= kGateNormMaxTokens and E <= kGateClusterMaxExperts.
enum class GateForm : int { kTicket = 0, kCluster = 1 };
constexpr int kGateClusterMaxExperts = 128;
// The form the plan takes on the current device; why `form` cannot serve (nullptr: it can).
GateForm moe_gate_router_plan(int64_t T, int E);
const char* moe_gate_router_unsupported(GateForm form, int64_t T, int E);

int64_t moe_gate_router_scratch_size(int64_t T, int E);
cudaError_t launch_moe_gate_router(const __nv_bfloat16* x, int64_t x_stride, const __nv_bfloat16* w,
                                   const __nv_bfloat16* bias, int64_t T, int K, int E, int k, int32_t* ids,
                                   float* weights, int32_t* counts, int32_t* offsets, int32_t* perm,
                                   int32_t* scratch, GateForm form, cudaStream_t stream,
                                   const GateNormArgs* norm = nullptr);

}  // namespace gptoss
