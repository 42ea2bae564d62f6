// Torch-free tests of the kernels against CPU computations: run ./build/gptoss_kernel_tests on a
// GPU machine (exit code 0 = all passed). The pytest GPU suite covers the same ops through torch.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "kernels/rms_norm.h"
#include "kernels/rope.h"

using bf16 = __nv_bfloat16;

#define CK(x)                                                                          \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(2);                                                                    \
    }                                                                                  \
  } while (0)

static float r(const bf16& v) { return __bfloat162float(v); }

template <class T>
static T* to_device(const std::vector<T>& h) {
  T* d;
  CK(cudaMalloc(&d, h.size() * sizeof(T)));
  CK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <class T>
static std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  CK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

// |a - b| within `ulps` bf16 ulps of the reference value (plus a tiny absolute floor).
static bool close_bf16(float got, double want, double ulps = 1.0) {
  const double ulp = std::ldexp(1.0, std::ilogb(std::fabs(want) + 1e-30) - 7);
  return std::fabs(got - want) <= ulps * ulp + 1e-6;
}

static int test_rmsnorm(int T, int H, bool with_x) {
  std::mt19937 g(T * 131 + H);
  std::normal_distribution<float> n(0.f, 2.f);
  std::vector<bf16> x(T * H), res(T * H), scale(H);
  for (auto& v : x) v = __float2bfloat16(n(g));
  for (auto& v : res) v = __float2bfloat16(n(g));
  for (auto& v : scale) v = __float2bfloat16(1.f + 0.1f * n(g));
  bf16 *dx = to_device(x), *dr = to_device(res), *ds = to_device(scale);
  bf16 *dout, *dres;
  CK(cudaMalloc(&dout, T * H * 2));
  CK(cudaMalloc(&dres, T * H * 2));
  CK(cudaMemset(dout, 0xff, T * H * 2));  // poison (NaN)
  CK(gptoss::launch_add_rms_norm(with_x ? dx : nullptr, dr, ds, dout, dres, T, H, 1e-5f, 0));
  CK(cudaDeviceSynchronize());
  auto out = to_host(dout, T * H);
  auto ro = to_host(dres, T * H);
  int bad = 0;
  for (int t = 0; t < T; ++t) {
    std::vector<float> rr(H);
    double ss = 0;
    for (int h = 0; h < H; ++h) {
      float s = r(res[t * H + h]) + (with_x ? r(x[t * H + h]) : 0.f);
      rr[h] = r(__float2bfloat16(s));
      ss += double(rr[h]) * rr[h];
      if (r(ro[t * H + h]) != rr[h]) ++bad;
    }
    const double inv = 1.0 / std::sqrt(ss / H + 1e-5);
    for (int h = 0; h < H; ++h)
      if (!close_bf16(r(out[t * H + h]), rr[h] * inv * r(scale[h]))) ++bad;
  }
  cudaFree(dx); cudaFree(dr); cudaFree(ds); cudaFree(dout); cudaFree(dres);
  std::printf("%s add_rms_norm T=%d H=%d x=%d (%d mismatches)\n", bad ? "FAIL" : "ok  ", T, H, with_x, bad);
  return bad != 0;
}

static int test_rope(int T, int Hq, int Hkv, int D, int64_t start) {
  std::mt19937 g(T + Hq);
  std::normal_distribution<float> n(0.f, 1.f);
  const int stride = (Hq + 2 * Hkv) * D;  // q and k are slices of a fused qkv row
  std::vector<bf16> qkv(T * stride);
  for (auto& v : qkv) v = __float2bfloat16(n(g));
  std::vector<int64_t> pos(T);
  for (int t = 0; t < T; ++t) pos[t] = start + t;
  std::vector<double> inv(D / 2);
  for (int d = 0; d < D / 2; ++d) inv[d] = std::pow(150000.0, -2.0 * d / D);
  const double conc = 0.1 * std::log(32.0) + 1.0;
  bf16* dqkv = to_device(qkv);
  int64_t* dpos = to_device(pos);
  double* dinv = to_device(inv);
  CK(gptoss::launch_rope(dqkv, dqkv + Hq * D, dpos, dinv, conc, T, Hq, Hkv, D, stride, stride, 0));
  CK(cudaDeviceSynchronize());
  auto out = to_host(dqkv, T * stride);
  int bad = 0;
  for (int t = 0; t < T; ++t)
    for (int h = 0; h < Hq + 2 * Hkv; ++h)
      for (int d = 0; d < D / 2; ++d) {
        const size_t i1 = size_t(t) * stride + h * D + d, i2 = i1 + D / 2;
        if (h >= Hq + Hkv) {  // v is untouched
          bad += r(out[i1]) != r(qkv[i1]) || r(out[i2]) != r(qkv[i2]);
          continue;
        }
        const double a = double(pos[t]) * inv[d];
        const double c = float(std::cos(a) * conc), s = float(std::sin(a) * conc);
        const double x1 = r(qkv[i1]), x2 = r(qkv[i2]);
        bad += !close_bf16(r(out[i1]), x1 * c - x2 * s, 1.01) + !close_bf16(r(out[i2]), x2 * c + x1 * s, 1.01);
      }
  cudaFree(dqkv); cudaFree(dpos); cudaFree(dinv);
  std::printf("%s rope T=%d Hq=%d Hkv=%d D=%d start=%lld (%d mismatches)\n", bad ? "FAIL" : "ok  ", T, Hq, Hkv, D,
              (long long)start, bad);
  return bad != 0;
}

int main() {
  int fails = 0;
  for (int T : {1, 7, 64, 257})
    for (int H : {8, 256, 2880, 4096, 8200}) fails += test_rmsnorm(T, H, true) + test_rmsnorm(T, H, false);
  for (int T : {1, 5, 129}) fails += test_rope(T, 64, 8, 64, 0) + test_rope(T, 8, 1, 64, 131000);
  std::printf("%s: %d failing case(s)\n", fails ? "FAILED" : "PASSED", fails);
  return fails ? 1 : 0;
}
