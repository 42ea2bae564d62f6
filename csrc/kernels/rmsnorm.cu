// Fused residual add + RMSNorm, bf16 in/out, fp32 math.
//
// One CTA per row (token). Each thread owns VPT 16-byte vectors of the row, kept in registers
// between the sum-of-squares pass and the scaling pass, so every input byte is read once and every
// output byte written once: 4 x T x H x 2 bytes moved (2 with no residual). VPT is chosen so a row
// takes <= 256 threads (H = 2880: 360 vectors -> VPT 2, 192 threads); T = 1 is one launch of one CTA.
// The residual sum is rounded to bf16 before the statistics, so the result equals an unfused
// "residual = residual + x; out = rms_norm(residual)" up to fp32 summation order.
#include "kernels/common.cuh"
#include "kernels/rmsnorm.h"

namespace gptoss {
namespace {

template <int VPT>
__global__ void __launch_bounds__(256) add_rms_norm_kernel(
    const bf16* __restrict__ x,         // [T, H] or null
    const bf16* __restrict__ residual,  // [T, H]
    const bf16* __restrict__ scale,     // [H]
    bf16* __restrict__ out,             // [T, H]
    bf16* __restrict__ residual_out,    // [T, H] or null
    int H, float eps) {
  pdl_wait();     // see kernels/pdl.h
  pdl_trigger();
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const int nvec = H / 8;
  const bf16* r_row = residual + row * H;
  const bf16* x_row = x ? x + row * H : nullptr;

  float v[VPT][8];
  bf16x8 rv[VPT], xv[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {  // issue every load before any use
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < nvec) {
      rv[i] = load_bf16x8(r_row + idx * 8);
      if (x_row) xv[i] = load_bf16x8(x_row + idx * 8);
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < nvec) {
      unpack(rv[i], v[i]);
      if (x_row) {
        float a[8];
        unpack(xv[i], a);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[i][j] += a[j];
        const bf16x8 sum = pack(v[i]);  // round the residual to bf16 ...
        unpack(sum, v[i]);              // ... and normalise the rounded value
        if (residual_out) store_bf16x8(residual_out + row * H + idx * 8, sum);
      } else if (residual_out) {
        store_bf16x8(residual_out + row * H + idx * 8, rv[i]);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) ss += v[i][j] * v[i][j];
    }
  }
  const float inv = rsqrtf(block_sum(ss, red) / static_cast<float>(H) + eps);
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < nvec) {
      float s[8], o[8];
      unpack(load_bf16x8(scale + idx * 8), s);
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = (v[i][j] * inv) * s[j];
      store_bf16x8(out + row * H + idx * 8, pack(o));
    }
  }
}

template <int VPT>
cudaError_t launch(const bf16* x, const bf16* residual, const bf16* scale, bf16* out, bf16* residual_out,
                   int64_t T, int64_t H, float eps, cudaStream_t stream) {
  const int nvec = static_cast<int>(H / 8);
  const int threads = ((ceil_div(nvec, VPT) + 31) / 32) * 32;
  return launch_kernel(add_rms_norm_kernel<VPT>, dim3(static_cast<unsigned>(T)), dim3(threads), 0, stream, x, residual,
                       scale, out, residual_out, static_cast<int>(H), eps);
}

}  // namespace

cudaError_t launch_add_rms_norm(const bf16* x, const bf16* residual, const bf16* scale, bf16* out,
                                bf16* residual_out, int64_t T, int64_t H, float eps, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (H % 8 != 0 || H <= 0 || H > kRmsNormMaxHidden || T > INT32_MAX) return cudaErrorInvalidValue;
  const int64_t nvec = H / 8;
  if (nvec <= 256) return launch<1>(x, residual, scale, out, residual_out, T, H, eps, stream);
  if (nvec <= 512) return launch<2>(x, residual, scale, out, residual_out, T, H, eps, stream);
  if (nvec <= 1024) return launch<4>(x, residual, scale, out, residual_out, T, H, eps, stream);
  if (nvec <= 2048) return launch<8>(x, residual, scale, out, residual_out, T, H, eps, stream);
  return launch<16>(x, residual, scale, out, residual_out, T, H, eps, stream);
}

}  // namespace gptoss
