// Sink-aware causal GQA flash attention, head_dim 64: varlen prefill, and split-KV decode with the
// splits merged in the same launch (the cache is written by kv_cache.cu / rope.cu). Tensor cores through mma.sync m16n8k16
// (bf16 in, fp32 accumulate), which runs on sm_80+ and on Hopper.
//
// Prefill (FlashAttention-2 style): a CTA takes 64 * MT query rows of one head of one sequence
// (4 warps, 16 * MT rows each) and walks key tiles (128 keys for full attention, 64 for narrow
// windows) of the KV head it shares with its GQA group, double-buffered through cp.async into
// XOR-swizzled shared memory (conflict-free ldmatrix). S = Q K^T stays in registers; the S
// accumulators are re-packed as the A operand of P V (the m16n8 C layout of two adjacent key blocks
// is the m16n8k16 A layout), online softmax in fp32 with exp2, lazy rescaling and tree row
// reductions. Only the tiles the causal/window band touches are visited; masks only on tiles that
// cut the band. Heaviest query blocks are scheduled first.
//
// Decode: a CTA takes the (up to 16) query heads of a GQA group of one sequence (so each K/V tile
// is read once for the whole group: rows of the mma are heads) and one chunk of the key range; its
// 1, 4 or 8 warps each stream a part in 32-key tiles through their own cp.async ring (up to 4
// tiles, 32 KB). One-warp CTAs (7 an SM) for large batches; 8-warp CTAs for small ones, where a
// one-warp CTA's serial tile chain (~0.3 us a tile after ~1-2 us for its first bytes) would be the
// limit. Splits merge in the same launch: the last CTA of a group (atomic ticket) reads the others'
// partials from L2, so there is no combine launch.
//
// Rows of K/V past the valid range are zero-filled (never read from memory), so a cache holding
// garbage or NaN beyond its length cannot leak into the result; fully masked rows give 0, not NaN.
#include <algorithm>
#include <cmath>

#include "kernels/attention.h"
#include "kernels/common.cuh"
#include "kernels/mma.cuh"

namespace gptoss {
namespace {

constexpr int D = kAttnHeadDim;  // 64 = 8 chunks of 16 bytes a row
constexpr int BN = 64;           // the one-warp decode plan's chunk unit (keys)
constexpr int kDecStages = 4;
constexpr int kDecNB = 4;                      // decode tiles: 32 keys
constexpr int kDecBN = 8 * kDecNB;
constexpr int kDecTileBytes = kDecBN * D * 2;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -INFINITY;

// 2^x on the SFU (flush-to-zero: results below 2^-126 are 0, which softmax weights can be).
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// atomicAdd with acquire-release ordering at GPU scope.
__device__ __forceinline__ int atomic_add_acq_rel(int* p, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;\n" : "=r"(old) : "l"(p), "r"(v) : "memory");
  return old;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}


// Sequence b's positions -> cache rows (attention.h): a contiguous cache's row b * max_len + p, or
// a paged pool's row through the block table.
struct KvRows {
  const int32_t* table;   // the sequence's row of the block table, or null
  int shift;
  int64_t first;          // contiguous: b * max_len
  __device__ __forceinline__ int64_t row(int pos) const {
    return table ? ((static_cast<int64_t>(table[pos >> shift]) << shift) | (pos & ((1 << shift) - 1))) : first + pos;
  }
  // The first position past pos's block (contiguous: never).
  __device__ __forceinline__ int block_end(int pos) const { return table ? ((pos >> shift) + 1) << shift : INT32_MAX; }
};

__device__ __forceinline__ KvRows kv_rows(const KvLayout& l, int b, int max_len) {
  KvRows r;
  r.table = l.block_table ? l.block_table + static_cast<int64_t>(b) * l.table_stride : nullptr;
  r.shift = l.block_shift;
  r.first = static_cast<int64_t>(b) * max_len;
  return r;
}

// Copy positions [key0, key0 + 8 * NB) of one KV head (base: the cache at that head) into a tile;
// positions >= key_end are zero-filled. Thread tid copies 16-byte chunk tid % 8 of rows tid / 8 +
// k * NT / 8. The tile's rows are consecutive in the cache up to a block boundary and from there
// in the next block (a block holds at least a tile, so there are at most two runs).
template <int NT, int NB = 8>
__device__ __forceinline__ void load_tile(uint32_t dst, const bf16* base, int64_t row_stride, const KvRows& rows,
                                          int key0, int key_end, int tid) {
  constexpr int kRowsPerPass = NT / 8;
  const int c = tid & 7, r0 = tid >> 3;
  const int split = min(rows.block_end(key0), key_end) - key0;               // rows in key0's block
  const int64_t run0 = rows.row(key0);
  const int64_t run1 = split < NB * 8 && key0 + split < key_end ? rows.row(key0 + split) - split : run0;
  const bf16* src0 = base + (run0 + r0) * row_stride + c * 8;
  const bf16* src1 = base + (run1 + r0) * row_stride + c * 8;
  const int64_t step = (int64_t)kRowsPerPass * row_stride;
#pragma unroll
  for (int k = 0; k < NB * 8 / kRowsPerPass; ++k) {
    const int r = r0 + k * kRowsPerPass;
    const bool valid = key0 + r < key_end;
    const uint32_t d = kRowsPerPass % 8 == 0 ? dst + swz128(r0, c) + k * kRowsPerPass * 128 : dst + swz128(r, c);
    cp_async16(d, valid ? (r < split ? src0 : src1) + k * step : base, valid);
  }
}

// S[mt] (16 rows x 8*NB keys) = Q[mt] K^T for one warp's MT row tiles; q_step(ks, qf) gives the Q
// fragments of k-step ks (16 of the 64 dims) for every mt.
template <int MT, int NB, typename QStep>
__device__ __forceinline__ void qk_tile_q(float (&s)[MT][NB][4], uint32_t sK, int lane, QStep&& q_step) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NB; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
    uint32_t qf[MT][4];
    q_step(ks, qf);
#pragma unroll
    for (int nb = 0; nb < NB / 2; ++nb) {
      uint32_t b[4];
      ldsm_x4(b, sK + swz128(nb * 16 + (lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1)));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_bf16(s[mt][2 * nb], qf[mt], b[0], b[1]);
        mma_bf16(s[mt][2 * nb + 1], qf[mt], b[2], b[3]);
      }
    }
  }
}

// Q fragments held in registers (qf[mt][ks]).
template <int MT, int NB = 8>
__device__ __forceinline__ void qk_tile(float (&s)[MT][NB][4], const uint32_t (&qf)[MT][4][4], uint32_t sK, int lane) {
  qk_tile_q<MT, NB>(s, sK, lane, [&](int ks, uint32_t (&f)[MT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) f[mt][i] = qf[mt][ks][i];
  });
}

// Q fragments re-read from shared memory (rows wrow .. of sQ) at each k-step.
template <int MT, int NB>
__device__ __forceinline__ void qk_tile_sq(float (&s)[MT][NB][4], uint32_t sQ, int wrow, uint32_t sK, int lane) {
  qk_tile_q<MT, NB>(s, sK, lane, [&](int ks, uint32_t (&f)[MT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) ldsm_x4(f[mt], sQ + swz128(wrow + mt * 16 + (lane & 15), ks * 2 + (lane >> 4)));
  });
}

// Online softmax on a raw S tile (masked entries -inf); sl2 = sm_scale * log2(e), the running
// max m is kept in the scaled log2 domain. S becomes P, O is rescaled, l accumulates per thread.
// Lazy rescaling: a row's m moves (and its O, l are rescaled) only when the tile's max is more than
// kRescaleSlack above it; a warp skips the whole step when no row moves, which is most tiles. P
// then stays <= 2^kRescaleSlack, and O, l and the sink are all relative to the same m (exact).
constexpr float kRescaleSlack = 8.f;

// t[0] = op over t[0 .. 2W), pairwise (depth log2(2W)).
template <int W, int N, typename Op>
__device__ __forceinline__ void tree_reduce(float (&t)[N], Op op) {
  if constexpr (W >= 1) {
#pragma unroll
    for (int j = 0; j < W; ++j) t[j] = op(t[j], t[j + W]);
    tree_reduce<W / 2>(t, op);
  }
}

template <int MT, int NB = 8>
__device__ __forceinline__ void softmax_tile(float (&s)[MT][NB][4], float (&o)[MT][8][4], float (&m)[MT][2],
                                             float (&l)[MT][2], float sl2) {
  constexpr float slack = kRescaleSlack;
  float mx[MT][2];
  bool grow = false;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      // A tree, not a chain: the serial FMNMX chain's fixed latency was the top stall (ncu).
      float t[NB];
#pragma unroll
      for (int j = 0; j < NB; ++j) t[j] = fmaxf(s[mt][j][2 * hr], s[mt][j][2 * hr + 1]);
      tree_reduce<NB / 2>(t, [](float x, float y) { return fmaxf(x, y); });
      float v = t[0];
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
      v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
      mx[mt][hr] = v * sl2;
      grow |= mx[mt][hr] > m[mt][hr] + slack;
    }
  if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        // Per row (a row's result must not depend on its neighbours in the warp: chunked prefill
        // gives the same bits): only the rows past the slack move.
        if (!(mx[mt][hr] > m[mt][hr] + slack)) continue;
        const float alpha = ex2(m[mt][hr] - mx[mt][hr]);  // a row's first keys: ex2(-inf) = 0
        m[mt][hr] = mx[mt][hr];
        l[mt][hr] *= alpha;
#pragma unroll
        for (int d = 0; d < 8; ++d) {
          o[mt][d][2 * hr] *= alpha;
          o[mt][d][2 * hr + 1] *= alpha;
        }
      }
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const float mu = m[mt][hr] == kNegInf ? 0.f : m[mt][hr];
      float t[NB];
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        const float p0 = ex2(fmaf(s[mt][j][2 * hr], sl2, -mu)), p1 = ex2(fmaf(s[mt][j][2 * hr + 1], sl2, -mu));
        s[mt][j][2 * hr] = p0;
        s[mt][j][2 * hr + 1] = p1;
        t[j] = p0 + p1;
      }
      tree_reduce<NB / 2>(t, [](float x, float y) { return x + y; });
      l[mt][hr] += t[0];
    }
}

// O[mt] += P[mt] V for one tile of 8*NB keys.
template <int MT, int NB = 8>
__device__ __forceinline__ void pv_tile(float (&o)[MT][8][4], const float (&p)[MT][NB][4], uint32_t sV, int lane) {
#pragma unroll
  for (int kk = 0; kk < NB / 2; ++kk) {
    uint32_t pa[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      pa[mt][0] = pack_bf16(p[mt][2 * kk][0], p[mt][2 * kk][1]);
      pa[mt][1] = pack_bf16(p[mt][2 * kk][2], p[mt][2 * kk][3]);
      pa[mt][2] = pack_bf16(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);
      pa[mt][3] = pack_bf16(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int db = 0; db < 4; ++db) {
      uint32_t b[4];
      ldsm_x4_t(b, sV + swz128(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), db * 2 + (lane >> 4)));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_bf16(o[mt][2 * db], pa[mt], b[0], b[1]);
        mma_bf16(o[mt][2 * db + 1], pa[mt], b[2], b[3]);
      }
    }
  }
}

// ---- prefill ------------------------------------------------------------------------------------

// TB keys a tile (64 or 128: a 128-key tile halves the per-tile barriers, row reductions and loop
// overhead, as FlashAttention-2 does for head_dim 64). QS: Q fragments re-read from shared memory
// every k-step instead of held in registers (32 registers fewer, which a 128-key S tile needs).
template <int MT, int TB, bool QS>
__global__ void __launch_bounds__(128) attn_prefill_kernel(const AttnPrefillArgs a) {
  pdl_wait();     // see kernels/pdl.h
  constexpr int BM = 64 * MT, NT = 128, NB = TB / 8, kTB = TB * D * 2;
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t sQ = smem_u32(smem), sK = sQ + BM * 128, sV = sK + 2 * kTB;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b = blockIdx.z, h = blockIdx.y;
  const int mb = gridDim.x - 1 - blockIdx.x;  // the longest key ranges first
  const int q0 = a.cu_seqlens[b];
  // Lengths come from device memory: clamp to the tensors (the wrappers validate them on the host).
  const int q_len = min(a.cu_seqlens[b + 1], a.total_q) - q0;
  const int row0 = mb * BM;
  if (q0 < 0 || row0 >= q_len) return;
  const int rows = min(BM, q_len - row0);
  const int pos0 = a.start[b] + row0, pos_last = pos0 + rows - 1;
  const int key_lo = a.window > 0 ? max(0, pos0 - a.window + 1) : 0;
  const int key_end = min(pos_last + 1, a.max_len);
  const int t_lo = key_lo / TB, t_hi = (key_end + TB - 1) / TB;
  const int kvh = h / (a.Hq / a.Hkv);
  const int64_t kv_row = (int64_t)a.Hkv * D;
  const KvRows kr = kv_rows(a.layout, b, a.max_len);
  const bf16* kb = a.k_cache + (int64_t)kvh * D;
  const bf16* vb = a.v_cache + (int64_t)kvh * D;

  const bf16* qb = a.q + (int64_t)(q0 + row0) * a.q_stride + (int64_t)h * D;
  for (int i = tid; i < BM * 8; i += NT) {
    const int r = i >> 3, c = i & 7;
    const bool valid = r < rows;
    cp_async16(sQ + swz128(r, c), valid ? qb + (int64_t)r * a.q_stride + c * 8 : qb, valid);
  }
  load_tile<NT, NB>(sK, kb, kv_row, kr, t_lo * TB, key_end, tid);
  load_tile<NT, NB>(sV, vb, kv_row, kr, t_lo * TB, key_end, tid);
  cp_async_commit();

  const float sl2 = a.sm_scale * kLog2e;
  uint32_t qf[QS ? 1 : MT][4][4];
  float o[MT][8][4], m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m[mt][0] = m[mt][1] = kNegInf;
    l[mt][0] = l[mt][1] = 0.f;
#pragma unroll
    for (int d = 0; d < 8; ++d) o[mt][d][0] = o[mt][d][1] = o[mt][d][2] = o[mt][d][3] = 0.f;
  }
  const int wrow = warp * 16 * MT;  // the warp's first row in the block

  for (int t = t_lo; t < t_hi; ++t) {
    const int buf = (t - t_lo) & 1;
    if (t + 1 < t_hi) {
      load_tile<NT, NB>(sK + (buf ^ 1) * kTB, kb, kv_row, kr, (t + 1) * TB, key_end, tid);
      load_tile<NT, NB>(sV + (buf ^ 1) * kTB, vb, kv_row, kr, (t + 1) * TB, key_end, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    float s[MT][NB][4];
    if constexpr (QS) {
      qk_tile_sq<MT, NB>(s, sQ, wrow, sK + buf * kTB, lane);
    } else {
      if (t == t_lo) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int ks = 0; ks < 4; ++ks)
            ldsm_x4(qf[mt][ks], sQ + swz128(wrow + mt * 16 + (lane & 15), ks * 2 + (lane >> 4)));
      }
      qk_tile<MT, NB>(s, qf, sK + buf * kTB, lane);
    }
    const int k0 = t * TB;
    if ((k0 + TB - 1 > pos0) || (a.window > 0 && k0 <= pos_last - a.window)) {  // the tile cuts the band
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < NB; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int pos = pos0 + wrow + mt * 16 + (lane >> 2) + ((e >> 1) << 3);
            const int key = k0 + j * 8 + ((lane & 3) << 1) + (e & 1);
            if (key > pos || (a.window > 0 && pos - key >= a.window)) s[mt][j][e] = kNegInf;
          }
    }
    softmax_tile<MT, NB>(s, o, m, l, sl2);
    pv_tile<MT, NB>(o, s, sV + buf * kTB, lane);
    __syncthreads();
  }
  pdl_trigger();  // multi-wave: the next kernel launches once every CTA is past its main loop

  bf16* ob = a.out + (int64_t)(q0 + row0) * a.out_stride + (int64_t)h * D;
  const float sink = a.sinks ? a.sinks[h] * kLog2e : kNegInf;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float L = l[mt][hr];
      L += __shfl_xor_sync(0xffffffffu, L, 1);
      L += __shfl_xor_sync(0xffffffffu, L, 2);
      const float mu = m[mt][hr] == kNegInf ? 0.f : m[mt][hr];
      if (a.sinks) L += ex2(sink - mu);
      const float inv = L > 0.f ? 1.f / L : 0.f;
      const int r = wrow + mt * 16 + (lane >> 2) + hr * 8;
      if (r < rows) {
        bf16* orow = ob + (int64_t)r * a.out_stride + ((lane & 3) << 1);
#pragma unroll
        for (int d = 0; d < 8; ++d)
          *reinterpret_cast<uint32_t*>(orow + d * 8) = pack_bf16(o[mt][d][2 * hr] * inv, o[mt][d][2 * hr + 1] * inv);
      }
    }
}

// ---- decode -------------------------------------------------------------------------------------

// One CTA: NW warps take consecutive parts of one split's key range of one GQA group (the group's
// up to 16 query heads are the mma rows, so each K/V tile is read once for the group); each warp
// streams its part through its own NS-stage ring of 32-key tiles (NS * 8 KB). The warps' partials
// are merged through shared memory; with one split that is the output (sink added). With several,
// the CTA writes its partial (unnormalised output, max, sum) to the workspace and takes a ticket;
// the last CTA of the group merges the splits and writes the output — one launch, no combine
// kernel — and puts the ticket back to 0 for the next launch.
constexpr int kDecOPitch = D + 4;  // floats a row of a warp's partial in shared memory (2-way banks)
constexpr int kMergeBatch = 16;    // splits whose partials the last CTA loads at once

template <int NW, int NS>
__global__ void __launch_bounds__(NW * 32) attn_decode_kernel(const AttnDecodeArgs a) {
  constexpr int NT = NW * 32;
  constexpr int kWarpBytes = 2 * NS * kDecTileBytes;
  static_assert(16 * kDecOPitch * 4 + 16 * 2 * 4 <= kWarpBytes, "a warp's partial must fit its ring");
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int last_cta;
  __shared__ float sink_s[16];  // the group's sinks (log2 domain)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // kv_ready: seq_lens and the cache rows before each sequence's newest were written two or more
  // kernels back, so the warps whose part ends before the newest row start their loads before the
  // launch wait (overlapping the previous kernel's tail); otherwise everything waits first.
  if (!a.kv_ready) {
    pdl_wait();     // see kernels/pdl.h
    pdl_trigger();  // at once: later (after the main loop) cost B=32 L=8192 151 -> 171 us, L=65536 42 -> 50 us
  }
  const int split = blockIdx.x, b = blockIdx.z;
  const int G = a.Hq / a.Hkv, hchunks = (G + 15) / 16;
  const int kvh = blockIdx.y / hchunks, hc = blockIdx.y % hchunks;
  const int h0 = kvh * G + hc * 16, nrows = min(16, G - hc * 16);
  const int S = a.num_splits;
  const int len = min(max(a.seq_lens[b], 0), a.max_len);
  const int lo = a.window > 0 ? max(0, len - a.window) : 0;
  const int cbeg = lo + split * a.chunk, cend = min(len, cbeg + a.chunk);
  // The warps' parts: whole tiles, as even as the split's actual length allows.
  const int part = cend > cbeg ? (cend - cbeg + NW * kDecBN - 1) / (NW * kDecBN) * kDecBN : 0;
  const int kbeg = cbeg + warp * part, kend = min(cend, kbeg + part);
  const int r0 = lane >> 2;
  const float sl2 = a.sm_scale * kLog2e;

  float o[1][8][4], m[1][2] = {{kNegInf, kNegInf}}, l[1][2] = {{0.f, 0.f}};
#pragma unroll
  for (int d = 0; d < 8; ++d) o[0][d][0] = o[0][d][1] = o[0][d][2] = o[0][d][3] = 0.f;
  const uint32_t sK = smem_u32(smem) + warp * kWarpBytes, sV = sK + NS * kDecTileBytes;
  const int64_t kv_row = (int64_t)a.Hkv * D;
  const KvRows kr = kv_rows(a.layout, b, a.max_len);
  const bf16* kb = a.k_cache + (int64_t)kvh * D;
  const bf16* vb = a.v_cache + (int64_t)kvh * D;
  const int ntiles = kbeg < kend ? (kend - kbeg + kDecBN - 1) / kDecBN : 0;
  // The ring's first NS tiles (one commit group each, empty past the end).
  const auto prologue = [&] {
#pragma unroll
    for (int st = 0; st < NS; ++st) {
      if (st < ntiles) {
        load_tile<32, kDecNB>(sK + st * kDecTileBytes, kb, kv_row, kr, kbeg + st * kDecBN, kend, lane);
        load_tile<32, kDecNB>(sV + st * kDecTileBytes, vb, kv_row, kr, kbeg + st * kDecBN, kend, lane);
      }
      cp_async_commit();
    }
  };
  const bool early = a.kv_ready && kend < len;
  if (early) prologue();
  if (a.kv_ready) {
    pdl_wait();
    pdl_trigger();
  }
  if (!early) prologue();
  if (tid < 16) sink_s[tid] = (a.sinks && tid < nrows) ? a.sinks[h0 + tid] * kLog2e : kNegInf;  // read at the end

  if (ntiles > 0) {
    // Q fragments straight from global memory: rows are the group's heads (rows >= nrows are zero).
    uint32_t qf[1][4][4];
    {
      const bf16* qb = a.q + (int64_t)b * a.q_stride + (int64_t)h0 * D + ((lane & 3) << 1);
#pragma unroll
      for (int ks = 0; ks < 4; ++ks)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = r0 + (i & 1) * 8, c = ks * 16 + (i >> 1) * 8;
          qf[0][ks][i] = r < nrows ? *reinterpret_cast<const uint32_t*>(qb + r * D + c) : 0u;
        }
    }
    for (int t = 0; t < ntiles; ++t) {
      cp_async_wait<NS - 1>();  // NS + t groups committed: tile t has landed
      __syncwarp();
      const int st = t % NS;
      float s[1][kDecNB][4];
      qk_tile<1, kDecNB>(s, qf, sK + st * kDecTileBytes, lane);
      const int k0 = kbeg + t * kDecBN;
      if (k0 + kDecBN > kend) {
#pragma unroll
        for (int j = 0; j < kDecNB; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (k0 + j * 8 + ((lane & 3) << 1) + (e & 1) >= kend) s[0][j][e] = kNegInf;
      }
      softmax_tile<1, kDecNB>(s, o, m, l, sl2);
      pv_tile<1, kDecNB>(o, s, sV + st * kDecTileBytes, lane);
      __syncwarp();
      const int nt = t + NS;  // into the slot just read
      if (nt < ntiles) {
        load_tile<32, kDecNB>(sK + st * kDecTileBytes, kb, kv_row, kr, kbeg + nt * kDecBN, kend, lane);
        load_tile<32, kDecNB>(sV + st * kDecTileBytes, vb, kv_row, kr, kbeg + nt * kDecBN, kend, lane);
      }
      cp_async_commit();
    }
    cp_async_wait<0>();  // (only empty groups are left) before the ring is reused below
  }

  // The warp's partial into its own ring: o [16][kDecOPitch], then (max, sum) [16][2].
  float* po = reinterpret_cast<float*>(smem + warp * kWarpBytes);
  float* pml = po + 16 * kDecOPitch;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float L = l[0][hr];
    L += __shfl_xor_sync(0xffffffffu, L, 1);
    L += __shfl_xor_sync(0xffffffffu, L, 2);
    const int r = r0 + hr * 8;
#pragma unroll
    for (int d = 0; d < 8; ++d)
      *reinterpret_cast<float2*>(po + r * kDecOPitch + d * 8 + ((lane & 3) << 1)) =
          make_float2(o[0][d][2 * hr], o[0][d][2 * hr + 1]);
    if ((lane & 3) == 0) {
      pml[2 * r] = m[0][hr];
      pml[2 * r + 1] = L;
    }
  }
  __syncthreads();

  // Merge the warps: thread t takes EPT consecutive dims of one row.
  constexpr int EPT = 16 * D / NT, TPR = D / EPT;
  const int row = tid / TPR, d0 = (tid % TPR) * EPT;
  float M = kNegInf;
#pragma unroll
  for (int w = 0; w < NW; ++w) {
    const float* ml = reinterpret_cast<const float*>(smem + w * kWarpBytes) + 16 * kDecOPitch + 2 * row;
    if (ml[1] > 0.f) M = fmaxf(M, ml[0]);
  }
  float acc[EPT], Lsum = 0.f;
#pragma unroll
  for (int i = 0; i < EPT; ++i) acc[i] = 0.f;
#pragma unroll
  for (int w = 0; w < NW; ++w) {
    const float* wp = reinterpret_cast<const float*>(smem + w * kWarpBytes);
    const float* ml = wp + 16 * kDecOPitch + 2 * row;
    const float e = ml[1] > 0.f ? ex2(ml[0] - M) : 0.f;
    Lsum += e * ml[1];
#pragma unroll
    for (int i = 0; i < EPT; i += 4) {
      const float4 v = *reinterpret_cast<const float4*>(wp + row * kDecOPitch + d0 + i);
      acc[i] += e * v.x;
      acc[i + 1] += e * v.y;
      acc[i + 2] += e * v.z;
      acc[i + 3] += e * v.w;
    }
  }

  if (S == 1) {  // one split: normalise with the sink, write the output
    if (row < nrows) {
      const float mu = M == kNegInf ? 0.f : M;
      float L = Lsum;
      if (a.sinks) L += ex2(sink_s[row] - mu);
      const float inv = L > 0.f ? 1.f / L : 0.f;
      bf16* orow = a.out + (int64_t)b * a.out_stride + (int64_t)(h0 + row) * D + d0;
#pragma unroll
      for (int i = 0; i < EPT; i += 2)
        *reinterpret_cast<uint32_t*>(orow + i) = pack_bf16(acc[i] * inv, acc[i + 1] * inv);
    }
    return;
  }

  // The merge of the S partials of each (row, 4 dims) of the group, 16 splits' loads at a time (one
  // L2 round trip for the small-batch plans);
  // ld(s, r, c) gives split s's (max, sum) of row r and its dims c .. c + 3.
  const auto merge_splits = [&](auto&& ld) {
    for (int slot = tid; slot < nrows * (D / 4); slot += NT) {
      const int r = slot / (D / 4), c = (slot % (D / 4)) * 4;
      float Mx = kNegInf, Ls = 0.f, x[4] = {0.f, 0.f, 0.f, 0.f};
      for (int s0 = 0; s0 < S; s0 += kMergeBatch) {
        float2 mv[kMergeBatch];
        float4 ov[kMergeBatch];
#pragma unroll
        for (int j = 0; j < kMergeBatch; ++j) {
          if (s0 + j < S) {
            ld(s0 + j, r, c, mv[j], ov[j]);
          } else {
            mv[j] = make_float2(kNegInf, 0.f);
            ov[j] = make_float4(0.f, 0.f, 0.f, 0.f);
          }
        }
        float bm = Mx;
#pragma unroll
        for (int j = 0; j < kMergeBatch; ++j)
          if (mv[j].y > 0.f) bm = fmaxf(bm, mv[j].x);
        const float sc = Mx == kNegInf ? 0.f : ex2(Mx - bm);  // nothing yet: the sums are 0
        Ls *= sc;
#pragma unroll
        for (int i = 0; i < 4; ++i) x[i] *= sc;
#pragma unroll
        for (int j = 0; j < kMergeBatch; ++j) {
          const float e = mv[j].y > 0.f ? ex2(mv[j].x - bm) : 0.f;
          Ls += e * mv[j].y;
          x[0] += e * ov[j].x;
          x[1] += e * ov[j].y;
          x[2] += e * ov[j].z;
          x[3] += e * ov[j].w;
        }
        Mx = bm;
      }
      const float mu = Mx == kNegInf ? 0.f : Mx;
      if (a.sinks) Ls += ex2(sink_s[r] - mu);
      const float inv = Ls > 0.f ? 1.f / Ls : 0.f;
      bf16* orow = a.out + (int64_t)b * a.out_stride + (int64_t)(h0 + r) * D + c;
      *reinterpret_cast<uint2*>(orow) =
          make_uint2(pack_bf16(x[0] * inv, x[1] * inv), pack_bf16(x[2] * inv, x[3] * inv));
    }
  };

  // Several CTAs: the CTA's partial to the workspace, then its ticket; the group's last CTA merges
  // (L2 reads: other SMs wrote the partials) and puts the ticket back to 0.
  if (row < nrows) {
    const int64_t w = ((int64_t)b * a.Hq + h0 + row) * S + split;
    float* wo = a.ws_o + w * D + d0;
#pragma unroll
    for (int i = 0; i < EPT; i += 4)
      *reinterpret_cast<float4*>(wo + i) = make_float4(acc[i], acc[i + 1], acc[i + 2], acc[i + 3]);
    if (d0 == 0) *reinterpret_cast<float2*>(a.ws_ml + w * 2) = make_float2(M, Lsum);
  }
  // The CTA barrier orders the threads' partials before thread 0's ticket, whose release (gpu scope,
  // cumulative) publishes them; the last CTA's acquire, then its barrier, makes every CTA's visible.
  __syncthreads();
  int* ticket = a.tickets + (int64_t)b * gridDim.y + blockIdx.y;
  if (tid == 0) last_cta = atomic_add_acq_rel(ticket, 1) == S - 1;
  __syncthreads();
  if (!last_cta) return;
  merge_splits([&](int s, int r, int col, float2& mv, float4& ov) {
    const int64_t w = ((int64_t)b * a.Hq + h0 + r) * S + s;
    mv = __ldcg(reinterpret_cast<const float2*>(a.ws_ml + w * 2));
    ov = __ldcg(reinterpret_cast<const float4*>(a.ws_o + w * D + col));
  });
  if (tid == 0) *ticket = 0;  // clean for the next launch
}

template <int MT, int TB, bool QS>
cudaError_t launch_prefill_mt(const AttnPrefillArgs& a, cudaStream_t stream) {
  constexpr int BM = 64 * MT;
  auto kernel = attn_prefill_kernel<MT, TB, QS>;
  const size_t smem = BM * 128 + 4 * TB * D * 2;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid(ceil_div(a.max_q_len, BM), a.Hq, a.B);
  return launch_kernel(kernel, grid, dim3(128), smem, stream, a);
}

// Query rows a prefill CTA: 64 for narrow windows (a 128-row block would visit twice the keys it
// needs: H200, T=4096, window 128: 78-84 us vs 98-103 us), 128 otherwise (half the shared-memory
// traffic a FLOP: causal T=4096 606 us vs 659 us, T=16384 8.0-8.3 ms vs 9.0-9.6 ms).
int prefill_block_rows(int window) { return (window > 0 && window <= 256) ? 64 : 128; }

}  // namespace

cudaError_t launch_attn_prefill(const AttnPrefillArgs& args, cudaStream_t stream) {
  if (args.B <= 0 || args.max_q_len <= 0) return cudaSuccess;
  // 64-row blocks walk 64-key tiles with Q in registers; 128-row blocks 128-key tiles with Q re-read
  // from shared memory (the registers a 128-key S tile needs)
  if (prefill_block_rows(args.window) == 64) return launch_prefill_mt<1, 64, false>(args, stream);
  return launch_prefill_mt<2, 128, true>(args, stream);
}

void attn_decode_split(int B, int Hq, int Hkv, int max_len, int window, int num_sms, int& chunk, int& num_splits,
                       int& warps) {
  const int G = Hq / Hkv, hchunks = (G + 15) / 16;
  const int range = std::max(1, window > 0 ? std::min(window, max_len) : max_len);
  const int64_t sms = std::max(num_sms, 1);
  const int64_t rows = (int64_t)B * Hkv * hchunks;
  int64_t unit, splits;
  if (rows * 2 <= sms) {
    // Few groups (small batches): 8-warp CTAs, about one an SM, each warp an eighth of its split.
    // A one-warp CTA walks its tiles one after another (~0.3 us a tile); more warps shorten that
    // chain, and the in-kernel merge replaces the combine launch. H100, B=1, L=8192: 8 warps 10.5 us,
    // 4 warps 11.8 us, one-warp CTAs with a combine launch 13.7 us; L=2048: 6.0 / 6.4 us.
    // A range of at most 4 tiles (the 128 window) takes 4 warps: 8 left half of them idle and
    // merged twice the partials (H100, B=1: 4.1 vs 2.7-3.1 us).
    warps = range <= 4 * kDecBN ? 4 : 8;
    unit = warps * kDecBN;
    splits = std::max<int64_t>(1, std::min<int64_t>((range + unit - 1) / unit, sms / rows));
  } else {
    // Many groups: one-warp CTAs (7 fit an SM), about 4 an SM. Fewer, longer splits pipeline better
    // inside a CTA and leave less to merge; a range one CTA holds in flight at once (the 128
    // window) takes one split, and the kernel then writes the output straight away.
    warps = 1;
    unit = BN;
    const int64_t wanted = sms * 4;
    splits = range <= kDecStages * kDecBN ? 1
                                          : std::max<int64_t>(1, std::min<int64_t>((range + unit - 1) / unit,
                                                                                   (wanted + rows / 2) / rows));
  }
  const int64_t c = ((range + splits - 1) / splits + unit - 1) / unit * unit;
  chunk = static_cast<int>(c);
  num_splits = static_cast<int>((range + c - 1) / c);
}

namespace {
template <int NW, int NS>
cudaError_t launch_decode_variant(const AttnDecodeArgs& a, dim3 grid, cudaStream_t stream) {
  auto kernel = attn_decode_kernel<NW, NS>;
  const size_t smem = static_cast<size_t>(NW) * 2 * NS * kDecTileBytes;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  return launch_kernel(kernel, grid, dim3(NW * 32), smem, stream, a);
}
}  // namespace

cudaError_t launch_attn_decode(const AttnDecodeArgs& args, cudaStream_t stream) {
  if (args.B <= 0) return cudaSuccess;
  const AttnDecodeArgs& a = args;
  if (a.num_splits > 1 && a.tickets == nullptr) return cudaErrorInvalidValue;
  const int G = a.Hq / a.Hkv, hchunks = (G + 15) / 16;
  const dim3 grid(a.num_splits, a.Hkv * hchunks, a.B);
  if (a.warps == 1) return launch_decode_variant<1, kDecStages>(a, grid, stream);
  if (a.warps == 4) {  // a ring as deep as a warp's part of the split (up to 4 tiles): 32, 64 or 128 KB
    const int tiles = a.chunk / (4 * kDecBN);
    return tiles <= 1 ? launch_decode_variant<4, 1>(a, grid, stream)
                      : tiles == 2 ? launch_decode_variant<4, 2>(a, grid, stream)
                                   : launch_decode_variant<4, kDecStages>(a, grid, stream);
  }
  if (a.warps == 8)  // 1 or 2 tiles a ring (64 or 128 KB)
    return a.chunk <= 8 * kDecBN ? launch_decode_variant<8, 1>(a, grid, stream)
                                 : launch_decode_variant<8, 2>(a, grid, stream);
  return cudaErrorInvalidValue;
}

}  // namespace gptoss
