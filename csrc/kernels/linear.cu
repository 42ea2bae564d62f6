// Skinny bf16 linear (decode projections: qkv, out, router gate): memory-bound GEMV-like kernel.
// cuBLAS picks split-K tiles for M = 1 that reach ~55% of copy bandwidth on the qkv/out shapes of
// gpt-oss (plus a reduction launch); here each warp streams two weight rows, 4 x 16 bytes a lane in
// flight a row, against x staged once in shared memory, and reduces with shuffles.
#include <algorithm>
#include <cstdlib>

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

// ---- sm_90: the weight streamed into shared memory by bulk copies (TMA), M <= 2 ----------------
//
// One CTA an SM, each a contiguous slice of ~N / SMs rows, in groups of 4 rows (a group is one
// contiguous bulk copy of 4 x K x 2 bytes). Up to ~200 KB of groups are in flight at once, and for
// constant weights they are issued before the programmatic-launch wait, so most of a projection
// streams in while the kernel before it (the norm, the attention) still runs; after the wait only
// the rest of the stream, the dot products and one barrier a group remain. 8 warps: 4 rows x 2 K
// halves a group, x in registers (the same columns every group).
constexpr int kStreamRows = 4;                // rows a group
constexpr int kStreamMaxVpl = 8;              // 16-byte vectors a lane a half row: K <= 2 * 32 * 8 * 8 = 4096
constexpr int kStreamMaxStages = 12;
constexpr int kStreamSmem = 200 * 1024;       // bytes of groups in flight a CTA

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

template <int M>
__global__ void __launch_bounds__(256, 1) linear_stream_kernel(const bf16* __restrict__ x, int64_t x_stride,
                                                               const bf16* __restrict__ w,
                                                               const bf16* __restrict__ bias, bf16* __restrict__ out,
                                                               int64_t out_stride, int N, int K, int rows_per_cta,
                                                               int stages, bool weight_constant) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char wsm[];   // stages x [kStreamRows][K] bf16
  __shared__ __align__(8) uint64_t bars[kStreamMaxStages];
  __shared__ float red[2][8][M];
  const int r0 = blockIdx.x * rows_per_cta, r1 = min(N, r0 + rows_per_cta);
  const int groups = r1 > r0 ? (r1 - r0 + kStreamRows - 1) / kStreamRows : 0;
  const uint32_t gbytes = static_cast<uint32_t>(kStreamRows) * K * 2;
  const auto issue = [&](int g) {  // thread 0: group g into its stage
    const uint32_t bytes = static_cast<uint32_t>(min(kStreamRows, r1 - r0 - g * kStreamRows)) * K * 2;
    const uint32_t bar = smem_u32(&bars[g % stages]);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_u32(wsm + static_cast<size_t>(g % stages) * gbytes)),
                 "l"(w + static_cast<int64_t>(r0 + g * kStreamRows) * K), "r"(bytes), "r"(bar)
                 : "memory");
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(&bars[s])) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    if (weight_constant)
      for (int g = 0; g < min(stages, groups); ++g) issue(g);
  }
  pdl_wait();     // see kernels/pdl.h
  if (threadIdx.x == 0 && !weight_constant)
    for (int g = 0; g < min(stages, groups); ++g) issue(g);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row_in_group = warp & 3, half = warp >> 2;
  const int vecs = K / 8, hv = (vecs + 1) / 2;
  const int v_begin = half * hv, v_end = min(vecs, v_begin + hv);
  uint4 xr[M][kStreamMaxVpl];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int i = 0; i < kStreamMaxVpl; ++i) {
      const int v = v_begin + lane + 32 * i;
      xr[m][i] = v < v_end ? __ldg(reinterpret_cast<const uint4*>(x + m * x_stride) + v) : make_uint4(0, 0, 0, 0);
    }
  __syncthreads();  // the barriers' initialisation is visible to every thread
  for (int g = 0; g < groups; ++g) {
    const int s = g % stages;
    const uint32_t bar = smem_u32(&bars[s]), parity = (g / stages) & 1;
    asm volatile(
        "{\n .reg .pred p;\n WAIT_%=:\n mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        " @!p bra WAIT_%=;\n}\n" ::"r"(bar), "r"(parity) : "memory");
    const uint4* wrow = reinterpret_cast<const uint4*>(wsm + static_cast<size_t>(s) * gbytes +
                                                       static_cast<size_t>(row_in_group) * K * 2);
    const bool ok = r0 + g * kStreamRows + row_in_group < r1;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    if (ok) {
#pragma unroll
      for (int i = 0; i < kStreamMaxVpl; ++i) {
        const int v = v_begin + lane + 32 * i;
        if (v < v_end) {
          const uint4 wv = wrow[v];
          const __nv_bfloat162* wh = reinterpret_cast<const __nv_bfloat162*>(&wv);
#pragma unroll
          for (int m = 0; m < M; ++m) {
            const __nv_bfloat162* xh = reinterpret_cast<const __nv_bfloat162*>(&xr[m][i]);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const float2 a = __bfloat1622float2(xh[j]), b = __bfloat1622float2(wh[j]);
              acc[m] = fmaf(a.x, b.x, acc[m]);
              acc[m] = fmaf(a.y, b.y, acc[m]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const float t = warp_sum(acc[m]);
      if (lane == 0) red[g & 1][warp][m] = t;
    }
    __syncthreads();  // stage s is read by every warp; the partial sums are in red[g & 1]
    if (threadIdx.x == 0 && g + stages < groups) {
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      issue(g + stages);
    }
    if (threadIdx.x < kStreamRows * M) {
      const int r = threadIdx.x % kStreamRows, m = threadIdx.x / kStreamRows;
      const int n = r0 + g * kStreamRows + r;
      if (n < r1) {
        const float v = red[g & 1][r][m] + red[g & 1][r + 4][m];
        out[m * out_stride + n] = __float2bfloat16(v + (bias ? __bfloat162float(bias[n]) : 0.f));
      }
    }
  }
  pdl_trigger();
#endif
}

int sm_count() {
  static int count[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  if (count[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) n = 0;
    count[dev] = n;
  }
  return count[dev];
}

bool is_sm90() {
  static int major_of[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (major_of[dev] == 0) {
    int major = -1;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) major = -1;
    major_of[dev] = major;
  }
  return major_of[dev] == 9;
}

// GPTOSS_LINEAR_STREAM=0: the register-streaming kernel for every M (A/B comparisons).
bool stream_disabled() {
  const char* e = std::getenv("GPTOSS_LINEAR_STREAM");
  return e && e[0] == '0';
}

template <int M>
cudaError_t launch_stream(const bf16* x, int64_t xs, const bf16* w, const bf16* b, bf16* o, int64_t os, int N, int K,
                          bool wc, cudaStream_t stream) {
  const int sms = sm_count();
  const int rows_per_cta = std::max(kStreamRows, (N + sms - 1) / sms);
  const int ctas = (N + rows_per_cta - 1) / rows_per_cta;
  const int groups = (rows_per_cta + kStreamRows - 1) / kStreamRows;
  const int gbytes = kStreamRows * K * 2;
  const int stages = std::min({groups, kStreamMaxStages, kStreamSmem / gbytes});
  const size_t smem = static_cast<size_t>(stages) * gbytes;
  auto kernel = linear_stream_kernel<M>;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  return launch_kernel(kernel, dim3(ctas), dim3(256), smem, stream, x, xs, w, b, o, os, N, K, rows_per_cta, stages, wc);
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
  // sm_90 and K <= 4096 (x in registers, one group a stage at least): the bulk-copy streaming kernel
  // for 1-2 rows.
  if (M <= 2 && K <= 2 * 32 * 8 * kStreamMaxVpl && is_sm90() && sm_count() > 0 && !stream_disabled() &&
      reinterpret_cast<uintptr_t>(w) % 16 == 0)
    return M == 1 ? launch_stream<1>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream)
                  : launch_stream<2>(x, x_stride, w, bias, out, out_stride, N, K, weight_constant, stream);
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
