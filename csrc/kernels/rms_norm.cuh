// One row of the fused residual add + RMSNorm, shared by the add_rms_norm kernel and the fused
// add + norm + gate + router kernel (moe_router.cu), so both give bit-identical results.
#pragma once
#include "kernels/common.cuh"

namespace gptoss {

// Row `row` of r = residual + x (or + sum_j ysum[row, j]), rounded to bf16; out = r * rsqrt(mean(r^2)
// + eps) * scale. Threads 0 .. nthr - 1 each own VPT 16-byte vectors (idx = threadIdx.x + i * nthr);
// every thread of the CTA must call it (block reduction; threads >= nthr add zero, which leaves the
// sum unchanged, so the result does not depend on blockDim). emit(idx, bf16x8) receives the output
// vectors; residual_out (may be null) gets r. `red`: 32 floats of shared memory. Ends with a barrier,
// so it can be called for consecutive rows.
template <int VPT, class Emit>
__device__ __forceinline__ void add_rms_norm_row(const bf16* __restrict__ x, const bf16* __restrict__ residual,
                                                 const bf16* __restrict__ scale, bf16* __restrict__ residual_out,
                                                 int64_t row, int H, float eps, const float* __restrict__ ysum,
                                                 int k, int nthr, float* red, Emit emit) {
  const int nvec = H / 8;
  const bool active = static_cast<int>(threadIdx.x) < nthr;
  const bf16* r_row = residual + row * H;
  const bf16* x_row = x ? x + row * H : nullptr;

  float v[VPT][8];
  bf16x8 rv[VPT], xv[VPT], sv[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {  // issue every load before any use (the scale too: after the
    const int idx = threadIdx.x + i * nthr;  // reduction it would be one more memory round trip)
    if (active && idx < nvec) {
      rv[i] = load_bf16x8(r_row + idx * 8);
      if (x_row) xv[i] = load_bf16x8(x_row + idx * 8);
      if (VPT <= 4) sv[i] = load_bf16x8(scale + idx * 8);   // (wider rows: registers)
    }
  }
  if (VPT > 2 && ysum) {  // wide rows (not gpt-oss): one row of y at a time (registers)
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int idx = threadIdx.x + i * nthr;
      if (active && idx < nvec) {
        float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int j = 0; j < k; ++j) {
          const float4* yp = reinterpret_cast<const float4*>(ysum + (row * k + j) * H + idx * 8);
          const float4 y0 = yp[0], y1 = yp[1];
          a[0] += y0.x; a[1] += y0.y; a[2] += y0.z; a[3] += y0.w;
          a[4] += y1.x; a[5] += y1.y; a[6] += y1.z; a[7] += y1.w;
        }
        unpack(rv[i], v[i]);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[i][j] += a[j];
      }
    }
  } else if (ysum) {  // r = residual + sum over the token's k rows of y (fp32), rounded once to bf16
    // Four rows of y at a time, every load of a group issued before the sums (a loop of one row at a
    // time waited a memory round trip a row: 4 for gpt-oss); the sum order stays j = 0, 1, ..
    constexpr int kYGroup = 4;
    float a[VPT][8];
#pragma unroll
    for (int i = 0; i < VPT; ++i)
#pragma unroll
      for (int c = 0; c < 8; ++c) a[i][c] = 0.f;
    for (int j0 = 0; j0 < k; j0 += kYGroup) {
      float4 y[VPT][kYGroup][2];
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        const int idx = threadIdx.x + i * nthr;
#pragma unroll
        for (int jj = 0; jj < kYGroup; ++jj)
          if (active && idx < nvec && j0 + jj < k) {
            const float4* yp = reinterpret_cast<const float4*>(ysum + (row * k + j0 + jj) * H + idx * 8);
            y[i][jj][0] = yp[0];
            y[i][jj][1] = yp[1];
          }
      }
#pragma unroll
      for (int i = 0; i < VPT; ++i)
#pragma unroll
        for (int jj = 0; jj < kYGroup; ++jj)
          if (j0 + jj < k) {
            const float4 y0 = y[i][jj][0], y1 = y[i][jj][1];
            a[i][0] += y0.x; a[i][1] += y0.y; a[i][2] += y0.z; a[i][3] += y0.w;
            a[i][4] += y1.x; a[i][5] += y1.y; a[i][6] += y1.z; a[i][7] += y1.w;
          }
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int idx = threadIdx.x + i * nthr;
      if (active && idx < nvec) {
        unpack(rv[i], v[i]);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[i][j] += a[i][j];
      }
    }
  }
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = threadIdx.x + i * nthr;
    if (active && idx < nvec) {
      if (ysum) {
        const bf16x8 sum = pack(v[i]);
        unpack(sum, v[i]);
        if (residual_out) store_bf16x8(residual_out + row * H + idx * 8, sum);
#pragma unroll
        for (int j = 0; j < 8; ++j) ss += v[i][j] * v[i][j];
        continue;
      }
      unpack(rv[i], v[i]);
      if (x_row) {
        float a[8];
        unpack(xv[i], a);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[i][j] += a[j];
        const bf16x8 sum = pack(v[i]);  // round the residual to bf16 ...
        unpack(sum, v[i]);              // ... and normalise the rounded value
        if (residual_out) store_bf16x8(residual_out + row * H + idx * 8, sum);
      } else if (residual_out) {
        store_bf16x8(residual_out + row * H + idx * 8, rv[i]);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) ss += v[i][j] * v[i][j];
    }
  }
  const float inv = rsqrtf(block_sum(ss, red) / static_cast<float>(H) + eps);
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int idx = threadIdx.x + i * nthr;
    if (active && idx < nvec) {
      float s[8], o[8];
      unpack(VPT <= 4 ? sv[i] : load_bf16x8(scale + idx * 8), s);
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = (v[i][j] * inv) * s[j];
      emit(idx, pack(o));
    }
  }
  __syncthreads();  // `red` is reused by the next row's reduction
}

// Threads a row takes for VPT vectors a thread: ceil(H / 8 / VPT) rounded up to whole warps.
inline int rms_norm_threads(int64_t H, int vpt) {
  return static_cast<int>(((H / 8 + vpt - 1) / vpt + 31) / 32 * 32);
}

}  // namespace gptoss
