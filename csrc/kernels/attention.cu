// Sink-aware causal GQA flash attention, head_dim 64: varlen prefill, split-KV decode + combine,
// and the KV-cache write. Tensor cores through mma.sync m16n8k16 (bf16 in, fp32 accumulate),
// which runs on sm_80+ and on Hopper.
//
// Prefill (FlashAttention-2 style): a CTA takes 64 * MT query rows of one head of one sequence
// (4 warps, 16 * MT rows each) and walks 64-key tiles of the KV head it shares with its GQA group,
// double-buffered through cp.async into XOR-swizzled shared memory (conflict-free ldmatrix).
// S = Q K^T stays in registers; the S accumulators are re-packed as the A operand of P V (the
// m16n8 C layout of two adjacent key blocks is the m16n8k16 A layout), online softmax in fp32 with
// exp2. Only the tiles the causal/window band touches are visited; masks only on tiles that cut
// the band. Heaviest query blocks are scheduled first.
//
// Decode: a one-warp CTA takes the (up to 16) query heads of a GQA group of one sequence (so each
// K/V tile is read once for the whole group: rows of the mma are heads) and one chunk of the key
// range, streamed in 32-key tiles through a 4-stage cp.async pipeline (32 KB of shared memory: 7
// CTAs an SM). A one-warp CTA is latency-bound on its own tile chain (~2 us a 64-key tile alone
// on an SM), so shorter tiles and more CTAs an SM: v1 (64-key tiles, 3 stages, 4 CTAs an SM) 12.1
// us at B=1, L=8192; 2 stages of 64 keys (7 CTAs) lost B=32 from 99% to 79% of copy bandwidth. The partial (unnormalised output, max,
// sum) goes to a workspace; the combine kernel merges the chunks and adds the sink.
//
// Rows of K/V past the valid range are zero-filled (never read from memory), so a cache holding
// garbage or NaN beyond its length cannot leak into the result; fully masked rows give 0, not NaN.
#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "kernels/attention.h"
#include "kernels/common.cuh"
#include "kernels/mma.cuh"

namespace gptoss {
namespace {

constexpr int D = kAttnHeadDim;  // 64 = 8 chunks of 16 bytes a row
constexpr int BN = 64;           // keys a tile
constexpr int kTileBytes = BN * D * 2;
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

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}


// Copy rows [key0, key0 + 8 * NB) of one KV head into a tile; rows >= key_end are zero-filled.
template <int NT, int NB = 8>
__device__ __forceinline__ void load_tile(uint32_t dst, const bf16* base, int64_t row_stride, int key0, int key_end,
                                          int tid) {
#pragma unroll
  for (int i = tid; i < NB * 8 * 8; i += NT) {
    const int r = i >> 3, c = i & 7;
    const bool valid = key0 + r < key_end;
    cp_async16(dst + swz128(r, c), valid ? base + (int64_t)(key0 + r) * row_stride + c * 8 : base, valid);
  }
}

// S[mt] (16 rows x 8*NB keys) = Q[mt] K^T for one warp's MT row tiles.
template <int MT, int NB = 8>
__device__ __forceinline__ void qk_tile(float (&s)[MT][NB][4], const uint32_t (&qf)[MT][4][4], uint32_t sK, int lane) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NB; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < 4; ++ks) {
#pragma unroll
    for (int nb = 0; nb < NB / 2; ++nb) {
      uint32_t b[4];
      ldsm_x4(b, sK + swz128(nb * 16 + (lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1)));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_bf16(s[mt][2 * nb], qf[mt][ks], b[0], b[1]);
        mma_bf16(s[mt][2 * nb + 1], qf[mt][ks], b[2], b[3]);
      }
    }
  }
}

// Online softmax on a raw S tile (masked entries -inf); sl2 = sm_scale * log2(e), the running
// max m is kept in the scaled log2 domain. S becomes P, O is rescaled, l accumulates per thread.
template <int MT, int NB = 8>
__device__ __forceinline__ void softmax_tile(float (&s)[MT][NB][4], float (&o)[MT][8][4], float (&m)[MT][2],
                                             float (&l)[MT][2], float sl2) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float mx = kNegInf;
#pragma unroll
      for (int j = 0; j < NB; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * hr], s[mt][j][2 * hr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mnew = fmaxf(m[mt][hr], mx * sl2);
      const float mu = mnew == kNegInf ? 0.f : mnew;  // a row with nothing visible yet: no NaN
      const float alpha = ex2(m[mt][hr] - mu);
      m[mt][hr] = mnew;
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < NB; ++j) {
        const float p0 = ex2(fmaf(s[mt][j][2 * hr], sl2, -mu)), p1 = ex2(fmaf(s[mt][j][2 * hr + 1], sl2, -mu));
        s[mt][j][2 * hr] = p0;
        s[mt][j][2 * hr + 1] = p1;
        rs += p0 + p1;
      }
      l[mt][hr] = l[mt][hr] * alpha + rs;
#pragma unroll
      for (int d = 0; d < 8; ++d) {
        o[mt][d][2 * hr] *= alpha;
        o[mt][d][2 * hr + 1] *= alpha;
      }
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

template <int MT>
__global__ void __launch_bounds__(128) attn_prefill_kernel(const AttnPrefillArgs a) {
  pdl_wait();     // see kernels/pdl.h
  constexpr int BM = 64 * MT, NT = 128;
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t sQ = smem_u32(smem), sK = sQ + BM * 128, sV = sK + 2 * kTileBytes;
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
  const int t_lo = key_lo / BN, t_hi = (key_end + BN - 1) / BN;
  const int kvh = h / (a.Hq / a.Hkv);
  const int64_t kv_row = (int64_t)a.Hkv * D;
  const int64_t kv_off = (int64_t)b * a.max_len * kv_row + (int64_t)kvh * D;
  const bf16* kb = a.k_cache + kv_off;
  const bf16* vb = a.v_cache + kv_off;

  const bf16* qb = a.q + (int64_t)(q0 + row0) * a.q_stride + (int64_t)h * D;
  for (int i = tid; i < BM * 8; i += NT) {
    const int r = i >> 3, c = i & 7;
    const bool valid = r < rows;
    cp_async16(sQ + swz128(r, c), valid ? qb + (int64_t)r * a.q_stride + c * 8 : qb, valid);
  }
  load_tile<NT>(sK, kb, kv_row, t_lo * BN, key_end, tid);
  load_tile<NT>(sV, vb, kv_row, t_lo * BN, key_end, tid);
  cp_async_commit();

  const float sl2 = a.sm_scale * kLog2e;
  uint32_t qf[MT][4][4];
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
      load_tile<NT>(sK + (buf ^ 1) * kTileBytes, kb, kv_row, (t + 1) * BN, key_end, tid);
      load_tile<NT>(sV + (buf ^ 1) * kTileBytes, vb, kv_row, (t + 1) * BN, key_end, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (t == t_lo) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int ks = 0; ks < 4; ++ks)
          ldsm_x4(qf[mt][ks], sQ + swz128(wrow + mt * 16 + (lane & 15), ks * 2 + (lane >> 4)));
    }
    float s[MT][8][4];
    qk_tile<MT>(s, qf, sK + buf * kTileBytes, lane);
    const int k0 = t * BN;
    if ((k0 + BN - 1 > pos0) || (a.window > 0 && k0 <= pos_last - a.window)) {  // the tile cuts the band
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int pos = pos0 + wrow + mt * 16 + (lane >> 2) + ((e >> 1) << 3);
            const int key = k0 + j * 8 + ((lane & 3) << 1) + (e & 1);
            if (key > pos || (a.window > 0 && pos - key >= a.window)) s[mt][j][e] = kNegInf;
          }
    }
    softmax_tile<MT>(s, o, m, l, sl2);
    pv_tile<MT>(o, s, sV + buf * kTileBytes, lane);
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

__global__ void __launch_bounds__(32) attn_decode_kernel(const AttnDecodeArgs a) {
  pdl_wait();     // see kernels/pdl.h
  pdl_trigger();  // at once: later (after the main loop) cost B=32 L=8192 151 -> 171 us, L=65536 42 -> 50 us
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t sK = smem_u32(smem), sV = sK + kDecStages * kDecTileBytes;
  const int lane = threadIdx.x;
  const int split = blockIdx.x, b = blockIdx.z;
  const int G = a.Hq / a.Hkv, hchunks = (G + 15) / 16;
  const int kvh = blockIdx.y / hchunks, hc = blockIdx.y % hchunks;
  const int h0 = kvh * G + hc * 16, nrows = min(16, G - hc * 16);
  const int len = min(max(a.seq_lens[b], 0), a.max_len);
  const int lo = a.window > 0 ? max(0, len - a.window) : 0;
  const int kbeg = lo + split * a.chunk, kend = min(len, kbeg + a.chunk);
  const int S = a.num_splits;
  const int r0 = lane >> 2;
  const int64_t ws0 = ((int64_t)b * a.Hq + h0) * S + split;  // workspace row of head h0

  if (kbeg >= kend) {  // nothing in this chunk: an empty partial (sum 0)
    if (S == 1) {      // no combine: the output itself (zero, as the combine would give)
      for (int i = lane; i < nrows * (D / 2); i += 32)
        reinterpret_cast<uint32_t*>(a.out + (int64_t)b * a.out_stride + (int64_t)(h0 + i / (D / 2)) * D)[i % (D / 2)] = 0u;
      return;
    }
    if ((lane & 3) == 0)
      for (int hr = 0; hr < 2; ++hr) {
        const int r = r0 + hr * 8;
        if (r < nrows) {
          a.ws_ml[(ws0 + (int64_t)r * S) * 2] = kNegInf;
          a.ws_ml[(ws0 + (int64_t)r * S) * 2 + 1] = 0.f;
        }
      }
    return;
  }

  const int64_t kv_row = (int64_t)a.Hkv * D;
  const int64_t kv_off = (int64_t)b * a.max_len * kv_row + (int64_t)kvh * D;
  const bf16* kb = a.k_cache + kv_off;
  const bf16* vb = a.v_cache + kv_off;
  const int ntiles = (kend - kbeg + kDecBN - 1) / kDecBN;
#pragma unroll
  for (int st = 0; st < kDecStages - 1; ++st) {
    if (st < ntiles) {
      load_tile<32, kDecNB>(sK + st * kDecTileBytes, kb, kv_row, kbeg + st * kDecBN, kend, lane);
      load_tile<32, kDecNB>(sV + st * kDecTileBytes, vb, kv_row, kbeg + st * kDecBN, kend, lane);
    }
    cp_async_commit();
  }

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

  const float sl2 = a.sm_scale * kLog2e;
  float o[1][8][4], m[1][2] = {{kNegInf, kNegInf}}, l[1][2] = {{0.f, 0.f}};
#pragma unroll
  for (int d = 0; d < 8; ++d) o[0][d][0] = o[0][d][1] = o[0][d][2] = o[0][d][3] = 0.f;

  for (int t = 0; t < ntiles; ++t) {
    const int nt = t + kDecStages - 1;
    if (nt < ntiles) {
      const int st = nt % kDecStages;
      load_tile<32, kDecNB>(sK + st * kDecTileBytes, kb, kv_row, kbeg + nt * kDecBN, kend, lane);
      load_tile<32, kDecNB>(sV + st * kDecTileBytes, vb, kv_row, kbeg + nt * kDecBN, kend, lane);
    }
    cp_async_commit();
    cp_async_wait<kDecStages - 1>();
    __syncwarp();
    const int st = t % kDecStages;
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
  }

#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float L = l[0][hr];
    L += __shfl_xor_sync(0xffffffffu, L, 1);
    L += __shfl_xor_sync(0xffffffffu, L, 2);
    const int r = r0 + hr * 8;
    if (S == 1) {  // one split (short windows): normalise with the sink here, no combine launch
      if (r < nrows) {
        const float mu = m[0][hr] == kNegInf ? 0.f : m[0][hr];
        if (a.sinks) L += ex2(a.sinks[h0 + r] * kLog2e - mu);
        const float inv = L > 0.f ? 1.f / L : 0.f;
        bf16* orow = a.out + (int64_t)b * a.out_stride + (int64_t)(h0 + r) * D + ((lane & 3) << 1);
#pragma unroll
        for (int d = 0; d < 8; ++d)
          *reinterpret_cast<uint32_t*>(orow + d * 8) = pack_bf16(o[0][d][2 * hr] * inv, o[0][d][2 * hr + 1] * inv);
      }
      continue;
    }
    if (r < nrows) {
      const int64_t w = ws0 + (int64_t)r * S;
      float* wo = a.ws_o + w * D + ((lane & 3) << 1);
#pragma unroll
      for (int d = 0; d < 8; ++d) *reinterpret_cast<float2*>(wo + d * 8) = make_float2(o[0][d][2 * hr], o[0][d][2 * hr + 1]);
      if ((lane & 3) == 0) {
        a.ws_ml[w * 2] = m[0][hr];
        a.ws_ml[w * 2 + 1] = L;
      }
    }
  }
}

// One CTA of 128 threads per (sequence, head): the splits' (max, sum) pairs are read in parallel
// into shared memory, reduced to the global max and the weights; then two halves of the CTA sum
// the weighted partial outputs of alternate splits (independent loads, unrolled), sink added.
constexpr int kCombineThreads = 128;

__global__ void __launch_bounds__(kCombineThreads) attn_decode_combine_kernel(const AttnDecodeArgs a) {
  pdl_wait();     // see kernels/pdl.h
  pdl_trigger();
  extern __shared__ float wsm[];  // [S] weights, then 32 for reductions, then 64 for the halves
  const int bh = blockIdx.x, tid = threadIdx.x;
  const int b = bh / a.Hq, h = bh % a.Hq, S = a.num_splits;
  float* red = wsm + S;
  const float* ml = a.ws_ml + (int64_t)bh * S * 2;
  const float sink = a.sinks ? a.sinks[h] * kLog2e : kNegInf;
  float mx = kNegInf;
  for (int s = tid; s < S; s += kCombineThreads) {
    const float2 v = *reinterpret_cast<const float2*>(ml + 2 * s);
    if (v.y > 0.f) mx = fmaxf(mx, v.x);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if ((tid & 31) == 0) red[tid >> 5] = mx;
  __syncthreads();
  float M = sink;
  for (int w = 0; w < kCombineThreads / 32; ++w) M = fmaxf(M, red[w]);
  __syncthreads();
  float part = 0.f;
  for (int s = tid; s < S; s += kCombineThreads) {
    const float2 v = *reinterpret_cast<const float2*>(ml + 2 * s);
    const float w = (v.y > 0.f && M != kNegInf) ? ex2(v.x - M) : 0.f;
    wsm[s] = w;
    part += w * v.y;
  }
  const float L = block_sum(part, red) + ((a.sinks && M != kNegInf) ? ex2(sink - M) : 0.f);
  // block_sum synchronised the weights too
  const int d = tid & (D - 1), half = tid / D;
  const float* wo = a.ws_o + (int64_t)bh * S * D + d;
  float acc = 0.f;
#pragma unroll 4
  for (int s = half; s < S; s += 2) {
    const float w = wsm[s];
    if (w != 0.f) acc += w * wo[(int64_t)s * D];
  }
  float* halves = red + 32;
  if (half == 1) halves[d] = acc;
  __syncthreads();
  if (half == 0) {
    acc += halves[d];
    a.out[(int64_t)b * a.out_stride + (int64_t)h * D + d] = __float2bfloat16(L > 0.f ? acc / L : 0.f);
  }
}

// ---- KV-cache write -----------------------------------------------------------------------------

__global__ void kv_write_kernel(const bf16* __restrict__ k, const bf16* __restrict__ v, int64_t k_stride,
                                int64_t v_stride, const int64_t* __restrict__ slots, int Hkv, bf16* __restrict__ kc,
                                bf16* __restrict__ vc, int64_t rows) {
  pdl_wait();     // see kernels/pdl.h
  pdl_trigger();
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0 || slot >= rows) return;
  const int i = threadIdx.x;  // chunk of 8 elements within the token's Hkv * 64
  const int64_t dst = slot * Hkv * D + i * 8;
  store_bf16x8(kc + dst, load_bf16x8(k + t * k_stride + i * 8));
  store_bf16x8(vc + dst, load_bf16x8(v + t * v_stride + i * 8));
}

__global__ void decode_prep_kernel(int32_t* __restrict__ seq_lens, const int32_t* __restrict__ active,
                                   const int64_t* __restrict__ row0, int64_t* __restrict__ positions,
                                   int64_t* __restrict__ slots, int B) {
  pdl_wait();     // see kernels/pdl.h
  pdl_trigger();
  const int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int32_t a = active[b];
  const int32_t len = seq_lens[b] + a;
  seq_lens[b] = len;
  const int64_t p = static_cast<int64_t>(len) - 1;
  positions[b] = p;
  slots[b] = a > 0 ? row0[b] + p : -1;
}

template <int MT>
cudaError_t launch_prefill_mt(const AttnPrefillArgs& a, cudaStream_t stream) {
  constexpr int BM = 64 * MT;
  const size_t smem = BM * 128 + 4 * kTileBytes;
  const dim3 grid(ceil_div(a.max_q_len, BM), a.Hq, a.B);
  return launch_kernel(attn_prefill_kernel<MT>, grid, dim3(128), smem, stream, a);
}

int prefill_block_rows(int window) {
  // GPTOSS_ATTN_BLOCK_M=64|128 overrides (for tuning). By default 64-row blocks for narrow windows
  // (a 128-row block would visit twice the keys it needs: H200, T=4096, window 128: 78-84 us vs
  // 98-103 us), 128 rows otherwise (half the shared-memory traffic a FLOP: causal T=4096 606 us
  // vs 659 us, T=16384 8.0-8.3 ms vs 9.0-9.6 ms).
  const char* e = std::getenv("GPTOSS_ATTN_BLOCK_M");
  const int forced = e ? std::atoi(e) : 0;
  if (forced == 64 || forced == 128) return forced;
  return (window > 0 && window <= 256) ? 64 : 128;
}

}  // namespace

cudaError_t launch_attn_prefill(const AttnPrefillArgs& a, cudaStream_t stream) {
  if (a.B <= 0 || a.max_q_len <= 0) return cudaSuccess;
  return prefill_block_rows(a.window) == 64 ? launch_prefill_mt<1>(a, stream) : launch_prefill_mt<2>(a, stream);
}

void attn_decode_split(int B, int Hq, int Hkv, int max_len, int window, int num_sms, int& chunk, int& num_splits) {
  // About one wave of CTAs (4 one-warp CTAs an SM fit): (B x KV heads) rows times the splits.
  // Fewer, longer splits pipeline better inside a CTA and leave the combine less to merge (v1, two
  // waves of one-tile CTAs at B=1, L=8192: 26% of copy bandwidth).
  const int G = Hq / Hkv, hchunks = (G + 15) / 16;
  const int range = std::max(1, window > 0 ? std::min(window, max_len) : max_len);
  const int64_t wanted = (int64_t)std::max(num_sms, 1) * 4;
  const int64_t rows = (int64_t)B * Hkv * hchunks;
  const int64_t max_splits = (range + BN - 1) / BN;
  // A range whose tiles are all in flight at once in one CTA (the 128 window) takes one split: the
  // kernel then writes the output itself and the combine launch is skipped.
  const int64_t splits = range <= kDecStages * kDecBN
                             ? 1
                             : std::max<int64_t>(1, std::min<int64_t>(max_splits, (wanted + rows / 2) / rows));
  const int64_t c = ((range + splits - 1) / splits + BN - 1) / BN * BN;
  chunk = static_cast<int>(c);
  num_splits = static_cast<int>((range + c - 1) / c);
}

cudaError_t launch_attn_decode(const AttnDecodeArgs& a, cudaStream_t stream) {
  if (a.B <= 0) return cudaSuccess;
  const int G = a.Hq / a.Hkv, hchunks = (G + 15) / 16;
  const dim3 grid(a.num_splits, a.Hkv * hchunks, a.B);
  cudaError_t err = launch_kernel(attn_decode_kernel, grid, dim3(32), 2 * kDecStages * kDecTileBytes, stream, a);
  if (err != cudaSuccess || a.num_splits == 1) return err;   // one split: the kernel wrote the output
  const size_t smem = (a.num_splits + 32 + D) * sizeof(float);
  if (smem > 48 * 1024) return cudaErrorInvalidValue;  // > 12k splits: never planned
  return launch_kernel(attn_decode_combine_kernel, dim3(a.B * a.Hq), dim3(kCombineThreads), smem, stream, a);
}

cudaError_t launch_decode_prep(int32_t* seq_lens, const int32_t* active, const int64_t* row0, int64_t* positions,
                               int64_t* slots, int64_t B, cudaStream_t stream) {
  if (B <= 0) return cudaSuccess;
  if (B > INT32_MAX) return cudaErrorInvalidValue;
  const int threads = static_cast<int>(std::min<int64_t>(B, 256));
  return launch_kernel(decode_prep_kernel, dim3(static_cast<unsigned>((B + threads - 1) / threads)), dim3(threads), 0,
                       stream, seq_lens, active, row0, positions, slots, static_cast<int>(B));
}

cudaError_t launch_kv_write(const bf16* k, const bf16* v, int64_t k_stride, int64_t v_stride, const int64_t* slots,
                            int64_t T, int Hkv, bf16* k_cache, bf16* v_cache, int64_t rows, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  return launch_kernel(kv_write_kernel, dim3(static_cast<unsigned>(T)), dim3(Hkv * (D / 8)), 0, stream, k, v, k_stride,
                       v_stride, slots, Hkv, k_cache, v_cache, rows);
}

}  // namespace gptoss
