// Skinny bf16 linear (decode projections: qkv, out, router gate): memory-bound GEMV-like kernel.
// cuBLAS picks split-K tiles for M = 1 that reach ~55% of copy bandwidth on the qkv/out shapes of
// gpt-oss (plus a reduction launch); here each warp streams two weight rows, 4 x 16 bytes a lane in
// flight a row, against x staged once in shared memory, and reduces with shuffles.
#include "kernels/kv_cache.cuh"
#include "kernels/linear.h"

namespace gptoss {
namespace {

constexpr int kWarps = 8;
constexpr int kRows = 2;    // weight rows a warp
constexpr int kUnroll = 4;  // 16-byte vectors a lane a row in flight

template <int M>
__global__ void __launch_bounds__(kWarps * 32) linear_skinny_kernel(const bf16* x, int64_t x_stride,
                                                                     const bf16* __restrict__ w,
                                                                     const bf16* __restrict__ bias,
                                                                     bf16* __restrict__ out, int64_t out_stride, int N,
                                                                     int K, bool weight_constant, LinearRope rope) {
  extern __shared__ uint4 xs[];  // [M][K / 8]
  const int vecs = K / 8;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // This warp's two rows: consecutive, or with the RoPE epilogue the pair (d, d + D/2) of one head.
  const int pair = blockIdx.x * kWarps + warp;
  const bool roped = rope.positions != nullptr;
  const int half = roped ? rope.D / 2 : 1;
  const int head = roped ? pair / half : 0, d = roped ? pair % half : 0;
  int rown[kRows];
  rown[0] = roped ? head * rope.D + d : pair * kRows;
  rown[1] = roped ? rown[0] + half : rown[0] + 1;
  const int n0 = rown[0];
  const uint4* wr[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) wr[r] = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(min(rown[r], N - 1)) * K);
  // The rotation of (d, d + D/2) for token `lane` (< M), as launch_rope forms it, and its cache row.
  float rc = 0.f, rs = 0.f;
  int64_t slot = -1;
  if (roped && lane < M && n0 < N) {
    slot = rope.cache.slots[lane];
    if (head < rope.Hq + rope.Hkv) {
      double sn, cs;
      sincos(static_cast<double>(rope.positions[lane]) * rope.inv_freq[d], &sn, &cs);
      rc = static_cast<float>(cs * rope.concentration);
      rs = static_cast<float>(sn * rope.concentration);
    }
  }
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
    xs[i] = reinterpret_cast<const uint4*>(x + m * x_stride)[v];   // not __ldg: see kernels/pdl.h
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
  if (!roped) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int n = n0 + r;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float s = warp_sum(acc[r][m]);
        if (lane == m && n < N) out[m * out_stride + n] = __float2bfloat16(s + (bias ? __bfloat162float(bias[n]) : 0.f));
      }
    }
    return;
  }
  // RoPE epilogue: lane m has token m's two outputs (bf16-rounded as the plain linear stores them).
  bf16 y[kRows];
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float s = warp_sum(acc[r][m]);
      if (lane == m) y[r] = __float2bfloat16(s + (bias ? __bfloat162float(bias[rown[r]]) : 0.f));
    }
  }
  if (lane >= M || n0 >= N) return;
  const bool to_cache = kv_slot_valid(rope.cache, slot);
  if (head < rope.Hq + rope.Hkv) {
    const float x1 = __bfloat162float(y[0]), x2 = __bfloat162float(y[1]);
    y[0] = __float2bfloat16(rope_rot1(x1, x2, rc, rs));
    y[1] = __float2bfloat16(rope_rot2(x1, x2, rc, rs));
  }
  out[lane * out_stride + rown[0]] = y[0];
  out[lane * out_stride + rown[1]] = y[1];
  if (to_cache && head >= rope.Hq) {
    const bool is_k = head < rope.Hq + rope.Hkv;
    bf16* dst = kv_cache_head(is_k ? rope.cache.k_cache : rope.cache.v_cache, slot, rope.Hkv,
                              head - rope.Hq - (is_k ? 0 : rope.Hkv), rope.D) + d;
    dst[0] = y[0];
    dst[half] = y[1];
  }
}

template <int M>
cudaError_t launch_m(const bf16* x, int64_t xs, const bf16* w, const bf16* b, bf16* o, int64_t os, int N, int K,
                     bool wc, cudaStream_t stream, const LinearRope& rope) {
  const size_t smem = static_cast<size_t>(M) * K * 2;
  auto kernel = linear_skinny_kernel<M>;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const int ctas = (N + kWarps * kRows - 1) / (kWarps * kRows);
  return launch_kernel(kernel, dim3(ctas), dim3(kWarps * 32), smem, stream, x, xs, w, b, o, os, N, K, wc, rope);
}

}  // namespace

cudaError_t launch_linear_skinny(const bf16* x, int64_t x_stride, const bf16* w, const bf16* bias, bf16* out,
                                 int64_t out_stride, int M, int N, int K, bool weight_constant, cudaStream_t stream,
                                 const LinearRope* rope) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (M > kSkinnyMaxM || K % 8 != 0 || static_cast<size_t>(M) * K * 2 > kSkinnyMaxXBytes) return cudaErrorInvalidValue;
  const LinearRope rp = rope ? *rope : LinearRope();
  if (rope && (!rope->positions || !rope->inv_freq || !rope->cache.slots || !rope->cache.k_cache || !rope->cache.v_cache ||
               rope->D < 2 || rope->D % 2 != 0 || rope->Hq < 1 || rope->Hkv < 1 ||
               static_cast<int64_t>(rope->Hq + 2 * rope->Hkv) * rope->D != N))
    return cudaErrorInvalidValue;
  switch (M) {
    case 1: return launch_m<1>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream, rp);
    case 2: return launch_m<2>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream, rp);
    case 3: return launch_m<3>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream, rp);
    case 4: return launch_m<4>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream, rp);
    case 5: return launch_m<5>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream, rp);
    case 6: return launch_m<6>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream, rp);
    case 7: return launch_m<7>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream, rp);
    default: return launch_m<8>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream, rp);
  }
}

}  // namespace gptoss
