// MoE combine (torch-free launcher): the sum of each token's top-k expert outputs.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace gptoss {

// out[t] = (residual[t] if residual) + sum_s y[t*k + s], bf16 out; y fp32 [T*k, H], H % 4 == 0.
// (With the next residual add + RMSNorm in the same launch: launch_add_rms_norm's ysum, rms_norm.h.)
cudaError_t launch_moe_combine(const float* y, const __nv_bfloat16* residual, __nv_bfloat16* out, int64_t T, int k,
                               int H, cudaStream_t stream);

}  // namespace gptoss
