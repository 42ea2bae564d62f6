// MoE combine: out[t] = residual[t] + sum over the token's top-k rows of the experts' weighted
// outputs y (fp32, from mlp2), rounded to bf16 once. The model's decode and prefill fold this into
// the next residual add + RMSNorm instead (rms_norm.cu, launch_add_rms_norm with ysum): one launch less.
#include <algorithm>

#include "kernels/common.cuh"
#include "kernels/moe_combine.h"

namespace gptoss {
namespace {

__global__ void combine_kernel(const float* __restrict__ y, const bf16* __restrict__ residual, bf16* __restrict__ out,
                               int k, int H) {
  pdl_wait();     // see kernels/pdl.h
  pdl_trigger();
  const int64_t t = blockIdx.x;
  for (int h = (blockIdx.y * blockDim.x + threadIdx.x) * 4; h < H; h += gridDim.y * blockDim.x * 4) {
    float4 s = residual ? make_float4(__bfloat162float(residual[t * H + h]), __bfloat162float(residual[t * H + h + 1]),
                                      __bfloat162float(residual[t * H + h + 2]), __bfloat162float(residual[t * H + h + 3]))
                        : make_float4(0.f, 0.f, 0.f, 0.f);
    for (int j = 0; j < k; ++j) {
      const float4 v = *reinterpret_cast<const float4*>(y + (t * k + j) * H + h);
      s.x += v.x;
      s.y += v.y;
      s.z += v.z;
      s.w += v.w;
    }
    *reinterpret_cast<__nv_bfloat162*>(out + t * H + h) = __floats2bfloat162_rn(s.x, s.y);
    *reinterpret_cast<__nv_bfloat162*>(out + t * H + h + 2) = __floats2bfloat162_rn(s.z, s.w);
  }
}
}  // namespace

cudaError_t launch_moe_combine(const float* y, const bf16* residual, bf16* out, int64_t T, int k, int H,
                               cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (H % 4 != 0 || T > INT32_MAX) return cudaErrorInvalidValue;
  const int threads = 128;
  const dim3 grid(static_cast<unsigned>(T), std::max(1, std::min(8, H / (threads * 4))));
  return launch_kernel(combine_kernel, grid, dim3(threads), 0, stream, y, residual, out, k, H);
}

}  // namespace gptoss
