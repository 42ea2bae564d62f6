// MXFP4 expert GEMMs for decode (a few pairs an expert): the persistent kernel and the
// grid-of-tiles shapes (moe_experts_tiles.cuh) that moe_plan picks for 1 to ~16 tokens.
//
// Tensor cores through mma.sync m16n8k16 (fp16 in, fp32 accumulate), which runs on sm_80+ and on
// Hopper. A comes straight from global memory in the kernel layout (gptoss_ext/mxfp4.py): one
// 16-byte load per lane gives the codes of its A fragments for a 16 x 64 block; they are decoded in
// registers with shifts and masks to fp16, where every E2M1 value is exact (code 1 = 0.5 is an fp16
// subnormal after the 2^-14 shift). Each 32-column group's E8M0 scale (times 2^14) multiplies the
// fp32 partial sums of that group, so scaling is exact. Activations are staged in shared memory as
// fp16 (bf16 -> fp16 is exact for |x| >= 2^-14, and gpt-oss's expert inputs stay far below fp16's
// range: normed activations and SwiGLU outputs bounded by the clamp). Decode reads every weight
// byte of the routed experts once: the bound is the copy bandwidth, and what costs is keeping
// enough loads in flight on every SM (bench/RESULTS.md: the versions tried and why these won).
#include <algorithm>

#include "kernels/moe_experts_tiles.cuh"

namespace gptoss {
namespace {

// ---- decode, persistent and balanced (T <= ~16) ------------------------------------------------
//
// One CTA an SM. The work is the flat list of 16-row tiles of every (expert, 8-pair token tile) work
// item; CTA b takes tiles [b * n / G, (b + 1) * n / G) — equal to within one tile, so no SM idles
// while others run a third CTA (the grid-of-tiles kernel above left SMs idle 21 % of its time at
// T = 1). Inside the CTA the (tile, 64-column chunk) pairs are split evenly over the warps, each
// warp streaming one contiguous stretch of the weights (a CTA's tiles of one expert are contiguous
// in the kernel layout) through two register sets of DEPTH chunks. A tile a warp covers whole is
// stored by that warp straight from its registers; a tile split between warps is summed from
// shared memory in warp order (deterministic) after one barrier. The activations of the at most two
// work items a CTA touches are staged once, before the loop. Needs items <= G (host-checked: then a
// CTA's tiles span at most two items).
constexpr int kDecodeSlots = 2;


// Per-CTA work of a phase, in shared memory: [0] first tile, [1] end tile, [2] first item, [3] items
// touched (<= 2), then (expert, pair count, perm index of the first pair) of each.
constexpr int kCtaInfo = 4 + 3 * kDecodeSlots;

// Warp 0: this CTA's tiles when every item has RT tiles (ok false: none), into out[kCtaInfo].
__device__ __forceinline__ void cta_tiles(const ItemScan& scan, int total, bool ok, int RT, int* out) {
  const int lane = threadIdx.x & 31;
  int info[kCtaInfo];
  info[0] = info[1] = 0;
  if (ok) {
    const unsigned all_tiles = static_cast<unsigned>(total * RT);     // grid * items * RT < 2^31 (host)
    info[0] = static_cast<int>(blockIdx.x * all_tiles / gridDim.x);
    info[1] = static_cast<int>((blockIdx.x + 1) * all_tiles / gridDim.x);
  }
  info[2] = info[0] / RT;
  info[3] = info[1] > info[0] ? (info[1] - 1) / RT - info[2] + 1 : 0;   // <= 2 (items <= grid)
#pragma unroll
  for (int sl = 0; sl < kDecodeSlots; ++sl)
    item_info(scan, 8, info[2] + sl, info[4 + 3 * sl], info[5 + 3 * sl], info[6 + 3 * sl]);
  if (lane < kCtaInfo) {
    int v = info[0];
#pragma unroll
    for (int j = 1; j < kCtaInfo; ++j) v = lane == j ? info[j] : v;
    out[lane] = v;
  }
}

// A warp's stretch [u0, u1) of its CTA's (tile, chunk) pairs; chunk u < uB belongs to slot 0 and is
// weight chunk woff0 + u of the kernel layout, later ones slot 1 (woff1 + u).
struct WarpRange {
  int u0, u1, uB, N;
  int64_t woff0, woff1;
};

template <int NW>
__device__ __forceinline__ WarpRange warp_range(const int* info, int RT, int C, int warp) {
  WarpRange w;
  const int tile0 = info[0], it0 = info[2];
  w.N = (info[1] - tile0) * C;
  w.u0 = warp * w.N / NW;
  w.u1 = (warp + 1) * w.N / NW;
  w.uB = info[3] > 1 ? ((it0 + 1) * RT - tile0) * C : w.N;
  w.woff0 = (static_cast<int64_t>(info[4]) * RT - static_cast<int64_t>(it0) * RT + tile0) * C;
  w.woff1 = (static_cast<int64_t>(info[7]) * RT - static_cast<int64_t>(it0 + 1) * RT + tile0) * C;
  return w;
}

struct DecodeSmem {
  uint32_t* bs;                 // [slots][srows][stride] staged activations (fp16x2)
  float* part;                  // [NW][2][4][32] partial sums of split tiles
  int32_t (*pair_of)[8];        // [slots][8]
  const int* info;              // kCtaInfo ints (cta_tiles)
  int srows;
};

// Weight loads: read once, so marked first to go from L2 and not kept in L1.
__device__ __forceinline__ uint64_t evict_first_policy() {
  uint64_t pol;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(pol));
  return pol;
}

__device__ __forceinline__ uint4 ld_stream16(const uint4* p, uint64_t pol) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "l"(pol));
  return v;
}

__device__ __forceinline__ uint32_t ld_stream4(const uint32_t* p, uint64_t pol) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.u32 %0, [%1], %2;\n" : "=r"(v) : "l"(p), "l"(pol));
  return v;
}

template <bool SWIGLU, int NW, int DEPTH>
__device__ __forceinline__ void decode_phase(const MoeGemmArgs& a, const DecodeSmem& sm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int RT = a.R / 16, C = a.K / 64;
  const int stride = a.K / 2 + 4;                                   // words a staged row (+16 B pad)
  const int srows = sm.srows;
  const int* info = sm.info;
  const int tile0 = info[0], tile1 = info[1], it0 = info[2], nslots = info[3];
  if (tile0 >= tile1) return;                                       // the whole CTA
  int expert[kDecodeSlots], count[kDecodeSlots], base[kDecodeSlots];
#pragma unroll
  for (int sl = 0; sl < kDecodeSlots; ++sl) {
    expert[sl] = info[4 + 3 * sl];
    count[sl] = info[5 + 3 * sl];
    base[sl] = info[6 + 3 * sl];
  }
  const WarpRange wr = warp_range<NW>(info, RT, C, warp);
  const int N = wr.N, u0 = wr.u0, u1 = wr.u1, uB = wr.uB;
  const int64_t woff0 = wr.woff0, woff1 = wr.woff1;
  const uint4* codes = reinterpret_cast<const uint4*>(a.codes) + lane;
  const uint32_t* scales = reinterpret_cast<const uint32_t*>(a.scales) + g;
  const uint64_t pol = evict_first_policy();

  uint4 code_a[DEPTH], code_b[DEPTH];
  uint32_t sc_a[DEPTH], sc_b[DEPTH];
  const auto load_batch = [&](int ub, uint4 (&cd)[DEPTH], uint32_t (&sv)[DEPTH]) {
    if (ub + DEPTH <= uB || ub >= uB) {   // one segment: one address, constant offsets
      const int64_t ci = (ub < uB ? woff0 : woff1) + ub;
      const uint4* cp = codes + ci * 32;
      const uint32_t* sp = scales + ci * 8;
#pragma unroll
      for (int d = 0; d < DEPTH; ++d) {
        if (ub + d < u1) {
          cd[d] = ld_stream16(cp + d * 32, pol);
          sv[d] = ld_stream4(sp + d * 8, pol);
        }
      }
    } else {
#pragma unroll
      for (int d = 0; d < DEPTH; ++d) {
        const int u = ub + d;
        if (u < u1) {
          const int64_t ci = (u < uB ? woff0 : woff1) + u;
          cd[d] = ld_stream16(codes + ci * 32, pol);
          sv[d] = ld_stream4(scales + ci * 8, pol);
        }
      }
    }
  };
  if (u0 < u1) load_batch(u0, code_a, sc_a);

  int32_t (*pair_of)[8] = sm.pair_of;
  if (threadIdx.x < kDecodeSlots * 8) {
    const int s = threadIdx.x >> 3, n = threadIdx.x & 7;
    const int cnt = s ? count[1] : count[0], b0 = s ? base[1] : base[0];
    const int p = s < nslots && n < cnt ? a.perm[b0 + n] : -1;
    pair_of[s][n] = (p >= 0 && p < a.P) ? p : -1;   // a pair index out of range is skipped
  }
  if (a.routing_ready) pdl_wait();
  __syncthreads();
  // Stage the items' activations (fp16), chunk-fragment order as in moe_gemm_kernel. The address
  // comes from shared memory after the wait, so the __ldg cannot move above it.
  {
    const int vecs = a.K / 8;
    for (int i = threadIdx.x; i < nslots * srows * vecs; i += NW * 32) {
      const int r = i / vecs, c4 = i % vecs;
      const int p = pair_of[r / srows][r % srows];
      if (p < 0) continue;
      const int64_t row = SWIGLU ? p / a.top_k : p;
      const uint4* src = reinterpret_cast<const uint4*>(a.x + row * a.K) + c4;
      const uint4 v = __ldg(src);
      uint32_t* dst = sm.bs + r * stride + (c4 >> 3) * 32 + (c4 & 7);
      dst[0] = bf16x2_to_f16x2(v.x);
      dst[8] = bf16x2_to_f16x2(v.y);
      dst[16] = bf16x2_to_f16x2(v.z);
      dst[24] = bf16x2_to_f16x2(v.w);
    }
  }
  __syncthreads();

  int brow[kDecodeSlots];
#pragma unroll
  for (int s = 0; s < kDecodeSlots; ++s) brow[s] = (s * srows + min(g, max(count[s], 1) - 1)) * stride;

  // Stores a tile's sums: through the epilogue when this warp covered all of it, else into this
  // warp's partial slot (0: its first tile, 1: its last).
  const int first_lt = u0 / C;
  float* part = sm.part;
  const auto finish_tile = [&](int lt, bool whole, float (&acc)[4]) {
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[j] *= 16384.f;   // the decode's 2^-14
    if (whole) {
      const int gt = tile0 + lt;
      const bool s1 = gt >= (it0 + 1) * RT;
      store_tile<SWIGLU>(a, a.bias + static_cast<int64_t>(s1 ? expert[1] : expert[0]) * a.R, pair_of[s1 ? 1 : 0], 0,
                         gt - (it0 + (s1 ? 1 : 0)) * RT, g, q, acc);
    } else {
      float* pp = part + ((warp * 2 + (lt == first_lt ? 0 : 1)) * 4) * 32 + lane;
#pragma unroll
      for (int j = 0; j < 4; ++j) pp[j * 32] = acc[j];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[j] = 0.f;
  };

  float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
  int c = u0 % C, lt = first_lt;
  bool whole = c == 0;
  // One 16x64 block (unit) of the tile into acc; bp: this lane's B fragments in shared memory.
  const auto unit_mma = [&](const uint32_t* bp, const uint4& cw, uint32_t scw) {
    const uint4 bv[1][2] = {{*reinterpret_cast<const uint4*>(bp), *reinterpret_cast<const uint4*>(bp + 4)}};
    block_mma<1>(cw, scw, bv, acc);
  };
  const auto compute_batch = [&](int ub, const uint4 (&cd)[DEPTH], const uint32_t (&sv)[DEPTH]) {
    // Most batches (all but ~DEPTH / C of them) lie inside one tile of one slot and end before the
    // warp's last unit: no per-unit bookkeeping there, so the DEPTH units form one basic block the
    // compiler can interleave (loads of B, decode, mma of neighbouring units).
    if (ub + DEPTH < u1 && c + DEPTH < C && (ub + DEPTH <= uB || ub >= uB)) {
      const uint32_t* bp = sm.bs + (ub < uB ? brow[0] : brow[1]) + c * 32 + q * 8;
#pragma unroll
      for (int d = 0; d < DEPTH; ++d) unit_mma(bp + d * 32, cd[d], sv[d]);
      c += DEPTH;
      return;
    }
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      const int u = ub + d;
      if (u >= u1) break;
      unit_mma(sm.bs + (u < uB ? brow[0] : brow[1]) + c * 32 + q * 8, cd[d], sv[d]);
      const bool tile_end = c == C - 1;
      if (tile_end || u == u1 - 1) finish_tile(lt, whole && tile_end, acc[0]);
      if (tile_end) {
        c = 0;
        ++lt;
        whole = true;
      } else {
        ++c;
      }
    }
  };
  for (int ub = u0; ub < u1; ub += 2 * DEPTH) {
    if (ub + DEPTH < u1) load_batch(ub + DEPTH, code_b, sc_b);
    compute_batch(ub, code_a, sc_a);
    if (ub + DEPTH >= u1) break;
    if (ub + 2 * DEPTH < u1) load_batch(ub + 2 * DEPTH, code_a, sc_a);
    compute_batch(ub + DEPTH, code_b, sc_b);
  }
  pdl_trigger();
  __syncthreads();
  // Tiles split between warps: the warp holding a tile's first chunk (but not its last) sums the
  // partials of the warps that cover it, in warp order.
  if (u0 < u1) {
    const int t = (u1 - 1) / C;
    if (t * C >= u0 && (t + 1) * C > u1) {
      float sum[4] = {0.f, 0.f, 0.f, 0.f};
      for (int v = warp; v < NW; ++v) {
        const int v0 = v * N / NW, v1 = (v + 1) * N / NW;
        if (v0 >= (t + 1) * C) break;
        if (v0 == v1) continue;
        const float* pp = part + ((v * 2 + (t == v0 / C ? 0 : 1)) * 4) * 32 + lane;
#pragma unroll
        for (int j = 0; j < 4; ++j) sum[j] += pp[j * 32];
      }
      const int gt = tile0 + t;
      const bool s1 = gt >= (it0 + 1) * RT;
      store_tile<SWIGLU>(a, a.bias + static_cast<int64_t>(s1 ? expert[1] : expert[0]) * a.R, pair_of[s1 ? 1 : 0], 0,
                         gt - (it0 + (s1 ? 1 : 0)) * RT, g, q, sum);
    }
  }
}

template <bool SWIGLU, int NW, int DEPTH>
__global__ void __launch_bounds__(NW * 32, 1) moe_decode_kernel(MoeGemmArgs a) {
  if (!a.routing_ready) pdl_wait();     // see moe_gemm_kernel and kernels/pdl.h
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int32_t pair_of[kDecodeSlots][8];
  __shared__ int info[kCtaInfo];
  DecodeSmem sm;
  sm.srows = a.P < 8 ? static_cast<int>(a.P) : 8;
  sm.bs = reinterpret_cast<uint32_t*>(smem_raw);
  sm.part = reinterpret_cast<float*>(sm.bs + kDecodeSlots * sm.srows * (a.K / 2 + 4));
  sm.pair_of = pair_of;
  sm.info = info;
  // Warp 0 finds the CTA's tiles and the (at most two) work items they belong to; the others wait
  // at the barrier instead of repeating the scan (24 warps doing it cost more than it saved).
  if (threadIdx.x < 32) {
    ItemScan scan;
    int total = 0;
    const bool ok = item_scan(a.offsets, a.E, a.P, 8, scan, total);
    cta_tiles(scan, total, ok, a.R / 16, info);
  }
  __syncthreads();
  decode_phase<SWIGLU, NW, DEPTH>(a, sm);
}

// The persistent kernel's shape: 24 warps (one CTA an SM), 4-chunk batches a warp.
constexpr int kPersistentWarps = 24;
constexpr int kPersistentDepth = 4;

template <bool SWIGLU>
cudaError_t launch_decode(const MoeGemmArgs& a, int sms, cudaStream_t stream) {
  constexpr int NW = kPersistentWarps;
  const int64_t items = max_work_items(a.P, a.E, 8);
  const size_t smem = moe_decode_persistent_smem(a);
  // (moe_kernel_unsupported checked these; a direct caller gets an error, never a wrong launch)
  if (sms <= 0 || items > sms || smem > kMoeDecodePersistentMaxSmem ||
      static_cast<int64_t>(sms) * items * (a.R / 16) >= INT32_MAX)
    return cudaErrorInvalidValue;
  auto kernel = moe_decode_kernel<SWIGLU, NW, kPersistentDepth>;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  const int64_t tiles = items * (a.R / 16);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(sms, tiles));
  return launch_kernel(kernel, dim3(grid), dim3(NW * 32), smem, stream, a);
}

}  // namespace

size_t moe_decode_persistent_smem(const MoeGemmArgs& a) {
  const int64_t srows = std::min<int64_t>(8, a.P);
  return static_cast<size_t>(kDecodeSlots * srows) * (a.K / 2 + 4) * 4 +
         static_cast<size_t>(kPersistentWarps) * 2 * 4 * 32 * 4;
}

cudaError_t launch_moe_decode_persistent(const MoeGemmArgs& a, bool swiglu, int sms, cudaStream_t stream) {
  return swiglu ? launch_decode<true>(a, sms, stream) : launch_decode<false>(a, sms, stream);
}

// The grid-of-tiles decode shapes: 8 warps a CTA, 4-chunk batches, registers capped for 3 CTAs an SM.
// mlp1 takes 8 row tiles a CTA unsplit (or 4 with K over 2 warps), mlp2 4 with K over 2 warps (or 2
// over 4): mlp2's K (the intermediate size) is the shorter one, so it needs more warps on it.
cudaError_t launch_moe_decode_tiles(const MoeGemmArgs& a, bool swiglu, bool split_k, cudaStream_t stream) {
  if (split_k)
    return swiglu ? launch_gemm<4, 1, 4, true, 8, 3>(a, stream) : launch_gemm<2, 1, 4, false, 8, 3>(a, stream);
  return swiglu ? launch_gemm<8, 1, 4, true, 8, 3>(a, stream) : launch_gemm<4, 1, 4, false, 8, 3>(a, stream);
}

}  // namespace gptoss
