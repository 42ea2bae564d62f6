// MXFP4 expert GEMMs for batches and prefill on any sm_80+ GPU (Hopper runs the wgmma kernel of
// moe_experts_prefill_sm90.cu where moe_plan finds it usable): the small-batch and exact shapes of
// the grid-of-tiles kernel (moe_experts_tiles.cuh), and the scale-folding prefill kernel.
#include "kernels/moe_experts_tiles.cuh"

namespace gptoss {
namespace {

// ---- prefill: 128 weight rows x 64 tokens a CTA, scales folded into the fp16 weights -------------
//
// Four warps, each two 16-row tiles (32 rows) x all 64 tokens of the CTA: per 16-column k-step a
// warp decodes its two A fragments once and feeds them to 8 n-tiles (16 mma), the B fragments
// coming from shared memory through ldmatrix (activations staged as fp16, XOR-swizzled, double-
// buffered: the next 64 columns are loaded into registers while the current ones are computed).
// The E8M0 scale is folded into the decoded weights (fp16 multiply by 2^(s-113): exact for
// s <= 128, the host's condition for this kernel; blocks with s < 89 are below fp16's range and
// weigh less than 2^-36), so the mma accumulates straight into fp32 without per-group partials.
// Weight codes stream from global memory in the fragment layout, kPrefillDepth chunks ahead.
constexpr int kPrefillBN = 64;
constexpr int kPrefillDepth = 3;

// 2^(s - 113) as fp16x2 (s <= 128): times fp4 * 2^-14 gives fp4 * 2^(s - 127).
__device__ __forceinline__ uint32_t scale_f16x2(uint32_t s) {
  const uint32_t h = s >= 99u ? (s - 98u) << 10 : (s >= 89u ? 1u << (s - 89u) : 0u);
  return h | (h << 16);
}

__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  return d;
}


template <bool SWIGLU>
__global__ void __launch_bounds__(128) moe_prefill_kernel(MoeGemmArgs a) {
  pdl_wait();     // see kernels/pdl.h
  constexpr int BN = kPrefillBN, MT = 2, DEPTH = kPrefillDepth;
  __shared__ __align__(128) uint8_t sB[2][BN * 128];
  __shared__ int32_t pair_of[BN];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int expert, start, count, base;
  if (!find_work_scan(a.offsets, a.E, a.P, BN, blockIdx.y, expert, start, count, base)) return;
  const int g = lane >> 2, q = lane & 3;
  const int row_tiles = a.R / 16, chunks = a.K / 64;
  const int tile0 = blockIdx.x * 8 + warp * MT;
  if (tid < BN) {
    const int p = tid < count ? a.perm[base + tid] : -1;
    pair_of[tid] = (p >= 0 && p < a.P) ? p : -1;
  }
  __syncthreads();

  // This thread's share of the activation staging: 4 of the 64 x 8 16-byte vectors a chunk.
  const bf16* xrow[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int n = (tid + 128 * j) >> 3;
    const int p = pair_of[n];
    xrow[j] = p < 0 ? nullptr : a.x + (SWIGLU ? static_cast<int64_t>(p / a.top_k) : static_cast<int64_t>(p)) * a.K;
  }
  const auto load_act = [&](int c, uint4 (&v)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int cc = (tid + 128 * j) & 7;
      v[j] = xrow[j] ? __ldg(reinterpret_cast<const uint4*>(xrow[j] + c * 64) + cc) : make_uint4(0, 0, 0, 0);
    }
  };
  const auto store_act = [&](int buf, uint4 (&v)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int i = tid + 128 * j, n = i >> 3, cc = i & 7;
      uint4 h = v[j];
      h.x = bf16x2_to_f16x2(h.x);
      h.y = bf16x2_to_f16x2(h.y);
      h.z = bf16x2_to_f16x2(h.z);
      h.w = bf16x2_to_f16x2(h.w);
      *reinterpret_cast<uint4*>(&sB[buf][swz128(n, cc)]) = h;
    }
  };

  const uint4* codes[MT];
  const uint32_t* scales[MT];
  bool tile_ok[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    tile_ok[mt] = tile0 + mt < row_tiles;
    const int64_t base = (static_cast<int64_t>(expert) * row_tiles + (tile_ok[mt] ? tile0 + mt : 0)) * chunks;
    codes[mt] = reinterpret_cast<const uint4*>(a.codes) + base * 32 + lane;
    scales[mt] = reinterpret_cast<const uint32_t*>(a.scales) + base * 8 + g;
  }
  uint4 wc[DEPTH][MT];
  uint32_t wsc[DEPTH][MT];
  const auto load_w = [&](int c, uint4 (&cd)[MT], uint32_t (&sv)[MT]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const bool ok = tile_ok[mt] && c < chunks;
      cd[mt] = ok ? __ldg(codes[mt] + static_cast<int64_t>(c) * 32) : make_uint4(0, 0, 0, 0);
      sv[mt] = ok ? __ldg(scales[mt] + static_cast<int64_t>(c) * 8) : 0u;
    }
  };
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) load_w(d, wc[d], wsc[d]);
  uint4 av[4];
  load_act(0, av);
  store_act(0, av);
  if (chunks > 1) load_act(1, av);
  __syncthreads();

  float acc[MT][8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int n = 0; n < 8; ++n) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.f;

  for (int c0 = 0; c0 < chunks; c0 += DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int c = c0 + d;
      if (c >= chunks) break;
      const uint32_t sB_buf = smem_u32(sB[c & 1]);
      const uint32_t words[MT][4] = {{wc[d][0].x, wc[d][0].y, wc[d][0].z, wc[d][0].w},
                                     {wc[d][1].x, wc[d][1].y, wc[d][1].z, wc[d][1].w}};
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const int grp = s >> 1;
        uint32_t af[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint32_t f_lo = scale_f16x2((wsc[d][mt] >> (16 * grp)) & 0xFFu);      // row g
          const uint32_t f_hi = scale_f16x2((wsc[d][mt] >> (16 * grp + 8)) & 0xFFu);  // row g + 8
          fp4x8_to_f16x2(words[mt][s], af[mt]);
          af[mt][0] = hmul2(af[mt][0], f_lo);
          af[mt][1] = hmul2(af[mt][1], f_hi);
          af[mt][2] = hmul2(af[mt][2], f_lo);
          af[mt][3] = hmul2(af[mt][3], f_hi);
        }
#pragma unroll
        for (int nb = 0; nb < 4; ++nb) {
          uint32_t b[4];
          ldsm_x4(b, sB_buf + swz128(nb * 16 + (lane & 7) + ((lane >> 4) << 3), s * 2 + ((lane >> 3) & 1)));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_f16(acc[mt][2 * nb], af[mt], b[0], b[1]);
            mma_f16(acc[mt][2 * nb + 1], af[mt], b[2], b[3]);
          }
        }
      }
      load_w(c + DEPTH, wc[d], wsc[d]);
      if (c + 1 < chunks) store_act((c + 1) & 1, av);
      __syncthreads();
      if (c + 2 < chunks) load_act(c + 2, av);
    }
  }

  pdl_trigger();  // multi-wave: the next kernel launches once every CTA is past its main loop
  // Epilogue. Accumulator (mt, n, j): token n*8 + 2q + (j & 1), row (tile0 + mt)*16 + g + 8*(j >> 1).
  const bf16* bias = a.bias + static_cast<int64_t>(expert) * a.R;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    if (!tile_ok[mt]) continue;
#pragma unroll
    for (int n = 0; n < 8; ++n) store_tile<SWIGLU>(a, bias, pair_of, n, tile0 + mt, g, q, acc[mt][n]);
  }
}

template <bool SWIGLU>
cudaError_t launch_prefill(const MoeGemmArgs& a, cudaStream_t stream) {
  const int64_t max_items = max_work_items(a.P, a.E, kPrefillBN);
  const dim3 grid((a.R / 16 + 7) / 8, static_cast<unsigned>(max_items));
  return launch_kernel(moe_prefill_kernel<SWIGLU>, grid, dim3(128), 0, stream, a);
}

}  // namespace

cudaError_t launch_moe_prefill_mma(const MoeGemmArgs& a, bool swiglu, cudaStream_t stream) {
  return swiglu ? launch_prefill<true>(a, stream) : launch_prefill<false>(a, stream);
}

// Up to ~32 pairs an expert: 16-pair tiles (two n-tiles), 2 row tiles a CTA, K over 2 warps.
cudaError_t launch_moe_small_batch(const MoeGemmArgs& a, bool swiglu, cudaStream_t stream) {
  return swiglu ? launch_gemm<2, 2, 2, true>(a, stream) : launch_gemm<2, 2, 2, false>(a, stream);
}

// Any scale: 64-pair tiles, per-group partial sums in fp32; <= 170 registers, 3 CTAs an SM.
cudaError_t launch_moe_prefill_exact(const MoeGemmArgs& a, bool swiglu, cudaStream_t stream) {
  return swiglu ? launch_gemm<4, 8, 2, true, kWarps, 3>(a, stream) : launch_gemm<4, 8, 2, false, kWarps, 3>(a, stream);
}

}  // namespace gptoss
