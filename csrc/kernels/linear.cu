// Skinny bf16 linear (decode projections: qkv, out, router gate): memory-bound GEMV-like kernel.
// cuBLAS picks split-K tiles for M = 1 that reach ~55% of copy bandwidth on the qkv/out shapes of
// gpt-oss (plus a reduction launch); here each warp streams two weight rows, 4 x 16 bytes a lane in
// flight a row, against x staged once in shared memory, and reduces with shuffles.
#include "kernels/common.cuh"
#include "kernels/linear.h"

namespace gptoss {
namespace {

constexpr int kWarps = 8;
constexpr int kRows = 2;    // weight rows a warp
constexpr int kUnroll = 4;  // 16-byte vectors a lane a row in flight

template <int M>
__global__ void __launch_bounds__(kWarps * 32) linear_skinny_kernel(const bf16* __restrict__ x, int64_t x_stride,
                                                                     const bf16* __restrict__ w,
                                                                     const bf16* __restrict__ bias,
                                                                     bf16* __restrict__ out, int64_t out_stride, int N,
                                                                     int K, bool weight_constant) {
  extern __shared__ uint4 xs[];  // [M][K / 8]
  const int vecs = K / 8;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.x * kWarps + warp) * kRows;
  const uint4* wr[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) wr[r] = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(min(n0 + r, N - 1)) * K);
  uint4 wv[kRows][kUnroll];
  const auto load_w = [&](int v0) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int v = v0 + u * 32;
        wv[r][u] = v < vecs ? __ldg(wr[r] + v) : make_uint4(0, 0, 0, 0);
      }
  };
  // Constant weights: the first vectors are in flight before waiting on the previous kernel.
  if (weight_constant && n0 < N) load_w(lane);
  pdl_wait();     // see kernels/pdl.h
  for (int i = threadIdx.x; i < M * vecs; i += kWarps * 32) {
    const int m = i / vecs, v = i % vecs;
    xs[i] = __ldg(reinterpret_cast<const uint4*>(x + m * x_stride) + v);
  }
  __syncthreads();
  if (n0 >= N) return;
  float acc[kRows][M];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;
  for (int v0 = lane; v0 < vecs; v0 += 32 * kUnroll) {
    if (v0 != lane || !weight_constant) load_w(v0);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int v = v0 + u * 32;
      if (v >= vecs) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const uint4 xv = xs[m * vecs + v];
        const __nv_bfloat162* xh = reinterpret_cast<const __nv_bfloat162*>(&xv);
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const __nv_bfloat162* wh = reinterpret_cast<const __nv_bfloat162*>(&wv[r][u]);
          float s = acc[r][m];
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float2 a = __bfloat1622float2(xh[j]), b = __bfloat1622float2(wh[j]);
            s = fmaf(a.x, b.x, s);
            s = fmaf(a.y, b.y, s);
          }
          acc[r][m] = s;
        }
      }
    }
  }
  pdl_trigger();  // after the main loop: an early launch of the next grid slowed this one (placement)
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int n = n0 + r;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float s = warp_sum(acc[r][m]);
      if (lane == m && n < N) out[m * out_stride + n] = __float2bfloat16(s + (bias ? __bfloat162float(bias[n]) : 0.f));
    }
  }
}

template <int M>
cudaError_t launch_m(const bf16* x, int64_t xs, const bf16* w, const bf16* b, bf16* o, int64_t os, int N, int K,
                     bool wc, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(M) * K * 2;
  auto kernel = linear_skinny_kernel<M>;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const int ctas = (N + kWarps * kRows - 1) / (kWarps * kRows);
  return launch_kernel(kernel, dim3(ctas), dim3(kWarps * 32), smem, stream, x, xs, w, b, o, os, N, K, wc);
}

}  // namespace

cudaError_t launch_linear_skinny(const bf16* x, int64_t x_stride, const bf16* w, const bf16* bias, bf16* out,
                                 int64_t out_stride, int M, int N, int K, bool weight_constant, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (M > kSkinnyMaxM || K % 8 != 0 || static_cast<size_t>(M) * K * 2 > 96 * 1024) return cudaErrorInvalidValue;
  switch (M) {
    case 1: return launch_m<1>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream);
    case 2: return launch_m<2>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream);
    case 3: return launch_m<3>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream);
    case 4: return launch_m<4>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream);
    case 5: return launch_m<5>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream);
    case 6: return launch_m<6>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream);
    case 7: return launch_m<7>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream);
    default: return launch_m<8>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream);
  }
}

}  // namespace gptoss
