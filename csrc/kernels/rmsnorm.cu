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
    int H, float eps,
    const float* __restrict__ ysum,     // [T, k, H] fp32 summed into x's place (the MoE combine), or null
    int k) {
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
  if (ysum) {  // r = residual + sum over the token's k rows of y (fp32), rounded once to bf16
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int idx = threadIdx.x + i * blockDim.x;
      if (idx < nvec) {
        float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int j = 0; j < k; ++j) {
          const float4* yp = reinterpret_cast<const float4*>(ysum + (row * k + j) * H + idx * 8);
          const float4 y0 = yp[0], y1 = yp[1];
          a[0] += y0.x; a[1] += y0.y; a[2] += y0.z; a[3] += y0.w;
          a[4] += y1.x; a[5] += y1.y; a[6] += y1.z; a[7] += y1.w;
        }
        unpack(rv[i], v[i]);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[i][j] += a[j];
      }
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < nvec) {
      if (ysum) {
        const bf16x8 sum = pack(v[i]);
        unpack(sum, v[i]);
        if (residual_out) store_bf16x8(residual_out + row * H + idx * 8, sum);
#pragma unroll
        for (int j = 0; j < 8; ++j) ss += v[i][j] * v[i][j];
        continue;
      }
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
                   int64_t T, int64_t H, float eps, cudaStream_t stream, const float* ysum, int k) {
  const int nvec = static_cast<int>(H / 8);
  const int threads = ((ceil_div(nvec, VPT) + 31) / 32) * 32;
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
