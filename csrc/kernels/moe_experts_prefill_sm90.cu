// MXFP4 expert GEMMs for prefill on Hopper (sm_90a). Built only when sm_90a is in the architecture
// list; moe_plan (moe_experts.cu) picks it where moe_wgmma_loaded() says the sm_90a code runs.
//
// Warpgroup MMA (wgmma) with the weights as the register A operand and the routed tokens'
// activations as B from shared memory.
//
// A CTA is two warpgroups (8 warps) and computes 128 weight rows (each warpgroup 64, each warp its
// 16-row tile) x BN tokens of one expert. Per 64-column chunk of K:
//   - the BN activation rows (gathered through the routing permutation) arrive in shared memory by
//     cp.async, 16 bytes a copy, in the 128-byte-swizzled K-major layout a wgmma descriptor reads
//     (4 stages, copies issued two chunks ahead, so a stage is rewritten only after both
//     warpgroups' MMAs that read it have completed);
//   - each warp decodes its tile's FP4 codes (kernel layout, gptoss_ext/mxfp4.py: one 16-byte load a
//     lane a chunk, fetched kWgDepth chunks ahead into registers) straight into bf16 A fragments:
//     every E2M1 value times 2^-126 is a bf16 bit pattern (magnitude bits at 6..8, sign at 15), and
//     one bf16x2 multiply by 2^(s - 1) applies the E8M0 scale s exactly (s <= 128: the host's
//     condition, as for the mma.sync prefill kernel);
//   - four wgmma m64nBNk16 per chunk, each decoded while the previous one runs (two A register
//     sets; wgmma.wait_group 1 after each commit).
// The activations stay bf16 (no conversion), the weights are never expanded outside registers.
// The epilogue (bias + SwiGLU for mlp1, bias x routing weight for mlp2) is the mma.sync kernels'.
// Token tiles of 64 or 128 (moe_plan: 128 where experts average >= 128 routed tokens).
#include <algorithm>
#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/mma.cuh"
#include "kernels/moe_experts.cuh"
#include "kernels/wgmma.cuh"

namespace gptoss {
namespace {

constexpr int kWgThreads = 256;   // two warpgroups
constexpr int kWgRows = 128;      // weight rows a CTA
constexpr int kWgStages = 4;      // activation stages in shared memory (copies run 2 chunks ahead)

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int kWgDepth = 3;       // weight chunks in registers ahead of the one computed

// The four bf16x2 A registers held by one word of the kernel layout: the same fields as the fp16
// decode in moe_experts.cuh (magnitudes in four 3-bit fields at bits 0..11 / 16..27, signs at 12..15 /
// 28..31), moved to bf16's bits 6..8 (exponent low bits + top mantissa bit) and 15: E2M1 * 2^-126,
// exact (code 1 = 0.5 becomes the bf16 subnormal 2^-127).
__device__ __forceinline__ void fp4x8_to_bf16x2(uint32_t w, uint32_t (&r)[4]) {
  constexpr uint32_t kMag = 0x01C001C0u, kSign = 0x80008000u;
  r[0] = ((w << 6) & kMag) | ((w << 2) & kSign);
  r[1] = ((w << 3) & kMag) | ((w << 1) & kSign);
  r[2] = (w & kMag) | ((w << 3) & kSign);
  r[3] = ((w >> 3) & kMag) | (w & kSign);
}

// 2^(s - 1) in both bf16 halves, for byte i of e = scales + 126 per byte (s <= 128: no carry): the
// byte goes to bits 8..15 and 24..31 (prmt with zeros), one right shift puts it at the exponent.
template <int i>
__device__ __forceinline__ uint32_t scale_bf16x2(uint32_t e) {
  uint32_t d;
  asm("prmt.b32 %0, %1, 0, %2;\n" : "=r"(d) : "r"(e), "n"((i << 12) | (4 << 8) | (i << 4) | 4));
  return d >> 1;
}

__device__ __forceinline__ uint32_t hmul2_bf16(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}
#endif  // sm_90a device code

template <int BN, bool SWIGLU>
__global__ void __launch_bounds__(kWgThreads, BN <= 128 ? 2 : 1) moe_wgmma_kernel(MoeGemmArgs a) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  pdl_wait();     // see kernels/pdl.h
  constexpr int kStageBytes = BN * 128;
  constexpr int kRowsPerThread = BN * 8 / kWgThreads;   // 16-byte copies a thread a stage
  extern __shared__ uint8_t smem_raw[];
  __shared__ int32_t pair_of[BN];
  __shared__ int32_t xrow[BN];   // activation row of each token column (-1: none)
  int expert, start, count, base;
  if (!find_work_scan(a.offsets, a.E, a.P, BN, blockIdx.y, expert, start, count, base)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2;
  const int row_tiles = a.R / 16, chunks = a.K / 64;
  const int tile = blockIdx.x * (kWgRows / 16) + warp;   // warpgroup w: tiles 4w..4w+3 of the CTA
  const bool tile_ok = tile < row_tiles;                   // R % 64 == 0: a warpgroup is all in or out
  for (int i = tid; i < BN; i += kWgThreads) {
    const int p = i < count ? a.perm[base + i] : -1;
    const bool ok = p >= 0 && p < a.P;
    pair_of[i] = ok ? p : -1;
    xrow[i] = ok ? (SWIGLU ? p / a.top_k : p) : -1;
  }
  __syncthreads();

  const uint32_t sbase = (smem_u32(smem_raw) + 1023u) & ~1023u;   // 128-byte swizzle: 1024-aligned
  const int cc = tid & 7;                                           // this thread's 16-byte column
  const bf16* src[kRowsPerThread];
  uint32_t valid = 0;
#pragma unroll
  for (int j = 0; j < kRowsPerThread; ++j) {
    const int r = xrow[(tid >> 3) + 32 * j];
    src[j] = a.x + (r >= 0 ? static_cast<int64_t>(r) * a.K : 0) + cc * 8;
    valid |= (r >= 0 ? 1u : 0u) << j;
  }
  // Stage c's copies of the first jmax * 32 token rows (jmax = N * 8 / 256 for an N-token tile).
  const auto load_stage = [&](int c, int jmax) {
    if (c < chunks) {
      const uint32_t dst = sbase + (c % kWgStages) * kStageBytes;
#pragma unroll
      for (int j = 0; j < kRowsPerThread; ++j)
        if (j < jmax) cp_async16(dst + swz128((tid >> 3) + 32 * j, cc), src[j] + c * 64, (valid >> j) & 1u);
    }
    cp_async_commit();   // an empty group past the end keeps the group count uniform
  };

  const int64_t wbase = (static_cast<int64_t>(expert) * row_tiles + (tile_ok ? tile : 0)) * chunks;
  const uint4* codes = reinterpret_cast<const uint4*>(a.codes) + wbase * 32 + lane;
  const uint32_t* scales = reinterpret_cast<const uint32_t*>(a.scales) + wbase * 8 + g;
  uint4 wc[kWgDepth];
  uint32_t wsc[kWgDepth];
  const auto load_w = [&](int c, uint4& cd, uint32_t& sv) {
    if (c < chunks) {
      cd = __ldg(codes + static_cast<int64_t>(c) * 32);
      sv = __ldg(scales + static_cast<int64_t>(c) * 8);
    }
  };
#pragma unroll
  for (int d = 0; d < kWgDepth; ++d) load_w(d, wc[d], wsc[d]);
  // An expert's last tile often holds few tokens: one of <= 64 runs as an N = 64 tile, one of <= 32
  // as N = 32 (less MMA work and fewer activation rows staged: at T = 2048 on 32 experts about half
  // the experts end in such a tile, and in batched decode most experts have only that many tokens).
  const int n_tile = count <= 32 ? 32 : ((BN > 64 && count <= 64) ? 64 : BN);
  load_stage(0, n_tile * 8 / kWgThreads);
  load_stage(1, n_tile * 8 / kWgThreads);

  const auto run = [&](auto n_const) {
    constexpr int N = decltype(n_const)::value;
    constexpr int kJ = N * 8 / kWgThreads;
    float acc[N / 2];
#pragma unroll
    for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;
    uint32_t af[2][4];

    for (int c0 = 0; c0 < chunks; c0 += kWgDepth) {
#pragma unroll
      for (int d = 0; d < kWgDepth; ++d) {
        const int c = c0 + d;
        if (c >= chunks) break;
        // Stage c has landed (only c + 1 may be in flight); after the barrier every thread's copies
        // are visible, and stage (c + 2) % 4 = (c - 2) % 4 is free: each warpgroup waited for its
        // chunk c - 2 MMAs before arriving here.
        cp_async_wait<1>();
        __syncthreads();
        load_stage(c + 2, kJ);
        const uint32_t words[4] = {wc[d].x, wc[d].y, wc[d].z, wc[d].w};
        const uint32_t e = wsc[d] + 0x7E7E7E7Eu;   // s + 126 per byte
        const uint32_t f[4] = {scale_bf16x2<0>(e), scale_bf16x2<1>(e), scale_bf16x2<2>(e), scale_bf16x2<3>(e)};
        const uint64_t desc = wgmma_desc_sw128(sbase + (c % kWgStages) * kStageBytes);
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          uint32_t(&A)[4] = af[s & 1];
          const uint32_t f_lo = f[2 * (s >> 1)], f_hi = f[2 * (s >> 1) + 1];   // rows g, g + 8
          fp4x8_to_bf16x2(words[s], A);
          A[0] = hmul2_bf16(A[0], f_lo);
          A[1] = hmul2_bf16(A[1], f_hi);
          A[2] = hmul2_bf16(A[2], f_lo);
          A[3] = hmul2_bf16(A[3], f_hi);
          wgmma_fence();
          wgmma_rs<N>(acc, A, desc + 2 * s, 1);
          wgmma_commit();
          wgmma_wait<1>();
        }
        load_w(c + kWgDepth, wc[d], wsc[d]);
      }
    }
    wgmma_wait<0>();
    pdl_trigger();  // multi-wave: the next kernel launches once every CTA is past its main loop
    if (!tile_ok) return;
    const bf16* bias = a.bias + static_cast<int64_t>(expert) * a.R;
    const int q = lane & 3;
#pragma unroll
    for (int n = 0; n < N / 8; ++n) {
      const float t4[4] = {acc[4 * n], acc[4 * n + 1], acc[4 * n + 2], acc[4 * n + 3]};
      store_tile<SWIGLU>(a, bias, pair_of, n, tile, g, q, t4);
    }
  };
  if (n_tile == BN) {
    run(std::integral_constant<int, BN>{});
  } else if (n_tile == 64) {
    run(std::integral_constant<int, 64>{});
  } else {
    run(std::integral_constant<int, 32>{});
  }
#else
  __trap();   // launched only where the sm_90a code exists (see moe_wgmma_loaded)
#endif
}

template <int BN, bool SWIGLU>
cudaError_t launch_wgmma(const MoeGemmArgs& a, cudaStream_t stream) {
  auto kernel = moe_wgmma_kernel<BN, SWIGLU>;
  const size_t smem = static_cast<size_t>(kWgStages) * BN * 128 + 1024;   // + alignment slack
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  const int64_t max_items = max_work_items(a.P, a.E, BN);
  const dim3 grid((a.R + kWgRows - 1) / kWgRows, static_cast<unsigned>(max_items));
  return launch_kernel(kernel, grid, dim3(kWgThreads), smem, stream, a);
}

}  // namespace

bool moe_wgmma_loaded() {
  if (!device_is_sm90()) return false;
  // The sm_90a bodies exist only in this build's sm_90a code: refuse where a kernel would come from
  // another architecture's PTX (JIT), whose body is a trap.
  static int ok = -1;
  if (ok < 0) {
    cudaFuncAttributes attr{};
    ok = cudaFuncGetAttributes(&attr, moe_wgmma_kernel<128, true>) == cudaSuccess && attr.ptxVersion >= 90 &&
                 attr.binaryVersion == 90
             ? 1
             : 0;
  }
  return ok == 1;
}

cudaError_t launch_moe_prefill_wgmma(const MoeGemmArgs& a, bool swiglu, int bn, cudaStream_t stream) {
  if (a.P == 0) return cudaSuccess;
  if (!moe_wgmma_loaded() || a.R % 64 != 0 || a.K % 64 != 0 || a.max_scale > 128 || a.E < 1 || a.E > kMaxExperts ||
      a.top_k < 1 || a.P > INT32_MAX)
    return cudaErrorInvalidValue;
  switch (bn) {
    case 64: return swiglu ? launch_wgmma<64, true>(a, stream) : launch_wgmma<64, false>(a, stream);
    case 128: return swiglu ? launch_wgmma<128, true>(a, stream) : launch_wgmma<128, false>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace gptoss
