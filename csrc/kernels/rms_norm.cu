// Fused residual add + RMSNorm, bf16 in/out, fp32 math.
//
// One CTA per row (token). Each thread owns VPT 16-byte vectors of the row, kept in registers
// between the sum-of-squares pass and the scaling pass, so every input byte is read once and every
// output byte written once: 4 x T x H x 2 bytes moved (2 with no residual). VPT is chosen so a row
// takes <= 256 threads (H = 2880: 360 vectors -> VPT 2, 192 threads); T = 1 is one launch of one CTA.
// The residual sum is rounded to bf16 before the statistics, so the result equals an unfused
// "residual = residual + x; out = rms_norm(residual)" up to fp32 summation order.
#include "kernels/rms_norm.h"
#include "kernels/rms_norm.cuh"

namespace gptoss {
namespace {

template <int VPT>
__global__ void __launch_bounds__(256) add_rms_norm_kernel(
    const bf16* __restrict__ x,         // [T, H] or null
    const bf16* __restrict__ residual,  // [T, H]
    const bf16* __restrict__ scale,     // [H]
    bf16* __restrict__ out,             // [T, H]
    bf16* __restrict__ residual_out,    // [T, H] or null
    int H, float eps,
    const float* __restrict__ ysum,     // [T, k, H] fp32 summed into x's place (the MoE combine), or null
    int k) {
  pdl_wait();     // see kernels/pdl.h
  pdl_trigger();
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  bf16* out_row = out + row * H;
  add_rms_norm_row<VPT>(x, residual, scale, residual_out, row, H, eps, ysum, k, blockDim.x, red,
                        [&](int idx, const bf16x8& o) { store_bf16x8(out_row + idx * 8, o); });
}

template <int VPT>
cudaError_t launch(const bf16* x, const bf16* residual, const bf16* scale, bf16* out, bf16* residual_out,
                   int64_t T, int64_t H, float eps, cudaStream_t stream, const float* ysum, int k) {
  const int threads = rms_norm_threads(H, VPT);
  return launch_kernel(add_rms_norm_kernel<VPT>, dim3(static_cast<unsigned>(T)), dim3(threads), 0, stream, x, residual,
                       scale, out, residual_out, static_cast<int>(H), eps, ysum, k);
}

}  // namespace

cudaError_t launch_add_rms_norm(const bf16* x, const bf16* residual, const bf16* scale, bf16* out,
                                bf16* residual_out, int64_t T, int64_t H, float eps, cudaStream_t stream,
                                const float* ysum, int k) {
  if (T == 0) return cudaSuccess;
  if (H % 8 != 0 || H <= 0 || H > kRmsNormMaxHidden || T > INT32_MAX || (ysum && (x || k < 1)))
    return cudaErrorInvalidValue;
  const int64_t nvec = H / 8;
  if (nvec <= 256) return launch<1>(x, residual, scale, out, residual_out, T, H, eps, stream, ysum, k);
  if (nvec <= 512) return launch<2>(x, residual, scale, out, residual_out, T, H, eps, stream, ysum, k);
  if (nvec <= 1024) return launch<4>(x, residual, scale, out, residual_out, T, H, eps, stream, ysum, k);
  if (nvec <= 2048) return launch<8>(x, residual, scale, out, residual_out, T, H, eps, stream, ysum, k);
  return launch<16>(x, residual, scale, out, residual_out, T, H, eps, stream, ysum, k);
}

}  // namespace gptoss
