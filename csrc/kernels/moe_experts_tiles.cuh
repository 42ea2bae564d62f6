// The grid-of-tiles MXFP4 expert GEMM kernel: grid x = row tiles (16 * WM rows a CTA), y = work
// items (expert, BN = 8 * NT pairs, found by scanning the offsets). Weight-stationary mma.sync
// m16n8k16: A is a 16-row tile of an expert's weight straight from global memory in the kernel
// layout, decoded in registers; B the tile's tokens, staged in shared memory as fp16. K is split
// over NW / WM warps, reduced in shared memory. Each 32-column group's partial sum is scaled in
// fp32 (exact for every E8M0 scale). Instantiated by moe_experts_decode.cu (8 pairs a tile, the
// whole K staged once) and moe_experts_prefill.cu (16 or 64 pairs, K in slabs).
#pragma once
#include <algorithm>

#include "kernels/mma.cuh"
#include "kernels/moe_experts.cuh"

namespace gptoss {
namespace {

constexpr int kWarps = 4;

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
    if (NT == 1 && (DEPTH - 1) * WK < left) {   // a full batch: no per-load predicate
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
      if (NT == 1 && c0 + (DEPTH - 1) * WK < c_end) {
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

}  // namespace
}  // namespace gptoss
