// Micro-benchmark (diagnostics, not part of the package): read-only streaming of N MB spread over 8
// rotated buffers (beyond L2) with the access patterns of the MoE decode kernels, one CTA an SM,
// 24 warps, 4 x 16-byte loads in flight a lane (two register sets). Prints TB/s per pattern.
// nvcc -O3 -arch=sm_90a -std=c++17 -o /tmp/sp bench/experiments/stream_patterns.cu && /tmp/sp 35
#include <cstdio>
#include <cstdlib>
#include <cuda_runtime.h>

constexpr int NW = 24, DEPTH = 4;

__device__ __forceinline__ uint4 ld16h(const uint4* p, unsigned long long pol) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p), "l"(pol));
  return v;
}
__device__ __forceinline__ unsigned ld4h(const unsigned* p, unsigned long long pol) {
  unsigned v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.u32 %0, [%1], %2;" : "=r"(v) : "l"(p), "l"(pol));
  return v;
}
__device__ __forceinline__ uint4 ld16(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// block index (512-byte block) of this warp's k-th load, per pattern; nblk blocks in all
__device__ __forceinline__ long long blk(int pat, long long k, long long nblk, long long per_warp, int stride) {
  const int warp = threadIdx.x >> 5;
  const long long gw = (long long)blockIdx.x * NW + warp;
  if (pat == 0) return gw * per_warp + k;                                  // warp stretches (decode_phase)
  if (pat == 1) {                                                          // CTA-contiguous, 4-block runs a warp
    const long long per_cta = per_warp * NW;
    const long long b = k / DEPTH, d = k % DEPTH;
    return blockIdx.x * per_cta + (b * NW + warp) * DEPTH + d;
  }
  if (pat == 2) {                                                          // CTA-contiguous, 1 block a warp a step
    const long long per_cta = per_warp * NW;
    return blockIdx.x * per_cta + k * NW + warp;
  }
  // pat 3: 512-byte pieces `stride` blocks apart (mlp2 column chunks), each warp a run of them
  const long long idx = gw * per_warp + k;           // logical
  const long long col = idx / (nblk / stride), row = idx % (nblk / stride);
  return row * stride + col;
}

// decode_phase's loads: codes with the evict_first hint (hint) and a 4-byte scale word a lane
// (8 distinct a warp: 32 bytes a block) from a second array (scales)
template <bool hint, bool scales>
__global__ void __launch_bounds__(NW * 32, 1) stream_hs(const uint4* base, const unsigned* sc, long long nblk, float* sink) {
  const int lane = threadIdx.x & 31;
  const long long nw = (long long)gridDim.x * NW;
  const long long per_warp = nblk / nw;
  unsigned long long pol;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  uint4 a[DEPTH], b[DEPTH];
  unsigned sa[DEPTH], sb[DEPTH];
  unsigned acc = 0;
  const long long w0 = ((long long)blockIdx.x * NW + (threadIdx.x >> 5)) * per_warp;
  for (long long k = 0; k < per_warp; k += 2 * DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) if (k + d < per_warp) {
      a[d] = hint ? ld16h(base + (w0 + k + d) * 32 + lane, pol) : ld16(base + (w0 + k + d) * 32 + lane);
      if (scales) sa[d] = ld4h(sc + (w0 + k + d) * 8 + (lane >> 2), pol);
    }
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) if (k + DEPTH + d < per_warp) {
      b[d] = hint ? ld16h(base + (w0 + k + DEPTH + d) * 32 + lane, pol) : ld16(base + (w0 + k + DEPTH + d) * 32 + lane);
      if (scales) sb[d] = ld4h(sc + (w0 + k + DEPTH + d) * 8 + (lane >> 2), pol);
    }
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) if (k + d < per_warp) acc ^= a[d].x ^ a[d].y ^ a[d].z ^ a[d].w ^ (scales ? sa[d] : 0u);
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) if (k + DEPTH + d < per_warp) acc ^= b[d].x ^ b[d].y ^ b[d].z ^ b[d].w ^ (scales ? sb[d] : 0u);
  }
  if (acc == 0x12345678u) sink[0] = 1.f;
}

__global__ void __launch_bounds__(NW * 32, 1) stream(const uint4* base, long long nblk, int pat, int stride, float* sink) {
  const int lane = threadIdx.x & 31;
  const long long nw = (long long)gridDim.x * NW;
  const long long per_warp = nblk / nw;
  uint4 a[DEPTH], b[DEPTH];
  unsigned acc = 0;
  for (long long k = 0; k < per_warp; k += 2 * DEPTH) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) if (k + d < per_warp) a[d] = ld16(base + blk(pat, k + d, nblk, per_warp, stride) * 32 + lane);
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) if (k + DEPTH + d < per_warp) b[d] = ld16(base + blk(pat, k + DEPTH + d, nblk, per_warp, stride) * 32 + lane);
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) if (k + d < per_warp) acc ^= a[d].x ^ a[d].y ^ a[d].z ^ a[d].w;
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) if (k + DEPTH + d < per_warp) acc ^= b[d].x ^ b[d].y ^ b[d].z ^ b[d].w;
  }
  if (acc == 0x12345678u) sink[0] = 1.f;
}

int main(int argc, char** argv) {
  const double mb = argc > 1 ? atof(argv[1]) : 35.0;
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const long long nblk = (long long)(mb * 1e6 / 512) / (sms * NW * 8) * (sms * NW * 8);
  const size_t bytes = nblk * 512;
  uint4* buf[8];
  for (int i = 0; i < 8; ++i) { cudaMalloc(&buf[i], bytes); cudaMemset(buf[i], i, bytes); }
  float* sink;
  cudaMalloc(&sink, 4);
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  // Time one launch of run(it) (it: the rotated buffer), after 16 warm-up launches; print TB/s.
  const auto report = [&](const char* name, double total_bytes, auto run) {
    for (int it = 0; it < 16; ++it) run(it);
    const int reps = 80;
    cudaEventRecord(e0);
    for (int it = 0; it < reps; ++it) run(it);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms;
    cudaEventElapsedTime(&ms, e0, e1);
    const double us = ms * 1e3 / reps;
    printf("%-30s %.1f MB: %7.2f us  %.2f TB/s\n", name, total_bytes / 1e6, us, total_bytes / (us * 1e-6) / 1e12);
  };
  const char* names[] = {"warp stretches", "CTA-contiguous 4-block runs", "CTA-contiguous 1 block", "512B pieces stride 45", "512B pieces stride 2"};
  for (int pat = 0; pat < 5; ++pat) {
    const int p = pat < 4 ? pat : 3, stride = pat == 4 ? 2 : 45;
    report(names[pat], bytes, [&](int it) { stream<<<sms, NW * 32>>>(buf[it % 8], nblk, p, stride, sink); });
  }
  unsigned* sc[8];
  for (int i = 0; i < 8; ++i) { cudaMalloc(&sc[i], nblk * 32); cudaMemset(sc[i], i, nblk * 32); }
  const double with_scales = bytes + nblk * 32.0;
  report("stretches + evict_first hint", bytes,
         [&](int it) { stream_hs<true, false><<<sms, NW * 32>>>(buf[it % 8], sc[it % 8], nblk, sink); });
  report("stretches + scale words", with_scales,
         [&](int it) { stream_hs<false, true><<<sms, NW * 32>>>(buf[it % 8], sc[it % 8], nblk, sink); });
  report("stretches + hint + scales", with_scales,
         [&](int it) { stream_hs<true, true><<<sms, NW * 32>>>(buf[it % 8], sc[it % 8], nblk, sink); });
  printf("%s\n", cudaGetErrorString(cudaGetLastError()));
  return 0;
}
