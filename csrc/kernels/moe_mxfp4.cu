// MXFP4 grouped GEMMs for the MoE experts (mlp1 + SwiGLU, mlp2 + routing weight) and the combine.
//
// Tensor cores through mma.sync m16n8k16 (fp16 in, fp32 accumulate), which runs on sm_80+ and
// on Hopper. Weight-stationary: the A operand is a 16-row tile of an expert's weight, the B
// operand 8 tokens routed to that expert. A comes straight from global memory in the kernel
// layout (gptoss_ext/mxfp4.py): one 16-byte load per lane gives the codes of its A fragments for
// a 16 x 64 tile; they are decoded in registers with shifts and masks to fp16, where every E2M1
// value is exact (subnormals included: code 1 = 0.5 is an fp16 subnormal after the 2^-14 shift).
// Each 32-column group's E8M0 scale (times 2^14) then multiplies the fp32 partial sums of that
// group, so scaling is exact. Activations are staged in shared memory as fp16 (bf16 -> fp16 is
// exact for |x| >= 2^-14 and gpt-oss's expert inputs stay far below fp16's range: normed
// activations and SwiGLU outputs bounded by the clamp).
//
// Grid: x = row tiles (16 * WM rows a CTA), y = (expert, token tile) work items (found by
// scanning offsets). Decode (few tokens): 8 tokens a tile, the whole K staged once, K split across
// warps and reduced in shared memory. Prefill: 64 tokens a tile, K in slabs.
// Versions (H200, 20b shapes, T = 1, mlp1 + mlp2): v1 (K split over 2 warps, 1 chunk prefetched)
// 68 us; v2 (K over 4 warps, 4 chunks in flight) 41 us; v3 (all 12 chunks of a warp issued before
// the activations are staged, 124 registers: 4 CTAs an SM, 3.4 waves of latency-bound prologues)
// 50 us; v4 (4 row tiles a CTA, pipelined 8-chunk batches) 36 us; v6 (11-op bit layout, warp-parallel
// work lookup, LDS.128 B fragments) 35 us (120b: 61 -> 35 us); v7 (8 warps, K split, 80 registers)
// 28.5 us; v8 (session 6, moe_decode_kernel: persistent, one CTA an SM, balanced to a tile) T=8
// 132 -> 115 us (H100); v9 (session 8: batches inside one tile take a branch-free path) T=8 114 -> 110 us,
// T=4 78 -> 75 us. See bench/NOTES.md. On Hopper, prefill runs the wgmma kernel of moe_mxfp4_sm90.cu; this
// file's prefill kernel serves other GPUs (and GPTOSS_MOE_PREFILL=mma).
#include <algorithm>
#include <cstdlib>

#include "kernels/common.cuh"
#include "kernels/mma.cuh"
#include "kernels/moe.h"
#include "kernels/moe_common.cuh"

namespace gptoss {
namespace {

constexpr int kWarps = 4;

// The four fp16x2 A registers held by one word of the kernel layout (gptoss_ext/mxfp4.py): each
// code's 3 magnitude bits land at fp16 bits 9..11 and its sign at bit 15, i.e. E2M1 * 2^-14,
// exact (code 1 = 0.5 becomes an fp16 subnormal). 11 integer operations for 8 weights.
__device__ __forceinline__ void fp4x8_to_f16x2(uint32_t w, uint32_t (&r)[4]) {
  constexpr uint32_t kMag = 0x0E000E00u, kSign = 0x80008000u, kBoth = kMag | kSign;
  r[0] = ((w << 9) & kMag) | ((w << 2) & kSign);
  r[1] = ((w << 6) & kMag) | ((w << 1) & kSign);
  r[2] = (w << 3) & kBoth;
  r[3] = w & kBoth;
}

// E8M0 byte k of the scale word sc -> 2^(s - 127) as fp32 (s = 0 gives 0 instead of 2^-127, s = 255,
// NaN in E8M0, gives inf). Two integer operations; the decode's 2^-14 is undone once at the end.
template <int k>
__device__ __forceinline__ float e8m0_byte(uint32_t sc) {
  return __uint_as_float((k < 3 ? sc << (23 - 8 * k) : sc >> 1) & 0x7F800000u);
}

// One 16x64 block of MXFP4 weights (this lane's code word cw and scale word scw) times NT n-tiles
// of B (bv[n][grp]: the lane's fp16 fragments of the two 32-column scale groups), into acc[n]: per
// scale group, two mma into a partial sum, which is scaled and added. Both decode kernels use it.
template <int NT>
__device__ __forceinline__ void block_mma(const uint4& cw, uint32_t scw, const uint4 (&bv)[NT][2],
                                          float (&acc)[NT][4]) {
  const uint32_t words4[4] = {cw.x, cw.y, cw.z, cw.w};
#pragma unroll
  for (int grp = 0; grp < 2; ++grp) {
    float part[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) part[n][0] = part[n][1] = part[n][2] = part[n][3] = 0.f;
#pragma unroll
    for (int s = 2 * grp; s < 2 * grp + 2; ++s) {
      uint32_t af[4];
      fp4x8_to_f16x2(words4[s], af);
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const uint4& b = bv[n][grp];
        mma_f16(part[n], af, s & 1 ? b.z : b.x, s & 1 ? b.w : b.y);
      }
    }
    const float s_lo = grp ? e8m0_byte<2>(scw) : e8m0_byte<0>(scw);   // row g
    const float s_hi = grp ? e8m0_byte<3>(scw) : e8m0_byte<1>(scw);   // row g + 8
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      acc[n][0] = fmaf(part[n][0], s_lo, acc[n][0]);
      acc[n][1] = fmaf(part[n][1], s_lo, acc[n][1]);
      acc[n][2] = fmaf(part[n][2], s_hi, acc[n][2]);
      acc[n][3] = fmaf(part[n][3], s_hi, acc[n][3]);
    }
  }
}

__device__ __forceinline__ uint32_t bf16x2_to_f16x2(uint32_t v) {
  const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  const __half2 h = __floats2half2_rn(f.x, f.y);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Per-lane share of the work-item scan (lane l: experts 8l .. 8l + 7, E <= 256) for items of bn pairs.
struct ItemScan {
  int lo[8], n[8], incl, tiles;
};

// The scan and the number of items (every lane gets it); false if the offsets are not a valid
// grouping of P pairs (then nothing is computed: no out-of-range access). The offsets are the
// router's output, so they are plain loads: an __ldg (ld.global.nc, an invariant load to the
// compiler) of an address known at entry was hoisted above the programmatic-launch wait, and under
// CUDA-graph replay the kernel read the previous step's routing. (ld.global.cg instead: every warp
// of 360 CTAs on the same L2 lines, 20b T=1 mlp1 + mlp2 31 -> 40 us.)
__device__ __forceinline__ bool item_scan(const int32_t* offsets, int E, int64_t P, int bn, ItemScan& s,
                                          int& total) {
  const int lane = threadIdx.x & 31, e0 = lane * 8;
  bool bad = false;
  int prev = e0 <= E ? offsets[e0] : 0;
  s.tiles = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int e = e0 + i;
    const int hi = e < E ? offsets[e + 1] : prev;
    bad |= prev < 0 || hi < prev || hi > P;
    s.lo[i] = prev;
    s.n[i] = hi - prev;
    s.tiles += (s.n[i] + bn - 1) / bn;
    prev = hi;
  }
  if (__any_sync(0xFFFFFFFFu, bad)) {
    s.incl = s.tiles = 0;
    return false;
  }
  s.incl = s.tiles;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xFFFFFFFFu, s.incl, o);
    if ((threadIdx.x & 31) >= o) s.incl += v;
  }
  total = __shfl_sync(0xFFFFFFFFu, s.incl, 31);
  return true;
}

// (expert, pair count, perm index of the first pair) of item `item` (< total), warp-collective.
__device__ __forceinline__ void item_info(const ItemScan& s, int bn, int item, int& expert, int& count, int& base,
                                          int* start = nullptr) {
  const int lane = threadIdx.x & 31;
  const unsigned owner = __ballot_sync(0xFFFFFFFFu, item >= s.incl - s.tiles && item < s.incl);
  int info[4] = {0, 0, 0, 0};
  int acc = s.incl - s.tiles;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int t = (s.n[i] + bn - 1) / bn;
    if (item >= acc && item < acc + t) {
      const int st = (item - acc) * bn;
      info[0] = lane * 8 + i;
      info[1] = min(bn, s.n[i] - st);
      info[2] = s.lo[i] + st;
      info[3] = st;
    }
    acc += t;
  }
  const int src = owner ? __ffs(owner) - 1 : 0;
  expert = __shfl_sync(0xFFFFFFFFu, info[0], src);
  count = owner ? __shfl_sync(0xFFFFFFFFu, info[1], src) : 0;
  base = __shfl_sync(0xFFFFFFFFu, info[2], src);
  if (start) *start = __shfl_sync(0xFFFFFFFFu, info[3], src);
}

// Which (expert, first pair, count, perm index of the first pair) work item `item` is, for tiles of
// bn pairs; false if the item is past the end or the offsets are not a valid grouping. One warp
// does it (every warp of a CTA gets the same answer).
__device__ __forceinline__ bool find_work(const int32_t* offsets, int E, int64_t P, int bn, int item, int& expert,
                                          int& start, int& count, int& base) {
  ItemScan s;
  int total;
  if (!item_scan(offsets, E, P, bn, s, total) || item >= total) return false;
  item_info(s, bn, item, expert, count, base, &start);
  return true;
}

template <int WM, int NT, int DEPTH, bool SWIGLU, int NW = kWarps, int MINB = 1>
__global__ void __launch_bounds__(NW * 32, MINB) moe_gemm_kernel(MoeGemmArgs a, int slab) {
  // routing_ready (mlp2 after mlp1): the routing was complete before the previous kernel started,
  // so the work lookup, the routing reads and the first weight batch go before the launch wait
  // (they overlap the previous kernel's tail); only the activations and the outputs wait.
  if (!a.routing_ready) pdl_wait();     // see kernels/pdl.h
  constexpr int WK = NW / WM;
  constexpr int BN = 8 * NT;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint32_t* bs = reinterpret_cast<uint32_t*>(smem_raw);        // [BN][slab/2 + 4] fp16x2 activations
  __shared__ int32_t pair_of[BN];

  int expert, start, count, base;
  if (NT <= 2 ? !find_work(a.offsets, a.E, a.P, BN, blockIdx.y, expert, start, count, base)
              : !find_work_scan(a.offsets, a.E, a.P, BN, blockIdx.y, expert, start, count, base))
    return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = warp % WM, wk = warp / WM;
  const int g = lane >> 2, q = lane & 3;
  const int row_tiles = a.R / 16, chunks = a.K / 64;
  const int tile = blockIdx.x * WM + wm;                          // this warp's 16-row tile
  const bool tile_ok = tile < row_tiles;
  const int stride = slab / 2 + 4;                                 // words a staged row (+16 B pad)
  const int rows = a.P < BN ? static_cast<int>(a.P) : BN;          // staged rows (a tile never has more tokens)

  const uint4* codes = reinterpret_cast<const uint4*>(a.codes) +
                       ((static_cast<int64_t>(expert) * row_tiles + (tile_ok ? tile : 0)) * chunks) * 32 + lane;
  const uint32_t* scales = reinterpret_cast<const uint32_t*>(a.scales) +
                           ((static_cast<int64_t>(expert) * row_tiles + (tile_ok ? tile : 0)) * chunks) * 8 + g;
  // This warp's chunks of a slab (every WK-th), DEPTH at a time, software-pipelined over two
  // register sets (ping-pong, no copies): batch b + 1 is in flight while batch b is computed. Loads
  // use one base pointer a batch and constant offsets. The first batch goes out before the routing
  // lookups and the activation staging, so weight traffic starts at once.
  uint4 code_a[DEPTH], code_b[DEPTH];
  uint32_t sc_a[DEPTH], sc_b[DEPTH];
  const auto load_batch = [&](int c0, int c_end, uint4 (&cd)[DEPTH], uint32_t (&sv)[DEPTH]) {
    const uint4* cp = codes + static_cast<int64_t>(c0) * 32;
    const uint32_t* sp = scales + static_cast<int64_t>(c0) * 8;
    const int left = c_end - c0;
    if (NT == 1 && !a.slow_batches && (DEPTH - 1) * WK < left) {   // a full batch: no per-load predicate
#pragma unroll
      for (int d = 0; d < DEPTH; ++d) {
        cd[d] = __ldg(cp + d * WK * 32);
        sv[d] = __ldg(sp + d * WK * 8);
      }
      return;
    }
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
      if (d * WK < left) {
        cd[d] = __ldg(cp + d * WK * 32);
        sv[d] = __ldg(sp + d * WK * 8);
      }
    }
  };
  if (tile_ok) load_batch(wk, slab / 64, code_a, sc_a);

  if (threadIdx.x < BN) {
    const int p = threadIdx.x < count ? a.perm[base + threadIdx.x] : -1;
    pair_of[threadIdx.x] = (p >= 0 && p < a.P) ? p : -1;   // a pair index out of range is skipped
  }
  if (a.routing_ready) pdl_wait();
  __syncthreads();

  // Staged row each n-tile reads for this lane; rows past the staged ones only feed unused columns.
  int brow_of[NT];
#pragma unroll
  for (int n = 0; n < NT; ++n) brow_of[n] = min(n * 8 + g, rows - 1) * stride;

  float acc[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  for (int k0 = 0; k0 < a.K; k0 += slab) {
    const int c_begin = k0 / 64, c_end = (k0 + slab) / 64;
    if (k0 > 0 && tile_ok) load_batch(c_begin + wk, c_end, code_a, sc_a);
    // Stage the slab of activations for the tile's tokens (fp16). Within each 64-column chunk, word
    // q + 4i (the B fragment word i of lane quad q) goes to q * 8 + i, so a lane's 8 words of a
    // chunk are two 16-byte loads.
    __syncthreads();
    const int vecs = slab / 8;                                       // 16-byte vectors a row
    for (int i = threadIdx.x; i < rows * vecs; i += NW * 32) {
      const int n = i / vecs, c4 = i % vecs;
      const int p = pair_of[n];
      if (p < 0) continue;  // rows past `count` only feed accumulator columns that are never stored
      const int64_t row = SWIGLU ? p / a.top_k : p;
      const uint4 v = __ldg(reinterpret_cast<const uint4*>(a.x + row * a.K + k0) + c4);   // address from smem after the wait
      uint32_t* dst = bs + n * stride + (c4 >> 3) * 32 + (c4 & 7);
      dst[0] = bf16x2_to_f16x2(v.x);
      dst[8] = bf16x2_to_f16x2(v.y);
      dst[16] = bf16x2_to_f16x2(v.z);
      dst[24] = bf16x2_to_f16x2(v.w);
    }
    __syncthreads();
    if (!tile_ok) continue;
    // One 64-column chunk c of the tile (its codes cw, scales scw) into acc.
    const auto chunk_mma = [&](int c, const uint4& cw, uint32_t scw) {
      const int kw = (c - c_begin) * 32 + q * 8;                   // this lane's 8 B words of the chunk
      uint4 bv[NT][2];
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        bv[n][0] = *reinterpret_cast<const uint4*>(bs + brow_of[n] + kw);
        bv[n][1] = *reinterpret_cast<const uint4*>(bs + brow_of[n] + kw + 4);
      }
      block_mma<NT>(cw, scw, bv, acc);
    };
    // A full batch (every chunk before c_end, the common case) has no per-chunk exit, so its DEPTH
    // chunks are one basic block the compiler interleaves (as in moe_decode_kernel). Decode shapes
    // only (NT == 1): with more n-tiles the larger block spilled.
    const auto compute_batch = [&](int c0, const uint4 (&cd)[DEPTH], const uint32_t (&sv)[DEPTH]) {
      if (NT == 1 && !a.slow_batches && c0 + (DEPTH - 1) * WK < c_end) {
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) chunk_mma(c0 + d * WK, cd[d], sv[d]);
        return;
      }
#pragma unroll
      for (int d = 0; d < DEPTH; ++d) {
        if (c0 + d * WK >= c_end) break;
        chunk_mma(c0 + d * WK, cd[d], sv[d]);
      }
    };
    constexpr int kStep = WK * DEPTH;
    for (int c0 = c_begin + wk; c0 < c_end; c0 += 2 * kStep) {
      if (c0 + kStep < c_end) load_batch(c0 + kStep, c_end, code_b, sc_b);
      compute_batch(c0, code_a, sc_a);
      if (c0 + kStep >= c_end) break;
      if (c0 + 2 * kStep < c_end) load_batch(c0 + 2 * kStep, c_end, code_a, sc_a);
      compute_batch(c0 + kStep, code_b, sc_b);
    }
  }
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[n][j] *= 16384.f;   // the decode's 2^-14

  pdl_trigger();  // after the main loop: an early launch of the next grid slowed this one (placement)
  // Split-K: warps wk > 0 hand their sums to wk == 0 through shared memory.
  if constexpr (WK > 1) {
    __syncthreads();
    float* red = reinterpret_cast<float*>(smem_raw);  // reuses the activation buffer
    if (wk > 0) {
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int j = 0; j < 4; ++j) red[(((wk - 1) * WM + wm) * NT * 4 + n * 4 + j) * 32 + lane] = acc[n][j];
    }
    __syncthreads();
    if (wk > 0) return;
#pragma unroll
    for (int w = 1; w < WK; ++w)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[n][j] += red[(((w - 1) * WM + wm) * NT * 4 + n * 4 + j) * 32 + lane];
  }
  if (!tile_ok) return;

  // Epilogue. Accumulator (n, j): token n*8 + 2q + (j & 1), tile row g + 8 * (j >> 1).
  const bf16* bias = a.bias + static_cast<int64_t>(expert) * a.R;
#pragma unroll
  for (int n = 0; n < NT; ++n) store_tile<SWIGLU>(a, bias, pair_of, n, tile, g, q, acc[n]);
}

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
    if (!a.slow_batches && ub + DEPTH < u1 && c + DEPTH < C && (ub + DEPTH <= uB || ub >= uB)) {
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

template <int NW>
size_t decode_smem(const MoeGemmArgs& a) {
  const int64_t srows = std::min<int64_t>(8, a.P);
  return static_cast<size_t>(kDecodeSlots * srows) * (a.K / 2 + 4) * 4 + static_cast<size_t>(NW) * 2 * 4 * 32 * 4;
}

int sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  if (cached[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 0;
    cached[dev] = n;
  }
  return cached[dev];
}

// Whether the persistent decode kernel serves this call (items <= SMs, activations fit), and
// launches it. Returns cudaErrorNotSupported (nothing launched) where it does not.
template <bool SWIGLU, int NW, int DEPTH>
cudaError_t launch_decode(const MoeGemmArgs& a, cudaStream_t stream) {
  const int sms = sm_count();
  const int64_t items = max_work_items(a.P, a.E, 8);
  const size_t smem = decode_smem<NW>(a);
  if (sms <= 0 || items > sms || smem > 200 * 1024 || static_cast<int64_t>(sms) * items * (a.R / 16) >= INT32_MAX)
    return cudaErrorNotSupported;
  auto kernel = moe_decode_kernel<SWIGLU, NW, DEPTH>;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (e != cudaSuccess) return e;
  const int64_t tiles = items * (a.R / 16);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(sms, tiles));
  return launch_kernel(kernel, dim3(grid), dim3(NW * 32), smem, stream, a);
}

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

template <int WM, int NT, int DEPTH, bool SWIGLU, int NW = kWarps, int MINB = 1>
cudaError_t launch_gemm(const MoeGemmArgs& a, cudaStream_t stream) {
  constexpr int BN = 8 * NT;
  const int rows = static_cast<int>(std::min<int64_t>(BN, a.P));
  // Whole K at once when it fits (decode), else the largest slab dividing K.
  int slab = a.K;
  const auto bytes = [&](int s) { return static_cast<size_t>(rows) * (s / 2 + 4) * 4; };
  if (bytes(slab) > 96 * 1024) {
    slab = 64;
    for (int s : {320, 256, 192, 128}) {
      if (a.K % s == 0 && bytes(s) <= 96 * 1024) {
        slab = s;
        break;
      }
    }
  }
  constexpr int WK = NW / WM;
  const size_t red_bytes = WK > 1 ? static_cast<size_t>(WK - 1) * WM * NT * 4 * 32 * 4 : 0;
  const size_t smem = std::max(bytes(slab), red_bytes);
  auto kernel = moe_gemm_kernel<WM, NT, DEPTH, SWIGLU, NW, MINB>;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const int64_t max_items = max_work_items(a.P, a.E, BN);
  const dim3 grid((a.R / 16 + WM - 1) / WM, static_cast<unsigned>(max_items));
  return launch_kernel(kernel, grid, dim3(NW * 32), smem, stream, a, slab);
}

// GPTOSS_MOE_GENERIC_PREFILL=1: the per-group-partials kernel for prefill too (tests, comparisons).
bool force_generic_prefill() {
  const char* e = std::getenv("GPTOSS_MOE_GENERIC_PREFILL");
  return e && e[0] == '1';
}

#ifdef GPTOSS_HAVE_SM90A_KERNELS
// GPTOSS_MOE_PREFILL=mma: the mma.sync prefill kernel even where the wgmma one is usable.
bool prefill_forced_mma() {
  const char* e = std::getenv("GPTOSS_MOE_PREFILL");
  return e && e[0] == 'm';
}

// Tokens a wgmma tile: 128 where experts average >= 128 routed tokens, else 64 (less of a tile
// wasted on an expert's last few tokens); GPTOSS_MOE_WGMMA_BN overrides.
int wgmma_bn(int64_t per_expert) {
  const char* e = std::getenv("GPTOSS_MOE_WGMMA_BN");
  if (e && (std::atoi(e) == 64 || std::atoi(e) == 128 || std::atoi(e) == 256)) return std::atoi(e);
  return per_expert >= 128 ? 128 : 64;
}
#endif

template <bool SWIGLU>
cudaError_t launch(const MoeGemmArgs& args, cudaStream_t stream) {
  if (args.P == 0) return cudaSuccess;
  MoeGemmArgs a = args;
  if (a.R % 16 != 0 || a.K % 64 != 0 || a.E < 1 || a.E > kMaxExperts || a.top_k < 1 || a.P > INT32_MAX)
    return cudaErrorInvalidValue;
  const int64_t per_expert = a.P / std::max<int64_t>(1, std::min<int64_t>(a.E, a.P));
  // decode: 8-token tiles; a CTA's warps take different row tiles of one (expert, token tile), so
  // the prologue (routing lookups, staging the activations) is paid once for 4 (mlp1) or 2 (mlp2,
  // whose K is split over 2 warps for parallelism) tiles; 8 chunks a batch, pipelined.
  // (A variant streaming the weights through per-warp cp.async rings, 40 registers, measured
  // 38.9 us vs 36.3 us at T=1 and 230 vs 185 us at T=8: issue-bound on the FP4 decode, not
  // latency-bound; see bench/NOTES.md.)
  if (per_expert <= 8) {
    const char* v = std::getenv("GPTOSS_MOE_DECODE");
    const char* fb = std::getenv("GPTOSS_MOE_FAST_BATCH");   // A/B: 0 = every batch on the per-unit path
    a.slow_batches = fb && fb[0] == '0';
    // The persistent kernel (default; 'p' 24 warps x 4-chunk batches, 'q' 16 x 6, 'r' 32 x 3) where
    // it serves the call (work items <= SMs); else the grid-of-tiles kernel below. H100, 20b
    // (bench/moe_decode_ab.py): T=8 117 vs 132 us (h), 120b 153 vs 172; T=1 35 vs 36 us.
    // Default: 'p' from 16 pairs (T = 4 at top-4); below, the grid-of-tiles kernel ('b' for one
    // token, 'h' for two), which measured faster there as moe_experts (mlp2 routing_ready):
    // 20b T=1 b 29.8 vs q 31.5 vs p ~33 us, T=2 h 47.6 vs p 49.5, T=4 p 77.2 vs h 87.1; 120b alike
    // (results/h100_moe_decode_ab.md). ('q' 16 warps x 6 is kept for A/B.)
    // The grid-of-tiles kernel: 8 warps a CTA, K split over 2 (mlp1) / 4 (mlp2) warps, 4-chunk
    // batches, registers capped for 3 CTAs an SM: twice the warps of the 4-warp, 8-chunk version
    // (GPTOSS_MOE_DECODE=a). H200, 20b: T=1 28.1 vs 28.8 us, T=8 133 vs 136 us.
    if ((!v && a.P >= 16) || (v && (v[0] == 'p' || v[0] == 'q' || v[0] == 'r'))) {
      const bool q16 = v && v[0] == 'q';
      const cudaError_t e = q16                    ? launch_decode<SWIGLU, 16, 6>(a, stream)
                            : v && v[0] == 'r'     ? launch_decode<SWIGLU, 32, 3>(a, stream)
                                                   : launch_decode<SWIGLU, 24, 4>(a, stream);
      if (e != cudaErrorNotSupported) return e;
    }
    if (v && v[0] == 'a') return SWIGLU ? launch_gemm<4, 1, 8, SWIGLU>(a, stream) : launch_gemm<2, 1, 8, SWIGLU>(a, stream);
    // Shapes of the 8-warp kernel (bench/moe_decode_ab.py, H100, 8 rotated routings): 'b' the K
    // split below, 'h' half as wide (mlp1 unsplit, mlp2 over 2 warps), 'w' twice as wide, 'd'
    // 6-chunk batches at 2 CTAs an SM. 20b T = 1: b 31.3, h 35.4, w 36.4, d 35.0 us (the split
    // keeps the few experts' tiles on every SM); T = 8: h 132.3, b 139.3, d 153.9, w 186.5 us (with
    // ~22 experts there are warps enough unsplit, and fewer partial sums); T = 2: h 51.1, b 58.6;
    // T = 4: h 91.6, b 100.1. Default: h once the pairs can reach >= 8 experts (T >= 2 at top-4).
    if (v && v[0] == 'w')
      return SWIGLU ? launch_gemm<2, 1, 4, SWIGLU, 8, 3>(a, stream) : launch_gemm<1, 1, 4, SWIGLU, 8, 3>(a, stream);
    if (v && v[0] == 'd')
      return SWIGLU ? launch_gemm<4, 1, 6, SWIGLU, 8, 2>(a, stream) : launch_gemm<2, 1, 6, SWIGLU, 8, 2>(a, stream);
    const bool wide = v && v[0] == 'b';
    if ((v && v[0] == 'h') || (!wide && std::min<int64_t>(a.E, a.P) >= 8))
      return SWIGLU ? launch_gemm<8, 1, 4, SWIGLU, 8, 3>(a, stream) : launch_gemm<4, 1, 4, SWIGLU, 8, 3>(a, stream);
    return SWIGLU ? launch_gemm<4, 1, 4, SWIGLU, 8, 3>(a, stream) : launch_gemm<2, 1, 4, SWIGLU, 8, 3>(a, stream);
  }
  if (per_expert <= 32) return launch_gemm<2, 2, 2, SWIGLU>(a, stream);
  // prefill: the scale-folding tensor-core kernel when every scale fits fp16 (s <= 128, see above)
  if (a.max_scale <= 128 && !force_generic_prefill()) {
#ifdef GPTOSS_HAVE_SM90A_KERNELS
    // Hopper: the wgmma kernel (moe_mxfp4_sm90.cu). GPTOSS_MOE_PREFILL=mma keeps the mma.sync one
    // (A/B, tests); GPTOSS_MOE_WGMMA_BN=64|128|256 fixes its token tile.
    if (!prefill_forced_mma() && moe_wgmma_usable(a)) return launch_moe_wgmma(a, SWIGLU, wgmma_bn(per_expert), stream);
#endif
    return launch_prefill<SWIGLU>(a, stream);
  }
  return launch_gemm<4, 8, 2, SWIGLU, kWarps, 3>(a, stream);   // <= 170 registers: 3 CTAs an SM
}

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

cudaError_t launch_moe_mlp1(const MoeGemmArgs& a, cudaStream_t stream) { return launch<true>(a, stream); }
cudaError_t launch_moe_mlp2(const MoeGemmArgs& a, cudaStream_t stream) { return launch<false>(a, stream); }

cudaError_t launch_moe_experts(const MoeGemmArgs& a1, const MoeGemmArgs& a2, cudaStream_t stream) {
  const cudaError_t e1 = launch<true>(a1, stream);
  return e1 != cudaSuccess ? e1 : launch<false>(a2, stream);
}

cudaError_t launch_moe_combine(const float* y, const bf16* residual, bf16* out, int64_t T, int k, int H,
                               cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (H % 4 != 0 || T > INT32_MAX) return cudaErrorInvalidValue;
  const int threads = 128;
  const dim3 grid(static_cast<unsigned>(T), std::max(1, std::min(8, H / (threads * 4))));
  return launch_kernel(combine_kernel, grid, dim3(threads), 0, stream, y, residual, out, k, H);
}

}  // namespace gptoss
