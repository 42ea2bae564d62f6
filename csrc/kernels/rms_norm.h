// Fused residual add + RMSNorm (torch-free launcher).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace gptoss {

// Largest hidden size the kernel serves (16 vectors of 8 per thread, 256 threads).
constexpr int64_t kRmsNormMaxHidden = 16 * 8 * 256;

// r = residual + x (rounded to bf16; x may be null for a plain RMSNorm, then r = residual),
// out = bf16(r * rsqrt(mean(r^2) + eps) * scale), residual_out = r (skipped when null).
//   x, residual, out, residual_out: [T, H] bf16 contiguous, 16-byte aligned; scale: [H] bf16.
//   H % 8 == 0 and H <= kRmsNormMaxHidden.
// With ysum ([T, k, H] fp32 contiguous, 16-byte aligned; x must then be null), r = residual +
// sum_j ysum[t, j] in fp32, rounded once: the MoE combine fused into the next residual add + norm.
cudaError_t launch_add_rms_norm(const __nv_bfloat16* x, const __nv_bfloat16* residual,
                                const __nv_bfloat16* scale, __nv_bfloat16* out,
                                __nv_bfloat16* residual_out, int64_t T, int64_t H, float eps,
                                cudaStream_t stream, const float* ysum = nullptr, int k = 0);

}  // namespace gptoss
